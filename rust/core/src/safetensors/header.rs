//! Parsing and validating a safetensors header, accepting exactly what the
//! reference implementation accepts (plus rejecting duplicate names, which the
//! reference's map silently collapses).

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use super::dtype::Dtype;
use crate::error::FormatError;

/// Largest header the reference accepts.
pub const MAX_HEADER_LEN: u64 = 100_000_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    /// Byte range within the data section (after the 8 + header_len prefix).
    pub start: u64,
    pub end: u64,
}

impl TensorInfo {
    pub fn nbytes(&self) -> u64 {
        self.end - self.start
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Tensors in data order (ascending offsets), which is also file order.
    pub tensors: Vec<TensorInfo>,
    /// `__metadata__` in the order the file lists it; `None` when absent.
    pub metadata: Option<Vec<(String, String)>>,
    /// Length of the JSON header in bytes (the value of the 8-byte prefix).
    pub header_len: u64,
}

impl Header {
    /// Byte offset of the data section within the file.
    pub fn data_start(&self) -> u64 {
        8 + self.header_len
    }

    pub fn data_len(&self) -> u64 {
        self.tensors.last().map_or(0, |t| t.end)
    }

    pub fn metadata_value(&self, key: &str) -> Option<&str> {
        self.metadata
            .as_ref()?
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads the header length from the first 8 bytes and checks it against the
/// reference limits and the file length.
pub fn header_len(prefix: &[u8], file_len: u64) -> Result<u64, FormatError> {
    let bytes: [u8; 8] = prefix
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or(FormatError::HeaderTooSmall(file_len))?;
    let len = u64::from_le_bytes(bytes);
    if len > MAX_HEADER_LEN {
        return Err(FormatError::HeaderTooLarge(len));
    }
    if 8 + len > file_len {
        return Err(FormatError::HeaderPastEnd { len, file_len });
    }
    Ok(len)
}

/// Parses and validates a whole header. `bytes` holds at least the 8-byte
/// prefix and the JSON; `file_len` is the length of the whole file.
pub fn parse(bytes: &[u8], file_len: u64) -> Result<Header, FormatError> {
    let header_len = header_len(bytes, file_len)?;
    let json = bytes
        .get(8..8 + header_len as usize)
        .ok_or(FormatError::HeaderPastEnd {
            len: header_len,
            file_len,
        })?;
    let text = std::str::from_utf8(json).map_err(|_| FormatError::HeaderNotUtf8)?;
    if !text.starts_with('{') {
        return Err(FormatError::HeaderNotObject);
    }
    let entries: Entries =
        serde_json::from_str(text).map_err(|e| FormatError::HeaderJson(e.to_string()))?;

    let mut seen = HashSet::with_capacity(entries.0.len());
    let mut metadata = None;
    let mut tensors = Vec::with_capacity(entries.0.len());
    for (name, value) in entries.0 {
        if !seen.insert(name.clone()) {
            return Err(FormatError::DuplicateTensor(name));
        }
        if name == "__metadata__" {
            metadata = parse_metadata(value)?;
        } else {
            tensors.push(parse_tensor(name, value)?);
        }
    }
    validate(&mut tensors, file_len - 8 - header_len)?;
    Ok(Header {
        tensors,
        metadata,
        header_len,
    })
}

fn parse_metadata(value: Value) -> Result<Option<Vec<(String, String)>>, FormatError> {
    match value {
        Value::Null => Ok(None),
        Value::Object(map) => map
            .into_iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k, s)),
                other => Err(FormatError::BadMetadata(format!("{k:?} is {other}"))),
            })
            .collect::<Result<_, _>>()
            .map(Some),
        other => Err(FormatError::BadMetadata(format!("got {other}"))),
    }
}

