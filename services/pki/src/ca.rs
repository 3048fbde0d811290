//! The fleet CA: files, creation, rotation and issuing.
//!
//! Layout of `{data dir}/pki/` (keys 0600, the directory 0700):
//!
//! | file | what |
//! |---|---|
//! | `root.pem`, `root.key` | self-signed fleet root (20 years); pinned by every device |
//! | `devices.pem`, `devices.key` | intermediate that signs device certificates (5 years) |
//! | `devices-bundle.pem` | every device intermediate whose certificates may still be valid: what the broker accepts client certificates from |
//! | `server.pem`, `server.key` | the server's TLS certificate (leaf then root), for MQTT, gRPC and HTTPS |
//!
//! All keys are ECDSA P-256: every TLS stack a device or operator may use speaks it.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData,
    SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer};
use time::OffsetDateTime;

use crate::{Error, Result, fingerprint};

const ROOT_VALIDITY: Duration = Duration::from_secs(20 * 365 * 86_400);
const INTERMEDIATE_VALIDITY: Duration = Duration::from_secs(5 * 365 * 86_400);
const SERVER_VALIDITY: Duration = Duration::from_secs(365 * 86_400);
/// A server certificate this close to its end is replaced at start.
const SERVER_RENEW_BEFORE: Duration = Duration::from_secs(30 * 86_400);
/// Certificates start this far in the past: a device clock a little behind the
/// server's must not see a certificate that is not valid yet.
const BACKDATE: Duration = Duration::from_secs(300);

/// Who a device certificate is for. Comes from the enrollment token (or the current
/// certificate, on renewal), never from the CSR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceIdentity {
    pub device_id: String,
    pub site_id: String,
}

/// An issued device certificate.
#[derive(Debug, Clone)]
pub struct DeviceCert {
    /// PEM: the device certificate then the device intermediate.
    pub chain_pem: String,
    /// Lowercase hex without leading zeros (as TLS stacks print it).
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// Host names and addresses the server certificate is valid for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerNames(pub Vec<String>);

impl Default for ServerNames {
    fn default() -> Self {
        ServerNames(vec!["localhost".into(), "127.0.0.1".into(), "::1".into()])
    }
}

/// One certificate, for `nanofleet ca show`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertSummary {
    pub subject: String,
    pub serial: String,
    pub not_before: String,
    pub not_after: String,
    pub fingerprint_sha256: String,
}

/// The CA as an operator sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CaSummary {
    pub dir: PathBuf,
    pub root: CertSummary,
    pub devices: Vec<CertSummary>,
    pub server: CertSummary,
    pub server_names: Vec<String>,
}

struct Authority {
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

/// The fleet CA, loaded from (or created in) its directory.
pub struct FleetCa {
    dir: PathBuf,
    root: Authority,
    devices: Authority,
    /// Client CA bundle: current and earlier device intermediates.
    device_bundle: Vec<CertificateDer<'static>>,
    server_chain: Vec<CertificateDer<'static>>,
    server_key_pem: String,
}

impl std::fmt::Debug for FleetCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetCa")
            .field("dir", &self.dir)
            .field("root", &self.root_fingerprint())
            .finish_non_exhaustive()
    }
}

impl FleetCa {
    /// Loads the CA from `dir`, creating what is missing: a new root on first start, a
    /// device intermediate, and a server certificate for `names` (replaced when it
    /// nears its end or the names changed).
    pub fn load_or_create(dir: &Path, names: &ServerNames) -> Result<FleetCa> {
        create_private_dir(dir)?;
        let root_pem = dir.join("root.pem");
        let root_key = dir.join("root.key");
        if !root_pem.exists() {
            if root_key.exists() {
                return Err(Error::BadFile {
                    path: root_pem,
                    reason: "missing while root.key exists; restore it or remove both to start a new CA"
                        .into(),
                });
            }
            let key = new_key()?;
            let mut params = ca_params("Nanofleet fleet root", ROOT_VALIDITY, None);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let cert = params.self_signed(&key)?;
            write_private(&root_key, key.serialize_pem().as_bytes())?;
            write_public(&root_pem, cert.pem().as_bytes())?;
            tracing::info!(fingerprint = %fingerprint(cert.der()), dir = %dir.display(), "fleet root CA created");
        }
        let root = load_authority(&root_pem, &root_key)?;

        let dev_pem = dir.join("devices.pem");
        let dev_key = dir.join("devices.key");
        if !dev_pem.exists() {
            new_device_intermediate(dir, &root)?;
        }
        let devices = load_authority(&dev_pem, &dev_key)?;
        let bundle_path = dir.join("devices-bundle.pem");
        if !bundle_path.exists() {
            write_public(&bundle_path, cert_pem(&devices.cert).as_bytes())?;
        }
        let device_bundle = read_certs(&bundle_path)?;

        let mut ca = FleetCa {
            dir: dir.to_owned(),
            root,
            devices,
            device_bundle,
            server_chain: Vec::new(),
            server_key_pem: String::new(),
        };
        ca.ensure_server_cert(names)?;
        Ok(ca)
    }

