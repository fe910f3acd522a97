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
//!   and `adapter_model.safetensors`, names prefixed `base_model.model.`. A pair on a
//!   fused expert parameter (`target_parameters`: `M.experts[.base_layer]`) is cut
//!   into one pair per expert (`unstack`), named `M.experts.E.PARAM`.
//!
//! A pair whose A or B is all zeros changes nothing and is dropped when the
//! adapter is opened (exports hold such pairs for the experts a task left
//! alone, as vLLM needs every expert of a layer): those bytes stay the base's.

use std::path::Path;

use serde_json::Value;

use crate::error::{read_input_text, Error, Result};
use crate::safetensors::dtype::decode_floats as decode;
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
    /// One expert's pair cut out of a PEFT pair on a fused 3-D parameter
    /// (`target_parameters`); `a`, `b` then name the stacked tensors it came from.
    pub owned: Option<Owned>,
}

/// A pair held in memory as f32: A [r, in] and B [out, r], row-major.
#[derive(Debug, Clone)]
pub struct Owned {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub r: usize,
}

/// What `adapter_config.json` says about scaling and fused expert parameters.
#[derive(Debug, Clone, Default)]
pub struct PeftConfig {
    pub r: u64,
    pub scale: f32,
    /// `target_parameters` on the experts modules (last name, e.g. `gate_up_proj`), in order.
    pub params: Vec<String>,
    /// (param, rank, scale) from `rank_pattern` / `alpha_pattern` keys `.*\.PARAM`.
    pub patterns: Vec<(String, u64, f32)>,
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

/// Scaling and fused expert parameters of a PEFT LoRA adapter, from
/// `adapter_config.json`; what merge cannot reproduce (DoRA, LoRA biases, rank or
/// alpha patterns other than `.*\.PARAM` of a fused parameter) is refused.
pub fn peft_config(config: &Path) -> Result<PeftConfig> {
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
    // Fused expert parameters (`gate_up_proj`); a 2-D one (`gate.weight`) is a plain pair.
    // PEFT nests one wrapper per parameter in the module's registration order, the first
    // innermost (`experts.base_layer`): transformers 5 registers `gate_up_proj` before
    // `down_proj` (vLLM reads the same), whatever order the config lists them in.
    let mut params: Vec<String> = v
        .get("target_parameters")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|p| p.rsplit('.').next().unwrap_or(p).to_string())
        .filter(|p| p != "weight" && p != "bias")
        .collect();
    params.sort_by_key(|p| match p.as_str() {
        "gate_up_proj" => 0,
        "down_proj" => 1,
        _ => 2,
    });
    for key in ["use_dora", "lora_bias"] {
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
    let mut patterns: Vec<(String, u64, f32)> = Vec::new();
    for key in ["rank_pattern", "alpha_pattern"] {
        let Some(map) = v.get(key).and_then(Value::as_object) else {
            continue;
        };
        for (pattern, value) in map {
            let param = pattern.trim_start_matches('^').trim_start_matches(".*\\.");
            let known = params.iter().any(|p| p == param);
            let number = value.as_f64().filter(|x| x.is_finite() && *x > 0.0);
            let (true, Some(x)) = (known, number) else {
                return Err(bad(format!(
                    "{key} key {pattern:?}: merge takes only patterns naming a fused expert \
                     parameter of target_parameters (\".*\\\\.NAME\")"
                )));
            };
            match patterns.iter_mut().find(|(p, _, _)| p == param) {
                Some(entry) if key == "rank_pattern" => entry.1 = x as u64,
                Some(entry) => entry.2 = x as f32,
                None if key == "rank_pattern" => patterns.push((param.into(), x as u64, f32::NAN)),
                None => patterns.push((param.into(), 0, x as f32)),
            }
        }
    }
    let rs = v
        .get("use_rslora")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let scale_of = |rank: f64, a: f64| (a / if rs { rank.sqrt() } else { rank }) as f32;
    // A pattern's missing half is the config's own r or lora_alpha.
    for (_, pr, pa) in &mut patterns {
        let rank = if *pr == 0 { r } else { *pr };
        let a = if pa.is_nan() { alpha } else { f64::from(*pa) };
        *pr = rank;
        *pa = scale_of(rank as f64, a);
    }
    Ok(PeftConfig {
        r,
        scale: scale_of(r as f64, alpha),
        params,
        patterns,
    })
}

/// Pairs the `.lora_A.weight` / `.lora_B.weight` tensors among `entries`
/// ((shard, index, checkpoint name) of each tensor of `ckpt`) by module, when
/// the adapter is a LoRA one (`scale`); the other tensors stay plain.
pub fn split(
    path: &Path,
    ckpt: &Checkpoint,
    config: Option<&PeftConfig>,
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
        match (half, config) {
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
        let Some(cfg) = config else { continue };
        let (experts, depth) = strip_base_layers(&module);
        if experts.ends_with(".experts") && depth < cfg.params.len() {
            let param = &cfg.params[cfg.params.len() - 1 - depth];
            pairs.extend(unstack(path, ckpt, cfg, (experts, param), (a, b))?);
            continue;
        }
        if is_zero(ckpt, b)? || is_zero(ckpt, a)? {
            continue;
        }
        pairs.push(LoraPair {
            module,
            a,
            b,
            scale: cfg.scale,
            owned: None,
        });
    }
    Ok(Split { pairs, plain })
}

/// `M.base_layer.base_layer` -> (`M`, 2): PEFT nests one wrapper per targeted
/// parameter of a module, the first listed innermost.
fn strip_base_layers(module: &str) -> (&str, usize) {
    let mut m = module;
    let mut depth = 0;
    while let Some(inner) = m.strip_suffix(".base_layer") {
        m = inner;
        depth += 1;
    }
    (m, depth)
}

/// One pair per expert out of PEFT's pair on the fused parameter `experts.param`
/// [E, out, in]: A [E*r, in] holds expert e's rows at e*r.., expert index slowest;
/// B [out, E*r] holds its columns at k*E + e, expert index fastest. All-zero ones are left out.
fn unstack(
    path: &Path,
    ckpt: &Checkpoint,
    cfg: &PeftConfig,
    (experts, param): (&str, &str),
    (a, b): ((usize, usize), (usize, usize)),
) -> Result<Vec<LoraPair>> {
    let (r, scale) = cfg
        .patterns
        .iter()
        .find(|(p, _, _)| p == param)
        .map_or((cfg.r, cfg.scale), |&(_, r, s)| (r, s));
    let values = |(si, ti): (usize, usize)| -> Result<(Vec<f32>, &TensorInfo)> {
        let f = &ckpt.shards[si].file;
        let t = &f.header.tensors[ti];
        let mut out = Vec::new();
        decode(&f.read_tensor(t)?, t.dtype, &mut out);
        Ok((out, t))
    };
    let ((av, ta), (bv, tb)) = (values(a)?, values(b)?);
    let (rows, cols, out_dim) = (ta.shape[0], ta.shape[1] as usize, tb.shape[0] as usize);
    if r == 0 || rows % r != 0 {
        return Err(Error::invalid(
            path,
            format!(
                "{:?} has {rows} rows, not a multiple of {param}'s rank {r} (experts x rank)",
                ta.name
            ),
        ));
    }
    let (n, r) = ((rows / r) as usize, r as usize);
    let mut pairs = Vec::new();
    for e in 0..n {
        let a_e = av[e * r * cols..(e + 1) * r * cols].to_vec();
        let b_e: Vec<f32> = (0..out_dim)
            .flat_map(|o| (0..r).map(move |k| (o, k)))
            .map(|(o, k)| bv[o * n * r + k * n + e])
            .collect();
        if a_e.iter().all(|&x| x == 0.0) || b_e.iter().all(|&x| x == 0.0) {
            continue;
        }
        pairs.push(LoraPair {
            module: format!("{experts}.{e}.{param}"),
            a,
            b,
            scale,
            owned: Some(Owned { a: a_e, b: b_e, r }),
        });
    }
    Ok(pairs)
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

/// Whether merge can add a LoRA change to a base tensor of this dtype.
pub fn mergeable(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16)
}

/// `w[o, i] += scale * sum_k b[o, k] * a[k, i]` for the rows of `w` (row-major,
/// `cols` wide), all in f32; `b` holds the same rows of B, `r` columns.
pub fn add_low_rank(w: &mut [f32], b: &[f32], a: &[f32], r: usize, cols: usize, scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { add_low_rank_avx2(w, b, a, r, cols, scale) };
    }
    add_low_rank_generic(w, b, a, r, cols, scale)
}

