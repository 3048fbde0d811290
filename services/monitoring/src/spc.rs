//! Statistical process control for batch quality and process signals: individuals /
//! moving-range (I-MR) charts with 3σ limits estimated from a baseline, the Western Electric
//! and Nelson pattern rules, EWMA and tabular CUSUM charts for small sustained shifts, and
//! process capability (Cp, Cpk). Everything here is a pure function of its arguments so the
//! same verdict can be recomputed anywhere from the stored data; bad input (empty series,
//! non-finite values, zero sigma, out-of-range parameters) yields an [`Error`] or an empty
//! result rather than a panic, because a malformed upload must never take monitoring down.

use serde::{Deserialize, Serialize};

/// Bias-correction constant d2 for moving ranges of span 2: σ ≈ MR̄ / d2.
pub const D2: f64 = 1.128;

/// Upper control-limit factor D4 for moving ranges of span 2: UCL(MR) = D4 · MR̄.
pub const D4: f64 = 3.267;

/// The usual minimum Cpk a capable process is expected to reach.
pub const CPK_TARGET: f64 = 1.33;

/// Why an SPC computation could not produce a result.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, thiserror::Error)]
pub enum Error {
    /// Fewer points than the computation needs.
    #[error("need at least {needed} points, got {got}")]
    TooFewPoints {
        /// Minimum number of points required.
        needed: usize,
        /// Number of points supplied.
        got: usize,
    },
    /// Sigma is zero or not finite, so no limits can be drawn.
    #[error("no variation: sigma is zero or not finite")]
    NoVariation,
    /// A value is NaN or infinite.
    #[error("value at index {index} is not finite")]
    NotFinite {
        /// Position of the first offending value.
        index: usize,
    },
    /// A parameter is outside its allowed range.
    #[error("{name} = {value} is out of range (allowed: {allowed})")]
    BadParameter {
        /// Name of the parameter.
        name: &'static str,
        /// The rejected value (NaN when the parameter was missing altogether).
        value: f64,
        /// Human-readable description of the allowed range.
        allowed: &'static str,
    },
}

/// In-control reference for a chart: the centre line and the short-term sigma.
///
/// Deserialising goes through [`Baseline::new`], so a stored baseline with a zero or
/// non-finite sigma is rejected at the boundary instead of producing meaningless limits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "BaselineFields")]
pub struct Baseline {
    /// Centre line.
    pub mean: f64,
    /// Short-term process sigma.
    pub sigma: f64,
    /// Number of points the baseline was estimated from (informational).
    pub n: usize,
}

#[derive(Deserialize)]
struct BaselineFields {
    mean: f64,
    sigma: f64,
    n: usize,
}

impl TryFrom<BaselineFields> for Baseline {
    type Error = Error;

    fn try_from(f: BaselineFields) -> Result<Self, Error> {
        Baseline::new(f.mean, f.sigma, f.n)
    }
}

impl Baseline {
    /// Estimates the baseline from individual values in time order: the mean, and
    /// sigma = MR̄ / d2. Needs at least 2 points, all finite, and some point-to-point
    /// variation.
    pub fn from_individuals(values: &[f64]) -> Result<Baseline, Error> {
        if values.len() < 2 {
            return Err(Error::TooFewPoints { needed: 2, got: values.len() });
        }
        check_finite(values)?;
        let n = values.len() as f64;
        let mut mean = values.iter().sum::<f64>() / n;
        if !mean.is_finite() {
            // The plain sum can overflow for huge (but finite) values; pre-dividing cannot.
            mean = values.iter().map(|x| x / n).sum();
        }
        // Moving ranges rather than the overall standard deviation, so that slow drift in
        // the baseline period does not inflate sigma and hide the very shifts we look for.
        let mr_sum: f64 = values.iter().zip(values.iter().skip(1)).map(|(a, b)| (b - a).abs()).sum();
        let sigma = mr_sum / (n - 1.0) / D2;
        Baseline::new(mean, sigma, values.len())
    }

    /// Builds a baseline from explicit values (e.g. a stored one). The mean must be finite
    /// and sigma finite and strictly positive.
    pub fn new(mean: f64, sigma: f64, n: usize) -> Result<Baseline, Error> {
        let b = Baseline { mean, sigma, n };
        b.check()?;
        Ok(b)
    }

    /// Checks the invariants [`Baseline::new`] enforces; the fields are public, so every
    /// consumer re-checks rather than trusting them.
    pub fn check(&self) -> Result<(), Error> {
        if !self.mean.is_finite() {
            return Err(Error::BadParameter { name: "mean", value: self.mean, allowed: "finite" });
        }
        if self.sigma == 0.0 || !self.sigma.is_finite() {
            return Err(Error::NoVariation);
        }
        if self.sigma < 0.0 {
            return Err(Error::BadParameter { name: "sigma", value: self.sigma, allowed: "> 0" });
        }
        Ok(())
    }

    /// Upper control limit of the individuals chart, mean + 3σ.
    pub fn ucl(&self) -> f64 {
        self.mean + 3.0 * self.sigma
    }

    /// Lower control limit of the individuals chart, mean − 3σ.
    pub fn lcl(&self) -> f64 {
        self.mean - 3.0 * self.sigma
    }

    /// Centre line of the moving-range chart, σ · d2 (= MR̄ of the baseline).
    pub fn mr_center(&self) -> f64 {
        self.sigma * D2
    }

    /// Upper control limit of the moving-range chart, D4 · MR̄ (its lower limit is 0).
    pub fn mr_ucl(&self) -> f64 {
        D4 * self.mr_center()
    }
}

/// A detection rule. Serialised as its stable [`Rule::code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Rule {
    /// Western Electric 1: one point beyond 3σ.
    #[serde(rename = "we1")]
    Beyond3Sigma,
    /// Western Electric 2: 2 of 3 consecutive points beyond 2σ on the same side.
    #[serde(rename = "we2")]
    TwoOfThreeBeyond2Sigma,
    /// Western Electric 3: 4 of 5 consecutive points beyond 1σ on the same side.
    #[serde(rename = "we3")]
    FourOfFiveBeyond1Sigma,
    /// Western Electric 4: 8 points in a row on one side of the centre line.
    #[serde(rename = "we4")]
    EightOnOneSide,
    /// Nelson: 6 points in a row steadily increasing or decreasing.
    #[serde(rename = "nelson-trend")]
    SixTrending,
    /// Nelson: 14 points in a row alternating up and down.
    #[serde(rename = "nelson-alternating")]
    FourteenAlternating,
    /// Nelson: 15 points in a row within 1σ (stratification).
    #[serde(rename = "nelson-stratification")]
    FifteenWithin1Sigma,
    /// Nelson: 8 points in a row none of which is within 1σ (mixture).
    #[serde(rename = "nelson-mixture")]
    EightOutside1Sigma,
    /// A moving range above the moving-range chart's upper limit.
    #[serde(rename = "mr")]
    MovingRangeBeyondUcl,
    /// The EWMA statistic beyond its control limits.
    #[serde(rename = "ewma")]
    EwmaBeyondLimit,
    /// The upper CUSUM beyond the decision interval H.
    #[serde(rename = "cusum-upper")]
    CusumUpper,
    /// The lower CUSUM beyond the decision interval H.
    #[serde(rename = "cusum-lower")]
    CusumLower,
}

impl Rule {
    /// The four Western Electric zone rules.
    pub const WESTERN_ELECTRIC: [Rule; 4] = [
        Rule::Beyond3Sigma,
        Rule::TwoOfThreeBeyond2Sigma,
        Rule::FourOfFiveBeyond1Sigma,
        Rule::EightOnOneSide,
    ];

    /// The four rules Nelson adds to the Western Electric set.
    pub const NELSON_EXTRA: [Rule; 4] =
        [Rule::SixTrending, Rule::FourteenAlternating, Rule::FifteenWithin1Sigma, Rule::EightOutside1Sigma];

    /// Every pattern rule on the individuals and moving-range charts (no EWMA/CUSUM).
    pub const ALL_PATTERN: [Rule; 9] = [
        Rule::Beyond3Sigma,
        Rule::TwoOfThreeBeyond2Sigma,
        Rule::FourOfFiveBeyond1Sigma,
        Rule::EightOnOneSide,
        Rule::SixTrending,
        Rule::FourteenAlternating,
        Rule::FifteenWithin1Sigma,
        Rule::EightOutside1Sigma,
        Rule::MovingRangeBeyondUcl,
    ];

    /// Every rule, in declaration order.
    pub const ALL: [Rule; 12] = [
        Rule::Beyond3Sigma,
        Rule::TwoOfThreeBeyond2Sigma,
        Rule::FourOfFiveBeyond1Sigma,
        Rule::EightOnOneSide,
        Rule::SixTrending,
        Rule::FourteenAlternating,
        Rule::FifteenWithin1Sigma,
        Rule::EightOutside1Sigma,
        Rule::MovingRangeBeyondUcl,
        Rule::EwmaBeyondLimit,
        Rule::CusumUpper,
        Rule::CusumLower,
    ];

    /// Stable short code, safe to store and to put on the wire.
    pub fn code(self) -> &'static str {
        match self {
            Rule::Beyond3Sigma => "we1",
            Rule::TwoOfThreeBeyond2Sigma => "we2",
            Rule::FourOfFiveBeyond1Sigma => "we3",
            Rule::EightOnOneSide => "we4",
            Rule::SixTrending => "nelson-trend",
            Rule::FourteenAlternating => "nelson-alternating",
            Rule::FifteenWithin1Sigma => "nelson-stratification",
            Rule::EightOutside1Sigma => "nelson-mixture",
            Rule::MovingRangeBeyondUcl => "mr",
            Rule::EwmaBeyondLimit => "ewma",
            Rule::CusumUpper => "cusum-upper",
            Rule::CusumLower => "cusum-lower",
        }
    }

    /// One line an operator understands.
    pub fn description(self) -> &'static str {
        match self {
            Rule::Beyond3Sigma => "1 point beyond 3σ from the centre line",
            Rule::TwoOfThreeBeyond2Sigma => "2 of 3 consecutive points beyond 2σ on the same side",
            Rule::FourOfFiveBeyond1Sigma => "4 of 5 consecutive points beyond 1σ on the same side",
            Rule::EightOnOneSide => "8 points in a row on the same side of the centre line",
            Rule::SixTrending => "6 points in a row steadily increasing or decreasing",
            Rule::FourteenAlternating => "14 points in a row alternating up and down",
            Rule::FifteenWithin1Sigma => "15 points in a row within 1σ of the centre line",
            Rule::EightOutside1Sigma => "8 points in a row with none within 1σ of the centre line",
            Rule::MovingRangeBeyondUcl => "jump between consecutive points above the moving-range limit",
            Rule::EwmaBeyondLimit => "EWMA beyond its control limit: a small sustained shift",
            Rule::CusumUpper => "CUSUM shows a sustained upward shift",
            Rule::CusumLower => "CUSUM shows a sustained downward shift",
        }
    }

    /// Inverse of [`Rule::code`].
    pub fn from_code(code: &str) -> Option<Rule> {
        Rule::ALL.into_iter().find(|r| r.code() == code)
    }
}