#[derive(Deserialize)]
struct RawTensor {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

fn parse_tensor(name: String, value: Value) -> Result<TensorInfo, FormatError> {
    let raw: RawTensor = match serde_json::from_value(value) {
        Ok(raw) => raw,
        Err(e) => {
            return Err(FormatError::BadTensorInfo {
                name,
                reason: e.to_string(),
            })
        }
    };
    let Ok(dtype) = raw.dtype.parse::<Dtype>() else {
        return Err(FormatError::BadTensorInfo {
            name,
            reason: format!("unknown dtype {:?}", raw.dtype),
        });
    };
    Ok(TensorInfo {
        name,
        dtype,
        shape: raw.shape,
        start: raw.data_offsets.0,
        end: raw.data_offsets.1,
    })
}

/// Bytes of a tensor of `dtype` and `shape`: refused when the size overflows or
/// is not a whole number of bytes (sub-byte dtypes).
pub fn tensor_nbytes(name: &str, dtype: Dtype, shape: &[u64]) -> Result<u64, FormatError> {
    let bits = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .and_then(|n| n.checked_mul(dtype.bits()))
        .ok_or_else(|| FormatError::Overflow {
            name: name.to_string(),
            shape: shape.to_vec(),
        })?;
    if bits % 8 != 0 {
        return Err(FormatError::Misaligned {
            name: name.to_string(),
            dtype: dtype.to_string(),
            shape: shape.to_vec(),
        });
    }
    Ok(bits / 8)
}

/// Sorts tensors by offset and checks the reference invariants: sizes match
/// dtype and shape, offsets are contiguous from 0, and the data section ends
/// exactly where the last tensor does.
fn validate(tensors: &mut [TensorInfo], data_len: u64) -> Result<(), FormatError> {
    tensors.sort_by_key(|t| (t.start, t.end));
    let mut expected = 0u64;
    for t in tensors.iter() {
        if t.start != expected || t.end < t.start {
            return Err(FormatError::BadOffsets {
                name: t.name.clone(),
                start: t.start,
                end: t.end,
                expected,
            });
        }
        let nbytes = tensor_nbytes(&t.name, t.dtype, &t.shape)?;
        if nbytes != t.end - t.start {
            return Err(FormatError::SizeMismatch {
                name: t.name.clone(),
                dtype: t.dtype.to_string(),
                shape: t.shape.clone(),
                expected: nbytes,
                actual: t.end - t.start,
            });
        }
        expected = t.end;
    }
    if expected != data_len {
        return Err(FormatError::DataLength {
            expected,
            actual: data_len,
        });
    }
    Ok(())
}

/// Top-level JSON object entries in file order, duplicates kept so that we
/// can reject them (a map would keep only the last).
struct Entries(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    out.push((k, v));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuzz_header() {
        crate::fuzzing::run("header", |bytes| {
            if let Ok(h) = parse(bytes, bytes.len() as u64) {
                let data = h.data_len();
                assert!(h.tensors.iter().all(|t| t.start <= t.end && t.end <= data));
            }
        });
    }

    fn file(json: &str, data_len: usize) -> Vec<u8> {
        let mut v = (json.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(json.as_bytes());
        v.extend(std::iter::repeat_n(0u8, data_len));
        v
    }

    fn parse_file(json: &str, data_len: usize) -> Result<Header, FormatError> {
        let f = file(json, data_len);
        parse(&f, f.len() as u64)
    }

    #[test]
    fn accepts_valid_oddities() {
        assert!(parse_file("{}", 0).unwrap().tensors.is_empty());
        let h = parse_file(r#"{"s":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}"#, 4).unwrap();
        assert_eq!(h.tensors[0].shape, Vec::<u64>::new());
        let h = parse_file(
            r#"{"z":{"dtype":"F16","shape":[0,3],"data_offsets":[0,0]},"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}   "#,
            4,
        )
        .unwrap();
        assert_eq!(h.tensors.len(), 2);
        assert_eq!(h.tensors[0].name, "z");
        let h = parse_file(
            r#"{"__metadata__":{"format":"pt"},"f4":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}}"#,
            2,
        )
        .unwrap();
        assert_eq!(h.metadata_value("format"), Some("pt"));
    }

    #[test]
    fn rejects_malformed() {
        let f = |j: &str, n| parse_file(j, n).unwrap_err();
        assert!(matches!(parse(&[1, 2, 3], 3), Err(FormatError::HeaderTooSmall(3))));
        assert!(matches!(f("[]", 0), FormatError::HeaderNotObject));
        assert!(matches!(f("{", 0), FormatError::HeaderJson(_)));
        assert!(matches!(
            f(r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#, 8),
            FormatError::DuplicateTensor(_)
        ));
        assert!(matches!(
            f(r#"{"a":{"dtype":"Q9","shape":[1],"data_offsets":[0,4]}}"#, 4),
            FormatError::BadTensorInfo { .. }
        ));
        assert!(matches!(
            f(r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#, 4),
            FormatError::BadTensorInfo { .. }
        ));
        assert!(matches!(
            f(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#, 4),
            FormatError::SizeMismatch { .. }
        ));
        assert!(matches!(
            f(r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#, 8),
            FormatError::BadOffsets { .. }
        ));
        assert!(matches!(
            f(r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#, 5),
            FormatError::DataLength { .. }
        ));
        assert!(matches!(
            f(r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,4]}}"#, 4),
            FormatError::Overflow { .. }
        ));
        assert!(matches!(
            f(r#"{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#, 2),
            FormatError::Misaligned { .. }
        ));
        assert!(matches!(
            f(r#"{"__metadata__":{"n":1}}"#, 0),
            FormatError::BadMetadata(_)
        ));
        let mut big = file("{}", 0);
        big[..8].copy_from_slice(&(MAX_HEADER_LEN + 1).to_le_bytes());
        assert!(matches!(parse(&big, big.len() as u64), Err(FormatError::HeaderTooLarge(_))));
        big[..8].copy_from_slice(&100u64.to_le_bytes());
        assert!(matches!(parse(&big, big.len() as u64), Err(FormatError::HeaderPastEnd { .. })));
        let mut bad = file("{}", 0);
        bad[8] = 0xff;
        assert!(matches!(parse(&bad, bad.len() as u64), Err(FormatError::HeaderNotUtf8)));
    }
}
