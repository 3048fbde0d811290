//! Device identity: enrollment with a token, the credentials on disk, renewal.
//!
//! The key is generated here and never leaves the device: the server receives a CSR
//! and returns a certificate whose identity (device id, site) it takes from the token.
//! On first contact the device has no certificate and no CA: it trusts the server only
//! if the server's chain holds the fleet root named by the token (its fingerprint).
//! From then on it pins that root.
//!
//! Files in the device's state directory (all 0600):
//! `device.key`, `device.pem` (certificate and intermediate), `fleet-root.pem`,
//! `identity.json` (device id, site, certificate end, server addresses).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nanofleet_pki::{EnrollToken, tls};
use nanofleet_proto::v1 as pb;
use nanofleet_proto::v1::enrollment_service_client::EnrollmentServiceClient;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};

/// Enrollment and credential errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Token(#[from] nanofleet_pki::TokenError),
    #[error("{0}")]
    Connect(String),
    #[error("the server refused: {0}")]
    Refused(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error("key or CSR: {0}")]
    Key(#[from] rcgen::Error),
    #[error(transparent)]
    Pki(#[from] nanofleet_pki::Error),
}

/// What the device holds after enrollment.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct Credentials {
    pub device_id: String,
    pub site_id: String,
    /// End of the certificate, ms since the Unix epoch.
    pub not_after_ms: i64,
    /// The server's gRPC address (renewal), `https://host:port`.
    pub server: String,
    /// Where to connect over MQTT, `host:port`.
    pub mqtt_address: String,
    #[serde(skip)]
    pub key_pem: String,
    #[serde(skip)]
    pub chain_pem: String,
    #[serde(skip)]
    pub root_pem: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("device_id", &self.device_id)
            .field("site_id", &self.site_id)
            .field("not_after_ms", &self.not_after_ms)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A new P-256 key and a CSR for it. The subject is informational only.
fn key_and_csr(hint: &str) -> Result<(KeyPair, Vec<u8>), Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, hint);
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.der().to_vec()))
}

/// Enrolls with `token` at `server` (`https://host:port`).
pub async fn enroll(
    server: &str,
    token: &str,
    model: &str,
    hardware_serial: &str,
) -> Result<Credentials, Error> {
    let parsed = EnrollToken::parse(token)?;
    let (key, csr_der) = key_and_csr(hardware_serial)?;
    let config = tls::pinned_client_config(&parsed.root_fingerprint)?;
    let channel = tls::connect_channel(server, config).await.map_err(Error::Connect)?;
    let resp = EnrollmentServiceClient::new(channel)
        .enroll(pb::EnrollRequest {
            token: token.trim().to_owned(),
            csr_der,
            model: model.into(),
            hardware_serial: hardware_serial.into(),
        })
        .await
        .map_err(|s| Error::Refused(s.message().to_owned()))?
        .into_inner();
    // The root the server sent must be the one the token named.
    let root = tls::certs_from_pem("fleet root from the server", &resp.root_ca_pem)?;
    if root.first().map(|c| nanofleet_pki::fingerprint(c)) != Some(parsed.root_fingerprint.clone()) {
        return Err(Error::Refused("the server sent a fleet root other than the one the token names".into()));
    }
    let mqtt_address = if resp.mqtt_address.is_empty() { default_mqtt(server) } else { resp.mqtt_address };
    Ok(Credentials {
        device_id: resp.device_id,
        site_id: resp.site_id,
        not_after_ms: resp.not_after_unix_ms,
        server: server.into(),
        mqtt_address,
        key_pem: key.serialize_pem(),
        chain_pem: resp.certificate_chain_pem,
        root_pem: resp.root_ca_pem,
    })
}

/// The MQTT address next to a gRPC one: same host, port 8883.
fn default_mqtt(server: &str) -> String {
    let host = server.trim_start_matches("https://").rsplit_once(':').map(|(h, _)| h).unwrap_or("127.0.0.1");
    format!("{host}:8883")
}

impl Credentials {
    /// Renews the certificate over mutual TLS with the current one, with a new key.
    pub async fn renew(&self) -> Result<Credentials, Error> {
        let (key, csr_der) = key_and_csr(&self.device_id)?;
        let channel =
            tls::connect_channel(&self.server, self.client_config()?).await.map_err(Error::Connect)?;
        let resp = EnrollmentServiceClient::new(channel)
            .renew(pb::RenewRequest { csr_der })
            .await
            .map_err(|s| Error::Refused(s.message().to_owned()))?
            .into_inner();
        Ok(Credentials {
            not_after_ms: resp.not_after_unix_ms,
            key_pem: key.serialize_pem(),
            chain_pem: resp.certificate_chain_pem,
            ..self.clone()
        })
    }

    /// Time until renewal is due: two thirds into the certificate's life, as seen
    /// from `now`; zero if overdue.
    pub fn renew_in(&self, issued_ms: i64) -> Duration {
        let due = issued_ms + (self.not_after_ms - issued_ms) * 2 / 3;
        Duration::from_millis(u64::try_from(due - now_ms()).unwrap_or(0))
    }

    /// A TLS client configuration presenting the device certificate and trusting only
    /// the pinned fleet root.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, Error> {
        let roots = tls::certs_from_pem("fleet root", &self.root_pem)?;
        let chain = tls::certs_from_pem("device certificate", &self.chain_pem)?;
        let key = tls::key_from_pem("device key", &self.key_pem)?;
        Ok(tls::client_config(&roots, Some((chain, key)))?)
    }

    pub fn client_config_arc(&self) -> Result<Arc<rustls::ClientConfig>, Error> {
        Ok(Arc::new(self.client_config()?))
    }

    /// Saves the credentials in `dir`, each file 0600, replaced atomically.
    pub fn save(&self, dir: &Path) -> Result<(), Error> {
        use std::os::unix::fs::DirBuilderExt as _;
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::Io { path, source }
        };
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io(dir))?;
        let meta = serde_json::to_vec_pretty(self).unwrap_or_default();
        for (name, bytes) in [
            ("device.key", self.key_pem.as_bytes()),
            ("device.pem", self.chain_pem.as_bytes()),
            ("fleet-root.pem", self.root_pem.as_bytes()),
            ("identity.json", &meta[..]),
        ] {
            write_private(&dir.join(name), bytes)?;
        }
        Ok(())
    }

    /// Loads credentials saved by [`Credentials::save`]; `None` if the device has not
    /// enrolled yet.
    pub fn load(dir: &Path) -> Result<Option<Credentials>, Error> {
        let meta_path = dir.join("identity.json");
        if !meta_path.exists() {
            return Ok(None);
        }
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read_to_string(&p).map_err(|source| Error::Io { path: p, source })
        };
        let mut c: Credentials = serde_json::from_str(&read("identity.json")?)
            .map_err(|e| Error::BadFile { path: meta_path.clone(), reason: e.to_string() })?;
        c.key_pem = read("device.key")?;
        c.chain_pem = read("device.pem")?;
        c.root_pem = read("fleet-root.pem")?;
        Ok(Some(c))
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| Error::Io { path: path.to_owned(), source };
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}
