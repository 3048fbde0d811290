//! The store on SQLite and on PostgreSQL: the same code and the same checks, the
//! latter against a real server.
//! Skips (with the reason) where no PostgreSQL answers; CI always provides one.

use nanofleet_store::{Birth, LastValues, Options, SettleStep, Store, TelemetryRecord, WriteBatch};

const STEP: SettleStep = SettleStep { rows: 1_000, devices: 1_000 };
use nanofleet_tests::skip_or_fail;
use sqlx::Connection as _;

fn admin_url() -> String {
    std::env::var("NANOFLEET_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A fresh database for this test, dropped at the end.
async fn fresh_database() -> Option<(String, String)> {
    let admin = admin_url();
    let mut conn = match sqlx::PgConnection::connect(&admin).await {
        Ok(c) => c,
        Err(e) => {
            skip_or_fail(&format!("no PostgreSQL at {admin}: {e}"));
            return None;
        }
    };
    let name = format!("nanofleet_test_{}_{}", std::process::id(), nanofleet_tests::now_ms());
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await.ok()?;
    let base = admin.rsplit_once('/').map(|(b, _)| b.to_owned()).unwrap_or(admin.clone());
    Some((name.clone(), format!("{base}/{name}")))
}

async fn drop_database(name: &str) {
    if let Ok(mut conn) = sqlx::PgConnection::connect(&admin_url()).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut conn).await;
    }
}

#[tokio::test]
async fn the_store_works_on_sqlite() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    exercise(&format!("sqlite://{}?mode=rwc", dir.path().join("s.db").display())).await
}

#[tokio::test]
async fn the_store_works_on_postgresql_as_on_sqlite() -> anyhow::Result<()> {
    let Some((name, url)) = fresh_database().await else { return Ok(()) };
    let result = exercise(&url).await;
    drop_database(&name).await;
    result
}

