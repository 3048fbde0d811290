//! Monitoring alerts and the evaluators' cursors. An alert is active while open or
//! acknowledged; the same condition (its dedup key) raised again while active is
//! counted on that alert instead of opening another.

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{AuditEntry, Error, Result, Store, append_audit_in};

/// A stored alert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertRow {
    pub alert_id: String,
    /// Same key, same condition: e.g. `spc_rule/NF-1/pdi/ewma`.
    pub dedup_key: String,
    /// `spc_rule`, `device_silent`, `alarm_storm` or `site_differs`.
    pub kind: String,
    /// `open`, `acknowledged` or `resolved`.
    pub state: String,
    pub subject: String,
    pub site_id: String,
    pub title: String,
    /// Encoded `nanofleet.v1.AlertEvidence`.
    pub evidence: Vec<u8>,
    pub raised_ms: i64,
    pub last_seen_ms: i64,
    pub occurrences: i64,
    pub acknowledged_by: String,
    pub acknowledged_ms: i64,
    pub note: String,
    pub resolved_ms: i64,
}

/// Which alerts to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlertFilter {
    /// Empty: any state.
    pub states: Vec<String>,
    pub site_id: Option<String>,
    pub kind: Option<String>,
    pub limit: i64,
}

const COLUMNS: &str = "alert_id, dedup_key, kind, state, subject, site_id, title, evidence, raised_ms, \
     last_seen_ms, occurrences, acknowledged_by, acknowledged_ms, note, resolved_ms";

fn alert_from_row(r: &AnyRow) -> Result<AlertRow> {
    Ok(AlertRow {
        alert_id: r.try_get(0)?,
        dedup_key: r.try_get(1)?,
        kind: r.try_get(2)?,
        state: r.try_get(3)?,
        subject: r.try_get(4)?,
        site_id: r.try_get(5)?,
        title: r.try_get(6)?,
        evidence: r.try_get(7)?,
        raised_ms: r.try_get(8)?,
        last_seen_ms: r.try_get(9)?,
        occurrences: r.try_get(10)?,
        acknowledged_by: r.try_get(11)?,
        acknowledged_ms: r.try_get(12)?,
        note: r.try_get(13)?,
        resolved_ms: r.try_get(14)?,
    })
}

