//! Fixtures shared by the unit tests of merge, split and the readers.

use std::fs;
use std::path::Path;

use crate::safetensors::writer::{header_bytes, NewTensor};
use crate::safetensors::Dtype;

/// Writes a safetensors file of F32 tensors filled with the given byte.
pub(crate) fn write_st(path: &Path, tensors: &[(&str, &[u64], u8)], metadata: &[(&str, &str)]) {
    let new: Vec<NewTensor> = tensors
        .iter()
        .map(|(n, shape, _)| NewTensor {
            name: n.to_string(),
            dtype: Dtype::F32,
            shape: shape.to_vec(),
            nbytes: shape.iter().product::<u64>() * 4,
        })
        .collect();
    let md: Vec<(String, String)> = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let (mut bytes, _) = header_bytes(&new, &md);
    for (t, (_, _, fill)) in new.iter().zip(tensors) {
        bytes.extend(std::iter::repeat_n(*fill, t.nbytes as usize));
    }
    fs::write(path, bytes).unwrap();
}
