//! Planning a merge: which adapter bytes replace which base bytes.
//!
//! Each adapter tensor is resolved to a base tensor (by name, legacy official
//! names mapped) or to one expert's slice of a fused base tensor, checked for
//! dtype and shape, and painted unit by unit (a whole tensor, or an expert
//! slice) under the conflict policy. A tensor aimed at a block-FP8 slot goes
//! through `super::requant`; a LoRA pair becomes a `LoraJob` (`super::low_rank`).

use std::collections::HashMap;

use super::job::{LoraJob, Painted, Requant, Source};
use super::requant::{self, is_fp8_slot, requant_slot};
use super::{MergeOptions, OnConflict, Replacement};
use crate::adapter::{Adapter, AdapterTensor};
use crate::error::{Error, Result};
use crate::fp8::{self, BlockSize};
use crate::lora;
use crate::naming::{self, Role};
use crate::safetensors::{expert_units, Checkpoint, Dtype};


/// Base tensors by name: (shard, index in its header).
type Index<'a> = HashMap<&'a str, (usize, usize)>;

/// The plan of a merge: which bytes of which base tensor each adapter replaces
/// (`Painted`), the block-FP8 slots quantised on the way, and the LoRA products.
/// Each adapter is resolved in turn, whole tensors before LoRA pairs, so that the
/// conflict policy sees them in the order given.
pub(super) fn plan(
    ckpt: &Checkpoint,
    adapters: &[Adapter],
    opts: &MergeOptions,
) -> Result<(Painted, Vec<Requant>, Vec<LoraJob>)> {
    let block = fp8_block(ckpt)?;
    let index = base_index(ckpt);
    let mut plan = Plan::default();
    for (ai, a) in adapters.iter().enumerate() {
        for at in a.tensors() {
            let target = resolve(ckpt, &index, (ai, a), &at, block.as_ref(), opts)?;
            plan.paint_tensor(ckpt, adapters, opts.on_conflict, ai, &at, target)?;
        }
        plan.paint_lora(ckpt, &index, adapters, opts.on_conflict, ai)?;
    }
    let (painted, requants) = requant::settle(plan.painted, plan.requants, ckpt, adapters)?;
    Ok((painted, requants, plan.loras))
}

/// A plan while it is built.
#[derive(Default)]
struct Plan {
    painted: Painted,
    requants: Vec<Requant>,
    loras: Vec<LoraJob>,
}

/// The base's FP8 block size, read only when it stores some F8_E4M3 tensor (a
/// checkpoint without one need not say).
fn fp8_block(ckpt: &Checkpoint) -> Result<Option<BlockSize>> {
    if ckpt.tensors().any(|(_, t)| t.dtype == Dtype::F8_E4M3) {
        Ok(Some(fp8::block_size(&ckpt.path)?))
    } else {
        Ok(None)
    }
}

fn base_index(ckpt: &Checkpoint) -> Index<'_> {
    let mut index = HashMap::new();
    for (si, s) in ckpt.shards.iter().enumerate() {
        for (ti, t) in s.file.header.tensors.iter().enumerate() {
            index.insert(t.name.as_str(), (si, ti));
        }
    }
    index
}

/// Where one adapter tensor goes: base tensor `key`, its `units` ((unit, source
/// offset)), and the block-FP8 quantisation it needs on the way, if any.
struct Target {
    key: (usize, usize),
    units: Vec<(u32, u64)>,
    requant: Option<Requant>,
}

/// Resolves adapter tensor `at` (of adapter `ai`) to the base tensor of its name
/// (legacy names mapped) or to one expert's slice of a fused base tensor; dtype
/// and shape checked.
fn resolve(
    ckpt: &Checkpoint,
    index: &Index,
    (ai, a): (usize, &Adapter),
    at: &AdapterTensor,
    block: Option<&BlockSize>,
    opts: &MergeOptions,
) -> Result<Target> {
    let found = index
        .get(at.name.as_str())
        .or_else(|| index.get(naming::canonical(&at.name).as_ref()));
    if let Some(&key) = found {
        return whole_tensor(ckpt, index, key, (ai, a), at, block, opts);
    }
    if let Some((parent, e)) = naming::fused_slice_parent(&naming::canonical(&at.name)) {
        return expert_slice(ckpt, index, &parent, e, a, at);
    }
    Err(mismatch(a, at, format!("is not in the base {}", ckpt.path.display())))
}

/// `at`'s adapter holds it, but it does not fit the base.
fn mismatch(a: &Adapter, at: &AdapterTensor, what: String) -> Error {
    Error::Mismatch(format!("{}: tensor {:?} {what}", a.path.display(), at.info.name))
}

