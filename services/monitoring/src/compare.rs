//! Which device, site, firmware version, recipe or cartridge lot differs in batch quality, and the
//! firmware rollout's cohort gate.
//!
//! **Comparing strata ([`compare_by`]).** A site can look worse only because it happened to receive a
//! bad cartridge lot, or to run a recipe the others do not. Raw per-site means cannot tell those apart,
//! so every comparison fits one additive model, `value = overall mean + effect of the compared level +
//! effect of each other factor's level + noise`, and judges the compared factor only by what it adds
//! once the other factors are accounted for ("adjusted for"). A comparison by site is adjusted for
//! firmware, recipe and lot; by device, for firmware, recipe and lot (a device always stays at its site,
//! so site and device are never adjusted for each other). The overall question "does this factor matter
//! at all?" is an F test of the model with against without the factor (type II). Each level (stratum)
//! then gets its adjusted difference from the rest of the fleet in the value's own unit, a 95 %
//! interval and a p-value corrected for having looked at every level (Bonferroni). The interval is
//! wider when a level is partly confounded (its batches mostly used one lot, say), because less of the
//! data can separate the two. Levels found to differ are taken out of "the rest of the fleet" one at a
//! time, worst first, so that a bad lot does not make every good lot look better than the rest. A
//! level whose batches all share, say, one lot that no other site used cannot be told apart from that
//! lot: it is reported as not estimable and never flagged.
//!
//! **Cohort gate ([`cohort_gate`]).** Before a firmware version reaches more devices, its batches
//! (cohort A) are compared with batches on the current version (cohort B). Each quality metric gets a
//! one-sided Welch t test in its "worse" direction (higher, lower, or further from a target) and each
//! count of bad outcomes (failed batches, alarms) a one-sided Fisher exact test. The p-values are
//! Holm-corrected together so the chance of a false "regressed" over the whole gate stays below
//! `alpha`, and a regression must also be large enough to matter (at least `min_effect_sigma` pooled
//! standard deviations, or a rate at least `min_rate_ratio` times the reference). Tests without enough
//! data in either cohort are reported but not counted; if no test had enough data the verdict is
//! "insufficient data", never "no regression".
//!
//! Everything is pure computation: no I/O, no clock, and no input makes it panic. Bad parameters and
//! malformed inputs are errors; too little data is an error or an explicit "insufficient data" result.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use statrs::distribution::{ContinuousCDF, Discrete, FisherSnedecor, Hypergeometric, StudentsT};
use statrs::statistics::{Max, Min};

/// Number of factors every [`Sample`] carries a level for.
pub const FACTORS: usize = 5;

/// A way of splitting the fleet's observations into strata.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Factor {
    /// The individual instrument.
    Device = 0,
    /// The site the device is installed at.
    Site = 1,
    /// The firmware version that ran the batch.
    Firmware = 2,
    /// The formulation recipe.
    Recipe = 3,
    /// The cartridge (consumable) lot.
    Lot = 4,
}

impl Factor {
    /// Every factor, in index order (`Factor as usize`).
    pub const ALL: [Factor; FACTORS] =
        [Factor::Device, Factor::Site, Factor::Firmware, Factor::Recipe, Factor::Lot];

    /// Lower-case name used in reports and APIs: "device", "site", "firmware", "recipe", "lot".
    pub fn name(self) -> &'static str {
        match self {
            Factor::Device => "device",
            Factor::Site => "site",
            Factor::Firmware => "firmware",
            Factor::Recipe => "recipe",
            Factor::Lot => "lot",
        }
    }

    /// Inverse of [`Factor::name`]; ASCII case is ignored because names arrive from query strings.
    pub fn from_name(s: &str) -> Option<Factor> {
        Factor::ALL.into_iter().find(|f| f.name().eq_ignore_ascii_case(s))
    }

    /// The factors a comparison by `self` is adjusted for: {Site, Firmware, Recipe, Lot} minus `self`;
    /// for Device: {Firmware, Recipe, Lot}. A device is nested in its site, so adjusting one for the
    /// other would leave nothing to compare.
    pub fn adjusted_for(self) -> Vec<Factor> {
        match self {
            Factor::Device => vec![Factor::Firmware, Factor::Recipe, Factor::Lot],
            own => [Factor::Site, Factor::Firmware, Factor::Recipe, Factor::Lot]
                .into_iter()
                .filter(|&f| f != own)
                .collect(),
        }
    }
}

impl fmt::Display for Factor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One observation (e.g. one batch's particle size) with its level for each factor, indexed by
/// `Factor as usize`. Levels are ids the caller assigns; only equality matters, gaps are fine.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// The measured value, in its own unit (nm, %, ...). Must be finite.
    pub value: f64,
    /// Level id per factor, indexed by `Factor as usize`.
    pub levels: [u32; FACTORS],
}

/// Why a comparison or gate could not be computed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Error {
    /// A parameter is outside its allowed range.
    #[error("{name} = {value} is outside the allowed range {allowed}")]
    InvalidParam {
        /// Parameter name as spelled in the API.
        name: &'static str,
        /// The rejected value.
        value: f64,
        /// The allowed range, human readable.
        allowed: &'static str,
    },
    /// A sample value is NaN or infinite.
    #[error("sample {index} has a non-finite value ({value})")]
    NonFiniteValue {
        /// Position in the input slice.
        index: usize,
        /// The offending value.
        value: f64,
    },
    /// The compared factor has fewer than two levels in the data, so there is nothing to compare.
    #[error("need at least 2 levels of {factor} to compare, the data has {levels}")]
    TooFewLevels {
        /// The compared factor.
        factor: Factor,
        /// Distinct levels present.
        levels: usize,
    },
    /// The model has (almost) as many parameters as observations, leaving no estimate of the noise.
    #[error(
        "{n} samples leave {df} residual degrees of freedom after fitting {params} parameters; need at least 2"
    )]
    TooFewDegreesOfFreedom {
        /// Number of samples.
        n: usize,
        /// Model parameters (1 + sum over factors of levels − 1).
        params: usize,
        /// Residual degrees of freedom left (n − params, floored at 0).
        df: usize,
    },
    /// The model reproduces every observation exactly (e.g. all values equal), so no test is possible.
    #[error("the model fits all {n} samples exactly (no residual variation), so nothing can be tested")]
    NoResidualVariation {
        /// Number of samples.
        n: usize,
    },
    /// Values so large that sums overflow double precision.
    #[error("values too large in magnitude to analyse in double precision ({context})")]
    OutOfRange {
        /// What was being computed.
        context: String,
    },
    /// A gate metric contains NaN or an infinity.
    #[error("metric {metric:?}: cohort {cohort} value {index} is not finite ({value})")]
    NonFiniteMetric {
        /// Metric name.
        metric: String,
        /// 'A' or 'B'.
        cohort: char,
        /// Position in that cohort's vector.
        index: usize,
        /// The offending value.
        value: f64,
    },
    /// The target of [`Direction::AwayFrom`] is NaN or infinite.
    #[error("metric {metric:?}: AwayFrom target {target} is not finite")]
    NonFiniteTarget {
        /// Metric name.
        metric: String,
        /// The offending target.
        target: f64,
    },
    /// A count has more events than trials.
    #[error("count {count:?}: cohort {cohort} has {events} events in only {trials} trials")]
    EventsExceedTrials {
        /// Count name.
        count: String,
        /// 'A' or 'B'.
        cohort: char,
        /// Events reported.
        events: u64,
        /// Trials reported.
        trials: u64,
    },
}

// ---------------------------------------------------------------------------------------------------
// Part 1: stratified comparison
// ---------------------------------------------------------------------------------------------------

/// One level of the compared factor, adjusted for the other factors.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StratumEffect {
    /// The caller's level id.
    pub level: u32,
    /// Observations at this level.
    pub n: usize,
    /// Raw (unadjusted) mean of those observations.
    pub mean: f64,
    /// Adjusted difference from the rest of the data, in the value's unit: this level's model effect
    /// minus the n-weighted mean effect of the reference levels. The reference is every other
    /// estimable level except those already found to differ (see [`compare_by`]), so one bad lot does
    /// not make the good ones look "better than the rest". For a level that is not estimable this is
    /// the difference from all other levels under an arbitrary split of the confounded effects: context
    /// only.
    pub effect: f64,
    /// Lower end of the 95 % interval for `effect` (per stratum, not Bonferroni-widened);
    /// −∞ when not estimable.
    pub ci_low: f64,
    /// Upper end of the 95 % interval for `effect`; +∞ when not estimable.
    pub ci_high: f64,
    /// `effect / standard error`; 0 when not estimable.
    pub t: f64,
    /// Two-sided p-value, Bonferroni-adjusted over the strata (capped at 1); 1 when not estimable.
    pub p_value: f64,
    /// `p_value < alpha`.
    pub significant: bool,
    /// False when this level is (almost) completely confounded with levels of the adjustment factors
    /// (e.g. a site that only ever used one lot nobody else used), so its own effect cannot be
    /// separated from theirs in this data. Such a stratum is never significant.
    pub estimable: bool,
}

/// Result of [`compare_by`]: does the factor matter after adjustment, and which levels differ.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FactorComparison {
    /// The compared factor.
    pub factor: Factor,
    /// Adjustment factors actually used (those with a single level in the data are dropped).
    pub adjusted_for: Vec<Factor>,
    /// Number of observations.
    pub n: usize,
    /// Distinct levels of the compared factor in the data.
    pub levels: usize,
    /// Type-II F statistic for the factor.
    pub f_statistic: f64,
    /// Numerator degrees of freedom (levels − 1).
    pub df_num: f64,
    /// Denominator (residual) degrees of freedom, n − parameters.
    pub df_den: f64,
    /// p-value of the F test.
    pub p_value: f64,
    /// `p_value < alpha`.
    pub significant: bool,
    /// Residual standard deviation of the full model, in the value's unit.
    pub residual_sigma: f64,
    /// Per-level effects: estimable ones first, each group by |effect| descending.
    pub strata: Vec<StratumEffect>,
    /// Significance level used.
    pub alpha: f64,
    /// Whether the least-squares fits (with and without the factor) converged: backfitting, finished
    /// by conjugate gradients when it crawls. False would mean the F statistic is approximate; in
    /// practice it stays true even for heavily confounded designs.
    pub converged: bool,
}

/// Backfitting stops when the largest parameter change falls below this fraction of the scale of the
/// effects (or of the data's spread, whichever is larger).
const BACKFIT_TOL: f64 = 1e-10;
/// Backfitting iteration cap; well-separated designs converge in a handful of sweeps.
const BACKFIT_MAX_ITER: usize = 200;
/// A level's contrast counts as estimable when the normal equations are solved to this relative
/// residual; a confounded level leaves an O(1) residual, so the threshold is not delicate.
const ESTIMABLE_TOL: f64 = 1e-6;

/// One factor of the model: its levels (compact index → caller's id) and observations per level.
struct Block {
    ids: Vec<u32>,
    counts: Vec<f64>,
}

