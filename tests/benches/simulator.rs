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
//! Devices read their sensors once a second and publish a telemetry batch every 5 s.
//! The harness reports connect time, memory per device in this process, memory per
//! connection in the server, and what was delivered. It measures; it asserts nothing
//! about speed or size.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nanofleet_agent::fleet::{Fleet, FleetOptions};
use nanofleet_agent::link::LinkOptions;
use serde_json::json;

// === settings ===

struct Settings {
    quick: bool,
    sites: usize,
    devices_per_site: usize,
    run: Duration,
    connect_rate: f64,
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
        Settings {
            quick,
            sites: devices.div_ceil(devices_per_site),
            devices_per_site,
            run: Duration::from_secs(if quick { 6 } else { 15 }),
            connect_rate: 2_000.0,
        }
    }

    fn devices(&self) -> usize {
        self.sites * self.devices_per_site
    }
}

// === the server process ===

/// The `nanofleet` binary of this workspace: next to this bench's profile first, then
/// release, then debug.
fn nanofleet_binary() -> anyhow::Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(profile_dir) = exe.parent().and_then(Path::parent)
    {
        candidates.push(profile_dir.join("nanofleet"));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("target"));
    candidates.push(target.join("release").join("nanofleet"));
    candidates.push(target.join("debug").join("nanofleet"));
    candidates.into_iter().find(|p| p.is_file()).with_context(|| {
        format!(
            "no nanofleet binary under {}: run `cargo build --release -p nanofleet` first",
            target.display()
        )
    })
}

fn binary_age(path: &Path) -> String {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .map_or_else(|| "unknown age".into(), |d| format!("built {} s ago", d.as_secs()))
}

/// A `nanofleet server` child process; killed if dropped while running.
struct ServerProcess {
    child: Child,
    mqtt: SocketAddr,
    http: String,
    _dir: tempfile::TempDir,
}

impl ServerProcess {
    fn start(binary: &Path) -> anyhow::Result<ServerProcess> {
        let dir = tempfile::tempdir()?;
        let mut child = Command::new(binary)
            .arg("server")
            .arg("--data-dir")
            .arg(dir.path())
            .args([
                "--grpc-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
                "--mqtt-listen",
                "127.0.0.1:0",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stderr = child.stderr.take().context("server stderr")?;
        let (tx, rx) = mpsc::channel();
        // Keeps reading the server's log so that it never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        let banner = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.starts_with("nanofleet server:") => break line,
                Ok(line) => seen.push(line),
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    anyhow::bail!("the server did not print its addresses; its output:\n{}", seen.join("\n"));
                }
            }
        };
        // Drain the rest of the log in the background.
        std::thread::spawn(move || for _ in rx {});
        let after = |word: &str| {
            let mut words = banner.split_whitespace();
            words.find(|w| *w == word).and_then(|_| words.next()).map(str::to_owned)
        };
        let mqtt = after("mqtt")
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("no mqtt address in {banner:?}"))?;
        let http = after("dashboard")
            .map(|u| u.trim_start_matches("http://").trim_end_matches('/').to_owned())
            .with_context(|| format!("no dashboard address in {banner:?}"))?;
        Ok(ServerProcess { child, mqtt, http, _dir: dir })
    }

    fn rss(&self) -> Option<u64> {
        vm_rss(&self.child.id().to_string())
    }

    fn devices_online(&self) -> Option<u64> {
        http_get_json(&self.http, "/api/fleet").ok()?.get("devices_online")?.as_u64()
    }

    /// Ctrl-C, then waits for the exit; returns the exit code and how long it took.
    fn interrupt(mut self) -> anyhow::Result<(Option<i32>, Duration)> {
        let started = Instant::now();
        let status = Command::new("kill").arg("-INT").arg(self.child.id().to_string()).status()?;
        anyhow::ensure!(status.success(), "kill -INT failed: {status}");
        let deadline = started + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok((status.code(), started.elapsed()));
            }
            if Instant::now() > deadline {
                anyhow::bail!("the server did not exit within 60 s of SIGINT");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Resident memory of a process (`self` or a pid), from `/proc/PID/status`.
fn vm_rss(pid: &str) -> Option<u64> {
    status_kb(pid, "VmRSS:")
}

fn status_kb(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A minimal HTTP/1.1 GET returning a JSON body.
fn http_get_json(addr: &str, path: &str) -> anyhow::Result<serde_json::Value> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8(raw)?;
    let (head, body) = text.split_once("\r\n\r\n").context("no end of headers")?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "GET {path}: {}", head.lines().next().unwrap_or(""));
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Ok(serde_json::from_str(&body)?)
}

