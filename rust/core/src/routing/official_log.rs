//! The official ESFT routing logs: a folder of `expert_weights_{layer}.txt`,
//! directly or in `rank_*` subfolders (one per data-parallel rank). Each line
//! is one forward pass: the flattened top-K expert ids of its tokens separated
//! by tabs, a double tab, then the matching routing weights.
//!
//! Files are memory-mapped (bulk text, tens of MB: reading them into memory
//! instead costs about 40% more, `benches/bench_aggregate.py`) and cut into
//! chunks at line boundaries; chunks are parsed in parallel with hand-written number parsing, and their partial
//! histograms are summed in file order, so results do not depend on the number
//! of threads. Each line counts as one sample for the per-sample averages.

use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;

use super::RoutingStats;
use crate::error::{open_input, Error, Result};

/// Bytes per parse task (cut at the next newline).
const CHUNK_BYTES: usize = 1 << 20;
/// Largest expert id accepted when the caller does not bound it.
const MAX_EXPERT_ID: u64 = super::MAX_EXPERTS as u64;

/// One `expert_weights_{layer}.txt` file.
struct LogFile {
    layer: u32,
    path: PathBuf,
}

/// Reads a log folder into statistics. `num_experts` bounds the ids (default:
/// max id + 1 over all layers).
pub fn read_dir(dir: &Path, top_k: usize, num_experts: Option<usize>) -> Result<RoutingStats> {
    super::check_sizes(num_experts, top_k)?;
    let files = find_files(dir)?;
    let maps = files.iter().map(|f| map_file(&f.path)).collect::<Result<Vec<_>>>()?;
    let tasks: Vec<(usize, std::ops::Range<usize>)> = maps
        .iter()
        .enumerate()
        .flat_map(|(i, m)| chunks(m).into_iter().map(move |r| (i, r)))
        .collect();
    let bound = num_experts.map_or(MAX_EXPERT_ID, |e| (e as u64).min(u64::from(u32::MAX)));
    let partials: Vec<Partial> = tasks
        .par_iter()
        .map(|(i, range)| parse_chunk(&maps[*i][range.clone()], top_k, bound))
        .collect();
    if let Some(((i, range), (offset, msg))) = tasks
        .iter()
        .zip(&partials)
        .find_map(|(t, p)| p.error.clone().map(|e| (t, e)))
    {
        let line = 1 + memchr::memchr_iter(b'\n', &maps[*i][..range.start + offset]).count();
        let at = PathBuf::from(format!("{}:{line}", files[*i].path.display()));
        return Err(Error::invalid(&at, msg));
    }

    let mut layers: Vec<u32> = files.iter().map(|f| f.layer).collect();
    layers.sort_unstable();
    layers.dedup();
    let e = num_experts.unwrap_or_else(|| partials.iter().map(|p| p.bins.len()).max().unwrap_or(0));
    if e == 0 {
        return Err(Error::invalid(dir, "the routing logs hold no records"));
    }
    let mut stats = RoutingStats::zeros(layers, e, top_k);
    let mut lines = vec![0u64; stats.layers.len()];
    for ((i, _), p) in tasks.iter().zip(&partials) {
        let row = stats.layers.binary_search(&files[*i].layer).unwrap_or(0);
        for (x, bin) in p.bins.iter().enumerate() {
            let cell = row * e + x;
            stats.counts[cell] += bin[0] as i64;
            stats.gate_sum[cell] += bin[1];
            stats.sample_token_sum[cell] += bin[2];
            stats.sample_gate_sum[cell] += bin[3];
        }
        stats.tokens[row] += p.tokens as i64;
        lines[row] += p.lines;
    }
    if let Some(row) = lines.iter().position(|&n| n != lines[0]) {
        return Err(Error::invalid(
            dir,
            format!(
                "layers disagree on the number of forward passes: layer {} has {} lines, layer {} has {}",
                stats.layers[0], lines[0], stats.layers[row], lines[row]
            ),
        ));
    }
    stats.num_samples = lines[0];
    stats.metadata.push(("source".into(), "official-log".into()));
    Ok(stats)
}

