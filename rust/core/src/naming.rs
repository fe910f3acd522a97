//! Checkpoint tensor naming: the one place that knows how MoE families name
//! their experts, routers and shared experts (see shared/DESIGN.md).
//!
//! Recognised, under any prefix ending in `layers.L.` (`model.`, or
//! `language_model.model.` for multimodal wrappers):
//! - routed expert E, per-expert layout: `mlp.experts.E.*` (DeepSeek, Qwen-MoE,
//!   OLMoE) or `block_sparse_moe.experts.E.*` (Mixtral);
//! - fused routed experts: `mlp.experts.NAME` with no expert index, e.g.
//!   `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I]; expert e is slice e of dim 0;
//! - shared experts: `mlp.shared_experts.*` (DeepSeek), `mlp.shared_expert.*` and
//!   `mlp.shared_expert_gate.*` (Qwen2-MoE);
//! - router: `mlp.gate.*` (incl. DeepSeek-V3 `e_score_correction_bias`),
//!   `block_sparse_moe.gate.*`, `mlp.router.*` (gpt-oss).
//!
//! Legacy official ESFT adapters name tensors `layers.L...` without `model.`.
//!
//! Expert slices of fused tensors (in adapters): expert E's slice of
//! `P.experts.NAME` is named `P.experts.E.NAME`, the expert index inserted
//! where per-expert layouts put it (no `.weight` is added), so it classifies as
//! that routed expert.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// One routed expert's tensor in the per-expert layout.
    RoutedExpert { layer: u32, expert: u32 },
    /// A tensor holding all routed experts of a layer along dim 0.
    FusedExperts { layer: u32 },
    SharedExpert { layer: u32 },
    /// Qwen2-MoE's sigmoid gate on the shared expert.
    SharedExpertGate { layer: u32 },
    Router { layer: u32 },
    /// Anything else inside a decoder layer (attention, norms, dense MLP).
    LayerOther { layer: u32 },
    /// Outside the decoder layers (embeddings, final norm, lm_head).
    Global,
}

impl Role {
    pub fn layer(self) -> Option<u32> {
        match self {
            Role::RoutedExpert { layer, .. }
            | Role::FusedExperts { layer }
            | Role::SharedExpert { layer }
            | Role::SharedExpertGate { layer }
            | Role::Router { layer }
            | Role::LayerOther { layer } => Some(layer),
            Role::Global => None,
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            Role::RoutedExpert { .. } => "routed_expert",
            Role::FusedExperts { .. } => "fused_experts",
            Role::SharedExpert { .. } => "shared_expert",
            Role::SharedExpertGate { .. } => "shared_expert_gate",
            Role::Router { .. } => "router",
            Role::LayerOther { .. } => "layer_other",
            Role::Global => "global",
        }
    }

    pub fn is_moe(self) -> bool {
        !matches!(self, Role::LayerOther { .. } | Role::Global)
    }
}

const MOE_BLOCKS: [&str; 2] = ["mlp", "block_sparse_moe"];

/// Classifies a tensor name (legacy `layers.L` names included).
pub fn classify(name: &str) -> Role {
    let name = canonical(name);
    let Some((layer, rest)) = split_layer(&name) else {
        return Role::Global;
    };
    let Some((block, rest)) = rest.split_once('.') else {
        return Role::LayerOther { layer };
    };
    if !MOE_BLOCKS.contains(&block) {
        return Role::LayerOther { layer };
    }
    let (module, tail) = rest.split_once('.').unwrap_or((rest, ""));
    match module {
        "experts" => {
            let index = tail.split('.').next().unwrap_or("");
            match index.parse::<u32>() {
                Ok(expert) if tail.len() > index.len() => Role::RoutedExpert { layer, expert },
                _ if !tail.is_empty() => Role::FusedExperts { layer },
                _ => Role::LayerOther { layer },
            }
        }
        "shared_experts" | "shared_expert" => Role::SharedExpert { layer },
        "shared_expert_gate" => Role::SharedExpertGate { layer },
        "gate" | "router" => Role::Router { layer },
        _ => Role::LayerOther { layer },
    }
}

