//! The audit trail on SQLite and on PostgreSQL: appends stay one gap-free chain under
//! concurrent writers (two stores, as two servers would be), and every kind of
//! tampering with the stored rows (an edit, a deleted record, a deleted tail, a forged
//! checkpoint) is found and named by its seq.
//! The PostgreSQL half skips (with the reason) where no PostgreSQL answers.

use std::sync::atomic::{AtomicU32, Ordering};

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use nanofleet_store::{
    AuditEntry, AuditFilter, AuditHead, Backend, BreakReason, ChainBreak, Checkpoint, GENESIS_HASH, Options,
    Store, append_audit_in, checkpoint_message, record_hash,
};
use nanofleet_tests::skip_or_fail;
use sqlx::Connection as _;

// === harness ===

/// A store on a fresh database, removed at the end.
struct Db {
    store: Store,
    url: String,
    pg_name: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl Db {
    async fn sqlite() -> anyhow::Result<Db> {
        let dir = tempfile::tempdir()?;
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("audit.db").display());
        Ok(Db { store: open(&url).await?, url, pg_name: None, _dir: Some(dir) })
    }

    async fn postgres() -> anyhow::Result<Option<Db>> {
        let admin = admin_url();
        let mut conn = match sqlx::PgConnection::connect(&admin).await {
            Ok(c) => c,
            Err(e) => {
                skip_or_fail(&format!("no PostgreSQL at {admin}: {e}"));
                return Ok(None);
            }
        };
        // Tests of one process run in parallel: the counter keeps their names apart.
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "nanofleet_audit_{}_{}_{}",
            std::process::id(),
            nanofleet_tests::now_ms(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await?;
        let base = admin.rsplit_once('/').map(|(b, _)| b.to_owned()).unwrap_or(admin.clone());
        let url = format!("{base}/{name}");
        Ok(Some(Db { store: open(&url).await?, url, pg_name: Some(name), _dir: None }))
    }

    async fn close(self) {
        self.store.close().await;
        if let Some(name) = self.pg_name
            && let Ok(mut conn) = sqlx::PgConnection::connect(&admin_url()).await
        {
            let _ =
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut conn).await;
        }
    }
}

fn admin_url() -> String {
    std::env::var("NANOFLEET_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

async fn open(url: &str) -> anyhow::Result<Store> {
    Ok(Store::open(&Options { url: url.into(), max_connections: 4, sqlite_sync_full: false }).await?)
}

/// One test per scenario and backend: `sqlite::NAME` and `postgresql::NAME`.
macro_rules! on_both_backends {
    ($($scenario:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() -> anyhow::Result<()> {
                    let db = super::Db::sqlite().await?;
                    let result = super::$scenario(&db).await;
                    db.close().await;
                    result
                }
            )*
        }
        mod postgresql {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() -> anyhow::Result<()> {
                    let Some(db) = super::Db::postgres().await? else { return Ok(()) };
                    let result = super::$scenario(&db).await;
                    db.close().await;
                    result
                }
            )*
        }
    };
}

on_both_backends!(
    appends_chain_and_list_with_filters,
    a_record_commits_with_its_transaction_or_not_at_all,
    audit_rows_refuse_update_and_delete,
    concurrent_appends_from_two_stores_form_one_gap_free_chain,
    an_edited_record_is_named_by_its_seq,
    a_deleted_middle_record_is_named_by_its_seq,
    a_deleted_tail_is_found_through_a_checkpoint,
    a_deleted_tail_without_checkpoints_is_found_through_the_head_row,
    a_forged_checkpoint_is_found,
);

// === signing, as the server does it ===

const KEY_ID: &str = "audit-2025";

fn key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

fn sign(key: &SigningKey, head: AuditHead, signed_at_ms: i64) -> Checkpoint {
    let signature = key.sign(&checkpoint_message(head.seq, &head.hash, signed_at_ms)).to_bytes().to_vec();
    Checkpoint { seq: head.seq, head_hash: head.hash, signed_at_ms, key_id: KEY_ID.into(), signature }
}

