//! What a merge does, as data: `plan` decides it, the requantisation and low-rank
//! passes compute some of its units, `write` carries it out. Types only, so that
//! those modules depend on this one and not on each other.

use std::collections::BTreeMap;

use crate::adapter::Adapter;
use crate::safetensors::{Checkpoint, Dtype};

/// Where an adapter tensor's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Source {
    pub(super) adapter: usize,
    /// Shard of the adapter's checkpoint.
    pub(super) shard: usize,
    /// Index in that shard's tensors.
    pub(super) tensor: usize,
    /// Absolute file offset of this unit's first byte.
    pub(super) offset: u64,
    /// Index of the `Requant` that computes this unit (an FP8 weight or its
    /// scale tensor) instead of copying it.
    pub(super) requant: Option<usize>,
    /// Index of the `LoraJob` that computes this unit (base + low-rank change).
    pub(super) lora: Option<usize>,
}

/// The plan: for each base tensor (shard, index) that changes, the source of
/// each replaced unit.
pub(super) type Painted = BTreeMap<(usize, usize), BTreeMap<u32, Source>>;

/// A BF16/F16/F32 adapter tensor quantised into an F8_E4M3 base weight and
/// its block scales.
#[derive(Debug)]
pub(super) struct Requant {
    pub(super) adapter: usize,
    /// Shard of the adapter's checkpoint, tensor index there, absolute offset.
    pub(super) shard: usize,
    pub(super) tensor: usize,
    pub(super) src_off: u64,
    pub(super) dtype: Dtype,
    /// Base (shard, tensor) of the weight and of its `weight_scale_inv`.
    pub(super) weight: (usize, usize),
    pub(super) scale: (usize, usize),
    pub(super) rows: u64,
    pub(super) cols: u64,
    pub(super) block: [u64; 2],
}

/// A LoRA pair of one adapter and the shape [rows, cols] it changes.
#[derive(Debug)]
pub(super) struct LoraJob {
    pub(super) adapter: usize,
    /// Index in the adapter's `lora`.
    pub(super) pair: usize,
    pub(super) rows: u64,
    pub(super) cols: u64,
    /// First row of B @ A this job writes (a fused parameter's expert part split over
    /// per-expert weights: the up rows start after the gate rows).
    pub(super) b_row0: u64,
}

/// What `write` writes: the base, the adapters, and the plan.
pub(super) struct Job<'a> {
    pub(super) ckpt: &'a Checkpoint,
    pub(super) adapters: &'a [Adapter],
    pub(super) painted: &'a Painted,
    pub(super) requants: &'a [Requant],
    pub(super) loras: &'a [LoraJob],
}
