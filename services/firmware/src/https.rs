//! A small HTTPS GET client for devices: TUF metadata through tough's [`Transport`],
//! and images with range requests, so a cut download resumes where it stopped.
//! One HTTP/1.1 connection per request, over rustls with the device's client
//! certificate and the fleet root.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use tough::{Transport, TransportError, TransportErrorKind, TransportStream};
use url::Url;

/// Largest metadata file fetched through [`Transport`].
const MAX_METADATA_BYTES: usize = 16 * 1024 * 1024;

/// An HTTPS client with one TLS configuration.
#[derive(Clone)]
pub struct Https {
    tls: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for Https {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Https").finish_non_exhaustive()
    }
}

/// Why a GET failed; `not_found` tells tough a file does not exist (the end of the
/// chain of roots).
#[derive(Debug, thiserror::Error)]
#[error("GET {url}: {reason}")]
pub struct GetError {
    pub url: String,
    pub reason: String,
    pub status: Option<u16>,
}

impl Https {
    pub fn new(config: Arc<rustls::ClientConfig>) -> Https {
        Https { tls: tokio_rustls::TlsConnector::from(config) }
    }

    /// GETs `url`; with `from`, only the bytes from that offset (`Range: bytes=N-`).
    /// Returns the response with its body unread; 200 and 206 only.
    pub async fn get(
        &self,
        url: &Url,
        from: Option<u64>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, GetError> {
        let err = |reason: String, status: Option<u16>| GetError { url: url.to_string(), reason, status };
        if url.scheme() != "https" {
            return Err(err("only https:// addresses are fetched".into(), None));
        }
        let host = url.host_str().ok_or_else(|| err("no host".into(), None))?;
        let port = url.port_or_known_default().unwrap_or(443);
        let server_name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|e| err(format!("host {host:?}: {e}"), None))?;
        let tcp = tokio::net::TcpStream::connect((host, port)).await.map_err(|e| err(e.to_string(), None))?;
        let _ = tcp.set_nodelay(true);
        let tls = self.tls.connect(server_name, tcp).await.map_err(|e| err(format!("TLS: {e}"), None))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| err(e.to_string(), None))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let path = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        };
        let mut req = hyper::Request::get(path)
            .header(hyper::header::HOST, format!("{host}:{port}"))
            .header(hyper::header::USER_AGENT, "nanofleet-agent");
        if let Some(from) = from {
            req = req.header(hyper::header::RANGE, format!("bytes={from}-"));
        }
        let req = req.body(Empty::<Bytes>::new()).map_err(|e| err(e.to_string(), None))?;
        let resp = sender.send_request(req).await.map_err(|e| err(e.to_string(), None))?;
        let status = resp.status().as_u16();
        if status != 200 && status != 206 {
            return Err(err(format!("HTTP {status}"), Some(status)));
        }
        Ok(resp)
    }
}

#[tough::async_trait]
impl Transport for Https {
    async fn fetch(&self, url: Url) -> Result<TransportStream, TransportError> {
        let resp = self.get(&url, None).await.map_err(|e| {
            let kind = if e.status == Some(404) {
                TransportErrorKind::FileNotFound
            } else {
                TransportErrorKind::Other
            };
            TransportError::new_with_cause(kind, url.clone(), e)
        })?;
        let mut body = resp.into_body();
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame
                .map_err(|e| TransportError::new_with_cause(TransportErrorKind::Other, url.clone(), e))?;
            if let Some(data) = frame.data_ref() {
                out.extend_from_slice(data);
                if out.len() > MAX_METADATA_BYTES {
                    return Err(TransportError::new_with_cause(
                        TransportErrorKind::Other,
                        url,
                        std::io::Error::other(format!("more than {MAX_METADATA_BYTES} bytes")),
                    ));
                }
            }
        }
        let bytes = Bytes::from(out);
        Ok(Box::pin(futures::stream::once(async move { Ok(bytes) })))
    }
}
