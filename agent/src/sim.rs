//! A simulated formulation device with plausible physics (numbers from DOMAIN.md):
//! two fluid lines under pressure control, the run phases of an LNP formulation,
//! on-device alarms, and faults that can be injected.
//!
//! Pure logic: no clock, no I/O. The caller passes the time of each reading.
//!
//! Faults that build up over weeks (pump wear, slow drift) can age faster than real
//! time: with [`SimDevice::set_time_scale`], their severity grows from nothing with
//! the *simulated* time since they were injected (real elapsed time × scale), while
//! every reading keeps its real timestamp. Without a time scale every fault is at full
//! severity from the start. A batch made from a cartridge lot the device was told is
//! bad ([`SimDevice::set_bad_lots`]) comes out larger and less well encapsulated.
//!
//! Nominal recipe: total flow rate (TFR) 12 mL/min at a flow-rate ratio (FRR,
//! aqueous:ethanol) of 3:1, so 9,000 µL/min aqueous and 3,000 µL/min ethanol; 20 to
//! 25 °C. The pressure controller holds each line's pressure within about ±1 % of what
//! the line's resistance needs for its flow setpoint; flow sensors read with a
//! coefficient of variation of 0.07 that pump wear raises towards 0.3.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use nanofleet_proto::device::v1::{
    Alarm, AlarmCode, AlarmPriority, Event, FluidLine, LineReading, PhaseChange, QualityAttribute, RunPhase,
    Sample, event,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::hal::{Device, DeviceInfo, QcMeasurement, Reading, RunPlan};

/// Nominal total flow rate, µL/min (12 mL/min).
pub const TFR_UL_MIN: f64 = 12_000.0;
/// Nominal flow-rate ratio, aqueous:ethanol.
pub const FRR: f64 = 3.0;
/// Pressure that drives the nominal flow through a clean line, mbar.
pub const AQUEOUS_PRESSURE_MBAR: f64 = 1_500.0;
pub const ETHANOL_PRESSURE_MBAR: f64 = 1_100.0;
/// Above this line pressure the device declares an occlusion, mbar.
pub const OCCLUSION_LIMIT_MBAR: f64 = 3_500.0;
/// Allowed mixing temperature, °C.
pub const TEMPERATURE_RANGE_C: (f64, f64) = (20.0, 25.0);
/// Flow sensor coefficient of variation of a healthy pump.
pub const FLOW_CV: f64 = 0.07;
/// Flow sensor coefficient of variation of a worn pump.
pub const WORN_FLOW_CV: f64 = 0.3;
/// Fraction of its setpoint a worn pump delivers.
pub const WORN_DELIVERY: f64 = 0.92;
/// Simulated days a pump takes to wear from new to [`WORN_FLOW_CV`] (with a time scale).
pub const PUMP_WEAR_DAYS: f64 = 21.0;
/// Chamber warming of a slowly drifting device per simulated week (with a time
/// scale), °C, up to [`MAX_DRIFT_C`].
pub const DRIFT_C_PER_WEEK: f64 = 0.5;
pub const MAX_DRIFT_C: f64 = 4.0;
/// Chamber warming of a slowly drifting device per run, without a time scale, °C.
const DRIFT_C_PER_RUN: f64 = 0.15;
/// A bad cartridge lot (degraded lipid) makes particles this much larger, nm...
pub const BAD_LOT_SIZE_NM: f64 = 8.0;
/// ... and encapsulates this many percentage points less.
pub const BAD_LOT_ENCAPSULATION_PCT: f64 = 6.0;
/// A flow more than this far off its setpoint on every sample for over a second
/// raises an alarm.
pub const FLOW_TOLERANCE: f64 = 0.05;
/// An FRR whose two-second mean is more than this far off its setpoint raises an alarm.
pub const FRR_TOLERANCE: f64 = 0.10;

/// Time a completed or aborted run shows before the device is idle again, seconds.
const COMPLETE_SECONDS: i64 = 2;
const ABORTED_SECONDS: i64 = 5;

/// Faults the simulator can inject (DOMAIN.md, "failure modes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// Line resistance grows during runs: pressure creeps up until an occlusion alarm.
    PartialClog,
    /// Flow dropouts with air-in-line flags.
    Bubbles,
    /// Flow CV grows from 0.07 to 0.3 and the pump delivers 8 % less: at once, or
    /// over 21 simulated days with a time scale.
    PumpWear,
    /// The ethanol line delivers 15 % less: FRR shifts.
    EthanolLineFault,
    /// Occasional flow-sensor CRC errors.
    SensorCrc,
    /// The chamber runs slowly warmer: 0.15 °C a run, or with a time scale 0.5 °C
    /// per simulated week (up to 4 °C).
    SlowDrift,
}

impl Fault {
    /// Faults that build up over weeks; the others are acute.
    pub const AGEING: [Fault; 2] = [Fault::PumpWear, Fault::SlowDrift];

