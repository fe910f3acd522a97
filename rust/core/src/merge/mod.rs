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
//!
//! Three steps, one module each: `plan` resolves adapter tensor names to base
//! tensors and expert slices, checks dtypes and shapes, and applies the conflict
//! policy; `requant` is the block-FP8 pass over that plan (which slots are
//! quantised, and the quantising writer); `write` turns the plan into byte
//! ranges and copies them into a staged output.
//!
//! ```
//! # use std::path::PathBuf;
//! # use esft_core::safetensors::{writer::{header_bytes, NewTensor}, Dtype, SafetensorsFile};
//! # fn main() -> esft_core::Result<()> {
//! use esft_core::merge::{merge, MergeOptions, OnConflict};
//! use esft_core::progress::Control;
//!
//! // A one-tensor base and an adapter that replaces it (both F32 [2]).
//! let dir = std::env::temp_dir().join(format!("esft-merge-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let write = |name: &str, fill: u8| -> PathBuf {
//!     let t = NewTensor { name: "model.norm.weight".into(), dtype: Dtype::F32, shape: vec![2], nbytes: 8 };
//!     let (mut bytes, _) = header_bytes(&[t], &[]);
//!     bytes.extend([fill; 8]);
//!     let path = dir.join(name);
//!     std::fs::write(&path, bytes).unwrap();
//!     path
//! };
//! let (base, adapter) = (write("base.safetensors", 1), write("adapter.safetensors", 7));
//! let out = dir.join("merged.safetensors");
//! let opts = MergeOptions { on_conflict: OnConflict::Error, force: false, dry_run: false, overwrite: true, requantize_fp8: false };
//! let report = merge(&base, &[adapter], Some(&out), &opts, &Control::default())?;
//! assert_eq!(report.replaced_bytes, 8);
//! let merged = SafetensorsFile::open(&out)?;
//! assert_eq!(merged.read_tensor(merged.tensor("model.norm.weight").unwrap())?, [7; 8]);
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok(())
//! # }
//! ```

mod job;
mod low_rank;
mod plan;
mod requant;
mod write;

use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::adapter::{Adapter, AdapterKind};
use crate::error::{Error, Result};
use crate::fingerprint;
use crate::progress::Control;
use crate::safetensors::Checkpoint;
use crate::staging::{self, Staged};

use plan::{describe, plan};
use job::Job;
use write::write;

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
    /// Merge even when an adapter's base fingerprint differs from the base's, or
    /// it holds tensors its own expert config does not select.
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

