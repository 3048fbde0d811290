//! Recipes, their electronic signatures, the signing keys behind them, the trust
//! root versions that list those keys, and per-device deliveries. Every change
//! commits together with its audit record, or not at all.

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{AuditEntry, Error, Result, Store, append_audit_in};

/// One recipe version as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipeRecord {
    pub recipe_id: String,
    pub version: i64,
    pub name: String,
    /// `draft`, `authored`, `released` or `rejected`.
    pub status: String,
    /// The encoded recipe: the bytes the signatures cover.
    pub body: Vec<u8>,
    pub digest: String,
    pub created_by: String,
    pub created_ms: i64,
    pub released_ms: i64,
    pub rejected_by: String,
    pub rejected_reason: String,
}

const RECIPE_COLUMNS: &str = "recipe_id, version, name, status, body, digest, created_by, created_ms, \
     released_ms, rejected_by, rejected_reason";

impl RecipeRecord {
    fn from_row(r: &AnyRow) -> Result<RecipeRecord> {
        Ok(RecipeRecord {
            recipe_id: r.try_get(0)?,
            version: r.try_get(1)?,
            name: r.try_get(2)?,
            status: r.try_get(3)?,
            body: r.try_get(4)?,
            digest: r.try_get(5)?,
            created_by: r.try_get(6)?,
            created_ms: r.try_get(7)?,
            released_ms: r.try_get(8)?,
            rejected_by: r.try_get(9)?,
            rejected_reason: r.try_get(10)?,
        })
    }
}

/// One electronic signature of a recipe version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipeSignatureRecord {
    pub recipe_id: String,
    pub version: i64,
    /// `authored` or `approved`.
    pub meaning: String,
    pub signer_id: String,
    pub printed_name: String,
    pub key_id: String,
    pub signed_ms: i64,
    /// The encoded DSSE envelope.
    pub envelope: Vec<u8>,
}

/// A person's signing key for one trust-root role; the private half sealed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningKeyRecord {
    pub key_id: String,
    pub person_id: String,
    pub role: String,
    pub public_key: String,
    pub sealed_key: String,
    pub created_ms: i64,
    pub revoked_ms: i64,
}

/// A released version's delivery to one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRecord {
    pub device_id: String,
    pub site_id: String,
    pub recipe_id: String,
    pub version: i64,
    /// `pending`, `accepted` or `refused`.
    pub state: String,
    pub code: String,
    pub reason: String,
    pub sent_ms: i64,
    pub answered_ms: i64,
}

/// What a signature changes: the new signature, the status it moves the version
/// from and to, and, for a release, the devices to deliver to.
#[derive(Debug, Clone)]
pub struct SignCommit {
    pub signature: RecipeSignatureRecord,
    pub from_status: String,
    pub to_status: String,
    pub released_ms: i64,
    pub deliver_to: Vec<String>,
    pub audit: Vec<AuditEntry>,
}

fn conflict(msg: impl Into<String>) -> Error {
    Error::Conflict(msg.into())
}