/// Where a pattern lies relative to the centre line. For trends and moving-range jumps,
/// `Above` means rising and `Below` falling; `Both` means the pattern spans both sides
/// (alternation, stratification, a mixture with points on either side).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// Above the centre line, or rising.
    Above,
    /// Below the centre line, or falling.
    Below,
    /// On both sides, or not side-specific.
    Both,
}

/// One rule holding at one point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Violation {
    /// The rule that holds.
    pub rule: Rule,
    /// The point that completes the pattern.
    pub index: usize,
    /// The first point of the pattern window (for CUSUM: where the current accumulation began).
    pub first: usize,
    /// Side of the centre line, or direction, of the pattern.
    pub side: Side,
}

const ONE_SIDE_RUN: usize = 8;
const TREND_RUN: usize = 6;
const ALTERNATING_RUN: usize = 14;
const WITHIN_RUN: usize = 15;
const OUTSIDE_RUN: usize = 8;

/// Evaluates `rules` over `values` (time order) against `baseline`, producing one
/// [`Violation`] for every index at which a rule holds (9 points in a row above the centre
/// give "8 on one side" at indices 7 and 8).
///
/// Conventions: "beyond" is strict, so a point exactly on a limit is not beyond it and
/// counts as within; a point exactly on the centre line is on neither side. For the windowed
/// rules (2 of 3, 4 of 5) the completing point must itself be beyond the zone, and at the
/// start of the series the window is truncated so that, say, the first two points both
/// beyond 2σ still signal. Non-finite values match no zone and break every run. EWMA/CUSUM
/// rules, if requested, use the default parameters and skip non-finite values; use
/// [`ewma_violations`] / [`cusum_violations`] for other parameters.
///
/// The result is ordered by index, then by rule (declaration order); repeated rules are
/// ignored. An invalid baseline yields no violations. All pattern rules share one O(n) pass.
pub fn violations(values: &[f64], baseline: &Baseline, rules: &[Rule]) -> Vec<Violation> {
    let mut out = Vec::new();
    if baseline.check().is_err() {
        return out;
    }
    let mut on = [false; Rule::ALL.len()];
    for &rule in rules {
        if let Some(slot) = on.get_mut(rule as usize) {
            *slot = true;
        }
    }
    let enabled = |r: Rule| on.get(r as usize).copied().unwrap_or(false);
    if Rule::ALL_PATTERN.into_iter().any(enabled) {
        pattern_pass(values, baseline, &on, &mut out);
    }
    if enabled(Rule::EwmaBeyondLimit) {
        let mut state = EwmaState::new(baseline, EwmaParams::default());
        // Plain loops rather than iterator adapters: a closure holding `&mut state` keeps
        // the recursion in memory, and the store-to-load round trip per point doubled the
        // cost.
        for (i, &x) in values.iter().enumerate() {
            if x.is_finite() {
                ewma_signal(&mut out, i, &state.step(x));
            }
        }
    }
    let (upper, lower) = (enabled(Rule::CusumUpper), enabled(Rule::CusumLower));
    if upper || lower {
        let mut state = CusumState::new(baseline, CusumParams::default());
        let mut tracker = CusumTracker::new(upper, lower);
        for (i, &x) in values.iter().enumerate() {
            if x.is_finite() {
                tracker.observe(&mut out, i, &state.step(x));
            }
        }
    }
    // The pattern pass already emits in this order; only the EWMA/CUSUM passes need merging,
    // and the stable sort is linear on the already-sorted runs.
    out.sort_by_key(|v| (v.index, v.rule));
    out
}

// Per-point predicate bits. In the `hits` words the same bit means "the rule built on this
// predicate completes here" (e.g. AC: 8 in a row above the centre).
const AC: u16 = 1 << 0; // above the centre
const BC: u16 = 1 << 1; // below the centre
const A1: u16 = 1 << 2; // beyond +1σ
const B1: u16 = 1 << 3; // beyond −1σ
const A2: u16 = 1 << 4;
const B2: u16 = 1 << 5;
const A3: u16 = 1 << 6;
const B3: u16 = 1 << 7;
const WITHIN: u16 = 1 << 8; // within ±1σ (limits included)
const UP: u16 = 1 << 9; // step into this point rises
const DOWN: u16 = 1 << 10;
const MR: u16 = 1 << 11; // moving range beyond its UCL
const ALT: u16 = 1 << 12; // this step and the previous one go opposite ways
const OUT: u16 = 1 << 13; // beyond ±1σ on either side
const NUM: u16 = 1 << 14; // not NaN (codes only)
// Hits only: side of a completed mixture run (A1/B1 runs shifted up).
const OUT_ABOVE: u16 = A1 << 12;
const OUT_BELOW: u16 = B1 << 12;

/// Points processed per block; small enough that every block buffer stays in L1.
const BLOCK: usize = 1024;
/// Points carried over from the previous block: the longest look-back (15 points in a row
/// within 1σ) reaches 14 points back.
const HALO: usize = 16;
const BUF: usize = BLOCK + HALO;

struct Limits {
    c: f64,
    hi1: f64,
    hi2: f64,
    hi3: f64,
    lo1: f64,
    lo2: f64,
    lo3: f64,
    mr_ucl: f64,
}

/// The predicate bits that need the raw values, for point `x` after point `p` (NaN for the
/// first point: every comparison with NaN is false, so it breaks runs like a bad value).
/// The rest are derived from these in [`derive_bits`], on narrow integers that vectorise
/// eight to a register, because this per-point step dominates the whole pattern pass.
#[inline(always)]
fn predicates(x: f64, p: f64, lim: &Limits) -> u16 {
    // Assembled in 64-bit lanes, the width of the comparison masks, and narrowed once.
    let bit = |b: bool, m: u16| if b { u64::from(m) } else { 0 };
    let word = bit(x > lim.c, AC)
        | bit(x < lim.c, BC)
        | bit(x > lim.hi1, A1)
        | bit(x < lim.lo1, B1)
        | bit(x > lim.hi2, A2)
        | bit(x < lim.lo2, B2)
        | bit(x > lim.hi3, A3)
        | bit(x < lim.lo3, B3)
        | bit(x > p, UP)
        | bit(x < p, DOWN)
        | bit((x - p).abs() > lim.mr_ucl, MR)
        | bit(!x.is_nan(), NUM);
    word as u16
}

/// Adds OUT, WITHIN and ALT to freshly computed codes (`code[k−1]` must already be final
/// for the first fresh point, which the halo guarantees).
fn derive_bits(code: &mut [u16], alt: &mut [u16]) {
    back(alt, code, code, 1, |x, prev| {
        let up_down = ((x & UP) >> 9) & ((prev & DOWN) >> 10);
        let down_up = ((x & DOWN) >> 10) & ((prev & UP) >> 9);
        (up_down | down_up) << 12
    });
    for (x, &a) in code.iter_mut().zip(alt.iter()) {
        let out = ((*x >> 2) | (*x >> 3)) & 1; // A1 or B1
        let within = ((*x & NUM) >> 14) & (out ^ 1);
        *x |= a | (out << 13) | (within << 8);
    }
}

/// `out[k] = f(a[k], b[k − s])`, with zeros before the start of `b`. A run of length 2L
/// ending at k is a run of L ending at k and one ending at k − L, so run detection needs
/// only a handful of these whole-block passes.
fn back(out: &mut [u16], a: &[u16], b: &[u16], s: usize, f: impl Fn(u16, u16) -> u16) {
    let n = out.len().min(a.len()).min(b.len());
    let s = s.min(n);
    let (head, tail) = out[..n].split_at_mut(s);
    for (o, &x) in head.iter_mut().zip(a) {
        *o = f(x, 0);
    }
    for ((o, &x), &y) in tail.iter_mut().zip(&a[s..n]).zip(&b[..n - s]) {
        *o = f(x, y);
    }
}

/// `out[k] |= a[k] & b[k − s] & mask` where `k >= s`.
fn or_into(out: &mut [u16], a: &[u16], b: &[u16], s: usize, mask: u16) {
    let n = out.len().min(a.len()).min(b.len());
    let s = s.min(n);
    for ((o, &x), &y) in out[s..n].iter_mut().zip(&a[s..n]).zip(&b[..n - s]) {
        *o |= x & y & mask;
    }
}

