//! The LoRA pass of a merge: each planned unit `W` (a whole weight, or one
//! expert's slice of a fused tensor) is written as `W + scale * B @ A`, summed in
//! f32 and rounded once to W's dtype (`lora::add_low_rank`), a block of rows per
//! work item (rayon across items), so memory stays at a few row blocks.

use std::fs::File;
use std::path::PathBuf;

use rayon::prelude::*;

use super::job::Job;
use crate::copy;
use crate::error::{Error, Result};
use crate::lora;
use crate::progress::Control;
use crate::safetensors::dtype::{decode_floats, encode_floats};
use crate::safetensors::expert_units;


/// About this many f32 values per work item (4 MiB).
const BLOCK_VALUES: u64 = 1 << 20;

/// Bytes of base weights the pass rewrites (for progress).
pub(super) fn bytes(job: &Job) -> u64 {
    units(job)
        .map(|(key, _, _)| expert_units(tensor_of(job, key)).1)
        .sum()
}

fn tensor_of<'a>(job: &'a Job, (si, ti): (usize, usize)) -> &'a crate::safetensors::TensorInfo {
    &job.ckpt.shards[si].file.header.tensors[ti]
}

/// The planned LoRA units: base (shard, tensor), unit, job index.
fn units<'a>(job: &'a Job) -> impl Iterator<Item = ((usize, usize), u32, usize)> + 'a {
    job.painted.iter().flat_map(|(&key, slots)| {
        slots
            .iter()
            .filter_map(move |(&u, src)| src.lora.map(|j| (key, u, j)))
    })
}

/// One work item: rows `row0..row0 + rows` of `unit` of base tensor `key`, by LoRA job `job`.
struct Block {
    key: (usize, usize),
    unit: u32,
    job: usize,
    row0: u64,
    rows: u64,
}

/// Writes every planned LoRA unit into the staged `outputs` (one per base shard).
pub(super) fn apply(job: &Job, outputs: &[(File, PathBuf)], ctl: &Control) -> Result<()> {
    let items: Vec<Block> = units(job)
        .flat_map(|(key, unit, j)| {
            let l = &job.loras[j];
            let step = (BLOCK_VALUES / l.cols.max(1)).max(1);
            (0..l.rows.div_ceil(step)).map(move |b| Block {
                key,
                unit,
                job: j,
                row0: b * step,
                rows: step.min(l.rows - b * step),
            })
        })
        .collect();
    items.par_iter().try_for_each_init(
        || (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new()),
        |(raw, w, a, b, out), blk| {
            let Block {
                key: (si, ti),
                unit,
                job: j,
                row0,
                rows,
            } = *blk;
            let l = &job.loras[j];
            let adapter = &job.adapters[l.adapter];
            let pair = &adapter.lora[l.pair];
            let base = &job.ckpt.shards[si].file;
            let t = &base.header.tensors[ti];
            let esize = t.dtype.bits() / 8;
            let (_, unit_len) = expert_units(t);
            let off = base.offset_of(t) + u64::from(unit) * unit_len + row0 * l.cols * esize;
            // W's rows, then A whole and B's rows, all as f32.
            read(raw, base, off, rows * l.cols * esize)?;
            decode_floats(raw, t.dtype, w);
            let read_part = |raw: &mut Vec<u8>,
                             out: &mut Vec<f32>,
                             (s, i): (usize, usize),
                             skip: u64,
                             len: u64| {
                let f = &adapter.ckpt.shards[s].file;
                let ti = &f.header.tensors[i];
                let es = ti.dtype.bits() / 8;
                read(raw, f, f.offset_of(ti) + skip * es, len * es)?;
                decode_floats(raw, ti.dtype, out);
                Ok::<(), Error>(())
            };
            let brow = l.b_row0 + row0;
            let (av, bv, r): (&[f32], &[f32], u64) = match &pair.owned {
                Some(o) => {
                    let r = o.r as u64;
                    (
                        &o.a,
                        &o.b[(brow * r) as usize..((brow + rows) * r) as usize],
                        r,
                    )
                }
                None => {
                    let r = adapter.ckpt.shards[pair.a.0].file.header.tensors[pair.a.1].shape[0];
                    read_part(raw, a, pair.a, 0, r * l.cols)?;
                    read_part(raw, b, pair.b, brow * r, rows * r)?;
                    (a, b, r)
                }
            };
            lora::add_low_rank(w, bv, av, r as usize, l.cols as usize, pair.scale);
            encode_floats(w, t.dtype, out);
            let (dst, dst_path) = &outputs[si];
            copy::write_all_at(dst, out, off).map_err(|e| Error::io(dst_path, e))?;
            ctl.advance(out.len() as u64)
        },
    )
}

fn read(
    buf: &mut Vec<u8>,
    f: &crate::safetensors::SafetensorsFile,
    off: u64,
    len: u64,
) -> Result<()> {
    buf.resize(len as usize, 0);
    copy::read_exact_at(f.file(), buf, off).map_err(|e| Error::io(&f.path, e))
}
