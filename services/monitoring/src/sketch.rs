//! Mergeable quantile sketch with bounded relative error: DDSketch (Masson, Rim and Lee,
//! "DDSketch: a fast and fully-mergeable quantile sketch with relative-error guarantees",
//! VLDB 2019), and a [`Summary`] (count, sum, min, max and a sketch) for telemetry rollups.
//!
//! # Algorithm
//! With γ = (1 + α) / (1 − α), a positive value x falls in the bucket with key
//! k = ⌈ln x / ln γ⌉, so that γ^(k−1) < x ≤ γ^k. A bucket only counts its values; the value
//! returned for it is 2·γ^k / (γ + 1), which is within a factor 1 ± α of every x in the
//! bucket. Values with |x| below [`MIN_MAGNITUDE`] are counted as zero, negative values go to a
//! second store keyed by |x|. Bins are kept sparse, as a sorted `Vec<(key, count)>` per sign.
//! Merging two sketches adds their counts key by key, so the merged sketch is exactly the
//! sketch of the union of the two inputs.
//!
//! Each store holds at most [`MAX_BINS`] bins (α = 1 % covers about 17 decades). Past that the
//! bins of the lowest values are folded into one ("collapsing lowest" in the paper): the
//! smallest keys of the positive store, the largest |x| keys of the negative store. High
//! quantiles keep their guarantee; only the lowest ones lose it.
//!
//! # Accuracy
//! [`Sketch::quantile`] returns, for rank r = ⌊q·(n − 1)⌋, an estimate within a relative
//! error of [`RELATIVE_ACCURACY`] of the r-th smallest value added (0 exactly when that value
//! is 0 or below [`MIN_MAGNITUDE`] in magnitude), as long as no bins were collapsed below it.
//!
//! # Byte format
//! No version and no header: the caller versions its records. Integers are LEB128 varints.
//! A store is its number of bins, then per bin in ascending key order: the key (the first as
//! a zigzag varint, each next as the varint difference from the previous, at least 1) and its
//! count (at least 1). A sketch is the zero count, the negative store, then the positive
//! store; the empty sketch is 3 bytes. A summary is its count, and when that is not zero the
//! sum, min and max as 8-byte little-endian f64 followed by the sketch.

use std::cmp::Ordering;
use std::ops::RangeInclusive;

/// α: every quantile estimate is within 1 % of a true sample value at that rank.
pub const RELATIVE_ACCURACY: f64 = 0.01;

/// Values whose magnitude is below this are counted (and estimated) as exactly zero.
pub const MIN_MAGNITUDE: f64 = 1e-9;

/// The most bins one store (positive or negative values) keeps before collapsing.
pub const MAX_BINS: usize = 2048;

/// γ, the ratio between the bounds of consecutive buckets.
const GAMMA: f64 = (1.0 + RELATIVE_ACCURACY) / (1.0 - RELATIVE_ACCURACY);

fn ln_gamma() -> f64 {
    GAMMA.ln()
}

/// The bucket key of a finite magnitude `x ≥ MIN_MAGNITUDE`.
fn key_of(x: f64) -> i32 {
    (x.ln() / ln_gamma()).ceil() as i32
}

/// The keys `add` can produce: those of `MIN_MAGNITUDE` up to `f64::MAX`.
fn key_range() -> RangeInclusive<i32> {
    key_of(MIN_MAGNITUDE)..=key_of(f64::MAX)
}

/// The representative magnitude of bucket `k`: 2·γ^k / (γ + 1), computed in log space.
fn value_of(k: i32) -> f64 {
    (f64::from(k) * ln_gamma() + (2.0 / (GAMMA + 1.0)).ln()).exp().min(f64::MAX)
}

/// Bins of one sign: ascending keys, every count at least 1.
#[derive(Clone, Debug, Default, PartialEq)]
struct Store {
    bins: Vec<(i32, u64)>,
}

impl Store {
    fn add(&mut self, key: i32, collapse_lowest: bool) {
        match self.bins.binary_search_by_key(&key, |&(k, _)| k) {
            Ok(i) => self.bins[i].1 = self.bins[i].1.saturating_add(1),
            Err(i) => {
                self.bins.insert(i, (key, 1));
                self.bound(collapse_lowest);
            }
        }
    }

