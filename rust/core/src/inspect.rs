//! `inspect`: what a checkpoint or adapter holds, from headers alone.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

use crate::error::Result;
use crate::fp8;
use crate::naming::{self, classify, Role};
use crate::safetensors::{Checkpoint, Dtype};

#[derive(Debug, Serialize)]
pub struct TensorEntry {
    pub dtype: String,
    pub shape: Vec<u64>,
    pub bytes: u64,
    pub file: String,
    /// Absolute offset of the tensor's first byte in its file (for positional reads of
    /// a shard's rows); not part of `inspect --json`.
    #[serde(skip)]
    pub offset: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct MoeLayer {
    /// Routed expert ids present (per-expert layout), or 0..E for fused tensors.
    pub experts: Vec<u32>,
    pub shared_experts: bool,
    pub router: bool,
    /// "per-expert", "fused", or "mixed".
    pub layout: String,
    /// Bytes of routed-expert tensors in this layer.
    pub expert_bytes: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct MoeSummary {
    /// Decoder layers seen in the names (MoE or not).
    pub num_layers: u32,
    pub moe_layers: Vec<u32>,
    pub dense_layers: Vec<u32>,
    /// Routed experts per MoE layer when every layer has the same number.
    pub experts_per_layer: Option<usize>,
    pub layers: BTreeMap<u32, MoeLayer>,
    pub router_tensors: usize,
    pub shared_expert_tensors: usize,
    pub routed_expert_tensors: usize,
    pub routed_expert_bytes: u64,
    /// Bytes of one routed expert (scale tensors included) when all are alike.
    pub bytes_per_expert: Option<u64>,
}

/// Block-FP8 weights (DeepSeek-V3): F8_E4M3 with `weight_scale_inv` companions.
#[derive(Debug, Serialize)]
pub struct Fp8Summary {
    pub block_size: [u64; 2],
    /// Where the block size was read: `config.json` or `default` (128 x 128).
    pub block_size_from: &'static str,
    /// F8_E4M3 tensors that have a scale tensor.
    pub scaled_weights: usize,
    pub scale_bytes: u64,
    /// F8_E4M3 tensors without one.
    pub unscaled: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Inspection {
    pub path: String,
    pub files: Vec<String>,
    pub tensors: Ordered<TensorEntry>,
    /// `__metadata__` of all files together (the first file wins a conflict).
    pub metadata: BTreeMap<String, String>,
    /// `__metadata__` of each file, for sharded checkpoints whose files differ.
    pub file_metadata: BTreeMap<String, BTreeMap<String, String>>,
    pub total_tensors: usize,
    pub total_bytes: u64,
    pub moe: MoeSummary,
    /// Present when the checkpoint holds F8_E4M3 tensors.
    pub fp8: Option<Fp8Summary>,
}

/// A name-keyed map that serializes in insertion order (file order).
#[derive(Debug, Default)]
pub struct Ordered<V>(pub Vec<(String, V)>);

impl<V: Serialize> Serialize for Ordered<V> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

pub fn inspect(path: &Path) -> Result<Inspection> {
    let ckpt = Checkpoint::open(path)?;
    let mut tensors = Vec::new();
    let mut metadata = BTreeMap::new();
    let mut file_metadata = BTreeMap::new();
    for shard in &ckpt.shards {
        if let Some(md) = &shard.file.header.metadata {
            for (k, v) in md {
                metadata.entry(k.clone()).or_insert_with(|| v.clone());
            }
            file_metadata.insert(shard.name.clone(), md.iter().cloned().collect());
        }
        for t in &shard.file.header.tensors {
            tensors.push((
                t.name.clone(),
                TensorEntry {
                    dtype: t.dtype.to_string(),
                    shape: t.shape.clone(),
                    bytes: t.nbytes(),
                    file: shard.name.clone(),
                    offset: shard.file.offset_of(t),
                },
            ));
        }
    }
    let moe = moe_summary(&tensors);
    let fp8 = fp8_summary(&ckpt.path, &tensors)?;
    Ok(Inspection {
        path: path.display().to_string(),
        files: ckpt.shards.iter().map(|s| s.name.clone()).collect(),
        total_tensors: tensors.len(),
        total_bytes: tensors.iter().map(|(_, t)| t.bytes).sum(),
        tensors: Ordered(tensors),
        metadata,
        file_metadata,
        moe,
        fp8,
    })
}

fn fp8_summary(path: &Path, tensors: &[(String, TensorEntry)]) -> Result<Option<Fp8Summary>> {
    let f8 = Dtype::F8_E4M3.name();
    if !tensors.iter().any(|(_, t)| t.dtype == f8) {
        return Ok(None);
    }
    let block = fp8::block_size(path)?;
    let names: BTreeSet<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    let mut s = Fp8Summary {
        block_size: block.block,
        block_size_from: block.from,
        scaled_weights: 0,
        scale_bytes: 0,
        unscaled: Vec::new(),
    };
    for (name, t) in tensors {
        if t.dtype == f8 {
            match fp8::scale_name(name) {
                Some(sc) if names.contains(sc.as_str()) => s.scaled_weights += 1,
                _ => s.unscaled.push(name.clone()),
            }
        } else if fp8::weight_of_scale(name).is_some_and(|w| names.contains(w)) {
            s.scale_bytes += t.bytes;
        }
    }
    Ok(Some(s))
}

fn moe_summary(tensors: &[(String, TensorEntry)]) -> MoeSummary {
    let mut s = MoeSummary::default();
    let mut all_layers = BTreeSet::new();
    // Bytes of each routed expert: its tensors, or its share of fused ones.
    let mut expert_bytes: BTreeMap<(u32, u32), u64> = BTreeMap::new();
    for (name, t) in tensors {
        let role = classify(name);
        if let Some(l) = role.layer() {
            all_layers.insert(l);
        }
        if !role.is_moe() {
            continue;
        }
        let Some(l) = role.layer() else { continue };
        let layer = s.layers.entry(l).or_default();
        match role {
            Role::RoutedExpert { expert, .. } => {
                *expert_bytes.entry((l, expert)).or_default() += t.bytes;
                layer.expert_bytes += t.bytes;
                s.routed_expert_tensors += 1;
                s.routed_expert_bytes += t.bytes;
            }
            Role::FusedExperts { .. } => {
                let e = t.shape.first().copied().unwrap_or(0);
                for x in 0..u32::try_from(e).unwrap_or(0) {
                    *expert_bytes.entry((l, x)).or_default() += t.bytes / e;
                }
                layer.expert_bytes += t.bytes;
                s.routed_expert_tensors += 1;
                s.routed_expert_bytes += t.bytes;
            }
            Role::SharedExpert { .. } | Role::SharedExpertGate { .. } => {
                layer.shared_experts = true;
                s.shared_expert_tensors += 1;
            }
            Role::Router { .. } => {
                layer.router = true;
                s.router_tensors += 1;
            }
            Role::LayerOther { .. } | Role::Global => {}
        }
    }
    let layout = naming::moe_layout(tensors.iter().map(|(n, t)| (n.as_str(), t.shape.as_slice())));
    for (l, layer) in s.layers.iter_mut() {
        let experts = layout.get(l).cloned().unwrap_or_default();
        layer.layout = experts.layout().to_string();
        layer.experts = experts.ids().into_iter().collect();
    }
    s.moe_layers = s
        .layers
        .iter()
        .filter(|(_, l)| !l.experts.is_empty() || l.router)
        .map(|(k, _)| *k)
        .collect();
    s.num_layers = all_layers.last().map_or(0, |l| l + 1);
    s.dense_layers = all_layers
        .iter()
        .copied()
        .filter(|l| !s.moe_layers.contains(l))
        .collect();
    let counts: BTreeSet<usize> = s
        .moe_layers
        .iter()
        .filter_map(|l| s.layers.get(l))
        .map(|l| l.experts.len())
        .collect();
    if counts.len() == 1 {
        s.experts_per_layer = counts.into_iter().next();
    }
    let sizes: BTreeSet<u64> = expert_bytes.into_values().collect();
    if sizes.len() == 1 {
        s.bytes_per_expert = sizes.into_iter().next();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(shape: &[u64]) -> TensorEntry {
        TensorEntry {
            dtype: "F32".into(),
            shape: shape.to_vec(),
            bytes: shape.iter().product::<u64>() * 4,
            file: "x".into(),
            offset: 0,
        }
    }

    #[test]
    fn deepseek_layout() {
        let mut t = vec![("model.layers.0.mlp.gate_proj.weight".to_string(), entry(&[4, 2]))];
        for l in 1..3 {
            t.push((format!("model.layers.{l}.mlp.gate.weight"), entry(&[4, 2])));
            t.push((format!("model.layers.{l}.mlp.shared_experts.up_proj.weight"), entry(&[4, 2])));
            for e in 0..4 {
                t.push((format!("model.layers.{l}.mlp.experts.{e}.up_proj.weight"), entry(&[4, 2])));
            }
        }
        let s = moe_summary(&t);
        assert_eq!(s.moe_layers, vec![1, 2]);
        assert_eq!(s.dense_layers, vec![0]);
        assert_eq!(s.experts_per_layer, Some(4));
        assert_eq!(s.layers[&1].layout, "per-expert");
        assert!(s.layers[&2].shared_experts);
        assert_eq!(s.layers[&1].expert_bytes, 4 * 32);
        assert_eq!(s.bytes_per_expert, Some(32));
    }

    #[test]
    fn fused_layout() {
        let t = vec![
            ("model.layers.0.mlp.experts.gate_up_proj".to_string(), entry(&[8, 6, 3])),
            ("model.layers.0.mlp.experts.down_proj".to_string(), entry(&[8, 3, 3])),
            ("model.layers.0.mlp.gate.weight".to_string(), entry(&[8, 3])),
        ];
        let s = moe_summary(&t);
        assert_eq!(s.layers[&0].layout, "fused");
        assert_eq!(s.experts_per_layer, Some(8));
        assert_eq!(s.bytes_per_expert, Some((6 * 3 + 3 * 3) * 4));
    }
}
