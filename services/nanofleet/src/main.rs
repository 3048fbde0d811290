//! `nanofleet`: the server, the demo and the operator CLI in one binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use nanofleet::cli::{Client, Output};
use nanofleet::demo::{self, Demo};
use nanofleet::server::{self, DEFAULT_GRPC, DEFAULT_HTTP, DEFAULT_MQTT, Server};
use nanofleet_agent::process;

/// Nanofleet: the fleet platform for point-of-care LNP formulation devices.
///
/// Start with `nanofleet demo`: a server, its embedded MQTT broker, SQLite, the web
/// dashboard and a simulated fleet of hospitals, in one process. Then ask it about the
/// fleet with the commands below, from another terminal.
#[derive(Parser, Debug)]
#[command(name = "nanofleet", version, propagate_version = true, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

const EXAMPLES: &str = "Examples:
  nanofleet demo                                  # everything, with 3 hospitals x 8 devices
  nanofleet devices list                          # every device, its presence and last values
  nanofleet devices list --site st-marys-london --output json
  nanofleet devices show NF-SMH-01
  nanofleet telemetry NF-SMH-01 --since 5m";

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server: embedded MQTT broker for devices, ingest into storage, gRPC API
    /// and web dashboard.
    Server(ServerArgs),
    /// Run the server with a simulated fleet of hospitals, in a temporary data
    /// directory unless --data-dir is given. Ctrl-C stops everything.
    Demo(DemoArgs),
    /// Sites (hospital pharmacies).
    Sites {
        #[command(subcommand)]
        command: SitesCommand,
    },
    /// Devices, their presence and last values.
    Devices {
        #[command(subcommand)]
        command: DevicesCommand,
    },
    /// Stored telemetry samples of one device.
    Telemetry(TelemetryArgs),
}

#[derive(clap::Args, Debug)]
struct ListenArgs {
    /// Directory for the database and state.
    #[arg(long, env = "NANOFLEET_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Database URL (sqlite://PATH or postgres://...); default: SQLite in --data-dir.
    #[arg(long, env = "NANOFLEET_DATABASE_URL")]
    database_url: Option<String>,
    /// gRPC API address (port 0 picks a free port).
    #[arg(long, default_value = DEFAULT_GRPC, env = "NANOFLEET_GRPC_LISTEN")]
    grpc_listen: SocketAddr,
    /// Dashboard address.
    #[arg(long, default_value = DEFAULT_HTTP, env = "NANOFLEET_HTTP_LISTEN")]
    http_listen: SocketAddr,
    /// Device MQTT address (plain TCP: keep it on loopback).
    #[arg(long, default_value = DEFAULT_MQTT, env = "NANOFLEET_MQTT_LISTEN")]
    mqtt_listen: SocketAddr,
}

#[derive(clap::Args, Debug)]
struct ServerArgs {
    #[command(flatten)]
    listen: ListenArgs,
}

#[derive(clap::Args, Debug)]
struct DemoArgs {
    #[command(flatten)]
    listen: ListenArgs,
    /// Simulated hospitals.
    #[arg(long, default_value_t = 3)]
    sites: usize,
    /// Simulated devices per hospital.
    #[arg(long, default_value_t = 8)]
    devices_per_site: usize,
    /// Fraction of devices (0 to 1) with an injected fault (clog, bubbles, pump wear, ...).
    #[arg(long, default_value_t = 0.15)]
    fault_rate: f64,
}

