//! Block-FP8 requantisation, a pass over the merge plan.
//!
//! A BF16/F16/F32 adapter tensor aimed at an F8_E4M3 base weight with
//! `weight_scale_inv` is refused, or (with `requantize_fp8`) becomes a
//! `Requant`: `requant_slot` checks it while planning, `settle` keeps
//! only whole requantisations once the conflict policy has run, and
//! `requantize` writes the quantised rows and their scales into the output.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::job::{Job, Painted, Requant};
use super::MergeOptions;
use crate::adapter::{Adapter, AdapterTensor};
use crate::copy;
use crate::error::{Error, Result};
use crate::fp8::{self, BlockSize};
use crate::progress::Control;
use crate::safetensors::{Checkpoint, Dtype, TensorInfo};


/// Whether adapter tensor `at` goes into an F8_E4M3 base slot with another
/// dtype (to be requantised or refused).
pub(super) fn is_fp8_slot(bt: &TensorInfo, at: &TensorInfo) -> bool {
    bt.dtype == Dtype::F8_E4M3 && at.dtype != Dtype::F8_E4M3
}

/// Checks that adapter tensor `at` can be quantised into the F8_E4M3 base
/// weight `key` (and that it was asked for). `adapter`: its index and path.
pub(super) fn requant_slot(
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

/// Under --on-conflict first/last a weight and its scale tensor could come
/// from different adapters: that is an error. Requantisations whose weight
/// another adapter's tensor superseded are dropped; the rest are renumbered.
pub(super) fn settle(
    mut painted: Painted,
    requants: Vec<Requant>,
    ckpt: &Checkpoint,
    adapters: &[Adapter],
) -> Result<(Painted, Vec<Requant>)> {
    let base_tensor = |(si, ti): (usize, usize)| &ckpt.shards[si].file.header.tensors[ti];
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

/// Quantises each requantised adapter tensor into its FP8 weight and scale
/// tensor, one block row (`block[0]` rows) per work item, so memory stays at a
/// few block rows whatever the tensor size.
pub(super) fn requantize(job: &Job, outputs: &[(File, PathBuf)], ctl: &Control) -> Result<()> {
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