    /// Loads an existing CA as it is, writing nothing (for `nanofleet ca show`).
    pub fn open(dir: &Path) -> Result<FleetCa> {
        let root = load_authority(&dir.join("root.pem"), &dir.join("root.key"))?;
        let devices = load_authority(&dir.join("devices.pem"), &dir.join("devices.key"))?;
        let device_bundle = read_certs(&dir.join("devices-bundle.pem"))?;
        let server_key_path = dir.join("server.key");
        check_private(&server_key_path)?;
        Ok(FleetCa {
            dir: dir.to_owned(),
            root,
            devices,
            device_bundle,
            server_chain: read_certs(&dir.join("server.pem"))?,
            server_key_pem: read_text(&server_key_path)?,
        })
    }

    /// The names the current server certificate is valid for.
    pub fn server_names(&self) -> ServerNames {
        ServerNames(self.server_chain.first().map(san_names).unwrap_or_default())
    }

    /// Installs an existing root (certificate and key, PEM) into an empty CA directory,
    /// for a fleet whose root is kept by the organisation's own PKI.
    pub fn import_root(dir: &Path, root_cert_pem: &str, key_pem: &str) -> Result<()> {
        create_private_dir(dir)?;
        let root_pem = dir.join("root.pem");
        if root_pem.exists() {
            return Err(Error::BadFile { path: root_pem, reason: "a root CA exists already".into() });
        }
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| Error::Invalid(format!("root key: not a PEM private key ({e})")))?;
        let cert = CertificateDer::from_pem_slice(root_cert_pem.as_bytes())
            .map_err(|e| Error::Invalid(format!("root certificate: not a PEM certificate ({e})")))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert)
            .map_err(|e| Error::Invalid(format!("root certificate: {e}")))?;
        if !parsed.is_ca() {
            return Err(Error::Invalid(
                "root certificate: not a CA certificate (basic constraints cA is false)".into(),
            ));
        }
        if parsed.public_key().raw != key.subject_public_key_info() {
            return Err(Error::Invalid("root key does not belong to the root certificate".into()));
        }
        write_private(&dir.join("root.key"), key_pem.as_bytes())?;
        write_public(&root_pem, cert_pem(&cert).as_bytes())?;
        Ok(())
    }

    /// Replaces the device intermediate and the server certificate (for the names the
    /// current one has). The old intermediate stays in the client CA bundle, so devices
    /// keep connecting with the certificates it issued until they renew.
    pub fn rotate(&mut self) -> Result<()> {
        let names = self.server_names();
        let old = self.devices.cert.clone();
        new_device_intermediate(&self.dir, &self.root)?;
        self.devices = load_authority(&self.dir.join("devices.pem"), &self.dir.join("devices.key"))?;
        let now = SystemTime::now();
        let mut bundle = vec![self.devices.cert.clone()];
        for c in self.device_bundle.iter().chain(std::iter::once(&old)) {
            let still_valid = cert_summary_times(c).is_some_and(|(_, end)| end > now);
            if still_valid && !bundle.contains(c) {
                bundle.push(c.clone());
            }
        }
        let text: String = bundle.iter().map(cert_pem).collect();
        write_public(&self.dir.join("devices-bundle.pem"), text.as_bytes())?;
        self.device_bundle = bundle;
        self.issue_server_cert(&names)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn root_cert(&self) -> &CertificateDer<'static> {
        &self.root.cert
    }

    pub fn root_pem(&self) -> String {
        cert_pem(&self.root.cert)
    }

    pub fn root_fingerprint(&self) -> String {
        fingerprint(&self.root.cert)
    }

    /// Path of the root certificate, for clients on this machine.
    pub fn root_path(&self) -> PathBuf {
        self.dir.join("root.pem")
    }

    /// Intermediates a device client certificate may chain to.
    pub fn device_client_roots(&self) -> &[CertificateDer<'static>] {
        &self.device_bundle
    }

    pub fn device_bundle_path(&self) -> PathBuf {
        self.dir.join("devices-bundle.pem")
    }

    /// The server's certificate chain (leaf, root).
    pub fn server_chain(&self) -> &[CertificateDer<'static>] {
        &self.server_chain
    }

    pub fn server_chain_pem(&self) -> String {
        self.server_chain.iter().map(cert_pem).collect()
    }

    pub fn server_key_pem(&self) -> &str {
        &self.server_key_pem
    }

    pub fn server_key(&self) -> Result<PrivateKeyDer<'static>> {
        PrivateKeyDer::from_pem_slice(self.server_key_pem.as_bytes())
            .map_err(|e| Error::BadFile { path: self.dir.join("server.key"), reason: e.to_string() })
    }

    pub fn server_cert_path(&self) -> PathBuf {
        self.dir.join("server.pem")
    }

    pub fn server_key_path(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    /// The identity of `der` if it is a device certificate this fleet issued (it chains
    /// to a device intermediate) and was valid at `at_unix_ms`: how a record a device
    /// signed is traced back to that device, also after the certificate was renewed.
    pub fn verify_device_cert(
        &self,
        der: &[u8],
        at_unix_ms: i64,
    ) -> std::result::Result<DeviceIdentity, String> {
        verify_device_cert(self.device_client_roots(), der, at_unix_ms)
    }

    /// Signs a device certificate valid for `validity` from now. The CSR must be
    /// well-formed and signed by the key it carries (proof of possession); its subject
    /// and extensions are ignored: the identity is `who`.
    pub fn issue_device_cert(
        &self,
        csr_der: &[u8],
        who: &DeviceIdentity,
        validity: Duration,
    ) -> Result<DeviceCert> {
        let csr = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
            .map_err(|e| {
                Error::BadCsr(match e {
                    rcgen::Error::InvalidCertificationRequestSignature => {
                        "its signature does not verify with the public key it carries (no proof of possession)"
                            .into()
                    }
                    rcgen::Error::CouldNotParseCertificationRequest => {
                        "not a DER PKCS#10 certificate signing request".into()
                    }
                    other => other.to_string(),
                })
            })?;
        let now = SystemTime::now();
        let not_before = now - BACKDATE;
        let not_after = now + validity;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Nanofleet devices");
        dn.push(DnType::OrganizationalUnitName, who.site_id.as_str());
        dn.push(DnType::CommonName, who.device_id.as_str());
        params.distinguished_name = dn;
        params.not_before = OffsetDateTime::from(not_before);
        params.not_after = OffsetDateTime::from(not_after);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let serial = random_serial();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let cert = params.signed_by(&csr.public_key, &self.devices.issuer)?;
        Ok(DeviceCert {
            chain_pem: format!("{}{}", cert.pem(), cert_pem(&self.devices.cert)),
            serial: serial_hex(&serial),
            not_before,
            not_after,
        })
    }

    /// What `nanofleet ca show` prints.
    pub fn summary(&self, names: &ServerNames) -> CaSummary {
        CaSummary {
            dir: self.dir.clone(),
            root: cert_summary(&self.root.cert),
            devices: self.device_bundle.iter().map(cert_summary).collect(),
            server: cert_summary(&self.server_chain[0]),
            server_names: names.0.clone(),
        }
    }

    fn ensure_server_cert(&mut self, names: &ServerNames) -> Result<()> {
        let cert_path = self.server_cert_path();
        let key_path = self.server_key_path();
        if cert_path.exists() && key_path.exists() {
            let chain = read_certs(&cert_path)?;
            let key_pem = read_text(&key_path)?;
            let fresh = chain.first().is_some_and(|leaf| {
                let ends_late = cert_summary_times(leaf)
                    .is_some_and(|(_, end)| end > SystemTime::now() + SERVER_RENEW_BEFORE);
                ends_late && chain.get(1) == Some(&self.root.cert) && san_names(leaf) == names.0
            });
            if fresh {
                self.server_chain = chain;
                self.server_key_pem = key_pem;
                return Ok(());
            }
        }
        self.issue_server_cert(names)
    }

    fn issue_server_cert(&mut self, names: &ServerNames) -> Result<()> {
        let key = new_key()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Nanofleet");
        dn.push(DnType::CommonName, "Nanofleet server");
        params.distinguished_name = dn;
        for n in &names.0 {
            params.subject_alt_names.push(match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(n.clone().try_into().map_err(|_| {
                    Error::Invalid(format!("server name {n:?} is not a DNS name or IP address"))
                })?),
            });
        }
        let now = SystemTime::now();
        params.not_before = OffsetDateTime::from(now - BACKDATE);
        params.not_after = OffsetDateTime::from(now + SERVER_VALIDITY);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
        let cert = params.signed_by(&key, &self.root.issuer)?;
        let chain = vec![cert.der().clone(), self.root.cert.clone()];
        let key_pem = key.serialize_pem();
        write_private(&self.server_key_path(), key_pem.as_bytes())?;
        write_public(&self.server_cert_path(), chain.iter().map(cert_pem).collect::<String>().as_bytes())?;
        self.server_chain = chain;
        self.server_key_pem = key_pem;
        tracing::info!(names = ?names.0, "server TLS certificate issued");
        Ok(())
    }
}

