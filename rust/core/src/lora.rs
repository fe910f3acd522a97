//! Low-rank adapters in merge: ESFT-LoRA files and PEFT adapter directories.
//!
//! A LoRA pair `M.lora_A.weight` [r, in] and `M.lora_B.weight` [out, r] stands for
//! the change `scale * B @ A` of the base weight `M.weight` (or of expert E's
//! slice of a fused tensor, `P.experts.E.NAME`, see `naming::fused_slice_parent`)
//! of shape [out, in]. Merge writes `W + scale * B @ A`, summed in f32 and rounded
//! once to the base dtype (round to nearest even), as torch's
//! `(W.float() + s * (B.float() @ A.float())).to(W.dtype)` does; the only
//! difference is the order of the f32 sums inside the matmul.
//!
//! - ESFT-LoRA (one safetensors file): `__metadata__` key `esft.lora` =
//!   `{"rank": r, "alpha": a, ...}`, scale `a / r`, names as in the checkpoint.
//! - PEFT (a directory): `adapter_config.json` (`r`, `lora_alpha`, `use_rslora`)
//!   and `adapter_model.safetensors`, names prefixed `base_model.model.`.
//!
//! A pair whose A or B is all zeros changes nothing and is dropped when the
//! adapter is opened (exports hold such pairs for the experts a task left
//! alone, as vLLM needs every expert of a layer): those bytes stay the base's.

use std::path::Path;

use half::{bf16, f16};
use serde_json::Value;

use crate::error::{read_input_text, Error, Result};
use crate::safetensors::{Checkpoint, Dtype, TensorInfo};

pub const KEY_LORA: &str = "esft.lora";
pub const PEFT_CONFIG: &str = "adapter_config.json";
pub const PEFT_WEIGHTS: &str = "adapter_model.safetensors";
pub const PEFT_PREFIX: &str = "base_model.model.";
pub const SUFFIX_A: &str = ".lora_A.weight";
pub const SUFFIX_B: &str = ".lora_B.weight";

/// One LoRA pair of an adapter.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// The module, in checkpoint naming: the base weight is `module.weight`, or
    /// `module` itself (a fused tensor's expert slice, or a tensor without `.weight`).
    pub module: String,
    /// (shard, index) of A and B in the adapter's checkpoint.
    pub a: (usize, usize),
    pub b: (usize, usize),
    pub scale: f32,
}

/// Where each LoRA pair stands, and which tensors are plain replacements.
pub struct Split {
    pub pairs: Vec<LoraPair>,
    /// (shard, index, checkpoint name) of the other tensors.
    pub plain: Vec<(usize, usize, String)>,
}

/// The scale of an ESFT-LoRA adapter, from its `esft.lora` metadata.
pub fn esft_scale(path: &Path, text: &str) -> Result<f32> {
    let bad = |why: &str| Error::invalid(path, format!("{KEY_LORA} in __metadata__: {why}"));
    let v: Value = serde_json::from_str(text).map_err(|e| bad(&format!("not JSON ({e})")))?;
    let rank = v.get("rank").and_then(Value::as_u64).filter(|&r| r > 0);
    let alpha = v
        .get("alpha")
        .and_then(Value::as_f64)
        .filter(|a| a.is_finite());
    match (rank, alpha) {
        (Some(r), Some(a)) => Ok((a / r as f64) as f32),
        _ => Err(bad(
            "needs \"rank\" (a positive integer) and \"alpha\" (a number)",
        )),
    }
}

