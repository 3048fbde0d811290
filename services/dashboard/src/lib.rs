//! The Nanofleet web dashboard, served by the server over HTTPS.
//!
//! The page itself (`assets/`) is plain HTML, CSS and JavaScript compiled into the
//! binary, so the Rust build is the only build. It polls the JSON API below once a
//! second. People sign in with their user id and password; the session cookie is
//! HttpOnly, Secure and SameSite=Strict; scripts may send an API token instead
//! (`Authorization: Bearer`). Each endpoint is allowed to the roles of the
//! gRPC method it mirrors, from the same access table
//! ([`nanofleet_api::people::GRPC_ACCESS`]); site-scoped roles see their site only.
//!
//! | path | mirrors | what |
//! |---|---|---|
//! | `POST /api/login`, `POST /api/logout`, `GET /api/me` | | session |
//! | `GET /api/fleet` | ListSites | sites with device counts, fleet totals, ingest counters |
//! | `GET /api/devices[?site=ID]` | ListDevices | devices with presence, last values, active alarms |
//! | `GET /api/devices/{id}` | GetDevice | one device |
//! | `GET /api/devices/{id}/telemetry?since_ms=&until_ms=&limit=` | QueryTelemetry | samples, oldest first |
//! | `GET /api/devices/{id}/series?metric=M[&since_ms=&until_ms=&resolution=&points=]` | QuerySeries | one metric: raw samples or minute / hour rollups; `resolution`: auto, raw, minute, hour |
//! | `GET /api/enroll-tokens[?site=ID]` | ListEnrollTokens | enrollment tokens |
//! | `POST /api/enroll-tokens` | CreateEnrollToken | a new token, its secret shown once |
//! | `GET /api/recipes[?id=ID&status=S]` | ListRecipes | recipe versions with their signatures, by recipe id, newest version first; `S`: draft, authored, released, rejected |
//! | `GET /api/recipes/{id}?version=N` | GetRecipe | one version; 0 or none: the newest |
//! | `GET /api/recipes/{id}/deliveries?version=N` | ListRecipeDeliveries | per-device delivery state and the accepted / refused / pending counts; 0 or none: every version |
//! | `GET /api/quality/health[?since_ms=]` | GetFleetHealth | sites ranked worst first |
//! | `GET /api/quality/chart?metric=M[&by=F&site=&device=&firmware=&recipe=&lot=&since_ms=&baseline=&points=]` | GetControlChart | control charts |
//! | `GET /api/quality/compare?metric=M&by=F[&site=...&alpha=]` | CompareStrata | which stratum differs |
//! | `GET /api/quality/gate?factor=F&a=LEVEL[&b=LEVEL&since_ms=]` | CompareCohorts | A against B (no b: every other level) |
//! | `GET /api/quality/levels?factor=F` | GetControlChart | the levels seen for a factor |
//! | `GET /api/alerts[?state=S&site=&kind=]` | ListAlerts | alerts, newest first |
//! | `POST /api/alerts/{id}/ack` | AcknowledgeAlert | `{note}` |
//! | `GET /metrics` | GetIngestStats | Prometheus text format; `Authorization: Bearer <API token>` |
//! | `GET /healthz` | | liveness, open |
#![forbid(unsafe_code)]

mod artifacts;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use nanofleet_api::people::{Access, grpc_access};
use nanofleet_api::{Api, Caller, json};
use nanofleet_proto::v1 as pb;
use tokio::net::TcpListener;

const INDEX_HTML: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const STYLE_CSS: &str = include_str!("../assets/style.css");

const SESSION_COOKIE: &str = "nf_session";

/// Dashboard errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("http listener: {0}")]
    Io(#[from] std::io::Error),
}