    pub const ALL: [Fault; 6] = [
        Fault::PartialClog,
        Fault::Bubbles,
        Fault::PumpWear,
        Fault::EthanolLineFault,
        Fault::SensorCrc,
        Fault::SlowDrift,
    ];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum AlarmKey {
    Occlusion(FluidLine),
    AirInLine(FluidLine),
    FlowOffSetpoint(FluidLine),
    FrrDrift,
    Temperature,
    SensorCrc(FluidLine),
}

impl AlarmKey {
    fn code(self) -> (AlarmCode, AlarmPriority, FluidLine) {
        match self {
            AlarmKey::Occlusion(l) => (AlarmCode::Occlusion, AlarmPriority::High, l),
            AlarmKey::AirInLine(l) => (AlarmCode::AirInLine, AlarmPriority::High, l),
            AlarmKey::FlowOffSetpoint(l) => (AlarmCode::FlowOffSetpoint, AlarmPriority::Medium, l),
            AlarmKey::FrrDrift => (AlarmCode::FrrDrift, AlarmPriority::Medium, FluidLine::Unspecified),
            AlarmKey::Temperature => {
                (AlarmCode::TemperatureOutOfRange, AlarmPriority::Medium, FluidLine::Unspecified)
            }
            AlarmKey::SensorCrc(l) => (AlarmCode::SensorCrc, AlarmPriority::Low, l),
        }
    }
}

/// What the product saw while it was collected: the inputs of the QC model.
#[derive(Debug, Default, Clone)]
struct CollectStats {
    samples: u32,
    aqueous_sum: f64,
    aqueous_sq_sum: f64,
    ethanol_sum: f64,
    air_samples: u32,
    resistance_sum: f64,
    temperature_sum: f64,
    volume_ul: f64,
}

#[derive(Debug, Default)]
struct LineState {
    /// Multiplier on the resistance of a clean line (partial clog).
    resistance: f64,
    /// Recent (flow, setpoint) readings, one second's worth.
    recent: VecDeque<(f64, f64)>,
    air_streak: u32,
}

/// An injected fault and when the device first saw it (its first reading or run
/// start after the injection), ms.
#[derive(Debug, Clone, Copy)]
struct Injected {
    fault: Fault,
    since_ms: Option<i64>,
}

/// A simulated formulation device.
#[derive(Debug)]
pub struct SimDevice {
    info: DeviceInfo,
    rng: SmallRng,
    faults: Vec<Injected>,
    /// Simulated time per real time for the ageing of faults; `None`: every fault at
    /// full severity from the start.
    time_scale: Option<f64>,
    /// Pump wear, 0 (new) to 1 (worn), as of the last reading.
    wear: f64,
    /// Cartridge lots whose batches come out degraded.
    bad_lots: Arc<HashSet<String>>,
    phase: RunPhase,
    phase_started_ms: i64,
    phase_len_ms: i64,
    /// The run under way and the index of its current step (equal to the number of
    /// steps in the COMPLETE phase).
    plan: Option<RunPlan>,
    step: usize,
    run_id: String,
    /// Chamber temperature the controller holds.
    set_c: f64,
    collect: CollectStats,
    exchanged_ul: f64,
    /// QC results of the run that just completed, for the next reading.
    qc_ready: Vec<QcMeasurement>,
    /// Events of a run start, for the next reading.
    started_events: Vec<Event>,
    aqueous: LineState,
    ethanol: LineState,
    chamber_c: f64,
    cartridge_c: f64,
    drift_c: f64,
    active: Vec<AlarmKey>,
    started: bool,
    /// The running firmware trims the ethanol pump low (a build with the `qc` fault).
    firmware_trims_low: bool,
}

impl SimDevice {
    pub fn new(info: DeviceInfo, seed: u64) -> SimDevice {
        let mut rng = SmallRng::seed_from_u64(seed);
        let chamber_c = 22.0 + rng.random_range(-0.5..0.5);
        SimDevice {
            info,
            rng,
            faults: Vec::new(),
            time_scale: None,
            wear: 0.0,
            bad_lots: Arc::default(),
            phase: RunPhase::Idle,
            phase_started_ms: 0,
            phase_len_ms: 0,
            plan: None,
            step: 0,
            run_id: String::new(),
            set_c: 22.0,
            collect: CollectStats::default(),
            exchanged_ul: 0.0,
            qc_ready: Vec::new(),
            started_events: Vec::new(),
            aqueous: LineState { resistance: 1.0, ..Default::default() },
            ethanol: LineState { resistance: 1.0, ..Default::default() },
            chamber_c,
            cartridge_c: 21.5,
            drift_c: 0.0,
            active: Vec::new(),
            started: false,
            firmware_trims_low: false,
        }
    }

    /// Injects `fault`. With a time scale, an ageing fault starts from nothing at the
    /// device's next reading or run start.
    pub fn inject(&mut self, fault: Fault) {
        if !self.has(fault) {
            self.faults.push(Injected { fault, since_ms: None });
        }
    }

    pub fn clear_faults(&mut self) {
        self.faults.clear();
        self.wear = 0.0;
        self.aqueous.resistance = 1.0;
        self.ethanol.resistance = 1.0;
        self.drift_c = 0.0;
    }

    /// Ages pump wear and slow drift `scale` times faster than the real time between
    /// readings (2,000: a real minute is about 33 simulated hours); the timestamps of
    /// readings stay real. Pump wear then grows linearly over [`PUMP_WEAR_DAYS`]
    /// simulated days and slow drift warms the chamber by [`DRIFT_C_PER_WEEK`] per
    /// simulated week, both from the time the fault was injected. A scale that is not
    /// a positive number turns ageing off: faults at full severity from the start.
    pub fn set_time_scale(&mut self, scale: f64) {
        self.time_scale = (scale.is_finite() && scale > 0.0).then_some(scale);
    }

    /// Cartridge lots with a degraded lipid: a batch made from one comes out about
    /// [`BAD_LOT_SIZE_NM`] larger and [`BAD_LOT_ENCAPSULATION_PCT`] points less
    /// encapsulated. Shared, as a fleet's devices all know the same bad lots.
    pub fn set_bad_lots(&mut self, lots: Arc<HashSet<String>>) {
        self.bad_lots = lots;
    }

    pub fn phase(&self) -> RunPhase {
        self.phase
    }

    fn has(&self, f: Fault) -> bool {
        self.faults.iter().any(|i| i.fault == f)
    }

