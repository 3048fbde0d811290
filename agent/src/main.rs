//! `nanofleet-agent`: enroll a device, run it, or simulate a fleet.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use nanofleet_agent::enroll::{self, Credentials};
use nanofleet_agent::fleet::{Fleet, FleetEnrollment, FleetOptions, Tokens};
use nanofleet_agent::hal::DeviceInfo;
use nanofleet_agent::link::{LinkOptions, parse_host_port, run_device};
use nanofleet_agent::process;
use nanofleet_agent::seq::SeqCounter;
use nanofleet_agent::sim::{Fault, SimDevice};
use nanofleet_agent::slots::HangAt;
use tokio_util::sync::CancellationToken;

/// The Nanofleet device agent.
///
/// Publishes a formulation device's telemetry and events to the Nanofleet cloud over
/// MQTT (QoS 1, protobuf, topics nf/v1/{device}/...). Unacknowledged messages are kept
/// and re-sent after a reconnect; the cloud stores each exactly once.
#[derive(Parser, Debug)]
#[command(name = "nanofleet-agent", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Enroll this device with an enrollment token from hospital IT: a key is generated
    /// here, the server signs a certificate for it, and the credentials are saved under
    /// the state directory (identity/) for `run`.
    ///
    /// Example: nanofleet-agent enroll --server https://fleet.example.org:7400 --token nfe1.… --state-dir /var/lib/nanofleet-agent
    Enroll(EnrollArgs),
    /// Run one device (simulated hardware). Enrolled, it connects over mutual TLS and
    /// renews its certificate by itself; otherwise in plaintext, which only a
    /// development listener accepts.
    ///
    /// Example: nanofleet-agent run --state-dir /var/lib/nanofleet-agent
    Run(RunArgs),
    /// Run a simulated fleet: many devices in this process, each with its own
    /// connection, for demos and load tests.
    ///
    /// Example: nanofleet-agent simulate --sites 3 --devices-per-site 8 --duration 60s
    Simulate(SimulateArgs),
    /// Write a firmware image the simulated device can install (for demos and tests
    /// of rollouts), with an optional fault built in.
    ///
    /// Example: nanofleet-agent sim-image --version 2.4.0 --out nf200-2.4.0.img
    // Its --version is the image's; the agent's own is `nanofleet-agent --version`.
    #[command(disable_version_flag = true)]
    SimImage(SimImageArgs),
}

#[derive(clap::Args, Debug)]
struct SimImageArgs {
    #[arg(long, default_value = "NF-200")]
    model: String,
    #[arg(long)]
    version: String,
    /// What the image's header says of its release counter (the signed release
    /// metadata is what devices check).
    #[arg(long, default_value_t = 1)]
    release_counter: u64,
    /// A fault built in: health (boots, fails its health check), no-boot, or qc
    /// (boots and passes its health check, but its batches come out worse).
    #[arg(long, value_parser = ["none", "health", "no-boot", "qc"], default_value = "none")]
    fault: String,
    /// Payload bytes after the header.
    #[arg(long, default_value_t = 1_048_576)]
    size: usize,
    /// Where to write it.
    #[arg(long)]
    out: PathBuf,
}

/// The development broker: the server's loopback plaintext listener.
const DEV_BROKER: &str = "127.0.0.1:7883";

