//! What monitoring reads from batch records: one row of strata and measurements per
//! batch, and each recipe version's specification limits. Rows are derived from the
//! signed record and written in the same transaction, so they never disagree with it;
//! `seq` lets a reader follow the table by tailing it.

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::records::Columns;
use crate::{Result, Store};

/// The measured columns of `batch_metrics`, in the order of [`BatchMetrics::values`].
pub const METRIC_COLUMNS: [&str; 8] = [
    "size_nm",
    "pdi",
    "encapsulation_pct",
    "ph",
    "yield_pct",
    "flow_cv",
    "max_pressure_mbar",
    "frr_error_pct",
];

/// One batch as monitoring sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchMetrics {
    /// Arrival order; assigned by the database (ignored on insert).
    pub seq: i64,
    pub batch_id: String,
    pub device_id: String,
    pub site_id: String,
    pub model: String,
    pub firmware_version: String,
    pub recipe_id: String,
    pub recipe_version: i64,
    pub cartridge_lot: String,
    pub ended_ms: i64,
    /// `complete` or `aborted`.
    pub outcome: String,
    pub qc_passed: bool,
    /// Measurements in [`METRIC_COLUMNS`] order; `None` where the record has none
    /// (an aborted run has no QC).
    pub values: [Option<f64>; 8],
    /// Alarms raised during the run.
    pub alarms: i64,
}

/// A recipe version's release limits for one attribute.
#[derive(Debug, Clone, PartialEq)]
pub struct QualityLimit {
    pub recipe_id: String,
    pub recipe_version: i64,
    /// A [`METRIC_COLUMNS`] name.
    pub attribute: String,
    pub lo: Option<f64>,
    pub hi: Option<f64>,
}

const COLUMNS: &str = "seq, batch_id, device_id, site_id, model, firmware_version, recipe_id, recipe_version, \
     cartridge_lot, ended_ms, outcome, qc_passed, size_nm, pdi, encapsulation_pct, ph, yield_pct, flow_cv, \
     max_pressure_mbar, frr_error_pct, alarms";

/// A row of [`COLUMNS`].
fn metrics_from<R: Columns>(r: &R) -> std::result::Result<BatchMetrics, R::Error> {
    let mut values = [None; 8];
    for (i, v) in values.iter_mut().enumerate() {
        *v = r.real(12 + i)?;
    }
    Ok(BatchMetrics {
        seq: r.int(0)?,
        batch_id: r.text(1)?,
        device_id: r.text(2)?,
        site_id: r.text(3)?,
        model: r.text(4)?,
        firmware_version: r.text(5)?,
        recipe_id: r.text(6)?,
        recipe_version: r.int(7)?,
        cartridge_lot: r.text(8)?,
        ended_ms: r.int(9)?,
        outcome: r.text(10)?,
        qc_passed: r.int(11)? != 0,
        values,
        alarms: r.int(20)?,
    })
}

fn metrics_from_row(r: &AnyRow) -> Result<BatchMetrics> {
    Ok(metrics_from(r)?)
}