    /// Simulated days since `fault` was first seen (None when it is not injected or
    /// there is no time scale).
    fn simulated_days(&self, fault: Fault, now_ms: i64) -> Option<f64> {
        let scale = self.time_scale?;
        let since = self.faults.iter().find(|i| i.fault == fault)?.since_ms?;
        Some(now_ms.saturating_sub(since).max(0) as f64 * scale / 86_400_000.0)
    }

    /// Marks when injected faults are first seen and ages them to `now_ms`.
    fn age(&mut self, now_ms: i64) {
        for i in &mut self.faults {
            i.since_ms.get_or_insert(now_ms);
        }
        if self.time_scale.is_none() {
            self.wear = if self.has(Fault::PumpWear) { 1.0 } else { 0.0 };
            return;
        }
        self.wear =
            self.simulated_days(Fault::PumpWear, now_ms).map_or(0.0, |d| (d / PUMP_WEAR_DAYS).min(1.0));
        if let Some(days) = self.simulated_days(Fault::SlowDrift, now_ms) {
            self.drift_c = (DRIFT_C_PER_WEEK * days / 7.0).min(MAX_DRIFT_C);
        }
    }

    fn normal(&mut self) -> f64 {
        // Box-Muller; avoids ln(0).
        let u1: f64 = self.rng.random_range(f64::EPSILON..1.0);
        let u2: f64 = self.rng.random();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    fn enter(&mut self, phase: RunPhase, len_s: i64, now_ms: i64, events: &mut Vec<Event>) {
        self.enter_ms(phase, len_s * 1000, now_ms, events);
    }

    fn enter_ms(&mut self, phase: RunPhase, len_ms: i64, now_ms: i64, events: &mut Vec<Event>) {
        let from = self.phase;
        self.phase = phase;
        self.phase_started_ms = now_ms;
        self.phase_len_ms = len_ms;
        events.push(Event {
            time_unix_ms: now_ms,
            kind: Some(event::Kind::PhaseChange(PhaseChange {
                from: from as i32,
                to: phase as i32,
                run_id: self.run_id.clone(),
            })),
        });
    }

    /// Moves to the next phase when the current one has run its time.
    fn advance_phase(&mut self, now_ms: i64, events: &mut Vec<Event>) {
        if !self.started {
            self.started = true;
            self.enter(RunPhase::Idle, 0, now_ms, events);
            return;
        }
        if now_ms - self.phase_started_ms < self.phase_len_ms {
            return;
        }
        match self.phase {
            RunPhase::Aborted | RunPhase::Complete => self.go_idle(now_ms, events),
            RunPhase::Idle | RunPhase::Unspecified => {}
            _ => {
                let Some(plan) = &self.plan else { return };
                let next = self.step + 1;
                match plan.steps.get(next) {
                    Some(step) => {
                        let (phase, len) = (step.phase, step.duration_ms);
                        self.set_c = step.temperature_c;
                        self.step = next;
                        self.enter_ms(phase, len, now_ms, events);
                    }
                    None => {
                        self.step = next;
                        self.qc_ready = self.qc();
                        self.enter(RunPhase::Complete, COMPLETE_SECONDS, now_ms, events);
                    }
                }
            }
        }
    }

    fn go_idle(&mut self, now_ms: i64, events: &mut Vec<Event>) {
        self.plan = None;
        self.step = 0;
        self.enter(RunPhase::Idle, 0, now_ms, events);
        self.run_id.clear();
        self.set_c = 22.0;
        if self.has(Fault::SlowDrift) && self.time_scale.is_none() {
            self.drift_c += DRIFT_C_PER_RUN;
        }
        // Cleaning between runs clears a partial clog.
        self.aqueous.resistance = 1.0;
        self.ethanol.resistance = 1.0;
    }

    /// Flow setpoints of the current phase, µL/min.
    fn setpoints(&self) -> (f64, f64) {
        match &self.plan {
            Some(plan) if self.phase != RunPhase::Complete && self.phase != RunPhase::Aborted => {
                plan.steps.get(self.step).map(|s| (s.aqueous_ul_min, s.ethanol_ul_min)).unwrap_or((0.0, 0.0))
            }
            _ => (0.0, 0.0),
        }
    }

    /// QC of the collected product (DOMAIN.md): size falls with total flow and
    /// flow-rate ratio and grows with lipid concentration, temperature and a clogging
    /// mixer; flow pulsation and air raise the PDI; an FRR off its setpoint and a low
    /// N/P ratio lower encapsulation; incomplete buffer exchange leaves the pH low.
    fn qc(&mut self) -> Vec<QcMeasurement> {
        let Some(plan) = self.plan.clone() else { return Vec::new() };
        let c = self.collect.clone();
        if c.samples == 0 {
            return Vec::new();
        }
        let n = f64::from(c.samples);
        let aq = c.aqueous_sum / n;
        let et = (c.ethanol_sum / n).max(1.0);
        let tfr_ml = (aq + et) / 1000.0;
        let frr = aq / et;
        let cv = ((c.aqueous_sq_sum / n - aq * aq).max(0.0)).sqrt() / aq.max(1.0);
        let air = f64::from(c.air_samples) / n;
        let resistance = c.resistance_sum / n;
        let temperature = c.temperature_sum / n;
        let lipid = if plan.lipid_concentration_mg_ml > 0.0 { plan.lipid_concentration_mg_ml } else { 10.0 };
        // A degraded lipid assembles into larger particles that hold less payload.
        let (lot_nm, lot_pct) = if self.bad_lots.contains(&plan.cartridge_lot) {
            (BAD_LOT_SIZE_NM, BAD_LOT_ENCAPSULATION_PCT)
        } else {
            (0.0, 0.0)
        };
        let size = (80.0
            * (12.0 / tfr_ml.max(0.5)).powf(0.3)
            * (3.0 / frr.max(0.5)).powf(0.5)
            * (lipid / 10.0).powf(0.3)
            * (1.0 + 0.02 * (temperature - 22.0))
            * (1.0 + 0.25 * (resistance - 1.0))
            + lot_nm)
            * (1.0 + 0.03 * self.normal());
        let pdi = (0.08 + 0.6 * (cv - FLOW_CV).max(0.0) + 1.5 * air + 0.01 * self.normal()).max(0.02);
        let frr_error = (frr / plan.flow_rate_ratio.max(0.1) - 1.0).abs();
        let encapsulation = (95.0 - 80.0 * frr_error - 6.0 * (4.0 - plan.np_ratio).max(0.0) - lot_pct
            + 1.0 * self.normal())
        .clamp(0.0, 100.0);
        // Three exchange volumes bring the product to the storage buffer's pH.
        let exchange = (self.exchanged_ul / 1000.0 / (3.0 * plan.batch_volume_ml.max(0.1))).min(1.0);
        let ph = 7.4 - 2.5 * (1.0 - exchange) + 0.05 * self.normal();
        let yield_pct = (c.volume_ul / 1000.0 / plan.batch_volume_ml.max(0.01) * 95.0 * (1.0 - air)
            + 1.0 * self.normal())
        .clamp(0.0, 150.0);
        [
            (QualityAttribute::SizeNm, size),
            (QualityAttribute::Pdi, pdi),
            (QualityAttribute::EncapsulationPct, encapsulation),
            (QualityAttribute::Ph, ph),
            (QualityAttribute::YieldPct, yield_pct),
        ]
        .into_iter()
        .map(|(attribute, value)| QcMeasurement { attribute, value })
        .collect()
    }

    fn line(&mut self, line: FluidLine, setpoint: f64, nominal_mbar: f64, dt_ms: i64) -> LineReading {
        // A wearing pump pulsates more and delivers less (`a * (1 - t) + b * t` is exact
        // at both ends, so a new or fully worn pump gives exactly FLOW_CV or WORN_FLOW_CV).
        let wear = self.wear;
        let cv = FLOW_CV * (1.0 - wear) + WORN_FLOW_CV * wear;
        let clog = self.has(Fault::PartialClog) && line == FluidLine::Aqueous && setpoint > 0.0;
        let bubbles = self.has(Fault::Bubbles) && setpoint > 0.0;
        let crc = self.has(Fault::SensorCrc) && self.rng.random_bool(0.05);
        let ethanol_fault =
            (self.has(Fault::EthanolLineFault) || self.firmware_trims_low) && line == FluidLine::Ethanol;
        let (n1, n2) = (self.normal(), self.normal());
        let air = bubbles && self.rng.random_bool(0.04);
        let state = if line == FluidLine::Aqueous { &mut self.aqueous } else { &mut self.ethanol };
        if clog {
            // About +1.5 % resistance per second of flow.
            state.resistance *= 1.0 + 0.015 * dt_ms as f64 / 1000.0;
        }
        let delivered = if ethanol_fault { 0.85 } else { 1.0 - wear + WORN_DELIVERY * wear };
        let mut flow = if setpoint > 0.0 { setpoint * delivered * (1.0 + cv * n1) } else { 0.3 * n1 };
        if air {
            flow *= 0.1;
        }
        // The controller raises pressure to hold the flow through a higher resistance.
        let target = nominal_mbar
            * (setpoint / (TFR_UL_MIN * if line == FluidLine::Aqueous { 0.75 } else { 0.25 }))
            * state.resistance;
        let pressure = if setpoint > 0.0 { target * (1.0 + 0.01 / 3.0 * n2) } else { 20.0 + 2.0 * n2 };
        state.air_streak = if air { state.air_streak + 1 } else { 0 };
        state.recent.push_back((flow, setpoint));
        let keep = 2 * (1000 / dt_ms.max(1)).max(1) as usize + 1;
        while state.recent.len() > keep {
            state.recent.pop_front();
        }
        LineReading {
            line: line as i32,
            flow_ul_min: flow,
            flow_setpoint_ul_min: setpoint,
            pressure_mbar: pressure,
            temperature_c: self.chamber_c + self.drift_c - 0.3,
            air_in_line: air,
            high_flow: setpoint > 0.0 && flow > setpoint * 1.5,
            crc_error: crc,
        }
    }

    /// Relative offsets of the flow from its setpoint over the last `window` samples (None while the
    /// line was not flowing for all of it).
    fn offsets(state: &LineState, window: usize) -> Option<impl Iterator<Item = f64> + '_> {
        if state.recent.len() < window {
            return None;
        }
        let recent = state.recent.iter().skip(state.recent.len() - window);
        if recent.clone().any(|(_, sp)| *sp <= 0.0) {
            return None;
        }
        Some(recent.map(|(f, sp)| (f - sp) / sp))
    }

