//! Extracting expert weights from a model into an adapter (the inverse of merge).
//!
//! - By config: the tensors of the configured experts (and shared experts /
//!   non-expert modules when the config says so).
//! - By difference with a base: every routed-expert tensor (or fused-tensor
//!   expert slice) whose bytes differ from the base's, compared in parallel
//!   with bounded buffers; the expert config is derived from what differs.
//!   A block-FP8 weight (F8_E4M3) and its `weight_scale_inv` go together: if
//!   either differs, both are extracted.
//!
//! The adapter is written like merge's outputs: header first, tensor bytes
//! copied in-kernel from the model's files, under a temporary name.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;
use serde::Serialize;

use crate::adapter;
use crate::copy::{self, read_exact_at, Range};
use crate::error::{Error, Result};
use crate::expert_config::ExpertConfig;
use crate::fingerprint;
use crate::fp8;
use crate::naming::{self, LayerExperts, Role};
use crate::progress::Control;
use crate::safetensors::writer::{self, NewTensor};
use crate::safetensors::{expert_units, Checkpoint, Dtype, SafetensorsFile, TensorInfo};
use crate::staging::{self, Staged};

#[derive(Debug, Clone, Default)]
pub struct SplitOptions {
    /// Expert config selecting what to extract (else: what differs from `base`).
    pub experts: Option<PathBuf>,
    /// The base MODEL was fine-tuned from: compared against, and fingerprinted.
    pub base: Option<PathBuf>,
    /// By difference: also extract differing shared-expert tensors.
    pub shared_experts: bool,
    /// By difference: also extract differing non-expert tensors.
    pub non_expert_modules: bool,
    pub dry_run: bool,
    pub overwrite: bool,
}

#[derive(Debug, Serialize)]
pub struct Extracted {
    /// Name in the adapter (an expert slice of a fused tensor gets its slice name).
    pub tensor: String,
    /// The model tensor it comes from.
    pub source: String,
    pub file: String,
    pub kind: &'static str,
    pub layer: Option<u32>,
    pub expert: Option<u32>,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct SplitReport {
    pub model: String,
    pub out: String,
    pub dry_run: bool,
    /// "experts" (by config) or "diff" (by difference with the base).
    pub mode: &'static str,
    /// The adapter's expert config, official JSON.
    pub expert_config: String,
    pub base_fingerprint: Option<String>,
    pub tensors: Vec<Extracted>,
    pub bytes: u64,
    /// By difference: tensors that differ but were left out (shared experts,
    /// non-expert modules without the flags asking for them).
    pub differing_excluded: Vec<String>,
    pub compared_bytes: u64,
    pub warnings: Vec<String>,
}

/// One piece to extract: a whole tensor, or expert `unit` of a fused tensor.
struct Pick<'a> {
    file: &'a SafetensorsFile,
    shard: usize,
    tensor: &'a TensorInfo,
    /// `None`: the whole tensor.
    unit: Option<u32>,
}

impl Pick<'_> {
    fn name(&self) -> String {
        match self.unit {
            Some(e) => naming::fused_slice_name(&self.tensor.name, e)
                .unwrap_or_else(|| self.tensor.name.clone()),
            None => self.tensor.name.clone(),
        }
    }

    /// (absolute offset, length, shape) of the bytes to copy.
    fn extent(&self) -> (u64, u64, Vec<u64>) {
        let start = self.file.offset_of(self.tensor);
        match self.unit {
            Some(e) => {
                let (_, len) = expert_units(self.tensor);
                (
                    start + u64::from(e) * len,
                    len,
                    self.tensor.shape[1..].to_vec(),
                )
            }
            None => (start, self.tensor.nbytes(), self.tensor.shape.clone()),
        }
    }
}

/// What is extracted, how it was chosen, and what was left out.
struct Selection<'a> {
    /// "experts" (by config) or "diff" (by difference with the base).
    mode: &'static str,
    picks: Vec<Pick<'a>>,
    config: ExpertConfig,
    excluded: Vec<String>,
    compared: u64,
}

