//! The audit trail as operators use it: listing, verification, and the signed
//! checkpoints the server writes.
//!
//! The server signs the chain head with its own ed25519 key (`pki/audit.key`, 0600)
//! whenever the chain has grown (every few seconds and at shutdown), stores the
//! checkpoint, and mirrors the newest one to `audit-checkpoint.json` in the data
//! directory. A deleted tail then contradicts a checkpoint; deleting the checkpoints
//! too is caught by a copy kept elsewhere (`nanofleet audit verify --checkpoint FILE`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ed25519_dalek::{Signer as _, SigningKey, Verifier as _};
use nanofleet_proto::v1 as pb;
use nanofleet_store::{AuditFilter, AuditRecord, Checkpoint, Store, checkpoint_message};

use crate::Error;
use crate::now_ms;

/// Audit listing, verification and checkpoints; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    store: Store,
    key: Arc<SigningKey>,
    key_id: String,
    head_file: PathBuf,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Loads (or creates) the checkpoint key in `pki_dir`; the newest checkpoint is
    /// mirrored to `head_file`.
    pub fn open(store: Store, pki_dir: &Path, head_file: PathBuf) -> Result<AuditLog, Error> {
        let path = pki_dir.join("audit.key");
        let key = if path.exists() {
            nanofleet_pki::check_private(&path).map_err(|e| Error::Unavailable(e.to_string()))?;
            let text = std::fs::read_to_string(&path)
                .map_err(|e| Error::Unavailable(format!("{}: {e}", path.display())))?;
            let bytes: [u8; 32] = hex::decode(text.trim())
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| Error::Unavailable(format!("{}: not a hex ed25519 key", path.display())))?;
            SigningKey::from_bytes(&bytes)
        } else {
            let key = SigningKey::from_bytes(&rand::random());
            nanofleet_pki::write_private(&path, hex::encode(key.to_bytes()).as_bytes())
                .map_err(|e| Error::Unavailable(format!("{}: {e}", path.display())))?;
            key
        };
        use sha2::Digest as _;
        let key_id =
            format!("audit-{}", &hex::encode(sha2::Sha256::digest(key.verifying_key().as_bytes()))[..16]);
        Ok(AuditLog { store, key: Arc::new(key), key_id, head_file })
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Signs the chain head if it moved since the newest checkpoint, and only if the
    /// chain still extends that checkpoint (and the copy in the data directory): a
    /// chain rewritten behind the server's back is never signed.
    pub async fn checkpoint(&self) -> Result<Option<Checkpoint>, Error> {
        let head = self.store.audit_head().await?;
        if head.seq == 0 {
            return Ok(None);
        }
        let latest = self.store.latest_checkpoint().await?;
        if latest.as_ref().is_some_and(|c| c.seq >= head.seq) {
            return Ok(None);
        }
        let mirrored = std::fs::read_to_string(&self.head_file).ok().and_then(|t| parse_checkpoint(&t).ok());
        let anchor = match (latest, mirrored) {
            (Some(a), Some(b)) => Some(if a.seq >= b.seq { a } else { b }),
            (a, b) => a.or(b),
        };
        if let Some(cp) = anchor
            && let Err(why) = self.extends(&cp, head.seq).await?
        {
            tracing::error!(
                checkpoint_seq = cp.seq,
                %why,
                "audit chain does not extend the last signed checkpoint: not signing (run `nanofleet audit verify`)"
            );
            return Ok(None);
        }
        let signed_at_ms = now_ms();
        let signature =
            self.key.sign(&checkpoint_message(head.seq, &head.hash, signed_at_ms)).to_bytes().to_vec();
        let cp = Checkpoint {
            seq: head.seq,
            head_hash: head.hash,
            signed_at_ms,
            key_id: self.key_id.clone(),
            signature,
        };
        self.store.save_checkpoint(&cp).await?;
        if let Err(e) = nanofleet_pki::write_private(&self.head_file, checkpoint_json(&cp).as_bytes()) {
            tracing::warn!(error = %e, path = %self.head_file.display(), "audit checkpoint copy not written");
        }
        Ok(Some(cp))
    }

    /// Whether the stored chain still holds `cp` (the record at its seq has its hash)
    /// and runs unbroken from there to `head_seq`; `Err` says where it does not.
    async fn extends(&self, cp: &Checkpoint, head_seq: i64) -> Result<Result<(), String>, Error> {
        if !self.signature_ok(cp) {
            return Ok(Err(format!("checkpoint {} has no valid signature of this server", cp.seq)));
        }
        let mut prev = cp.head_hash;
        let mut expect = cp.seq;
        let first = self.store.audit_records_from(cp.seq - 1, 1).await?;
        match first.first() {
            Some(r) if r.seq == cp.seq && r.hash == cp.head_hash => expect += 1,
            Some(r) if r.seq == cp.seq => {
                return Ok(Err(format!("record {} changed since it was signed", cp.seq)));
            }
            _ => return Ok(Err(format!("record {} is missing", cp.seq))),
        }
        while expect <= head_seq {
            let page = self.store.audit_records_from(expect - 1, 10_000).await?;
            if page.is_empty() {
                return Ok(Err(format!("records from {expect} are missing")));
            }
            for r in &page {
                if r.seq != expect {
                    return Ok(Err(format!("record {expect} is missing")));
                }
                if r.prev_hash != prev || nanofleet_store::record_hash(&prev, r.seq, &r.entry) != r.hash {
                    return Ok(Err(format!("record {} does not chain", r.seq)));
                }
                prev = r.hash;
                expect += 1;
            }
        }
        Ok(Ok(()))
    }

    fn signature_ok(&self, cp: &Checkpoint) -> bool {
        let Ok(sig) = <[u8; 64]>::try_from(cp.signature.as_slice()) else { return false };
        cp.key_id == self.key_id
            && self
                .key
                .verifying_key()
                .verify(
                    &checkpoint_message(cp.seq, &cp.head_hash, cp.signed_at_ms),
                    &ed25519_dalek::Signature::from_bytes(&sig),
                )
                .is_ok()
    }

    pub async fn list(&self, req: &pb::ListAuditRequest) -> Result<Vec<pb::AuditRecord>, Error> {
        let limit = match req.limit {
            0 => 1_000,
            n if n <= 10_000 => n,
            n => {
                return Err(Error::InvalidArgument {
                    field: "limit",
                    value: n.to_string(),
                    allowed: "0 (1,000) to 10,000".into(),
                });
            }
        };
        let some = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        let filter = AuditFilter {
            actor: some(&req.actor),
            action: some(&req.action),
            subject: some(&req.subject),
            site_id: some(&req.site_id),
            since_ms: (req.since_unix_ms != 0).then_some(req.since_unix_ms),
            until_ms: (req.until_unix_ms != 0).then_some(req.until_unix_ms),
            after_seq: req.after_seq,
            limit: Some(limit),
        };
        Ok(self.store.list_audit(&filter).await?.iter().map(record_pb).collect())
    }

    /// Verifies the whole chain against the stored checkpoints and an external one
    /// (given, or else the mirrored copy in the data directory).
    pub async fn verify(&self, external_json: &str) -> Result<pb::VerifyAuditResponse, Error> {
        let external = if external_json.trim().is_empty() {
            std::fs::read_to_string(&self.head_file).ok().and_then(|t| parse_checkpoint(&t).ok())
        } else {
            Some(parse_checkpoint(external_json).map_err(|reason| Error::InvalidArgument {
                field: "external_checkpoint_json",
                value: external_json.chars().take(80).collect(),
                allowed: reason,
            })?)
        };
        // Sign what is there first, so the answer carries a checkpoint of this head.
        self.checkpoint().await?;
        let latest = self.store.latest_checkpoint().await?;
        let result = self.store.verify_audit(external.as_ref(), |cp| self.signature_ok(cp)).await?;
        let checkpoint_json = latest.as_ref().map(checkpoint_json).unwrap_or_default();
        Ok(match result {
            Ok(v) => pb::VerifyAuditResponse {
                intact: true,
                records: v.records,
                head_seq: v.head_seq,
                head_hash: hex::encode(v.head_hash),
                checkpoints_checked: v.checkpoints_checked,
                broken_seq: 0,
                broken_reason: String::new(),
                checkpoint_json,
            },
            Err(b) => pb::VerifyAuditResponse {
                intact: false,
                records: 0,
                head_seq: 0,
                head_hash: String::new(),
                checkpoints_checked: 0,
                broken_seq: b.seq,
                broken_reason: b.reason.to_string(),
                checkpoint_json,
            },
        })
    }
}

