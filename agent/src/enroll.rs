//! Device identity: enrollment with a token, the credentials on disk, renewal.
//!
//! The key is generated here and never leaves the device: the server receives a CSR
//! and returns a certificate whose identity (device id, site) it takes from the token.
//! On first contact the device has no certificate and no CA: it trusts the server only
//! if the server's chain holds the fleet root named by the token (its fingerprint).
//! From then on it pins that root.
//!
//! Files in the device's identity directory (`identity/` under its state directory,
//! 0700; every file 0600): `device.key`, `device.pem` (certificate and intermediate),
//! `fleet-root.pem`, `identity.json` (device id, site, certificate issue and end, server
//! addresses). A renewal replaces them as one set (see [`Credentials::save`]).
//!
//! While the device runs, [`keep_renewed`] renews the certificate two thirds into its
//! life and hands the new TLS configuration to the MQTT link.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use nanofleet_pki::{EnrollToken, tls};
use nanofleet_proto::v1 as pb;
use nanofleet_proto::v1::enrollment_service_client::EnrollmentServiceClient;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};

/// Enrollment and credential errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Token(#[from] nanofleet_pki::TokenError),
    /// The server could not be reached (or the TLS handshake failed); worth retrying.
    #[error("{0}")]
    Connect(String),
    /// The server answered no; retrying soon will not change its mind.
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
    /// When this device received the certificate (its own clock), ms since the Unix
    /// epoch; renewal is due two thirds of the way from here to `not_after_ms`. Zero in
    /// files written before it was recorded: such a certificate is renewed at once.
    /// (The certificate's notBefore is back-dated by the CA for clock skew, so it does
    /// not tell when the life began.)
    #[serde(default)]
    pub issued_ms: i64,
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
    /// The fleet's trust root (signed JSON) pinned at enrollment: signing keys per role
    /// for recipes, deny lists and firmware. Empty in files written before it existed.
    #[serde(skip)]
    pub trust_root_json: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("device_id", &self.device_id)
            .field("site_id", &self.site_id)
            .field("issued_ms", &self.issued_ms)
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

/// Where a device keeps its credentials, under its state directory.
pub fn identity_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("identity")
}

/// A gRPC status as this module's error: transport trouble is worth retrying, an
/// answer is a refusal.
fn status_error(server: &str, s: tonic::Status) -> Error {
    use tonic::Code;
    match s.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
            Error::Connect(format!("cannot reach {server}: {}", s.message()))
        }
        _ => Error::Refused(s.message().to_owned()),
    }
}

