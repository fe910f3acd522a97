//! Outputs, in one place: the guard that keeps them off the inputs, and the
//! staging that makes them appear whole or not at all (docs/outputs.md).
//!
//! Guard: an output that is, contains or lies inside an input, or that
//! collides with another output of the same command, is refused before any
//! work; paths are compared after resolving symlinks and `..`, also for outputs
//! that do not exist yet. An existing output is replaced only if it is
//! something esft-rs could have written (`check_replaceable`).
//!
//! Staging: an output is written under a hidden name unique to the run,
//! `.NAME.esft-staging.HOST.PID.NONCE`, beside its target, and committed with
//! one rename: into an empty place without replacing what a concurrent run put
//! there meanwhile, or, over an existing output, swapped with it in one step
//! (`renameat2(RENAME_EXCHANGE)`), after which the old output, now under the
//! staging name, is removed. The target therefore never goes missing. An error
//! or a cancelled job removes the staging copy; a killed one leaves it, and the
//! next run to the same output removes those of processes that no longer exist.

use std::fs;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// Marks staging names: `.NAME` + this + `HOST.PID.NONCE`.
pub const STAGING_MARK: &str = ".esft-staging.";

/// `path` made absolute, with symlinks and `..` resolved; for a path that does
/// not exist yet, its deepest existing ancestor is resolved and the rest
/// appended (names that do not exist cannot be symlinks).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(path).map_err(|e| Error::io(path, e))?;
    // Component by component, as the kernel walks it: an existing prefix is
    // canonicalized (links followed), so a later `..` leaves the link's target.
    let mut real = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                real.pop();
            }
            Component::CurDir => {}
            other => {
                real.push(other);
                if let Ok(r) = fs::canonicalize(&real) {
                    real = r;
                }
            }
        }
    }
    Ok(real)
}

/// The same existing file or directory under two names (hard links, bind mounts).
#[cfg(unix)]
fn same_object(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_object(_: &Path, _: &Path) -> bool {
    false
}

/// The guard: refuses an output that is, contains or lies inside an input, and
/// two outputs of which one is, or lies inside, the other. One line naming both.
pub fn check_paths(outputs: &[&Path], inputs: &[&Path]) -> Result<()> {
    let resolved = |paths: &[&Path]| -> Result<Vec<PathBuf>> {
        paths.iter().map(|p| resolve(p)).collect()
    };
    let (outs, ins) = (resolved(outputs)?, resolved(inputs)?);
    for (o, ro) in outputs.iter().zip(&outs) {
        for (i, ri) in inputs.iter().zip(&ins) {
            if ro.starts_with(ri) || same_object(ro, ri) {
                return Err(Error::Usage(format!(
                    "{}: the output would overwrite or lie inside the input {}",
                    o.display(),
                    i.display()
                )));
            }
            if ri.starts_with(ro) {
                return Err(Error::Usage(format!(
                    "{}: the output would contain the input {} (replacing it would delete that input)",
                    o.display(),
                    i.display()
                )));
            }
        }
    }
    for (a, (oa, ra)) in outputs.iter().zip(&outs).enumerate() {
        for (ob, rb) in outputs.iter().zip(&outs).skip(a + 1) {
            if ra.starts_with(rb) || rb.starts_with(ra) {
                return Err(Error::Usage(format!(
                    "{} and {}: two outputs of one command collide (one is, or lies inside, the other)",
                    oa.display(),
                    ob.display()
                )));
            }
        }
    }
    Ok(())
}

/// Refuses an existing output unless `overwrite`, and then unless esft-rs could
/// have written it. `keep`: further top-level names the output may hold (merge
/// copies the base's other files).
pub fn check_target(target: &Path, overwrite: bool, keep: &[String]) -> Result<()> {
    // The folder it goes in must exist and take new files: found out now, not after the work.
    writable_parent(target)?;
    match fs::symlink_metadata(target) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(target, e)),
        Ok(_) if !overwrite => Err(Error::Usage(format!(
            "{}: already exists (pass --overwrite to replace it)",
            target.display()
        ))),
        Ok(_) => check_replaceable(target, keep),
    }
}