/// Maps legacy official-adapter names (`layers.L...`) to checkpoint names
/// (`model.layers.L...`); other names are returned unchanged.
pub fn canonical(name: &str) -> Cow<'_, str> {
    if name.starts_with("layers.") {
        Cow::Owned(format!("model.{name}"))
    } else {
        Cow::Borrowed(name)
    }
}

/// The name of expert `expert`'s slice of a fused tensor
/// (`...mlp.experts.gate_up_proj` -> `...mlp.experts.E.gate_up_proj`);
/// `None` if `fused` is not a fused-experts name.
pub fn fused_slice_name(fused: &str, expert: u32) -> Option<String> {
    if !matches!(classify(fused), Role::FusedExperts { .. }) {
        return None;
    }
    let at = experts_segment_end(fused)?;
    Some(format!("{}{expert}.{}", &fused[..at], &fused[at..]))
}

/// The fused tensor name and expert that a slice name stands for (the inverse
/// of `fused_slice_name`); `None` if `name` is not a routed-expert name.
pub fn fused_slice_parent(name: &str) -> Option<(String, u32)> {
    let Role::RoutedExpert { expert, .. } = classify(name) else {
        return None;
    };
    let at = experts_segment_end(name)?;
    let tail = name[at..].split_once('.')?.1;
    let parent = format!("{}{tail}", &name[..at]);
    matches!(classify(&parent), Role::FusedExperts { .. }).then_some((parent, expert))
}

/// Byte position just after `layers.L.BLOCK.experts.` in `name`.
fn experts_segment_end(name: &str) -> Option<usize> {
    let (_, rest) = split_layer(name)?;
    let (block, after) = rest.split_once('.')?;
    if !MOE_BLOCKS.contains(&block) || !after.starts_with("experts.") {
        return None;
    }
    Some(name.len() - after.len() + "experts.".len())
}

/// The checkpoint name of a transformers 5 in-memory module name where the two differ
/// (Mixtral's `mlp` is `block_sparse_moe` on disk); the name itself otherwise.
pub fn in_memory_alias(name: &str) -> String {
    name.replacen(".mlp.", ".block_sparse_moe.", 1)
}

/// The per-expert checkpoint weights that expert `e`'s part of the in-memory fused
/// parameter `P.experts.PARAM` (transformers 5, as PEFT names it) is stored as, in row
/// order: `gate_up_proj` is the gate rows then the up rows (`gate_proj`, `up_proj`, or
/// Mixtral's `w1`, `w3` under `block_sparse_moe`), `down_proj` is `down_proj` (`w2`).
/// Candidates, one list per family naming.
pub fn unfused_parts(experts: &str, e: u32, param: &str) -> Vec<Vec<String>> {
    let mixtral = in_memory_alias(experts);
    let names = |prefix: &str, projs: &[&str]| -> Vec<String> {
        projs.iter().map(|p| format!("{prefix}.{e}.{p}.weight")).collect()
    };
    match param {
        "gate_up_proj" => vec![names(experts, &["gate_proj", "up_proj"]), names(&mixtral, &["w1", "w3"])],
        "down_proj" => vec![names(experts, &["down_proj"]), names(&mixtral, &["w2"])],
        _ => Vec::new(),
    }
}

/// How a tensor splits into units that can be replaced one by one: a
/// fused-experts tensor into its E expert slices along dim 0 (when they are
/// whole bytes), anything else is one unit. Returns (units, bytes per unit).
pub fn expert_units(name: &str, shape: &[u64], nbytes: u64) -> (u32, u64) {
    if let (Role::FusedExperts { .. }, Some(&e)) = (classify(name), shape.first()) {
        if let Ok(e32) = u32::try_from(e) {
            if e > 0 && nbytes % e == 0 {
                return (e32, nbytes / e);
            }
        }
    }
    (1, nbytes)
}

