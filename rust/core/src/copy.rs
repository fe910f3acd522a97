//! Copying byte ranges between files without bringing them into user space:
//! `copy_file_range` on Linux (the kernel copies page-cache pages, or shares
//! blocks on copy-on-write filesystems), a bounded read/write loop elsewhere
//! and wherever the syscall is refused (e.g. across filesystems on old kernels).

use std::fs::File;
use std::io;
use std::path::Path;
#[cfg(target_os = "linux")]
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};

/// Ranges longer than this are copied (and reported) in pieces, so progress
/// moves and work spreads over threads even for one huge unchanged range.
pub const CHUNK: u64 = 64 << 20;

/// Alignment of copy calls (the page size on the platforms we build for, or a
/// multiple of it).
const PAGE: u64 = 4096;

/// Buffer of the read/write fallback; bounds its memory per thread.
const FALLBACK_BUF: usize = 1 << 20;

/// Set once the kernel refused `copy_file_range`, so later copies go straight
/// to the fallback.
#[cfg(target_os = "linux")]
static NO_COPY_FILE_RANGE: AtomicBool = AtomicBool::new(false);

/// One piece of an output file: `len` bytes from `src` at `src_off` go to
/// `dst_off` of the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub src_off: u64,
    pub dst_off: u64,
    pub len: u64,
}

/// Appends a range, merging it into the previous one when both are contiguous
/// in source and destination (runs of unchanged tensors become one copy).
pub fn push_coalesced<K: PartialEq>(out: &mut Vec<(K, Range)>, key: K, r: Range) {
    if r.len == 0 {
        return;
    }
    if let Some((k, last)) = out.last_mut() {
        if *k == key && last.src_off + last.len == r.src_off && last.dst_off + last.len == r.dst_off
        {
            last.len += r.len;
            return;
        }
    }
    out.push((key, r));
}

/// Splits ranges into pieces of at most `CHUNK` bytes whose destination
/// offsets, after the first piece, are page-aligned. The kernel copies in
/// page-sized steps from where a call starts; a call that starts mid-page
/// writes every page in two partial pieces, which costs about twice as much.
pub fn chunked<K: Clone>(ranges: Vec<(K, Range)>) -> Vec<(K, Range)> {
    let mut out = Vec::with_capacity(ranges.len());
    for (k, r) in ranges {
        let mut done = 0;
        while done < r.len {
            let to_page = (PAGE - (r.dst_off + done) % PAGE) % PAGE;
            let want = if to_page > 0 { to_page } else { CHUNK };
            let len = (r.len - done).min(want);
            out.push((
                k.clone(),
                Range {
                    src_off: r.src_off + done,
                    dst_off: r.dst_off + done,
                    len,
                },
            ));
            done += len;
        }
    }
    out
}

/// Sizes a new output file. On Linux its blocks are allocated in one go
/// (`fallocate`), which makes the copies into it markedly faster than letting
/// each page allocate on write; where that is unsupported, the file is just
/// extended (sparse).
pub fn preallocate(f: &File, path: &Path, len: u64) -> Result<()> {
    #[cfg(target_os = "linux")]
    if len > 0 {
        match rustix::fs::fallocate(f, rustix::fs::FallocateFlags::empty(), 0, len) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::NOSPC) => {
                return Err(Error::io(path, rustix::io::Errno::NOSPC.into()))
            }
            Err(_) => {}
        }
    }
    f.set_len(len).map_err(|e| Error::io(path, e))
}

/// Copies one range from `src` into `dst` (both opened by the caller; paths
/// are for error messages). Offsets are explicit, so threads may copy into the
/// same output concurrently.
pub fn copy_range(
    src: &File,
    src_path: &Path,
    dst: &File,
    dst_path: &Path,
    r: Range,
) -> Result<()> {
    #[cfg_attr(not(target_os = "linux"), allow(unused_mut))]
    let mut done = 0u64;
    // When source and destination sit at different offsets within a page (an
    // adapter tensor landing in the base's layout), the kernel's page-wise
    // copy splits every page in two; a buffered copy is cheaper there.
    #[cfg(target_os = "linux")]
    if r.src_off % PAGE == r.dst_off % PAGE && !NO_COPY_FILE_RANGE.load(Ordering::Relaxed) {
        match kernel_copy(src, dst, r) {
            Ok(()) => return Ok(()),
            Err((copied, e)) if unsupported(&e) => {
                NO_COPY_FILE_RANGE.store(true, Ordering::Relaxed);
                done = copied;
            }
            Err((_, e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(Error::io(src_path, e))
            }
            Err((_, e)) => return Err(Error::io(dst_path, e)),
        }
    }
    fallback_copy(src, src_path, dst, dst_path, r, done)
}

/// Whether an error means "this syscall cannot do this copy" rather than a
/// real I/O failure.
#[cfg(target_os = "linux")]
fn unsupported(e: &io::Error) -> bool {
    use rustix::io::Errno;
    let Some(code) = e.raw_os_error() else {
        return false;
    };
    let errno = Errno::from_raw_os_error(code);
    [
        Errno::XDEV,
        Errno::NOSYS,
        Errno::OPNOTSUPP,
        Errno::INVAL,
        Errno::PERM,
        Errno::TXTBSY,
    ]
    .contains(&errno)
}

/// Loops `copy_file_range` until the range is done; on error returns how many
/// bytes were copied before it.
#[cfg(target_os = "linux")]
fn kernel_copy(src: &File, dst: &File, r: Range) -> std::result::Result<(), (u64, io::Error)> {
    let mut done = 0u64;
    while done < r.len {
        let mut off_in = r.src_off + done;
        let mut off_out = r.dst_off + done;
        let want = usize::try_from(r.len - done)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        match rustix::fs::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), want) {
            Ok(0) => {
                let e = io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file ended early (changed while reading?)",
                );
                return Err((done, e));
            }
            Ok(n) => done += n as u64,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err((done, e.into())),
        }
    }
    Ok(())
}

