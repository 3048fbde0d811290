//! The server's side of recipe signatures: one statement per signer, signed in a DSSE
//! envelope.

use ed25519_dalek::SigningKey;
use nanofleet_proto::Message as _;
use nanofleet_proto::device::v1::{Envelope, RecipeStatement, SignatureMeaning};
use sha2::Digest as _;

use crate::dsse::{self, RECIPE_PAYLOAD_TYPE};

/// Trust-root role whose keys sign `AUTHORED` statements.
pub const AUTHOR_ROLE: &str = "recipe-author";
/// Trust-root role whose keys sign `APPROVED` statements.
pub const APPROVER_ROLE: &str = "recipe-approver";

/// The statement one signer signs: the exact recipe bytes and the signature's
/// manifestation (printed name, time, meaning).
pub fn statement(
    recipe_bytes: &[u8],
    signer_id: &str,
    printed_name: &str,
    meaning: SignatureMeaning,
    signed_unix_ms: i64,
) -> RecipeStatement {
    RecipeStatement {
        recipe: recipe_bytes.to_vec(),
        signer_id: signer_id.to_owned(),
        printed_name: printed_name.to_owned(),
        meaning: meaning as i32,
        signed_unix_ms,
    }
}

/// `st`, encoded and signed by `key` in a recipe envelope.
pub fn sign_statement(st: &RecipeStatement, key: &SigningKey) -> Envelope {
    dsse::sign(RECIPE_PAYLOAD_TYPE, &st.encode_to_vec(), key)
}

/// Hex SHA-256 of the encoded recipe: what the signatures cover and what devices report.
pub fn digest_hex(recipe_bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(recipe_bytes))
}

/// The trust-root role whose keys sign statements with `meaning`.
pub fn role_for(meaning: SignatureMeaning) -> Option<&'static str> {
    match meaning {
        SignatureMeaning::Authored => Some(AUTHOR_ROLE),
        SignatureMeaning::Approved => Some(APPROVER_ROLE),
        SignatureMeaning::Unspecified | SignatureMeaning::Released | SignatureMeaning::Rejected => None,
    }
}

#[cfg(test)]
mod tests {
    use nanofleet_pki::trust_root::key_id;

    use super::*;

    #[test]
    fn a_signed_statement_carries_the_recipe_and_the_signers_key_id() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let st = statement(b"recipe", "alice", "Alice Martin", SignatureMeaning::Authored, 42);
        let env = sign_statement(&st, &key);
        assert_eq!(env.payload_type, RECIPE_PAYLOAD_TYPE);
        assert_eq!(RecipeStatement::decode(env.payload.as_slice()).unwrap(), st);
        assert_eq!(env.signatures.len(), 1);
        assert_eq!(env.signatures[0].keyid, key_id(&key.verifying_key()));
        assert!(dsse::verify_sig(&env, &env.signatures[0], &key.verifying_key()));
    }

    #[test]
    fn digest_is_hex_sha256() {
        assert_eq!(digest_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn each_meaning_has_its_role() {
        assert_eq!(role_for(SignatureMeaning::Authored), Some("recipe-author"));
        assert_eq!(role_for(SignatureMeaning::Approved), Some("recipe-approver"));
        assert_eq!(role_for(SignatureMeaning::Unspecified), None);
    }
}