/// The data reduced to cells (distinct combinations of levels of the model's factors). Fitted values
/// are constant within a cell, so every iteration costs O(cells · factors) instead of O(n · factors).
struct Design {
    n: usize,
    /// Block 0 is the compared factor, the others its adjustment factors.
    blocks: Vec<Block>,
    /// `cell_levels[block][cell]` = compact level of that block in that cell.
    cell_levels: Vec<Vec<usize>>,
    cell_weight: Vec<f64>,
    /// Sum of centred values in each cell.
    cell_sum: Vec<f64>,
    sample_cell: Vec<usize>,
    /// Values minus their mean; centring keeps sums small and lets the intercept stay at 0.
    y: Vec<f64>,
    /// Standard deviation of the values, the convergence scale when all effects are ~0.
    y_scale: f64,
}

impl Design {
    fn new(samples: &[Sample], factors: &[Factor]) -> Result<Design, Error> {
        let n = samples.len();
        let mean = samples.iter().map(|s| s.value).sum::<f64>() / n as f64;
        let y: Vec<f64> = samples.iter().map(|s| s.value - mean).collect();
        let y_scale = (y.iter().map(|v| v * v).sum::<f64>() / n as f64).sqrt();
        if !mean.is_finite() || !y_scale.is_finite() {
            return Err(Error::OutOfRange { context: "mean and spread of the sample values".into() });
        }

        let ids: Vec<Vec<u32>> = factors
            .iter()
            .map(|&f| {
                let mut v: Vec<u32> = samples.iter().map(|s| s.levels[f as usize]).collect();
                v.sort_unstable();
                v.dedup();
                v
            })
            .collect();

        // BTreeMap (not HashMap) so cell order, and hence floating-point summation order, is reproducible.
        let mut cell_index: BTreeMap<Vec<usize>, usize> = BTreeMap::new();
        let mut cell_keys: Vec<Vec<usize>> = Vec::new();
        let mut cell_weight = Vec::new();
        let mut cell_sum = Vec::new();
        let mut sample_cell = Vec::with_capacity(n);
        for (s, &yi) in samples.iter().zip(&y) {
            let key: Vec<usize> = factors
                .iter()
                .zip(&ids)
                .map(|(&f, lv)| lv.binary_search(&s.levels[f as usize]).unwrap_or_else(|i| i))
                .collect();
            let c = *cell_index.entry(key.clone()).or_insert_with(|| {
                cell_keys.push(key);
                cell_weight.push(0.0);
                cell_sum.push(0.0);
                cell_keys.len() - 1
            });
            cell_weight[c] += 1.0;
            cell_sum[c] += yi;
            sample_cell.push(c);
        }

        let mut cell_levels = Vec::with_capacity(factors.len());
        let mut blocks = Vec::with_capacity(factors.len());
        for (b, lv) in ids.into_iter().enumerate() {
            let levels: Vec<usize> = cell_keys.iter().map(|k| k[b]).collect();
            let mut counts = vec![0.0; lv.len()];
            for (&l, &w) in levels.iter().zip(&cell_weight) {
                counts[l] += w;
            }
            cell_levels.push(levels);
            blocks.push(Block { ids: lv, counts });
        }
        Ok(Design { n, blocks, cell_levels, cell_weight, cell_sum, sample_cell, y, y_scale })
    }

    fn cells(&self) -> usize {
        self.cell_weight.len()
    }
}

/// A fitted additive model: effects per block (all zero for blocks left out) and its residual sum of
/// squares.
struct Fit {
    alpha: Vec<Vec<f64>>,
    rss: f64,
    converged: bool,
}

/// Backfitting (block Gauss–Seidel on the normal equations): each block's effects become the mean
/// partial residual per level, then are centred (n-weighted) so the intercept stays at the mean.
/// Nearly confounded designs make it crawl; if it has not converged after the cap, the fit is
/// finished by preconditioned conjugate gradients from where backfitting stopped.
fn backfit(d: &Design, active: &[usize]) -> Fit {
    let mut alpha: Vec<Vec<f64>> = d.blocks.iter().map(|b| vec![0.0; b.ids.len()]).collect();
    let mut eta = vec![0.0; d.cells()];
    let mut converged = active.len() <= 1;
    for iter in 0..BACKFIT_MAX_ITER {
        let mut max_change = 0.0_f64;
        for &b in active {
            // Recompute the fit each time rather than update incrementally, so rounding cannot drift.
            refresh_eta(d, active, 0.0, &alpha, &mut eta);
            let levels = &d.cell_levels[b];
            let old = &alpha[b];
            let mut num = vec![0.0; old.len()];
            for (((&l, &s), &w), &e) in levels.iter().zip(&d.cell_sum).zip(&d.cell_weight).zip(&eta) {
                num[l] += s - w * (e - old[l]);
            }
            let counts = &d.blocks[b].counts;
            let mut new: Vec<f64> = num.iter().zip(counts).map(|(s, c)| s / c).collect();
            let shift = new.iter().zip(counts).map(|(a, c)| a * c).sum::<f64>() / d.n as f64;
            for (a, o) in new.iter_mut().zip(old) {
                *a -= shift;
                max_change = max_change.max((*a - o).abs());
            }
            alpha[b] = new;
        }
        let scale = active.iter().flat_map(|&b| alpha[b].iter()).fold(d.y_scale, |m, a| m.max(a.abs()));
        // A single block is solved exactly in one sweep.
        if max_change <= BACKFIT_TOL * scale || (active.len() <= 1 && iter == 0) {
            converged = true;
            break;
        }
    }
    let mut mu = 0.0;
    if !converged {
        let layout = Layout::new(d, active);
        let mut x0 = vec![0.0; layout.dim];
        let mut rhs = vec![0.0; layout.dim];
        rhs[0] = d.cell_sum.iter().sum();
        for (&b, &off) in layout.blocks.iter().zip(&layout.offsets) {
            x0[off..off + alpha[b].len()].copy_from_slice(&alpha[b]);
            for (&l, &s) in d.cell_levels[b].iter().zip(&d.cell_sum) {
                rhs[off + l] += s;
            }
        }
        let (x, ok) = pcg(d, &layout, &rhs, x0, BACKFIT_TOL * 10.0);
        if x.iter().all(|v| v.is_finite()) {
            mu = x[0];
            for (&b, &off) in layout.blocks.iter().zip(&layout.offsets) {
                let counts = &d.blocks[b].counts;
                let a = &x[off..off + counts.len()];
                // Same centring convention as backfitting; fitted values do not change.
                let shift = a.iter().zip(counts).map(|(a, c)| a * c).sum::<f64>() / d.n as f64;
                alpha[b] = a.iter().map(|v| v - shift).collect();
                mu += shift;
            }
            converged = ok;
        }
    }
    refresh_eta(d, active, mu, &alpha, &mut eta);
    let rss = d.y.iter().zip(&d.sample_cell).map(|(y, &c)| (y - eta[c]).powi(2)).sum();
    Fit { alpha, rss, converged }
}

fn refresh_eta(d: &Design, active: &[usize], mu: f64, alpha: &[Vec<f64>], eta: &mut [f64]) {
    eta.fill(mu);
    for &b in active {
        for (e, &l) in eta.iter_mut().zip(&d.cell_levels[b]) {
            *e += alpha[b][l];
        }
    }
}

/// Parameter layout of a model over some blocks, `[μ, levels of the first block.., ..]`, with the
/// inverse diagonal of X'X (n, then the per-level counts) as the Jacobi preconditioner. Within a
/// factor X'X is exactly diagonal, so this removes most of the ill-conditioning unbalanced levels cause.
struct Layout {
    blocks: Vec<usize>,
    offsets: Vec<usize>,
    dim: usize,
    inv_diag: Vec<f64>,
}

impl Layout {
    fn new(d: &Design, blocks: &[usize]) -> Layout {
        let mut offsets = Vec::with_capacity(blocks.len());
        let mut inv_diag = vec![1.0 / d.n as f64];
        for &b in blocks {
            offsets.push(inv_diag.len());
            inv_diag.extend(d.blocks[b].counts.iter().map(|c| 1.0 / c));
        }
        Layout { blocks: blocks.to_vec(), offsets, dim: inv_diag.len(), inv_diag }
    }
}

