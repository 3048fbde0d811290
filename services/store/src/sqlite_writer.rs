//! SQLite's single writer: ingest's commits, on a connection of its own, through
//! rusqlite.
//!
//! Through sqlx every statement is a round trip to the connection's worker thread;
//! a commit of a few hundred rows made as many thread hand-offs and spent more time in
//! them than in SQLite (measured: 2.2–3.8 ms per hundred rows, against 1.0–1.2 ms
//! here). Here a commit runs on the caller's thread, statement after statement, each
//! prepared once and kept. The connection is held for good: a pooled connection's
//! page cache is dropped whenever another connection has written since it was last
//! used, so each commit would read back the pages it needs; this one keeps them.
//!
//! Telemetry lands in `telemetry_recent`, a table with no index: rows are appended in
//! arrival order, so a commit writes a few pages whatever the number of devices in it.
//! With a `(device_id, seq)` index there, every row of a commit dirtied an index page
//! of its own (the table holds a few seconds of every device), and each such page is
//! written to the log in full: about one 4 KiB page per 145-byte message, all fsynced.
//! The index lives in memory instead ([`Landed`]): the writer is the only one that
//! writes to the file, it checks re-sends against it, and the sweep walks it in key
//! order. It is rebuilt from the table when the store opens.
//!
//! PostgreSQL keeps the sqlx path in `lib.rs` and `rollups.rs`; the SQL and the
//! guarantees are the same (each row stored once, each folded once).

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OpenFlags, OptionalExtension as _, TransactionBehavior};

use crate::{
    Error, LandedKey, PresenceChange, Result, RollupFold, RollupRow, SettleStep, Settled, TelemetryRecord,
    Tier, WriteBatch, WriteOutcome,
};

/// Pages the writer connection keeps in memory: the right-hand leaves of the
/// telemetry tables for every device that sends, and the rollups they fold into.
const CACHE_KIB: i64 = 64 * 1024;

/// The writer connection and the landing table's index; `None` once the store is
/// closed.
pub(crate) struct Writer {
    state: Mutex<Option<State>>,
}

pub(crate) struct State {
    conn: Connection,
    landed: Landed,
}

/// The rows of `telemetry_recent` by key: (device, sequence number) → rowid. Changed
/// only after the transaction that changes the table commits.
type Landed = BTreeMap<LandedKey, i64>;

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").finish_non_exhaustive()
    }
}

impl Writer {
    pub(crate) fn open(file: &Path, sync_full: bool) -> Result<Writer> {
        let conn = Connection::open_with_flags(
            file,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        for pragma in crate::sqlite_pragmas(sync_full) {
            conn.execute_batch(&pragma)?;
        }
        conn.execute_batch(&format!("PRAGMA cache_size = -{CACHE_KIB}"))?;
        // Every statement shape below stays prepared.
        conn.set_prepared_statement_cache_capacity(64);
        let landed = load_landed(&conn)?;
        Ok(Writer { state: Mutex::new(Some(State { conn, landed })) })
    }

    /// Runs `f` on the connection, holding it. `f` blocks: on a multi-threaded runtime
    /// the worker first hands its other tasks on; on a current-thread runtime (ingest's
    /// writer has a thread and a runtime of its own) it runs in place, which is the
    /// point: no hand-off per statement.
    pub(crate) fn run<R>(&self, f: impl FnOnce(&mut State) -> Result<R>) -> Result<R> {
        use tokio::runtime::{Handle, RuntimeFlavor};
        let work = || {
            let mut guard = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match guard.as_mut() {
                Some(state) => f(state),
                None => Err(Error::Database(sqlx::Error::PoolClosed)),
            }
        };
        match Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
            _ => work(),
        }
    }

    /// Closes the connection; later calls fail as on a closed pool.
    pub(crate) fn close(&self) {
        let state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(State { conn, .. }) = state
            && let Err((_, e)) = conn.close()
        {
            tracing::warn!(error = %e, "closing the writer connection");
        }
    }
}

/// The landing table's index, read from the table. A key found twice (which the
/// writer never lands) keeps its first row; the others are deleted.
fn load_landed(conn: &Connection) -> Result<Landed> {
    let mut landed = Landed::new();
    let mut extra = Vec::new();
    let mut stmt = conn.prepare("SELECT rowid, device_id, seq FROM telemetry_recent ORDER BY rowid")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let rowid: i64 = r.get(0)?;
        let key = LandedKey { device_id: r.get(1)?, seq: r.get(2)? };
        match landed.entry(key) {
            std::collections::btree_map::Entry::Occupied(_) => extra.push(rowid),
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(rowid);
            }
        }
    }
    for rowid in extra {
        conn.execute("DELETE FROM telemetry_recent WHERE rowid = ?1", [rowid])?;
    }
    Ok(landed)
}

