//! Counting per-token routing records (top-K expert ids, optionally their
//! routing weights) into per-layer histograms, reading the caller's arrays in
//! place and splitting the tokens across threads.
//!
//! Each task counts a fixed range of tokens into its own small histogram; the
//! partial histograms are summed in task order, so results do not depend on
//! the number of threads.

use rayon::prelude::*;

use super::RoutingStats;
use crate::error::{Error, Result};

/// Tokens per task: large enough to amortise the per-task histogram, small
/// enough to balance the threads.
const CHUNK_TOKENS: usize = 1 << 15;
/// Largest expert count inferred when the caller does not give one.
const MAX_INFERRED_EXPERTS: u64 = super::MAX_EXPERTS as u64;

/// An integer dtype usable as an expert id.
pub trait ExpertId: Copy + Send + Sync + std::fmt::Display {
    /// The id as an index; negative ids map to values >= 2^63, so one `< E`
    /// comparison rejects both negative and too-large ids.
    fn index(self) -> u64;
    /// Whether all ids are in `[0, e)`: min and max in the native type, which
    /// vectorises (a max over `index()` would need 64-bit unsigned compares).
    fn all_below(ids: &[Self], e: u64) -> bool;
}

macro_rules! expert_id {
    ($($t:ty),*) => {$(
        impl ExpertId for $t {
            #[inline(always)]
            #[allow(clippy::cast_sign_loss, clippy::unnecessary_cast)]
            fn index(self) -> u64 {
                self as i64 as u64
            }
            #[inline(always)]
            #[allow(clippy::unnecessary_cast)]
            fn all_below(ids: &[Self], e: u64) -> bool {
                let (lo, hi) = ids.iter().fold((0, 0), |(lo, hi): ($t, $t), &x| (lo.min(x), hi.max(x)));
                lo >= 0 && (hi as u64) < e
            }
        }
    )*};
}
expert_id!(i8, i16, i32, i64);

macro_rules! expert_id_unsigned {
    ($($t:ty),*) => {$(
        impl ExpertId for $t {
            #[inline(always)]
            #[allow(clippy::unnecessary_cast)]
            fn index(self) -> u64 {
                self as u64
            }
            #[inline(always)]
            #[allow(clippy::unnecessary_cast)]
            fn all_below(ids: &[Self], e: u64) -> bool {
                (ids.iter().fold(0, |hi: $t, &x| hi.max(x)) as u64) < e
            }
        }
    )*};
}
expert_id_unsigned!(u8, u16, u32, u64);

/// A float dtype usable as a routing weight.
pub trait Weight: Copy + Send + Sync + std::fmt::Display {
    fn to_f64(self) -> f64;
    /// Finite and >= 0 (false for NaN), tested in the native type.
    fn is_valid(self) -> bool;
}

impl Weight for f64 {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn is_valid(self) -> bool {
        (0.0..f64::INFINITY).contains(&self)
    }
}

impl Weight for f32 {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    #[inline(always)]
    fn is_valid(self) -> bool {
        (0.0..f32::INFINITY).contains(&self)
    }
}

impl Weight for half::f16 {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        half::f16::to_f64(self)
    }
    #[inline(always)]
    fn is_valid(self) -> bool {
        (0.0..f32::INFINITY).contains(&self.to_f32())
    }
}

/// Routing records as the caller holds them: row-major, C-contiguous.
pub struct Records<'a, I, W> {
    /// Expert ids, `shape` elements.
    pub ids: &'a [I],
    /// Routing weights, same shape as `ids`.
    pub weights: Option<&'a [W]>,
    /// `[tokens, K]` (one layer) or `[layers, tokens, K]`.
    pub shape: &'a [usize],
}