/// `out = X'X v` for the model described by `layout`.
fn normal_matvec(d: &Design, layout: &Layout, v: &[f64], out: &mut [f64], eta: &mut [f64]) {
    eta.fill(v[0]);
    for (&b, &off) in layout.blocks.iter().zip(&layout.offsets) {
        for (e, &l) in eta.iter_mut().zip(&d.cell_levels[b]) {
            *e += v[off + l];
        }
    }
    out.fill(0.0);
    for (&b, &off) in layout.blocks.iter().zip(&layout.offsets) {
        for ((&l, &w), &e) in d.cell_levels[b].iter().zip(&d.cell_weight).zip(eta.iter()) {
            out[off + l] += w * e;
        }
    }
    out[0] = d.cell_weight.iter().zip(eta.iter()).map(|(w, e)| w * e).sum();
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Preconditioned conjugate gradients for the (singular) normal equations `X'X x = rhs` from `x`.
/// Returns the last iterate and whether it solves the system to `tol` relative residual. An
/// inconsistent system (a non-estimable contrast) leaves an O(1) residual that stops shrinking.
fn pcg(d: &Design, layout: &Layout, rhs: &[f64], mut x: Vec<f64>, tol: f64) -> (Vec<f64>, bool) {
    let dim = layout.dim;
    let rhs_norm = dot(rhs, rhs).sqrt();
    let mut ap = vec![0.0; dim];
    let mut eta = vec![0.0; d.cells()];
    normal_matvec(d, layout, &x, &mut ap, &mut eta);
    let mut r: Vec<f64> = rhs.iter().zip(&ap).map(|(b, a)| b - a).collect();
    let mut z: Vec<f64> = r.iter().zip(&layout.inv_diag).map(|(r, m)| r * m).collect();
    let mut p = z.clone();
    let mut rz = dot(&r, &z);
    let mut checkpoint = dot(&r, &r).sqrt();
    // CG needs at most rank(X'X) steps in exact arithmetic; the slack absorbs rounding.
    for iter in 1..=2 * dim + 50 {
        if dot(&r, &r).sqrt() <= 1e-3 * tol * rhs_norm {
            break;
        }
        normal_matvec(d, layout, &p, &mut ap, &mut eta);
        let pap = dot(&p, &ap);
        if !(pap > 0.0 && pap.is_finite() && rz > 0.0) {
            break;
        }
        let step = rz / pap;
        for ((xi, ri), (pi, api)) in x.iter_mut().zip(r.iter_mut()).zip(p.iter().zip(&ap)) {
            *xi += step * pi;
            *ri -= step * api;
        }
        // Stagnation: a solvable system shrinks its residual far faster than 2× per 50 steps; an
        // unsolvable one plateaus, and waiting out the cap would cost O(levels²) solves when many
        // levels are confounded.
        if iter % 50 == 0 {
            let norm = dot(&r, &r).sqrt();
            if norm > 0.5 * checkpoint {
                break;
            }
            checkpoint = norm;
        }
        for ((zi, ri), m) in z.iter_mut().zip(&r).zip(&layout.inv_diag) {
            *zi = ri * m;
        }
        let rz_new = dot(&r, &z);
        let beta = rz_new / rz;
        for (pi, zi) in p.iter_mut().zip(&z) {
            *pi = zi + beta * *pi;
        }
        rz = rz_new;
    }
    // Judge by the true residual: CG's recurrence can claim progress on an inconsistent system.
    normal_matvec(d, layout, &x, &mut ap, &mut eta);
    let resid = ap.iter().zip(rhs).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
    let ok = resid <= tol * rhs_norm;
    (x, ok)
}

/// Solves `X'X b = c` for a contrast `c` of the full model; then `c'b` is Var(c'β̂)/σ², exact under
/// confounding (where the textbook `1/n_l + 1/(n − n_l)` is too small). `None` when `c` is not
/// estimable: the system has no solution.
fn solve_contrast(d: &Design, layout: &Layout, c: &[f64]) -> Option<Vec<f64>> {
    let (x, ok) = pcg(d, layout, c, vec![0.0; layout.dim], ESTIMABLE_TOL);
    let q = dot(c, &x);
    (ok && q > 0.0 && q.is_finite()).then_some(x)
}

/// The levels of the compared factor (block 0) that can be compared with one another.
///
/// "Level a minus level b" is estimable or not, and estimability is transitive, so the levels fall
/// into classes; levels in different classes cannot be told apart from the adjustment factors (e.g. a
/// site whose batches all used a lot no other site used). The class holding most observations is
/// "the fleet"; the others are reported as not estimable.
struct Comparable {
    /// Per level: in the main class.
    member: Vec<bool>,
    /// The main class's reference level (its largest).
    rep: usize,
    /// Per member level l: Var(α_l − α_rep)/σ² (0 for `rep` itself).
    var_to_rep: Vec<f64>,
}

/// Levels of block 0 whose indicator equals the indicator of some adjustment level (e.g. a site that
/// runs a firmware no other site runs): they cannot be compared with anything. Found by counting,
/// which spares the solver its most expensive case.
fn identical_to_an_adjuster(d: &Design) -> Vec<bool> {
    let counts0 = &d.blocks[0].counts;
    let mut aliased = vec![false; counts0.len()];
    for b in 1..d.blocks.len() {
        let mut partner: Vec<Option<usize>> = vec![None; counts0.len()];
        let mut single = vec![true; counts0.len()];
        for (&l, &m) in d.cell_levels[0].iter().zip(&d.cell_levels[b]) {
            match partner[l] {
                None => partner[l] = Some(m),
                Some(p) if p != m => single[l] = false,
                Some(_) => {}
            }
        }
        for (l, a) in aliased.iter_mut().enumerate() {
            if let (true, Some(m)) = (single[l], partner[l]) {
                *a |= d.blocks[b].counts[m] == counts0[l];
            }
        }
    }
    aliased
}

fn comparable_levels(d: &Design, layout: &Layout) -> Comparable {
    let counts = &d.blocks[0].counts;
    let k = counts.len();
    let off = layout.offsets[0];
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&a, &b| counts[b].total_cmp(&counts[a]).then(a.cmp(&b)));
    let mut assigned = identical_to_an_adjuster(d);
    let mut best = Comparable { member: vec![false; k], rep: order[0], var_to_rep: vec![0.0; k] };
    let mut best_n = 0.0;
    let mut unassigned_n: f64 = (0..k).filter(|&l| !assigned[l]).map(|l| counts[l]).sum();
    for &rep in &order {
        // A class can hold at most what is still unassigned; stop once that cannot beat the best.
        if assigned[rep] || unassigned_n <= best_n {
            continue;
        }
        let mut class = Comparable { member: vec![false; k], rep, var_to_rep: vec![0.0; k] };
        class.member[rep] = true;
        assigned[rep] = true;
        let mut class_n = counts[rep];
        for &l in &order {
            if assigned[l] {
                continue;
            }
            let mut c = vec![0.0; layout.dim];
            c[off + l] = 1.0;
            c[off + rep] = -1.0;
            if let Some(x) = solve_contrast(d, layout, &c) {
                class.member[l] = true;
                class.var_to_rep[l] = dot(&c, &x);
                assigned[l] = true;
                class_n += counts[l];
            }
        }
        unassigned_n -= class_n;
        if class_n > best_n {
            best_n = class_n;
            best = class;
        }
    }
    best
}

/// Upper tail of Student's t; conservative 1 for inputs statrs would reject.
fn t_sf(t: f64, df: f64) -> f64 {
    if t.is_nan() {
        return 1.0;
    }
    match StudentsT::new(0.0, 1.0, df) {
        Ok(dist) => clamp_p(dist.sf(t)),
        Err(_) => 1.0,
    }
}

/// Upper tail of F. Very large F would overflow inside statrs (and panic there), so it is cut off:
/// its p-value underflows anyway.
fn f_sf(f: f64, df_num: f64, df_den: f64) -> f64 {
    if f.is_nan() {
        return 1.0;
    }
    if f > 1e200 {
        return 0.0;
    }
    match FisherSnedecor::new(df_num, df_den) {
        Ok(dist) => clamp_p(dist.sf(f.max(0.0))),
        Err(_) => 1.0,
    }
}

/// Two-sided p of |t|, multiplied by the number of levels looked at, capped at 1.
fn bonferroni_p(t_abs: f64, df: f64, levels: usize) -> f64 {
    (2.0 * t_sf(t_abs, df) * levels as f64).min(1.0)
}

fn clamp_p(p: f64) -> f64 {
    if p.is_nan() { 1.0 } else { p.clamp(0.0, 1.0) }
}

/// Two-sided 95 % critical value of Student's t.
fn t_crit_95(df: f64) -> f64 {
    let q = StudentsT::new(0.0, 1.0, df).map(|d| d.inverse_cdf(0.975)).unwrap_or(f64::NAN);
    if q.is_finite() && q > 0.0 { q } else { 1.959_963_984_540_054 }
}

/// Compares the levels of `factor`, adjusted for [`Factor::adjusted_for`] (those with more than one
/// level in the data).
///
/// Fits `y = μ + Σ_f α_f[level] + ε` by backfitting; the F test compares the fit with and without
/// `factor` (type II, parameters counted as 1 + Σ(levels − 1), which is conservative when factors are
/// confounded). Each level's effect is its α minus the n-weighted mean α of a reference set, with the
/// exact standard error of that contrast under the model, tested on the residual degrees of freedom
/// and Bonferroni-adjusted over all levels. The reference set starts as all estimable levels; while
/// at least three remain, the most extreme level is removed from it if significant and the rest are
/// re-tested, so a single bad level is reported alone.
///
/// # Errors
/// `alpha` outside (0, 0.5), a non-finite value, fewer than 2 levels of `factor`, fewer than 2
/// residual degrees of freedom, or no residual variation at all (e.g. all values equal).
pub fn compare_by(samples: &[Sample], factor: Factor, alpha: f64) -> Result<FactorComparison, Error> {
    if !(alpha > 0.0 && alpha < 0.5) {
        return Err(Error::InvalidParam { name: "alpha", value: alpha, allowed: "(0, 0.5)" });
    }
    if let Some((index, s)) = samples.iter().enumerate().find(|(_, s)| !s.value.is_finite()) {
        return Err(Error::NonFiniteValue { index, value: s.value });
    }
    let level_count = |f: Factor| {
        let mut v: Vec<u32> = samples.iter().map(|s| s.levels[f as usize]).collect();
        v.sort_unstable();
        v.dedup();
        v.len()
    };
    let k = level_count(factor);
    if k < 2 {
        return Err(Error::TooFewLevels { factor, levels: k });
    }
    // A factor with one level is absorbed by the intercept; keeping it would only cost iterations.
    let adjusted_for: Vec<Factor> =
        factor.adjusted_for().into_iter().filter(|&f| level_count(f) > 1).collect();
    let mut model = vec![factor];
    model.extend(&adjusted_for);

    let n = samples.len();
    let params = 1 + model.iter().map(|&f| level_count(f) - 1).sum::<usize>();
    let df = n.saturating_sub(params);
    if df < 2 {
        return Err(Error::TooFewDegreesOfFreedom { n, params, df });
    }

    let d = Design::new(samples, &model)?;
    let all: Vec<usize> = (0..model.len()).collect();
    let full = backfit(&d, &all);
    let reduced = backfit(&d, &all[1..]);
    if !full.rss.is_finite() || !reduced.rss.is_finite() {
        return Err(Error::OutOfRange { context: "residual sum of squares".into() });
    }
    // "Exact fit" is judged relative to the data's magnitude: rounding leaves ~1e-16 relative residue.
    let max_abs = samples.iter().fold(0.0_f64, |m, s| m.max(s.value.abs()));
    if (full.rss / n as f64).sqrt() <= 1e-9 * max_abs {
        return Err(Error::NoResidualVariation { n });
    }

    let df_num = (k - 1) as f64;
    let df_den = df as f64;
    let sigma2 = full.rss / df_den;
    let residual_sigma = sigma2.sqrt();
    // Rounding can make the reduced RSS a hair below the full one; that means "no contribution".
    let f_statistic = ((reduced.rss - full.rss).max(0.0) / df_num) / sigma2;
    let p_value = f_sf(f_statistic, df_num, df_den);

    let layout = Layout::new(&d, &all);
    let dim = layout.dim;
    let t_crit = t_crit_95(df_den);
    let block = &d.blocks[0];
    let counts = &block.counts;
    let alpha0 = &full.alpha[0];
    let off = layout.offsets[0];
    let mut sums = vec![0.0; k];
    for (s, &c) in samples.iter().zip(&d.sample_cell) {
        sums[d.cell_levels[0][c]] += s.value;
    }

    // Each level is compared with the n-weighted mean of a reference set: the other comparable
    // levels, minus those already found to differ. Without that, one bad lot makes every good lot
    // look "better than the rest" (the rest includes the bad lot). Levels are found one at a time,
    // most extreme first, until none is significant or only two remain.
    let comparable = comparable_levels(&d, &layout);
    let mut in_reference = comparable.member.clone();
    let mut result: Vec<Option<(f64, f64)>> = vec![None; k]; // (effect, standard error)
    loop {
        let members: Vec<usize> = (0..k).filter(|&l| in_reference[l]).collect();
        if members.len() < 2 {
            break;
        }
        let n_ref: f64 = members.iter().map(|&m| counts[m]).sum();
        // Var(α_l − w'α)/σ² for every member from one solve: with w the reference weights, A = X'X
        // and Q(c) = c'A⁻c, Q(e_l − w) = Q(e_l − e_rep) − 2 (e_l − e_rep)'A⁻(w − e_rep) + Q(w − e_rep).
        let mut w_minus_rep = vec![0.0; dim];
        for &m in &members {
            w_minus_rep[off + m] += counts[m] / n_ref;
        }
        w_minus_rep[off + comparable.rep] -= 1.0;
        // Always estimable (a contrast within one class); the guard only avoids trusting a failed solve.
        let Some(bw) = solve_contrast(&d, &layout, &w_minus_rep) else {
            break;
        };
        let q_w = dot(&w_minus_rep, &bw);
        let alpha_w: f64 = members.iter().map(|&m| counts[m] / n_ref * alpha0[m]).sum();
        let mut most_extreme: Option<(usize, f64)> = None;
        for &l in &members {
            // e_l − mean of the *other* members = (n_ref / (n_ref − n_l)) · (e_l − w).
            let scale = n_ref / (n_ref - counts[l]);
            let u = bw[off + l] - bw[off + comparable.rep];
            let var = scale * scale * (comparable.var_to_rep[l] - 2.0 * u + q_w);
            let effect = scale * (alpha0[l] - alpha_w);
            if var > 0.0 && var.is_finite() && effect.is_finite() {
                let se = residual_sigma * var.sqrt();
                result[l] = Some((effect, se));
                let t = (effect / se).abs();
                if most_extreme.is_none_or(|(_, best)| t > best) {
                    most_extreme = Some((l, t));
                }
            } else {
                result[l] = None;
            }
        }
        match most_extreme {
            Some((l, t)) if members.len() >= 3 && bonferroni_p(t, df_den, k) < alpha => {
                in_reference[l] = false
            }
            _ => break,
        }
    }

    let mut strata: Vec<StratumEffect> = (0..k)
        .map(|l| {
            let n_l = counts[l];
            // Shown even when not estimable: the (arbitrary) split of the model, for context only.
            let rest = n as f64 - n_l;
            let raw_effect =
                alpha0[l] - (0..k).filter(|&m| m != l).map(|m| counts[m] * alpha0[m]).sum::<f64>() / rest;
            let base = StratumEffect {
                level: block.ids[l],
                n: n_l as usize,
                mean: sums[l] / n_l,
                effect: raw_effect,
                ci_low: f64::NEG_INFINITY,
                ci_high: f64::INFINITY,
                t: 0.0,
                p_value: 1.0,
                significant: false,
                estimable: false,
            };
            match result[l] {
                Some((effect, se)) => {
                    let t = effect / se;
                    let p = bonferroni_p(t.abs(), df_den, k);
                    StratumEffect {
                        effect,
                        ci_low: effect - t_crit * se,
                        ci_high: effect + t_crit * se,
                        t,
                        p_value: p,
                        significant: p < alpha,
                        estimable: true,
                        ..base
                    }
                }
                None => base,
            }
        })
        .collect();
    strata.sort_by(|a, b| {
        b.estimable
            .cmp(&a.estimable)
            .then(b.effect.abs().total_cmp(&a.effect.abs()))
            .then(a.level.cmp(&b.level))
    });

    Ok(FactorComparison {
        factor,
        adjusted_for,
        n,
        levels: k,
        f_statistic,
        df_num,
        df_den,
        p_value,
        significant: p_value < alpha,
        residual_sigma,
        strata,
        alpha,
        converged: full.converged && reduced.converged,
    })
}