/// `sql` with PostgreSQL-style `$n` placeholders as SQLite's `?n`, whose number is
/// the parameter's index (a `$n` would be a named parameter, numbered by where it
/// first appears).
fn numbered(sql: &str) -> String {
    sql.replace('$', "?")
}

/// [`crate::Store::write_batch`] on SQLite.
pub(crate) fn write_batch(state: &mut State, batch: &WriteBatch) -> Result<WriteOutcome> {
    let mut out = WriteOutcome::default();
    let State { conn, landed } = state;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Rows this transaction lands; they join the index once it commits.
    let mut fresh = Landed::new();
    // Presence first and in order: a birth and a death of one device may share a batch.
    for change in &batch.presence {
        match change {
            PresenceChange::Birth(b) => {
                tx.prepare_cached(&numbered(crate::BIRTH_SITE_SQL))?.execute((&b.site_id, b.time_ms))?;
                tx.prepare_cached(&numbered(crate::BIRTH_DEVICE_SQL))?.execute((
                    &b.device_id,
                    &b.site_id,
                    &b.model,
                    &b.firmware_version,
                    &b.session_id,
                    b.time_ms,
                ))?;
            }
            PresenceChange::Death(d) => {
                let n = tx.prepare_cached(&numbered(crate::DEATH_SQL))?.execute((
                    &d.device_id,
                    &d.session_id,
                    d.time_ms,
                ))?;
                out.deaths_applied += u64::from(n > 0);
            }
        }
    }
    if !batch.telemetry.is_empty() {
        // New rows only: not landed (the index in memory), nor in `telemetry` (checked
        // through its primary key, a read of cached pages).
        let mut stored = tx.prepare_cached("SELECT 1 FROM telemetry WHERE device_id = ?1 AND seq = ?2")?;
        let mut land = tx.prepare_cached(
            "INSERT INTO telemetry_recent (device_id, seq, first_ms, last_ms, samples, payload) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for t in &batch.telemetry {
            let key = LandedKey { device_id: t.device_id.clone(), seq: t.seq };
            if landed.contains_key(&key)
                || fresh.contains_key(&key)
                || stored.exists((&t.device_id, t.seq))?
            {
                continue;
            }
            let rowid = land.insert((&t.device_id, t.seq, t.first_ms, t.last_ms, t.samples, &t.payload))?;
            fresh.insert(key, rowid);
        }
        out.telemetry_inserted = fresh.len() as u64;
    }
    if !batch.events.is_empty() {
        let mut insert = tx.prepare_cached(
            "INSERT INTO events (device_id, seq, time_ms, payload) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (device_id, seq) DO NOTHING",
        )?;
        for e in &batch.events {
            out.events_inserted += insert.execute((&e.device_id, e.seq, e.time_ms, &e.payload))? as u64;
        }
    }
    if !batch.alarms.is_empty() {
        let mut upsert = tx.prepare_cached(&numbered(crate::ALARM_SQL))?;
        for a in &batch.alarms {
            upsert.execute((
                &a.device_id,
                a.code,
                a.line,
                a.priority,
                i64::from(a.active),
                &a.detail,
                a.changed_ms,
            ))?;
        }
    }
    if !batch.last_values.is_empty() {
        let mut update = tx.prepare_cached(
            "UPDATE devices SET \
                last_seen_ms = CASE WHEN last_seen_ms < ?2 THEN ?2 ELSE last_seen_ms END, \
                telemetry_seq = CASE WHEN telemetry_seq < ?3 THEN ?3 ELSE telemetry_seq END, \
                last_sample = CASE WHEN last_sample_ms <= ?4 THEN ?5 ELSE last_sample END, \
                last_sample_ms = CASE WHEN last_sample_ms <= ?4 THEN ?4 ELSE last_sample_ms END \
             WHERE id = ?1",
        )?;
        for l in &batch.last_values {
            update.execute((&l.device_id, l.seen_ms, l.telemetry_seq, l.sample_ms, &l.sample))?;
        }
    }
    tx.commit()?;
    // One insert each: `append` would rebuild the whole index every commit.
    landed.extend(fresh);
    Ok(out)
}

