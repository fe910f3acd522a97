//! A cheap, content-sensitive fingerprint of a checkpoint, recorded in
//! adapters so that merging into a different base can be refused.
//!
//! Scheme (version 1): XXH3-128 over, for every tensor sorted by name, its
//! name, dtype and shape, then sampled bytes of each of its units (the tensor,
//! or each expert's slice of a fused-experts tensor): all of the unit if at
//! most `2 * SAMPLE` bytes, else its first and last `SAMPLE` bytes. The result
//! is `v1:` + 32 hex digits. It reads at most 8 KiB per tensor or expert slice
//! (never a whole model), does not depend on how tensors are split into
//! shards, and changes when training touched a tensor or an expert (trained
//! weights differ nearly everywhere, so in their first bytes). Samples are read
//! with positional reads, not through the map, so they add nothing to the
//! resident set.

use std::path::Path;

use rayon::prelude::*;
use xxhash_rust::xxh3::Xxh3;

use crate::copy::read_exact_at;
use crate::error::{Error, Result};
use crate::naming;
use crate::progress::Control;
use crate::safetensors::{Checkpoint, SafetensorsFile, TensorInfo};

pub const SAMPLE: u64 = 4096;
const VERSION: &str = "v1";

pub fn fingerprint_path(path: &Path, ctl: &Control) -> Result<String> {
    fingerprint(&Checkpoint::open(path)?, ctl)
}

pub fn fingerprint(ckpt: &Checkpoint, ctl: &Control) -> Result<String> {
    let mut tensors: Vec<(&SafetensorsFile, &TensorInfo)> =
        ckpt.tensors().map(|(s, t)| (&s.file, t)).collect();
    tensors.sort_by(|a, b| a.1.name.cmp(&b.1.name));
    ctl.stage("fingerprint", tensors.len() as u64);
    // Each tensor hashes on its own (in parallel); the digests are combined in name order.
    let digests = tensors
        .par_iter()
        .map(|(f, t)| {
            let d = tensor_digest(f, t)?;
            ctl.advance(1)?;
            Ok(d)
        })
        .collect::<Result<Vec<u128>>>()?;
    let mut h = Xxh3::new();
    for d in digests {
        h.update(&d.to_le_bytes());
    }
    Ok(format!("{VERSION}:{:032x}", h.digest128()))
}

fn tensor_digest(f: &SafetensorsFile, t: &TensorInfo) -> Result<u128> {
    let mut h = Xxh3::new();
    let shape: Vec<String> = t.shape.iter().map(u64::to_string).collect();
    // Length-prefixed fields, so that no two different tensors hash the same input.
    for field in [t.name.as_str(), t.dtype.name(), &shape.join(",")] {
        h.update(&(field.len() as u64).to_le_bytes());
        h.update(field.as_bytes());
    }
    let (units, len) = naming::expert_units(&t.name, &t.shape, t.nbytes());
    let mut buf = [0u8; 2 * SAMPLE as usize];
    for u in 0..u64::from(units) {
        let start = f.offset_of(t) + u * len;
        let samples = if len <= 2 * SAMPLE {
            [(start, len), (0, 0)]
        } else {
            [(start, SAMPLE), (start + len - SAMPLE, SAMPLE)]
        };
        for (off, n) in samples.into_iter().filter(|&(_, n)| n > 0) {
            let b = &mut buf[..n as usize];
            read_exact_at(f.file(), b, off).map_err(|e| Error::io(&f.path, e))?;
            h.update(b);
        }
    }
    h.update(&t.nbytes().to_le_bytes());
    Ok(h.digest128())
}
