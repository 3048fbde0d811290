//! The device hardware-abstraction layer: what the agent needs from a formulation
//! device. The simulated device in [`crate::sim`] implements it; a real device's
//! driver would too.

use nanofleet_proto::device::v1::{Event, QualityAttribute, Recipe, RunPhase, Sample};

/// Fixed facts about a device, reported at birth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub device_id: String,
    pub site_id: String,
    pub model: String,
    pub firmware_version: String,
}

/// One reading of the device, and what happened since the last one.
#[derive(Debug, Clone, Default)]
pub struct Reading {
    pub sample: Sample,
    pub events: Vec<Event>,
    /// QC measurements of the batch, when the QC_SAMPLE phase ends.
    pub qc: Vec<QcMeasurement>,
}

/// One measurement of the product by the device's QC module.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QcMeasurement {
    pub attribute: QualityAttribute,
    pub value: f64,
}

/// One phase of a run as the device executes it.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanStep {
    pub phase: RunPhase,
    pub duration_ms: i64,
    /// Flow setpoints of the two lines, µL/min.
    pub aqueous_ul_min: f64,
    pub ethanol_ul_min: f64,
    pub temperature_c: f64,
}

/// What a run asks of the hardware: the recipe's procedure turned into setpoints,
/// and the formula facts that decide the product's quality.
#[derive(Debug, Clone, PartialEq)]
pub struct RunPlan {
    pub run_id: String,
    pub steps: Vec<PlanStep>,
    pub flow_rate_ratio: f64,
    pub total_flow_ml_min: f64,
    pub lipid_concentration_mg_ml: f64,
    pub np_ratio: f64,
    pub batch_volume_ml: f64,
    pub temperature_c: f64,
    /// Lot of the cartridge loaded for the run (its lipids go into the product);
    /// empty when unknown.
    pub cartridge_lot: String,
}

impl RunPlan {
    /// The plan of `recipe`: each procedure step at its total flow, split between the
    /// aqueous and ethanol lines by the formula's flow-rate ratio. Buffer exchange
    /// moves buffer only (aqueous line); a step without a temperature keeps the
    /// formula's.
    pub fn from_recipe(run_id: &str, recipe: &Recipe) -> RunPlan {
        let f = recipe.formula.unwrap_or_default();
        let frr = if f.flow_rate_ratio > 0.0 { f.flow_rate_ratio } else { 3.0 };
        let steps = recipe
            .procedure
            .iter()
            .map(|s| {
                let phase = RunPhase::try_from(s.phase).unwrap_or(RunPhase::Unspecified);
                let total_ul = s.total_flow_ml_min.max(0.0) * 1000.0;
                let (aqueous, ethanol) = if phase == RunPhase::BufferExchange {
                    (total_ul, 0.0)
                } else {
                    (total_ul * frr / (frr + 1.0), total_ul / (frr + 1.0))
                };
                PlanStep {
                    phase,
                    duration_ms: i64::from(s.duration_s) * 1000,
                    aqueous_ul_min: aqueous,
                    ethanol_ul_min: ethanol,
                    temperature_c: if s.temperature_c > 0.0 { s.temperature_c } else { f.temperature_c },
                }
            })
            .collect();
        RunPlan {
            run_id: run_id.to_owned(),
            steps,
            flow_rate_ratio: frr,
            total_flow_ml_min: f.total_flow_ml_min,
            lipid_concentration_mg_ml: f.lipid_concentration_mg_ml,
            np_ratio: f.np_ratio,
            batch_volume_ml: f.batch_volume_ml,
            temperature_c: f.temperature_c,
            cartridge_lot: String::new(),
        }
    }

    /// The plan with the lot of the cartridge loaded for it.
    pub fn with_cartridge_lot(mut self, lot: &str) -> RunPlan {
        lot.clone_into(&mut self.cartridge_lot);
        self
    }
}

/// A formulation device as the agent sees it. Time is passed in: the agent owns the
/// clock, so the same device logic runs in real time or simulated time.
pub trait Device: Send {
    fn info(&self) -> &DeviceInfo;
    /// Reads every sensor at `now_ms`, `dt_ms` after the previous reading.
    fn read(&mut self, now_ms: i64, dt_ms: i64) -> Reading;
    /// Whether a run is under way (from its first phase until the device is idle again).
    fn busy(&self) -> bool;
    /// Starts executing `plan` at `now_ms`; refused while a run is under way.
    fn start_run(&mut self, plan: RunPlan, now_ms: i64) -> Result<(), String>;
    /// The firmware the device booted, by the fault built into it (simulated images
    /// only, see [`crate::slots::ImageHeader::fault`]); real hardware ignores it.
    fn firmware_booted(&mut self, _fault: &str) {}
}