async fn exercise(url: &str) -> anyhow::Result<()> {
    let store =
        Store::open(&Options { url: url.into(), max_connections: 4, sqlite_sync_full: false }).await?;
    store.upsert_site("site-a", "Site A", 1).await?;
    let birth = Birth {
        device_id: "NF-PG-01".into(),
        site_id: "site-a".into(),
        model: "NF-200".into(),
        firmware_version: "2.3.1".into(),
        session_id: "s1".into(),
        time_ms: 1_000,
    };
    store.apply_birth(&birth).await?;
    let rec = |seq: i64| TelemetryRecord {
        device_id: "NF-PG-01".into(),
        seq,
        first_ms: seq * 100,
        last_ms: seq * 100 + 50,
        samples: 1,
        payload: vec![seq as u8, 0, 1],
    };
    let batch = WriteBatch {
        telemetry: vec![rec(1), rec(2), rec(2), rec(3)],
        last_values: vec![LastValues {
            device_id: "NF-PG-01".into(),
            seen_ms: 2_000,
            telemetry_seq: 3,
            sample_ms: 350,
            sample: vec![9],
        }],
        ..WriteBatch::default()
    };
    let out = store.write_batch(&batch).await?;
    assert_eq!(out.telemetry_inserted, 3, "the duplicate in the batch is skipped");
    let again =
        store.write_batch(&WriteBatch { telemetry: vec![rec(3), rec(4)], ..Default::default() }).await?;
    assert_eq!(again.telemetry_inserted, 1);
    assert_eq!(store.telemetry_seqs("NF-PG-01").await?, vec![1, 2, 3, 4]);
    // Landed rows move to the main table; a re-send is still recognised after the move.
    // A bounded step takes the first rows in key order and says more are waiting.
    let step = store.settle_telemetry(None, SettleStep { rows: 3, devices: 10 }, None).await?;
    assert_eq!((step.taken, step.moved, step.more), (3, 3, true));
    assert_eq!(store.telemetry_seqs("NF-PG-01").await?, vec![1, 2, 3, 4], "nothing lost between tables");
    let step = store.settle_telemetry(None, SettleStep { rows: 3, devices: 10 }, None).await?;
    assert_eq!((step.taken, step.moved), (1, 1));
    let step = store.settle_telemetry(None, SettleStep { rows: 3, devices: 10 }, None).await?;
    assert_eq!((step.taken, step.more), (0, false), "nothing left");
    let after =
        store.write_batch(&WriteBatch { telemetry: vec![rec(4), rec(5)], ..Default::default() }).await?;
    assert_eq!(after.telemetry_inserted, 1, "4 is in the main table, 5 is new");
    assert_eq!(store.telemetry_seqs("NF-PG-01").await?, vec![1, 2, 3, 4, 5]);
    assert_eq!(store.telemetry_count().await?, 5);
    let window = store.query_telemetry("NF-PG-01", 150, 550, 10).await?;
    assert_eq!(
        window.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5],
        "both tables, in order"
    );
    let newest = store.query_telemetry("NF-PG-01", 0, 10_000, 2).await?;
    assert_eq!(newest.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![4, 5], "the newest within the limit");
    assert_eq!(window[0].payload, vec![1, 0, 1], "payload bytes round-trip");
    // A step also ends after its last device: NF-PG-01's batch 5 and NF-Q-1's two
    // batches, then NF-Q-2's.
    let other = |device: &str, seq: i64| TelemetryRecord { device_id: device.into(), ..rec(seq) };
    store
        .write_batch(&WriteBatch {
            telemetry: vec![other("NF-Q-2", 1), other("NF-Q-1", 2), other("NF-Q-1", 1)],
            ..Default::default()
        })
        .await?;
    let two_devices = SettleStep { rows: 100, devices: 2 };
    let step = store.settle_telemetry(None, two_devices, None).await?;
    assert_eq!((step.taken, step.more), (3, true));
    assert_eq!(store.telemetry_seqs("NF-Q-2").await?, vec![1], "still landed, not lost");
    // A sweep goes on after the last key it took: a row landing behind it waits for
    // the next sweep, and the sweep ends at the end of the table.
    store.write_batch(&WriteBatch { telemetry: vec![rec(6)], ..Default::default() }).await?;
    let cursor = step.last.expect("where the sweep goes on");
    assert_eq!(cursor.device_id, "NF-Q-1");
    let step = store.settle_telemetry(None, two_devices, Some(&cursor)).await?;
    assert_eq!(step.taken, 1, "NF-Q-2 only");
    let step = store.settle_telemetry(None, two_devices, step.last.as_ref().or(Some(&cursor))).await?;
    assert_eq!((step.taken, step.more, step.last), (0, false, None), "the sweep is over");
    assert_eq!(store.telemetry_seqs("NF-PG-01").await?, vec![1, 2, 3, 4, 5, 6], "landed behind the sweep");
    // After a restart a landed row is still known: its re-send is not landed again,
    // and the next sweep still finds it.
    store.close().await;
    let store =
        Store::open(&Options { url: url.into(), max_connections: 4, sqlite_sync_full: false }).await?;
    let again = store.write_batch(&WriteBatch { telemetry: vec![rec(6)], ..Default::default() }).await?;
    assert_eq!(again.telemetry_inserted, 0, "landed before the restart");
    assert_eq!(store.settle_telemetry(None, two_devices, None).await?.taken, 1, "the next sweep takes it");
    assert_eq!(store.settle_telemetry(None, two_devices, None).await?.taken, 0);
    assert_eq!(store.telemetry_count().await?, 9);

    let d = store.get_device("NF-PG-01").await?.expect("device");
    assert!(d.online);
    assert_eq!((d.telemetry_seq, d.last_seen_ms, d.last_sample.clone()), (3, 2_000, Some(vec![9])));
    assert!(!store.apply_death("NF-PG-01", "an-old-session", 3_000).await?, "stale death ignored");
    assert!(store.apply_death("NF-PG-01", "s1", 3_000).await?);
    // Active alarms reach their own device whatever order the database sorts ids in.
    for id in ["NF-A2", "NF_A1", "nf-a3"] {
        store.apply_birth(&Birth { device_id: id.into(), session_id: "s".into(), ..birth.clone() }).await?;
    }
    let alarm = |id: &str, code: i64| nanofleet_store::AlarmChange {
        device_id: id.into(),
        code,
        line: 0,
        priority: 2,
        active: true,
        detail: format!("alarm {code} on {id}"),
        changed_ms: 5_000,
    };
    let alarms = vec![alarm("NF-A2", 1), alarm("NF_A1", 2), alarm("nf-a3", 3)];
    store.write_batch(&WriteBatch { alarms, ..Default::default() }).await?;
    for d in store.list_devices(Some("site-a")).await? {
        let want: Vec<String> = match d.id.as_str() {
            "NF-A2" => vec!["alarm 1 on NF-A2".into()],
            "NF_A1" => vec!["alarm 2 on NF_A1".into()],
            "nf-a3" => vec!["alarm 3 on nf-a3".into()],
            _ => vec![],
        };
        assert_eq!(d.active_alarms.iter().map(|a| a.detail.clone()).collect::<Vec<_>>(), want, "{}", d.id);
    }
    let sites = store.list_sites().await?;
    assert_eq!((sites[0].devices_total, sites[0].devices_online), (4, 3));
    store.close().await;
    Ok(())
}

#[tokio::test]
async fn recipes_work_on_sqlite() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    exercise_recipes(&format!("sqlite://{}?mode=rwc", dir.path().join("r.db").display())).await
}

#[tokio::test]
async fn recipes_work_on_postgresql_as_on_sqlite() -> anyhow::Result<()> {
    let Some((name, url)) = fresh_database().await else { return Ok(()) };
    let result = exercise_recipes(&url).await;
    drop_database(&name).await;
    result
}

fn audit(action: &str) -> nanofleet_store::AuditEntry {
    nanofleet_store::AuditEntry {
        at_ms: nanofleet_tests::now_ms(),
        actor: "person:test".into(),
        action: action.into(),
        subject: "r v1".into(),
        site_id: None,
        reason: "test".into(),
        old_value: None,
        new_value: None,
    }
}

