//! Merging adapters into a base checkpoint, streaming.
//!
//! The output mirrors the base: same shard names, same header bytes (so same
//! tensor order and offsets), index rewritten with `metadata.total_size`, other
//! files of a model directory copied. Each output file is a list of byte
//! ranges: unchanged runs of base tensors coalesced into one in-kernel copy,
//! replaced tensors (or expert slices of fused tensors) copied from the
//! adapter file. Nothing is read into memory but headers and sampled bytes for
//! the fingerprint; ranges are copied in parallel across and within shards.
//!
//! A BF16/F16/F32 adapter tensor aimed at a block-FP8 base weight (F8_E4M3 +
//! `weight_scale_inv`, see `fp8`) is refused, or with `requantize_fp8`
//! quantised block row by block row into the weight and its scale tensor,
//! both written in place (shapes and dtypes, hence headers, are unchanged).

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Serialize;

use crate::adapter::{Adapter, AdapterKind, AdapterTensor};
use crate::copy::{self, Range};
use crate::error::{Error, Result};
use crate::fingerprint;
use crate::fp8::{self, BlockSize};
use crate::naming::{self, Role};
use crate::progress::Control;
use crate::safetensors::{Checkpoint, Dtype, SafetensorsFile, TensorInfo};
use crate::staging::{self, Staged};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnConflict {
    /// Two adapters replacing the same bytes is an error.
    Error,
    /// The adapter listed first wins.
    First,
    /// The adapter listed last wins.
    Last,
}

#[derive(Debug, Clone)]
pub struct MergeOptions {
    pub on_conflict: OnConflict,
    /// Merge even when an adapter's base fingerprint differs from the base's.
    pub force: bool,
    pub dry_run: bool,
    pub overwrite: bool,
    /// Quantise BF16/F16/F32 adapter tensors into block-FP8 base slots
    /// (rewriting their `weight_scale_inv`) instead of refusing them.
    pub requantize_fp8: bool,
}

#[derive(Debug, Serialize)]
pub struct Replacement {
    /// The base tensor replaced (whole, or one expert's slice of it).
    pub tensor: String,
    pub file: String,
    pub adapter: String,
    /// The adapter tensor's name as stored.
    pub source: String,
    pub kind: &'static str,
    pub layer: Option<u32>,
    /// The routed expert, or the expert of a fused tensor's slice.
    pub expert: Option<u32>,
    pub bytes: u64,
    /// Written by quantising the adapter tensor to block FP8 (the weight and its
    /// `weight_scale_inv` both), not copied.
    pub requantized: bool,
}

#[derive(Debug, Serialize)]
pub struct AdapterSummary {
    pub path: String,
    pub kind: AdapterKind,
    pub base_fingerprint: Option<String>,
    pub tensors: usize,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct MergeReport {
    pub base: String,
    pub out: String,
    pub dry_run: bool,
    /// Computed when an adapter carries a fingerprint to check.
    pub base_fingerprint: Option<String>,
    pub adapters: Vec<AdapterSummary>,
    pub replaced: Vec<Replacement>,
    pub replaced_bytes: u64,
    /// Base F8_E4M3 weights written by quantising an adapter tensor.
    pub requantized: Vec<String>,
    /// Bytes of the output's safetensors files.
    pub total_bytes: u64,
    pub files: Vec<String>,
    /// Other files of a model directory copied alongside (config, tokenizer, ...).
    pub copied_files: Vec<String>,
    pub warnings: Vec<String>,
}

/// How a tensor splits into independently replaceable units (see
/// `naming::expert_units`): (units, bytes per unit).
pub fn expert_units(t: &TensorInfo) -> (u32, u64) {
    naming::expert_units(&t.name, &t.shape, t.nbytes())
}

/// A sibling of BASE that does not exist yet: `NAME-merged`, `NAME-merged-2`, ...
/// (before the `.safetensors` extension for a file).
pub fn default_out(base: &Path) -> PathBuf {
    let name = base
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let (stem, ext) = match name.strip_suffix(".safetensors") {
        Some(stem) if !base.is_dir() => (stem.to_string(), ".safetensors"),
        _ => (name.clone(), ""),
    };
    let parent = base.parent().unwrap_or(Path::new(""));
    (1..)
        .map(|k| {
            let suffix = if k == 1 {
                String::new()
            } else {
                format!("-{k}")
            };
            parent.join(format!("{stem}-merged{suffix}{ext}"))
        })
        .find(|p| fs::symlink_metadata(p).is_err())
        .unwrap_or_else(|| parent.join(format!("{stem}-merged{ext}")))
}

/// Where an adapter tensor's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Source {
    adapter: usize,
    /// Shard of the adapter's checkpoint.
    shard: usize,
    /// Index in that shard's tensors.
    tensor: usize,
    /// Absolute file offset of this unit's first byte.
    offset: u64,
    /// Index of the `Requant` that computes this unit (an FP8 weight or its
    /// scale tensor) instead of copying it.
    requant: Option<usize>,
}