/// The routed experts of one MoE layer, as a checkpoint's tensor names show them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LayerExperts {
    /// Expert ids of per-expert tensors (`experts.E.*`).
    pub per_expert: BTreeSet<u32>,
    /// Experts of fused tensors (`experts.NAME` [E, ...]): the largest dim 0 seen.
    pub fused: Option<u32>,
}

impl LayerExperts {
    pub fn has(&self, expert: u32) -> bool {
        self.per_expert.contains(&expert) || self.fused.is_some_and(|n| expert < n)
    }

    /// Number of routed experts: one more than the largest id.
    pub fn count(&self) -> u32 {
        let per_expert = self.per_expert.last().map_or(0, |&e| e.saturating_add(1));
        per_expert.max(self.fused.unwrap_or(0))
    }

    /// The expert ids present: per-expert ids and 0..E of fused tensors.
    pub fn ids(&self) -> BTreeSet<u32> {
        let mut ids = self.per_expert.clone();
        ids.extend(0..self.fused.unwrap_or(0));
        ids
    }

    /// "per-expert", "fused", "mixed", or "none".
    pub fn layout(&self) -> &'static str {
        match (self.per_expert.is_empty(), self.fused.is_some()) {
            (false, true) => "mixed",
            (true, true) => "fused",
            (false, false) => "per-expert",
            (true, false) => "none",
        }
    }
}

/// The MoE layout a checkpoint's tensor names (and fused tensors' dim 0) show:
/// layer -> its routed experts. The one place that infers it (inspect, split
/// and training's freezing all ask here).
pub fn moe_layout<'a>(tensors: impl IntoIterator<Item = (&'a str, &'a [u64])>) -> BTreeMap<u32, LayerExperts> {
    let mut out: BTreeMap<u32, LayerExperts> = BTreeMap::new();
    for (name, shape) in tensors {
        match classify(name) {
            Role::RoutedExpert { layer, expert } => {
                out.entry(layer).or_default().per_expert.insert(expert);
            }
            Role::FusedExperts { layer } => {
                let e = shape.first().map_or(0, |&e| u32::try_from(e).unwrap_or(u32::MAX));
                let fused = &mut out.entry(layer).or_default().fused;
                *fused = Some(fused.map_or(e, |f| f.max(e)));
            }
            _ => {}
        }
    }
    out
}

/// Maps a name saved relative to the model body (legacy official adapters
/// saved `model.model`'s state dict: `layers.L...`, `embed_tokens.weight`,
/// `norm.weight`) to its checkpoint name.
pub fn from_model_body(name: &str) -> String {
    if name.starts_with("model.") {
        name.to_string()
    } else {
        format!("model.{name}")
    }
}

