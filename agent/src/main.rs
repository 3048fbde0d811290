//! `nanofleet-agent`: run one device, or simulate a fleet.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use nanofleet_agent::fleet::{Fleet, FleetOptions};
use nanofleet_agent::hal::DeviceInfo;
use nanofleet_agent::link::{LinkOptions, run_device};
use nanofleet_agent::process;
use nanofleet_agent::seq::SeqCounter;
use nanofleet_agent::sim::{Fault, SimDevice};
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
    /// Run one device (simulated hardware) against a broker.
    ///
    /// Example: nanofleet-agent run --device-id NF-SMH-01 --site st-marys-london
    Run(RunArgs),
    /// Run a simulated fleet: many devices in this process, each with its own
    /// connection, for demos and load tests.
    ///
    /// Example: nanofleet-agent simulate --sites 3 --devices-per-site 8 --duration 60s
    Simulate(SimulateArgs),
}

#[derive(clap::Args, Debug)]
struct LinkArgs {
    /// MQTT broker as HOST:PORT (the Nanofleet server's device listener).
    #[arg(long, default_value = "127.0.0.1:7883", env = "NANOFLEET_BROKER")]
    broker: String,
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
    /// Globally unique device id (also the MQTT client id).
    #[arg(long)]
    device_id: String,
    /// Site (hospital) id the device stands in.
    #[arg(long)]
    site: String,
    #[arg(long, default_value = "NF-200")]
    model: String,
    #[arg(long, default_value = "2.3.1")]
    firmware: String,
    /// Directory for the agent's state (sequence numbers).
    #[arg(long, default_value = "/var/lib/nanofleet-agent")]
    state_dir: PathBuf,
    /// Inject a fault into the simulated hardware.
    #[arg(long, value_enum)]
    fault: Option<Fault>,
    #[command(flatten)]
    link: LinkArgs,
}

#[derive(clap::Args, Debug)]
struct SimulateArgs {
    /// Number of hospitals.
    #[arg(long, default_value_t = 3)]
    sites: usize,
    /// Devices in each hospital.
    #[arg(long, default_value_t = 8)]
    devices_per_site: usize,
    /// Fraction of devices (0 to 1) given a random fault.
    #[arg(long, default_value_t = 0.15)]
    fault_rate: f64,
    /// New connections per second while the fleet starts.
    #[arg(long, default_value_t = 2_000.0)]
    connect_rate: f64,
    /// Stop after this long (default: until Ctrl-C).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Keep sequence numbers here so a restarted simulation is not taken for re-sends.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Seed for faults and noise.
    #[arg(long, default_value_t = 42)]
    seed: u64,
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

fn link_options(a: &LinkArgs) -> LinkOptions {
    let Some((host, port)) = a.broker.rsplit_once(':') else {
        usage_error(format!("--broker {:?}: expected HOST:PORT", a.broker));
    };
    let Ok(port) = port.parse::<u16>() else {
        usage_error(format!("--broker {:?}: port {port:?} is not a number from 1 to 65535", a.broker));
    };
    if !(a.sample_hz > 0.0 && a.sample_hz <= 1_000.0) {
        usage_error(format!("--sample-hz {}: allowed 0 (exclusive) to 1000", a.sample_hz));
    }
    if a.batch < Duration::from_millis(10) || a.batch > Duration::from_secs(3600) {
        usage_error(format!("--batch {:?}: allowed 10ms to 1h", a.batch));
    }
    LinkOptions {
        broker_host: host.trim_matches(['[', ']']).to_owned(),
        broker_port: port,
        sample_interval: Duration::from_secs_f64(1.0 / a.sample_hz),
        batch_interval: a.batch,
        outbox_capacity: a.outbox.max(1),
        ..LinkOptions::default()
    }
}

async fn stop_on_signal(cancel: CancellationToken) {
    process::stop_signal().await;
    cancel.cancel();
}

fn main() {
    let cli: Cli = process::parse_args();
    process::init_tracing("nanofleet_agent=info");
    process::run_main("nanofleet-agent", run(cli));
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(a) => {
            let link = link_options(&a.link);
            if let Err(reason) = nanofleet_proto::topics::validate_device_id(&a.device_id) {
                usage_error(format!("--device-id {:?}: {reason}", a.device_id));
            }
            let info = DeviceInfo {
                device_id: a.device_id.clone(),
                site_id: a.site,
                model: a.model,
                firmware_version: a.firmware,
            };
            let seqs = SeqCounter::load(&a.state_dir, &a.device_id).context("loading sequence numbers")?;
            let mut sim = SimDevice::new(info, rand::random());
            if let Some(f) = a.fault {
                sim.inject(f);
            }
            let cancel = CancellationToken::new();
            tokio::spawn(stop_on_signal(cancel.clone()));
            tracing::info!(device_id = %a.device_id, broker = %a.link.broker, "agent running");
            run_device(sim, link, seqs, cancel, Default::default()).await?;
        }
        Command::Simulate(a) => simulate(a).await?,
    }
    Ok(())
}

async fn simulate(a: SimulateArgs) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&a.fault_rate) {
        usage_error(format!("--fault-rate {}: allowed 0 to 1", a.fault_rate));
    }
    if a.sites == 0 || a.devices_per_site == 0 {
        usage_error("--sites and --devices-per-site must be at least 1".into());
    }
    let opts = FleetOptions {
        sites: a.sites,
        devices_per_site: a.devices_per_site,
        fault_rate: a.fault_rate,
        connect_rate: a.connect_rate,
        link: link_options(&a.link),
        state_dir: a.state_dir,
        seed: a.seed,
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
