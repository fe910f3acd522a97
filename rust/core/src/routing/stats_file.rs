//! Routing statistics as one safetensors file:
//! `count` [L, E] I64, `gate_sum` [L, E] F64, `tokens` `[L]` I64,
//! `sample_token_sum` and `sample_gate_sum` [L, E] F64 (per-sample averages,
//! summed over samples), and `__metadata__` with `format`, `layers` (JSON
//! list of decoder-layer indices), `top_k`, `num_samples` and free-form keys
//! (model, data, ...). Written atomically (temporary file, then rename).

use std::io::Write;
use std::path::Path;

use serde_json::{json, Map, Value};

use super::RoutingStats;
use crate::error::{Error, Result};
use crate::safetensors::{Dtype, SafetensorsFile};
use crate::staging::Staged;

/// The `format` metadata value that marks a routing-stats file.
pub const FORMAT: &str = "esft-rs.routing-stats/1";
const RESERVED: [&str; 4] = ["format", "layers", "top_k", "num_samples"];

/// Tensor names in file order.
const COUNT: &str = "count";
const GATE_SUM: &str = "gate_sum";
const TOKENS: &str = "tokens";
const SAMPLE_TOKEN_SUM: &str = "sample_token_sum";
const SAMPLE_GATE_SUM: &str = "sample_gate_sum";

pub fn save(stats: &RoutingStats, path: &Path) -> Result<()> {
    if let Some(problem) = stats.problem() {
        return Err(Error::Value(format!("cannot save routing stats: {problem}")));
    }
    if let Some((k, _)) = stats.metadata.iter().find(|(k, _)| RESERVED.contains(&k.as_str())) {
        return Err(Error::Value(format!("metadata key {k:?} is reserved")));
    }
    let (l, e) = (stats.layers.len() as u64, stats.num_experts as u64);
    let mut data = Vec::new();
    let mut header = Map::new();
    let mut meta = Map::new();
    meta.insert("format".into(), FORMAT.into());
    meta.insert("layers".into(), json!(stats.layers).to_string().into());
    meta.insert("top_k".into(), stats.top_k.to_string().into());
    meta.insert("num_samples".into(), stats.num_samples.to_string().into());
    for (k, v) in &stats.metadata {
        meta.insert(k.clone(), v.clone().into());
    }
    header.insert("__metadata__".into(), Value::Object(meta));
    let mut put = |name: &str, dtype: Dtype, shape: Vec<u64>, bytes: Vec<u8>| {
        let start = data.len();
        data.extend_from_slice(&bytes);
        header.insert(
            name.into(),
            json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [start, data.len()]}),
        );
    };
    put(COUNT, Dtype::I64, vec![l, e], le_bytes(&stats.counts, |v| v.to_le_bytes()));
    put(GATE_SUM, Dtype::F64, vec![l, e], le_bytes(&stats.gate_sum, |v| v.to_le_bytes()));
    put(TOKENS, Dtype::I64, vec![l], le_bytes(&stats.tokens, |v| v.to_le_bytes()));
    put(SAMPLE_TOKEN_SUM, Dtype::F64, vec![l, e], le_bytes(&stats.sample_token_sum, |v| v.to_le_bytes()));
    put(SAMPLE_GATE_SUM, Dtype::F64, vec![l, e], le_bytes(&stats.sample_gate_sum, |v| v.to_le_bytes()));

    let mut json = Value::Object(header).to_string().into_bytes();
    // Pad to 8 bytes, as the reference writer does, so data stays aligned.
    json.resize(json.len().div_ceil(8) * 8, b' ');
    // Replaces an earlier output (esft-rs files only), as `profile -o` always has.
    let staged = Staged::new(path, false)?;
    let tmp = staged.path();
    let written = (|| {
        let mut f = std::fs::File::create(tmp)?;
        f.write_all(&(json.len() as u64).to_le_bytes())?;
        f.write_all(&json)?;
        f.write_all(&data)?;
        f.sync_all()
    })();
    written.map_err(|e| Error::io(path, e))?;
    staged.commit(true, &[])
}

