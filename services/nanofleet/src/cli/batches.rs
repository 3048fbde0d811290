//! `nanofleet runs start` and `nanofleet batches ...`: start a run on a device, read
//! batch records, release or reject a batch with an electronic signature, export the
//! record.

use std::path::Path;

use anyhow::Context as _;
use nanofleet_api::batch_doc;
use nanofleet_api::{batch_json, summary_json};
use nanofleet_proto::device::v1::{Cartridge, QualityAttribute, SignatureMeaning};
use nanofleet_proto::v1 as pb;
use nanofleet_proto::v1::batch_service_client::BatchServiceClient;

use super::recipes::{PasswordSource, read_password};
use super::{Authed, Client, Output, status_error, table, utc};
use crate::outln;

/// `YYYY-MM-DD` (a cartridge's expiry date, AI 17) as the end of that day, UTC.
pub fn expiry_arg(s: &str) -> anyhow::Result<i64> {
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    let date = time::Date::parse(s, &fmt)
        .map_err(|e| anyhow::anyhow!("--expires {s:?}: {e}; expected the expiry date as YYYY-MM-DD"))?;
    let end = date.with_hms(23, 59, 59).map_err(|e| anyhow::anyhow!("--expires {s:?}: {e}"))?.assume_utc();
    Ok(end.unix_timestamp() * 1000 + 999)
}

/// An RFC 3339 time (`2026-11-26T09:30:00Z`) or a time ago (`90m`, `2h`).
pub fn time_arg(flag: &str, s: &str, now_ms: i64) -> anyhow::Result<i64> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        let ms = t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        return Ok(i64::try_from(ms).unwrap_or(i64::MAX));
    }
    match humantime::parse_duration(s) {
        Ok(ago) => Ok(now_ms - i64::try_from(ago.as_millis()).unwrap_or(i64::MAX)),
        Err(_) => {
            anyhow::bail!("{flag} {s:?}: expected a UTC time (2026-11-26T09:30:00Z) or a time ago (90m, 2h)")
        }
    }
}

/// `awaiting_release`, `released`, `rejected`, `failed`.
pub fn disposition_arg(s: Option<&str>) -> anyhow::Result<pb::BatchDisposition> {
    Ok(match s {
        None => pb::BatchDisposition::Unspecified,
        Some("awaiting_release" | "awaiting-release") => pb::BatchDisposition::AwaitingRelease,
        Some("released") => pb::BatchDisposition::Released,
        Some("rejected") => pb::BatchDisposition::Rejected,
        Some("failed") => pb::BatchDisposition::Failed,
        Some(other) => {
            anyhow::bail!("--disposition {other:?}: allowed: awaiting_release, released, rejected, failed")
        }
    })
}

/// What `batches verify` found in a JSON export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportCheck {
    pub batch_id: String,
    pub device_id: String,
    pub site_id: String,
    /// Hex SHA-256 of the signed record.
    pub digest: String,
    pub certificate_serial: String,
    pub ended_unix_ms: i64,
    /// QA's decision as the export states it (not covered by the device's signature;
    /// bound to the digest in the server's audit chain).
    pub decision: Option<String>,
}

/// Checks a `batches export --format json` document without the server: the device's
/// signature over the record it carries, that the signing certificate chains to one of
/// `intermediates` (the fleet's `devices-bundle.pem`) at the record's end time and names
/// the record's device, and that the export's digest is the signed record's.
pub fn verify_export(
    text: &str,
    intermediates: &[rustls::pki_types::CertificateDer<'static>],
) -> anyhow::Result<ExportCheck> {
    use base64::Engine as _;
    use nanofleet_proto::Message as _;
    let doc: serde_json::Value = serde_json::from_str(text).context("not JSON")?;
    let b64 = doc["signed_record_base64"]
        .as_str()
        .context("no signed_record_base64: not a file from `nanofleet batches export --format json`")?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| anyhow::anyhow!("signed_record_base64: {e}"))?;
    // The device the record names; the verification below checks that it signed it.
    let named = nanofleet_proto::device::v1::SignedBatchRecord::decode(bytes.as_slice())
        .ok()
        .and_then(|s| s.envelope)
        .and_then(|e| nanofleet_proto::device::v1::BatchRecord::decode(e.payload.as_slice()).ok())
        .map(|r| r.device_id)
        .context("signed_record_base64 is not a signed batch record")?;
    let v = nanofleet_recipe::batch::verify(&bytes, &named).map_err(|e| anyhow::anyhow!("{e}"))?;
    let who = nanofleet_pki::verify_device_cert(intermediates, &v.certificate, v.record.ended_unix_ms)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if who.device_id != v.record.device_id {
        anyhow::bail!("the certificate names {}, the record {}", who.device_id, v.record.device_id);
    }
    let stated = doc["record_digest"].as_str().unwrap_or_default();
    if stated != v.digest {
        anyhow::bail!("the export states record digest {stated:?}, the signed record's is {}", v.digest);
    }
    let decision = doc["summary"]["decision"].as_object().map(|d| {
        format!(
            "{} by {} at {} UTC",
            d.get("meaning").and_then(|m| m.as_str()).unwrap_or_default(),
            d.get("printed_name").and_then(|m| m.as_str()).unwrap_or_default(),
            utc(d.get("signed_unix_ms").and_then(serde_json::Value::as_i64).unwrap_or(0))
        )
    });
    Ok(ExportCheck {
        batch_id: v.record.batch_id.clone(),
        device_id: v.record.device_id.clone(),
        site_id: v.record.site_id.clone(),
        digest: v.digest,
        certificate_serial: nanofleet_pki::device_identity_of(&v.certificate)
            .map(|(_, s)| s)
            .unwrap_or_default(),
        ended_unix_ms: v.record.ended_unix_ms,
        decision,
    })
}