/// Drafts, signatures, release with deliveries, answers, trust root versions, and the
/// database refusing to edit a released version or a signature.
async fn exercise_recipes(url: &str) -> anyhow::Result<()> {
    use nanofleet_store::{DeliveryRecord, RecipeRecord, RecipeSignatureRecord, SignCommit};
    let store =
        Store::open(&Options { url: url.into(), max_connections: 4, sqlite_sync_full: false }).await?;
    let mut draft = RecipeRecord {
        recipe_id: "r".into(),
        version: 1,
        name: "first".into(),
        status: "draft".into(),
        body: vec![1, 2, 3],
        digest: "d1".into(),
        created_by: "alice".into(),
        created_ms: 1,
        released_ms: 0,
        rejected_by: String::new(),
        rejected_reason: String::new(),
    };
    store.save_recipe_draft(&draft, &audit("recipe.draft")).await?;
    draft.name = "second".into();
    store.save_recipe_draft(&draft, &audit("recipe.draft")).await?;
    assert_eq!(store.get_recipe("r", 1).await?.map(|r| r.name), Some("second".into()));
    assert_eq!(store.latest_recipe_version("r").await?, 1);
    let signature = |meaning: &str| RecipeSignatureRecord {
        recipe_id: "r".into(),
        version: 1,
        meaning: meaning.into(),
        signer_id: "alice".into(),
        printed_name: "Alice".into(),
        key_id: "k".into(),
        signed_ms: 2,
        envelope: vec![9],
    };
    let sign = |meaning: &str, from: &str, to: &str, deliver_to: Vec<String>| SignCommit {
        signature: signature(meaning),
        from_status: from.into(),
        to_status: to.into(),
        released_ms: 3,
        deliver_to,
        audit: vec![audit("recipe.sign")],
    };
    store.sign_recipe(&sign("authored", "draft", "authored", vec![])).await?;
    // Signed: the draft cannot change, and a signature of a status it no longer has is refused.
    assert!(matches!(
        store.save_recipe_draft(&draft, &audit("recipe.draft")).await,
        Err(nanofleet_store::Error::Conflict(_))
    ));
    assert!(matches!(
        store.sign_recipe(&sign("approved", "draft", "released", vec![])).await,
        Err(nanofleet_store::Error::Conflict(_))
    ));
    store.sign_recipe(&sign("approved", "authored", "released", vec!["NF-1".into(), "NF-2".into()])).await?;
    assert_eq!(store.recipe_signatures("r", 1).await?.len(), 2);
    assert_eq!(store.pending_devices("r", 1).await?, ["NF-1", "NF-2"]);
    assert!(store.ensure_delivery("NF-3", "r", 1).await?);
    assert!(!store.ensure_delivery("NF-3", "r", 1).await?);
    let answer = DeliveryRecord {
        device_id: "NF-1".into(),
        site_id: String::new(),
        recipe_id: "r".into(),
        version: 1,
        state: "refused".into(),
        code: "wrong_model".into(),
        reason: "an NF-100 recipe".into(),
        sent_ms: 0,
        answered_ms: 4,
    };
    let late = DeliveryRecord {
        device_id: "NF-9".into(),
        state: "accepted".into(),
        code: String::new(),
        ..answer.clone()
    };
    store.record_delivery_answers(&[(answer, Some(audit("recipe.refused"))), (late, None)]).await?;
    let targets: Vec<String> = ["NF-1", "NF-2", "NF-4", "NF-9"].map(String::from).to_vec();
    store.record_release_sends("r", 1, &targets, &["NF-2".into(), "NF-3".into()], 5).await?;
    let d = store.recipe_deliveries("r", 0).await?;
    assert_eq!(
        d.iter().map(|d| (d.device_id.as_str(), d.state.as_str())).collect::<Vec<_>>(),
        [
            ("NF-1", "refused"),
            ("NF-2", "pending"),
            ("NF-3", "pending"),
            ("NF-4", "pending"),
            ("NF-9", "accepted")
        ],
        "every target has a delivery; answers that came first are kept"
    );
    assert!(d.iter().filter(|d| d.device_id == "NF-2" || d.device_id == "NF-3").all(|d| d.sent_ms == 5));
    assert_eq!(store.pending_deliveries("NF-2").await?, [("r".to_owned(), 1)]);
    store.ensure_trust_root(1, "{\"v\":1}", 1).await?;
    store.ensure_trust_root(1, "{\"other\":1}", 1).await?;
    assert_eq!(store.trust_roots_after(0).await?, ["{\"v\":1}"]);
    // The database itself keeps released versions and signatures.
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(url).await?;
    for sql in [
        "UPDATE recipes SET name = 'changed'",
        "DELETE FROM recipes",
        "UPDATE recipe_signatures SET printed_name = 'someone else'",
        "DELETE FROM recipe_signatures",
    ] {
        assert!(sqlx::query(sql).execute(&mut conn).await.is_err(), "{sql} went through");
    }
    store.close().await;
    Ok(())
}

#[tokio::test]
async fn batches_work_on_sqlite() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    exercise_batches(&format!("sqlite://{}?mode=rwc", dir.path().join("b.db").display())).await
}

#[tokio::test]
async fn batches_work_on_postgresql_as_on_sqlite() -> anyhow::Result<()> {
    let Some((name, url)) = fresh_database().await else { return Ok(()) };
    let result = exercise_batches(&url).await;
    drop_database(&name).await;
    result
}

