//! gRPC adapters: decode the request, call [`Fleet`], map the error.

use std::time::{SystemTime, UNIX_EPOCH};

use std::time::Duration;

use nanofleet_proto::v1 as pb;
use nanofleet_proto::v1::enrollment_service_server::EnrollmentService;
use nanofleet_proto::v1::fleet_service_server::FleetService;
use nanofleet_proto::v1::telemetry_service_server::TelemetryService;
use tonic::{Request, Response, Status};

use crate::{Actor, Api};

/// Who is calling: the authentication layer puts an [`Actor`] into the request's
/// extensions.
fn caller<T>(req: &Request<T>) -> Actor {
    req.extensions().get::<Actor>().cloned().unwrap_or_else(|| Actor("anonymous".into()))
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[tonic::async_trait]
impl FleetService for Api {
    async fn list_sites(
        &self,
        _: Request<pb::ListSitesRequest>,
    ) -> Result<Response<pb::ListSitesResponse>, Status> {
        Ok(Response::new(pb::ListSitesResponse { sites: self.fleet.sites().await? }))
    }

    async fn list_devices(
        &self,
        req: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, Status> {
        let pb::ListDevicesRequest { site_id } = req.into_inner();
        Ok(Response::new(pb::ListDevicesResponse { devices: self.fleet.devices(Some(&site_id)).await? }))
    }

    async fn get_device(
        &self,
        req: Request<pb::GetDeviceRequest>,
    ) -> Result<Response<pb::GetDeviceResponse>, Status> {
        let pb::GetDeviceRequest { device_id } = req.into_inner();
        Ok(Response::new(pb::GetDeviceResponse { device: Some(self.fleet.device(&device_id).await?) }))
    }

    async fn create_site(
        &self,
        req: Request<pb::CreateSiteRequest>,
    ) -> Result<Response<pb::CreateSiteResponse>, Status> {
        let actor = caller(&req);
        let pb::CreateSiteRequest { site_id, name, time_zone, reason } = req.into_inner();
        self.trust.create_site(&actor, &site_id, &name, &time_zone, &reason).await?;
        let site = self.fleet.sites().await?.into_iter().find(|s| s.id == site_id);
        Ok(Response::new(pb::CreateSiteResponse { site }))
    }

    async fn decommission_device(
        &self,
        req: Request<pb::DecommissionDeviceRequest>,
    ) -> Result<Response<pb::DecommissionDeviceResponse>, Status> {
        let actor = caller(&req);
        let pb::DecommissionDeviceRequest { device_id, reason } = req.into_inner();
        self.trust.decommission(&actor, &device_id, &reason).await?;
        let disconnected = self.disconnect(&device_id).await;
        Ok(Response::new(pb::DecommissionDeviceResponse {
            device: Some(self.fleet.device(&device_id).await?),
            disconnected,
        }))
    }

    async fn replace_device(
        &self,
        req: Request<pb::ReplaceDeviceRequest>,
    ) -> Result<Response<pb::ReplaceDeviceResponse>, Status> {
        let actor = caller(&req);
        let pb::ReplaceDeviceRequest { device_id, reason, expires_in_seconds } = req.into_inner();
        let life =
            Duration::from_secs(if expires_in_seconds == 0 { 86_400 } else { expires_in_seconds.into() });
        let secret_token = self.trust.replace(&actor, &device_id, life, &reason).await?;
        self.disconnect(&device_id).await;
        Ok(Response::new(pb::ReplaceDeviceResponse {
            device: Some(self.fleet.device(&device_id).await?),
            secret_token,
        }))
    }
}

#[tonic::async_trait]
impl EnrollmentService for Api {
    async fn create_enroll_token(
        &self,
        req: Request<pb::CreateEnrollTokenRequest>,
    ) -> Result<Response<pb::CreateEnrollTokenResponse>, Status> {
        let actor = caller(&req);
        let pb::CreateEnrollTokenRequest { site_id, expires_in_seconds, uses, device_id, reason } =
            req.into_inner();
        let life =
            Duration::from_secs(if expires_in_seconds == 0 { 86_400 } else { expires_in_seconds.into() });
        let uses = if uses == 0 { 1 } else { uses };
        let (token, secret_token) =
            self.trust.create_token(&actor, &site_id, life, uses, &device_id, &reason).await?;
        Ok(Response::new(pb::CreateEnrollTokenResponse { token: Some(token), secret_token }))
    }

    async fn list_enroll_tokens(
        &self,
        req: Request<pb::ListEnrollTokensRequest>,
    ) -> Result<Response<pb::ListEnrollTokensResponse>, Status> {
        let pb::ListEnrollTokensRequest { site_id } = req.into_inner();
        Ok(Response::new(pb::ListEnrollTokensResponse {
            tokens: self.trust.list_tokens(Some(&site_id)).await?,
        }))
    }

    async fn revoke_enroll_token(
        &self,
        req: Request<pb::RevokeEnrollTokenRequest>,
    ) -> Result<Response<pb::RevokeEnrollTokenResponse>, Status> {
        let actor = caller(&req);
        let pb::RevokeEnrollTokenRequest { token_id, reason } = req.into_inner();
        let token = self.trust.revoke_token(&actor, &token_id, &reason).await?;
        Ok(Response::new(pb::RevokeEnrollTokenResponse { token: Some(token) }))
    }

    async fn enroll(&self, req: Request<pb::EnrollRequest>) -> Result<Response<pb::EnrollResponse>, Status> {
        Ok(Response::new(self.trust.enroll(req.get_ref()).await?))
    }

    async fn renew(&self, req: Request<pb::RenewRequest>) -> Result<Response<pb::RenewResponse>, Status> {
        // The device is whoever the verified client certificate says it is.
        let peer = req
            .peer_certs()
            .and_then(|certs| certs.first().and_then(|c| nanofleet_pki::device_identity_of(c.as_ref())));
        let Some((who, serial)) = peer else {
            return Err(Status::unauthenticated(
                "renewal needs the device's current client certificate (mutual TLS)",
            ));
        };
        let pb::RenewRequest { csr_der } = req.into_inner();
        Ok(Response::new(self.trust.renew(&who.device_id, &serial, &csr_der).await?))
    }
}

#[tonic::async_trait]
impl TelemetryService for Api {
    async fn query_telemetry(
        &self,
        req: Request<pb::QueryTelemetryRequest>,
    ) -> Result<Response<pb::QueryTelemetryResponse>, Status> {
        let pb::QueryTelemetryRequest { device_id, since_unix_ms, until_unix_ms, limit } = req.into_inner();
        let until = if until_unix_ms == 0 { now_ms() + 1 } else { until_unix_ms };
        let window = self.fleet.telemetry(&device_id, since_unix_ms, until, limit).await?;
        Ok(Response::new(pb::QueryTelemetryResponse {
            device_id,
            samples: window.samples,
            truncated: window.truncated,
        }))
    }

    async fn get_ingest_stats(
        &self,
        _: Request<pb::GetIngestStatsRequest>,
    ) -> Result<Response<pb::GetIngestStatsResponse>, Status> {
        let s = self.fleet.ingest_stats();
        Ok(Response::new(pb::GetIngestStatsResponse {
            accepted: s.accepted,
            duplicates: s.duplicates,
            rejected: s.rejected.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            batches_committed: s.batches_committed,
            storage_errors: s.storage_errors,
        }))
    }
}
