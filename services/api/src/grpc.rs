//! gRPC adapters: decode the request, call [`Fleet`], map the error.

use std::time::{SystemTime, UNIX_EPOCH};

use nanofleet_proto::v1 as pb;
use nanofleet_proto::v1::fleet_service_server::FleetService;
use nanofleet_proto::v1::telemetry_service_server::TelemetryService;
use tonic::{Request, Response, Status};

use crate::Fleet;

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[tonic::async_trait]
impl FleetService for Fleet {
    async fn list_sites(
        &self,
        _: Request<pb::ListSitesRequest>,
    ) -> Result<Response<pb::ListSitesResponse>, Status> {
        Ok(Response::new(pb::ListSitesResponse { sites: self.sites().await? }))
    }

    async fn list_devices(
        &self,
        req: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, Status> {
        let pb::ListDevicesRequest { site_id } = req.into_inner();
        Ok(Response::new(pb::ListDevicesResponse { devices: self.devices(Some(&site_id)).await? }))
    }

    async fn get_device(
        &self,
        req: Request<pb::GetDeviceRequest>,
    ) -> Result<Response<pb::GetDeviceResponse>, Status> {
        let pb::GetDeviceRequest { device_id } = req.into_inner();
        Ok(Response::new(pb::GetDeviceResponse { device: Some(self.device(&device_id).await?) }))
    }
}

#[tonic::async_trait]
impl TelemetryService for Fleet {
    async fn query_telemetry(
        &self,
        req: Request<pb::QueryTelemetryRequest>,
    ) -> Result<Response<pb::QueryTelemetryResponse>, Status> {
        let pb::QueryTelemetryRequest { device_id, since_unix_ms, until_unix_ms, limit } = req.into_inner();
        let until = if until_unix_ms == 0 { now_ms() + 1 } else { until_unix_ms };
        let window = self.telemetry(&device_id, since_unix_ms, until, limit).await?;
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
        let s = self.ingest_stats();
        Ok(Response::new(pb::GetIngestStatsResponse {
            accepted: s.accepted,
            duplicates: s.duplicates,
            rejected: s.rejected.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            batches_committed: s.batches_committed,
            storage_errors: s.storage_errors,
        }))
    }
}
