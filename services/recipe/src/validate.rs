//! Checks a recipe against the product's formulation limits (DOMAIN.md "Recipe
//! parameters" and "Quality attributes"), whatever device will run it. Every problem is
//! reported, not only the first, so an author fixes a draft in one pass.

use std::fmt;

use nanofleet_proto::device::v1::{
    BufferKind, EquipmentRequirements, Formula, LipidRatios, PayloadKind, ProcedureStep, Range, Recipe,
    ReleaseCriteria, RunPhase, Targets,
};
use nanofleet_proto::topics::validate_device_id;

/// One field that breaks a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field as the proto names it, e.g. `formula.lipids.ionizable` or
    /// `procedure[2].duration_s`.
    pub field: String,
    /// The value found, as people read it.
    pub value: String,
    /// What the rule allows.
    pub allowed: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} = {} is out of range, allowed: {}", self.field, self.value, self.allowed)
    }
}

/// Every problem found in a recipe.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Invalid {
    pub problems: Vec<FieldError>,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl Invalid {
    /// The problem reported for `field`, if any.
    pub fn problem(&self, field: &str) -> Option<&FieldError> {
        self.problems.iter().find(|p| p.field == field)
    }
}

// === limits ===

/// Tolerance on the sum of the lipid molar ratios, mol %.
pub const LIPID_SUM_TOLERANCE: f64 = 0.01;
/// How closely the COLLECT step's flow must match the formula's total flow rate, mL/min.
pub const COLLECT_FLOW_TOLERANCE: f64 = 1e-9;
pub const MAX_RECIPE_ID_LEN: usize = 64;
pub const MAX_NAME_LEN: usize = 120;
pub const NP_RATIO: (f64, f64) = (3.0, 10.0);
pub const FLOW_RATE_RATIO: (f64, f64) = (1.0, 5.0);
pub const TOTAL_FLOW_ML_MIN: (f64, f64) = (1.0, 20.0);
pub const LIPID_CONCENTRATION_MG_ML: (f64, f64) = (1.0, 40.0);
pub const BUFFER_MM: (f64, f64) = (10.0, 100.0);
pub const BUFFER_PH: (f64, f64) = (3.0, 6.0);
pub const MAX_DOSE_UG: f64 = 10_000.0;
pub const BATCH_VOLUME_ML: (f64, f64) = (0.1, 50.0);
pub const TEMPERATURE_C: (f64, f64) = (20.0, 25.0);
pub const STEP_DURATION_S: (u32, u32) = (1, 7200);
pub const STEP_FLOW_ML_MIN: (f64, f64) = (0.0, 20.0);
pub const STEP_TEMPERATURE_C: (f64, f64) = (4.0, 40.0);
pub const SIZE_NM: (f64, f64) = (20.0, 300.0);
pub const MAX_PDI: f64 = 0.5;
pub const ENCAPSULATION_MIN_PCT: (f64, f64) = (50.0, 100.0);
pub const FINAL_PH: (f64, f64) = (5.5, 8.5);

