//! Checks on decoded device messages. Pure functions: the caller passes the clock.
//!
//! The envelopes are wide on purpose (a device outside its recipe range is a quality
//! signal that monitoring must see); they only keep out values no sensor can report.

use nanofleet_proto::device::v1::{
    AlarmCode, AlarmPriority, DeviceState, EventBatch, FluidLine, Presence, RunPhase, Sample, TelemetryBatch,
    event,
};

use crate::Reject;

/// Samples in one telemetry batch.
pub const MAX_SAMPLES_PER_BATCH: usize = 1_000;
/// Events in one event batch.
pub const MAX_EVENTS_PER_BATCH: usize = 1_000;
/// Flow of one line, µL/min (bench mixers reach 20 mL/min total).
pub const FLOW_RANGE_UL_MIN: (f64, f64) = (-1_000.0, 100_000.0);
/// Line pressure and mixer pressure drop, mbar.
pub const PRESSURE_RANGE_MBAR: (f64, f64) = (-1_000.0, 20_000.0);
/// Any temperature the device reports, °C (cartridges arrive frozen at down to -90 °C).
pub const TEMPERATURE_RANGE_C: (f64, f64) = (-100.0, 150.0);
/// How far a device clock may run ahead of the server's.
pub const MAX_CLOCK_AHEAD_MS: i64 = 24 * 3600 * 1000;
/// No device reported before this instant (2020-01-01T00:00:00Z).
pub const EARLIEST_TIME_MS: i64 = 1_577_836_800_000;

/// A field's name in a refusal, spelt out only when a check fails: a batch of a
/// hundred samples has over a thousand fields to check.
#[derive(Debug, Clone, Copy)]
enum Field<'a> {
    Name(&'a str),
    Sample(usize, &'a str),
    Line(usize, usize, &'a str),
    Event(usize, &'a str),
}

impl<'a> From<&'a str> for Field<'a> {
    fn from(name: &'a str) -> Field<'a> {
        Field::Name(name)
    }
}

impl std::fmt::Display for Field<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Field::Name(n) => write!(f, "{n}"),
            Field::Sample(i, n) => write!(f, "samples[{i}].{n}"),
            Field::Line(i, j, n) => write!(f, "samples[{i}].lines[{j}].{n}"),
            Field::Event(i, n) => write!(f, "events[{i}].{n}"),
        }
    }
}

fn range<'a>(
    field: impl Into<Field<'a>>,
    value: f64,
    (lo, hi): (f64, f64),
    unit: &str,
) -> Result<(), Reject> {
    if value.is_finite() && (lo..=hi).contains(&value) {
        Ok(())
    } else {
        Err(Reject::OutOfRange {
            field: field.into().to_string(),
            value: value.to_string(),
            allowed: format!("{lo} to {hi} {unit}"),
        })
    }
}

fn time<'a>(field: impl Into<Field<'a>>, ms: i64, now_ms: i64) -> Result<(), Reject> {
    if (EARLIEST_TIME_MS..=now_ms.saturating_add(MAX_CLOCK_AHEAD_MS)).contains(&ms) {
        Ok(())
    } else {
        Err(Reject::OutOfRange {
            field: field.into().to_string(),
            value: ms.to_string(),
            allowed: format!(
                "{EARLIEST_TIME_MS} to {} (ms since the Unix epoch)",
                now_ms + MAX_CLOCK_AHEAD_MS
            ),
        })
    }
}

/// Longest free text a device may send (alarm details).
pub const MAX_TEXT_LEN: usize = 512;

/// Short printable text: no control characters (a NUL in a text column is refused by
/// PostgreSQL and would fail the whole group commit it is in).
fn text<'a>(field: impl Into<Field<'a>>, value: &str, max: usize) -> Result<(), Reject> {
    if value.len() > max {
        return Err(Reject::OutOfRange {
            field: field.into().to_string(),
            value: format!("{} bytes", value.len()),
            allowed: format!("0 to {max} bytes"),
        });
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(Reject::OutOfRange {
            field: field.into().to_string(),
            value: format!("{c:?} in {value:?}"),
            allowed: "printable text, no control characters".into(),
        });
    }
    Ok(())
}

fn identity(topic_device: &str, payload_device: &str) -> Result<(), Reject> {
    if topic_device == payload_device {
        Ok(())
    } else {
        Err(Reject::PayloadIdentity {
            topic_device: topic_device.to_owned(),
            payload_device: payload_device.to_owned(),
        })
    }
}