/// Merges `adapter_paths` into `base`, writing `out` (default: `default_out`):
/// open the inputs, check the output, plan every replacement (all checks, before
/// a byte is written), then write the output while the base's fingerprint is
/// checked, and commit it.
pub fn merge(
    base: &Path,
    adapter_paths: &[PathBuf],
    out: Option<&Path>,
    opts: &MergeOptions,
    ctl: &Control,
) -> Result<MergeReport> {
    let (ckpt, adapters) = open_inputs(base, adapter_paths)?;
    let out = check_output(base, adapter_paths, out, &ckpt, opts)?;

    // Warnings are shown only once the whole plan holds: a failing merge says one thing.
    let mut warnings = missing_fingerprints(&ckpt, &adapters);
    let (painted, requants, loras) = plan(&ckpt, &adapters, opts)?;
    warnings.extend(outside_configs(&adapters, opts.force)?);
    let replaced = describe(&ckpt, &adapters, &painted);
    let others = if out.is_dir {
        other_files(&ckpt, &mut |w| warnings.push(w))?
    } else {
        Vec::new()
    };
    let need_fp = adapters.iter().any(|a| a.fingerprint.is_some());
    if !need_fp {
        warnings.iter().for_each(|w| ctl.warn(w.clone()));
    }

    let job = Job {
        ckpt: &ckpt,
        adapters: &adapters,
        painted: &painted,
        requants: &requants,
        loras: &loras,
    };
    let (base_fingerprint, forced) = if opts.dry_run {
        check_fingerprints(&ckpt, &adapters, opts.force, ctl)?
    } else {
        write_checked(&job, &out, &others, opts, ctl)?
    };
    if need_fp {
        warnings.extend(forced);
        warnings.iter().for_each(|w| ctl.warn(w.clone()));
    }

    Ok(MergeReport {
        base: base.display().to_string(),
        out: out.path.display().to_string(),
        dry_run: opts.dry_run,
        base_fingerprint,
        adapters: adapters.iter().map(summary).collect(),
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

/// The base checkpoint and the adapters (headers only), each checked as it opens.
fn open_inputs(base: &Path, adapter_paths: &[PathBuf]) -> Result<(Checkpoint, Vec<Adapter>)> {
    if adapter_paths.is_empty() {
        return Err(Error::Usage("merge needs at least one adapter".into()));
    }
    let ckpt = Checkpoint::open(base)?;
    let adapters = adapter_paths
        .iter()
        .map(|p| Adapter::open(p))
        .collect::<Result<Vec<_>>>()?;
    Ok((ckpt, adapters))
}

/// Where the merge goes, and what it may replace there.
struct Output {
    path: PathBuf,
    /// A model directory (the base is one), else one safetensors file.
    is_dir: bool,
    /// Names an earlier output may hold: whatever the base's directory holds (copied).
    keep: Vec<String>,
}

/// The output may not be or lie inside an input; unless this is a dry run, it must
/// be new (or, with `overwrite`, an earlier merge) and of the base's kind.
fn check_output(
    base: &Path,
    adapter_paths: &[PathBuf],
    out: Option<&Path>,
    ckpt: &Checkpoint,
    opts: &MergeOptions,
) -> Result<Output> {
    let path = out.map_or_else(|| default_out(base), Path::to_path_buf);
    let mut inputs: Vec<&Path> = vec![base];
    inputs.extend(adapter_paths.iter().map(PathBuf::as_path));
    staging::check_paths(&[&path], &inputs)?;
    let keep = top_level_names(base);
    let is_dir =
        ckpt.index.is_some() || fs::metadata(base).map_err(|e| Error::io(base, e))?.is_dir();
    if !opts.dry_run {
        staging::check_target(&path, opts.overwrite, &keep)?;
        staging::check_kind(&path, is_dir)?;
    }
    Ok(Output { path, is_dir, keep })
}

/// The base's fingerprint and the warnings of a forced mismatch, when some adapter
/// records the fingerprint of the base it was trained from (else nothing to check).
fn check_fingerprints(
    ckpt: &Checkpoint,
    adapters: &[Adapter],
    force: bool,
    ctl: &Control,
) -> Result<(Option<String>, Vec<String>)> {
    if !adapters.iter().any(|a| a.fingerprint.is_some()) {
        return Ok((None, Vec::new()));
    }
    let fp = fingerprint::fingerprint(ckpt, ctl)?;
    let forced = compare_fingerprints(ckpt, &fp, adapters, force)?;
    Ok((Some(fp), forced))
}

/// Writes the merge into a staged output and commits it; the fingerprint is checked
/// meanwhile (the output is staged, so a refused merge leaves nothing), and a
/// mismatch stops the writing.
fn write_checked(
    job: &Job,
    out: &Output,
    others: &[(String, PathBuf)],
    opts: &MergeOptions,
    ctl: &Control,
) -> Result<(Option<String>, Vec<String>)> {
    let staged = Staged::new(&out.path, out.is_dir)?;
    let (checked, written) = rayon::join(
        || {
            check_fingerprints(job.ckpt, job.adapters, opts.force, &Control::default())
                .inspect_err(|_| ctl.cancel())
        },
        || write(job, &staged, out.is_dir, others, ctl),
    );
    let checked = checked?;
    written?;
    ctl.check()?;
    staged.commit(opts.overwrite, &out.keep)?;
    Ok(checked)
}

/// The report's line for one adapter.
fn summary(a: &Adapter) -> AdapterSummary {
    AdapterSummary {
        path: a.path.display().to_string(),
        kind: a.kind,
        base_fingerprint: a.fingerprint.clone(),
        tensors: a.tensors().count(),
        bytes: a.ckpt.total_bytes(),
    }
}

/// Refuses (or with `force`, warns about) an adapter holding tensors that its own
/// expert config does not select: it would change more of the model than it says.
fn outside_configs(adapters: &[Adapter], force: bool) -> Result<Vec<String>> {
    let mut warnings = Vec::new();
    for a in adapters {
        let Some(why) = a.outside_config() else {
            continue;
        };
        if !force {
            return Err(Error::invalid(&a.path, format!("{why}; pass --force to merge anyway")));
        }
        warnings.push(format!("{}: {why}; merging anyway (--force)", a.path.display()));
    }
    Ok(warnings)
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
                AdapterKind::Esft | AdapterKind::Lora => "adapter written without a base",
                AdapterKind::Peft => "PEFT adapter directory",
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
        } else {
            warn(format!("{}: not a regular file, not copied", path.display()));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safetensors::SafetensorsFile;
    use crate::test_support::write_st;

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
        let fused = f.read_tensor(f.tensor(FUSED).unwrap()).unwrap();
        assert!(fused[..48].iter().all(|&x| x == 2));
        assert!(fused[48..72].iter().all(|&x| x == 9));
        assert!(fused[72..].iter().all(|&x| x == 2));
        assert!(f
            .read_tensor(f.tensor("model.norm.weight").unwrap())
            .unwrap()
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
            let fused = f.read_tensor(f.tensor(FUSED).unwrap()).unwrap();
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