fn new_key() -> Result<KeyPair> {
    Ok(KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?)
}

fn ca_params(cn: &str, validity: Duration, path_len: Option<u8>) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Nanofleet");
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    let now = SystemTime::now();
    params.not_before = OffsetDateTime::from(now - BACKDATE);
    params.not_after = OffsetDateTime::from(now + validity);
    params.is_ca = match path_len {
        Some(n) => IsCa::Ca(BasicConstraints::Constrained(n)),
        None => IsCa::Ca(BasicConstraints::Unconstrained),
    };
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
    params
}

fn new_device_intermediate(dir: &Path, root: &Authority) -> Result<()> {
    let key = new_key()?;
    let stamp = OffsetDateTime::now_utc().unix_timestamp();
    let mut params = ca_params(&format!("Nanofleet devices {stamp}"), INTERMEDIATE_VALIDITY, Some(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    // Client certificates only: a server certificate under this intermediate (its key
    // leaked) is refused by verifiers that check usage along the chain.
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &root.issuer)?;
    write_private(&dir.join("devices.key"), key.serialize_pem().as_bytes())?;
    write_public(&dir.join("devices.pem"), cert.pem().as_bytes())?;
    tracing::info!(dir = %dir.display(), "device intermediate CA created");
    Ok(())
}

fn load_authority(cert_path: &Path, key_path: &Path) -> Result<Authority> {
    let cert = read_certs(cert_path)?.into_iter().next().ok_or_else(|| Error::BadFile {
        path: cert_path.to_owned(),
        reason: "holds no certificate".into(),
    })?;
    check_private(key_path)?;
    let key = KeyPair::from_pem(&read_text(key_path)?).map_err(|e| Error::BadFile {
        path: key_path.to_owned(),
        reason: format!("not a PEM private key: {e}"),
    })?;
    let issuer = Issuer::from_ca_cert_der(&cert, key)
        .map_err(|e| Error::BadFile { path: cert_path.to_owned(), reason: e.to_string() })?;
    Ok(Authority { cert, issuer })
}

/// 16 random bytes, positive and without a leading zero byte.
fn random_serial() -> [u8; 16] {
    let mut s: [u8; 16] = rand::random();
    s[0] = (s[0] & 0x7f) | 0x01;
    s
}

/// The identity of `der` if it chains to one of `intermediates` (a fleet's device
/// intermediates, as in `devices-bundle.pem`) and was valid at `at_unix_ms`.
pub fn verify_device_cert(
    intermediates: &[CertificateDer<'static>],
    der: &[u8],
    at_unix_ms: i64,
) -> std::result::Result<DeviceIdentity, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in intermediates {
        roots.add(c.clone()).map_err(|e| format!("device intermediate: {e}"))?;
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), crate::crypto_provider())
            .build()
            .map_err(|e| format!("device certificate verifier: {e}"))?;
    let at = rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_millis(
        u64::try_from(at_unix_ms).unwrap_or(0),
    ));
    let cert = CertificateDer::from(der.to_vec());
    verifier
        .verify_client_cert(&cert, &[], at)
        .map_err(|e| format!("the certificate is not a device certificate of this fleet: {e}"))?;
    device_identity_of(der).map(|(who, _)| who).ok_or_else(|| "the certificate names no device".to_owned())
}

