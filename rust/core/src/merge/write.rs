//! Writing a planned merge: each output shard is a list of byte ranges
//! (unchanged base runs coalesced, replaced units from their adapters), copied
//! in parallel into the staged output; then the requantised rows, the index
//! and the directory's other files.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::job::{Job, Painted};
use super::low_rank;
use super::requant::requantize;
use crate::copy::{self, Range};
use crate::error::{read_input_text, Error, Result};
use crate::progress::Control;
use crate::safetensors::{expert_units, SafetensorsFile};
use crate::staging::{self, Staged};

/// Key of a byte range's source file: the base shard or an adapter shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Src {
    Base(usize),
    Adapter(usize, usize),
}


pub(super) fn write(
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
        ranges.iter().map(|(_, r)| r.len).sum::<u64>()
            + requant_bytes
            + low_rank::bytes(job)
            + other_bytes,
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
    low_rank::apply(job, &outputs, ctl)?;
    if let Some(index) = &ckpt.index {
        let name = index
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let total: u64 = ckpt.total_bytes();
        write_index(&index.path, &out_path(&name), total)?;
    }
    for (_, src) in others {
        // Under the base's own name, byte for byte (the listed name is a lossy display form).
        let dst = staged.path().join(src.file_name().unwrap_or_default());
        let n = fs::copy(src, &dst).map_err(|e| Error::io(src, e))?;
        staging::set_mode(&dst).map_err(|e| Error::io(&dst, e))?;
        ctl.advance(n)?;
    }
    Ok(())
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
                // Written by `requantize` or `low_rank::apply`.
                Some(src) if src.requant.is_some() || src.lora.is_some() => continue,
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
    let text = read_input_text(src)?;
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