#[derive(clap::Args, Debug)]
struct EnrollArgs {
    /// The Nanofleet server's gRPC address, https://HOST:PORT.
    #[arg(long)]
    server: String,
    /// The enrollment token (nfe1.ID.SECRET.FINGERPRINT). The environment variable keeps
    /// it out of the shell history.
    #[arg(long, env = "NANOFLEET_ENROLL_TOKEN", hide_env_values = true)]
    token: String,
    /// Directory for the agent's state; the credentials go to its identity/ directory.
    #[arg(long, default_value = "/var/lib/nanofleet-agent")]
    state_dir: PathBuf,
    #[arg(long, default_value = "NF-200")]
    model: String,
    /// Hardware serial number, for the server's records (default: this host's name).
    #[arg(long)]
    hardware_serial: Option<String>,
    /// Replace credentials the state directory already holds (once the new enrollment
    /// has succeeded).
    #[arg(long)]
    force: bool,
    /// The result as text for people, or one JSON object for scripts.
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(clap::Args, Debug)]
struct LinkArgs {
    /// MQTT broker as HOST:PORT. Default: the address the server gave at enrollment,
    /// or the development listener 127.0.0.1:7883 without enrollment.
    #[arg(long, env = "NANOFLEET_BROKER")]
    broker: Option<String>,
    /// Sensor readings per second.
    #[arg(long, default_value_t = 10.0)]
    sample_hz: f64,
    /// Time covered by one telemetry batch, e.g. 1s or 500ms.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    batch: Duration,
    /// Messages kept while the cloud is unreachable; the oldest are dropped beyond it.
    #[arg(long, default_value_t = 10_000)]
    outbox: usize,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Globally unique device id (also the MQTT client id). Enrolled devices take it
    /// from their credentials; if given, it must agree with them.
    #[arg(long)]
    device_id: Option<String>,
    /// Site (hospital) id the device stands in. Enrolled devices take it from their
    /// credentials; if given, it must agree with them.
    #[arg(long)]
    site: Option<String>,
    #[arg(long, default_value = "NF-200")]
    model: String,
    #[arg(long, default_value = "2.3.1")]
    firmware: String,
    /// Directory for the agent's state: credentials (identity/) and sequence numbers.
    #[arg(long, default_value = "/var/lib/nanofleet-agent")]
    state_dir: PathBuf,
    /// Inject a fault into the simulated hardware.
    #[arg(long, value_enum)]
    fault: Option<Fault>,
    /// Power-cut drill: the simulated hardware hangs at this step of the next update
    /// until the process is killed (kill -9 it, then start it again without this).
    #[arg(long, value_parser = HangAt::NAMES, value_name = "STEP")]
    sim_hang_at: Option<String>,
    #[command(flatten)]
    ageing: AgeingArgs,
    #[command(flatten)]
    link: LinkArgs,
}

#[derive(clap::Args, Debug)]
struct AgeingArgs {
    /// Age faults this many times faster than real time: pump wear and slow drift then
    /// start at nothing and grow over simulated weeks (pump worn out after 21 simulated
    /// days, chamber 0.5 °C warmer per simulated week), while timestamps stay real.
    /// E.g. 2000: a real minute is about 33 simulated hours. Allowed 1 to 100000.
    /// Default: faults at full severity from the start.
    #[arg(long, value_name = "N")]
    time_scale: Option<f64>,
}

impl AgeingArgs {
    fn time_scale(&self) -> Option<f64> {
        let scale = self.time_scale?;
        if !(1.0..=100_000.0).contains(&scale) {
            usage_error(format!("--time-scale {scale}: allowed 1 to 100000"));
        }
        Some(scale)
    }
}

#[derive(clap::Args, Debug)]
struct SimulateArgs {
    /// Number of hospitals.
    #[arg(long, default_value_t = 3)]
    sites: usize,
    /// Devices in each hospital.
    #[arg(long, default_value_t = 8)]
    devices_per_site: usize,
    /// Fraction of devices (0 to 1) given a random fault. With --time-scale, at least
    /// one device of the first site also gets pump wear and one slow drift.
    #[arg(long, default_value_t = 0.15)]
    fault_rate: f64,
    #[command(flatten)]
    ageing: AgeingArgs,
    /// New connections per second while the fleet starts.
    #[arg(long, default_value_t = 2_000.0)]
    connect_rate: f64,
    /// Stop after this long (default: until Ctrl-C).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Keep sequence numbers (and credentials, when enrolling) here so a restarted
    /// simulation is not taken for re-sends and does not enroll again.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Seed for faults and noise.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Enroll every simulated device at this server (https://HOST:PORT) with --token,
    /// then connect over mutual TLS to the MQTT address it gives (unless --broker).
    #[arg(long, requires = "token")]
    enroll_server: Option<String>,
    /// One multi-use enrollment token for all simulated devices; the server assigns
    /// their ids.
    #[arg(long, requires = "enroll_server")]
    token: Option<String>,
    /// Status lines as a table for people, or one JSON object per line for scripts.
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(flatten)]
    link: LinkArgs,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Output {
    Table,
    Json,
}

fn usage_error(msg: String) -> ! {
    process::usage_error("nanofleet-agent", msg)
}