/// `at` replaces base tensor `key` whole, unit by unit (a fused tensor's expert
/// slices are units too, so that adapters can share it); into a block-FP8 slot it
/// is quantised, which `opts` must allow.
fn whole_tensor(
    ckpt: &Checkpoint,
    index: &Index,
    key: (usize, usize),
    (ai, a): (usize, &Adapter),
    at: &AdapterTensor,
    block: Option<&BlockSize>,
    opts: &MergeOptions,
) -> Result<Target> {
    let bt = &ckpt.shards[key.0].file.header.tensors[key.1];
    let requant = match block {
        Some(block) if is_fp8_slot(bt, at.info) => {
            Some(requant_slot(ckpt, index, key, (ai, &a.path), at, block, opts)?)
        }
        _ => None,
    };
    if requant.is_none() && (bt.dtype != at.info.dtype || bt.shape != at.info.shape) {
        return Err(mismatch(a, at, format!(
            "is {} {:?} but the base's {:?} is {} {:?}",
            at.info.dtype, at.info.shape, bt.name, bt.dtype, bt.shape
        )));
    }
    let src_off = at.file.offset_of(at.info);
    let (n, len) = expert_units(bt);
    let units = (0..n).map(|u| (u, src_off + u64::from(u) * len)).collect();
    Ok(Target { key, units, requant })
}