/// Every pattern rule in one blocked pass. Per point the work is a dozen comparisons packed
/// into a predicate word; runs and windows are then whole-block bitwise passes (vectorised
/// by the compiler), and only the few points where some rule completes take a branch. So
/// the cost barely depends on which rules are enabled.
fn pattern_pass(values: &[f64], b: &Baseline, on: &[bool; Rule::ALL.len()], out: &mut Vec<Violation>) {
    let enabled = |r: Rule| on.get(r as usize).copied().unwrap_or(false);
    let bits = |r: Rule, m: u16| if enabled(r) { m } else { 0 };
    let wanted = bits(Rule::Beyond3Sigma, A3 | B3)
        | bits(Rule::TwoOfThreeBeyond2Sigma, A2 | B2)
        | bits(Rule::FourOfFiveBeyond1Sigma, A1 | B1)
        | bits(Rule::EightOnOneSide, AC | BC)
        | bits(Rule::SixTrending, UP | DOWN)
        | bits(Rule::FourteenAlternating, ALT)
        | bits(Rule::FifteenWithin1Sigma, WITHIN)
        | bits(Rule::EightOutside1Sigma, OUT)
        | bits(Rule::MovingRangeBeyondUcl, MR);
    // Same expressions as `Baseline::ucl`/`lcl`, so a point drawn on a limit line is judged
    // exactly as the chart shows it.
    let (c, s) = (b.mean, b.sigma);
    let lim = Limits {
        c,
        hi1: c + s,
        hi2: c + 2.0 * s,
        hi3: c + 3.0 * s,
        lo1: c - s,
        lo2: c - 2.0 * s,
        lo3: c - 3.0 * s,
        mr_ucl: b.mr_ucl(),
    };

    // The halo starts as zeros: "no predicate held" before the series, which is exactly
    // what truncates windows and runs at its start.
    let mut code = [0u16; BUF];
    let mut scratch = [[0u16; BUF]; 6];
    let [a2, o2, a4, a8, maj, hits] = &mut scratch;

    for (block, chunk) in values.chunks(BLOCK).enumerate() {
        let start = block * BLOCK;
        let n = HALO + chunk.len();
        let fresh = &mut code[HALO..n];
        match start.checked_sub(1).and_then(|p| values.get(p..p + chunk.len())) {
            Some(prev) => {
                for ((o, &x), &p) in fresh.iter_mut().zip(chunk).zip(prev) {
                    *o = predicates(x, p, &lim);
                }
            }
            None => {
                let prev = std::iter::once(f64::NAN).chain(chunk.iter().copied());
                for ((o, &x), p) in fresh.iter_mut().zip(chunk).zip(prev) {
                    *o = predicates(x, p, &lim);
                }
            }
        }
        // The halo's codes are final already; deriving from HALO − 1 gives the first fresh
        // point its predecessor without touching the rest.
        derive_bits(&mut code[HALO - 1..n], &mut a2[HALO - 1..n]);
        let cur = &code[..n];

        back(a2, cur, cur, 1, |x, y| x & y); // runs of 2
        back(o2, cur, cur, 1, |x, y| x | y); // 1 of 2
        back(a4, a2, a2, 2, |x, y| x & y); // runs of 4
        back(a8, a4, a4, 4, |x, y| x & y); // runs of 8
        // At least 3 of 4 consecutive points: both of one pair and one of the other.
        back(maj, a2, o2, 2, |x, y| x & y);
        or_into(maj, o2, a2, 2, !0);

        back(hits, cur, a8, 0, |x, r8| {
            (x & (A3 | B3 | MR)) | (r8 & (AC | BC | OUT)) | ((r8 & (A1 | B1)) << 12)
        });
        let hits = &mut hits[..n];
        or_into(hits, cur, o2, 1, A2 | B2); // this point and 1 of the 2 before
        or_into(hits, cur, maj, 1, A1 | B1); // this point and 3 of the 4 before
        or_into(hits, a4, cur, 4, UP | DOWN); // 5 steps
        or_into(hits, a8, a4, 8, ALT); // 12 alternating pairs = 13 steps
        or_into(hits, a8, a8, 7, WITHIN); // 15 points

        for (k, (&h, &x)) in hits[HALO..].iter().zip(&cur[HALO..]).enumerate() {
            if h & wanted != 0 {
                emit(out, start + k, h, h & wanted, x);
            }
        }
        code.copy_within(n - HALO..n, 0);
    }
}

/// Turns one point's completed rules into violations, in `Rule` declaration order.
/// Kept out of line so the scan that calls it for a few percent of points stays tight.
#[inline(never)]
fn emit(out: &mut Vec<Violation>, index: usize, all: u16, hits: u16, code: u16) {
    let mut push = |rule: Rule, len: usize, side: Side| {
        out.push(Violation { rule, index, first: (index + 1).saturating_sub(len), side });
    };
    let sided = |above: u16| if hits & above != 0 { Side::Above } else { Side::Below };
    if hits & (A3 | B3) != 0 {
        push(Rule::Beyond3Sigma, 1, sided(A3));
    }
    if hits & (A2 | B2) != 0 {
        push(Rule::TwoOfThreeBeyond2Sigma, 3, sided(A2));
    }
    if hits & (A1 | B1) != 0 {
        push(Rule::FourOfFiveBeyond1Sigma, 5, sided(A1));
    }
    if hits & (AC | BC) != 0 {
        push(Rule::EightOnOneSide, ONE_SIDE_RUN, sided(AC));
    }
    if hits & (UP | DOWN) != 0 {
        push(Rule::SixTrending, TREND_RUN, sided(UP));
    }
    if hits & ALT != 0 {
        push(Rule::FourteenAlternating, ALTERNATING_RUN, Side::Both);
    }
    if hits & WITHIN != 0 {
        push(Rule::FifteenWithin1Sigma, WITHIN_RUN, Side::Both);
    }
    if hits & OUT != 0 {
        let side = if all & OUT_ABOVE != 0 {
            Side::Above
        } else if all & OUT_BELOW != 0 {
            Side::Below
        } else {
            Side::Both
        };
        push(Rule::EightOutside1Sigma, OUTSIDE_RUN, side);
    }
    if hits & MR != 0 {
        push(Rule::MovingRangeBeyondUcl, 2, if code & UP != 0 { Side::Above } else { Side::Below });
    }
}

/// One point of an individuals / moving-range chart.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ImrPoint {
    /// The individual value.
    pub value: f64,
    /// |xᵢ − xᵢ₋₁|; `None` for the first point, which has no predecessor.
    pub moving_range: Option<f64>,
}

/// An individuals / moving-range chart ready to draw.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImrChart {
    /// The baseline the limits come from.
    pub baseline: Baseline,
    /// Centre line of the individuals chart.
    pub center: f64,
    /// Upper control limit of the individuals chart.
    pub ucl: f64,
    /// Lower control limit of the individuals chart.
    pub lcl: f64,
    /// Centre line of the moving-range chart.
    pub mr_center: f64,
    /// Upper control limit of the moving-range chart (the lower one is 0).
    pub mr_ucl: f64,
    /// The plotted points, in time order.
    pub points: Vec<ImrPoint>,
    /// Rule violations, as from [`violations`].
    pub violations: Vec<Violation>,
}

/// Builds an I-MR chart of `values` against `baseline`, evaluating `rules`.
/// Needs at least one point, all finite.
pub fn imr(values: &[f64], baseline: &Baseline, rules: &[Rule]) -> Result<ImrChart, Error> {
    baseline.check()?;
    check_series(values)?;
    let prev = std::iter::once(None).chain(values.iter().copied().map(Some));
    let points = values
        .iter()
        .zip(prev)
        .map(|(&value, p)| ImrPoint { value, moving_range: p.map(|p| (value - p).abs()) })
        .collect();
    Ok(ImrChart {
        baseline: *baseline,
        center: baseline.mean,
        ucl: baseline.ucl(),
        lcl: baseline.lcl(),
        mr_center: baseline.mr_center(),
        mr_ucl: baseline.mr_ucl(),
        points,
        violations: violations(values, baseline, rules),
    })
}

/// Parameters of an EWMA chart.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EwmaParams {
    /// Weight of the newest point, 0 < λ ≤ 1 (λ = 1 is a Shewhart chart).
    pub lambda: f64,
    /// Width of the limits in asymptotic EWMA standard deviations, L > 0.
    pub l: f64,
}

impl Default for EwmaParams {
    /// λ = 0.2, L = 3: the common choice for detecting shifts of about 1σ.
    fn default() -> Self {
        EwmaParams { lambda: 0.2, l: 3.0 }
    }
}

impl EwmaParams {
    /// Checks 0 < λ ≤ 1 and L > 0 (both finite).
    pub fn validate(&self) -> Result<(), Error> {
        if !(self.lambda > 0.0 && self.lambda <= 1.0) {
            return Err(Error::BadParameter {
                name: "lambda",
                value: self.lambda,
                allowed: "0 < lambda <= 1",
            });
        }
        if !(self.l > 0.0 && self.l.is_finite()) {
            return Err(Error::BadParameter { name: "l", value: self.l, allowed: "finite and > 0" });
        }
        Ok(())
    }
}

/// One point of an EWMA chart.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EwmaPoint {
    /// The EWMA statistic zᵢ.
    pub z: f64,
    /// Lower control limit at this point.
    pub lcl: f64,
    /// Upper control limit at this point.
    pub ucl: f64,
    /// Whether zᵢ is strictly outside the limits.
    pub out: bool,
}

/// An EWMA computed one point at a time, for series too long to hold every point.
/// [`ewma`] is this over a whole slice.
#[derive(Debug, Clone)]
pub struct EwmaState {
    mean: f64,
    lambda: f64,
    z: f64,
    /// Half-width the limits converge to, Lσ·sqrt(λ/(2−λ)).
    asymptote: f64,
    q: f64,
    /// (1−λ)^(2i), carried by multiplication so no exponent can overflow on long series.
    decay: f64,
}

impl EwmaState {
    /// Starts at the baseline's mean. Check the baseline and parameters first
    /// ([`Baseline::check`], [`EwmaParams::validate`]).
    pub fn new(b: &Baseline, p: EwmaParams) -> EwmaState {
        let asymptote = p.l * b.sigma * (p.lambda / (2.0 - p.lambda)).sqrt();
        let r = 1.0 - p.lambda;
        EwmaState { mean: b.mean, lambda: p.lambda, z: b.mean, asymptote, q: r * r, decay: 1.0 }
    }

    /// The next point.
    pub fn step(&mut self, x: f64) -> EwmaPoint {
        self.z = self.lambda * x + (1.0 - self.lambda) * self.z;
        self.decay *= self.q;
        if self.decay < f64::EPSILON * f64::EPSILON {
            // Far below what 1 − decay can resolve; flushing it avoids subnormal arithmetic,
            // which is many times slower, on every later point.
            self.decay = 0.0;
        }
        // Once the decay has vanished the limits are at their asymptote; skipping the square
        // root there makes long series markedly cheaper.
        let half =
            if self.decay == 0.0 { self.asymptote } else { self.asymptote * (1.0 - self.decay).sqrt() };
        let (lcl, ucl) = (self.mean - half, self.mean + half);
        EwmaPoint { z: self.z, lcl, ucl, out: self.z > ucl || self.z < lcl }
    }
}