    /// Flow off setpoint by more than 5 %, on the same side, on every sample for over a
    /// second: a sustained deviation, not sensor noise.
    fn flow_off(state: &LineState, per_second: usize) -> Option<f64> {
        let offs: Vec<f64> = Self::offsets(state, per_second + 1)?.collect();
        let high = offs.iter().all(|o| *o > FLOW_TOLERANCE);
        let low = offs.iter().all(|o| *o < -FLOW_TOLERANCE);
        (high || low).then(|| offs.iter().sum::<f64>() / offs.len() as f64)
    }

    /// Mean relative flow offset over two seconds.
    fn mean_offset(state: &LineState, per_second: usize) -> Option<f64> {
        let offs: Vec<f64> = Self::offsets(state, 2 * per_second)?.collect();
        Some(offs.iter().sum::<f64>() / offs.len() as f64)
    }

    fn set_alarm(&mut self, key: AlarmKey, on: bool, detail: String, now_ms: i64, events: &mut Vec<Event>) {
        let was = self.active.contains(&key);
        if on == was {
            return;
        }
        if on {
            self.active.push(key);
        } else {
            self.active.retain(|k| *k != key);
        }
        let (code, priority, line) = key.code();
        events.push(Event {
            time_unix_ms: now_ms,
            kind: Some(event::Kind::Alarm(Alarm {
                code: code as i32,
                priority: priority as i32,
                active: on,
                detail,
                line: line as i32,
            })),
        });
    }