/// Finds `layers.L.` (at the start or after a dot) and returns L and the rest.
fn split_layer(name: &str) -> Option<(u32, &str)> {
    let mut search = 0;
    while let Some(pos) = name[search..].find("layers.") {
        let at = search + pos;
        if at == 0 || name.as_bytes()[at - 1] == b'.' {
            let after = &name[at + "layers.".len()..];
            if let Some((num, rest)) = after.split_once('.') {
                if let Ok(layer) = num.parse::<u32>() {
                    return Some((layer, rest));
                }
            }
        }
        search = at + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families() {
        let c = classify;
        assert_eq!(c("model.layers.3.mlp.experts.12.gate_proj.weight"), Role::RoutedExpert { layer: 3, expert: 12 });
        assert_eq!(c("layers.3.mlp.experts.12.down_proj.weight"), Role::RoutedExpert { layer: 3, expert: 12 });
        assert_eq!(c("model.layers.0.block_sparse_moe.experts.7.w2.weight"), Role::RoutedExpert { layer: 0, expert: 7 });
        assert_eq!(c("model.layers.5.mlp.experts.gate_up_proj"), Role::FusedExperts { layer: 5 });
        assert_eq!(c("model.layers.5.mlp.experts.down_proj"), Role::FusedExperts { layer: 5 });
        assert_eq!(c("model.layers.2.mlp.shared_experts.up_proj.weight"), Role::SharedExpert { layer: 2 });
        assert_eq!(c("model.layers.2.mlp.shared_expert.up_proj.weight"), Role::SharedExpert { layer: 2 });
        assert_eq!(c("model.layers.2.mlp.shared_expert_gate.weight"), Role::SharedExpertGate { layer: 2 });
        assert_eq!(c("model.layers.2.mlp.gate.weight"), Role::Router { layer: 2 });
        assert_eq!(c("model.layers.2.mlp.gate.e_score_correction_bias"), Role::Router { layer: 2 });
        assert_eq!(c("model.layers.2.block_sparse_moe.gate.weight"), Role::Router { layer: 2 });
        assert_eq!(c("model.layers.0.mlp.gate_proj.weight"), Role::LayerOther { layer: 0 });
        assert_eq!(c("model.layers.0.self_attn.q_proj.weight"), Role::LayerOther { layer: 0 });
        assert_eq!(c("language_model.model.layers.4.mlp.experts.1.up_proj.weight"), Role::RoutedExpert { layer: 4, expert: 1 });
        assert_eq!(c("model.embed_tokens.weight"), Role::Global);
        assert_eq!(c("lm_head.weight"), Role::Global);
        assert_eq!(c("model.players.1.mlp.gate.weight"), Role::Global);
    }

    #[test]
    fn fused_slices() {
        let fused = "model.layers.5.mlp.experts.gate_up_proj";
        let slice = fused_slice_name(fused, 7).unwrap();
        assert_eq!(slice, "model.layers.5.mlp.experts.7.gate_up_proj");
        assert_eq!(classify(&slice), Role::RoutedExpert { layer: 5, expert: 7 });
        assert_eq!(fused_slice_parent(&slice), Some((fused.to_string(), 7)));
        assert_eq!(
            fused_slice_parent("model.layers.1.block_sparse_moe.experts.2.w1.weight"),
            Some(("model.layers.1.block_sparse_moe.experts.w1.weight".to_string(), 2))
        );
        assert_eq!(fused_slice_name("model.layers.5.mlp.experts.3.up_proj.weight", 1), None);
        assert_eq!(fused_slice_name("model.layers.5.mlp.gate.weight", 1), None);
        assert_eq!(fused_slice_parent("model.layers.5.mlp.gate.weight"), None);
        assert_eq!(fused_slice_parent("model.layers.5.mlp.experts.3"), None);
    }

    #[test]
    fn moe_layout_of_per_expert_fused_and_mixed_layers() {
        let names = [
            ("model.layers.0.mlp.gate_proj.weight", vec![4, 2]),
            ("model.layers.1.mlp.experts.0.up_proj.weight", vec![4, 2]),
            ("model.layers.1.mlp.experts.3.up_proj.weight", vec![4, 2]),
            ("model.layers.2.mlp.experts.gate_up_proj", vec![8, 4, 2]),
            ("model.layers.3.mlp.experts.gate_up_proj", vec![2, 4, 2]),
            ("model.layers.3.mlp.experts.5.down_proj", vec![2, 4]),
        ];
        let l = moe_layout(names.iter().map(|(n, s)| (*n, s.as_slice())));
        assert_eq!(l.keys().copied().collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!((l[&1].layout(), l[&1].count(), l[&1].has(2)), ("per-expert", 4, false));
        assert_eq!((l[&2].layout(), l[&2].count(), l[&2].has(7)), ("fused", 8, true));
        assert_eq!((l[&3].layout(), l[&3].count()), ("mixed", 6));
        assert_eq!(l[&3].ids().into_iter().collect::<Vec<_>>(), [0, 1, 5]);
    }
}