/// A BF16/F16/F32 adapter tensor quantised into an F8_E4M3 base weight and
/// its block scales.
#[derive(Debug)]
struct Requant {
    adapter: usize,
    /// Shard of the adapter's checkpoint, tensor index there, absolute offset.
    shard: usize,
    tensor: usize,
    src_off: u64,
    dtype: Dtype,
    /// Base (shard, tensor) of the weight and of its `weight_scale_inv`.
    weight: (usize, usize),
    scale: (usize, usize),
    rows: u64,
    cols: u64,
    block: [u64; 2],
}

/// Key of a byte range's source file: the base shard or an adapter shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Src {
    Base(usize),
    Adapter(usize, usize),
}

/// The plan: for each base tensor (shard, index) that changes, the source of
/// each replaced unit.
type Painted = BTreeMap<(usize, usize), BTreeMap<u32, Source>>;

pub fn merge(
    base: &Path,
    adapter_paths: &[PathBuf],
    out: Option<&Path>,
    opts: &MergeOptions,
    ctl: &Control,
) -> Result<MergeReport> {
    if adapter_paths.is_empty() {
        return Err(Error::Usage("merge needs at least one adapter".into()));
    }
    let ckpt = Checkpoint::open(base)?;
    let adapters = adapter_paths
        .iter()
        .map(|p| Adapter::open(p))
        .collect::<Result<Vec<_>>>()?;
    let out = out.map_or_else(|| default_out(base), Path::to_path_buf);
    let mut inputs: Vec<&Path> = vec![base];
    inputs.extend(adapter_paths.iter().map(PathBuf::as_path));
    staging::check_paths(&[&out], &inputs)?;
    // A merged directory may hold whatever the base's directory holds (copied).
    let keep = top_level_names(base);
    if !opts.dry_run {
        staging::check_target(&out, opts.overwrite, &keep)?;
    }

    // Warnings are shown only once the whole plan holds: a failing merge says one thing.
    let mut warnings = missing_fingerprints(&ckpt, &adapters);
    let (painted, requants) = plan(&ckpt, &adapters, opts)?;
    let replaced = describe(&ckpt, &adapters, &painted);
    let is_dir =
        ckpt.index.is_some() || fs::metadata(base).map_err(|e| Error::io(base, e))?.is_dir();
    let others = if is_dir {
        other_files(&ckpt, &mut |w| warnings.push(w))?
    } else {
        Vec::new()
    };
    let need_fp = adapters.iter().any(|a| a.fingerprint.is_some());
    if !need_fp {
        warnings.iter().for_each(|w| ctl.warn(w.clone()));
    }
    let check_fp = |fp_ctl: &Control| -> Result<(Option<String>, Vec<String>)> {
        if !need_fp {
            return Ok((None, Vec::new()));
        }
        let fp = fingerprint::fingerprint(&ckpt, fp_ctl)?;
        let forced = compare_fingerprints(&ckpt, &fp, &adapters, opts.force)?;
        Ok((Some(fp), forced))
    };

    let (base_fingerprint, forced) = if opts.dry_run {
        check_fp(ctl)?
    } else {
        let staged = Staged::new(&out, is_dir)?;
        // The fingerprint is checked while the output is written (it is staged,
        // so a refused merge leaves nothing); a mismatch stops the writing.
        let (checked, written) = rayon::join(
            || check_fp(&Control::default()).inspect_err(|_| ctl.cancel()),
            || {
                let job = Job {
                    ckpt: &ckpt,
                    adapters: &adapters,
                    painted: &painted,
                    requants: &requants,
                };
                write(&job, &staged, is_dir, &others, ctl)
            },
        );
        let checked = checked?;
        written?;
        ctl.check()?;
        staged.commit(opts.overwrite, &keep)?;
        checked
    };
    if need_fp {
        warnings.extend(forced);
        warnings.iter().for_each(|w| ctl.warn(w.clone()));
    }

    Ok(MergeReport {
        base: base.display().to_string(),
        out: out.display().to_string(),
        dry_run: opts.dry_run,
        base_fingerprint,
        adapters: adapters
            .iter()
            .map(|a| AdapterSummary {
                path: a.path.display().to_string(),
                kind: a.kind,
                base_fingerprint: a.fingerprint.clone(),
                tensors: a.tensors().count(),
                bytes: a.ckpt.total_bytes(),
            })
            .collect(),
        replaced_bytes: replaced.iter().map(|r| r.bytes).sum(),
        requantized: requants
            .iter()
            .map(|q| {
                ckpt.shards[q.weight.0].file.header.tensors[q.weight.1]
                    .name
                    .clone()
            })
            .collect(),
        replaced,
        total_bytes: ckpt.shards.iter().map(|s| s.file.file_len).sum(),
        files: ckpt.shards.iter().map(|s| s.name.clone()).collect(),
        copied_files: others.iter().map(|(n, _)| n.clone()).collect(),
        warnings,
    })
}

