//! Operator commands: talk gRPC to a server, print a table or JSON.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use nanofleet_api::json;
use nanofleet_proto::device::v1::{FluidLine, RunPhase, Sample};
use nanofleet_proto::v1 as pb;
use nanofleet_proto::v1::fleet_service_client::FleetServiceClient;
use nanofleet_proto::v1::telemetry_service_client::TelemetryServiceClient;
use tonic::transport::Channel;

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
    pub output: Output,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn status_error(server: &str, s: tonic::Status) -> anyhow::Error {
    match s.code() {
        tonic::Code::Unavailable => anyhow::anyhow!("server {server} unavailable: {}", s.message()),
        _ => anyhow::anyhow!("{}", s.message()),
    }
}

impl Client {
    pub async fn connect(server: &str, output: Output) -> anyhow::Result<Client> {
        let endpoint = tonic::transport::Endpoint::from_shared(server.to_owned())
            .with_context(|| format!("--server {server:?} is not a URL like http://127.0.0.1:7400"))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30));
        let channel = endpoint.connect().await.with_context(|| {
            format!("cannot reach the Nanofleet server at {server} (is `nanofleet server` or `nanofleet demo` running? set --server or NANOFLEET_SERVER)")
        })?;
        Ok(Client { channel, output })
    }

    fn fleet(&self) -> FleetServiceClient<Channel> {
        FleetServiceClient::new(self.channel.clone())
    }

    fn telemetry_client(&self) -> TelemetryServiceClient<Channel> {
        TelemetryServiceClient::new(self.channel.clone())
    }

    fn print_json(&self, v: serde_json::Value) {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    }

    pub async fn sites_list(&self, server: &str) -> anyhow::Result<()> {
        let sites =
            self.fleet().list_sites(pb::ListSitesRequest {}).await.map_err(|s| status_error(server, s))?;
        let sites = sites.into_inner().sites;
        if self.output == Output::Json {
            self.print_json(serde_json::json!({ "sites": sites.iter().map(json::site).collect::<Vec<_>>() }));
            return Ok(());
        }
        let mut t = table(["SITE", "NAME", "ONLINE", "DEVICES"]);
        for s in &sites {
            t.add_row([
                s.id.clone(),
                s.name.clone(),
                s.devices_online.to_string(),
                s.devices_total.to_string(),
            ]);
        }
        println!("{t}");
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
        println!("{t}");
        let online = devices.iter().filter(|d| d.online).count();
        println!("{} devices, {online} online", devices.len());
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
        println!("{t}");
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
        println!("{t}");
        println!(
            "{} samples from {} over the last {}{}",
            resp.samples.len(),
            resp.device_id,
            humantime::format_duration(since),
            if resp.truncated { " (truncated: raise --limit)" } else { "" }
        );
        Ok(())
    }
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
