//! Fuzzing on the stable toolchain, under `cargo test`: each parser of user files
//! runs on its seed corpus (`fuzz/corpus/<target>/`, kept in the repository) and on
//! proptest mutations of the seeds (bit flips, truncations, insertions, splices of
//! two seeds) and on random bytes; a panic fails the test with a shrunk input.
//! `ESFT_FUZZ_CASES` sets the cases per target (default 1000; `make fuzz` runs more).
//! `ESFT_FUZZ_SEED` sets the generator's seed: `cargo test` uses a fixed one so
//! that a test run is repeatable, `make fuzz` a new one each run (printed).

use std::path::PathBuf;

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, RngSeed, TestRunner};

/// The seed inputs of `target`, sorted by file name.
pub fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir().join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.map(|e| e.path()).unwrap_or_default())
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .collect()
}

/// One seed file of `target`.
pub fn seed(target: &str, name: &str) -> Vec<u8> {
    let p = corpus_dir().join(target).join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `fuzz/corpus` in the nearest directory above the crate that has one (the
/// crate may sit in a workspace member folder).
fn corpus_dir() -> PathBuf {
    let start = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    start
        .ancestors()
        .map(|a| a.join("fuzz").join("corpus"))
        .find(|p| p.is_dir())
        .unwrap_or_else(|| panic!("no fuzz/corpus above {}", start.display()))
}

#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Set(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Splice(usize, usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    // Bytes that matter to the formats: JSON punctuation, digits, tabs, newlines.
    let special = prop::sample::select(b"{}[]\":,.-+eE0123456789\t\n \\u".to_vec());
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Flip(i, b)),
        (any::<usize>(), special.clone()).prop_map(|(i, b)| Edit::Set(i, b)),
        any::<usize>().prop_map(Edit::Truncate),
        (any::<usize>(), prop::collection::vec(special, 1..8)).prop_map(|(i, v)| Edit::Insert(i, v)),
        (any::<usize>(), any::<usize>(), any::<usize>()).prop_map(|(a, b, c)| Edit::Splice(a, b, c)),
    ]
}

fn apply(seeds: &[Vec<u8>], seed: usize, edits: &[Edit]) -> Vec<u8> {
    let mut out = seeds[seed % seeds.len()].clone();
    for e in edits {
        let at = |i: usize, len: usize| if len == 0 { 0 } else { i % (len + 1) };
        match e {
            Edit::Flip(i, b) if !out.is_empty() => {
                let n = out.len();
                out[i % n] ^= b;
            }
            Edit::Set(i, b) if !out.is_empty() => {
                let n = out.len();
                out[i % n] = *b;
            }
            Edit::Truncate(i) => out.truncate(at(*i, out.len())),
            Edit::Insert(i, v) => {
                let i = at(*i, out.len());
                out.splice(i..i, v.iter().copied());
            }
            Edit::Splice(i, other, j) => {
                let i = at(*i, out.len());
                let other = &seeds[other % seeds.len()];
                out.truncate(i);
                out.extend_from_slice(&other[at(*j, other.len()).min(other.len())..]);
            }
            _ => {}
        }
    }
    out
}

/// Runs `check` on every seed of `target`, then on generated inputs.
pub fn run(target: &str, check: impl Fn(&[u8])) {
    let seeds = corpus(target);
    assert!(!seeds.is_empty(), "empty corpus for {target}");
    seeds.iter().for_each(|s| check(s));
    let cases = std::env::var("ESFT_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let seed = std::env::var("ESFT_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let config = Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        ..Config::default()
    };
    let inputs = prop_oneof![
        4 => (any::<usize>(), prop::collection::vec(edit(), 1..6))
            .prop_map(move |(s, e)| apply(&seeds, s, &e)),
        1 => prop::collection::vec(any::<u8>(), 0..256),
    ];
    TestRunner::new(config)
        .run(&inputs, |bytes| {
            check(&bytes);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("fuzz {target} (ESFT_FUZZ_SEED={seed}): {e}"));
}
