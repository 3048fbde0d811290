//! A small HTTPS GET client for devices: TUF metadata through tough's [`Transport`],
//! and images with range requests, so a cut download resumes where it stopped.
//! One HTTP/1.1 connection per request, over rustls with the device's client
//! certificate and the fleet root. A server that does not answer, or a transfer
//! that stalls, is given up after a time limit (a download resumes later).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use tough::{Transport, TransportError, TransportErrorKind, TransportStream};
use url::Url;

/// Largest metadata file fetched through [`Transport`].
const MAX_METADATA_BYTES: usize = 16 * 1024 * 1024;

/// The longest wait for the connection, the TLS handshake and the response's head.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest a transfer may go without a byte before it is given up.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// An HTTPS client with one TLS configuration.
#[derive(Clone)]
pub struct Https {
    tls: tokio_rustls::TlsConnector,
    connect_timeout: Duration,
    stall_timeout: Duration,
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
        Https {
            tls: tokio_rustls::TlsConnector::from(config),
            connect_timeout: CONNECT_TIMEOUT,
            stall_timeout: STALL_TIMEOUT,
        }
    }

    /// Other time limits than [`CONNECT_TIMEOUT`] and [`STALL_TIMEOUT`].
    pub fn with_timeouts(mut self, connect: Duration, stall: Duration) -> Https {
        self.connect_timeout = connect;
        self.stall_timeout = stall;
        self
    }

    /// The next bytes of `body`; `None` at its end. A stall longer than the time
    /// limit is an error.
    pub async fn next_chunk(&self, body: &mut hyper::body::Incoming) -> Result<Option<Bytes>, String> {
        loop {
            let frame = match tokio::time::timeout(self.stall_timeout, body.frame()).await {
                Err(_) => {
                    return Err(format!("no data for {} s: transfer given up", self.stall_timeout.as_secs()));
                }
                Ok(None) => return Ok(None),
                Ok(Some(frame)) => frame.map_err(|e| e.to_string())?,
            };
            if let Ok(data) = frame.into_data() {
                return Ok(Some(data));
            }
        }
    }

    /// GETs `url`; with `from`, only the bytes from that offset (`Range: bytes=N-`).
    /// Returns the response with its body unread; 200 and 206 only.
    pub async fn get(
        &self,
        url: &Url,
        from: Option<u64>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, GetError> {
        match tokio::time::timeout(self.connect_timeout, self.get_head(url, from)).await {
            Ok(r) => r,
            Err(_) => Err(GetError {
                url: url.to_string(),
                reason: format!("no answer within {} s", self.connect_timeout.as_secs_f64()),
                status: None,
            }),
        }
    }

    async fn get_head(
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
        let other = |url: &Url, reason: String| {
            TransportError::new_with_cause(
                TransportErrorKind::Other,
                url.clone(),
                std::io::Error::other(reason),
            )
        };
        while let Some(data) = self.next_chunk(&mut body).await.map_err(|e| other(&url, e))? {
            out.extend_from_slice(&data);
            if out.len() > MAX_METADATA_BYTES {
                return Err(other(&url, format!("more than {MAX_METADATA_BYTES} bytes")));
            }
        }
        let bytes = Bytes::from(out);
        Ok(Box::pin(futures::stream::once(async move { Ok(bytes) })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_server_that_never_answers_is_given_up_after_the_time_limit() {
        nanofleet_pki::install_crypto_provider();
        // Accepts the connection and says nothing: the TLS handshake never ends.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(socket);
        });
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let https = Https::new(Arc::new(config))
            .with_timeouts(Duration::from_millis(300), Duration::from_millis(300));
        let url = Url::parse(&format!("https://localhost:{}/targets/x.img", addr.port())).unwrap();
        let started = std::time::Instant::now();
        let e = https.get(&url, Some(10)).await.unwrap_err();
        assert!(e.reason.contains("no answer within 0.3 s"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        held.abort();
    }
}