/// The identity and serial a (verified) device certificate carries.
pub fn device_identity_of(der: &[u8]) -> Option<(DeviceIdentity, String)> {
    let (_, c) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = c.subject().iter_common_name().next()?.as_str().ok()?.to_owned();
    let ou = c.subject().iter_organizational_unit().next().and_then(|o| o.as_str().ok()).unwrap_or_default();
    Some((DeviceIdentity { device_id: cn, site_id: ou.to_owned() }, c.serial.to_str_radix(16)))
}

/// A serial number as TLS stacks print it: lowercase hex, no leading zeros.
pub fn serial_hex(bytes: &[u8]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let trimmed = hex.trim_start_matches('0');
    if trimmed.is_empty() { "0".into() } else { trimmed.into() }
}

pub fn cert_summary(der: &CertificateDer<'_>) -> CertSummary {
    let fp = fingerprint(der);
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, c)) => CertSummary {
            subject: c.subject().to_string(),
            serial: c.raw_serial_as_string().replace(':', ""),
            not_before: c.validity().not_before.to_string(),
            not_after: c.validity().not_after.to_string(),
            fingerprint_sha256: fp,
        },
        Err(e) => CertSummary {
            subject: format!("(unreadable: {e})"),
            serial: String::new(),
            not_before: String::new(),
            not_after: String::new(),
            fingerprint_sha256: fp,
        },
    }
}