/// Checks `r`; on failure lists every field that breaks a rule.
pub fn validate(r: &Recipe) -> Result<(), Invalid> {
    let mut c = Checker::default();
    let Recipe {
        recipe_id,
        version,
        name,
        payload,
        cartridge_gtin,
        formula,
        equipment,
        procedure,
        release_criteria,
        valid_from_unix_ms,
        valid_until_unix_ms,
        targets,
        description: _,
    } = r;

    c.recipe_id(recipe_id);
    if *version < 1 {
        c.push("version", version, "1 or more");
    }
    c.name(name);
    if !matches!(
        PayloadKind::try_from(*payload),
        Ok(PayloadKind::Mrna | PayloadKind::Sirna | PayloadKind::Sarna | PayloadKind::Dna)
    ) {
        c.push(
            "payload",
            enum_name(PayloadKind::try_from(*payload).map(|p| p.as_str_name()), *payload),
            "mRNA, siRNA, saRNA or DNA",
        );
    }
    if !gtin_ok(cartridge_gtin) {
        c.push(
            "cartridge_gtin",
            format!("{cartridge_gtin:?}"),
            "a GTIN-14: 14 digits ending in a valid GS1 check digit",
        );
    }
    match formula {
        Some(f) => c.formula(f),
        None => c.missing("formula"),
    }
    match equipment {
        Some(e) => c.equipment(e),
        None => c.missing("equipment"),
    }
    c.procedure(procedure, formula.as_ref().map(|f| f.total_flow_ml_min));
    match release_criteria {
        Some(rc) => c.release_criteria(rc),
        None => c.missing("release_criteria"),
    }
    if *valid_from_unix_ms <= 0 {
        c.push("valid_from_unix_ms", valid_from_unix_ms, "after 0 (ms since the Unix epoch)");
    }
    if valid_until_unix_ms <= valid_from_unix_ms {
        c.push(
            "valid_until_unix_ms",
            valid_until_unix_ms,
            format!("after valid_from_unix_ms ({valid_from_unix_ms})"),
        );
    }
    match targets {
        Some(t) => c.targets(t),
        None => c.missing("targets"),
    }

    if c.problems.is_empty() { Ok(()) } else { Err(Invalid { problems: c.problems }) }
}

/// The GS1 mod-10 check digit of the first 13 digits of a GTIN-14; `None` unless
/// `first13` is exactly 13 ASCII digits.
pub fn gtin_check_digit(first13: &str) -> Option<u8> {
    if first13.len() != 13 || !first13.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Weights alternate 3, 1, ... starting from the digit next to the check digit.
    let sum: u32 = first13
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| u32::from(b - b'0') * if i % 2 == 0 { 3 } else { 1 })
        .sum();
    u8::try_from((10 - sum % 10) % 10).ok()
}

fn gtin_ok(gtin: &str) -> bool {
    match (gtin.get(..13), gtin.get(13..)) {
        (Some(head), Some(last)) if last.len() == 1 => {
            gtin_check_digit(head).is_some_and(|d| last.as_bytes().first() == Some(&(b'0' + d)))
        }
        _ => false,
    }
}

/// Parses a semantic version `MAJOR.MINOR.PATCH` (numbers without leading zeros, no
/// pre-release or build suffix).
pub fn semver(text: &str) -> Option<[u64; 3]> {
    let mut parts = text.split('.');
    let mut out = [0u64; 3];
    for slot in &mut out {
        let p = parts.next()?;
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || (p.len() > 1 && p.starts_with('0')) {
            return None;
        }
        *slot = p.parse().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(out)
}

/// The phases a procedure may contain, in the order they run.
pub const PROCEDURE_PHASES: std::ops::RangeInclusive<RunPhase> = RunPhase::SelfTest..=RunPhase::QcSample;

/// A phase as people read it: `COLLECT` for `RUN_PHASE_COLLECT`.
pub fn phase_name(phase: RunPhase) -> &'static str {
    let name = phase.as_str_name();
    name.strip_prefix("RUN_PHASE_").unwrap_or(name)
}

fn enum_name(known: Result<&'static str, impl Sized>, raw: i32) -> String {
    known.map_or_else(|_| raw.to_string(), str::to_owned)
}

// === impl Checker ===

#[derive(Default)]
struct Checker {
    problems: Vec<FieldError>,
}

impl Checker {
    fn push(&mut self, field: impl Into<String>, value: impl fmt::Display, allowed: impl Into<String>) {
        self.problems.push(FieldError {
            field: field.into(),
            value: value.to_string(),
            allowed: allowed.into(),
        });
    }

    fn missing(&mut self, field: &str) {
        self.push(field, "missing", format!("a {field} message"));
    }

    /// `lo <= value <= hi`, finite.
    fn range(&mut self, field: impl Into<String>, value: f64, (lo, hi): (f64, f64), unit: &str) {
        if !(value.is_finite() && (lo..=hi).contains(&value)) {
            self.push(field, value, with_unit(format!("{lo} to {hi}"), unit));
        }
    }