pub fn split(model: &Path, out: &Path, opts: &SplitOptions, ctl: &Control) -> Result<SplitReport> {
    let ckpt = Checkpoint::open(model)?;
    let base = opts.base.as_deref().map(Checkpoint::open).transpose()?;
    check_output(model, out, opts)?;
    let Selection {
        mode,
        picks,
        config,
        excluded,
        compared,
    } = select(&ckpt, base.as_ref(), model, opts, ctl)?;
    let mut warnings = Vec::new();
    if let Some(msg) = excluded_warning(&excluded) {
        ctl.warn(msg.clone());
        warnings.push(msg);
    }
    let base_fingerprint = match &base {
        Some(b) => Some(fingerprint::fingerprint(b, ctl)?),
        None => {
            let msg = "no --base given: the adapter records no base fingerprint, so merge cannot check its base".to_string();
            ctl.warn(msg.clone());
            warnings.push(msg);
            None
        }
    };
    let tensors = extracted(&ckpt, &picks);
    let report = SplitReport {
        model: model.display().to_string(),
        out: out.display().to_string(),
        dry_run: opts.dry_run,
        mode,
        expert_config: config.to_json(),
        base_fingerprint,
        bytes: tensors.iter().map(|t| t.bytes).sum(),
        tensors,
        differing_excluded: excluded,
        compared_bytes: compared,
        warnings,
    };
    if !opts.dry_run {
        let metadata = adapter::adapter_metadata(&config, report.base_fingerprint.as_deref(), &[])?;
        write_adapter(&picks, &metadata, out, opts.overwrite, ctl)?;
    }
    Ok(report)
}

/// The output may not be or lie inside an input, nor replace what split could not have written.
fn check_output(model: &Path, out: &Path, opts: &SplitOptions) -> Result<()> {
    let mut inputs: Vec<&Path> = vec![model];
    inputs.extend(opts.base.as_deref());
    inputs.extend(opts.experts.as_deref());
    staging::check_paths(&[out], &inputs)?;
    if !opts.dry_run {
        staging::check_target(out, opts.overwrite, &[])?;
        staging::check_kind(out, false)?;
    }
    Ok(())
}

/// The tensors to extract: those the expert config names, or those that differ from the base.
fn select<'a>(
    ckpt: &'a Checkpoint,
    base: Option<&Checkpoint>,
    model: &Path,
    opts: &SplitOptions,
    ctl: &Control,
) -> Result<Selection<'a>> {
    let layout = Layout::of(ckpt);
    let selection = match (&opts.experts, base) {
        (Some(_), _) if opts.shared_experts || opts.non_expert_modules => {
            return Err(Error::Usage(
                "--shared-experts / --non-expert-modules apply to --base without --experts; \
                 with --experts the expert config says what to include"
                    .into(),
            ))
        }
        (Some(cfg_path), _) => {
            let config = ExpertConfig::load(cfg_path)?;
            layout.check_config(&config, cfg_path, model)?;
            let picks = by_config(ckpt, &config);
            if let Some(b) = base {
                check_in_base(&picks, b)?;
            }
            Selection {
                mode: "experts",
                picks,
                config,
                excluded: Vec::new(),
                compared: 0,
            }
        }
        (None, Some(b)) => {
            let Diff {
                picks,
                config,
                excluded,
                compared,
            } = by_diff(ckpt, b, &layout, opts, ctl)?;
            if picks.is_empty() {
                let mut msg = format!(
                    "{}: no routed-expert tensor differs from {}",
                    model.display(),
                    b.path.display()
                );
                if !excluded.is_empty() {
                    msg += &format!(
                        "; {} other tensors differ (pass --shared-experts / --non-expert-modules to extract them)",
                        excluded.len()
                    );
                }
                return Err(Error::Mismatch(msg));
            }
            Selection {
                mode: "diff",
                picks,
                config,
                excluded,
                compared,
            }
        }
        (None, None) => {
            return Err(Error::Usage(
                "split needs an expert config (--experts) or a base (--base)".into(),
            ))
        }
    };
    if selection.picks.is_empty() {
        return Err(Error::Mismatch(format!(
            "{}: the expert config selects no tensor of {}",
            opts.experts.as_deref().unwrap_or(model).display(),
            model.display()
        )));
    }
    Ok(selection)
}