/// Run requests and their answers, batch records stored once (a re-send is not a
/// second batch, another record under the same id is refused), filters, a decision
/// made once, and the database refusing to edit a record or a decision.
async fn exercise_batches(url: &str) -> anyhow::Result<()> {
    use nanofleet_store::{
        BatchDecision, BatchFilter, BatchMetrics, BatchRow, Error, QualityLimit, RunAnswer, RunRequestRecord,
    };
    let store =
        Store::open(&Options { url: url.into(), max_connections: 4, sqlite_sync_full: false }).await?;
    let request = RunRequestRecord {
        request_id: "RQ-1".into(),
        device_id: "NF-1".into(),
        site_id: "site-a".into(),
        recipe_id: "r".into(),
        recipe_version: 1,
        requested_by: "bob".into(),
        requested_ms: 1,
        state: "sent".into(),
        code: String::new(),
        reason: String::new(),
        batch_id: String::new(),
        answered_ms: 0,
    };
    store.insert_run_request(&request, &audit("run.request")).await?;
    assert!(matches!(
        store.insert_run_request(&request, &audit("run.request")).await,
        Err(Error::Conflict(_))
    ));
    let answer = RunAnswer {
        request_id: "RQ-1".into(),
        device_id: "NF-1".into(),
        state: "accepted".into(),
        code: String::new(),
        reason: String::new(),
        batch_id: "B-1".into(),
        answered_ms: 2,
    };
    store.answer_run_request(&answer, &audit("run.start")).await?;
    let stored = store.run_request("RQ-1").await?.expect("stored");
    assert_eq!((stored.state.as_str(), stored.batch_id.as_str()), ("accepted", "B-1"));

    let row = |id: &str, device: &str, site: &str, started: i64, digest: &str| BatchRow {
        batch_id: id.into(),
        device_id: device.into(),
        site_id: site.into(),
        recipe_id: "r".into(),
        recipe_version: 1,
        started_ms: started,
        ended_ms: started + 60_000,
        outcome: "complete".into(),
        qc_passed: true,
        started_by: "bob".into(),
        started_by_name: "Bob".into(),
        cartridge_lot: "L1".into(),
        prescription_id: "RX-1".into(),
        certificate_serial: "ab".into(),
        record_digest: digest.into(),
        envelope: vec![1, 2, 3],
        received_ms: started + 61_000,
    };
    let metrics = |id: &str, size: f64| BatchMetrics {
        seq: 0,
        batch_id: id.into(),
        device_id: "NF-1".into(),
        site_id: "site-a".into(),
        model: "NF-200".into(),
        firmware_version: "1.2.0".into(),
        recipe_id: "r".into(),
        recipe_version: 1,
        cartridge_lot: "L1".into(),
        ended_ms: 60_010,
        outcome: "complete".into(),
        qc_passed: true,
        values: [Some(size), None, None, None, None, None, None, None],
        alarms: 0,
    };
    let limits = vec![QualityLimit {
        recipe_id: "r".into(),
        recipe_version: 1,
        attribute: "size_nm".into(),
        lo: Some(60.0),
        hi: Some(100.0),
    }];
    assert!(
        store
            .insert_batch(
                &row("B-1", "NF-1", "site-a", 10, "d1"),
                None,
                &metrics("B-1", 81.5),
                &limits,
                &audit("batch.record")
            )
            .await?
    );
    assert!(
        !store
            .insert_batch(
                &row("B-1", "NF-1", "site-a", 10, "d1"),
                None,
                &metrics("B-1", 99.0),
                &limits,
                &audit("batch.record")
            )
            .await?
    );
    assert!(matches!(
        store
            .insert_batch(
                &row("B-1", "NF-1", "site-a", 10, "d2"),
                None,
                &metrics("B-1", 99.0),
                &limits,
                &audit("batch.record")
            )
            .await,
        Err(Error::Conflict(_))
    ));
    store
        .insert_batch(
            &row("B-2", "NF-2", "site-b", 20, "d3"),
            None,
            &metrics("B-2", 83.0),
            &limits,
            &audit("batch.record"),
        )
        .await?;
    // Metrics follow the records they come from, in arrival order, once per batch.
    let m = store.batch_metrics_after(0, 10).await?;
    assert_eq!(
        m.iter().map(|m| (m.batch_id.as_str(), m.values[0])).collect::<Vec<_>>(),
        [("B-1", Some(81.5)), ("B-2", Some(83.0))]
    );
    assert_eq!(m[0].values[1], None, "an unmeasured value stays absent");
    // Every field as written (on SQLite this read goes straight to the file).
    assert_eq!(m[1], BatchMetrics { seq: m[1].seq, ..metrics("B-2", 83.0) });
    assert!(m[1].seq > m[0].seq);
    assert_eq!(store.batch_metrics_after(m[0].seq, 10).await?.len(), 1);
    assert_eq!(store.quality_limits().await?, limits);
    assert!(store.batches_without_metrics(10).await?.is_empty());
    let all = store.batches(&BatchFilter { limit: 10, ..Default::default() }).await?;
    assert_eq!(
        all.iter().map(|(b, _)| b.batch_id.as_str()).collect::<Vec<_>>(),
        vec!["B-2", "B-1"],
        "newest first"
    );
    let site_a = store
        .batches(&BatchFilter { site_id: Some("site-a".into()), limit: 10, ..Default::default() })
        .await?;
    assert_eq!(site_a.len(), 1);
    assert_eq!(site_a[0].0.envelope, vec![1, 2, 3]);
    let decision = BatchDecision {
        batch_id: "B-1".into(),
        meaning: "released".into(),
        signer_id: "quinn".into(),
        printed_name: "Quinn".into(),
        reason: String::new(),
        signed_ms: 3,
        record_digest: "d1".into(),
    };
    store.decide_batch(&decision, &audit("batch.release")).await?;
    assert!(matches!(store.decide_batch(&decision, &audit("batch.release")).await, Err(Error::Conflict(_))));
    let (_, d) = store.batch("B-1").await?.expect("stored");
    assert_eq!(d.map(|d| d.printed_name), Some("Quinn".into()));
    assert!(store.batch("B-9").await?.is_none());
    let audited = store
        .list_audit(&nanofleet_store::AuditFilter {
            action: Some("batch.record".into()),
            ..Default::default()
        })
        .await?;
    assert_eq!(audited.len(), 2, "a re-sent record is not audited twice");
    Ok(())
}

