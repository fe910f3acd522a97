//! A safetensors file opened for positional reads: `open` reads the 8-byte
//! length and the header (`8 + N` bytes, nothing more); tensor bytes are read
//! or copied by offset by whoever needs them. No memory map: the header is
//! small, and a shared map would let another process change bytes behind a
//! `&[u8]`.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use super::header::{self, Header, TensorInfo};
use crate::copy::read_exact_at;
use crate::error::{open_input, Error, FormatError, Result};

pub struct SafetensorsFile {
    pub path: PathBuf,
    pub header: Header,
    pub file_len: u64,
    /// The header as stored: the 8-byte length prefix and the JSON.
    header_bytes: Vec<u8>,
    /// Kept open for in-kernel copies (`copy_file_range`) and positional reads.
    file: File,
    /// Tensor name -> position in `header.tensors`.
    by_name: HashMap<String, usize>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = open_input(path)?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        let file_len = meta.len();
        if file_len < 8 {
            return Err(Error::format(path, FormatError::HeaderTooSmall(file_len)));
        }
        let mut prefix = [0u8; 8];
        read_exact_at(&file, &mut prefix, 0).map_err(|e| Error::io(path, e))?;
        let len = header::header_len(&prefix, file_len).map_err(|e| Error::format(path, e))?;
        let mut header_bytes = vec![0u8; 8 + len as usize];
        read_exact_at(&file, &mut header_bytes, 0).map_err(|e| Error::io(path, e))?;
        let header = header::parse(&header_bytes, file_len).map_err(|e| Error::format(path, e))?;
        let by_name = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            header,
            file_len,
            header_bytes,
            file,
            by_name,
        })
    }

    /// The raw bytes of one tensor, read from the file.
    pub fn read_tensor(&self, t: &TensorInfo) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; t.nbytes() as usize];
        read_exact_at(&self.file, &mut buf, self.offset_of(t)).map_err(|e| Error::io(&self.path, e))?;
        Ok(buf)
    }

    /// The header bytes, prefix included, exactly as stored.
    pub fn header_bytes(&self) -> &[u8] {
        &self.header_bytes
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.header.tensors[i])
    }

    /// The open file, for in-kernel copies and positional reads.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Absolute file offset of a tensor's first byte.
    pub fn offset_of(&self, t: &TensorInfo) -> u64 {
        self.header.data_start() + t.start
    }
}