    fn merge(&mut self, other: &Store, collapse_lowest: bool) {
        if other.bins.is_empty() {
            return;
        }
        let (a, b) = (&self.bins, &other.bins);
        let mut out = Vec::with_capacity(a.len() + b.len());
        let (mut i, mut j) = (0, 0);
        while i < a.len() && j < b.len() {
            match a[i].0.cmp(&b[j].0) {
                Ordering::Less => {
                    out.push(a[i]);
                    i += 1;
                }
                Ordering::Greater => {
                    out.push(b[j]);
                    j += 1;
                }
                Ordering::Equal => {
                    out.push((a[i].0, a[i].1.saturating_add(b[j].1)));
                    i += 1;
                    j += 1;
                }
            }
        }
        out.extend_from_slice(&a[i..]);
        out.extend_from_slice(&b[j..]);
        self.bins = out;
        self.bound(collapse_lowest);
    }

    /// Folds the excess bins at the low end (or the high end) into their neighbour.
    fn bound(&mut self, collapse_lowest: bool) {
        let excess = self.bins.len().saturating_sub(MAX_BINS);
        if excess == 0 {
            return;
        }
        let (folded, into) = if collapse_lowest {
            (&self.bins[..=excess], excess)
        } else {
            (&self.bins[MAX_BINS - 1..], MAX_BINS - 1)
        };
        let total = folded.iter().fold(0u64, |s, &(_, c)| s.saturating_add(c));
        self.bins[into].1 = total;
        if collapse_lowest {
            self.bins.drain(..excess);
        } else {
            self.bins.truncate(MAX_BINS);
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        write_varint(out, self.bins.len() as u64);
        let mut prev: Option<i32> = None;
        for &(k, c) in &self.bins {
            let k64 = i64::from(k);
            match prev {
                None => write_varint(out, ((k64 << 1) ^ (k64 >> 63)) as u64),
                Some(p) => write_varint(out, (k64 - i64::from(p)) as u64),
            }
            write_varint(out, c);
            prev = Some(k);
        }
    }

    /// Reads a store, returning it with its total count.
    fn decode(buf: &mut &[u8]) -> Result<(Store, u64), DecodeError> {
        let n = read_varint(buf)?;
        if n > MAX_BINS as u64 {
            return Err(DecodeError::TooManyBins(n));
        }
        // Every bin takes at least two bytes: never reserve more than the input could hold.
        if n > (buf.len() / 2) as u64 {
            return Err(DecodeError::Truncated);
        }
        let range = key_range();
        let mut bins = Vec::with_capacity(n as usize);
        let mut total = 0u64;
        for _ in 0..n {
            let raw = read_varint(buf)?;
            let key = match bins.last() {
                None => Some((raw >> 1) as i64 ^ -((raw & 1) as i64)),
                Some(_) if raw == 0 => return Err(DecodeError::BinsNotAscending),
                Some(&(prev, _)) => i64::from(prev).checked_add_unsigned(raw),
            };
            let key = key
                .and_then(|k| i32::try_from(k).ok())
                .filter(|k| range.contains(k))
                .ok_or(DecodeError::KeyOutOfRange)?;
            let count = read_varint(buf)?;
            if count == 0 {
                return Err(DecodeError::EmptyBin);
            }
            total = total.checked_add(count).ok_or(DecodeError::CountOverflow)?;
            bins.push((key, count));
        }
        Ok((Store { bins }, total))
    }
}

/// A DDSketch of a multiset of finite values, with relative accuracy [`RELATIVE_ACCURACY`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sketch {
    neg: Store,
    zero: u64,
    pos: Store,
    count: u64,
}

impl Sketch {
    /// An empty sketch.
    pub fn new() -> Sketch {
        Sketch::default()
    }

    /// Adds one value; non-finite values are ignored and return false.
    pub fn add(&mut self, x: f64) -> bool {
        if !x.is_finite() {
            return false;
        }
        if x.abs() < MIN_MAGNITUDE {
            self.zero = self.zero.saturating_add(1);
        } else if x > 0.0 {
            self.pos.add(key_of(x), true);
        } else {
            self.neg.add(key_of(-x), false);
        }
        self.count = self.count.saturating_add(1);
        true
    }