/// A warning for each adapter that carries no base fingerprint.
fn missing_fingerprints(ckpt: &Checkpoint, adapters: &[Adapter]) -> Vec<String> {
    adapters
        .iter()
        .filter(|a| a.fingerprint.is_none())
        .map(|a| {
            let what = match a.kind {
                AdapterKind::Official => "official ESFT adapter folder",
                AdapterKind::Plain => "plain safetensors file",
                AdapterKind::Esft => "adapter written without a base",
            };
            format!(
                "{}: no base fingerprint ({what}), so it cannot be checked that it was trained from {}",
                a.path.display(),
                ckpt.path.display()
            )
        })
        .collect()
}

/// Compares each adapter's recorded base fingerprint with the base's `fp`:
/// a mismatch is an error, or (with `force`) a warning, returned.
fn compare_fingerprints(
    ckpt: &Checkpoint,
    fp: &str,
    adapters: &[Adapter],
    force: bool,
) -> Result<Vec<String>> {
    let mut warnings = Vec::new();
    for a in adapters {
        let Some(theirs) = a.fingerprint.as_deref().filter(|&t| t != fp) else {
            continue;
        };
        let msg = format!(
            "{}: trained from a different base (fingerprint {theirs}) than {} (fingerprint {fp})",
            a.path.display(),
            ckpt.path.display()
        );
        if !force {
            return Err(Error::Mismatch(format!(
                "{msg}; pass --force to merge anyway"
            )));
        }
        warnings.push(format!("{msg}; merging anyway (--force)"));
    }
    Ok(warnings)
}