#[tokio::test]
async fn alerts_work_on_sqlite() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    exercise_alerts(&format!("sqlite://{}?mode=rwc", dir.path().join("a.db").display())).await
}

#[tokio::test]
async fn alerts_work_on_postgresql_as_on_sqlite() -> anyhow::Result<()> {
    let Some((name, url)) = fresh_database().await else { return Ok(()) };
    let result = exercise_alerts(&url).await;
    drop_database(&name).await;
    result
}

/// One active alert per condition (raising it again counts), acknowledged once with an
/// audit record, resolved, raised anew after that; evaluator cursors kept.
async fn exercise_alerts(url: &str) -> anyhow::Result<()> {
    use nanofleet_store::{AlertFilter, AlertRow, AuditEntry, Error};
    let store =
        Store::open(&Options { url: url.into(), max_connections: 4, sqlite_sync_full: false }).await?;
    let alert = |id: &str, at: i64| AlertRow {
        alert_id: id.into(),
        dedup_key: "device_silent/NF-1".into(),
        kind: "device_silent".into(),
        state: "open".into(),
        subject: "NF-1".into(),
        site_id: "site-a".into(),
        title: "NF-1 is silent".into(),
        evidence: vec![1, 2],
        raised_ms: at,
        last_seen_ms: at,
        occurrences: 1,
        acknowledged_by: String::new(),
        acknowledged_ms: 0,
        note: String::new(),
        resolved_ms: 0,
    };
    let (first, new) = store.raise_alert(&alert("AL-1", 10)).await?;
    assert!(new);
    let (again, new) = store.raise_alert(&alert("AL-2", 20)).await?;
    assert!(!new, "the same condition while active is the same alert");
    assert_eq!((again.alert_id.as_str(), again.occurrences, again.last_seen_ms), ("AL-1", 2, 20));
    assert_eq!(first.raised_ms, again.raised_ms);
    let audit = AuditEntry {
        at_ms: 30,
        actor: "person:quinn".into(),
        action: "alert.acknowledge".into(),
        subject: "AL-1".into(),
        site_id: Some("site-a".into()),
        reason: "unplugged".into(),
        old_value: None,
        new_value: None,
    };
    let acked = store.acknowledge_alert("AL-1", "quinn", "unplugged", 30, &audit).await?.expect("found");
    assert_eq!((acked.state.as_str(), acked.acknowledged_by.as_str()), ("acknowledged", "quinn"));
    assert!(matches!(
        store.acknowledge_alert("AL-1", "quinn", "x", 31, &audit).await,
        Err(Error::Conflict(_))
    ));
    assert!(store.acknowledge_alert("AL-9", "quinn", "x", 31, &audit).await?.is_none());
    let (still, new) = store.raise_alert(&alert("AL-3", 40)).await?;
    assert!(!new && still.state == "acknowledged", "an acknowledged alert still absorbs its condition");
    let resolved = store.resolve_alert("device_silent/NF-1", 50).await?.expect("active");
    assert_eq!((resolved.state.as_str(), resolved.resolved_ms), ("resolved", 50));
    assert!(store.resolve_alert("device_silent/NF-1", 51).await?.is_none());
    let (fresh, new) = store.raise_alert(&alert("AL-4", 60)).await?;
    assert!(new && fresh.alert_id == "AL-4", "after it resolved, the condition is a new alert");
    let active = store
        .alerts(&AlertFilter {
            states: vec!["open".into(), "acknowledged".into()],
            limit: 10,
            ..Default::default()
        })
        .await?;
    assert_eq!(active.iter().map(|a| a.alert_id.as_str()).collect::<Vec<_>>(), ["AL-4"]);
    let all = store.alerts(&AlertFilter { limit: 10, ..Default::default() }).await?;
    assert_eq!(all.iter().map(|a| a.alert_id.as_str()).collect::<Vec<_>>(), ["AL-4", "AL-1"], "newest first");
    assert_eq!(store.active_alert_counts().await?, [("site-a".to_owned(), 1)]);
    assert_eq!(store.cursor("alerts.spc").await?, 0);
    store.set_cursor("alerts.spc", 42).await?;
    store.set_cursor("alerts.spc", 43).await?;
    assert_eq!(store.cursor("alerts.spc").await?, 43);
    Ok(())
}