/// The warning for differing tensors that were left out, naming the first three.
fn excluded_warning(excluded: &[String]) -> Option<String> {
    if excluded.is_empty() {
        return None;
    }
    let shown: Vec<&str> = excluded.iter().take(3).map(String::as_str).collect();
    let more = if excluded.len() > 3 {
        format!(" and {} more", excluded.len() - 3)
    } else {
        String::new()
    };
    Some(format!(
        "{} non-routed tensors differ from the base but are not extracted ({}{more}); \
         pass --shared-experts / --non-expert-modules to include them",
        excluded.len(),
        shown.join(", ")
    ))
}

/// The report's line for each picked tensor.
fn extracted(ckpt: &Checkpoint, picks: &[Pick]) -> Vec<Extracted> {
    picks
        .iter()
        .map(|p| {
            let role = naming::classify(&p.tensor.name);
            let expert = match (p.unit, role) {
                (Some(e), _) | (None, Role::RoutedExpert { expert: e, .. }) => Some(e),
                _ => None,
            };
            Extracted {
                tensor: p.name(),
                source: p.tensor.name.clone(),
                file: ckpt.shards[p.shard].name.clone(),
                kind: role.kind(),
                layer: role.layer(),
                expert,
                bytes: p.extent().1,
            }
        })
        .collect()
}

/// Which routed experts a model has, per MoE layer (`naming::moe_layout`).
struct Layout(BTreeMap<u32, LayerExperts>);

impl Layout {
    fn of(ckpt: &Checkpoint) -> Self {
        Layout(naming::moe_layout(
            ckpt.tensors()
                .map(|(_, t)| (t.name.as_str(), t.shape.as_slice())),
        ))
    }

    fn has(&self, layer: u32, expert: u32) -> bool {
        self.0.get(&layer).is_some_and(|l| l.has(expert))
    }

    fn check_config(&self, cfg: &ExpertConfig, cfg_path: &Path, model: &Path) -> Result<()> {
        for (&layer, ids) in &cfg.experts {
            if !self.0.contains_key(&layer) {
                return Err(Error::Mismatch(format!(
                    "{}: layer {layer} has no routed experts in {}",
                    cfg_path.display(),
                    model.display()
                )));
            }
            if let Some(e) = ids.iter().find(|&&e| !self.has(layer, e)) {
                return Err(Error::Mismatch(format!(
                    "{}: layer {layer} has no expert {e} in {}",
                    cfg_path.display(),
                    model.display()
                )));
            }
        }
        Ok(())
    }
}

fn by_config<'a>(ckpt: &'a Checkpoint, cfg: &ExpertConfig) -> Vec<Pick<'a>> {
    let mut picks = Vec::new();
    for (si, shard) in ckpt.shards.iter().enumerate() {
        for t in &shard.file.header.tensors {
            let pick = |unit| Pick {
                file: &shard.file,
                shard: si,
                tensor: t,
                unit,
            };
            match naming::classify(&t.name) {
                Role::RoutedExpert { layer, expert } => {
                    if cfg
                        .experts
                        .get(&layer)
                        .is_some_and(|ids| ids.contains(&expert))
                    {
                        picks.push(pick(None));
                    }
                }
                Role::FusedExperts { layer } => {
                    let ids: BTreeSet<u32> = cfg
                        .experts
                        .get(&layer)
                        .into_iter()
                        .flatten()
                        .copied()
                        .collect();
                    let (n, _) = expert_units(t);
                    if n > 1 && ids.len() == n as usize {
                        picks.push(pick(None));
                    } else {
                        picks.extend(ids.into_iter().filter(|&e| e < n).map(|e| pick(Some(e))));
                    }
                }
                Role::SharedExpert { .. } | Role::SharedExpertGate { .. } => {
                    if cfg.shared_experts {
                        picks.push(pick(None));
                    }
                }
                Role::Router { .. } | Role::LayerOther { .. } | Role::Global => {
                    if cfg.non_expert_modules {
                        picks.push(pick(None));
                    }
                }
            }
        }
    }
    picks
}