/// Enrolls with `token` at `server` (`https://host:port`).
pub async fn enroll(
    server: &str,
    token: &str,
    model: &str,
    hardware_serial: &str,
) -> Result<Credentials, Error> {
    let parsed = EnrollToken::parse(token)?;
    let issued_ms = now_ms();
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
        .map_err(|s| status_error(server, s))?
        .into_inner();
    // The root the server sent must be the one the token named.
    let root = tls::certs_from_pem("fleet root from the server", &resp.root_ca_pem)?;
    if root.first().map(|c| nanofleet_pki::fingerprint(c)) != Some(parsed.root_fingerprint.clone()) {
        return Err(Error::Refused("the server sent a fleet root other than the one the token names".into()));
    }
    // The trust root must be signed by its own root keys before it is pinned.
    nanofleet_pki::trust_root::TrustRoot::from_json(&resp.trust_root_json)
        .and_then(|r| r.verify_self_signed())
        .map_err(|e| Error::Refused(format!("the server's trust root cannot be pinned: {e}")))?;
    let mqtt_address = if resp.mqtt_address.is_empty() { default_mqtt(server) } else { resp.mqtt_address };
    Ok(Credentials {
        device_id: resp.device_id,
        site_id: resp.site_id,
        issued_ms,
        not_after_ms: resp.not_after_unix_ms,
        server: server.into(),
        mqtt_address,
        key_pem: key.serialize_pem(),
        chain_pem: resp.certificate_chain_pem,
        root_pem: resp.root_ca_pem,
        trust_root_json: resp.trust_root_json,
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
        let issued_ms = now_ms();
        let (key, csr_der) = key_and_csr(&self.device_id)?;
        let channel =
            tls::connect_channel(&self.server, self.client_config()?).await.map_err(Error::Connect)?;
        let resp = EnrollmentServiceClient::new(channel)
            .renew(pb::RenewRequest { csr_der })
            .await
            .map_err(|s| status_error(&self.server, s))?
            .into_inner();
        Ok(Credentials {
            issued_ms,
            not_after_ms: resp.not_after_unix_ms,
            key_pem: key.serialize_pem(),
            chain_pem: resp.certificate_chain_pem,
            ..self.clone()
        })
    }

    /// Time until renewal is due: two thirds into the certificate's life, as seen
    /// from `now`; zero if overdue.
    pub fn renew_in(&self, issued_ms: i64) -> Duration {
        Duration::from_millis(u64::try_from(self.renew_due_ms(issued_ms) - now_ms()).unwrap_or(0))
    }

    /// When renewal is due, ms since the Unix epoch: two thirds of the way from
    /// `issued_ms` to the end of the certificate.
    pub fn renew_due_ms(&self, issued_ms: i64) -> i64 {
        issued_ms + (self.not_after_ms - issued_ms).max(0) * 2 / 3
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

    /// Saves the credentials in `dir` (created 0700), each file 0600. The set is
    /// replaced as a whole: the new files are staged beside the current ones and moved
    /// in with `identity.json` last, so a staged `identity.json` means a complete set,
    /// which [`Credentials::load`] finishes moving in after a crash. A key never meets a
    /// certificate that is not its own.
    pub fn save(&self, dir: &Path) -> Result<(), Error> {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| Error::Io { path: dir.to_owned(), source })?;
        let meta = serde_json::to_vec_pretty(self).unwrap_or_default();
        let contents: [&[u8]; 5] = [
            self.key_pem.as_bytes(),
            self.chain_pem.as_bytes(),
            self.root_pem.as_bytes(),
            self.trust_root_json.as_bytes(),
            &meta,
        ];
        for (name, bytes) in FILES.iter().zip(contents) {
            nanofleet_pki::write_private(&staged(dir, name), bytes)?;
        }
        commit(dir)
    }

    /// Loads credentials saved by [`Credentials::save`]; `None` if the device has not
    /// enrolled yet.
    pub fn load(dir: &Path) -> Result<Option<Credentials>, Error> {
        if staged(dir, META).exists() {
            commit(dir)?;
        }
        let meta_path = dir.join(META);
        if !meta_path.exists() {
            return Ok(None);
        }
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read_to_string(&p).map_err(|source| Error::Io { path: p, source })
        };
        let mut c: Credentials = serde_json::from_str(&read(META)?)
            .map_err(|e| Error::BadFile { path: meta_path.clone(), reason: e.to_string() })?;
        c.key_pem = read("device.key")?;
        c.chain_pem = read("device.pem")?;
        c.root_pem = read("fleet-root.pem")?;
        c.trust_root_json = read("trust-root.json").unwrap_or_default();
        Ok(Some(c))
    }
}

/// The credential files, in the order they are moved in: the metadata last.
const FILES: [&str; 5] = ["device.key", "device.pem", "fleet-root.pem", "trust-root.json", META];
const META: &str = "identity.json";

fn staged(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.new"))
}

/// Moves a staged set in (what is left of it after an interrupted move).
fn commit(dir: &Path) -> Result<(), Error> {
    for name in FILES {
        let from = staged(dir, name);
        if from.exists() {
            let to = dir.join(name);
            std::fs::rename(&from, &to).map_err(|source| Error::Io { path: to, source })?;
        }
    }
    // The renames themselves must survive a power cut.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| Error::Io { path: dir.to_owned(), source })
}

// === Renewal ===

/// Longest wait between two renewal attempts.
pub const RENEW_RETRY_MAX: Duration = Duration::from_secs(600);

/// Longest a renewal attempt may take before it counts as failed.
const RENEW_TIMEOUT: Duration = Duration::from_secs(60);

/// The wait after `failures` (from 1) renewal attempts failed in a row: doubling from
/// 1 s up to [`RENEW_RETRY_MAX`]; after a refusal the longest at once, since asking
/// again soon will not change the server's answer.
pub fn renew_retry_delay(failures: u32, refused: bool) -> Duration {
    if refused {
        return RENEW_RETRY_MAX;
    }
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(16)).min(RENEW_RETRY_MAX)
}