/// EWMA chart of `values` against `baseline`: zᵢ = λxᵢ + (1−λ)zᵢ₋₁ with z₀ = μ, and the
/// exact time-varying limits μ ± Lσ·sqrt(λ/(2−λ)·(1−(1−λ)^(2i))), so early points are not
/// judged against the wider asymptotic limits. Needs at least one point, all finite.
pub fn ewma(values: &[f64], baseline: &Baseline, params: EwmaParams) -> Result<Vec<EwmaPoint>, Error> {
    baseline.check()?;
    params.validate()?;
    check_series(values)?;
    let mut state = EwmaState::new(baseline, params);
    Ok(values.iter().map(|&x| state.step(x)).collect())
}

/// Parameters of a tabular CUSUM, in units of sigma.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CusumParams {
    /// Reference value (allowance) K/σ, k ≥ 0; 0.5 targets a 1σ shift.
    pub k: f64,
    /// Decision interval H/σ, h > 0; 4 to 5 is usual.
    pub h: f64,
}

impl Default for CusumParams {
    /// k = 0.5, h = 5: tuned for a 1σ shift with a long in-control run length.
    fn default() -> Self {
        CusumParams { k: 0.5, h: 5.0 }
    }
}

impl CusumParams {
    /// Checks k ≥ 0 and h > 0 (both finite).
    pub fn validate(&self) -> Result<(), Error> {
        if !(self.k >= 0.0 && self.k.is_finite()) {
            return Err(Error::BadParameter { name: "k", value: self.k, allowed: "finite and >= 0" });
        }
        if !(self.h > 0.0 && self.h.is_finite()) {
            return Err(Error::BadParameter { name: "h", value: self.h, allowed: "finite and > 0" });
        }
        Ok(())
    }
}

/// One point of a tabular CUSUM.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CusumPoint {
    /// Upper cumulative sum C⁺ᵢ.
    pub upper: f64,
    /// Lower cumulative sum C⁻ᵢ.
    pub lower: f64,
    /// C⁺ᵢ > H.
    pub out_upper: bool,
    /// C⁻ᵢ > H.
    pub out_lower: bool,
}

/// A tabular CUSUM computed one point at a time; [`cusum`] is this over a slice.
#[derive(Debug, Clone)]
pub struct CusumState {
    mean: f64,
    k: f64,
    h: f64,
    upper: f64,
    lower: f64,
}

impl CusumState {
    /// Starts with both sums at zero. Check the baseline and parameters first.
    pub fn new(b: &Baseline, p: CusumParams) -> CusumState {
        CusumState { mean: b.mean, k: p.k * b.sigma, h: p.h * b.sigma, upper: 0.0, lower: 0.0 }
    }

    /// The next point.
    pub fn step(&mut self, x: f64) -> CusumPoint {
        self.upper = (x - self.mean - self.k + self.upper).max(0.0);
        self.lower = (self.mean - self.k - x + self.lower).max(0.0);
        CusumPoint {
            upper: self.upper,
            lower: self.lower,
            out_upper: self.upper > self.h,
            out_lower: self.lower > self.h,
        }
    }
}

/// Two-sided tabular CUSUM of `values` against `baseline`:
/// C⁺ᵢ = max(0, xᵢ − μ₀ − K + C⁺ᵢ₋₁), C⁻ᵢ = max(0, μ₀ − K − xᵢ + C⁻ᵢ₋₁), K = kσ, H = hσ.
/// The sums are not reset after a signal, so a persisting shift keeps signalling; the
/// caller decides when an investigated shift warrants a new baseline. Needs at least one
/// point, all finite.
pub fn cusum(values: &[f64], baseline: &Baseline, params: CusumParams) -> Result<Vec<CusumPoint>, Error> {
    baseline.check()?;
    params.validate()?;
    check_series(values)?;
    let mut state = CusumState::new(baseline, params);
    Ok(values.iter().map(|&x| state.step(x)).collect())
}

/// A chart point that can signal, so [`first_signal`] works for EWMA and CUSUM alike.
pub trait Signal {
    /// Whether this point is out of control.
    fn is_signal(&self) -> bool;
}

impl Signal for EwmaPoint {
    fn is_signal(&self) -> bool {
        self.out
    }
}

impl Signal for CusumPoint {
    fn is_signal(&self) -> bool {
        self.out_upper || self.out_lower
    }
}

/// Index of the first point that signals, if any.
pub fn first_signal<P: Signal>(points: &[P]) -> Option<usize> {
    points.iter().position(Signal::is_signal)
}

/// Turns EWMA points into [`Rule::EwmaBeyondLimit`] violations (`first` = `index`), so
/// charts with non-default parameters can be merged with [`violations`].
pub fn ewma_violations(points: &[EwmaPoint]) -> Vec<Violation> {
    let mut out = Vec::new();
    for (i, p) in points.iter().enumerate() {
        ewma_signal(&mut out, i, p);
    }
    out
}

/// Appends the [`Rule::EwmaBeyondLimit`] violation of point `index`, if it signals.
pub fn ewma_signal(out: &mut Vec<Violation>, index: usize, p: &EwmaPoint) {
    if p.out {
        let side = if p.z > p.ucl { Side::Above } else { Side::Below };
        out.push(Violation { rule: Rule::EwmaBeyondLimit, index, first: index, side });
    }
}

/// Turns CUSUM points into [`Rule::CusumUpper`] / [`Rule::CusumLower`] violations, ordered
/// by index. `first` is where the sum last left zero: the usual estimate of when the shift
/// began.
pub fn cusum_violations(points: &[CusumPoint]) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut tracker = CusumTracker::new(true, true);
    for (i, p) in points.iter().enumerate() {
        tracker.observe(&mut out, i, p);
    }
    out
}

/// Remembers where each sum last left zero, to report as the start of a signalling shift:
/// [`cusum_violations`] one point at a time.
#[derive(Debug, Clone)]
pub struct CusumTracker {
    upper: bool,
    lower: bool,
    up_start: usize,
    low_start: usize,
    prev_up: f64,
    prev_low: f64,
}

impl CusumTracker {
    /// Tracks the upper and/or the lower sum.
    pub fn new(upper: bool, lower: bool) -> CusumTracker {
        CusumTracker { upper, lower, up_start: 0, low_start: 0, prev_up: 0.0, prev_low: 0.0 }
    }

    /// Appends the violations of point `index`, if it signals.
    pub fn observe(&mut self, out: &mut Vec<Violation>, index: usize, p: &CusumPoint) {
        // Selects, not branches: on in-control data the sums leave zero at random.
        self.up_start = if p.upper > 0.0 && self.prev_up <= 0.0 { index } else { self.up_start };
        self.low_start = if p.lower > 0.0 && self.prev_low <= 0.0 { index } else { self.low_start };
        (self.prev_up, self.prev_low) = (p.upper, p.lower);
        if self.upper && p.out_upper {
            out.push(Violation { rule: Rule::CusumUpper, index, first: self.up_start, side: Side::Above });
        }
        if self.lower && p.out_lower {
            out.push(Violation { rule: Rule::CusumLower, index, first: self.low_start, side: Side::Below });
        }
    }
}

/// Process capability against specification limits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Capability {
    /// Process mean used.
    pub mean: f64,
    /// Process sigma used.
    pub sigma: f64,
    /// Lower specification limit, if any.
    pub lsl: Option<f64>,
    /// Upper specification limit, if any.
    pub usl: Option<f64>,
    /// (USL − LSL) / 6σ; only when both limits are given.
    pub cp: Option<f64>,
    /// min(Cpu, Cpl) over the limits given.
    pub cpk: f64,
    /// (USL − μ) / 3σ, when USL is given.
    pub cpu: Option<f64>,
    /// (μ − LSL) / 3σ, when LSL is given.
    pub cpl: Option<f64>,
    /// Cpk ≥ [`CPK_TARGET`].
    pub meets_target: bool,
}

/// Capability of a process with the given mean and sigma against `lsl` / `usl`; one-sided
/// when only one limit is given. Errors when neither limit is given, when a limit is not
/// finite, when lsl ≥ usl (naming "lsl"), or when sigma is not > 0.
pub fn capability(mean: f64, sigma: f64, lsl: Option<f64>, usl: Option<f64>) -> Result<Capability, Error> {
    Baseline::new(mean, sigma, 0)?;
    for (name, limit) in [("lsl", lsl), ("usl", usl)] {
        if let Some(v) = limit
            && !v.is_finite()
        {
            return Err(Error::BadParameter { name, value: v, allowed: "finite" });
        }
    }
    if let (Some(l), Some(u)) = (lsl, usl)
        && l >= u
    {
        return Err(Error::BadParameter { name: "lsl", value: l, allowed: "lsl < usl" });
    }
    let cpu = usl.map(|u| (u - mean) / (3.0 * sigma));
    let cpl = lsl.map(|l| (mean - l) / (3.0 * sigma));
    let cpk = match (cpu, cpl) {
        (Some(u), Some(l)) => u.min(l),
        (Some(c), None) | (None, Some(c)) => c,
        (None, None) => {
            return Err(Error::BadParameter {
                name: "lsl",
                value: f64::NAN,
                allowed: "at least one of lsl and usl",
            });
        }
    };
    let cp = lsl.zip(usl).map(|(l, u)| (u - l) / (6.0 * sigma));
    Ok(Capability { mean, sigma, lsl, usl, cp, cpk, cpu, cpl, meets_target: cpk >= CPK_TARGET })
}

fn check_finite(values: &[f64]) -> Result<(), Error> {
    match values.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(Error::NotFinite { index }),
        None => Ok(()),
    }
}

