//! Bytes of checkpoint files, read by offset into the caller's memory: a tensor's
//! rows (dim 0), whose offset and size its header gives.
//!
//! A rank of a sharded run reads its rows of every tensor and no other bytes: a
//! memory map would fault in the page-cache pages around each read (about
//! 256 KiB per tensor on Linux 6, whatever the rows) and keep them resident
//! while it is open, which for a checkpoint of small per-expert tensors is most
//! of the file. Positional reads (`pread`, `seek_read` on Windows: see
//! `copy::read_exact_at`) copy exactly the rows' bytes into the buffer that
//! keeps them.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use crate::copy::read_exact_at;
use crate::error::{open_input, Error, Result};

/// A file opened for positional reads; it stays open until dropped.
pub struct FileReader {
    path: PathBuf,
    file: File,
}

impl FileReader {
    pub fn open(path: &Path) -> Result<Self> {
        Ok(FileReader {
            path: path.to_path_buf(),
            file: open_input(path)?,
        })
    }

    /// Fills `out` with the file's bytes from `offset` (a tensor's rows: their
    /// offset and size come from its header, `inspect`). Returns the bytes read.
    pub fn read_into(&self, offset: u64, out: &mut [u8]) -> Result<u64> {
        read_exact_at(&self.file, out, offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                let end = offset.saturating_add(out.len() as u64);
                Error::invalid(
                    &self.path,
                    format!(
                        "ends before byte {end} (truncated, or changed since it was inspected)"
                    ),
                )
            } else {
                Error::io(&self.path, e)
            }
        })?;
        Ok(out.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_by_offset_and_names_a_short_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..100).collect();
        std::fs::write(&path, &data).unwrap();
        let r = FileReader::open(&path).unwrap();
        let mut out = [0u8; 10];
        assert_eq!(r.read_into(42, &mut out).unwrap(), 10);
        assert_eq!(out, data[42..52]);
        assert_eq!(r.read_into(7, &mut []).unwrap(), 0);
        let e = r.read_into(95, &mut out).unwrap_err().to_string();
        assert!(e.contains("f: ends before byte 105"), "{e}");
        let missing = FileReader::open(&dir.path().join("g"))
            .err()
            .map(|e| e.to_string());
        assert!(missing.is_some_and(|e| e.contains("g: ")));
        assert!(FileReader::open(dir.path()).is_err());
    }
}
