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
//! PostgreSQL keeps the sqlx path in `lib.rs` and `rollups.rs`; the SQL and the
//! guarantees are the same (each row stored once, each folded once).

use std::path::Path;
use std::sync::Mutex;

use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags, OptionalExtension as _, TransactionBehavior};

use crate::{
    Error, LandedKey, PresenceChange, Result, RollupFold, RollupRow, SettleStep, Settled, TelemetryRecord,
    Tier, WriteBatch, WriteOutcome,
};

/// Pages the writer connection keeps in memory: the right-hand leaves of the
/// telemetry tables for every device that sends, and the rollups they fold into.
const CACHE_KIB: i64 = 64 * 1024;

/// The writer connection; `None` once the store is closed.
pub(crate) struct Writer {
    conn: Mutex<Option<Connection>>,
}

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
        Ok(Writer { conn: Mutex::new(Some(conn)) })
    }

    /// Runs `f` on the connection, holding it. `f` blocks: on a multi-threaded runtime
    /// the worker first hands its other tasks on; on a current-thread runtime (ingest's
    /// writer has a thread and a runtime of its own) it runs in place, which is the
    /// point: no hand-off per statement.
    pub(crate) fn run<R>(&self, f: impl FnOnce(&mut Connection) -> Result<R>) -> Result<R> {
        use tokio::runtime::{Handle, RuntimeFlavor};
        let work = || {
            let mut guard = self.conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match guard.as_mut() {
                Some(conn) => f(conn),
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
        let conn = self.conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(conn) = conn
            && let Err((_, e)) = conn.close()
        {
            tracing::warn!(error = %e, "closing the writer connection");
        }
    }
}

/// `sql` with PostgreSQL-style `$n` placeholders as SQLite's `?n`, whose number is
/// the parameter's index (a `$n` would be a named parameter, numbered by where it
/// first appears).
fn numbered(sql: &str) -> String {
    sql.replace('$', "?")
}

/// [`crate::Store::write_batch`] on SQLite.
pub(crate) fn write_batch(conn: &mut Connection, batch: &WriteBatch) -> Result<WriteOutcome> {
    let mut out = WriteOutcome::default();
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
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
        // New rows only: not yet in `telemetry` (checked through its index, a read) nor
        // in `telemetry_recent` (its primary key).
        let mut land = tx.prepare_cached(
            "INSERT INTO telemetry_recent (device_id, seq, first_ms, last_ms, samples, payload) \
             SELECT ?1, ?2, ?3, ?4, ?5, ?6 \
             WHERE NOT EXISTS (SELECT 1 FROM telemetry t WHERE t.device_id = ?1 AND t.seq = ?2) \
             ON CONFLICT (device_id, seq) DO NOTHING",
        )?;
        for t in &batch.telemetry {
            let n = land.execute((&t.device_id, t.seq, t.first_ms, t.last_ms, t.samples, &t.payload))?;
            out.telemetry_inserted += n as u64;
        }
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
    Ok(out)
}

/// [`crate::Store::settle_telemetry`] on SQLite. One writer per file: between the
/// copy and the delete nothing else can land, so both statements see the same rows.
pub(crate) fn settle(
    conn: &mut Connection,
    fold: Option<&mut dyn RollupFold>,
    step: SettleStep,
    after: Option<&LandedKey>,
) -> Result<Settled> {
    let limit = i64::try_from(step.rows.max(1)).unwrap_or(i64::MAX);
    let devices = i64::try_from(step.devices.max(1)).unwrap_or(i64::MAX);
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Parameters: the sweep's lower bound (?1, ?2) when there is one, then the
    // statement's own.
    let (lower, n) = match after {
        Some(_) => ("(device_id, seq) > (?1, ?2)", 2),
        None => ("true", 0),
    };
    let with_lower = |own: &[Value]| -> Vec<Value> {
        let mut p = match after {
            Some(k) => vec![Value::Text(k.device_id.clone()), Value::Integer(k.seq)],
            None => Vec::with_capacity(2),
        };
        p.extend_from_slice(own);
        p
    };
    // The step ends at the `limit`th key or at the last row of the `devices`th device,
    // whichever comes first: a range along the primary key (not `IN (… LIMIT n)`,
    // which SQLite checks row by row over the whole landing table, for every step).
    let by_rows: Option<(String, i64)> = tx
        .prepare_cached(&format!(
            "SELECT device_id, seq FROM telemetry_recent WHERE {lower} \
             ORDER BY device_id, seq LIMIT 1 OFFSET ?{}",
            n + 1
        ))?
        .query_row(rusqlite::params_from_iter(with_lower(&[Value::Integer(limit - 1)])), |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    // The `devices`th device, if that many have landed.
    let (last_device, counted): (Option<String>, i64) = tx
        .prepare_cached(&format!(
            "SELECT max(device_id), count(*) FROM (SELECT DISTINCT device_id FROM telemetry_recent \
             WHERE {lower} ORDER BY device_id LIMIT ?{}) AS d",
            n + 1
        ))?
        .query_row(rusqlite::params_from_iter(with_lower(&[Value::Integer(devices)])), |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    let by_devices = last_device.filter(|_| counted >= devices);
    let bound = match (by_rows, by_devices) {
        (Some(k), Some(d)) if d < k.0 => Some((d, i64::MAX)),
        (Some(k), _) => Some(k),
        (None, Some(d)) => Some((d, i64::MAX)),
        (None, None) => None,
    };
    let (range, params) = match &bound {
        Some((device, seq)) => (
            format!("{lower} AND (device_id, seq) <= (?{}, ?{})", n + 1, n + 2),
            with_lower(&[Value::Text(device.clone()), Value::Integer(*seq)]),
        ),
        None => (lower.to_owned(), with_lower(&[])),
    };
    // Only the rows new to the main table come back, and only they are folded.
    let moved: Vec<TelemetryRecord> = tx
        .prepare_cached(&format!(
            "INSERT INTO telemetry (device_id, seq, first_ms, last_ms, samples, payload) \
             SELECT device_id, seq, first_ms, last_ms, samples, payload FROM telemetry_recent \
             WHERE {range} ORDER BY device_id, seq \
             ON CONFLICT (device_id, seq) DO NOTHING \
             RETURNING device_id, seq, first_ms, last_ms, samples, payload"
        ))?
        .query_map(rusqlite::params_from_iter(params.iter()), |r| {
            Ok(TelemetryRecord {
                device_id: r.get(0)?,
                seq: r.get(1)?,
                first_ms: r.get(2)?,
                last_ms: r.get(3)?,
                samples: r.get(4)?,
                payload: r.get(5)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    let taken = tx
        .prepare_cached(&format!("DELETE FROM telemetry_recent WHERE {range}"))?
        .execute(rusqlite::params_from_iter(params.iter()))? as u64;
    if let Some(fold) = fold
        && !moved.is_empty()
    {
        let partials = fold.summarize(&moved);
        merge_rollups(&tx, partials, fold)?;
    }
    tx.commit()?;
    let last = bound.map(|(device_id, seq)| LandedKey { device_id, seq });
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
pub(crate) fn restart_log(conn: &mut Connection) -> Result<bool> {
    let busy: i64 = conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| r.get(0))?;
    Ok(busy == 0)
}
