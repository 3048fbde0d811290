//! Cross-site monitoring over the batch records: the in-memory quality index that
//! follows the `batch_metrics` table, control charts, comparisons and the cohort gate.
//! The statistics live in `nanofleet-monitoring`; this module selects the data and
//! maps it to the `nanofleet.v1` messages.

use nanofleet_proto::device::v1::{BatchRecord, QualityAttribute, RunOutcome, RunPhase};
use nanofleet_store::{BatchMetrics, METRIC_COLUMNS, QualityLimit};

// === Metrics from a record ===

/// Position of a quality attribute in [`METRIC_COLUMNS`].
fn column_of(attribute: QualityAttribute) -> Option<usize> {
    let name = match attribute {
        QualityAttribute::SizeNm => "size_nm",
        QualityAttribute::Pdi => "pdi",
        QualityAttribute::EncapsulationPct => "encapsulation_pct",
        QualityAttribute::Ph => "ph",
        QualityAttribute::YieldPct => "yield_pct",
        QualityAttribute::Unspecified => return None,
    };
    METRIC_COLUMNS.iter().position(|c| *c == name)
}

fn set(values: &mut [Option<f64>; 8], name: &str, v: f64) {
    if let Some(i) = METRIC_COLUMNS.iter().position(|c| *c == name)
        && v.is_finite()
    {
        values[i] = Some(v);
    }
}

/// What monitoring keeps of a verified record: its strata and measurements, and the
/// release limits the device applied.
pub fn batch_metrics(r: &BatchRecord) -> (BatchMetrics, Vec<QualityLimit>) {
    let mut values = [None; 8];
    let mut limits = Vec::new();
    for q in &r.qc {
        let Some(i) = QualityAttribute::try_from(q.attribute).ok().and_then(column_of) else { continue };
        if q.value.is_finite() {
            values[i] = Some(q.value);
        }
        limits.push(QualityLimit {
            recipe_id: r.recipe_id.clone(),
            recipe_version: i64::from(r.recipe_version),
            attribute: METRIC_COLUMNS[i].to_owned(),
            lo: q.min,
            hi: q.max,
        });
    }
    // Process signals come from the collection phase: that is where the product is made.
    if let Some(p) = r.phases.iter().find(|p| p.phase == RunPhase::Collect as i32) {
        set(&mut values, "flow_cv", p.flow_cv);
        if p.setpoint_flow_rate_ratio > 0.0 {
            set(
                &mut values,
                "frr_error_pct",
                (p.actual_flow_rate_ratio - p.setpoint_flow_rate_ratio).abs() / p.setpoint_flow_rate_ratio
                    * 100.0,
            );
        }
    }
    if let Some(max) = r.phases.iter().map(|p| p.max_pressure_mbar).filter(|v| v.is_finite()).reduce(f64::max)
    {
        set(&mut values, "max_pressure_mbar", max);
    }
    let metrics = BatchMetrics {
        seq: 0,
        batch_id: r.batch_id.clone(),
        device_id: r.device_id.clone(),
        site_id: r.site_id.clone(),
        model: r.model.clone(),
        firmware_version: r.firmware_version.clone(),
        recipe_id: r.recipe_id.clone(),
        recipe_version: i64::from(r.recipe_version),
        cartridge_lot: r.cartridge.as_ref().map(|c| c.lot.clone()).unwrap_or_default(),
        ended_ms: r.ended_unix_ms,
        outcome: if r.outcome == RunOutcome::Complete as i32 { "complete" } else { "aborted" }.into(),
        qc_passed: nanofleet_recipe::batch::passed(r),
        values,
        alarms: r.alarms.len() as i64,
    };
    (metrics, limits)
}

// === The service ===

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use nanofleet_monitoring::chart::{self, Chart, ChartQuery, SpecLimits};
use nanofleet_monitoring::compare::{self, CountSamples, Direction, Factor, GateParams, MetricSamples};
use nanofleet_monitoring::index::{Metric, QualityIndex, Row, RowId, Selection};
use nanofleet_proto::v1 as pb;
use nanofleet_store::Store;
use tokio::sync::{Mutex, broadcast};

