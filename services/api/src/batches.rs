//! Runs and batch records: a pharmacist's run request to a device, the signed
//! records devices emit when a run ends, and QA's release or rejection of each batch
//! with an electronic signature (21 CFR Part 11). Transport-free, like
//! [`crate::Fleet`].
//!
//! A record is kept only if its device signature verifies with the certificate it
//! carries, that certificate chains to the fleet's device intermediate and names the
//! device that published it, and the record names that device and its registered
//! site. It is stored byte for byte as signed, so it can be verified again at any
//! time. QA's decision is bound to the record's digest and appended to the audit
//! chain in the same commit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nanofleet_ingest::RecordError;
use nanofleet_pki::FleetCa;
use nanofleet_proto::Message as _;
use nanofleet_proto::device::v1::{
    Ack, AckResult, BatchRecord, Person, RunOutcome, RunRequest, SignatureMeaning, SignedBatchRecord,
};
use nanofleet_proto::topics::Command;
use nanofleet_proto::v1 as pb;
use nanofleet_store::{
    AuditEntry, BatchDecision, BatchFilter, BatchRow, CartridgeUse, RunAnswer, RunRequestRecord, Store,
};
use tokio::sync::oneshot;

use crate::{Actor, Caller, CommandSink, Error, Fleet, People, Role, now_ms};

/// How long a run request waits for the device's answer.
pub const RUN_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs and batches; cheap to clone.
#[derive(Clone)]
pub struct Batches {
    store: Store,
    people: People,
    fleet: Fleet,
    ca: Arc<FleetCa>,
    sink: Arc<dyn CommandSink>,
    /// Run requests waiting for their device's answer, by request id.
    waiting: Arc<Mutex<HashMap<String, oneshot::Sender<Ack>>>>,
}

impl std::fmt::Debug for Batches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batches").finish_non_exhaustive()
    }
}

fn outcome_str(o: i32) -> &'static str {
    match RunOutcome::try_from(o).unwrap_or(RunOutcome::Unspecified) {
        RunOutcome::Complete => "complete",
        RunOutcome::Aborted => "aborted",
        RunOutcome::Unspecified => "unknown",
    }
}

fn outcome_pb(s: &str) -> RunOutcome {
    match s {
        "complete" => RunOutcome::Complete,
        "aborted" => RunOutcome::Aborted,
        _ => RunOutcome::Unspecified,
    }
}

fn decision_meaning(s: &str) -> SignatureMeaning {
    match s {
        "released" => SignatureMeaning::Released,
        "rejected" => SignatureMeaning::Rejected,
        _ => SignatureMeaning::Unspecified,
    }
}

/// The summary of a stored batch.
fn summary(row: &BatchRow, decision: Option<&BatchDecision>) -> pb::BatchSummary {
    let disposition = match decision.map(|d| d.meaning.as_str()) {
        Some("released") => pb::BatchDisposition::Released,
        Some("rejected") => pb::BatchDisposition::Rejected,
        _ if row.qc_passed => pb::BatchDisposition::AwaitingRelease,
        _ => pb::BatchDisposition::Failed,
    };
    pb::BatchSummary {
        batch_id: row.batch_id.clone(),
        device_id: row.device_id.clone(),
        site_id: row.site_id.clone(),
        recipe_id: row.recipe_id.clone(),
        recipe_version: u32::try_from(row.recipe_version).unwrap_or(0),
        started_unix_ms: row.started_ms,
        ended_unix_ms: row.ended_ms,
        outcome: outcome_pb(&row.outcome) as i32,
        qc_passed: row.qc_passed,
        disposition: disposition as i32,
        started_by: Some(Person {
            user_id: row.started_by.clone(),
            printed_name: row.started_by_name.clone(),
        }),
        cartridge_lot: row.cartridge_lot.clone(),
        prescription_id: row.prescription_id.clone(),
        decision: decision.map(|d| pb::BatchSignature {
            signer_id: d.signer_id.clone(),
            printed_name: d.printed_name.clone(),
            meaning: decision_meaning(&d.meaning) as i32,
            signed_unix_ms: d.signed_ms,
            reason: d.reason.clone(),
            record_digest: d.record_digest.clone(),
        }),
        received_unix_ms: row.received_ms,
    }
}

