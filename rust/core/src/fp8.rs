//! Block-FP8 checkpoints (DeepSeek-V3): F8_E4M3 weights `X.weight` [out, in]
//! with F32 companions `X.weight_scale_inv` [ceil(out/B0), ceil(in/B1)]; a
//! weight's real value is its fp8 value times the scale_inv of its B0 x B1
//! block. The block size comes from the model's `config.json`
//! (`quantization_config.weight_block_size`), 128 x 128 when absent.
//!
//! Requantising (a BF16/F16/F32 tensor into such a slot), per block:
//! `scale_inv = amax / 448` (448 is the largest finite E4M3 value), and
//! `fp8 = e4m3(x / scale_inv)` rounded to nearest, ties to even, saturating at
//! ±448; the arithmetic is f32, as `(x.float() / scale).to(torch.float8_e4m3fn)`
//! does, so results are bit-identical to torch. An all-zero block gets
//! scale_inv 1 (its fp8 values are zeros whatever the scale; DeepGEMM's
//! `per_block_cast_to_fp8` clamps amax to 1e-4 instead, which only changes
//! the unused scale). Non-finite inputs are refused: they have no block scale.

use std::path::Path;

use float8::F8E4M3;
use serde::Serialize;

use crate::error::{read_input_text, Error, Result};
use crate::safetensors::dtype::decode_floats as decode;
use crate::safetensors::Dtype;

/// The largest finite F8_E4M3 (fn variant, as torch.float8_e4m3fn) value.
pub const E4M3_MAX: f32 = 448.0;
pub const DEFAULT_BLOCK: [u64; 2] = [128, 128];
const SCALE_SUFFIX: &str = "_scale_inv";

/// The block size of a checkpoint and where it was read.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BlockSize {
    pub block: [u64; 2],
    /// `config.json` or `default`.
    pub from: &'static str,
}

impl BlockSize {
    pub fn label(&self) -> String {
        format!("{}x{}", self.block[0], self.block[1])
    }

    /// Shape of the scale tensor of a 2-D weight of shape `shape`.
    pub fn scale_shape(&self, shape: &[u64]) -> Option<Vec<u64>> {
        match shape {
            [rows, cols] => Some(vec![
                rows.div_ceil(self.block[0]),
                cols.div_ceil(self.block[1]),
            ]),
            _ => None,
        }
    }
}

/// The companion scale tensor's name: `X.weight` -> `X.weight_scale_inv`.
pub fn scale_name(weight: &str) -> Option<String> {
    weight
        .ends_with(".weight")
        .then(|| format!("{weight}{SCALE_SUFFIX}"))
}

/// The weight a scale tensor belongs to: `X.weight_scale_inv` -> `X.weight`.
pub fn weight_of_scale(scale: &str) -> Option<&str> {
    scale
        .strip_suffix(SCALE_SUFFIX)
        .filter(|w| w.ends_with(".weight"))
}

/// The block size of the checkpoint at `path`: from `config.json` beside its
/// shards when it is a directory that has one, else the default.
pub fn block_size(path: &Path) -> Result<BlockSize> {
    let config = if path.is_dir() {
        Some(path.join("config.json"))
    } else {
        None
    };
    match config.filter(|c| crate::error::present(c)) {
        Some(c) => block_size_from_config(&c),
        None => Ok(BlockSize {
            block: DEFAULT_BLOCK,
            from: "default",
        }),
    }
}