/// Every picked tensor must exist in the base with the same dtype and shape,
/// or the adapter could not be merged into it.
fn check_in_base(picks: &[Pick], base: &Checkpoint) -> Result<()> {
    let index: HashMap<&str, &TensorInfo> =
        base.tensors().map(|(_, t)| (t.name.as_str(), t)).collect();
    for p in picks {
        same_in_base(
            index.get(p.tensor.name.as_str()).copied(),
            p.tensor,
            &p.file.path,
            base,
            "",
        )?;
    }
    Ok(())
}

/// `t` (of `owner`) must be in `base` with the same dtype and shape; `found` is
/// the base's tensor of that name.
fn same_in_base(
    found: Option<&TensorInfo>,
    t: &TensorInfo,
    owner: &Path,
    base: &Checkpoint,
    hint: &str,
) -> Result<()> {
    match found {
        Some(b) if b.dtype == t.dtype && b.shape == t.shape => Ok(()),
        Some(b) => Err(Error::Mismatch(format!(
            "{}: tensor {:?} is {} {:?} but the base {} has {} {:?}{hint}",
            owner.display(),
            t.name,
            t.dtype,
            t.shape,
            base.path.display(),
            b.dtype,
            b.shape
        ))),
        None => Err(Error::Mismatch(format!(
            "{}: tensor {:?} is not in the base {}",
            owner.display(),
            t.name,
            base.path.display()
        ))),
    }
}

/// Bytes compared per work item: large tensors are compared by several threads.
const COMPARE_CHUNK: u64 = 16 << 20;
const COMPARE_BUF: usize = 1 << 20;

/// One compared unit of the model: a whole tensor, or expert `unit`'s slice
/// of a fused tensor (`offset`: its start within the tensor).
#[derive(Clone, Copy)]
struct Unit<'a> {
    shard: usize,
    file: &'a SafetensorsFile,
    tensor: &'a TensorInfo,
    unit: u32,
    offset: u64,
    len: u64,
}

/// What differs from the base, and the expert config it amounts to.
struct Diff<'a> {
    picks: Vec<Pick<'a>>,
    config: ExpertConfig,
    /// Differing tensors left out (shared experts, non-expert modules).
    excluded: Vec<String>,
    /// Bytes compared.
    compared: u64,
}

/// The base's tensors by name, with the file that holds each.
type BaseIndex<'b> = HashMap<&'b str, (&'b SafetensorsFile, &'b TensorInfo)>;

/// A differing tensor of the model (shard, file, tensor) and its differing units.
type Differing<'a> = (usize, &'a SafetensorsFile, &'a TensorInfo, Vec<u32>);

fn by_diff<'a>(
    ckpt: &'a Checkpoint,
    base: &Checkpoint,
    layout: &Layout,
    opts: &SplitOptions,
    ctl: &Control,
) -> Result<Diff<'a>> {
    let index: BaseIndex = base
        .tensors()
        .map(|(s, t)| (t.name.as_str(), (&s.file, t)))
        .collect();
    check_same_tensors(ckpt, base, &index)?;
    let units = units_of(ckpt);
    let differs = compare(&units, &index, ctl)?;
    pair_fp8(&units, &differs);
    let mut diff = classify(differing(&units, &differs), layout, opts);
    diff.compared = units.iter().map(|u| u.len).sum();
    Ok(diff)
}