fn seq(seq: u64) -> Result<i64, Reject> {
    match i64::try_from(seq) {
        Ok(s) if s >= 1 => Ok(s),
        _ => Err(Reject::OutOfRange {
            field: "seq".into(),
            value: seq.to_string(),
            allowed: format!("1 to {}", i64::MAX),
        }),
    }
}

fn count<'a>(field: impl Into<Field<'a>>, n: usize, max: usize) -> Result<(), Reject> {
    if (1..=max).contains(&n) {
        Ok(())
    } else {
        Err(Reject::OutOfRange {
            field: field.into().to_string(),
            value: n.to_string(),
            allowed: format!("1 to {max} entries"),
        })
    }
}

/// Checks a telemetry batch published on `topic_device`'s topic; returns its sequence number.
pub fn telemetry(b: &TelemetryBatch, topic_device: &str, now_ms: i64) -> Result<i64, Reject> {
    identity(topic_device, &b.device_id)?;
    let s = seq(b.seq)?;
    text("boot_id", &b.boot_id, 64)?;
    count("samples", b.samples.len(), MAX_SAMPLES_PER_BATCH)?;
    for (i, smp) in b.samples.iter().enumerate() {
        sample(smp, i, now_ms)?;
    }
    Ok(s)
}

fn sample(s: &Sample, i: usize, now_ms: i64) -> Result<(), Reject> {
    let f = |name| Field::Sample(i, name);
    time(f("time_unix_ms"), s.time_unix_ms, now_ms)?;
    text(f("run_id"), &s.run_id, 64)?;
    if RunPhase::try_from(s.phase).is_err() {
        return Err(Reject::OutOfRange {
            field: f("phase").to_string(),
            value: s.phase.to_string(),
            allowed: "a RunPhase".into(),
        });
    }
    if s.lines.len() > 4 {
        return Err(Reject::OutOfRange {
            field: f("lines").to_string(),
            value: s.lines.len().to_string(),
            allowed: "0 to 4 lines".into(),
        });
    }
    for (j, l) in s.lines.iter().enumerate() {
        let g = |name| Field::Line(i, j, name);
        if FluidLine::try_from(l.line).is_err() {
            return Err(Reject::OutOfRange {
                field: g("line").to_string(),
                value: l.line.to_string(),
                allowed: "a FluidLine".into(),
            });
        }
        range(g("flow_ul_min"), l.flow_ul_min, FLOW_RANGE_UL_MIN, "µL/min")?;
        range(g("flow_setpoint_ul_min"), l.flow_setpoint_ul_min, FLOW_RANGE_UL_MIN, "µL/min")?;
        range(g("pressure_mbar"), l.pressure_mbar, PRESSURE_RANGE_MBAR, "mbar")?;
        range(g("temperature_c"), l.temperature_c, TEMPERATURE_RANGE_C, "°C")?;
    }
    range(f("chamber_temperature_c"), s.chamber_temperature_c, TEMPERATURE_RANGE_C, "°C")?;
    range(f("cartridge_temperature_c"), s.cartridge_temperature_c, TEMPERATURE_RANGE_C, "°C")?;
    range(f("mixer_pressure_drop_mbar"), s.mixer_pressure_drop_mbar, PRESSURE_RANGE_MBAR, "mbar")?;
    Ok(())
}