/// Refuses to replace what esft-rs could not have written: a directory with an
/// entry that is not a checkpoint, tokenizer or esft-rs file, or a file that is
/// not safetensors, JSON, NumPy or an image. Says what is there.
pub fn check_replaceable(target: &Path, keep: &[String]) -> Result<()> {
    let meta = match fs::metadata(target) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(target, e)),
        Ok(m) => m,
    };
    let refuse = |what: String| {
        Err(Error::Usage(format!(
            "{}: holds {what}, which esft-rs did not write; not replaced (remove it or choose another output)",
            target.display()
        )))
    };
    if meta.is_dir() {
        let mut foreign = Vec::new();
        foreign_entries(target, true, keep, &mut foreign);
        return match foreign.first() {
            None => Ok(()),
            Some(first) if foreign.len() == 1 => refuse(first.clone()),
            Some(first) => refuse(format!("{first} and {} more entries", foreign.len() - 1)),
        };
    }
    if !meta.is_file() {
        return refuse("something that is not a regular file or directory".into());
    }
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned());
    if name.is_some_and(|n| OUR_NAMES.contains(&n.as_str())) {
        return Ok(()); // a file by one of the names esft-rs writes in its folders
    }
    match sniff(target, meta.len()) {
        Ok(None) => Ok(()),
        Ok(Some(what)) => refuse(what),
        Err(e) => Err(Error::io(target, e)),
    }
}

/// Names of entries under `dir` that esft-rs does not write (entries that
/// vanish while being looked at, as with a concurrent run, are skipped).
fn foreign_entries(dir: &Path, top: bool, keep: &[String], found: &mut Vec<String>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let path = entry.path();
        let ours = if name.contains(STAGING_MARK) || (top && keep.contains(&name)) {
            true
        } else if kind.is_dir() {
            let known = ["checkpoints", "tensorboard"].contains(&name.as_str())
                || numbered(&name, "step-")
                || numbered(&name, "rank_");
            if known {
                foreign_entries(&path, false, keep, found);
            }
            known
        } else {
            kind.is_file() && ours_by_name(&name)
        };
        if !ours {
            found.push(path.display().to_string());
        }
    }
}

/// Refuses to replace a directory with a file, or a file with a directory: whatever
/// it holds, it is not an earlier run of this output.
pub fn check_kind(target: &Path, dir: bool) -> Result<()> {
    let kind = |d: bool| if d { "directory" } else { "file" };
    match fs::metadata(target) {
        Ok(m) if m.is_dir() != dir => Err(Error::Usage(format!(
            "{}: is a {}, and this output is a {}; not replaced (remove it or choose another output)",
            target.display(),
            kind(m.is_dir()),
            kind(dir)
        ))),
        _ => Ok(()),
    }
}