    fn check_alarms(&mut self, s: &Sample, now_ms: i64, dt_ms: i64, events: &mut Vec<Event>) {
        let per_second = (1000 / dt_ms.max(1)).max(1) as usize;
        let mut abort = false;
        for (i, l) in s.lines.iter().enumerate() {
            let line = FluidLine::try_from(l.line).unwrap_or(FluidLine::Unspecified);
            let name = if line == FluidLine::Aqueous { "aqueous" } else { "ethanol" };
            let occluded = l.pressure_mbar > OCCLUSION_LIMIT_MBAR;
            abort |= occluded;
            self.set_alarm(
                AlarmKey::Occlusion(line),
                occluded,
                format!(
                    "{name} pressure {:.0} mbar over limit {OCCLUSION_LIMIT_MBAR:.0} mbar",
                    l.pressure_mbar
                ),
                now_ms,
                events,
            );
            let state = if i == 0 { &self.aqueous } else { &self.ethanol };
            let air = state.air_streak >= 2;
            let offset = Self::flow_off(state, per_second);
            abort |= air;
            self.set_alarm(
                AlarmKey::AirInLine(line),
                air,
                format!("air in {name} line on 2+ consecutive samples"),
                now_ms,
                events,
            );
            let off = offset.is_some();
            self.set_alarm(
                AlarmKey::FlowOffSetpoint(line),
                off,
                format!("{name} flow {:+.1} % off setpoint over 1 s", offset.unwrap_or(0.0) * 100.0),
                now_ms,
                events,
            );
            self.set_alarm(
                AlarmKey::SensorCrc(line),
                l.crc_error,
                format!("{name} flow sensor CRC error"),
                now_ms,
                events,
            );
        }
        let frr_off = match (
            Self::mean_offset(&self.aqueous, per_second),
            Self::mean_offset(&self.ethanol, per_second),
        ) {
            (Some(a), Some(e)) => ((1.0 + a) / (1.0 + e) - 1.0).abs() > FRR_TOLERANCE,
            _ => false,
        };
        self.set_alarm(
            AlarmKey::FrrDrift,
            frr_off,
            format!("FRR more than {:.0} % off setpoint", FRR_TOLERANCE * 100.0),
            now_ms,
            events,
        );
        let t = s.chamber_temperature_c;
        let t_bad = !(TEMPERATURE_RANGE_C.0..=TEMPERATURE_RANGE_C.1).contains(&t);
        self.set_alarm(
            AlarmKey::Temperature,
            t_bad,
            format!(
                "chamber {t:.1} °C outside {:.0} to {:.0} °C",
                TEMPERATURE_RANGE_C.0, TEMPERATURE_RANGE_C.1
            ),
            now_ms,
            events,
        );
        let running = self.plan.is_some() && !matches!(self.phase, RunPhase::Complete | RunPhase::Aborted);
        if abort && running {
            self.enter(RunPhase::Aborted, ABORTED_SECONDS, now_ms, events);
        }
    }
}

impl Device for SimDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn read(&mut self, now_ms: i64, dt_ms: i64) -> Reading {
        let mut events = std::mem::take(&mut self.started_events);
        self.age(now_ms);
        self.advance_phase(now_ms, &mut events);
        let (aq_sp, et_sp) = self.setpoints();
        // Slow thermal wander of the chamber around the temperature it is set to.
        let wander = 0.02 * self.normal() + 0.05 * (self.set_c - self.chamber_c);
        self.chamber_c = (self.chamber_c + wander).clamp(self.set_c - 1.0, self.set_c + 1.0);
        let cartridge = 0.05 * self.normal();
        self.cartridge_c = (self.cartridge_c + cartridge).clamp(20.5, 22.5);
        let aqueous = self.line(FluidLine::Aqueous, aq_sp, AQUEOUS_PRESSURE_MBAR, dt_ms);
        let ethanol = self.line(FluidLine::Ethanol, et_sp, ETHANOL_PRESSURE_MBAR, dt_ms);
        let tfr = (aqueous.flow_ul_min + ethanol.flow_ul_min).max(0.0);
        let dp = 350.0 * tfr / TFR_UL_MIN * (1.0 + 0.01 * self.normal());
        let minutes = dt_ms as f64 / 60_000.0;
        match self.phase {
            RunPhase::Collect => {
                let c = &mut self.collect;
                c.samples += 1;
                c.aqueous_sum += aqueous.flow_ul_min;
                c.aqueous_sq_sum += aqueous.flow_ul_min * aqueous.flow_ul_min;
                c.ethanol_sum += ethanol.flow_ul_min;
                c.air_samples += u32::from(aqueous.air_in_line || ethanol.air_in_line);
                c.resistance_sum += self.aqueous.resistance;
                c.temperature_sum += self.chamber_c + self.drift_c;
                c.volume_ul += tfr * minutes;
            }
            RunPhase::BufferExchange => self.exchanged_ul += aqueous.flow_ul_min.max(0.0) * minutes,
            _ => {}
        }
        let sample = Sample {
            time_unix_ms: now_ms,
            phase: self.phase as i32,
            lines: vec![aqueous, ethanol],
            chamber_temperature_c: self.chamber_c + self.drift_c,
            cartridge_temperature_c: self.cartridge_c,
            mixer_pressure_drop_mbar: dp,
            door_closed: true,
            run_id: self.run_id.clone(),
        };
        self.check_alarms(&sample, now_ms, dt_ms, &mut events);
        Reading { sample, events, qc: std::mem::take(&mut self.qc_ready) }
    }