fn disposition_str(d: pb::BatchDisposition) -> &'static str {
    match d {
        pb::BatchDisposition::AwaitingRelease => "awaiting_release",
        pb::BatchDisposition::Released => "released",
        pb::BatchDisposition::Rejected => "rejected",
        pb::BatchDisposition::Failed => "failed",
        pb::BatchDisposition::Unspecified => "unknown",
    }
}

fn check_text(field: &'static str, value: &str, max: usize) -> Result<(), Error> {
    if value.is_empty() || value.len() > max || value.chars().any(char::is_control) {
        return Err(Error::invalid(field, value, format!("1 to {max} printable characters")));
    }
    Ok(())
}

impl Batches {
    pub fn new(
        store: Store,
        people: People,
        fleet: Fleet,
        ca: Arc<FleetCa>,
        sink: Arc<dyn CommandSink>,
    ) -> Batches {
        Batches { store, people, fleet, ca, sink, waiting: Arc::default() }
    }

    /// Sends a run request to a device for `caller` (a pharmacist of the device's
    /// site) and returns the device's answer.
    pub async fn start_run(
        &self,
        caller: &Caller,
        req: &pb::StartRunRequest,
    ) -> Result<pb::StartRunResponse, Error> {
        let device = self.fleet.device(&req.device_id).await?;
        caller.check_device_site(&req.device_id, &device.site_id)?;
        check_text("recipe_id", &req.recipe_id, 64)?;
        check_text("prescription_id", &req.prescription_id, 64)?;
        check_text("patient_pseudonym", &req.patient_pseudonym, 64)?;
        if req.cartridge.is_none() && req.cartridge_scan.is_empty() {
            return Err(Error::invalid(
                "cartridge",
                "",
                "the loaded cartridge: gtin, lot, serial, expiry, or its scan (cartridge_scan)",
            ));
        }
        if let Some(c) = &req.cartridge {
            nanofleet_inventory::gs1::check_gtin(&c.gtin)
                .map_err(|e| Error::invalid("cartridge.gtin", c.gtin.clone(), e.to_string()))?;
        }
        let max_scan = nanofleet_inventory::gs1::MAX_SCAN_LEN;
        if req.cartridge_scan.chars().count() > max_scan {
            return Err(Error::invalid(
                "cartridge_scan",
                req.cartridge_scan.chars().take(80).collect::<String>(),
                format!("a scanner's element string of at most {max_scan} characters"),
            ));
        }
        if req.prescription_unix_ms <= 0 {
            return Err(Error::invalid(
                "prescription_unix_ms",
                req.prescription_unix_ms.to_string(),
                "the time the prescription was written, ms since the Unix epoch",
            ));
        }
        if !device.online {
            return Err(Error::Conflict(format!(
                "device {} is not connected: a run starts on a device that is online",
                req.device_id
            )));
        }
        let request_id = format!("RQ-{}", hex::encode(rand::random::<[u8; 12]>()));
        let now = now_ms();
        let request = RunRequest {
            request_id: request_id.clone(),
            recipe_id: req.recipe_id.clone(),
            recipe_version: req.recipe_version,
            cartridge: req.cartridge.clone(),
            prescription_id: req.prescription_id.clone(),
            prescription_unix_ms: req.prescription_unix_ms,
            patient_pseudonym: req.patient_pseudonym.clone(),
            dispensing_site_id: device.site_id.clone(),
            started_by: Some(Person {
                user_id: caller.person_id.clone(),
                printed_name: caller.display_name.clone(),
            }),
            requested_unix_ms: now,
            cartridge_scan: req.cartridge_scan.clone(),
        };
        let record = RunRequestRecord {
            request_id: request_id.clone(),
            device_id: req.device_id.clone(),
            site_id: device.site_id.clone(),
            recipe_id: req.recipe_id.clone(),
            recipe_version: i64::from(req.recipe_version),
            requested_by: caller.person_id.clone(),
            requested_ms: now,
            state: "sent".into(),
            code: String::new(),
            reason: String::new(),
            batch_id: String::new(),
            answered_ms: 0,
        };
        let audit = AuditEntry {
            at_ms: now,
            actor: caller.actor().0,
            action: "run.request".into(),
            subject: request_id.clone(),
            site_id: Some(device.site_id.clone()),
            reason: format!("run {} on {}", req.recipe_id, req.device_id),
            old_value: None,
            new_value: Some(
                serde_json::json!({
                    "device_id": req.device_id,
                    "recipe_id": req.recipe_id,
                    "recipe_version": req.recipe_version,
                    "prescription_id": req.prescription_id,
                    "cartridge_lot": req.cartridge.as_ref().map(|c| c.lot.clone()),
                    "cartridge_serial": req.cartridge.as_ref().map(|c| c.serial.clone()),
                })
                .to_string(),
            ),
        };
        self.store.insert_run_request(&record, &audit).await?;
        let (tx, rx) = oneshot::channel();
        self.lock_waiting().insert(request_id.clone(), tx);
        let sent = self.sink.send(&req.device_id, Command::Run, request.encode_to_vec()).await;
        if !sent {
            self.lock_waiting().remove(&request_id);
            return Err(Error::Conflict(format!(
                "device {} disconnected before the request reached it; nothing was started",
                req.device_id
            )));
        }
        match tokio::time::timeout(RUN_ANSWER_TIMEOUT, rx).await {
            Ok(Ok(ack)) => Ok(pb::StartRunResponse {
                request_id,
                accepted: ack.result == AckResult::Accepted as i32,
                code: ack.code,
                reason: ack.reason,
            }),
            _ => {
                self.lock_waiting().remove(&request_id);
                Err(Error::DeviceUnavailable(format!(
                    "device {} did not answer run request {request_id} within {}s; it may still start: check `nanofleet batches list --device {}`",
                    req.device_id,
                    RUN_ANSWER_TIMEOUT.as_secs(),
                    req.device_id
                )))
            }
        }
    }

