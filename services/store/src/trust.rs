//! Sites, enrollment tokens, device certificates and device lifecycle. Each change
//! commits together with its audit record, or not at all.

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{AuditEntry, Error, Result, Store, append_audit_in};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SiteRecord {
    pub id: String,
    pub name: String,
    pub time_zone: String,
    pub created_ms: i64,
}

/// An enrollment token as stored: the secret only as its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollTokenRecord {
    pub id: String,
    pub site_id: String,
    /// The device id it assigns; empty when the server assigns one per enrollment.
    pub device_id: String,
    /// Re-enrolls an existing device on new hardware.
    pub replacement: bool,
    pub secret_hash: String,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub uses_allowed: i64,
    pub uses_left: i64,
    pub created_by: String,
    pub revoked_ms: i64,
}

const TOKEN_COLUMNS: &str = "id, site_id, device_id, replacement, secret_hash, created_ms, expires_ms, \
     uses_allowed, uses_left, created_by, revoked_ms";

impl EnrollTokenRecord {
    fn from_row(r: &AnyRow) -> Result<EnrollTokenRecord> {
        Ok(EnrollTokenRecord {
            id: r.try_get(0)?,
            site_id: r.try_get(1)?,
            device_id: r.try_get(2)?,
            replacement: r.try_get::<i64, _>(3)? != 0,
            secret_hash: r.try_get(4)?,
            created_ms: r.try_get(5)?,
            expires_ms: r.try_get(6)?,
            uses_allowed: r.try_get(7)?,
            uses_left: r.try_get(8)?,
            created_by: r.try_get(9)?,
            revoked_ms: r.try_get(10)?,
        })
    }
}

/// A certificate issued to a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertRecord {
    pub serial: String,
    pub device_id: String,
    pub not_before_ms: i64,
    pub not_after_ms: i64,
    pub issued_ms: i64,
    pub revoked_ms: i64,
}

/// Everything one enrollment writes.
#[derive(Debug, Clone)]
pub struct EnrollCommit {
    pub token_id: String,
    pub now_ms: i64,
    pub device_id: String,
    pub site_id: String,
    /// The device exists (status `replacing`) and gets new hardware.
    pub replacement: bool,
    pub model: String,
    pub hardware_serial: String,
    pub cert: CertRecord,
    pub audit: AuditEntry,
}

/// Who may connect now: the active devices and, for each, the certificates issued to
/// it that are neither revoked nor expired, as (device id, serial).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revocations {
    pub active_devices: Vec<String>,
    pub valid_certs: Vec<(String, String)>,
}

fn conflict(msg: impl Into<String>) -> Error {
    Error::Conflict(msg.into())
}

