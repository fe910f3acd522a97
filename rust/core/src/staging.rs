//! Outputs that appear only when complete: everything is written under a
//! hidden temporary name (`.NAME.esft-partial`) next to the final path and
//! renamed into place at the end. An error or a cancelled job removes the
//! temporary; a killed one leaves it behind under a name that cannot be taken
//! for the output, and the next run to the same output clears it first.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub const PARTIAL_SUFFIX: &str = ".esft-partial";

pub struct Staged {
    target: PathBuf,
    tmp: PathBuf,
    dir: bool,
    committed: bool,
}

/// `dir/.NAME<suffix>` for `dir/NAME`.
fn sibling(target: &Path, suffix: &str) -> Result<PathBuf> {
    let name = target
        .file_name()
        .ok_or_else(|| Error::Usage(format!("{}: not a file name", target.display())))?;
    let parent = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok(parent.join(format!(".{}{suffix}", name.to_string_lossy())))
}

fn remove_any(path: &Path) -> std::io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Refuses an existing output unless `overwrite`.
pub fn check_target(target: &Path, overwrite: bool) -> Result<()> {
    if !overwrite && fs::symlink_metadata(target).is_ok() {
        return Err(Error::Usage(format!(
            "{}: already exists (pass --overwrite to replace it)",
            target.display()
        )));
    }
    Ok(())
}

/// Refuses an output that is an input, lies inside an input directory, or
/// contains an input (replacing it would delete that input).
pub fn check_not_input(target: &Path, inputs: &[&Path]) -> Result<()> {
    let parent = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let parent = fs::canonicalize(parent).map_err(|e| Error::io(parent, e))?;
    let name = target
        .file_name()
        .ok_or_else(|| Error::Usage(format!("{}: not a file name", target.display())))?;
    let out = parent.join(name);
    for input in inputs {
        let inp = fs::canonicalize(input).map_err(|e| Error::io(input, e))?;
        if out == inp || out.starts_with(&inp) || inp.starts_with(&out) {
            return Err(Error::Usage(format!(
                "{}: the output would overwrite or lie inside the input {}",
                target.display(),
                input.display()
            )));
        }
    }
    Ok(())
}

impl Staged {
    /// Starts a staged file (`dir == false`) or directory at `target`.
    pub fn new(target: &Path, dir: bool) -> Result<Self> {
        let tmp = sibling(target, PARTIAL_SUFFIX)?;
        remove_any(&tmp).map_err(|e| Error::io(&tmp, e))?;
        if dir {
            fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        Ok(Staged {
            target: target.to_path_buf(),
            tmp,
            dir,
            committed: false,
        })
    }

    /// Where to write: the temporary file, or the temporary directory.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Moves the finished output into place. An existing target is replaced
    /// only with `overwrite` (a file atomically; a directory is moved aside
    /// first, then removed).
    pub fn commit(mut self, overwrite: bool) -> Result<()> {
        check_target(&self.target, overwrite)?;
        let old = if self.dir && self.target.exists() {
            let old = sibling(&self.target, ".esft-old")?;
            remove_any(&old).map_err(|e| Error::io(&old, e))?;
            fs::rename(&self.target, &old).map_err(|e| Error::io(&self.target, e))?;
            Some(old)
        } else {
            None
        };
        fs::rename(&self.tmp, &self.target).map_err(|e| Error::io(&self.target, e))?;
        self.committed = true;
        if let Some(old) = old {
            remove_any(&old).map_err(|e| Error::io(&old, e))?;
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: the job already failed, its own error is the one to report.
            let _ = remove_any(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_and_dir() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("out.safetensors");
        let s = Staged::new(&target, false).unwrap();
        fs::write(s.path(), b"x").unwrap();
        assert!(s
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".out.safetensors"));
        s.commit(false).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"x");

        let s = Staged::new(&target, false).unwrap();
        fs::write(s.path(), b"y").unwrap();
        assert!(s.commit(false).is_err());
        assert_eq!(fs::read(&target).unwrap(), b"x");
        assert_eq!(
            fs::read_dir(d.path()).unwrap().count(),
            1,
            "temporary removed on failure"
        );

        let dir = d.path().join("model");
        for (content, overwrite) in [(&b"1"[..], false), (&b"2"[..], true)] {
            let s = Staged::new(&dir, true).unwrap();
            fs::write(s.path().join("a"), content).unwrap();
            s.commit(overwrite).unwrap();
        }
        assert_eq!(fs::read(dir.join("a")).unwrap(), b"2");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 2);
    }
}