/// The layer number of an `expert_weights_{layer}.txt` name.
fn layer_of(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("expert_weights_")?.strip_suffix(".txt")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn list(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        out.push((entry.file_name().to_string_lossy().into_owned(), entry.path()));
    }
    out.sort();
    Ok(out)
}

fn log_files(dir: &Path) -> Result<Vec<LogFile>> {
    let mut files: Vec<LogFile> = list(dir)?
        .into_iter()
        .filter_map(|(name, path)| layer_of(&name).map(|layer| LogFile { layer, path }))
        .collect();
    files.sort_by_key(|f| f.layer);
    Ok(files)
}

/// Log files directly in `dir`, else in its `rank_*` folders (which must hold
/// the same layers).
fn find_files(dir: &Path) -> Result<Vec<LogFile>> {
    let direct = log_files(dir)?;
    if !direct.is_empty() {
        return Ok(direct);
    }
    let mut all = Vec::new();
    let mut expected: Option<(PathBuf, Vec<u32>)> = None;
    for (name, path) in list(dir)? {
        if !name.starts_with("rank_") || !path.is_dir() {
            continue;
        }
        let files = log_files(&path)?;
        let layers: Vec<u32> = files.iter().map(|f| f.layer).collect();
        match &expected {
            None => expected = Some((path.clone(), layers)),
            Some((first, want)) if *want != layers => {
                return Err(Error::invalid(
                    &path,
                    format!("holds log files for layers {layers:?} but {} holds {want:?}", first.display()),
                ))
            }
            Some(_) => {}
        }
        all.extend(files);
    }
    if all.is_empty() {
        return Err(Error::invalid(
            dir,
            "no official routing logs (expert_weights_<layer>.txt, directly or in rank_* folders)",
        ));
    }
    Ok(all)
}

/// File bytes, memory-mapped (an empty file maps to nothing).
enum Bytes {
    Map(Mmap),
    Empty,
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Map(m) => m,
            Bytes::Empty => &[],
        }
    }
}

fn map_file(path: &Path) -> Result<Bytes> {
    let file = open_input(path)?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len == 0 {
        return Ok(Bytes::Empty);
    }
    // SAFETY: memmap2 maps the file shared and read-only; the map lives only
    // for this call and we never write to it. A `&[u8]` over it stays valid
    // only while no other process truncates or rewrites the log: the parser
    // treats every byte as untrusted (any content is a typed error, never UB),
    // but a truncation under the map would fault. Logs are inputs at rest, as
    // with any mmap reader; the header and tensor readers use positional reads.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    Ok(Bytes::Map(map))
}

/// Splits bytes into ranges of about `CHUNK_BYTES`, each ending after a newline
/// (or at the end).
fn chunks(bytes: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < bytes.len() {
        let probe = (start + CHUNK_BYTES).min(bytes.len());
        let end = match memchr::memchr(b'\n', &bytes[probe..]) {
            Some(i) if probe < bytes.len() => probe + i + 1,
            _ => bytes.len(),
        };
        out.push(start..end);
        start = end;
    }
    out
}

/// Per expert: selections, gate sum, sample token score sum, sample gate sum
/// (one 4-wide add per record; counts stay exact in f64 far beyond a chunk).
type Bin = [f64; 4];

#[derive(Default)]
struct Partial {
    bins: Vec<Bin>,
    tokens: u64,
    lines: u64,
    /// Byte offset (within the chunk) of the bad line, and what is wrong.
    error: Option<(usize, String)>,
}

fn parse_chunk(bytes: &[u8], k: usize, bound: u64) -> Partial {
    let mut p = Partial::default();
    let mut ids = Vec::new();
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', bytes).chain(std::iter::once(bytes.len())) {
        let line = &bytes[start..end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if !line.is_empty() {
            if let Err(msg) = add_line(line, k, bound, &mut ids, &mut p) {
                p.error = Some((start, msg));
                return p;
            }
        }
        start = end + 1;
    }
    p
}

