//! The dtypes of the safetensors reference, with their sizes in bits.

use std::fmt;
use std::str::FromStr;

use half::{bf16, f16};

/// In the order of the reference's `Dtype` enum, which `Ord` follows: the
/// reference lays tensors out by dtype, widest first (`stream::layout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[allow(non_camel_case_types)]
pub enum Dtype {
    BOOL,
    F4,
    F6_E2M3,
    F6_E3M2,
    U8,
    I8,
    F8_E5M2,
    F8_E4M3,
    F8_E8M0,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    C64,
    F64,
    I64,
    U64,
}

const ALL: [(Dtype, &str, u64); 20] = [
    (Dtype::BOOL, "BOOL", 8),
    (Dtype::F4, "F4", 4),
    (Dtype::F6_E2M3, "F6_E2M3", 6),
    (Dtype::F6_E3M2, "F6_E3M2", 6),
    (Dtype::U8, "U8", 8),
    (Dtype::I8, "I8", 8),
    (Dtype::F8_E5M2, "F8_E5M2", 8),
    (Dtype::F8_E4M3, "F8_E4M3", 8),
    (Dtype::F8_E8M0, "F8_E8M0", 8),
    (Dtype::I16, "I16", 16),
    (Dtype::U16, "U16", 16),
    (Dtype::F16, "F16", 16),
    (Dtype::BF16, "BF16", 16),
    (Dtype::I32, "I32", 32),
    (Dtype::U32, "U32", 32),
    (Dtype::F32, "F32", 32),
    (Dtype::C64, "C64", 64),
    (Dtype::F64, "F64", 64),
    (Dtype::I64, "I64", 64),
    (Dtype::U64, "U64", 64),
];

impl Dtype {
    fn entry(self) -> (Dtype, &'static str, u64) {
        // ALL lists every variant, so the search always finds it.
        ALL.iter().copied().find(|(d, _, _)| *d == self).unwrap_or((self, "?", 8))
    }

    pub fn name(self) -> &'static str {
        self.entry().1
    }

    /// Size of one element in bits (sub-byte dtypes pack several per byte).
    pub fn bits(self) -> u64 {
        self.entry().2
    }

    /// Every dtype with its name and size in bits.
    pub fn all() -> impl Iterator<Item = (Dtype, &'static str, u64)> {
        ALL.into_iter()
    }
}

impl FromStr for Dtype {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        ALL.iter().find(|(_, n, _)| *n == s).map(|(d, _, _)| *d).ok_or(())
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Little-endian F32/BF16/F16 bytes as f32 (exact); other dtypes are read as F32. The one
/// float codec of the core: merge's low-rank and FP8 passes both use it.
pub fn decode_floats(src: &[u8], dtype: Dtype, out: &mut Vec<f32>) {
    fn each<const N: usize>(src: &[u8], out: &mut Vec<f32>, f: impl Fn([u8; N]) -> f32) {
        out.clear();
        out.resize(src.len() / N, 0.0);
        out.iter_mut().zip(src.chunks_exact(N)).for_each(|(d, b)| {
            let mut bytes = [0; N];
            bytes.copy_from_slice(b);
            *d = f(bytes);
        });
    }
    match dtype {
        Dtype::BF16 => each(src, out, |b| bf16::from_le_bytes(b).to_f32()),
        Dtype::F16 => each(src, out, |b| f16::from_le_bytes(b).to_f32()),
        _ => each(src, out, f32::from_le_bytes),
    }
}

/// f32 values rounded (to nearest even) to `dtype`'s little-endian bytes. Both codecs write
/// into a buffer sized once: an `extend` per value kept the loops from vectorising (a quarter
/// of a LoRA merge's CPU, `benches/bench_lora_merge.py`).
pub fn encode_floats(src: &[f32], dtype: Dtype, out: &mut Vec<u8>) {
    fn each<const N: usize>(src: &[f32], out: &mut Vec<u8>, f: impl Fn(f32) -> [u8; N]) {
        out.clear();
        out.resize(src.len() * N, 0);
        out.chunks_exact_mut(N)
            .zip(src)
            .for_each(|(d, &x)| d.copy_from_slice(&f(x)));
    }
    match dtype {
        Dtype::BF16 => each(src, out, |x| bf16::from_f32(x).to_le_bytes()),
        Dtype::F16 => each(src, out, |x| f16::from_f32(x).to_le_bytes()),
        _ => each(src, out, f32::to_le_bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for (d, n, _) in ALL {
            assert_eq!(n.parse::<Dtype>(), Ok(d));
            assert_eq!(d.name(), n);
        }
        assert!("F128".parse::<Dtype>().is_err());
        // ALL is in declaration order, the reference's order
        assert!(ALL.windows(2).all(|w| w[0].0 < w[1].0));
    }
}
