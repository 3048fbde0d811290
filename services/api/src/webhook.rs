//! Delivers alerts to an operator's webhook: each new alert and change of state is
//! POSTed as JSON (the `nanofleet.v1.Alert` message in its proto3 JSON form), over
//! http or https (system trust roots), with a few retries. Delivery runs on its own
//! task behind a bounded queue, so a slow receiver never holds up the evaluation.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use nanofleet_proto::v1 as pb;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Attempts per alert; waits double from one second between them.
const ATTEMPTS: u32 = 4;
const TIMEOUT: Duration = Duration::from_secs(10);
const QUEUE: usize = 1_024;

/// A webhook URL that was checked at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl(http::Uri);

impl std::str::FromStr for WebhookUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let uri: http::Uri = s.parse().map_err(|e| format!("webhook URL {s:?}: {e}"))?;
        match (uri.scheme_str(), uri.host()) {
            (Some("http" | "https"), Some(h)) if !h.is_empty() => Ok(WebhookUrl(uri)),
            _ => Err(format!("webhook URL {s:?}: needs http:// or https:// and a host")),
        }
    }
}

impl std::fmt::Display for WebhookUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The sending end; cheap to clone.
#[derive(Debug, Clone)]
pub struct Webhook {
    tx: mpsc::Sender<Vec<u8>>,
}

impl Webhook {
    pub fn spawn(url: WebhookUrl, shutdown: CancellationToken) -> Webhook {
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(QUEUE);
        tokio::spawn(async move {
            let tls = tls_connector();
            loop {
                let body = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    b = rx.recv() => match b { Some(b) => b, None => return },
                };
                let mut wait = Duration::from_secs(1);
                for attempt in 1..=ATTEMPTS {
                    match tokio::time::timeout(TIMEOUT, post(&url.0, &tls, body.clone())).await {
                        Ok(Ok(status)) if (200..300).contains(&status) => break,
                        Ok(Ok(status)) => tracing::warn!(%url, status, attempt, "webhook refused an alert"),
                        Ok(Err(e)) => tracing::warn!(%url, error = %e, attempt, "webhook unreachable"),
                        Err(_) => tracing::warn!(%url, attempt, "webhook timed out"),
                    }
                    if attempt < ATTEMPTS {
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(wait) => {}
                        }
                        wait *= 2;
                    }
                }
            }
        });
        Webhook { tx }
    }

    /// Queues an alert; when the queue is full (the receiver is down for long) the
    /// alert is dropped from the webhook only: it stays in the store and the dashboard.
    pub fn send(&self, alert: &pb::Alert) {
        let body = nanofleet_recipe::json::to_json("nanofleet.v1.Alert", alert).to_string().into_bytes();
        if self.tx.try_send(body).is_err() {
            tracing::warn!(alert_id = %alert.alert_id, "webhook queue full, alert not sent to it");
        }
    }
}

fn tls_connector() -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

async fn post(url: &http::Uri, tls: &tokio_rustls::TlsConnector, body: Vec<u8>) -> Result<u16, String> {
    let host = url.host().unwrap_or_default();
    let https = url.scheme_str() == Some("https");
    let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = TcpStream::connect((host, port)).await.map_err(|e| e.to_string())?;
    let request = hyper::Request::post(url.path_and_query().map_or("/", |p| p.as_str()))
        .header(hyper::header::HOST, url.authority().map_or(host, |a| a.as_str()))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::USER_AGENT, "nanofleet-alerts")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    if https {
        let name = rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
        let stream = tls.connect(name, tcp).await.map_err(|e| e.to_string())?;
        send(TokioIo::new(stream), request).await
    } else {
        send(TokioIo::new(tcp), request).await
    }
}

async fn send<S>(io: S, request: hyper::Request<Full<Bytes>>) -> Result<u16, String>
where
    S: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    // Read the body so the connection ends cleanly.
    let _ = response.into_body().collect().await;
    Ok(status)
}