thread_local! {
    /// One buffer per thread, reused: a fresh large allocation per range would
    /// cost a page fault per 4 KiB.
    static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn fallback_copy(
    src: &File,
    src_path: &Path,
    dst: &File,
    dst_path: &Path,
    r: Range,
    mut done: u64,
) -> Result<()> {
    BUF.with_borrow_mut(|buf| {
        buf.resize(FALLBACK_BUF, 0);
        while done < r.len {
            let n = FALLBACK_BUF.min(usize::try_from(r.len - done).unwrap_or(usize::MAX));
            read_exact_at(src, &mut buf[..n], r.src_off + done)
                .map_err(|e| Error::io(src_path, e))?;
            write_all_at(dst, &buf[..n], r.dst_off + done).map_err(|e| Error::io(dst_path, e))?;
            done += n as u64;
        }
        Ok(())
    })
}

#[cfg(unix)]
pub fn read_exact_at(f: &File, buf: &mut [u8], off: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(f, buf, off)
}

#[cfg(unix)]
pub fn write_all_at(f: &File, buf: &[u8], off: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(f, buf, off)
}

#[cfg(windows)]
pub fn read_exact_at(f: &File, mut buf: &mut [u8], mut off: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match f.seek_read(buf, off) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                buf = &mut buf[n..];
                off += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(windows)]
pub fn write_all_at(f: &File, mut buf: &[u8], mut off: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match f.seek_write(buf, off) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                buf = &buf[n..];
                off += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(bytes: &[u8]) -> (tempfile::NamedTempFile, File) {
        let mut t = tempfile::NamedTempFile::new().unwrap();
        t.write_all(bytes).unwrap();
        let f = File::open(t.path()).unwrap();
        (t, f)
    }

    #[test]
    fn kernel_and_fallback_agree() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (t, src) = file_with(&data);
        // Same offset within a page (kernel copy), and different ones (buffered).
        for r in [
            Range {
                src_off: 4106,
                dst_off: 10,
                len: 250_000,
            },
            Range {
                src_off: 1000,
                dst_off: 10,
                len: 250_000,
            },
        ] {
            for use_fallback in [false, true] {
                let out = tempfile::NamedTempFile::new().unwrap();
                let dst = File::options()
                    .write(true)
                    .read(true)
                    .open(out.path())
                    .unwrap();
                preallocate(&dst, out.path(), 250_010).unwrap();
                if use_fallback {
                    fallback_copy(&src, t.path(), &dst, out.path(), r, 0).unwrap();
                } else {
                    copy_range(&src, t.path(), &dst, out.path(), r).unwrap();
                }
                let got = std::fs::read(out.path()).unwrap();
                let s = r.src_off as usize;
                assert_eq!(&got[10..], &data[s..s + 250_000]);
                assert_eq!(&got[..10], &[0u8; 10]);
            }
        }
    }

    #[test]
    fn short_source_is_an_error() {
        let (t, src) = file_with(&[1, 2, 3]);
        let out = tempfile::NamedTempFile::new().unwrap();
        let dst = File::options().write(true).open(out.path()).unwrap();
        let r = Range {
            src_off: 0,
            dst_off: 0,
            len: 10,
        };
        let err = copy_range(&src, t.path(), &dst, out.path(), r)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&t.path().display().to_string()), "{err}");
    }

    #[test]
    fn coalesce_and_chunk() {
        let mut v = Vec::new();
        push_coalesced(
            &mut v,
            0,
            Range {
                src_off: 0,
                dst_off: 0,
                len: 8,
            },
        );
        push_coalesced(
            &mut v,
            0,
            Range {
                src_off: 8,
                dst_off: 8,
                len: 8,
            },
        );
        push_coalesced(
            &mut v,
            1,
            Range {
                src_off: 16,
                dst_off: 16,
                len: 8,
            },
        );
        push_coalesced(
            &mut v,
            0,
            Range {
                src_off: 30,
                dst_off: 24,
                len: 0,
            },
        );
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].1.len, 16);
        let c = chunked(vec![(
            (),
            Range {
                src_off: 5,
                dst_off: 7,
                len: 2 * CHUNK + 1,
            },
        )]);
        assert_eq!(c.len(), 3);
        assert_eq!(
            c[0].1,
            Range {
                src_off: 5,
                dst_off: 7,
                len: PAGE - 7
            }
        );
        assert_eq!(
            c[1].1,
            Range {
                src_off: 5 + PAGE - 7,
                dst_off: PAGE,
                len: CHUNK
            }
        );
        assert_eq!(
            c[2].1,
            Range {
                src_off: 5 + PAGE - 7 + CHUNK,
                dst_off: PAGE + CHUNK,
                len: CHUNK - PAGE + 8
            }
        );
        assert_eq!(c.iter().map(|(_, r)| r.len).sum::<u64>(), 2 * CHUNK + 1);
    }
}