use crate::{Caller, Error, Fleet};

/// Default points a chart's limits are computed from.
pub const DEFAULT_BASELINE_POINTS: u32 = 20;
/// Default and largest number of points returned per chart.
pub const DEFAULT_MAX_POINTS: u32 = 500;
pub const MAX_POINTS: u32 = 5_000;
/// Default significance level of comparisons.
pub const DEFAULT_ALPHA: f64 = 0.01;

/// Cross-site monitoring; cheap to clone.
#[derive(Clone)]
pub struct Monitoring {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Monitoring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitoring").finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    pub(crate) store: Store,
    pub(crate) fleet: Fleet,
    pub(crate) index: RwLock<Indexed>,
    /// Serialises refreshes; holds the last `batch_metrics.seq` loaded.
    loaded: Mutex<i64>,
    pub(crate) alerts: broadcast::Sender<pb::Alert>,
    /// Where alert changes are POSTed, once alerting started with a webhook.
    pub(crate) webhook: std::sync::OnceLock<crate::webhook::Webhook>,
    /// When sites were last compared (ms; the comparison is the costly evaluation).
    pub(crate) sites_compared_ms: std::sync::Mutex<i64>,
    /// Cancelled when the server stops, so that live alert watches end with it.
    pub(crate) stop: tokio_util::sync::CancellationToken,
}

/// A recipe version and its lower and upper specification limits.
type VersionLimits = (i64, Option<f64>, Option<f64>);

/// The index with what it needs beside it.
#[derive(Default)]
pub(crate) struct Indexed {
    pub(crate) index: QualityIndex,
    /// `batch_metrics.seq` of each row, in row order (rows are loaded in seq order).
    pub(crate) seqs: Vec<i64>,
    /// Per (recipe, metric): the newest version's limits.
    limits: HashMap<(String, Metric), VersionLimits>,
}

impl Indexed {
    pub(crate) fn spec_limits(&self, metric: Metric) -> SpecLimits {
        self.limits
            .iter()
            .filter(|((_, m), _)| *m == metric)
            .map(|((recipe, _), &(_, lo, hi))| (recipe.clone(), (lo, hi)))
            .collect()
    }
}

fn row_of(m: &BatchMetrics) -> Row {
    let mut values = [None; nanofleet_monitoring::index::METRICS];
    for (i, name) in METRIC_COLUMNS.iter().enumerate() {
        if let Some(metric) = Metric::from_name(name) {
            values[metric as usize] = m.values[i];
        }
    }
    values[Metric::Alarms as usize] = Some(m.alarms as f64);
    let mut strata: [String; compare::FACTORS] = Default::default();
    strata[Factor::Device as usize] = m.device_id.clone();
    strata[Factor::Site as usize] = m.site_id.clone();
    strata[Factor::Firmware as usize] = m.firmware_version.clone();
    strata[Factor::Recipe as usize] = m.recipe_id.clone();
    strata[Factor::Lot as usize] = m.cartridge_lot.clone();
    Row {
        batch_id: m.batch_id.clone(),
        ended_ms: m.ended_ms,
        strata,
        values,
        complete: m.outcome == "complete",
        qc_passed: m.qc_passed,
    }
}

fn metric_arg(field: &'static str, name: &str) -> Result<Metric, Error> {
    Metric::from_name(name).ok_or_else(|| {
        Error::invalid(field, name, Metric::ALL.iter().map(|m| m.name()).collect::<Vec<_>>().join(", "))
    })
}

fn factor_of(f: i32) -> Option<Factor> {
    match pb::Factor::try_from(f).ok()? {
        pb::Factor::Device => Some(Factor::Device),
        pb::Factor::Site => Some(Factor::Site),
        pb::Factor::Firmware => Some(Factor::Firmware),
        pb::Factor::Recipe => Some(Factor::Recipe),
        pb::Factor::Lot => Some(Factor::Lot),
        pb::Factor::Unspecified => None,
    }
}

