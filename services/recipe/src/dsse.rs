//! DSSE v1 envelopes (<https://github.com/secure-systems-lab/dsse>) in their protobuf
//! form, signed with ed25519. A signature covers the pre-authentication encoding of the
//! payload type and the payload, so a signature made for one kind of document does not
//! verify for another.

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use nanofleet_pki::trust_root::key_id;
use nanofleet_proto::device::v1::{Envelope, EnvelopeSignature};

/// A `RecipeStatement`, protobuf-encoded.
pub const RECIPE_PAYLOAD_TYPE: &str = "application/vnd.nanofleet.recipe.v1+protobuf";
/// A device deny list, protobuf-encoded.
pub const DENY_LIST_PAYLOAD_TYPE: &str = "application/vnd.nanofleet.deny-list.v1+protobuf";
/// Firmware metadata, protobuf-encoded.
pub const FIRMWARE_PAYLOAD_TYPE: &str = "application/vnd.nanofleet.firmware.v1+protobuf";
/// A batch record, signed by the device that made the batch.
pub const BATCH_RECORD_PAYLOAD_TYPE: &str = "application/vnd.nanofleet.batch-record.v1+protobuf";

/// The bytes a signature covers:
/// `"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`, lengths in ASCII decimal bytes.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let type_len = payload_type.len().to_string();
    let body_len = payload.len().to_string();
    let mut out =
        Vec::with_capacity(6 + 4 + type_len.len() + payload_type.len() + body_len.len() + payload.len());
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(type_len.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(body_len.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload);
    out
}

/// An envelope holding `payload`, with one signature by `key`.
pub fn sign(payload_type: &str, payload: &[u8], key: &SigningKey) -> Envelope {
    let sig = key.sign(&pae(payload_type, payload));
    Envelope {
        payload: payload.to_vec(),
        payload_type: payload_type.to_owned(),
        signatures: vec![EnvelopeSignature {
            sig: sig.to_bytes().to_vec(),
            keyid: key_id(&key.verifying_key()),
        }],
    }
}

/// Whether `sig` is `key`'s signature over the envelope's payload type and payload.
/// Strict verification: weak keys and non-canonical signatures are refused.
pub fn verify_sig(env: &Envelope, sig: &EnvelopeSignature, key: &VerifyingKey) -> bool {
    let Ok(bytes) = <[u8; 64]>::try_from(sig.sig.as_slice()) else {
        return false;
    };
    key.verify_strict(&pae(&env.payload_type, &env.payload), &Signature::from_bytes(&bytes)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_matches_the_dsse_specification() {
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
        );
        assert_eq!(pae("", b""), b"DSSEv1 0  0 ");
        assert_eq!(
            pae(RECIPE_PAYLOAD_TYPE, &[0, 1, 2]),
            b"DSSEv1 44 application/vnd.nanofleet.recipe.v1+protobuf 3 \x00\x01\x02"
        );
    }

    #[test]
    fn a_signature_verifies_only_for_its_type_payload_and_key() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let env = sign(RECIPE_PAYLOAD_TYPE, b"statement", &key);
        let sig = &env.signatures[0];
        assert_eq!(sig.keyid, key_id(&key.verifying_key()));
        assert!(verify_sig(&env, sig, &key.verifying_key()));

        let mut other_type = env.clone();
        other_type.payload_type = DENY_LIST_PAYLOAD_TYPE.into();
        assert!(!verify_sig(&other_type, sig, &key.verifying_key()));

        let mut other_payload = env.clone();
        other_payload.payload[0] ^= 1;
        assert!(!verify_sig(&other_payload, sig, &key.verifying_key()));

        let other_key = SigningKey::from_bytes(&[8; 32]);
        assert!(!verify_sig(&env, sig, &other_key.verifying_key()));

        let short = EnvelopeSignature { sig: sig.sig[..63].to_vec(), keyid: sig.keyid.clone() };
        assert!(!verify_sig(&env, &short, &key.verifying_key()));
    }
}
