//! The Nanofleet web dashboard, served by the server over HTTP.
//!
//! The page itself (`assets/`) is plain HTML, CSS and JavaScript compiled into the
//! binary, so the Rust build is the only build. It polls the JSON API below once a
//! second:
//!
//! | path | what |
//! |---|---|
//! | `GET /api/fleet` | sites with device counts, fleet totals, ingest counters |
//! | `GET /api/devices[?site=ID]` | devices with presence, last values, active alarms |
//! | `GET /api/devices/{id}` | one device |
//! | `GET /api/devices/{id}/telemetry?since_ms=&until_ms=&limit=` | samples, oldest first |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /healthz` | liveness |
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use nanofleet_api::{Fleet, json};
use tokio::net::TcpListener;

const INDEX_HTML: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const STYLE_CSS: &str = include_str!("../assets/style.css");

/// Dashboard errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("http listener: {0}")]
    Io(#[from] std::io::Error),
}

/// The dashboard's routes, for embedding in another router or serving alone.
pub fn router(fleet: Fleet) -> Router {
    Router::new()
        .route("/", get(|| async { static_file(INDEX_HTML, "text/html; charset=utf-8") }))
        .route("/assets/app.js", get(|| async { static_file(APP_JS, "text/javascript; charset=utf-8") }))
        .route("/assets/style.css", get(|| async { static_file(STYLE_CSS, "text/css; charset=utf-8") }))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/fleet", get(fleet_summary))
        .route("/api/devices", get(devices))
        .route("/api/devices/{id}", get(device))
        .route("/api/devices/{id}/telemetry", get(telemetry))
        .with_state(fleet)
}

/// Serves the dashboard on `listener` until `shutdown` completes.
pub async fn run(
    listener: TcpListener,
    fleet: Fleet,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::debug!(?addr, "dashboard serving");
    axum::serve(listener, router(fleet)).with_graceful_shutdown(shutdown).await?;
    Ok(())
}

fn static_file(body: &'static str, content_type: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

struct ApiError(nanofleet_api::Error);

impl From<nanofleet_api::Error> for ApiError {
    fn from(e: nanofleet_api::Error) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(serde_json::json!({ "error": self.0.to_string() }))).into_response()
    }
}

async fn fleet_summary(State(fleet): State<Fleet>) -> Result<Json<serde_json::Value>, ApiError> {
    let sites = fleet.sites().await?;
    let total: u32 = sites.iter().map(|s| s.devices_total).sum();
    let online: u32 = sites.iter().map(|s| s.devices_online).sum();
    Ok(Json(serde_json::json!({
        "sites": sites.iter().map(json::site).collect::<Vec<_>>(),
        "devices_total": total,
        "devices_online": online,
        "ingest": fleet.ingest_stats(),
    })))
}

#[derive(serde::Deserialize)]
struct DevicesQuery {
    site: Option<String>,
}

/// A query string that does not parse gets the API's JSON error shape.
fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(q)| q).map_err(|e| {
        ApiError(nanofleet_api::Error::InvalidArgument {
            field: "query",
            value: e.body_text(),
            allowed: "the parameters documented in docs/api.md".into(),
        })
    })
}

/// Live and able to read the store.
async fn healthz(State(fleet): State<Fleet>) -> Response {
    match tokio::time::timeout(std::time::Duration::from_secs(2), fleet.sites()).await {
        Ok(Ok(_)) => "ok\n".into_response(),
        Ok(Err(e)) => ApiError(e).into_response(),
        Err(_) => ApiError(nanofleet_api::Error::Unavailable("storage did not answer within 2 s".into()))
            .into_response(),
    }
}

async fn devices(
    State(fleet): State<Fleet>,
    q: Result<Query<DevicesQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let q = query(q)?;
    let devices = fleet.devices(q.site.as_deref()).await?;
    Ok(Json(serde_json::json!({ "devices": devices.iter().map(json::device).collect::<Vec<_>>() })))
}

async fn device(
    State(fleet): State<Fleet>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(json::device(&fleet.device(&id).await?)))
}

#[derive(serde::Deserialize)]
struct TelemetryQuery {
    since_ms: Option<i64>,
    until_ms: Option<i64>,
    limit: Option<u32>,
}

async fn telemetry(
    State(fleet): State<Fleet>,
    Path(id): Path<String>,
    q: Result<Query<TelemetryQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let q = query(q)?;
    let now = now_ms();
    let since = q.since_ms.unwrap_or(now - 2 * 60 * 1000);
    let until = q.until_ms.unwrap_or(now + 1);
    let window = fleet.telemetry(&id, since, until, q.limit.unwrap_or(0)).await?;
    Ok(Json(serde_json::json!({
        "device_id": id,
        "samples": window.samples.iter().map(json::sample).collect::<Vec<_>>(),
        "truncated": window.truncated,
    })))
}

async fn metrics(State(fleet): State<Fleet>) -> Result<Response, ApiError> {
    use std::fmt::Write as _;
    let s = fleet.ingest_stats();
    let sites = fleet.sites().await?;
    let mut out = String::new();
    let _ = writeln!(out, "# HELP nanofleet_ingest_accepted_total Device messages stored.");
    let _ = writeln!(out, "# TYPE nanofleet_ingest_accepted_total counter");
    let _ = writeln!(out, "nanofleet_ingest_accepted_total {}", s.accepted);
    let _ = writeln!(out, "# HELP nanofleet_ingest_duplicates_total Re-sent device messages already stored.");
    let _ = writeln!(out, "# TYPE nanofleet_ingest_duplicates_total counter");
    let _ = writeln!(out, "nanofleet_ingest_duplicates_total {}", s.duplicates);
    let _ = writeln!(out, "# HELP nanofleet_ingest_rejected_total Device messages refused, by reason.");
    let _ = writeln!(out, "# TYPE nanofleet_ingest_rejected_total counter");
    for (reason, n) in &s.rejected {
        let _ = writeln!(out, "nanofleet_ingest_rejected_total{{reason=\"{reason}\"}} {n}");
    }
    let _ = writeln!(out, "# HELP nanofleet_ingest_batches_total Storage transactions committed by ingest.");
    let _ = writeln!(out, "# TYPE nanofleet_ingest_batches_total counter");
    let _ = writeln!(out, "nanofleet_ingest_batches_total {}", s.batches_committed);
    let _ = writeln!(
        out,
        "# HELP nanofleet_ingest_storage_errors_total Device messages not stored because their transaction failed."
    );
    let _ = writeln!(out, "# TYPE nanofleet_ingest_storage_errors_total counter");
    let _ = writeln!(out, "nanofleet_ingest_storage_errors_total {}", s.storage_errors);
    let _ = writeln!(out, "# HELP nanofleet_devices_online Devices connected, by site.");
    let _ = writeln!(out, "# TYPE nanofleet_devices_online gauge");
    for site in &sites {
        let _ = writeln!(out, "nanofleet_devices_online{{site=\"{}\"}} {}", site.id, site.devices_online);
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}