/// A factor by its name (`device`, `site`, `firmware`, `recipe`, `lot`), as the CLI and
/// the dashboard take it.
pub fn factor_named(name: &str) -> Option<pb::Factor> {
    Factor::from_name(name).map(factor_pb)
}

fn factor_pb(f: Factor) -> pb::Factor {
    match f {
        Factor::Device => pb::Factor::Device,
        Factor::Site => pb::Factor::Site,
        Factor::Firmware => pb::Factor::Firmware,
        Factor::Recipe => pb::Factor::Recipe,
        Factor::Lot => pb::Factor::Lot,
    }
}

/// The caller's selection, limited to their site when their role is site-scoped.
fn selection(caller: &Caller, s: Option<pb::BatchSelection>) -> Result<Selection, Error> {
    let pb::BatchSelection {
        device_ids,
        mut site_ids,
        firmware_versions,
        recipe_ids,
        cartridge_lots,
        since_unix_ms,
        until_unix_ms,
    } = s.unwrap_or_default();
    if let Some(own) = caller.site_limit() {
        for s in &site_ids {
            caller.check_site(s)?;
        }
        site_ids = vec![own.to_owned()];
    }
    if since_unix_ms < 0 {
        return Err(Error::invalid(
            "since_unix_ms",
            since_unix_ms.to_string(),
            "0 (any) or a time after 1970",
        ));
    }
    if until_unix_ms != 0 && until_unix_ms <= since_unix_ms {
        return Err(Error::invalid(
            "until_unix_ms",
            until_unix_ms.to_string(),
            format!("0 (now) or later than since_unix_ms = {since_unix_ms}"),
        ));
    }
    let mut levels: [Vec<String>; compare::FACTORS] = Default::default();
    levels[Factor::Device as usize] = device_ids;
    levels[Factor::Site as usize] = site_ids;
    levels[Factor::Firmware as usize] = firmware_versions;
    levels[Factor::Recipe as usize] = recipe_ids;
    levels[Factor::Lot as usize] = cartridge_lots;
    Ok(Selection {
        levels,
        since_ms: (since_unix_ms > 0).then_some(since_unix_ms),
        until_ms: (until_unix_ms > 0).then_some(until_unix_ms),
    })
}

/// Which way a metric gets worse, for the cohort gate. Two-sided attributes are worse
/// away from the middle of the recipe's limits, or else from the reference's mean.
fn direction(metric: Metric, limits: Option<(Option<f64>, Option<f64>)>, reference: &[f64]) -> Direction {
    match metric {
        Metric::EncapsulationPct | Metric::YieldPct => Direction::LowerIsWorse,
        Metric::SizeNm | Metric::Ph => match limits {
            Some((Some(lo), Some(hi))) => Direction::AwayFrom((lo + hi) / 2.0),
            _ if !reference.is_empty() => {
                Direction::AwayFrom(reference.iter().sum::<f64>() / reference.len() as f64)
            }
            _ => Direction::HigherIsWorse,
        },
        _ => Direction::HigherIsWorse,
    }
}

fn direction_str(d: Direction) -> String {
    match d {
        Direction::HigherIsWorse => "higher-is-worse".into(),
        Direction::LowerIsWorse => "lower-is-worse".into(),
        Direction::AwayFrom(t) => format!("away-from:{t}"),
    }
}

/// The metrics the cohort gate compares unless asked for others.
pub const GATE_METRICS: [Metric; 7] = [
    Metric::SizeNm,
    Metric::Pdi,
    Metric::EncapsulationPct,
    Metric::Ph,
    Metric::YieldPct,
    Metric::FlowCv,
    Metric::FrrErrorPct,
];

