//! Operator commands: talk gRPC to a server, print a table or JSON.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use nanofleet_api::json;
use nanofleet_proto::device::v1::{FluidLine, RunPhase, Sample};
use nanofleet_proto::v1 as pb;
use nanofleet_proto::v1::audit_service_client::AuditServiceClient;
use nanofleet_proto::v1::enrollment_service_client::EnrollmentServiceClient;
use nanofleet_proto::v1::fleet_service_client::FleetServiceClient;
use nanofleet_proto::v1::people_service_client::PeopleServiceClient;
use nanofleet_proto::v1::telemetry_service_client::TelemetryServiceClient;
use tonic::transport::Channel;

pub mod batches;
pub mod firmware;
pub mod inventory;
pub mod monitoring;
pub mod recipes;
pub mod rollouts;

/// Prints a line on stdout; a closed pipe (`nanofleet ... | head`) is not an error.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts (the dashboard API's shapes).
    Json,
}

/// A connection to a Nanofleet server.
#[derive(Debug, Clone)]
pub struct Client {
    channel: Channel,
    bearer: Bearer,
    pub output: Output,
}

/// Adds the API token to every call.
#[derive(Debug, Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    /// Sends `token` with every call.
    pub fn new(token: &str) -> anyhow::Result<Bearer> {
        let v = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| anyhow::anyhow!("--token: not a printable API token (nfo1.ID.SECRET)"))?;
        Ok(Bearer(Some(v)))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type Authed = tonic::service::interceptor::InterceptedService<Channel, Bearer>;

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn status_error(server: &str, s: tonic::Status) -> anyhow::Error {
    match s.code() {
        tonic::Code::Unavailable => anyhow::anyhow!("server {server} unavailable: {}", s.message()),
        tonic::Code::Unauthenticated => anyhow::anyhow!(
            "{}\n(pass an API token with --token or NANOFLEET_TOKEN; the server's first start wrote one to \
             DATA_DIR/admin.token)",
            s.message()
        ),
        _ => anyhow::anyhow!("{}", s.message()),
    }
}

impl Client {
    /// Connects over TLS, checking the server's certificate against the fleet root in
    /// `ca_file`.
    pub async fn connect(
        server: &str,
        ca_file: Option<&Path>,
        token: Option<&str>,
        output: Output,
    ) -> anyhow::Result<Client> {
        nanofleet_pki::install_crypto_provider();
        if !server.starts_with("https://") {
            anyhow::bail!("--server {server:?}: must be an https:// URL like https://127.0.0.1:7400");
        }
        let Some(ca_file) = ca_file else {
            anyhow::bail!(
                "the server's TLS certificate is checked against the fleet root: pass --ca-file \
                 (or NANOFLEET_CA_FILE), the server's DATA_DIR/pki/root.pem"
            );
        };
        let roots = nanofleet_pki::tls::certs_from_file(ca_file)?;
        let config = nanofleet_pki::tls::client_config(&roots, None)?;
        let channel = nanofleet_pki::tls::connect_channel(server, config).await.map_err(|e| {
            anyhow::anyhow!(
                "{e}\n(cannot reach the Nanofleet server at {server}: is `nanofleet server` or `nanofleet demo` \
                 running? set --server or NANOFLEET_SERVER)"
            )
        })?;
        let bearer = match token {
            Some(t) => Bearer::new(t)?,
            None => Bearer(None),
        };
        Ok(Client { channel, bearer, output })
    }