fn cert_summary_times(der: &CertificateDer<'_>) -> Option<(SystemTime, SystemTime)> {
    let (_, c) = x509_parser::parse_x509_certificate(der).ok()?;
    let to_sys = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
    Some((to_sys(c.validity().not_before.timestamp()), to_sys(c.validity().not_after.timestamp())))
}

fn san_names(der: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, c)) = x509_parser::parse_x509_certificate(der) else { return Vec::new() };
    let Ok(Some(san)) = c.subject_alternative_name() else { return Vec::new() };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some((*d).to_owned()),
            GeneralName::IPAddress(b) => match b.len() {
                4 => <[u8; 4]>::try_from(*b).ok().map(|a| std::net::IpAddr::from(a).to_string()),
                16 => <[u8; 16]>::try_from(*b).ok().map(|a| std::net::IpAddr::from(a).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// A certificate as PEM text.
pub fn cert_pem(der: &CertificateDer<'_>) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn read_text(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_owned(), source })
}

pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let text = read_text(path)?;
    let certs =
        CertificateDer::pem_slice_iter(text.as_bytes()).collect::<std::result::Result<Vec<_>, _>>().map_err(
            |e| Error::BadFile { path: path.to_owned(), reason: format!("not PEM certificates: {e}") },
        )?;
    if certs.is_empty() {
        return Err(Error::BadFile { path: path.to_owned(), reason: "holds no certificate".into() });
    }
    Ok(certs)
}

fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    let io = |source| Error::Io { path: dir.to_owned(), source };
    if !dir.exists() {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io)
}

/// A key file must be readable by its owner only; a wider one was exposed.
pub fn check_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = fs::metadata(path).map_err(|source| Error::Io { path: path.to_owned(), source })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::BadFile {
            path: path.to_owned(),
            reason: format!("permissions {mode:o} let others read a private key; chmod 600 it"),
        });
    }
    Ok(())
}

/// Writes a file readable by its owner only, atomically (temporary file, fsync, rename).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, bytes, 0o600)
}