/// Checks an event batch; returns its sequence number.
pub fn events(b: &EventBatch, topic_device: &str, now_ms: i64) -> Result<i64, Reject> {
    identity(topic_device, &b.device_id)?;
    let s = seq(b.seq)?;
    text("boot_id", &b.boot_id, 64)?;
    count("events", b.events.len(), MAX_EVENTS_PER_BATCH)?;
    for (i, e) in b.events.iter().enumerate() {
        time(Field::Event(i, "time_unix_ms"), e.time_unix_ms, now_ms)?;
        match &e.kind {
            None => {
                return Err(Reject::OutOfRange {
                    field: format!("events[{i}].kind"),
                    value: "none".into(),
                    allowed: "alarm, phase_change or cartridge_load".into(),
                });
            }
            Some(event::Kind::Alarm(a)) => {
                text(Field::Event(i, "alarm.detail"), &a.detail, MAX_TEXT_LEN)?;
                if AlarmCode::try_from(a.code).unwrap_or_default() == AlarmCode::Unspecified {
                    return Err(Reject::OutOfRange {
                        field: format!("events[{i}].alarm.code"),
                        value: a.code.to_string(),
                        allowed: "an AlarmCode other than UNSPECIFIED".into(),
                    });
                }
                if AlarmPriority::try_from(a.priority).is_err() || FluidLine::try_from(a.line).is_err() {
                    return Err(Reject::OutOfRange {
                        field: format!("events[{i}].alarm"),
                        value: format!("priority {} line {}", a.priority, a.line),
                        allowed: "an AlarmPriority and a FluidLine".into(),
                    });
                }
            }
            Some(event::Kind::PhaseChange(p)) => text(Field::Event(i, "phase_change.run_id"), &p.run_id, 64)?,
            Some(event::Kind::CartridgeLoad(c)) => {
                for (name, value, max) in [
                    ("cartridge_load.gtin", &c.gtin, 14),
                    ("cartridge_load.lot", &c.lot, 64),
                    ("cartridge_load.serial", &c.serial, 64),
                    ("cartridge_load.request_id", &c.request_id, 64),
                    ("cartridge_load.code", &c.code, 64),
                    ("cartridge_load.batch_id", &c.batch_id, 128),
                    ("cartridge_load.reason", &c.reason, MAX_TEXT_LEN),
                ] {
                    text(Field::Event(i, name), value, max)?;
                }
                if c.gtin.is_empty() || c.serial.is_empty() || c.accepted != c.code.is_empty() {
                    return Err(Reject::OutOfRange {
                        field: format!("events[{i}].cartridge_load"),
                        value: format!(
                            "gtin {:?} serial {:?} accepted {} code {:?}",
                            c.gtin, c.serial, c.accepted, c.code
                        ),
                        allowed: "a GTIN and a serial; a code exactly when refused".into(),
                    });
                }
            }
        }
    }
    Ok(s)
}

/// Checks a presence message.
pub fn state(s: &DeviceState, topic_device: &str, now_ms: i64) -> Result<Presence, Reject> {
    identity(topic_device, &s.device_id)?;
    time("time_unix_ms", s.time_unix_ms, now_ms)?;
    let presence = Presence::try_from(s.presence).unwrap_or_default();
    if presence == Presence::Unspecified {
        return Err(Reject::OutOfRange {
            field: "presence".into(),
            value: s.presence.to_string(),
            allowed: "ONLINE or OFFLINE".into(),
        });
    }
    if s.session_id.is_empty() {
        return Err(Reject::OutOfRange {
            field: "session_id".into(),
            value: "empty".into(),
            allowed: "1 to 64 characters".into(),
        });
    }
    text("session_id", &s.session_id, 64)?;
    text("boot_id", &s.boot_id, 64)?;
    if presence == Presence::Online {
        nanofleet_proto::topics::validate_device_id(&s.site_id).map_err(|reason| Reject::OutOfRange {
            field: "site_id".into(),
            value: s.site_id.clone(),
            allowed: format!("a site id ({reason})"),
        })?;
        text("model", &s.model, 64)?;
        text("firmware_version", &s.firmware_version, 64)?;
    }
    Ok(presence)
}

#[cfg(test)]
mod tests {
    use nanofleet_proto::device::v1::LineReading;

    use super::*;

    const NOW: i64 = 1_790_000_000_000;

    fn good_batch() -> TelemetryBatch {
        TelemetryBatch {
            device_id: "NF-1".into(),
            seq: 7,
            boot_id: "b".into(),
            samples: vec![Sample {
                time_unix_ms: NOW - 1000,
                phase: RunPhase::Collect as i32,
                lines: vec![LineReading {
                    line: FluidLine::Aqueous as i32,
                    flow_ul_min: 9000.0,
                    flow_setpoint_ul_min: 9000.0,
                    pressure_mbar: 1200.0,
                    temperature_c: 22.0,
                    ..Default::default()
                }],
                chamber_temperature_c: 22.0,
                cartridge_temperature_c: 21.0,
                mixer_pressure_drop_mbar: 300.0,
                door_closed: true,
                run_id: String::new(),
            }],
        }
    }

    #[test]
    fn a_realistic_batch_passes_and_yields_its_seq() {
        assert_eq!(telemetry(&good_batch(), "NF-1", NOW), Ok(7));
    }

