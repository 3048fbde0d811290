//! The audit trail: every change of state as a computer-generated, time-stamped
//! record of who, what, when and why, with the old and the new value (21 CFR Part 11
//! §11.10(e), EU GMP Annex 11 §9), kept so that no edit goes unnoticed.
//!
//! Records are numbered 1, 2, 3, … without gaps and each one holds the SHA-256 of the
//! one before it, so changing, inserting or deleting a record breaks the chain from
//! there on. Rewriting the whole tail (or deleting it) leaves a consistent chain, so
//! a key held outside the database signs checkpoints: "at seq N the head hash was H".
//! A checkpoint the rewritten chain no longer matches, stored or held elsewhere,
//! shows the tampering.
//!
//! The store only ever inserts records: it has no way to change or delete one, and the
//! schema's triggers refuse an UPDATE or DELETE through any other SQL as well.
//! Verification ([`AuditVerifier`]) is pure: records in, first break out.

use std::fmt::Write as _;

use sha2::{Digest, Sha256};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{Error, Result, Store};

/// The hash a first record chains onto.
pub const GENESIS_HASH: [u8; 32] = [0; 32];

// Domain separation: a record hash or a checkpoint signature can never be taken for
// another hash or signature made with the same algorithm or key.
const RECORD_DOMAIN: &[u8] = b"nanofleet.audit.v1\0";
const CHECKPOINT_DOMAIN: &[u8] = b"nanofleet.audit.checkpoint.v1\0";

/// Records read per query while verifying: bounded memory whatever the chain's length.
const VERIFY_PAGE: u32 = 10_000;

const AUDIT_COLUMNS: &str =
    "seq, at_ms, actor, action, subject, site_id, reason, old_value, new_value, prev_hash, hash";

// === types ===

/// One change of state, as the code that made it describes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditEntry {
    /// When the change was made (Unix milliseconds), by the server's clock.
    pub at_ms: i64,
    /// Who made it: `person:alice`, `device:NF-1`, `system`.
    pub actor: String,
    /// What was done, dotted by subject kind: `site.create`, `device.enroll`,
    /// `role.grant`, `login.failure`.
    pub action: String,
    /// What it was done to: a site, device or person id.
    pub subject: String,
    /// The site the subject belongs to, where it has one (for site-scoped reading).
    pub site_id: Option<String>,
    /// Why, in the actor's words or the rule that triggered it.
    pub reason: String,
    /// The value before the change, as JSON; `None` when the subject did not exist.
    pub old_value: Option<String>,
    /// The value after the change, as JSON; `None` when the subject no longer exists.
    pub new_value: Option<String>,
}

/// An entry as stored: numbered and chained.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditRecord {
    /// 1, 2, 3, … without gaps.
    pub seq: i64,
    #[serde(flatten)]
    pub entry: AuditEntry,
    /// The hash of record `seq - 1`; [`GENESIS_HASH`] for the first record.
    #[serde(serialize_with = "as_hex")]
    pub prev_hash: [u8; 32],
    /// [`record_hash`] of this record.
    #[serde(serialize_with = "as_hex")]
    pub hash: [u8; 32],
}

/// A signed statement that the chain's record `seq` had hash `head_hash`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Checkpoint {
    pub seq: i64,
    #[serde(serialize_with = "as_hex")]
    pub head_hash: [u8; 32],
    pub signed_at_ms: i64,
    /// Names the key that signed, so a verifier picks the right public key.
    pub key_id: String,
    /// Signature over [`checkpoint_message`].
    #[serde(serialize_with = "as_hex")]
    pub signature: Vec<u8>,
}

impl Checkpoint {
    /// The bytes its signature covers.
    pub fn message(&self) -> Vec<u8> {
        checkpoint_message(self.seq, &self.head_hash, self.signed_at_ms)
    }
}

/// Which records [`Store::list_audit`] returns. The default is all of them.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub actor: Option<String>,
    /// One action (`device.enroll`), or, ending in a dot, every action under a prefix
    /// (`device.`).
    pub action: Option<String>,
    pub subject: Option<String>,
    pub site_id: Option<String>,
    /// Made at or after this time.
    pub since_ms: Option<i64>,
    /// Made before this time.
    pub until_ms: Option<i64>,
    /// Only records after this seq: the last seq of the previous page.
    pub after_seq: i64,
    /// At most this many records.
    pub limit: Option<u32>,
}

