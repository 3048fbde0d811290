//! Nanofleet storage: sites, devices and their presence, telemetry and events.
//!
//! One store, two backends behind sqlx's `Any` driver: SQLite in a data directory (the
//! embedded default) and PostgreSQL (scale-out). The SQL is written once, in the subset
//! both understand (`$n` placeholders, `ON CONFLICT`, `CASE`); only the DDL differs,
//! in `migrations/sqlite` and `migrations/postgres`. On SQLite, ingest's writes and
//! bulk reads go through rusqlite instead (`sqlite_writer`, decision 0011).
//!
//! Telemetry is stored one row per batch as the device sent it, keyed by
//! `(device_id, seq)`: a batch that arrives twice is stored once.
//!
//! Every change of state is recorded in the audit trail (`audit`): append-only,
//! hash-chained, with signed checkpoints.
#![forbid(unsafe_code)]

mod alerts;
mod audit;
mod batches;
mod inventory;
mod metrics;
mod people;
mod recipes;
mod records;
mod rollouts;
mod rollups;
mod sqlite_writer;
mod trust;

use std::sync::Arc;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor, Row};

pub use alerts::*;
pub use audit::*;
pub use batches::*;
pub use inventory::*;
pub use metrics::*;
pub use people::*;
pub use recipes::*;
pub use records::*;
pub use rollouts::*;
pub use rollups::*;
pub use trust::*;

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
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The change contradicts the stored state (it exists already, was used up, …).
    #[error("{0}")]
    Conflict(String),
    #[error("audit record {seq} is malformed: {detail}")]
    AuditMalformed { seq: i64, detail: String },
    /// A bulk read straight from the SQLite file failed.
    #[error("database (direct read): {0}")]
    DirectRead(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A handle to the store; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// SQLite: the connection that ingest's writes go through ([`sqlite_writer`]).
    writer: Option<Arc<sqlite_writer::Writer>>,
    /// SQLite: the database file, for bulk reads on a connection of their own that
    /// return rows without sqlx's per-value copies ([`Store::batch_metrics_after`]).
    sqlite_file: Option<Arc<std::path::Path>>,
}

