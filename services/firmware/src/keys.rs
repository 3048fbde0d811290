//! ed25519 keys of the fleet trust root, as tough signs and verifies with them.

use std::collections::HashMap;

use aws_lc_rs::rand::SecureRandom;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use tough::key_source::KeySource;
use tough::schema::decoded::Decoded;
use tough::schema::key::{Ed25519Key, Ed25519Scheme, Key};
use tough::sign::Sign;

/// tough's form of an ed25519 public key (its key id is the SHA-256 of this, in
/// canonical JSON).
pub fn tuf_key(public: &VerifyingKey) -> Key {
    Key::Ed25519 {
        keyval: Ed25519Key { public: Decoded::from(public.as_bytes().to_vec()), _extra: HashMap::new() },
        scheme: Ed25519Scheme::Ed25519,
        _extra: HashMap::new(),
    }
}

/// The ed25519 public key of a tough key, if it is one.
pub fn ed25519_public(key: &Key) -> Option<VerifyingKey> {
    match key {
        Key::Ed25519 { keyval, .. } => {
            let bytes: [u8; 32] = keyval.public.as_ref().try_into().ok()?;
            VerifyingKey::from_bytes(&bytes).ok()
        }
        _ => None,
    }
}

/// The ed25519 keys a TUF root lists for `role`, sorted (for comparing sets), and the
/// role's threshold; none and 0 when the root has no such role.
pub fn role_publics(root: &tough::schema::Root, role: tough::schema::RoleType) -> (Vec<[u8; 32]>, u64) {
    let Some(r) = root.roles.get(&role) else { return (Vec::new(), 0) };
    let mut keys: Vec<[u8; 32]> = r
        .keyids
        .iter()
        .filter_map(|id| root.keys.get(id).and_then(ed25519_public))
        .map(|k| k.to_bytes())
        .collect();
    keys.sort_unstable();
    (keys, r.threshold.get())
}

/// `keys` as [`role_publics`] gives them: bytes, sorted.
pub fn sorted_publics(keys: &[VerifyingKey]) -> Vec<[u8; 32]> {
    let mut out: Vec<[u8; 32]> = keys.iter().map(|k| k.to_bytes()).collect();
    out.sort_unstable();
    out
}

/// A signing key held in memory, as a tough key source.
#[derive(Clone)]
pub struct Signer(SigningKey);

impl Signer {
    pub fn new(key: &SigningKey) -> Signer {
        Signer(key.clone())
    }

    /// For tough's editor, which takes a list of key sources.
    pub fn boxed(keys: &[&SigningKey]) -> Vec<Box<dyn KeySource>> {
        keys.iter().map(|k| Box::new(Signer::new(k)) as Box<dyn KeySource>).collect()
    }
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Signer").field(&hex::encode(self.0.verifying_key().as_bytes())).finish()
    }
}

#[tough::async_trait]
impl Sign for Signer {
    fn tuf_key(&self) -> Key {
        tuf_key(&self.0.verifying_key())
    }

    async fn sign(
        &self,
        msg: &[u8],
        _rng: &(dyn SecureRandom + Sync),
    ) -> Result<Vec<u8>, Box<dyn std::error::Error + Send + Sync + 'static>> {
        Ok(self.0.sign(msg).to_bytes().to_vec())
    }
}

#[tough::async_trait]
impl KeySource for Signer {
    async fn as_sign(&self) -> Result<Box<dyn Sign>, Box<dyn std::error::Error + Send + Sync + 'static>> {
        Ok(Box::new(self.clone()))
    }

    async fn write(
        &self,
        _value: &str,
        _key_id_hex: &str,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        Err("keys of the fleet trust root are kept by nanofleet, not written by tough".into())
    }
}