impl Store {
    /// Saves a draft: a new version, or the same version again while it is a draft.
    pub async fn save_recipe_draft(&self, rec: &RecipeRecord, audit: &AuditEntry) -> Result<()> {
        // The write comes first: a transaction that reads before it writes can be
        // refused at once (SQLite) when another writer went ahead of it.
        let mut tx = self.begin().await?;
        let saved = sqlx::query(&format!(
            "INSERT INTO recipes ({RECIPE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT (recipe_id, version) DO UPDATE SET name = excluded.name, body = excluded.body, \
                digest = excluded.digest, created_by = excluded.created_by, created_ms = excluded.created_ms \
             WHERE recipes.status = 'draft'"
        ))
        .bind(&rec.recipe_id)
        .bind(rec.version)
        .bind(&rec.name)
        .bind(&rec.status)
        .bind(&rec.body)
        .bind(&rec.digest)
        .bind(&rec.created_by)
        .bind(rec.created_ms)
        .bind(rec.released_ms)
        .bind(&rec.rejected_by)
        .bind(&rec.rejected_reason)
        .execute(&mut *tx)
        .await?;
        if saved.rows_affected() == 0 {
            drop(tx);
            let status =
                self.get_recipe(&rec.recipe_id, rec.version).await?.map(|r| r.status).unwrap_or_default();
            return Err(conflict(format!(
                "recipe {} version {} is {status} and cannot change; save a new version",
                rec.recipe_id, rec.version
            )));
        }
        append_audit_in(&mut tx, audit.clone()).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The highest version of a recipe id, 0 when there is none.
    pub async fn latest_recipe_version(&self, recipe_id: &str) -> Result<i64> {
        let v: Option<i64> = sqlx::query("SELECT MAX(version) FROM recipes WHERE recipe_id = $1")
            .bind(recipe_id)
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?;
        Ok(v.unwrap_or(0))
    }

    pub async fn get_recipe(&self, recipe_id: &str, version: i64) -> Result<Option<RecipeRecord>> {
        sqlx::query(&format!("SELECT {RECIPE_COLUMNS} FROM recipes WHERE recipe_id = $1 AND version = $2"))
            .bind(recipe_id)
            .bind(version)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(RecipeRecord::from_row)
            .transpose()
    }

    /// Recipe versions, newest first; empty filters match everything.
    pub async fn list_recipes(&self, recipe_id: &str, status: &str) -> Result<Vec<RecipeRecord>> {
        sqlx::query(&format!(
            "SELECT {RECIPE_COLUMNS} FROM recipes WHERE ($1 = '' OR recipe_id = $1) AND ($2 = '' OR status = $2) \
             ORDER BY recipe_id, version DESC"
        ))
        .bind(recipe_id)
        .bind(status)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(RecipeRecord::from_row)
        .collect()
    }

    pub async fn recipe_signatures(
        &self,
        recipe_id: &str,
        version: i64,
    ) -> Result<Vec<RecipeSignatureRecord>> {
        sqlx::query(
            "SELECT recipe_id, version, meaning, signer_id, printed_name, key_id, signed_ms, envelope \
             FROM recipe_signatures WHERE recipe_id = $1 AND version = $2 ORDER BY signed_ms",
        )
        .bind(recipe_id)
        .bind(version)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            Ok(RecipeSignatureRecord {
                recipe_id: r.try_get(0)?,
                version: r.try_get(1)?,
                meaning: r.try_get(2)?,
                signer_id: r.try_get(3)?,
                printed_name: r.try_get(4)?,
                key_id: r.try_get(5)?,
                signed_ms: r.try_get(6)?,
                envelope: r.try_get(7)?,
            })
        })
        .collect()
    }

    /// Adds a signature and moves the version's status, if it still has the status
    /// the signer saw; a release also creates the pending deliveries.
    pub async fn sign_recipe(&self, c: &SignCommit) -> Result<()> {
        let s = &c.signature;
        let mut tx = self.begin().await?;
        let moved = sqlx::query(
            "UPDATE recipes SET status = $3, released_ms = $4 WHERE recipe_id = $1 AND version = $2 AND status = $5",
        )
        .bind(&s.recipe_id)
        .bind(s.version)
        .bind(&c.to_status)
        .bind(c.released_ms)
        .bind(&c.from_status)
        .execute(&mut *tx)
        .await?;
        if moved.rows_affected() == 0 {
            return Err(conflict(format!(
                "recipe {} version {} is no longer {}: reload it",
                s.recipe_id, s.version, c.from_status
            )));
        }
        sqlx::query(
            "INSERT INTO recipe_signatures (recipe_id, version, meaning, signer_id, printed_name, key_id, signed_ms, envelope) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&s.recipe_id)
        .bind(s.version)
        .bind(&s.meaning)
        .bind(&s.signer_id)
        .bind(&s.printed_name)
        .bind(&s.key_id)
        .bind(s.signed_ms)
        .bind(&s.envelope)
        .execute(&mut *tx)
        .await?;
        for chunk in crate::chunks(&c.deliver_to) {
            let sql = crate::multi_row_insert(
                self.backend,
                "INSERT INTO recipe_deliveries (device_id, recipe_id, version, state)",
                4,
                chunk.len(),
                "ON CONFLICT (device_id, recipe_id, version) DO NOTHING",
            );
            let mut q = sqlx::query(&sql);
            for device_id in chunk {
                q = q.bind(device_id).bind(&s.recipe_id).bind(s.version).bind("pending");
            }
            q.execute(&mut *tx).await?;
        }
        for a in &c.audit {
            append_audit_in(&mut tx, a.clone()).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Sends a draft or authored version back; it is never signed further.
    pub async fn reject_recipe(
        &self,
        recipe_id: &str,
        version: i64,
        by: &str,
        reason: &str,
        audit: &AuditEntry,
    ) -> Result<()> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE recipes SET status = 'rejected', rejected_by = $3, rejected_reason = $4 \
             WHERE recipe_id = $1 AND version = $2 AND status IN ('draft', 'authored')",
        )
        .bind(recipe_id)
        .bind(version)
        .bind(by)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(conflict(format!(
                "recipe {recipe_id} version {version} is not a draft or waiting for approval"
            )));
        }
        append_audit_in(&mut tx, audit.clone()).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The person's active key for `role`.
    pub async fn signing_key(&self, person_id: &str, role: &str) -> Result<Option<SigningKeyRecord>> {
        sqlx::query(
            "SELECT key_id, person_id, role, public_key, sealed_key, created_ms, revoked_ms FROM signing_keys \
             WHERE person_id = $1 AND role = $2 AND revoked_ms = 0 ORDER BY created_ms DESC LIMIT 1",
        )
        .bind(person_id)
        .bind(role)
        .fetch_optional(&self.pool)
        .await?
        .map(|r| {
            Ok(SigningKeyRecord {
                key_id: r.try_get(0)?,
                person_id: r.try_get(1)?,
                role: r.try_get(2)?,
                public_key: r.try_get(3)?,
                sealed_key: r.try_get(4)?,
                created_ms: r.try_get(5)?,
                revoked_ms: r.try_get(6)?,
            })
        })
        .transpose()
    }

    /// Stores a new signing key with the trust root version that lists it.
    pub async fn add_signing_key(
        &self,
        key: &SigningKeyRecord,
        root_version: i64,
        root_document: &str,
        audit: &[AuditEntry],
    ) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO signing_keys (key_id, person_id, role, public_key, sealed_key, created_ms, revoked_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&key.key_id)
        .bind(&key.person_id)
        .bind(&key.role)
        .bind(&key.public_key)
        .bind(&key.sealed_key)
        .bind(key.created_ms)
        .bind(key.revoked_ms)
        .execute(&mut *tx)
        .await?;
        insert_trust_root_in(&mut tx, root_version, root_document, key.created_ms).await?;
        for a in audit {
            append_audit_in(&mut tx, a.clone()).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Records a trust root version if it is not there yet (the first one at start).
    pub async fn ensure_trust_root(&self, version: i64, document: &str, now_ms: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO trust_roots (version, document, created_ms) VALUES ($1, $2, $3) ON CONFLICT (version) DO NOTHING",
        )
        .bind(version)
        .bind(document)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Trust root documents newer than `version`, in version order.
    pub async fn trust_roots_after(&self, version: i64) -> Result<Vec<String>> {
        sqlx::query("SELECT document FROM trust_roots WHERE version > $1 ORDER BY version")
            .bind(version)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| Ok(r.try_get(0)?))
            .collect()
    }

    /// Deliveries of a recipe (every version when `version` is 0), with each device's site.
    pub async fn recipe_deliveries(&self, recipe_id: &str, version: i64) -> Result<Vec<DeliveryRecord>> {
        sqlx::query(
            "SELECT r.device_id, COALESCE(d.site_id, ''), r.recipe_id, r.version, r.state, r.code, r.reason, \
                    r.sent_ms, r.answered_ms \
             FROM recipe_deliveries r LEFT JOIN devices d ON d.id = r.device_id \
             WHERE r.recipe_id = $1 AND ($2 = 0 OR r.version = $2) ORDER BY r.version DESC, r.device_id",
        )
        .bind(recipe_id)
        .bind(version)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            Ok(DeliveryRecord {
                device_id: r.try_get(0)?,
                site_id: r.try_get(1)?,
                recipe_id: r.try_get(2)?,
                version: r.try_get(3)?,
                state: r.try_get(4)?,
                code: r.try_get(5)?,
                reason: r.try_get(6)?,
                sent_ms: r.try_get(7)?,
                answered_ms: r.try_get(8)?,
            })
        })
        .collect()
    }
}

