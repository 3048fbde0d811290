//! Telemetry metrics and their rollups: what a sample measures, one summary per
//! metric per device and interval, and the byte format of a stored rollup.
//!
//! A rollup holds, per metric, the count, sum, min, max and a quantile sketch
//! ([`nanofleet_monitoring::sketch`], 1 % relative accuracy) of the samples in its
//! interval. Two rollups of the same interval merge exactly, so minutes merge into
//! hours, hours into days, and a late sample into a stored minute.

use std::collections::HashMap;

use nanofleet_monitoring::sketch::Summary;
use nanofleet_proto::Message as _;
use nanofleet_proto::device::v1::{FluidLine, Sample, TelemetryBatch};
use nanofleet_store::{RollupFold, RollupRow, TelemetryRecord, Tier};

/// A telemetry metric: one number per sample. Flow, ratio and pressure metrics count
/// only samples taken while the pumps run (a flow setpoint above zero): an idle
/// device's zeros would swamp the figures that matter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    AqueousFlow,
    EthanolFlow,
    TotalFlow,
    FlowRatio,
    AqueousPressure,
    EthanolPressure,
    MixerPressureDrop,
    ChamberTemperature,
    CartridgeTemperature,
}

impl Metric {
    /// Every metric, in id order. Ids are stored: never renumber.
    pub const ALL: [Metric; 9] = [
        Metric::AqueousFlow,
        Metric::EthanolFlow,
        Metric::TotalFlow,
        Metric::FlowRatio,
        Metric::AqueousPressure,
        Metric::EthanolPressure,
        Metric::MixerPressureDrop,
        Metric::ChamberTemperature,
        Metric::CartridgeTemperature,
    ];

    pub fn id(self) -> u8 {
        self as u8
    }

    fn from_id(id: u8) -> Option<Metric> {
        Metric::ALL.get(usize::from(id)).copied()
    }

    /// The name used in the API, the CLI and the dashboard.
    pub fn name(self) -> &'static str {
        match self {
            Metric::AqueousFlow => "aqueous_flow",
            Metric::EthanolFlow => "ethanol_flow",
            Metric::TotalFlow => "total_flow",
            Metric::FlowRatio => "flow_ratio",
            Metric::AqueousPressure => "aqueous_pressure",
            Metric::EthanolPressure => "ethanol_pressure",
            Metric::MixerPressureDrop => "mixer_pressure_drop",
            Metric::ChamberTemperature => "chamber_temperature",
            Metric::CartridgeTemperature => "cartridge_temperature",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Metric::AqueousFlow | Metric::EthanolFlow | Metric::TotalFlow => "µL/min",
            Metric::FlowRatio => "aqueous:ethanol",
            Metric::AqueousPressure | Metric::EthanolPressure | Metric::MixerPressureDrop => "mbar",
            Metric::ChamberTemperature | Metric::CartridgeTemperature => "°C",
        }
    }

    /// Looks a metric up by name; the error lists the names allowed.
    pub fn named(name: &str) -> Result<Metric, String> {
        Metric::ALL.into_iter().find(|m| m.name() == name).ok_or_else(|| {
            let names: Vec<&str> = Metric::ALL.iter().map(|m| m.name()).collect();
            format!("metric {name:?} is not a telemetry metric; use one of {}", names.join(", "))
        })
    }

    /// The metric's value in one sample, if the sample has one.
    pub fn of(self, s: &Sample) -> Option<f64> {
        let line = |which: FluidLine| s.lines.iter().find(|l| l.line == which as i32);
        let running = |which: FluidLine| line(which).filter(|l| l.flow_setpoint_ul_min > 0.0);
        let v = match self {
            Metric::AqueousFlow => running(FluidLine::Aqueous)?.flow_ul_min,
            Metric::EthanolFlow => running(FluidLine::Ethanol)?.flow_ul_min,
            Metric::TotalFlow => {
                running(FluidLine::Aqueous)?.flow_ul_min + running(FluidLine::Ethanol)?.flow_ul_min
            }
            Metric::FlowRatio => {
                let e = running(FluidLine::Ethanol)?.flow_ul_min;
                if e <= 0.0 {
                    return None;
                }
                running(FluidLine::Aqueous)?.flow_ul_min / e
            }
            Metric::AqueousPressure => running(FluidLine::Aqueous)?.pressure_mbar,
            Metric::EthanolPressure => running(FluidLine::Ethanol)?.pressure_mbar,
            Metric::MixerPressureDrop => {
                running(FluidLine::Aqueous)?;
                s.mixer_pressure_drop_mbar
            }
            Metric::ChamberTemperature => s.chamber_temperature_c,
            Metric::CartridgeTemperature => s.cartridge_temperature_c,
        };
        v.is_finite().then_some(v)
    }
}

/// The summaries of every metric over one interval.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rollup {
    /// Samples in the interval (each counts here, whichever metrics it has).
    pub samples: u64,
    summaries: [Option<Summary>; Metric::ALL.len()],
}