impl Monitoring {
    pub fn new(store: Store, fleet: Fleet) -> Monitoring {
        let (alerts, _) = broadcast::channel(1024);
        Monitoring {
            inner: Arc::new(Inner {
                store,
                fleet,
                index: RwLock::new(Indexed::default()),
                loaded: Mutex::new(0),
                alerts,
                webhook: std::sync::OnceLock::new(),
                sites_compared_ms: std::sync::Mutex::new(i64::MIN),
                stop: tokio_util::sync::CancellationToken::new(),
            }),
        }
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// Derives the metrics of records stored before metrics were kept. Returns how many.
    pub async fn backfill(&self) -> Result<usize, Error> {
        let mut done = 0;
        loop {
            let todo = self.inner.store.batches_without_metrics(1_000).await?;
            if todo.is_empty() {
                return Ok(done);
            }
            let mut progressed = false;
            for (device_id, envelope) in todo {
                match nanofleet_recipe::batch::verify(&envelope, &device_id) {
                    Ok(v) => {
                        let (m, limits) = batch_metrics(&v.record);
                        self.inner.store.insert_metrics(&m, &limits).await?;
                        done += 1;
                        progressed = true;
                    }
                    Err(e) => tracing::warn!(%device_id, error = %e, "stored batch record does not decode"),
                }
            }
            if !progressed {
                return Ok(done);
            }
        }
    }

    /// Loads batch metrics that arrived since the last call into the index. Returns
    /// how many.
    pub async fn refresh(&self) -> Result<usize, Error> {
        let mut loaded = self.inner.loaded.lock().await;
        let mut added = 0;
        loop {
            let page = self.inner.store.batch_metrics_after(*loaded, 10_000).await?;
            let Some(last) = page.last() else { break };
            *loaded = last.seq;
            let rows: Vec<(i64, Row)> = page.iter().map(|m| (m.seq, row_of(m))).collect();
            let mut ix = self.inner.index.write().unwrap_or_else(|e| e.into_inner());
            for (seq, row) in &rows {
                if ix.index.push(row) {
                    ix.seqs.push(*seq);
                    added += 1;
                }
            }
            if page.len() < 10_000 {
                break;
            }
        }
        if added > 0 {
            let limits = self.inner.store.quality_limits().await?;
            let mut ix = self.inner.index.write().unwrap_or_else(|e| e.into_inner());
            for l in limits {
                let Some(metric) = Metric::from_name(&l.attribute) else { continue };
                let e = ix.limits.entry((l.recipe_id, metric)).or_insert((l.recipe_version, l.lo, l.hi));
                if l.recipe_version >= e.0 {
                    *e = (l.recipe_version, l.lo, l.hi);
                }
            }
        }
        Ok(added)
    }

    /// Runs `f` over the index on a blocking thread: a chart over a million batches
    /// takes milliseconds of CPU that must not stall the runtime's workers.
    async fn with_index<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Indexed) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let started = std::time::Instant::now();
        self.refresh().await?;
        let refreshed = started.elapsed();
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let ix = inner.index.read().unwrap_or_else(|e| e.into_inner());
            let out = f(&ix);
            tracing::debug!(?refreshed, total = ?started.elapsed(), "monitoring query");
            out
        })
        .await
        .map_err(|e| Error::Unavailable(format!("chart computation failed: {e}")))?
    }

    /// Control charts for a request.
    pub async fn control_chart(
        &self,
        caller: &Caller,
        req: pb::GetControlChartRequest,
    ) -> Result<pb::GetControlChartResponse, Error> {
        let pb::GetControlChartRequest { metric, selection: sel, by, baseline_points, max_points } = req;
        let metric = metric_arg("metric", &metric)?;
        let baseline_points = match baseline_points {
            0 => DEFAULT_BASELINE_POINTS,
            n @ 2..=100_000 => n,
            n => {
                return Err(Error::invalid(
                    "baseline_points",
                    n.to_string(),
                    "0 (default 20) or 2 to 100000",
                ));
            }
        };
        let max_points = match max_points {
            0 => DEFAULT_MAX_POINTS,
            n @ 1..=MAX_POINTS => n,
            n => return Err(Error::invalid("max_points", n.to_string(), "0 (default 500) or 1 to 5000")),
        };
        let q = ChartQuery {
            metric,
            selection: selection(caller, sel)?,
            by: factor_of(by),
            baseline_points: baseline_points as usize,
            max_points: max_points as usize,
        };
        self.with_index(move |ix| {
            let charts = chart::control_charts(&ix.index, &q, &ix.spec_limits(metric));
            Ok(pb::GetControlChartResponse {
                charts: charts.iter().map(|c| chart_pb(&ix.index, c)).collect(),
            })
        })
        .await
    }

    /// Which stratum of a factor differs.
    pub async fn compare_strata(
        &self,
        caller: &Caller,
        req: pb::CompareStrataRequest,
    ) -> Result<pb::CompareStrataResponse, Error> {
        let pb::CompareStrataRequest { metric, selection: sel, by, alpha } = req;
        let metric = metric_arg("metric", &metric)?;
        let factor = factor_of(by)
            .ok_or_else(|| Error::invalid("by", by.to_string(), "device, site, firmware, recipe or lot"))?;
        let alpha = alpha_arg(alpha)?;
        let s = selection(caller, sel)?;
        self.with_index(move |ix| {
            let rows = ix.index.select(&s);
            let samples = ix.index.samples(metric, &rows);
            let c = compare::compare_by(&samples, factor, alpha).map_err(|e| {
                Error::Conflict(format!("cannot compare {} by {}: {e}", metric.name(), factor.name()))
            })?;
            Ok(strata_pb(&ix.index, metric, &c))
        })
        .await
    }

    /// The cohort gate.
    pub async fn compare_cohorts(
        &self,
        caller: &Caller,
        req: pb::CompareCohortsRequest,
    ) -> Result<pb::CompareCohortsResponse, Error> {
        let pb::CompareCohortsRequest { cohort_a, cohort_b, alpha, min_effect_sigma, min_samples, metrics } =
            req;
        let defaults = GateParams::default();
        let params = GateParams {
            alpha: if alpha == 0.0 { defaults.alpha } else { alpha_arg(alpha)? },
            min_effect_sigma: match min_effect_sigma {
                0.0 => defaults.min_effect_sigma,
                v if v.is_finite() && v > 0.0 && v <= 10.0 => v,
                v => {
                    return Err(Error::invalid(
                        "min_effect_sigma",
                        v.to_string(),
                        "0 (default 0.5) or up to 10",
                    ));
                }
            },
            min_samples: match min_samples {
                0 => defaults.min_samples,
                n @ 2..=100_000 => n as usize,
                n => {
                    return Err(Error::invalid("min_samples", n.to_string(), "0 (default 5) or 2 to 100000"));
                }
            },
            ..defaults
        };
        let metrics: Vec<Metric> = if metrics.is_empty() {
            GATE_METRICS.to_vec()
        } else {
            metrics.iter().map(|m| metric_arg("metrics", m)).collect::<Result<_, _>>()?
        };
        let a = selection(caller, cohort_a)?;
        let b = selection(caller, cohort_b)?;
        self.with_index(move |ix| cohort_gate(ix, &a, &b, &metrics, &params)).await
    }

    /// The levels seen for a factor (the caller's site only, for site-scoped roles).
    pub async fn levels(&self, caller: &Caller, factor: pb::Factor) -> Result<Vec<String>, Error> {
        let factor = factor_of(factor as i32).ok_or_else(|| {
            Error::invalid("factor", "unspecified", "device, site, firmware, recipe or lot")
        })?;
        let own = selection(caller, None)?;
        self.with_index(move |ix| {
            if own.levels.iter().all(Vec::is_empty) {
                let mut names = ix.index.level_names(factor).to_vec();
                names.sort();
                return Ok(names);
            }
            let mut names: Vec<String> =
                ix.index.select(&own).iter().map(|&r| ix.index.level(r, factor).to_owned()).collect();
            names.sort();
            names.dedup();
            Ok(names)
        })
        .await
    }

    /// Sites ranked worst first by QC pass rate, then by devices online.
    pub async fn fleet_health(
        &self,
        caller: &Caller,
        req: pb::GetFleetHealthRequest,
    ) -> Result<pb::GetFleetHealthResponse, Error> {
        let since = if req.since_unix_ms > 0 { req.since_unix_ms } else { crate::now_ms() - 7 * 86_400_000 };
        let mut sites = self.inner.fleet.sites().await?;
        if let Some(own) = caller.site_limit() {
            sites.retain(|s| s.id == own);
        }
        let open: HashMap<String, i64> = self.inner.store.active_alert_counts().await?.into_iter().collect();
        let counts = self
            .with_index(move |ix| {
                let rows = ix.index.select(&Selection { since_ms: Some(since), ..Default::default() });
                let mut per_site: HashMap<String, (u32, u32)> = HashMap::new();
                for r in rows {
                    let e = per_site.entry(ix.index.level(r, Factor::Site).to_owned()).or_default();
                    e.0 += 1;
                    e.1 += u32::from(ix.index.qc_passed(r));
                }
                Ok(per_site)
            })
            .await?;
        let mut out: Vec<pb::SiteHealth> = sites
            .into_iter()
            .map(|s| {
                let (batches, passed) = counts.get(&s.id).copied().unwrap_or_default();
                pb::SiteHealth {
                    open_alerts: open.get(&s.id).copied().unwrap_or(0).try_into().unwrap_or(u32::MAX),
                    site_name: s.name,
                    devices: s.devices_total,
                    devices_online: s.devices_online,
                    batches,
                    batches_passed: passed,
                    pass_rate: if batches > 0 { f64::from(passed) / f64::from(batches) } else { 1.0 },
                    uptime: if s.devices_total > 0 {
                        f64::from(s.devices_online) / f64::from(s.devices_total)
                    } else {
                        1.0
                    },
                    site_id: s.id,
                }
            })
            .collect();
        out.sort_by(|a, b| {
            a.pass_rate
                .total_cmp(&b.pass_rate)
                .then(a.uptime.total_cmp(&b.uptime))
                .then(a.site_id.cmp(&b.site_id))
        });
        Ok(pb::GetFleetHealthResponse { sites: out })
    }
}