fn write_public(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, bytes, 0o644)
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| Error::Io { path: path.to_owned(), source };
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)?;
    if let Some(parent) = path.parent() {
        fs::File::open(parent).and_then(|d| d.sync_all()).map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr(key: &KeyPair, cn: &str) -> Vec<u8> {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.serialize_request(key).unwrap().der().to_vec()
    }

    #[test]
    fn a_new_ca_is_created_once_with_private_keys() {
        crate::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        let a = FleetCa::load_or_create(&pki, &ServerNames::default()).unwrap();
        let b = FleetCa::load_or_create(&pki, &ServerNames::default()).unwrap();
        assert_eq!(a.root_fingerprint(), b.root_fingerprint());
        assert_eq!(a.server_chain(), b.server_chain(), "a fresh server cert is kept");
        use std::os::unix::fs::PermissionsExt as _;
        for key in ["root.key", "devices.key", "server.key"] {
            let mode = fs::metadata(pki.join(key)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{key}");
        }
        fs::set_permissions(pki.join("root.key"), fs::Permissions::from_mode(0o644)).unwrap();
        let err = FleetCa::load_or_create(&pki, &ServerNames::default()).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn the_identity_comes_from_the_caller_not_the_csr() {
        crate::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let ca = FleetCa::load_or_create(dir.path(), &ServerNames::default()).unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let who = DeviceIdentity { device_id: "NF-A-01".into(), site_id: "site-a".into() };
        let cert = ca.issue_device_cert(&csr(&key, "NF-OTHER-99"), &who, Duration::from_secs(3600)).unwrap();
        let der = CertificateDer::from_pem_slice(cert.chain_pem.as_bytes()).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        let cn: Vec<_> =
            parsed.subject().iter_common_name().map(|c| c.as_str().unwrap().to_owned()).collect();
        assert_eq!(cn, ["NF-A-01"]);
        assert!(!parsed.is_ca());
        assert_eq!(parsed.serial.to_str_radix(16), cert.serial);
    }

    #[test]
    fn a_csr_with_a_broken_signature_is_refused() {
        crate::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let ca = FleetCa::load_or_create(dir.path(), &ServerNames::default()).unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut der = csr(&key, "x");
        let last = der.len() - 3;
        der[last] ^= 0x55;
        let who = DeviceIdentity { device_id: "NF-A-01".into(), site_id: "site-a".into() };
        let err = ca.issue_device_cert(&der, &who, Duration::from_secs(60)).unwrap_err();
        assert!(
            err.to_string().contains("proof of possession") || err.to_string().contains("PKCS#10"),
            "{err}"
        );
        let err = ca.issue_device_cert(b"garbage", &who, Duration::from_secs(60)).unwrap_err();
        assert!(err.to_string().contains("PKCS#10"), "{err}");
    }

    #[test]
    fn rotation_keeps_the_old_intermediate_trusted() {
        crate::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let names = ServerNames(vec!["fleet.example.org".into(), "10.0.0.5".into()]);
        let mut ca = FleetCa::load_or_create(dir.path(), &names).unwrap();
        let old = ca.device_client_roots()[0].clone();
        let old_server = ca.server_chain()[0].clone();
        ca.rotate().unwrap();
        assert_ne!(ca.server_chain()[0], old_server);
        assert_eq!(ca.server_names(), names, "the new server certificate keeps the names");
        let shown = FleetCa::open(dir.path()).unwrap();
        assert_eq!(shown.server_chain(), ca.server_chain(), "opening writes nothing");
        assert_eq!(ca.device_client_roots().len(), 2);
        assert_ne!(ca.device_client_roots()[0], old);
        assert!(ca.device_client_roots().contains(&old));
        let reloaded = FleetCa::load_or_create(dir.path(), &names).unwrap();
        assert_eq!(reloaded.device_client_roots(), ca.device_client_roots());
    }

    #[test]
    fn an_imported_root_signs_the_new_intermediate_and_a_bad_pair_is_refused() {
        crate::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = ca_params("Hospital Group Root", ROOT_VALIDITY, None);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        // A key that does not belong to the certificate.
        let other = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let err = FleetCa::import_root(dir.path(), &cert.pem(), &other.serialize_pem()).unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");
        FleetCa::import_root(dir.path(), &cert.pem(), &key.serialize_pem()).unwrap();
        let ca = FleetCa::load_or_create(dir.path(), &ServerNames::default()).unwrap();
        assert_eq!(ca.root_fingerprint(), fingerprint(cert.der()));
        // Importing over an existing root is refused.
        assert!(FleetCa::import_root(dir.path(), &cert.pem(), &key.serialize_pem()).is_err());
    }

    #[test]
    fn the_device_intermediate_cannot_vouch_for_a_server() {
        use rustls::client::danger::ServerCertVerifier as _;
        crate::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let ca = FleetCa::load_or_create(dir.path(), &ServerNames::default()).unwrap();
        let devices =
            load_authority(&dir.path().join("devices.pem"), &dir.path().join("devices.key")).unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let forged = params.signed_by(&key, &devices.issuer).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.root_cert().clone()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.into(),
            crate::crypto_provider(),
        )
        .build()
        .unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let now = rustls::pki_types::UnixTime::now();
        let intermediates = [devices.cert.clone()];
        assert!(verifier.verify_server_cert(forged.der(), &intermediates, &name, &[], now).is_err());
        // The real server certificate verifies.
        let chain = ca.server_chain();
        assert!(verifier.verify_server_cert(&chain[0], &[], &name, &[], now).is_ok());
    }

    #[test]
    fn serials_print_like_tls_stacks() {
        assert_eq!(serial_hex(&[0x00, 0x0a, 0xff]), "aff");
        assert_eq!(serial_hex(&[0, 0]), "0");
    }
}
