//! Telemetry rollups (per device, per minute and per hour) and retention.
//!
//! The store keeps rollup rows as opaque bytes: what they hold and how two of them
//! merge is the caller's ([`RollupFold`]). The store guarantees that every telemetry
//! row is folded in exactly once: in the transaction that moves it from the landing
//! table into `telemetry` (see [`Store::settle_telemetry`]).

use std::collections::HashMap;

use sqlx::Row as _;

use crate::{Result, Store, TelemetryRecord, chunks, values_rows};

/// A rollup interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    Minute,
    Hour,
}

impl Tier {
    pub const ALL: [Tier; 2] = [Tier::Minute, Tier::Hour];

    /// The interval's width in milliseconds.
    pub fn width_ms(self) -> i64 {
        match self {
            Tier::Minute => 60_000,
            Tier::Hour => 3_600_000,
        }
    }

    /// The start of the interval holding `ms` (intervals are aligned to the Unix epoch).
    pub fn start_of(self, ms: i64) -> i64 {
        ms.div_euclid(self.width_ms()) * self.width_ms()
    }

    pub(crate) fn table(self) -> &'static str {
        match self {
            Tier::Minute => "telemetry_1m",
            Tier::Hour => "telemetry_1h",
        }
    }
}

/// One rollup row: the summary of a device's samples in one interval.
#[derive(Debug, Clone, PartialEq)]
pub struct RollupRow {
    pub device_id: String,
    pub tier: Tier,
    /// Interval start, ms since the Unix epoch.
    pub start_ms: i64,
    /// Samples summarised.
    pub samples: i64,
    /// The summary, in the fold's format.
    pub data: Vec<u8>,
}

/// What the rollups hold, supplied by the caller of [`Store::settle_telemetry`].
pub trait RollupFold: Send {
    /// Summaries of telemetry rows that have just been stored; each row is passed
    /// exactly once over the life of the database.
    fn summarize(&mut self, landed: &[TelemetryRecord]) -> Vec<RollupRow>;
    /// Merges `other` (same device, tier and interval) into `into`.
    fn merge(&self, into: &mut RollupRow, other: &RollupRow);
}

/// How long each kind of telemetry data is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Raw telemetry batches, by the time of their newest sample.
    pub raw_ms: i64,
    pub minute_ms: i64,
    pub hour_ms: i64,
}

/// Rows deleted by one retention pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expired {
    pub raw: u64,
    pub minute: u64,
    pub hour: u64,
}

/// The partials of one tier merged into one row per key, in key order (stable
/// statement shapes, ordered writes).
pub(crate) fn combine(partials: &[RollupRow], tier: Tier, fold: &dyn RollupFold) -> Vec<RollupRow> {
    let mut merged: HashMap<(String, i64), RollupRow> = HashMap::new();
    for p in partials.iter().filter(|p| p.tier == tier) {
        match merged.get_mut(&(p.device_id.clone(), p.start_ms)) {
            Some(row) => fold.merge(row, p),
            None => {
                merged.insert((p.device_id.clone(), p.start_ms), p.clone());
            }
        }
    }
    let mut rows: Vec<RollupRow> = merged.into_values().collect();
    rows.sort_by(|a, b| (&a.device_id, a.start_ms).cmp(&(&b.device_id, b.start_ms)));
    rows
}

/// Raw rows read per step of the retention walk along a device's sequence numbers.
const EXPIRE_STEP: i64 = 1_000;

