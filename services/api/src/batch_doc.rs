//! The batch record as a printable document (HTML with print styles): everything a
//! QA reviewer or an inspector needs on paper, every electronic signature with its
//! printed name, UTC time and meaning.

use std::fmt::Write as _;

use nanofleet_proto::Message as _;
use nanofleet_proto::device::v1::{
    AlarmCode, AlarmPriority, BatchRecord, QualityAttribute, RecipeStatement, RunOutcome, RunPhase,
    SignatureMeaning,
};
use nanofleet_proto::v1 as pb;

/// The recipe signatures a record carries, as the device verified them.
pub fn recipe_signatures(record: &BatchRecord) -> Vec<RecipeStatement> {
    record
        .recipe_signatures
        .iter()
        .filter_map(|e| RecipeStatement::decode(e.payload.as_slice()).ok())
        .collect()
}

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `2026-11-26 14:03:09 UTC`.
pub fn utc(ms: i64) -> String {
    if ms <= 0 {
        return "—".into();
    }
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.strftime("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|_| ms.to_string())
}

fn name<E>(
    value: i32,
    parse: impl Fn(i32) -> Option<E>,
    as_str: impl Fn(&E) -> &'static str,
    prefix: &str,
) -> String {
    parse(value)
        .map(|e| as_str(&e).trim_start_matches(prefix).replace('_', " ").to_lowercase())
        .unwrap_or_else(|| value.to_string())
}

fn phase(p: i32) -> String {
    name(p, |v| RunPhase::try_from(v).ok(), RunPhase::as_str_name, "RUN_PHASE_")
}

fn meaning(m: i32) -> String {
    name(m, |v| SignatureMeaning::try_from(v).ok(), SignatureMeaning::as_str_name, "SIGNATURE_MEANING_")
}

fn num(v: f64, digits: usize) -> String {
    if v.is_finite() { format!("{v:.digits$}") } else { "not measured".into() }
}

const STYLE: &str = "body{font:11pt/1.4 system-ui,sans-serif;margin:2em;color:#111}\
h1{font-size:16pt;margin:0}h2{font-size:12pt;border-bottom:1px solid #999;margin-top:1.4em}\
table{border-collapse:collapse;width:100%;margin:.4em 0}td,th{border:1px solid #bbb;padding:3px 6px;text-align:left;vertical-align:top}\
th{background:#eee}.pass{color:#060}.fail{color:#a00;font-weight:bold}.kv td:first-child{width:28%;color:#444}\
.badge{display:inline-block;padding:2px 8px;border:1px solid;border-radius:3px;font-weight:bold}\
.sig{border:1px solid #333;padding:6px 10px;margin:6px 0}.mono{font-family:ui-monospace,monospace;font-size:9pt;word-break:break-all}\
@media print{body{margin:0}a{color:inherit;text-decoration:none}}";

/// The document.
pub fn html(b: &pb::GetBatchResponse) -> String {
    let r = b.record.clone().unwrap_or_default();
    let s = b.summary.clone().unwrap_or_default();
    let disposition =
        crate::batches::summary_json(&s)["disposition"].as_str().unwrap_or("unknown").replace('_', " ");
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>Batch record {id}</title><style>{STYLE}</style></head><body>\
         <h1>Batch record {id}</h1><p><span class=badge>{disp}</span> &nbsp; {outcome}, QC {qc}</p>",
        id = esc(&r.batch_id),
        disp = esc(&disposition.to_uppercase()),
        outcome =
            esc(&name(r.outcome, |v| RunOutcome::try_from(v).ok(), RunOutcome::as_str_name, "RUN_OUTCOME_")),
        qc =
            if s.qc_passed { "<span class=pass>passed</span>" } else { "<span class=fail>not passed</span>" },
    );
    let cartridge = r.cartridge.clone().unwrap_or_default();
    let by = r.started_by.clone().unwrap_or_default();
    let rows: Vec<(&str, String)> = vec![
        ("Recipe", format!("{} version {}", r.recipe_id, r.recipe_version)),
        ("Recipe digest (SHA-256)", r.recipe_digest.clone()),
        ("Device", format!("{} ({}, firmware {})", r.device_id, r.model, r.firmware_version)),
        ("Site", r.site_id.clone()),
        (
            "Cartridge",
            format!(
                "GTIN {} · lot {} · serial {} · expires {}",
                cartridge.gtin,
                cartridge.lot,
                cartridge.serial,
                utc(cartridge.expires_unix_ms)
            ),
        ),
        ("Prescription", format!("{} dated {}", r.prescription_id, utc(r.prescription_unix_ms))),
        ("Patient (pseudonym)", r.patient_pseudonym.clone()),
        ("Started by", format!("{} ({})", by.printed_name, by.user_id)),
        ("Started", utc(r.started_unix_ms)),
        ("Ended", utc(r.ended_unix_ms)),
        ("Request", r.request_id.clone()),
    ];
    h.push_str("<h2>Batch</h2><table class=kv>");
    for (k, v) in rows {
        let _ = write!(h, "<tr><td>{}</td><td>{}</td></tr>", esc(k), esc(&v));
    }
    if !r.abort_reason.is_empty() {
        let _ = write!(h, "<tr><td>Abort reason</td><td class=fail>{}</td></tr>", esc(&r.abort_reason));
    }
    h.push_str("</table>");

    h.push_str("<h2>Quality control against the release criteria</h2><table><tr><th>Attribute</th><th>Result</th><th>Criterion</th><th>Verdict</th></tr>");
    if r.qc.is_empty() {
        h.push_str("<tr><td colspan=4>No QC results: the run did not complete.</td></tr>");
    }
    for q in &r.qc {
        let attr = name(
            q.attribute,
            |v| QualityAttribute::try_from(v).ok(),
            QualityAttribute::as_str_name,
            "QUALITY_ATTRIBUTE_",
        );
        let criterion = match (q.min, q.max) {
            (Some(lo), Some(hi)) => format!("{lo} to {hi} {}", q.unit),
            (Some(lo), None) => format!("≥ {lo} {}", q.unit),
            (None, Some(hi)) => format!("≤ {hi} {}", q.unit),
            (None, None) => "recorded only".into(),
        };
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{} {}</td><td>{}</td><td class={}>{}</td></tr>",
            esc(&attr),
            num(q.value, 3),
            esc(&q.unit),
            esc(&criterion),
            if q.passed { "pass" } else { "fail" },
            if q.passed { "pass" } else { "FAIL" }
        );
    }
    h.push_str("</table>");

    h.push_str("<h2>Process: setpoints and actuals per phase</h2><table><tr><th>Phase</th><th>Start</th><th>End</th><th>Total flow set / actual (mL/min)</th><th>FRR set / actual</th><th>Flow CV</th><th>Temperature set / actual (°C)</th><th>Max pressure (mbar)</th></tr>");
    for p in &r.phases {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{} / {}</td><td>{} / {}</td><td>{}</td><td>{} / {}</td><td>{}</td></tr>",
            esc(&phase(p.phase)),
            utc(p.started_unix_ms),
            utc(p.ended_unix_ms),
            num(p.setpoint_total_flow_ml_min, 2),
            num(p.actual_total_flow_ml_min, 2),
            num(p.setpoint_flow_rate_ratio, 2),
            num(p.actual_flow_rate_ratio, 2),
            num(p.flow_cv, 3),
            num(p.setpoint_temperature_c, 1),
            num(p.actual_temperature_c, 1),
            num(p.max_pressure_mbar, 0),
        );
    }
    h.push_str("</table>");

    h.push_str("<h2>Alarms</h2><table><tr><th>Time</th><th>Alarm</th><th>Priority</th><th>Detail</th></tr>");
    if r.alarms.is_empty() {
        h.push_str("<tr><td colspan=4>None.</td></tr>");
    }
    for a in &r.alarms {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            utc(a.time_unix_ms),
            esc(&name(a.code, |v| AlarmCode::try_from(v).ok(), AlarmCode::as_str_name, "ALARM_CODE_")),
            esc(&name(
                a.priority,
                |v| AlarmPriority::try_from(v).ok(),
                AlarmPriority::as_str_name,
                "ALARM_PRIORITY_"
            )),
            esc(&a.detail)
        );
    }
    h.push_str("</table>");

    h.push_str("<h2>Electronic signatures</h2>");
    for st in recipe_signatures(&r) {
        let _ = write!(
            h,
            "<div class=sig><b>{}</b> ({}) — <b>{}</b> recipe {} v{} — {}</div>",
            esc(&st.printed_name),
            esc(&st.signer_id),
            esc(&meaning(st.meaning)),
            esc(&r.recipe_id),
            r.recipe_version,
            utc(st.signed_unix_ms)
        );
    }
    let _ = write!(
        h,
        "<div class=sig><b>Device {}</b> — <b>recorded</b> this batch — {}<br><span class=mono>record SHA-256 {} · device certificate serial {}</span></div>",
        esc(&r.device_id),
        utc(r.ended_unix_ms),
        esc(&b.record_digest),
        esc(&b.certificate_serial)
    );
    match &s.decision {
        Some(d) => {
            let _ = write!(
                h,
                "<div class=sig><b>{}</b> ({}) — <b>{}</b> this batch — {}{}<br><span class=mono>bound to record SHA-256 {}</span></div>",
                esc(&d.printed_name),
                esc(&d.signer_id),
                esc(&meaning(d.meaning)),
                utc(d.signed_unix_ms),
                if d.reason.is_empty() { String::new() } else { format!(" — reason: {}", esc(&d.reason)) },
                esc(&d.record_digest)
            );
        }
        None => h.push_str("<div class=sig>QA decision: <i>awaiting release</i></div>"),
    }
    h.push_str("<p class=mono>Printed from Nanofleet. The signed record (JSON export) verifies against the fleet's device certificates.</p></body></html>");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_devices_and_people_is_escaped() {
        assert_eq!(
            esc("<script>\"a\"&'b'</script>"),
            "&lt;script&gt;&quot;a&quot;&amp;&#39;b&#39;&lt;/script&gt;"
        );
    }

    #[test]
    fn times_print_in_utc() {
        assert_eq!(utc(1_795_000_000_123), "2026-11-18 11:06:40 UTC");
        assert_eq!(utc(0), "—");
    }
}
