//! Control charts over the quality index: select the batches, split them by a factor
//! if asked, take limits from each series' baseline, and evaluate every rule, EWMA,
//! CUSUM and capability. Only the newest points and violations are returned; the rules
//! run over the whole series.

use std::collections::{BTreeMap, HashMap};

use crate::compare::Factor;
use crate::index::{Metric, QualityIndex, RowId, Selection};
use crate::spc::{
    self, Baseline, Capability, CusumParams, CusumPoint, EwmaParams, EwmaPoint, Rule, Violation,
};

/// Violations returned per chart, the newest.
pub const MAX_VIOLATIONS: usize = 200;
/// Strata charted at most when a chart is split by a factor.
pub const MAX_STRATA: usize = 200;

/// What to chart.
#[derive(Debug, Clone, PartialEq)]
pub struct ChartQuery {
    pub metric: Metric,
    pub selection: Selection,
    /// One chart per level of this factor.
    pub by: Option<Factor>,
    /// Limits come from the first this many points of each series.
    pub baseline_points: usize,
    /// Points returned per chart, the newest.
    pub max_points: usize,
}

/// Specification limits per recipe id, for the metric charted.
pub type SpecLimits = HashMap<String, (Option<f64>, Option<f64>)>;

/// One point of a chart.
#[derive(Debug, Clone, PartialEq)]
pub struct ChartPoint {
    /// Position in the series.
    pub index: usize,
    pub row: RowId,
    pub value: f64,
    pub moving_range: Option<f64>,
    pub ewma: EwmaPoint,
    pub cusum: CusumPoint,
    /// The rules this point completes.
    pub rules: Vec<Rule>,
}

/// One chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    pub metric: Metric,
    /// The factor level this chart covers, if split.
    pub stratum: Option<(Factor, String)>,
    pub n: usize,
    pub baseline: Option<Baseline>,
    pub ewma_params: EwmaParams,
    pub cusum_params: CusumParams,
    pub mean: f64,
    pub sd: f64,
    pub lsl: Option<f64>,
    pub usl: Option<f64>,
    pub capability: Option<Capability>,
    /// The newest points, oldest first.
    pub points: Vec<ChartPoint>,
    /// The newest violations, oldest first, with the row each points at.
    pub violations: Vec<(Violation, RowId)>,
    /// Violations per rule over the whole series.
    pub rule_counts: Vec<(Rule, usize)>,
    pub first_ewma_signal: Option<usize>,
    pub first_cusum_signal: Option<usize>,
    /// Why there is no chart (too few points, no variation).
    pub problem: Option<String>,
}

/// Charts for a query: one, or one per stratum (in level-name order).
pub fn control_charts(ix: &QualityIndex, q: &ChartQuery, limits: &SpecLimits) -> Vec<Chart> {
    let rows = ix.select(&q.selection);
    let (values, rows) = ix.series(q.metric, &rows);
    match q.by {
        None => vec![chart_series(ix, q, None, &values, &rows, limits)],
        Some(factor) => {
            // Grouped by dense level id: no string is touched per batch.
            let mut groups: Vec<(Vec<f64>, Vec<RowId>)> =
                vec![Default::default(); ix.level_names(factor).len()];
            for (&v, &r) in values.iter().zip(&rows) {
                if let Some(g) = groups.get_mut(ix.level_id(r, factor) as usize) {
                    g.0.push(v);
                    g.1.push(r);
                }
            }
            let mut levels: Vec<usize> = (0..groups.len()).filter(|&l| !groups[l].0.is_empty()).collect();
            levels.sort_by(|&a, &b| ix.level_name(factor, a as u32).cmp(ix.level_name(factor, b as u32)));
            levels
                .into_iter()
                .take(MAX_STRATA)
                .map(|l| {
                    let (v, r) = &groups[l];
                    chart_series(
                        ix,
                        q,
                        Some((factor, ix.level_name(factor, l as u32).to_owned())),
                        v,
                        r,
                        limits,
                    )
                })
                .collect()
        }
    }
}