fn record_pb(r: &AuditRecord) -> pb::AuditRecord {
    pb::AuditRecord {
        seq: r.seq,
        at_unix_ms: r.entry.at_ms,
        actor: r.entry.actor.clone(),
        action: r.entry.action.clone(),
        subject: r.entry.subject.clone(),
        site_id: r.entry.site_id.clone().unwrap_or_default(),
        reason: r.entry.reason.clone(),
        old_value: r.entry.old_value.clone().unwrap_or_default(),
        new_value: r.entry.new_value.clone().unwrap_or_default(),
        prev_hash: hex::encode(r.prev_hash),
        hash: hex::encode(r.hash),
    }
}

fn checkpoint_json(cp: &Checkpoint) -> String {
    serde_json::to_string(cp).unwrap_or_default()
}

fn parse_checkpoint(text: &str) -> Result<Checkpoint, String> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("JSON of a checkpoint ({e})"))?;
    let hex32 = |k: &str| -> Result<Vec<u8>, String> {
        v[k].as_str().and_then(|s| hex::decode(s).ok()).ok_or_else(|| format!("a hex {k}"))
    };
    Ok(Checkpoint {
        seq: v["seq"].as_i64().ok_or("a numeric seq")?,
        head_hash: hex32("head_hash")?.try_into().map_err(|_| "a 32-byte head_hash".to_owned())?,
        signed_at_ms: v["signed_at_ms"].as_i64().ok_or("a numeric signed_at_ms")?,
        key_id: v["key_id"].as_str().ok_or("a key_id")?.to_owned(),
        signature: hex32("signature")?,
    })
}