fn plan(
    ckpt: &Checkpoint,
    adapters: &[Adapter],
    opts: &MergeOptions,
) -> Result<(Painted, Vec<Requant>)> {
    let on_conflict = opts.on_conflict;
    let block = if ckpt.tensors().any(|(_, t)| t.dtype == Dtype::F8_E4M3) {
        Some(fp8::block_size(&ckpt.path)?)
    } else {
        None
    };
    let mut requants: Vec<Requant> = Vec::new();
    let mut index: HashMap<&str, (usize, usize)> = HashMap::new();
    for (si, s) in ckpt.shards.iter().enumerate() {
        for (ti, t) in s.file.header.tensors.iter().enumerate() {
            index.insert(&t.name, (si, ti));
        }
    }
    let base_tensor = |(si, ti): (usize, usize)| &ckpt.shards[si].file.header.tensors[ti];
    let mut painted: Painted = BTreeMap::new();
    for (ai, a) in adapters.iter().enumerate() {
        for at in a.tensors() {
            let (shard, tensor) = (at.shard, at.index);
            let src_off = at.file.offset_of(at.info);
            let mismatch = |what: String| {
                Error::Mismatch(format!(
                    "{}: tensor {:?} {what}",
                    a.path.display(),
                    at.info.name
                ))
            };
            let found = index
                .get(at.name.as_str())
                .or_else(|| index.get(naming::canonical(&at.name).as_ref()));
            let mut requant = None;
            let (key, units): ((usize, usize), Vec<(u32, u64)>) = if let Some(&key) = found {
                let bt = base_tensor(key);
                if let (Some(block), true) = (&block, is_fp8_slot(bt, at.info)) {
                    let q = requant_slot(ckpt, &index, key, (ai, &a.path), &at, block, opts)?;
                    requant = Some(requants.len());
                    requants.push(q);
                }
                if requant.is_none() && (bt.dtype != at.info.dtype || bt.shape != at.info.shape) {
                    return Err(mismatch(format!(
                        "is {} {:?} but the base's {:?} is {} {:?}",
                        at.info.dtype, at.info.shape, bt.name, bt.dtype, bt.shape
                    )));
                }
                let (n, len) = expert_units(bt);
                (
                    key,
                    (0..n).map(|u| (u, src_off + u64::from(u) * len)).collect(),
                )
            } else if let Some((parent, e)) =
                naming::fused_slice_parent(&naming::canonical(&at.name))
            {
                let Some(&key) = index.get(parent.as_str()) else {
                    return Err(mismatch(format!(
                        "is not in the base {} (nor is the fused tensor {parent:?} it would be a slice of)",
                        ckpt.path.display()
                    )));
                };
                let bt = base_tensor(key);
                let (n, len) = expert_units(bt);
                let e_total = bt.shape.first().copied().unwrap_or(0);
                if u64::from(e) >= e_total {
                    return Err(mismatch(format!(
                        "is expert {e}'s slice of {parent:?}, which has {e_total} experts"
                    )));
                }
                if u64::from(n) != e_total {
                    return Err(mismatch(format!(
                        "is a slice of {parent:?}, whose {} {:?} does not split into byte-aligned expert slices",
                        bt.dtype, bt.shape
                    )));
                }
                if bt.dtype != at.info.dtype || bt.shape[1..] != at.info.shape[..] {
                    return Err(mismatch(format!(
                        "is {} {:?} but one expert's slice of {parent:?} ({} {:?}) is {} {:?}",
                        at.info.dtype,
                        at.info.shape,
                        bt.dtype,
                        bt.shape,
                        bt.dtype,
                        &bt.shape[1..]
                    )));
                }
                debug_assert_eq!(len, at.info.nbytes());
                (key, vec![(e, src_off)])
            } else {
                return Err(mismatch(format!(
                    "is not in the base {}",
                    ckpt.path.display()
                )));
            };
            let mut targets = vec![(key, units)];
            if let Some(q) = requant {
                targets.push((requants[q].scale, vec![(0, src_off)]));
            }
            for (key, units) in targets {
                let slots = painted.entry(key).or_default();
                for (unit, offset) in units {
                    let src = Source {
                        adapter: ai,
                        shard,
                        tensor,
                        offset,
                        requant,
                    };
                    match slots.get(&unit) {
                        None => {
                            slots.insert(unit, src);
                        }
                        Some(prev) if prev.adapter == ai || on_conflict == OnConflict::Error => {
                            let prev_a = &adapters[prev.adapter];
                            let prev_name = &prev_a.ckpt.shards[prev.shard].file.header.tensors
                                [prev.tensor]
                                .name;
                            let hint = if prev.adapter == ai {
                                ""
                            } else {
                                "; pass --on-conflict first or last to choose"
                            };
                            return Err(Error::Mismatch(format!(
                            "{}: tensor {:?} replaces the same bytes of {:?} as {:?} from {}{hint}",
                            a.path.display(),
                            at.info.name,
                            base_tensor(key).name,
                            prev_name,
                            prev_a.path.display(),
                        )));
                        }
                        Some(_) if on_conflict == OnConflict::Last => {
                            slots.insert(unit, src);
                        }
                        Some(_) => {}
                    }
                }
            }
        }
    }
    // Under --on-conflict first/last, a weight and its scale tensor could end up
    // from different adapters; only whole requantisations are kept.
    for (q, r) in requants.iter().enumerate() {
        let from =
            |key: (usize, usize)| painted.get(&key).and_then(|s| s.get(&0)).map(|s| s.requant);
        let (w, sc) = (from(r.weight), from(r.scale));
        if (w == Some(Some(q))) != (sc == Some(Some(q))) {
            let name = &base_tensor(r.weight).name;
            return Err(Error::Mismatch(format!(
                "{}: {name:?} would be requantised but its scale tensor would come from another adapter \
                 (or the other way round); merge these adapters one at a time",
                adapters[r.adapter].path.display()
            )));
        }
    }
    // Drop requantisations that another adapter's tensor superseded.
    let mut renumbered = vec![None; requants.len()];
    let mut live = Vec::new();
    for (q, r) in requants.into_iter().enumerate() {
        let slot = painted.get(&r.weight).and_then(|s| s.get(&0));
        if slot.is_some_and(|s| s.requant == Some(q)) {
            renumbered[q] = Some(live.len());
            live.push(r);
        }
    }
    for src in painted.values_mut().flat_map(BTreeMap::values_mut) {
        src.requant = src.requant.and_then(|q| renumbered[q]);
    }
    Ok((painted, live))
}

/// Whether adapter tensor `at` goes into an F8_E4M3 base slot with another
/// dtype (to be requantised or refused).
fn is_fp8_slot(bt: &TensorInfo, at: &TensorInfo) -> bool {
    bt.dtype == Dtype::F8_E4M3 && at.dtype != Dtype::F8_E4M3
}