/// Keeps `creds` renewed until `cancel` fires. Two thirds into each certificate's life
/// it renews, saves the new set in `dir` (when given) and sends its TLS configuration
/// to `updates`, which the MQTT link switches to at once (see
/// [`crate::link::LinkOptions::tls_updates`]).
///
/// Failures are logged and retried with backoff for as long as it runs, also past the
/// certificate's end: the device's own clock may be what is wrong. A refusal (the
/// device was decommissioned or replaced) and an expired certificate are logged as
/// errors that say what would help.
pub async fn keep_renewed(
    mut creds: Credentials,
    dir: Option<PathBuf>,
    updates: watch::Sender<Arc<rustls::ClientConfig>>,
    signer: Option<crate::runs::SharedSigner>,
    cancel: CancellationToken,
) {
    loop {
        let wait = creds.renew_in(creds.issued_ms);
        tracing::debug!(device_id = %creds.device_id, renew_in_s = wait.as_secs(), "certificate renewal scheduled");
        if !sleep_unless_cancelled(wait, &cancel).await {
            return;
        }
        let mut failures = 0u32;
        creds = loop {
            let attempt = tokio::select! {
                r = tokio::time::timeout(RENEW_TIMEOUT, creds.renew()) => r.unwrap_or_else(|_| {
                    Err(Error::Connect(format!("{}: no answer within {RENEW_TIMEOUT:?}", creds.server)))
                }),
                _ = cancel.cancelled() => return,
            };
            let e = match attempt {
                Ok(new) => break new,
                Err(e) => e,
            };
            failures += 1;
            let refused = matches!(e, Error::Refused(_));
            let retry = renew_retry_delay(failures, refused);
            let retry_in_s = retry.as_secs();
            let device_id = &creds.device_id;
            if refused {
                tracing::error!(
                    %device_id, error = %e, retry_in_s,
                    "the server refuses to renew this device's certificate (decommissioned or replaced?); only a new enrollment token brings it back"
                );
            } else if now_ms() >= creds.not_after_ms {
                tracing::error!(
                    %device_id, error = %e, retry_in_s, not_after = %format_ms(creds.not_after_ms),
                    "the device certificate has expired and the server no longer accepts it for renewal; hospital IT must replace it (nanofleet devices replace ID gives a token for nanofleet-agent enroll --force) unless this clock is wrong"
                );
            } else {
                tracing::warn!(
                    %device_id, error = %e, failures, retry_in_s, not_after = %format_ms(creds.not_after_ms),
                    "certificate renewal failed, will retry"
                );
            }
            if !sleep_unless_cancelled(retry, &cancel).await {
                return;
            }
        };
        if let Some(dir) = &dir
            && let Err(e) = creds.save(dir)
        {
            tracing::error!(
                device_id = %creds.device_id, error = %e,
                "renewed certificate not saved: it is used until the agent stops, then the previous one"
            );
        }
        if let Some(signer) = &signer {
            match crate::runs::BatchSigner::from_credentials(&creds) {
                Ok(new) => *signer.lock().unwrap_or_else(|p| p.into_inner()) = new,
                Err(e) => {
                    tracing::error!(device_id = %creds.device_id, error = %e, "renewed key cannot sign batch records")
                }
            }
        }
        match creds.client_config_arc() {
            Ok(config) => {
                updates.send_replace(config);
            }
            Err(e) => {
                tracing::error!(device_id = %creds.device_id, error = %e, "renewed certificate unusable");
            }
        }
        tracing::info!(device_id = %creds.device_id, not_after = %format_ms(creds.not_after_ms), "certificate renewed");
    }
}

/// Sleeps for `wait`; false if `cancel` fired first.
async fn sleep_unless_cancelled(wait: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(wait) => true,
        _ = cancel.cancelled() => false,
    }
}

/// A time in ms since the Unix epoch as RFC 3339 (UTC, seconds).
pub fn format_ms(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(issued_ms: i64, not_after_ms: i64) -> Credentials {
        Credentials {
            device_id: "NF-TST-01".into(),
            site_id: "test-site".into(),
            issued_ms,
            not_after_ms,
            server: "https://127.0.0.1:7400".into(),
            mqtt_address: "127.0.0.1:8883".into(),
            key_pem: String::new(),
            chain_pem: String::new(),
            root_pem: String::new(),
            trust_root_json: String::new(),
        }
    }

    #[test]
    fn renewal_is_due_two_thirds_into_the_certificate_life() {
        assert_eq!(creds(0, 0).renew_due_ms(3_000), 3_000);
        assert_eq!(creds(0, 9_000).renew_due_ms(3_000), 7_000);
        // Seven days from a given issue time: due after four days and sixteen hours.
        let day = 86_400_000;
        assert_eq!(creds(0, 1_000 + 7 * day).renew_due_ms(1_000), 1_000 + 4 * day + 16 * 3_600_000);
    }

    #[test]
    fn a_certificate_that_ends_before_it_was_issued_is_due_at_once() {
        assert_eq!(creds(0, 1_000).renew_due_ms(5_000), 5_000);
    }

    #[test]
    fn renewal_retries_double_up_to_the_maximum_and_a_refusal_waits_longest() {
        let waits: Vec<u64> = (1..=12).map(|n| renew_retry_delay(n, false).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 600, 600]);
        assert_eq!(renew_retry_delay(u32::MAX, false), RENEW_RETRY_MAX);
        assert_eq!(renew_retry_delay(1, true), RENEW_RETRY_MAX);
    }
}