fn check_series(values: &[f64]) -> Result<(), Error> {
    if values.is_empty() {
        return Err(Error::TooFewPoints { needed: 1, got: 0 });
    }
    check_finite(values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use serde::de::IntoDeserializer;

    fn base(mean: f64, sigma: f64) -> Baseline {
        Baseline::new(mean, sigma, 100).unwrap()
    }

    /// (index, first, side) of the violations of one rule against mean 10, sigma 1
    /// (zones: ±1σ at 9/11, ±2σ at 8/12, ±3σ at 7/13).
    fn hits(values: &[f64], rule: Rule) -> Vec<(usize, usize, Side)> {
        violations(values, &base(10.0, 1.0), &[rule]).iter().map(|v| (v.index, v.first, v.side)).collect()
    }

    /// Reflects a series about the centre 10, turning every Above pattern into Below.
    fn mirror(values: &[f64]) -> Vec<f64> {
        values.iter().map(|x| 20.0 - x).collect()
    }

    fn flip(hits: Vec<(usize, usize, Side)>) -> Vec<(usize, usize, Side)> {
        let flip = |s| match s {
            Side::Above => Side::Below,
            Side::Below => Side::Above,
            Side::Both => Side::Both,
        };
        hits.into_iter().map(|(i, f, s)| (i, f, flip(s))).collect()
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn baseline_from_individuals_uses_mean_and_moving_range_over_d2() {
        // 10, 12, 11, 13, 12: sum 58, mean 58/5 = 11.6.
        // Moving ranges 2, 1, 2, 1: MR̄ = 6/4 = 1.5; sigma = 1.5/1.128 = 1.329787234...
        let b = Baseline::from_individuals(&[10.0, 12.0, 11.0, 13.0, 12.0]).unwrap();
        assert!(close(b.mean, 11.6, 1e-12));
        assert!(close(b.sigma, 1.5 / 1.128, 1e-12));
        assert!(close(b.sigma, 1.329_787_234_042_553, 1e-12));
        assert_eq!(b.n, 5);
        // MR centre recovers MR̄ = 1.5; MR UCL = 3.267 * 1.5 = 4.9005.
        assert!(close(b.mr_center(), 1.5, 1e-12));
        assert!(close(b.mr_ucl(), 4.9005, 1e-12));
        // 11.6 ± 3 * 1.3297872 = 11.6 ± 3.9893617.
        assert!(close(b.ucl(), 15.589_361_702_127_66, 1e-9));
        assert!(close(b.lcl(), 7.610_638_297_872_34, 1e-9));
    }

    #[test]
    fn baseline_rejects_bad_input() {
        assert_eq!(Baseline::from_individuals(&[]), Err(Error::TooFewPoints { needed: 2, got: 0 }));
        assert_eq!(Baseline::from_individuals(&[1.0]), Err(Error::TooFewPoints { needed: 2, got: 1 }));
        assert_eq!(Baseline::from_individuals(&[1.0, f64::NAN, 2.0]), Err(Error::NotFinite { index: 1 }));
        assert_eq!(
            Baseline::from_individuals(&[1.0, 2.0, f64::INFINITY]),
            Err(Error::NotFinite { index: 2 })
        );
        assert_eq!(Baseline::from_individuals(&[5.0, 5.0, 5.0]), Err(Error::NoVariation));
        assert_eq!(Baseline::new(0.0, 0.0, 1), Err(Error::NoVariation));
        assert_eq!(Baseline::new(0.0, f64::NAN, 1), Err(Error::NoVariation));
        assert_eq!(Baseline::new(0.0, f64::INFINITY, 1), Err(Error::NoVariation));
        assert!(matches!(Baseline::new(0.0, -1.0, 1), Err(Error::BadParameter { name: "sigma", .. })));
        assert!(matches!(Baseline::new(f64::NAN, 1.0, 1), Err(Error::BadParameter { name: "mean", .. })));
        assert!(Baseline::new(3.0, 0.5, 0).is_ok());
    }

    #[test]
    fn baseline_from_huge_values_does_not_overflow_the_mean() {
        let b = Baseline::from_individuals(&[1e308, 1.5e308, 1e308]);
        // Moving ranges 0.5e308 each: finite, so this is a valid (if absurd) baseline.
        let b = b.unwrap();
        assert!(close(b.mean / 1e308, 3.5 / 3.0, 1e-12));
    }

    #[test]
    fn deserialising_a_baseline_validates_it() {
        let ok = BaselineFields { mean: 1.0, sigma: 2.0, n: 3 };
        assert_eq!(Baseline::try_from(ok), Ok(Baseline { mean: 1.0, sigma: 2.0, n: 3 }));
        let bad = BaselineFields { mean: 1.0, sigma: 0.0, n: 3 };
        assert_eq!(Baseline::try_from(bad), Err(Error::NoVariation));
    }

    #[test]
    fn rule_codes_round_trip_and_are_unique() {
        for (i, r) in Rule::ALL.iter().enumerate() {
            assert_eq!(Rule::from_code(r.code()), Some(*r));
            assert!(!r.description().is_empty());
            assert_eq!(*r as usize, i, "violations() indexes its enabled-table by discriminant");
            // The serialised form is the stable code too.
            let code: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
                r.code().into_deserializer();
            assert_eq!(Rule::deserialize(code).ok(), Some(*r));
            for other in &Rule::ALL[i + 1..] {
                assert_ne!(r.code(), other.code());
            }
        }
        assert_eq!(Rule::from_code("we5"), None);
        assert_eq!(Rule::from_code(""), None);
        assert_eq!(&Rule::ALL_PATTERN[..4], &Rule::WESTERN_ELECTRIC);
        assert_eq!(&Rule::ALL_PATTERN[4..8], &Rule::NELSON_EXTRA);
        assert_eq!(Rule::ALL_PATTERN[8], Rule::MovingRangeBeyondUcl);
        assert_eq!(
            Rule::TwoOfThreeBeyond2Sigma.description(),
            "2 of 3 consecutive points beyond 2σ on the same side"
        );
    }

    #[test]
    fn beyond_3sigma_fires_only_strictly_outside_the_limits() {
        // Limits 7 and 13. x1 = 13.5 > 13 (above), x3 = 13 exactly (not beyond),
        // x4 = 6.5 < 7 (below), x5 = 7 exactly (not beyond).
        let xs = [10.0, 13.5, 10.0, 13.0, 6.5, 7.0];
        assert_eq!(hits(&xs, Rule::Beyond3Sigma), vec![(1, 1, Side::Above), (4, 4, Side::Below)]);
    }

    #[test]
    fn two_of_three_fires_when_the_completing_point_is_beyond_2sigma() {
        // Beyond 2σ means > 12 or < 8.
        // i=1: 12.5 beyond, window {x0, x1} has 1 -> no.
        // i=3: 12.1 beyond, window x1..x3 = 12.5, 10, 12.1 -> 2 above -> fire, first 1.
        // i=4: 11 not beyond -> no (completing point must be beyond).
        // i=5: 12.3 beyond, window x3..x5 = 12.1, 11, 12.3 -> 2 -> fire, first 3.
        // i=6: 12.2 beyond, window x4..x6 = 11, 12.3, 12.2 -> 2 -> fire, first 4.
        // i=7: 7.5 beyond below, window x5..x7 has only 1 below -> no (same side).
        // i=9: 7.9 beyond below, window x7..x9 = 7.5, 10, 7.9 -> 2 below -> fire, first 7.
        let xs = [10.0, 12.5, 10.0, 12.1, 11.0, 12.3, 12.2, 7.5, 10.0, 7.9];
        assert_eq!(
            hits(&xs, Rule::TwoOfThreeBeyond2Sigma),
            vec![(3, 1, Side::Above), (5, 3, Side::Above), (6, 4, Side::Above), (9, 7, Side::Below)]
        );
    }

    #[test]
    fn two_of_three_uses_a_truncated_window_at_the_start() {
        // x0 = x1 = 12.5 > 12: i=1 window {x0, x1} has 2 -> fire, first 0.
        // i=2: x2 = 10 not beyond -> no, even though x0..x2 holds 2 of 3.
        let xs = [12.5, 12.5, 10.0];
        assert_eq!(hits(&xs, Rule::TwoOfThreeBeyond2Sigma), vec![(1, 0, Side::Above)]);
    }

    #[test]
    fn two_of_three_needs_both_points_on_the_same_side_and_strictly_beyond() {
        // 12.5 and 7.5 are beyond 2σ on opposite sides; 12.0 is exactly at 2σ.
        assert!(hits(&[12.5, 7.5, 12.0, 10.0, 12.0, 12.5], Rule::TwoOfThreeBeyond2Sigma).is_empty());
    }

    #[test]
    fn four_of_five_fires_on_four_points_beyond_1sigma() {
        // Beyond 1σ above means > 11:
        //   x: 11.5 11.2 10.5 11.8 11.1  9.0 11.3 11.4
        //      Y    Y    N    Y    Y     N   Y    Y
        // i=3: x0..x3 -> 3 -> no. i=4: x0..x4 -> 4 -> fire, first 0.
        // i=6: x2..x6 = N Y Y N Y -> 3 -> no. i=7: x3..x7 = Y Y N Y Y -> 4 -> fire, first 3.
        let xs = [11.5, 11.2, 10.5, 11.8, 11.1, 9.0, 11.3, 11.4];
        let expected = vec![(4, 0, Side::Above), (7, 3, Side::Above)];
        assert_eq!(hits(&xs, Rule::FourOfFiveBeyond1Sigma), expected);
        assert_eq!(hits(&mirror(&xs), Rule::FourOfFiveBeyond1Sigma), flip(expected));
    }

    #[test]
    fn four_of_five_does_not_count_a_point_exactly_at_1sigma() {
        // x4 = 11.0 sits on +1σ, which is not beyond: x0..x4 = Y Y N Y N holds 3 beyond, and
        // the completing point is not beyond either.
        let xs = [11.5, 11.2, 10.0, 11.8, 11.0];
        assert!(hits(&xs, Rule::FourOfFiveBeyond1Sigma).is_empty());
        // 11.01 instead: Y Y N Y Y holds 4 and the completing point is beyond -> fires, first 0.
        let xs = [11.5, 11.2, 10.0, 11.8, 11.01];
        assert_eq!(hits(&xs, Rule::FourOfFiveBeyond1Sigma), vec![(4, 0, Side::Above)]);
    }

    #[test]
    fn eight_on_one_side_fires_at_every_index_from_the_eighth() {
        // x0..x8 are 9 points > 10: runs 1..9, so the rule holds at i=7 (first 0) and i=8
        // (first 1). x9 = 10 exactly is on neither side and ends the run.
        let xs = [10.2, 10.4, 10.1, 10.3, 10.6, 10.2, 10.1, 10.5, 10.3, 10.0, 10.2];
        let expected = vec![(7, 0, Side::Above), (8, 1, Side::Above)];
        assert_eq!(hits(&xs, Rule::EightOnOneSide), expected);
        assert_eq!(hits(&mirror(&xs), Rule::EightOnOneSide), flip(expected));
    }

    #[test]
    fn seven_on_one_side_is_not_eight() {
        // 7 above, a point exactly on the centre, 7 above again: no run reaches 8.
        let mut xs = vec![10.5; 7];
        xs.push(10.0);
        xs.extend([10.5; 7]);
        assert!(hits(&xs, Rule::EightOnOneSide).is_empty());
    }

    #[test]
    fn six_trending_needs_five_consecutive_steps_in_one_direction() {
        // Steps into x1..x9: + + - + + + + + -.
        // Rising run counts 1 2 0 1 2 3 4 5 0: 5 steps (6 points x3..x8) complete at i=8.
        let xs = [10.0, 10.1, 10.3, 10.2, 10.4, 10.5, 10.9, 11.0, 11.2, 11.1];
        let expected = vec![(8, 3, Side::Above)];
        assert_eq!(hits(&xs, Rule::SixTrending), expected);
        assert_eq!(hits(&mirror(&xs), Rule::SixTrending), flip(expected));
    }

    #[test]
    fn a_tie_breaks_a_trend() {
        // 1 2 3 3 4 5 6: the tie x2 = x3 leaves runs of 3 and 4 points.
        assert!(hits(&[1.0, 2.0, 3.0, 3.0, 4.0, 5.0, 6.0], Rule::SixTrending).is_empty());
        // Five increasing points are not six.
        assert!(hits(&[1.0, 2.0, 3.0, 4.0, 5.0], Rule::SixTrending).is_empty());
    }

    #[test]
    fn fourteen_alternating_fires_on_thirteen_alternating_steps() {
        // 9.5, 10.5, 9.5, ... for 15 points: steps into x1..x14 alternate + - + ...
        // 13 alternating steps (14 points x0..x13) complete at i=13; x1..x14 at i=14.
        let xs: Vec<f64> = (0..15).map(|i| if i % 2 == 0 { 9.5 } else { 10.5 }).collect();
        assert_eq!(hits(&xs, Rule::FourteenAlternating), vec![(13, 0, Side::Both), (14, 1, Side::Both)]);
        // 13 points alternate: no.
        assert!(hits(&xs[..13], Rule::FourteenAlternating).is_empty());
    }

    #[test]
    fn two_steps_the_same_way_break_alternation() {
        // Steps into x1..x14: + - + - + - + + - + - + - +. The second "+" in a row at x8
        // restarts the count: 7 alternating steps before it (x0..x7), 7 from it (x7..x14);
        // neither reaches the 13 steps that make 14 points.
        let xs = [9.5, 10.5, 9.5, 10.5, 9.5, 10.5, 9.5, 11.0, 11.5, 9.5, 10.5, 9.5, 10.5, 9.5, 10.5];
        assert!(hits(&xs, Rule::FourteenAlternating).is_empty());
    }

    #[test]
    fn fifteen_within_1sigma_counts_points_on_the_limit_as_within() {
        // 15 points in [9, 11]; 11.0 and 9.0 sit exactly on ±1σ, which is not beyond, so
        // they count as within. Run reaches 15 at i=14 (first 0); x15 = 11.5 ends it.
        let xs =
            [10.5, 9.5, 11.0, 9.0, 10.2, 10.8, 9.9, 10.1, 9.3, 10.7, 10.0, 9.6, 10.4, 9.8, 10.9, 11.5, 10.0];
        assert_eq!(hits(&xs, Rule::FifteenWithin1Sigma), vec![(14, 0, Side::Both)]);
        // Fourteen is not fifteen.
        assert!(hits(&xs[1..15], Rule::FifteenWithin1Sigma).is_empty());
    }

    #[test]
    fn eight_outside_1sigma_allows_both_sides() {
        // |x − 10| > 1 for all 9 points, alternating sides: run 8 at i=7 (first 0) and
        // 9 at i=8 (first 1); mixed sides -> Both.
        let xs = [11.5, 8.5, 12.0, 7.0, 11.2, 8.8, 13.5, 6.0, 11.1];
        assert_eq!(hits(&xs, Rule::EightOutside1Sigma), vec![(7, 0, Side::Both), (8, 1, Side::Both)]);
        // All above 11: still the mixture rule, reported as Above.
        let xs = [11.5; 8];
        assert_eq!(hits(&xs, Rule::EightOutside1Sigma), vec![(7, 0, Side::Above)]);
        assert_eq!(hits(&mirror(&xs), Rule::EightOutside1Sigma), vec![(7, 0, Side::Below)]);
    }

    #[test]
    fn eight_outside_1sigma_is_broken_by_a_point_on_the_limit() {
        // x4 = 11.0 exactly at 1σ is within, so no run of 8 forms.
        let xs = [11.5, 8.5, 12.0, 7.0, 11.0, 8.8, 13.5, 6.0, 11.1];
        assert!(hits(&xs, Rule::EightOutside1Sigma).is_empty());
    }

    #[test]
    fn moving_range_fires_when_a_jump_exceeds_d4_times_mr_bar() {
        // sigma 1: MR̄ = 1.128, MR UCL = 3.267 * 1.128 = 3.685176.
        // Ranges: |13−10| = 3, |9−13| = 4 > UCL (i=2, falling), |10−9| = 1,
        // |13.7−10| = 3.7 > UCL (i=4, rising), |10−13.7| = 3.7 (i=5, falling), |13.6-10| = 3.6.
        let xs = [10.0, 13.0, 9.0, 10.0, 13.7, 10.0, 13.6];
        assert_eq!(
            hits(&xs, Rule::MovingRangeBeyondUcl),
            vec![(2, 1, Side::Below), (4, 3, Side::Above), (5, 4, Side::Below)]
        );
    }

    #[test]
    fn violations_are_ordered_by_index_then_rule_without_duplicates() {
        // x1 = 14: beyond 3σ (i=1) and a jump of 4 > 3.685 (i=1); x2 = 10: jump of 4 (i=2).
        let xs = [10.0, 14.0, 10.0];
        let v = violations(
            &xs,
            &base(10.0, 1.0),
            &[Rule::MovingRangeBeyondUcl, Rule::Beyond3Sigma, Rule::MovingRangeBeyondUcl],
        );
        let got: Vec<(Rule, usize)> = v.iter().map(|v| (v.rule, v.index)).collect();
        assert_eq!(
            got,
            vec![(Rule::Beyond3Sigma, 1), (Rule::MovingRangeBeyondUcl, 1), (Rule::MovingRangeBeyondUcl, 2)]
        );
    }

    #[test]
    fn violations_with_an_invalid_baseline_or_no_data_are_empty() {
        let bad = Baseline { mean: 0.0, sigma: 0.0, n: 0 };
        assert!(violations(&[1.0, 100.0], &bad, &Rule::ALL).is_empty());
        let bad = Baseline { mean: f64::NAN, sigma: 1.0, n: 0 };
        assert!(violations(&[1.0, 100.0], &bad, &Rule::ALL).is_empty());
        assert!(violations(&[], &base(0.0, 1.0), &Rule::ALL).is_empty());
        assert!(violations(&[1.0, 2.0], &base(0.0, 1.0), &[]).is_empty());
    }

    #[test]
    fn non_finite_values_match_no_zone_and_break_runs() {
        // A NaN in the middle of 12 points above the centre leaves runs of 6 and 5.
        let mut xs = vec![10.5; 12];
        xs[6] = f64::NAN;
        assert!(hits(&xs, Rule::EightOnOneSide).is_empty());
        // +inf is beyond 3σ; NaN is not.
        assert_eq!(hits(&[f64::INFINITY, f64::NAN], Rule::Beyond3Sigma), vec![(0, 0, Side::Above)]);
        // EWMA skips the NaN rather than poisoning every later point.
        let mut xs = vec![0.0, f64::NAN];
        xs.extend([5.0; 3]);
        let v = violations(&xs, &base(0.0, 1.0), &[Rule::EwmaBeyondLimit]);
        assert!(v.iter().any(|v| v.index == 4));
    }

    #[test]
    fn imr_builds_limits_points_and_violations() {
        let b = base(10.0, 1.0);
        let chart = imr(&[10.0, 13.5, 12.0], &b, &Rule::ALL_PATTERN).unwrap();
        assert_eq!(chart.center, 10.0);
        assert_eq!(chart.ucl, 13.0);
        assert_eq!(chart.lcl, 7.0);
        assert!(close(chart.mr_center, 1.128, 1e-12));
        assert!(close(chart.mr_ucl, 3.685_176, 1e-12));
        let mrs: Vec<Option<f64>> = chart.points.iter().map(|p| p.moving_range).collect();
        assert_eq!(mrs, vec![None, Some(3.5), Some(1.5)]);
        // x1 = 13.5 > 13 (we1 at 1); x2 = 12.0 sits on +2σ, not beyond it, so no we2.
        let rules: Vec<(Rule, usize)> = chart.violations.iter().map(|v| (v.rule, v.index)).collect();
        assert_eq!(rules, vec![(Rule::Beyond3Sigma, 1)]);
        // A single point is a valid chart.
        assert_eq!(imr(&[10.0], &b, &Rule::ALL_PATTERN).unwrap().points.len(), 1);
    }

    #[test]
    fn imr_rejects_empty_non_finite_and_invalid_baseline() {
        let b = base(10.0, 1.0);
        assert_eq!(imr(&[], &b, &Rule::ALL_PATTERN), Err(Error::TooFewPoints { needed: 1, got: 0 }));
        assert_eq!(imr(&[1.0, f64::NAN], &b, &Rule::ALL_PATTERN), Err(Error::NotFinite { index: 1 }));
        let bad = Baseline { mean: 10.0, sigma: 0.0, n: 5 };
        assert_eq!(imr(&[1.0], &bad, &Rule::ALL_PATTERN), Err(Error::NoVariation));
    }

    #[test]
    fn ewma_follows_the_recursion_with_time_varying_limits() {
        // μ = 0, σ = 1, λ = 0.2, L = 3. Asymptotic half-width 3·sqrt(0.2/1.8) = 1.0.
        // i=1: z = 0.2·4 = 0.8; half = 3·sqrt(0.2/1.8·(1 − 0.8²)) = 3·sqrt(0.04) = 0.6 -> out.
        // i=2: z = 0.2·0 + 0.8·0.8 = 0.64; half = 3·sqrt(0.2/1.8·(1 − 0.8⁴))
        //      = 3·sqrt(0.1111·0.5904) = 3·sqrt(0.0656) = 0.768374... -> in.
        // i=3: z = 0.2·(−1) + 0.8·0.64 = 0.312.
        let b = base(0.0, 1.0);
        let pts = ewma(&[4.0, 0.0, -1.0], &b, EwmaParams::default()).unwrap();
        assert!(close(pts[0].z, 0.8, 1e-12));
        assert!(close(pts[0].ucl, 0.6, 1e-12));
        assert!(close(pts[0].lcl, -0.6, 1e-12));
        assert!(pts[0].out);
        assert!(close(pts[1].z, 0.64, 1e-12));
        assert!(close(pts[1].ucl, 3.0 * 0.0656f64.sqrt(), 1e-12));
        assert!(close(pts[1].ucl, 0.768_374_908_491_4, 1e-9));
        assert!(!pts[1].out);
        assert!(close(pts[2].z, 0.312, 1e-12));
        assert_eq!(first_signal(&pts), Some(0));
        let v = ewma_violations(&pts);
        assert_eq!(v, vec![Violation { rule: Rule::EwmaBeyondLimit, index: 0, first: 0, side: Side::Above }]);
        // After 200 points 0.8^400 ≈ 1e-39: the limits have reached 3·sqrt(0.2/1.8) = 1.0.
        let pts = ewma(&[0.0; 200], &b, EwmaParams::default()).unwrap();
        let last = pts.last().unwrap();
        assert!(close(last.ucl, 1.0, 1e-9));
        assert!(close(last.lcl, -1.0, 1e-9));
        assert_eq!(first_signal(&pts), None);
    }

    #[test]
    fn ewma_with_lambda_one_is_a_shewhart_chart() {
        // λ = 1: z = x and the half-width is Lσ·sqrt(1/1·(1 − 0)) = 3 from the first point.
        let pts = ewma(&[1.0, 3.5], &base(0.0, 1.0), EwmaParams { lambda: 1.0, l: 3.0 }).unwrap();
        assert_eq!((pts[0].z, pts[0].ucl, pts[0].out), (1.0, 3.0, false));
        assert_eq!((pts[1].z, pts[1].ucl, pts[1].out), (3.5, 3.0, true));
    }

    #[test]
    fn ewma_rule_in_violations_uses_default_parameters() {
        let b = base(0.0, 1.0);
        // A 2σ shift up then down: z = 2(1 − 0.8^i) first crosses its limit at i=3, which is
        // index 2 (0.976 > 0.859).
        let xs = [2.0, 2.0, 2.0, 2.0, -2.0, -2.0, -2.0, -2.0, -2.0, -2.0];
        let direct = ewma_violations(&ewma(&xs, &b, EwmaParams::default()).unwrap());
        assert_eq!(direct.first().map(|v| (v.index, v.side)), Some((2, Side::Above)));
        assert!(direct.iter().any(|v| v.side == Side::Below));
        assert_eq!(violations(&xs, &b, &[Rule::EwmaBeyondLimit]), direct);
    }

    #[test]
    fn ewma_rejects_bad_parameters_and_input() {
        let b = base(0.0, 1.0);
        for lambda in [0.0, -0.1, 1.1, f64::NAN] {
            let r = ewma(&[1.0], &b, EwmaParams { lambda, l: 3.0 });
            assert!(matches!(r, Err(Error::BadParameter { name: "lambda", .. })), "{lambda}");
        }
        for l in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let r = ewma(&[1.0], &b, EwmaParams { lambda: 0.2, l });
            assert!(matches!(r, Err(Error::BadParameter { name: "l", .. })), "{l}");
        }
        assert_eq!(ewma(&[], &b, EwmaParams::default()), Err(Error::TooFewPoints { needed: 1, got: 0 }));
        assert_eq!(ewma(&[f64::NAN], &b, EwmaParams::default()), Err(Error::NotFinite { index: 0 }));
        let zero = Baseline { mean: 0.0, sigma: 0.0, n: 0 };
        assert_eq!(ewma(&[1.0], &zero, EwmaParams::default()), Err(Error::NoVariation));
    }

    #[test]
    fn cusum_accumulates_and_signals_strictly_above_h() {
        // μ0 = 10, σ = 1, K = 0.5, H = 5.
        // C+ = max(0, x − 10.5 + C+prev):
        //   10.5 -> 0; 11 -> 0.5; 12 -> 2.0; 11.5 -> 3.0; 12 -> 4.5; 11 -> 5.0 (= H, no signal);
        //   12 -> 6.5 > 5 (signal at 6); 7 -> 3.0; 6 -> max(0, −4.5 + 3) = 0.
        // C− = max(0, 9.5 − x + C−prev): 0 for x ≥ 9.5, then 7 -> 2.5; 6 -> 3.5 + 2.5 = 6.0 > 5
        //   (signal at 8).
        let xs = [10.5, 11.0, 12.0, 11.5, 12.0, 11.0, 12.0, 7.0, 6.0];
        let pts = cusum(&xs, &base(10.0, 1.0), CusumParams::default()).unwrap();
        let upper: Vec<f64> = pts.iter().map(|p| p.upper).collect();
        let lower: Vec<f64> = pts.iter().map(|p| p.lower).collect();
        assert_eq!(upper, vec![0.0, 0.5, 2.0, 3.0, 4.5, 5.0, 6.5, 3.0, 0.0]);
        assert_eq!(lower, vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.5, 6.0]);
        let out_up: Vec<usize> = (0..pts.len()).filter(|&i| pts[i].out_upper).collect();
        let out_low: Vec<usize> = (0..pts.len()).filter(|&i| pts[i].out_lower).collect();
        assert_eq!(out_up, vec![6]);
        assert_eq!(out_low, vec![8]);
        assert_eq!(first_signal(&pts), Some(6));
        // C+ left zero at i=1, C− at i=7: those are the estimated starts of the shifts.
        assert_eq!(
            cusum_violations(&pts),
            vec![
                Violation { rule: Rule::CusumUpper, index: 6, first: 1, side: Side::Above },
                Violation { rule: Rule::CusumLower, index: 8, first: 7, side: Side::Below },
            ]
        );
        let only_lower = violations(&xs, &base(10.0, 1.0), &[Rule::CusumLower]);
        assert_eq!(
            only_lower,
            vec![Violation { rule: Rule::CusumLower, index: 8, first: 7, side: Side::Below }]
        );
    }

    #[test]
    fn cusum_rejects_bad_parameters_and_input() {
        let b = base(0.0, 1.0);
        for k in [-0.1, f64::NAN, f64::INFINITY] {
            let r = cusum(&[1.0], &b, CusumParams { k, h: 5.0 });
            assert!(matches!(r, Err(Error::BadParameter { name: "k", .. })), "{k}");
        }
        for h in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let r = cusum(&[1.0], &b, CusumParams { k: 0.5, h });
            assert!(matches!(r, Err(Error::BadParameter { name: "h", .. })), "{h}");
        }
        assert!(cusum(&[1.0], &b, CusumParams { k: 0.0, h: 4.0 }).is_ok());
        assert_eq!(cusum(&[], &b, CusumParams::default()), Err(Error::TooFewPoints { needed: 1, got: 0 }));
        assert_eq!(
            cusum(&[0.0, f64::NEG_INFINITY], &b, CusumParams::default()),
            Err(Error::NotFinite { index: 1 })
        );
    }

    #[test]
    fn capability_with_both_limits() {
        // μ = 10, σ = 0.5, LSL 7, USL 14: Cp = 7/3 = 2.333; Cpu = 4/1.5 = 2.667;
        // Cpl = 3/1.5 = 2.0; Cpk = 2.0 >= 1.33.
        let c = capability(10.0, 0.5, Some(7.0), Some(14.0)).unwrap();
        assert!(close(c.cp.unwrap(), 7.0 / 3.0, 1e-12));
        assert!(close(c.cpu.unwrap(), 4.0 / 1.5, 1e-12));
        assert!(close(c.cpl.unwrap(), 2.0, 1e-12));
        assert!(close(c.cpk, 2.0, 1e-12));
        assert!(c.meets_target);
    }

    #[test]
    fn capability_with_one_limit_is_one_sided() {
        // USL 11 only: Cpu = 1/1.5 = 0.667 = Cpk; no Cp.
        let c = capability(10.0, 0.5, None, Some(11.0)).unwrap();
        assert_eq!((c.cp, c.cpl), (None, None));
        assert!(close(c.cpk, 1.0 / 1.5, 1e-12));
        assert!(!c.meets_target);
        // LSL 8 only: Cpl = 2/1.5 = 1.333... >= 1.33.
        let c = capability(10.0, 0.5, Some(8.0), None).unwrap();
        assert_eq!((c.cp, c.cpu), (None, None));
        assert!(close(c.cpk, 2.0 / 1.5, 1e-12));
        assert!(c.meets_target);
        // Mean outside the specification: negative Cpk, not an error.
        let c = capability(12.0, 0.5, None, Some(11.0)).unwrap();
        assert!(close(c.cpk, -1.0 / 1.5, 1e-12));
    }

    #[test]
    fn capability_rejects_bad_limits_and_sigma() {
        assert!(matches!(capability(10.0, 0.5, None, None), Err(Error::BadParameter { name: "lsl", .. })));
        assert!(matches!(
            capability(10.0, 0.5, Some(14.0), Some(7.0)),
            Err(Error::BadParameter { name: "lsl", value, .. }) if value == 14.0
        ));
        assert!(matches!(
            capability(10.0, 0.5, Some(7.0), Some(7.0)),
            Err(Error::BadParameter { name: "lsl", .. })
        ));
        assert!(matches!(
            capability(10.0, 0.5, Some(f64::NAN), None),
            Err(Error::BadParameter { name: "lsl", .. })
        ));
        assert!(matches!(
            capability(10.0, 0.5, None, Some(f64::INFINITY)),
            Err(Error::BadParameter { name: "usl", .. })
        ));
        assert_eq!(capability(10.0, 0.0, Some(7.0), Some(14.0)), Err(Error::NoVariation));
        assert!(matches!(
            capability(10.0, -0.5, Some(7.0), Some(14.0)),
            Err(Error::BadParameter { name: "sigma", .. })
        ));
        assert!(matches!(
            capability(f64::NAN, 0.5, Some(7.0), None),
            Err(Error::BadParameter { name: "mean", .. })
        ));
    }

    #[test]
    fn error_messages_are_readable() {
        assert_eq!(Error::TooFewPoints { needed: 2, got: 1 }.to_string(), "need at least 2 points, got 1");
        assert_eq!(Error::NotFinite { index: 3 }.to_string(), "value at index 3 is not finite");
        let e = Error::BadParameter { name: "lambda", value: 1.5, allowed: "0 < lambda <= 1" };
        assert_eq!(e.to_string(), "lambda = 1.5 is out of range (allowed: 0 < lambda <= 1)");
    }

    /// Straight from the rule definitions, window by window: slow but obviously right.
    fn naive_pattern(xs: &[f64], b: &Baseline) -> Vec<Violation> {
        let (c, s) = (b.mean, b.sigma);
        let mut out = Vec::new();
        let mut add =
            |rule, index: usize, first: usize, side| out.push(Violation { rule, index, first, side });
        for (i, &x) in xs.iter().enumerate() {
            let tail = |n: usize| if i + 1 >= n { Some(&xs[i + 1 - n..=i]) } else { None };
            let upto = |n: usize| &xs[(i + 1).saturating_sub(n)..=i];
            if x > c + 3.0 * s || x < c - 3.0 * s {
                add(Rule::Beyond3Sigma, i, i, if x > c { Side::Above } else { Side::Below });
            }
            for (rule, k, n, z) in
                [(Rule::TwoOfThreeBeyond2Sigma, 2, 3, 2.0), (Rule::FourOfFiveBeyond1Sigma, 4, 5, 1.0)]
            {
                let w = upto(n);
                let first = (i + 1).saturating_sub(n);
                if x > c + z * s && w.iter().filter(|&&v| v > c + z * s).count() >= k {
                    add(rule, i, first, Side::Above);
                }
                if x < c - z * s && w.iter().filter(|&&v| v < c - z * s).count() >= k {
                    add(rule, i, first, Side::Below);
                }
            }
            if let Some(w) = tail(8) {
                if w.iter().all(|&v| v > c) {
                    add(Rule::EightOnOneSide, i, i - 7, Side::Above);
                }
                if w.iter().all(|&v| v < c) {
                    add(Rule::EightOnOneSide, i, i - 7, Side::Below);
                }
            }
            if let Some(w) = tail(6) {
                if w.windows(2).all(|p| p[1] > p[0]) {
                    add(Rule::SixTrending, i, i - 5, Side::Above);
                }
                if w.windows(2).all(|p| p[1] < p[0]) {
                    add(Rule::SixTrending, i, i - 5, Side::Below);
                }
            }
            if let Some(w) = tail(14) {
                let d: Vec<f64> = w.windows(2).map(|p| p[1] - p[0]).collect();
                let nonzero = d.iter().all(|&v| !v.is_nan() && v != 0.0);
                if nonzero && d.windows(2).all(|p| (p[0] > 0.0) != (p[1] > 0.0)) {
                    add(Rule::FourteenAlternating, i, i - 13, Side::Both);
                }
            }
            if let Some(w) = tail(15)
                && w.iter().all(|&v| v >= c - s && v <= c + s)
            {
                add(Rule::FifteenWithin1Sigma, i, i - 14, Side::Both);
            }
            if let Some(w) = tail(8)
                && w.iter().all(|&v| v > c + s || v < c - s)
            {
                let side = if w.iter().all(|&v| v > c + s) {
                    Side::Above
                } else if w.iter().all(|&v| v < c - s) {
                    Side::Below
                } else {
                    Side::Both
                };
                add(Rule::EightOutside1Sigma, i, i - 7, side);
            }
            if i >= 1 && (x - xs[i - 1]).abs() > b.mr_ucl() {
                add(
                    Rule::MovingRangeBeyondUcl,
                    i,
                    i - 1,
                    if x > xs[i - 1] { Side::Above } else { Side::Below },
                );
            }
        }
        out.sort_by_key(|v| (v.index, v.rule));
        out
    }

    #[test]
    fn single_pass_matches_the_rule_definitions_on_random_series() {
        let mut rng = StdRng::seed_from_u64(42);
        let b = base(10.0, 1.0);
        let mut fired = [false; Rule::ALL.len()];
        for round in 0..430 {
            // Mostly short series, plus some spanning several internal blocks of 1024.
            let len = if round < 400 { rng.random_range(0..80) } else { rng.random_range(1000..3500) };
            // Coarse values give ties and points exactly on the zone limits; drift and
            // alternation make the long-run rules fire; the odd NaN must break runs.
            let step = [0.5, 1.0, 0.1][rng.random_range(0..3)];
            let mut level = 10.0;
            let xs: Vec<f64> = (0..len)
                .map(|i| {
                    level += rng.random_range(-2..=2) as f64 * step * 0.5;
                    let x = match rng.random_range(0..4) {
                        0 => 10.0 + if i % 2 == 0 { 0.5 } else { -0.5 },
                        1 => 10.0 + (rng.random_range(-8..=8) as f64) * 0.5,
                        _ => level,
                    };
                    if rng.random_range(0..200) == 0 { f64::NAN } else { x }
                })
                .collect();
            let got = violations(&xs, &b, &Rule::ALL_PATTERN);
            assert_eq!(got, naive_pattern(&xs, &b), "{xs:?}");
            for v in got {
                fired[v.rule as usize] = true;
            }
        }
        for r in Rule::ALL_PATTERN {
            assert!(fired[r as usize], "{} never fired; the comparison proves little", r.code());
        }
    }

    #[test]
    fn runs_carry_across_internal_block_boundaries() {
        // Long regular series keep every run going through indices 1023/1024 and 2047/2048,
        // where the single pass switches blocks; the definitions see no boundary at all.
        let b = base(10.0, 1.0);
        let shapes: [fn(usize) -> f64; 5] = [
            |_| 10.5,                                 // we4, stratification
            |i| if i % 2 == 0 { 9.5 } else { 10.5 },  // alternating, stratification
            |i| 10.0 + i as f64 * 1e-3,               // trend, then we4 and zones
            |i| if i % 2 == 0 { 11.5 } else { 8.5 },  // mixture, alternating
            |i| if i % 3 == 0 { 10.0 } else { 12.5 }, // we2, we3, mixture gaps
        ];
        for shape in shapes {
            let xs: Vec<f64> = (0..2100).map(shape).collect();
            let got = violations(&xs, &b, &Rule::ALL_PATTERN);
            assert!(got.iter().any(|v| v.index == 1024));
            assert_eq!(got, naive_pattern(&xs, &b));
        }
    }

    fn normal(rng: &mut StdRng) -> f64 {
        // Box–Muller; 1 − u keeps the logarithm's argument in (0, 1].
        let u: f64 = rng.random();
        let v: f64 = rng.random();
        (-2.0 * (1.0 - u).ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    fn wild(rng: &mut StdRng) -> f64 {
        match rng.random_range(0..12) {
            0 => f64::NAN,
            1 => f64::INFINITY,
            2 => f64::NEG_INFINITY,
            3 => 0.0,
            4 => f64::MAX,
            5 => -f64::MAX,
            6 => f64::MIN_POSITIVE,
            7 => -1e-300,
            _ => normal(rng) * 10f64.powi(rng.random_range(-5..5)),
        }
    }

    #[test]
    fn random_inputs_never_panic() {
        let mut rng = StdRng::seed_from_u64(0x5bc_2024);
        for _ in 0..3000 {
            let len = rng.random_range(0..60);
            let clean = rng.random_bool(0.5);
            let xs: Vec<f64> =
                (0..len).map(|_| if clean { normal(&mut rng) } else { wild(&mut rng) }).collect();
            let b = if rng.random_bool(0.7) {
                Baseline { mean: normal(&mut rng), sigma: rng.random_range(0.01..3.0), n: len }
            } else {
                Baseline { mean: wild(&mut rng), sigma: wild(&mut rng), n: len }
            };
            let rules: Vec<Rule> = (0..rng.random_range(0..20))
                .map(|_| Rule::ALL[rng.random_range(0..Rule::ALL.len())])
                .collect();
            for v in violations(&xs, &b, &rules) {
                assert!(v.first <= v.index && v.index < xs.len());
                assert!(rules.contains(&v.rule));
            }
            let _ = Baseline::from_individuals(&xs);
            if let Ok(chart) = imr(&xs, &b, &Rule::ALL) {
                assert_eq!(chart.points.len(), xs.len());
            }
            let ep = EwmaParams { lambda: wild(&mut rng).abs().min(1.5), l: wild(&mut rng) };
            if let Ok(p) = ewma(&xs, &b, ep) {
                let _ = ewma_violations(&p);
                let _ = first_signal(&p);
            }
            let cp = CusumParams { k: wild(&mut rng), h: wild(&mut rng) };
            if let Ok(p) = cusum(&xs, &b, cp) {
                let _ = cusum_violations(&p);
                let _ = first_signal(&p);
            }
            let lsl = rng.random_bool(0.5).then(|| wild(&mut rng));
            let usl = rng.random_bool(0.5).then(|| wild(&mut rng));
            let _ = capability(wild(&mut rng), wild(&mut rng), lsl, usl);
        }
    }

    #[test]
    fn violations_handle_a_long_series() {
        // One million points in release; debug builds are much slower, so a tenth there.
        let n = if cfg!(debug_assertions) { 100_000 } else { 1_000_000 };
        let mut rng = StdRng::seed_from_u64(7);
        let xs: Vec<f64> = (0..n).map(|_| 10.0 + normal(&mut rng)).collect();
        let v = violations(&xs, &base(10.0, 1.0), &Rule::ALL);
        // In-control data still trips we1 about 0.27% of the time.
        assert!(v.iter().any(|v| v.rule == Rule::Beyond3Sigma));
        assert!(v.windows(2).all(|w| w[0].index <= w[1].index));
    }
}