/// What `runs start` asks for.
#[derive(Debug, Clone)]
pub struct RunArgs {
    pub device_id: String,
    pub recipe_id: String,
    pub recipe_version: u32,
    /// The cartridge's fields, or none when `cartridge_scan` carries it.
    pub cartridge: Option<Cartridge>,
    pub cartridge_scan: String,
    pub prescription_id: String,
    pub prescription_unix_ms: i64,
    pub patient_pseudonym: String,
}

impl Client {
    fn batches(&self) -> BatchServiceClient<Authed> {
        BatchServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    pub async fn run_start(&self, server: &str, a: RunArgs) -> anyhow::Result<()> {
        let req = pb::StartRunRequest {
            device_id: a.device_id.clone(),
            recipe_id: a.recipe_id,
            recipe_version: a.recipe_version,
            cartridge: a.cartridge,
            cartridge_scan: a.cartridge_scan,
            prescription_id: a.prescription_id,
            prescription_unix_ms: a.prescription_unix_ms,
            patient_pseudonym: a.patient_pseudonym,
        };
        let r = self.batches().start_run(req).await.map_err(|s| status_error(server, s))?.into_inner();
        self.report(
            || {
                serde_json::json!({
                    "request_id": r.request_id,
                    "accepted": r.accepted,
                    "code": r.code,
                    "reason": r.reason,
                })
            },
            || {
                if r.accepted {
                    format!(
                        "run started on {} (request {}); its batch record arrives when the run ends: nanofleet batches list --device {}",
                        a.device_id, r.request_id, a.device_id
                    )
                } else {
                    format!("{} refused the run ({}): {}", a.device_id, r.code, r.reason)
                }
            },
        );
        if !r.accepted {
            anyhow::bail!("run refused by the device: {}", r.code);
        }
        Ok(())
    }

    pub async fn batch_list(&self, server: &str, req: pb::ListBatchesRequest) -> anyhow::Result<()> {
        let batches =
            self.batches().list_batches(req).await.map_err(|s| status_error(server, s))?.into_inner().batches;
        if self.output == Output::Json {
            self.print_json(
                serde_json::json!({ "batches": batches.iter().map(summary_json).collect::<Vec<_>>() }),
            );
            return Ok(());
        }
        let mut t = table([
            "BATCH",
            "DEVICE",
            "RECIPE",
            "STARTED (UTC)",
            "OUTCOME",
            "QC",
            "DISPOSITION",
            "STARTED BY",
        ]);
        for b in &batches {
            let j = summary_json(b);
            t.add_row([
                b.batch_id.clone(),
                b.device_id.clone(),
                format!("{} v{}", b.recipe_id, b.recipe_version),
                utc(b.started_unix_ms),
                j["outcome"].as_str().unwrap_or_default().to_owned(),
                if b.qc_passed { "pass".into() } else { "FAIL".into() },
                j["disposition"].as_str().unwrap_or_default().to_owned(),
                b.started_by.clone().unwrap_or_default().printed_name,
            ]);
        }
        outln!("{t}\n{} batches", batches.len());
        Ok(())
    }

    pub async fn batch_show(&self, server: &str, batch_id: String) -> anyhow::Result<()> {
        let b = self
            .batches()
            .get_batch(pb::GetBatchRequest { batch_id })
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner();
        if self.output == Output::Json {
            self.print_json(batch_json(&b));
            return Ok(());
        }
        let s = b.summary.clone().unwrap_or_default();
        let r = b.record.clone().unwrap_or_default();
        let j = summary_json(&s);
        let c = r.cartridge.clone().unwrap_or_default();
        let by = r.started_by.clone().unwrap_or_default();
        outln!(
            "batch {}: {} ({}, QC {})",
            r.batch_id,
            j["disposition"].as_str().unwrap_or_default(),
            j["outcome"].as_str().unwrap_or_default(),
            if s.qc_passed { "passed" } else { "not passed" }
        );
        outln!("  recipe        {} v{} (digest {})", r.recipe_id, r.recipe_version, r.recipe_digest);
        outln!(
            "  device        {} at {} ({}, firmware {})",
            r.device_id,
            r.site_id,
            r.model,
            r.firmware_version
        );
        outln!(
            "  cartridge     GTIN {} lot {} serial {} expires {}",
            c.gtin,
            c.lot,
            c.serial,
            utc(c.expires_unix_ms)
        );
        outln!(
            "  prescription  {} dated {} UTC, patient {}",
            r.prescription_id,
            utc(r.prescription_unix_ms),
            r.patient_pseudonym
        );
        outln!(
            "  run           started {} UTC by {} ({}), ended {} UTC",
            utc(r.started_unix_ms),
            by.printed_name,
            by.user_id,
            utc(r.ended_unix_ms)
        );
        if !r.abort_reason.is_empty() {
            outln!("  aborted       {}", r.abort_reason);
        }
        let mut q = table(["QC ATTRIBUTE", "RESULT", "MIN", "MAX", "VERDICT"]);
        for x in &r.qc {
            let name = QualityAttribute::try_from(x.attribute)
                .map(|a| a.as_str_name().trim_start_matches("QUALITY_ATTRIBUTE_").to_lowercase())
                .unwrap_or_default();
            let bound = |b: Option<f64>| b.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
            q.add_row([
                name,
                format!("{:.3} {}", x.value, x.unit),
                bound(x.min),
                bound(x.max),
                if x.passed { "pass".into() } else { "FAIL".into() },
            ]);
        }
        outln!("{q}");
        outln!("  alarms        {}", r.alarms.len());
        for a in &r.alarms {
            outln!("    {} UTC  {}", utc(a.time_unix_ms), a.detail);
        }
        outln!("  signatures");
        for st in batch_doc::recipe_signatures(&r) {
            outln!(
                "    {} ({}) {} the recipe at {} UTC",
                st.printed_name,
                st.signer_id,
                nanofleet_api::json::signature_meaning(st.meaning),
                utc(st.signed_unix_ms)
            );
        }
        outln!(
            "    device {} recorded the batch (record SHA-256 {}, certificate {})",
            r.device_id,
            b.record_digest,
            b.certificate_serial
        );
        match &s.decision {
            Some(d) => outln!(
                "    {} ({}) {} the batch at {} UTC{}",
                d.printed_name,
                d.signer_id,
                nanofleet_api::json::signature_meaning(d.meaning),
                utc(d.signed_unix_ms),
                if d.reason.is_empty() { String::new() } else { format!(": {}", d.reason) }
            ),
            None => outln!("    QA decision pending"),
        }
        Ok(())
    }

    pub async fn batch_decide(
        &self,
        server: &str,
        batch_id: String,
        meaning: SignatureMeaning,
        reason: String,
        user_id: String,
        password: PasswordSource,
    ) -> anyhow::Result<()> {
        let user_id = if user_id.is_empty() { self.who_am_i(server).await? } else { user_id };
        let password = read_password(password, &user_id)?;
        let req = pb::ReleaseBatchRequest { batch_id, meaning: meaning as i32, reason, user_id, password };
        let s = self
            .batches()
            .release_batch(req)
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner()
            .summary
            .context("server answered without the batch")?;
        self.report(
            || summary_json(&s),
            || {
                let d = s.decision.clone().unwrap_or_default();
                format!(
                    "batch {} {} by {} at {} UTC",
                    s.batch_id,
                    nanofleet_api::json::signature_meaning(d.meaning),
                    d.printed_name,
                    utc(d.signed_unix_ms)
                )
            },
        );
        Ok(())
    }

    pub async fn batch_export(
        &self,
        server: &str,
        batch_id: String,
        format: pb::ExportFormat,
        out: Option<&Path>,
    ) -> anyhow::Result<()> {
        let r = self
            .batches()
            .export_batch(pb::ExportBatchRequest { batch_id: batch_id.clone(), format: format as i32 })
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner();
        match out {
            Some(path) => {
                std::fs::write(path, &r.content).with_context(|| format!("--out {}", path.display()))?;
                eprintln!(
                    "batch {batch_id}: {} bytes of {} written to {}",
                    r.content.len(),
                    r.content_type,
                    path.display()
                );
            }
            None => {
                use std::io::Write as _;
                let mut stdout = std::io::stdout().lock();
                let _ = stdout.write_all(&r.content);
                let _ = stdout.flush();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expiry_date_lasts_to_the_end_of_its_day() {
        assert_eq!(expiry_arg("2027-03-31").unwrap(), 1_806_537_599_999);
        let e = expiry_arg("31/03/2027").unwrap_err().to_string();
        assert!(e.contains("YYYY-MM-DD"), "{e}");
    }

    #[test]
    fn times_are_absolute_or_ago() {
        assert_eq!(time_arg("--prescribed", "2h", 10_000_000).unwrap(), 10_000_000 - 7_200_000);
        assert_eq!(time_arg("--prescribed", "1970-01-01T00:00:10Z", 0).unwrap(), 10_000);
        assert!(time_arg("--prescribed", "yesterday", 0).is_err());
    }
}