/// Checks that adapter tensor `at` can be quantised into the F8_E4M3 base
/// weight `key` (and that it was asked for). `adapter`: its index and path.
fn requant_slot(
    ckpt: &Checkpoint,
    index: &HashMap<&str, (usize, usize)>,
    key: (usize, usize),
    (ai, adapter): (usize, &Path),
    at: &AdapterTensor,
    block: &BlockSize,
    opts: &MergeOptions,
) -> Result<Requant> {
    let base_tensor = |(si, ti): (usize, usize)| &ckpt.shards[si].file.header.tensors[ti];
    let bt = base_tensor(key);
    let refuse = |what: String| {
        Error::Mismatch(format!(
            "{}: adapter tensor {} is {} but the base stores F8_E4M3 {what}",
            adapter.display(),
            at.name,
            at.info.dtype
        ))
    };
    let scale_name = fp8::scale_name(&bt.name);
    let scale = scale_name.as_deref().and_then(|n| index.get(n)).copied();
    let Some(scale) = scale else {
        return Err(refuse(format!(
            "without block scales (no {}_scale_inv), which cannot be requantised; dequantise the base first",
            bt.name
        )));
    };
    let label = block.label();
    if !opts.requantize_fp8 {
        return Err(refuse(format!(
            "with {label} block scales; pass --requantize-fp8 (Python: requantize_fp8=True) to \
             quantise it (rewrites its weight_scale_inv), or dequantise the base first"
        )));
    }
    if !fp8::quantizable(at.info.dtype) || bt.shape != at.info.shape || bt.shape.len() != 2 {
        return Err(refuse(format!(
            "{:?} (adapter: {:?}); only a BF16, F16 or F32 tensor of the same 2-D shape can be requantised",
            bt.shape, at.info.shape
        )));
    }
    let st = base_tensor(scale);
    let want = block.scale_shape(&bt.shape).unwrap_or_default();
    if st.dtype != Dtype::F32 || st.shape != want {
        let from = if block.from == "default" {
            "the default block size"
        } else {
            "config.json's quantization_config.weight_block_size"
        };
        return Err(Error::Mismatch(format!(
            "{}: {:?} is {} {:?}, but {label} block scales of {:?} {:?} ({from}) are F32 {want:?}",
            ckpt.path.display(),
            st.name,
            st.dtype,
            st.shape,
            bt.name,
            bt.shape
        )));
    }
    Ok(Requant {
        adapter: ai,
        shard: at.shard,
        tensor: at.index,
        src_off: at.file.offset_of(at.info),
        dtype: at.info.dtype,
        weight: key,
        scale,
        rows: bt.shape[0],
        cols: bt.shape[1],
        block: block.block,
    })
}

/// One report entry per replaced tensor, or per expert slice when a fused
/// tensor is replaced only in part (or by several adapters).
fn describe(ckpt: &Checkpoint, adapters: &[Adapter], painted: &Painted) -> Vec<Replacement> {
    let mut out = Vec::new();
    for (&(si, ti), slots) in painted {
        let shard = &ckpt.shards[si];
        let t = &shard.file.header.tensors[ti];
        let (units, unit_len) = expert_units(t);
        let role = naming::classify(&t.name);
        let entry = |src: &Source, expert: Option<u32>, bytes: u64| Replacement {
            tensor: t.name.clone(),
            file: shard.name.clone(),
            adapter: adapters[src.adapter].path.display().to_string(),
            source: adapters[src.adapter].ckpt.shards[src.shard]
                .file
                .header
                .tensors[src.tensor]
                .name
                .clone(),
            kind: role.kind(),
            layer: role.layer(),
            expert,
            bytes,
            requantized: src.requant.is_some(),
        };
        let first = slots.values().next();
        let whole = slots.len() == units as usize
            && first.is_some_and(|f| {
                slots
                    .values()
                    .all(|s| (s.adapter, s.shard, s.tensor) == (f.adapter, f.shard, f.tensor))
            });
        match (whole, first) {
            (true, Some(src)) => {
                let expert = match role {
                    Role::RoutedExpert { expert, .. } => Some(expert),
                    _ => None,
                };
                out.push(entry(src, expert, t.nbytes()));
            }
            _ => out.extend(slots.iter().map(|(&u, src)| entry(src, Some(u), unit_len))),
        }
    }
    out
}