    /// `0 < value <= hi`, finite.
    fn positive_up_to(&mut self, field: impl Into<String>, value: f64, hi: f64, unit: &str) {
        if !(value.is_finite() && value > 0.0 && value <= hi) {
            self.push(field, value, with_unit(format!("more than 0 and at most {hi}"), unit));
        }
    }

    fn recipe_id(&mut self, id: &str) {
        let charset = id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        let first = id.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if id.is_empty() || id.len() > MAX_RECIPE_ID_LEN || !charset || !first {
            self.push(
                "recipe_id",
                format!("{id:?}"),
                format!(
                    "1 to {MAX_RECIPE_ID_LEN} characters of a-z, 0-9 and '-', starting with a letter or digit"
                ),
            );
        }
    }

    fn name(&mut self, name: &str) {
        let len = name.chars().count();
        // The name is shown on the device's screen and in printed batch records.
        if !(1..=MAX_NAME_LEN).contains(&len) || name.chars().any(char::is_control) {
            self.push(
                "name",
                format!("{name:?}"),
                format!("1 to {MAX_NAME_LEN} characters, no control characters"),
            );
        }
    }

    fn formula(&mut self, f: &Formula) {
        let Formula {
            lipids,
            np_ratio,
            flow_rate_ratio,
            total_flow_ml_min,
            lipid_concentration_mg_ml,
            buffer,
            buffer_mm,
            buffer_ph,
            dose_ug,
            batch_volume_ml,
            temperature_c,
        } = f;
        match lipids {
            Some(l) => self.lipids(l),
            None => self.missing("formula.lipids"),
        }
        self.range("formula.np_ratio", *np_ratio, NP_RATIO, "");
        self.range("formula.flow_rate_ratio", *flow_rate_ratio, FLOW_RATE_RATIO, "(aqueous:ethanol)");
        self.range("formula.total_flow_ml_min", *total_flow_ml_min, TOTAL_FLOW_ML_MIN, "mL/min");
        self.range(
            "formula.lipid_concentration_mg_ml",
            *lipid_concentration_mg_ml,
            LIPID_CONCENTRATION_MG_ML,
            "mg/mL",
        );
        if !matches!(BufferKind::try_from(*buffer), Ok(BufferKind::Citrate | BufferKind::Acetate)) {
            self.push(
                "formula.buffer",
                enum_name(BufferKind::try_from(*buffer).map(|b| b.as_str_name()), *buffer),
                "citrate or acetate",
            );
        }
        self.range("formula.buffer_mm", *buffer_mm, BUFFER_MM, "mM");
        self.range("formula.buffer_ph", *buffer_ph, BUFFER_PH, "");
        self.positive_up_to("formula.dose_ug", *dose_ug, MAX_DOSE_UG, "µg");
        self.range("formula.batch_volume_ml", *batch_volume_ml, BATCH_VOLUME_ML, "mL");
        self.range("formula.temperature_c", *temperature_c, TEMPERATURE_C, "°C");
    }

    fn lipids(&mut self, l: &LipidRatios) {
        let LipidRatios { ionizable, phospholipid, cholesterol, peg_lipid } = *l;
        let all = [
            ("ionizable", ionizable),
            ("phospholipid", phospholipid),
            ("cholesterol", cholesterol),
            ("peg_lipid", peg_lipid),
        ];
        for (name, v) in all {
            self.positive_up_to(format!("formula.lipids.{name}"), v, 100.0, "mol %");
        }
        if all.iter().all(|(_, v)| v.is_finite()) {
            let sum: f64 = all.iter().map(|(_, v)| v).sum();
            if (sum - 100.0).abs() > LIPID_SUM_TOLERANCE {
                self.push(
                    "formula.lipids",
                    format!("a sum of {sum} mol %"),
                    format!("molar ratios summing to 100 mol % (±{LIPID_SUM_TOLERANCE})"),
                );
            }
        }
    }