/// Twice the lanes of x86-64's baseline (SSE2). Rust never fuses a multiply and an add, so
/// every lane computes what the generic code does: the same bits on every CPU.
/// Safety: the CPU must support AVX2 (`unsafe` for Rust < 1.86).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn add_low_rank_avx2(
    w: &mut [f32],
    b: &[f32],
    a: &[f32],
    r: usize,
    cols: usize,
    scale: f32,
) {
    add_low_rank_generic(w, b, a, r, cols, scale)
}

/// Columns summed at once: their sums stay in registers (8 AVX2 or 16 SSE2 ones) while `k`
/// runs, where a row-wide accumulator went through memory once per `k`.
const BLOCK: usize = 64;

#[inline(always)]
fn add_low_rank_generic(w: &mut [f32], b: &[f32], a: &[f32], r: usize, cols: usize, scale: f32) {
    for (row, brow) in w.chunks_exact_mut(cols).zip(b.chunks_exact(r)) {
        for (c0, part) in (0..cols).step_by(BLOCK).zip(row.chunks_mut(BLOCK)) {
            match <&mut [f32; BLOCK]>::try_from(&mut *part) {
                // a width known when compiling: the sums stay in registers
                Ok(full) => add_columns(full, brow, a, c0, cols, scale),
                Err(_) => add_columns(part, brow, a, c0, cols, scale), // the row's last
            }
        }
    }
}