    /// Adds every value of `other` to this sketch, exactly as if they had been added one by one.
    pub fn merge(&mut self, other: &Sketch) {
        self.neg.merge(&other.neg, false);
        self.pos.merge(&other.pos, true);
        self.zero = self.zero.saturating_add(other.zero);
        self.count = self.count.saturating_add(other.count);
    }

    /// The number of values added.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Whether no value was added.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The q-quantile (0 ≤ q ≤ 1) using the lower rank convention: rank = floor(q·(n-1)), value
    /// of that rank in sorted order, estimated; None when empty or q outside \[0, 1\] or NaN.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        let rank = ((q * (self.count - 1) as f64).floor() as u64).min(self.count - 1);
        let mut seen = 0u64;
        for &(k, c) in self.neg.bins.iter().rev() {
            seen = seen.saturating_add(c);
            if rank < seen {
                return Some(-value_of(k));
            }
        }
        seen = seen.saturating_add(self.zero);
        if rank < seen {
            return Some(0.0);
        }
        for &(k, c) in &self.pos.bins {
            seen = seen.saturating_add(c);
            if rank < seen {
                return Some(value_of(k));
            }
        }
        None
    }

    /// Appends the sketch's encoding (see the module documentation) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        write_varint(out, self.zero);
        self.neg.encode(out);
        self.pos.encode(out);
    }

    /// Reads a sketch from the start of `buf` and advances `buf` past it; on error `buf` is
    /// left as it was.
    pub fn decode(buf: &mut &[u8]) -> Result<Sketch, DecodeError> {
        let mut b = *buf;
        let zero = read_varint(&mut b)?;
        let (neg, neg_count) = Store::decode(&mut b)?;
        let (pos, pos_count) = Store::decode(&mut b)?;
        let count = zero
            .checked_add(neg_count)
            .and_then(|c| c.checked_add(pos_count))
            .ok_or(DecodeError::CountOverflow)?;
        *buf = b;
        Ok(Sketch { neg, zero, pos, count })
    }
}

/// Why bytes could not be decoded as a [`Sketch`] or a [`Summary`].
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    /// The input ends before the encoded value does.
    #[error("truncated input: it ends before the encoded value does")]
    Truncated,
    /// A varint runs past 10 bytes or above `u64::MAX`.
    #[error("varint longer than 10 bytes or above u64::MAX")]
    VarintTooLong,
    /// The counts add up to more than `u64::MAX`.
    #[error("total count overflows u64")]
    CountOverflow,
    /// A store declares more bins than [`MAX_BINS`].
    #[error("{0} bins in one store, more than the {MAX_BINS} allowed")]
    TooManyBins(u64),
    /// A key lies outside those of finite values at least [`MIN_MAGNITUDE`].
    #[error("bin key out of range")]
    KeyOutOfRange,
    /// Two consecutive bins have the same key.
    #[error("bin keys are not strictly ascending")]
    BinsNotAscending,
    /// A bin has a count of zero.
    #[error("bin with a count of zero")]
    EmptyBin,
    /// The summary's count is not the count of its sketch.
    #[error("summary count {summary} differs from its sketch's count {sketch}")]
    CountMismatch {
        /// The count the summary declares.
        summary: u64,
        /// The count of the sketch that follows it.
        sketch: u64,
    },
    /// A non-empty summary's min or max is not finite, or min > max.
    #[error("summary min {min} and max {max} are not finite with min <= max")]
    BadMinMax {
        /// The decoded min.
        min: f64,
        /// The decoded max.
        max: f64,
    },
}

/// Count, sum, min, max and a sketch of a set of values.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// The number of values.
    pub count: u64,
    /// Their sum (may overflow to ±∞ for huge values).
    pub sum: f64,
    /// The smallest value; +∞ when empty.
    pub min: f64,
    /// The largest value; −∞ when empty.
    pub max: f64,
    /// The sketch of the values, for quantiles.
    pub sketch: Sketch,
}

impl Default for Summary {
    fn default() -> Summary {
        Summary { count: 0, sum: 0.0, min: f64::INFINITY, max: f64::NEG_INFINITY, sketch: Sketch::new() }
    }
}

impl Summary {
    /// An empty summary: count 0, sum 0, min +∞, max −∞.
    pub fn new() -> Summary {
        Summary::default()
    }

