//! Fleet simulator at scale: thousands of simulated devices in one process, each with
//! its own MQTT connection, against a `nanofleet server` running as a separate process
//! so that each side's memory is measured on its own.
//!
//! ```text
//! cargo build --release -p nanofleet          # the server binary this bench starts
//! cargo bench -p nanofleet-tests --bench simulator
//! NF_BENCH_QUICK=1 cargo bench -p nanofleet-tests --bench simulator   # smoke run
//! NF_BENCH_DEVICES=10000 cargo bench -p nanofleet-tests --bench simulator
//! ```
//!
//! The devices and the peers below connect to the server's loopback plaintext MQTT
//! listener (`--mqtt-plaintext-dev`), without client certificates; the server's fleet
//! view is read from its dashboard over HTTPS with the operator token. What mutual TLS
//! adds per connection is measured by the `mtls_connect` bench.
//!
//! Devices read their sensors once a second and publish a telemetry batch every 5 s.
//! The harness reports connect time, memory per device in this process, memory per
//! connection in the server, and what was delivered. It measures; it asserts nothing
//! about speed or size.
//!
//! Peers, in child processes of this harness against the same server: bare MQTT 5
//! clients (rumqttc, as the agent configures it) that only connect, once with the
//! client's outgoing in-flight table limited to the agent's window and once with the
//! client's default table. They show how much of a simulated device's memory is its
//! MQTT client.
//!
//! `NF_BENCH_RUN_SECS` makes it a soak (the issue's case: 10,000 devices for 600 s): the
//! server's resident memory is sampled every 10 s of the run, and the time from a
//! telemetry message's arrival at ingest to its commit is read from the server's
//! `/metrics` histogram at the start and the end of the run.
//!
//! The simulator stops ramping up early, and says so, if its resident memory passes
//! `NF_BENCH_MAX_RSS_MB` (default: 30 % of the memory available at start), so that a
//! run never drives the machine out of memory.

use nanofleet_tests::bench::*;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use anyhow::Context as _;
use nanofleet_agent::fleet::{Fleet, FleetOptions};
use nanofleet_agent::link::LinkOptions;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::json;

/// Bare clients of the peer that keeps rumqttc's default in-flight table: few, because
/// each costs megabytes.
const UNLIMITED_PEER_CLIENTS: usize = 20;

// === settings ===

struct Settings {
    quick: bool,
    sites: usize,
    devices_per_site: usize,
    run: Duration,
    connect_rate: f64,
    max_rss: u64,
}

