//! A safetensors file written one tensor at a time, so that the writer never
//! holds them all: a trainer gathers a sharded model's trained tensors one by
//! one, and under `--mode full` they are the whole model.
//!
//! The names, dtypes and shapes are known before any data: the header is
//! written first (`writer::header_bytes`), in the reference's layout (dtype,
//! widest first, then name: the bytes `safetensors.torch.save_file` writes for
//! the same tensors), and each tensor's bytes go to their offset as they arrive,
//! in any order. The file is staged under a hidden name (`staging`) and takes
//! its final name in `finish`, only when every tensor was written; dropped
//! before, it leaves nothing.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use super::dtype::Dtype;
use super::header::tensor_nbytes;
use super::writer::{header_bytes, NewTensor};
use crate::copy::{preallocate, write_all_at};
use crate::error::{Error, Result};
use crate::staging::Staged;

/// A tensor the file will hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
}

#[derive(Debug)]
struct Slot {
    dtype: Dtype,
    offset: u64,
    nbytes: u64,
    written: bool,
}

/// The reference writer's order: dtype descending, then name.
pub fn layout(tensors: &[TensorSpec]) -> Result<Vec<NewTensor>> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(tensors.len());
    for t in tensors {
        if t.name == "__metadata__" || !seen.insert(t.name.as_str()) {
            return Err(Error::Value(format!("{}: given twice or reserved", t.name)));
        }
        let nbytes =
            tensor_nbytes(&t.name, t.dtype, &t.shape).map_err(|e| Error::Value(e.to_string()))?;
        out.push(NewTensor {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            nbytes,
        });
    }
    out.sort_by(|a, b| b.dtype.cmp(&a.dtype).then_with(|| a.name.cmp(&b.name)));
    Ok(out)
}

/// A safetensors file being written; see the module docs.
pub struct StreamWriter {
    target: PathBuf,
    // Dropped before `staged`, whose drop removes the file (Windows removes no open file).
    file: File,
    staged: Staged,
    slots: HashMap<String, Slot>,
    missing: usize,
}