/// Link options from the flags; `broker` when `--broker` is not given.
fn link_options(a: &LinkArgs, broker: &str) -> LinkOptions {
    let broker = a.broker.as_deref().unwrap_or(broker);
    let (broker_host, broker_port) = match parse_host_port(broker) {
        Ok(hp) => hp,
        Err(e) if a.broker.is_some() => usage_error(format!("--broker {e}")),
        Err(e) => usage_error(format!("the MQTT address from enrollment, {e}; pass --broker")),
    };
    if !(a.sample_hz > 0.0 && a.sample_hz <= 1_000.0) {
        usage_error(format!("--sample-hz {}: allowed 0 (exclusive) to 1000", a.sample_hz));
    }
    if a.batch < Duration::from_millis(10) || a.batch > Duration::from_secs(3600) {
        usage_error(format!("--batch {:?}: allowed 10ms to 1h", a.batch));
    }
    LinkOptions {
        broker_host,
        broker_port,
        sample_interval: Duration::from_secs_f64(1.0 / a.sample_hz),
        batch_interval: a.batch,
        outbox_capacity: a.outbox.max(1),
        ..LinkOptions::default()
    }
}

/// Checks a server address given as `flag`: `https://HOST[:PORT]`.
fn check_server(flag: &str, server: &str) {
    let Some(rest) = server.strip_prefix("https://") else {
        usage_error(format!(
            "{flag} {server:?}: must start with https:// (the server's API is served over TLS)"
        ));
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') {
        usage_error(format!("{flag} {server:?}: expected https://HOST:PORT"));
    }
    let after_host = rest.rsplit_once(']').map_or(rest, |(_, p)| p);
    if let Some((_, port)) = after_host.rsplit_once(':')
        && !matches!(port.parse::<u16>(), Ok(p) if p > 0)
    {
        usage_error(format!("{flag} {server:?}: port {port:?} is not a number from 1 to 65535"));
    }
}

fn check_token(flag: &str, token: &str) {
    if let Err(e) = nanofleet_pki::EnrollToken::parse(token) {
        usage_error(format!("{flag}: {e}"));
    }
}

async fn stop_on_signal(cancel: CancellationToken) {
    process::stop_signal().await;
    cancel.cancel();
}

fn main() {
    nanofleet_pki::install_crypto_provider();
    let cli: Cli = process::parse_args();
    process::init_tracing("nanofleet_agent=info");
    process::run_main("nanofleet-agent", run(cli));
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Enroll(a) => enroll_device(a).await,
        Command::Run(a) => run_one(a).await,
        Command::Simulate(a) => simulate(a).await,
        Command::SimImage(a) => {
            let header = nanofleet_agent::slots::ImageHeader {
                model: a.model,
                version: a.version,
                release_counter: a.release_counter,
                fault: a.fault,
            };
            let bytes = nanofleet_agent::slots::sim_image(&header, a.size);
            std::fs::write(&a.out, &bytes).with_context(|| format!("--out {}", a.out.display()))?;
            println!(
                "{} ({} bytes, model {}, version {}, fault {})",
                a.out.display(),
                bytes.len(),
                header.model,
                header.version,
                header.fault
            );
            Ok(())
        }
    }
}

// === enroll ===

async fn enroll_device(a: EnrollArgs) -> anyhow::Result<()> {
    check_server("--server", &a.server);
    check_token("--token", &a.token);
    let dir = enroll::identity_dir(&a.state_dir);
    if !a.force {
        match Credentials::load(&dir) {
            Ok(None) => {}
            Ok(Some(c)) => usage_error(format!(
                "{} already holds the credentials of device {} (site {}); pass --force to enroll again and replace them",
                dir.display(),
                c.device_id,
                c.site_id
            )),
            Err(e) => usage_error(format!(
                "{} holds unreadable credentials ({e}); pass --force to enroll again and replace them",
                dir.display()
            )),
        }
    }
    let serial = a.hardware_serial.clone().unwrap_or_else(host_name);
    let creds = enroll::enroll(&a.server, &a.token, &a.model, &serial).await?;
    creds.save(&dir).context("saving the credentials")?;
    print_enrolled(&creds, &dir, a.output);
    Ok(())
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn print_enrolled(c: &Credentials, dir: &Path, output: Output) {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "device_id": c.device_id,
                "site_id": c.site_id,
                "not_after_unix_ms": c.not_after_ms,
                "not_after": enroll::format_ms(c.not_after_ms),
                "mqtt_address": c.mqtt_address,
                "server": c.server,
                "credentials_dir": dir,
            })
        ),
        Output::Table => {
            println!("enrolled device {} at site {}", c.device_id, c.site_id);
            println!(
                "  certificate  valid until {} (the agent renews it while running)",
                enroll::format_ms(c.not_after_ms)
            );
            println!("  mqtt         {}", c.mqtt_address);
            println!("  credentials  {}", dir.display());
        }
    }
}

