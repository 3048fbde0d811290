//! Run requests, signed batch records and QA's decisions on them. Every change commits
//! together with its audit record, or not at all.

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::metrics::insert_metrics_in;
use crate::{AuditEntry, BatchMetrics, CartridgeUse, Error, QualityLimit, Result, Store, append_audit_in};

/// A run a person asked a device for, and the device's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRequestRecord {
    pub request_id: String,
    pub device_id: String,
    pub site_id: String,
    pub recipe_id: String,
    pub recipe_version: i64,
    pub requested_by: String,
    pub requested_ms: i64,
    /// `sent`, `accepted` or `refused`.
    pub state: String,
    pub code: String,
    pub reason: String,
    pub batch_id: String,
    pub answered_ms: i64,
}

/// A device's answer to a run request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAnswer {
    pub request_id: String,
    pub device_id: String,
    /// `accepted` or `refused`.
    pub state: String,
    pub code: String,
    pub reason: String,
    /// The batch the accepted run makes.
    pub batch_id: String,
    pub answered_ms: i64,
}

/// A signed batch record as received, with the columns lists filter by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRow {
    pub batch_id: String,
    pub device_id: String,
    pub site_id: String,
    pub recipe_id: String,
    pub recipe_version: i64,
    pub started_ms: i64,
    pub ended_ms: i64,
    /// `complete` or `aborted`.
    pub outcome: String,
    pub qc_passed: bool,
    pub started_by: String,
    pub started_by_name: String,
    pub cartridge_lot: String,
    pub prescription_id: String,
    pub certificate_serial: String,
    pub record_digest: String,
    /// The encoded `SignedBatchRecord`, byte for byte as the device signed it.
    pub envelope: Vec<u8>,
    pub received_ms: i64,
}

/// QA's release or rejection of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchDecision {
    pub batch_id: String,
    /// `released` or `rejected`.
    pub meaning: String,
    pub signer_id: String,
    pub printed_name: String,
    pub reason: String,
    pub signed_ms: i64,
    pub record_digest: String,
}

/// Which batches to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchFilter {
    pub site_id: Option<String>,
    pub device_id: Option<String>,
    pub recipe_id: Option<String>,
    pub limit: i64,
}

const BATCH_COLUMNS: &str = "b.batch_id, b.device_id, b.site_id, b.recipe_id, b.recipe_version, b.started_ms, \
     b.ended_ms, b.outcome, b.qc_passed, b.started_by, b.started_by_name, b.cartridge_lot, b.prescription_id, \
     b.certificate_serial, b.record_digest, b.envelope, b.received_ms, \
     d.meaning, d.signer_id, d.printed_name, d.reason, d.signed_ms, d.record_digest";

fn batch_from_row(r: &AnyRow) -> Result<(BatchRow, Option<BatchDecision>)> {
    let row = BatchRow {
        batch_id: r.try_get(0)?,
        device_id: r.try_get(1)?,
        site_id: r.try_get(2)?,
        recipe_id: r.try_get(3)?,
        recipe_version: r.try_get(4)?,
        started_ms: r.try_get(5)?,
        ended_ms: r.try_get(6)?,
        outcome: r.try_get(7)?,
        qc_passed: r.try_get::<i64, _>(8)? != 0,
        started_by: r.try_get(9)?,
        started_by_name: r.try_get(10)?,
        cartridge_lot: r.try_get(11)?,
        prescription_id: r.try_get(12)?,
        certificate_serial: r.try_get(13)?,
        record_digest: r.try_get(14)?,
        envelope: r.try_get(15)?,
        received_ms: r.try_get(16)?,
    };
    let meaning: Option<String> = r.try_get(17)?;
    let decision = match meaning {
        Some(meaning) => Some(BatchDecision {
            batch_id: row.batch_id.clone(),
            meaning,
            signer_id: r.try_get(18)?,
            printed_name: r.try_get(19)?,
            reason: r.try_get(20)?,
            signed_ms: r.try_get(21)?,
            record_digest: r.try_get(22)?,
        }),
        None => None,
    };
    Ok((row, decision))
}