/// The model must hold exactly the base's tensors, each with its dtype and shape.
fn check_same_tensors(ckpt: &Checkpoint, base: &Checkpoint, index: &BaseIndex) -> Result<()> {
    for (_, t) in ckpt.tensors() {
        let found = index.get(t.name.as_str()).map(|(_, b)| *b);
        same_in_base(
            found,
            t,
            &ckpt.path,
            base,
            "; not fine-tuned from this base",
        )?;
    }
    if ckpt.tensors().count() == index.len() {
        return Ok(());
    }
    let names: HashSet<&str> = ckpt.tensors().map(|(_, t)| t.name.as_str()).collect();
    let missing = index
        .keys()
        .find(|n| !names.contains(*n))
        .copied()
        .unwrap_or_default();
    Err(Error::Mismatch(format!(
        "{}: tensor {missing:?} of the base {} is missing",
        ckpt.path.display(),
        base.path.display()
    )))
}

/// The compared units of the model: whole tensors, or expert slices of fused tensors.
fn units_of(ckpt: &Checkpoint) -> Vec<Unit<'_>> {
    let mut units = Vec::new();
    for (si, shard) in ckpt.shards.iter().enumerate() {
        for t in &shard.file.header.tensors {
            let (n, len) = expert_units(t);
            units.extend((0..n).map(|u| Unit {
                shard: si,
                file: &shard.file,
                tensor: t,
                unit: u,
                offset: u64::from(u) * len,
                len,
            }));
        }
    }
    units
}

/// Which units differ from the base: compared in parallel, in work items of at most
/// `COMPARE_CHUNK` bytes; a unit stops being read once one item finds a difference.
fn compare(units: &[Unit], index: &BaseIndex, ctl: &Control) -> Result<Vec<AtomicBool>> {
    let differs: Vec<AtomicBool> = units.iter().map(|_| AtomicBool::new(false)).collect();
    let mut items = Vec::new();
    for (ui, &Unit { len, .. }) in units.iter().enumerate() {
        let mut off = 0;
        while off < len {
            let n = (len - off).min(COMPARE_CHUNK);
            items.push((ui, off, n));
            off += n;
        }
    }
    ctl.stage("compare", units.iter().map(|u| u.len).sum());
    items.par_iter().try_for_each_init(
        || (vec![0u8; COMPARE_BUF], vec![0u8; COMPARE_BUF]),
        |(a, b), &(ui, off, n)| {
            let Unit {
                file,
                tensor: t,
                offset: unit_off,
                ..
            } = units[ui];
            if !differs[ui].load(Ordering::Relaxed) {
                let (bfile, bt) = index[t.name.as_str()];
                let (ma, mb) = (
                    file.offset_of(t) + unit_off + off,
                    bfile.offset_of(bt) + unit_off + off,
                );
                let mut done = 0;
                while done < n {
                    let k = (n - done).min(COMPARE_BUF as u64) as usize;
                    read_exact_at(file.file(), &mut a[..k], ma + done)
                        .map_err(|e| Error::io(&file.path, e))?;
                    read_exact_at(bfile.file(), &mut b[..k], mb + done)
                        .map_err(|e| Error::io(&bfile.path, e))?;
                    if a[..k] != b[..k] {
                        differs[ui].store(true, Ordering::Relaxed);
                        break;
                    }
                    done += k as u64;
                }
            }
            ctl.advance(n)
        },
    )?;
    Ok(differs)
}