#[tokio::test]
async fn rollups_work_on_sqlite() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    exercise_rollups(&format!("sqlite://{}?mode=rwc", dir.path().join("r.db").display())).await
}

#[tokio::test]
async fn rollups_work_on_postgresql_as_on_sqlite() -> anyhow::Result<()> {
    let Some((name, url)) = fresh_database().await else { return Ok(()) };
    let result = exercise_rollups(&url).await;
    drop_database(&name).await;
    result
}

/// Telemetry folded into minute and hour rollups once per stored row (a re-sent
/// batch counts once), merged across settles, and expired by retention.
async fn exercise_rollups(url: &str) -> anyhow::Result<()> {
    use nanofleet_ingest::rollup::{Metric, Rollup, TelemetryFold};
    use nanofleet_proto::Message as _;
    use nanofleet_proto::device::v1::TelemetryBatch;
    use nanofleet_store::{Retention, Tier};

    let store =
        Store::open(&Options { url: url.into(), max_connections: 4, sqlite_sync_full: false }).await?;
    store
        .apply_birth(&Birth {
            device_id: "NF-R-01".into(),
            site_id: "site-r".into(),
            model: "NF-200".into(),
            firmware_version: "2.3.1".into(),
            session_id: "s1".into(),
            time_ms: 1_000,
        })
        .await?;
    // Half past an hour; 40 samples a second apart per batch, aqueous flow 9000 + i.
    let t0 = 3_600_000 * 490_000 + 1_800_000;
    let flow = |i: i64| 9_000.0 + i as f64;
    let rec = |seq: i64| {
        let samples: Vec<_> = (0..40)
            .map(|k| {
                let i = (seq - 1) * 40 + k;
                let mut s = nanofleet_tests::sample(t0 + i * 1_000);
                s.lines[0].flow_ul_min = flow(i);
                s
            })
            .collect();
        TelemetryRecord {
            device_id: "NF-R-01".into(),
            seq,
            first_ms: samples[0].time_unix_ms,
            last_ms: samples[39].time_unix_ms,
            samples: 40,
            payload: TelemetryBatch {
                device_id: "NF-R-01".into(),
                seq: seq as u64,
                samples,
                boot_id: "b".into(),
            }
            .encode_to_vec(),
        }
    };
    let mut fold = TelemetryFold;
    store.write_batch(&WriteBatch { telemetry: vec![rec(1), rec(2)], ..Default::default() }).await?;
    assert_eq!(store.settle_telemetry(Some(&mut fold), STEP, None).await?.moved, 2);
    // Batch 2 again (a re-send after a lost PUBACK) with batch 3: 2 is not counted twice.
    store.write_batch(&WriteBatch { telemetry: vec![rec(2), rec(3)], ..Default::default() }).await?;
    assert_eq!(store.settle_telemetry(Some(&mut fold), STEP, None).await?.moved, 1);
    assert_eq!(store.settle_telemetry(Some(&mut fold), STEP, None).await?.taken, 0, "nothing left to move");

    let minutes = store.rollups("NF-R-01", Tier::Minute, t0 - 3_600_000, t0 + 3_600_000).await?;
    assert_eq!(
        minutes.iter().map(|m| (m.start_ms - t0, m.samples)).collect::<Vec<_>>(),
        vec![(0, 60), (60_000, 60)]
    );
    for (m, first) in minutes.iter().zip([0i64, 60]) {
        let r = Rollup::decode(&m.data, m.samples).map_err(anyhow::Error::msg)?;
        let s = r.summary(Metric::AqueousFlow).expect("flow summary");
        let values: Vec<f64> = (first..first + 60).map(flow).collect();
        assert_eq!((s.count, s.min, s.max), (60, values[0], values[59]));
        assert!((s.mean().unwrap() - values.iter().sum::<f64>() / 60.0).abs() < 1e-9);
        let p50 = s.quantile(0.5).unwrap();
        assert!((p50 - values[29]).abs() <= 0.01 * values[29], "p50 {p50} vs {}", values[29]);
    }
    let hours = store.rollups("NF-R-01", Tier::Hour, t0 - 3_600_000, t0 + 3_600_000).await?;
    assert_eq!(hours.len(), 1);
    assert_eq!((hours[0].start_ms, hours[0].samples), (t0 - 1_800_000, 120));
    let h = Rollup::decode(&hours[0].data, hours[0].samples).map_err(anyhow::Error::msg)?;
    assert_eq!(
        h.summary(Metric::AqueousFlow).map(|s| (s.count, s.min, s.max)),
        Some((120, flow(0), flow(119)))
    );

    // Retention: now is 2 h after t0; raw kept 1h59m keeps batches 2 and 3 (their
    // newest sample is at t0+79 s, t0+119 s) and drops batch 1 (t0+39 s); minutes kept
    // 1h59m keep the second minute only; hours kept 3 h keep the hour.
    let now = t0 + 7_200_000;
    let expired = store
        .expire_telemetry(
            Retention { raw_ms: 7_200_000 - 60_000, minute_ms: 7_200_000 - 60_000, hour_ms: 3 * 3_600_000 },
            now,
        )
        .await?;
    assert_eq!((expired.raw, expired.minute, expired.hour), (1, 1, 0));
    assert_eq!(store.telemetry_seqs("NF-R-01").await?, vec![2, 3]);
    let left = store.rollups("NF-R-01", Tier::Minute, 0, i64::MAX).await?;
    assert_eq!(left.iter().map(|m| m.start_ms - t0).collect::<Vec<_>>(), vec![60_000]);
    store.close().await;
    Ok(())
}

