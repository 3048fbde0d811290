//! A valid mRNA-LNP recipe with typical published values (Spikevax lipid ratios), for
//! the device simulator, tests and people writing their first recipe.

use nanofleet_proto::device::v1::{
    BufferKind, EquipmentRequirements, Formula, LipidRatios, PayloadKind, ProcedureStep, Range, Recipe,
    ReleaseCriteria, RunPhase, Targets,
};

pub use crate::validate::gtin_check_digit;

/// GTIN-14 of the example cartridge: GS1's example company prefix 0614141 with
/// packaging indicator 1, item 00001, check digit 9.
pub const EXAMPLE_GTIN: &str = "10614141000019";

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;

/// A procedure step at the formula's temperature.
pub fn step(phase: RunPhase, duration_s: u32, total_flow_ml_min: f64) -> ProcedureStep {
    ProcedureStep { phase: phase as i32, duration_s, total_flow_ml_min, temperature_c: 0.0 }
}

/// A valid recipe `recipe_id` version `version` for `targets`, valid from an hour before
/// `now_unix_ms` for a year.
pub fn example(recipe_id: &str, version: u32, targets: Targets, now_unix_ms: i64) -> Recipe {
    Recipe {
        recipe_id: recipe_id.to_owned(),
        version,
        name: "mRNA-LNP 100 ug (example)".into(),
        payload: PayloadKind::Mrna as i32,
        cartridge_gtin: EXAMPLE_GTIN.into(),
        formula: Some(Formula {
            lipids: Some(LipidRatios {
                ionizable: 50.0,
                phospholipid: 10.0,
                cholesterol: 38.5,
                peg_lipid: 1.5,
            }),
            np_ratio: 6.0,
            flow_rate_ratio: 3.0,
            total_flow_ml_min: 12.0,
            lipid_concentration_mg_ml: 10.0,
            buffer: BufferKind::Citrate as i32,
            buffer_mm: 50.0,
            buffer_ph: 4.0,
            dose_ug: 100.0,
            batch_volume_ml: 2.0,
            temperature_c: 22.0,
        }),
        equipment: Some(EquipmentRequirements {
            models: vec!["NF-200".into()],
            min_firmware: "2.0.0".into(),
        }),
        // COLLECT at 12 mL/min for 10 s gives the 2 mL batch; buffer exchange moves
        // three batch volumes (6 mL). About two minutes in all.
        procedure: vec![
            step(RunPhase::SelfTest, 5, 0.0),
            step(RunPhase::CartridgeVerify, 3, 0.0),
            step(RunPhase::Prime, 10, 2.0),
            step(RunPhase::Equilibrate, 10, 0.0),
            step(RunPhase::StartWaste, 5, 12.0),
            step(RunPhase::Collect, 10, 12.0),
            step(RunPhase::EndWaste, 5, 12.0),
            step(RunPhase::BufferExchange, 45, 8.0),
            step(RunPhase::Flush, 10, 6.0),
            step(RunPhase::QcSample, 15, 0.0),
        ],
        release_criteria: Some(ReleaseCriteria {
            size_nm: Some(Range { min: 60.0, max: 100.0 }),
            pdi_max: 0.2,
            encapsulation_min_pct: 85.0,
            ph: Some(Range { min: 6.9, max: 7.9 }),
        }),
        valid_from_unix_ms: now_unix_ms.saturating_sub(HOUR_MS),
        valid_until_unix_ms: now_unix_ms.saturating_add(365 * DAY_MS),
        targets: Some(targets),
        description: "Example: mRNA in 50 mM citrate pH 4, ionizable:DSPC:cholesterol:PEG-lipid \
                      50:10:38.5:1.5, N/P 6, FRR 3:1, 12 mL/min."
            .into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_gtin_carries_its_check_digit() {
        let (head, last) = EXAMPLE_GTIN.split_at(13);
        assert_eq!(gtin_check_digit(head).map(|d| d.to_string()), Some(last.to_owned()));
    }
}
