//! An in-memory, column-oriented index of batch measurements, so a control chart over a
//! million batches is a scan of a few arrays rather than a database query. Rows are
//! appended in arrival order; a separate order vector keeps them sorted by the time the
//! run ended, because a device that was offline delivers old records late.

use std::collections::HashMap;

use crate::compare::{FACTORS, Factor, Sample};

/// What is measured per batch: the quality attributes the device's QC reports, the
/// process signals taken from the run's phases, and the alarms it raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Metric {
    SizeNm,
    Pdi,
    EncapsulationPct,
    Ph,
    YieldPct,
    FlowCv,
    MaxPressureMbar,
    FrrErrorPct,
    Alarms,
}

/// Number of [`Metric`]s.
pub const METRICS: usize = 9;

impl Metric {
    /// All metrics, in storage order.
    pub const ALL: [Metric; METRICS] = [
        Metric::SizeNm,
        Metric::Pdi,
        Metric::EncapsulationPct,
        Metric::Ph,
        Metric::YieldPct,
        Metric::FlowCv,
        Metric::MaxPressureMbar,
        Metric::FrrErrorPct,
        Metric::Alarms,
    ];

    /// The quality attributes a batch is released on.
    pub const QUALITY: [Metric; 5] =
        [Metric::SizeNm, Metric::Pdi, Metric::EncapsulationPct, Metric::Ph, Metric::YieldPct];

    /// The stable name used in the API, the CLI and the database.
    pub fn name(self) -> &'static str {
        match self {
            Metric::SizeNm => "size_nm",
            Metric::Pdi => "pdi",
            Metric::EncapsulationPct => "encapsulation_pct",
            Metric::Ph => "ph",
            Metric::YieldPct => "yield_pct",
            Metric::FlowCv => "flow_cv",
            Metric::MaxPressureMbar => "max_pressure_mbar",
            Metric::FrrErrorPct => "frr_error_pct",
            Metric::Alarms => "alarms",
        }
    }

    /// Accepts the stable name and a few short forms (`size`, `encapsulation`, ...).
    pub fn from_name(s: &str) -> Option<Metric> {
        let s = s.trim().to_ascii_lowercase().replace('-', "_");
        Metric::ALL.into_iter().find(|m| m.name() == s).or(match s.as_str() {
            "size" => Some(Metric::SizeNm),
            "encapsulation" | "ee" => Some(Metric::EncapsulationPct),
            "yield" => Some(Metric::YieldPct),
            "pressure" => Some(Metric::MaxPressureMbar),
            "frr_error" => Some(Metric::FrrErrorPct),
            _ => None,
        })
    }

    /// The unit values are given in.
    pub fn unit(self) -> &'static str {
        match self {
            Metric::SizeNm => "nm",
            Metric::Pdi | Metric::Ph | Metric::FlowCv => "",
            Metric::EncapsulationPct | Metric::YieldPct | Metric::FrrErrorPct => "%",
            Metric::MaxPressureMbar => "mbar",
            Metric::Alarms => "alarms/run",
        }
    }

    /// Whether the metric is a released quality attribute (it has specification limits).
    pub fn is_quality(self) -> bool {
        Metric::QUALITY.contains(&self)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One batch to index.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub batch_id: String,
    pub ended_ms: i64,
    /// Level names indexed by `Factor as usize`: device, site, firmware, recipe, lot.
    pub strata: [String; FACTORS],
    /// Values indexed by `Metric as usize`; `None` where not measured.
    pub values: [Option<f64>; METRICS],
    pub complete: bool,
    pub qc_passed: bool,
}

/// Which batches a query covers. Empty level lists mean "any".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selection {
    /// Allowed level names per factor, indexed by `Factor as usize`.
    pub levels: [Vec<String>; FACTORS],
    /// Runs that ended at or after this time.
    pub since_ms: Option<i64>,
    /// Runs that ended before this time.
    pub until_ms: Option<i64>,
}

impl Selection {
    /// Restricts `factor` to `level`.
    pub fn with(mut self, factor: Factor, level: impl Into<String>) -> Selection {
        self.levels[factor as usize].push(level.into());
        self
    }
}

/// Dense ids for one factor's level names.
#[derive(Debug, Default)]
struct Levels {
    names: Vec<String>,
    ids: HashMap<String, u32>,
}

impl Levels {
    fn id(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = self.names.len() as u32;
        self.names.push(name.to_owned());
        self.ids.insert(name.to_owned(), id);
        id
    }
}