    fn equipment(&mut self, e: &EquipmentRequirements) {
        let EquipmentRequirements { models, min_firmware } = e;
        if models.is_empty() {
            self.push("equipment.models", "[]", "at least one device model");
        }
        for (i, m) in models.iter().enumerate() {
            if m.trim().is_empty() {
                self.push(
                    format!("equipment.models[{i}]"),
                    format!("{m:?}"),
                    "a device model, e.g. \"NF-200\"",
                );
            }
        }
        if semver(min_firmware).is_none() {
            self.push(
                "equipment.min_firmware",
                format!("{min_firmware:?}"),
                "a semantic version MAJOR.MINOR.PATCH, e.g. \"2.0.0\"",
            );
        }
    }

    fn procedure(&mut self, steps: &[ProcedureStep], formula_flow: Option<f64>) {
        if steps.is_empty() {
            self.push("procedure", "[]", "at least one step, including COLLECT");
            return;
        }
        let mut previous: Option<RunPhase> = None;
        let mut collects = false;
        for (i, s) in steps.iter().enumerate() {
            let ProcedureStep { phase, duration_s, total_flow_ml_min, temperature_c } = *s;
            let field = |name: &str| format!("procedure[{i}].{name}");
            let known = RunPhase::try_from(phase).ok().filter(|p| PROCEDURE_PHASES.contains(p));
            match known {
                None => self.push(
                    field("phase"),
                    enum_name(RunPhase::try_from(phase).map(phase_name), phase),
                    "SELF_TEST, CARTRIDGE_VERIFY, PRIME, EQUILIBRATE, START_WASTE, COLLECT, END_WASTE, \
                     BUFFER_EXCHANGE, FLUSH or QC_SAMPLE",
                ),
                Some(p) => {
                    if let Some(prev) = previous.filter(|prev| p < *prev) {
                        self.push(
                            field("phase"),
                            phase_name(p),
                            format!("{} or a later phase (phases run in order)", phase_name(prev)),
                        );
                    }
                    previous = Some(previous.map_or(p, |prev| prev.max(p)));
                    collects |= p == RunPhase::Collect;
                }
            }
            if !(STEP_DURATION_S.0..=STEP_DURATION_S.1).contains(&duration_s) {
                self.push(
                    field("duration_s"),
                    duration_s,
                    format!("{} to {} s", STEP_DURATION_S.0, STEP_DURATION_S.1),
                );
            }
            self.range(field("total_flow_ml_min"), total_flow_ml_min, STEP_FLOW_ML_MIN, "mL/min");
            if known == Some(RunPhase::Collect)
                && total_flow_ml_min != 0.0
                && let Some(tfr) = formula_flow.filter(|f| f.is_finite())
                && (total_flow_ml_min - tfr).abs() > COLLECT_FLOW_TOLERANCE
            {
                self.push(
                    field("total_flow_ml_min"),
                    total_flow_ml_min,
                    format!("the formula's total flow rate ({tfr} mL/min), or 0 to use it"),
                );
            }
            if !(temperature_c == 0.0
                || (temperature_c.is_finite()
                    && (STEP_TEMPERATURE_C.0..=STEP_TEMPERATURE_C.1).contains(&temperature_c)))
            {
                self.push(
                    field("temperature_c"),
                    temperature_c,
                    format!("0 (the formula's) or {} to {} °C", STEP_TEMPERATURE_C.0, STEP_TEMPERATURE_C.1),
                );
            }
        }
        if !collects {
            self.push("procedure", "no COLLECT step", "a procedure with a COLLECT step");
        }
    }

    fn release_criteria(&mut self, rc: &ReleaseCriteria) {
        let ReleaseCriteria { size_nm, pdi_max, encapsulation_min_pct, ph } = rc;
        self.interval("release_criteria.size_nm", size_nm.as_ref(), SIZE_NM, "nm");
        self.positive_up_to("release_criteria.pdi_max", *pdi_max, MAX_PDI, "");
        self.range(
            "release_criteria.encapsulation_min_pct",
            *encapsulation_min_pct,
            ENCAPSULATION_MIN_PCT,
            "%",
        );
        self.interval("release_criteria.ph", ph.as_ref(), FINAL_PH, "");
    }

