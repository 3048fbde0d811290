//! gRPC adapters: decode the request, check the caller's site, call the domain
//! object, map the error. The role check ran before, in [`crate::auth_layer`].

use std::time::Duration;

use nanofleet_proto::v1 as pb;
use nanofleet_proto::v1::audit_service_server::AuditService;
use nanofleet_proto::v1::batch_service_server::BatchService;
use nanofleet_proto::v1::enrollment_service_server::EnrollmentService;
use nanofleet_proto::v1::firmware_service_server::FirmwareService;
use nanofleet_proto::v1::fleet_service_server::FleetService;
use nanofleet_proto::v1::inventory_service_server::InventoryService;
use nanofleet_proto::v1::monitoring_service_server::MonitoringService;
use nanofleet_proto::v1::people_service_server::PeopleService;
use nanofleet_proto::v1::recipe_service_server::RecipeService;
use nanofleet_proto::v1::rollout_service_server::RolloutService;
use nanofleet_proto::v1::telemetry_service_server::TelemetryService;
use tonic::{Request, Response, Status};

use crate::now_ms;
use crate::{Api, Caller};

/// Who is calling: the authentication layer put the [`Caller`] into the request.
fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no credential: send `authorization: Bearer <API token>`"))
}

impl Api {
    /// A device of another site is not found for a site-scoped caller.
    async fn check_device_site(&self, caller: &Caller, device_id: &str) -> Result<(), Status> {
        if caller.site_limit().is_some() {
            let d = self.fleet.device(device_id).await?;
            caller.check_device_site(device_id, &d.site_id)?;
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl FleetService for Api {
    async fn list_sites(
        &self,
        req: Request<pb::ListSitesRequest>,
    ) -> Result<Response<pb::ListSitesResponse>, Status> {
        let caller = caller(&req)?;
        let mut sites = self.fleet.sites().await?;
        if let Some(own) = caller.site_limit() {
            sites.retain(|s| s.id == own);
        }
        Ok(Response::new(pb::ListSitesResponse { sites }))
    }

    async fn list_devices(
        &self,
        req: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, Status> {
        let caller = caller(&req)?;
        let pb::ListDevicesRequest { site_id } = req.into_inner();
        let site_id = caller.listing_site(&site_id)?;
        Ok(Response::new(pb::ListDevicesResponse { devices: self.fleet.devices(Some(&site_id)).await? }))
    }

    async fn get_device(
        &self,
        req: Request<pb::GetDeviceRequest>,
    ) -> Result<Response<pb::GetDeviceResponse>, Status> {
        let caller = caller(&req)?;
        let pb::GetDeviceRequest { device_id } = req.into_inner();
        let device = self.fleet.device(&device_id).await?;
        caller.check_device_site(&device_id, &device.site_id)?;
        Ok(Response::new(pb::GetDeviceResponse { device: Some(device) }))
    }

    async fn create_site(
        &self,
        req: Request<pb::CreateSiteRequest>,
    ) -> Result<Response<pb::CreateSiteResponse>, Status> {
        let actor = caller(&req)?.actor();
        let pb::CreateSiteRequest { site_id, name, time_zone, reason } = req.into_inner();
        self.trust.create_site(&actor, &site_id, &name, &time_zone, &reason).await?;
        let site = self.fleet.sites().await?.into_iter().find(|s| s.id == site_id);
        Ok(Response::new(pb::CreateSiteResponse { site }))
    }

    async fn set_device_tags(
        &self,
        req: Request<pb::SetDeviceTagsRequest>,
    ) -> Result<Response<pb::SetDeviceTagsResponse>, Status> {
        let caller = caller(&req)?;
        let pb::SetDeviceTagsRequest { device_id, add, remove, reason } = req.into_inner();
        let device = self.fleet.set_tags(&caller, &device_id, &add, &remove, &reason).await?;
        Ok(Response::new(pb::SetDeviceTagsResponse { device: Some(device) }))
    }

    async fn set_maintenance_window(
        &self,
        req: Request<pb::SetMaintenanceWindowRequest>,
    ) -> Result<Response<pb::SetMaintenanceWindowResponse>, Status> {
        let caller = caller(&req)?;
        let pb::SetMaintenanceWindowRequest { site_id, window, reason } = req.into_inner();
        let site = self.fleet.set_window(&caller, &site_id, &window, &reason).await?;
        Ok(Response::new(pb::SetMaintenanceWindowResponse { site: Some(site) }))
    }

    async fn decommission_device(
        &self,
        req: Request<pb::DecommissionDeviceRequest>,
    ) -> Result<Response<pb::DecommissionDeviceResponse>, Status> {
        let caller = caller(&req)?;
        let actor = caller.actor();
        let pb::DecommissionDeviceRequest { device_id, reason } = req.into_inner();
        self.check_device_site(&caller, &device_id).await?;
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
        let caller = caller(&req)?;
        let actor = caller.actor();
        let pb::ReplaceDeviceRequest { device_id, reason, expires_in_seconds } = req.into_inner();
        self.check_device_site(&caller, &device_id).await?;
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
        let caller = caller(&req)?;
        let actor = caller.actor();
        let pb::CreateEnrollTokenRequest { site_id, expires_in_seconds, uses, device_id, reason } =
            req.into_inner();
        caller.check_site(&site_id)?;
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
        let caller = caller(&req)?;
        let pb::ListEnrollTokensRequest { site_id } = req.into_inner();
        let site_id = caller.listing_site(&site_id)?;
        Ok(Response::new(pb::ListEnrollTokensResponse {
            tokens: self.trust.list_tokens(Some(&site_id)).await?,
        }))
    }

    async fn revoke_enroll_token(
        &self,
        req: Request<pb::RevokeEnrollTokenRequest>,
    ) -> Result<Response<pb::RevokeEnrollTokenResponse>, Status> {
        let caller = caller(&req)?;
        let actor = caller.actor();
        let pb::RevokeEnrollTokenRequest { token_id, reason } = req.into_inner();
        caller.check_site(&self.trust.token_site(&token_id).await?)?;
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
        let caller = caller(&req)?;
        let pb::QueryTelemetryRequest { device_id, since_unix_ms, until_unix_ms, limit } = req.into_inner();
        self.check_device_site(&caller, &device_id).await?;
        let until = if until_unix_ms == 0 { now_ms() + 1 } else { until_unix_ms };
        let window = self.fleet.telemetry(&device_id, since_unix_ms, until, limit).await?;
        Ok(Response::new(pb::QueryTelemetryResponse {
            device_id,
            samples: window.samples,
            truncated: window.truncated,
        }))
    }

    async fn query_series(
        &self,
        req: Request<pb::QuerySeriesRequest>,
    ) -> Result<Response<pb::QuerySeriesResponse>, Status> {
        let caller = caller(&req)?;
        let r = req.into_inner();
        self.check_device_site(&caller, &r.device_id).await?;
        let resolution =
            pb::Resolution::try_from(r.resolution).map_err(|_| crate::Error::InvalidArgument {
                field: "resolution",
                value: r.resolution.to_string(),
                allowed: "0 (choose), 1 (raw), 2 (minute) or 3 (hour)".into(),
            })?;
        let q = crate::series::SeriesQuery {
            device_id: &r.device_id,
            metric: &r.metric,
            since_ms: r.since_unix_ms,
            until_ms: if r.until_unix_ms == 0 { now_ms() + 1 } else { r.until_unix_ms },
            resolution,
            max_points: r.max_points,
        };
        Ok(Response::new(self.fleet.series(q).await?))
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

#[tonic::async_trait]
impl PeopleService for Api {
    async fn who_am_i(
        &self,
        req: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let caller = caller(&req)?;
        Ok(Response::new(pb::WhoAmIResponse {
            person: Some(self.people.person(&caller.person_id).await?),
            credential_id: caller.credential_id,
        }))
    }

    async fn create_person(
        &self,
        req: Request<pb::CreatePersonRequest>,
    ) -> Result<Response<pb::CreatePersonResponse>, Status> {
        let caller = caller(&req)?;
        let (person, initial_password) = self.people.create_person(&caller, req.get_ref()).await?;
        Ok(Response::new(pb::CreatePersonResponse { person: Some(person), initial_password }))
    }

    async fn list_people(
        &self,
        _: Request<pb::ListPeopleRequest>,
    ) -> Result<Response<pb::ListPeopleResponse>, Status> {
        Ok(Response::new(pb::ListPeopleResponse { people: self.people.list_people().await? }))
    }

    async fn grant_role(
        &self,
        req: Request<pb::GrantRoleRequest>,
    ) -> Result<Response<pb::GrantRoleResponse>, Status> {
        let caller = caller(&req)?;
        let person = self.people.grant_role(&caller, req.get_ref()).await?;
        Ok(Response::new(pb::GrantRoleResponse { person: Some(person) }))
    }

    async fn disable_person(
        &self,
        req: Request<pb::DisablePersonRequest>,
    ) -> Result<Response<pb::DisablePersonResponse>, Status> {
        let caller = caller(&req)?;
        let pb::DisablePersonRequest { person_id, reason } = req.into_inner();
        let person = self.people.disable_person(&caller, &person_id, &reason).await?;
        Ok(Response::new(pb::DisablePersonResponse { person: Some(person) }))
    }

    async fn create_api_token(
        &self,
        req: Request<pb::CreateApiTokenRequest>,
    ) -> Result<Response<pb::CreateApiTokenResponse>, Status> {
        let caller = caller(&req)?;
        let pb::CreateApiTokenRequest { person_id, expires_in_seconds, description } = req.into_inner();
        let life = Duration::from_secs(expires_in_seconds.into());
        let (token_id, secret_token, expires_unix_ms) =
            self.people.create_api_token(&caller, &person_id, life, &description).await?;
        Ok(Response::new(pb::CreateApiTokenResponse { token_id, secret_token, expires_unix_ms }))
    }

    async fn revoke_api_token(
        &self,
        req: Request<pb::RevokeApiTokenRequest>,
    ) -> Result<Response<pb::RevokeApiTokenResponse>, Status> {
        let caller = caller(&req)?;
        let pb::RevokeApiTokenRequest { token_id, reason } = req.into_inner();
        self.people.revoke_api_token(&caller, &token_id, &reason).await?;
        Ok(Response::new(pb::RevokeApiTokenResponse {}))
    }
}

#[tonic::async_trait]
impl AuditService for Api {
    async fn list_audit(
        &self,
        req: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        Ok(Response::new(pb::ListAuditResponse { records: self.audit.list(req.get_ref()).await? }))
    }

    async fn verify_audit(
        &self,
        req: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        Ok(Response::new(self.audit.verify(&req.get_ref().external_checkpoint_json).await?))
    }
}

#[tonic::async_trait]
impl RecipeService for Api {
    async fn save_draft(
        &self,
        req: Request<pb::SaveDraftRequest>,
    ) -> Result<Response<pb::SaveDraftResponse>, Status> {
        let caller = caller(&req)?;
        let Some(recipe) = req.into_inner().recipe else {
            return Err(crate::Error::invalid("recipe", "", "a recipe").into());
        };
        let recipe = self.recipes.save_draft(&caller, recipe).await?;
        Ok(Response::new(pb::SaveDraftResponse { recipe: Some(recipe) }))
    }

    async fn sign_recipe(
        &self,
        req: Request<pb::SignRecipeRequest>,
    ) -> Result<Response<pb::SignRecipeResponse>, Status> {
        let caller = caller(&req)?;
        let recipe = self.recipes.sign(&caller, req.get_ref()).await?;
        Ok(Response::new(pb::SignRecipeResponse { recipe: Some(recipe) }))
    }

    async fn reject_recipe(
        &self,
        req: Request<pb::RejectRecipeRequest>,
    ) -> Result<Response<pb::RejectRecipeResponse>, Status> {
        let caller = caller(&req)?;
        let recipe = self.recipes.reject(&caller, req.get_ref()).await?;
        Ok(Response::new(pb::RejectRecipeResponse { recipe: Some(recipe) }))
    }

    async fn get_recipe(
        &self,
        req: Request<pb::GetRecipeRequest>,
    ) -> Result<Response<pb::GetRecipeResponse>, Status> {
        let pb::GetRecipeRequest { recipe_id, version } = req.into_inner();
        let recipe = self.recipes.version(&recipe_id, i64::from(version)).await?;
        Ok(Response::new(pb::GetRecipeResponse { recipe: Some(recipe) }))
    }

    async fn list_recipes(
        &self,
        req: Request<pb::ListRecipesRequest>,
    ) -> Result<Response<pb::ListRecipesResponse>, Status> {
        Ok(Response::new(pb::ListRecipesResponse { recipes: self.recipes.list(req.get_ref()).await? }))
    }

    async fn list_recipe_deliveries(
        &self,
        req: Request<pb::ListRecipeDeliveriesRequest>,
    ) -> Result<Response<pb::ListRecipeDeliveriesResponse>, Status> {
        let caller = caller(&req)?;
        let pb::ListRecipeDeliveriesRequest { recipe_id, version } = req.into_inner();
        let deliveries = self.recipes.deliveries(&caller, &recipe_id, i64::from(version)).await?;
        Ok(Response::new(pb::ListRecipeDeliveriesResponse { deliveries }))
    }
}

#[tonic::async_trait]
impl BatchService for Api {
    async fn start_run(
        &self,
        req: Request<pb::StartRunRequest>,
    ) -> Result<Response<pb::StartRunResponse>, Status> {
        let caller = caller(&req)?;
        Ok(Response::new(self.batches.start_run(&caller, req.get_ref()).await?))
    }

    async fn list_batches(
        &self,
        req: Request<pb::ListBatchesRequest>,
    ) -> Result<Response<pb::ListBatchesResponse>, Status> {
        let caller = caller(&req)?;
        Ok(Response::new(pb::ListBatchesResponse {
            batches: self.batches.list(&caller, req.get_ref()).await?,
        }))
    }

    async fn get_batch(
        &self,
        req: Request<pb::GetBatchRequest>,
    ) -> Result<Response<pb::GetBatchResponse>, Status> {
        let caller = caller(&req)?;
        Ok(Response::new(self.batches.get(&caller, &req.get_ref().batch_id).await?))
    }

    async fn release_batch(
        &self,
        req: Request<pb::ReleaseBatchRequest>,
    ) -> Result<Response<pb::ReleaseBatchResponse>, Status> {
        let caller = caller(&req)?;
        let summary = self.batches.release(&caller, req.get_ref()).await?;
        Ok(Response::new(pb::ReleaseBatchResponse { summary: Some(summary) }))
    }

    async fn export_batch(
        &self,
        req: Request<pb::ExportBatchRequest>,
    ) -> Result<Response<pb::ExportBatchResponse>, Status> {
        let caller = caller(&req)?;
        let format =
            pb::ExportFormat::try_from(req.get_ref().format).unwrap_or(pb::ExportFormat::Unspecified);
        let (content_type, content) = self.batches.export(&caller, &req.get_ref().batch_id, format).await?;
        Ok(Response::new(pb::ExportBatchResponse { content_type, content }))
    }
}

#[tonic::async_trait]
impl MonitoringService for Api {
    async fn get_control_chart(
        &self,
        req: Request<pb::GetControlChartRequest>,
    ) -> Result<Response<pb::GetControlChartResponse>, Status> {
        let caller = caller(&req)?;
        Ok(Response::new(self.monitoring.control_chart(&caller, req.into_inner()).await?))
    }

    async fn compare_strata(
        &self,
        req: Request<pb::CompareStrataRequest>,
    ) -> Result<Response<pb::CompareStrataResponse>, Status> {
        let caller = caller(&req)?;
        Ok(Response::new(self.monitoring.compare_strata(&caller, req.into_inner()).await?))
    }

    async fn compare_cohorts(
        &self,
        req: Request<pb::CompareCohortsRequest>,
    ) -> Result<Response<pb::CompareCohortsResponse>, Status> {
        let caller = caller(&req)?;
        Ok(Response::new(self.monitoring.compare_cohorts(&caller, req.into_inner()).await?))
    }

    async fn get_fleet_health(
        &self,
        req: Request<pb::GetFleetHealthRequest>,
    ) -> Result<Response<pb::GetFleetHealthResponse>, Status> {
        let caller = caller(&req)?;
        Ok(Response::new(self.monitoring.fleet_health(&caller, req.into_inner()).await?))
    }

    async fn list_alerts(
        &self,
        req: Request<pb::ListAlertsRequest>,
    ) -> Result<Response<pb::ListAlertsResponse>, Status> {
        let caller = caller(&req)?;
        Ok(Response::new(pb::ListAlertsResponse {
            alerts: self.monitoring.list_alerts(&caller, req.into_inner()).await?,
        }))
    }

    async fn acknowledge_alert(
        &self,
        req: Request<pb::AcknowledgeAlertRequest>,
    ) -> Result<Response<pb::AcknowledgeAlertResponse>, Status> {
        let caller = caller(&req)?;
        let pb::AcknowledgeAlertRequest { alert_id, note } = req.into_inner();
        let alert = self.monitoring.acknowledge(&caller, &alert_id, &note).await?;
        Ok(Response::new(pb::AcknowledgeAlertResponse { alert: Some(alert) }))
    }

    type WatchAlertsStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::WatchAlertsResponse, Status>> + Send>>;

    async fn watch_alerts(
        &self,
        req: Request<pb::WatchAlertsRequest>,
    ) -> Result<Response<Self::WatchAlertsStream>, Status> {
        let caller = caller(&req)?;
        let pb::WatchAlertsRequest { site_id } = req.into_inner();
        let site = match caller.site_limit() {
            Some(own) => {
                if !site_id.is_empty() {
                    caller.check_site(&site_id)?;
                }
                Some(own.to_owned())
            }
            None => (!site_id.is_empty()).then_some(site_id),
        };
        let (mut rx, stop) = self.monitoring.watch_alerts();
        let (tx, out) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tx.closed() => return,
                    next = rx.recv() => next,
                };
                let alert = match next {
                    Ok(a) => a,
                    // A watcher that fell behind is told so and may list to catch up.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let status = Status::data_loss(format!(
                            "{n} alert changes were missed: list alerts to catch up"
                        ));
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                if site.as_ref().is_some_and(|s| *s != alert.site_id) {
                    continue;
                }
                if tx.send(Ok(pb::WatchAlertsResponse { alert: Some(alert) })).await.is_err() {
                    return;
                }
            }
        });
        let mut out = out;
        Ok(Response::new(Box::pin(futures::stream::poll_fn(move |cx| out.poll_recv(cx)))))
    }
}

#[tonic::async_trait]
impl FirmwareService for Api {
    async fn upload_firmware(
        &self,
        req: Request<tonic::Streaming<pb::UploadFirmwareRequest>>,
    ) -> Result<Response<pb::UploadFirmwareResponse>, Status> {
        use futures::StreamExt as _;
        use pb::upload_firmware_request::Part;
        let caller = caller(&req)?;
        let mut stream = req.into_inner();
        let header = match stream.next().await {
            Some(Ok(pb::UploadFirmwareRequest { part: Some(Part::Header(h)) })) => h,
            Some(Err(status)) => return Err(status),
            _ => {
                return Err(
                    crate::Error::invalid("part", "chunk", "a header first, then the image bytes").into()
                );
            }
        };
        let chunks = stream.map(|m| match m {
            Ok(pb::UploadFirmwareRequest { part: Some(Part::Chunk(bytes)) }) => Ok(bytes),
            Ok(_) => Err(crate::Error::invalid("part", "header", "one header, then only chunks")),
            Err(status) => {
                Err(crate::Error::Unavailable(format!("upload interrupted: {}", status.message())))
            }
        });
        let release = self.firmware.upload(&caller, header, chunks).await?;
        Ok(Response::new(pb::UploadFirmwareResponse { release: Some(release) }))
    }

