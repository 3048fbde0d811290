//! People, API tokens and dashboard sessions. Changes commit with their audit record.

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{AuditEntry, Error, Result, Store, append_audit_in};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersonRecord {
    pub id: String,
    pub display_name: String,
    /// `ops`, `site-it`, `pharmacist`, `qa`, `auditor`.
    pub role: String,
    pub site_id: String,
    pub password_hash: String,
    pub created_ms: i64,
    pub disabled_ms: i64,
    pub failed_logins: i64,
    pub locked_until_ms: i64,
}

const PERSON_COLUMNS: &str =
    "id, display_name, role, site_id, password_hash, created_ms, disabled_ms, failed_logins, locked_until_ms";

impl PersonRecord {
    fn from_row(r: &AnyRow) -> Result<PersonRecord> {
        Ok(PersonRecord {
            id: r.try_get(0)?,
            display_name: r.try_get(1)?,
            role: r.try_get(2)?,
            site_id: r.try_get(3)?,
            password_hash: r.try_get(4)?,
            created_ms: r.try_get(5)?,
            disabled_ms: r.try_get(6)?,
            failed_logins: r.try_get(7)?,
            locked_until_ms: r.try_get(8)?,
        })
    }
}

/// Where a credential lives: API tokens (scripts, CLI) or dashboard sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialKind {
    ApiToken,
    Session,
}

impl CredentialKind {
    fn table(self) -> &'static str {
        match self {
            CredentialKind::ApiToken => "api_tokens",
            CredentialKind::Session => "sessions",
        }
    }
}

/// An API token or session: only the hash of its secret is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialRecord {
    pub id: String,
    pub person_id: String,
    pub secret_hash: String,
    pub description: String,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub revoked_ms: i64,
}

impl Store {
    pub async fn count_people(&self) -> Result<i64> {
        Ok(sqlx::query("SELECT COUNT(*) FROM people").fetch_one(&self.pool).await?.try_get(0)?)
    }