    fn busy(&self) -> bool {
        self.plan.is_some() || self.phase == RunPhase::Aborted
    }

    fn firmware_booted(&mut self, fault: &str) {
        self.firmware_trims_low = fault == "qc";
    }

    fn start_run(&mut self, plan: RunPlan, now_ms: i64) -> Result<(), String> {
        if self.busy() {
            return Err(format!("run {} is under way (phase {})", self.run_id, self.phase.as_str_name()));
        }
        let Some(first) = plan.steps.first().cloned() else {
            return Err("the run has no phases".into());
        };
        self.age(now_ms);
        self.run_id.clone_from(&plan.run_id);
        self.collect = CollectStats::default();
        self.exchanged_ul = 0.0;
        self.step = 0;
        self.set_c = first.temperature_c;
        self.plan = Some(plan);
        self.started = true;
        let mut events = Vec::new();
        self.enter_ms(first.phase, first.duration_ms, now_ms, &mut events);
        self.started_events.extend(events);
        Ok(())
    }
}

// === one batch, synchronously ===

/// The readings of one simulated batch, from its start until the device is idle again.
#[derive(Debug, Clone)]
pub struct SimulatedRun {
    pub readings: Vec<Reading>,
    /// Time of the last reading, ms: the device is idle from here.
    pub ended_ms: i64,
}

impl SimulatedRun {
    /// Whether the run reached COMPLETE (not ABORTED).
    pub fn completed(&self) -> bool {
        self.readings.iter().any(|r| r.sample.phase == RunPhase::Complete as i32)
    }

    /// The QC module's measurement of `attribute` (None when the run was aborted).
    pub fn qc(&self, attribute: QualityAttribute) -> Option<f64> {
        self.readings.iter().flat_map(|r| &r.qc).find(|m| m.attribute == attribute).map(|m| m.value)
    }

    /// Coefficient of variation of the aqueous flow over the COLLECT phase (standard
    /// deviation over mean), as the batch record reports it.
    pub fn collect_flow_cv(&self) -> Option<f64> {
        let flows: Vec<f64> = self
            .readings
            .iter()
            .filter(|r| r.sample.phase == RunPhase::Collect as i32)
            .filter_map(|r| r.sample.lines.first().map(|l| l.flow_ul_min))
            .collect();
        if flows.len() < 2 {
            return None;
        }
        let n = flows.len() as f64;
        let mean = flows.iter().sum::<f64>() / n;
        let var = flows.iter().map(|f| (f - mean).powi(2)).sum::<f64>() / n;
        (mean > 0.0).then(|| var.sqrt() / mean)
    }
}