fn numbered(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Files a checkpoint directory holds (weights, index, configs, tokenizer) and
/// the files esft-rs itself writes into its output directories.
const OUR_NAMES: [&str; 6] = [
    "merges.txt",
    "vocab.txt",
    "train_config.yaml",
    "metrics.jsonl",
    "chat_template.jinja",
    "report.md",
];

fn ours_by_name(name: &str) -> bool {
    const EXTENSIONS: [&str; 6] = [".safetensors", ".json", ".npy", ".pt", ".model", ".tiktoken"];
    EXTENSIONS.iter().any(|e| name.ends_with(e))
        || OUR_NAMES.contains(&name)
        || name.starts_with("events.out.tfevents.")
}

/// None for a file esft-rs could have written (or an empty one); otherwise what it is.
fn sniff(path: &Path, len: u64) -> io::Result<Option<String>> {
    if len == 0 {
        return Ok(None);
    }
    let mut head = Vec::with_capacity(4096);
    fs::File::open(path)?.take(4096).read_to_end(&mut head)?;
    let starts = |magic: &[u8]| head.starts_with(magic);
    if starts(b"\x89PNG") || starts(b"%PDF") || starts(b"\x93NUMPY") || starts(b"\xff\xd8\xff")
        || starts(b"%!PS") || starts(b"<?xml") || starts(b"<svg")
    {
        return Ok(None);
    }
    if head.len() >= 9 && head[8] == b'{' {
        let mut n = [0u8; 8];
        n.copy_from_slice(&head[..8]);
        if u64::from_le_bytes(n).checked_add(8).is_some_and(|end| end <= len) {
            return Ok(None); // a safetensors header
        }
    }
    let first = head.iter().find(|b| !b.is_ascii_whitespace());
    // A JSON file, not JSON Lines: one value, parsed whole (our JSON outputs are small).
    if matches!(first, Some(b'{' | b'[')) && len <= 64 << 20 {
        let reader = io::BufReader::new(fs::File::open(path)?);
        if serde_json::from_reader::<_, serde::de::IgnoredAny>(reader).is_ok() {
            return Ok(None);
        }
    }
    let text = std::str::from_utf8(&head).is_ok()
        || std::str::from_utf8(&head[..head.len().saturating_sub(3)]).is_ok();
    Ok(Some(format!(
        "a {} file of {len} bytes",
        if text { "text" } else { "binary" }
    )))
}

fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// (parent directory, file name) of an output path.
fn split_target(target: &Path) -> Result<(PathBuf, String)> {
    let name = target
        .file_name()
        .ok_or_else(|| Error::Usage(format!("{}: not a file name", target.display())))?;
    let parent = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok((parent.to_path_buf(), name.to_string_lossy().into_owned()))
}

/// The folder `target` goes in, when it exists and this process may create entries there
/// (a read-only folder or file system is named now, not as a hidden staging name later).
fn writable_parent(target: &Path) -> Result<PathBuf> {
    let (parent, _) = split_target(target)?;
    fs::metadata(&parent).map_err(|e| Error::io(&parent, e))?;
    #[cfg(target_os = "linux")]
    rustix::fs::access(&parent, rustix::fs::Access::WRITE_OK)
        .map_err(|e| Error::io(&parent, e.into()))?;
    Ok(parent)
}

fn host() -> String {
    let name = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = name.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
    if name.is_empty() {
        "host".into()
    } else {
        name
    }
}

/// Most bytes of an output's name that go into its staging names: with the mark, a host
/// name (at most 64 bytes), a pid and a nonce, a staging name stays within the 255 bytes
/// a file name may have, so that any name an output may have can be staged.
const STAGED_NAME_BYTES: usize = 120;

/// `name` as it appears in its staging names: whole when short; else its first bytes (at a
/// character boundary) and a hash of the whole, so that two long names stay apart.
fn staging_stem(name: &str) -> String {
    if name.len() <= STAGED_NAME_BYTES {
        return name.to_string();
    }
    let mut end = STAGED_NAME_BYTES - 17;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    // FNV-1a: stable across runs and builds, as clear_stale needs.
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{}~{hash:016x}", &name[..end])
}

/// A staging name for `NAME` beside it, unique to this process and call.
fn staging_name(parent: &Path, name: &str) -> PathBuf {
    let name = staging_stem(name);
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let nonce = nanos ^ COUNTER.fetch_add(1, Ordering::Relaxed).rotate_left(40);
    parent.join(format!(
        ".{name}{STAGING_MARK}{}.{}.{nonce:x}",
        host(),
        std::process::id()
    ))
}

/// Removes staging copies of `name` left by processes of this host that no
/// longer run (killed mid-write, or between a swap and its cleanup).
fn clear_stale(parent: &Path, name: &str) {
    if !Path::new("/proc/self").exists() {
        return; // no way to tell a dead process from a live one here
    }
    let prefix = format!(".{}{STAGING_MARK}", staging_stem(name));
    let me = host();
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = file.strip_prefix(&prefix) else {
            continue;
        };
        let mut parts = rest.rsplitn(3, '.');
        let (_, pid, h) = (parts.next(), parts.next(), parts.next());
        let dead = pid.is_some_and(|p| !Path::new("/proc").join(p).exists());
        if h == Some(me.as_str()) && dead {
            // Best effort: a copy we cannot remove does not stop this run.
            let _ = remove_any(&entry.path());
        }
    }
}