// ---------------------------------------------------------------------------------------------------
// Part 2: cohort gate
// ---------------------------------------------------------------------------------------------------

/// Which way a metric gets worse.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Direction {
    /// Larger values are worse (e.g. PDI, particle size spread).
    HigherIsWorse,
    /// Smaller values are worse (e.g. encapsulation efficiency, yield).
    LowerIsWorse,
    /// Distance from a target is worse (two-sided limits, e.g. particle size around 80 nm). Tested on
    /// `|x − target|`, so both a shifted mean and a wider spread count as worse.
    AwayFrom(f64),
}

/// A continuous quality metric observed in both cohorts.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricSamples {
    /// Metric name, used in the summary.
    pub name: String,
    /// Which way is worse.
    pub direction: Direction,
    /// The cohort under test, e.g. batches on the new firmware.
    pub a: Vec<f64>,
    /// The reference cohort.
    pub b: Vec<f64>,
}

/// A count of bad outcomes in both cohorts, e.g. failed batches out of batches or alarms out of runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CountSamples {
    /// Count name, used in the summary.
    pub name: String,
    /// Bad outcomes in cohort A.
    pub events_a: u64,
    /// Opportunities in cohort A.
    pub trials_a: u64,
    /// Bad outcomes in cohort B.
    pub events_b: u64,
    /// Opportunities in cohort B.
    pub trials_b: u64,
}

/// Thresholds of the cohort gate.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GateParams {
    /// Family-wise false-alarm rate over all tests of one gate, in (0, 0.5). Default 0.01.
    pub alpha: f64,
    /// A metric regression must also be at least this many pooled standard deviations, so tiny but
    /// "significant" shifts in large cohorts do not block a rollout. ≥ 0, default 0.5.
    pub min_effect_sigma: f64,
    /// A count regression must also raise the rate at least this many times. ≥ 1, default 1.5.
    pub min_rate_ratio: f64,
    /// Minimum observations (metrics) or trials (counts) per cohort for a test to count. ≥ 2 (a
    /// variance needs two values), default 5.
    pub min_samples: usize,
}

impl Default for GateParams {
    fn default() -> Self {
        GateParams { alpha: 0.01, min_effect_sigma: 0.5, min_rate_ratio: 1.5, min_samples: 5 }
    }
}

/// Outcome of the gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Verdict {
    /// At least one metric or count is significantly and materially worse in cohort A.
    Regressed,
    /// Every test with enough data passed.
    NoRegression,
    /// No test had enough data in both cohorts; the gate cannot pass or fail.
    InsufficientData,
}

/// Evidence for one metric.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MetricEvidence {
    /// Metric name.
    pub name: String,
    /// Which way is worse.
    pub direction: Direction,
    /// Observations in cohort A.
    pub n_a: usize,
    /// Observations in cohort B.
    pub n_b: usize,
    /// Mean of cohort A on the raw scale (0 if empty).
    pub mean_a: f64,
    /// Mean of cohort B on the raw scale (0 if empty).
    pub mean_b: f64,
    /// Standard deviation of cohort A on the raw scale (0 with fewer than 2 values).
    pub sd_a: f64,
    /// Standard deviation of cohort B on the raw scale (0 with fewer than 2 values).
    pub sd_b: f64,
    /// Mean difference in the worse direction, positive = A worse; for `AwayFrom` the difference of
    /// mean distances from the target.
    pub worse_by: f64,
    /// `worse_by` over the pooled standard deviation (same scale as `worse_by`); ±∞ if both cohorts
    /// are constant and differ.
    pub effect_sigma: f64,
    /// One-sided Welch p-value (A worse), Holm-adjusted across all tests with enough data; 1 if not tested.
    pub p_value: f64,
    /// Significant and at least `min_effect_sigma`.
    pub regressed: bool,
    /// Both cohorts have at least `min_samples` values.
    pub enough_data: bool,
}

/// Evidence for one count.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CountEvidence {
    /// Count name.
    pub name: String,
    /// Bad outcomes in cohort A.
    pub events_a: u64,
    /// Opportunities in cohort A.
    pub trials_a: u64,
    /// Bad outcomes in cohort B.
    pub events_b: u64,
    /// Opportunities in cohort B.
    pub trials_b: u64,
    /// `events_a / trials_a` (0 without trials).
    pub rate_a: f64,
    /// `events_b / trials_b` (0 without trials).
    pub rate_b: f64,
    /// `rate_a / rate_b`; +∞ if only A has events, 1 if neither has.
    pub rate_ratio: f64,
    /// One-sided Fisher exact p-value (A has more events), Holm-adjusted; 1 if not tested.
    pub p_value: f64,
    /// Significant and `rate_ratio >= min_rate_ratio`.
    pub regressed: bool,
    /// Both cohorts have at least `min_samples` trials.
    pub enough_data: bool,
}

/// Result of [`cohort_gate`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GateReport {
    /// The decision.
    pub verdict: Verdict,
    /// Per-metric evidence, in input order.
    pub metrics: Vec<MetricEvidence>,
    /// Per-count evidence, in input order.
    pub counts: Vec<CountEvidence>,
    /// One line for the rollout log, e.g. "regressed: pdi worse by 0.041 (1.8σ, p=0.0003, n=40 vs 60)".
    pub summary: String,
    /// The parameters used.
    pub params: GateParams,
}

/// Welch's unequal-variance t test of "mean of `a` is larger than mean of `b`".
#[derive(Clone, Copy, Debug, PartialEq)]
struct Welch {
    t: f64,
    df: f64,
    p_greater: f64,
}

fn mean_sd(x: &[f64]) -> (f64, f64) {
    if x.is_empty() {
        return (0.0, 0.0);
    }
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let sd = if x.len() < 2 {
        0.0
    } else {
        (x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    };
    (mean, sd)
}

/// `None` with fewer than 2 values in a cohort.
fn welch(a: &[f64], b: &[f64]) -> Option<Welch> {
    if a.len() < 2 || b.len() < 2 {
        return None;
    }
    let (ma, sa) = mean_sd(a);
    let (mb, sb) = mean_sd(b);
    let (na, nb) = (a.len() as f64, b.len() as f64);
    let (va, vb) = (sa * sa / na, sb * sb / nb);
    let se2 = va + vb;
    let diff = ma - mb;
    if !(se2 > 0.0 && se2.is_finite()) {
        // Both cohorts constant: the difference is certain, so the test degenerates to its sign.
        let t = if diff > 0.0 {
            f64::INFINITY
        } else if diff < 0.0 {
            f64::NEG_INFINITY
        } else {
            0.0
        };
        return Some(Welch { t, df: na + nb - 2.0, p_greater: if diff > 0.0 { 0.0 } else { 1.0 } });
    }
    let t = diff / se2.sqrt();
    // Welch–Satterthwaite, written with variance shares so it cannot overflow or underflow.
    let (ra, rb) = (va / se2, vb / se2);
    let df = 1.0 / (ra * ra / (na - 1.0) + rb * rb / (nb - 1.0));
    Some(Welch { t, df, p_greater: t_sf(t, df) })
}

/// One-sided Fisher exact p-value that A has more events than B: P(X ≥ events_a) for X hypergeometric
/// with the table's margins. `None` if the margins overflow u64.
///
/// Sums the tail from the observed count outward and stops once terms are negligible (the pmf is
/// unimodal), instead of statrs' `sf`, which evaluates every term up to min(events, trials) with a
/// log-gamma each and would take hours on absurd counts.
fn fisher_greater(events_a: u64, trials_a: u64, events_b: u64, trials_b: u64) -> Option<f64> {
    let population = trials_a.checked_add(trials_b)?;
    let successes = events_a.checked_add(events_b)?;
    let dist = Hypergeometric::new(population, successes, trials_a).ok()?;
    let (lo, hi) = (dist.min(), dist.max());
    if events_a <= lo {
        return Some(1.0);
    }
    // u128: (n + 1)(K + 1) overflows u64 for large tables (statrs' own `mode` would).
    let mode = (u128::from(trials_a) + 1) * (u128::from(successes) + 1) / (u128::from(population) + 2);
    // Walk from `start` one step at a time using the pmf ratio (one multiplication per term, one
    // log-gamma evaluation in all), stopping once a term no longer changes the sum.
    let (k, n, rest) = (successes as f64, trials_a as f64, (population - successes) as f64);
    let tail = |start: u64, upward: bool, bound: u64| {
        let mut term = dist.ln_pmf(start).exp();
        let mut sum = term;
        let mut i = start;
        while i != bound && term > sum * 1e-17 {
            let x = i as f64;
            term *= if upward {
                (k - x) * (n - x) / ((x + 1.0) * (rest - n + x + 1.0))
            } else {
                x * (rest - n + x) / ((k - x + 1.0) * (n - x + 1.0))
            };
            sum += term;
            i = if upward { i + 1 } else { i - 1 };
        }
        sum
    };
    // Upper tail directly when it lies beyond the mode (small p, full relative precision); otherwise
    // the complement of the lower tail, which then holds at most about half the mass.
    let p = if u128::from(events_a) > mode {
        tail(events_a, true, hi)
    } else {
        1.0 - tail(events_a - 1, false, lo)
    };
    Some(clamp_p(p))
}

/// Holm step-down adjustment: the i-th smallest p is multiplied by (m − i), made monotone, capped at 1.
fn holm(p: &[f64]) -> Vec<f64> {
    let m = p.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&i, &j| p[i].total_cmp(&p[j]));
    let mut adjusted = vec![1.0; m];
    let mut running = 0.0_f64;
    for (rank, &i) in order.iter().enumerate() {
        running = running.max(((m - rank) as f64 * p[i]).min(1.0));
        adjusted[i] = running;
    }
    adjusted
}