    #[test]
    fn payload_identity_must_match_topic() {
        let err = telemetry(&good_batch(), "NF-2", NOW).unwrap_err();
        assert_eq!(err.reason(), crate::Reason::IdentityMismatch);
    }

    #[test]
    fn absurd_values_name_the_field_and_the_allowed_range() {
        let mut b = good_batch();
        b.samples[0].lines[0].pressure_mbar = 1e9;
        let err = telemetry(&b, "NF-1", NOW).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("samples[0].lines[0].pressure_mbar"), "{msg}");
        assert!(msg.contains("-1000 to 20000 mbar"), "{msg}");

        let mut b = good_batch();
        b.samples[0].chamber_temperature_c = f64::NAN;
        assert_eq!(telemetry(&b, "NF-1", NOW).unwrap_err().reason(), crate::Reason::OutOfRange);

        let mut b = good_batch();
        b.samples[0].time_unix_ms = NOW + MAX_CLOCK_AHEAD_MS + 1;
        assert_eq!(telemetry(&b, "NF-1", NOW).unwrap_err().reason(), crate::Reason::OutOfRange);
    }

    #[test]
    fn seq_zero_and_empty_batches_are_refused() {
        let mut b = good_batch();
        b.seq = 0;
        assert!(telemetry(&b, "NF-1", NOW).is_err());
        let mut b = good_batch();
        b.samples.clear();
        assert!(telemetry(&b, "NF-1", NOW).is_err());
        let mut b = good_batch();
        b.seq = u64::MAX;
        assert!(telemetry(&b, "NF-1", NOW).is_err());
    }

    #[test]
    fn control_characters_in_text_are_refused() {
        let mut b = good_batch();
        b.samples[0].run_id = "R-1\0".into();
        let err = telemetry(&b, "NF-1", NOW).unwrap_err().to_string();
        assert!(err.contains("samples[0].run_id") && err.contains("control"), "{err}");
    }

    #[test]
    fn cartridge_loads_carry_a_cartridge_and_a_code_exactly_when_refused() {
        use nanofleet_proto::device::v1::{CartridgeLoad, Event};
        let batch = |load: CartridgeLoad| EventBatch {
            device_id: "NF-1".into(),
            seq: 3,
            boot_id: "b".into(),
            events: vec![Event { time_unix_ms: NOW - 1000, kind: Some(event::Kind::CartridgeLoad(load)) }],
        };
        let good = CartridgeLoad {
            gtin: "10614141000019".into(),
            lot: "L1".into(),
            serial: "0001-000001".into(),
            accepted: true,
            batch_id: "NF-1-20261127-120000".into(),
            ..Default::default()
        };
        assert_eq!(events(&batch(good.clone()), "NF-1", NOW), Ok(3));
        let refused = CartridgeLoad { accepted: false, code: "cartridge_recalled".into(), ..good.clone() };
        assert_eq!(events(&batch(refused), "NF-1", NOW), Ok(3));
        let silent = CartridgeLoad { accepted: false, ..good.clone() };
        let e = events(&batch(silent), "NF-1", NOW).unwrap_err().to_string();
        assert!(e.contains("events[0].cartridge_load"), "{e}");
        let long = CartridgeLoad { gtin: "1".repeat(15), ..good };
        let e = events(&batch(long), "NF-1", NOW).unwrap_err().to_string();
        assert!(e.contains("events[0].cartridge_load.gtin"), "{e}");
    }

    #[test]
    fn births_need_a_session_and_a_valid_site() {
        let s = DeviceState {
            device_id: "NF-1".into(),
            presence: Presence::Online as i32,
            session_id: "s1".into(),
            time_unix_ms: NOW,
            site_id: "st-marys".into(),
            ..Default::default()
        };
        assert_eq!(state(&s, "NF-1", NOW), Ok(Presence::Online));
        let bad_site = DeviceState { site_id: "a/b".into(), ..s.clone() };
        assert!(state(&bad_site, "NF-1", NOW).is_err());
        let nul_firmware = DeviceState { firmware_version: "2.3.1\0".into(), ..s.clone() };
        assert!(state(&nul_firmware, "NF-1", NOW).is_err());
        let no_session = DeviceState { session_id: String::new(), ..s };
        assert!(state(&no_session, "NF-1", NOW).is_err());
    }
}
