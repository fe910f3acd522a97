//! A checkpoint: one safetensors file, or a directory holding a single file or
//! shards listed by a `*.safetensors.index.json` (Hugging Face layout).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::file::SafetensorsFile;
use crate::error::{present, read_input_text, Error, Result};

pub const INDEX_NAME: &str = "model.safetensors.index.json";
pub const SINGLE_NAME: &str = "model.safetensors";

pub struct Shard {
    /// File name relative to the checkpoint directory (or the file's own name).
    pub name: String,
    pub file: SafetensorsFile,
}

pub struct Checkpoint {
    pub path: PathBuf,
    pub shards: Vec<Shard>,
    /// The index file, when the checkpoint has one.
    pub index: Option<Index>,
}

#[derive(Debug, Deserialize)]
pub struct Index {
    #[serde(skip)]
    pub path: PathBuf,
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    #[serde(deserialize_with = "unique_map")]
    pub weight_map: BTreeMap<String, String>,
}

fn unique_map<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<BTreeMap<String, String>, D::Error> {
    Ok(<crate::expert_config::UniqueMap<String> as serde::Deserialize>::deserialize(d)?.0)
}

impl Checkpoint {
    pub fn open(path: &Path) -> Result<Self> {
        let meta = fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if !meta.is_dir() {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let file = SafetensorsFile::open(path)?;
            return Ok(Checkpoint {
                path: path.to_path_buf(),
                shards: vec![Shard { name, file }],
                index: None,
            });
        }
        if let Some(index_path) = find_index(path)? {
            return Self::open_indexed(path, &index_path);
        }
        let single = path.join(SINGLE_NAME);
        let names = if present(&single) {
            vec![SINGLE_NAME.to_string()]
        } else {
            list_safetensors(path)?
        };
        if names.is_empty() {
            return Err(Error::invalid(path, "no .safetensors files in this directory"));
        }
        let shards = open_shards(path, &names)?;
        check_unique_names(path, &shards)?;
        Ok(Checkpoint {
            path: path.to_path_buf(),
            shards,
            index: None,
        })
    }

    fn open_indexed(dir: &Path, index_path: &Path) -> Result<Self> {
        let text = read_input_text(index_path)?;
        let mut index: Index = serde_json::from_str(&text)
            .map_err(|e| Error::invalid(index_path, format!("not a safetensors index: {e}")))?;
        index.path = index_path.to_path_buf();
        let mut names: Vec<String> = index.weight_map.values().cloned().collect();
        names.sort();
        names.dedup();
        for n in &names {
            if n.contains('/') || n.contains('\\') || n == ".." {
                return Err(Error::invalid(index_path, format!("shard name {n:?} is not a plain file name")));
            }
        }
        let shards = open_shards(dir, &names)?;
        let mut found = 0usize;
        for shard in &shards {
            for t in &shard.file.header.tensors {
                match index.weight_map.get(&t.name) {
                    Some(s) if *s == shard.name => found += 1,
                    Some(s) => {
                        return Err(Error::invalid(
                            index_path,
                            format!("{:?} is in {} but the index maps it to {s}", t.name, shard.name),
                        ))
                    }
                    None => {
                        return Err(Error::invalid(
                            index_path,
                            format!("{:?} in {} is missing from weight_map", t.name, shard.name),
                        ))
                    }
                }
            }
        }
        if found != index.weight_map.len() {
            let missing = index
                .weight_map
                .iter()
                .find(|(name, shard)| {
                    shards
                        .iter()
                        .find(|s| &s.name == *shard)
                        .is_none_or(|s| s.file.tensor(name).is_none())
                })
                .map(|(n, s)| format!("{n:?} (in {s})"))
                .unwrap_or_default();
            return Err(Error::invalid(
                index_path,
                format!("weight_map lists {missing}, which its shard does not hold"),
            ));
        }
        Ok(Checkpoint {
            path: dir.to_path_buf(),
            shards,
            index: Some(index),
        })
    }

    /// Every tensor with the shard that holds it, shard by shard in data order.
    pub fn tensors(&self) -> impl Iterator<Item = (&Shard, &super::TensorInfo)> {
        self.shards
            .iter()
            .flat_map(|s| s.file.header.tensors.iter().map(move |t| (s, t)))
    }

    pub fn total_bytes(&self) -> u64 {
        self.tensors().map(|(_, t)| t.nbytes()).sum()
    }
}

fn find_index(dir: &Path) -> Result<Option<PathBuf>> {
    let preferred = dir.join(INDEX_NAME);
    if present(&preferred) {
        return Ok(Some(preferred));
    }
    let mut found: Vec<PathBuf> = read_dir_names(dir)?
        .into_iter()
        .filter(|n| n.ends_with(".safetensors.index.json"))
        .map(|n| dir.join(n))
        .collect();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        n => Err(Error::invalid(dir, format!("{n} safetensors index files; expected one"))),
    }
}

fn list_safetensors(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = read_dir_names(dir)?
        .into_iter()
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    names.sort();
    Ok(names)
}

/// The names of the entries of `dir` that are not directories.
fn read_dir_names(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        if present(&entry.path()) {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    Ok(names)
}

fn open_shards(dir: &Path, names: &[String]) -> Result<Vec<Shard>> {
    names
        .iter()
        .map(|n| {
            Ok(Shard {
                name: n.clone(),
                file: SafetensorsFile::open(&dir.join(n))?,
            })
        })
        .collect()
}

fn check_unique_names(dir: &Path, shards: &[Shard]) -> Result<()> {
    let mut owner: HashMap<&str, &str> = HashMap::new();
    for s in shards {
        for t in &s.file.header.tensors {
            if let Some(prev) = owner.insert(&t.name, &s.name) {
                return Err(Error::invalid(
                    dir,
                    format!("tensor {:?} is in both {prev} and {} (and no index says which)", t.name, s.name),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The index reader, fuzzed beside a real shard: a mutated index is written and opened.
    #[test]
    fn fuzz_index() {
        let dir = tempfile::tempdir().unwrap();
        let shard = crate::fuzzing::seed("header", "two_tensors.safetensors");
        fs::write(dir.path().join("model-00001-of-00002.safetensors"), shard).unwrap();
        let index = dir.path().join(INDEX_NAME);
        crate::fuzzing::run("index", |bytes| {
            fs::write(&index, bytes).unwrap();
            if let Err(e) = Checkpoint::open(dir.path()) {
                assert!(!e.to_string().contains('\n'), "{e}");
            }
        });
    }
}