#[derive(clap::Args, Debug, Clone)]
struct ClientArgs {
    /// Server gRPC address.
    #[arg(long, global = true, default_value = "http://127.0.0.1:7400", env = "NANOFLEET_SERVER")]
    server: String,
    /// `table` for people, `json` for scripts.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Subcommand, Debug)]
enum SitesCommand {
    /// Every site with its online and total device counts.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand, Debug)]
enum DevicesCommand {
    /// Devices with presence, firmware, run phase, flows and alarm count.
    List {
        /// Only the devices of this site.
        #[arg(long)]
        site: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// One device in detail: presence, last values, active alarms.
    Show {
        /// Device id, e.g. NF-SMH-01.
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(clap::Args, Debug)]
struct TelemetryArgs {
    /// Device id, e.g. NF-SMH-01.
    id: String,
    /// How far back, e.g. 30s, 5m, 2h.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    since: Duration,
    /// At most this many samples (the newest); 0 means the server default (10,000).
    #[arg(long, default_value_t = 0)]
    limit: u32,
    #[command(flatten)]
    client: ClientArgs,
}

fn config_error(msg: impl std::fmt::Display) -> ! {
    process::usage_error("nanofleet", msg)
}

fn server_options(l: ListenArgs, data_dir: PathBuf) -> server::Options {
    if let Some(url) = &l.database_url
        && !["sqlite:", "postgres:", "postgresql:"].iter().any(|p| url.starts_with(p))
    {
        config_error(format!("--database-url {url:?}: allowed sqlite://PATH or postgres://USER@HOST/DB"));
    }
    let mut o = server::Options::new(data_dir);
    o.database_url = l.database_url;
    o.grpc_listen = l.grpc_listen;
    o.http_listen = l.http_listen;
    o.mqtt.listen = l.mqtt_listen;
    o
}

fn main() {
    let cli: Cli = process::parse_args();
    process::run_main("nanofleet", run(cli));
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Server(a) => {
            process::init_tracing("info,rmqtt=warn,rmqtt_net=warn");
            let Some(dir) = a.listen.data_dir.clone() else {
                config_error("--data-dir (or NANOFLEET_DATA_DIR) is required for `nanofleet server`");
            };
            let server = Server::start(&server_options(a.listen, dir)).await?;
            eprintln!(
                "nanofleet server: dashboard http://{}/  grpc http://{}  mqtt {}",
                server.http_addr, server.grpc_addr, server.mqtt_addr
            );
            process::stop_signal().await;
            server.shutdown().await;
        }
        Command::Demo(a) => {
            process::init_tracing("warn,nanofleet=info");
            if !(0.0..=1.0).contains(&a.fault_rate) {
                config_error(format!("--fault-rate {}: allowed 0 to 1", a.fault_rate));
            }
            if a.sites == 0 || a.devices_per_site == 0 || a.sites * a.devices_per_site > 10_000 {
                config_error("--sites x --devices-per-site: allowed 1 to 10,000 devices");
            }
            let started = Instant::now();
            let (dir, _temp) = match a.listen.data_dir.clone() {
                Some(d) => (d, None),
                None => {
                    let t = tempfile::Builder::new().prefix("nanofleet-demo-").tempdir()?;
                    (t.path().to_path_buf(), Some(t))
                }
            };
            let opts = demo::Options {
                server: server_options(a.listen, dir.clone()),
                sites: a.sites,
                devices_per_site: a.devices_per_site,
                fault_rate: a.fault_rate,
                sample_interval: Duration::from_millis(100),
                batch_interval: Duration::from_secs(1),
            };
            let demo = Demo::start(&opts).await?;
            println!("{}", demo.banner());
            println!("\n  data       {}\n  ready in   {} ms", dir.display(), started.elapsed().as_millis());
            process::stop_signal().await;
            eprintln!("stopping: devices say goodbye, then the server");
            demo.stop().await;
        }
        Command::Sites { command: SitesCommand::List { client } } => {
            Client::connect(&client.server, client.output).await?.sites_list(&client.server).await?;
        }
        Command::Devices { command: DevicesCommand::List { site, client } } => {
            Client::connect(&client.server, client.output).await?.devices_list(&client.server, site).await?;
        }
        Command::Devices { command: DevicesCommand::Show { id, client } } => {
            Client::connect(&client.server, client.output).await?.devices_show(&client.server, &id).await?;
        }
        Command::Telemetry(a) => {
            let c = Client::connect(&a.client.server, a.client.output).await?;
            c.telemetry(&a.client.server, &a.id, a.since, a.limit).await?;
        }
    }
    Ok(())
}