/// The scale of a PEFT LoRA adapter, from `adapter_config.json`; what merge
/// cannot reproduce (DoRA, per-module ranks, fused 3-D experts) is refused.
pub fn peft_scale(config: &Path) -> Result<f32> {
    let text = read_input_text(config)?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::invalid(config, format!("not JSON: {e}")))?;
    let bad = |why: String| Error::invalid(config, why);
    if let Some(t) = v
        .get("peft_type")
        .and_then(Value::as_str)
        .filter(|t| *t != "LORA")
    {
        return Err(bad(format!(
            "peft_type is {t:?}; merge takes LoRA adapters only"
        )));
    }
    let set = |key: &str| match v.get(key) {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Object(m)) => !m.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(_) => true,
    };
    if set("target_parameters") {
        return Err(bad(
            "target_parameters is set: LoRA on fused 3-D expert parameters (what PEFT writes \
             for the experts of transformers 5 MoE models), which merge does not map onto a \
             checkpoint yet"
                .into(),
        ));
    }
    for key in ["use_dora", "rank_pattern", "alpha_pattern", "lora_bias"] {
        if set(key) {
            return Err(bad(format!(
                "{key} is set; merge takes plain LoRA on linear weights only"
            )));
        }
    }
    let r = v.get("r").and_then(Value::as_u64).filter(|&r| r > 0);
    let alpha = v
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .filter(|a| a.is_finite());
    let (Some(r), Some(alpha)) = (r, alpha) else {
        return Err(bad(
            "needs \"r\" (a positive integer) and \"lora_alpha\" (a number)".into(),
        ));
    };
    let rs = v
        .get("use_rslora")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let denom = if rs { (r as f64).sqrt() } else { r as f64 };
    Ok((alpha / denom) as f32)
}

/// Pairs the `.lora_A.weight` / `.lora_B.weight` tensors among `entries`
/// ((shard, index, checkpoint name) of each tensor of `ckpt`) by module, when
/// the adapter is a LoRA one (`scale`); the other tensors stay plain.
pub fn split(
    path: &Path,
    ckpt: &Checkpoint,
    scale: Option<f32>,
    entries: Vec<(usize, usize, String)>,
) -> Result<Split> {
    let mut pairs: Vec<LoraPair> = Vec::new();
    let mut plain = Vec::new();
    let mut halves: std::collections::BTreeMap<String, [Option<(usize, usize)>; 2]> =
        Default::default();
    for (si, ti, name) in entries {
        let half = [SUFFIX_A, SUFFIX_B]
            .iter()
            .position(|suf| name.ends_with(suf));
        match (half, scale) {
            (Some(h), Some(_)) => {
                let module = name[..name.len() - SUFFIX_A.len()].to_string();
                halves.entry(module).or_default()[h] = Some((si, ti));
            }
            _ => plain.push((si, ti, name)),
        }
    }
    let tensor = |(si, ti): (usize, usize)| &ckpt.shards[si].file.header.tensors[ti];
    for (module, [a, b]) in halves {
        let (Some(a), Some(b)) = (a, b) else {
            let (has, lacks) = if a.is_some() {
                (SUFFIX_A, SUFFIX_B)
            } else {
                (SUFFIX_B, SUFFIX_A)
            };
            return Err(Error::invalid(
                path,
                format!("holds {module}{has} without {module}{lacks}"),
            ));
        };
        let (ta, tb) = (tensor(a), tensor(b));
        let float = |t: &TensorInfo| matches!(t.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16);
        if !float(ta)
            || !float(tb)
            || ta.shape.len() != 2
            || tb.shape.len() != 2
            || ta.shape[0] != tb.shape[1]
        {
            return Err(Error::invalid(
                path,
                format!(
                    "LoRA pair of {module}: A is {} {:?} and B is {} {:?}; want F32/BF16/F16 A [r, in] and B [out, r]",
                    ta.dtype, ta.shape, tb.dtype, tb.shape
                ),
            ));
        }
        if is_zero(ckpt, b)? || is_zero(ckpt, a)? {
            continue;
        }
        pairs.push(LoraPair {
            module,
            a,
            b,
            scale: scale.unwrap_or(1.0),
        });
    }
    Ok(Split { pairs, plain })
}