// === run ===

async fn run_one(a: RunArgs) -> anyhow::Result<()> {
    let time_scale = a.ageing.time_scale();
    let dir = enroll::identity_dir(&a.state_dir);
    let creds = Credentials::load(&dir).context("loading the device credentials")?;
    let cancel = CancellationToken::new();
    let (device_id, site_id, link) = match creds {
        Some(c) => {
            for (flag, given, enrolled) in
                [("--device-id", &a.device_id, &c.device_id), ("--site", &a.site, &c.site_id)]
            {
                if let Some(given) = given
                    && given != enrolled
                {
                    usage_error(format!(
                        "{flag} {given:?}: the credentials in {} are for {enrolled:?}",
                        dir.display()
                    ));
                }
            }
            let mut link = link_options(&a.link, &c.mqtt_address);
            let tls = c.client_config_arc().context("the device credentials")?;
            let (updates, rx) = tokio::sync::watch::channel(Arc::clone(&tls));
            link.tls = Some(tls);
            link.tls_updates = Some(rx);
            tracing::info!(
                device_id = %c.device_id,
                not_after = %enroll::format_ms(c.not_after_ms),
                renew_at = %enroll::format_ms(c.renew_due_ms(c.issued_ms)),
                "enrolled: mutual TLS"
            );
            let ids = (c.device_id.clone(), c.site_id.clone());
            let mut signer = None;
            if let Some(book) = nanofleet_agent::recipes::RecipeBook::for_device(&c, Some(&a.state_dir))
                .context("the device's recipe book")?
            {
                tracing::info!(
                    trust_root_version = book.trust_root().signed.version,
                    recipes = book.recipes().count(),
                    "recipe book open"
                );
                let info = DeviceInfo {
                    device_id: c.device_id.clone(),
                    site_id: c.site_id.clone(),
                    model: a.model.clone(),
                    firmware_version: a.firmware.clone(),
                };
                let (desk, s) = nanofleet_agent::runs::desk_for_device(&c, &book, &info, Some(&a.state_dir))
                    .context("the device's run desk")?;
                link.runs = Some(Arc::new(std::sync::Mutex::new(desk)));
                signer = Some(s);
                link.recipes = Some(Arc::new(std::sync::Mutex::new(book)));
                let updates = nanofleet_agent::updates::UpdateOptions {
                    dir: a.state_dir.clone(),
                    device_id: c.device_id.clone(),
                    model: a.model.clone(),
                    factory_version: a.firmware.clone(),
                    tls: c.client_config_arc().context("TLS for firmware downloads")?,
                    tls_updates: link.tls_updates.clone(),
                    sim_hang_at: a.sim_hang_at.as_deref().and_then(HangAt::parse),
                };
                link.updates = Some(
                    nanofleet_agent::updates::UpdateDesk::start(updates)
                        .map_err(|e| anyhow::anyhow!("firmware update state: {e}"))?,
                );
            }
            tokio::spawn(enroll::keep_renewed(c, Some(dir), updates, signer, cancel.clone()));
            (ids.0, ids.1, link)
        }
        None => {
            let (Some(device_id), Some(site)) = (a.device_id, a.site) else {
                usage_error(format!(
                    "--device-id and --site are required when {} holds no credentials (enroll first: nanofleet-agent enroll)",
                    dir.display()
                ));
            };
            if let Err(reason) = nanofleet_proto::topics::validate_device_id(&device_id) {
                usage_error(format!("--device-id {device_id:?}: {reason}"));
            }
            tracing::warn!(
                state_dir = %a.state_dir.display(),
                "not enrolled: connecting in plaintext, which only a development listener accepts"
            );
            (device_id, site, link_options(&a.link, DEV_BROKER))
        }
    };
    let info =
        DeviceInfo { device_id: device_id.clone(), site_id, model: a.model, firmware_version: a.firmware };
    let seqs = SeqCounter::load(&a.state_dir, &device_id).context("loading sequence numbers")?;
    let mut sim = SimDevice::new(info, rand::random());
    if let Some(scale) = time_scale {
        sim.set_time_scale(scale);
    }
    if let Some(f) = a.fault {
        sim.inject(f);
    }
    tokio::spawn(stop_on_signal(cancel.clone()));
    let broker = format!("{}:{}", link.broker_host, link.broker_port);
    tracing::info!(%device_id, %broker, "agent running");
    run_device(sim, link, seqs, cancel, Default::default()).await?;
    Ok(())
}