fn block_size_from_config(path: &Path) -> Result<BlockSize> {
    let text = read_input_text(path)?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::invalid(path, format!("not valid JSON: {e}")))?;
    let Some(bs) = v
        .get("quantization_config")
        .and_then(|q| q.get("weight_block_size"))
    else {
        return Ok(BlockSize {
            block: DEFAULT_BLOCK,
            from: "default",
        });
    };
    let dims: Option<Vec<u64>> = bs
        .as_array()
        .map(|a| {
            a.iter()
                .map(serde_json::Value::as_u64)
                .collect::<Option<_>>()
        })
        .and_then(|d| d);
    match dims.as_deref() {
        Some(&[r, c]) if r > 0 && c > 0 => Ok(BlockSize {
            block: [r, c],
            from: "config.json",
        }),
        _ => Err(Error::invalid(
            path,
            format!(
                "quantization_config.weight_block_size must be two positive integers, not {bs}"
            ),
        )),
    }
}

/// F32 -> F8_E4M3 bits: round to nearest even, saturating at ±448, NaN kept.
/// The `float8` crate ports CUDA's `__nv_cvt_double_to_fp8` (f32 -> f64 is
/// exact, so one rounding); it agrees with torch.float8_e4m3fn bit for bit
/// below 464 in magnitude, where torch stops saturating and gives NaN.
pub fn to_e4m3(x: f32) -> u8 {
    F8E4M3::from_f32(x).to_bits()
}

/// Whether a dtype can be quantised into an F8_E4M3 slot.
pub fn quantizable(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::BF16 | Dtype::F16 | Dtype::F32)
}

/// Reusable buffers of one block-row quantisation.
#[derive(Default)]
pub struct Scratch {
    values: Vec<f32>,
    pub fp8: Vec<u8>,
    pub scales: Vec<u8>,
}

