//! Enrollment tokens: `nfe1.{id}.{secret}.{root fingerprint}`.
//!
//! - `id` (10 characters) names the token in the registry and the audit trail;
//! - `secret` (20 random bytes, base64url) is what proves possession; the server keeps
//!   only its SHA-256;
//! - `root fingerprint` (SHA-256 of the fleet root, base64url) lets the device check,
//!   on its very first connection, that the server's TLS certificate chains to this
//!   fleet's root, before it holds any certificate of its own (like kubeadm's
//!   discovery hash).
//!
//! The token is bearer: whoever holds it may enroll one device (per use left) into its
//! site until it expires. Hospital IT hands it over the way it hands over a Wi-Fi key.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::Digest as _;

const PREFIX: &str = "nfe1";
const ID_LEN: usize = 10;
const ID_ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyz23456789";
const SECRET_BYTES: usize = 20;

/// A parsed enrollment token.
#[derive(Clone, PartialEq, Eq)]
pub struct EnrollToken {
    pub id: String,
    secret: String,
    /// Fingerprint of the fleet root the device must find at the server.
    pub root_fingerprint: String,
}

impl std::fmt::Debug for EnrollToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("EnrollToken").field("id", &self.id).finish_non_exhaustive()
    }
}

/// What is wrong with a token string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error(
        "enrollment token: expected 4 parts `nfe1.ID.SECRET.FINGERPRINT` separated by dots, found {found}"
    )]
    Parts { found: usize },
    #[error("enrollment token: starts with {found:?}, expected \"nfe1\"")]
    Prefix { found: String },
    #[error("enrollment token: id {found:?} must be {ID_LEN} characters of [a-z2-9]")]
    Id { found: String },
    #[error("enrollment token: the secret part is not {SECRET_BYTES} bytes of base64url")]
    Secret,
    #[error("enrollment token: the fingerprint part is not a base64url SHA-256 (43 characters)")]
    Fingerprint,
}

impl EnrollToken {
    /// A new token for the fleet whose root has `root_fingerprint`.
    pub fn generate(root_fingerprint: &str) -> EnrollToken {
        use rand::Rng as _;
        let mut rng = rand::rng();
        let id = (0..ID_LEN).map(|_| ID_ALPHABET[rng.random_range(0..ID_ALPHABET.len())] as char).collect();
        let secret_bytes: [u8; SECRET_BYTES] = rng.random();
        EnrollToken {
            id,
            secret: URL_SAFE_NO_PAD.encode(secret_bytes),
            root_fingerprint: root_fingerprint.to_owned(),
        }
    }

    pub fn parse(s: &str) -> Result<EnrollToken, TokenError> {
        let parts: Vec<&str> = s.trim().split('.').collect();
        let [prefix, id, secret, fp] = parts[..] else {
            return Err(TokenError::Parts { found: parts.len() });
        };
        if prefix != PREFIX {
            return Err(TokenError::Prefix { found: prefix.chars().take(16).collect() });
        }
        if id.len() != ID_LEN || !id.bytes().all(|b| ID_ALPHABET.contains(&b)) {
            return Err(TokenError::Id { found: id.chars().take(32).collect() });
        }
        if URL_SAFE_NO_PAD.decode(secret).map(|b| b.len()) != Ok(SECRET_BYTES) {
            return Err(TokenError::Secret);
        }
        if URL_SAFE_NO_PAD.decode(fp).map(|b| b.len()) != Ok(32) {
            return Err(TokenError::Fingerprint);
        }
        Ok(EnrollToken { id: id.into(), secret: secret.into(), root_fingerprint: fp.into() })
    }

    /// What the server stores instead of the secret.
    pub fn secret_hash(&self) -> String {
        hash_secret(&self.secret)
    }

    /// The full token, to hand to a device (contains the secret).
    pub fn reveal(&self) -> String {
        format!("{PREFIX}.{}.{}.{}", self.id, self.secret, self.root_fingerprint)
    }
}

/// Constant-time comparison of a presented secret's hash with the stored one.
pub fn secret_matches(token: &EnrollToken, stored_hash: &str) -> bool {
    crate::constant_time_eq(&token.secret_hash(), stored_hash)
}

fn hash_secret(secret: &str) -> String {
    URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(secret.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_round_trips_and_hides_its_secret() {
        let t = EnrollToken::generate(&crate::fingerprint(b"root"));
        let s = t.reveal();
        let back = EnrollToken::parse(&s).unwrap();
        assert_eq!(back, t);
        assert!(!format!("{t:?}").contains(&t.secret));
        assert!(secret_matches(&back, &t.secret_hash()));
        let other = EnrollToken::generate(&t.root_fingerprint);
        assert!(!secret_matches(&other, &t.secret_hash()));
    }

    #[test]
    fn bad_tokens_say_which_part_is_wrong() {
        let good = EnrollToken::generate(&crate::fingerprint(b"root")).reveal();
        let parts: Vec<&str> = good.split('.').collect();
        assert_eq!(EnrollToken::parse("abc"), Err(TokenError::Parts { found: 1 }));
        let swap = |i: usize, v: &str| {
            let mut p = parts.clone();
            p[i] = v;
            EnrollToken::parse(&p.join("."))
        };
        assert!(matches!(swap(0, "nfe2"), Err(TokenError::Prefix { .. })));
        assert!(matches!(swap(1, "UPPERCASE1"), Err(TokenError::Id { .. })));
        assert_eq!(swap(2, "short"), Err(TokenError::Secret));
        assert_eq!(swap(3, "AAAA"), Err(TokenError::Fingerprint));
    }
}