/// Significant figures for the summary line.
fn sig(x: f64, digits: i32) -> String {
    if x == 0.0 || !x.is_finite() {
        return if x.is_infinite() { "∞".into() } else { "0".into() };
    }
    let magnitude = x.abs().log10().floor() as i32;
    let decimals = (digits - 1 - magnitude).clamp(0, 15) as usize;
    format!("{x:.decimals$}")
}

fn fmt_p(p: f64) -> String {
    if p < 1e-6 { "p<1e-6".into() } else { format!("p={}", sig(p, 2)) }
}

fn validate(params: &GateParams) -> Result<(), Error> {
    let bad = |name, value, allowed| Err(Error::InvalidParam { name, value, allowed });
    if !(params.alpha > 0.0 && params.alpha < 0.5) {
        return bad("alpha", params.alpha, "(0, 0.5)");
    }
    if !(params.min_effect_sigma >= 0.0 && params.min_effect_sigma.is_finite()) {
        return bad("min_effect_sigma", params.min_effect_sigma, "[0, ∞)");
    }
    // Below 1 an improvement could count as a regression.
    if !(params.min_rate_ratio >= 1.0 && params.min_rate_ratio.is_finite()) {
        return bad("min_rate_ratio", params.min_rate_ratio, "[1, ∞)");
    }
    if params.min_samples < 2 {
        return bad("min_samples", params.min_samples as f64, "[2, ∞)");
    }
    Ok(())
}