// === simulate ===

async fn simulate(a: SimulateArgs) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&a.fault_rate) {
        usage_error(format!("--fault-rate {}: allowed 0 to 1", a.fault_rate));
    }
    if a.sites == 0 || a.devices_per_site == 0 {
        usage_error("--sites and --devices-per-site must be at least 1".into());
    }
    let time_scale = a.ageing.time_scale();
    let enrollment = match (a.enroll_server, a.token) {
        (Some(server), Some(token)) => {
            check_server("--enroll-server", &server);
            check_token("--token", &token);
            Some(FleetEnrollment { server, tokens: Tokens::Shared(token) })
        }
        _ => None,
    };
    let opts = FleetOptions {
        sites: a.sites,
        devices_per_site: a.devices_per_site,
        fault_rate: a.fault_rate,
        time_scale,
        connect_rate: a.connect_rate,
        link: link_options(&a.link, DEV_BROKER),
        state_dir: a.state_dir,
        seed: a.seed,
        broker_from_enrollment: enrollment.is_some() && a.link.broker.is_none(),
        enrollment,
        ..FleetOptions::default()
    };
    let rss_before = nanofleet_agent::resident_bytes().unwrap_or(0);
    let started = Instant::now();
    let fleet = Fleet::start(&opts);
    let n = fleet.devices.len();
    let cancel = CancellationToken::new();
    tokio::spawn(stop_on_signal(cancel.clone()));
    let mut every = tokio::time::interval(Duration::from_secs(2));
    every.tick().await;
    let mut last = Report::default();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = every.tick() => {}
        }
        last = Report::of(&fleet, started, rss_before, n);
        last.print(a.output);
        if a.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
    }
    fleet.stop().await;
    if matches!(a.output, Output::Table) {
        eprintln!("stopped {n} devices");
    } else {
        last.print(a.output);
    }
    Ok(())
}

#[derive(Debug, Default, serde::Serialize)]
struct Report {
    elapsed_s: f64,
    devices: usize,
    connected: usize,
    telemetry_batches: u64,
    acked: u64,
    queued: usize,
    resent: u64,
    refused: u64,
    rss_bytes: u64,
    rss_bytes_per_device: u64,
}

impl Report {
    fn of(fleet: &Fleet, started: Instant, rss_before: u64, n: usize) -> Report {
        let totals = fleet.totals();
        let rss = nanofleet_agent::resident_bytes().unwrap_or(0);
        Report {
            elapsed_s: started.elapsed().as_secs_f64(),
            devices: n,
            connected: fleet.connected(),
            telemetry_batches: totals.telemetry_batches,
            acked: totals.outbox.acked,
            queued: totals.outbox.queued,
            resent: totals.outbox.resent,
            refused: totals.outbox.refused,
            rss_bytes: rss,
            rss_bytes_per_device: rss.saturating_sub(rss_before) / n.max(1) as u64,
        }
    }

    fn print(&self, output: Output) {
        match output {
            Output::Json => println!("{}", serde_json::to_string(self).unwrap_or_default()),
            Output::Table => println!(
                "{:>6.1}s  connected {:>6}/{:<6}  batches {:>9}  acked {:>9}  queued {:>7}  resent {:>6}  refused {:>5}  rss {:>6.1} MiB ({:.1} KiB/device)",
                self.elapsed_s,
                self.connected,
                self.devices,
                self.telemetry_batches,
                self.acked,
                self.queued,
                self.resent,
                self.refused,
                self.rss_bytes as f64 / 1048576.0,
                self.rss_bytes_per_device as f64 / 1024.0,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
