//! Firmware over HTTPS: the signed TUF metadata (`/firmware/metadata/{file}`) and the
//! images (`/firmware/targets/{sha256}.{target}`), with range requests so that an
//! interrupted download resumes where it stopped.
//!
//! Devices authenticate with their client certificate (an active, enrolled device
//! with a certificate this server issued); people with a session or API token of a
//! role that may list firmware. Integrity does not rest on this: devices check every
//! byte against the signed metadata.

use axum::body::Body;
use axum::extract::{Extension, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use nanofleet_api::{Api, Error};
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};

use crate::ApiError;

/// The verified client certificate of the connection, if the client sent one.
#[derive(Debug, Clone, Default)]
pub struct PeerCert(pub Option<Vec<u8>>);

/// Who fetches firmware, for the log.
#[derive(Debug, Clone)]
pub struct Fetcher(pub String);

/// Lets through an admitted device (by its certificate) or a person allowed to list
/// firmware.
pub async fn require_device_or_person(
    State(api): State<Api>,
    peer: Option<Extension<PeerCert>>,
    mut req: Request,
    next: Next,
) -> Response {
    if let Some(Extension(PeerCert(Some(der)))) = peer {
        let Some((id, serial)) = nanofleet_pki::device_identity_of(&der) else {
            return ApiError(Error::Unauthenticated("client certificate names no device".into()))
                .into_response();
        };
        if let Err(reason) = api.trust.admit(&id.device_id, &id.device_id, &serial) {
            return ApiError(Error::PermissionDenied(reason)).into_response();
        }
        req.extensions_mut().insert(Fetcher(format!("device:{}", id.device_id)));
        return next.run(req).await;
    }
    let caller = match crate::authenticate(&api, req.headers()).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = crate::allow(&caller, "FirmwareService/ListFirmware") {
        return e.into_response();
    }
    req.extensions_mut().insert(Fetcher(caller.actor().0));
    next.run(req).await
}

pub async fn metadata(State(api): State<Api>, Path(name): Path<String>, headers: HeaderMap) -> Response {
    serve(&api.firmware.metadata_dir(), &name, &headers, "application/json").await
}

pub async fn target(
    State(api): State<Api>,
    Extension(Fetcher(by)): Extension<Fetcher>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).unwrap_or("");
    tracing::debug!(%by, file = %name, range, "firmware download");
    serve(&api.firmware.targets_dir(), &name, &headers, "application/octet-stream").await
}

/// A file name as the repository writes them: letters, digits, `.`, `_`, `-`, not
/// starting with a dot.
fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// A byte range of a file of `len` bytes, from a `Range` header: `bytes=a-b`,
/// `bytes=a-` or `bytes=-n`. `Ok(None)`: no range asked (or one this server does
/// not do, several ranges: the whole file is sent). `Err`: not satisfiable.
fn byte_range(headers: &HeaderMap, len: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else { return Ok(None) };
    let Some(spec) = spec.trim().strip_prefix("bytes=") else { return Ok(None) };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.split_once('-') else { return Err(()) };
    let (a, b) = (a.trim(), b.trim());
    let range = match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(start), Ok(end)) if start <= end && start < len => (start, end.min(len - 1)),
        (Ok(start), Err(_)) if b.is_empty() && start < len => (start, len - 1),
        (Err(_), Ok(n)) if a.is_empty() && n > 0 && len > 0 => (len.saturating_sub(n), len - 1),
        _ => return Err(()),
    };
    Ok(Some(range))
}

async fn serve(
    dir: &std::path::Path,
    name: &str,
    headers: &HeaderMap,
    content_type: &'static str,
) -> Response {
    let not_found = || ApiError(Error::NotFound { what: "firmware file", id: name.into() }).into_response();
    if !safe_name(name) {
        return not_found();
    }
    let path = dir.join(name);
    let Ok(mut file) = tokio::fs::File::open(&path).await else { return not_found() };
    let Ok(meta) = file.metadata().await else { return not_found() };
    if !meta.is_file() {
        return not_found();
    }
    let len = meta.len();
    let mut resp = Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(header::ACCEPT_RANGES, "bytes")
        // timestamp.json changes in place; everything else is versioned or hashed.
        .header(
            header::CACHE_CONTROL,
            if name == "timestamp.json" { "no-store" } else { "max-age=31536000, immutable" },
        );
    let (status, start, count) = match byte_range(headers, len) {
        Ok(None) => (StatusCode::OK, 0, len),
        Ok(Some((start, end))) => {
            resp = resp.header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"));
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        Err(()) => {
            return Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(
                    header::CONTENT_RANGE,
                    HeaderValue::from_str(&format!("bytes */{len}"))
                        .unwrap_or(HeaderValue::from_static("bytes */0")),
                )
                .body(Body::empty())
                .unwrap_or_default();
        }
    };
    if start > 0 && file.seek(std::io::SeekFrom::Start(start)).await.is_err() {
        return not_found();
    }
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file.take(count), 64 * 1024));
    resp.status(status).header(header::CONTENT_LENGTH, count).body(body).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(v: &str, len: u64) -> Result<Option<(u64, u64)>, ()> {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_str(v).unwrap());
        byte_range(&h, len)
    }

    #[test]
    fn ranges_are_read_as_rfc_9110_says() {
        assert_eq!(range("bytes=0-99", 1000), Ok(Some((0, 99))));
        assert_eq!(range("bytes=500-", 1000), Ok(Some((500, 999))));
        assert_eq!(range("bytes=-100", 1000), Ok(Some((900, 999))));
        assert_eq!(range("bytes=900-5000", 1000), Ok(Some((900, 999))), "an end past the file is cut");
        assert_eq!(range("bytes=1000-", 1000), Err(()), "starting at the end is unsatisfiable");
        assert_eq!(range("bytes=5-2", 1000), Err(()));
        assert_eq!(range("bytes=0-1,5-6", 1000), Ok(None), "several ranges: the whole file");
        assert_eq!(range("items=0-1", 1000), Ok(None));
    }

    #[test]
    fn only_plain_file_names_are_served() {
        assert!(safe_name("3.targets.json"));
        assert!(safe_name("ab12.NF-200-2.4.0.img"));
        for bad in ["../repo.json", ".hidden", "a/b", "", "a%2fb"] {
            assert!(!safe_name(bad), "{bad}");
        }
    }
}