    /// Adds one value; non-finite values are ignored and return false.
    pub fn add(&mut self, x: f64) -> bool {
        if !self.sketch.add(x) {
            return false;
        }
        self.count = self.count.saturating_add(1);
        self.sum += x;
        self.min = self.min.min(x);
        self.max = self.max.max(x);
        true
    }

    /// Adds every value of `other` to this summary.
    pub fn merge(&mut self, other: &Summary) {
        self.count = self.count.saturating_add(other.count);
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.sketch.merge(&other.sketch);
    }

    /// The arithmetic mean, None when empty.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| (self.sum / self.count as f64).max(self.min).min(self.max))
    }

    /// Quantile from the sketch, clamped into [min, max]; q = 0 gives min exactly and q = 1
    /// gives max exactly.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let estimate = self.sketch.quantile(q)?;
        Some(if q == 0.0 {
            self.min
        } else if q == 1.0 {
            self.max
        } else {
            estimate.max(self.min).min(self.max)
        })
    }

    /// Appends the summary's encoding (see the module documentation) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        write_varint(out, self.count);
        if self.count > 0 {
            for v in [self.sum, self.min, self.max] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            self.sketch.encode(out);
        }
    }

    /// Reads a summary from the start of `buf`, checks it is consistent, and advances `buf`
    /// past it; on error `buf` is left as it was.
    pub fn decode(buf: &mut &[u8]) -> Result<Summary, DecodeError> {
        let mut b = *buf;
        let count = read_varint(&mut b)?;
        if count == 0 {
            *buf = b;
            return Ok(Summary::new());
        }
        let (sum, min, max) = (read_f64(&mut b)?, read_f64(&mut b)?, read_f64(&mut b)?);
        let sketch = Sketch::decode(&mut b)?;
        if sketch.count() != count {
            return Err(DecodeError::CountMismatch { summary: count, sketch: sketch.count() });
        }
        if !(min.is_finite() && max.is_finite() && min <= max) {
            return Err(DecodeError::BadMinMax { min, max });
        }
        *buf = b;
        Ok(Summary { count, sum, min, max, sketch })
    }
}

