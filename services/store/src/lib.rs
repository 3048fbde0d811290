//! Nanofleet storage: sites, devices and their presence, telemetry and events.
//!
//! One store, two backends behind sqlx's `Any` driver: SQLite in a data directory (the
//! embedded default) and PostgreSQL (scale-out). The SQL is written once, in the subset
//! both understand (`$n` placeholders, `ON CONFLICT`, `CASE`); only the DDL differs,
//! in `migrations/sqlite` and `migrations/postgres`.
//!
//! Telemetry is stored one row per batch as the device sent it, keyed by
//! `(device_id, seq)`: a batch that arrives twice is stored once.
#![forbid(unsafe_code)]

mod records;

use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor, Row};

pub use records::*;

/// How to reach the database.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Options {
    /// `sqlite://PATH` (created if missing) or `postgres://USER@HOST/DB`.
    pub url: String,
    /// Connections in the pool.
    pub max_connections: u32,
    /// SQLite only: fsync every commit (`synchronous=FULL`). With it an acknowledged
    /// message survives a power loss, not just a crash of the server.
    pub sqlite_sync_full: bool,
}

impl Options {
    pub fn sqlite(path: &std::path::Path) -> Options {
        Options {
            url: format!("sqlite://{}?mode=rwc", path.display()),
            max_connections: 4,
            sqlite_sync_full: true,
        }
    }
}

/// Which database a store talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Storage errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database url {url:?} is not supported: use sqlite://PATH or postgres://...")]
    UnsupportedUrl { url: String },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A handle to the store; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

// Rows per multi-row INSERT: under SQLite's and PostgreSQL's bind-parameter limits.
const ROWS_PER_INSERT: usize = 500;

