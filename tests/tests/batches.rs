//! Runs and batch records against a real server and simulated devices over mutual
//! TLS: a pharmacist starts runs, each interlock refuses what it must (answered by the
//! device, audited), a run executes its phases and the device signs the batch record,
//! QA releases it with an electronic signature, and the record exports as JSON that
//! verifies again and as a printable document naming every signature.

use std::time::Duration;

use nanofleet_proto::Message as _;
use nanofleet_proto::device::v1::{
    BatchRecord, Cartridge, Envelope, EnvelopeSignature, Recipe, RunPhase, SignatureMeaning,
    SignedBatchRecord,
};
use nanofleet_proto::v1 as pb;
use nanofleet_proto::v1::batch_service_client::BatchServiceClient;
use nanofleet_proto::v1::recipe_service_client::RecipeServiceClient;
use nanofleet_tests::agent::start_sim_device;
use nanofleet_tests::{Sandbox, eventually, now_ms};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Authed = InterceptedService<Channel, nanofleet::cli::Bearer>;

struct Person {
    id: String,
    password: String,
    recipes: RecipeServiceClient<Authed>,
    batches: BatchServiceClient<Authed>,
}

async fn person(sb: &Sandbox, id: &str, name: &str, role: pb::Role, site: &str) -> anyhow::Result<Person> {
    let channel = sb.grpc_channel().await?;
    let (bearer, password) = sb.person_named(id, name, role, site).await?;
    Ok(Person {
        id: id.into(),
        password,
        recipes: RecipeServiceClient::with_interceptor(channel.clone(), bearer.clone()),
        batches: BatchServiceClient::with_interceptor(channel, bearer),
    })
}

impl Person {
    async fn sign(&mut self, recipe_id: &str, meaning: SignatureMeaning) -> anyhow::Result<()> {
        let req = pb::SignRecipeRequest {
            recipe_id: recipe_id.into(),
            version: 1,
            meaning: meaning as i32,
            user_id: self.id.clone(),
            password: self.password.clone(),
        };
        self.recipes.sign_recipe(req).await?;
        Ok(())
    }

    async fn decide(
        &mut self,
        batch_id: &str,
        meaning: SignatureMeaning,
        reason: &str,
        password: &str,
    ) -> Result<pb::BatchSummary, tonic::Status> {
        let req = pb::ReleaseBatchRequest {
            batch_id: batch_id.into(),
            meaning: meaning as i32,
            reason: reason.into(),
            user_id: self.id.clone(),
            password: password.into(),
        };
        Ok(self.batches.release_batch(req).await?.into_inner().summary.unwrap_or_default())
    }
}

/// The example recipe with a procedure of about twenty seconds: 0.6 mL collected at
/// 12 mL/min, three volumes of buffer exchanged.
fn quick_recipe(id: &str, site: &str) -> Recipe {
    nanofleet_tests::quick_recipe(id, site, 12, 9.0)
}

fn run_request(device: &str, recipe: &str, serial: &str) -> pb::StartRunRequest {
    pb::StartRunRequest {
        device_id: device.into(),
        recipe_id: recipe.into(),
        recipe_version: 0,
        cartridge: Some(Cartridge {
            gtin: nanofleet_recipe::example::EXAMPLE_GTIN.into(),
            lot: "L2611A".into(),
            serial: serial.into(),
            expires_unix_ms: now_ms() + 90 * 86_400_000,
        }),
        prescription_id: "RX-0042".into(),
        prescription_unix_ms: now_ms() - 3_600_000,
        patient_pseudonym: "PT-7F3A".into(),
        cartridge_scan: String::new(),
    }
}

async fn start(p: &mut Person, req: pb::StartRunRequest) -> anyhow::Result<pb::StartRunResponse> {
    Ok(p.batches.start_run(req).await?.into_inner())
}