/// The newest record's seq and hash (seq 0 and [`GENESIS_HASH`] before the first): what
/// a checkpoint signs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct AuditHead {
    pub seq: i64,
    #[serde(serialize_with = "as_hex")]
    pub hash: [u8; 32],
}

/// A chain that verified.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VerifiedChain {
    /// Records checked.
    pub records: u64,
    /// The last record's seq (0 for an empty chain).
    pub head_seq: i64,
    #[serde(serialize_with = "as_hex")]
    pub head_hash: [u8; 32],
    /// Checkpoints whose signature and head hash were checked.
    pub checkpoints_checked: u64,
}

/// The first place a chain fails verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
#[error("audit chain broken at record {seq}: {reason}")]
pub struct ChainBreak {
    /// The first record that is missing, changed or contradicted by a checkpoint.
    pub seq: i64,
    pub reason: BreakReason,
}

/// Why a chain fails verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum BreakReason {
    #[error("missing: the next record is {found}")]
    Missing { found: i64 },
    #[error("out of order: record {found} comes where {expected} should")]
    OutOfOrder { found: i64, expected: i64 },
    #[error("its prev_hash is not the hash of the record before it")]
    PrevHashMismatch,
    #[error("its contents do not match its hash: the record was changed")]
    HashMismatch,
    #[error("it is malformed: {detail}")]
    Malformed { detail: String },
    #[error("the signature of the checkpoint by {key_id:?} at seq {checkpoint_seq} does not verify")]
    BadCheckpointSignature { key_id: String, checkpoint_seq: i64 },
    #[error(
        "the checkpoint by {key_id:?} at seq {checkpoint_seq} names another hash: the chain was rewritten"
    )]
    CheckpointMismatch { key_id: String, checkpoint_seq: i64 },
    #[error(
        "the checkpoint by {key_id:?} at seq {checkpoint_seq} is past the last record {last_seq}: \
         records were deleted from the end"
    )]
    CheckpointBeyondEnd { key_id: String, checkpoint_seq: i64, last_seq: i64 },
    #[error(
        "the head row names seq {head_seq} but the last record is {last_seq}: records were deleted from the end"
    )]
    HeadBeyondEnd { head_seq: i64, last_seq: i64 },
    #[error("the head row names another hash for this record")]
    HeadMismatch,
}

fn as_hex<T: AsRef<[u8]>, S: serde::Serializer>(bytes: &T, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(bytes))
}

// === hashing ===

/// The hash of record `seq` chained onto `prev_hash`: SHA-256 over a domain prefix,
/// then every field in a fixed order, strings length-prefixed and options tagged, so
/// no two different records encode to the same bytes (moving a byte from one field to
/// the next, or `None` against `Some("")`, changes the hash).
pub fn record_hash(prev_hash: &[u8; 32], seq: i64, entry: &AuditEntry) -> [u8; 32] {
    // Destructured so that a new field fails to build until it is hashed.
    let AuditEntry { at_ms, actor, action, subject, site_id, reason, old_value, new_value } = entry;
    let mut h = Sha256::new();
    h.update(RECORD_DOMAIN);
    h.update(prev_hash);
    h.update(seq.to_be_bytes());
    h.update(at_ms.to_be_bytes());
    put_str(&mut h, actor);
    put_str(&mut h, action);
    put_str(&mut h, subject);
    put_opt(&mut h, site_id.as_deref());
    put_str(&mut h, reason);
    put_opt(&mut h, old_value.as_deref());
    put_opt(&mut h, new_value.as_deref());
    h.finalize().into()
}

fn put_str(h: &mut Sha256, s: &str) {
    h.update((s.len() as u64).to_be_bytes());
    h.update(s.as_bytes());
}

fn put_opt(h: &mut Sha256, s: Option<&str>) {
    match s {
        None => h.update([0]),
        Some(s) => {
            h.update([1]);
            put_str(h, s);
        }
    }
}

/// The exact bytes a checkpoint's signature covers. Fixed-width fields after a domain
/// prefix: the encoding is unambiguous without length prefixes.
pub fn checkpoint_message(seq: i64, head_hash: &[u8; 32], signed_at_ms: i64) -> Vec<u8> {
    let mut m = Vec::with_capacity(CHECKPOINT_DOMAIN.len() + 8 + 32 + 8);
    m.extend_from_slice(CHECKPOINT_DOMAIN);
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(head_hash);
    m.extend_from_slice(&signed_at_ms.to_be_bytes());
    m
}