/// Runs `plan` on an idle `device` without an agent or a clock: starts it at
/// `start_ms` and reads the device every `step_ms` until it is idle again. Times are
/// real times (ageing faults age by `time scale ×` the time between runs), so a test
/// can drive a device through weeks of simulated use in a loop:
///
/// ```
/// # use nanofleet_agent::{hal::{DeviceInfo, RunPlan}, sim::{Fault, SimDevice, simulate_run}};
/// # use nanofleet_proto::device::v1::QualityAttribute;
/// # let info = DeviceInfo { device_id: "NF-T-01".into(), site_id: "t".into(), model: "NF-200".into(), firmware_version: "1".into() };
/// # let recipe = nanofleet_recipe::example::example("flu", 1, Default::default(), 0);
/// let mut device = SimDevice::new(info, 7);
/// device.set_time_scale(2_000.0);
/// device.inject(Fault::PumpWear);
/// let mut start_ms = 1_700_000_000_000;
/// for n in 0..3 {
///     let plan = RunPlan::from_recipe(&format!("R{n}"), &recipe);
///     let run = simulate_run(&mut device, plan, start_ms, 100).expect("idle device");
///     let (pdi, cv) = (run.qc(QualityAttribute::Pdi), run.collect_flow_cv());
///     assert!(pdi.is_some() && cv.is_some(), "a worn pump still completes its runs");
///     start_ms = run.ended_ms + 3_600_000;
/// }
/// ```
///
/// Refused (with the device's reason) while a run is under way, or when `step_ms` is
/// not positive.
pub fn simulate_run(
    device: &mut SimDevice,
    plan: RunPlan,
    start_ms: i64,
    step_ms: i64,
) -> Result<SimulatedRun, String> {
    if step_ms <= 0 {
        return Err(format!("step_ms {step_ms}: must be at least 1"));
    }
    // Every phase, the end state and a second of slack: a bound, not a timeout a
    // healthy run could meet.
    let run_ms: i64 = plan.steps.iter().map(|s| s.duration_ms.max(0)).sum();
    let max_reads = (run_ms + (COMPLETE_SECONDS + ABORTED_SECONDS + 1) * 1000) / step_ms + 2;
    device.start_run(plan, start_ms)?;
    let mut readings = Vec::new();
    let mut now = start_ms;
    for _ in 0..max_reads {
        now += step_ms;
        readings.push(device.read(now, step_ms));
        if !device.busy() {
            break;
        }
    }
    Ok(SimulatedRun { readings, ended_ms: now })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> SimDevice {
        let info = DeviceInfo {
            device_id: "NF-T-01".into(),
            site_id: "test".into(),
            model: "NF-200".into(),
            firmware_version: "1.0.0".into(),
        };
        SimDevice::new(info, 7)
    }

    fn plan() -> RunPlan {
        let recipe = nanofleet_recipe::example::example("flu", 1, Default::default(), 1_700_000_000_000);
        RunPlan::from_recipe("NF-T-01-R00001", &recipe)
    }

    /// Starts the example recipe and reads the device for `secs` at 10 Hz.
    fn run(d: &mut SimDevice, secs: i64) -> Vec<Reading> {
        d.read(0, 100);
        d.start_run(plan(), 100).expect("idle device starts");
        (1..secs * 10).map(|i| d.read(100 + i * 100, 100)).collect()
    }

    fn alarms(readings: &[Reading]) -> Vec<AlarmCode> {
        readings
            .iter()
            .flat_map(|r| &r.events)
            .filter_map(|e| match &e.kind {
                Some(event::Kind::Alarm(a)) if a.active => AlarmCode::try_from(a.code).ok(),
                _ => None,
            })
            .collect()
    }

    fn qc(readings: &[Reading], attribute: QualityAttribute) -> Option<f64> {
        readings.iter().flat_map(|r| &r.qc).find(|m| m.attribute == attribute).map(|m| m.value)
    }

    #[test]
    fn an_idle_device_does_not_run_by_itself() {
        let mut d = device();
        let readings: Vec<Reading> = (0..600).map(|i| d.read(i * 100, 100)).collect();
        assert!(readings.iter().all(|r| r.sample.phase == RunPhase::Idle as i32));
        assert!(!d.busy());
    }

    #[test]
    fn a_healthy_device_runs_every_phase_of_the_recipe_and_meets_its_release_criteria() {
        let mut d = device();
        let readings = run(&mut d, 300);
        let phases: std::collections::HashSet<i32> = readings.iter().map(|r| r.sample.phase).collect();
        for step in plan().steps {
            assert!(phases.contains(&(step.phase as i32)), "phase {:?} never reached", step.phase);
        }
        assert!(phases.contains(&(RunPhase::Complete as i32)));
        assert!(!d.busy(), "idle again after the run");
        let collect: Vec<&Sample> =
            readings.iter().map(|r| &r.sample).filter(|s| s.phase == RunPhase::Collect as i32).collect();
        assert!(collect.len() >= 90, "10 s of collection at 10 Hz: {}", collect.len());
        let mean =
            |f: &dyn Fn(&Sample) -> f64| collect.iter().map(|s| f(s)).sum::<f64>() / collect.len() as f64;
        let aq = mean(&|s| s.lines[0].flow_ul_min);
        let et = mean(&|s| s.lines[1].flow_ul_min);
        assert!((aq - 9_000.0).abs() < 250.0, "aqueous mean {aq}");
        assert!((et - 3_000.0).abs() < 100.0, "ethanol mean {et}");
        let p = mean(&|s| s.lines[0].pressure_mbar);
        assert!((p - AQUEOUS_PRESSURE_MBAR).abs() < 15.0, "pressure within ±1 %: {p}");
        assert_eq!(alarms(&readings), vec![], "a healthy device raises no alarm");
        let size = qc(&readings, QualityAttribute::SizeNm).expect("size measured");
        assert!((60.0..=100.0).contains(&size), "size {size}");
        let pdi = qc(&readings, QualityAttribute::Pdi).expect("pdi");
        assert!(pdi < 0.2, "pdi {pdi}");
        let ee = qc(&readings, QualityAttribute::EncapsulationPct).expect("encapsulation");
        assert!(ee > 85.0, "encapsulation {ee}");
        let ph = qc(&readings, QualityAttribute::Ph).expect("ph");
        assert!((6.9..=7.9).contains(&ph), "pH {ph}");
    }

    #[test]
    fn a_second_run_is_refused_while_one_is_under_way() {
        let mut d = device();
        run(&mut d, 5);
        let e = d.start_run(plan(), 6_000).expect_err("busy");
        assert!(e.contains("under way"), "{e}");
    }

    #[test]
    fn a_partial_clog_raises_pressure_until_occlusion_aborts_the_run() {
        let mut d = device();
        d.inject(Fault::PartialClog);
        let readings = run(&mut d, 300);
        assert!(alarms(&readings).contains(&AlarmCode::Occlusion));
        assert!(readings.iter().any(|r| r.sample.phase == RunPhase::Aborted as i32));
        assert!(!d.busy(), "idle again after the abort");
    }

    #[test]
    fn bubbles_raise_air_in_line_and_pump_wear_widens_the_size_distribution() {
        let mut d = device();
        d.inject(Fault::Bubbles);
        assert!(alarms(&run(&mut d, 300)).contains(&AlarmCode::AirInLine));
        let mut d = device();
        d.inject(Fault::PumpWear);
        let readings = run(&mut d, 300);
        let pdi = qc(&readings, QualityAttribute::Pdi).expect("the run completes");
        assert!(pdi > 0.2, "a pulsating pump fails the PDI criterion: {pdi}");
    }

    #[test]
    fn an_ethanol_line_fault_shifts_frr_and_lowers_encapsulation() {
        let mut d = device();
        d.inject(Fault::EthanolLineFault);
        let readings = run(&mut d, 300);
        assert!(alarms(&readings).contains(&AlarmCode::FrrDrift));
        let ee = qc(&readings, QualityAttribute::EncapsulationPct).expect("the run completes");
        assert!(ee < 85.0, "encapsulation {ee}");
    }

    /// Runs `plan` every `every_ms` of real time, `n` times; per run (PDI, COLLECT flow CV).
    fn runs(d: &mut SimDevice, n: usize, every_ms: i64, plan: impl Fn(usize) -> RunPlan) -> Vec<(f64, f64)> {
        (0..n)
            .map(|i| {
                let start = 1_700_000_000_000 + i as i64 * every_ms;
                let r = simulate_run(d, plan(i), start, 100).expect("idle between runs");
                assert!(r.completed(), "run {i} completes");
                (r.qc(QualityAttribute::Pdi).expect("pdi"), r.collect_flow_cv().expect("flow cv"))
            })
            .collect()
    }

    fn mean(xs: impl Iterator<Item = f64>) -> f64 {
        let (sum, n) = xs.fold((0.0, 0.0), |(s, n), x| (s + x, n + 1.0));
        sum / n
    }

    #[test]
    fn with_a_time_scale_pump_wear_grows_over_simulated_weeks_until_pdi_fails() {
        let mut d = device();
        // A run every 3 real minutes at x500 is 25 simulated hours: worn out after about
        // 20 runs.
        d.set_time_scale(500.0);
        d.inject(Fault::PumpWear);
        let per_run = runs(&mut d, 28, 180_000, |_| plan());
        let pdi: Vec<f64> = per_run.iter().map(|r| r.0).collect();
        let cv: Vec<f64> = per_run.iter().map(|r| r.1).collect();
        assert!(pdi[0] < 0.2 && cv[0] < 0.1, "a new pump passes: pdi {} cv {}", pdi[0], cv[0]);
        let (first, last) = (mean(pdi[..5].iter().copied()), mean(pdi[pdi.len() - 5..].iter().copied()));
        assert!(last - first > 0.08, "pdi grows: first 5 {first:.3}, last 5 {last:.3} ({pdi:.3?})");
        assert!(last > 0.2, "a worn pump fails the PDI criterion: {pdi:.3?}");
        let (cv_first, cv_last) = (mean(cv[..5].iter().copied()), mean(cv[cv.len() - 5..].iter().copied()));
        assert!(cv_first < 0.12 && (0.27..0.33).contains(&cv_last), "flow cv {cv_first:.3} -> {cv_last:.3}");
    }

    #[test]
    fn with_a_time_scale_a_fault_injected_later_starts_new() {
        let mut d = device();
        d.set_time_scale(500.0);
        runs(&mut d, 3, 3_600_000, |_| plan());
        d.inject(Fault::PumpWear);
        let (pdi, cv) = runs(&mut d, 1, 0, |_| plan())[0];
        assert!(pdi < 0.2 && cv < 0.1, "the wear counts from the injection: pdi {pdi} cv {cv}");
    }

    #[test]
    fn with_a_time_scale_slow_drift_warms_half_a_degree_per_simulated_week_up_to_four() {
        let mut d = device();
        d.set_time_scale(1_000.0);
        d.inject(Fault::SlowDrift);
        let week_ms = 7 * 86_400_000 / 1_000;
        d.read(0, 100);
        assert_eq!(d.drift_c, 0.0);
        d.read(week_ms, 100);
        assert!((d.drift_c - 0.5).abs() < 1e-9, "one week: {}", d.drift_c);
        d.read(3 * week_ms, 100);
        assert!((d.drift_c - 1.5).abs() < 1e-9, "three weeks: {}", d.drift_c);
        let capped = d.read(20 * week_ms, 100);
        assert_eq!(d.drift_c, MAX_DRIFT_C, "capped");
        // Runs do not add to a time-scaled drift.
        let mut r = simulate_run(&mut d, plan(), 20 * week_ms, 100).expect("idle");
        assert_eq!(d.drift_c, MAX_DRIFT_C);
        let chamber = mean(r.readings.iter().map(|r| r.sample.chamber_temperature_c));
        assert!(chamber > 25.0, "22 °C set, 4 °C of drift: {chamber:.1} °C");
        r.readings.insert(0, capped);
        assert!(
            alarms(&r.readings).contains(&AlarmCode::TemperatureOutOfRange),
            "{chamber:.1} °C is out of range"
        );
    }

    #[test]
    fn without_a_time_scale_slow_drift_warms_the_chamber_run_after_run() {
        let mut d = device();
        d.inject(Fault::SlowDrift);
        runs(&mut d, 3, 3_600_000, |_| plan());
        assert!((d.drift_c - 3.0 * 0.15).abs() < 1e-9, "{}", d.drift_c);
    }

    #[test]
    fn a_bad_cartridge_lot_makes_larger_particles_with_less_payload() {
        let mut d = device();
        d.set_bad_lots(Arc::new(HashSet::from(["L2611-X".to_owned()])));
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        for i in 0..20 {
            let lot = if i % 2 == 0 { "L2611-A" } else { "L2611-X" };
            let start = 1_700_000_000_000 + i * 600_000;
            let r = simulate_run(&mut d, plan().with_cartridge_lot(lot), start, 100).expect("idle");
            let size = r.qc(QualityAttribute::SizeNm).expect("size");
            let ee = r.qc(QualityAttribute::EncapsulationPct).expect("encapsulation");
            if i % 2 == 0 { good.push((size, ee)) } else { bad.push((size, ee)) }
        }
        let size = |v: &[(f64, f64)]| mean(v.iter().map(|x| x.0));
        let ee = |v: &[(f64, f64)]| mean(v.iter().map(|x| x.1));
        let (ds, de) = (size(&bad) - size(&good), ee(&bad) - ee(&good));
        assert!((5.0..11.0).contains(&ds), "size +{ds:.1} nm");
        assert!((-8.0..-4.0).contains(&de), "encapsulation {de:+.1} points");
    }

    #[test]
    fn simulate_run_refuses_a_busy_device_and_a_zero_step() {
        let mut d = device();
        assert!(simulate_run(&mut d, plan(), 0, 0).expect_err("zero step").contains("step_ms"));
        d.start_run(plan(), 0).expect("idle");
        assert!(simulate_run(&mut d, plan(), 100, 100).expect_err("busy").contains("under way"));
    }
}