fn metric_evidence(m: &MetricSamples, min_samples: usize) -> Result<(MetricEvidence, Option<f64>), Error> {
    for (cohort, values) in [('A', &m.a), ('B', &m.b)] {
        if let Some((index, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(Error::NonFiniteMetric { metric: m.name.clone(), cohort, index, value });
        }
    }
    // Map every metric to "higher is worse" so one one-sided test serves all directions.
    let worse: fn(f64, f64) -> f64 = match m.direction {
        Direction::HigherIsWorse => |x, _| x,
        Direction::LowerIsWorse => |x, _| -x,
        Direction::AwayFrom(_) => |x, t| (x - t).abs(),
    };
    let target = match m.direction {
        Direction::AwayFrom(t) if !t.is_finite() => {
            return Err(Error::NonFiniteTarget { metric: m.name.clone(), target: t });
        }
        Direction::AwayFrom(t) => t,
        _ => 0.0,
    };
    let ta: Vec<f64> = m.a.iter().map(|&x| worse(x, target)).collect();
    let tb: Vec<f64> = m.b.iter().map(|&x| worse(x, target)).collect();
    let (mean_a, sd_a) = mean_sd(&m.a);
    let (mean_b, sd_b) = mean_sd(&m.b);
    let (tmean_a, tsd_a) = mean_sd(&ta);
    let (tmean_b, tsd_b) = mean_sd(&tb);
    let (n_a, n_b) = (m.a.len(), m.b.len());
    let worse_by = if n_a > 0 && n_b > 0 { tmean_a - tmean_b } else { 0.0 };
    let pooled_df = (n_a + n_b).saturating_sub(2);
    let pooled = if pooled_df > 0 {
        ((n_a.saturating_sub(1) as f64 * tsd_a * tsd_a + n_b.saturating_sub(1) as f64 * tsd_b * tsd_b)
            / pooled_df as f64)
            .sqrt()
    } else {
        0.0
    };
    let effect_sigma = if pooled > 0.0 {
        worse_by / pooled
    } else if worse_by > 0.0 {
        f64::INFINITY
    } else if worse_by < 0.0 {
        f64::NEG_INFINITY
    } else {
        0.0
    };
    let stats = [mean_a, mean_b, sd_a, sd_b, tmean_a, tmean_b, tsd_a, tsd_b, worse_by, pooled];
    if stats.iter().any(|v| !v.is_finite()) {
        return Err(Error::OutOfRange { context: format!("metric {:?}", m.name) });
    }
    let enough_data = n_a >= min_samples && n_b >= min_samples;
    let raw_p = if enough_data { welch(&ta, &tb).map(|w| w.p_greater) } else { None };
    let evidence = MetricEvidence {
        name: m.name.clone(),
        direction: m.direction,
        n_a,
        n_b,
        mean_a,
        mean_b,
        sd_a,
        sd_b,
        worse_by,
        effect_sigma,
        p_value: 1.0,
        regressed: false,
        enough_data,
    };
    Ok((evidence, raw_p))
}

fn count_evidence(c: &CountSamples, min_samples: usize) -> Result<(CountEvidence, Option<f64>), Error> {
    for (cohort, events, trials) in [('A', c.events_a, c.trials_a), ('B', c.events_b, c.trials_b)] {
        if events > trials {
            return Err(Error::EventsExceedTrials { count: c.name.clone(), cohort, events, trials });
        }
    }
    let rate = |e: u64, t: u64| if t == 0 { 0.0 } else { e as f64 / t as f64 };
    let (rate_a, rate_b) = (rate(c.events_a, c.trials_a), rate(c.events_b, c.trials_b));
    let rate_ratio = if rate_b > 0.0 {
        rate_a / rate_b
    } else if rate_a > 0.0 {
        f64::INFINITY
    } else {
        1.0
    };
    let enough_data = c.trials_a >= min_samples as u64 && c.trials_b >= min_samples as u64;
    let raw_p = if enough_data {
        let p = fisher_greater(c.events_a, c.trials_a, c.events_b, c.trials_b);
        Some(p.ok_or_else(|| Error::OutOfRange { context: format!("count {:?}: total trials", c.name) })?)
    } else {
        None
    };
    let evidence = CountEvidence {
        name: c.name.clone(),
        events_a: c.events_a,
        trials_a: c.trials_a,
        events_b: c.events_b,
        trials_b: c.trials_b,
        rate_a,
        rate_b,
        rate_ratio,
        p_value: 1.0,
        regressed: false,
        enough_data,
    };
    Ok((evidence, raw_p))
}

/// Decides whether cohort A (e.g. the new firmware) is worse than cohort B on any metric or count.
///
/// Each metric gets a one-sided Welch t test in its worse direction, each count a one-sided Fisher
/// exact test; p-values of all tests with enough data are Holm-adjusted together. A test regresses
/// when its adjusted p is below `alpha` and the effect is material (`min_effect_sigma`,
/// `min_rate_ratio`).
///
/// # Errors
/// Parameters outside their ranges (the error names the parameter, its value and the allowed range),
/// and malformed inputs that no verdict could honestly cover: non-finite metric values or target,
/// more events than trials, magnitudes that overflow double precision.
pub fn cohort_gate(
    metrics: &[MetricSamples],
    counts: &[CountSamples],
    params: &GateParams,
) -> Result<GateReport, Error> {
    validate(params)?;
    let mut metric_ev = Vec::with_capacity(metrics.len());
    let mut metric_raw = Vec::with_capacity(metrics.len());
    for m in metrics {
        let (ev, p) = metric_evidence(m, params.min_samples)?;
        metric_ev.push(ev);
        metric_raw.push(p);
    }
    let mut count_ev = Vec::with_capacity(counts.len());
    let mut count_raw = Vec::with_capacity(counts.len());
    for c in counts {
        let (ev, p) = count_evidence(c, params.min_samples)?;
        count_ev.push(ev);
        count_raw.push(p);
    }

    // One Holm family over every test that ran, so the gate's overall false-alarm rate is alpha.
    let raw: Vec<f64> = metric_raw.iter().chain(&count_raw).flatten().copied().collect();
    let mut adjusted = holm(&raw).into_iter();
    for (ev, raw) in metric_ev.iter_mut().zip(&metric_raw) {
        if raw.is_some() {
            ev.p_value = adjusted.next().unwrap_or(1.0);
            ev.regressed = ev.p_value < params.alpha && ev.effect_sigma >= params.min_effect_sigma;
        }
    }
    for (ev, raw) in count_ev.iter_mut().zip(&count_raw) {
        if raw.is_some() {
            ev.p_value = adjusted.next().unwrap_or(1.0);
            ev.regressed = ev.p_value < params.alpha && ev.rate_ratio >= params.min_rate_ratio;
        }
    }

    let tested = raw.len();
    let regressed = metric_ev.iter().any(|e| e.regressed) || count_ev.iter().any(|e| e.regressed);
    let verdict = if regressed {
        Verdict::Regressed
    } else if tested == 0 {
        Verdict::InsufficientData
    } else {
        Verdict::NoRegression
    };
    let summary = summarize(verdict, &metric_ev, &count_ev, params, tested);
    Ok(GateReport { verdict, metrics: metric_ev, counts: count_ev, summary, params: *params })
}

fn summarize(
    verdict: Verdict,
    metrics: &[MetricEvidence],
    counts: &[CountEvidence],
    params: &GateParams,
    tested: usize,
) -> String {
    let metric_line = |e: &MetricEvidence| {
        format!(
            "{} worse by {} ({:.1}σ, {}, n={} vs {})",
            e.name,
            sig(e.worse_by, 2),
            e.effect_sigma,
            fmt_p(e.p_value),
            e.n_a,
            e.n_b
        )
    };
    let count_line = |e: &CountEvidence| {
        format!(
            "{} rate {} vs {} ({}×, {}, {}/{} vs {}/{})",
            e.name,
            sig(e.rate_a, 2),
            sig(e.rate_b, 2),
            sig(e.rate_ratio, 2),
            fmt_p(e.p_value),
            e.events_a,
            e.trials_a,
            e.events_b,
            e.trials_b
        )
    };
    let skipped: Vec<&str> = metrics
        .iter()
        .filter(|e| !e.enough_data)
        .map(|e| e.name.as_str())
        .chain(counts.iter().filter(|e| !e.enough_data).map(|e| e.name.as_str()))
        .collect();
    match verdict {
        Verdict::Regressed => {
            let items: Vec<String> = metrics
                .iter()
                .filter(|e| e.regressed)
                .map(metric_line)
                .chain(counts.iter().filter(|e| e.regressed).map(count_line))
                .collect();
            format!("regressed: {}", items.join("; "))
        }
        Verdict::NoRegression => {
            let mut s = format!(
                "no regression in {tested} test{} (alpha {})",
                if tested == 1 { "" } else { "s" },
                params.alpha
            );
            // Significant but below the practical threshold: worth a look, not a block.
            let small: Vec<String> = metrics
                .iter()
                .filter(|e| e.enough_data && e.p_value < params.alpha)
                .map(|e| format!("{} ({:.2}σ)", e.name, e.effect_sigma))
                .chain(
                    counts
                        .iter()
                        .filter(|e| e.enough_data && e.p_value < params.alpha)
                        .map(|e| format!("{} ({}×)", e.name, sig(e.rate_ratio, 2))),
                )
                .collect();
            if !small.is_empty() {
                s.push_str(&format!("; significant but below the practical threshold: {}", small.join(", ")));
            }
            if !skipped.is_empty() {
                s.push_str(&format!("; not tested for lack of data: {}", skipped.join(", ")));
            }
            s
        }
        Verdict::InsufficientData => {
            let need = params.min_samples;
            // Name the smallest cohort: that is what the operator has to wait for.
            let shortfalls = metrics
                .iter()
                .flat_map(|e| {
                    [('A', e.n_a as u64, "batches", &e.name), ('B', e.n_b as u64, "batches", &e.name)]
                })
                .chain(counts.iter().flat_map(|e| {
                    [('A', e.trials_a, "trials", &e.name), ('B', e.trials_b, "trials", &e.name)]
                }))
                .filter(|s| s.1 < need as u64);
            match shortfalls.min_by_key(|s| s.1) {
                Some((cohort, have, unit, name)) => {
                    let unit = match (unit, have) {
                        ("batches", 1) => "batch",
                        ("trials", 1) => "trial",
                        (u, _) => u,
                    };
                    format!("insufficient data: cohort {cohort} has {have} {unit}, needs {need} ({name})")
                }
                None => "insufficient data: no metrics or counts to test".into(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Standard normal by Box–Muller (rand 0.9 without rand_distr).
    fn normal(rng: &mut StdRng) -> f64 {
        let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1], keeps ln finite
        let u2: f64 = rng.random();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    fn draw(rng: &mut StdRng, n: usize, mean: f64, sd: f64) -> Vec<f64> {
        (0..n).map(|_| mean + sd * normal(rng)).collect()
    }

    fn sample(value: f64, device: u32, site: u32, firmware: u32, recipe: u32, lot: u32) -> Sample {
        Sample { value, levels: [device, site, firmware, recipe, lot] }
    }

    const BAD_SITE: u32 = 2;
    const LOT_G1: u32 = 10;
    const LOT_G2: u32 = 11;
    const LOT_L: u32 = 12;

    /// 4 sites × 3 devices × 30 batches; lots G1/G2 everywhere, bad lot L (+8 nm) only at site 2, in
    /// about a third of its batches. Particle size ~ N(80, 3) nm. One firmware, two recipes.
    fn bad_lot_data(seed: u64) -> Vec<Sample> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut out = Vec::new();
        for site in 0..4u32 {
            for dev in 0..3u32 {
                for _ in 0..30 {
                    let lot = if site == BAD_SITE && rng.random::<f64>() < 1.0 / 3.0 {
                        LOT_L
                    } else if rng.random::<bool>() {
                        LOT_G1
                    } else {
                        LOT_G2
                    };
                    let recipe = rng.random_range(0..2u32);
                    let value = 80.0 + 3.0 * normal(&mut rng) + if lot == LOT_L { 8.0 } else { 0.0 };
                    out.push(sample(value, site * 3 + dev, site, 1, recipe, lot));
                }
            }
        }
        out
    }

    /// Unadjusted two-sided Welch test of one site against the rest (what a naive dashboard does).
    fn naive_site_welch(samples: &[Sample], site: u32) -> (f64, f64) {
        let (inside, rest): (Vec<&Sample>, Vec<&Sample>) =
            samples.iter().partition(|s| s.levels[Factor::Site as usize] == site);
        let a: Vec<f64> = inside.iter().map(|s| s.value).collect();
        let b: Vec<f64> = rest.iter().map(|s| s.value).collect();
        let w = welch(&a, &b).expect("both groups have data");
        (w.t, 2.0 * t_sf(w.t.abs(), w.df))
    }

    #[test]
    fn factor_names_round_trip_and_adjustment_sets() {
        for f in Factor::ALL {
            assert_eq!(Factor::from_name(f.name()), Some(f));
            assert_eq!(Factor::ALL[f as usize], f);
            assert!(!f.adjusted_for().contains(&f));
        }
        assert_eq!(Factor::from_name("LOT"), Some(Factor::Lot));
        assert_eq!(Factor::from_name("batch"), None);
        assert_eq!(Factor::Device.adjusted_for(), vec![Factor::Firmware, Factor::Recipe, Factor::Lot]);
        assert_eq!(Factor::Site.adjusted_for(), vec![Factor::Firmware, Factor::Recipe, Factor::Lot]);
        assert_eq!(Factor::Lot.adjusted_for(), vec![Factor::Site, Factor::Firmware, Factor::Recipe]);
    }

    #[test]
    fn bad_lot_is_found_and_its_site_is_not_blamed() {
        let data = bad_lot_data(42);

        let lot = compare_by(&data, Factor::Lot, 0.01).unwrap();
        assert!(lot.significant, "{lot:#?}");
        // Firmware has a single level and is dropped from the adjustment set.
        assert_eq!(lot.adjusted_for, vec![Factor::Site, Factor::Recipe]);
        let top = &lot.strata[0];
        assert_eq!(top.level, LOT_L);
        assert!(top.significant && top.estimable);
        assert!((top.effect - 8.0).abs() < 2.0, "effect {}", top.effect);
        assert!(top.ci_low < top.effect && top.effect < top.ci_high);
        assert_eq!(lot.strata.iter().filter(|s| s.significant).count(), 1, "{lot:#?}");

        let site = compare_by(&data, Factor::Site, 0.01).unwrap();
        assert!(!site.significant, "{site:#?}");
        assert!(site.strata.iter().all(|s| !s.significant), "{site:#?}");
        // Without the adjustment, site 2 looks clearly worse: the adjustment is what clears it.
        let (t, p) = naive_site_welch(&data, BAD_SITE);
        assert!(t > 0.0 && p < 0.01, "naive t {t}, p {p}");
    }

    #[test]
    fn shifted_device_is_the_top_stratum() {
        let mut rng = StdRng::seed_from_u64(7);
        let bad_device = 7;
        let mut data = Vec::new();
        for site in 0..4u32 {
            for dev in 0..3u32 {
                let device = site * 3 + dev;
                for _ in 0..25 {
                    let lot = rng.random_range(0..3u32);
                    let firmware = rng.random_range(0..2u32);
                    let recipe = rng.random_range(0..2u32);
                    let shift = if device == bad_device { 6.0 } else { 0.0 };
                    data.push(sample(
                        80.0 + 3.0 * normal(&mut rng) + shift,
                        device,
                        site,
                        firmware,
                        recipe,
                        lot,
                    ));
                }
            }
        }
        let cmp = compare_by(&data, Factor::Device, 0.01).unwrap();
        assert!(cmp.significant);
        assert_eq!(cmp.strata[0].level, bad_device);
        assert!(cmp.strata[0].significant);
        assert!((cmp.strata[0].effect - 6.0).abs() < 2.0);
        assert_eq!(cmp.adjusted_for, vec![Factor::Firmware, Factor::Recipe, Factor::Lot]);
    }

    #[test]
    fn unadjusted_strata_match_textbook_formula_and_peel_the_outlier() {
        // Only the compared factor varies, so an effect is a raw mean difference with standard error
        // σ·sqrt(1/n_l + 1/n_ref). Site 0 is shifted by +2σ: it is compared with sites 1 and 2 and
        // flagged; sites 1 and 2 are then compared only with each other, not with a "rest" that
        // contains site 0.
        let mut rng = StdRng::seed_from_u64(3);
        let data: Vec<Sample> = (0..60)
            .map(|i| {
                let site = i % 3;
                sample(10.0 + normal(&mut rng) + if site == 0 { 2.0 } else { 0.0 }, 0, site, 0, 0, 0)
            })
            .collect();
        let cmp = compare_by(&data, Factor::Site, 0.01).unwrap();
        assert!(cmp.adjusted_for.is_empty() && cmp.converged);
        assert_eq!(cmp.df_den, 57.0);
        let mean_of = |sites: &[u32]| {
            let v: Vec<f64> = data.iter().filter(|x| sites.contains(&x.levels[1])).map(|x| x.value).collect();
            (v.iter().sum::<f64>() / v.len() as f64, v.len() as f64)
        };
        for s in &cmp.strata {
            let reference: Vec<u32> = match s.level {
                0 => vec![1, 2],
                1 => vec![2],
                _ => vec![1],
            };
            let (ref_mean, n_ref) = mean_of(&reference);
            assert!((s.effect - (s.mean - ref_mean)).abs() < 1e-9, "{s:?}");
            let se = cmp.residual_sigma * (1.0 / 20.0 + 1.0 / n_ref).sqrt();
            assert!((s.t - s.effect / se).abs() < 1e-6, "{} vs {}", s.t, s.effect / se);
        }
        assert_eq!(cmp.strata[0].level, 0);
        assert!(cmp.strata[0].significant);
        assert!(cmp.strata[1..].iter().all(|s| !s.significant));
    }

    #[test]
    fn one_way_f_matches_anova_by_hand() {
        // Groups {1,2,3}, {4,5,6}, {7,8,9}: grand mean 5, SS_between = 3·(16+0+16) = 54 on 2 df,
        // SS_within = 3·2 = 6 on 6 df, so F = (54/2)/(6/6) = 27.
        let data: Vec<Sample> = (1..=9).map(|v| sample(v as f64, 0, ((v - 1) / 3) as u32, 0, 0, 0)).collect();
        let cmp = compare_by(&data, Factor::Site, 0.05).unwrap();
        assert!((cmp.f_statistic - 27.0).abs() < 1e-9);
        assert_eq!((cmp.df_num, cmp.df_den), (2.0, 6.0));
        assert!((cmp.residual_sigma - 1.0).abs() < 1e-12);
        // P(F(2,6) > 27) = (1 + 2·27/6)^-3 = 10^-3 (closed form for df_num = 2).
        assert!((cmp.p_value - 1e-3).abs() < 1e-9, "{}", cmp.p_value);
    }

    #[test]
    fn site_confounded_with_its_own_lot_is_not_estimable() {
        // Every batch at site 2 uses lot L and no other site does: site and lot are indistinguishable.
        let mut rng = StdRng::seed_from_u64(11);
        let mut data = Vec::new();
        for site in 0..4u32 {
            for i in 0..20 {
                let lot = if site == BAD_SITE {
                    LOT_L
                } else if i % 2 == 0 {
                    LOT_G1
                } else {
                    LOT_G2
                };
                let shift = if lot == LOT_L { 8.0 } else { 0.0 };
                data.push(sample(80.0 + 3.0 * normal(&mut rng) + shift, site, site, 0, 0, lot));
            }
        }
        let site = compare_by(&data, Factor::Site, 0.01).unwrap();
        let s2 = site.strata.iter().find(|s| s.level == BAD_SITE).unwrap();
        assert!(!s2.estimable && !s2.significant && s2.p_value == 1.0);
        assert_eq!(site.strata.last().unwrap().level, BAD_SITE, "{site:#?}");
        // The others are still compared among themselves (lot G1/G2 is shared by sites 0, 1, 3).
        assert!(site.strata.iter().filter(|s| s.level != BAD_SITE).all(|s| s.estimable));
        assert!(!site.significant);
        let lot = compare_by(&data, Factor::Lot, 0.01).unwrap();
        assert!(lot.strata.iter().any(|s| s.level == LOT_L && !s.estimable));
    }

    #[test]
    fn nearly_confounded_fit_solves_the_normal_equations() {
        // 99 % of site 2's batches use lot L: backfitting crawls, the CG polish must finish the job.
        // At the least-squares solution every level's residuals sum to zero.
        let mut rng = StdRng::seed_from_u64(21);
        let mut data = Vec::new();
        for site in 0..4u32 {
            for _ in 0..200 {
                let lot = if site == BAD_SITE && rng.random::<f64>() < 0.99 {
                    LOT_L
                } else {
                    rng.random_range(10..12)
                };
                let shift = if lot == LOT_L { 8.0 } else { 0.0 };
                data.push(sample(80.0 + 3.0 * normal(&mut rng) + shift, site, site, 0, 0, lot));
            }
        }
        let d = Design::new(&data, &[Factor::Site, Factor::Lot]).unwrap();
        let fit = backfit(&d, &[0, 1]);
        assert!(fit.converged);
        let partial: Vec<f64> = d
            .sample_cell
            .iter()
            .map(|&c| fit.alpha[0][d.cell_levels[0][c]] + fit.alpha[1][d.cell_levels[1][c]])
            .collect();
        let mu = d.y.iter().zip(&partial).map(|(y, f)| y - f).sum::<f64>() / d.n as f64;
        let resid: Vec<f64> = d.y.iter().zip(&partial).map(|(y, f)| y - mu - f).collect();
        assert!((resid.iter().map(|r| r * r).sum::<f64>() - fit.rss).abs() < 1e-6 * fit.rss);
        for b in 0..2 {
            let mut per_level = vec![0.0; d.blocks[b].ids.len()];
            for (&c, r) in d.sample_cell.iter().zip(&resid) {
                per_level[d.cell_levels[b][c]] += r;
            }
            assert!(per_level.iter().all(|s| s.abs() < 1e-6), "block {b}: {per_level:?}");
        }
        let cmp = compare_by(&data, Factor::Site, 0.01).unwrap();
        assert!(cmp.converged && !cmp.significant);
        // Little data separates site 2 from lot L, and the interval says so: the textbook
        // σ·sqrt(1/n_l + 1/(n − n_l)) would claim about ±1 nm.
        let s2 = cmp.strata.iter().find(|s| s.level == BAD_SITE).unwrap();
        let textbook =
            2.0 * t_crit_95(cmp.df_den) * cmp.residual_sigma * (1.0 / 200.0 + 1.0 / 600.0_f64).sqrt();
        assert!(s2.estimable && s2.ci_high - s2.ci_low > 4.0 * textbook, "{cmp:#?}");
    }

    #[test]
    fn degenerate_inputs_are_errors_not_panics() {
        let base = bad_lot_data(1);
        assert!(matches!(compare_by(&[], Factor::Site, 0.01), Err(Error::TooFewLevels { levels: 0, .. })));
        let one_site: Vec<Sample> = base.iter().filter(|s| s.levels[1] == 0).copied().collect();
        assert!(matches!(
            compare_by(&one_site, Factor::Site, 0.01),
            Err(Error::TooFewLevels { factor: Factor::Site, levels: 1 })
        ));
        let mut nan = base.clone();
        nan[17].value = f64::NAN;
        assert!(matches!(compare_by(&nan, Factor::Lot, 0.01), Err(Error::NonFiniteValue { index: 17, .. })));
        for alpha in [0.0, 0.5, -1.0, f64::NAN] {
            assert!(matches!(
                compare_by(&base, Factor::Lot, alpha),
                Err(Error::InvalidParam { name: "alpha", .. })
            ));
        }
        let equal: Vec<Sample> = base.iter().map(|s| Sample { value: 0.1, ..*s }).collect();
        assert!(matches!(compare_by(&equal, Factor::Site, 0.01), Err(Error::NoResidualVariation { .. })));
        let tiny = [sample(1.0, 0, 0, 0, 0, 0), sample(2.0, 0, 1, 0, 0, 0), sample(3.0, 0, 1, 0, 0, 0)];
        assert!(matches!(
            compare_by(&tiny, Factor::Site, 0.01),
            Err(Error::TooFewDegreesOfFreedom { n: 3, params: 2, df: 1 })
        ));
        let huge = [1e308, -1e308, 1e308, -1e308, 5.0, 6.0];
        let huge: Vec<Sample> =
            huge.iter().enumerate().map(|(i, &v)| sample(v, 0, (i % 2) as u32, 0, 0, 0)).collect();
        assert!(compare_by(&huge, Factor::Site, 0.01).is_err());
    }

    #[test]
    fn random_designs_never_panic_and_stay_finite() {
        let mut rng = StdRng::seed_from_u64(99);
        for _ in 0..300 {
            let n = rng.random_range(0..40);
            let levels: [u32; FACTORS] = std::array::from_fn(|_| rng.random_range(1..5));
            let data: Vec<Sample> = (0..n)
                .map(|_| Sample {
                    value: if rng.random::<f64>() < 0.3 { 1.0 } else { normal(&mut rng) },
                    levels: std::array::from_fn(|f| rng.random_range(0..levels[f])),
                })
                .collect();
            for f in Factor::ALL {
                if let Ok(c) = compare_by(&data, f, 0.05) {
                    assert!(c.f_statistic.is_finite() && c.p_value.is_finite() && c.residual_sigma > 0.0);
                    for s in &c.strata {
                        assert!(s.effect.is_finite() && s.t.is_finite() && (0.0..=1.0).contains(&s.p_value));
                        assert_eq!(s.ci_low.is_finite(), s.estimable);
                    }
                }
            }
        }
    }

    // ---- cohort gate ----

    fn neutral_inputs(rng: &mut StdRng, n_a: usize, n_b: usize) -> (Vec<MetricSamples>, Vec<CountSamples>) {
        let metric = |rng: &mut StdRng, name: &str, direction, mean, sd| MetricSamples {
            name: name.into(),
            direction,
            a: draw(rng, n_a, mean, sd),
            b: draw(rng, n_b, mean, sd),
        };
        let metrics = vec![
            metric(rng, "size", Direction::AwayFrom(80.0), 80.0, 3.0),
            metric(rng, "pdi", Direction::HigherIsWorse, 0.12, 0.015),
            metric(rng, "encapsulation", Direction::LowerIsWorse, 92.0, 1.5),
            metric(rng, "yield", Direction::LowerIsWorse, 90.0, 2.0),
        ];
        let binom =
            |rng: &mut StdRng, n: usize, p: f64| (0..n).filter(|_| rng.random::<f64>() < p).count() as u64;
        let counts = vec![
            CountSamples {
                name: "failures".into(),
                events_a: binom(rng, n_a, 0.05),
                trials_a: n_a as u64,
                events_b: binom(rng, n_b, 0.05),
                trials_b: n_b as u64,
            },
            CountSamples {
                name: "alarms".into(),
                events_a: binom(rng, n_a, 0.1),
                trials_a: n_a as u64,
                events_b: binom(rng, n_b, 0.1),
                trials_b: n_b as u64,
            },
        ];
        (metrics, counts)
    }

    #[test]
    fn drifting_pdi_and_encapsulation_regress() {
        let mut rng = StdRng::seed_from_u64(2024);
        let (mut metrics, counts) = neutral_inputs(&mut rng, 30, 60);
        metrics[1].a = draw(&mut rng, 30, 0.12 + 0.03, 0.015);
        metrics[2].a = draw(&mut rng, 30, 92.0 - 3.0, 1.5);
        let report = cohort_gate(&metrics, &counts, &GateParams::default()).unwrap();
        assert_eq!(report.verdict, Verdict::Regressed, "{}", report.summary);
        let regressed: Vec<&str> =
            report.metrics.iter().filter(|m| m.regressed).map(|m| m.name.as_str()).collect();
        assert_eq!(regressed, ["pdi", "encapsulation"]);
        for m in report.metrics.iter().filter(|m| m.regressed) {
            assert!(m.p_value < 0.01 && m.worse_by > 0.0 && m.effect_sigma > 1.0);
        }
        assert!(report.summary.starts_with("regressed: pdi worse by 0.0"), "{}", report.summary);
        assert!(report.summary.contains("encapsulation worse by"), "{}", report.summary);
        assert!(report.summary.contains("n=30 vs 60"));
    }

    #[test]
    fn identical_cohorts_never_false_alarm() {
        for seed in 0..20 {
            let mut rng = StdRng::seed_from_u64(1000 + seed);
            let (metrics, counts) = neutral_inputs(&mut rng, 30, 60);
            let report = cohort_gate(&metrics, &counts, &GateParams::default()).unwrap();
            assert_eq!(report.verdict, Verdict::NoRegression, "seed {seed}: {}", report.summary);
            assert!(
                report.summary.starts_with("no regression in 6 tests (alpha 0.01)"),
                "{}",
                report.summary
            );
        }
    }

    #[test]
    fn false_alarm_rate_is_controlled() {
        // Holm keeps the family-wise rate ≤ alpha; check it on many null gates with a lax alpha so
        // the rate is measurable, and without the practical-size filter so only the test decides.
        let params =
            GateParams { alpha: 0.1, min_effect_sigma: 0.0, min_rate_ratio: 1.0, ..Default::default() };
        let mut rng = StdRng::seed_from_u64(5);
        let runs = 400;
        let alarms = (0..runs)
            .filter(|_| {
                let (m, c) = neutral_inputs(&mut rng, 12, 20);
                cohort_gate(&m, &c, &params).unwrap().verdict == Verdict::Regressed
            })
            .count();
        assert!(alarms as f64 / runs as f64 <= 0.13, "{alarms} false alarms in {runs}");
    }

    #[test]
    fn better_cohort_is_not_a_regression() {
        let mut rng = StdRng::seed_from_u64(8);
        let (mut metrics, mut counts) = neutral_inputs(&mut rng, 30, 60);
        metrics[1].a = draw(&mut rng, 30, 0.12 - 0.03, 0.015); // lower PDI: better
        metrics[2].a = draw(&mut rng, 30, 92.0 + 3.0, 1.5); // higher encapsulation: better
        metrics[0].a = draw(&mut rng, 30, 80.0, 0.5); // tighter around target: better
        counts[0].events_a = 0;
        counts[0].events_b = 20;
        let report = cohort_gate(&metrics, &counts, &GateParams::default()).unwrap();
        assert_eq!(report.verdict, Verdict::NoRegression, "{}", report.summary);
        assert!(report.metrics[1].worse_by < 0.0 && report.metrics[1].p_value > 0.5);
    }

    #[test]
    fn too_few_samples_is_insufficient_data() {
        let mut rng = StdRng::seed_from_u64(9);
        let (metrics, counts) = neutral_inputs(&mut rng, 3, 60);
        let report = cohort_gate(&metrics, &counts, &GateParams::default()).unwrap();
        assert_eq!(report.verdict, Verdict::InsufficientData);
        assert!(report.summary.contains("cohort A has 3 batches, needs 5"), "{}", report.summary);
        assert!(report.metrics.iter().all(|m| !m.enough_data && m.p_value == 1.0));
        assert!(report.counts.iter().all(|c| !c.enough_data));

        let empty = cohort_gate(&[], &[], &GateParams::default()).unwrap();
        assert_eq!(empty.verdict, Verdict::InsufficientData);

        // One test lacking data does not stop the others; the summary says which was skipped.
        let (mut metrics, counts) = neutral_inputs(&mut rng, 30, 60);
        metrics[3].b.truncate(2);
        let report = cohort_gate(&metrics, &counts, &GateParams::default()).unwrap();
        assert_eq!(report.verdict, Verdict::NoRegression);
        assert!(report.summary.contains("5 tests") && report.summary.contains("lack of data: yield"));
    }

    #[test]
    fn welch_by_hand() {
        // a = [1,2,3,4]: mean 2.5, s² = (2.25+0.25+0.25+2.25)/3 = 5/3; s²/n = 5/12.
        // b = [2,4,6]:   mean 4,   s² = (4+0+4)/2 = 4;               s²/n = 4/3.
        // se² = 5/12 + 16/12 = 21/12 = 1.75; t = (2.5 − 4)/√1.75 = −1.133893.
        // df = 1.75² / ((5/12)²/3 + (4/3)²/2) = 3.0625 / (0.0578704 + 0.8888889) = 3.234719.
        let w = welch(&[1.0, 2.0, 3.0, 4.0], &[2.0, 4.0, 6.0]).unwrap();
        assert!((w.t - -1.133_893).abs() < 1e-6, "{}", w.t);
        assert!((w.df - 3.234_719).abs() < 1e-5, "{}", w.df);
        let reverse = welch(&[2.0, 4.0, 6.0], &[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert!((w.p_greater + reverse.p_greater - 1.0).abs() < 1e-12);
        assert!(w.p_greater > 0.5);
        // Constant cohorts: no NaN, the sign decides.
        let flat = welch(&[2.0; 5], &[1.0; 5]).unwrap();
        assert_eq!((flat.t, flat.p_greater), (f64::INFINITY, 0.0));
        assert_eq!(welch(&[1.0; 5], &[1.0; 5]).unwrap().p_greater, 1.0);
        assert!(welch(&[1.0], &[1.0, 2.0]).is_none());
    }

    #[test]
    fn fisher_by_hand() {
        // A: 3 of 4 failed, B: 1 of 4. Margins: 8 batches, 4 failures, 4 in A.
        // P(X ≥ 3) = [C(4,3)·C(4,1) + C(4,4)·C(4,0)] / C(8,4) = (16 + 1)/70 = 0.242857.
        assert!((fisher_greater(3, 4, 1, 4).unwrap() - 17.0 / 70.0).abs() < 1e-12);
        // A: 3 of 4, B: 0 of 4: P(X ≥ 3) = C(3,3)·C(5,1)/C(8,4) = 5/70.
        assert!((fisher_greater(3, 4, 0, 4).unwrap() - 5.0 / 70.0).abs() < 1e-12);
        assert_eq!(fisher_greater(0, 10, 5, 10), Some(1.0));
        assert_eq!(fisher_greater(1, u64::MAX, 0, 1), None);
        // Through the gate: one test, so Holm leaves it unchanged; infinite ratio reported as such.
        let counts =
            [CountSamples { name: "failures".into(), events_a: 3, trials_a: 4, events_b: 0, trials_b: 4 }];
        let params = GateParams { min_samples: 4, ..Default::default() };
        let report = cohort_gate(&[], &counts, &params).unwrap();
        let c = &report.counts[0];
        assert!((c.p_value - 5.0 / 70.0).abs() < 1e-12);
        assert_eq!(c.rate_ratio, f64::INFINITY);
        assert_eq!(report.verdict, Verdict::NoRegression);
    }

    #[test]
    fn fisher_tail_walk_matches_statrs_sf() {
        use statrs::distribution::DiscreteCDF;
        let mut rng = StdRng::seed_from_u64(17);
        for _ in 0..500 {
            let (ta, tb) = (rng.random_range(1..200u64), rng.random_range(1..200u64));
            let (ea, eb) = (rng.random_range(0..=ta), rng.random_range(0..=tb));
            let dist = Hypergeometric::new(ta + tb, ea + eb, ta).unwrap();
            let want = if ea == 0 { 1.0 } else { dist.sf(ea - 1) };
            let got = fisher_greater(ea, ta, eb, tb).unwrap();
            assert!((got - want).abs() <= 1e-12 + 1e-9 * want, "{ea}/{ta} vs {eb}/{tb}: {got} vs {want}");
        }
        // Absurd counts finish at once and stay sane.
        let p =
            fisher_greater(1_000_000_000_000, 4_000_000_000_000, 900_000_000_000, 4_000_000_000_000).unwrap();
        assert!(p < 1e-12);
        let p = fisher_greater(1_000_000_000_000, 4_000_000_000_000, 1_000_000_000_000, 4_000_000_000_000)
            .unwrap();
        assert!(p > 0.4 && p < 0.6, "{p}");
    }

    #[test]
    fn holm_by_hand() {
        // Sorted 0.01, 0.03, 0.04 → 3·0.01 = 0.03, 2·0.03 = 0.06, max(0.06, 1·0.04) = 0.06.
        let adj = holm(&[0.01, 0.04, 0.03]);
        let want = [0.03, 0.06, 0.06];
        assert!(adj.iter().zip(want).all(|(a, w)| (a - w).abs() < 1e-12), "{adj:?}");
        assert!(holm(&[]).is_empty());
        assert_eq!(holm(&[0.9, 0.8]), vec![1.0, 1.0]);
    }

    #[test]
    fn bad_params_are_rejected_by_name() {
        let cases = [
            (GateParams { alpha: 0.0, ..Default::default() }, "alpha"),
            (GateParams { alpha: f64::NAN, ..Default::default() }, "alpha"),
            (GateParams { alpha: 0.7, ..Default::default() }, "alpha"),
            (GateParams { min_effect_sigma: -0.1, ..Default::default() }, "min_effect_sigma"),
            (GateParams { min_effect_sigma: f64::INFINITY, ..Default::default() }, "min_effect_sigma"),
            (GateParams { min_rate_ratio: 0.5, ..Default::default() }, "min_rate_ratio"),
            (GateParams { min_samples: 1, ..Default::default() }, "min_samples"),
        ];
        for (params, expected) in cases {
            match cohort_gate(&[], &[], &params) {
                Err(e @ Error::InvalidParam { name, .. }) => {
                    assert_eq!(name, expected);
                    assert!(e.to_string().starts_with(expected), "{e}");
                }
                other => panic!("{expected}: {other:?}"),
            }
        }
    }

    #[test]
    fn malformed_gate_inputs_are_errors_and_edge_cases_stay_finite() {
        let p = GateParams::default();
        let nan = MetricSamples {
            name: "pdi".into(),
            direction: Direction::HigherIsWorse,
            a: vec![1.0, f64::NAN],
            b: vec![],
        };
        assert!(matches!(
            cohort_gate(&[nan], &[], &p),
            Err(Error::NonFiniteMetric { cohort: 'A', index: 1, .. })
        ));
        let target = MetricSamples {
            name: "size".into(),
            direction: Direction::AwayFrom(f64::NAN),
            a: vec![],
            b: vec![],
        };
        assert!(matches!(cohort_gate(&[target], &[], &p), Err(Error::NonFiniteTarget { .. })));
        let over =
            CountSamples { name: "alarms".into(), events_a: 1, trials_a: 10, events_b: 11, trials_b: 10 };
        assert!(matches!(cohort_gate(&[], &[over], &p), Err(Error::EventsExceedTrials { cohort: 'B', .. })));
        let huge = CountSamples {
            name: "alarms".into(),
            events_a: 1,
            trials_a: u64::MAX,
            events_b: 0,
            trials_b: 10,
        };
        assert!(matches!(cohort_gate(&[], &[huge], &p), Err(Error::OutOfRange { .. })));

        // Constant cohorts, zero trials, empty cohorts: verdicts without NaN.
        let flat = |a: f64| MetricSamples {
            name: "yield".into(),
            direction: Direction::LowerIsWorse,
            a: vec![a; 6],
            b: vec![90.0; 6],
        };
        let worse = cohort_gate(&[flat(89.0)], &[], &p).unwrap();
        assert_eq!(worse.verdict, Verdict::Regressed);
        assert_eq!(worse.metrics[0].effect_sigma, f64::INFINITY);
        let same = cohort_gate(&[flat(90.0)], &[], &p).unwrap();
        assert_eq!(same.verdict, Verdict::NoRegression);
        assert_eq!((same.metrics[0].p_value, same.metrics[0].effect_sigma), (1.0, 0.0));
        let none = CountSamples { name: "alarms".into(), events_a: 0, trials_a: 0, events_b: 0, trials_b: 0 };
        let empty =
            MetricSamples { name: "pdi".into(), direction: Direction::HigherIsWorse, a: vec![], b: vec![] };
        let r = cohort_gate(&[empty], &[none], &p).unwrap();
        assert_eq!(r.verdict, Verdict::InsufficientData);
        assert!(r.summary.contains("has 0"), "{}", r.summary);
        let m = &r.metrics[0];
        assert!([m.mean_a, m.sd_a, m.worse_by, m.effect_sigma, m.p_value].iter().all(|v| v.is_finite()));
        assert_eq!(r.counts[0].rate_ratio, 1.0);
    }
}