/// Permissions a new file gets from the user's umask (library writers such as
/// safetensors create 0600 files; `fs::copy` keeps the source's).
fn file_mode() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Umask:"))?;
    let umask = u32::from_str_radix(line.trim_start_matches("Umask:").trim(), 8).ok()?;
    Some(0o666 & !umask)
}

#[cfg(unix)]
pub fn set_mode(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match file_mode() {
        Some(mode) => fs::set_permissions(path, fs::Permissions::from_mode(mode)),
        None => Ok(()),
    }
}

#[cfg(not(unix))]
pub fn set_mode(_: &Path) -> io::Result<()> {
    Ok(())
}

/// Why a rename flag cannot be used here (old kernel, filesystem without it).
#[cfg(target_os = "linux")]
fn unsupported(e: &rustix::io::Errno) -> bool {
    use rustix::io::Errno;
    [Errno::INVAL, Errno::NOSYS, Errno::OPNOTSUPP].contains(e)
}

/// Renames `from` to `to` only if `to` does not exist (`AlreadyExists` otherwise).
fn rename_new(from: &Path, to: &Path) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use rustix::fs::{renameat_with, RenameFlags, CWD};
        match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
            Ok(()) => return Ok(()),
            Err(e) if unsupported(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if fs::symlink_metadata(to).is_ok() {
        return Err(io::ErrorKind::AlreadyExists.into());
    }
    fs::rename(from, to)
}

/// Swaps `a` and `b` in one step; `Ok(false)` where the system cannot.
fn exchange(a: &Path, b: &Path) -> io::Result<bool> {
    #[cfg(target_os = "linux")]
    {
        use rustix::fs::{renameat_with, RenameFlags, CWD};
        match renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE) {
            Ok(()) => return Ok(true),
            Err(e) if unsupported(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let _ = (a, b);
    Ok(false)
}

fn taken(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::AlreadyExists || e.kind() == io::ErrorKind::DirectoryNotEmpty
}

/// Puts the finished `tmp` at `target`: a rename into an empty place, or a swap
/// with the existing output (then removed). Retries when a concurrent run
/// creates or removes the target in between.
fn install(tmp: &Path, target: &Path, overwrite: bool, keep: &[String]) -> Result<()> {
    match install_with(tmp, target, overwrite, keep, exchange)? {
        Some(old) => remove_any(&old).map_err(|e| Error::io(&old, e)),
        None => Ok(()),
    }
}

/// `install`, with the exchange as a parameter (tests take the fallback path).
/// Returns where the output it replaced now lies (under a staging name), for the
/// caller to remove, or to put back (`restore`) when a later output of the same
/// command fails.
fn install_with(
    tmp: &Path,
    target: &Path,
    overwrite: bool,
    keep: &[String],
    exchange: fn(&Path, &Path) -> io::Result<bool>,
) -> Result<Option<PathBuf>> {
    let (parent, name) = split_target(target)?;
    for _ in 0..16 {
        match rename_new(tmp, target) {
            Ok(()) => return Ok(None),
            Err(e) if taken(&e) => {}
            Err(e) => return Err(Error::io(target, e)),
        }
        check_target(target, overwrite, keep)?;
        match exchange(tmp, target) {
            // `tmp` now holds the old output.
            Ok(true) => return Ok(Some(tmp.to_path_buf())),
            Ok(false) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(target, e)),
        }
        // No exchange: move the old output aside under a staging name (cleared
        // later if this process dies), then rename into the empty place.
        let aside = staging_name(&parent, &name);
        match fs::rename(target, &aside) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(target, e)),
        }
        match rename_new(tmp, target) {
            Ok(()) => return Ok(Some(aside)),
            Err(e) => {
                remove_any(&aside).map_err(|e| Error::io(&aside, e))?;
                if !taken(&e) {
                    return Err(Error::io(target, e));
                }
            }
        }
    }
    Err(Error::Usage(format!(
        "{}: other processes keep replacing this output; try again",
        target.display()
    )))
}