/// Parses `id\tid...\t\tw\tw...` and adds it to `p` as one sample: the ids
/// first (kept in `ids`), then each weight straight into its expert's bin.
fn add_line(line: &[u8], k: usize, bound: u64, ids: &mut Vec<u32>, p: &mut Partial) -> Result<(), String> {
    ids.clear();
    let n = line.len();
    let mut i = 0;
    let mut max = 0;
    loop {
        let (id, next) = parse_short_id(line, i)
            .or_else(|| parse_id(line, i))
            .ok_or_else(|| format!("expected an expert id at column {}", i + 1))?;
        if id >= bound {
            return Err(if bound == MAX_EXPERT_ID {
                format!("expert id {id} is implausibly large")
            } else {
                format!("expert id {id} is out of range [0, {bound})")
            });
        }
        // Below `bound`, which the caller keeps under 2^32.
        ids.push(id as u32);
        max = max.max(id as usize);
        i = next + 1;
        match (line.get(next), line.get(i)) {
            (Some(b'\t'), Some(b'\t')) => break,
            (Some(b'\t'), _) => {}
            (None, _) => return Err("no double tab between the expert ids and the weights".into()),
            (Some(_), _) => return Err(format!("expected a tab or a digit at column {}", next + 1)),
        }
    }
    if ids.len() % k != 0 {
        return Err(format!("{} expert ids is not a multiple of top-k = {k}", ids.len()));
    }
    if max >= p.bins.len() {
        p.bins.resize(max + 1, [0.0; 4]);
    }
    let tokens = ids.len() / k;
    let (tok, inv_n) = (1.0 / ids.len() as f64, 1.0 / tokens as f64);
    let mismatch = |weights: usize| format!("{} expert ids but {weights} weights", ids.len());
    i += 1;
    let mut j = 0;
    loop {
        let (w, next) = match parse_short_weight(line, i) {
            Some(fast) => (Some(fast.0), fast.1),
            None => parse_weight(line, i),
        };
        let w = w.ok_or_else(|| {
            let end = memchr::memchr(b'\t', &line[i..]).map_or(n, |j| i + j);
            format!("weight {:?} is not a number", String::from_utf8_lossy(&line[i..end]))
        })?;
        if !(0.0..f64::INFINITY).contains(&w) {
            return Err(format!("weight {w} is not a finite value >= 0"));
        }
        let Some(&e) = ids.get(j) else {
            return Err(mismatch(j + 1 + memchr::memchr_iter(b'\t', &line[next..]).count()));
        };
        let bin = &mut p.bins[e as usize];
        for (b, v) in bin.iter_mut().zip([1.0, w, tok, w * inv_n]) {
            *b += v;
        }
        j += 1;
        if next >= n {
            break;
        }
        i = next + 1;
    }
    if j != ids.len() {
        return Err(mismatch(j));
    }
    p.tokens += tokens as u64;
    p.lines += 1;
    Ok(())
}

/// The common case of a 1- or 2-digit id followed by more bytes, without a
/// data-dependent loop (id lengths alternate unpredictably).
#[inline]
fn parse_short_id(line: &[u8], pos: usize) -> Option<(u64, usize)> {
    let b = line.get(pos..pos + 3)?;
    let (d0, d1, d2) = (b[0].wrapping_sub(b'0'), b[1].wrapping_sub(b'0'), b[2].wrapping_sub(b'0'));
    if d0 > 9 || (d1 <= 9 && d2 <= 9) {
        return None;
    }
    let two = d1 <= 9;
    let id = if two { u64::from(d0) * 10 + u64::from(d1) } else { u64::from(d0) };
    Some((id, pos + 1 + usize::from(two)))
}