    fn lock_waiting(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Ack>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A device answered a run request: stored, audited, and handed to the caller
    /// waiting for it.
    pub async fn run_answered(&self, device_id: &str, ack: Ack) -> Result<(), String> {
        let accepted = ack.result == AckResult::Accepted as i32;
        let answer = RunAnswer {
            request_id: ack.subject_id.clone(),
            device_id: device_id.to_owned(),
            state: if accepted { "accepted" } else { "refused" }.into(),
            code: ack.code.clone(),
            reason: ack.reason.clone(),
            batch_id: if accepted { ack.digest.clone() } else { String::new() },
            answered_ms: now_ms(),
        };
        let audit = AuditEntry {
            at_ms: answer.answered_ms,
            actor: Actor::device(device_id).0,
            action: if accepted { "run.start" } else { "run.refused" }.into(),
            subject: ack.subject_id.clone(),
            site_id: None,
            reason: if accepted {
                format!("batch {}", ack.digest)
            } else {
                format!("{}: {}", ack.code, ack.reason)
            },
            old_value: None,
            new_value: Some(serde_json::json!({"code": ack.code, "batch_id": answer.batch_id}).to_string()),
        };
        if !accepted {
            tracing::warn!(device_id, request = %ack.subject_id, code = %ack.code, reason = %ack.reason, "device refused a run");
        }
        self.store.answer_run_request(&answer, &audit).await.map_err(|e| e.to_string())?;
        if let Some(waiter) = self.lock_waiting().remove(&ack.subject_id) {
            let _ = waiter.send(ack);
        }
        Ok(())
    }

    /// A device published a signed batch record: verified, then stored with its audit
    /// record before the message is acknowledged.
    /// Returns the cartridge the record names, as stored with it.
    pub async fn recorded(&self, device_id: &str, bytes: &[u8]) -> Result<Option<CartridgeUse>, RecordError> {
        let refuse = |reason: String| {
            tracing::warn!(device_id, %reason, "batch record refused");
            RecordError::Refused(reason)
        };
        let v = nanofleet_recipe::batch::verify(bytes, device_id).map_err(refuse)?;
        let who = self
            .ca
            .verify_device_cert(&v.certificate, v.record.ended_unix_ms)
            .map_err(|e| refuse(format!("batch {}: {e}", v.record.batch_id)))?;
        if who.device_id != device_id {
            return Err(refuse(format!("the certificate names {}, not {device_id}", who.device_id)));
        }
        let device = self.fleet.device(device_id).await.map_err(|e| match e {
            Error::NotFound { .. } => refuse(format!("device {device_id} is not registered")),
            e => RecordError::Storage(e.to_string()),
        })?;
        let r = &v.record;
        if r.site_id != device.site_id {
            return Err(refuse(format!(
                "batch {}: the record names site {:?}, the device belongs to {:?}",
                r.batch_id, r.site_id, device.site_id
            )));
        }
        let serial = nanofleet_pki::device_identity_of(&v.certificate).map(|(_, s)| s).unwrap_or_default();
        let started_by = r.started_by.clone().unwrap_or_default();
        let row = BatchRow {
            batch_id: r.batch_id.clone(),
            device_id: device_id.to_owned(),
            site_id: r.site_id.clone(),
            recipe_id: r.recipe_id.clone(),
            recipe_version: i64::from(r.recipe_version),
            started_ms: r.started_unix_ms,
            ended_ms: r.ended_unix_ms,
            outcome: outcome_str(r.outcome).into(),
            qc_passed: nanofleet_recipe::batch::passed(r),
            started_by: started_by.user_id,
            started_by_name: started_by.printed_name,
            cartridge_lot: r.cartridge.as_ref().map(|c| c.lot.clone()).unwrap_or_default(),
            prescription_id: r.prescription_id.clone(),
            certificate_serial: serial,
            record_digest: v.digest.clone(),
            envelope: bytes.to_vec(),
            received_ms: now_ms(),
        };
        let failed: Vec<String> =
            r.qc.iter()
                .filter(|q| !q.passed)
                .map(|q| {
                    nanofleet_proto::device::v1::QualityAttribute::try_from(q.attribute)
                        .map(|a| a.as_str_name().trim_start_matches("QUALITY_ATTRIBUTE_").to_lowercase())
                        .unwrap_or_default()
                })
                .collect();
        let audit = AuditEntry {
            at_ms: row.received_ms,
            actor: Actor::device(device_id).0,
            action: "batch.record".into(),
            subject: r.batch_id.clone(),
            site_id: Some(r.site_id.clone()),
            reason: format!(
                "{} {} v{}: {}",
                outcome_str(r.outcome),
                r.recipe_id,
                r.recipe_version,
                if row.qc_passed { "QC passed".to_owned() } else { format!("QC failed {failed:?}") }
            ),
            old_value: None,
            new_value: Some(
                serde_json::json!({
                    "digest": v.digest,
                    "outcome": outcome_str(r.outcome),
                    "qc_passed": row.qc_passed,
                    "request_id": r.request_id,
                })
                .to_string(),
            ),
        };
        let (metrics, limits) = crate::monitoring::batch_metrics(r);
        let used = r.cartridge.as_ref().map(|c| CartridgeUse {
            batch_id: r.batch_id.clone(),
            gtin: c.gtin.clone(),
            lot: c.lot.clone(),
            serial: c.serial.clone(),
            device_id: device_id.to_owned(),
            site_id: r.site_id.clone(),
            prescription_id: r.prescription_id.clone(),
            patient_pseudonym: r.patient_pseudonym.clone(),
            started_ms: r.started_unix_ms,
        });
        match self.store.insert_batch(&row, used.as_ref(), &metrics, &limits, &audit).await {
            Ok(_) => Ok(used),
            Err(nanofleet_store::Error::Conflict(e)) => Err(refuse(e)),
            Err(e) => Err(RecordError::Storage(e.to_string())),
        }
    }

    /// Batches `caller` may see, newest first.
    pub async fn list(
        &self,
        caller: &Caller,
        req: &pb::ListBatchesRequest,
    ) -> Result<Vec<pb::BatchSummary>, Error> {
        let site = caller.listing_site(&req.site_id)?;
        let some = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        let limit = match req.limit {
            0 => 100,
            n => i64::from(n.min(1000)),
        };
        let want =
            pb::BatchDisposition::try_from(req.disposition).unwrap_or(pb::BatchDisposition::Unspecified);
        let filter = BatchFilter {
            site_id: some(&site),
            device_id: some(&req.device_id),
            recipe_id: some(&req.recipe_id),
            // Filtered by disposition below: fetch more to fill the page.
            limit: if want == pb::BatchDisposition::Unspecified { limit } else { limit * 10 },
        };
        let rows = self.store.batches(&filter).await?;
        Ok(rows
            .iter()
            .map(|(row, d)| summary(row, d.as_ref()))
            .filter(|s| want == pb::BatchDisposition::Unspecified || s.disposition == want as i32)
            .take(usize::try_from(limit).unwrap_or(100))
            .collect())
    }

    async fn stored(
        &self,
        caller: &Caller,
        batch_id: &str,
    ) -> Result<(BatchRow, Option<BatchDecision>), Error> {
        let not_found = || Error::NotFound { what: "batch", id: batch_id.to_owned() };
        let (row, decision) = self.store.batch(batch_id).await?.ok_or_else(not_found)?;
        if caller.site_limit().is_some_and(|own| own != row.site_id) {
            return Err(not_found());
        }
        Ok((row, decision))
    }

    /// One batch with its full record.
    pub async fn get(&self, caller: &Caller, batch_id: &str) -> Result<pb::GetBatchResponse, Error> {
        let (row, decision) = self.stored(caller, batch_id).await?;
        let record = SignedBatchRecord::decode(row.envelope.as_slice())
            .ok()
            .and_then(|s| s.envelope)
            .and_then(|e| BatchRecord::decode(e.payload.as_slice()).ok())
            .ok_or_else(|| Error::Unavailable(format!("stored batch {batch_id} does not decode")))?;
        Ok(pb::GetBatchResponse {
            summary: Some(summary(&row, decision.as_ref())),
            record: Some(record),
            certificate_serial: row.certificate_serial.clone(),
            record_digest: row.record_digest.clone(),
        })
    }

    /// QA releases or rejects a batch with an electronic signature.
    pub async fn release(
        &self,
        caller: &Caller,
        req: &pb::ReleaseBatchRequest,
    ) -> Result<pb::BatchSummary, Error> {
        let meaning = SignatureMeaning::try_from(req.meaning).unwrap_or(SignatureMeaning::Unspecified);
        let word = match meaning {
            SignatureMeaning::Released => "released",
            SignatureMeaning::Rejected => "rejected",
            _ => return Err(Error::invalid("meaning", req.meaning.to_string(), "RELEASED or REJECTED")),
        };
        if req.user_id != caller.person_id {
            return Err(Error::PermissionDenied(format!(
                "a signature is made by the signed-in person: user id {:?} is not {:?}",
                req.user_id, caller.person_id
            )));
        }
        if caller.role != Role::Qa {
            return Err(Error::PermissionDenied(format!(
                "releasing or rejecting a batch needs the qa role; {} is {}",
                caller.person_id,
                caller.role.as_str()
            )));
        }
        if meaning == SignatureMeaning::Rejected {
            check_text("reason", &req.reason, 500)?;
        } else if req.reason.len() > 500 {
            return Err(Error::invalid(
                "reason",
                &req.reason[..40.min(req.reason.len())],
                "at most 500 characters",
            ));
        }
        let (row, decision) = self.stored(caller, &req.batch_id).await?;
        if let Some(d) = decision {
            return Err(Error::Conflict(format!(
                "batch {} was {} by {} already; a decision is final",
                row.batch_id, d.meaning, d.printed_name
            )));
        }
        if meaning == SignatureMeaning::Released && !row.qc_passed {
            return Err(Error::Conflict(format!(
                "batch {} is {} and did not pass QC: it can only be rejected",
                row.batch_id, row.outcome
            )));
        }
        // Both identification components, checked (and failures audited) now.
        self.people.verify_password(&req.user_id, &req.password, "batch signature").await?;
        let person = self.people.person(&caller.person_id).await?;
        let signed_ms = now_ms();
        let d = BatchDecision {
            batch_id: row.batch_id.clone(),
            meaning: word.into(),
            signer_id: caller.person_id.clone(),
            printed_name: person.display_name.clone(),
            reason: req.reason.clone(),
            signed_ms,
            record_digest: row.record_digest.clone(),
        };
        let audit = AuditEntry {
            at_ms: signed_ms,
            actor: caller.actor().0,
            action: if meaning == SignatureMeaning::Released { "batch.release" } else { "batch.reject" }
                .into(),
            subject: row.batch_id.clone(),
            site_id: Some(row.site_id.clone()),
            reason: if req.reason.is_empty() { format!("signed as {word}") } else { req.reason.clone() },
            old_value: None,
            new_value: Some(
                serde_json::json!({
                    "meaning": word,
                    "printed_name": person.display_name,
                    "signed_unix_ms": signed_ms,
                    "record_digest": row.record_digest,
                })
                .to_string(),
            ),
        };
        self.store.decide_batch(&d, &audit).await.map_err(|e| match e {
            nanofleet_store::Error::Conflict(m) => Error::Conflict(m),
            e => e.into(),
        })?;
        Ok(summary(&row, Some(&d)))
    }

    /// The record as JSON (for scripts and archives) or printable HTML.
    pub async fn export(
        &self,
        caller: &Caller,
        batch_id: &str,
        format: pb::ExportFormat,
    ) -> Result<(String, Vec<u8>), Error> {
        let batch = self.get(caller, batch_id).await?;
        match format {
            pb::ExportFormat::Json | pb::ExportFormat::Unspecified => {
                let (row, _) = self.stored(caller, batch_id).await?;
                let mut doc = batch_json(&batch);
                doc["signed_record_base64"] = serde_json::Value::String(base64_encode(&row.envelope));
                let text = serde_json::to_vec_pretty(&doc).unwrap_or_default();
                Ok(("application/json".into(), text))
            }
            pb::ExportFormat::Html => {
                Ok(("text/html; charset=utf-8".into(), crate::batch_doc::html(&batch).into_bytes()))
            }
        }
    }
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A batch summary as JSON.
pub fn summary_json(s: &pb::BatchSummary) -> serde_json::Value {
    let by = s.started_by.clone().unwrap_or_default();
    serde_json::json!({
        "batch_id": s.batch_id,
        "device_id": s.device_id,
        "site_id": s.site_id,
        "recipe_id": s.recipe_id,
        "recipe_version": s.recipe_version,
        "started_unix_ms": s.started_unix_ms,
        "ended_unix_ms": s.ended_unix_ms,
        "outcome": outcome_str(s.outcome),
        "qc_passed": s.qc_passed,
        "disposition": disposition_str(pb::BatchDisposition::try_from(s.disposition).unwrap_or(pb::BatchDisposition::Unspecified)),
        "started_by": {"user_id": by.user_id, "printed_name": by.printed_name},
        "cartridge_lot": s.cartridge_lot,
        "prescription_id": s.prescription_id,
        "received_unix_ms": s.received_unix_ms,
        "decision": s.decision.as_ref().map(|d| serde_json::json!({
            "signer_id": d.signer_id,
            "printed_name": d.printed_name,
            "meaning": crate::json::signature_meaning(d.meaning),
            "signed_unix_ms": d.signed_unix_ms,
            "reason": d.reason,
            "record_digest": d.record_digest,
        })),
    })
}

/// A batch with its full record (the proto3 JSON form of `BatchRecord`) as JSON.
pub fn batch_json(b: &pb::GetBatchResponse) -> serde_json::Value {
    let record = b.record.clone().unwrap_or_default();
    serde_json::json!({
        "summary": b.summary.as_ref().map(summary_json),
        "certificate_serial": b.certificate_serial,
        "record_digest": b.record_digest,
        "recipe_signatures": crate::batch_doc::recipe_signatures(&record).iter().map(|s| serde_json::json!({
            "signer_id": s.signer_id,
            "printed_name": s.printed_name,
            "meaning": crate::json::signature_meaning(s.meaning),
            "signed_unix_ms": s.signed_unix_ms,
        })).collect::<Vec<_>>(),
        "record": nanofleet_recipe::json::to_json("nanofleet.device.v1.BatchRecord", &record),
    })
}