/// The dashboard's routes, for embedding in another router or serving alone.
pub fn router(api: Api) -> Router {
    let guarded = Router::new()
        .route("/api/me", get(me))
        .route("/api/logout", post(logout))
        .route("/api/fleet", get(fleet_summary))
        .route("/api/devices", get(devices))
        .route("/api/devices/{id}", get(device))
        .route("/api/devices/{id}/telemetry", get(telemetry))
        .route("/api/devices/{id}/series", get(series))
        .route("/api/enroll-tokens", get(list_tokens).post(create_token))
        .route("/api/recipes", get(recipes))
        .route("/api/recipes/{id}", get(recipe))
        .route("/api/recipes/{id}/deliveries", get(recipe_deliveries))
        .route("/api/batches", get(batches))
        .route("/api/batches/{id}", get(batch))
        .route("/api/batches/{id}/decision", post(decide_batch))
        .route("/batches/{id}/record.html", get(batch_document))
        .route("/batches/{id}/record.json", get(batch_export_json))
        .route("/api/quality/health", get(quality_health))
        .route("/api/quality/chart", get(quality_chart))
        .route("/api/quality/compare", get(quality_compare))
        .route("/api/quality/gate", get(quality_gate))
        .route("/api/quality/levels", get(quality_levels))
        .route("/api/rollouts", get(rollouts))
        .route("/api/rollouts/{id}", get(rollout))
        .route("/api/inventory", get(inventory))
        .route("/api/alerts", get(alerts))
        .route("/api/alerts/{id}/ack", post(ack_alert))
        .route_layer(middleware::from_fn_with_state(api.clone(), require_session));
    let firmware = Router::new()
        .route("/firmware/metadata/{name}", get(artifacts::metadata))
        .route("/firmware/targets/{name}", get(artifacts::target))
        .route_layer(middleware::from_fn_with_state(api.clone(), artifacts::require_device_or_person));
    Router::new()
        .route("/", get(|| async { static_file(INDEX_HTML, "text/html; charset=utf-8") }))
        .route("/assets/app.js", get(|| async { static_file(APP_JS, "text/javascript; charset=utf-8") }))
        .route("/assets/style.css", get(|| async { static_file(STYLE_CSS, "text/css; charset=utf-8") }))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/login", post(login))
        .merge(guarded)
        .merge(firmware)
        .fallback(|| async { ApiError(nanofleet_api::Error::NotFound { what: "page", id: String::new() }) })
        .with_state(api)
}

/// Serves the dashboard over TLS on `listener` until `shutdown` completes, then lets
/// open requests finish (up to 5 s).
pub async fn run(
    listener: TcpListener,
    api: Api,
    tls: Arc<rustls::ServerConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;

    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::debug!(?addr, "dashboard serving");
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let app = router(api);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "dashboard accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        let watcher = graceful.watcher();
        // Answers go out at once rather than after the browser's delayed ACK.
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            // A client that never finishes its handshake must not hold a task forever.
            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "dashboard TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            // Devices fetching firmware present their certificate (verified by TLS).
            let cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec());
            let service = TowerToHyperService::new(app.layer(Extension(artifacts::PeerCert(cert))));
            let builder = Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, error = %e, "dashboard connection");
            }
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
    Ok(())
}

fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// Authenticates the session cookie (people in a browser) or an API token
/// (`Authorization: Bearer`, scripts) and puts the [`Caller`] into the request.
async fn require_session(State(api): State<Api>, mut req: Request, next: Next) -> Response {
    match authenticate(&api, req.headers()).await {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

/// The person behind a session cookie or a bearer API token.
async fn authenticate(api: &Api, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let login = || ApiError(nanofleet_api::Error::Unauthenticated("login required".into()));
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let caller = match (cookie_value(headers, SESSION_COOKIE), bearer) {
        (Some(cookie), _) => api.people.authenticate_session(&cookie).await,
        (None, Some(token)) => api.people.authenticate_token(&token).await,
        (None, None) => return Err(login()),
    };
    caller.map_err(|_| login())
}

/// The access table's rule for the gRPC method an endpoint mirrors.
fn allow(caller: &Caller, method: &str) -> Result<(), ApiError> {
    let path = format!("/nanofleet.v1.{method}");
    match grpc_access(&path) {
        Some(Access::Roles(roles)) if roles.contains(&caller.role) => Ok(()),
        _ => Err(ApiError(nanofleet_api::Error::PermissionDenied(format!(
            "role {} may not use this ({method})",
            caller.role.as_str()
        )))),
    }
}

fn person_json(c: &Caller) -> serde_json::Value {
    serde_json::json!({
        "id": c.person_id, "display_name": c.display_name, "role": c.role.as_str(),
        "site_id": c.site_id.clone().unwrap_or_default(),
    })
}

#[derive(serde::Deserialize)]
struct LoginForm {
    user: String,
    password: String,
}

async fn login(
    State(api): State<Api>,
    form: Result<Json<LoginForm>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(form) = form.map_err(|e| {
        ApiError(nanofleet_api::Error::InvalidArgument {
            field: "body",
            value: e.body_text(),
            allowed: "JSON {\"user\": ..., \"password\": ...}".into(),
        })
    })?;
    let (caller, session) = api.people.login(form.user.trim(), &form.password).await?;
    let cookie = format!(
        "{SESSION_COOKIE}={session}; HttpOnly; Secure; SameSite=Strict; Path=/; Max-Age={}",
        nanofleet_api::people::SESSION_LIFE.as_secs()
    );
    Ok(([(header::SET_COOKIE, cookie)], Json(serde_json::json!({ "person": person_json(&caller) })))
        .into_response())
}

async fn logout(State(api): State<Api>, headers: HeaderMap) -> Response {
    if let Some(c) = cookie_value(&headers, SESSION_COOKIE) {
        api.people.logout(&c).await;
    }
    let clear = format!("{SESSION_COOKIE}=; HttpOnly; Secure; SameSite=Strict; Path=/; Max-Age=0");
    (StatusCode::NO_CONTENT, [(header::SET_COOKIE, clear)]).into_response()
}

async fn me(Extension(caller): Extension<Caller>) -> Json<serde_json::Value> {
    Json(person_json(&caller))
}

#[derive(serde::Deserialize)]
struct TokensQuery {
    site: Option<String>,
}

async fn list_tokens(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    q: Result<Query<TokensQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    allow(&caller, "EnrollmentService/ListEnrollTokens")?;
    let site = query(q)?.site.unwrap_or_default();
    let site = caller.listing_site(&site)?;
    let now = now_ms();
    let tokens = api.trust.list_tokens(Some(&site)).await?;
    Ok(Json(
        serde_json::json!({ "tokens": tokens.iter().map(|t| json::enroll_token(t, now)).collect::<Vec<_>>() }),
    ))
}

#[derive(serde::Deserialize)]
struct NewToken {
    site_id: String,
    #[serde(default)]
    expires_in_seconds: u64,
    #[serde(default)]
    uses: u32,
    #[serde(default)]
    device_id: String,
    #[serde(default)]
    reason: String,
}

async fn create_token(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<NewToken>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    allow(&caller, "EnrollmentService/CreateEnrollToken")?;
    let Json(t) = body.map_err(|e| {
        ApiError(nanofleet_api::Error::InvalidArgument {
            field: "body",
            value: e.body_text(),
            allowed: "JSON {site_id, expires_in_seconds, uses, device_id, reason}".into(),
        })
    })?;
    caller.check_site(&t.site_id)?;
    let life = Duration::from_secs(if t.expires_in_seconds == 0 { 86_400 } else { t.expires_in_seconds });
    let uses = if t.uses == 0 { 1 } else { t.uses };
    let (token, secret) = api
        .trust
        .create_token(&caller.actor(), &t.site_id, life, uses, t.device_id.trim(), &t.reason)
        .await?;
    Ok(Json(serde_json::json!({ "token": json::enroll_token(&token, now_ms()), "secret_token": secret })))
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

async fn fleet_summary(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<serde_json::Value>, ApiError> {
    allow(&caller, "FleetService/ListSites")?;
    let fleet = &api.fleet;
    let mut sites = fleet.sites().await?;
    if let Some(own) = caller.site_limit() {
        sites.retain(|s| s.id == own);
    }
    let total: u32 = sites.iter().map(|s| s.devices_total).sum();
    let online: u32 = sites.iter().map(|s| s.devices_online).sum();
    Ok(Json(serde_json::json!({
        "sites": sites.iter().map(json::site).collect::<Vec<_>>(),
        "devices_total": total,
        "devices_online": online,
        // Fleet-wide ingest counters only for the roles that may read them.
        "ingest": allow(&caller, "TelemetryService/GetIngestStats").is_ok().then(|| fleet.ingest_stats()),
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
async fn healthz(State(api): State<Api>) -> Response {
    match tokio::time::timeout(std::time::Duration::from_secs(2), api.fleet.sites()).await {
        Ok(Ok(_)) => "ok\n".into_response(),
        Ok(Err(e)) => ApiError(e).into_response(),
        Err(_) => ApiError(nanofleet_api::Error::Unavailable("storage did not answer within 2 s".into()))
            .into_response(),
    }
}

async fn devices(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    q: Result<Query<DevicesQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    allow(&caller, "FleetService/ListDevices")?;
    let site = query(q)?.site.unwrap_or_default();
    let site = caller.listing_site(&site)?;
    let devices = api.fleet.devices(Some(&site)).await?;
    Ok(Json(serde_json::json!({ "devices": devices.iter().map(json::device).collect::<Vec<_>>() })))
}

async fn device(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    allow(&caller, "FleetService/GetDevice")?;
    let d = api.fleet.device(&id).await?;
    caller.check_device_site(&id, &d.site_id)?;
    Ok(Json(json::device(&d)))
}

/// `allow`, and for a site-scoped caller, that the device is of their site.
async fn allow_device(api: &Api, caller: &Caller, method: &str, id: &str) -> Result<(), ApiError> {
    allow(caller, method)?;
    if caller.site_limit().is_some() {
        caller.check_device_site(id, &api.fleet.device(id).await?.site_id)?;
    }
    Ok(())
}

#[derive(serde::Deserialize)]
struct TelemetryQuery {
    since_ms: Option<i64>,
    until_ms: Option<i64>,
    limit: Option<u32>,
}

async fn telemetry(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    q: Result<Query<TelemetryQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    allow_device(&api, &caller, "TelemetryService/QueryTelemetry", &id).await?;
    let fleet = &api.fleet;
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

#[derive(serde::Deserialize)]
struct SeriesQuery {
    metric: String,
    since_ms: Option<i64>,
    until_ms: Option<i64>,
    resolution: Option<String>,
    points: Option<u32>,
}

async fn series(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    q: Result<Query<SeriesQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    allow_device(&api, &caller, "TelemetryService/QuerySeries", &id).await?;
    let q = query(q)?;
    let resolution = nanofleet_api::series::resolution_named(q.resolution.as_deref().unwrap_or("auto"))?;
    let now = now_ms();
    let r = api
        .fleet
        .series(nanofleet_api::series::SeriesQuery {
            device_id: &id,
            metric: &q.metric,
            since_ms: q.since_ms.unwrap_or(now - 86_400_000),
            until_ms: q.until_ms.unwrap_or(now + 1),
            resolution,
            max_points: q.points.unwrap_or(0),
        })
        .await?;
    let resolution = nanofleet_api::series::resolution_name(r.resolution);
    Ok(Json(serde_json::json!({
        "device_id": r.device_id,
        "metric": r.metric,
        "unit": r.unit,
        "resolution": resolution,
        "bucket_ms": r.bucket_ms,
        "truncated": r.truncated,
        "points": r.points.iter().map(|p| serde_json::json!({
            "start_unix_ms": p.start_unix_ms,
            "width_ms": p.width_ms,
            "count": p.count,
            "min": p.min,
            "max": p.max,
            "mean": p.mean,
            "p50": p.p50,
            "p90": p.p90,
            "p99": p.p99,
        })).collect::<Vec<_>>(),
    })))
}

// === Recipes ===

/// The `status` values of the recipe list, as the JSON shapes name them.
const RECIPE_STATUSES: [(&str, pb::RecipeStatus); 4] = [
    ("draft", pb::RecipeStatus::Draft),
    ("authored", pb::RecipeStatus::Authored),
    ("released", pb::RecipeStatus::Released),
    ("rejected", pb::RecipeStatus::Rejected),
];

/// `status=` of the recipe list; empty means every status.
fn recipe_status_filter(value: &str) -> Result<pb::RecipeStatus, nanofleet_api::Error> {
    if value.is_empty() {
        return Ok(pb::RecipeStatus::Unspecified);
    }
    RECIPE_STATUSES.iter().find(|(name, _)| *name == value).map(|(_, s)| *s).ok_or_else(|| {
        let names: Vec<&str> = RECIPE_STATUSES.iter().map(|(name, _)| *name).collect();
        nanofleet_api::Error::invalid(
            "status",
            value,
            format!("{}, or none for every status", names.join(", ")),
        )
    })
}

#[derive(serde::Deserialize)]
struct RecipesQuery {
    id: Option<String>,
    status: Option<String>,
}

async fn recipes(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    q: Result<Query<RecipesQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    allow(&caller, "RecipeService/ListRecipes")?;
    let q = query(q)?;
    let req = pb::ListRecipesRequest {
        recipe_id: q.id.unwrap_or_default(),
        status: recipe_status_filter(q.status.as_deref().unwrap_or_default())? as i32,
    };
    let versions = api.recipes.list(&req).await?;
    Ok(Json(serde_json::json!({ "recipes": versions.iter().map(json::recipe_version).collect::<Vec<_>>() })))
}

#[derive(serde::Deserialize)]
struct VersionQuery {
    version: Option<u32>,
}

/// Stock by site with replenishment, the lots, and (for oversight roles) who has not
/// acknowledged the deny list in force.
async fn inventory(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<serde_json::Value>, ApiError> {
    allow(&caller, "InventoryService/GetStock")?;
    use nanofleet_recipe::json::to_json;
    let stock = api.inventory.stock(&caller, "").await?;
    let lots = api.inventory.lots(&pb::ListLotsRequest::default()).await?;
    let deny = match allow(&caller, "InventoryService/GetDenyListStatus") {
        Ok(()) => to_json("nanofleet.v1.GetDenyListStatusResponse", &api.inventory.deny_status().await?),
        Err(_) => serde_json::Value::Null,
    };
    Ok(Json(serde_json::json!({
        "stock": stock.iter().map(|l| to_json("nanofleet.v1.StockLine", l)).collect::<Vec<_>>(),
        "lots": lots.iter().map(|l| to_json("nanofleet.v1.Lot", l)).collect::<Vec<_>>(),
        "deny_list": deny,
    })))
}

async fn rollouts(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<serde_json::Value>, ApiError> {
    allow(&caller, "RolloutService/ListRollouts")?;
    let list = api.rollouts.list("").await?;
    Ok(Json(serde_json::json!({ "rollouts": list.iter().map(json::rollout).collect::<Vec<_>>() })))
}

async fn rollout(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    allow(&caller, "RolloutService/GetRollout")?;
    Ok(Json(json::rollout(&api.rollouts.get(&id, true).await?)))
}

async fn recipe(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    q: Result<Query<VersionQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    allow(&caller, "RecipeService/GetRecipe")?;
    let version = query(q)?.version.unwrap_or(0);
    let v = api.recipes.version(&id, i64::from(version)).await?;
    Ok(Json(json::recipe_version(&v)))
}

async fn recipe_deliveries(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    q: Result<Query<VersionQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    allow(&caller, "RecipeService/ListRecipeDeliveries")?;
    let version = query(q)?.version.unwrap_or(0);
    let deliveries = api.recipes.deliveries(&caller, &id, i64::from(version)).await?;
    let count = |s: pb::DeliveryState| deliveries.iter().filter(|d| d.state == s as i32).count();
    Ok(Json(serde_json::json!({
        "deliveries": deliveries.iter().map(json::recipe_delivery).collect::<Vec<_>>(),
        "counts": {
            "accepted": count(pb::DeliveryState::Accepted),
            "refused": count(pb::DeliveryState::Refused),
            "pending": count(pb::DeliveryState::Pending),
        },
    })))
}

#[derive(serde::Deserialize)]
struct BatchesQuery {
    site: Option<String>,
    device: Option<String>,
    recipe: Option<String>,
    disposition: Option<String>,
    limit: Option<u32>,
}

async fn batches(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    q: Result<Query<BatchesQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    allow(&caller, "BatchService/ListBatches")?;
    let q = query(q)?;
    let disposition = match q.disposition.as_deref().unwrap_or_default() {
        "" => pb::BatchDisposition::Unspecified,
        "awaiting_release" => pb::BatchDisposition::AwaitingRelease,
        "released" => pb::BatchDisposition::Released,
        "rejected" => pb::BatchDisposition::Rejected,
        "failed" => pb::BatchDisposition::Failed,
        other => {
            return Err(ApiError(nanofleet_api::Error::invalid(
                "disposition",
                other,
                "awaiting_release, released, rejected or failed",
            )));
        }
    };
    let req = pb::ListBatchesRequest {
        site_id: q.site.unwrap_or_default(),
        device_id: q.device.unwrap_or_default(),
        recipe_id: q.recipe.unwrap_or_default(),
        disposition: disposition as i32,
        limit: q.limit.unwrap_or(200),
    };
    let list = api.batches.list(&caller, &req).await?;
    let count = |d: pb::BatchDisposition| list.iter().filter(|b| b.disposition == d as i32).count();
    Ok(Json(serde_json::json!({
        "batches": list.iter().map(nanofleet_api::summary_json).collect::<Vec<_>>(),
        "counts": {
            "awaiting_release": count(pb::BatchDisposition::AwaitingRelease),
            "released": count(pb::BatchDisposition::Released),
            "rejected": count(pb::BatchDisposition::Rejected),
            "failed": count(pb::BatchDisposition::Failed),
        },
    })))
}

async fn batch(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    allow(&caller, "BatchService/GetBatch")?;
    Ok(Json(nanofleet_api::batch_json(&api.batches.get(&caller, &id).await?)))
}

#[derive(serde::Deserialize)]
struct Decision {
    /// `released` or `rejected`.
    meaning: String,
    #[serde(default)]
    reason: String,
    user_id: String,
    password: String,
}

/// QA releases or rejects a batch, signing with both identification components.
async fn decide_batch(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Json<Decision>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    allow(&caller, "BatchService/ReleaseBatch")?;
    let Json(d) = body.map_err(|e| {
        ApiError(nanofleet_api::Error::InvalidArgument {
            field: "body",
            value: e.body_text(),
            allowed: "JSON {meaning: released or rejected, reason, user_id, password}".into(),
        })
    })?;
    let meaning = match d.meaning.as_str() {
        "released" => nanofleet_proto::device::v1::SignatureMeaning::Released,
        "rejected" => nanofleet_proto::device::v1::SignatureMeaning::Rejected,
        other => {
            return Err(ApiError(nanofleet_api::Error::invalid("meaning", other, "released or rejected")));
        }
    };
    let req = pb::ReleaseBatchRequest {
        batch_id: id,
        meaning: meaning as i32,
        reason: d.reason,
        user_id: d.user_id,
        password: d.password,
    };
    let summary = api.batches.release(&caller, &req).await?;
    Ok(Json(nanofleet_api::summary_json(&summary)))
}

/// The printable batch record.
async fn batch_document(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    allow(&caller, "BatchService/ExportBatch")?;
    let (content_type, body) = api.batches.export(&caller, &id, pb::ExportFormat::Html).await?;
    Ok(([(header::CONTENT_TYPE, content_type)], body).into_response())
}

/// The batch record with the signed bytes, as a download.
async fn batch_export_json(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    allow(&caller, "BatchService/ExportBatch")?;
    let (content_type, body) = api.batches.export(&caller, &id, pb::ExportFormat::Json).await?;
    let disposition = format!("attachment; filename=\"batch-{}.json\"", id.replace(['"', '\\', '/'], "_"));
    Ok(([(header::CONTENT_TYPE, content_type), (header::CONTENT_DISPOSITION, disposition)], body)
        .into_response())
}

/// For Prometheus: an API token of a role that may read ingest statistics.
async fn metrics(State(api): State<Api>, headers: HeaderMap) -> Result<Response, ApiError> {
    use std::fmt::Write as _;
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            ApiError(nanofleet_api::Error::Unauthenticated(
                "send `Authorization: Bearer <API token>` (ops or auditor)".into(),
            ))
        })?;
    let caller = api.people.authenticate_token(bearer).await?;
    allow(&caller, "TelemetryService/GetIngestStats")?;
    let fleet = &api.fleet;
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
    let _ = writeln!(
        out,
        "# HELP nanofleet_ingest_commit_seconds Time from a telemetry message's arrival at ingest to its commit."
    );
    let _ = writeln!(out, "# TYPE nanofleet_ingest_commit_seconds histogram");
    let mut cumulative = 0;
    for (i, n) in s.commit_latency.iter().enumerate() {
        cumulative += n;
        match nanofleet_ingest::stats::LATENCY_BOUNDS.get(i) {
            Some(le) => {
                let _ = writeln!(out, "nanofleet_ingest_commit_seconds_bucket{{le=\"{le}\"}} {cumulative}");
            }
            None => {
                let _ = writeln!(out, "nanofleet_ingest_commit_seconds_bucket{{le=\"+Inf\"}} {cumulative}");
            }
        }
    }
    let _ = writeln!(out, "nanofleet_ingest_commit_seconds_sum {}", s.commit_latency_sum_s);
    let _ = writeln!(out, "nanofleet_ingest_commit_seconds_count {cumulative}");
    let _ = writeln!(out, "# HELP nanofleet_devices_online Devices connected, by site.");
    let _ = writeln!(out, "# TYPE nanofleet_devices_online gauge");
    for site in &sites {
        let _ = writeln!(out, "nanofleet_devices_online{{site=\"{}\"}} {}", site.id, site.devices_online);
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_status_lists_every_version() {
        assert_eq!(recipe_status_filter("").unwrap(), pb::RecipeStatus::Unspecified);
    }

    #[test]
    fn each_status_name_selects_its_status() {
        assert_eq!(recipe_status_filter("draft").unwrap(), pb::RecipeStatus::Draft);
        assert_eq!(recipe_status_filter("authored").unwrap(), pb::RecipeStatus::Authored);
        assert_eq!(recipe_status_filter("released").unwrap(), pb::RecipeStatus::Released);
        assert_eq!(recipe_status_filter("rejected").unwrap(), pb::RecipeStatus::Rejected);
    }

    #[test]
    fn an_unknown_status_is_a_bad_request_naming_the_value_and_the_allowed_ones() {
        let err = recipe_status_filter("approved").unwrap_err();
        assert_eq!(err.http_status(), 400);
        let text = err.to_string();
        assert!(text.contains("status = \"approved\""), "{text}");
        for name in ["draft", "authored", "released", "rejected"] {
            assert!(text.contains(name), "{text} names {name}");
        }
    }
}

// === Quality and alerts ===

#[derive(serde::Deserialize, Default)]
struct QualityQuery {
    metric: Option<String>,
    by: Option<String>,
    site: Option<String>,
    device: Option<String>,
    firmware: Option<String>,
    recipe: Option<String>,
    lot: Option<String>,
    since_ms: Option<i64>,
    baseline: Option<u32>,
    points: Option<u32>,
    alpha: Option<f64>,
    factor: Option<String>,
    a: Option<String>,
    b: Option<String>,
}

fn factor_param(field: &'static str, v: Option<&str>) -> Result<pb::Factor, ApiError> {
    match v.unwrap_or_default() {
        "" => Ok(pb::Factor::Unspecified),
        name => nanofleet_api::factor_named(name).ok_or_else(|| {
            ApiError(nanofleet_api::Error::invalid(field, name, "device, site, firmware, recipe or lot"))
        }),
    }
}

impl QualityQuery {
    fn selection(&self) -> pb::BatchSelection {
        let one = |v: &Option<String>| v.iter().filter(|s| !s.is_empty()).cloned().collect::<Vec<_>>();
        pb::BatchSelection {
            device_ids: one(&self.device),
            site_ids: one(&self.site),
            firmware_versions: one(&self.firmware),
            recipe_ids: one(&self.recipe),
            cartridge_lots: one(&self.lot),
            since_unix_ms: self.since_ms.unwrap_or(0),
            until_unix_ms: 0,
        }
    }
}

fn pb_json(name: &str, msg: &impl nanofleet_proto::prost::Message) -> Json<serde_json::Value> {
    Json(nanofleet_recipe::json::to_json(name, msg))
}

async fn quality_health(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    q: Result<Query<QualityQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    allow(&caller, "MonitoringService/GetFleetHealth")?;
    let q = query(q)?;
    let r = api
        .monitoring
        .fleet_health(&caller, pb::GetFleetHealthRequest { since_unix_ms: q.since_ms.unwrap_or(0) })
        .await?;
    Ok(pb_json("nanofleet.v1.GetFleetHealthResponse", &r))
}

async fn quality_chart(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    q: Result<Query<QualityQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    allow(&caller, "MonitoringService/GetControlChart")?;
    let q = query(q)?;
    let req = pb::GetControlChartRequest {
        metric: q.metric.clone().unwrap_or_default(),
        selection: Some(q.selection()),
        by: factor_param("by", q.by.as_deref())? as i32,
        baseline_points: q.baseline.unwrap_or(0),
        max_points: q.points.unwrap_or(0),
    };
    let r = api.monitoring.control_chart(&caller, req).await?;
    Ok(pb_json("nanofleet.v1.GetControlChartResponse", &r))
}

async fn quality_compare(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    q: Result<Query<QualityQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    allow(&caller, "MonitoringService/CompareStrata")?;
    let q = query(q)?;
    let req = pb::CompareStrataRequest {
        metric: q.metric.clone().unwrap_or_default(),
        selection: Some(q.selection()),
        by: factor_param("by", q.by.as_deref())? as i32,
        alpha: q.alpha.unwrap_or(0.0),
    };
    let r = api.monitoring.compare_strata(&caller, req).await?;
    Ok(pb_json("nanofleet.v1.CompareStrataResponse", &r))
}

async fn quality_gate(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    q: Result<Query<QualityQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    allow(&caller, "MonitoringService/CompareCohorts")?;
    let q = query(q)?;
    let factor = factor_param("factor", q.factor.as_deref())?;
    let Some(a) = q.a.clone().filter(|a| !a.is_empty()) else {
        return Err(ApiError(nanofleet_api::Error::invalid(
            "a",
            "",
            "the level of cohort A, e.g. a firmware version",
        )));
    };
    let b: Vec<String> = match q.b.clone().filter(|b| !b.is_empty()) {
        Some(b) => vec![b],
        None => api.monitoring.levels(&caller, factor).await?.into_iter().filter(|l| *l != a).collect(),
    };
    let cohort = |levels: Vec<String>| {
        let mut s = pb::BatchSelection { since_unix_ms: q.since_ms.unwrap_or(0), ..Default::default() };
        match factor {
            pb::Factor::Device => s.device_ids = levels,
            pb::Factor::Site => s.site_ids = levels,
            pb::Factor::Firmware => s.firmware_versions = levels,
            pb::Factor::Recipe => s.recipe_ids = levels,
            pb::Factor::Lot => s.cartridge_lots = levels,
            pb::Factor::Unspecified => {}
        }
        s
    };
    if factor == pb::Factor::Unspecified {
        return Err(ApiError(nanofleet_api::Error::invalid(
            "factor",
            "",
            "device, site, firmware, recipe or lot",
        )));
    }
    let req = pb::CompareCohortsRequest {
        cohort_a: Some(cohort(vec![a])),
        cohort_b: Some(cohort(b)),
        ..Default::default()
    };
    let r = api.monitoring.compare_cohorts(&caller, req).await?;
    Ok(pb_json("nanofleet.v1.CompareCohortsResponse", &r))
}

async fn quality_levels(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    q: Result<Query<QualityQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    allow(&caller, "MonitoringService/GetControlChart")?;
    let q = query(q)?;
    let factor = factor_param("factor", q.factor.as_deref())?;
    if factor == pb::Factor::Unspecified {
        return Err(ApiError(nanofleet_api::Error::invalid(
            "factor",
            "",
            "device, site, firmware, recipe or lot",
        )));
    }
    Ok(Json(serde_json::json!({ "levels": api.monitoring.levels(&caller, factor).await? })))
}

#[derive(serde::Deserialize, Default)]
struct AlertsQuery {
    state: Option<String>,
    site: Option<String>,
    kind: Option<String>,
    limit: Option<u32>,
}

async fn alerts(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    q: Result<Query<AlertsQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    allow(&caller, "MonitoringService/ListAlerts")?;
    let q = query(q)?;
    let states = match q.state.as_deref().unwrap_or_default() {
        "" => vec![],
        name => nanofleet_api::alert_states_named(name)
            .ok_or_else(|| {
                ApiError(nanofleet_api::Error::invalid(
                    "state",
                    name,
                    "active, open, acknowledged, resolved or all",
                ))
            })?
            .into_iter()
            .map(|s| s as i32)
            .collect(),
    };
    let kind = match q.kind.as_deref().unwrap_or_default() {
        "" => pb::AlertKind::Unspecified,
        name => nanofleet_api::alert_kind_named(name).ok_or_else(|| {
            ApiError(nanofleet_api::Error::invalid(
                "kind",
                name,
                "spc_rule, device_silent, alarm_storm or site_differs",
            ))
        })?,
    };
    let req = pb::ListAlertsRequest {
        states,
        site_id: q.site.unwrap_or_default(),
        kind: kind as i32,
        limit: q.limit.unwrap_or(200),
    };
    let list = api.monitoring.list_alerts(&caller, req).await?;
    Ok(Json(serde_json::json!({
        "alerts": list.iter().map(|a| nanofleet_recipe::json::to_json("nanofleet.v1.Alert", a)).collect::<Vec<_>>(),
    })))
}

#[derive(serde::Deserialize)]
struct AckForm {
    note: String,
}

async fn ack_alert(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Json<AckForm>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    allow(&caller, "MonitoringService/AcknowledgeAlert")?;
    let Json(f) = body.map_err(|e| {
        ApiError(nanofleet_api::Error::InvalidArgument {
            field: "body",
            value: e.body_text(),
            allowed: "JSON {note}".into(),
        })
    })?;
    let a = api.monitoring.acknowledge(&caller, &id, &f.note).await?;
    Ok(pb_json("nanofleet.v1.Alert", &a))
}