/// [`Store::batch_metrics_after`] on a read-only connection of its own to the SQLite
/// file (WAL mode: it sees every committed row and blocks no writer).
fn read_batch_metrics(file: &std::path::Path, after_seq: i64, limit: i64) -> Result<Vec<BatchMetrics>> {
    use rusqlite::OpenFlags;
    let conn = rusqlite::Connection::open_with_flags(
        file,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    let mut stmt =
        conn.prepare(&format!("SELECT {COLUMNS} FROM batch_metrics WHERE seq > ?1 ORDER BY seq LIMIT ?2"))?;
    let rows = stmt.query_map([after_seq, limit], |r| metrics_from(r))?;
    Ok(rows.collect::<std::result::Result<Vec<_>, _>>()?)
}

/// Writes a batch's metrics and its recipe's limits inside `tx`. A batch already
/// there is left as it is.
pub(crate) async fn insert_metrics_in(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    m: &BatchMetrics,
    limits: &[QualityLimit],
) -> Result<()> {
    let mut q = sqlx::query(
        "INSERT INTO batch_metrics (batch_id, device_id, site_id, model, firmware_version, recipe_id, \
         recipe_version, cartridge_lot, ended_ms, outcome, qc_passed, size_nm, pdi, encapsulation_pct, ph, \
         yield_pct, flow_cv, max_pressure_mbar, frr_error_pct, alarms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, \
         $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20) ON CONFLICT (batch_id) DO NOTHING",
    )
    .bind(&m.batch_id)
    .bind(&m.device_id)
    .bind(&m.site_id)
    .bind(&m.model)
    .bind(&m.firmware_version)
    .bind(&m.recipe_id)
    .bind(m.recipe_version)
    .bind(&m.cartridge_lot)
    .bind(m.ended_ms)
    .bind(&m.outcome)
    .bind(i64::from(m.qc_passed));
    for v in m.values {
        q = q.bind(v);
    }
    q.bind(m.alarms).execute(&mut **tx).await?;
    for l in limits {
        sqlx::query(
            "INSERT INTO quality_limits (recipe_id, recipe_version, attribute, lo, hi) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (recipe_id, recipe_version, attribute) DO NOTHING",
        )
        .bind(&l.recipe_id)
        .bind(l.recipe_version)
        .bind(&l.attribute)
        .bind(l.lo)
        .bind(l.hi)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

impl Store {
    /// Batch metrics that arrived after `after_seq`, in arrival order, at most `limit`.
    /// On SQLite the rows are read straight from the file on a blocking thread: through
    /// sqlx each of a row's 21 values is copied twice, and loading a million batches at
    /// start took seconds more.
    pub async fn batch_metrics_after(&self, after_seq: i64, limit: i64) -> Result<Vec<BatchMetrics>> {
        let limit = limit.clamp(1, 100_000);
        if let Some(file) = self.sqlite_file.clone() {
            return tokio::task::spawn_blocking(move || read_batch_metrics(&file, after_seq, limit))
                .await
                .map_err(|e| crate::Error::DirectRead(e.to_string()))?;
        }
        sqlx::query(&format!("SELECT {COLUMNS} FROM batch_metrics WHERE seq > $1 ORDER BY seq LIMIT $2"))
            .bind(after_seq)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(metrics_from_row)
            .collect()
    }

    /// Every recipe version's limits.
    pub async fn quality_limits(&self) -> Result<Vec<QualityLimit>> {
        sqlx::query("SELECT recipe_id, recipe_version, attribute, lo, hi FROM quality_limits")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| {
                Ok(QualityLimit {
                    recipe_id: r.try_get(0)?,
                    recipe_version: r.try_get(1)?,
                    attribute: r.try_get(2)?,
                    lo: r.try_get(3)?,
                    hi: r.try_get(4)?,
                })
            })
            .collect()
    }

    /// Signed records stored before metrics were kept: `(device_id, envelope)` of up to
    /// `limit` batches that have no metrics row, so they can be derived once.
    pub async fn batches_without_metrics(&self, limit: i64) -> Result<Vec<(String, Vec<u8>)>> {
        sqlx::query(
            "SELECT b.device_id, b.envelope FROM batch_records b \
             WHERE NOT EXISTS (SELECT 1 FROM batch_metrics m WHERE m.batch_id = b.batch_id) LIMIT $1",
        )
        .bind(limit.clamp(1, 10_000))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
    }

    /// Writes the metrics of a batch stored before metrics were kept.
    pub async fn insert_metrics(&self, m: &BatchMetrics, limits: &[QualityLimit]) -> Result<()> {
        let mut tx = self.begin().await?;
        insert_metrics_in(&mut tx, m, limits).await?;
        tx.commit().await?;
        Ok(())
    }
}