/// Expert ids of any supported dtype, as the caller holds them.
pub enum AnyIds<'a> {
    I8(&'a [i8]),
    I16(&'a [i16]),
    I32(&'a [i32]),
    I64(&'a [i64]),
    U8(&'a [u8]),
    U16(&'a [u16]),
    U32(&'a [u32]),
    U64(&'a [u64]),
}

/// Routing weights of any supported dtype.
pub enum AnyWeights<'a> {
    F16(&'a [half::f16]),
    F32(&'a [f32]),
    F64(&'a [f64]),
}

/// [`count`] for ids and weights of any dtype. The dispatch lives here so that every
/// instantiation of the counting loops is compiled, and optimised, in this crate: the
/// binding crate is built without optimisation for tests (`profile.local`, Cargo.toml).
pub fn count_any(
    ids: AnyIds<'_>,
    weights: Option<AnyWeights<'_>>,
    shape: &[usize],
    num_experts: Option<usize>,
    lengths: Option<&[u64]>,
    layers: Option<Vec<u32>>,
) -> Result<RoutingStats> {
    macro_rules! weighted {
        ($ids:expr) => {
            match weights {
                None => count::<_, f32>(&Records { ids: $ids, weights: None, shape }, num_experts, lengths, layers),
                Some(AnyWeights::F16(w)) => count(&Records { ids: $ids, weights: Some(w), shape }, num_experts, lengths, layers),
                Some(AnyWeights::F32(w)) => count(&Records { ids: $ids, weights: Some(w), shape }, num_experts, lengths, layers),
                Some(AnyWeights::F64(w)) => count(&Records { ids: $ids, weights: Some(w), shape }, num_experts, lengths, layers),
            }
        };
    }
    match ids {
        AnyIds::I8(ids) => weighted!(ids),
        AnyIds::I16(ids) => weighted!(ids),
        AnyIds::I32(ids) => weighted!(ids),
        AnyIds::I64(ids) => weighted!(ids),
        AnyIds::U8(ids) => weighted!(ids),
        AnyIds::U16(ids) => weighted!(ids),
        AnyIds::U32(ids) => weighted!(ids),
        AnyIds::U64(ids) => weighted!(ids),
    }
}

/// One task's slice of the work: a range of tokens of one layer.
struct Task {
    row: usize,
    tokens: std::ops::Range<usize>,
    /// For per-sample averages: the sample lengths covering exactly `tokens`.
    samples: std::ops::Range<usize>,
}

#[derive(Default)]
struct Partial {
    counts: Vec<u64>,
    gate: Vec<f64>,
    sample_token: Vec<f64>,
    sample_gate: Vec<f64>,
    bad: bool,
}

/// Counts records into statistics for `layers` (default `0..L`).
///
/// `num_experts` bounds the ids (inferred as max id + 1 when `None`, at the
/// cost of one more read of the ids). `lengths` splits the tokens into samples
/// for the per-sample averages; without it all tokens form one sample.
pub fn count<I: ExpertId, W: Weight>(
    rec: &Records<'_, I, W>,
    num_experts: Option<usize>,
    lengths: Option<&[u64]>,
    layers: Option<Vec<u32>>,
) -> Result<RoutingStats> {
    let (l, t, k) = match *rec.shape {
        [t, k] => (1, t, k),
        [l, t, k] => (l, t, k),
        ref s => return Err(Error::Value(format!("expert ids must be [tokens, K] or [layers, tokens, K], got shape {s:?}"))),
    };
    if k == 0 || t == 0 || l == 0 {
        return Err(Error::Value(format!("expert ids of shape {:?} hold no records", rec.shape)));
    }
    if rec.ids.len() != l * t * k {
        return Err(Error::Value(format!("expert ids hold {} values for shape {:?}", rec.ids.len(), rec.shape)));
    }
    if let Some(w) = rec.weights {
        if w.len() != rec.ids.len() {
            return Err(Error::Value(format!(
                "weights hold {} values but expert ids hold {} (shape {:?})",
                w.len(),
                rec.ids.len(),
                rec.shape
            )));
        }
    }
    let layers = match layers {
        Some(v) if v.len() != l => {
            return Err(Error::Value(format!("{} layer indices given for {l} layers of records", v.len())))
        }
        Some(v) => v,
        None => (0..l as u32).collect(),
    };
    let lengths = match lengths {
        Some(v) => check_lengths(v, t)?,
        None => vec![t],
    };
    let e = match num_experts {
        Some(e) => {
            super::check_sizes(Some(e), 1)?;
            e
        }
        None => infer_experts(rec)?,
    };

    let tasks = plan(l, t, &lengths);
    let per_sample = lengths.len() > 1;
    let partials: Vec<Partial> = tasks
        .par_iter()
        .map(|task| count_task(rec, task, &lengths, t, k, e, per_sample))
        .collect();
    if partials.iter().any(|p| p.bad) {
        return Err(first_bad(rec, e));
    }

    let mut stats = RoutingStats::zeros(layers, e, k);
    stats.num_samples = lengths.len() as u64;
    for (task, p) in tasks.iter().zip(&partials) {
        let row = task.row * e..(task.row + 1) * e;
        for (dst, src) in stats.counts[row.clone()].iter_mut().zip(&p.counts) {
            *dst += *src as i64;
        }
        add(&mut stats.gate_sum[row.clone()], &p.gate);
        add(&mut stats.sample_token_sum[row.clone()], &p.sample_token);
        add(&mut stats.sample_gate_sum[row], &p.sample_gate);
        stats.tokens[task.row] += task.tokens.len() as i64;
    }
    if !per_sample {
        // One sample: its averages are the token averages.
        let denom_tok = (k * t) as f64;
        for i in 0..stats.counts.len() {
            stats.sample_token_sum[i] = stats.counts[i] as f64 / denom_tok;
            stats.sample_gate_sum[i] = stats.gate_sum[i] / t as f64;
        }
    }
    Ok(stats)
}

fn add(dst: &mut [f64], src: &[f64]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += *s;
    }
}

fn check_lengths(lengths: &[u64], tokens: usize) -> Result<Vec<usize>> {
    if let Some(i) = lengths.iter().position(|&n| n == 0) {
        return Err(Error::Value(format!("lengths[{i}] is 0; every sample needs at least one token")));
    }
    let total: u128 = lengths.iter().map(|&n| u128::from(n)).sum();
    if total != tokens as u128 {
        return Err(Error::Value(format!(
            "lengths sum to {total} tokens but the records hold {tokens} per layer"
        )));
    }
    Ok(lengths.iter().map(|&n| n as usize).collect())
}

/// Splits every layer into tasks of about `CHUNK_TOKENS` tokens, cut at
/// sample boundaries when there are several samples.
fn plan(layers: usize, tokens: usize, lengths: &[usize]) -> Vec<Task> {
    let mut spans = Vec::new();
    if lengths.len() == 1 {
        let mut start = 0;
        while start < tokens {
            let end = (start + CHUNK_TOKENS).min(tokens);
            spans.push((start..end, 0..1));
            start = end;
        }
    } else {
        let (mut start, mut first, mut acc) = (0, 0, 0);
        for (i, &n) in lengths.iter().enumerate() {
            acc += n;
            if acc - start >= CHUNK_TOKENS || i + 1 == lengths.len() {
                spans.push((start..acc, first..i + 1));
                start = acc;
                first = i + 1;
            }
        }
    }
    (0..layers)
        .flat_map(|row| {
            spans.iter().map(move |(tokens, samples)| Task {
                row,
                tokens: tokens.clone(),
                samples: samples.clone(),
            })
        })
        .collect()
}

fn count_task<I: ExpertId, W: Weight>(
    rec: &Records<'_, I, W>,
    task: &Task,
    lengths: &[usize],
    t: usize,
    k: usize,
    e: usize,
    per_sample: bool,
) -> Partial {
    let base = task.row * t * k;
    let span = base + task.tokens.start * k..base + task.tokens.end * k;
    let ids = &rec.ids[span.clone()];
    let weights = rec.weights.map(|w| &w[span]);
    // One overflow bin at index `e` absorbs out-of-range ids, so the hot loop
    // has no early exit; a flag reports them and a second pass finds the first.
    let mut p = Partial {
        counts: vec![0; e + 1],
        gate: vec![0.0; e + 1],
        ..Partial::default()
    };
    if per_sample {
        p.sample_token = vec![0.0; e + 1];
        p.sample_gate = vec![0.0; e + 1];
        let mut at = 0;
        for &n in &lengths[task.samples.clone()] {
            let sample = at..at + n * k;
            at = sample.end;
            let w = weights.map(|w| &w[sample.clone()]);
            p.bad |= count_sample(&ids[sample], w, e, n, k, &mut p);
        }
    } else {
        p.bad = match weights {
            Some(w) => count_weighted(ids, w, e, &mut p.counts, &mut p.gate),
            None => count_ids(ids, e, &mut p.counts),
        };
    }
    p.counts.truncate(e);
    p.gate.truncate(e);
    p.sample_token.truncate(e);
    p.sample_gate.truncate(e);
    p
}

/// Elements per validation block: small enough to stay in L1 between the
/// (vectorised) validation pass and the scatter pass over the same block.
const BLOCK: usize = 4096;

#[inline(always)]
fn ids_ok<I: ExpertId>(ids: &[I], e: usize) -> bool {
    I::all_below(ids, e as u64)
}

/// Independent sub-histograms the hot loop rotates through, so that updates
/// of the same expert by neighbouring records do not wait on each other.
const LANES: usize = 4;

/// The hot loop: returns whether any id or weight was invalid. Uses AVX2 when
/// the CPU has it (chosen at run time; the code is the same).
fn count_weighted<I: ExpertId, W: Weight>(
    ids: &[I],
    weights: &[W],
    e: usize,
    counts: &mut [u64],
    gate: &mut [f64],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { count_weighted_avx2(ids, weights, e, counts, gate) };
    }
    count_weighted_generic(ids, weights, e, counts, gate)
}

/// Safety: the CPU must support AVX2 (`unsafe` for Rust < 1.86).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn count_weighted_avx2<I: ExpertId, W: Weight>(
    ids: &[I],
    weights: &[W],
    e: usize,
    counts: &mut [u64],
    gate: &mut [f64],
) -> bool {
    count_weighted_generic(ids, weights, e, counts, gate)
}

/// Validation runs per block in its own (vectorised) pass, so the scatter loop
/// stays short; out-of-range ids land in the overflow bin `e`. Each bin holds
/// (count, gate sum) as two f64 updated by one vector add; counts stay exact
/// (a task adds far fewer than 2^53).
#[inline(always)]
fn count_weighted_generic<I: ExpertId, W: Weight>(
    ids: &[I],
    weights: &[W],
    e: usize,
    counts: &mut [u64],
    gate: &mut [f64],
) -> bool {
    let mut lanes: [Vec<[f64; 2]>; LANES] = std::array::from_fn(|_| vec![[0.0; 2]; e + 1]);
    let [h0, h1, h2, h3] = &mut lanes;
    let bin = |id: I| id.index().min(e as u64) as usize;
    let add = |h: &mut [f64; 2], w: W| {
        h[0] += 1.0;
        h[1] += w.to_f64();
    };
    let mut bad = false;
    for (ids, weights) in ids.chunks(BLOCK).zip(weights.chunks(BLOCK)) {
        bad |= !ids_ok(ids, e) || !weights.iter().fold(true, |ok, w| ok & w.is_valid());
        let quads = ids.chunks_exact(LANES).zip(weights.chunks_exact(LANES));
        for (i, w) in quads {
            add(&mut h0[bin(i[0])], w[0]);
            add(&mut h1[bin(i[1])], w[1]);
            add(&mut h2[bin(i[2])], w[2]);
            add(&mut h3[bin(i[3])], w[3]);
        }
        let tail = ids.len() / LANES * LANES;
        for (&id, &w) in ids[tail..].iter().zip(&weights[tail..]) {
            add(&mut h0[bin(id)], w);
        }
    }
    for lane in &lanes {
        for (x, h) in lane.iter().enumerate() {
            counts[x] += h[0] as u64;
            gate[x] += h[1];
        }
    }
    bad
}

#[inline]
fn count_ids<I: ExpertId>(ids: &[I], e: usize, counts: &mut [u64]) -> bool {
    let counts = &mut counts[..=e];
    let mut bad = false;
    for ids in ids.chunks(BLOCK) {
        bad |= !ids_ok(ids, e);
        for &id in ids {
            counts[id.index().min(e as u64) as usize] += 1;
        }
    }
    bad
}

/// One sample of `n` tokens: also adds its own token and gate scores.
fn count_sample<I: ExpertId, W: Weight>(
    ids: &[I],
    weights: Option<&[W]>,
    e: usize,
    n: usize,
    k: usize,
    p: &mut Partial,
) -> bool {
    let (tok, inv_n) = (1.0 / (k * n) as f64, 1.0 / n as f64);
    let mut bad = false;
    for (j, &id) in ids.iter().enumerate() {
        let i = id.index().min(e as u64) as usize;
        bad |= i == e;
        p.counts[i] += 1;
        p.sample_token[i] += tok;
        if let Some(w) = weights {
            bad |= !w[j].is_valid();
            let w = w[j].to_f64();
            p.gate[i] += w;
            p.sample_gate[i] += w * inv_n;
        }
    }
    bad
}

/// Max id + 1, after rejecting negative and implausibly large ids.
fn infer_experts<I: ExpertId, W: Weight>(rec: &Records<'_, I, W>) -> Result<usize> {
    let max = rec
        .ids
        .par_chunks(CHUNK_TOKENS)
        .map(|c| c.iter().map(|id| id.index()).max().unwrap_or(0))
        .max()
        .unwrap_or(0);
    if max >= MAX_INFERRED_EXPERTS {
        return Err(first_bad(rec, MAX_INFERRED_EXPERTS as usize));
    }
    Ok(max as usize + 1)
}

/// The error for the first invalid id or weight, in array order.
fn first_bad<I: ExpertId, W: Weight>(rec: &Records<'_, I, W>, e: usize) -> Error {
    let bad_id = rec.ids.iter().position(|id| id.index() >= e as u64);
    let bad_w = rec
        .weights
        .and_then(|w| w.iter().position(|x| !x.is_valid()));
    let at = |flat: usize| position(rec.shape, flat);
    match (bad_id, bad_w) {
        (Some(i), w) if w.is_none_or(|w| i <= w) => Error::Value(format!(
            "expert id {} at {} is out of range [0, {e})",
            rec.ids[i],
            at(i)
        )),
        (_, Some(j)) => {
            let w = rec.weights.map_or(0.0, |w| w[j].to_f64());
            Error::Value(format!("routing weight {w} at {} is not a finite value >= 0", at(j)))
        }
        // Callers only ask after a task flagged a bad value.
        _ => Error::Value("invalid routing records".into()),
    }
}

/// A flat index as a numpy-style position, e.g. `[2, 17, 5]`.
fn position(shape: &[usize], mut flat: usize) -> String {
    let mut idx = vec![0; shape.len()];
    for (d, &n) in shape.iter().enumerate().rev() {
        idx[d] = flat % n.max(1);
        flat /= n.max(1);
    }
    format!("{idx:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec<'a>(ids: &'a [i32], w: Option<&'a [f32]>, shape: &'a [usize]) -> Records<'a, i32, f32> {
        Records { ids, weights: w, shape }
    }

    #[test]
    fn counts_and_sums() {
        let ids = [0, 2, 1, 2, 2, 3];
        let w = [0.5f32, 0.25, 1.0, 0.5, 0.125, 0.0];
        let s = count(&rec(&ids, Some(&w), &[3, 2]), Some(4), None, None).unwrap();
        assert_eq!(s.counts, vec![1, 1, 3, 1]);
        assert_eq!(s.gate_sum, vec![0.5, 1.0, 0.875, 0.0]);
        assert_eq!(s.tokens, vec![3]);
        assert_eq!((s.top_k, s.num_experts, s.num_samples), (2, 4, 1));
        assert_eq!(s.sample_token_sum[2], 0.5);
        assert!(s.problem().is_none());
        // Inferred expert count; layers given.
        let s = count(&rec(&ids, None, &[1, 3, 2]), None, None, Some(vec![7])).unwrap();
        assert_eq!((s.num_experts, s.layers.clone()), (4, vec![7]));
        assert_eq!(s.gate_sum, vec![0.0; 4]);
    }

    #[test]
    fn per_sample_sums() {
        // Sample A: 1 token (0, 1); sample B: 2 tokens (0, 2), (0, 3).
        let ids = [0, 1, 0, 2, 0, 3];
        let w = [1.0f32, 1.0, 0.5, 0.5, 1.0, 0.0];
        let s = count(&rec(&ids, Some(&w), &[3, 2]), Some(4), Some(&[1, 2]), None).unwrap();
        assert_eq!(s.num_samples, 2);
        assert_eq!(s.sample_token_sum, vec![0.5 + 0.5, 0.5, 0.25, 0.25]);
        assert_eq!(s.sample_gate_sum, vec![1.0 + 0.75, 1.0, 0.25, 0.0]);
        let err = count(&rec(&ids, None, &[3, 2]), None, Some(&[1, 1]), None).unwrap_err();
        assert!(err.to_string().contains("lengths sum to 2"), "{err}");
    }

    #[test]
    fn names_first_bad_position() {
        let ids = [0, 1, 2, -1, 9, 0];
        let err = count(&rec(&ids, None, &[1, 3, 2]), Some(4), None, None).unwrap_err();
        assert_eq!(err.to_string(), "expert id -1 at [0, 1, 1] is out of range [0, 4)");
        let err = count(&rec(&ids, None, &[3, 2]), None, None, None).unwrap_err();
        assert!(err.to_string().starts_with("expert id -1 at [1, 1]"), "{err}");
        let w = [0.0f32, f32::NAN, 0.0, 0.0, 0.0, 0.0];
        let ok = [0, 1, 2, 3, 0, 1];
        let err = count(&rec(&ok, Some(&w), &[3, 2]), Some(4), None, None).unwrap_err();
        assert_eq!(err.to_string(), "routing weight NaN at [0, 1] is not a finite value >= 0");
    }

    #[test]
    fn any_dtype_counts_as_its_own() {
        let ids = [0u8, 2, 1, 2, 2, 3];
        let w = [0.5f64, 0.25, 1.0, 0.5, 0.125, 0.0];
        let want = count(&Records { ids: &ids, weights: Some(&w), shape: &[3, 2] }, Some(4), None, None).unwrap();
        let wide: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
        let got = count_any(AnyIds::I64(&wide), Some(AnyWeights::F64(&w)), &[3, 2], Some(4), None, None).unwrap();
        assert_eq!((got.counts, got.gate_sum), (want.counts, want.gate_sum));
        let unweighted = count_any(AnyIds::U8(&ids), None, &[3, 2], None, None, None).unwrap();
        assert_eq!((unweighted.counts, unweighted.gate_sum), (vec![1, 1, 3, 1], vec![0.0; 4]));
    }

    #[test]
    fn independent_of_chunking() {
        let t = 3 * CHUNK_TOKENS + 17;
        let ids: Vec<u16> = (0..t * 4).map(|i| ((i * 7919) % 61) as u16).collect();
        let w: Vec<f64> = (0..t * 4).map(|i| (i % 13) as f64 / 8.0).collect();
        let r = Records { ids: &ids, weights: Some(&w), shape: &[t, 4] };
        let s = count(&r, Some(64), None, None).unwrap();
        let mut want = vec![0i64; 64];
        let mut gate = vec![0.0; 64];
        for (i, w) in ids.iter().zip(&w) {
            want[*i as usize] += 1;
            gate[*i as usize] += w;
        }
        assert_eq!(s.counts, want);
        for (a, b) in s.gate_sum.iter().zip(&gate) {
            assert!((a - b).abs() < 1e-9);
        }
    }
}