/// Under commits that never pause, SQLite's write-ahead log must still start over:
/// a passive checkpoint alone lets it grow without end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_log_stays_bounded_under_steady_writes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("wal.db");
    let store = Store::open(&Options {
        url: format!("sqlite://{}?mode=rwc", path.display()),
        max_connections: 4,
        sqlite_sync_full: false,
    })
    .await?;
    let wal = dir.path().join("wal.db-wal");
    let payload = vec![7u8; 256 * 1024];
    let mut seq = 0;
    let mut largest = 0u64;
    // 512 MiB written, 1 MiB per commit, the landed rows moved after every commit,
    // back to back.
    for _ in 0..512 {
        let telemetry = (0..4)
            .map(|_| {
                seq += 1;
                TelemetryRecord {
                    device_id: "NF-WAL-01".into(),
                    seq,
                    first_ms: seq,
                    last_ms: seq,
                    samples: 1,
                    payload: payload.clone(),
                }
            })
            .collect();
        store.write_batch(&WriteBatch { telemetry, ..Default::default() }).await?;
        store.settle_telemetry(None, STEP, None).await?;
        largest = largest.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
    }
    assert_eq!(store.telemetry_count().await?, 2_048);
    // Without a restart the log holds all 512 MiB and more; it starts over above
    // 64 MiB, checked every half second, so it holds at most what the writer adds
    // between a few checks.
    eprintln!("largest log: {} MiB", largest / (1024 * 1024));
    assert!(largest < 512 * 1024 * 1024, "the log grew to {} MiB", largest / (1024 * 1024));
    store.close().await;
    Ok(())
}

#[tokio::test]
async fn inventory_works_on_sqlite() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    exercise_inventory(&format!("sqlite://{}?mode=rwc", dir.path().join("s.db").display())).await
}

#[tokio::test]
async fn inventory_works_on_postgresql_as_on_sqlite() -> anyhow::Result<()> {
    let Some((name, url)) = fresh_database().await else { return Ok(()) };
    let result = exercise_inventory(&url).await;
    drop_database(&name).await;
    result
}