/// `part` (columns `c0..` of one row of W) += scale * brow · A[:, c0..], k ascending.
#[inline(always)]
fn add_columns(part: &mut [f32], brow: &[f32], a: &[f32], c0: usize, cols: usize, scale: f32) {
    let mut acc = [0f32; BLOCK];
    let acc = &mut acc[..part.len()];
    for (k, &bk) in brow.iter().enumerate() {
        let src = &a[k * cols + c0..][..acc.len()];
        acc.iter_mut().zip(src).for_each(|(s, &x)| *s += bk * x);
    }
    part.iter_mut().zip(&*acc).for_each(|(x, &d)| *x += scale * d);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safetensors::dtype::encode_floats as encode;

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
    fn low_rank_update_is_the_plain_sum_bit_for_bit() {
        // Widths around the column block, and the plain loop's order: k ascending, then
        // scaled and added. The dispatched path (AVX2 here when the CPU has it) and the
        // baseline give the same bits.
        let values = |n: usize, seed: usize| -> Vec<f32> {
            (0..n).map(|i| ((i * 7919 + seed) % 1009) as f32 / 10_090.0 - 0.05).collect()
        };
        for cols in [1, 63, 64, 65, 130, 200] {
            let (rows, r) = (3, 5);
            let w: Vec<f32> = values(rows * cols, 1).iter().map(|x| x * 10.0).collect();
            let a = values(r * cols, 2);
            let b = values(rows * r, 3);
            let mut want = w.clone();
            for o in 0..rows {
                for i in 0..cols {
                    let mut s = 0f32;
                    for k in 0..r {
                        s += b[o * r + k] * a[k * cols + i];
                    }
                    want[o * cols + i] += 0.5 * s;
                }
            }
            let (mut got, mut baseline) = (w.clone(), w);
            add_low_rank(&mut got, &b, &a, r, cols, 0.5);
            add_low_rank_generic(&mut baseline, &b, &a, r, cols, 0.5);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "cols {cols}");
            assert_eq!(bits(&baseline), bits(&want), "cols {cols}");
        }
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
        assert_eq!(peft_config(&cfg).unwrap().scale, 8.0);
        std::fs::write(&cfg, r#"{"r": 4, "lora_alpha": 16, "use_dora": true}"#).unwrap();
        assert!(peft_config(&cfg)
            .unwrap_err()
            .to_string()
            .contains("use_dora"));
    }
}
