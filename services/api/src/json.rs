//! JSON shapes of the dashboard API and the CLI's `--output json`. Enum values lose their protobuf prefix
//! (`RUN_PHASE_COLLECT` becomes `COLLECT`).

use nanofleet_proto::device::v1::{AlarmCode, AlarmPriority, FluidLine, LineReading, RunPhase, Sample};
use nanofleet_proto::v1 as pb;
use serde_json::{Value, json};

fn strip(name: &'static str, prefix: &str) -> &'static str {
    name.strip_prefix(prefix).unwrap_or(name)
}

pub fn site(s: &pb::Site) -> Value {
    json!({
        "id": s.id, "name": s.name, "devices_total": s.devices_total, "devices_online": s.devices_online,
        "time_zone": s.time_zone, "maintenance_window": s.maintenance_window,
    })
}

pub fn device(d: &pb::Device) -> Value {
    json!({
        "id": d.id,
        "site_id": d.site_id,
        "model": d.model,
        "firmware_version": d.firmware_version,
        "online": d.online,
        "last_seen_ms": d.last_seen_unix_ms,
        "connected_ms": d.connected_since_unix_ms,
        "telemetry_seq": d.telemetry_seq,
        "last_sample": d.last_sample.as_ref().map(sample),
        "active_alarms": d.active_alarms.iter().map(|a| json!({
            "code": strip(AlarmCode::try_from(a.code).unwrap_or_default().as_str_name(), "ALARM_CODE_"),
            "priority": strip(AlarmPriority::try_from(a.priority).unwrap_or_default().as_str_name(), "ALARM_PRIORITY_"),
            "line": strip(FluidLine::try_from(a.line).unwrap_or_default().as_str_name(), "FLUID_LINE_"),
            "detail": a.detail,
            "changed_ms": a.since_unix_ms,
        })).collect::<Vec<_>>(),
        "status": strip(pb::DeviceStatus::try_from(d.status).unwrap_or_default().as_str_name(), "DEVICE_STATUS_"),
        "enrolled_ms": d.enrolled_unix_ms,
        "certificate_not_after_ms": d.certificate_not_after_unix_ms,
        "hardware_serial": d.hardware_serial,
        "tags": d.tags,
    })
}

fn line(l: Option<&LineReading>) -> Value {
    match l {
        None => Value::Null,
        Some(l) => json!({
            "flow_ul_min": l.flow_ul_min,
            "flow_setpoint_ul_min": l.flow_setpoint_ul_min,
            "pressure_mbar": l.pressure_mbar,
            "temperature_c": l.temperature_c,
            "air_in_line": l.air_in_line,
        }),
    }
}

pub fn sample(s: &Sample) -> Value {
    let find = |want: FluidLine| s.lines.iter().find(|l| l.line == want as i32);
    let aq = find(FluidLine::Aqueous);
    let et = find(FluidLine::Ethanol);
    let (qa, qe) = (aq.map_or(0.0, |l| l.flow_ul_min), et.map_or(0.0, |l| l.flow_ul_min));
    let frr = if qe > 100.0 { Some(qa / qe) } else { None };
    json!({
        "time_ms": s.time_unix_ms,
        "phase": strip(RunPhase::try_from(s.phase).unwrap_or_default().as_str_name(), "RUN_PHASE_"),
        "run_id": s.run_id,
        "aqueous": line(aq),
        "ethanol": line(et),
        "frr": frr,
        "tfr_ml_min": ((qa + qe) / 1000.0).max(0.0),
        "chamber_temperature_c": s.chamber_temperature_c,
        "cartridge_temperature_c": s.cartridge_temperature_c,
        "mixer_pressure_drop_mbar": s.mixer_pressure_drop_mbar,
        "door_closed": s.door_closed,
    })
}

/// An enrollment token's state at `now_ms`: usable, used, expired or revoked.
pub fn token_state(t: &pb::EnrollToken, now_ms: i64) -> &'static str {
    if t.revoked_unix_ms != 0 {
        "revoked"
    } else if t.uses_left == 0 {
        "used"
    } else if t.expires_unix_ms <= now_ms {
        "expired"
    } else {
        "usable"
    }
}

/// An enrollment token (never its secret), with its state at `now_ms`.
pub fn enroll_token(t: &pb::EnrollToken, now_ms: i64) -> Value {
    json!({
        "id": t.id, "site_id": t.site_id, "device_id": t.device_id, "replacement": t.replacement,
        "created_unix_ms": t.created_unix_ms, "expires_unix_ms": t.expires_unix_ms,
        "uses_allowed": t.uses_allowed, "uses_left": t.uses_left, "created_by": t.created_by,
        "revoked_unix_ms": t.revoked_unix_ms, "state": token_state(t, now_ms),
    })
}

