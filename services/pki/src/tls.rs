//! rustls configurations, all on the process's one crypto provider.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::{Error, Result, crypto_provider, fingerprint};

/// A server configuration without client certificates (HTTPS for people, gRPC).
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig> {
    Ok(ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?)
}

/// A server configuration that asks for a client certificate and verifies one if
/// sent (against `client_roots`), but serves clients without one too: HTTPS for people
/// (sessions, tokens) and devices (their certificate) on one listener.
pub fn server_config_optional_client(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_roots: &[CertificateDer<'static>],
) -> Result<ServerConfig> {
    let mut store = RootCertStore::empty();
    for r in client_roots {
        store.add(r.clone())?;
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(store), crypto_provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| Error::Invalid(format!("client certificate verifier: {e}")))?;
    Ok(ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?)
}

/// A client configuration trusting `roots`, presenting `identity` (chain and key) if given.
pub fn client_config(
    roots: &[CertificateDer<'static>],
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<ClientConfig> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store.add(r.clone())?;
    }
    let builder = ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(store);
    Ok(match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    })
}

/// A client configuration for a device's first contact: it has no certificate yet, only
/// the fingerprint of the fleet root from its enrollment token. The server must send the
/// root in its chain; the connection proceeds only if a certificate there has that
/// fingerprint and the server's certificate verifies against it as usual.
pub fn pinned_client_config(root_fingerprint: &str) -> Result<ClientConfig> {
    let verifier = PinnedRoot { fingerprint: root_fingerprint.to_owned(), provider: crypto_provider() };
    Ok(ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

/// Reads PEM certificates.
pub fn certs_from_pem(what: &str, pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Invalid(format!("{what}: not PEM certificates ({e})")))?;
    if certs.is_empty() {
        return Err(Error::Invalid(format!("{what}: holds no certificate")));
    }
    Ok(certs)
}

/// Reads a PEM private key.
pub fn key_from_pem(what: &str, pem: &str) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| Error::Invalid(format!("{what}: not a PEM private key ({e})")))
}

/// Reads PEM certificates from a file.
pub fn certs_from_file(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>> {
    crate::ca::read_certs(path)
}

#[derive(Debug)]
struct PinnedRoot {
    fingerprint: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedRoot {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let Some(root) = intermediates.iter().find(|c| fingerprint(c) == self.fingerprint) else {
            return Err(rustls::Error::General(format!(
                "the server's certificate chain does not contain the fleet root {} named by the token",
                self.fingerprint
            )));
        };
        let mut store = RootCertStore::empty();
        store.add(root.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(store),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(feature = "grpc")]
pub use channel::connect_channel;

#[cfg(feature = "grpc")]
mod channel {
    use std::sync::Arc;

    use hyper_util::rt::TokioIo;
    use rustls::ClientConfig;
    use rustls::pki_types::ServerName;
    use tonic::transport::{Channel, Endpoint, Uri};

    /// A gRPC channel over TLS with exactly this rustls configuration (a pinned root, a
    /// client certificate), which tonic's own TLS settings cannot express.
    /// `address` is `https://host:port`.
    pub async fn connect_channel(address: &str, config: ClientConfig) -> Result<Channel, String> {
        let uri: Uri = address.parse().map_err(|e| format!("server address {address:?}: {e}"))?;
        if uri.scheme_str() != Some("https") {
            return Err(format!(
                "server address {address:?}: must start with https:// (the API is served over TLS)"
            ));
        }
        let host = uri.host().ok_or_else(|| format!("server address {address:?}: no host"))?.to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']').to_owned())
            .map_err(|e| format!("server address {address:?}: {e}"))?;
        let mut config = config;
        config.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        // The scheme tonic sees is plain: TLS is done here, below it.
        let endpoint = Endpoint::from_shared(format!("http://{host}:{port}"))
            .map_err(|e| format!("server address {address:?}: {e}"))?
            .connect_timeout(std::time::Duration::from_secs(10));
        let host_port = format!("{host}:{port}");
        endpoint
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let connector = connector.clone();
                let name = name.clone();
                let host_port = host_port.clone();
                async move {
                    let tcp =
                        tokio::net::TcpStream::connect(host_port.trim_start_matches('[').replace("]:", ":"))
                            .await?;
                    tcp.set_nodelay(true)?;
                    let tls = connector.connect(name, tcp).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(tls))
                }
            }))
            .await
            .map_err(|e| {
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg.push_str(": ");
                    msg.push_str(&s.to_string());
                    src = s.source();
                }
                format!("cannot reach {address}: {msg}")
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FleetCa, ServerNames};

    #[test]
    fn the_pinned_verifier_accepts_only_the_named_root() {
        crate::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let ca = FleetCa::load_or_create(dir.path(), &ServerNames::default()).unwrap();
        let other_dir = tempfile::tempdir().unwrap();
        let other = FleetCa::load_or_create(other_dir.path(), &ServerNames::default()).unwrap();
        let chain = ca.server_chain();
        let name = ServerName::try_from("localhost").unwrap();
        let now = UnixTime::now();
        let good = PinnedRoot { fingerprint: ca.root_fingerprint(), provider: crypto_provider() };
        assert!(good.verify_server_cert(&chain[0], &chain[1..], &name, &[], now).is_ok());
        let wrong = PinnedRoot { fingerprint: other.root_fingerprint(), provider: crypto_provider() };
        let err = wrong.verify_server_cert(&chain[0], &chain[1..], &name, &[], now).unwrap_err();
        assert!(err.to_string().contains("fleet root"), "{err}");
        // A chain that carries the right root but a leaf from another CA.
        let forged = [other.server_chain()[0].clone(), chain[1].clone()];
        assert!(good.verify_server_cert(&forged[0], &forged[1..], &name, &[], now).is_err());
    }
}