fn alpha_arg(alpha: f64) -> Result<f64, Error> {
    match alpha {
        0.0 => Ok(DEFAULT_ALPHA),
        a if a > 0.0 && a < 0.5 => Ok(a),
        a => Err(Error::invalid("alpha", a.to_string(), "0 (default 0.01) or between 0 and 0.5")),
    }
}

/// The cohort gate over the index: QC metrics, failed batches and runs with alarms.
pub(crate) fn cohort_gate(
    ix: &Indexed,
    a: &Selection,
    b: &Selection,
    metrics: &[Metric],
    params: &GateParams,
) -> Result<pb::CompareCohortsResponse, Error> {
    let rows_a = ix.index.select(a);
    let rows_b = ix.index.select(b);
    let one_recipe = |rows: &[RowId]| {
        let first = rows.first().map(|&r| ix.index.level(r, Factor::Recipe))?;
        rows.iter().all(|&r| ix.index.level(r, Factor::Recipe) == first).then_some(first)
    };
    let recipe = one_recipe(&rows_b).filter(|r| one_recipe(&rows_a) == Some(*r)).map(str::to_owned);
    let samples: Vec<MetricSamples> = metrics
        .iter()
        .map(|&m| {
            let (va, _) = ix.index.series(m, &rows_a);
            let (vb, _) = ix.index.series(m, &rows_b);
            let limits =
                recipe.as_ref().and_then(|r| ix.limits.get(&(r.clone(), m))).map(|&(_, lo, hi)| (lo, hi));
            MetricSamples { name: m.name().to_owned(), direction: direction(m, limits, &vb), a: va, b: vb }
        })
        .collect();
    let count = |rows: &[RowId], hit: &dyn Fn(RowId) -> bool| rows.iter().filter(|&&r| hit(r)).count() as u64;
    let failed = |r: RowId| !ix.index.qc_passed(r);
    let alarmed = |r: RowId| ix.index.value(r, Metric::Alarms).unwrap_or(0.0) > 0.0;
    let counts = vec![
        CountSamples {
            name: "failed_batches".into(),
            events_a: count(&rows_a, &failed),
            trials_a: rows_a.len() as u64,
            events_b: count(&rows_b, &failed),
            trials_b: rows_b.len() as u64,
        },
        CountSamples {
            name: "runs_with_alarms".into(),
            events_a: count(&rows_a, &alarmed),
            trials_a: rows_a.len() as u64,
            events_b: count(&rows_b, &alarmed),
            trials_b: rows_b.len() as u64,
        },
    ];
    let report = compare::cohort_gate(&samples, &counts, params)
        .map_err(|e| Error::invalid("params", e.to_string(), "see the field named"))?;
    Ok(pb::CompareCohortsResponse {
        verdict: match report.verdict {
            compare::Verdict::Regressed => pb::Verdict::Regressed,
            compare::Verdict::NoRegression => pb::Verdict::NoRegression,
            compare::Verdict::InsufficientData => pb::Verdict::InsufficientData,
        } as i32,
        summary: report.summary.clone(),
        metrics: report
            .metrics
            .iter()
            .map(|m| pb::MetricEvidence {
                metric: m.name.clone(),
                direction: direction_str(m.direction),
                n_a: m.n_a as u32,
                n_b: m.n_b as u32,
                mean_a: m.mean_a,
                mean_b: m.mean_b,
                sd_a: m.sd_a,
                sd_b: m.sd_b,
                worse_by: m.worse_by,
                effect_sigma: m.effect_sigma,
                p_value: m.p_value,
                regressed: m.regressed,
                enough_data: m.enough_data,
            })
            .collect(),
        counts: report
            .counts
            .iter()
            .map(|c| pb::CountEvidence {
                name: c.name.clone(),
                events_a: c.events_a,
                trials_a: c.trials_a,
                events_b: c.events_b,
                trials_b: c.trials_b,
                rate_a: c.rate_a,
                rate_b: c.rate_b,
                rate_ratio: c.rate_ratio,
                p_value: c.p_value,
                regressed: c.regressed,
                enough_data: c.enough_data,
            })
            .collect(),
        batches_a: rows_a.len() as u32,
        batches_b: rows_b.len() as u32,
    })
}