impl Store {
    /// Creates a site; an existing id is a conflict (sites are never silently renamed).
    pub async fn create_site(&self, site: &SiteRecord, audit: &AuditEntry) -> Result<()> {
        // Write first: on SQLite a transaction that read before writing may find the
        // database locked when it tries to write.
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "INSERT INTO sites (id, name, created_ms, time_zone) VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&site.id)
        .bind(&site.name)
        .bind(site.created_ms)
        .bind(&site.time_zone)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(conflict(format!("site {:?} exists already", site.id)));
        }
        append_audit_in(&mut tx, audit.clone()).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn get_site(&self, id: &str) -> Result<Option<SiteRecord>> {
        let row = sqlx::query("SELECT id, name, time_zone, created_ms FROM sites WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            Ok(SiteRecord {
                id: r.try_get(0)?,
                name: r.try_get(1)?,
                time_zone: r.try_get(2)?,
                created_ms: r.try_get(3)?,
            })
        })
        .transpose()
    }

    pub async fn insert_enroll_token(&self, token: &EnrollTokenRecord, audit: &AuditEntry) -> Result<()> {
        let mut tx = self.begin().await?;
        insert_token_in(&mut tx, token).await?;
        append_audit_in(&mut tx, audit.clone()).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn get_enroll_token(&self, id: &str) -> Result<Option<EnrollTokenRecord>> {
        let row = sqlx::query(&format!("SELECT {TOKEN_COLUMNS} FROM enroll_tokens WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(EnrollTokenRecord::from_row).transpose()
    }

    /// Tokens of one site or all, newest first.
    pub async fn list_enroll_tokens(&self, site_id: Option<&str>) -> Result<Vec<EnrollTokenRecord>> {
        let rows = match site_id {
            Some(site) => sqlx::query(&format!(
                "SELECT {TOKEN_COLUMNS} FROM enroll_tokens WHERE site_id = $1 ORDER BY created_ms DESC, id"
            ))
            .bind(site)
            .fetch_all(&self.pool)
            .await?,
            None => {
                sqlx::query(&format!(
                    "SELECT {TOKEN_COLUMNS} FROM enroll_tokens ORDER BY created_ms DESC, id"
                ))
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(EnrollTokenRecord::from_row).collect()
    }

    /// Revokes a token that is not revoked yet; returns it as it is now.
    pub async fn revoke_enroll_token(
        &self,
        id: &str,
        now_ms: i64,
        audit: &AuditEntry,
    ) -> Result<EnrollTokenRecord> {
        let mut tx = self.begin().await?;
        let done = sqlx::query("UPDATE enroll_tokens SET revoked_ms = $2 WHERE id = $1 AND revoked_ms = 0")
            .bind(id)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(conflict(format!("enrollment token {id:?} does not exist or is revoked already")));
        }
        append_audit_in(&mut tx, audit.clone()).await?;
        let row = sqlx::query(&format!("SELECT {TOKEN_COLUMNS} FROM enroll_tokens WHERE id = $1"))
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        let token = EnrollTokenRecord::from_row(&row)?;
        tx.commit().await?;
        Ok(token)
    }

    /// Applies an enrollment: takes one use of the token (which must still be usable
    /// now: a concurrent enrollment may have taken the last one), creates the device
    /// (or re-activates the one being replaced), records its certificate and the
    /// audit record. All or nothing.
    pub async fn commit_enrollment(&self, e: &EnrollCommit) -> Result<()> {
        let mut tx = self.begin().await?;
        let took = sqlx::query(
            "UPDATE enroll_tokens SET uses_left = uses_left - 1 \
             WHERE id = $1 AND uses_left > 0 AND revoked_ms = 0 AND expires_ms > $2",
        )
        .bind(&e.token_id)
        .bind(e.now_ms)
        .execute(&mut *tx)
        .await?;
        if took.rows_affected() == 0 {
            return Err(conflict("the enrollment token was used up, revoked or expired meanwhile"));
        }
        if e.replacement {
            let done = sqlx::query(
                "UPDATE devices SET status = 'active', enrolled_ms = $2, hardware_serial = $3, \
                    cert_not_after_ms = $4, model = CASE WHEN $5 = '' THEN model ELSE $5 END \
                 WHERE id = $1 AND status = 'replacing'",
            )
            .bind(&e.device_id)
            .bind(e.now_ms)
            .bind(&e.hardware_serial)
            .bind(e.cert.not_after_ms)
            .bind(&e.model)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() == 0 {
                return Err(conflict(format!("device {:?} is not awaiting a replacement", e.device_id)));
            }
        } else {
            let exists = sqlx::query("SELECT 1 FROM devices WHERE id = $1")
                .bind(&e.device_id)
                .fetch_optional(&mut *tx)
                .await?;
            if exists.is_some() {
                return Err(conflict(format!(
                    "device {:?} is enrolled already; to put new hardware in its place, replace it",
                    e.device_id
                )));
            }
            sqlx::query(
                "INSERT INTO devices (id, site_id, model, status, enrolled_ms, hardware_serial, cert_not_after_ms) \
                 VALUES ($1, $2, $3, 'active', $4, $5, $6)",
            )
            .bind(&e.device_id)
            .bind(&e.site_id)
            .bind(&e.model)
            .bind(e.now_ms)
            .bind(&e.hardware_serial)
            .bind(e.cert.not_after_ms)
            .execute(&mut *tx)
            .await?;
        }
        insert_cert_in(&mut tx, &e.cert).await?;
        append_audit_in(&mut tx, e.audit.clone()).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records a renewed certificate of an active device.
    pub async fn record_renewal(&self, cert: &CertRecord, audit: &AuditEntry) -> Result<()> {
        let mut tx = self.begin().await?;
        let done =
            sqlx::query("UPDATE devices SET cert_not_after_ms = $2 WHERE id = $1 AND status = 'active'")
                .bind(&cert.device_id)
                .bind(cert.not_after_ms)
                .execute(&mut *tx)
                .await?;
        if done.rows_affected() == 0 {
            return Err(conflict(format!("device {:?} is not active", cert.device_id)));
        }
        insert_cert_in(&mut tx, cert).await?;
        append_audit_in(&mut tx, audit.clone()).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Decommissions a device and revokes its certificates. Refused if it is
    /// decommissioned already.
    pub async fn decommission_device(&self, device_id: &str, now_ms: i64, audit: &AuditEntry) -> Result<()> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE devices SET status = 'decommissioned', online = 0 WHERE id = $1 AND status <> 'decommissioned'",
        )
        .bind(device_id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(conflict(format!(
                "device {device_id:?} does not exist or is decommissioned already"
            )));
        }
        revoke_certs_in(&mut tx, device_id, now_ms).await?;
        append_audit_in(&mut tx, audit.clone()).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Starts replacing an active device: its certificates are revoked (the old
    /// hardware is cut off) and `token` will enroll the new hardware under its id.
    pub async fn begin_replacement(
        &self,
        token: &EnrollTokenRecord,
        now_ms: i64,
        audit: &AuditEntry,
    ) -> Result<()> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE devices SET status = 'replacing', online = 0 WHERE id = $1 AND status IN ('active', 'replacing')",
        )
        .bind(&token.device_id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(conflict(format!(
                "device {:?} does not exist or is decommissioned",
                token.device_id
            )));
        }
        revoke_certs_in(&mut tx, &token.device_id, now_ms).await?;
        // An earlier replacement token for the same device stops working.
        sqlx::query("UPDATE enroll_tokens SET revoked_ms = $2 WHERE device_id = $1 AND replacement = 1 AND revoked_ms = 0")
            .bind(&token.device_id)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        insert_token_in(&mut tx, token).await?;
        append_audit_in(&mut tx, audit.clone()).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Who may connect at `now_ms`.
    pub async fn revocations(&self, now_ms: i64) -> Result<Revocations> {
        let active = sqlx::query("SELECT id FROM devices WHERE status = 'active' ORDER BY id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<Vec<String>, _>>()?;
        let certs = sqlx::query(
            "SELECT c.device_id, c.serial FROM device_certs c JOIN devices d ON d.id = c.device_id \
             WHERE d.status = 'active' AND c.revoked_ms = 0 AND c.not_after_ms > $1",
        )
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<Vec<(String, String)>>>()?;
        Ok(Revocations { active_devices: active, valid_certs: certs })
    }

    /// Certificates of one device, newest first.
    pub async fn device_certs(&self, device_id: &str) -> Result<Vec<CertRecord>> {
        let rows = sqlx::query(
            "SELECT serial, device_id, not_before_ms, not_after_ms, issued_ms, revoked_ms FROM device_certs \
             WHERE device_id = $1 ORDER BY issued_ms DESC, serial",
        )
        .bind(device_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(CertRecord {
                    serial: r.try_get(0)?,
                    device_id: r.try_get(1)?,
                    not_before_ms: r.try_get(2)?,
                    not_after_ms: r.try_get(3)?,
                    issued_ms: r.try_get(4)?,
                    revoked_ms: r.try_get(5)?,
                })
            })
            .collect()
    }
}

async fn insert_token_in(conn: &mut sqlx::AnyConnection, t: &EnrollTokenRecord) -> Result<()> {
    sqlx::query(&format!(
        "INSERT INTO enroll_tokens ({TOKEN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
    ))
    .bind(&t.id)
    .bind(&t.site_id)
    .bind(&t.device_id)
    .bind(i64::from(t.replacement))
    .bind(&t.secret_hash)
    .bind(t.created_ms)
    .bind(t.expires_ms)
    .bind(t.uses_allowed)
    .bind(t.uses_left)
    .bind(&t.created_by)
    .bind(t.revoked_ms)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn insert_cert_in(conn: &mut sqlx::AnyConnection, c: &CertRecord) -> Result<()> {
    sqlx::query(
        "INSERT INTO device_certs (serial, device_id, not_before_ms, not_after_ms, issued_ms, revoked_ms) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&c.serial)
    .bind(&c.device_id)
    .bind(c.not_before_ms)
    .bind(c.not_after_ms)
    .bind(c.issued_ms)
    .bind(c.revoked_ms)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn revoke_certs_in(conn: &mut sqlx::AnyConnection, device_id: &str, now_ms: i64) -> Result<()> {
    sqlx::query("UPDATE device_certs SET revoked_ms = $2 WHERE device_id = $1 AND revoked_ms = 0")
        .bind(device_id)
        .bind(now_ms)
        .execute(&mut *conn)
        .await?;
    Ok(())
}