    fn enrollment(&self) -> EnrollmentServiceClient<Authed> {
        EnrollmentServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    fn people(&self) -> PeopleServiceClient<Authed> {
        PeopleServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    fn audit(&self) -> AuditServiceClient<Authed> {
        AuditServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    pub async fn whoami(&self, server: &str) -> anyhow::Result<()> {
        let r = self
            .people()
            .who_am_i(pb::WhoAmIRequest {})
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner();
        let p = r.person.context("server answered without the person")?;
        if self.output == Output::Json {
            let mut v = person_json(&p);
            v["credential_id"] = r.credential_id.into();
            self.print_json(v);
        } else {
            outln!(
                "{} ({}), role {}{}, credential {}",
                p.id,
                p.display_name,
                role_name(p.role),
                if p.site_id.is_empty() { String::new() } else { format!(" at {}", p.site_id) },
                r.credential_id
            );
        }
        Ok(())
    }

    pub async fn people_add(&self, server: &str, req: pb::CreatePersonRequest) -> anyhow::Result<()> {
        let r = self.people().create_person(req).await.map_err(|s| status_error(server, s))?.into_inner();
        let p = r.person.context("server answered without the person")?;
        if self.output == Output::Json {
            let mut v = person_json(&p);
            v["initial_password"] = r.initial_password.into();
            self.print_json(v);
        } else {
            outln!("{}", r.initial_password);
            eprintln!(
                "\n{} ({}) created with role {}. The line above is their initial password, shown only now.",
                p.id,
                p.display_name,
                role_name(p.role)
            );
        }
        Ok(())
    }

    pub async fn people_list(&self, server: &str) -> anyhow::Result<()> {
        let people = self
            .people()
            .list_people(pb::ListPeopleRequest {})
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner()
            .people;
        if self.output == Output::Json {
            self.print_json(
                serde_json::json!({ "people": people.iter().map(person_json).collect::<Vec<_>>() }),
            );
            return Ok(());
        }
        let mut t = table(["PERSON", "NAME", "ROLE", "SITE", "STATE"]);
        for p in &people {
            t.add_row([
                p.id.clone(),
                p.display_name.clone(),
                role_name(p.role).into(),
                p.site_id.clone(),
                if p.disabled_unix_ms != 0 { "disabled".into() } else { "active".to_owned() },
            ]);
        }
        outln!("{t}");
        Ok(())
    }

    pub async fn people_grant(&self, server: &str, req: pb::GrantRoleRequest) -> anyhow::Result<()> {
        let p = self
            .people()
            .grant_role(req)
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner()
            .person
            .context("server answered without the person")?;
        self.report(|| person_json(&p), || format!("{} now has role {}", p.id, role_name(p.role)));
        Ok(())
    }

    pub async fn people_disable(&self, server: &str, req: pb::DisablePersonRequest) -> anyhow::Result<()> {
        let p = self
            .people()
            .disable_person(req)
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner()
            .person
            .context("server answered without the person")?;
        self.report(
            || person_json(&p),
            || format!("{} disabled: their API tokens and sessions no longer work", p.id),
        );
        Ok(())
    }

    pub async fn api_token_create(&self, server: &str, req: pb::CreateApiTokenRequest) -> anyhow::Result<()> {
        let r = self.people().create_api_token(req).await.map_err(|s| status_error(server, s))?.into_inner();
        if self.output == Output::Json {
            self.print_json(serde_json::json!({
                "token_id": r.token_id, "secret_token": r.secret_token, "expires_unix_ms": r.expires_unix_ms,
            }));
        } else {
            outln!("{}", r.secret_token);
            eprintln!(
                "\nAPI token {} until {} UTC, shown only now: export NANOFLEET_TOKEN=<the line above>",
                r.token_id,
                utc(r.expires_unix_ms)
            );
        }
        Ok(())
    }

    pub async fn api_token_revoke(&self, server: &str, req: pb::RevokeApiTokenRequest) -> anyhow::Result<()> {
        let id = req.token_id.clone();
        self.people().revoke_api_token(req).await.map_err(|s| status_error(server, s))?;
        self.report(
            || serde_json::json!({ "token_id": id, "revoked": true }),
            || format!("API token {id} revoked"),
        );
        Ok(())
    }

    pub async fn audit_list(&self, server: &str, req: pb::ListAuditRequest) -> anyhow::Result<()> {
        let records =
            self.audit().list_audit(req).await.map_err(|s| status_error(server, s))?.into_inner().records;
        if self.output == Output::Json {
            self.print_json(
                serde_json::json!({ "records": records.iter().map(audit_json).collect::<Vec<_>>() }),
            );
            return Ok(());
        }
        let mut t = table(["SEQ", "TIME (UTC)", "ACTOR", "ACTION", "SUBJECT", "SITE", "REASON", "CHANGE"]);
        for r in &records {
            let change = match (r.old_value.as_str(), r.new_value.as_str()) {
                ("", "") => String::new(),
                ("", new) => new.to_owned(),
                (old, new) => format!("{old} -> {new}"),
            };
            t.add_row([
                r.seq.to_string(),
                utc(r.at_unix_ms),
                r.actor.clone(),
                r.action.clone(),
                r.subject.clone(),
                r.site_id.clone(),
                r.reason.chars().take(60).collect(),
                change.chars().take(80).collect(),
            ]);
        }
        outln!("{t}\n{} records", records.len());
        Ok(())
    }

    /// Verifies the chain; fails (exit 1) when it is broken.
    pub async fn audit_verify(
        &self,
        server: &str,
        checkpoint: Option<&Path>,
        save: Option<&Path>,
    ) -> anyhow::Result<()> {
        let external_checkpoint_json = match checkpoint {
            Some(p) => std::fs::read_to_string(p).with_context(|| format!("--checkpoint {}", p.display()))?,
            None => String::new(),
        };
        let r = self
            .audit()
            .verify_audit(pb::VerifyAuditRequest { external_checkpoint_json })
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner();
        if let Some(path) = save
            && !r.checkpoint_json.is_empty()
        {
            std::fs::write(path, &r.checkpoint_json)
                .with_context(|| format!("--save-checkpoint {}", path.display()))?;
        }
        if self.output == Output::Json {
            self.print_json(serde_json::json!({
                "intact": r.intact, "records": r.records, "head_seq": r.head_seq, "head_hash": r.head_hash,
                "checkpoints_checked": r.checkpoints_checked, "broken_seq": r.broken_seq,
                "broken_reason": r.broken_reason,
                "checkpoint": serde_json::from_str::<serde_json::Value>(&r.checkpoint_json).unwrap_or_default(),
            }));
        } else if r.intact {
            outln!(
                "audit chain intact: {} records, head {} ({}), {} signed checkpoints checked",
                r.records,
                r.head_seq,
                &r.head_hash[..r.head_hash.len().min(16)],
                r.checkpoints_checked
            );
        }
        if !r.intact {
            anyhow::bail!("audit chain BROKEN at record {}: {}", r.broken_seq, r.broken_reason);
        }
        Ok(())
    }

    pub async fn sites_create(&self, server: &str, req: pb::CreateSiteRequest) -> anyhow::Result<()> {
        let site =
            self.fleet().create_site(req).await.map_err(|s| status_error(server, s))?.into_inner().site;
        let site = site.context("server answered without the site")?;
        self.report(|| json::site(&site), || format!("site {} ({}) created", site.id, site.name));
        Ok(())
    }

    pub async fn devices_tag(&self, server: &str, req: pb::SetDeviceTagsRequest) -> anyhow::Result<()> {
        let d = self
            .fleet()
            .set_device_tags(req)
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner()
            .device
            .context("server answered without the device")?;
        self.report(
            || json::device(&d),
            || {
                let tags = if d.tags.is_empty() { "no tags".to_owned() } else { d.tags.join(", ") };
                format!("device {}: {tags}", d.id)
            },
        );
        Ok(())
    }

    pub async fn sites_set_window(
        &self,
        server: &str,
        req: pb::SetMaintenanceWindowRequest,
    ) -> anyhow::Result<()> {
        let site = self
            .fleet()
            .set_maintenance_window(req)
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner()
            .site
            .context("server answered without the site")?;
        self.report(
            || json::site(&site),
            || {
                let w =
                    if site.maintenance_window.is_empty() { "always open" } else { &site.maintenance_window };
                format!("site {}: maintenance window {w} ({})", site.id, site.time_zone)
            },
        );
        Ok(())
    }

    pub async fn token_create(&self, server: &str, req: pb::CreateEnrollTokenRequest) -> anyhow::Result<()> {
        let resp = self
            .enrollment()
            .create_enroll_token(req)
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner();
        let token = resp.token.context("server answered without the token")?;
        if self.output == Output::Json {
            let mut v = json::enroll_token(&token, now_ms());
            v["secret_token"] = resp.secret_token.into();
            self.print_json(v);
            return Ok(());
        }
        outln!("{}", resp.secret_token);
        eprintln!(
            "\nenrollment token {} for site {}: {} use(s), expires {} UTC{}\n\
             On the device: nanofleet-agent enroll --server {server} --token <the line above>\n\
             It is shown only now; whoever holds it can enroll a device into {} until then.",
            token.id,
            token.site_id,
            token.uses_allowed,
            utc(token.expires_unix_ms),
            if token.device_id.is_empty() {
                String::new()
            } else {
                format!(", device id {}", token.device_id)
            },
            token.site_id,
        );
        Ok(())
    }

    pub async fn token_list(&self, server: &str, site: Option<String>) -> anyhow::Result<()> {
        let req = pb::ListEnrollTokensRequest { site_id: site.unwrap_or_default() };
        let tokens = self
            .enrollment()
            .list_enroll_tokens(req)
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner()
            .tokens;
        if self.output == Output::Json {
            self.print_json(
                serde_json::json!({ "tokens": tokens.iter().map(|t| json::enroll_token(t, now_ms())).collect::<Vec<_>>() }),
            );
            return Ok(());
        }
        let now = now_ms();
        let mut t = table(["TOKEN", "SITE", "DEVICE", "USES LEFT", "EXPIRES (UTC)", "STATE", "CREATED BY"]);
        for k in &tokens {
            t.add_row([
                k.id.clone(),
                k.site_id.clone(),
                if k.device_id.is_empty() { "(assigned)".into() } else { k.device_id.clone() },
                format!("{}/{}", k.uses_left, k.uses_allowed),
                utc(k.expires_unix_ms),
                json::token_state(k, now).into(),
                k.created_by.clone(),
            ]);
        }
        outln!("{t}");
        Ok(())
    }

    pub async fn token_revoke(&self, server: &str, req: pb::RevokeEnrollTokenRequest) -> anyhow::Result<()> {
        let token = self
            .enrollment()
            .revoke_enroll_token(req)
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner()
            .token
            .context("server answered without the token")?;
        self.report(
            || json::enroll_token(&token, now_ms()),
            || format!("enrollment token {} revoked", token.id),
        );
        Ok(())
    }

    pub async fn devices_decommission(
        &self,
        server: &str,
        req: pb::DecommissionDeviceRequest,
    ) -> anyhow::Result<()> {
        let resp =
            self.fleet().decommission_device(req).await.map_err(|s| status_error(server, s))?.into_inner();
        let d = resp.device.context("server answered without the device")?;
        if self.output == Output::Json {
            let mut v = json::device(&d);
            v["disconnected"] = resp.disconnected.into();
            self.print_json(v);
        } else {
            outln!(
                "device {} decommissioned: certificates revoked{}",
                d.id,
                if resp.disconnected { ", connection closed" } else { " (it was not connected)" }
            );
        }
        Ok(())
    }

    pub async fn devices_replace(&self, server: &str, req: pb::ReplaceDeviceRequest) -> anyhow::Result<()> {
        let resp = self.fleet().replace_device(req).await.map_err(|s| status_error(server, s))?.into_inner();
        let d = resp.device.context("server answered without the device")?;
        if self.output == Output::Json {
            let mut v = json::device(&d);
            v["secret_token"] = resp.secret_token.into();
            self.print_json(v);
            return Ok(());
        }
        outln!("{}", resp.secret_token);
        eprintln!(
            "\ndevice {} is being replaced: the old unit is cut off. Enroll the new unit with the token above:\n\
             nanofleet-agent enroll --server {server} --token <the line above>\n\
             It keeps the id {}, site {} and its history.",
            d.id, d.id, d.site_id
        );
        Ok(())
    }

    fn fleet(&self) -> FleetServiceClient<Authed> {
        FleetServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    pub(crate) fn telemetry_client(&self) -> TelemetryServiceClient<Authed> {
        TelemetryServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    /// Prints JSON for scripts or one line for people, as `--output` asks.
    fn report(&self, json: impl FnOnce() -> serde_json::Value, line: impl FnOnce() -> String) {
        if self.output == Output::Json {
            self.print_json(json());
        } else {
            outln!("{}", line());
        }
    }

    fn print_json(&self, v: serde_json::Value) {
        outln!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    }

    pub async fn sites_list(&self, server: &str) -> anyhow::Result<()> {
        let sites =
            self.fleet().list_sites(pb::ListSitesRequest {}).await.map_err(|s| status_error(server, s))?;
        let sites = sites.into_inner().sites;
        if self.output == Output::Json {
            self.print_json(serde_json::json!({ "sites": sites.iter().map(json::site).collect::<Vec<_>>() }));
            return Ok(());
        }
        let mut t = table(["SITE", "NAME", "ONLINE", "DEVICES", "TIME ZONE", "MAINTENANCE WINDOW"]);
        for s in &sites {
            t.add_row([
                s.id.clone(),
                s.name.clone(),
                s.devices_online.to_string(),
                s.devices_total.to_string(),
                s.time_zone.clone(),
                if s.maintenance_window.is_empty() { "always".into() } else { s.maintenance_window.clone() },
            ]);
        }
        outln!("{t}");
        Ok(())
    }

    pub async fn devices_list(&self, server: &str, site: Option<String>) -> anyhow::Result<()> {
        let req = pb::ListDevicesRequest { site_id: site.unwrap_or_default() };
        let devices =
            self.fleet().list_devices(req).await.map_err(|s| status_error(server, s))?.into_inner().devices;
        if self.output == Output::Json {
            self.print_json(
                serde_json::json!({ "devices": devices.iter().map(json::device).collect::<Vec<_>>() }),
            );
            return Ok(());
        }
        let now = now_ms();
        let mut t = table([
            "DEVICE",
            "SITE",
            "MODEL",
            "FIRMWARE",
            "PRESENCE",
            "LAST SEEN",
            "PHASE",
            "TFR mL/min",
            "FRR",
            "ALARMS",
        ]);
        for d in &devices {
            let (phase, tfr, frr) = d.last_sample.as_ref().map(summary).unwrap_or_default();
            t.add_row([
                d.id.clone(),
                d.site_id.clone(),
                d.model.clone(),
                d.firmware_version.clone(),
                if d.online { "online".into() } else { "offline".into() },
                ago(now, d.last_seen_unix_ms),
                phase,
                tfr,
                frr,
                d.active_alarms.len().to_string(),
            ]);
        }
        outln!("{t}");
        let online = devices.iter().filter(|d| d.online).count();
        outln!("{} devices, {online} online", devices.len());
        Ok(())
    }

    pub async fn devices_show(&self, server: &str, id: &str) -> anyhow::Result<()> {
        let req = pb::GetDeviceRequest { device_id: id.to_owned() };
        let resp = self.fleet().get_device(req).await.map_err(|s| status_error(server, s))?.into_inner();
        let d = resp.device.context("server answered without a device")?;
        if self.output == Output::Json {
            self.print_json(json::device(&d));
            return Ok(());
        }
        let now = now_ms();
        let mut t = table(["FIELD", "VALUE"]);
        t.add_row(["device", d.id.as_str()]);
        t.add_row(["site", d.site_id.as_str()]);
        t.add_row(["model", d.model.as_str()]);
        t.add_row(["firmware", d.firmware_version.as_str()]);
        t.add_row(["tags".to_owned(), d.tags.join(", ")]);
        t.add_row(["presence", if d.online { "online" } else { "offline" }]);
        t.add_row(["last seen".to_owned(), ago(now, d.last_seen_unix_ms)]);
        t.add_row(["connected since".to_owned(), utc(d.connected_since_unix_ms)]);
        t.add_row(["telemetry seq".to_owned(), d.telemetry_seq.to_string()]);
        if let Some(s) = &d.last_sample {
            let (phase, tfr, frr) = summary(s);
            t.add_row(["phase".to_owned(), phase]);
            t.add_row(["TFR (mL/min)".to_owned(), tfr]);
            t.add_row(["FRR (aq:eth)".to_owned(), frr]);
            for l in &s.lines {
                let name = if l.line == FluidLine::Aqueous as i32 { "aqueous" } else { "ethanol" };
                t.add_row([
                    format!("{name} flow / pressure"),
                    format!("{:.0} µL/min / {:.0} mbar", l.flow_ul_min, l.pressure_mbar),
                ]);
            }
            t.add_row(["chamber temperature".to_owned(), format!("{:.2} °C", s.chamber_temperature_c)]);
        }
        for a in &d.active_alarms {
            t.add_row(["alarm".to_owned(), a.detail.clone()]);
        }
        outln!("{t}");
        Ok(())
    }

    pub async fn telemetry(&self, server: &str, id: &str, since: Duration, limit: u32) -> anyhow::Result<()> {
        let now = now_ms();
        let req = pb::QueryTelemetryRequest {
            device_id: id.to_owned(),
            since_unix_ms: now - since.as_millis() as i64,
            until_unix_ms: 0,
            limit,
        };
        let resp = self
            .telemetry_client()
            .query_telemetry(req)
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner();
        if self.output == Output::Json {
            self.print_json(serde_json::json!({
                "device_id": resp.device_id,
                "samples": resp.samples.iter().map(json::sample).collect::<Vec<_>>(),
                "truncated": resp.truncated,
            }));
            return Ok(());
        }
        let mut t = table([
            "TIME (UTC)",
            "PHASE",
            "AQ µL/min",
            "ETH µL/min",
            "FRR",
            "TFR mL/min",
            "AQ mbar",
            "ETH mbar",
            "CHAMBER °C",
        ]);
        for s in &resp.samples {
            let (phase, tfr, frr) = summary(s);
            let line = |want: FluidLine| s.lines.iter().find(|l| l.line == want as i32);
            let flow = |want| line(want).map(|l| format!("{:.0}", l.flow_ul_min)).unwrap_or_default();
            let pres = |want| line(want).map(|l| format!("{:.0}", l.pressure_mbar)).unwrap_or_default();
            t.add_row([
                utc(s.time_unix_ms),
                phase,
                flow(FluidLine::Aqueous),
                flow(FluidLine::Ethanol),
                frr,
                tfr,
                pres(FluidLine::Aqueous),
                pres(FluidLine::Ethanol),
                format!("{:.2}", s.chamber_temperature_c),
            ]);
        }
        outln!("{t}");
        outln!(
            "{} samples from {} over the last {}{}",
            resp.samples.len(),
            resp.device_id,
            humantime::format_duration(since),
            if resp.truncated { " (truncated: raise --limit)" } else { "" }
        );
        Ok(())
    }
}

fn role_name(r: i32) -> &'static str {
    let name = pb::Role::try_from(r).unwrap_or_default().as_str_name();
    match name.strip_prefix("ROLE_").unwrap_or(name) {
        "OPS" => "ops",
        "SITE_IT" => "site-it",
        "PHARMACIST" => "pharmacist",
        "QA" => "qa",
        "AUDITOR" => "auditor",
        _ => "unspecified",
    }
}

fn person_json(p: &pb::Person) -> serde_json::Value {
    serde_json::json!({
        "id": p.id, "display_name": p.display_name, "role": role_name(p.role), "site_id": p.site_id,
        "created_unix_ms": p.created_unix_ms, "disabled_unix_ms": p.disabled_unix_ms,
    })
}

fn audit_json(r: &pb::AuditRecord) -> serde_json::Value {
    serde_json::json!({
        "seq": r.seq, "at_unix_ms": r.at_unix_ms, "actor": r.actor, "action": r.action,
        "subject": r.subject, "site_id": r.site_id, "reason": r.reason,
        "old_value": serde_json::from_str::<serde_json::Value>(&r.old_value).unwrap_or_default(),
        "new_value": serde_json::from_str::<serde_json::Value>(&r.new_value).unwrap_or_default(),
        "prev_hash": r.prev_hash, "hash": r.hash,
    })
}

fn table<const N: usize>(header: [&str; N]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY).set_header(header);
    t
}

fn summary(s: &Sample) -> (String, String, String) {
    let phase = RunPhase::try_from(s.phase).unwrap_or_default().as_str_name();
    let phase = phase.strip_prefix("RUN_PHASE_").unwrap_or(phase).to_owned();
    let flow =
        |want: FluidLine| s.lines.iter().find(|l| l.line == want as i32).map_or(0.0, |l| l.flow_ul_min);
    let (aq, et) = (flow(FluidLine::Aqueous), flow(FluidLine::Ethanol));
    let frr = if et > 100.0 { format!("{:.2}", aq / et) } else { "-".into() };
    (phase, format!("{:.2}", ((aq + et) / 1000.0).max(0.0)), frr)
}

fn utc(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:3]"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&fmt).ok())
        .unwrap_or_else(|| ms.to_string())
}

fn ago(now: i64, ms: i64) -> String {
    if ms <= 0 {
        return "never".into();
    }
    let s = (now - ms).max(0) / 1000;
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        _ => format!("{}h ago", s / 3600),
    }
}

/// `nanofleet ca show`: reads the CA files in the data directory.
pub fn ca_show(data_dir: &Path, output: Output) -> anyhow::Result<()> {
    nanofleet_pki::install_crypto_provider();
    let dir = data_dir.join("pki");
    if !dir.join("root.pem").exists() {
        anyhow::bail!("{}: no fleet CA here (the server creates it at its first start)", dir.display());
    }
    let ca = nanofleet_pki::FleetCa::open(&dir)?;
    let s = ca.summary(&ca.server_names());
    if output == Output::Json {
        outln!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    let mut t = table(["CERTIFICATE", "SUBJECT", "NOT AFTER", "SHA-256 FINGERPRINT"]);
    t.add_row(["root (pinned by devices)", &s.root.subject, &s.root.not_after, &s.root.fingerprint_sha256]);
    for (i, d) in s.devices.iter().enumerate() {
        let role = if i == 0 { "device intermediate" } else { "earlier device intermediate" };
        t.add_row([role, &d.subject, &d.not_after, &d.fingerprint_sha256]);
    }
    t.add_row(["server (TLS)", &s.server.subject, &s.server.not_after, &s.server.fingerprint_sha256]);
    outln!("{t}\nfiles in {}", s.dir.display());
    Ok(())
}

/// `nanofleet ca import`: an existing root into a data directory without a CA.
pub fn ca_import(data_dir: &Path, cert: &Path, key: &Path) -> anyhow::Result<()> {
    nanofleet_pki::install_crypto_provider();
    let read = |p: &Path| std::fs::read_to_string(p).with_context(|| format!("{}", p.display()));
    let dir = data_dir.join("pki");
    nanofleet_pki::FleetCa::import_root(&dir, &read(cert)?, &read(key)?)?;
    let ca = nanofleet_pki::FleetCa::load_or_create(&dir, &nanofleet_pki::ServerNames::default())?;
    outln!(
        "root imported into {} (sha256 {}); device intermediate and server certificate created under it",
        dir.display(),
        ca.root_fingerprint()
    );
    Ok(())
}

/// `nanofleet ca rotate`: a new device intermediate and server certificate.
pub fn ca_rotate(data_dir: &Path) -> anyhow::Result<()> {
    nanofleet_pki::install_crypto_provider();
    let dir = data_dir.join("pki");
    if !dir.join("root.pem").exists() {
        anyhow::bail!("{}: no fleet CA here (the server creates it at its first start)", dir.display());
    }
    let mut ca = nanofleet_pki::FleetCa::open(&dir)?;
    ca.rotate()?;
    outln!(
        "new device intermediate and server certificate in {}; {} intermediates trusted for device certificates. \
         Start the server again.",
        dir.display(),
        ca.device_client_roots().len()
    );
    Ok(())
}
