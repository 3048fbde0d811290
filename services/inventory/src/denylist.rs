//! Deny lists: the lots and cartridges every device must refuse, signed by a key of
//! the trust root's `deny-list` role and checked on the device against the root it
//! pinned.
//!
//! A list is complete, so the newest one held is all a device needs: a list older than
//! it is refused (a replay cannot bring a recalled lot back). [`DenyIndex`] answers a
//! device's question about one cartridge without a connection.

use std::collections::HashMap;

use ed25519_dalek::SigningKey;
use nanofleet_pki::trust_root::TrustRoot;
use nanofleet_proto::Message as _;
use nanofleet_proto::device::v1::{DenyList, Envelope};
use nanofleet_recipe::dsse::{self, DENY_LIST_PAYLOAD_TYPE};

/// Trust-root role whose keys sign deny lists.
pub const ROLE: &str = "deny-list";
/// Largest encoded envelope a device takes.
pub const MAX_BYTES: usize = 4 << 20;

/// Stable codes of a refused list, for `Ack.code`.
pub mod code {
    pub const MALFORMED: &str = "malformed";
    pub const WRONG_TYPE: &str = "wrong_payload_type";
    pub const BAD_SIGNATURE: &str = "bad_signature";
    pub const KEY_NOT_IN_ROLE: &str = "key_not_in_role";
    pub const THRESHOLD_NOT_MET: &str = "threshold_not_met";
    pub const ROLLBACK: &str = "rollback";
}

/// Why a device refuses a deny list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Refusal {
    pub code: &'static str,
    pub reason: String,
}

fn refuse(code: &'static str, reason: String) -> Refusal {
    Refusal { code, reason }
}

/// `list`, encoded and signed by `key`.
pub fn sign(list: &DenyList, key: &SigningKey) -> Envelope {
    dsse::sign(DENY_LIST_PAYLOAD_TYPE, &list.encode_to_vec(), key)
}

/// The list in `envelope` if the root's `deny-list` role signed it (threshold met by
/// distinct keys) and it is not older than `held_version`. The same version again is
/// accepted (a re-send after a lost ack).
pub fn verify(envelope_bytes: &[u8], root: &TrustRoot, held_version: u64) -> Result<DenyList, Refusal> {
    if envelope_bytes.len() > MAX_BYTES {
        return Err(refuse(
            code::MALFORMED,
            format!("deny list is {} bytes; at most {MAX_BYTES} are taken", envelope_bytes.len()),
        ));
    }
    let env = Envelope::decode(envelope_bytes)
        .map_err(|e| refuse(code::MALFORMED, format!("deny list envelope does not decode: {e}")))?;
    if env.payload_type != DENY_LIST_PAYLOAD_TYPE {
        return Err(refuse(
            code::WRONG_TYPE,
            format!("payload type {:?} is not {DENY_LIST_PAYLOAD_TYPE:?}", env.payload_type),
        ));
    }
    let body = &root.signed;
    let mut good: Vec<&str> = Vec::new();
    for sig in &env.signatures {
        let Some(key) = body.role_key(ROLE, &sig.keyid) else {
            return Err(refuse(
                code::KEY_NOT_IN_ROLE,
                format!(
                    "deny list is signed by key {}, which is not a {ROLE} key in trust root v{}",
                    short(&sig.keyid),
                    body.version
                ),
            ));
        };
        let Some(public) = key.verifying_key() else {
            return Err(refuse(
                code::BAD_SIGNATURE,
                format!("key {} is not an ed25519 key", short(&sig.keyid)),
            ));
        };
        if !dsse::verify_sig(&env, sig, &public) {
            return Err(refuse(
                code::BAD_SIGNATURE,
                format!("the signature by key {} does not verify over the deny list", short(&sig.keyid)),
            ));
        }
        if !good.contains(&sig.keyid.as_str()) {
            good.push(&sig.keyid);
        }
    }
    let need = usize::try_from(body.threshold(ROLE)).unwrap_or(usize::MAX).max(1);
    if good.len() < need {
        return Err(refuse(
            code::THRESHOLD_NOT_MET,
            format!(
                "deny list carries {} valid {ROLE} signatures; trust root v{} needs {need}",
                good.len(),
                body.version
            ),
        ));
    }
    let list = DenyList::decode(env.payload.as_slice())
        .map_err(|e| refuse(code::MALFORMED, format!("deny list does not decode: {e}")))?;
    if list.version < held_version {
        return Err(refuse(
            code::ROLLBACK,
            format!("deny list version {} is older than version {held_version} held", list.version),
        ));
    }
    Ok(list)
}

fn short(keyid: &str) -> &str {
    keyid.get(..12).unwrap_or(keyid)
}

/// A deny list, indexed for the device's question: may this cartridge run?
#[derive(Debug, Clone, Default)]
pub struct DenyIndex {
    pub version: u64,
    lots: HashMap<(String, String), String>,
    cartridges: HashMap<(String, String), String>,
}

/// Why a cartridge is denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    Lot(String),
    Cartridge(String),
}

impl DenyIndex {
    pub fn new(list: &DenyList) -> DenyIndex {
        DenyIndex {
            version: list.version,
            lots: list.lots.iter().map(|l| ((l.gtin.clone(), l.lot.clone()), l.reason.clone())).collect(),
            cartridges: list
                .cartridges
                .iter()
                .map(|c| ((c.gtin.clone(), c.serial.clone()), c.reason.clone()))
                .collect(),
        }
    }