/// Quantises one block row: `src` holds `rows` (at most one block's worth)
/// rows of `cols` values of `dtype`. Fills `scratch.fp8` (rows x cols E4M3
/// bytes) and `scratch.scales` (ceil(cols / block_cols) F32 LE scale_inv).
/// Err(index) of the first non-finite value.
pub fn quantize_block_row(
    src: &[u8],
    dtype: Dtype,
    cols: usize,
    block_cols: usize,
    scratch: &mut Scratch,
) -> std::result::Result<(), usize> {
    decode(src, dtype, &mut scratch.values);
    let values = &scratch.values;
    if let Some(i) = values.iter().position(|x| !x.is_finite()) {
        return Err(i);
    }
    let n_blocks = cols.div_ceil(block_cols);
    let mut amax = vec![0f32; n_blocks];
    for row in values.chunks_exact(cols) {
        for (b, chunk) in row.chunks(block_cols).enumerate() {
            amax[b] = chunk.iter().fold(amax[b], |m, x| m.max(x.abs()));
        }
    }
    let scale: Vec<f32> = amax
        .iter()
        .map(|&a| if a > 0.0 { a / E4M3_MAX } else { 1.0 })
        .collect();
    scratch.fp8.clear();
    for row in values.chunks_exact(cols) {
        for (b, chunk) in row.chunks(block_cols).enumerate() {
            scratch
                .fp8
                .extend(chunk.iter().map(|&x| to_e4m3(x / scale[b])));
        }
    }
    scratch.scales.clear();
    scratch
        .scales
        .extend(scale.iter().flat_map(|s| s.to_le_bytes()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn e4m3_edge_values() {
        // Zeros keep their sign.
        assert_eq!(to_e4m3(0.0), 0x00);
        assert_eq!(to_e4m3(-0.0), 0x80);
        // Largest finite, and saturation beyond it (also of the 448/480 midpoint).
        assert_eq!(to_e4m3(448.0), 0x7E);
        assert_eq!(to_e4m3(-448.0), 0xFE);
        assert_eq!(to_e4m3(464.0), 0x7E);
        assert_eq!(to_e4m3(1e6), 0x7E);
        assert_eq!(to_e4m3(f32::INFINITY), 0x7E);
        // NaN is 0x7F (S.1111.111), sign kept.
        assert_eq!(to_e4m3(f32::NAN), 0x7F);
        assert_eq!(to_e4m3(-f32::NAN) & 0x7F, 0x7F);
        // Smallest normal 2^-6, subnormals k * 2^-9.
        assert_eq!(to_e4m3(2f32.powi(-6)), 0x08);
        assert_eq!(to_e4m3(2f32.powi(-9)), 0x01);
        assert_eq!(to_e4m3(7.0 * 2f32.powi(-9)), 0x07);
        assert_eq!(to_e4m3(-3.0 * 2f32.powi(-9)), 0x83);
        // Underflow: half the smallest subnormal ties to 0 (even), above it to 1.
        assert_eq!(to_e4m3(2f32.powi(-10)), 0x00);
        assert_eq!(to_e4m3(2f32.powi(-10) * 1.0001), 0x01);
        assert_eq!(to_e4m3(1e-30), 0x00);
        // Ties to even: 1.0625 between 1.0 (0x38) and 1.125 (0x39) -> 0x38;
        // 1.1875 between 1.125 (0x39) and 1.25 (0x3A) -> 0x3A.
        assert_eq!(to_e4m3(1.0625), 0x38);
        assert_eq!(to_e4m3(1.1875), 0x3A);
        assert_eq!(to_e4m3(1.0626), 0x39);
        // Subnormal tie: 1.5 * 2^-9 between 0x01 and 0x02 -> 0x02; 2.5 * 2^-9 -> 0x02.
        assert_eq!(to_e4m3(1.5 * 2f32.powi(-9)), 0x02);
        assert_eq!(to_e4m3(2.5 * 2f32.powi(-9)), 0x02);
        // A tie at the top rounds to 448's even mantissa: 432 is between 416 and 448.
        assert_eq!(to_e4m3(432.0), 0x7E);
    }

    #[test]
    fn block_row_scales_and_values() {
        // 2 rows x 3 cols, blocks of 2 columns: blocks {0,1} and {2}.
        let vals: [f32; 6] = [1.0, -4.0, 0.0, 2.0, 0.5, 0.0];
        let src: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut s = Scratch::default();
        quantize_block_row(&src, Dtype::F32, 3, 2, &mut s).unwrap();
        let scales: Vec<f32> = s
            .scales
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(scales, [4.0 / 448.0, 1.0]);
        let expect: Vec<u8> = [1.0f32, -4.0, 0.0, 2.0, 0.5, 0.0]
            .iter()
            .enumerate()
            .map(|(i, &x)| to_e4m3(x / scales[usize::from(i % 3 == 2)]))
            .collect();
        assert_eq!(s.fp8, expect);
        assert_eq!(s.fp8[1], 0xFE, "the block's amax maps to -448");
        let bad: Vec<u8> = [1.0f32, f32::NAN]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(quantize_block_row(&bad, Dtype::F32, 2, 2, &mut s), Err(1));
    }

    #[test]
    fn names_and_block_size() {
        let w = "model.layers.3.mlp.experts.7.up_proj.weight";
        let s = scale_name(w).unwrap();
        assert_eq!(s, "model.layers.3.mlp.experts.7.up_proj.weight_scale_inv");
        assert_eq!(weight_of_scale(&s), Some(w));
        assert_eq!(scale_name("model.norm.bias"), None);
        let d = tempfile::tempdir().unwrap();
        assert_eq!(block_size(d.path()).unwrap().from, "default");
        let cfg = d.path().join("config.json");
        fs::write(
            &cfg,
            r#"{"quantization_config": {"weight_block_size": [64, 32]}}"#,
        )
        .unwrap();
        let bs = block_size(d.path()).unwrap();
        assert_eq!((bs.block, bs.from), ([64, 32], "config.json"));
        assert_eq!(bs.scale_shape(&[65, 32]), Some(vec![2, 1]));
        fs::write(
            &cfg,
            r#"{"quantization_config": {"weight_block_size": [0]}}"#,
        )
        .unwrap();
        let err = block_size(d.path()).unwrap_err().to_string();
        assert!(err.contains("weight_block_size"), "{err}");
    }
}