/// The index. See the module documentation.
#[derive(Debug, Default)]
pub struct QualityIndex {
    ended_ms: Vec<i64>,
    levels: Vec<[u32; FACTORS]>,
    /// One column per metric; NaN where not measured. f32 is ample for these
    /// measurements and halves the memory of a million batches.
    values: [Vec<f32>; METRICS],
    flags: Vec<u8>,
    id_bytes: String,
    id_ends: Vec<u32>,
    /// Row numbers sorted by `ended_ms` (ties in arrival order).
    order: Vec<u32>,
    dictionaries: [Levels; FACTORS],
    by_id: HashMap<Box<str>, u32>,
}

const COMPLETE: u8 = 1;
const PASSED: u8 = 2;

/// A selected batch: its row number in the index.
pub type RowId = u32;

impl QualityIndex {
    pub fn new() -> QualityIndex {
        QualityIndex::default()
    }

    /// Batches indexed.
    pub fn len(&self) -> usize {
        self.ended_ms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ended_ms.is_empty()
    }

    /// Adds a batch; one already indexed (same id) is ignored. Returns whether it was added.
    pub fn push(&mut self, row: &Row) -> bool {
        if self.by_id.contains_key(row.batch_id.as_str()) || self.len() >= u32::MAX as usize {
            return false;
        }
        let n = self.len() as u32;
        let mut levels = [0u32; FACTORS];
        for (f, name) in row.strata.iter().enumerate() {
            levels[f] = self.dictionaries[f].id(name);
        }
        self.levels.push(levels);
        for (m, v) in row.values.iter().enumerate() {
            self.values[m].push(v.filter(|v| v.is_finite()).map_or(f32::NAN, |v| v as f32));
        }
        self.flags.push(if row.complete { COMPLETE } else { 0 } | if row.qc_passed { PASSED } else { 0 });
        self.id_bytes.push_str(&row.batch_id);
        self.id_ends.push(self.id_bytes.len() as u32);
        self.ended_ms.push(row.ended_ms);
        self.by_id.insert(row.batch_id.clone().into_boxed_str(), n);
        // Records usually arrive in time order, so this is an append.
        let at = self.order.partition_point(|&r| self.ended_ms[r as usize] <= row.ended_ms);
        self.order.insert(at, n);
        true
    }

    /// The batch id of a row.
    pub fn batch_id(&self, row: RowId) -> &str {
        let r = row as usize;
        let start = if r == 0 { 0 } else { self.id_ends[r - 1] as usize };
        self.id_bytes.get(start..self.id_ends.get(r).map_or(start, |&e| e as usize)).unwrap_or("")
    }

    /// When the run of a row ended.
    pub fn ended_ms(&self, row: RowId) -> i64 {
        self.ended_ms.get(row as usize).copied().unwrap_or(0)
    }

    /// The level name of `factor` for a row.
    pub fn level(&self, row: RowId, factor: Factor) -> &str {
        let f = factor as usize;
        self.levels
            .get(row as usize)
            .and_then(|l| self.dictionaries[f].names.get(l[f] as usize))
            .map_or("", String::as_str)
    }

    /// The dense level id of `factor` for a row.
    pub fn level_id(&self, row: RowId, factor: Factor) -> u32 {
        self.levels.get(row as usize).map_or(0, |l| l[factor as usize])
    }

    /// The name behind a level id.
    pub fn level_name(&self, factor: Factor, id: u32) -> &str {
        self.dictionaries[factor as usize].names.get(id as usize).map_or("", String::as_str)
    }

    /// Every level name seen for a factor.
    pub fn level_names(&self, factor: Factor) -> &[String] {
        &self.dictionaries[factor as usize].names
    }

    /// A row's value of a metric, if measured.
    pub fn value(&self, row: RowId, metric: Metric) -> Option<f64> {
        self.values[metric.index()].get(row as usize).map(|&v| f64::from(v)).filter(|v| v.is_finite())
    }

    /// Whether the run completed (rather than aborted).
    pub fn complete(&self, row: RowId) -> bool {
        self.flags.get(row as usize).is_some_and(|f| f & COMPLETE != 0)
    }

    /// Whether the batch passed its release criteria.
    pub fn qc_passed(&self, row: RowId) -> bool {
        self.flags.get(row as usize).is_some_and(|f| f & PASSED != 0)
    }