/// Test hook: with `ESFT_RS_TEST_INTERRUPT=SIGNAL@commit:NAME` (SIGNAL: KILL or
/// INT) in the environment, this process signals itself just before committing
/// an output named NAME, so tests can interrupt at a known moment. Returns
/// whether the job should stop as on Ctrl-C.
fn interrupt_point(target: &Path) -> bool {
    let Ok(spec) = std::env::var("ESFT_RS_TEST_INTERRUPT") else {
        return false;
    };
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned());
    let Some((signal, point)) = spec.split_once('@') else {
        return false;
    };
    if Some(point) != name.map(|n| format!("commit:{n}")).as_deref() {
        return false;
    }
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{getpid, kill_process, Signal};
        let sig = if signal == "KILL" { Signal::KILL } else { Signal::INT };
        let _ = kill_process(getpid(), sig);
    }
    signal != "KILL"
}

pub struct Staged {
    target: PathBuf,
    tmp: PathBuf,
    dir: bool,
    committed: bool,
}

impl Staged {
    /// Starts a staged file (`dir == false`) or directory at `target`.
    pub fn new(target: &Path, dir: bool) -> Result<Self> {
        writable_parent(target)?;
        check_kind(target, dir)?;
        let (parent, name) = split_target(target)?;
        clear_stale(&parent, &name);
        let tmp = staging_name(&parent, &name);
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

    /// Where to write: the staging file, or the staging directory.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Moves the finished output into place. An existing target is replaced
    /// only with `overwrite`, and only if esft-rs could have written it
    /// (`keep`: see `check_target`).
    pub fn commit(mut self, overwrite: bool, keep: &[String]) -> Result<()> {
        if interrupt_point(&self.target) {
            return Err(Error::Cancelled);
        }
        check_target(&self.target, overwrite, keep)?;
        check_kind(&self.target, self.dir)?;
        if !self.dir {
            set_mode(&self.tmp).map_err(|e| Error::io(&self.tmp, e))?;
        }
        install(&self.tmp, &self.target, overwrite, keep)?;
        self.committed = true;
        Ok(())
    }
}

/// Commits the staged outputs of one command together: each replaces its target
/// with the old output kept aside, and only when all are in place are the old ones
/// removed. When one fails, those already in place are put back as they were, so a
/// user's earlier outputs are never lost to a half-finished command. Each item:
/// (staged output, overwrite, keep) as for `Staged::commit`.
pub fn commit_all(items: Vec<(Staged, bool, Vec<String>)>) -> Result<()> {
    for (staged, overwrite, keep) in &items {
        if interrupt_point(&staged.target) {
            return Err(Error::Cancelled);
        }
        check_target(&staged.target, *overwrite, keep)?;
        check_kind(&staged.target, staged.dir)?;
        if !staged.dir {
            set_mode(&staged.tmp).map_err(|e| Error::io(&staged.tmp, e))?;
        }
    }
    // (target, where the output it replaced lies) for each output in place.
    let mut placed: Vec<(PathBuf, Option<PathBuf>)> = Vec::new();
    for (staged, overwrite, keep) in &items {
        match install_with(&staged.tmp, &staged.target, *overwrite, keep, exchange) {
            Ok(old) => placed.push((staged.target.clone(), old)),
            Err(e) => {
                for (target, old) in placed.iter().rev() {
                    // Best effort: the failure is the error to report.
                    let _ = restore(target, old.as_deref());
                }
                return Err(e);
            }
        }
    }
    let mut items = items;
    for (staged, _, _) in &mut items {
        staged.committed = true;
    }
    for (_, old) in placed {
        if let Some(old) = old {
            remove_any(&old).map_err(|e| Error::io(&old, e))?;
        }
    }
    Ok(())
}

/// Undoes `install_with`: the old output (`old`, or nothing) back at `target`; the
/// new one is removed.
fn restore(target: &Path, old: Option<&Path>) -> io::Result<()> {
    let Some(old) = old else {
        return remove_any(target);
    };
    if !exchange(old, target)? {
        let (parent, name) = split_target(target).map_err(io::Error::other)?;
        let aside = staging_name(&parent, &name);
        fs::rename(target, &aside)?;
        rename_new(old, target)?;
        return remove_any(&aside);
    }
    remove_any(old) // now the new output
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
    #[test]
    fn long_output_names_can_be_staged() {
        let d = tempfile::tempdir().unwrap();
        for len in [200, 215, 240, 255] {
            let target = d.path().join("x".repeat(len));
            let s = Staged::new(&target, false).unwrap();
            fs::write(s.path(), b"1").unwrap();
            s.commit(false, &[]).unwrap();
            assert_eq!(fs::read(&target).unwrap(), b"1");
        }
        let (a, b) = ("a".repeat(200) + "1", "a".repeat(200) + "2");
        assert_ne!(staging_stem(&a), staging_stem(&b));
        assert!(staging_stem(&"é".repeat(100)).len() <= STAGED_NAME_BYTES);
    }

    use super::*;

    fn names(d: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn file_and_dir() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("out.safetensors");
        let s = Staged::new(&target, false).unwrap();
        fs::write(s.path(), b"").unwrap();
        assert!(s
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".out.safetensors.esft-staging."));
        s.commit(false, &[]).unwrap();

        let s = Staged::new(&target, false).unwrap();
        fs::write(s.path(), b"y").unwrap();
        assert!(s.commit(false, &[]).is_err());
        assert_eq!(fs::read(&target).unwrap(), b"");
        assert_eq!(names(d.path()), ["out.safetensors"], "staging removed on failure");

        let dir = d.path().join("model");
        for (content, overwrite) in [(&b"1"[..], false), (&b"2"[..], true)] {
            let s = Staged::new(&dir, true).unwrap();
            fs::write(s.path().join("config.json"), content).unwrap();
            s.commit(overwrite, &[]).unwrap();
        }
        assert_eq!(fs::read(dir.join("config.json")).unwrap(), b"2");
        assert_eq!(names(d.path()), ["model", "out.safetensors"]);
    }