/// The official weights' shape, `D.dddd` followed by a tab, read as 8 bytes at
/// once; the same value as the general path (an integer over 10^4).
#[inline]
fn parse_short_weight(line: &[u8], pos: usize) -> Option<(f64, usize)> {
    let b: [u8; 8] = line.get(pos..pos + 8)?.try_into().ok()?;
    let x = u64::from_le_bytes(b);
    // Byte 1 is '.', byte 6 a tab; bytes 0 and 2..=5 digits.
    if x & 0x00ff_0000_0000_ff00 != 0x0009_0000_0000_2e00 {
        return None;
    }
    let digits = (x & 0x0000_ffff_ffff_00ff).wrapping_sub(0x0000_3030_3030_0030);
    if (digits | digits.wrapping_add(0x0000_0606_0606_0006)) & 0xffff_f0f0_f0f0_fff0 != 0 {
        return None;
    }
    let d = |k: u32| (digits >> (8 * k)) & 0xff;
    let v = d(0) * 10_000 + d(2) * 1000 + d(3) * 100 + d(4) * 10 + d(5);
    Some((v as f64 / POW10[4], pos + 6))
}

/// A decimal integer (at most 18 digits) starting at `pos`; returns it and the
/// index after it.
#[inline]
fn parse_id(line: &[u8], pos: usize) -> Option<(u64, usize)> {
    let mut v: u64 = 0;
    let mut i = pos;
    while let Some(&b) = line.get(i) {
        let d = b.wrapping_sub(b'0');
        if d > 9 {
            break;
        }
        v = v * 10 + u64::from(d);
        i += 1;
        if i - pos > 18 {
            return None;
        }
    }
    (i > pos).then_some((v, i))
}

/// Exact powers of ten representable in f64.
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18,
    1e19, 1e20, 1e21, 1e22,
];