impl Settings {
    fn from_env() -> Settings {
        let quick = std::env::var("NF_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let default = if quick { 500 } else { 5_000 };
        let devices = match std::env::var("NF_BENCH_DEVICES") {
            Ok(v) => v.trim().parse::<usize>().map(|n| n.clamp(1, 15_000)).unwrap_or_else(|_| {
                eprintln!("simulator: NF_BENCH_DEVICES={v:?} is not a whole number; using {default}");
                default
            }),
            Err(_) => default,
        };
        let devices_per_site = devices.min(100);
        let available = status_kb_in("/proc/meminfo", "MemAvailable:").unwrap_or(4 << 30);
        let max_rss =
            match std::env::var("NF_BENCH_MAX_RSS_MB").ok().and_then(|v| v.trim().parse::<u64>().ok()) {
                Some(mb) => mb << 20,
                None => available / 10 * 3,
            };
        Settings {
            quick,
            sites: devices.div_ceil(devices_per_site),
            devices_per_site,
            run: Duration::from_secs(
                env_count("NF_BENCH_RUN_SECS", if quick { 6 } else { 15 }, 1..=3_600) as u64
            ),
            connect_rate: 2_000.0,
            max_rss,
        }
    }

    fn devices(&self) -> usize {
        self.sites * self.devices_per_site
    }
}

// === peers: bare MQTT clients ===

/// What a peer child process reports.
#[derive(Debug, Clone, Copy)]
struct PeerReport {
    clients: usize,
    connected: usize,
    rss_before: u64,
    rss_after: u64,
}

impl PeerReport {
    fn per_client(&self) -> f64 {
        self.rss_after.saturating_sub(self.rss_before) as f64 / self.connected.max(1) as f64
    }
}

/// In a child process: `clients` bare connections, configured as the agent configures
/// its client, with or without the in-flight limit. Prints `PEER {json}`.
async fn peer_main(addr: SocketAddr, clients: usize, limit: Option<u16>) -> anyhow::Result<()> {
    let rss_before = nanofleet_agent::resident_bytes().unwrap_or(0);
    let connected = Arc::new(AtomicUsize::new(0));
    let window = LinkOptions::default().window;
    let mut handles = Vec::with_capacity(clients);
    for i in 0..clients {
        let id = format!("PEER-{}-{i:05}", limit.map_or("D".into(), |l| l.to_string()));
        let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(30))
            .set_clean_start(true)
            .set_max_packet_size(Some(256 * 1024));
        if let Some(l) = limit {
            opts.set_outgoing_inflight_upper_limit(l);
        }
        let (client, mut eventloop) = AsyncClient::new(opts, window + 8);
        let up = connected.clone();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        up.fetch_add(1, Relaxed);
                    }
                    Ok(_) => {}
                    // rumqttc reconnects on the next poll.
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        handles.push(client);
        // The same ramp as the fleet's.
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while connected.load(Relaxed) < clients && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = PeerReport {
        clients,
        connected: connected.load(Relaxed),
        rss_before,
        rss_after: nanofleet_agent::resident_bytes().unwrap_or(0),
    };
    let line = json!({
        "clients": report.clients,
        "connected": report.connected,
        "rss_before": report.rss_before,
        "rss_after": report.rss_after,
    });
    println!("PEER {line}");
    for c in handles {
        let _ = c.disconnect().await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

/// Runs a peer as a child process of this harness.
fn run_peer(addr: SocketAddr, clients: usize, limit: Option<u16>) -> anyhow::Result<PeerReport> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.env("NF_BENCH_PEER_ADDR", addr.to_string()).env("NF_BENCH_PEER_CLIENTS", clients.to_string());
    if let Some(l) = limit {
        cmd.env("NF_BENCH_PEER_LIMIT", l.to_string());
    }
    let out = cmd.stderr(Stdio::inherit()).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find_map(|l| l.strip_prefix("PEER ")).context("the peer printed no report")?;
    let v: serde_json::Value = serde_json::from_str(line)?;
    let n = |k: &str| {
        v.get(k).and_then(serde_json::Value::as_u64).with_context(|| format!("peer report without {k}"))
    };
    Ok(PeerReport {
        clients: n("clients")? as usize,
        connected: n("connected")? as usize,
        rss_before: n("rss_before")?,
        rss_after: n("rss_after")?,
    })
}

// === the bench ===

#[tokio::main]
async fn main() {
    let peer = std::env::var("NF_BENCH_PEER_ADDR").ok().and_then(|a| a.parse::<SocketAddr>().ok());
    let result = match peer {
        Some(addr) => {
            let clients =
                std::env::var("NF_BENCH_PEER_CLIENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
            let limit = std::env::var("NF_BENCH_PEER_LIMIT").ok().and_then(|v| v.parse().ok());
            peer_main(addr, clients, limit).await
        }
        None => run().await,
    };
    if let Err(e) = result {
        eprintln!("simulator: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let s = Settings::from_env();
    let binary = nanofleet_binary()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load_before = load_average();
    println!(
        "simulator: {} devices ({} sites x {}), one connection each, sample 1 s, batch 5 s, run {:?}{}",
        s.devices(),
        s.sites,
        s.devices_per_site,
        s.run,
        if s.quick { " (quick)" } else { "" }
    );
    println!("  server binary      {} ({})", binary.display(), binary_age(&binary));
    println!("  memory guard       stop ramping at {:.0} MiB simulator RSS", mib(s.max_rss));

    // The fleet and the peers connect to the loopback plaintext listener, as before the
    // server required client certificates: the figures stay comparable with earlier
    // runs, and what mutual TLS costs per connection is the `mtls_connect` bench's.
    let server = ServerProcess::start(&binary, true)?;
    let mqtt = server.mqtt_plaintext.context("the server printed no plaintext MQTT address")?;
    let server_idle = server.rss().unwrap_or(0);
    let self_before = nanofleet_agent::resident_bytes().unwrap_or(0);

    let started = Instant::now();
    let fleet = Fleet::start(&FleetOptions {
        sites: s.sites,
        devices_per_site: s.devices_per_site,
        connect_rate: s.connect_rate,
        link: LinkOptions {
            sample_interval: Duration::from_secs(1),
            batch_interval: Duration::from_secs(5),
            ..LinkOptions::to_broker(mqtt)
        },
        ..FleetOptions::default()
    });
    let devices = fleet.devices.len();
    let connect_deadline = started + Duration::from_secs(120);
    let mut guard_hit = None;
    while fleet.connected() < devices && Instant::now() < connect_deadline {
        let rss = nanofleet_agent::resident_bytes().unwrap_or(0);
        if rss > s.max_rss {
            guard_hit = Some((rss, fleet.connected()));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connect_time = started.elapsed();
    let connected_at_start = fleet.connected();

    // Past the memory guard the devices still waiting to connect must not start: stop
    // the fleet now and report what was reached.
    let run_for = if guard_hit.is_some() { Duration::ZERO } else { s.run };
    const LATENCY: &str = "nanofleet_ingest_commit_seconds";
    let metrics_before = tokio::task::block_in_place(|| server.metrics()).unwrap_or_default();
    let run_started = Instant::now();
    // (seconds into the run, server RSS)
    let mut server_rss: Vec<(f64, u64)> = vec![(0.0, server.rss().unwrap_or(0))];
    while run_started.elapsed() < run_for {
        tokio::time::sleep((run_for - run_started.elapsed()).min(Duration::from_secs(10))).await;
        server_rss.push((run_started.elapsed().as_secs_f64(), server.rss().unwrap_or(0)));
    }
    let metrics_after = tokio::task::block_in_place(|| server.metrics()).unwrap_or_default();
    let (lat_before, lat_after) =
        (histogram_buckets(&metrics_before, LATENCY), histogram_buckets(&metrics_after, LATENCY));
    let commits = lat_after.last().map_or(0, |b| b.1).saturating_sub(lat_before.last().map_or(0, |b| b.1));
    let p50 = histogram_quantile(&lat_before, &lat_after, 0.5);
    let p99 = histogram_quantile(&lat_before, &lat_after, 0.99);
    // Memory growth over the second half of the run (the first holds the warm-up:
    // caches and the database's pages filling).
    let half: Vec<&(f64, u64)> =
        server_rss.iter().filter(|(t, _)| *t >= run_for.as_secs_f64() / 2.0).collect();
    let growth_mib_per_min = match (half.first(), half.last()) {
        (Some(a), Some(b)) if b.0 > a.0 => (mib(b.1) - mib(a.1)) / ((b.0 - a.0) / 60.0),
        _ => 0.0,
    };
    let connected = fleet.connected();
    let totals = fleet.totals();
    let self_after = nanofleet_agent::resident_bytes().unwrap_or(0);
    let self_peak = status_kb("self", "VmHWM:").unwrap_or(0);
    let server_loaded = server.rss().unwrap_or(0);
    let online_at_server = tokio::task::block_in_place(|| server.devices_online());
    let load_after = load_average();

    let stop_started = Instant::now();
    fleet.stop().await;
    let fleet_stop = stop_started.elapsed();
    let online_after_stop = tokio::task::block_in_place(|| server.devices_online());
    // Deaths still being stored settle within seconds; what is left after that stays.
    let settle_started = Instant::now();
    let mut online_settled = online_after_stop;
    while online_settled != Some(0) && settle_started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        online_settled = tokio::task::block_in_place(|| server.devices_online());
    }
    let settle = settle_started.elapsed();

    // The agent's limit: its window plus a birth or death beside it.
    let window = LinkOptions::default().window + 2;
    let limited = tokio::task::block_in_place(|| run_peer(mqtt, devices, u16::try_from(window).ok()));
    let unlimited = tokio::task::block_in_place(|| run_peer(mqtt, devices.min(UNLIMITED_PEER_CLIENTS), None));
    // Read once the fleet has stopped: the log line of a problem may lag behind it.
    let log_problems = server.problems();
    let (exit_code, server_stop) = tokio::task::block_in_place(|| server.interrupt())?;

    // Devices connected when memory was read: all of them, or those reached before the guard.
    let measured = if guard_hit.is_some() { connected } else { devices };
    let per_device = self_after.saturating_sub(self_before) as f64 / measured.max(1) as f64;
    let per_connection = server_loaded.saturating_sub(server_idle) as f64 / connected.max(1) as f64;
    let connect_rate = connected_at_start as f64 / connect_time.as_secs_f64();

    println!();
    println!("  machine            {cores} cores; load average {load_before} before, {load_after} after");
    println!("  devices            {devices}");
    if let Some((rss, n)) = guard_hit {
        println!(
            "  STOPPED EARLY      simulator RSS {:.0} MiB passed the guard with {n} of {devices} connected; \
             figures below are for the devices reached",
            mib(rss)
        );
    }
    println!(
        "  connected          {connected_at_start} after {:.2} s ({connect_rate:.0} connections/s, \
         ramp limited to {:.0}/s); {connected} at the end",
        connect_time.as_secs_f64(),
        s.connect_rate
    );
    let count = |n: Option<u64>| n.map_or("?".into(), |n| n.to_string());
    println!(
        "  server sees        {} online while running, {} when the fleet had stopped, {} {:.1} s later",
        count(online_at_server),
        count(online_after_stop),
        count(online_settled),
        settle.as_secs_f64()
    );
    println!(
        "  simulator memory   {:.1} MiB before, {:.1} MiB after (peak {:.1} MiB): {:.1} KiB per device",
        mib(self_before),
        mib(self_after),
        mib(self_peak),
        per_device / 1024.0
    );
    println!(
        "  server memory      {:.1} MiB idle, {:.1} MiB with the fleet: {:.1} KiB per connection",
        mib(server_idle),
        mib(server_loaded),
        per_connection / 1024.0
    );
    let bound = |v: Option<f64>| v.map_or("?".into(), |s| format!("≤ {:.0} ms", s * 1000.0));
    println!(
        "  ingest latency     arrival to commit over the run: p50 {}, p99 {} ({commits} telemetry messages)",
        bound(p50),
        bound(p99)
    );
    println!(
        "  server memory run  {} samples: first {:.1} MiB, min {:.1}, max {:.1}, last {:.1}; \
         second half {:+.2} MiB/min",
        server_rss.len(),
        mib(server_rss.first().map_or(0, |r| r.1)),
        mib(server_rss.iter().map(|r| r.1).min().unwrap_or(0)),
        mib(server_rss.iter().map(|r| r.1).max().unwrap_or(0)),
        mib(server_rss.last().map_or(0, |r| r.1)),
        growth_mib_per_min
    );
    println!(
        "  telemetry          {} batches made, {} messages acked, {} refused, {} re-sent, {} reconnects",
        totals.telemetry_batches,
        totals.outbox.acked,
        totals.outbox.refused,
        totals.outbox.resent,
        totals.disconnects
    );
    println!("  fleet stop         {:.2} s (each device says goodbye)", fleet_stop.as_secs_f64());
    let peer_line = |name: &str, p: &anyhow::Result<PeerReport>| match p {
        Ok(p) => println!(
            "  {name:<18} {:.1} KiB per connection ({} of {} connected)",
            p.per_client() / 1024.0,
            p.connected,
            p.clients
        ),
        Err(e) => println!("  {name:<18} not measured: {e:#}"),
    };
    println!("  peers: bare rumqttc v5 clients that only connect, in their own process");
    peer_line(&format!("in-flight {window}"), &limited);
    peer_line("rumqttc default", &unlimited);
    if let (Ok(l), Ok(u)) = (&limited, &unlimited) {
        println!(
            "  ratio              simulated device / bare client (in-flight {window}) = {:.2}; \
             the default table costs {:.0}x a limited one",
            per_device / l.per_client().max(1.0),
            u.per_client() / l.per_client().max(1.0)
        );
    }
    let problem_total: usize = log_problems.values().sum();
    println!("  server log         {problem_total} warnings or errors");
    for (kind, n) in &log_problems {
        println!("                     {n:>6} x {kind}");
    }
    println!(
        "  server stop        exit code {} after SIGINT, {:.2} s",
        exit_code.map_or("none (signal)".into(), |c| c.to_string()),
        server_stop.as_secs_f64()
    );

    let peer_json = |p: &anyhow::Result<PeerReport>| {
        p.as_ref().ok().map(|p| json!({ "clients": p.clients, "connected": p.connected, "bytes_per_connection": p.per_client().round() }))
    };
    let result = json!({
        "bench": "simulator",
        "quick": s.quick,
        "cores": cores,
        "load_before": load_before,
        "load_after": load_after,
        "devices": devices,
        "stopped_early_by_memory_guard": guard_hit.is_some(),
        "memory_guard_bytes": s.max_rss,
        "connected": connected,
        "connected_at_start": connected_at_start,
        "connect_s": (connect_time.as_secs_f64() * 1000.0).round() / 1000.0,
        "connections_per_s": connect_rate.round(),
        "connect_rate_limit": s.connect_rate,
        "run_s": run_for.as_secs(),
        "ingest_commit_p50_s_at_most": p50,
        "ingest_commit_p99_s_at_most": p99,
        "ingest_commits_measured": commits,
        "server_rss_series": server_rss.iter().map(|(t, b)| json!([t.round(), b])).collect::<Vec<_>>(),
        "server_rss_growth_second_half_mib_per_min": (growth_mib_per_min * 100.0).round() / 100.0,
        "simulator_rss_before_bytes": self_before,
        "simulator_rss_after_bytes": self_after,
        "simulator_rss_peak_bytes": self_peak,
        "simulator_bytes_per_device": per_device.round(),
        "server_rss_idle_bytes": server_idle,
        "server_rss_loaded_bytes": server_loaded,
        "server_bytes_per_connection": per_connection.round(),
        "server_devices_online": online_at_server,
        "server_devices_online_after_stop": online_after_stop,
        "server_devices_online_settled": online_settled,
        "settle_s": (settle.as_secs_f64() * 10.0).round() / 10.0,
        "server_log_problems": log_problems,
        "telemetry_batches": totals.telemetry_batches,
        "acked": totals.outbox.acked,
        "refused": totals.outbox.refused,
        "resent": totals.outbox.resent,
        "disconnects": totals.disconnects,
        "fleet_stop_s": (fleet_stop.as_secs_f64() * 1000.0).round() / 1000.0,
        "peer_bare_client_limited": peer_json(&limited),
        "peer_bare_client_default": peer_json(&unlimited),
        "server_exit_code": exit_code,
        "server_stop_s": (server_stop.as_secs_f64() * 1000.0).round() / 1000.0,
    });
    println!("RESULT {result}");
    Ok(())
}