/// Whether a (float) tensor of `ckpt` holds only zeros (of either sign).
fn is_zero(ckpt: &Checkpoint, (si, ti): (usize, usize)) -> Result<bool> {
    let f = &ckpt.shards[si].file;
    let t = &f.header.tensors[ti];
    let bytes = f.read_tensor(t)?;
    let mut values = Vec::new();
    decode(&bytes, t.dtype, &mut values);
    Ok(values.iter().all(|&x| x == 0.0))
}

/// Little-endian F32/BF16/F16 bytes as f32 (exact).
pub fn decode(src: &[u8], dtype: Dtype, out: &mut Vec<f32>) {
    out.clear();
    match dtype {
        Dtype::BF16 => out.extend(
            src.chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        Dtype::F16 => out.extend(
            src.chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        _ => out.extend(
            src.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
    }
}

/// f32 values rounded (to nearest even) to `dtype`'s little-endian bytes.
pub fn encode(src: &[f32], dtype: Dtype, out: &mut Vec<u8>) {
    out.clear();
    match dtype {
        Dtype::BF16 => src
            .iter()
            .for_each(|&x| out.extend(bf16::from_f32(x).to_le_bytes())),
        Dtype::F16 => src
            .iter()
            .for_each(|&x| out.extend(f16::from_f32(x).to_le_bytes())),
        _ => src.iter().for_each(|&x| out.extend(x.to_le_bytes())),
    }
}

/// Whether merge can add a LoRA change to a base tensor of this dtype.
pub fn mergeable(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16)
}

/// `w[o, i] += scale * sum_k b[o, k] * a[k, i]` for the rows of `w` (row-major,
/// `cols` wide), all in f32; `b` holds the same rows of B, `r` columns.
pub fn add_low_rank(w: &mut [f32], b: &[f32], a: &[f32], r: usize, cols: usize, scale: f32) {
    let mut acc = vec![0f32; cols];
    for (row, brow) in w.chunks_exact_mut(cols).zip(b.chunks_exact(r)) {
        acc.fill(0.0);
        for (k, &bk) in brow.iter().enumerate() {
            let arow = &a[k * cols..(k + 1) * cols];
            acc.iter_mut().zip(arow).for_each(|(s, &x)| *s += bk * x);
        }
        row.iter_mut().zip(&acc).for_each(|(x, &d)| *x += scale * d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_rank_update_rounds_once() {
        // bf16's unit at 1.0 is 2^-7: 1 + 0.75 unit rounds up, 1 + 0.5 unit is a
        // tie that goes to the even neighbour, 1.0.
        let mut w = vec![1.0f32, 1.0];
        let a = [1.0f32, 1.0];
        let b = [1.5f32 / 256.0, 1.0 / 256.0];
        add_low_rank(&mut w, &b, &a, 1, 1, 1.0);
        let mut bytes = Vec::new();
        encode(&w, Dtype::BF16, &mut bytes);
        let mut back = Vec::new();
        decode(&bytes, Dtype::BF16, &mut back);
        assert_eq!(back, [1.0 + 1.0 / 128.0, 1.0]);
    }

    #[test]
    fn scale_from_metadata_and_config() {
        let p = Path::new("x");
        assert_eq!(
            esft_scale(p, r#"{"rank": 4, "alpha": 8, "targets": []}"#).unwrap(),
            2.0
        );
        assert!(esft_scale(p, r#"{"rank": 0, "alpha": 8}"#).is_err());
        let d = tempfile::tempdir().unwrap();
        let cfg = d.path().join(PEFT_CONFIG);
        std::fs::write(
            &cfg,
            r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 16, "use_rslora": true}"#,
        )
        .unwrap();
        assert_eq!(peft_scale(&cfg).unwrap(), 8.0);
        std::fs::write(&cfg, r#"{"r": 4, "lora_alpha": 16, "use_dora": true}"#).unwrap();
        assert!(peft_scale(&cfg)
            .unwrap_err()
            .to_string()
            .contains("use_dora"));
    }
}