fn side_str(s: nanofleet_monitoring::spc::Side) -> &'static str {
    match s {
        nanofleet_monitoring::spc::Side::Above => "above",
        nanofleet_monitoring::spc::Side::Below => "below",
        nanofleet_monitoring::spc::Side::Both => "both",
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_uppercase().chain(c).collect()).unwrap_or_default()
}

fn finite(v: f64) -> f64 {
    if v.is_finite() { v } else { 0.0 }
}

pub(crate) fn point_pb(ix: &QualityIndex, p: &chart::ChartPoint) -> pb::ChartPoint {
    pb::ChartPoint {
        index: p.index as u32,
        batch_id: ix.batch_id(p.row).to_owned(),
        ended_unix_ms: ix.ended_ms(p.row),
        value: p.value,
        moving_range: p.moving_range,
        ewma: p.ewma.z,
        ewma_lcl: p.ewma.lcl,
        ewma_ucl: p.ewma.ucl,
        cusum_upper: p.cusum.upper,
        cusum_lower: p.cusum.lower,
        device_id: ix.level(p.row, Factor::Device).to_owned(),
        site_id: ix.level(p.row, Factor::Site).to_owned(),
        firmware_version: ix.level(p.row, Factor::Firmware).to_owned(),
        cartridge_lot: ix.level(p.row, Factor::Lot).to_owned(),
        rules: p.rules.iter().map(|r| r.code().to_owned()).collect(),
    }
}