impl StreamWriter {
    /// Starts the file at `target` (staged beside it) for `tensors`; `metadata`
    /// goes to `__metadata__`, keys sorted (the reference writes them in hash order).
    pub fn create(
        target: &Path,
        tensors: &[TensorSpec],
        metadata: &[(String, String)],
    ) -> Result<Self> {
        let laid = layout(tensors)?;
        let mut md = metadata.to_vec();
        md.sort();
        if let Some(w) = md.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(Error::Value(format!(
                "metadata key {:?} given twice",
                w[0].0
            )));
        }
        let (header, offsets) = header_bytes(&laid, &md);
        let staged = Staged::new(target, false)?;
        let err = |e| Error::io(target, e);
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(staged.path())
            .map_err(err)?;
        let total = offsets
            .last()
            .zip(laid.last())
            .map_or(header.len() as u64, |(o, t)| o + t.nbytes);
        preallocate(&file, target, total)?;
        write_all_at(&file, &header, 0).map_err(err)?;
        let slots: HashMap<String, Slot> = laid
            .into_iter()
            .zip(offsets)
            .map(|(t, offset)| {
                let slot = Slot {
                    dtype: t.dtype,
                    offset,
                    nbytes: t.nbytes,
                    written: false,
                };
                (t.name, slot)
            })
            .collect();
        Ok(StreamWriter {
            target: target.to_path_buf(),
            missing: slots.len(),
            file,
            staged,
            slots,
        })
    }

    /// Writes the bytes of tensor `name`, which must have the dtype and size declared.
    pub fn write(&mut self, name: &str, dtype: Dtype, data: &[u8]) -> Result<()> {
        let Some(slot) = self.slots.get_mut(name) else {
            return Err(Error::Value(format!(
                "{name}: not among the tensors {} was started with",
                self.target.display()
            )));
        };
        if slot.written {
            return Err(Error::Value(format!("{name}: given twice")));
        }
        if slot.dtype != dtype || slot.nbytes != data.len() as u64 {
            return Err(Error::Value(format!(
                "{name}: {} bytes of {dtype}, declared as {} bytes of {}",
                data.len(),
                slot.nbytes,
                slot.dtype
            )));
        }
        write_all_at(&self.file, data, slot.offset).map_err(|e| Error::io(&self.target, e))?;
        slot.written = true;
        self.missing -= 1;
        Ok(())
    }

    /// Puts the file in place (`Staged::commit`: an existing target only with
    /// `overwrite`), once every tensor was written.
    pub fn finish(self, overwrite: bool) -> Result<()> {
        if self.missing > 0 {
            let mut names: Vec<&str> = self
                .slots
                .iter()
                .filter(|(_, s)| !s.written)
                .map(|(n, _)| n.as_str())
                .collect();
            names.sort_unstable();
            let more = if names.len() > 3 {
                format!(" and {} more", names.len() - 3)
            } else {
                String::new()
            };
            return Err(Error::Value(format!(
                "{}: tensors never written: {}{more}",
                self.target.display(),
                names[..names.len().min(3)].join(", ")
            )));
        }
        let StreamWriter {
            file,
            staged,
            target,
            ..
        } = self;
        file.sync_data().map_err(|e| Error::io(&target, e))?;
        drop(file);
        staged.commit(overwrite, &[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safetensors::SafetensorsFile;

    fn spec(name: &str, dtype: Dtype, shape: &[u64]) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn writes_in_any_order_in_the_reference_layout() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a.safetensors");
        let specs = [
            spec("b", Dtype::F32, &[2]),
            spec("a", Dtype::BF16, &[3]),
            spec("c", Dtype::F32, &[1]),
            spec("z", Dtype::BOOL, &[0]),
        ];
        let md = [
            ("z".to_string(), "1".to_string()),
            ("format".into(), "pt".into()),
        ];
        let mut w = StreamWriter::create(&target, &specs, &md).unwrap();
        assert!(!target.exists());
        w.write("a", Dtype::BF16, &[1, 2, 3, 4, 5, 6]).unwrap();
        w.write("z", Dtype::BOOL, &[]).unwrap();
        w.write("c", Dtype::F32, &[9; 4]).unwrap();
        w.write("b", Dtype::F32, &[7; 8]).unwrap();
        w.finish(false).unwrap();
        let f = SafetensorsFile::open(&target).unwrap();
        let names: Vec<&str> = f.header.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["b", "c", "a", "z"]);
        assert_eq!(
            f.read_tensor(f.tensor("a").unwrap()).unwrap(),
            [1, 2, 3, 4, 5, 6]
        );
        assert_eq!(f.read_tensor(f.tensor("c").unwrap()).unwrap(), [9; 4]);
        let text = String::from_utf8_lossy(f.header_bytes()).into_owned();
        assert!(
            text.contains(r#"{"__metadata__":{"format":"pt","z":"1"},"b":"#),
            "{text}"
        );
        assert_eq!(dir.path().read_dir().unwrap().count(), 1);
    }

    #[test]
    fn refuses_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a.safetensors");
        let specs = [spec("x", Dtype::F32, &[2]), spec("y", Dtype::I8, &[1])];
        let dup = [spec("x", Dtype::F32, &[2]), spec("x", Dtype::F32, &[2])];
        assert!(StreamWriter::create(&target, &dup, &[]).is_err());
        let odd = [spec("f", Dtype::F4, &[3])];
        assert!(StreamWriter::create(&target, &odd, &[]).is_err());
        let mut w = StreamWriter::create(&target, &specs, &[]).unwrap();
        let e = |r: Result<()>| r.unwrap_err().to_string();
        assert!(e(w.write("q", Dtype::F32, &[0; 8])).contains("q: not among"));
        assert!(e(w.write("x", Dtype::F16, &[0; 8])).contains("declared as 8 bytes of F32"));
        assert!(e(w.write("x", Dtype::F32, &[0; 4])).contains("4 bytes of F32"));
        w.write("x", Dtype::F32, &[0; 8]).unwrap();
        assert!(e(w.write("x", Dtype::F32, &[0; 8])).contains("x: given twice"));
        assert!(e(w.finish(false)).contains("tensors never written: y"));
        assert_eq!(dir.path().read_dir().unwrap().count(), 0);
        let w = StreamWriter::create(&target, &specs, &[]).unwrap();
        drop(w);
        assert_eq!(dir.path().read_dir().unwrap().count(), 0);
    }

    #[test]
    fn an_existing_file_is_replaced_only_with_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a.safetensors");
        let empty = StreamWriter::create(&target, &[], &[]).unwrap();
        empty.finish(false).unwrap();
        assert_eq!(
            std::fs::read(&target).unwrap(),
            b"\x08\0\0\0\0\0\0\0{}      "
        );
        let again = StreamWriter::create(&target, &[], &[]).unwrap();
        assert!(again.finish(false).is_err());
        StreamWriter::create(&target, &[], &[])
            .unwrap()
            .finish(true)
            .unwrap();
    }
}