impl Store {
    /// Connects and brings the schema up to date.
    pub async fn open(opts: &Options) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let backend = if opts.url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if opts.url.starts_with("postgres:") || opts.url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(Error::UnsupportedUrl { url: opts.url.clone() });
        };
        let connect: AnyConnectOptions = opts.url.parse()?;
        let sync = if opts.sqlite_sync_full { "FULL" } else { "NORMAL" };
        let pool = AnyPoolOptions::new()
            .max_connections(opts.max_connections.max(1))
            .acquire_timeout(Duration::from_secs(30))
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute(format!("PRAGMA synchronous = {sync}").as_str()).await?;
                        conn.execute("PRAGMA busy_timeout = 10000").await?;
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                    }
                    Ok(())
                })
            })
            .connect_with(connect)
            .await?;
        match backend {
            Backend::Sqlite => sqlx::migrate!("./migrations/sqlite").run(&pool).await?,
            Backend::Postgres => sqlx::migrate!("./migrations/postgres").run(&pool).await?,
        }
        Ok(Store { pool, backend })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Waits for open connections to finish and closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    // === sites ===

    /// Creates a site, or renames it if it exists.
    pub async fn upsert_site(&self, id: &str, name: &str, now_ms: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO sites (id, name, created_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (id) DO UPDATE SET name = excluded.name",
        )
        .bind(id)
        .bind(name)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Every site with its device counts, by id.
    pub async fn list_sites(&self) -> Result<Vec<SiteSummary>> {
        let rows = sqlx::query(
            "SELECT s.id, s.name, \
                    (SELECT COUNT(*) FROM devices d WHERE d.site_id = s.id), \
                    (SELECT COUNT(*) FROM devices d WHERE d.site_id = s.id AND d.online = 1) \
             FROM sites s ORDER BY s.id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(SiteSummary {
                    id: r.try_get(0)?,
                    name: r.try_get(1)?,
                    devices_total: r.try_get(2)?,
                    devices_online: r.try_get(3)?,
                })
            })
            .collect()
    }

    // === devices ===

    /// Records a birth: the device is online in a new session. Creates the device (and
    /// its site, named after its id, if unknown).
    pub async fn apply_birth(&self, b: &Birth) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO sites (id, name, created_ms) VALUES ($1, $1, $2) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&b.site_id)
        .bind(b.time_ms)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO devices (id, site_id, model, firmware_version, online, session_id, connected_ms, last_seen_ms) \
             VALUES ($1, $2, $3, $4, 1, $5, $6, $6) \
             ON CONFLICT (id) DO UPDATE SET site_id = excluded.site_id, model = excluded.model, \
                firmware_version = excluded.firmware_version, online = 1, session_id = excluded.session_id, \
                connected_ms = excluded.connected_ms, \
                last_seen_ms = CASE WHEN devices.last_seen_ms < excluded.last_seen_ms \
                               THEN excluded.last_seen_ms ELSE devices.last_seen_ms END",
        )
        .bind(&b.device_id)
        .bind(&b.site_id)
        .bind(&b.model)
        .bind(&b.firmware_version)
        .bind(&b.session_id)
        .bind(b.time_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records a death. Applies only to the session it names, so the late last will of
    /// an old connection never marks a reconnected device offline. Returns whether it
    /// applied.
    pub async fn apply_death(&self, device_id: &str, session_id: &str, time_ms: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE devices SET online = 0, \
                last_seen_ms = CASE WHEN last_seen_ms < $3 THEN $3 ELSE last_seen_ms END \
             WHERE id = $1 AND session_id = $2 AND online = 1",
        )
        .bind(device_id)
        .bind(session_id)
        .bind(time_ms)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Marks every device offline: the embedded broker starts with no connections.
    pub async fn mark_all_offline(&self) -> Result<u64> {
        let done = sqlx::query("UPDATE devices SET online = 0 WHERE online = 1").execute(&self.pool).await?;
        Ok(done.rows_affected())
    }

    /// Devices, of one site or all, by id.
    pub async fn list_devices(&self, site_id: Option<&str>) -> Result<Vec<DeviceRecord>> {
        let rows = match site_id {
            Some(site) => {
                sqlx::query(&format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE site_id = $1 ORDER BY id"))
                    .bind(site)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                sqlx::query(&format!("SELECT {DEVICE_COLUMNS} FROM devices ORDER BY id"))
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        let mut devices = rows.iter().map(DeviceRecord::from_row).collect::<Result<Vec<_>>>()?;
        self.attach_alarms(&mut devices).await?;
        Ok(devices)
    }

    pub async fn get_device(&self, id: &str) -> Result<Option<DeviceRecord>> {
        let row = sqlx::query(&format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let mut devices = vec![DeviceRecord::from_row(&row)?];
        self.attach_alarms(&mut devices).await?;
        Ok(devices.pop())
    }

    async fn attach_alarms(&self, devices: &mut [DeviceRecord]) -> Result<()> {
        let rows = sqlx::query(
            "SELECT device_id, code, line, priority, detail, changed_ms FROM alarms WHERE active = 1 \
             ORDER BY device_id, priority DESC, code",
        )
        .fetch_all(&self.pool)
        .await?;
        for r in rows {
            let device_id: String = r.try_get(0)?;
            if let Ok(i) = devices.binary_search_by(|d| d.id.as_str().cmp(&device_id)) {
                devices[i].active_alarms.push(AlarmRecord {
                    code: r.try_get(1)?,
                    line: r.try_get(2)?,
                    priority: r.try_get(3)?,
                    detail: r.try_get(4)?,
                    changed_ms: r.try_get(5)?,
                });
            }
        }
        Ok(())
    }

    // === telemetry and events ===

    /// Writes one ingest batch in one transaction. Rows already stored (same device and
    /// sequence number) are skipped; the outcome counts what was new.
    pub async fn write_batch(&self, batch: &WriteBatch) -> Result<WriteOutcome> {
        let mut out = WriteOutcome::default();
        let mut tx = self.pool.begin().await?;
        for chunk in batch.telemetry.chunks(ROWS_PER_INSERT) {
            let sql = multi_row_insert(
                "INSERT INTO telemetry (device_id, seq, first_ms, last_ms, samples, payload)",
                6,
                chunk.len(),
                "ON CONFLICT (device_id, seq) DO NOTHING",
            );
            let mut q = sqlx::query(&sql);
            for t in chunk {
                q = q
                    .bind(&t.device_id)
                    .bind(t.seq)
                    .bind(t.first_ms)
                    .bind(t.last_ms)
                    .bind(t.samples)
                    .bind(&t.payload);
            }
            out.telemetry_inserted += q.execute(&mut *tx).await?.rows_affected();
        }
        for chunk in batch.events.chunks(ROWS_PER_INSERT) {
            let sql = multi_row_insert(
                "INSERT INTO events (device_id, seq, time_ms, payload)",
                4,
                chunk.len(),
                "ON CONFLICT (device_id, seq) DO NOTHING",
            );
            let mut q = sqlx::query(&sql);
            for e in chunk {
                q = q.bind(&e.device_id).bind(e.seq).bind(e.time_ms).bind(&e.payload);
            }
            out.events_inserted += q.execute(&mut *tx).await?.rows_affected();
        }
        for a in &batch.alarms {
            // Only a newer change overwrites: re-sent events arrive late.
            sqlx::query(
                "INSERT INTO alarms (device_id, code, line, priority, active, detail, changed_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (device_id, code, line) DO UPDATE SET priority = excluded.priority, \
                    active = excluded.active, detail = excluded.detail, changed_ms = excluded.changed_ms \
                 WHERE alarms.changed_ms <= excluded.changed_ms",
            )
            .bind(&a.device_id)
            .bind(a.code)
            .bind(a.line)
            .bind(a.priority)
            .bind(i64::from(a.active))
            .bind(&a.detail)
            .bind(a.changed_ms)
            .execute(&mut *tx)
            .await?;
        }
        for l in &batch.last_values {
            sqlx::query(
                "UPDATE devices SET \
                    last_seen_ms = CASE WHEN last_seen_ms < $2 THEN $2 ELSE last_seen_ms END, \
                    telemetry_seq = CASE WHEN telemetry_seq < $3 THEN $3 ELSE telemetry_seq END, \
                    last_sample = CASE WHEN last_sample_ms <= $4 THEN $5 ELSE last_sample END, \
                    last_sample_ms = CASE WHEN last_sample_ms <= $4 THEN $4 ELSE last_sample_ms END \
                 WHERE id = $1",
            )
            .bind(&l.device_id)
            .bind(l.seen_ms)
            .bind(l.telemetry_seq)
            .bind(l.sample_ms)
            .bind(l.sample.clone())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Telemetry batches of one device overlapping `[since_ms, until_ms)`, oldest first,
    /// at most `limit` (the newest are kept).
    pub async fn query_telemetry(
        &self,
        device_id: &str,
        since_ms: i64,
        until_ms: i64,
        limit: u32,
    ) -> Result<Vec<TelemetryRecord>> {
        let rows = sqlx::query(
            "SELECT device_id, seq, first_ms, last_ms, samples, payload FROM telemetry \
             WHERE device_id = $1 AND last_ms >= $2 AND first_ms < $3 \
             ORDER BY last_ms DESC, seq DESC LIMIT $4",
        )
        .bind(device_id)
        .bind(since_ms)
        .bind(until_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let mut out = rows.iter().map(TelemetryRecord::from_row).collect::<Result<Vec<_>>>()?;
        out.reverse();
        Ok(out)
    }

    /// Telemetry sequence numbers stored for a device, ascending (for checks and tests).
    pub async fn telemetry_seqs(&self, device_id: &str) -> Result<Vec<i64>> {
        let rows = sqlx::query("SELECT seq FROM telemetry WHERE device_id = $1 ORDER BY seq")
            .bind(device_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
    }

    /// Number of telemetry rows stored.
    pub async fn telemetry_count(&self) -> Result<i64> {
        Ok(sqlx::query("SELECT COUNT(*) FROM telemetry").fetch_one(&self.pool).await?.try_get(0)?)
    }
}

/// `head VALUES ($1, .., $cols), (..), .. tail` for `rows` rows. sqlx's `QueryBuilder`
/// writes `?` placeholders under the `Any` driver, which PostgreSQL rejects; `$n`
/// works on both backends.
fn multi_row_insert(head: &str, cols: usize, rows: usize, tail: &str) -> String {
    use std::fmt::Write as _;
    let mut sql = String::with_capacity(head.len() + tail.len() + rows * cols * 6);
    sql.push_str(head);
    sql.push_str(" VALUES ");
    for r in 0..rows {
        sql.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..cols {
            let _ = write!(sql, "{}${}", if c == 0 { "" } else { ", " }, r * cols + c + 1);
        }
        sql.push(')');
    }
    sql.push(' ');
    sql.push_str(tail);
    sql
}

const DEVICE_COLUMNS: &str = "id, site_id, model, firmware_version, online, session_id, connected_ms, \
     last_seen_ms, telemetry_seq, last_sample_ms, last_sample";

#[cfg(test)]
mod tests {
    #[test]
    fn multi_row_insert_numbers_placeholders_across_rows() {
        assert_eq!(
            super::multi_row_insert("INSERT INTO t (a, b)", 2, 2, "ON CONFLICT DO NOTHING"),
            "INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4) ON CONFLICT DO NOTHING"
        );
    }
}