impl Store {
    /// Raises `a`, or, when an alert with its dedup key is active, adds
    /// `a.occurrences` to it and takes `a`'s evidence and time as the newest. Returns
    /// the stored alert and whether it is new.
    pub async fn raise_alert(&self, a: &AlertRow) -> Result<(AlertRow, bool)> {
        let mut tx = self.begin().await?;
        let updated = sqlx::query(
            "UPDATE alerts SET occurrences = occurrences + $2, last_seen_ms = $3, evidence = $4, title = $5 \
             WHERE dedup_key = $1 AND state <> 'resolved'",
        )
        .bind(&a.dedup_key)
        .bind(a.occurrences)
        .bind(a.last_seen_ms)
        .bind(&a.evidence)
        .bind(&a.title)
        .execute(&mut *tx)
        .await?;
        let new = updated.rows_affected() == 0;
        if new {
            sqlx::query(
                "INSERT INTO alerts (alert_id, dedup_key, kind, state, subject, site_id, title, evidence, \
                 raised_ms, last_seen_ms, occurrences) VALUES ($1, $2, $3, 'open', $4, $5, $6, $7, $8, $9, $10)",
            )
            .bind(&a.alert_id)
            .bind(&a.dedup_key)
            .bind(&a.kind)
            .bind(&a.subject)
            .bind(&a.site_id)
            .bind(&a.title)
            .bind(&a.evidence)
            .bind(a.raised_ms)
            .bind(a.last_seen_ms)
            .bind(a.occurrences)
            .execute(&mut *tx)
            .await?;
        }
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM alerts WHERE dedup_key = $1 AND state <> 'resolved'"
        ))
        .bind(&a.dedup_key)
        .fetch_one(&mut *tx)
        .await?;
        let stored = alert_from_row(&row)?;
        tx.commit().await?;
        Ok((stored, new))
    }

    /// Acknowledges an open alert, with the person's note, audited. `None`: no such
    /// alert; a conflict when it is not open.
    pub async fn acknowledge_alert(
        &self,
        alert_id: &str,
        by: &str,
        note: &str,
        at_ms: i64,
        audit: &AuditEntry,
    ) -> Result<Option<AlertRow>> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE alerts SET state = 'acknowledged', acknowledged_by = $2, acknowledged_ms = $3, note = $4 \
             WHERE alert_id = $1 AND state = 'open'",
        )
        .bind(alert_id)
        .bind(by)
        .bind(at_ms)
        .bind(note)
        .execute(&mut *tx)
        .await?;
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM alerts WHERE alert_id = $1"))
            .bind(alert_id)
            .fetch_optional(&mut *tx)
            .await?
            .as_ref()
            .map(alert_from_row)
            .transpose()?;
        let Some(row) = row else { return Ok(None) };
        if done.rows_affected() == 0 {
            return Err(Error::Conflict(format!("alert {alert_id} is {}, not open", row.state)));
        }
        append_audit_in(&mut tx, audit.clone()).await?;
        tx.commit().await?;
        Ok(Some(row))
    }

    /// Resolves the active alert with this dedup key, if any.
    pub async fn resolve_alert(&self, dedup_key: &str, at_ms: i64) -> Result<Option<AlertRow>> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM alerts WHERE dedup_key = $1 AND state <> 'resolved'"
        ))
        .bind(dedup_key)
        .fetch_optional(&mut *tx)
        .await?
        .as_ref()
        .map(alert_from_row)
        .transpose()?;
        let Some(mut row) = row else { return Ok(None) };
        sqlx::query("UPDATE alerts SET state = 'resolved', resolved_ms = $2 WHERE alert_id = $1")
            .bind(&row.alert_id)
            .bind(at_ms)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        row.state = "resolved".into();
        row.resolved_ms = at_ms;
        Ok(Some(row))
    }

    /// Alerts, newest first.
    pub async fn alerts(&self, f: &AlertFilter) -> Result<Vec<AlertRow>> {
        let mut sql = format!("SELECT {COLUMNS} FROM alerts WHERE 1 = 1");
        let mut binds: Vec<String> = Vec::new();
        if !f.states.is_empty() {
            let mut marks = Vec::new();
            for s in &f.states {
                binds.push(s.clone());
                marks.push(format!("${}", binds.len()));
            }
            sql.push_str(&format!(" AND state IN ({})", marks.join(", ")));
        }
        for (column, value) in [("site_id", &f.site_id), ("kind", &f.kind)] {
            if let Some(v) = value {
                binds.push(v.clone());
                sql.push_str(&format!(" AND {column} = ${}", binds.len()));
            }
        }
        sql.push_str(&format!(" ORDER BY raised_ms DESC, alert_id LIMIT {}", f.limit.clamp(1, 1_000)));
        let mut q = sqlx::query(&sql);
        for b in &binds {
            q = q.bind(b);
        }
        q.fetch_all(&self.pool).await?.iter().map(alert_from_row).collect()
    }

    pub async fn alert(&self, alert_id: &str) -> Result<Option<AlertRow>> {
        sqlx::query(&format!("SELECT {COLUMNS} FROM alerts WHERE alert_id = $1"))
            .bind(alert_id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(alert_from_row)
            .transpose()
    }

    /// Active alerts per site: `(site_id, count)`.
    pub async fn active_alert_counts(&self) -> Result<Vec<(String, i64)>> {
        sqlx::query("SELECT site_id, COUNT(*) FROM alerts WHERE state <> 'resolved' GROUP BY site_id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    /// Event batches stored with a time at or after `since_ms`: `(device_id, encoded
    /// EventBatch)`, at most `limit`.
    pub async fn events_since(&self, since_ms: i64, limit: i64) -> Result<Vec<(String, Vec<u8>)>> {
        sqlx::query("SELECT device_id, payload FROM events WHERE time_ms >= $1 LIMIT $2")
            .bind(since_ms)
            .bind(limit.clamp(1, 1_000_000))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    /// A background evaluator's position (0 when it never ran).
    pub async fn cursor(&self, name: &str) -> Result<i64> {
        Ok(sqlx::query("SELECT value FROM monitor_cursors WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| r.try_get(0))
            .transpose()?
            .unwrap_or(0))
    }

    pub async fn set_cursor(&self, name: &str, value: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO monitor_cursors (name, value) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        )
        .bind(name)
        .bind(value)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