// Rows per multi-row statement, largest first: powers of two, so that n rows take at
// most log2(n) statements (each a round trip to the database) of at most ten shapes
// (all stay prepared); the largest stays under SQLite's and PostgreSQL's
// bind-parameter limits (32,766 and 65,535) at six columns.
const CHUNK_SIZES: [usize; 10] = [512, 256, 128, 64, 32, 16, 8, 4, 2, 1];

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
        let sync_full = opts.sqlite_sync_full;
        let pool = AnyPoolOptions::new()
            .max_connections(opts.max_connections.max(1))
            .acquire_timeout(Duration::from_secs(30))
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        for pragma in sqlite_pragmas(sync_full) {
                            conn.execute(pragma.as_str()).await?;
                        }
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
        // A file on disk: the writer and bulk reads open connections of their own, which
        // would not see an in-memory database.
        let (writer, sqlite_file) = match backend {
            Backend::Sqlite => {
                let file =
                    opts.url.parse::<sqlx::sqlite::SqliteConnectOptions>()?.get_filename().to_path_buf();
                if !file.is_file() {
                    pool.close().await;
                    return Err(Error::UnsupportedUrl { url: opts.url.clone() });
                }
                let writer = Arc::new(sqlite_writer::Writer::open(&file, sync_full)?);
                tokio::spawn(checkpoint_wal(pool.clone(), writer.clone()));
                (Some(writer), Some(Arc::from(file)))
            }
            Backend::Postgres => (None, None),
        };
        Ok(Store { pool, backend, writer, sqlite_file })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Starts a transaction, for a change of state and its audit record
    /// ([`append_audit_in`]) to commit together. On SQLite it takes the write lock at
    /// once (`BEGIN IMMEDIATE`): a transaction that reads before it writes would
    /// otherwise fail, not wait, when another writer or a restarting checkpoint holds
    /// the lock at its first write.
    pub async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>> {
        Ok(match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        })
    }

    /// Waits for open connections to finish and closes them.
    pub async fn close(&self) {
        if let Some(writer) = &self.writer {
            writer.close();
        }
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
                    (SELECT COUNT(*) FROM devices d WHERE d.site_id = s.id AND d.online = 1), \
                    s.time_zone, s.maintenance_window \
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
                    time_zone: r.try_get(4)?,
                    maintenance_window: r.try_get(5)?,
                })
            })
            .collect()
    }

    /// Sets a device's tags (sorted, no duplicates), with its audit record. `false`: no
    /// such device.
    pub async fn set_device_tags(
        &self,
        device_id: &str,
        tags: &[String],
        audit: &AuditEntry,
    ) -> Result<bool> {
        self.set_audited("UPDATE devices SET tags = $2 WHERE id = $1", device_id, &tags.join(","), audit)
            .await
    }

    /// Sets a site's maintenance window, with its audit record. `false`: no such site.
    pub async fn set_site_window(&self, site_id: &str, window: &str, audit: &AuditEntry) -> Result<bool> {
        self.set_audited("UPDATE sites SET maintenance_window = $2 WHERE id = $1", site_id, window, audit)
            .await
    }

    /// Runs `update` (`$1` the row's id, `$2` the value) with `audit` in one
    /// transaction; `false` (nothing written) when no row has that id.
    async fn set_audited(&self, update: &str, id: &str, value: &str, audit: &AuditEntry) -> Result<bool> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(update).bind(id).bind(value).execute(&mut *tx).await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        append_audit_in(&mut tx, audit.clone()).await?;
        tx.commit().await?;
        Ok(true)
    }

    // === devices ===

    /// Records a birth: the device is online in a new session. Creates the device (and
    /// its site, named after its id, if unknown).
    pub async fn apply_birth(&self, b: &Birth) -> Result<()> {
        let mut tx = self.begin().await?;
        birth_in(&mut tx, b).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records a death. Applies only to the session it names, so the late last will of
    /// an old connection never marks a reconnected device offline. Returns whether it
    /// applied.
    pub async fn apply_death(&self, device_id: &str, session_id: &str, time_ms: i64) -> Result<bool> {
        let death = Death { device_id: device_id.into(), session_id: session_id.into(), time_ms };
        let mut tx = self.begin().await?;
        let applied = death_in(&mut tx, &death).await?;
        tx.commit().await?;
        Ok(applied)
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
        // By id, not by position: the database's collation need not be byte order.
        let index: std::collections::HashMap<String, usize> =
            devices.iter().enumerate().map(|(i, d)| (d.id.clone(), i)).collect();
        for r in rows {
            let device_id: String = r.try_get(0)?;
            if let Some(&i) = index.get(&device_id) {
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
        if let Some(writer) = &self.writer {
            return writer.run(|conn| sqlite_writer::write_batch(conn, batch));
        }
        let mut out = WriteOutcome::default();
        let mut tx = self.begin().await?;
        // Presence first and in order: a birth and a death of one device may share a batch.
        for change in &batch.presence {
            match change {
                PresenceChange::Birth(b) => birth_in(&mut tx, b).await?,
                PresenceChange::Death(d) => {
                    if death_in(&mut tx, d).await? {
                        out.deaths_applied += 1;
                    }
                }
            }
        }
        for chunk in chunks(&batch.telemetry) {
            // New rows only: not yet in `telemetry` (checked through its index, a read)
            // nor in `telemetry_recent` (its primary key).
            let sql = format!(
                "INSERT INTO telemetry_recent (device_id, seq, first_ms, last_ms, samples, payload) \
                 SELECT v.column1, v.column2, v.column3, v.column4, v.column5, v.column6 FROM ({}) AS v \
                 WHERE NOT EXISTS (SELECT 1 FROM telemetry t WHERE t.device_id = v.column1 AND t.seq = v.column2) \
                 ON CONFLICT (device_id, seq) DO NOTHING",
                values_rows(self.backend, 6, chunk.len())
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
        for chunk in chunks(&batch.events) {
            let sql = multi_row_insert(
                self.backend,
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
            sqlx::query(ALARM_SQL)
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
        // One statement per chunk of devices, not one per device: each statement is a
        // round trip to the database.
        for chunk in chunks(&batch.last_values) {
            let sql = format!(
                "UPDATE devices SET \
                    last_seen_ms = CASE WHEN devices.last_seen_ms < v.column2 THEN v.column2 ELSE devices.last_seen_ms END, \
                    telemetry_seq = CASE WHEN devices.telemetry_seq < v.column3 THEN v.column3 ELSE devices.telemetry_seq END, \
                    last_sample = CASE WHEN devices.last_sample_ms <= v.column4 THEN v.column5 ELSE devices.last_sample END, \
                    last_sample_ms = CASE WHEN devices.last_sample_ms <= v.column4 THEN v.column4 ELSE devices.last_sample_ms END \
                 FROM ({}) AS v WHERE devices.id = v.column1",
                values_rows(self.backend, 5, chunk.len())
            );
            let mut q = sqlx::query(&sql);
            for l in chunk {
                q = q
                    .bind(&l.device_id)
                    .bind(l.seen_ms)
                    .bind(l.telemetry_seq)
                    .bind(l.sample_ms)
                    .bind(&l.sample);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Moves the first landed telemetry rows (in key order, after the key `after` when
    /// given) from the landing table into the main one, at most `step.rows` rows of at
    /// most `step.devices` devices, and folds the rows that were new into the rollups
    /// (when `fold` is given) in the same transaction: each row is summarised exactly
    /// once. Run by the single writer between its commits, a bounded step at a time, so
    /// that the commits waiting behind a step wait only for that step. The fold's work
    /// grows with the devices in a step (two rollup rows each), the move's with the
    /// rows. A sweep passes the last key of each step to the next, so that it crosses
    /// the landing table once: rows landing behind it wait for the next sweep.
    pub async fn settle_telemetry(
        &self,
        fold: Option<&mut dyn RollupFold>,
        step: SettleStep,
        after: Option<&LandedKey>,
    ) -> Result<Settled> {
        if let Some(writer) = &self.writer {
            return writer.run(|conn| sqlite_writer::settle(conn, fold, step, after));
        }
        let limit = i64::try_from(step.rows.max(1)).unwrap_or(i64::MAX);
        let devices = i64::try_from(step.devices.max(1)).unwrap_or(i64::MAX);
        let mut tx = self.begin().await?;
        // Several servers may share a PostgreSQL database: move exactly the rows
        // this statement deletes (rows another server is moving are skipped), and
        // fold one server at a time, since a merge reads the stored rollup before
        // it writes it.
        if fold.is_some() {
            sqlx::query("SELECT pg_advisory_xact_lock(7314600001)").execute(&mut *tx).await?;
        }
        let lower = if after.is_some() { "(device_id, seq) > ($3, $4)" } else { "true" };
        let sql = format!(
            "WITH moved AS (DELETE FROM telemetry_recent WHERE (device_id, seq) IN \
                (SELECT device_id, seq FROM telemetry_recent WHERE {lower} AND device_id <= \
                    (SELECT max(device_id) FROM (SELECT DISTINCT device_id FROM telemetry_recent \
                     WHERE {lower} ORDER BY device_id LIMIT $2) AS d) \
                 ORDER BY device_id, seq LIMIT $1 FOR UPDATE SKIP LOCKED) RETURNING *), \
             inserted AS (INSERT INTO telemetry (device_id, seq, first_ms, last_ms, samples, payload) \
                SELECT device_id, seq, first_ms, last_ms, samples, payload FROM moved \
                ORDER BY device_id, seq ON CONFLICT (device_id, seq) DO NOTHING \
                RETURNING device_id, seq) \
             SELECT m.device_id, m.seq, m.first_ms, m.last_ms, m.samples, m.payload, \
                (CASE WHEN i.seq IS NULL THEN 0 ELSE 1 END)::BIGINT \
             FROM moved m LEFT JOIN inserted i ON i.device_id = m.device_id AND i.seq = m.seq"
        );
        let mut q = sqlx::query(&sql).bind(limit).bind(devices);
        if let Some(k) = after {
            q = q.bind(k.device_id.clone()).bind(k.seq);
        }
        let rows = q.fetch_all(&mut *tx).await?;
        let mut moved = Vec::with_capacity(rows.len());
        let mut last: Option<LandedKey> = None;
        for r in &rows {
            let key = LandedKey { device_id: r.try_get(0)?, seq: r.try_get(1)? };
            if last.as_ref().is_none_or(|l| key > *l) {
                last = Some(key);
            }
            if r.try_get::<i64, _>(6)? == 1 {
                moved.push(TelemetryRecord::from_row(r)?);
            }
        }
        // Until a step finds nothing left.
        let taken = rows.len() as u64;
        if let Some(fold) = fold
            && !moved.is_empty()
        {
            let partials = fold.summarize(&moved);
            self.merge_rollups(&mut tx, partials, fold).await?;
        }
        tx.commit().await?;
        Ok(Settled::of_step(taken, moved.len() as u64, last))
    }

    /// Telemetry batches of one device overlapping `[since_ms, until_ms)`, oldest first:
    /// the newest batches that hold at least `limit` samples (or all of them).
    pub async fn query_telemetry(
        &self,
        device_id: &str,
        since_ms: i64,
        until_ms: i64,
        limit: u32,
    ) -> Result<Vec<TelemetryRecord>> {
        use futures::TryStreamExt as _;
        // Newest first along the primary key (device_id, seq): a device numbers its
        // batches in time order, so the walk stops once it is past the window. A few
        // rows of slack allow for small clock steps on the device. A time index would
        // cost a second scattered B-tree write per stored batch.
        const SLACK: u32 = 64;
        let want = i64::from(limit);
        if want == 0 {
            return Ok(Vec::new());
        }
        let recent = sqlx::query(
            "SELECT device_id, seq, first_ms, last_ms, samples, payload FROM telemetry_recent \
             WHERE device_id = $1 AND last_ms >= $2 AND first_ms < $3",
        )
        .bind(device_id)
        .bind(since_ms)
        .bind(until_ms)
        .fetch_all(&self.pool)
        .await?;
        let mut found: std::collections::BTreeMap<i64, TelemetryRecord> = std::collections::BTreeMap::new();
        for row in &recent {
            let rec = TelemetryRecord::from_row(row)?;
            found.insert(rec.seq, rec);
        }
        let mut samples: i64 = found.values().map(|r| r.samples).sum();
        let mut rows = sqlx::query(
            "SELECT device_id, seq, first_ms, last_ms, samples, payload FROM telemetry \
             WHERE device_id = $1 ORDER BY seq DESC",
        )
        .bind(device_id)
        .fetch(&self.pool);
        let mut older = 0u32;
        // Enough samples: `limit` counts samples, and a row holds up to a thousand.
        while samples < want {
            let Some(row) = rows.try_next().await? else { break };
            let rec = TelemetryRecord::from_row(&row)?;
            if rec.last_ms < since_ms {
                older += 1;
                if older > SLACK {
                    break;
                }
                continue;
            }
            older = 0;
            // A row a settle moved between the two reads is met twice: keep one.
            if rec.first_ms < until_ms && !found.contains_key(&rec.seq) {
                samples += rec.samples;
                found.insert(rec.seq, rec);
            }
        }
        // The newest rows holding `limit` samples, oldest first.
        let mut out = Vec::new();
        let mut kept = 0;
        for (_, rec) in found.into_iter().rev() {
            if kept >= want {
                break;
            }
            kept += rec.samples;
            out.push(rec);
        }
        out.sort_by_key(|r| (r.last_ms, r.seq));
        Ok(out)
    }

    /// Telemetry sequence numbers stored for a device, ascending (for checks and tests).
    pub async fn telemetry_seqs(&self, device_id: &str) -> Result<Vec<i64>> {
        let rows = sqlx::query(
            "SELECT seq FROM telemetry WHERE device_id = $1 \
             UNION ALL SELECT seq FROM telemetry_recent WHERE device_id = $1 ORDER BY 1",
        )
        .bind(device_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
    }

    /// Number of telemetry rows stored.
    pub async fn telemetry_count(&self) -> Result<i64> {
        // One statement, one snapshot: a move between two counts would hide its rows.
        let n: i64 =
            sqlx::query("SELECT (SELECT COUNT(*) FROM telemetry) + (SELECT COUNT(*) FROM telemetry_recent)")
                .fetch_one(&self.pool)
                .await?
                .try_get(0)?;
        Ok(n)
    }
}

/// A birth: the site (named after its id) if unknown, …
pub(crate) const BIRTH_SITE_SQL: &str =
    "INSERT INTO sites (id, name, created_ms) VALUES ($1, $1, $2) ON CONFLICT (id) DO NOTHING";
/// … then the device, online in its new session.
pub(crate) const BIRTH_DEVICE_SQL: &str = "INSERT INTO devices (id, site_id, model, firmware_version, online, session_id, connected_ms, last_seen_ms) \
     VALUES ($1, $2, $3, $4, 1, $5, $6, $6) \
     ON CONFLICT (id) DO UPDATE SET model = excluded.model, \
        firmware_version = excluded.firmware_version, online = 1, session_id = excluded.session_id, \
        connected_ms = excluded.connected_ms, \
        last_seen_ms = CASE WHEN devices.last_seen_ms < excluded.last_seen_ms \
                       THEN excluded.last_seen_ms ELSE devices.last_seen_ms END";
/// A death, applied only to the session it names.
pub(crate) const DEATH_SQL: &str = "UPDATE devices SET online = 0, \
        last_seen_ms = CASE WHEN last_seen_ms < $3 THEN $3 ELSE last_seen_ms END \
     WHERE id = $1 AND session_id = $2 AND online = 1";
/// An alarm's newest state. Only a newer change overwrites: re-sent events arrive late.
pub(crate) const ALARM_SQL: &str = "INSERT INTO alarms (device_id, code, line, priority, active, detail, changed_ms) \
     VALUES ($1, $2, $3, $4, $5, $6, $7) \
     ON CONFLICT (device_id, code, line) DO UPDATE SET priority = excluded.priority, \
        active = excluded.active, detail = excluded.detail, changed_ms = excluded.changed_ms \
     WHERE alarms.changed_ms <= excluded.changed_ms";

async fn birth_in(conn: &mut sqlx::AnyConnection, b: &Birth) -> Result<()> {
    sqlx::query(BIRTH_SITE_SQL).bind(&b.site_id).bind(b.time_ms).execute(&mut *conn).await?;
    sqlx::query(BIRTH_DEVICE_SQL)
        .bind(&b.device_id)
        .bind(&b.site_id)
        .bind(&b.model)
        .bind(&b.firmware_version)
        .bind(&b.session_id)
        .bind(b.time_ms)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

async fn death_in(conn: &mut sqlx::AnyConnection, d: &Death) -> Result<bool> {
    let done = sqlx::query(DEATH_SQL)
        .bind(&d.device_id)
        .bind(&d.session_id)
        .bind(d.time_ms)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// Settings of every SQLite connection, pooled or the writer's.
pub(crate) fn sqlite_pragmas(sync_full: bool) -> [String; 5] {
    [
        format!("PRAGMA synchronous = {}", if sync_full { "FULL" } else { "NORMAL" }),
        "PRAGMA busy_timeout = 10000".into(),
        "PRAGMA foreign_keys = ON".into(),
        // Checkpoints run in the background (below), not inside the writer's commits.
        "PRAGMA wal_autocheckpoint = 0".into(),
        // The log file is cut back to this size when it starts over.
        format!("PRAGMA journal_size_limit = {WAL_LIMIT_BYTES}"),
    ]
}

/// Copies the SQLite write-ahead log back into the database every half second, beside
/// the writer rather than inside its commits. Each commit rewrites the B-tree pages it
/// touches into the log; a page that every commit touches (a device's newest index
/// page) is copied back once per checkpoint instead of once per automatic checkpoint
/// of 1,000 pages. A passive checkpoint never blocks the writer.
///
/// A passive checkpoint never starts the log over either: under a steady stream of
/// commits the writer always appends, and the log grows without end (measured: 5 GB in
/// four minutes with 10,000 devices). So once the log holds more than
/// [`WAL_LIMIT_BYTES`], a restarting checkpoint runs on the writer's connection, so
/// that no commit slips in, and waits for the readers still on the old log; the next
/// commit writes from the start of the file again, and `journal_size_limit` trims the
/// file.
async fn checkpoint_wal(pool: AnyPool, writer: Arc<sqlite_writer::Writer>) {
    let mut every = tokio::time::interval(Duration::from_millis(500));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if pool.is_closed() {
            return;
        }
        let frames = match sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").fetch_one(&pool).await {
            Ok(row) => row.try_get::<i64, _>(1).unwrap_or(0),
            Err(e) => {
                if pool.is_closed() {
                    return;
                }
                tracing::warn!(error = %e, "sqlite checkpoint");
                continue;
            }
        };
        if frames > WAL_LIMIT_BYTES / WAL_FRAME_BYTES {
            // On the writer's own connection, holding it: a restart must find no
            // writer, and one that commits back to back would leave it no gap.
            let w = writer.clone();
            match tokio::task::spawn_blocking(move || w.run(sqlite_writer::restart_log)).await {
                Ok(Ok(true)) => tracing::debug!(frames, "sqlite log started over"),
                Ok(Ok(false)) => tracing::debug!(frames, "sqlite log busy; restart retried next time"),
                Ok(Err(e)) if !pool.is_closed() => tracing::warn!(error = %e, "sqlite checkpoint (restart)"),
                Ok(Err(_)) | Err(_) => return,
            }
        }
    }
}

/// The write-ahead log is started over above this size, and its file cut back to it.
const WAL_LIMIT_BYTES: i64 = 64 << 20;
/// A log frame holds one database page (SQLite's default page size).
const WAL_FRAME_BYTES: i64 = 4_096;

/// `head VALUES (..), (..) tail` for `rows` rows of `cols` placeholders.
fn multi_row_insert(backend: Backend, head: &str, cols: usize, rows: usize, tail: &str) -> String {
    format!("{head} {} {tail}", values_rows(backend, cols, rows))
}

/// `VALUES (..), (..)` for `rows` rows of `cols` placeholders: numbered (`$n`) for
/// PostgreSQL, anonymous (`?`) for SQLite, which resolves a numbered parameter by
/// scanning its parameter list (quadratic in a statement's parameter count, measured
/// at 5 µs per row of six). sqlx's `QueryBuilder` cannot be used: under the `Any`
/// driver it writes `?` for PostgreSQL too.
fn values_rows(backend: Backend, cols: usize, rows: usize) -> String {
    use std::fmt::Write as _;
    let mut sql = String::with_capacity(8 + rows * cols * 6);
    sql.push_str("VALUES ");
    for r in 0..rows {
        sql.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..cols {
            let sep = if c == 0 { "" } else { ", " };
            match backend {
                Backend::Sqlite => {
                    let _ = write!(sql, "{sep}?");
                }
                Backend::Postgres => {
                    let _ = write!(sql, "{sep}${}", r * cols + c + 1);
                }
            }
        }
        sql.push(')');
    }
    sql
}

/// Splits rows into chunks of a few fixed sizes, largest first, so that every
/// multi-row statement has one of a handful of shapes and stays in the prepared
/// statement cache.
fn chunks<T>(rows: &[T]) -> impl Iterator<Item = &[T]> {
    let mut rest = rows;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let size = CHUNK_SIZES.iter().copied().find(|s| *s <= rest.len()).unwrap_or(1);
        let (chunk, tail) = rest.split_at(size);
        rest = tail;
        Some(chunk)
    })
}

const DEVICE_COLUMNS: &str = "id, site_id, model, firmware_version, online, session_id, connected_ms, \
     last_seen_ms, telemetry_seq, last_sample_ms, last_sample, status, enrolled_ms, hardware_serial, \
     cert_not_after_ms, tags";

#[cfg(test)]
mod tests {
    #[test]
    fn rows_are_chunked_into_a_few_fixed_sizes() {
        let rows: Vec<u32> = (0..700).collect();
        let sizes: Vec<usize> = super::chunks(&rows).map(<[u32]>::len).collect();
        assert_eq!(sizes, vec![512, 128, 32, 16, 8, 4]);
        assert_eq!(super::chunks(&rows).flatten().count(), 700);
    }

    #[test]
    fn multi_row_insert_numbers_placeholders_across_rows() {
        use super::Backend::{Postgres, Sqlite};
        assert_eq!(
            super::multi_row_insert(Postgres, "INSERT INTO t (a, b)", 2, 2, "ON CONFLICT DO NOTHING"),
            "INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4) ON CONFLICT DO NOTHING"
        );
        assert_eq!(super::values_rows(Sqlite, 2, 2), "VALUES (?, ?), (?, ?)");
    }
}