/// [`crate::Store::settle_telemetry`] on SQLite: the step's rows are chosen from the
/// index in memory, then each is copied into `telemetry` (unless it is there already)
/// and deleted from the landing table by its rowid.
pub(crate) fn settle(
    state: &mut State,
    fold: Option<&mut dyn RollupFold>,
    step: SettleStep,
    after: Option<&LandedKey>,
) -> Result<Settled> {
    let State { conn, landed } = state;
    let (rows, devices) = (step.rows.max(1), step.devices.max(1));
    // The step: keys after `after`, up to `rows` of them, ending with the last row of
    // the `devices`th device.
    let range = match after {
        Some(k) => landed.range((Bound::Excluded(k), Bound::Unbounded)),
        None => landed.range::<LandedKey, _>(..),
    };
    let mut chosen: Vec<(LandedKey, i64)> = Vec::new();
    let mut seen = 0;
    for (key, rowid) in range {
        if chosen.len() == rows {
            break;
        }
        if chosen.last().is_none_or(|(k, _)| k.device_id != key.device_id) {
            if seen == devices {
                break;
            }
            seen += 1;
        }
        chosen.push((key.clone(), *rowid));
    }
    // As many as allowed: more may be waiting after the last one.
    let full = chosen.len() == rows || seen == devices;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut moved = Vec::new();
    let mut taken = 0u64;
    {
        // Only the rows new to the main table come back, and only they are folded.
        let mut copy = tx.prepare_cached(
            "INSERT INTO telemetry (device_id, seq, first_ms, last_ms, samples, payload) \
             SELECT device_id, seq, first_ms, last_ms, samples, payload FROM telemetry_recent WHERE rowid = ?1 \
             ON CONFLICT (device_id, seq) DO NOTHING \
             RETURNING device_id, seq, first_ms, last_ms, samples, payload",
        )?;
        let mut delete = tx.prepare_cached("DELETE FROM telemetry_recent WHERE rowid = ?1")?;
        for (_, rowid) in &chosen {
            let row = copy.query_row([rowid], |r| TelemetryRecord::from_columns(r)).optional()?;
            moved.extend(row);
            taken += delete.execute([rowid])? as u64;
        }
    }
    if let Some(fold) = fold
        && !moved.is_empty()
    {
        let partials = fold.summarize(&moved);
        merge_rollups(&tx, partials, fold)?;
    }
    tx.commit()?;
    for (key, _) in &chosen {
        landed.remove(key);
    }
    let last = chosen.pop().filter(|_| full).map(|(k, _)| k);
    Ok(Settled::of_step(taken, moved.len() as u64, last))
}

/// Merges `partials` into the stored rollups, inside `tx`: per row, the stored
/// summary is read, merged and written back.
fn merge_rollups(
    tx: &rusqlite::Transaction<'_>,
    partials: Vec<RollupRow>,
    fold: &dyn RollupFold,
) -> Result<()> {
    for tier in Tier::ALL {
        let rows = crate::rollups::combine(&partials, tier, fold);
        let mut read = tx.prepare_cached(&format!(
            "SELECT samples, data FROM {} WHERE device_id = ?1 AND start_ms = ?2",
            tier.table()
        ))?;
        let mut write = tx.prepare_cached(&format!(
            "INSERT INTO {} (device_id, start_ms, samples, data) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (device_id, start_ms) DO UPDATE SET samples = excluded.samples, data = excluded.data",
            tier.table()
        ))?;
        for mut row in rows {
            let stored = read
                .query_row((&row.device_id, row.start_ms), |r| {
                    Ok(RollupRow {
                        device_id: row.device_id.clone(),
                        tier,
                        start_ms: row.start_ms,
                        samples: r.get(0)?,
                        data: r.get(1)?,
                    })
                })
                .optional()?;
            if let Some(mut stored) = stored {
                fold.merge(&mut stored, &row);
                row = stored;
            }
            write.execute((&row.device_id, row.start_ms, row.samples, &row.data))?;
        }
    }
    Ok(())
}

/// Starts the write-ahead log over (see `checkpoint_wal` in the crate root); true
/// when it did, false when a reader still needed the old log.
pub(crate) fn restart_log(state: &mut State) -> Result<bool> {
    let busy: i64 = state.conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| r.get(0))?;
    Ok(busy == 0)
}