/// Accepts exactly the checkpoints the audit key signed.
fn check_sig(trusted: VerifyingKey) -> impl Fn(&Checkpoint) -> bool {
    move |cp| {
        cp.key_id == KEY_ID
            && Signature::from_slice(&cp.signature)
                .is_ok_and(|s| trusted.verify_strict(&cp.message(), &s).is_ok())
    }
}

// === helpers ===

fn entry(i: i64) -> AuditEntry {
    AuditEntry {
        at_ms: 1_000 + i,
        actor: "person:alice".into(),
        action: "device.enroll".into(),
        subject: format!("NF-{i}"),
        site_id: Some("site-a".into()),
        reason: "commissioning".into(),
        old_value: None,
        new_value: Some(format!(r#"{{"id":"NF-{i}"}}"#)),
    }
}

async fn append_many(store: &Store, n: i64) -> anyhow::Result<()> {
    for i in 1..=n {
        store.append_audit(entry(i)).await?;
    }
    Ok(())
}

async fn verify(store: &Store, external: Option<&Checkpoint>) -> anyhow::Result<Result<i64, ChainBreak>> {
    Ok(store.verify_audit(external, check_sig(key().verifying_key())).await?.map(|v| v.head_seq))
}

/// Runs raw SQL against the audit tables the way someone with database rights could:
/// the append-only triggers dropped first.
async fn tamper(db: &Db, statements: &[&str]) -> anyhow::Result<()> {
    let drop_triggers: &[&str] = match db.store.backend() {
        Backend::Sqlite => &[
            "DROP TRIGGER IF EXISTS audit_log_no_update",
            "DROP TRIGGER IF EXISTS audit_log_no_delete",
            "DROP TRIGGER IF EXISTS audit_checkpoints_no_delete",
        ],
        Backend::Postgres => &[
            "DROP TRIGGER IF EXISTS audit_log_append_only ON audit_log",
            "DROP TRIGGER IF EXISTS audit_checkpoints_append_only ON audit_checkpoints",
        ],
    };
    let mut tx = db.store.begin().await?;
    for sql in drop_triggers.iter().chain(statements) {
        sqlx::query(sql).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

fn seqs(records: &[nanofleet_store::AuditRecord]) -> Vec<i64> {
    records.iter().map(|r| r.seq).collect()
}

// === scenarios ===

async fn appends_chain_and_list_with_filters(db: &Db) -> anyhow::Result<()> {
    let store = &db.store;
    assert_eq!(store.audit_head().await?, AuditHead { seq: 0, hash: GENESIS_HASH });
    assert_eq!(verify(store, None).await?, Ok(0), "an empty trail verifies");

    let e = |at_ms: i64, actor: &str, action: &str, subject: &str, site: Option<&str>| AuditEntry {
        at_ms,
        actor: actor.into(),
        action: action.into(),
        subject: subject.into(),
        site_id: site.map(Into::into),
        reason: format!("{action} {subject}"),
        old_value: None,
        new_value: Some("{}".into()),
    };
    let entries = vec![
        e(100, "person:alice", "site.create", "site-a", Some("site-a")),
        e(200, "person:bob", "enroll_token.create", "tok-1", Some("site-a")),
        e(300, "device:NF-1", "device.enroll", "NF-1", Some("site-a")),
        AuditEntry {
            old_value: Some(r#"{"state":"active"}"#.into()),
            // An empty value is not a missing one, on either backend.
            new_value: Some(String::new()),
            ..e(400, "person:alice", "device.decommission", "NF-2", Some("site-b"))
        },
        e(500, "system", "login.failure", "person:mallory", None),
        e(600, "person:alice", "role.grant", "person:bob", Some("site-a")),
    ];
    let mut appended = Vec::new();
    for entry in entries.clone() {
        appended.push(store.append_audit(entry).await?);
    }
    let mut prev = GENESIS_HASH;
    for (i, r) in appended.iter().enumerate() {
        assert_eq!(r.seq, i as i64 + 1);
        assert_eq!(r.entry, entries[i]);
        assert_eq!(r.prev_hash, prev, "record {} chains onto the one before", r.seq);
        assert_eq!(r.hash, record_hash(&prev, r.seq, &r.entry));
        prev = r.hash;
    }
    assert_eq!(store.audit_head().await?, AuditHead { seq: 6, hash: prev });

    let all = store.list_audit(&AuditFilter::default()).await?;
    assert_eq!(all, appended, "every field round-trips, None and empty strings apart");
    let list = |f: AuditFilter| async move { store.list_audit(&f).await.map(|r| seqs(&r)) };
    assert_eq!(
        list(AuditFilter { actor: Some("person:alice".into()), ..Default::default() }).await?,
        [1, 4, 6]
    );
    assert_eq!(list(AuditFilter { action: Some("device.".into()), ..Default::default() }).await?, [3, 4]);
    assert_eq!(list(AuditFilter { action: Some("device.enroll".into()), ..Default::default() }).await?, [3]);
    assert_eq!(
        list(AuditFilter { action: Some("device".into()), ..Default::default() }).await?,
        Vec::<i64>::new(),
        "without the dot an action matches exactly"
    );
    assert_eq!(
        list(AuditFilter { action: Some("DEVICE.".into()), ..Default::default() }).await?,
        Vec::<i64>::new(),
        "actions match case-sensitively on both backends"
    );
    assert_eq!(list(AuditFilter { subject: Some("person:bob".into()), ..Default::default() }).await?, [6]);
    assert_eq!(
        list(AuditFilter { site_id: Some("site-a".into()), ..Default::default() }).await?,
        [1, 2, 3, 6]
    );
    assert_eq!(
        list(AuditFilter { since_ms: Some(200), until_ms: Some(500), ..Default::default() }).await?,
        [2, 3, 4],
        "since is inclusive, until exclusive"
    );
    assert_eq!(list(AuditFilter { after_seq: 2, limit: Some(2), ..Default::default() }).await?, [3, 4]);
    assert_eq!(
        list(AuditFilter {
            actor: Some("person:alice".into()),
            site_id: Some("site-a".into()),
            since_ms: Some(150),
            ..Default::default()
        })
        .await?,
        [6]
    );
    assert_eq!(seqs(&store.audit_records_from(4, 10).await?), [5, 6]);
    assert_eq!(store.audit_records_from(6, 10).await?, vec![]);

    // Checkpoints: stored once per key and seq, read back by seq.
    assert_eq!(store.latest_checkpoint().await?, None);
    let key = key();
    let at_three = sign(&key, AuditHead { seq: 3, hash: appended[2].hash }, 10_000);
    let at_six = sign(&key, store.audit_head().await?, 20_000);
    assert!(store.save_checkpoint(&at_six).await?);
    assert!(store.save_checkpoint(&at_three).await?);
    assert!(!store.save_checkpoint(&sign(&key, store.audit_head().await?, 30_000)).await?, "already signed");
    assert_eq!(store.checkpoints().await?, vec![at_three, at_six.clone()]);
    assert_eq!(store.latest_checkpoint().await?, Some(at_six.clone()));
    let verified = store.verify_audit(None, check_sig(key.verifying_key())).await?.expect("intact");
    assert_eq!((verified.records, verified.head_seq, verified.head_hash), (6, 6, prev));
    assert_eq!(verified.checkpoints_checked, 2);
    let with_external =
        store.verify_audit(Some(&at_six), check_sig(key.verifying_key())).await?.expect("intact");
    assert_eq!(with_external.checkpoints_checked, 3);
    Ok(())
}

async fn a_record_commits_with_its_transaction_or_not_at_all(db: &Db) -> anyhow::Result<()> {
    let store = &db.store;
    append_many(store, 2).await?;
    let site_created = AuditEntry {
        at_ms: 5_000,
        actor: "person:alice".into(),
        action: "site.create".into(),
        subject: "site-z".into(),
        site_id: Some("site-z".into()),
        reason: "new hospital".into(),
        old_value: None,
        new_value: Some(r#"{"name":"Site Z"}"#.into()),
    };
    let create_site = "INSERT INTO sites (id, name, created_ms) VALUES ('site-z', 'Site Z', 5000)";

    let mut tx = store.begin().await?;
    sqlx::query(create_site).execute(&mut *tx).await?;
    let record = append_audit_in(&mut tx, site_created.clone()).await?;
    assert_eq!(record.seq, 3);
    tx.rollback().await?;
    assert!(store.list_sites().await?.is_empty(), "the change rolled back");
    assert_eq!(seqs(&store.list_audit(&AuditFilter::default()).await?), [1, 2], "and its record with it");
    assert_eq!(store.audit_head().await?.seq, 2);

    let mut tx = store.begin().await?;
    sqlx::query(create_site).execute(&mut *tx).await?;
    let record = append_audit_in(&mut tx, site_created.clone()).await?;
    tx.commit().await?;
    assert_eq!(record.seq, 3, "the rolled-back seq is reused: no gap");
    assert_eq!(store.list_sites().await?.len(), 1);
    assert_eq!(store.list_audit(&AuditFilter { after_seq: 2, ..Default::default() }).await?, vec![record]);
    assert_eq!(verify(store, None).await?, Ok(3));
    Ok(())
}

async fn audit_rows_refuse_update_and_delete(db: &Db) -> anyhow::Result<()> {
    let store = &db.store;
    append_many(store, 2).await?;
    let key = key();
    store.save_checkpoint(&sign(&key, store.audit_head().await?, 1)).await?;
    for sql in [
        "UPDATE audit_log SET reason = 'nothing happened' WHERE seq = 1",
        "DELETE FROM audit_log WHERE seq = 2",
        "UPDATE audit_checkpoints SET signed_at_ms = 2",
        "DELETE FROM audit_checkpoints",
    ] {
        let mut tx = store.begin().await?;
        let refused = sqlx::query(sql).execute(&mut *tx).await;
        assert!(refused.is_err(), "{sql} must be refused");
        drop(tx);
    }
    assert_eq!(verify(store, None).await?, Ok(2));
    Ok(())
}

async fn concurrent_appends_from_two_stores_form_one_gap_free_chain(db: &Db) -> anyhow::Result<()> {
    const TASKS: i64 = 8;
    const EACH: i64 = 50;
    // A second store on the same database stands for a second server process.
    let other = open(&db.url).await?;
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..TASKS {
        let store = if t % 2 == 0 { db.store.clone() } else { other.clone() };
        tasks.spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..EACH {
                let entry = AuditEntry { actor: format!("person:writer-{t}"), ..entry(t * 1_000 + i) };
                seqs.push(store.append_audit(entry).await?.seq);
            }
            anyhow::Ok(seqs)
        });
    }
    let mut all = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let seqs = done??;
        assert!(seqs.is_sorted(), "one writer's appends are numbered in its order");
        all.extend(seqs);
    }
    other.close().await;
    all.sort_unstable();
    assert_eq!(all, (1..=TASKS * EACH).collect::<Vec<_>>(), "every append got its own seq, without gaps");
    let key = key();
    db.store.save_checkpoint(&sign(&key, db.store.audit_head().await?, 1)).await?;
    assert_eq!(verify(&db.store, None).await?, Ok(TASKS * EACH));
    let writer_3 = AuditFilter { actor: Some("person:writer-3".into()), ..Default::default() };
    assert_eq!(db.store.list_audit(&writer_3).await?.len() as i64, EACH);
    Ok(())
}

async fn an_edited_record_is_named_by_its_seq(db: &Db) -> anyhow::Result<()> {
    let store = &db.store;
    append_many(store, 8).await?;
    let key = key();
    store.save_checkpoint(&sign(&key, store.audit_head().await?, 1)).await?;
    assert_eq!(verify(store, None).await?, Ok(8));
    tamper(db, &[r#"UPDATE audit_log SET new_value = '{"id":"NF-X"}' WHERE seq = 4"#]).await?;
    let broken = verify(store, None).await?.unwrap_err();
    assert_eq!((broken.seq, broken.reason), (4, BreakReason::HashMismatch));
    Ok(())
}

async fn a_deleted_middle_record_is_named_by_its_seq(db: &Db) -> anyhow::Result<()> {
    let store = &db.store;
    append_many(store, 6).await?;
    tamper(db, &["DELETE FROM audit_log WHERE seq = 3"]).await?;
    let broken = verify(store, None).await?.unwrap_err();
    assert_eq!((broken.seq, broken.reason), (3, BreakReason::Missing { found: 4 }));
    Ok(())
}

async fn a_deleted_tail_is_found_through_a_checkpoint(db: &Db) -> anyhow::Result<()> {
    let store = &db.store;
    append_many(store, 10).await?;
    let key = key();
    let checkpoint = sign(&key, store.audit_head().await?, 1);
    store.save_checkpoint(&checkpoint).await?;
    // The tail deleted and the head row set back to match: only the checkpoint knows.
    tamper(
        db,
        &[
            "DELETE FROM audit_log WHERE seq > 7",
            "UPDATE audit_head SET seq = 7, hash = (SELECT hash FROM audit_log WHERE seq = 7)",
        ],
    )
    .await?;
    let broken = verify(store, None).await?.unwrap_err();
    assert_eq!(broken.seq, 8, "{broken}");
    assert!(
        matches!(broken.reason, BreakReason::CheckpointBeyondEnd { checkpoint_seq: 10, last_seq: 7, .. }),
        "{broken}"
    );
    // The stored checkpoints deleted as well: one held outside the database still tells.
    tamper(db, &["DELETE FROM audit_checkpoints"]).await?;
    assert_eq!(verify(store, None).await?, Ok(7), "nothing inside the database contradicts the rest");
    let broken = verify(store, Some(&checkpoint)).await?.unwrap_err();
    assert_eq!(broken.seq, 8, "{broken}");
    assert!(matches!(broken.reason, BreakReason::CheckpointBeyondEnd { checkpoint_seq: 10, .. }), "{broken}");
    Ok(())
}

async fn a_deleted_tail_without_checkpoints_is_found_through_the_head_row(db: &Db) -> anyhow::Result<()> {
    let store = &db.store;
    append_many(store, 5).await?;
    tamper(db, &["DELETE FROM audit_log WHERE seq >= 4"]).await?;
    let broken = verify(store, None).await?.unwrap_err();
    assert_eq!((broken.seq, broken.reason), (4, BreakReason::HeadBeyondEnd { head_seq: 5, last_seq: 3 }));
    Ok(())
}

async fn a_forged_checkpoint_is_found(db: &Db) -> anyhow::Result<()> {
    let store = &db.store;
    append_many(store, 5).await?;
    let key = key();
    let genuine = sign(&key, store.audit_head().await?, 1);
    store.save_checkpoint(&genuine).await?;
    // Signed by another key under the audit key's name.
    let at_three = store.audit_records_from(2, 1).await?.remove(0);
    let forged = sign(&SigningKey::from_bytes(&[9; 32]), AuditHead { seq: 3, hash: at_three.hash }, 2);
    assert!(store.save_checkpoint(&forged).await?);
    let broken = verify(store, None).await?.unwrap_err();
    assert_eq!(broken.seq, 3, "{broken}");
    assert!(
        matches!(broken.reason, BreakReason::BadCheckpointSignature { checkpoint_seq: 3, .. }),
        "{broken}"
    );
    // A genuine signature moved onto another head does not verify either.
    let moved = Checkpoint { seq: 4, head_hash: store.audit_records_from(3, 1).await?[0].hash, ..genuine };
    tamper(db, &["DELETE FROM audit_checkpoints"]).await?;
    let broken = verify(store, Some(&moved)).await?.unwrap_err();
    assert_eq!(broken.seq, 4, "{broken}");
    assert!(
        matches!(broken.reason, BreakReason::BadCheckpointSignature { checkpoint_seq: 4, .. }),
        "{broken}"
    );
    Ok(())
}