impl Store {
    /// Records a run request before it is sent to the device.
    pub async fn insert_run_request(&self, r: &RunRequestRecord, audit: &AuditEntry) -> Result<()> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "INSERT INTO run_requests (request_id, device_id, site_id, recipe_id, recipe_version, requested_by, \
             requested_ms, state) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (request_id) DO NOTHING",
        )
        .bind(&r.request_id)
        .bind(&r.device_id)
        .bind(&r.site_id)
        .bind(&r.recipe_id)
        .bind(r.recipe_version)
        .bind(&r.requested_by)
        .bind(r.requested_ms)
        .bind(&r.state)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(Error::Conflict(format!("run request {} exists already", r.request_id)));
        }
        append_audit_in(&mut tx, audit.clone()).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Stores a device's answer to a run request it was sent (one the cloud did not
    /// send, e.g. started at the device screen, is only audited).
    pub async fn answer_run_request(&self, a: &RunAnswer, audit: &AuditEntry) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "UPDATE run_requests SET state = $3, code = $4, reason = $5, batch_id = $6, answered_ms = $7 \
             WHERE request_id = $1 AND device_id = $2",
        )
        .bind(&a.request_id)
        .bind(&a.device_id)
        .bind(&a.state)
        .bind(&a.code)
        .bind(&a.reason)
        .bind(&a.batch_id)
        .bind(a.answered_ms)
        .execute(&mut *tx)
        .await?;
        append_audit_in(&mut tx, audit.clone()).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn run_request(&self, request_id: &str) -> Result<Option<RunRequestRecord>> {
        sqlx::query(
            "SELECT request_id, device_id, site_id, recipe_id, recipe_version, requested_by, requested_ms, state, \
             code, reason, batch_id, answered_ms FROM run_requests WHERE request_id = $1",
        )
        .bind(request_id)
        .fetch_optional(&self.pool)
        .await?
        .map(|r| {
            Ok(RunRequestRecord {
                request_id: r.try_get(0)?,
                device_id: r.try_get(1)?,
                site_id: r.try_get(2)?,
                recipe_id: r.try_get(3)?,
                recipe_version: r.try_get(4)?,
                requested_by: r.try_get(5)?,
                requested_ms: r.try_get(6)?,
                state: r.try_get(7)?,
                code: r.try_get(8)?,
                reason: r.try_get(9)?,
                batch_id: r.try_get(10)?,
                answered_ms: r.try_get(11)?,
            })
        })
        .transpose()
    }

    /// Stores a verified batch record. Returns false when the same record was stored
    /// before (a device re-sends until acknowledged); a different record under the
    /// same batch id is a conflict. The record's metrics and limits are written with it.
    pub async fn insert_batch(
        &self,
        b: &BatchRow,
        cartridge: Option<&CartridgeUse>,
        metrics: &BatchMetrics,
        limits: &[QualityLimit],
        audit: &AuditEntry,
    ) -> Result<bool> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "INSERT INTO batch_records (batch_id, device_id, site_id, recipe_id, recipe_version, started_ms, \
             ended_ms, outcome, qc_passed, started_by, started_by_name, cartridge_lot, prescription_id, \
             certificate_serial, record_digest, envelope, received_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) \
             ON CONFLICT (batch_id) DO NOTHING",
        )
        .bind(&b.batch_id)
        .bind(&b.device_id)
        .bind(&b.site_id)
        .bind(&b.recipe_id)
        .bind(b.recipe_version)
        .bind(b.started_ms)
        .bind(b.ended_ms)
        .bind(&b.outcome)
        .bind(i64::from(b.qc_passed))
        .bind(&b.started_by)
        .bind(&b.started_by_name)
        .bind(&b.cartridge_lot)
        .bind(&b.prescription_id)
        .bind(&b.certificate_serial)
        .bind(&b.record_digest)
        .bind(&b.envelope)
        .bind(b.received_ms)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            let (device, digest): (String, String) =
                sqlx::query("SELECT device_id, record_digest FROM batch_records WHERE batch_id = $1")
                    .bind(&b.batch_id)
                    .fetch_one(&mut *tx)
                    .await
                    .and_then(|r| Ok((r.try_get(0)?, r.try_get(1)?)))?;
            return if device == b.device_id && digest == b.record_digest {
                Ok(false)
            } else {
                Err(Error::Conflict(format!(
                    "batch {} is stored already with another record (device {device}, digest {digest})",
                    b.batch_id
                )))
            };
        }
        insert_metrics_in(&mut tx, metrics, limits).await?;
        if let Some(u) = cartridge {
            crate::inventory::insert_use_in(&mut tx, u).await?;
        }
        append_audit_in(&mut tx, audit.clone()).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Batches, newest first, with QA's decision when there is one.
    pub async fn batches(&self, f: &BatchFilter) -> Result<Vec<(BatchRow, Option<BatchDecision>)>> {
        let mut sql = format!(
            "SELECT {BATCH_COLUMNS} FROM batch_records b LEFT JOIN batch_decisions d ON d.batch_id = b.batch_id \
             WHERE 1 = 1"
        );
        let mut binds = Vec::new();
        for (column, value) in
            [("b.site_id", &f.site_id), ("b.device_id", &f.device_id), ("b.recipe_id", &f.recipe_id)]
        {
            if let Some(v) = value {
                binds.push(v.clone());
                sql.push_str(&format!(" AND {column} = ${}", binds.len()));
            }
        }
        sql.push_str(&format!(" ORDER BY b.started_ms DESC, b.batch_id LIMIT {}", f.limit.clamp(1, 10_000)));
        let mut q = sqlx::query(&sql);
        for b in &binds {
            q = q.bind(b);
        }
        q.fetch_all(&self.pool).await?.iter().map(batch_from_row).collect()
    }

    pub async fn batch(&self, batch_id: &str) -> Result<Option<(BatchRow, Option<BatchDecision>)>> {
        let sql = format!(
            "SELECT {BATCH_COLUMNS} FROM batch_records b LEFT JOIN batch_decisions d ON d.batch_id = b.batch_id \
             WHERE b.batch_id = $1"
        );
        sqlx::query(&sql)
            .bind(batch_id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(batch_from_row)
            .transpose()
    }

    /// Records QA's decision; a batch is decided once.
    pub async fn decide_batch(&self, d: &BatchDecision, audit: &AuditEntry) -> Result<()> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "INSERT INTO batch_decisions (batch_id, meaning, signer_id, printed_name, reason, signed_ms, \
             record_digest) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (batch_id) DO NOTHING",
        )
        .bind(&d.batch_id)
        .bind(&d.meaning)
        .bind(&d.signer_id)
        .bind(&d.printed_name)
        .bind(&d.reason)
        .bind(d.signed_ms)
        .bind(&d.record_digest)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(Error::Conflict(format!("batch {} has been decided already", d.batch_id)));
        }
        append_audit_in(&mut tx, audit.clone()).await?;
        tx.commit().await?;
        Ok(())
    }
}