fn le_bytes<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    v.iter().flat_map(|&x| f(x)).collect()
}

pub fn load(path: &Path) -> Result<RoutingStats> {
    let file = SafetensorsFile::open(path)?;
    let meta = |key: &str| file.header.metadata_value(key);
    if meta("format") != Some(FORMAT) {
        return Err(Error::invalid(
            path,
            format!("not a routing-stats file (__metadata__ format is not {FORMAT:?})"),
        ));
    }
    let layers: Vec<u32> = meta("layers")
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| Error::invalid(path, "metadata \"layers\" is not a JSON list of layer indices"))?;
    let number = |key: &str| -> Result<u64> {
        meta(key)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::invalid(path, format!("metadata {key:?} is not a non-negative integer")))
    };
    let top_k = number("top_k")? as usize;
    let num_samples = number("num_samples")?;
    let l = layers.len() as u64;
    let e = file
        .tensor(COUNT)
        .and_then(|t| t.shape.get(1).copied())
        .ok_or_else(|| Error::invalid(path, format!("no 2-D tensor {COUNT:?}")))?;
    let read = |name: &str, dtype: Dtype, shape: &[u64]| -> Result<Vec<u8>> {
        let t = file
            .tensor(name)
            .ok_or_else(|| Error::invalid(path, format!("tensor {name:?} is missing")))?;
        if t.dtype != dtype || t.shape != shape {
            return Err(Error::invalid(
                path,
                format!("tensor {name:?} is {} {:?}, expected {dtype} {shape:?}", t.dtype, t.shape),
            ));
        }
        file.read_tensor(t)
    };
    let i64s = |b: &[u8]| -> Vec<i64> {
        b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or_default())).collect()
    };
    let f64s = |b: &[u8]| -> Vec<f64> {
        b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or_default())).collect()
    };
    let stats = RoutingStats {
        counts: i64s(&read(COUNT, Dtype::I64, &[l, e])?),
        gate_sum: f64s(&read(GATE_SUM, Dtype::F64, &[l, e])?),
        tokens: i64s(&read(TOKENS, Dtype::I64, &[l])?),
        sample_token_sum: f64s(&read(SAMPLE_TOKEN_SUM, Dtype::F64, &[l, e])?),
        sample_gate_sum: f64s(&read(SAMPLE_GATE_SUM, Dtype::F64, &[l, e])?),
        layers,
        num_experts: e as usize,
        top_k,
        num_samples,
        metadata: file
            .header
            .metadata
            .iter()
            .flatten()
            .filter(|(k, _)| !RESERVED.contains(&k.as_str()))
            .cloned()
            .collect(),
    };
    if let Some(problem) = stats.problem() {
        return Err(Error::invalid(path, problem));
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RoutingStats {
        let mut s = RoutingStats::zeros(vec![1, 3], 3, 2);
        s.counts = vec![2, 1, 1, 0, 4, 0];
        s.gate_sum = vec![0.5, 0.25, 0.25, 0.0, 1.0, 0.0];
        s.tokens = vec![2, 2];
        s.sample_token_sum = vec![0.5, 0.25, 0.25, 0.0, 1.0, 0.0];
        s.sample_gate_sum = s.gate_sum.clone();
        s.num_samples = 1;
        s.metadata = vec![("model".into(), "tiny".into())];
        s
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.safetensors");
        save(&sample(), &path).unwrap();
        assert_eq!(load(&path).unwrap(), sample());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "temporary file left behind");
    }

    #[test]
    fn rejects_inconsistent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.safetensors");
        let mut bad = sample();
        bad.tokens = vec![2, 3];
        let err = save(&bad, &path).unwrap_err().to_string();
        assert_eq!(err, "cannot save routing stats: layer 3: 4 expert selections for 3 tokens at top-2");
        assert!(!path.exists());
        let mut bad = sample();
        bad.metadata.push(("layers".into(), "x".into()));
        assert!(save(&bad, &path).unwrap_err().to_string().contains("reserved"));
        std::fs::write(&path, b"\x02\x00\x00\x00\x00\x00\x00\x00{}").unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains("not a routing-stats file"), "{err}");
    }
}
