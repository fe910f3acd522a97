//! Building a safetensors header for a new file. Tensor bytes are written by
//! the caller at the offsets this returns (see `copy`), so no tensor is ever
//! held in memory here.

use serde_json::{json, Map, Value};

use super::dtype::Dtype;

/// A tensor to be written, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    pub nbytes: u64,
}

/// The 8-byte length prefix plus the JSON header, padded with spaces to a
/// multiple of 8 as the reference writer does, and each tensor's absolute file
/// offset. Tensors are laid out back to back in the given order.
pub fn header_bytes(tensors: &[NewTensor], metadata: &[(String, String)]) -> (Vec<u8>, Vec<u64>) {
    let mut obj = Map::new();
    if !metadata.is_empty() {
        let md: Map<String, Value> = metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        obj.insert("__metadata__".into(), Value::Object(md));
    }
    let mut start = 0u64;
    let mut rel = Vec::with_capacity(tensors.len());
    for t in tensors {
        let end = start + t.nbytes;
        obj.insert(
            t.name.clone(),
            json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [start, end]}),
        );
        rel.push(start);
        start = end;
    }
    let mut text = Value::Object(obj).to_string().into_bytes();
    text.resize(text.len().next_multiple_of(8), b' ');
    let data_start = 8 + text.len() as u64;
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    (out, rel.into_iter().map(|r| r + data_start).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safetensors::header;

    #[test]
    fn parses_back() {
        let t = vec![
            NewTensor {
                name: "b".into(),
                dtype: Dtype::F32,
                shape: vec![2],
                nbytes: 8,
            },
            NewTensor {
                name: "a".into(),
                dtype: Dtype::BF16,
                shape: vec![3, 1],
                nbytes: 6,
            },
        ];
        let md = vec![("format".to_string(), "pt".to_string())];
        let (mut bytes, offsets) = header_bytes(&t, &md);
        assert_eq!(bytes.len() % 8, 0);
        assert_eq!(offsets, vec![bytes.len() as u64, bytes.len() as u64 + 8]);
        bytes.extend(std::iter::repeat_n(0u8, 14));
        let h = header::parse(&bytes, bytes.len() as u64).unwrap();
        assert_eq!(h.tensors[0].name, "b");
        assert_eq!(h.tensors[1].shape, vec![3, 1]);
        assert_eq!(h.metadata_value("format"), Some("pt"));
    }
}
