//! Routing statistics: per-layer expert histograms counted from per-token
//! routing records (`count`), read from the official ESFT text logs
//! (`official_log`), and stored as one safetensors file (`stats_file`).
//!
//! Scores and selection are not here: they live in `esft_rs.routing.scoring`.

pub mod count;
pub mod official_log;
pub mod stats_file;

use crate::error::{Error, Result};

/// Most routed experts per layer (and experts per token) accepted: more is a typo,
/// and would size the histograms beyond any memory.
pub const MAX_EXPERTS: usize = 1 << 20;

/// Refuses an expert count or top-K that no model has, before anything is allocated.
pub fn check_sizes(num_experts: Option<usize>, top_k: usize) -> Result<()> {
    let bound = num_experts.unwrap_or(MAX_EXPERTS);
    if num_experts == Some(0) || bound > MAX_EXPERTS {
        return Err(Error::Value(format!(
            "num_experts must be between 1 and {MAX_EXPERTS}, got {bound}"
        )));
    }
    if top_k == 0 || top_k > bound {
        return Err(Error::Value(format!("top_k must be between 1 and {bound}, got {top_k}")));
    }
    Ok(())
}

/// Per-layer routing histograms of one or more forward passes.
///
/// Arrays are row-major `[layers, num_experts]`. The two `sample_*` sums hold,
/// per layer and expert, the sum over samples of that sample's own token score
/// (`count / (top_k * tokens)`) and gate score (`gate_sum / tokens`): divided
/// by `num_samples` they give the paper's per-sample-averaged scores.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RoutingStats {
    /// Decoder-layer index of each row.
    pub layers: Vec<u32>,
    pub num_experts: usize,
    pub top_k: usize,
    pub num_samples: u64,
    pub counts: Vec<i64>,
    pub gate_sum: Vec<f64>,
    pub tokens: Vec<i64>,
    pub sample_token_sum: Vec<f64>,
    pub sample_gate_sum: Vec<f64>,
    /// Free-form description (model, data, source); string to string.
    pub metadata: Vec<(String, String)>,
}

impl RoutingStats {
    /// All-zero statistics for the given layers.
    pub fn zeros(layers: Vec<u32>, num_experts: usize, top_k: usize) -> Self {
        let cells = layers.len() * num_experts;
        RoutingStats {
            tokens: vec![0; layers.len()],
            layers,
            num_experts,
            top_k,
            num_samples: 0,
            counts: vec![0; cells],
            gate_sum: vec![0.0; cells],
            sample_token_sum: vec![0.0; cells],
            sample_gate_sum: vec![0.0; cells],
            metadata: Vec::new(),
        }
    }

    /// Checks the invariants every producer guarantees: array sizes, sorted
    /// distinct layers, non-negative finite values, and `top_k` selections per
    /// token (`sum_e count[l][e] == top_k * tokens[l]`). `None` when valid.
    pub fn problem(&self) -> Option<String> {
        let (l, e) = (self.layers.len(), self.num_experts);
        if self.top_k == 0 {
            return Some("top_k is 0".into());
        }
        if self.layers.windows(2).any(|w| w[0] >= w[1]) {
            return Some(format!("layers {:?} are not strictly increasing", self.layers));
        }
        let sizes = [
            ("count", self.counts.len(), l * e),
            ("gate_sum", self.gate_sum.len(), l * e),
            ("tokens", self.tokens.len(), l),
            ("sample_token_sum", self.sample_token_sum.len(), l * e),
            ("sample_gate_sum", self.sample_gate_sum.len(), l * e),
        ];
        for (name, got, want) in sizes {
            if got != want {
                return Some(format!("{name} has {got} values, expected {want} ({l} layers x {e} experts)"));
            }
        }
        if let Some(i) = self.counts.iter().position(|&c| c < 0) {
            return Some(format!("count of layer {} expert {} is negative", self.layers[i / e], i % e));
        }
        for (name, v) in [
            ("gate_sum", &self.gate_sum),
            ("sample_token_sum", &self.sample_token_sum),
            ("sample_gate_sum", &self.sample_gate_sum),
        ] {
            if let Some(i) = v.iter().position(|x| !(x.is_finite() && *x >= 0.0)) {
                return Some(format!(
                    "{name} of layer {} expert {} is {} (must be finite and >= 0)",
                    self.layers[i / e],
                    i % e,
                    v[i]
                ));
            }
        }
        for (row, (&layer, &tokens)) in self.layers.iter().zip(&self.tokens).enumerate() {
            let selected: i64 = self.counts[row * e..(row + 1) * e].iter().sum();
            if tokens < 0 || selected != tokens.saturating_mul(self.top_k as i64) {
                return Some(format!(
                    "layer {layer}: {selected} expert selections for {tokens} tokens at top-{}",
                    self.top_k
                ));
            }
        }
        None
    }
}