// === verification ===

/// Checks a chain fed to it record by record in seq order, against checkpoints, without
/// holding the records: a chain of any length verifies in constant memory.
///
/// Every checkpoint must carry a signature `check_sig` accepts and must match the
/// record at its seq; a checkpoint past the last record means the tail was deleted.
/// Pass a checkpoint held outside the database with the stored ones: a tail deleted
/// together with its stored checkpoints still contradicts it.
pub struct AuditVerifier<F> {
    check_sig: F,
    /// Checkpoints not yet reached, the lowest seq last.
    pending: Vec<Checkpoint>,
    head_seq: i64,
    head_hash: [u8; 32],
    records: u64,
    checkpoints_checked: u64,
    /// Once broken, always broken: later records are not checked against a bad chain.
    broken: Option<ChainBreak>,
}

impl<F> std::fmt::Debug for AuditVerifier<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditVerifier")
            .field("head_seq", &self.head_seq)
            .field("pending_checkpoints", &self.pending.len())
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl<F: Fn(&Checkpoint) -> bool> AuditVerifier<F> {
    pub fn new(checkpoints: impl IntoIterator<Item = Checkpoint>, check_sig: F) -> AuditVerifier<F> {
        let mut pending: Vec<Checkpoint> = checkpoints.into_iter().collect();
        pending.sort_by(|a, b| (b.seq, &b.key_id).cmp(&(a.seq, &a.key_id)));
        AuditVerifier {
            check_sig,
            pending,
            head_seq: 0,
            head_hash: GENESIS_HASH,
            records: 0,
            checkpoints_checked: 0,
            broken: None,
        }
    }

    /// Checks the next record. After the first break, returns that break again.
    pub fn push(&mut self, record: &AuditRecord) -> Result<(), ChainBreak> {
        if let Some(b) = &self.broken {
            return Err(b.clone());
        }
        let checked = self.reach_checkpoints().and_then(|()| self.check_record(record));
        checked.and_then(|()| self.reach_checkpoints()).inspect_err(|b| self.broken = Some(b.clone()))
    }

    /// The outcome once every record has been pushed.
    pub fn finish(mut self) -> Result<VerifiedChain, ChainBreak> {
        if let Some(b) = self.broken.take() {
            return Err(b);
        }
        self.reach_checkpoints()?;
        // Whatever is left names a record past the end. A forged checkpoint is reported
        // as forged, not taken as proof of a deleted tail.
        if let Some(cp) = self.pending.pop() {
            self.check_signature(&cp)?;
            return Err(ChainBreak {
                seq: self.head_seq + 1,
                reason: BreakReason::CheckpointBeyondEnd {
                    key_id: cp.key_id,
                    checkpoint_seq: cp.seq,
                    last_seq: self.head_seq,
                },
            });
        }
        Ok(VerifiedChain {
            records: self.records,
            head_seq: self.head_seq,
            head_hash: self.head_hash,
            checkpoints_checked: self.checkpoints_checked,
        })
    }

    fn check_record(&mut self, r: &AuditRecord) -> Result<(), ChainBreak> {
        let expected = self.head_seq + 1;
        if r.seq > expected {
            return Err(ChainBreak { seq: expected, reason: BreakReason::Missing { found: r.seq } });
        }
        if r.seq < expected {
            return Err(ChainBreak {
                seq: r.seq,
                reason: BreakReason::OutOfOrder { found: r.seq, expected },
            });
        }
        if r.prev_hash != self.head_hash {
            return Err(ChainBreak { seq: r.seq, reason: BreakReason::PrevHashMismatch });
        }
        if record_hash(&r.prev_hash, r.seq, &r.entry) != r.hash {
            return Err(ChainBreak { seq: r.seq, reason: BreakReason::HashMismatch });
        }
        self.head_seq = r.seq;
        self.head_hash = r.hash;
        self.records += 1;
        Ok(())
    }

    /// Checks the checkpoints at or before the current head. Those before it can only
    /// be checkpoints at seq 0 or below (the others were reached on the way), which
    /// name no record.
    fn reach_checkpoints(&mut self) -> Result<(), ChainBreak> {
        while let Some(cp) = self.pending.pop_if(|cp| cp.seq <= self.head_seq) {
            self.check_signature(&cp)?;
            if cp.seq != self.head_seq || cp.head_hash != self.head_hash {
                return Err(ChainBreak {
                    seq: cp.seq,
                    reason: BreakReason::CheckpointMismatch { key_id: cp.key_id, checkpoint_seq: cp.seq },
                });
            }
            self.checkpoints_checked += 1;
        }
        Ok(())
    }

    fn check_signature(&self, cp: &Checkpoint) -> Result<(), ChainBreak> {
        if (self.check_sig)(cp) {
            return Ok(());
        }
        Err(ChainBreak {
            seq: cp.seq,
            reason: BreakReason::BadCheckpointSignature { key_id: cp.key_id.clone(), checkpoint_seq: cp.seq },
        })
    }
}