/// Regular files of a model directory besides the checkpoint's own (config,
/// tokenizer, ...). Subdirectories and safetensors files that are not part of
/// the checkpoint are skipped with a warning: they would not be merged.
fn other_files(ckpt: &Checkpoint, warn: &mut impl FnMut(String)) -> Result<Vec<(String, PathBuf)>> {
    let dir = &ckpt.path;
    let index_name = ckpt
        .index
        .as_ref()
        .and_then(|i| i.path.file_name())
        .map(|n| n.to_string_lossy().into_owned());
    let mut out = Vec::new();
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| Error::io(dir, e))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if ckpt.shards.iter().any(|s| s.name == name)
            || index_name.as_deref() == Some(name.as_str())
        {
            continue;
        }
        if path.is_dir() {
            warn(format!(
                "{}: subdirectory not copied (only the checkpoint and top-level files are)",
                path.display()
            ));
        } else if name.ends_with(".safetensors") {
            warn(format!(
                "{}: not part of the checkpoint, not copied",
                path.display()
            ));
        } else if path.is_file() {
            out.push((name, path));
        }
    }
    Ok(out)
}

/// Names in `base` when it is a directory (none for a file).
fn top_level_names(base: &Path) -> Vec<String> {
    fs::read_dir(base)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// What `write` writes: the base, the adapters, and the plan.
struct Job<'a> {
    ckpt: &'a Checkpoint,
    adapters: &'a [Adapter],
    painted: &'a Painted,
    requants: &'a [Requant],
}