    /// A `Range` with both ends within `limits` and `min < max`.
    fn interval(&mut self, field: &str, r: Option<&Range>, limits: (f64, f64), unit: &str) {
        let Some(&Range { min, max }) = r else {
            self.missing(field);
            return;
        };
        let before = self.problems.len();
        self.range(format!("{field}.min"), min, limits, unit);
        self.range(format!("{field}.max"), max, limits, unit);
        if self.problems.len() == before && min >= max {
            self.push(field, format!("{min} to {max}"), "a minimum below the maximum");
        }
    }

    fn targets(&mut self, t: &Targets) {
        let Targets { site_ids, device_ids } = t;
        if site_ids.is_empty() && device_ids.is_empty() {
            self.push("targets", "no site and no device", "at least one site id or device id");
        }
        for (list, ids) in [("site_ids", site_ids), ("device_ids", device_ids)] {
            for (i, id) in ids.iter().enumerate() {
                if let Err(reason) = validate_device_id(id) {
                    self.push(
                        format!("targets.{list}[{i}]"),
                        format!("{id:?}"),
                        format!("1 to 64 characters of A-Z, a-z, 0-9, '-', '_' and '.' ({reason})"),
                    );
                }
            }
        }
    }
}

fn with_unit(text: String, unit: &str) -> String {
    if unit.is_empty() { text } else { format!("{text} {unit}") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::example::example;

    fn good() -> Recipe {
        example(
            "flu-h5",
            1,
            Targets { site_ids: vec!["site-a".into()], device_ids: Vec::new() },
            1_750_000_000_000,
        )
    }

    fn problems(r: &Recipe) -> Invalid {
        validate(r).expect_err("the recipe should be refused")
    }

    #[test]
    fn the_example_recipe_is_valid() {
        validate(&good()).unwrap();
    }

    #[test]
    fn an_out_of_range_value_names_the_field_and_the_allowed_range() {
        let mut r = good();
        r.formula.as_mut().unwrap().np_ratio = 12.0;
        assert_eq!(problems(&r).to_string(), "formula.np_ratio = 12 is out of range, allowed: 3 to 10");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let mut r = good();
        r.version = 0;
        r.recipe_id = "Flu_H5".into();
        r.formula.as_mut().unwrap().buffer_ph = 7.0;
        r.procedure[1].duration_s = 0;
        let err = problems(&r);
        let fields: Vec<&str> = err.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["recipe_id", "version", "formula.buffer_ph", "procedure[1].duration_s"]);
        assert_eq!(err.to_string().matches("; ").count(), 3, "{err}");
    }

    #[test]
    fn non_finite_numbers_are_refused_by_name() {
        let mut r = good();
        r.formula.as_mut().unwrap().total_flow_ml_min = f64::NAN;
        r.formula.as_mut().unwrap().lipids.as_mut().unwrap().cholesterol = f64::INFINITY;
        r.release_criteria.as_mut().unwrap().pdi_max = f64::NEG_INFINITY;
        let err = problems(&r);
        assert_eq!(err.problem("formula.total_flow_ml_min").unwrap().value, "NaN");
        assert_eq!(err.problem("formula.lipids.cholesterol").unwrap().value, "inf");
        assert!(err.problem("release_criteria.pdi_max").is_some(), "{err}");
        // A non-finite ratio says nothing about the sum; it is reported once.
        assert!(err.problem("formula.lipids").is_none(), "{err}");
    }

    #[test]
    fn lipid_ratios_must_sum_to_100() {
        let mut r = good();
        r.formula.as_mut().unwrap().lipids.as_mut().unwrap().peg_lipid = 0.5;
        let err = problems(&r);
        let p = err.problem("formula.lipids").unwrap();
        assert!(p.value.contains("99"), "{p}");
        // Within the tolerance is fine.
        r.formula.as_mut().unwrap().lipids.as_mut().unwrap().peg_lipid = 1.505;
        validate(&r).unwrap();
    }

    #[test]
    fn gtin_check_digit_follows_gs1() {
        // DOMAIN.md's example element string carries (01)51022222233336.
        assert_eq!(gtin_check_digit("5102222223333"), Some(6));
        assert!(gtin_ok("51022222233336"));
        assert!(!gtin_ok("51022222233335"));
        assert!(!gtin_ok("5102222223333"));
        assert!(!gtin_ok("5102222223333x"));
        assert!(!gtin_ok("5102222223333é"));
        assert_eq!(gtin_check_digit("510222222333"), None);
        let mut r = good();
        r.cartridge_gtin = "51022222233335".into();
        assert!(problems(&r).problem("cartridge_gtin").is_some());
    }

    #[test]
    fn phases_must_run_in_order_and_include_collect() {
        let mut r = good();
        r.procedure.swap(2, 3); // EQUILIBRATE before PRIME
        let err = problems(&r);
        let p = err.problem("procedure[3].phase").unwrap();
        assert_eq!(p.value, "PRIME");
        assert!(p.allowed.starts_with("EQUILIBRATE"), "{p}");

        let mut r = good();
        r.procedure.retain(|s| s.phase != RunPhase::Collect as i32);
        assert!(problems(&r).problem("procedure").is_some());

        let mut r = good();
        r.procedure[0].phase = RunPhase::Idle as i32;
        r.procedure[9].phase = 99;
        let err = problems(&r);
        assert_eq!(err.problem("procedure[0].phase").unwrap().value, "IDLE");
        assert_eq!(err.problem("procedure[9].phase").unwrap().value, "99");
    }

    #[test]
    fn collect_flow_matches_the_formula_or_is_zero() {
        let mut r = good();
        let collect = r.procedure.iter_mut().find(|s| s.phase == RunPhase::Collect as i32).unwrap();
        collect.total_flow_ml_min = 10.0;
        assert!(problems(&r).problem("procedure[5].total_flow_ml_min").is_some());
        let collect = r.procedure.iter_mut().find(|s| s.phase == RunPhase::Collect as i32).unwrap();
        collect.total_flow_ml_min = 0.0;
        validate(&r).unwrap();
    }

    #[test]
    fn step_temperature_is_zero_or_within_limits() {
        let mut r = good();
        r.procedure[0].temperature_c = 2.0;
        r.procedure[1].temperature_c = 37.0;
        let err = problems(&r);
        assert_eq!(err.problems.len(), 1, "{err}");
        assert!(err.problem("procedure[0].temperature_c").is_some());
    }

    #[test]
    fn release_ranges_need_min_below_max() {
        let mut r = good();
        r.release_criteria.as_mut().unwrap().size_nm = Some(Range { min: 100.0, max: 60.0 });
        r.release_criteria.as_mut().unwrap().ph = None;
        let err = problems(&r);
        assert_eq!(err.problem("release_criteria.size_nm").unwrap().value, "100 to 60");
        assert_eq!(err.problem("release_criteria.ph").unwrap().value, "missing");
    }

    #[test]
    fn targets_and_validity_window() {
        let mut r = good();
        r.targets = Some(Targets { site_ids: vec!["site a".into()], device_ids: Vec::new() });
        r.valid_until_unix_ms = r.valid_from_unix_ms;
        let err = problems(&r);
        assert!(err.problem("targets.site_ids[0]").is_some(), "{err}");
        assert!(err.problem("valid_until_unix_ms").is_some(), "{err}");
        r.targets = Some(Targets::default());
        assert!(problems(&r).problem("targets").is_some());
    }

    #[test]
    fn equipment_needs_models_and_a_semantic_version() {
        let mut r = good();
        r.equipment = Some(EquipmentRequirements { models: vec![String::new()], min_firmware: "2.0".into() });
        let err = problems(&r);
        assert!(err.problem("equipment.models[0]").is_some(), "{err}");
        assert!(err.problem("equipment.min_firmware").is_some(), "{err}");
    }

    #[test]
    fn semantic_versions_parse_strictly() {
        assert_eq!(semver("2.10.0"), Some([2, 10, 0]));
        assert_eq!(semver("0.0.1"), Some([0, 0, 1]));
        for bad in ["", "2", "2.0", "2.0.0.0", "2.0.x", "02.0.0", "2.0.0-rc1", "+2.0.0", "2..0"] {
            assert_eq!(semver(bad), None, "{bad}");
        }
        assert!(semver("1.10.0") > semver("1.9.0"));
    }
}