/// The catalogue, cartridges moved by versioned events, the database refusing to edit
/// an event, stock and consumption, a recall with its deny list, and device answers.
async fn exercise_inventory(url: &str) -> anyhow::Result<()> {
    use nanofleet_store::{
        CartridgeEvent, CartridgeMove, CartridgeRow, CartridgeTypeRow, DenyAckRow, DenyListRow, Error,
        LotRow, RecallRow, ShipmentRow,
    };
    let store =
        Store::open(&Options { url: url.into(), max_connections: 4, sqlite_sync_full: false }).await?;
    const GTIN: &str = "09506000134352";
    let kind = CartridgeTypeRow {
        gtin: GTIN.into(),
        name: "FIX-LNP 2 mL".into(),
        payload: "factor IX mRNA".into(),
        volume_ml: 2.0,
        storage_class: "ultra-cold".into(),
        excursion_limit_min: 30,
        device_models: "NF-200".into(),
        lead_time_days: 5,
        created_by: "ops".into(),
        created_ms: 1,
    };
    store.insert_cartridge_type(&kind, &audit("cartridge-type.create")).await?;
    assert!(matches!(
        store.insert_cartridge_type(&kind, &audit("cartridge-type.create")).await,
        Err(Error::Conflict(_))
    ));
    assert_eq!(store.cartridge_type(GTIN).await?, Some(kind));
    let mut lot = LotRow {
        gtin: GTIN.into(),
        lot: "L1".into(),
        produced: "2026-11-01".into(),
        expires: "2027-05-31".into(),
        expires_ms: 1_811_807_999_999,
        quantity: 3,
        status: "released".into(),
        status_reason: String::new(),
        status_by: "qa".into(),
        status_ms: 1,
        created_ms: 1,
    };
    let row = |serial: &str, status: &str, site: &str, version: i64| CartridgeRow {
        gtin: GTIN.into(),
        serial: serial.into(),
        lot: "L1".into(),
        status: status.into(),
        site_id: site.into(),
        device_id: String::new(),
        shipment_id: if site.is_empty() { String::new() } else { "SH-1".into() },
        location: String::new(),
        batch_id: String::new(),
        expires_ms: 1_811_807_999_999,
        version,
        updated_ms: version,
    };
    let mv = |r: CartridgeRow, kind: &str| CartridgeMove {
        event: CartridgeEvent {
            id: 0,
            gtin: r.gtin.clone(),
            serial: r.serial.clone(),
            lot: r.lot.clone(),
            kind: kind.into(),
            site_id: r.site_id.clone(),
            device_id: String::new(),
            at_ms: r.updated_ms,
            actor: "ops".into(),
            detail: "{}".into(),
        },
        row: r,
    };
    let made: Vec<_> = ["S1", "S2", "S3"].iter().map(|s| mv(row(s, "made", "", 1), "made")).collect();
    store.insert_lot(&lot, &made, &audit("lot.create")).await?;
    assert!(matches!(store.insert_lot(&lot, &[], &audit("lot.create")).await, Err(Error::Conflict(_))));
    let shipment = ShipmentRow {
        shipment_id: "SH-1".into(),
        site_id: "site-a".into(),
        gtin: GTIN.into(),
        lot: "L1".into(),
        count: 2,
        sent_by: "ops".into(),
        sent_ms: 2,
        received_count: 0,
        received_ms: 0,
        readings: String::new(),
        excursion_minutes: 0.0,
        blocked: false,
    };
    let shipped: Vec<_> =
        ["S1", "S2"].iter().map(|s| mv(row(s, "in-transit", "site-a", 2), "shipped")).collect();
    store.insert_shipment(&shipment, &shipped, &audit("shipment.send")).await?;
    // A change from a stale read is refused, and nothing of it is applied.
    let stale = vec![
        mv(row("S1", "in-stock", "site-a", 3), "received"),
        mv(row("S3", "in-stock", "site-a", 3), "received"),
    ];
    assert!(matches!(store.apply_moves(&stale, None).await, Err(Error::Conflict(_))));
    assert_eq!(store.cartridge(GTIN, "S1").await?.unwrap().status, "in-transit");
    let mut received = shipment.clone();
    received.received_count = 2;
    received.received_ms = 3;
    received.excursion_minutes = 4.5;
    let moves: Vec<_> =
        ["S1", "S2"].iter().map(|s| mv(row(s, "in-stock", "site-a", 3), "received")).collect();
    store.receive_shipment(&received, &moves, &audit("shipment.receive")).await?;
    assert_eq!(store.shipment("SH-1").await?, Some(received));
    assert_eq!(store.shipment_cartridges("SH-1").await?.len(), 2);
    let mut used = row("S1", "consumed", "site-a", 4);
    used.batch_id = "B-1".into();
    store.apply_moves(&[mv(used, "consumed")], Some(&audit("cartridge.consume"))).await?;
    let events = store.cartridge_events(GTIN, "S1").await?;
    assert_eq!(
        events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
        ["made", "shipped", "received", "consumed"]
    );
    let raw = sqlx::AnyPool::connect(url).await?;
    assert!(sqlx::query("UPDATE cartridge_events SET kind = 'x'").execute(&raw).await.is_err());
    assert!(sqlx::query("DELETE FROM cartridge_events").execute(&raw).await.is_err());
    raw.close().await;
    let held = store.held_cartridges(Some("site-a")).await?;
    assert_eq!(held.iter().map(|h| h.gtin.as_str()).collect::<Vec<_>>(), [GTIN]);
    assert_eq!(store.consumed_since(None, 0).await?, vec![("site-a".to_owned(), GTIN.to_owned(), 1)]);
    assert_eq!(
        store.lot_whereabouts(GTIN, "L1").await?,
        vec![
            (String::new(), "made".to_owned(), 1),
            ("site-a".to_owned(), "consumed".to_owned(), 1),
            ("site-a".to_owned(), "in-stock".to_owned(), 1)
        ]
    );

    lot.status = "recalled".into();
    lot.status_reason = "endotoxin".into();
    let deny = DenyListRow {
        version: 1,
        issued_ms: 5,
        signer_id: "qa".into(),
        lots: 1,
        cartridges: 0,
        envelope: vec![9],
    };
    let recall = RecallRow {
        recall_id: "R-1".into(),
        gtin: GTIN.into(),
        lot: "L1".into(),
        reason: "endotoxin".into(),
        signer_id: "qa".into(),
        printed_name: "Q A".into(),
        signed_ms: 5,
        deny_version: 1,
    };
    store.recall_lot(&lot, "released", &recall, &deny, &audit("lot.recall")).await?;
    assert!(matches!(
        store.recall_lot(&lot, "released", &recall, &deny, &audit("lot.recall")).await,
        Err(Error::Conflict(_))
    ));
    assert_eq!(store.lot(GTIN, "L1").await?.unwrap().status, "recalled");
    assert!(store.held_cartridges(Some("site-a")).await?.is_empty(), "a recalled lot is not stock");
    assert_eq!(store.latest_deny_list().await?, Some(deny));
    assert_eq!(store.recalls(None, Some("L1")).await?, vec![recall]);
    let ack = |version: i64, result: &str| DenyAckRow {
        device_id: "NF-1".into(),
        version,
        result: result.into(),
        code: String::new(),
        reason: String::new(),
        acked_ms: version,
    };
    store.record_deny_acks(&[ack(2, "accepted"), ack(1, "refused")]).await?;
    assert_eq!(store.deny_acks().await?, vec![ack(2, "accepted")], "an older answer changes nothing");
    Ok(())
}