impl Store {
    /// Creates a pending delivery unless one exists (a device enrolled after the
    /// release, say). Returns whether it was created.
    pub async fn ensure_delivery(&self, device_id: &str, recipe_id: &str, version: i64) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO recipe_deliveries (device_id, recipe_id, version, state) VALUES ($1, $2, $3, 'pending') \
             ON CONFLICT (device_id, recipe_id, version) DO NOTHING",
        )
        .bind(device_id)
        .bind(recipe_id)
        .bind(version)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Versions waiting for an answer from `device_id`, oldest first.
    pub async fn pending_deliveries(&self, device_id: &str) -> Result<Vec<(String, i64)>> {
        sqlx::query(
            "SELECT recipe_id, version FROM recipe_deliveries WHERE device_id = $1 AND state = 'pending'              ORDER BY recipe_id, version",
        )
        .bind(device_id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
    }

    /// Devices that have not answered for a version yet.
    pub async fn pending_devices(&self, recipe_id: &str, version: i64) -> Result<Vec<String>> {
        sqlx::query(
            "SELECT device_id FROM recipe_deliveries WHERE recipe_id = $1 AND version = $2 AND state = 'pending'              ORDER BY device_id",
        )
        .bind(recipe_id)
        .bind(version)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| Ok(r.try_get(0)?))
        .collect()
    }

    /// After a release went out: a pending delivery for every target (answers that
    /// arrived already are kept) and the send time of those it reached, in one
    /// transaction.
    pub async fn record_release_sends(
        &self,
        recipe_id: &str,
        version: i64,
        targets: &[String],
        sent: &[String],
        at_ms: i64,
    ) -> Result<()> {
        let mut tx = self.begin().await?;
        for chunk in crate::chunks(targets) {
            let sql = crate::multi_row_insert(
                self.backend,
                "INSERT INTO recipe_deliveries (device_id, recipe_id, version, state)",
                4,
                chunk.len(),
                "ON CONFLICT (device_id, recipe_id, version) DO NOTHING",
            );
            let mut q = sqlx::query(&sql);
            for device_id in chunk {
                q = q.bind(device_id).bind(recipe_id).bind(version).bind("pending");
            }
            q.execute(&mut *tx).await?;
        }
        for chunk in crate::chunks(sent) {
            let sql = format!(
                "UPDATE recipe_deliveries SET sent_ms = v.column4 FROM ({}) AS v \
                 WHERE recipe_deliveries.device_id = v.column1 AND recipe_deliveries.recipe_id = v.column2 \
                   AND recipe_deliveries.version = v.column3",
                crate::values_rows(self.backend, 4, chunk.len())
            );
            let mut q = sqlx::query(&sql);
            for device_id in chunk {
                q = q.bind(device_id).bind(recipe_id).bind(version).bind(at_ms);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Records devices' answers (`accepted` or `refused`) in one transaction, with the
    /// audit records of refusals. An answer for a version never delivered to the
    /// device is recorded too.
    pub async fn record_delivery_answers(
        &self,
        answers: &[(DeliveryRecord, Option<AuditEntry>)],
    ) -> Result<()> {
        let mut tx = self.begin().await?;
        for chunk in crate::chunks(answers) {
            let sql = crate::multi_row_insert(
                self.backend,
                "INSERT INTO recipe_deliveries (device_id, recipe_id, version, state, code, reason, answered_ms)",
                7,
                chunk.len(),
                "ON CONFLICT (device_id, recipe_id, version) DO UPDATE SET state = excluded.state, \
                    code = excluded.code, reason = excluded.reason, answered_ms = excluded.answered_ms",
            );
            let mut q = sqlx::query(&sql);
            for (d, _) in chunk {
                q = q
                    .bind(&d.device_id)
                    .bind(&d.recipe_id)
                    .bind(d.version)
                    .bind(&d.state)
                    .bind(&d.code)
                    .bind(&d.reason)
                    .bind(d.answered_ms);
            }
            q.execute(&mut *tx).await?;
        }
        for (_, audit) in answers {
            if let Some(a) = audit {
                append_audit_in(&mut tx, a.clone()).await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Notes when a version was last sent to a device.
    pub async fn mark_delivery_sent(
        &self,
        device_id: &str,
        recipe_id: &str,
        version: i64,
        at_ms: i64,
    ) -> Result<()> {
        sqlx::query("UPDATE recipe_deliveries SET sent_ms = $4 WHERE device_id = $1 AND recipe_id = $2 AND version = $3")
            .bind(device_id)
            .bind(recipe_id)
            .bind(version)
            .bind(at_ms)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

async fn insert_trust_root_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    version: i64,
    document: &str,
    now_ms: i64,
) -> Result<()> {
    sqlx::query("INSERT INTO trust_roots (version, document, created_ms) VALUES ($1, $2, $3)")
        .bind(version)
        .bind(document)
        .bind(now_ms)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
