//! A safetensors file opened through a read-only memory map. Parsing touches
//! only the header pages; tensor bytes are read lazily by whoever slices them.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::header::{self, Header, TensorInfo};
use crate::error::{open_input, Error, FormatError, Result};

pub struct SafetensorsFile {
    pub path: PathBuf,
    pub header: Header,
    pub file_len: u64,
    map: Mmap,
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
        // SAFETY: the map is read-only and private to this process. A file
        // truncated by another process while mapped would fault; that is the
        // accepted contract of every mmap-based safetensors reader.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let header = header::parse(&map, file_len).map_err(|e| Error::format(path, e))?;
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
            map,
            file,
            by_name,
        })
    }

    /// The raw bytes of one tensor, straight from the map.
    pub fn tensor_bytes(&self, t: &TensorInfo) -> &[u8] {
        let start = (self.header.data_start() + t.start) as usize;
        let end = (self.header.data_start() + t.end) as usize;
        // Offsets were validated against the file length at open.
        &self.map[start..end]
    }

    /// The header bytes, prefix included, exactly as stored.
    pub fn header_bytes(&self) -> &[u8] {
        &self.map[..self.header.data_start() as usize]
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