    async fn list_firmware(
        &self,
        req: Request<pb::ListFirmwareRequest>,
    ) -> Result<Response<pb::ListFirmwareResponse>, Status> {
        let pb::ListFirmwareRequest { model } = req.into_inner();
        Ok(Response::new(pb::ListFirmwareResponse { releases: self.firmware.list(&model)? }))
    }
}

#[tonic::async_trait]
impl RolloutService for Api {
    async fn create_rollout(
        &self,
        req: Request<pb::CreateRolloutRequest>,
    ) -> Result<Response<pb::CreateRolloutResponse>, Status> {
        let caller = caller(&req)?;
        let rollout = self.rollouts.create(&caller, req.into_inner()).await?;
        Ok(Response::new(pb::CreateRolloutResponse { rollout: Some(rollout) }))
    }

    async fn get_rollout(
        &self,
        req: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::GetRolloutResponse>, Status> {
        let rollout = self.rollouts.get(&req.get_ref().rollout_id, true).await?;
        Ok(Response::new(pb::GetRolloutResponse { rollout: Some(rollout) }))
    }

    async fn list_rollouts(
        &self,
        req: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
        Ok(Response::new(pb::ListRolloutsResponse {
            rollouts: self.rollouts.list(&req.get_ref().state).await?,
        }))
    }

    async fn pause_rollout(
        &self,
        req: Request<pb::PauseRolloutRequest>,
    ) -> Result<Response<pb::PauseRolloutResponse>, Status> {
        let caller = caller(&req)?;
        let pb::PauseRolloutRequest { rollout_id, reason } = req.into_inner();
        let rollout = self.rollouts.control(&caller, &rollout_id, crate::Control::Pause, &reason).await?;
        Ok(Response::new(pb::PauseRolloutResponse { rollout: Some(rollout) }))
    }

    async fn resume_rollout(
        &self,
        req: Request<pb::ResumeRolloutRequest>,
    ) -> Result<Response<pb::ResumeRolloutResponse>, Status> {
        let caller = caller(&req)?;
        let pb::ResumeRolloutRequest { rollout_id, reason } = req.into_inner();
        let rollout = self.rollouts.control(&caller, &rollout_id, crate::Control::Resume, &reason).await?;
        Ok(Response::new(pb::ResumeRolloutResponse { rollout: Some(rollout) }))
    }

    async fn cancel_rollout(
        &self,
        req: Request<pb::CancelRolloutRequest>,
    ) -> Result<Response<pb::CancelRolloutResponse>, Status> {
        let caller = caller(&req)?;
        let pb::CancelRolloutRequest { rollout_id, reason } = req.into_inner();
        let rollout = self.rollouts.control(&caller, &rollout_id, crate::Control::Cancel, &reason).await?;
        Ok(Response::new(pb::CancelRolloutResponse { rollout: Some(rollout) }))
    }

    async fn rollback_rollout(
        &self,
        req: Request<pb::RollbackRolloutRequest>,
    ) -> Result<Response<pb::RollbackRolloutResponse>, Status> {
        let caller = caller(&req)?;
        let pb::RollbackRolloutRequest { rollout_id, target, reason } = req.into_inner();
        let rollout = self.rollouts.rollback(&caller, &rollout_id, &target, &reason).await?;
        Ok(Response::new(pb::RollbackRolloutResponse { rollout: Some(rollout) }))
    }

    type WatchRolloutStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<pb::WatchRolloutResponse, Status>> + Send + 'static>,
    >;

    async fn watch_rollout(
        &self,
        req: Request<pb::WatchRolloutRequest>,
    ) -> Result<Response<Self::WatchRolloutStream>, Status> {
        let id = req.into_inner().rollout_id;
        let first = self.rollouts.get(&id, true).await?;
        let rollouts = self.rollouts.clone();
        let stream = futures::stream::unfold(
            (Some(first), rollouts, id, false),
            |(next, rollouts, id, done)| async move {
                if done {
                    return None;
                }
                let current = match next {
                    Some(r) => r,
                    None => {
                        rollouts.changed(Duration::from_secs(5)).await;
                        match rollouts.get(&id, true).await {
                            Ok(r) => r,
                            Err(e) => return Some((Err(Status::from(e)), (None, rollouts, id, true))),
                        }
                    }
                };
                let ended = matches!(current.state.as_str(), "completed" | "cancelled");
                Some((Ok(pb::WatchRolloutResponse { rollout: Some(current) }), (None, rollouts, id, ended)))
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }
}

#[tonic::async_trait]
impl InventoryService for Api {
    async fn create_cartridge_type(
        &self,
        req: Request<pb::CreateCartridgeTypeRequest>,
    ) -> Result<Response<pb::CreateCartridgeTypeResponse>, Status> {
        let caller = caller(&req)?;
        let t = req.into_inner().cartridge_type.unwrap_or_default();
        let cartridge_type = self.inventory.create_type(&caller, t).await?;
        Ok(Response::new(pb::CreateCartridgeTypeResponse { cartridge_type: Some(cartridge_type) }))
    }

    async fn list_cartridge_types(
        &self,
        _req: Request<pb::ListCartridgeTypesRequest>,
    ) -> Result<Response<pb::ListCartridgeTypesResponse>, Status> {
        Ok(Response::new(pb::ListCartridgeTypesResponse { cartridge_types: self.inventory.types().await? }))
    }

    async fn create_lot(
        &self,
        req: Request<pb::CreateLotRequest>,
    ) -> Result<Response<pb::CreateLotResponse>, Status> {
        let caller = caller(&req)?;
        let lot = self.inventory.create_lot(&caller, req.into_inner()).await?;
        Ok(Response::new(pb::CreateLotResponse { lot: Some(lot) }))
    }

    async fn release_lot(
        &self,
        req: Request<pb::ReleaseLotRequest>,
    ) -> Result<Response<pb::ReleaseLotResponse>, Status> {
        let caller = caller(&req)?;
        let lot = self.inventory.release_lot(&caller, req.into_inner()).await?;
        Ok(Response::new(pb::ReleaseLotResponse { lot: Some(lot) }))
    }

    async fn list_lots(
        &self,
        req: Request<pb::ListLotsRequest>,
    ) -> Result<Response<pb::ListLotsResponse>, Status> {
        Ok(Response::new(pb::ListLotsResponse { lots: self.inventory.lots(req.get_ref()).await? }))
    }

    async fn get_lot(&self, req: Request<pb::GetLotRequest>) -> Result<Response<pb::GetLotResponse>, Status> {
        let caller = caller(&req)?;
        Ok(Response::new(self.inventory.lot(&caller, req.get_ref()).await?))
    }

    async fn recall_lot(
        &self,
        req: Request<pb::RecallLotRequest>,
    ) -> Result<Response<pb::RecallLotResponse>, Status> {
        let caller = caller(&req)?;
        Ok(Response::new(self.inventory.recall(&caller, req.into_inner()).await?))
    }

    async fn get_deny_list_status(
        &self,
        _req: Request<pb::GetDenyListStatusRequest>,
    ) -> Result<Response<pb::GetDenyListStatusResponse>, Status> {
        Ok(Response::new(self.inventory.deny_status().await?))
    }

    async fn ship_cartridges(
        &self,
        req: Request<pb::ShipCartridgesRequest>,
    ) -> Result<Response<pb::ShipCartridgesResponse>, Status> {
        let caller = caller(&req)?;
        let shipment = self.inventory.ship(&caller, req.into_inner()).await?;
        Ok(Response::new(pb::ShipCartridgesResponse { shipment: Some(shipment) }))
    }

    async fn list_shipments(
        &self,
        req: Request<pb::ListShipmentsRequest>,
    ) -> Result<Response<pb::ListShipmentsResponse>, Status> {
        let caller = caller(&req)?;
        let shipments = self.inventory.shipments(&caller, &req.get_ref().site_id).await?;
        Ok(Response::new(pb::ListShipmentsResponse { shipments }))
    }

    async fn receive_shipment(
        &self,
        req: Request<pb::ReceiveShipmentRequest>,
    ) -> Result<Response<pb::ReceiveShipmentResponse>, Status> {
        let caller = caller(&req)?;
        Ok(Response::new(self.inventory.receive(&caller, req.into_inner()).await?))
    }

    async fn scan_cartridge(
        &self,
        req: Request<pb::ScanCartridgeRequest>,
    ) -> Result<Response<pb::ScanCartridgeResponse>, Status> {
        let caller = caller(&req)?;
        Ok(Response::new(self.inventory.scan(&caller, req.get_ref()).await?))
    }

    async fn get_cartridge(
        &self,
        req: Request<pb::GetCartridgeRequest>,
    ) -> Result<Response<pb::GetCartridgeResponse>, Status> {
        let caller = caller(&req)?;
        Ok(Response::new(self.inventory.cartridge(&caller, req.get_ref()).await?))
    }

    async fn move_cartridge(
        &self,
        req: Request<pb::MoveCartridgeRequest>,
    ) -> Result<Response<pb::MoveCartridgeResponse>, Status> {
        let caller = caller(&req)?;
        let cartridge = self.inventory.move_cartridge(&caller, req.into_inner()).await?;
        Ok(Response::new(pb::MoveCartridgeResponse { cartridge: Some(cartridge) }))
    }

    async fn get_stock(
        &self,
        req: Request<pb::GetStockRequest>,
    ) -> Result<Response<pb::GetStockResponse>, Status> {
        let caller = caller(&req)?;
        let lines = self.inventory.stock(&caller, &req.get_ref().site_id).await?;
        Ok(Response::new(pb::GetStockResponse { lines }))
    }
}