    /// Creates a person; an existing id is a conflict.
    pub async fn create_person(&self, p: &PersonRecord, audit: &AuditEntry) -> Result<()> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(&format!(
            "INSERT INTO people ({PERSON_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (id) DO NOTHING"
        ))
        .bind(&p.id)
        .bind(&p.display_name)
        .bind(&p.role)
        .bind(&p.site_id)
        .bind(&p.password_hash)
        .bind(p.created_ms)
        .bind(p.disabled_ms)
        .bind(p.failed_logins)
        .bind(p.locked_until_ms)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(Error::Conflict(format!("person {:?} exists already", p.id)));
        }
        append_audit_in(&mut tx, audit.clone()).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn get_person(&self, id: &str) -> Result<Option<PersonRecord>> {
        let row = sqlx::query(&format!("SELECT {PERSON_COLUMNS} FROM people WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(PersonRecord::from_row).transpose()
    }

    pub async fn list_people(&self) -> Result<Vec<PersonRecord>> {
        let rows = sqlx::query(&format!("SELECT {PERSON_COLUMNS} FROM people ORDER BY id"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(PersonRecord::from_row).collect()
    }

    /// Sets a person's role and site.
    pub async fn set_role(&self, id: &str, role: &str, site_id: &str, audit: &AuditEntry) -> Result<()> {
        let mut tx = self.begin().await?;
        let done = sqlx::query("UPDATE people SET role = $2, site_id = $3 WHERE id = $1")
            .bind(id)
            .bind(role)
            .bind(site_id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(Error::Conflict(format!("person {id:?} does not exist")));
        }
        append_audit_in(&mut tx, audit.clone()).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Disables a person and revokes their tokens and sessions.
    pub async fn disable_person(&self, id: &str, now_ms: i64, audit: &AuditEntry) -> Result<()> {
        let mut tx = self.begin().await?;
        let done = sqlx::query("UPDATE people SET disabled_ms = $2 WHERE id = $1 AND disabled_ms = 0")
            .bind(id)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(Error::Conflict(format!("person {id:?} does not exist or is disabled already")));
        }
        for table in ["api_tokens", "sessions"] {
            sqlx::query(&format!(
                "UPDATE {table} SET revoked_ms = $2 WHERE person_id = $1 AND revoked_ms = 0"
            ))
            .bind(id)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        }
        append_audit_in(&mut tx, audit.clone()).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Counts a failed login of an existing person, locking them until
    /// `lock_until_ms` once `lock_after` failures in a row are reached (counting afresh
    /// after a lockout ran out). Returns the failures counted so far.
    pub async fn record_login_failure(
        &self,
        id: &str,
        now_ms: i64,
        lock_after: i64,
        lock_until_ms: i64,
        audit: &AuditEntry,
    ) -> Result<i64> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(
            // A lockout that has run out starts the count afresh.
            "UPDATE people SET \
                failed_logins = CASE WHEN locked_until_ms <> 0 AND locked_until_ms <= $4 THEN 1 \
                                     ELSE failed_logins + 1 END, \
                locked_until_ms = CASE \
                    WHEN (CASE WHEN locked_until_ms <> 0 AND locked_until_ms <= $4 THEN 1 \
                               ELSE failed_logins + 1 END) >= $2 THEN $3 \
                    WHEN locked_until_ms <= $4 THEN 0 ELSE locked_until_ms END \
             WHERE id = $1 RETURNING failed_logins",
        )
        .bind(id)
        .bind(lock_after)
        .bind(lock_until_ms)
        .bind(now_ms)
        .fetch_optional(&mut *tx)
        .await?;
        let failures = match row {
            Some(r) => r.try_get(0)?,
            None => 0,
        };
        append_audit_in(&mut tx, audit.clone()).await?;
        tx.commit().await?;
        Ok(failures)
    }

    /// A successful login: failures reset, the session stored, audited.
    pub async fn record_login(&self, session: &CredentialRecord, audit: &AuditEntry) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query("UPDATE people SET failed_logins = 0, locked_until_ms = 0 WHERE id = $1")
            .bind(&session.person_id)
            .execute(&mut *tx)
            .await?;
        insert_credential_in(&mut tx, CredentialKind::Session, session).await?;
        append_audit_in(&mut tx, audit.clone()).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Audits an event that changes nothing else (a refused login of an unknown id).
    pub async fn audit_only(&self, audit: &AuditEntry) -> Result<()> {
        self.append_audit(audit.clone()).await.map(|_| ())
    }

    pub async fn insert_credential(
        &self,
        kind: CredentialKind,
        c: &CredentialRecord,
        audit: &AuditEntry,
    ) -> Result<()> {
        let mut tx = self.begin().await?;
        insert_credential_in(&mut tx, kind, c).await?;
        append_audit_in(&mut tx, audit.clone()).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn get_credential(&self, kind: CredentialKind, id: &str) -> Result<Option<CredentialRecord>> {
        let row = sqlx::query(&format!(
            "SELECT id, person_id, secret_hash, {}, created_ms, expires_ms, revoked_ms FROM {} WHERE id = $1",
            if kind == CredentialKind::ApiToken { "description" } else { "''" },
            kind.table()
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(CredentialRecord {
                id: r.try_get(0)?,
                person_id: r.try_get(1)?,
                secret_hash: r.try_get(2)?,
                description: r.try_get(3)?,
                created_ms: r.try_get(4)?,
                expires_ms: r.try_get(5)?,
                revoked_ms: r.try_get(6)?,
            })
        })
        .transpose()
    }

    /// Revokes a credential; `audit` is written with it when given (sessions ending by
    /// logout are not worth a record each).
    pub async fn revoke_credential(
        &self,
        kind: CredentialKind,
        id: &str,
        now_ms: i64,
        audit: Option<&AuditEntry>,
    ) -> Result<()> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(&format!(
            "UPDATE {} SET revoked_ms = $2 WHERE id = $1 AND revoked_ms = 0",
            kind.table()
        ))
        .bind(id)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(Error::Conflict(format!("{id:?} does not exist or is revoked already")));
        }
        if let Some(a) = audit {
            append_audit_in(&mut tx, a.clone()).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

async fn insert_credential_in(
    conn: &mut sqlx::AnyConnection,
    kind: CredentialKind,
    c: &CredentialRecord,
) -> Result<()> {
    match kind {
        CredentialKind::ApiToken => {
            sqlx::query(
                "INSERT INTO api_tokens (id, person_id, secret_hash, description, created_ms, expires_ms, revoked_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(&c.id)
            .bind(&c.person_id)
            .bind(&c.secret_hash)
            .bind(&c.description)
            .bind(c.created_ms)
            .bind(c.expires_ms)
            .bind(c.revoked_ms)
            .execute(&mut *conn)
            .await?;
        }
        CredentialKind::Session => {
            sqlx::query(
                "INSERT INTO sessions (id, person_id, secret_hash, created_ms, expires_ms, revoked_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&c.id)
            .bind(&c.person_id)
            .bind(&c.secret_hash)
            .bind(c.created_ms)
            .bind(c.expires_ms)
            .bind(c.revoked_ms)
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(())
}