fn write_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn read_varint(buf: &mut &[u8]) -> Result<u64, DecodeError> {
    let mut v = 0u64;
    for i in 0..10 {
        let (&byte, rest) = buf.split_first().ok_or(DecodeError::Truncated)?;
        *buf = rest;
        if i == 9 && byte > 1 {
            return Err(DecodeError::VarintTooLong);
        }
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(DecodeError::VarintTooLong)
}

fn read_f64(buf: &mut &[u8]) -> Result<f64, DecodeError> {
    let (bytes, rest) = buf.split_first_chunk::<8>().ok_or(DecodeError::Truncated)?;
    *buf = rest;
    Ok(f64::from_le_bytes(*bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const QS: [f64; 9] = [0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0];
    const TOL: f64 = RELATIVE_ACCURACY * (1.0 + 1e-9);

    fn sketch_of(values: &[f64]) -> Sketch {
        let mut s = Sketch::new();
        for &v in values {
            assert!(s.add(v));
        }
        s
    }

    fn summary_of(values: &[f64]) -> Summary {
        let mut s = Summary::new();
        for &v in values {
            assert!(s.add(v));
        }
        s
    }

    fn lognormal(rng: &mut StdRng, mu: f64, sigma: f64) -> f64 {
        let (u1, u2): (f64, f64) = (1.0 - rng.random::<f64>(), rng.random());
        let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        (mu + sigma * z).exp()
    }

    /// Checks every q in `QS` against the exact lower-rank quantile; returns (negatives, zeros) hit.
    fn assert_accurate(values: &mut [f64]) -> (usize, usize) {
        let s = sketch_of(values);
        values.sort_by(f64::total_cmp);
        let (mut negatives, mut zeros) = (0, 0);
        for q in QS {
            let truth = values[(q * (values.len() - 1) as f64).floor() as usize];
            let est = s.quantile(q).unwrap();
            if truth == 0.0 {
                zeros += 1;
                assert_eq!(est, 0.0, "q={q}");
            } else {
                negatives += usize::from(truth < 0.0);
                assert!((est - truth).abs() <= TOL * truth.abs(), "q={q} truth={truth} est={est}");
            }
        }
        (negatives, zeros)
    }

    #[test]
    fn hand_computed_example() {
        let gamma: f64 = 1.01 / 0.99;
        let s = sketch_of(&[1.0, 2.0, 3.0, 100.0]);
        // ln 2 / ln γ = 34.66, ln 3 / ln γ = 54.93, ln 100 / ln γ = 230.25.
        assert_eq!(s.pos.bins, vec![(0, 1), (35, 1), (55, 1), (231, 1)]);
        assert!(gamma.powi(230) < 100.0 && 100.0 <= gamma.powi(231));
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs();
        // Bucket 0 holds (1/γ, 1]; its estimate is 2/(γ+1) = 1 − α.
        assert!(close(s.quantile(0.0).unwrap(), 0.99));
        // The median (rank ⌊0.5·3⌋ = 1) is 2.0, estimated by bucket 35.
        assert!(close(s.quantile(0.5).unwrap(), 2.0 * gamma.powi(35) / (gamma + 1.0)));
        let top = 2.0 * gamma.powi(231) / (gamma + 1.0);
        assert!(close(s.quantile(1.0).unwrap(), top));
        assert!((top - 100.0).abs() <= TOL * 100.0);
        assert_eq!(s.count(), 4);

        let s = sketch_of(&[-1.0, 0.0, 5e-10, 1.0]);
        assert_eq!((s.neg.bins.clone(), s.zero), (vec![(0, 1)], 2));
        assert!(close(s.quantile(0.0).unwrap(), -0.99));
        assert_eq!(s.quantile(1.0 / 3.0), Some(0.0));
        assert_eq!(s.quantile(1.5), None);
        assert_eq!(s.quantile(f64::NAN), None);
        assert_eq!(Sketch::new().quantile(0.5), None);
    }

    #[test]
    fn relative_error_uniform_flow() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut v: Vec<f64> = (0..100_000).map(|_| rng.random_range(900.0..1100.0)).collect();
        assert_accurate(&mut v);
    }

    #[test]
    fn relative_error_lognormal() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut v: Vec<f64> = (0..100_000).map(|_| lognormal(&mut rng, 2.0, 3.0)).collect();
        assert!(v.iter().cloned().fold(f64::INFINITY, f64::min) < 1e-4);
        assert!(v.iter().cloned().fold(0.0, f64::max) > 1e6);
        assert_accurate(&mut v);
    }

    #[test]
    fn relative_error_with_zeros_and_negatives() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut v: Vec<f64> = (0..100_000)
            .map(|i| match i % 20 {
                0..4 => -lognormal(&mut rng, 0.0, 2.0),
                4..6 => 0.0,
                6 => -0.0,
                _ => lognormal(&mut rng, 1.0, 2.0),
            })
            .collect();
        let (negatives, zeros) = assert_accurate(&mut v);
        assert!(negatives >= 3 && zeros >= 1, "{negatives} {zeros}");
    }

    #[test]
    fn merge_equals_sketch_of_union() {
        let mut rng = StdRng::seed_from_u64(4);
        let all: Vec<f64> = (0..10_000)
            .map(|i| {
                if i % 7 == 0 {
                    0.0
                } else {
                    lognormal(&mut rng, 0.0, 4.0) * if i % 3 == 0 { -1.0 } else { 1.0 }
                }
            })
            .collect();
        let (a, b) = all.split_at(3_333);
        let mut merged = sketch_of(a);
        merged.merge(&sketch_of(b));
        assert_eq!(merged, sketch_of(&all));
        let mut m = summary_of(&[1.0, 2.0, -3.0]);
        m.merge(&summary_of(&[0.0, 10.0]));
        assert_eq!(m, summary_of(&[1.0, 2.0, -3.0, 0.0, 10.0]));

        let before = merged.clone();
        merged.merge(&Sketch::new());
        assert_eq!(merged, before);
        let mut empty = Sketch::new();
        empty.merge(&before);
        assert_eq!(empty, before);
        let mut sm = m.clone();
        sm.merge(&Summary::new());
        assert_eq!(sm, m);
    }

    #[test]
    fn encode_decode_round_trip() {
        let mut rng = StdRng::seed_from_u64(5);
        let values: Vec<f64> = (0..5_000).map(|_| rng.random_range(-1e3..1e6)).collect();
        let sets: [&[f64]; 4] = [&[], &[0.0], &[-2.5, 1e-300, 7.0, 1e300], &values];
        for set in sets {
            let (sketch, summary) = (sketch_of(set), summary_of(set));
            let mut bytes = Vec::new();
            sketch.encode(&mut bytes);
            summary.encode(&mut bytes);
            bytes.extend_from_slice(b"rest");
            let mut buf = &bytes[..];
            assert_eq!(Sketch::decode(&mut buf), Ok(sketch));
            assert_eq!(Summary::decode(&mut buf), Ok(summary));
            assert_eq!(buf, b"rest");
        }
        let mut bytes = Vec::new();
        Summary::new().encode(&mut bytes);
        assert_eq!(bytes, [0]);
    }

    #[test]
    fn truncations_and_random_bytes_never_panic() {
        let summary = summary_of(&[-40.0, 0.0, 0.0, 3.5, 1000.0, 1001.0, 1e9]);
        let mut sk = Vec::new();
        summary.sketch.encode(&mut sk);
        let mut su = Vec::new();
        summary.encode(&mut su);
        for len in 0..sk.len() {
            assert_eq!(Sketch::decode(&mut &sk[..len]), Err(DecodeError::Truncated), "len {len}");
        }
        for len in 0..su.len() {
            assert_eq!(Summary::decode(&mut &su[..len]), Err(DecodeError::Truncated), "len {len}");
        }
        assert!(Sketch::decode(&mut &sk[..]).is_ok() && Summary::decode(&mut &su[..]).is_ok());

        let mut rng = StdRng::seed_from_u64(6);
        for i in 0..10_000 {
            let mut bytes: Vec<u8> = if i % 2 == 0 {
                (0..rng.random_range(0..=64)).map(|_| rng.random()).collect()
            } else {
                su.clone()
            };
            if i % 2 == 1 {
                for _ in 0..rng.random_range(1..4) {
                    let at = rng.random_range(0..bytes.len());
                    bytes[at] = rng.random();
                }
            }
            let before = bytes.len();
            let mut buf = &bytes[..];
            if let Ok(s) = Sketch::decode(&mut buf) {
                assert!(buf.len() < before);
                let _ = (s.quantile(0.5), s.count());
            }
            if let Ok(s) = Summary::decode(&mut &bytes[..]) {
                assert_eq!(s.count, s.sketch.count());
                let _ = (s.quantile(0.5), s.mean());
            }
        }
    }

    #[test]
    fn decode_rejects_malformed() {
        let decode = |b: &[u8]| Sketch::decode(&mut &b[..]);
        assert_eq!(decode(&[0, 1, 0, 0, 0]), Err(DecodeError::EmptyBin));
        assert_eq!(decode(&[0, 2, 0, 1, 0, 1, 0]), Err(DecodeError::BinsNotAscending));
        // zigzag(-5000) = 9999 and zigzag(40000) = 80000: keys beyond 1e-9 and f64::MAX.
        assert_eq!(decode(&[0, 1, 0x8f, 0x4e, 1, 0]), Err(DecodeError::KeyOutOfRange));
        assert_eq!(decode(&[0, 0, 1, 0x80, 0xf1, 0x04, 1]), Err(DecodeError::KeyOutOfRange));
        let mut max = vec![0xff; 9];
        max.push(1);
        let mut overflow = max.clone();
        overflow.extend_from_slice(&[1, 0, 1, 0]);
        assert_eq!(decode(&overflow), Err(DecodeError::CountOverflow));
        let mut bins = vec![0, 0, 2, 0, 1, 1];
        bins.extend_from_slice(&max);
        assert_eq!(decode(&bins), Err(DecodeError::CountOverflow));
        assert_eq!(decode(&[0xff; 11]), Err(DecodeError::VarintTooLong));
        let mut long = vec![0xff; 9];
        long.extend_from_slice(&[2, 0, 0]);
        assert_eq!(decode(&long), Err(DecodeError::VarintTooLong));
        assert_eq!(decode(&[0, 0x81, 0x10, 0, 0]), Err(DecodeError::TooManyBins(2049)));
        assert_eq!(decode(&[0, 0xe8, 0x07, 0, 1, 0, 1]), Err(DecodeError::Truncated));

        let good = summary_of(&[1.0, 2.0]);
        let encoded = |s: &Summary| {
            let mut b = Vec::new();
            s.encode(&mut b);
            b
        };
        let mut bad = good.clone();
        bad.count = 3;
        let err = Summary::decode(&mut &encoded(&bad)[..]);
        assert_eq!(err, Err(DecodeError::CountMismatch { summary: 3, sketch: 2 }));
        bad = good.clone();
        bad.min = 3.0;
        assert!(matches!(Summary::decode(&mut &encoded(&bad)[..]), Err(DecodeError::BadMinMax { .. })));
        bad.min = f64::NAN;
        assert!(matches!(Summary::decode(&mut &encoded(&bad)[..]), Err(DecodeError::BadMinMax { .. })));
        let mut buf = &[0xff_u8, 0xff, 0xff][..];
        assert!(Summary::decode(&mut buf).is_err());
        assert_eq!(buf.len(), 3, "an error leaves the buffer where it was");
    }

    #[test]
    fn non_finite_ignored_and_summary_exact() {
        let mut s = Summary::new();
        for x in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert!(!s.add(x));
        }
        assert_eq!(s, Summary::new());
        assert_eq!((s.mean(), s.quantile(0.0), s.quantile(1.0)), (None, None, None));
        for x in [1003.0, 997.0, 1001.0, 999.0, 1000.5] {
            assert!(s.add(x));
        }
        assert!(!s.add(f64::NAN));
        assert_eq!(s.count, 5);
        assert_eq!(s.quantile(0.0), Some(997.0));
        assert_eq!(s.quantile(1.0), Some(1003.0));
        assert_eq!(s.mean(), Some(1000.1));
        let median = s.quantile(0.5).unwrap();
        assert!((median - 1000.5).abs() <= TOL * 1000.5);
        assert_eq!(s.quantile(-0.1), None);
        assert_eq!(s.quantile(f64::NAN), None);
    }

    #[test]
    fn bins_stay_bounded_over_300_decades() {
        let n = 20_000;
        let values: Vec<f64> =
            (0..n).map(|i| 10f64.powf(-300.0 + 600.0 * i as f64 / (n - 1) as f64)).collect();
        let pos = sketch_of(&values);
        assert!(pos.pos.bins.len() <= MAX_BINS && pos.pos.bins.len() > MAX_BINS / 2);
        let top = pos.quantile(1.0).unwrap();
        assert!((top - 1e300).abs() <= TOL * 1e300, "{top}");
        let p99 = values[(0.99 * (n - 1) as f64).floor() as usize];
        assert!((pos.quantile(0.99).unwrap() - p99).abs() <= TOL * p99);
        assert_eq!(pos.count(), n as u64);

        let negatives: Vec<f64> = values.iter().map(|v| -v).collect();
        let neg = sketch_of(&negatives);
        assert!(neg.neg.bins.len() <= MAX_BINS);
        // The collapsed bins are the most negative ones; values near zero keep their accuracy.
        let mut sorted = negatives.clone();
        sorted.sort_by(f64::total_cmp);
        let mid = sorted[(n - 1) / 2];
        assert!((neg.quantile(0.5).unwrap() - mid).abs() <= TOL * mid.abs());

        let mut both = pos.clone();
        both.merge(&neg);
        both.merge(&pos);
        assert!(both.pos.bins.len() <= MAX_BINS && both.neg.bins.len() <= MAX_BINS);
        assert_eq!(both.count(), 3 * n as u64);
        assert!((both.quantile(1.0).unwrap() - 1e300).abs() <= TOL * 1e300);
    }

    #[test]
    fn encoded_size_of_rollups() {
        let mut rng = StdRng::seed_from_u64(7);
        for n in [60, 3_600] {
            let s = summary_of(&(0..n).map(|_| rng.random_range(990.0..1010.0)).collect::<Vec<_>>());
            let mut bytes = Vec::new();
            s.encode(&mut bytes);
            println!("summary of {n} values in [990, 1010]: {} bytes", bytes.len());
            assert!(bytes.len() <= 40);
        }
    }
}