/// A block-FP8 weight and its scale tensor are only meaningful together: if either
/// differs, both are extracted.
fn pair_fp8(units: &[Unit], differs: &[AtomicBool]) {
    let whole: HashMap<&str, usize> = units
        .iter()
        .enumerate()
        .filter(|(_, u)| expert_units(u.tensor).0 == 1)
        .map(|(ui, u)| (u.tensor.name.as_str(), ui))
        .collect();
    for (ui, u) in units.iter().enumerate() {
        if !differs[ui].load(Ordering::Relaxed) {
            continue;
        }
        let companion = match fp8::weight_of_scale(&u.tensor.name) {
            Some(w) => whole.get(w),
            None if u.tensor.dtype == Dtype::F8_E4M3 => {
                fp8::scale_name(&u.tensor.name).and_then(|sc| whole.get(sc.as_str()))
            }
            None => None,
        };
        if let Some(&c) = companion {
            differs[c].store(true, Ordering::Relaxed);
        }
    }
}

/// The differing units grouped back by tensor, in model order.
fn differing<'a>(units: &[Unit<'a>], differs: &[AtomicBool]) -> Vec<Differing<'a>> {
    let mut by_tensor: Vec<Differing> = Vec::new();
    for (
        ui,
        &Unit {
            shard: si,
            file,
            tensor: t,
            unit: u,
            ..
        },
    ) in units.iter().enumerate()
    {
        if !differs[ui].load(Ordering::Relaxed) {
            continue;
        }
        match by_tensor.last_mut() {
            Some(last) if std::ptr::eq(last.2, t) => last.3.push(u),
            _ => by_tensor.push((si, file, t, vec![u])),
        }
    }
    by_tensor
}

/// What to extract of the differing tensors, the expert config that amounts to, and
/// what is left out (shared experts, non-expert modules without the options asking
/// for them). `compared` is left for the caller.
fn classify<'a>(differing: Vec<Differing<'a>>, layout: &Layout, opts: &SplitOptions) -> Diff<'a> {
    let mut picks = Vec::new();
    let mut excluded = Vec::new();
    let mut experts: BTreeMap<u32, BTreeSet<u32>> =
        layout.0.keys().map(|&l| (l, BTreeSet::new())).collect();
    let (mut shared, mut non_expert) = (false, false);
    for (si, file, t, diff_units) in differing {
        let pick = |unit| Pick {
            file,
            shard: si,
            tensor: t,
            unit,
        };
        match naming::classify(&t.name) {
            Role::RoutedExpert { layer, expert } => {
                experts.entry(layer).or_default().insert(expert);
                picks.push(pick(None));
            }
            Role::FusedExperts { layer } => {
                let (n, _) = expert_units(t);
                experts.entry(layer).or_default().extend(&diff_units);
                if n > 1 && diff_units.len() == n as usize {
                    picks.push(pick(None));
                } else {
                    picks.extend(diff_units.into_iter().map(|u| pick(Some(u))));
                }
            }
            Role::SharedExpert { .. } | Role::SharedExpertGate { .. } if opts.shared_experts => {
                shared = true;
                picks.push(pick(None));
            }
            Role::Router { .. } | Role::LayerOther { .. } | Role::Global
                if opts.non_expert_modules =>
            {
                non_expert = true;
                picks.push(pick(None));
            }
            _ => excluded.push(t.name.clone()),
        }
    }
    let config = ExpertConfig {
        experts: experts
            .into_iter()
            .map(|(l, ids)| (l, ids.into_iter().collect()))
            .collect(),
        shared_experts: shared,
        non_expert_modules: non_expert,
    };
    Diff {
        picks,
        config,
        excluded,
        compared: 0,
    }
}

