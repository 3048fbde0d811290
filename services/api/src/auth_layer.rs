//! Authentication and the role check for every gRPC call, before any method runs.
//!
//! `nanofleet.v1` methods are looked up in [`GRPC_ACCESS`]; a method that is not
//! listed is refused. Health checks and reflection are open (they reveal no fleet
//! data). The authenticated [`Caller`] travels to the method in the request's
//! extensions, where site-scoped checks happen.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::people::{Access, Caller, GRPC_ACCESS, People, grpc_access};

/// The tower layer that wraps the gRPC router.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    people: People,
}

impl AuthLayer {
    pub fn new(people: People) -> AuthLayer {
        AuthLayer { people }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService { inner, people: self.people.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    people: People,
}

/// What a call needs before it reaches its method.
pub async fn authorize(
    people: &People,
    path: &str,
    authorization: Option<&str>,
) -> Result<Option<Caller>, tonic::Status> {
    let access = match grpc_access(path) {
        Some(a) => a,
        None if path.starts_with("/nanofleet.") => {
            return Err(tonic::Status::permission_denied(format!("{path} is not in the access table")));
        }
        // grpc.health.v1, grpc.reflection.*
        None => return Ok(None),
    };
    let roles = match access {
        Access::Device => return Ok(None),
        Access::Roles(r) => r,
    };
    let Some(header) = authorization else {
        return Err(tonic::Status::unauthenticated(
            "no credential: send `authorization: Bearer <API token>` (nanofleet --token or NANOFLEET_TOKEN)",
        ));
    };
    let bearer = header.strip_prefix("Bearer ").or_else(|| header.strip_prefix("bearer ")).unwrap_or(header);
    let caller = people.authenticate_token(bearer).await.map_err(tonic::Status::from)?;
    if !roles.contains(&caller.role) {
        let method = path.rsplit('/').next().unwrap_or(path);
        return Err(tonic::Status::permission_denied(format!(
            "role {} of {} may not call {method} (allowed: {})",
            caller.role.as_str(),
            caller.person_id,
            roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(Some(caller))
}

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The clone that was polled ready serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let people = self.people.clone();
        Box::pin(async move {
            let path = req.uri().path().to_owned();
            let header = req
                .headers()
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            match authorize(&people, &path, header.as_deref()).await {
                Ok(caller) => {
                    if let Some(c) = caller {
                        req.extensions_mut().insert(c);
                    }
                    inner.call(req).await
                }
                Err(status) => {
                    tracing::info!(%path, code = ?status.code(), message = status.message(), "call refused");
                    Ok(status.into_http())
                }
            }
        })
    }
}

/// Every method the access table names (for completeness checks).
pub fn table_methods() -> impl Iterator<Item = &'static str> {
    GRPC_ACCESS.iter().map(|(p, _)| *p)
}