    /// The reason the list gives for refusing this cartridge, if it does.
    pub fn check(&self, gtin: &str, lot: &str, serial: &str) -> Option<Denied> {
        if let Some(r) = self.lots.get(&(gtin.to_owned(), lot.to_owned())) {
            return Some(Denied::Lot(r.clone()));
        }
        self.cartridges.get(&(gtin.to_owned(), serial.to_owned())).map(|r| Denied::Cartridge(r.clone()))
    }

    pub fn lots(&self) -> usize {
        self.lots.len()
    }

    pub fn cartridges(&self) -> usize {
        self.cartridges.len()
    }
}

#[cfg(test)]
mod tests {
    use nanofleet_pki::trust_root::{RootBody, TrustRoot};
    use nanofleet_proto::device::v1::{DeniedCartridge, DeniedLot};

    use super::*;

    fn root(keys: &[&SigningKey], threshold: u32) -> TrustRoot {
        let root_key = SigningKey::from_bytes(&[9; 32]);
        let mut body: RootBody = TrustRoot::initial(&root_key, "2046-01-01T00:00:00Z").successor_body();
        for k in keys {
            body.add_role_key(ROLE, &k.verifying_key(), Some("qa"));
        }
        if let Some(r) = body.roles.get_mut(ROLE) {
            r.threshold = threshold;
        }
        TrustRoot::signed_by(body, &[&root_key])
    }

    fn list(version: u64) -> DenyList {
        DenyList {
            version,
            issued_unix_ms: 1,
            lots: vec![DeniedLot {
                gtin: "09506000134352".into(),
                lot: "L1".into(),
                reason: "recall R-1".into(),
                since_unix_ms: 1,
            }],
            cartridges: vec![DeniedCartridge {
                gtin: "09506000134352".into(),
                serial: "S9".into(),
                reason: "cold chain".into(),
                since_unix_ms: 1,
            }],
        }
    }

    #[test]
    fn a_signed_list_verifies_and_answers_per_cartridge() {
        let qa = SigningKey::from_bytes(&[1; 32]);
        let env = sign(&list(3), &qa).encode_to_vec();
        let got = verify(&env, &root(&[&qa], 1), 2).unwrap();
        assert_eq!(got, list(3));
        assert!(verify(&env, &root(&[&qa], 1), 3).is_ok(), "the same version again is taken");
        let idx = DenyIndex::new(&got);
        assert_eq!(idx.check("09506000134352", "L1", "any"), Some(Denied::Lot("recall R-1".into())));
        assert_eq!(idx.check("09506000134352", "L2", "S9"), Some(Denied::Cartridge("cold chain".into())));
        assert_eq!(idx.check("09506000134352", "L2", "S8"), None);
        assert_eq!(idx.check("00000000000000", "L1", "S9"), None);
    }

    #[test]
    fn bad_signatures_other_keys_and_older_versions_are_refused() {
        let qa = SigningKey::from_bytes(&[1; 32]);
        let stranger = SigningKey::from_bytes(&[2; 32]);
        let trusted = root(&[&qa], 1);

        let mut env = sign(&list(3), &qa);
        env.payload[0] ^= 1;
        assert_eq!(verify(&env.encode_to_vec(), &trusted, 0).unwrap_err().code, code::BAD_SIGNATURE);

        let env = sign(&list(3), &stranger).encode_to_vec();
        assert_eq!(verify(&env, &trusted, 0).unwrap_err().code, code::KEY_NOT_IN_ROLE);

        let env = sign(&list(2), &qa).encode_to_vec();
        let e = verify(&env, &trusted, 3).unwrap_err();
        assert_eq!(
            (e.code, e.reason.as_str()),
            (code::ROLLBACK, "deny list version 2 is older than version 3 held")
        );

        let mut env = sign(&list(3), &qa);
        env.payload_type = dsse::RECIPE_PAYLOAD_TYPE.into();
        assert_eq!(verify(&env.encode_to_vec(), &trusted, 0).unwrap_err().code, code::WRONG_TYPE);

        let mut env = sign(&list(3), &qa);
        env.signatures.clear();
        assert_eq!(verify(&env.encode_to_vec(), &trusted, 0).unwrap_err().code, code::THRESHOLD_NOT_MET);

        assert_eq!(verify(b"\xff\xff", &trusted, 0).unwrap_err().code, code::MALFORMED);
    }

    #[test]
    fn a_threshold_of_two_needs_two_distinct_keys() {
        let a = SigningKey::from_bytes(&[1; 32]);
        let b = SigningKey::from_bytes(&[3; 32]);
        let trusted = root(&[&a, &b], 2);
        let mut env = sign(&list(1), &a);
        env.signatures.push(env.signatures[0].clone());
        assert_eq!(verify(&env.encode_to_vec(), &trusted, 0).unwrap_err().code, code::THRESHOLD_NOT_MET);
        let second = sign(&list(1), &b);
        env.signatures[1] = second.signatures[0].clone();
        assert!(verify(&env.encode_to_vec(), &trusted, 0).is_ok());
    }
}
