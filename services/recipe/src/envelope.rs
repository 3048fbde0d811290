//! Hardware envelopes: what each device model can physically do. A recipe that passes
//! [`validate`](crate::validate::validate) may still ask more of a model than its pumps,
//! thermal control or collection vessel give; [`check`] catches that before a run.

use nanofleet_proto::device::v1::{Formula, ProcedureStep, Recipe};

use crate::validate::{FieldError, Invalid};

/// The operating limits of one device model. Ranges are closed intervals.
#[derive(Debug, Clone, PartialEq)]
pub struct HardwareEnvelope {
    pub model: String,
    /// Total flow rate the pumps hold, mL/min.
    pub total_flow_ml_min: (f64, f64),
    /// Aqueous:ethanol flow-rate ratio.
    pub flow_rate_ratio: (f64, f64),
    /// Temperature the mixer can be held at, °C.
    pub temperature_c: (f64, f64),
    /// Collection vessel, mL.
    pub max_batch_volume_ml: f64,
    /// Longest single phase the controller runs, s.
    pub max_step_duration_s: u32,
}

/// The device models with a known envelope.
pub const MODELS: &[&str] = &["NF-100", "NF-200"];

/// The envelope of a known device model.
pub fn for_model(model: &str) -> Option<HardwareEnvelope> {
    let env = |total_flow_ml_min, flow_rate_ratio, temperature_c, max_batch_volume_ml| HardwareEnvelope {
        model: model.to_owned(),
        total_flow_ml_min,
        flow_rate_ratio,
        temperature_c,
        max_batch_volume_ml,
        max_step_duration_s: 3600,
    };
    match model {
        "NF-200" => Some(env((1.0, 20.0), (1.0, 5.0), (15.0, 30.0), 10.0)),
        "NF-100" => Some(env((1.0, 12.0), (1.0, 4.0), (18.0, 28.0), 5.0)),
        _ => None,
    }
}

/// Checks the formula and every procedure step of `r` against `env`.
pub fn check(r: &Recipe, env: &HardwareEnvelope) -> Result<(), Invalid> {
    let mut problems = Vec::new();
    let model = env.model.as_str();
    let mut out_of = |field: String, value: String, allowed: String| {
        problems.push(FieldError { field, value, allowed: format!("the {model} allows {allowed}") });
    };
    let within = |v: f64, (lo, hi): (f64, f64)| v.is_finite() && lo <= v && v <= hi;

    match &r.formula {
        None => out_of("formula".into(), "missing".into(), "a formula message".into()),
        Some(f) => {
            let Formula { total_flow_ml_min, flow_rate_ratio, temperature_c, batch_volume_ml, .. } = *f;
            let (lo, hi) = env.total_flow_ml_min;
            if !within(total_flow_ml_min, env.total_flow_ml_min) {
                out_of(
                    "formula.total_flow_ml_min".into(),
                    total_flow_ml_min.to_string(),
                    format!("{lo} to {hi} mL/min"),
                );
            }
            let (lo, hi) = env.flow_rate_ratio;
            if !within(flow_rate_ratio, env.flow_rate_ratio) {
                out_of(
                    "formula.flow_rate_ratio".into(),
                    flow_rate_ratio.to_string(),
                    format!("{lo} to {hi}"),
                );
            }
            let (lo, hi) = env.temperature_c;
            if !within(temperature_c, env.temperature_c) {
                out_of("formula.temperature_c".into(), temperature_c.to_string(), format!("{lo} to {hi} °C"));
            }
            if !within(batch_volume_ml, (0.0, env.max_batch_volume_ml)) {
                out_of(
                    "formula.batch_volume_ml".into(),
                    batch_volume_ml.to_string(),
                    format!("at most {} mL", env.max_batch_volume_ml),
                );
            }
        }
    }

    for (i, s) in r.procedure.iter().enumerate() {
        let ProcedureStep { phase: _, duration_s, total_flow_ml_min, temperature_c } = *s;
        // 0 means no fluid moves (flow) or the formula's setpoint (temperature).
        if total_flow_ml_min != 0.0 && !within(total_flow_ml_min, env.total_flow_ml_min) {
            let (lo, hi) = env.total_flow_ml_min;
            out_of(
                format!("procedure[{i}].total_flow_ml_min"),
                total_flow_ml_min.to_string(),
                format!("0 or {lo} to {hi} mL/min"),
            );
        }
        if temperature_c != 0.0 && !within(temperature_c, env.temperature_c) {
            let (lo, hi) = env.temperature_c;
            out_of(
                format!("procedure[{i}].temperature_c"),
                temperature_c.to_string(),
                format!("0 (the formula's) or {lo} to {hi} °C"),
            );
        }
        if duration_s > env.max_step_duration_s {
            out_of(
                format!("procedure[{i}].duration_s"),
                duration_s.to_string(),
                format!("at most {} s per phase", env.max_step_duration_s),
            );
        }
    }

    if problems.is_empty() { Ok(()) } else { Err(Invalid { problems }) }
}

#[cfg(test)]
mod tests {
    use nanofleet_proto::device::v1::Targets;

    use super::*;
    use crate::example::example;

    fn recipe() -> Recipe {
        example("flu-h5", 1, Targets { site_ids: vec!["site-a".into()], device_ids: Vec::new() }, 1)
    }

    #[test]
    fn the_example_fits_the_nf_200_and_the_nf_100() {
        check(&recipe(), &for_model("NF-200").unwrap()).unwrap();
        check(&recipe(), &for_model("NF-100").unwrap()).unwrap();
        assert_eq!(for_model("NF-300"), None);
    }

    #[test]
    fn a_flow_beyond_the_pumps_is_refused_with_the_models_limit() {
        let mut r = recipe();
        r.formula.as_mut().unwrap().total_flow_ml_min = 15.0;
        for s in &mut r.procedure {
            if s.total_flow_ml_min == 12.0 {
                s.total_flow_ml_min = 15.0;
            }
        }
        check(&r, &for_model("NF-200").unwrap()).unwrap();
        let err = check(&r, &for_model("NF-100").unwrap()).unwrap_err();
        assert_eq!(
            err.problem("formula.total_flow_ml_min").unwrap().to_string(),
            "formula.total_flow_ml_min = 15 is out of range, allowed: the NF-100 allows 1 to 12 mL/min"
        );
        // START_WASTE, COLLECT and END_WASTE run at 15 too.
        assert_eq!(err.problems.len(), 4, "{err}");
    }

    #[test]
    fn steps_are_checked_for_temperature_and_duration() {
        let mut r = recipe();
        r.formula.as_mut().unwrap().batch_volume_ml = 8.0;
        r.procedure[7].duration_s = 4000;
        r.procedure[8].temperature_c = 35.0;
        let err = check(&r, &for_model("NF-100").unwrap()).unwrap_err();
        let fields: Vec<&str> = err.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            ["formula.batch_volume_ml", "procedure[7].duration_s", "procedure[8].temperature_c"]
        );
    }
}