impl Store {
    /// Merges `partials` into the stored rollups, inside `tx` (PostgreSQL; SQLite's
    /// writer has its own, in `sqlite_writer`).
    pub(crate) async fn merge_rollups(
        &self,
        conn: &mut sqlx::AnyConnection,
        partials: Vec<RollupRow>,
        fold: &dyn RollupFold,
    ) -> Result<()> {
        for tier in Tier::ALL {
            let mut rows = combine(&partials, tier, fold);
            let mut at: HashMap<(String, i64), usize> =
                rows.iter().enumerate().map(|(i, r)| ((r.device_id.clone(), r.start_ms), i)).collect();
            // The stored rows for these keys, merged into the new ones.
            let keys: Vec<(String, i64)> = rows.iter().map(|r| (r.device_id.clone(), r.start_ms)).collect();
            for chunk in chunks(&keys) {
                let sql = format!(
                    "SELECT device_id, start_ms, samples, data FROM {} WHERE (device_id, start_ms) IN ({})",
                    tier.table(),
                    values_rows(self.backend, 2, chunk.len())
                );
                let mut q = sqlx::query(&sql);
                for (device, start) in chunk {
                    q = q.bind(device).bind(*start);
                }
                for r in q.fetch_all(&mut *conn).await? {
                    let stored = RollupRow {
                        device_id: r.try_get(0)?,
                        tier,
                        start_ms: r.try_get(1)?,
                        samples: r.try_get(2)?,
                        data: r.try_get(3)?,
                    };
                    if let Some(i) = at.remove(&(stored.device_id.clone(), stored.start_ms)) {
                        let partial = std::mem::replace(&mut rows[i], stored);
                        fold.merge(&mut rows[i], &partial);
                    }
                }
            }
            for chunk in chunks(&rows) {
                let sql = format!(
                    "INSERT INTO {} (device_id, start_ms, samples, data) {} \
                     ON CONFLICT (device_id, start_ms) DO UPDATE SET samples = excluded.samples, data = excluded.data",
                    tier.table(),
                    values_rows(self.backend, 4, chunk.len())
                );
                let mut q = sqlx::query(&sql);
                for r in chunk {
                    q = q.bind(&r.device_id).bind(r.start_ms).bind(r.samples).bind(&r.data);
                }
                q.execute(&mut *conn).await?;
            }
        }
        Ok(())
    }

    /// Rollup rows of one device and tier with `since_ms <= start_ms < until_ms`, oldest
    /// first.
    pub async fn rollups(
        &self,
        device_id: &str,
        tier: Tier,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<RollupRow>> {
        let sql = format!(
            "SELECT start_ms, samples, data FROM {} WHERE device_id = $1 AND start_ms >= $2 AND start_ms < $3 \
             ORDER BY start_ms",
            tier.table()
        );
        let rows =
            sqlx::query(&sql).bind(device_id).bind(since_ms).bind(until_ms).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                Ok(RollupRow {
                    device_id: device_id.to_string(),
                    tier,
                    start_ms: r.try_get(0)?,
                    samples: r.try_get(1)?,
                    data: r.try_get(2)?,
                })
            })
            .collect()
    }

    /// Deletes telemetry older than the retention allows, device by device along the
    /// primary keys (no time index is needed, and each statement is short, so ingest's
    /// commits interleave with a long pass).
    pub async fn expire_telemetry(&self, retention: Retention, now_ms: i64) -> Result<Expired> {
        let mut out = Expired::default();
        let devices: Vec<String> = sqlx::query("SELECT id FROM devices ORDER BY id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        for device in &devices {
            for (tier, keep, count) in [
                (Tier::Minute, retention.minute_ms, &mut out.minute),
                (Tier::Hour, retention.hour_ms, &mut out.hour),
            ] {
                let sql = format!("DELETE FROM {} WHERE device_id = $1 AND start_ms < $2", tier.table());
                *count += sqlx::query(&sql)
                    .bind(device)
                    .bind(now_ms.saturating_sub(keep))
                    .execute(&self.pool)
                    .await?
                    .rows_affected();
            }
            out.raw += self.expire_raw(device, now_ms.saturating_sub(retention.raw_ms)).await?;
        }
        Ok(out)
    }

    /// Deletes a device's oldest raw rows whose newest sample is before `cutoff_ms`:
    /// the prefix of its sequence numbers, which a device assigns in time order. The
    /// walk stops at the first row still kept.
    async fn expire_raw(&self, device: &str, cutoff_ms: i64) -> Result<u64> {
        let mut deleted = 0;
        loop {
            let rows =
                sqlx::query("SELECT seq, last_ms FROM telemetry WHERE device_id = $1 ORDER BY seq LIMIT $2")
                    .bind(device)
                    .bind(EXPIRE_STEP)
                    .fetch_all(&self.pool)
                    .await?;
            let mut last_expired = None;
            let mut reached_kept = false;
            for r in &rows {
                let (seq, last_ms): (i64, i64) = (r.try_get(0)?, r.try_get(1)?);
                if last_ms >= cutoff_ms {
                    reached_kept = true;
                    break;
                }
                last_expired = Some(seq);
            }
            let Some(upto) = last_expired else { return Ok(deleted) };
            let n = sqlx::query("DELETE FROM telemetry WHERE device_id = $1 AND seq <= $2")
                .bind(device)
                .bind(upto)
                .execute(&self.pool)
                .await?
                .rows_affected();
            deleted += n;
            if reached_kept || (rows.len() as i64) < EXPIRE_STEP || n == 0 {
                return Ok(deleted);
            }
        }
    }
}