fn mean_sd(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// The specification limits of the series' recipe, when it covers exactly one.
fn series_limits(ix: &QualityIndex, rows: &[RowId], limits: &SpecLimits) -> (Option<f64>, Option<f64>) {
    let Some(&first) = rows.first() else { return (None, None) };
    let recipe = ix.level_id(first, Factor::Recipe);
    if rows.iter().any(|&r| ix.level_id(r, Factor::Recipe) != recipe) {
        return (None, None);
    }
    limits.get(ix.level_name(Factor::Recipe, recipe)).copied().unwrap_or((None, None))
}

/// The chart of one series: `values` measured on `rows`, in time order. `q.selection`
/// and `q.by` are not used here.
pub fn chart_series(
    ix: &QualityIndex,
    q: &ChartQuery,
    stratum: Option<(Factor, String)>,
    values: &[f64],
    rows: &[RowId],
    limits: &SpecLimits,
) -> Chart {
    let (mean, sd) = mean_sd(values);
    let (lsl, usl) = series_limits(ix, rows, limits);
    let mut c = Chart {
        metric: q.metric,
        stratum,
        n: values.len(),
        baseline: None,
        ewma_params: EwmaParams::default(),
        cusum_params: CusumParams::default(),
        mean,
        sd,
        lsl,
        usl,
        capability: None,
        points: Vec::new(),
        violations: Vec::new(),
        rule_counts: Vec::new(),
        first_ewma_signal: None,
        first_cusum_signal: None,
        problem: None,
    };
    let base = q.baseline_points.max(2).min(values.len());
    let baseline = match Baseline::from_individuals(&values[..base]) {
        Ok(b) => b,
        Err(e) => {
            c.problem = Some(format!("no limits from the first {base} of {} points: {e}", values.len()));
            return c;
        }
    };
    if let Err(e) = c.ewma_params.validate().and(c.cusum_params.validate()) {
        c.problem = Some(e.to_string());
        return c;
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        c.problem = Some(format!("point {i} is not a finite number"));
        return c;
    }
    c.baseline = Some(baseline);
    if lsl.is_some() || usl.is_some() {
        c.capability = spc::capability(mean, baseline.sigma, lsl, usl).ok();
    }
    // The pattern rules over the whole series; EWMA and CUSUM streamed, keeping only
    // the newest points: a million-point chart never holds a million chart points.
    let mut violations = spc::violations(values, &baseline, &Rule::ALL_PATTERN);
    let from = values.len().saturating_sub(q.max_points.max(1));
    let mut ewma = spc::EwmaState::new(&baseline, c.ewma_params);
    let mut cusum = spc::CusumState::new(&baseline, c.cusum_params);
    let mut tracker = spc::CusumTracker::new(true, true);
    for (i, &x) in values.iter().enumerate() {
        let e = ewma.step(x);
        let s = cusum.step(x);
        if e.out {
            c.first_ewma_signal.get_or_insert(i);
            spc::ewma_signal(&mut violations, i, &e);
        }
        if s.out_upper || s.out_lower {
            c.first_cusum_signal.get_or_insert(i);
        }
        tracker.observe(&mut violations, i, &s);
        if i >= from {
            c.points.push(ChartPoint {
                index: i,
                row: rows[i],
                value: x,
                moving_range: i.checked_sub(1).map(|p| (x - values[p]).abs()),
                ewma: e,
                cusum: s,
                rules: Vec::new(),
            });
        }
    }
    violations.sort_by_key(|v| v.index);
    let mut counts: BTreeMap<&'static str, (Rule, usize)> = BTreeMap::new();
    for v in &violations {
        counts.entry(v.rule.code()).or_insert((v.rule, 0)).1 += 1;
    }
    c.rule_counts = counts.into_values().collect();
    for v in violations.iter().filter(|v| v.index >= from) {
        if let Some(p) = c.points.get_mut(v.index - from)
            && !p.rules.contains(&v.rule)
        {
            p.rules.push(v.rule);
        }
    }
    let skip = violations.len().saturating_sub(MAX_VIOLATIONS);
    c.violations = violations.into_iter().skip(skip).map(|v| (v, rows[v.index])).collect();
    c
}

// === Findings for alerts ===

/// A rule that fired on a device's series among the batches not evaluated before.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub device: String,
    pub site: String,
    pub recipe: String,
    pub metric: Metric,
    pub rule: Rule,
    /// Violating points among the new batches.
    pub count: usize,
    /// The device's chart, with its newest points, as evidence.
    pub chart: Chart,
}

/// Evaluates every device that has batches at or after row `new_from` (rows are
/// numbered in arrival order): one chart per device, recipe and metric, limits from
/// the device's own first `baseline_points`, and the `rules` that fire on the new
/// points. Findings come sorted by device, recipe, metric and rule.
pub fn spc_findings(
    ix: &QualityIndex,
    new_from: RowId,
    metrics: &[Metric],
    rules: &[Rule],
    baseline_points: usize,
    evidence_points: usize,
    limits: &HashMap<Metric, SpecLimits>,
) -> Vec<Finding> {
    let mut touched: BTreeMap<(&str, &str), ()> = BTreeMap::new();
    for r in new_from..ix.len() as RowId {
        touched.insert((ix.level(r, Factor::Device), ix.level(r, Factor::Recipe)), ());
    }
    let mut findings = Vec::new();
    let empty = SpecLimits::new();
    for (device, recipe) in touched.into_keys() {
        let rows = ix.select(&Selection::default().with(Factor::Device, device).with(Factor::Recipe, recipe));
        let Some(&last) = rows.last() else { continue };
        for &metric in metrics {
            let (values, kept) = ix.series(metric, &rows);
            // No alert before the device has a full baseline: limits from a handful
            // of batches fire on noise.
            if values.len() <= baseline_points {
                continue;
            }
            let q = ChartQuery {
                metric,
                selection: Selection::default(),
                by: None,
                baseline_points,
                max_points: evidence_points,
            };
            let c = chart_series(ix, &q, None, &values, &kept, limits.get(&metric).unwrap_or(&empty));
            let mut per_rule: BTreeMap<&'static str, (Rule, usize)> = BTreeMap::new();
            for (v, row) in &c.violations {
                if *row >= new_from && rules.contains(&v.rule) {
                    per_rule.entry(v.rule.code()).or_insert((v.rule, 0)).1 += 1;
                }
            }
            for (rule, count) in per_rule.into_values() {
                findings.push(Finding {
                    device: device.to_owned(),
                    site: ix.level(last, Factor::Site).to_owned(),
                    recipe: recipe.to_owned(),
                    metric,
                    rule,
                    count,
                    chart: c.clone(),
                });
            }
        }
    }
    findings
}
