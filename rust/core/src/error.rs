//! Typed errors of the core. Every variant names the file it concerns, so that
//! the CLI can print one line that says where and what.

use std::io;
use std::path::{Path, PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a file is not a valid safetensors file (mirrors the reference checks).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("file is {0} bytes, shorter than the 8-byte header length")]
    HeaderTooSmall(u64),
    #[error("header length {0} exceeds the 100000000-byte limit")]
    HeaderTooLarge(u64),
    #[error("header length {len} points past the end of the file ({file_len} bytes)")]
    HeaderPastEnd { len: u64, file_len: u64 },
    #[error("header is not valid UTF-8")]
    HeaderNotUtf8,
    #[error("header is not a JSON object")]
    HeaderNotObject,
    #[error("header is not valid JSON: {0}")]
    HeaderJson(String),
    #[error("duplicate tensor name {0:?}")]
    DuplicateTensor(String),
    #[error("tensor {name:?}: {reason}")]
    BadTensorInfo { name: String, reason: String },
    #[error("__metadata__ must map strings to strings: {0}")]
    BadMetadata(String),
    #[error("tensor {name:?}: shape {shape:?} overflows the size computation")]
    Overflow { name: String, shape: Vec<u64> },
    #[error("tensor {name:?}: {dtype} shape {shape:?} needs {expected} bytes but data_offsets span {actual}")]
    SizeMismatch {
        name: String,
        dtype: String,
        shape: Vec<u64>,
        expected: u64,
        actual: u64,
    },
    #[error("tensor {name:?}: {dtype} shape {shape:?} does not fill a whole number of bytes")]
    Misaligned {
        name: String,
        dtype: String,
        shape: Vec<u64>,
    },
    #[error("tensor {name:?}: data_offsets [{start}, {end}] are not contiguous with the previous tensor (expected start {expected})")]
    BadOffsets {
        name: String,
        start: u64,
        end: u64,
        expected: u64,
    },
    #[error("data section is {actual} bytes but the tensors cover {expected}")]
    DataLength { expected: u64, actual: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", OneLine(&path.to_string_lossy()))]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: {source}", OneLine(&path.to_string_lossy()))]
    Format { path: PathBuf, source: FormatError },
    /// A file that parses but does not say what we need (bad index, bad config).
    #[error("{}: {}", OneLine(&path.to_string_lossy()), OneLine(reason))]
    Invalid { path: PathBuf, reason: String },
    /// Inputs that are each valid but do not fit together.
    #[error("{}", OneLine(.0))]
    Mismatch(String),
    /// Bad values in in-memory input (arrays, arguments) rather than in a file.
    #[error("{}", OneLine(.0))]
    Value(String),
    /// Arguments that cannot work together (e.g. an output that is an input).
    #[error("{}", OneLine(.0))]
    Usage(String),
    /// The watcher asked the job to stop (Ctrl-C); partial outputs are removed.
    #[error("cancelled")]
    Cancelled,
}

/// Shows text with its control characters escaped (`\n` as `\\n`), so that an
/// error stays one line even when a path or a name read from a file holds a
/// newline: the CLI promises one line per error.
struct OneLine<'a>(&'a str);

impl std::fmt::Display for OneLine<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;

        for c in self.0.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_debug())?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

impl Error {
    pub fn io(path: &Path, source: io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn format(path: &Path, source: FormatError) -> Self {
        Error::Format {
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn invalid(path: &Path, reason: impl Into<String>) -> Self {
        Error::Invalid {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// Whether something other than a directory is at `path` (a dangling link too): an
/// input looked up by name (an index, a shard, a config) is then opened with `open_input`,
/// so a pipe or device by that name is refused in one line naming it, not skipped.
pub fn present(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok() && !path.is_dir()
}

/// Opens an input for reading, after checking with `stat` that it is a regular
/// file: a named pipe would block the open until a writer comes, and a device
/// or socket is never what a user meant.
pub fn open_input(path: &Path) -> Result<std::fs::File> {
    let kind = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.file_type();
    if kind.is_file() {
        return std::fs::File::open(path).map_err(|e| Error::io(path, e));
    }
    let what = if kind.is_dir() { "a directory" } else { special_kind(kind) };
    Err(Error::invalid(path, format!("is {what}, not a regular file")))
}

#[cfg(unix)]
fn special_kind(kind: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;

    if kind.is_fifo() {
        "a named pipe"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else {
        "not a regular file"
    }
}

#[cfg(not(unix))]
fn special_kind(_: std::fs::FileType) -> &'static str {
    "not a regular file"
}

/// A text input (checked as `open_input` does), which must be UTF-8. A byte-order
/// mark before the text (Windows editors write one) is dropped, as Python's
/// `utf-8-sig` does: serde_json refuses it.
pub fn read_input_text(path: &Path) -> Result<String> {
    use std::io::Read;

    let mut bytes = Vec::new();
    open_input(path)?
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    let bom = if bytes.starts_with(b"\xef\xbb\xbf") { 3 } else { 0 };
    bytes.drain(..bom);
    String::from_utf8(bytes).map_err(|e| {
        let at = bom + e.utf8_error().valid_up_to();
        Error::invalid(path, format!("not valid UTF-8 (byte {at})"))
    })
}

/// `s` with control characters escaped (`\n` -> `\\n`), so that a message quoting
/// user text stays one line.
pub fn one_line(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shard named in an index with a newline once printed a two-line error.
    #[test]
    fn errors_are_one_line() {
        let nl = Path::new("/tmp/model-1.safet\nsors");
        let missing = io::Error::from(io::ErrorKind::NotFound);
        assert_eq!(
            Error::io(nl, missing).to_string(),
            "/tmp/model-1.safet\\nsors: entity not found"
        );
        assert_eq!(Error::invalid(nl, "bad\r\nname").to_string(), "/tmp/model-1.safet\\nsors: bad\\r\\nname");
        assert_eq!(Error::Value("a\tb é".into()).to_string(), "a\\tb é");
    }

    #[test]
    fn text_inputs_may_start_with_a_byte_order_mark() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("config.json");
        std::fs::write(&path, b"\xef\xbb\xbf{\"a\": 1}").unwrap();
        assert_eq!(read_input_text(&path).unwrap(), "{\"a\": 1}");
        std::fs::write(&path, b"\xef\xbb\xbf{\xff}").unwrap();
        let err = read_input_text(&path).unwrap_err().to_string();
        assert!(err.ends_with("not valid UTF-8 (byte 4)"), "{err}");
    }
}
