//! Firmware rollouts: each rollout's state as one JSON document, rewritten by the
//! scheduler after a change, with the audit records of the decisions it made.

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{AuditEntry, Result, Store, append_audit_in};

/// A stored rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutRow {
    pub id: String,
    /// `running`, `paused`, `completed` or `cancelled`.
    pub state: String,
    /// The release's TUF target name.
    pub target: String,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// The rollout as JSON (nanofleet-rollout's `Rollout`).
    pub document: String,
}

fn from_row(r: &AnyRow) -> Result<RolloutRow> {
    Ok(RolloutRow {
        id: r.try_get(0)?,
        state: r.try_get(1)?,
        target: r.try_get(2)?,
        created_ms: r.try_get(3)?,
        updated_ms: r.try_get(4)?,
        document: r.try_get(5)?,
    })
}

const COLUMNS: &str = "id, state, target, created_ms, updated_ms, document";

impl Store {
    /// Writes a rollout (new or changed) and the audit records of what changed, in one
    /// transaction.
    pub async fn save_rollout(&self, row: &RolloutRow, audit: &[AuditEntry]) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO rollouts (id, state, target, created_ms, updated_ms, document) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (id) DO UPDATE SET state = excluded.state, updated_ms = excluded.updated_ms, \
             document = excluded.document",
        )
        .bind(&row.id)
        .bind(&row.state)
        .bind(&row.target)
        .bind(row.created_ms)
        .bind(row.updated_ms)
        .bind(&row.document)
        .execute(&mut *tx)
        .await?;
        for a in audit {
            append_audit_in(&mut tx, a.clone()).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Rollouts, newest first; `states` empty for all.
    pub async fn rollouts(&self, states: &[&str]) -> Result<Vec<RolloutRow>> {
        let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM rollouts ORDER BY created_ms DESC, id"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(from_row)
            .filter(|r| r.as_ref().map_or(true, |r| states.is_empty() || states.contains(&r.state.as_str())))
            .collect()
    }

    pub async fn get_rollout(&self, id: &str) -> Result<Option<RolloutRow>> {
        sqlx::query(&format!("SELECT {COLUMNS} FROM rollouts WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(from_row)
            .transpose()
    }
}