/// The format byte a stored rollup starts with.
const FORMAT: u8 = 1;

impl Rollup {
    pub fn add(&mut self, s: &Sample) {
        self.samples += 1;
        for m in Metric::ALL {
            if let Some(v) = m.of(s) {
                self.summaries[usize::from(m.id())].get_or_insert_with(Summary::new).add(v);
            }
        }
    }

    pub fn merge(&mut self, other: &Rollup) {
        self.samples += other.samples;
        for (mine, theirs) in self.summaries.iter_mut().zip(&other.summaries) {
            if let Some(t) = theirs {
                mine.get_or_insert_with(Summary::new).merge(t);
            }
        }
    }

    /// The summary of one metric, if any sample had it.
    pub fn summary(&self, m: Metric) -> Option<&Summary> {
        self.summaries[usize::from(m.id())].as_ref()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![FORMAT];
        let present: Vec<(Metric, &Summary)> =
            Metric::ALL.iter().filter_map(|&m| Some((m, self.summary(m)?))).collect();
        out.push(present.len() as u8);
        for (m, s) in present {
            out.push(m.id());
            s.encode(&mut out);
        }
        out
    }

    /// Reads a stored rollup; `samples` is the row's sample count.
    pub fn decode(bytes: &[u8], samples: i64) -> Result<Rollup, String> {
        let (&format, rest) = bytes.split_first().ok_or("empty rollup")?;
        if format != FORMAT {
            return Err(format!("rollup format {format} is not known (this server reads {FORMAT})"));
        }
        let (&n, mut rest) = rest.split_first().ok_or("rollup truncated before its metric count")?;
        let mut r = Rollup { samples: u64::try_from(samples).unwrap_or(0), ..Rollup::default() };
        for _ in 0..n {
            let (&id, tail) = rest.split_first().ok_or("rollup truncated before a metric id")?;
            rest = tail;
            let m = Metric::from_id(id)
                .ok_or_else(|| format!("rollup names metric id {id}, which is unknown"))?;
            let s = Summary::decode(&mut rest).map_err(|e| format!("rollup of {}: {e}", m.name()))?;
            r.summaries[usize::from(id)] = Some(s);
        }
        if !rest.is_empty() {
            return Err(format!("rollup has {} bytes after its last metric", rest.len()));
        }
        Ok(r)
    }
}

/// Folds landed telemetry into minute and hour rollups (see [`RollupFold`]).
#[derive(Debug, Default)]
pub struct TelemetryFold;

impl RollupFold for TelemetryFold {
    fn summarize(&mut self, landed: &[TelemetryRecord]) -> Vec<RollupRow> {
        // Minutes from the samples, hours from the minutes (merging a minute's sketch
        // is cheaper than adding its samples again).
        let mut minutes: HashMap<(&str, i64), Rollup> = HashMap::new();
        for rec in landed {
            let batch = match TelemetryBatch::decode(rec.payload.as_slice()) {
                Ok(b) => b,
                Err(e) => {
                    // Validated before it was stored; a row that no longer decodes is
                    // left out of the rollups, not allowed to stop them.
                    tracing::warn!(device = %rec.device_id, seq = rec.seq, error = %e, "stored telemetry does not decode; not rolled up");
                    continue;
                }
            };
            for s in &batch.samples {
                let start = Tier::Minute.start_of(s.time_unix_ms);
                minutes.entry((rec.device_id.as_str(), start)).or_default().add(s);
            }
        }
        let mut hours: HashMap<(&str, i64), Rollup> = HashMap::new();
        for ((device, start), r) in &minutes {
            hours.entry((device, Tier::Hour.start_of(*start))).or_default().merge(r);
        }
        let row = |tier: Tier, ((device, start), r): ((&str, i64), Rollup)| RollupRow {
            device_id: device.to_string(),
            tier,
            start_ms: start,
            samples: r.samples as i64,
            data: r.encode(),
        };
        let mut rows: Vec<RollupRow> = minutes.into_iter().map(|e| row(Tier::Minute, e)).collect();
        rows.extend(hours.into_iter().map(|e| row(Tier::Hour, e)));
        rows
    }