/// `draft`, `authored`, `released`, `rejected`.
pub fn recipe_status(s: i32) -> &'static str {
    match pb::RecipeStatus::try_from(s).unwrap_or(pb::RecipeStatus::Unspecified) {
        pb::RecipeStatus::Draft => "draft",
        pb::RecipeStatus::Authored => "authored",
        pb::RecipeStatus::Released => "released",
        pb::RecipeStatus::Rejected => "rejected",
        pb::RecipeStatus::Unspecified => "unknown",
    }
}

/// `authored`, `approved`, `released`, `rejected`.
pub fn signature_meaning(m: i32) -> &'static str {
    use nanofleet_proto::device::v1::SignatureMeaning;
    match SignatureMeaning::try_from(m).unwrap_or(SignatureMeaning::Unspecified) {
        SignatureMeaning::Authored => "authored",
        SignatureMeaning::Approved => "approved",
        SignatureMeaning::Released => "released",
        SignatureMeaning::Rejected => "rejected",
        SignatureMeaning::Unspecified => "unknown",
    }
}

/// A recipe version with its signatures; `recipe` is the protobuf JSON mapping of the
/// recipe itself (the same shape `nanofleet recipes draft --file` reads).
pub fn recipe_version(v: &pb::RecipeVersion) -> Value {
    let recipe = v.recipe.clone().unwrap_or_default();
    json!({
        "recipe_id": recipe.recipe_id,
        "version": recipe.version,
        "name": recipe.name,
        "status": recipe_status(v.status),
        "digest": v.digest,
        "created_by": v.created_by,
        "created_unix_ms": v.created_unix_ms,
        "released_unix_ms": v.released_unix_ms,
        "rejected_by": v.rejected_by,
        "rejected_reason": v.rejected_reason,
        "signatures": v.signatures.iter().map(|s| json!({
            "signer_id": s.signer_id,
            "printed_name": s.printed_name,
            "meaning": signature_meaning(s.meaning),
            "signed_unix_ms": s.signed_unix_ms,
            "key_id": s.key_id,
        })).collect::<Vec<_>>(),
        "recipe": nanofleet_recipe::json::recipe_to_json(&recipe),
    })
}

/// `pending`, `accepted`, `refused`.
pub fn delivery_state(s: i32) -> &'static str {
    match pb::DeliveryState::try_from(s).unwrap_or(pb::DeliveryState::Unspecified) {
        pb::DeliveryState::Pending => "pending",
        pb::DeliveryState::Accepted => "accepted",
        pb::DeliveryState::Refused => "refused",
        pb::DeliveryState::Unspecified => "unknown",
    }
}

/// One device's delivery of a recipe version.
pub fn recipe_delivery(d: &pb::RecipeDelivery) -> Value {
    json!({
        "device_id": d.device_id,
        "site_id": d.site_id,
        "recipe_id": d.recipe_id,
        "version": d.version,
        "state": delivery_state(d.state),
        "code": d.code,
        "reason": d.reason,
        "sent_unix_ms": d.sent_unix_ms,
        "answered_unix_ms": d.answered_unix_ms,
    })
}

fn status_counts(c: &[pb::StatusCount]) -> Value {
    c.iter().map(|c| (c.status.clone(), Value::from(c.devices))).collect::<serde_json::Map<_, _>>().into()
}

/// A rollout (with its devices when it carries them). Times are ms since the Unix epoch.
pub fn rollout(r: &pb::Rollout) -> Value {
    json!({
        "rollout_id": r.rollout_id, "target": r.target, "model": r.model, "version": r.version,
        "state": r.state, "reason": r.reason, "wave": r.wave, "waves": r.waves,
        "created_unix_ms": r.created_unix_ms, "action": r.action,
        "success_threshold_pct": r.success_threshold_pct, "error_threshold_pct": r.error_threshold_pct,
        "counts": status_counts(&r.counts),
        "wave_counts": r.wave_summaries.iter().map(|w| json!({"wave": w.wave, "counts": status_counts(&w.counts)})).collect::<Vec<_>>(),
        "devices": r.devices.iter().map(|d| json!({
            "device_id": d.device_id, "site_id": d.site_id, "wave": d.wave, "status": d.status,
            "attempts": d.attempts, "code": d.code, "detail": d.detail, "updated_unix_ms": d.updated_unix_ms,
            "from_version": d.from_version,
        })).collect::<Vec<_>>(),
        "health_watch_seconds": r.health_watch_seconds, "rollback_on_regression": r.rollback_on_regression,
        "health_checks": r.health_checks.iter().map(|h| json!({
            "wave": h.wave, "at_unix_ms": h.at_unix_ms, "outcome": h.outcome, "evidence": h.evidence,
        })).collect::<Vec<_>>(),
    })
}