    /// The rows a selection covers, oldest run first.
    pub fn select(&self, s: &Selection) -> Vec<RowId> {
        // Names → ids; a name never seen selects nothing for that factor.
        let mut allowed: [Option<Vec<u32>>; FACTORS] = Default::default();
        for (f, names) in s.levels.iter().enumerate() {
            if !names.is_empty() {
                let ids: Vec<u32> =
                    names.iter().filter_map(|n| self.dictionaries[f].ids.get(n.as_str()).copied()).collect();
                if ids.is_empty() {
                    return Vec::new();
                }
                allowed[f] = Some(ids);
            }
        }
        let from = s.since_ms.map_or(0, |t| self.order.partition_point(|&r| self.ended_ms[r as usize] < t));
        let to = s
            .until_ms
            .map_or(self.order.len(), |t| self.order.partition_point(|&r| self.ended_ms[r as usize] < t));
        let window = self.order.get(from..to.max(from)).unwrap_or(&[]);
        if allowed.iter().all(Option::is_none) {
            return window.to_vec();
        }
        window
            .iter()
            .copied()
            .filter(|&r| {
                let l = &self.levels[r as usize];
                allowed.iter().enumerate().all(|(f, a)| a.as_ref().is_none_or(|ids| ids.contains(&l[f])))
            })
            .collect()
    }

    /// The measured values of `metric` over `rows`, with the rows they came from
    /// (rows without a measurement are skipped).
    pub fn series(&self, metric: Metric, rows: &[RowId]) -> (Vec<f64>, Vec<RowId>) {
        let column = &self.values[metric.index()];
        let mut values = Vec::with_capacity(rows.len());
        let mut kept = Vec::with_capacity(rows.len());
        for &r in rows {
            if let Some(&v) = column.get(r as usize)
                && v.is_finite()
            {
                values.push(f64::from(v));
                kept.push(r);
            }
        }
        (values, kept)
    }

    /// The measured values of `metric` over `rows` as samples for a stratified comparison.
    pub fn samples(&self, metric: Metric, rows: &[RowId]) -> Vec<Sample> {
        let column = &self.values[metric.index()];
        rows.iter()
            .filter_map(|&r| {
                let v = *column.get(r as usize)?;
                v.is_finite().then(|| Sample { value: f64::from(v), levels: self.levels[r as usize] })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, ended: i64, device: &str, site: &str, lot: &str, size: f64) -> Row {
        let mut values = [None; METRICS];
        values[Metric::SizeNm as usize] = Some(size);
        Row {
            batch_id: id.into(),
            ended_ms: ended,
            strata: [device.into(), site.into(), "1.2.0".into(), "r1".into(), lot.into()],
            values,
            complete: true,
            qc_passed: true,
        }
    }

    #[test]
    fn late_records_are_ordered_by_run_end_and_duplicates_ignored() {
        let mut ix = QualityIndex::new();
        assert!(ix.push(&row("b1", 100, "d1", "s1", "L1", 80.0)));
        assert!(ix.push(&row("b3", 300, "d1", "s1", "L1", 82.0)));
        assert!(ix.push(&row("b2", 200, "d2", "s2", "L2", 81.0)));
        assert!(!ix.push(&row("b2", 200, "d2", "s2", "L2", 99.0)));
        let rows = ix.select(&Selection::default());
        let ids: Vec<&str> = rows.iter().map(|&r| ix.batch_id(r)).collect();
        assert_eq!(ids, ["b1", "b2", "b3"]);
        assert_eq!(ix.series(Metric::SizeNm, &rows).0, [80.0, 81.0, 82.0]);
        assert_eq!(ix.level(rows[1], Factor::Site), "s2");
    }

    #[test]
    fn selection_filters_by_levels_and_window() {
        let mut ix = QualityIndex::new();
        for i in 0..10 {
            let site = if i % 2 == 0 { "s1" } else { "s2" };
            ix.push(&row(&format!("b{i}"), i * 10, "d", site, "L", 80.0 + i as f64));
        }
        let s = Selection { since_ms: Some(20), until_ms: Some(70), ..Default::default() }
            .with(Factor::Site, "s2");
        let rows = ix.select(&s);
        assert_eq!(ix.series(Metric::SizeNm, &rows).0, [83.0, 85.0]);
        assert!(ix.select(&Selection::default().with(Factor::Site, "nowhere")).is_empty());
        // Missing measurements are skipped, not read as zero.
        assert!(ix.series(Metric::Pdi, &rows).0.is_empty());
    }

    #[test]
    fn metric_names_round_trip_and_accept_short_forms() {
        for m in Metric::ALL {
            assert_eq!(Metric::from_name(m.name()), Some(m));
        }
        assert_eq!(Metric::from_name("Size"), Some(Metric::SizeNm));
        assert_eq!(Metric::from_name("flow-cv"), Some(Metric::FlowCv));
        assert_eq!(Metric::from_name("colour"), None);
    }
}