/// Parses the float that starts at `pos` and ends at the next tab (or the end),
/// exactly as Python's `float()` does (correctly rounded); returns it and the
/// index of that tab. Plain decimals of at most 15 digits take the exact fast
/// path (an integer mantissa and a power of ten, both exact in f64, so the one
/// division rounds correctly); anything else goes to the standard parser.
#[inline]
fn parse_weight(line: &[u8], pos: usize) -> (Option<f64>, usize) {
    let n = line.len();
    let mut i = pos;
    let mut mant: u64 = 0;
    let digit = |i: usize| line.get(i).map(|b| b.wrapping_sub(b'0')).filter(|d| *d <= 9);
    while let Some(d) = digit(i) {
        mant = mant.wrapping_mul(10).wrapping_add(u64::from(d));
        i += 1;
    }
    let int_digits = i - pos;
    let mut frac = 0;
    if line.get(i) == Some(&b'.') {
        i += 1;
        while let Some(d) = digit(i) {
            mant = mant.wrapping_mul(10).wrapping_add(u64::from(d));
            i += 1;
            frac += 1;
        }
    }
    if i == n || line[i] == b'\t' {
        let digits = int_digits + frac;
        if digits > 0 && digits <= 15 {
            return (Some(mant as f64 / POW10[frac]), i);
        }
    }
    // Exponents, long mantissas, signs, "nan": the standard (correct) parser.
    let end = memchr::memchr(b'\t', &line[pos..]).map_or(n, |j| pos + j);
    let value = std::str::from_utf8(&line[pos..end]).ok().and_then(|s| s.parse().ok());
    (value, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuzz_official_log() {
        crate::fuzzing::run("official_log", |bytes| {
            for (k, bound) in [(1, MAX_EXPERT_ID), (2, 64), (6, 64)] {
                let p = parse_chunk(bytes, k, bound);
                assert!(p.error.is_some() || p.bins.len() as u64 <= bound);
            }
        });
    }

    #[test]
    fn weights_parse_like_python() {
        for s in ["0.0287", "0.9896", "1", "0.1", "3.0", "1e-05", "0.30000000000000004", "12.5", ".5", "5."] {
            let want: f64 = s.parse().unwrap();
            assert_eq!(parse_weight(s.as_bytes(), 0), (Some(want), s.len()), "{s}");
        }
        for s in ["", ".", "x", "1.2.3", "--1"] {
            assert_eq!(parse_weight(s.as_bytes(), 0).0, None, "{s}");
        }
        assert_eq!(parse_weight(b"1\t0.25\t", 2), (Some(0.25), 6));
        for s in ["0.0287\t0.1", "1.0000\t\t", "9.9999\tx\n"] {
            let want = parse_weight(s.as_bytes(), 0);
            assert_eq!(parse_short_weight(s.as_bytes(), 0).map(|(w, i)| (Some(w), i)), Some(want), "{s}");
        }
        for s in ["0.028\t0.1", "0.02870\t1", "0.0a87\t00", "-0.028\t1", "0.0287"] {
            assert_eq!(parse_short_weight(s.as_bytes(), 0), None, "{s}");
        }
        assert_eq!(parse_short_id(b"7\t1", 0), Some((7, 1)));
        assert_eq!(parse_short_id(b"63\t", 0), Some((63, 2)));
        assert_eq!(parse_short_id(b"631", 0), None);
        assert_eq!(parse_short_id(b"x1\t", 0), None);
    }

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn reads_ranks_and_reports_lines() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        // Two ranks, layers 1 and 2, top-2.
        write(&root.join("rank_0"), "expert_weights_1.txt", "0\t1\t\t0.5\t0.25\n2\t1\t1\t3\t\t1\t1\t0.5\t0.5\n");
        write(&root.join("rank_0"), "expert_weights_2.txt", "0\t1\t\t1\t1\n0\t1\t\t1\t1\n");
        write(&root.join("rank_1"), "expert_weights_1.txt", "3\t0\t\t0.125\t0.125");
        write(&root.join("rank_1"), "expert_weights_2.txt", "3\t2\t\t0\t0\n");
        let s = read_dir(root, 2, None).unwrap();
        assert_eq!(s.layers, vec![1, 2]);
        assert_eq!(s.num_experts, 4);
        assert_eq!(s.counts, vec![2, 3, 1, 2, 2, 2, 1, 1]);
        assert_eq!(&s.gate_sum[..4], &[0.625, 1.75, 1.0, 0.625]);
        assert_eq!(s.tokens, vec![4, 3]);
        assert_eq!(s.num_samples, 3);
        // Line 1 of sample A: 1 token, expert 0 and 1 each 1/2.
        assert_eq!(s.sample_token_sum[0], 0.5 + 0.5);
        assert!(s.problem().is_none(), "{:?}", s.problem());

        write(&root.join("rank_1"), "expert_weights_1.txt", "3\t0\t\t0.125\t0.125\n\n1\t2");
        let err = read_dir(root, 2, None).unwrap_err().to_string();
        assert!(err.ends_with("rank_1/expert_weights_1.txt:3: no double tab between the expert ids and the weights"), "{err}");
        write(&root.join("rank_1"), "expert_weights_1.txt", "3\t0\t\t0.125\tnan\n");
        let err = read_dir(root, 2, None).unwrap_err().to_string();
        assert!(err.ends_with("expert_weights_1.txt:1: weight NaN is not a finite value >= 0"), "{err}");
        write(&root.join("rank_1"), "expert_weights_1.txt", "3\t9\t\t0.125\t0.5\n");
        let err = read_dir(root, 2, Some(4)).unwrap_err().to_string();
        assert!(err.ends_with(":1: expert id 9 is out of range [0, 4)"), "{err}");
        let err = read_dir(root, 3, None).unwrap_err().to_string();
        assert!(err.contains("rank_0/expert_weights_1.txt:1: 2 expert ids is not a multiple of top-k = 3"), "{err}");
        std::fs::remove_file(root.join("rank_1/expert_weights_2.txt")).unwrap();
        let err = read_dir(root, 2, None).unwrap_err().to_string();
        assert!(err.contains("holds log files for layers [1]"), "{err}");
        let err = read_dir(&root.join("rank_1/expert_weights_1.txt"), 2, None).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
    }

    #[test]
    fn chunking_keeps_lines_whole() {
        let line = "1\t2\t\t0.5\t0.5\n".repeat(CHUNK_BYTES / 8);
        let parts = chunks(line.as_bytes());
        assert!(parts.len() > 1);
        assert!(parts.iter().all(|r| line.as_bytes()[r.end - 1] == b'\n'));
        assert_eq!(parts.last().map(|r| r.end), Some(line.len()));
    }
}