pub(crate) fn violation_pb(
    ix: &QualityIndex,
    chart: &Chart,
    v: &nanofleet_monitoring::spc::Violation,
    row: RowId,
) -> pb::RuleViolation {
    pb::RuleViolation {
        rule: v.rule.code().to_owned(),
        description: v.rule.description().to_owned(),
        index: v.index as u32,
        first_index: v.first as u32,
        side: side_str(v.side).to_owned(),
        batch_id: ix.batch_id(row).to_owned(),
        ended_unix_ms: ix.ended_ms(row),
        value: ix.value(row, chart.metric).unwrap_or(0.0),
        device_id: ix.level(row, Factor::Device).to_owned(),
        site_id: ix.level(row, Factor::Site).to_owned(),
    }
}

pub(crate) fn chart_pb(ix: &QualityIndex, c: &Chart) -> pb::ControlChart {
    let b = c.baseline;
    pb::ControlChart {
        stratum: c.stratum.as_ref().map(|(f, l)| format!("{}={l}", f.name())).unwrap_or_default(),
        metric: c.metric.name().to_owned(),
        unit: c.metric.unit().to_owned(),
        n: c.n as u32,
        baseline_points: b.map_or(0, |b| b.n as u32),
        center: b.map_or(0.0, |b| b.mean),
        sigma: b.map_or(0.0, |b| b.sigma),
        ucl: b.map_or(0.0, |b| b.ucl()),
        lcl: b.map_or(0.0, |b| b.lcl()),
        mr_center: b.map_or(0.0, |b| b.mr_center()),
        mr_ucl: b.map_or(0.0, |b| b.mr_ucl()),
        ewma_lambda: c.ewma_params.lambda,
        ewma_l: c.ewma_params.l,
        cusum_k: c.cusum_params.k,
        cusum_h: c.cusum_params.h,
        mean: finite(c.mean),
        sd: finite(c.sd),
        lsl: c.lsl,
        usl: c.usl,
        cp: c.capability.as_ref().and_then(|k| k.cp),
        cpk: c.capability.as_ref().map(|k| k.cpk),
        points: c.points.iter().map(|p| point_pb(ix, p)).collect(),
        violations: c.violations.iter().map(|(v, r)| violation_pb(ix, c, v, *r)).collect(),
        rule_counts: c
            .rule_counts
            .iter()
            .map(|(r, n)| pb::RuleCount {
                rule: r.code().to_owned(),
                description: r.description().to_owned(),
                count: *n as u32,
            })
            .collect(),
        first_ewma_signal: c.first_ewma_signal.map(|i| i as u32),
        first_cusum_signal: c.first_cusum_signal.map(|i| i as u32),
        problem: c.problem.clone().unwrap_or_default(),
    }
}