fn write(
    job: &Job,
    staged: &Staged,
    is_dir: bool,
    others: &[(String, PathBuf)],
    ctl: &Control,
) -> Result<()> {
    let ckpt = job.ckpt;
    let out_path = |name: &str| {
        if is_dir {
            staged.path().join(name)
        } else {
            staged.path().to_path_buf()
        }
    };
    let mut outputs: Vec<(File, PathBuf)> = Vec::with_capacity(ckpt.shards.len());
    let mut ranges: Vec<((usize, Src), Range)> = Vec::new();
    for (si, shard) in ckpt.shards.iter().enumerate() {
        let path = out_path(&shard.name);
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        copy::preallocate(&f, &path, shard.file.file_len)?;
        outputs.push((f, path));
        shard_ranges(si, &shard.file, job.painted, &mut ranges);
    }
    let ranges = copy::chunked(ranges);
    let other_bytes: u64 = others
        .iter()
        .filter_map(|(_, p)| fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    let requant_bytes: u64 = job
        .requants
        .iter()
        .map(|q| q.rows * q.cols * q.dtype.bits() / 8)
        .sum();
    ctl.stage(
        "merge",
        ranges.iter().map(|(_, r)| r.len).sum::<u64>() + requant_bytes + other_bytes,
    );
    ranges.par_iter().try_for_each(|&((si, from), r)| {
        let src: &SafetensorsFile = match from {
            Src::Base(s) => &ckpt.shards[s].file,
            Src::Adapter(a, s) => &job.adapters[a].ckpt.shards[s].file,
        };
        let (dst, dst_path) = &outputs[si];
        copy::copy_range(src.file(), &src.path, dst, dst_path, r)?;
        ctl.advance(r.len)
    })?;
    requantize(job, &outputs, ctl)?;
    if let Some(index) = &ckpt.index {
        let name = index
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let total: u64 = ckpt.total_bytes();
        write_index(&index.path, &out_path(&name), total)?;
    }
    for (name, src) in others {
        let dst = out_path(name);
        let n = fs::copy(src, &dst).map_err(|e| Error::io(src, e))?;
        staging::set_mode(&dst).map_err(|e| Error::io(&dst, e))?;
        ctl.advance(n)?;
    }
    Ok(())
}

/// Quantises each requantised adapter tensor into its FP8 weight and scale
/// tensor, one block row (`block[0]` rows) per work item, so memory stays at a
/// few block rows whatever the tensor size.
fn requantize(job: &Job, outputs: &[(File, PathBuf)], ctl: &Control) -> Result<()> {
    let items: Vec<(usize, u64)> = job
        .requants
        .iter()
        .enumerate()
        .flat_map(|(q, r)| (0..r.rows.div_ceil(r.block[0])).map(move |b| (q, b)))
        .collect();
    items.par_iter().try_for_each_init(
        || (Vec::new(), fp8::Scratch::default()),
        |(buf, scratch), &(q, b)| {
            let r = &job.requants[q];
            let adapter = &job.adapters[r.adapter];
            let src = &adapter.ckpt.shards[r.shard].file;
            let esize = r.dtype.bits() / 8;
            let row0 = b * r.block[0];
            let rows = r.block[0].min(r.rows - row0);
            let len = rows * r.cols * esize;
            let off = r.src_off + row0 * r.cols * esize;
            buf.resize(len as usize, 0);
            copy::read_exact_at(src.file(), buf, off).map_err(|e| Error::io(&src.path, e))?;
            let block_cols = r.block[1] as usize;
            if let Err(i) = fp8::quantize_block_row(buf, r.dtype, r.cols as usize, block_cols, scratch)
            {
                let at = row0 + i as u64 / r.cols;
                return Err(Error::invalid(
                    &adapter.path,
                    format!(
                        "tensor {:?} holds a non-finite value (row {at}, column {}), which cannot be quantised to F8_E4M3",
                        src.header.tensors[r.tensor].name,
                        i as u64 % r.cols
                    ),
                ));
            }
            let at = |(si, ti): (usize, usize)| {
                let f = &job.ckpt.shards[si].file;
                (&outputs[si], f.offset_of(&f.header.tensors[ti]))
            };
            let ((wf, wpath), woff) = at(r.weight);
            copy::write_all_at(wf, &scratch.fp8, woff + row0 * r.cols)
                .map_err(|e| Error::io(wpath, e))?;
            let ((sf, spath), soff) = at(r.scale);
            let scale_row = r.cols.div_ceil(r.block[1]) * 4;
            copy::write_all_at(sf, &scratch.scales, soff + b * scale_row)
                .map_err(|e| Error::io(spath, e))?;
            ctl.advance(len)
        },
    )
}

/// The byte ranges of one output shard: header and unchanged tensors from the
/// base (coalesced), replaced units from their adapters. Every range lands at
/// the offset it has in the base.
fn shard_ranges(
    si: usize,
    file: &SafetensorsFile,
    painted: &Painted,
    out: &mut Vec<((usize, Src), Range)>,
) {
    let base = |off: u64, len: u64| {
        (
            (si, Src::Base(si)),
            Range {
                src_off: off,
                dst_off: off,
                len,
            },
        )
    };
    let (k, r) = base(0, file.header.data_start());
    copy::push_coalesced(out, k, r);
    for (ti, t) in file.header.tensors.iter().enumerate() {
        let start = file.offset_of(t);
        let Some(slots) = painted.get(&(si, ti)) else {
            let (k, r) = base(start, t.nbytes());
            copy::push_coalesced(out, k, r);
            continue;
        };
        let (units, len) = expert_units(t);
        for u in 0..units {
            let dst = start + u64::from(u) * len;
            let (k, r) = match slots.get(&u) {
                // Written by `requantize`.
                Some(src) if src.requant.is_some() => continue,
                Some(src) => (
                    (si, Src::Adapter(src.adapter, src.shard)),
                    Range {
                        src_off: src.offset,
                        dst_off: dst,
                        len,
                    },
                ),
                None => base(dst, len),
            };
            copy::push_coalesced(out, k, r);
        }
    }
}

/// The base's index with `metadata.total_size` set to the tensors' bytes;
/// everything else (key order, weight_map, other metadata) kept. An index
/// whose total is already right is copied byte for byte.
fn write_index(src: &Path, dst: &Path, total: u64) -> Result<()> {
    let text = fs::read_to_string(src).map_err(|e| Error::io(src, e))?;
    let mut v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::invalid(src, format!("not a safetensors index: {e}")))?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| Error::invalid(src, "not a JSON object"))?;
    let meta = obj
        .entry("metadata")
        .or_insert_with(|| serde_json::json!({}));
    let meta = meta
        .as_object_mut()
        .ok_or_else(|| Error::invalid(src, "metadata is not an object"))?;
    let out = if meta.get("total_size").and_then(serde_json::Value::as_u64) == Some(total) {
        text
    } else {
        meta.insert("total_size".into(), total.into());
        let mut out =
            serde_json::to_string_pretty(&v).map_err(|e| Error::invalid(src, e.to_string()))?;
        out.push('\n');
        out
    };
    fs::write(dst, out).map_err(|e| Error::io(dst, e))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::safetensors::writer::{header_bytes, NewTensor};
    use crate::safetensors::Dtype;

    /// Writes a safetensors file of F32 tensors filled with the given byte.
    pub(crate) fn write_st(path: &Path, tensors: &[(&str, &[u64], u8)], metadata: &[(&str, &str)]) {
        let new: Vec<NewTensor> = tensors
            .iter()
            .map(|(n, shape, _)| NewTensor {
                name: n.to_string(),
                dtype: Dtype::F32,
                shape: shape.to_vec(),
                nbytes: shape.iter().product::<u64>() * 4,
            })
            .collect();
        let md: Vec<(String, String)> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (mut bytes, _) = header_bytes(&new, &md);
        for (t, (_, _, fill)) in new.iter().zip(tensors) {
            bytes.extend(std::iter::repeat_n(*fill, t.nbytes as usize));
        }
        fs::write(path, bytes).unwrap();
    }

    fn opts(on_conflict: OnConflict) -> MergeOptions {
        MergeOptions {
            on_conflict,
            force: false,
            dry_run: false,
            overwrite: false,
            requantize_fp8: false,
        }
    }

    const FUSED: &str = "model.layers.1.mlp.experts.down_proj";

    fn base(dir: &Path) -> PathBuf {
        let p = dir.join("base.safetensors");
        write_st(
            &p,
            &[
                ("model.embed_tokens.weight", &[4, 2], 1),
                (FUSED, &[4, 2, 3], 2),
                ("model.norm.weight", &[2], 3),
            ],
            &[("format", "pt")],
        );
        p
    }

    #[test]
    fn slices_and_whole_tensors_land_in_place() {
        let d = tempfile::tempdir().unwrap();
        let b = base(d.path());
        let a = d.path().join("a.safetensors");
        write_st(
            &a,
            &[
                ("model.layers.1.mlp.experts.2.down_proj", &[2, 3], 9),
                ("model.norm.weight", &[2], 8),
            ],
            &[],
        );
        let out = d.path().join("out.safetensors");
        let report = merge(
            &b,
            &[a],
            Some(&out),
            &opts(OnConflict::Error),
            &Control::default(),
        )
        .unwrap();
        assert_eq!(report.replaced.len(), 2);
        assert_eq!(report.replaced_bytes, 24 + 8);
        assert_eq!(report.warnings.len(), 1, "no fingerprint");
        let (base_bytes, got) = (fs::read(&b).unwrap(), fs::read(&out).unwrap());
        assert_eq!(got.len(), base_bytes.len());
        let f = SafetensorsFile::open(&out).unwrap();
        assert_eq!(
            f.header_bytes(),
            SafetensorsFile::open(&b).unwrap().header_bytes()
        );
        let fused = f.tensor_bytes(f.tensor(FUSED).unwrap());
        assert!(fused[..48].iter().all(|&x| x == 2));
        assert!(fused[48..72].iter().all(|&x| x == 9));
        assert!(fused[72..].iter().all(|&x| x == 2));
        assert!(f
            .tensor_bytes(f.tensor("model.norm.weight").unwrap())
            .iter()
            .all(|&x| x == 8));
    }

    #[test]
    fn conflict_policies() {
        let d = tempfile::tempdir().unwrap();
        let b = base(d.path());
        let (a1, a2) = (
            d.path().join("a1.safetensors"),
            d.path().join("a2.safetensors"),
        );
        write_st(&a1, &[(FUSED, &[4, 2, 3], 5)], &[]);
        write_st(
            &a2,
            &[("model.layers.1.mlp.experts.0.down_proj", &[2, 3], 6)],
            &[],
        );
        let out = d.path().join("out.safetensors");
        let err = merge(
            &b,
            &[a1.clone(), a2.clone()],
            Some(&out),
            &opts(OnConflict::Error),
            &Control::default(),
        );
        assert!(matches!(err, Err(Error::Mismatch(_))));
        assert!(!out.exists());
        for (policy, slice0) in [(OnConflict::First, 5), (OnConflict::Last, 6)] {
            let mut o = opts(policy);
            o.overwrite = true;
            merge(
                &b,
                &[a1.clone(), a2.clone()],
                Some(&out),
                &o,
                &Control::default(),
            )
            .unwrap();
            let f = SafetensorsFile::open(&out).unwrap();
            let fused = f.tensor_bytes(f.tensor(FUSED).unwrap());
            assert!(fused[..24].iter().all(|&x| x == slice0));
            assert!(fused[24..].iter().all(|&x| x == 5));
        }
    }

    #[test]
    fn cancelled_merge_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let b = base(d.path());
        let a = d.path().join("a.safetensors");
        write_st(&a, &[("model.norm.weight", &[2], 8)], &[]);
        let ctl = Control::default();
        ctl.cancel();
        let out = d.path().join("out.safetensors");
        assert!(matches!(
            merge(&b, &[a], Some(&out), &opts(OnConflict::Error), &ctl),
            Err(Error::Cancelled)
        ));
        let names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn default_out_is_a_new_sibling() {
        let d = tempfile::tempdir().unwrap();
        let b = base(d.path());
        assert_eq!(default_out(&b), d.path().join("base-merged.safetensors"));
        fs::write(d.path().join("base-merged.safetensors"), b"").unwrap();
        assert_eq!(default_out(&b), d.path().join("base-merged-2.safetensors"));
        assert_eq!(
            default_out(d.path()).file_name().unwrap().to_string_lossy(),
            format!("{}-merged", d.path().file_name().unwrap().to_string_lossy())
        );
    }
}