    fn merge(&self, into: &mut RollupRow, other: &RollupRow) {
        let theirs = match Rollup::decode(&other.data, other.samples) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(device = %other.device_id, start_ms = other.start_ms, error = %e, "rollup not merged");
                return;
            }
        };
        let mut mine = match Rollup::decode(&into.data, into.samples) {
            Ok(r) => r,
            Err(e) => {
                // Derived data: the raw telemetry it came from is still stored.
                tracing::error!(device = %into.device_id, start_ms = into.start_ms, error = %e, "stored rollup unreadable; replaced");
                Rollup::default()
            }
        };
        mine.merge(&theirs);
        into.samples = mine.samples as i64;
        into.data = mine.encode();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nanofleet_proto::device::v1::LineReading;

    fn sample(ms: i64, aq: f64, et: f64, running: bool) -> Sample {
        let line = |l: FluidLine, flow: f64| LineReading {
            line: l as i32,
            flow_ul_min: flow,
            flow_setpoint_ul_min: if running { flow } else { 0.0 },
            pressure_mbar: flow / 10.0,
            ..Default::default()
        };
        Sample {
            time_unix_ms: ms,
            lines: vec![line(FluidLine::Aqueous, aq), line(FluidLine::Ethanol, et)],
            chamber_temperature_c: 25.0,
            cartridge_temperature_c: 6.0,
            mixer_pressure_drop_mbar: 40.0,
            ..Default::default()
        }
    }

    #[test]
    fn metrics_of_a_sample_and_of_an_idle_one() {
        let s = sample(0, 9_000.0, 3_000.0, true);
        assert_eq!(Metric::TotalFlow.of(&s), Some(12_000.0));
        assert_eq!(Metric::FlowRatio.of(&s), Some(3.0));
        assert_eq!(Metric::EthanolPressure.of(&s), Some(300.0));
        let idle = sample(0, 0.0, 0.0, false);
        assert_eq!(Metric::AqueousFlow.of(&idle), None, "idle samples carry no flow metrics");
        assert_eq!(Metric::FlowRatio.of(&idle), None);
        assert_eq!(Metric::ChamberTemperature.of(&idle), Some(25.0));
        let err = Metric::named("flow").unwrap_err();
        assert!(err.contains("\"flow\"") && err.contains("aqueous_flow"), "{err}");
    }

    #[test]
    fn a_rollup_round_trips_and_merges_like_its_union() {
        let mut a = Rollup::default();
        let mut b = Rollup::default();
        let mut all = Rollup::default();
        for i in 0..120 {
            let s = sample(i * 1_000, 9_000.0 + f64::from(i as i32), 3_000.0, i % 4 != 0);
            if i < 70 {
                a.add(&s)
            } else {
                b.add(&s)
            }
            all.add(&s);
        }
        let decoded = Rollup::decode(&a.encode(), a.samples as i64).unwrap();
        assert_eq!(decoded, a);
        a.merge(&b);
        // Equal but for the rounding of sums added in another order.
        assert_eq!(a.samples, all.samples);
        for m in Metric::ALL {
            let (x, y) = (a.summary(m).unwrap(), all.summary(m).unwrap());
            assert_eq!(
                (x.count, x.min, x.max, &x.sketch),
                (y.count, y.min, y.max, &y.sketch),
                "{}",
                m.name()
            );
            assert!((x.sum - y.sum).abs() <= 1e-9 * y.sum.abs(), "{}", m.name());
        }
        let flow = all.summary(Metric::AqueousFlow).unwrap();
        assert_eq!(flow.count, 90, "30 idle samples carry no flow");
        assert_eq!(all.samples, 120);
        assert_eq!(all.summary(Metric::ChamberTemperature).unwrap().count, 120);
    }

    #[test]
    fn damaged_rollups_are_refused_with_a_reason() {
        let mut r = Rollup::default();
        r.add(&sample(0, 1.0, 1.0, true));
        let good = r.encode();
        assert!(Rollup::decode(&[], 0).unwrap_err().contains("empty"));
        assert!(Rollup::decode(&[9], 0).unwrap_err().contains("format 9"));
        for cut in 1..good.len() {
            assert!(Rollup::decode(&good[..cut], 1).is_err(), "cut at {cut}");
        }
        let mut extra = good.clone();
        extra.push(0);
        assert!(Rollup::decode(&extra, 1).unwrap_err().contains("after its last metric"));
        let mut unknown = good;
        unknown[2] = 200;
        assert!(Rollup::decode(&unknown, 1).unwrap_err().contains("metric id 200"));
    }

    #[test]
    fn the_fold_makes_minutes_and_hours() {
        let batch = |seq: i64, from: i64| {
            let b = TelemetryBatch {
                device_id: "D".into(),
                seq: seq as u64,
                samples: (0..30).map(|i| sample(from + i * 1_000, 9_000.0, 3_000.0, true)).collect(),
                boot_id: String::new(),
            };
            TelemetryRecord {
                device_id: "D".into(),
                seq,
                first_ms: from,
                last_ms: from + 29_000,
                samples: 30,
                payload: b.encode_to_vec(),
            }
        };
        // 45 s into an hour: the second batch spans two minutes.
        let t0 = 3_600_000 * 100;
        let rows = TelemetryFold.summarize(&[batch(1, t0), batch(2, t0 + 45_000)]);
        let minutes: Vec<(i64, i64)> = {
            let mut m: Vec<_> = rows
                .iter()
                .filter(|r| r.tier == Tier::Minute)
                .map(|r| (r.start_ms - t0, r.samples))
                .collect();
            m.sort();
            m
        };
        assert_eq!(minutes, vec![(0, 45), (60_000, 15)]);
        let hours: Vec<_> = rows.iter().filter(|r| r.tier == Tier::Hour).collect();
        assert_eq!(hours.len(), 1);
        assert_eq!((hours[0].start_ms, hours[0].samples), (t0, 60));
    }
}