    #[test]
    fn fallback_without_exchange() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("model");
        for content in [&b"1"[..], &b"2"[..]] {
            let s = Staged::new(&dir, true).unwrap();
            fs::write(s.path().join("config.json"), content).unwrap();
            if let Some(old) = install_with(s.path(), &dir, true, &[], |_, _| Ok(false)).unwrap() {
                remove_any(&old).unwrap();
            }
        }
        assert_eq!(fs::read(dir.join("config.json")).unwrap(), b"2");
        assert_eq!(names(d.path()), ["model"], "the old output moved aside is removed");
    }

    #[test]
    fn commit_all_puts_back_what_it_replaced_when_one_output_fails() {
        let d = tempfile::tempdir().unwrap();
        let (dir, file) = (d.path().join("records"), d.path().join("stats.safetensors"));
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("layer_1_ids.npy"), b"old").unwrap();
        fs::write(&file, b"").unwrap();
        let new_dir = Staged::new(&dir, true).unwrap();
        fs::write(new_dir.path().join("layer_1_ids.npy"), b"new").unwrap();
        let unwritten = Staged::new(&file, false).unwrap(); // its install fails: nothing there
        let items = vec![(new_dir, true, vec![]), (unwritten, true, vec![])];
        assert!(commit_all(items).is_err());
        assert_eq!(fs::read(dir.join("layer_1_ids.npy")).unwrap(), b"old");
        assert_eq!(names(d.path()), ["records", "stats.safetensors"]);

        let (a, b) = (Staged::new(&dir, true).unwrap(), Staged::new(&file, false).unwrap());
        fs::write(a.path().join("layer_1_ids.npy"), b"new").unwrap();
        fs::write(b.path(), b"").unwrap();
        commit_all(vec![(a, true, vec![]), (b, true, vec![])]).unwrap();
        assert_eq!(fs::read(dir.join("layer_1_ids.npy")).unwrap(), b"new");
        assert_eq!(names(d.path()), ["records", "stats.safetensors"]);
    }

    #[test]
    fn never_replaces_a_directory_with_a_file_or_back() {
        let d = tempfile::tempdir().unwrap();
        let (dir, file) = (d.path().join("run"), d.path().join("r.safetensors"));
        fs::create_dir(&dir).unwrap();
        fs::write(&file, b"").unwrap();
        let err = Staged::new(&dir, false).err().unwrap().to_string();
        assert!(err.contains("is a directory, and this output is a file"), "{err}");
        let err = Staged::new(&file, true).err().unwrap().to_string();
        assert!(err.contains("is a file, and this output is a directory"), "{err}");
        assert_eq!(names(d.path()), ["r.safetensors", "run"]);
    }

    #[test]
    fn refuses_foreign_outputs() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("model");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("config.json"), b"{}").unwrap();
        fs::write(dir.join("notes.txt"), b"mine").unwrap();
        let err = check_target(&dir, true, &[]).unwrap_err().to_string();
        assert!(err.contains("notes.txt") && err.contains("did not write"), "{err}");
        check_target(&dir, true, &["notes.txt".into()]).unwrap();

        let data = d.path().join("data.jsonl");
        fs::write(&data, b"{\"a\": 1}\n{\"a\": 2}\n").unwrap();
        let err = check_replaceable(&data, &[]).unwrap_err().to_string();
        assert!(err.contains("a text file of 18 bytes"), "{err}");
        fs::write(&data, b"{\"a\": 1}\n").unwrap();
        check_replaceable(&data, &[]).unwrap();
    }

    #[test]
    fn guard_resolves_links_and_missing_paths() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base");
        fs::create_dir(&base).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(&base, d.path().join("link")).unwrap();
        let inside = d.path().join("x/../link/new/out");
        #[cfg(unix)]
        assert!(check_paths(&[&inside], &[&base]).is_err());
        assert!(check_paths(&[d.path()], &[&base]).is_err());
        assert!(check_paths(&[&d.path().join("a")], &[&base]).is_ok());
        let (a, b) = (d.path().join("a"), d.path().join("a/b.json"));
        let err = check_paths(&[&a, &b], &[]).unwrap_err().to_string();
        assert!(err.contains("collide"), "{err}");
    }

    #[test]
    fn clears_copies_of_dead_processes() {
        let d = tempfile::tempdir().unwrap();
        let stale = d
            .path()
            .join(format!(".out{STAGING_MARK}{}.999999999.1", host()));
        fs::create_dir(&stale).unwrap();
        let s = Staged::new(&d.path().join("out"), true).unwrap();
        assert!(!stale.exists() || !Path::new("/proc/self").exists());
        s.commit(false, &[]).unwrap();
        assert_eq!(names(d.path()).len(), 1 + usize::from(stale.exists()));
    }
}