/// Writes the adapter: header, then each picked range copied from the model.
fn write_adapter(
    picks: &[Pick],
    metadata: &[(String, String)],
    out: &Path,
    overwrite: bool,
    ctl: &Control,
) -> Result<()> {
    let extents: Vec<(u64, u64, Vec<u64>)> = picks.iter().map(Pick::extent).collect();
    let new: Vec<NewTensor> = picks
        .iter()
        .zip(&extents)
        .map(|(p, (_, len, shape))| NewTensor {
            name: p.name(),
            dtype: p.tensor.dtype,
            shape: shape.clone(),
            nbytes: *len,
        })
        .collect();
    let (header, offsets) = writer::header_bytes(&new, metadata);
    let staged = Staged::new(out, false)?;
    let path = staged.path().to_path_buf();
    let f = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    let total =
        offsets.last().copied().unwrap_or(header.len() as u64) + new.last().map_or(0, |t| t.nbytes);
    copy::preallocate(&f, &path, total)?;
    copy::write_all_at(&f, &header, 0).map_err(|e| Error::io(&path, e))?;
    let mut ranges = Vec::new();
    for ((p, (src_off, len, _)), dst_off) in picks.iter().zip(&extents).zip(&offsets) {
        copy::push_coalesced(
            &mut ranges,
            p.shard,
            Range {
                src_off: *src_off,
                dst_off: *dst_off,
                len: *len,
            },
        );
    }
    let files: HashMap<usize, &SafetensorsFile> = picks.iter().map(|p| (p.shard, p.file)).collect();
    let ranges = copy::chunked(ranges);
    ctl.stage("write", ranges.iter().map(|(_, r)| r.len).sum());
    ranges.par_iter().try_for_each(|&(shard, r)| {
        let src = files[&shard];
        copy::copy_range(src.file(), &src.path, &f, &path, r)?;
        ctl.advance(r.len)
    })?;
    ctl.check()?;
    staged.commit(overwrite, &[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    use crate::merge::{merge, MergeOptions, OnConflict};
    use crate::test_support::write_st;

    #[test]
    fn diff_round_trip_and_fingerprint() {
        let d = tempfile::tempdir().unwrap();
        let (b, ft) = (
            d.path().join("b.safetensors"),
            d.path().join("ft.safetensors"),
        );
        let fused = "model.layers.1.mlp.experts.gate_up_proj";
        let expert = "model.layers.2.mlp.experts.5.up_proj.weight";
        write_st(
            &b,
            &[
                (fused, &[3, 4, 2], 1),
                (expert, &[2, 2], 2),
                ("model.norm.weight", &[2], 3),
            ],
            &[],
        );
        // A fine-tuned model: expert 1 of the fused tensor and the per-expert tensor changed.
        write_st(
            &ft,
            &[
                (fused, &[3, 4, 2], 1),
                (expert, &[2, 2], 7),
                ("model.norm.weight", &[2], 3),
            ],
            &[],
        );
        let mut bytes = fs::read(&ft).unwrap();
        let f = SafetensorsFile::open(&ft).unwrap();
        let start = f.offset_of(f.tensor(fused).unwrap()) as usize;
        bytes[start + 32..start + 64].fill(4);
        drop(f);
        fs::write(&ft, bytes).unwrap();

        let ctl = Control::default();
        let fp_b = fingerprint::fingerprint_path(&b, &ctl).unwrap();
        assert_ne!(fp_b, fingerprint::fingerprint_path(&ft, &ctl).unwrap());
        let ad = d.path().join("ad.safetensors");
        let opts = SplitOptions {
            base: Some(b.clone()),
            ..Default::default()
        };
        let report = split(&ft, &ad, &opts, &ctl).unwrap();
        assert_eq!(
            report.expert_config,
            r#"{"experts":{"1":[1],"2":[5]},"shared_experts":false,"non_expert_modules":false}"#
        );
        let names: Vec<&str> = report.tensors.iter().map(|t| t.tensor.as_str()).collect();
        assert_eq!(names, ["model.layers.1.mlp.experts.1.gate_up_proj", expert]);
        assert_eq!(report.base_fingerprint.as_deref(), Some(fp_b.as_str()));

        let out = d.path().join("out.safetensors");
        let mopts = MergeOptions {
            on_conflict: OnConflict::Error,
            force: false,
            dry_run: false,
            overwrite: false,
            requantize_fp8: false,
        };
        let m = merge(&b, &[ad], Some(&out), &mopts, &ctl).unwrap();
        assert!(m.warnings.is_empty());
        assert_eq!(fs::read(&out).unwrap(), fs::read(&ft).unwrap());
    }
}