fn dechunk(mut rest: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").context("bad chunk")?;
        let n = usize::from_str_radix(size.trim(), 16)?;
        if n == 0 {
            return Ok(out);
        }
        out.push_str(after.get(..n).context("short chunk")?);
        rest = after.get(n + 2..).context("short chunk")?;
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

// === the bench ===

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
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

    let server = ServerProcess::start(&binary)?;
    let server_idle = server.rss().unwrap_or(0);
    let self_before = nanofleet_agent::resident_bytes().unwrap_or(0);

    let started = Instant::now();
    let fleet = Fleet::start(&FleetOptions {
        sites: s.sites,
        devices_per_site: s.devices_per_site,
        connect_rate: s.connect_rate,
        link: LinkOptions {
            broker_host: server.mqtt.ip().to_string(),
            broker_port: server.mqtt.port(),
            sample_interval: Duration::from_secs(1),
            batch_interval: Duration::from_secs(5),
            ..LinkOptions::default()
        },
        ..FleetOptions::default()
    });
    let devices = fleet.devices.len();
    let connect_deadline = started + Duration::from_secs(120);
    while fleet.connected() < devices && Instant::now() < connect_deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connect_time = started.elapsed();
    let connected_at_start = fleet.connected();

    tokio::time::sleep(s.run).await;
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
    let (exit_code, server_stop) = tokio::task::block_in_place(|| server.interrupt())?;

    let per_device = self_after.saturating_sub(self_before) as f64 / devices.max(1) as f64;
    let per_connection = server_loaded.saturating_sub(server_idle) as f64 / connected.max(1) as f64;
    let connect_rate = connected_at_start as f64 / connect_time.as_secs_f64();

    println!();
    println!("  machine            {cores} cores; load average {load_before} before, {load_after} after");
    println!("  devices            {devices}");
    println!(
        "  connected          {connected_at_start} after {:.2} s ({connect_rate:.0} connections/s, \
         ramp limited to {:.0}/s); {connected} at the end",
        connect_time.as_secs_f64(),
        s.connect_rate
    );
    println!(
        "  server sees        {} online while running, {} after the fleet stopped",
        online_at_server.map_or("?".into(), |n| n.to_string()),
        online_after_stop.map_or("?".into(), |n| n.to_string())
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
    println!(
        "  telemetry          {} batches made, {} messages acked, {} refused, {} re-sent, {} reconnects",
        totals.telemetry_batches,
        totals.outbox.acked,
        totals.outbox.refused,
        totals.outbox.resent,
        totals.disconnects
    );
    println!("  fleet stop         {:.2} s (each device says goodbye)", fleet_stop.as_secs_f64());
    println!(
        "  server stop        exit code {} after SIGINT, {:.2} s",
        exit_code.map_or("none (signal)".into(), |c| c.to_string()),
        server_stop.as_secs_f64()
    );

    let result = json!({
        "bench": "simulator",
        "quick": s.quick,
        "cores": cores,
        "load_before": load_before,
        "load_after": load_after,
        "devices": devices,
        "connected": connected,
        "connected_at_start": connected_at_start,
        "connect_s": (connect_time.as_secs_f64() * 1000.0).round() / 1000.0,
        "connections_per_s": connect_rate.round(),
        "connect_rate_limit": s.connect_rate,
        "run_s": s.run.as_secs(),
        "simulator_rss_before_bytes": self_before,
        "simulator_rss_after_bytes": self_after,
        "simulator_rss_peak_bytes": self_peak,
        "simulator_bytes_per_device": per_device.round(),
        "server_rss_idle_bytes": server_idle,
        "server_rss_loaded_bytes": server_loaded,
        "server_bytes_per_connection": per_connection.round(),
        "server_devices_online": online_at_server,
        "server_devices_online_after_stop": online_after_stop,
        "telemetry_batches": totals.telemetry_batches,
        "acked": totals.outbox.acked,
        "refused": totals.outbox.refused,
        "resent": totals.outbox.resent,
        "disconnects": totals.disconnects,
        "fleet_stop_s": (fleet_stop.as_secs_f64() * 1000.0).round() / 1000.0,
        "server_exit_code": exit_code,
        "server_stop_s": (server_stop.as_secs_f64() * 1000.0).round() / 1000.0,
    });
    println!("RESULT {result}");
    Ok(())
}