fn strata_pb(ix: &QualityIndex, metric: Metric, c: &compare::FactorComparison) -> pb::CompareStrataResponse {
    let name = |level: u32| ix.level_name(c.factor, level).to_owned();
    let flagged: Vec<String> = c
        .strata
        .iter()
        .filter(|s| s.significant)
        .map(|s| {
            format!("{} {:+.3} {} (p={:.2e}, n={})", name(s.level), s.effect, metric.unit(), s.p_value, s.n)
        })
        .collect();
    let adjusted = c.adjusted_for.iter().map(|f| f.name()).collect::<Vec<_>>().join(", ");
    let adjusted = if adjusted.is_empty() { String::new() } else { format!(", adjusted for {adjusted}") };
    let summary = if flagged.is_empty() {
        format!(
            "No {} differs in {} (F={:.2}, p={:.3}, n={}{adjusted}).",
            c.factor.name(),
            metric.name(),
            c.f_statistic,
            c.p_value,
            c.n,
        )
    } else {
        format!("{} differs in {}: {}{adjusted}.", c.factor.name(), metric.name(), flagged.join("; "))
    };
    let summary = capitalise(&summary);
    pb::CompareStrataResponse {
        metric: metric.name().to_owned(),
        by: factor_pb(c.factor) as i32,
        adjusted_for: c.adjusted_for.iter().map(|&f| factor_pb(f) as i32).collect(),
        n: c.n as u32,
        f_statistic: finite(c.f_statistic),
        df_num: c.df_num,
        df_den: c.df_den,
        p_value: finite(c.p_value),
        significant: c.significant,
        residual_sigma: finite(c.residual_sigma),
        strata: c
            .strata
            .iter()
            .map(|s| pb::StratumEffect {
                level: name(s.level),
                n: s.n as u32,
                mean: s.mean,
                effect: s.effect,
                ci_low: s.ci_low,
                ci_high: s.ci_high,
                t: finite(s.t),
                p_value: finite(s.p_value),
                significant: s.significant,
            })
            .collect(),
        summary,
        alpha: c.alpha,
    }
}
