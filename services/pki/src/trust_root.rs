//! The fleet's trust root: a versioned, signed document listing the signing keys of
//! each role and how many of them must sign (TUF's root role).
//!
//! Devices pin it at enrollment and later accept a new version only if it is signed by
//! a threshold of the root keys of the version they hold and of the new one (rotation
//! N → N+1). Recipes, deny lists and firmware metadata are verified against the roles
//! it lists.
//!
//! Format (JSON; signatures over the canonical bytes of `signed`: keys sorted, no
//! whitespace):
//!
//! ```json
//! {"signed": {"_type": "root", "spec": "nanofleet-root/1", "version": 1,
//!             "expires": "2046-11-26T00:00:00Z",
//!             "keys": {"KEYID": {"keytype": "ed25519", "public": "HEX"}},
//!             "roles": {"root": {"keyids": ["KEYID"], "threshold": 1}, "recipe-author": {...}, ...}},
//!  "signatures": [{"keyid": "KEYID", "sig": "HEX"}]}
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use ed25519_dalek::{Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::{Error, Result};

/// The roles a trust root names. Roles other than `root` start without keys; they are
/// added by signed rotations.
pub const ROLES: &[&str] = &["root", "recipe-author", "recipe-approver", "deny-list", "firmware", "director"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Key {
    pub keytype: String,
    /// Hex of the ed25519 public key.
    pub public: String,
    /// The person who holds the key (people's id), for keys of signing roles: two
    /// signatures by one person count once, whatever keys they used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

impl Key {
    pub fn ed25519(public: &VerifyingKey, owner: Option<&str>) -> Key {
        Key {
            keytype: "ed25519".into(),
            public: hex::encode(public.as_bytes()),
            owner: owner.map(str::to_owned),
        }
    }

    /// The public key, if the entry holds a well-formed ed25519 key.
    pub fn verifying_key(&self) -> Option<VerifyingKey> {
        if self.keytype != "ed25519" {
            return None;
        }
        hex::decode(&self.public)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .and_then(|b| VerifyingKey::from_bytes(&b).ok())
    }
}

impl RootBody {
    /// Adds `key` to `role` (creating the key entry if needed); returns its key id.
    pub fn add_role_key(&mut self, role: &str, key: &VerifyingKey, owner: Option<&str>) -> String {
        let id = key_id(key);
        self.keys.entry(id.clone()).or_insert_with(|| Key::ed25519(key, owner));
        let r = self
            .roles
            .entry(role.to_owned())
            .or_insert_with(|| RoleKeys { keyids: Vec::new(), threshold: 1 });
        if !r.keyids.contains(&id) {
            r.keyids.push(id.clone());
        }
        id
    }

    /// Removes a key from every role and from the key list (revocation).
    pub fn remove_key(&mut self, keyid: &str) {
        self.keys.remove(keyid);
        for r in self.roles.values_mut() {
            r.keyids.retain(|k| k != keyid);
        }
    }

    /// The key `keyid` if `role` lists it.
    pub fn role_key(&self, role: &str, keyid: &str) -> Option<&Key> {
        self.roles.get(role).filter(|r| r.keyids.iter().any(|k| k == keyid))?;
        self.keys.get(keyid)
    }

    /// The signature threshold of `role`; 0 when the root does not name it.
    pub fn threshold(&self, role: &str) -> u32 {
        self.roles.get(role).map_or(0, |r| r.threshold)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleKeys {
    pub keyids: Vec<String>,
    pub threshold: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootBody {
    #[serde(rename = "_type")]
    pub kind: String,
    pub spec: String,
    pub version: u64,
    /// RFC 3339, UTC.
    pub expires: String,
    pub keys: BTreeMap<String, Key>,
    pub roles: BTreeMap<String, RoleKeys>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    pub keyid: String,
    /// Hex of the ed25519 signature.
    pub sig: String,
}

/// A signed trust root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustRoot {
    pub signed: RootBody,
    pub signatures: Vec<Signature>,
}

/// The id of a key: hex SHA-256 of its public bytes.
pub fn key_id(public: &VerifyingKey) -> String {
    hex::encode(sha2::Sha256::digest(public.as_bytes()))
}

/// The bytes signatures cover: `signed` as canonical JSON (sorted keys, compact).
pub fn canonical(body: &RootBody) -> Vec<u8> {
    // serde_json's map keeps keys sorted (no preserve_order), so a round trip through
    // Value canonicalises every level.
    let value = serde_json::to_value(body).unwrap_or_default();
    serde_json::to_vec(&value).unwrap_or_default()
}

impl TrustRoot {
    /// Version 1, with `root_key` as the only root key (threshold 1) and no keys yet for
    /// the other roles.
    pub fn initial(root_key: &SigningKey, expires: &str) -> TrustRoot {
        let id = key_id(&root_key.verifying_key());
        let mut keys = BTreeMap::new();
        keys.insert(id.clone(), Key::ed25519(&root_key.verifying_key(), None));
        let roles = ROLES
            .iter()
            .map(|r| {
                let keyids = if *r == "root" { vec![id.clone()] } else { Vec::new() };
                ((*r).to_owned(), RoleKeys { keyids, threshold: 1 })
            })
            .collect();
        let signed = RootBody {
            kind: "root".into(),
            spec: "nanofleet-root/1".into(),
            version: 1,
            expires: expires.into(),
            keys,
            roles,
        };
        let mut root = TrustRoot { signed, signatures: Vec::new() };
        root.sign(root_key);
        root
    }

    /// The unsigned body of the next version: same keys, roles and expiry.
    pub fn successor_body(&self) -> RootBody {
        let mut body = self.signed.clone();
        body.version += 1;
        body
    }

    /// A document for `body`, signed by `keys`.
    pub fn signed_by(body: RootBody, keys: &[&SigningKey]) -> TrustRoot {
        let mut root = TrustRoot { signed: body, signatures: Vec::new() };
        for k in keys {
            root.sign(k);
        }
        root
    }

    /// Adds (or replaces) this key's signature.
    pub fn sign(&mut self, key: &SigningKey) {
        let id = key_id(&key.verifying_key());
        let sig = hex::encode(key.sign(&canonical(&self.signed)).to_bytes());
        self.signatures.retain(|s| s.keyid != id);
        self.signatures.push(Signature { keyid: id, sig });
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    pub fn from_json(text: &str) -> Result<TrustRoot> {
        serde_json::from_str(text)
            .map_err(|e| Error::Invalid(format!("trust root: not a trust root document ({e})")))
    }

    /// How many distinct keys of `role` (as `by` lists them) signed this document.
    fn valid_signatures(&self, by: &RootBody, role: &str) -> u32 {
        let Some(r) = by.roles.get(role) else { return 0 };
        let message = canonical(&self.signed);
        let mut counted = BTreeSet::new();
        for s in &self.signatures {
            if !r.keyids.contains(&s.keyid) || counted.contains(&s.keyid) {
                continue;
            }
            let Some(key) = by.keys.get(&s.keyid) else { continue };
            let ok = key
                .verifying_key()
                .zip(hex::decode(&s.sig).ok().and_then(|b| <[u8; 64]>::try_from(b).ok()))
                .is_some_and(|(k, sig)| {
                    k.verify(&message, &ed25519_dalek::Signature::from_bytes(&sig)).is_ok()
                });
            if ok {
                counted.insert(s.keyid.clone());
            }
        }
        counted.len() as u32
    }

    /// Checks a document a device pins for the first time: well-formed and signed by a
    /// threshold of its own root keys.
    pub fn verify_self_signed(&self) -> Result<()> {
        self.check_shape()?;
        let need = self.signed.threshold("root");
        let got = self.valid_signatures(&self.signed, "root");
        if got < need {
            return Err(Error::Invalid(format!(
                "trust root v{}: {got} valid root signatures, {need} required",
                self.signed.version
            )));
        }
        Ok(())
    }

    /// Checks `next` as the successor of `self`: version + 1, signed by a threshold of
    /// the current root keys and of its own.
    pub fn verify_successor(&self, next: &TrustRoot) -> Result<()> {
        self.check_shape()?;
        next.check_shape()?;
        if next.signed.version != self.signed.version + 1 {
            return Err(Error::Invalid(format!(
                "trust root: version {} cannot follow version {} (one step at a time)",
                next.signed.version, self.signed.version
            )));
        }
        let old_need = self.signed.threshold("root");
        let old_got = next.valid_signatures(&self.signed, "root");
        if old_got < old_need {
            return Err(Error::Invalid(format!(
                "trust root v{}: {old_got} valid signatures by the root keys of v{}, {old_need} required",
                next.signed.version, self.signed.version
            )));
        }
        next.verify_self_signed()
    }

    fn check_shape(&self) -> Result<()> {
        let b = &self.signed;
        if b.kind != "root" || b.spec != "nanofleet-root/1" {
            return Err(Error::Invalid(format!(
                "trust root: type {:?} spec {:?} not supported",
                b.kind, b.spec
            )));
        }
        let Some(root) = b.roles.get("root") else {
            return Err(Error::Invalid("trust root: no root role".into()));
        };
        if root.threshold == 0 || (root.threshold as usize) > root.keyids.len() {
            return Err(Error::Invalid(format!(
                "trust root: root threshold {} with {} keys",
                root.threshold,
                root.keyids.len()
            )));
        }
        for (name, r) in &b.roles {
            if let Some(missing) = r.keyids.iter().find(|k| !b.keys.contains_key(*k)) {
                return Err(Error::Invalid(format!("trust root: role {name} names unknown key {missing}")));
            }
        }
        Ok(())
    }
}

/// Loads the trust root and its signing key from `dir`, creating version 1 on first
/// start (`trust-root.json`, `trust-root.key` 0600).
pub fn load_or_create(dir: &Path) -> Result<TrustRoot> {
    let doc = dir.join("trust-root.json");
    let key_path = dir.join("trust-root.key");
    if doc.exists() {
        let text = std::fs::read_to_string(&doc).map_err(|source| Error::Io { path: doc.clone(), source })?;
        let root = TrustRoot::from_json(&text)?;
        root.verify_self_signed()?;
        // The document must be this server's: signed under the key it keeps (a
        // self-signed replacement would otherwise be handed to every new device).
        if key_path.exists() {
            let key = signing_key(dir)?;
            let id = key_id(&key.verifying_key());
            if !root.signed.roles.get("root").is_some_and(|r| r.keyids.contains(&id)) {
                return Err(Error::BadFile {
                    path: doc,
                    reason: "not signed under this server's trust-root.key: restore the right pair".into(),
                });
            }
        }
        return Ok(root);
    }
    let key = SigningKey::from_bytes(&rand::random());
    crate::write_private(&key_path, hex::encode(key.to_bytes()).as_bytes())?;
    let expires = time::OffsetDateTime::now_utc() + time::Duration::days(20 * 365);
    let expires = expires
        .format(&time::format_description::well_known::Rfc3339)
        .map_err(|e| Error::Invalid(format!("trust root expiry: {e}")))?;
    let root = TrustRoot::initial(&key, &expires);
    crate::write_private(&doc, root.to_json().as_bytes())?;
    tracing::info!(dir = %dir.display(), "trust root v1 created");
    Ok(root)
}

/// The root key kept beside the document (`trust-root.key`), to sign successors.
pub fn signing_key(dir: &Path) -> Result<SigningKey> {
    let key_path = dir.join("trust-root.key");
    crate::check_private(&key_path)?;
    let text =
        std::fs::read_to_string(&key_path).map_err(|source| Error::Io { path: key_path.clone(), source })?;
    hex::decode(text.trim())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .map(|b| SigningKey::from_bytes(&b))
        .ok_or_else(|| Error::BadFile { path: key_path, reason: "not a hex ed25519 key".into() })
}

/// Replaces the current document in `dir` with `next`, which must be its successor.
pub fn save_successor(dir: &Path, current: &TrustRoot, next: &TrustRoot) -> Result<()> {
    current.verify_successor(next)?;
    crate::write_private(&dir.join("trust-root.json"), next.to_json().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&rand::random())
    }

    #[test]
    fn a_new_root_verifies_and_a_tampered_one_does_not() {
        let k = key();
        let root = TrustRoot::initial(&k, "2046-01-01T00:00:00Z");
        root.verify_self_signed().unwrap();
        let back = TrustRoot::from_json(&root.to_json()).unwrap();
        back.verify_self_signed().unwrap();
        let mut tampered = root.clone();
        tampered.signed.expires = "2099-01-01T00:00:00Z".into();
        assert!(tampered.verify_self_signed().is_err());
    }

    #[test]
    fn rotation_needs_the_old_and_the_new_root_keys() {
        let old_key = key();
        let v1 = TrustRoot::initial(&old_key, "2046-01-01T00:00:00Z");
        let new_key = key();
        let mut v2 = TrustRoot::initial(&new_key, "2047-01-01T00:00:00Z");
        v2.signed.version = 2;
        v2.signatures.clear();
        v2.sign(&new_key);
        // Only the new key: refused.
        let err = v1.verify_successor(&v2).unwrap_err();
        assert!(err.to_string().contains("root keys of v1"), "{err}");
        // Both: accepted.
        v2.sign(&old_key);
        v1.verify_successor(&v2).unwrap();
        // Skipping a version: refused.
        let mut v3 = v2.clone();
        v3.signed.version = 3;
        v3.signatures.clear();
        v3.sign(&old_key);
        v3.sign(&new_key);
        assert!(v1.verify_successor(&v3).is_err());
    }

    #[test]
    fn a_replaced_document_is_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path()).unwrap();
        assert_eq!(load_or_create(dir.path()).unwrap(), first);
        // A self-signed document from elsewhere in place of ours.
        let foreign = TrustRoot::initial(&key(), "2046-01-01T00:00:00Z");
        std::fs::write(dir.path().join("trust-root.json"), foreign.to_json()).unwrap();
        let err = load_or_create(dir.path()).unwrap_err();
        assert!(err.to_string().contains("trust-root.key"), "{err}");
    }

    #[test]
    fn a_signature_counts_once() {
        let k = key();
        let mut root = TrustRoot::initial(&k, "2046-01-01T00:00:00Z");
        let other = key();
        let id = key_id(&other.verifying_key());
        root.signed.keys.insert(id.clone(), Key::ed25519(&other.verifying_key(), None));
        root.signed.roles.get_mut("root").unwrap().keyids.push(id);
        root.signed.roles.get_mut("root").unwrap().threshold = 2;
        root.signatures.clear();
        root.sign(&k);
        let dup = root.signatures[0].clone();
        root.signatures.push(dup);
        assert!(root.verify_self_signed().is_err(), "one key twice is not two signatures");
        root.sign(&other);
        root.verify_self_signed().unwrap();
    }
}