async fn batch_of(sb: &Sandbox, device: &str, n: usize) -> anyhow::Result<Vec<nanofleet_store::BatchRow>> {
    let store = sb.server.store.clone();
    eventually("the batch records", Duration::from_secs(60), || async {
        let filter =
            nanofleet_store::BatchFilter { device_id: Some(device.into()), limit: 100, ..Default::default() };
        let rows: Vec<_> = store.batches(&filter).await.ok()?.into_iter().map(|(r, _)| r).collect();
        (rows.len() >= n).then_some(rows)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_passes_its_interlocks_and_leaves_a_signed_record_that_qa_releases() -> anyhow::Result<()> {
    let sb = Sandbox::start().await?;
    let good = sb.enroll_device("site-b", "NF-B-01").await?;
    let faulty = sb.enroll_device("site-b", "NF-B-02").await?;
    let mut bob = person(&sb, "bob", "Bob Lindqvist, PharmD", pb::Role::Pharmacist, "site-b").await?;
    let mut quinn = person(&sb, "quinn", "Quinn Okafor", pb::Role::Qa, "").await?;
    sb.server.ensure_site("site-c", "Site C", "UTC").await?;
    let mut other_site = person(&sb, "eve", "Eve Other", pb::Role::Pharmacist, "site-c").await?;

    let state_good = tempfile::tempdir()?;
    let state_faulty = tempfile::tempdir()?;
    let stop_good = start_sim_device(&sb, &good, state_good.path(), None)?;
    let stop_faulty = start_sim_device(
        &sb,
        &faulty,
        state_faulty.path(),
        Some(nanofleet_agent::sim::Fault::EthanolLineFault),
    )?;
    bob.recipes.save_draft(pb::SaveDraftRequest { recipe: Some(quick_recipe("run-x", "site-b")) }).await?;
    bob.sign("run-x", SignatureMeaning::Authored).await?;
    quinn.sign("run-x", SignatureMeaning::Approved).await?;
    let store = sb.server.store.clone();
    for device in ["NF-B-01", "NF-B-02"] {
        eventually("the recipe accepted", Duration::from_secs(30), || async {
            store
                .recipe_deliveries("run-x", 1)
                .await
                .ok()?
                .into_iter()
                .find(|d| d.device_id == device && d.state == "accepted")
        })
        .await?;
    }

    // Each interlock, answered by the device with its code and reason.
    let refused = |r: pb::StartRunResponse, code: &str, text: &str| {
        assert!(!r.accepted, "{code}: accepted");
        assert_eq!(r.code, code, "{}", r.reason);
        assert!(r.reason.contains(text), "{code}: {:?} lacks {text:?}", r.reason);
    };
    let mut req = run_request("NF-B-01", "run-x", "C-0001");
    req.cartridge.as_mut().unwrap().gtin = "10614141000026".into();
    refused(start(&mut bob, req).await?, "cartridge_wrong_type", "10614141000026");
    // A GTIN whose check digit does not match is a misread, refused before it is sent.
    let mut req = run_request("NF-B-01", "run-x", "C-0001");
    req.cartridge.as_mut().unwrap().gtin = "10614141000027".into();
    let e = bob.batches.start_run(req).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
    assert!(
        e.message().contains("cartridge.gtin") && e.message().contains("check digit 7"),
        "{}",
        e.message()
    );
    let mut req = run_request("NF-B-01", "run-x", "C-0001");
    req.cartridge.as_mut().unwrap().expires_unix_ms = now_ms() - 86_400_000;
    refused(start(&mut bob, req).await?, "cartridge_expired", "expired");
    let mut req = run_request("NF-B-01", "run-x", "C-0001");
    req.prescription_unix_ms = now_ms() + 3_600_000;
    refused(start(&mut bob, req).await?, "prescription_not_before_run", "RX-0042");
    refused(
        start(&mut bob, run_request("NF-B-01", "flu-other", "C-0001")).await?,
        "recipe_not_held",
        "run-x",
    );
    let mut req = run_request("NF-B-01", "run-x", "C-0001");
    req.recipe_version = 7;
    refused(start(&mut bob, req).await?, "recipe_version_mismatch", "version 1");
    let audit = store
        .list_audit(&nanofleet_store::AuditFilter {
            action: Some("run.refused".into()),
            ..Default::default()
        })
        .await?;
    assert_eq!(audit.len(), 5, "every refusal audited: {audit:?}");
    assert!(audit.iter().all(|a| a.entry.actor == "device:NF-B-01"));

    // A pharmacist of another site does not see the device; bad input is named.
    let e = other_site.batches.start_run(run_request("NF-B-01", "run-x", "C-0001")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{}", e.message());
    let mut req = run_request("NF-B-01", "run-x", "C-0001");
    req.patient_pseudonym.clear();
    let e = bob.batches.start_run(req).await.unwrap_err();
    assert!(e.message().contains("patient_pseudonym"), "{}", e.message());

    // The run starts; a second one is refused while it goes.
    let ok = start(&mut bob, run_request("NF-B-01", "run-x", "C-0001")).await?;
    assert!(ok.accepted, "{ok:?}");
    refused(start(&mut bob, run_request("NF-B-01", "run-x", "C-0002")).await?, "run_active", "under way");
    let faulty_run = start(&mut bob, run_request("NF-B-02", "run-x", "C-0100")).await?;
    assert!(faulty_run.accepted, "{faulty_run:?}");

    // The record arrives, signed by the device, with everything in it.
    let rows = batch_of(&sb, "NF-B-01", 1).await?;
    let id = rows[0].batch_id.clone();
    let b = bob.batches.get_batch(pb::GetBatchRequest { batch_id: id.clone() }).await?.into_inner();
    let s = b.summary.clone().unwrap();
    let r = b.record.clone().unwrap();
    assert_eq!(s.disposition, pb::BatchDisposition::AwaitingRelease as i32, "{s:?} {:?}", r.qc);
    assert!(s.qc_passed);
    assert_eq!(r.request_id, ok.request_id);
    assert_eq!((r.recipe_id.as_str(), r.recipe_version), ("run-x", 1));
    assert_eq!(r.recipe_signatures.len(), 2, "both recipe signatures travel with the record");
    assert_eq!(r.started_by.as_ref().map(|p| p.user_id.as_str()), Some("bob"));
    assert_eq!(r.cartridge.as_ref().map(|c| c.serial.as_str()), Some("C-0001"));
    assert_eq!(r.patient_pseudonym, "PT-7F3A");
    let phases: Vec<i32> = r.phases.iter().map(|p| p.phase).collect();
    assert!(
        phases.contains(&(RunPhase::Collect as i32)) && phases.contains(&(RunPhase::Complete as i32)),
        "{phases:?}"
    );
    let collect = r.phases.iter().find(|p| p.phase == RunPhase::Collect as i32).unwrap();
    assert!((collect.setpoint_total_flow_ml_min - 12.0).abs() < 1e-6, "{collect:?}");
    assert!((collect.actual_total_flow_ml_min - 12.0).abs() < 1.0, "{collect:?}");
    assert_eq!(r.qc.len(), 5, "{:?}", r.qc);

    // The cartridge ran once.
    refused(start(&mut bob, run_request("NF-B-01", "run-x", "C-0001")).await?, "cartridge_used", "C-0001");

    // The faulty device's batch failed QC: it can only be rejected.
    let failed = batch_of(&sb, "NF-B-02", 1).await?;
    assert!(!failed[0].qc_passed, "{:?}", failed[0]);
    let e = quinn.decide(&failed[0].batch_id, SignatureMeaning::Released, "", &quinn.password.clone()).await;
    assert_eq!(e.unwrap_err().code(), tonic::Code::FailedPrecondition);
    let rejected = quinn
        .decide(
            &failed[0].batch_id,
            SignatureMeaning::Rejected,
            "encapsulation below 85 %",
            &quinn.password.clone(),
        )
        .await?;
    assert_eq!(rejected.disposition, pb::BatchDisposition::Rejected as i32);

    // Release: QA only, with the right password, once.
    let e = bob.decide(&id, SignatureMeaning::Released, "", &bob.password.clone()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{}", e.message());
    let e = quinn.decide(&id, SignatureMeaning::Released, "", "wrong password").await.unwrap_err();
    assert_ne!(e.code(), tonic::Code::Ok);
    let released = quinn.decide(&id, SignatureMeaning::Released, "", &quinn.password.clone()).await?;
    assert_eq!(released.disposition, pb::BatchDisposition::Released as i32);
    let d = released.decision.clone().unwrap();
    assert_eq!(
        (d.printed_name.as_str(), d.record_digest.as_str()),
        ("Quinn Okafor", rows[0].record_digest.as_str())
    );
    let e = quinn.decide(&id, SignatureMeaning::Rejected, "changed my mind", &quinn.password.clone()).await;
    assert_eq!(e.unwrap_err().code(), tonic::Code::FailedPrecondition);

    // Exports: JSON that verifies again, and a document naming every signature.
    let json = quinn
        .batches
        .export_batch(pb::ExportBatchRequest { batch_id: id.clone(), format: pb::ExportFormat::Json as i32 })
        .await?
        .into_inner();
    let doc: serde_json::Value = serde_json::from_slice(&json.content)?;
    use base64::Engine as _;
    let signed =
        base64::engine::general_purpose::STANDARD.decode(doc["signed_record_base64"].as_str().unwrap())?;
    let again = nanofleet_recipe::batch::verify(&signed, "NF-B-01").map_err(anyhow::Error::msg)?;
    assert_eq!(again.digest, rows[0].record_digest);
    sb.server
        .ca
        .verify_device_cert(&again.certificate, again.record.ended_unix_ms)
        .map_err(anyhow::Error::msg)?;
    assert_eq!(doc["summary"]["disposition"], "released");
    // `nanofleet batches verify`: the same without the server, from the device intermediates.
    let bundle = nanofleet_pki::tls::certs_from_file(&sb.server.ca.device_bundle_path())?;
    let text = String::from_utf8(json.content.clone())?;
    let check = nanofleet::cli::batches::verify_export(&text, &bundle)?;
    assert_eq!((check.batch_id.as_str(), check.device_id.as_str()), (id.as_str(), "NF-B-01"));
    assert!(
        check.decision.as_deref().is_some_and(|d| d.starts_with("released by Quinn Okafor")),
        "{check:?}"
    );
    let mut edited = doc.clone();
    let mut record = BatchRecord::decode(again.record.encode_to_vec().as_slice())?;
    record.patient_pseudonym = "PT-OTHER".into();
    let mut resigned = SignedBatchRecord::decode(signed.as_slice())?;
    resigned.envelope.as_mut().unwrap().payload = record.encode_to_vec();
    edited["signed_record_base64"] =
        serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(resigned.encode_to_vec()));
    let e = nanofleet::cli::batches::verify_export(&edited.to_string(), &bundle).unwrap_err();
    assert!(e.to_string().contains("signature does not verify"), "{e}");
    let mut restated = doc.clone();
    restated["record_digest"] = serde_json::Value::String("00".repeat(32));
    assert!(nanofleet::cli::batches::verify_export(&restated.to_string(), &bundle).is_err());
    let other_fleet = nanofleet_pki::tls::certs_from_pem("root", &sb.server.ca.root_pem())?;
    let e = nanofleet::cli::batches::verify_export(&text, &other_fleet).unwrap_err();
    assert!(e.to_string().contains("not a device certificate of this fleet"), "{e}");
    let html = quinn
        .batches
        .export_batch(pb::ExportBatchRequest { batch_id: id.clone(), format: pb::ExportFormat::Html as i32 })
        .await?
        .into_inner();
    assert!(html.content_type.starts_with("text/html"));
    let html = String::from_utf8(html.content)?;
    for text in [
        "Bob Lindqvist, PharmD",
        "Quinn Okafor",
        "authored",
        "approved",
        "released",
        "encapsulation",
        "PT-7F3A",
    ] {
        assert!(html.contains(text), "the printable record lacks {text:?}");
    }

    // Every step is in the audit chain.
    for action in ["run.request", "run.start", "batch.record", "batch.release", "batch.reject"] {
        let found = store
            .list_audit(&nanofleet_store::AuditFilter { action: Some(action.into()), ..Default::default() })
            .await?;
        assert!(!found.is_empty(), "no {action} in the audit chain");
    }

    // Records and decisions cannot be edited in the database.
    let pool =
        sqlx::SqlitePool::connect(&format!("sqlite://{}", sb.dir.path().join("nanofleet.db").display()))
            .await?;
    for sql in [
        "UPDATE batch_records SET qc_passed = 1",
        "DELETE FROM batch_records",
        "UPDATE batch_decisions SET printed_name = 'someone else'",
        "DELETE FROM batch_decisions",
    ] {
        let err = sqlx::query(sql).execute(&pool).await.expect_err(sql);
        assert!(err.to_string().contains("immutable"), "{sql}: {err}");
    }
    pool.close().await;
    stop_good.cancel();
    stop_faulty.cancel();
    sb.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_not_signed_by_the_device_key_is_refused_and_not_stored() -> anyhow::Result<()> {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
    let sb = Sandbox::start().await?;
    let creds = sb.enroll_device("site-b", "NF-B-09").await?;
    let tls = nanofleet_agent::enroll::Credentials::client_config(&creds)?;
    let mut device = nanofleet_tests::RawDevice::connect_with(nanofleet_tests::mqtt_options(
        sb.mqtts_addr(),
        "NF-B-09",
        Some(tls),
    ))
    .await?;
    device.birth("NF-B-09", "site-b").await?;
    let record = BatchRecord {
        batch_id: "NF-B-09-forged".into(),
        device_id: "NF-B-09".into(),
        site_id: "site-b".into(),
        started_unix_ms: now_ms() - 60_000,
        ended_unix_ms: now_ms(),
        qc_passed: true,
        ..Default::default()
    };
    let cert = nanofleet_pki::tls::certs_from_pem("chain", &creds.chain_pem)?[0].to_vec();
    // Signed by another key, with the device's real certificate.
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let other = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .map_err(|_| anyhow::anyhow!("key generation"))?;
    let other = nanofleet_recipe::batch::device_key(other.as_ref()).map_err(anyhow::Error::msg)?;
    let forged = nanofleet_recipe::batch::sign(&record, &other, &cert).map_err(anyhow::Error::msg)?;
    let reason = device.publish("nf/v1/NF-B-09/batch", forged.encode_to_vec()).await?;
    assert_ne!(reason, rumqttc::v5::mqttbytes::v5::PubAckReason::Success);
    // A record whose payload was changed after signing.
    let key = nanofleet_pki::tls::key_from_pem("key", &creds.key_pem)?;
    let own = nanofleet_recipe::batch::device_key(key.secret_der()).map_err(anyhow::Error::msg)?;
    let mut tampered = nanofleet_recipe::batch::sign(&record, &own, &cert).map_err(anyhow::Error::msg)?;
    let env: &mut Envelope = tampered.envelope.as_mut().unwrap();
    let mut changed = BatchRecord::decode(env.payload.as_slice())?;
    changed.patient_pseudonym = "PT-OTHER".into();
    env.payload = changed.encode_to_vec();
    let reason = device.publish("nf/v1/NF-B-09/batch", tampered.encode_to_vec()).await?;
    assert_ne!(reason, rumqttc::v5::mqttbytes::v5::PubAckReason::Success);
    // Two signatures, or none.
    let mut doubled = nanofleet_recipe::batch::sign(&record, &own, &cert).map_err(anyhow::Error::msg)?;
    let sig: EnvelopeSignature = doubled.envelope.as_ref().unwrap().signatures[0].clone();
    doubled.envelope.as_mut().unwrap().signatures.push(sig);
    let reason = device.publish("nf/v1/NF-B-09/batch", doubled.encode_to_vec()).await?;
    assert_ne!(reason, rumqttc::v5::mqttbytes::v5::PubAckReason::Success);
    let garbage = SignedBatchRecord { envelope: None, certificate: cert.clone() };
    let reason = device.publish("nf/v1/NF-B-09/batch", garbage.encode_to_vec()).await?;
    assert_ne!(reason, rumqttc::v5::mqttbytes::v5::PubAckReason::Success);
    // The genuine record is kept, once, however often it is sent.
    let genuine = nanofleet_recipe::batch::sign(&record, &own, &cert).map_err(anyhow::Error::msg)?;
    for _ in 0..2 {
        let reason = device.publish("nf/v1/NF-B-09/batch", genuine.encode_to_vec()).await?;
        assert_eq!(reason, rumqttc::v5::mqttbytes::v5::PubAckReason::Success);
    }
    let stored =
        sb.server.store.batches(&nanofleet_store::BatchFilter { limit: 10, ..Default::default() }).await?;
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert!(!stored[0].0.qc_passed, "a record without QC results never counts as passed");
    device.close().await;
    sb.stop().await;
    Ok(())
}