/// Verifies records given in seq order against checkpoints: the chain's head, or the
/// first break.
pub fn verify_chain<'a>(
    records: impl IntoIterator<Item = &'a AuditRecord>,
    checkpoints: impl IntoIterator<Item = Checkpoint>,
    check_sig: impl Fn(&Checkpoint) -> bool,
) -> Result<VerifiedChain, ChainBreak> {
    let mut verifier = AuditVerifier::new(checkpoints, check_sig);
    for r in records {
        verifier.push(r)?;
    }
    verifier.finish()
}

// === impl Store ===

impl Store {
    /// Appends one record in a transaction of its own.
    pub async fn append_audit(&self, entry: AuditEntry) -> Result<AuditRecord> {
        let mut tx = self.begin().await?;
        let record = append_audit_in(&mut tx, entry).await?;
        tx.commit().await?;
        Ok(record)
    }

    /// The newest record's seq and hash: what the next checkpoint signs.
    pub async fn audit_head(&self) -> Result<AuditHead> {
        let row = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1").fetch_one(&self.pool).await?;
        let seq: i64 = row.try_get(0)?;
        Ok(AuditHead { seq, hash: hash32(seq, "head hash", row.try_get(1)?)? })
    }

    /// Records matching `filter`, by seq.
    pub async fn list_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>> {
        enum Param<'a> {
            Text(&'a str),
            Int(i64),
        }
        fn add<'a>(params: &mut Vec<Param<'a>>, p: Param<'a>) -> usize {
            params.push(p);
            params.len()
        }
        let mut params = vec![Param::Int(filter.after_seq)];
        let mut sql = format!("SELECT {AUDIT_COLUMNS} FROM audit_log WHERE seq > $1");
        for (column, value) in
            [("actor", &filter.actor), ("subject", &filter.subject), ("site_id", &filter.site_id)]
        {
            if let Some(v) = value {
                let n = add(&mut params, Param::Text(v));
                let _ = write!(sql, " AND {column} = ${n}");
            }
        }
        if let Some(action) = &filter.action {
            let n = add(&mut params, Param::Text(action));
            // Not LIKE: SQLite's ignores case, PostgreSQL's does not.
            let _ = if action.ends_with('.') {
                write!(sql, " AND substr(action, 1, length(${n})) = ${n}")
            } else {
                write!(sql, " AND action = ${n}")
            };
        }
        if let Some(since) = filter.since_ms {
            let n = add(&mut params, Param::Int(since));
            let _ = write!(sql, " AND at_ms >= ${n}");
        }
        if let Some(until) = filter.until_ms {
            let n = add(&mut params, Param::Int(until));
            let _ = write!(sql, " AND at_ms < ${n}");
        }
        sql.push_str(" ORDER BY seq");
        if let Some(limit) = filter.limit {
            let n = add(&mut params, Param::Int(i64::from(limit)));
            let _ = write!(sql, " LIMIT ${n}");
        }
        let mut q = sqlx::query(&sql);
        for p in params {
            q = match p {
                Param::Text(s) => q.bind(s),
                Param::Int(i) => q.bind(i),
            };
        }
        q.fetch_all(&self.pool).await?.iter().map(record_from_row).collect()
    }

    /// Up to `limit` records after `after_seq`, by seq: the chain page by page.
    pub async fn audit_records_from(&self, after_seq: i64, limit: u32) -> Result<Vec<AuditRecord>> {
        self.audit_rows_from(after_seq, limit).await?.iter().map(record_from_row).collect()
    }

    async fn audit_rows_from(&self, after_seq: i64, limit: u32) -> Result<Vec<AnyRow>> {
        Ok(sqlx::query(&format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2"
        ))
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }

    /// Stores a checkpoint. Returns false, storing nothing, when this key already
    /// signed this seq: several servers may checkpoint the same head.
    pub async fn save_checkpoint(&self, cp: &Checkpoint) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO audit_checkpoints (seq, head_hash, signed_at_ms, key_id, signature) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (seq, key_id) DO NOTHING",
        )
        .bind(cp.seq)
        .bind(&cp.head_hash[..])
        .bind(cp.signed_at_ms)
        .bind(&cp.key_id)
        .bind(&cp.signature[..])
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Every stored checkpoint, by seq.
    pub async fn checkpoints(&self) -> Result<Vec<Checkpoint>> {
        sqlx::query(
            "SELECT seq, head_hash, signed_at_ms, key_id, signature FROM audit_checkpoints \
             ORDER BY seq, key_id",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(checkpoint_from_row)
        .collect()
    }

    /// The checkpoint of the highest seq, the newest if several keys signed it.
    pub async fn latest_checkpoint(&self) -> Result<Option<Checkpoint>> {
        sqlx::query(
            "SELECT seq, head_hash, signed_at_ms, key_id, signature FROM audit_checkpoints \
             ORDER BY seq DESC, signed_at_ms DESC, key_id LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(checkpoint_from_row)
        .transpose()
    }

    /// Verifies the whole stored chain, page by page, against the stored checkpoints,
    /// `external` (one held outside the database) and the head row. The outer error is
    /// the database failing; the inner one is the chain's first break.
    pub async fn verify_audit(
        &self,
        external: Option<&Checkpoint>,
        check_sig: impl Fn(&Checkpoint) -> bool,
    ) -> Result<Result<VerifiedChain, ChainBreak>> {
        match self.verify_audit_pages(external, check_sig).await {
            Err(Error::AuditMalformed { seq, detail }) => {
                Ok(Err(ChainBreak { seq, reason: BreakReason::Malformed { detail } }))
            }
            other => other,
        }
    }

    async fn verify_audit_pages(
        &self,
        external: Option<&Checkpoint>,
        check_sig: impl Fn(&Checkpoint) -> bool,
    ) -> Result<Result<VerifiedChain, ChainBreak>> {
        // The head first: every record up to it committed with it, and appends made
        // meanwhile only add records after it.
        let head = self.audit_head().await?;
        let mut checkpoints = self.checkpoints().await?;
        checkpoints.extend(external.cloned());
        let mut verifier = AuditVerifier::new(checkpoints, check_sig);
        let mut after = 0;
        loop {
            let rows = self.audit_rows_from(after, VERIFY_PAGE).await?;
            // Converted one by one: a malformed record is reported after the records
            // before it were checked, so the break named is still the first.
            for row in &rows {
                let record = record_from_row(row)?;
                if let Err(b) = verifier.push(&record) {
                    return Ok(Err(b));
                }
                if record.seq == head.seq && record.hash != head.hash {
                    return Ok(Err(ChainBreak { seq: record.seq, reason: BreakReason::HeadMismatch }));
                }
                after = record.seq;
            }
            if rows.len() < VERIFY_PAGE as usize {
                break;
            }
        }
        let chain = match verifier.finish() {
            Ok(chain) => chain,
            Err(b) => return Ok(Err(b)),
        };
        if head.seq > chain.head_seq {
            return Ok(Err(ChainBreak {
                seq: chain.head_seq + 1,
                reason: BreakReason::HeadBeyondEnd { head_seq: head.seq, last_seq: chain.head_seq },
            }));
        }
        Ok(Ok(chain))
    }
}

/// Appends one record inside the caller's transaction, so that a change of state and
/// its record commit together or not at all.
///
/// The head row is updated first: it serialises appends (the write lock on SQLite, a
/// row lock on PostgreSQL, across every server sharing the database) until the
/// transaction ends. Append as the transaction's last statement to hold it briefly;
/// on SQLite the transaction should have written before it read anything, or taking
/// the write lock can fail with "database is locked".
pub async fn append_audit_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    entry: AuditEntry,
) -> Result<AuditRecord> {
    let head = sqlx::query("UPDATE audit_head SET seq = seq + 1 WHERE id = 1 RETURNING seq, hash")
        .fetch_one(&mut **tx)
        .await?;
    let seq: i64 = head.try_get(0)?;
    let prev_hash = hash32(seq - 1, "head hash", head.try_get(1)?)?;
    let hash = record_hash(&prev_hash, seq, &entry);
    sqlx::query("UPDATE audit_head SET hash = $1 WHERE id = 1").bind(&hash[..]).execute(&mut **tx).await?;
    sqlx::query(&format!(
        "INSERT INTO audit_log ({AUDIT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
    ))
    .bind(seq)
    .bind(entry.at_ms)
    .bind(&entry.actor)
    .bind(&entry.action)
    .bind(&entry.subject)
    .bind(&entry.site_id)
    .bind(&entry.reason)
    .bind(&entry.old_value)
    .bind(&entry.new_value)
    .bind(&prev_hash[..])
    .bind(&hash[..])
    .execute(&mut **tx)
    .await?;
    Ok(AuditRecord { seq, entry, prev_hash, hash })
}