/// `at` is expert `e`'s slice of the fused base tensor `parent`: one unit of it,
/// which must exist and split into byte-aligned expert slices of `at`'s dtype and shape.
fn expert_slice(
    ckpt: &Checkpoint,
    index: &Index,
    parent: &str,
    e: u32,
    a: &Adapter,
    at: &AdapterTensor,
) -> Result<Target> {
    let Some(&key) = index.get(parent) else {
        return Err(mismatch(a, at, format!(
            "is not in the base {} (nor is the fused tensor {parent:?} it would be a slice of)",
            ckpt.path.display()
        )));
    };
    let bt = &ckpt.shards[key.0].file.header.tensors[key.1];
    let (n, len) = expert_units(bt);
    let e_total = bt.shape.first().copied().unwrap_or(0);
    if u64::from(e) >= e_total {
        return Err(mismatch(a, at, format!(
            "is expert {e}'s slice of {parent:?}, which has {e_total} experts"
        )));
    }
    if u64::from(n) != e_total {
        return Err(mismatch(a, at, format!(
            "is a slice of {parent:?}, whose {} {:?} does not split into byte-aligned expert slices",
            bt.dtype, bt.shape
        )));
    }
    if bt.dtype != at.info.dtype || bt.shape[1..] != at.info.shape[..] {
        return Err(mismatch(a, at, format!(
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
    Ok(Target { key, units: vec![(e, at.file.offset_of(at.info))], requant: None })
}

impl Plan {
    /// Paints `target` with adapter tensor `at` of adapter `ai`; a quantised slot
    /// paints its `weight_scale_inv` too, from the same source.
    fn paint_tensor(
        &mut self,
        ckpt: &Checkpoint,
        adapters: &[Adapter],
        on_conflict: OnConflict,
        ai: usize,
        at: &AdapterTensor,
        target: Target,
    ) -> Result<()> {
        let Target { key, units, requant } = target;
        let mut targets = vec![(key, units)];
        let requant = requant.map(|q| {
            targets.push((q.scale, vec![(0, at.file.offset_of(at.info))]));
            self.requants.push(q);
            self.requants.len() - 1
        });
        for (key, units) in targets {
            let src = Source { adapter: ai, shard: at.shard, tensor: at.index, offset: 0, requant, lora: None };
            paint(&mut self.painted, ckpt, adapters, on_conflict, key, units, src)?;
        }
        Ok(())
    }

    /// Paints the units each LoRA pair of adapter `ai` changes, one `LoraJob` each.
    fn paint_lora(
        &mut self,
        ckpt: &Checkpoint,
        index: &Index,
        adapters: &[Adapter],
        on_conflict: OnConflict,
        ai: usize,
    ) -> Result<()> {
        let a = &adapters[ai];
        for (pi, pair) in a.lora.iter().enumerate() {
            for (key, unit, job) in lora_targets(ckpt, index, (ai, pi), a)? {
                let src = Source {
                    adapter: ai,
                    shard: pair.a.0,
                    tensor: pair.a.1,
                    offset: 0,
                    requant: None,
                    lora: Some(self.loras.len()),
                };
                self.loras.push(job);
                paint(&mut self.painted, ckpt, adapters, on_conflict, key, vec![(unit, 0)], src)?;
            }
        }
        Ok(())
    }
}

/// Paints `units` ((unit, source offset)) of base tensor `key` with `src`,
/// under the conflict policy.
fn paint(
    painted: &mut Painted,
    ckpt: &Checkpoint,
    adapters: &[Adapter],
    on_conflict: OnConflict,
    key: (usize, usize),
    units: Vec<(u32, u64)>,
    src: Source,
) -> Result<()> {
    let ai = src.adapter;
    let a = &adapters[ai];
    let slots = painted.entry(key).or_default();
    for (unit, offset) in units {
        let src = Source { offset, ..src };
        match slots.get(&unit) {
            None => {
                slots.insert(unit, src);
            }
            Some(prev) if prev.adapter == ai || on_conflict == OnConflict::Error => {
                let prev_a = &adapters[prev.adapter];
                let hint = if prev.adapter == ai {
                    ""
                } else {
                    "; pass --on-conflict first or last to choose"
                };
                return Err(Error::Mismatch(format!(
                    "{}: tensor {:?} replaces the same bytes of {:?} as {:?} from {}{hint}",
                    a.path.display(),
                    a.stored_name((src.shard, src.tensor)),
                    ckpt.shards[key.0].file.header.tensors[key.1].name,
                    prev_a.stored_name((prev.shard, prev.tensor)),
                    prev_a.path.display(),
                )));
            }
            Some(_) if on_conflict == OnConflict::Last => {
                slots.insert(unit, src);
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// A base tensor, the unit of it a LoRA job writes, and the job.
type LoraTarget = ((usize, usize), u32, LoraJob);

/// The base tensors and units that LoRA pair `pi` of adapter `ai` changes:
/// `module.weight` (or `module`) whole, expert E's slice of a fused tensor, or the
/// per-expert weights a fused parameter's expert part is stored as (rows of B @ A
/// each, `naming::unfused_parts`); shapes and dtype checked.
fn lora_targets(
    ckpt: &Checkpoint,
    index: &Index,
    (ai, pi): (usize, usize),
    a: &Adapter,
) -> Result<Vec<LoraTarget>> {
    let pair = &a.lora[pi];
    let base_tensor = |(si, ti): (usize, usize)| &ckpt.shards[si].file.header.tensors[ti];
    let tensor = |(si, ti): (usize, usize)| &a.ckpt.shards[si].file.header.tensors[ti];
    let (ta, tb) = (tensor(pair.a), tensor(pair.b));
    let want = [tb.shape[0], ta.shape[1]];
    let nomap = |why: String| {
        Error::Mismatch(format!(
            "{}: key {:?} does not map onto the base {}: {why}",
            a.path.display(),
            ta.name,
            ckpt.path.display()
        ))
    };
    let weight = format!("{}.weight", pair.module);
    let find = |n: &str| {
        index
            .get(n)
            .or_else(|| index.get(naming::canonical(n).as_ref()))
            .or_else(|| index.get(naming::in_memory_alias(n).as_str()))
            .copied()
    };
    let job = |rows: u64, b_row0: u64| LoraJob {
        adapter: ai,
        pair: pi,
        rows,
        cols: want[1],
        b_row0,
    };
    let (key, unit) = if let Some(key) = find(&weight).or_else(|| find(&pair.module)) {
        let bt = base_tensor(key);
        if bt.shape != want {
            return Err(nomap(format!("{:?} is {:?} but B @ A is {want:?}", bt.name, bt.shape)));
        }
        (key, 0)
    } else if let Some((parent, e)) = naming::fused_slice_parent(&naming::canonical(&pair.module)) {
        let Some(key) = find(&parent) else {
            let (experts, param) = parent.rsplit_once('.').unwrap_or((&parent, ""));
            let parts = naming::unfused_parts(experts, e, param);
            let Some(names) = parts.iter().find(|ns| ns.iter().all(|n| index.contains_key(n.as_str()))) else {
                return Err(nomap(format!("it has no tensor {weight:?}")));
            };
            let rows = want[0] / names.len() as u64;
            let mut out = Vec::new();
            for (i, n) in names.iter().enumerate() {
                let key = index[n.as_str()];
                let bt = base_tensor(key);
                if bt.shape != [rows, want[1]] || !lora::mergeable(bt.dtype) {
                    return Err(nomap(format!(
                        "{n:?} is {} {:?}, not F32/BF16/F16 {:?} (rows {}..{} of expert {e}'s part of B @ A {want:?})",
                        bt.dtype, bt.shape, [rows, want[1]], i as u64 * rows, (i as u64 + 1) * rows
                    )));
                }
                out.push((key, 0, job(rows, i as u64 * rows)));
            }
            return Ok(out);
        };
        let bt = base_tensor(key);
        let (n, _) = expert_units(bt);
        let e_total = bt.shape.first().copied().unwrap_or(0);
        if u64::from(e) >= e_total || u64::from(n) != e_total || bt.shape[1..] != want {
            return Err(nomap(format!(
                "expert {e}'s slice of {parent:?} {:?} is not {want:?}",
                bt.shape
            )));
        }
        (key, e)
    } else {
        return Err(nomap(format!("it has no tensor {weight:?}")));
    };
    let bt = base_tensor(key);
    if !lora::mergeable(bt.dtype) {
        return Err(Error::Mismatch(format!(
            "{}: LoRA pair {:?} changes {:?}, which is {}; LoRA merges into F32, BF16 or F16 \
             weights only (dequantise the base first)",
            a.path.display(),
            pair.module,
            bt.name,
            bt.dtype
        )));
    }
    Ok(vec![(key, unit, job(want[0], 0))])
}

/// One report entry per replaced tensor, or per expert slice when a fused
/// tensor is replaced only in part (or by several adapters).
pub(super) fn describe(ckpt: &Checkpoint, adapters: &[Adapter], painted: &Painted) -> Vec<Replacement> {
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
