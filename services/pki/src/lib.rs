//! The fleet's public-key infrastructure.
//!
//! - [`FleetCa`]: a root CA created on the server's first start (or imported), a device
//!   intermediate that signs device certificates, and the server's own TLS certificate.
//!   Keys are files readable by the server's user only.
//! - [`FleetCa::issue_device_cert`]: a short-lived client certificate for a device from
//!   its CSR. The CSR only contributes its public key (after its proof of possession is
//!   checked); the identity written into the certificate is the caller's, which comes
//!   from an enrollment token.
//! - [`EnrollToken`]: the one-time secret hospital IT hands a device, carrying the
//!   fingerprint of the fleet root so the device can check it talks to the right server
//!   before it has any certificate.
//! - [`trust_root`]: the signed, versioned list of signing keys per role that devices
//!   pin at enrollment.
//! - [`tls`]: rustls configurations for the broker, gRPC, HTTPS and the agent, all on one
//!   crypto provider ([`install_crypto_provider`]).
#![forbid(unsafe_code)]

mod ca;
pub mod tls;
mod token;
pub mod trust_root;

use std::path::PathBuf;

pub use ca::{
    CaSummary, CertSummary, DeviceCert, DeviceIdentity, FleetCa, ServerNames, cert_pem, cert_summary,
    check_private, device_identity_of, serial_hex, verify_device_cert, write_private,
};
pub use token::{EnrollToken, TokenError, secret_matches};

/// Installs the one rustls crypto provider of the whole process (aws-lc-rs). Every
/// binary and test calls it first: with two providers compiled in (dependencies pull
/// both), rustls refuses to choose and panics at the first TLS configuration.
pub fn install_crypto_provider() {
    // Already installed (by an earlier call) is fine.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The provider, for configurations built explicitly.
pub fn crypto_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Compares two secrets' hashes in time that does not depend on where they differ.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// SHA-256 of a certificate (DER), base64url without padding: how tokens and
/// operators name the fleet root.
pub fn fingerprint(der: &[u8]) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(der))
}

/// PKI errors. Each names the file or input concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error("certificate signing request refused: {0}")]
    BadCsr(String),
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