fn record_from_row(r: &AnyRow) -> Result<AuditRecord> {
    let seq: i64 = r.try_get(0)?;
    Ok(AuditRecord {
        seq,
        entry: AuditEntry {
            at_ms: r.try_get(1)?,
            actor: r.try_get(2)?,
            action: r.try_get(3)?,
            subject: r.try_get(4)?,
            site_id: r.try_get(5)?,
            reason: r.try_get(6)?,
            old_value: r.try_get(7)?,
            new_value: r.try_get(8)?,
        },
        prev_hash: hash32(seq, "prev_hash", r.try_get(9)?)?,
        hash: hash32(seq, "hash", r.try_get(10)?)?,
    })
}

fn checkpoint_from_row(r: &AnyRow) -> Result<Checkpoint> {
    let seq: i64 = r.try_get(0)?;
    Ok(Checkpoint {
        seq,
        head_hash: hash32(seq, "checkpoint head_hash", r.try_get(1)?)?,
        signed_at_ms: r.try_get(2)?,
        key_id: r.try_get(3)?,
        signature: r.try_get(4)?,
    })
}

/// A stored hash, which must be 32 bytes; anything else is reported, not padded.
fn hash32(seq: i64, column: &str, bytes: Vec<u8>) -> Result<[u8; 32]> {
    let len = bytes.len();
    bytes
        .try_into()
        .map_err(|_| Error::AuditMalformed { seq, detail: format!("{column} is {len} bytes, not 32") })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> AuditEntry {
        AuditEntry {
            at_ms: 1_700_000_000_000,
            actor: "person:alice".into(),
            action: "device.enroll".into(),
            subject: "NF-1".into(),
            site_id: Some("site-a".into()),
            reason: "new device".into(),
            old_value: None,
            new_value: Some(r#"{"model":"NF-200"}"#.into()),
        }
    }

    fn chain(n: i64) -> Vec<AuditRecord> {
        let mut prev = GENESIS_HASH;
        (1..=n)
            .map(|seq| {
                let entry = AuditEntry { subject: format!("NF-{seq}"), ..entry() };
                let hash = record_hash(&prev, seq, &entry);
                let r = AuditRecord { seq, entry, prev_hash: prev, hash };
                prev = hash;
                r
            })
            .collect()
    }

    /// A checkpoint whose "signature" is the message itself: enough to tell a good
    /// one from a forged one without a key.
    fn checkpoint(r: &AuditRecord) -> Checkpoint {
        let signature = checkpoint_message(r.seq, &r.hash, 5);
        Checkpoint { seq: r.seq, head_hash: r.hash, signed_at_ms: 5, key_id: "k1".into(), signature }
    }

    fn sig_ok(cp: &Checkpoint) -> bool {
        cp.signature == cp.message()
    }

    #[test]
    fn moving_a_byte_between_fields_changes_the_hash() {
        let a = AuditEntry { actor: "person:al".into(), action: "icedevice.enroll".into(), ..entry() };
        let b = AuditEntry { actor: "person:alice".into(), action: "device.enroll".into(), ..entry() };
        assert_ne!(record_hash(&GENESIS_HASH, 1, &a), record_hash(&GENESIS_HASH, 1, &b));
    }

    #[test]
    fn none_and_empty_string_hash_differently() {
        let none = AuditEntry { old_value: None, ..entry() };
        let empty = AuditEntry { old_value: Some(String::new()), ..entry() };
        assert_ne!(record_hash(&GENESIS_HASH, 1, &none), record_hash(&GENESIS_HASH, 1, &empty));
        let site_none = AuditEntry { site_id: None, ..entry() };
        let site_empty = AuditEntry { site_id: Some(String::new()), ..entry() };
        assert_ne!(record_hash(&GENESIS_HASH, 1, &site_none), record_hash(&GENESIS_HASH, 1, &site_empty));
    }

    #[test]
    fn a_value_moved_between_old_and_new_changes_the_hash() {
        let old = AuditEntry { old_value: Some("1".into()), new_value: None, ..entry() };
        let new = AuditEntry { old_value: None, new_value: Some("1".into()), ..entry() };
        assert_ne!(record_hash(&GENESIS_HASH, 1, &old), record_hash(&GENESIS_HASH, 1, &new));
    }

    #[test]
    fn the_hash_binds_seq_time_and_previous_hash() {
        let e = entry();
        let base = record_hash(&GENESIS_HASH, 1, &e);
        assert_eq!(base, record_hash(&GENESIS_HASH, 1, &e.clone()), "deterministic");
        assert_ne!(base, record_hash(&GENESIS_HASH, 2, &e));
        assert_ne!(base, record_hash(&[1; 32], 1, &e));
        assert_ne!(base, record_hash(&GENESIS_HASH, 1, &AuditEntry { at_ms: e.at_ms + 1, ..e.clone() }));
    }

    #[test]
    fn the_hash_encoding_is_pinned() {
        // A change of encoding makes every stored chain fail to verify: it needs a new
        // domain prefix (v2), not an edit of this value.
        let e = AuditEntry {
            at_ms: 1,
            actor: "a".into(),
            action: "b".into(),
            subject: "c".into(),
            site_id: None,
            reason: "d".into(),
            old_value: None,
            new_value: Some("e".into()),
        };
        let mut want = Vec::new();
        want.extend_from_slice(b"nanofleet.audit.v1\0");
        want.extend_from_slice(&[0; 32]);
        want.extend_from_slice(&1i64.to_be_bytes());
        want.extend_from_slice(&1i64.to_be_bytes());
        for s in ["a", "b", "c"] {
            want.extend_from_slice(&1u64.to_be_bytes());
            want.extend_from_slice(s.as_bytes());
        }
        want.push(0);
        want.extend_from_slice(&1u64.to_be_bytes());
        want.extend_from_slice(b"d");
        want.push(0);
        want.push(1);
        want.extend_from_slice(&1u64.to_be_bytes());
        want.extend_from_slice(b"e");
        assert_eq!(record_hash(&GENESIS_HASH, 1, &e), <[u8; 32]>::from(Sha256::digest(&want)));
    }

    #[test]
    fn checkpoint_message_is_domain_separated_and_binds_every_field() {
        let m = checkpoint_message(7, &[3; 32], 9);
        assert!(m.starts_with(b"nanofleet.audit.checkpoint.v1\0"));
        assert_ne!(m, checkpoint_message(8, &[3; 32], 9));
        assert_ne!(m, checkpoint_message(7, &[4; 32], 9));
        assert_ne!(m, checkpoint_message(7, &[3; 32], 10));
    }

    #[test]
    fn an_intact_chain_verifies_with_its_checkpoints() {
        let records = chain(5);
        let cps = vec![checkpoint(&records[4]), checkpoint(&records[1])];
        let v = verify_chain(&records, cps, sig_ok).expect("intact");
        assert_eq!((v.records, v.head_seq, v.head_hash, v.checkpoints_checked), (5, 5, records[4].hash, 2));
        let empty = verify_chain(&[], vec![], sig_ok).expect("empty chain");
        assert_eq!((empty.head_seq, empty.head_hash), (0, GENESIS_HASH));
    }

    #[test]
    fn an_edited_record_breaks_at_its_seq() {
        let mut records = chain(5);
        records[2].entry.new_value = Some("forged".into());
        let b = verify_chain(&records, vec![], sig_ok).unwrap_err();
        assert_eq!((b.seq, b.reason), (3, BreakReason::HashMismatch));
    }

    #[test]
    fn a_rehashed_edit_breaks_at_the_next_record() {
        let mut records = chain(5);
        records[2].entry.new_value = Some("forged".into());
        records[2].hash = record_hash(&records[2].prev_hash, 3, &records[2].entry);
        let b = verify_chain(&records, vec![], sig_ok).unwrap_err();
        assert_eq!((b.seq, b.reason), (4, BreakReason::PrevHashMismatch));
    }

    #[test]
    fn a_missing_record_is_named() {
        let mut records = chain(5);
        records.remove(1);
        let b = verify_chain(&records, vec![], sig_ok).unwrap_err();
        assert_eq!((b.seq, b.reason), (2, BreakReason::Missing { found: 3 }));
        let repeated = [chain(2), chain(2)].concat();
        let b = verify_chain(&repeated, vec![], sig_ok).unwrap_err();
        assert_eq!((b.seq, b.reason), (1, BreakReason::OutOfOrder { found: 1, expected: 3 }));
    }

    #[test]
    fn a_deleted_tail_is_caught_by_a_checkpoint_past_the_end() {
        let records = chain(5);
        let cp = checkpoint(&records[4]);
        let b = verify_chain(&records[..3], vec![cp], sig_ok).unwrap_err();
        assert_eq!(b.seq, 4);
        assert!(
            matches!(b.reason, BreakReason::CheckpointBeyondEnd { checkpoint_seq: 5, last_seq: 3, .. }),
            "{b}"
        );
    }

    #[test]
    fn a_rewritten_chain_contradicts_its_checkpoint() {
        let records = chain(5);
        let cp = checkpoint(&records[3]);
        let mut rewritten = chain(5);
        rewritten[1].entry.reason = "rewritten".into();
        let mut prev = rewritten[0].hash;
        for r in &mut rewritten[1..] {
            r.prev_hash = prev;
            r.hash = record_hash(&prev, r.seq, &r.entry);
            prev = r.hash;
        }
        let b = verify_chain(&rewritten, vec![cp], sig_ok).unwrap_err();
        assert_eq!(b.seq, 4);
        assert!(matches!(b.reason, BreakReason::CheckpointMismatch { checkpoint_seq: 4, .. }), "{b}");
    }

    #[test]
    fn a_forged_checkpoint_is_reported_as_forged() {
        let records = chain(5);
        let mut cp = checkpoint(&records[2]);
        cp.signature[0] ^= 1;
        let b = verify_chain(&records, vec![cp.clone()], sig_ok).unwrap_err();
        assert_eq!(b.seq, 3);
        assert!(matches!(b.reason, BreakReason::BadCheckpointSignature { .. }), "{b}");
        // Past the end too: a forged checkpoint proves no deletion.
        let mut beyond = checkpoint(&chain(9)[8]);
        beyond.signature.pop();
        let b = verify_chain(&records, vec![beyond], sig_ok).unwrap_err();
        assert_eq!(b.seq, 9);
        assert!(matches!(b.reason, BreakReason::BadCheckpointSignature { .. }), "{b}");
    }

    #[test]
    fn the_verifier_stays_broken_after_the_first_break() {
        let mut records = chain(4);
        records[1].hash[0] ^= 1;
        let mut v = AuditVerifier::new(vec![], sig_ok);
        assert!(v.push(&records[0]).is_ok());
        let first = v.push(&records[1]).unwrap_err();
        assert_eq!(v.push(&records[2]).unwrap_err(), first);
        assert_eq!(v.finish().unwrap_err(), first);
    }

    #[test]
    fn a_checkpoint_before_the_first_record_must_name_the_genesis_hash() {
        let records = chain(2);
        let genesis = Checkpoint {
            seq: 0,
            head_hash: GENESIS_HASH,
            signed_at_ms: 5,
            key_id: "k1".into(),
            signature: checkpoint_message(0, &GENESIS_HASH, 5),
        };
        assert!(verify_chain(&records, vec![genesis.clone()], sig_ok).is_ok());
        let negative = Checkpoint { seq: -1, signature: checkpoint_message(-1, &GENESIS_HASH, 5), ..genesis };
        let b = verify_chain(&records, vec![negative], sig_ok).unwrap_err();
        assert!(matches!(b.reason, BreakReason::CheckpointMismatch { checkpoint_seq: -1, .. }), "{b}");
    }
}
