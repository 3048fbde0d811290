//! Enrollment at scale: devices enrolling through the real gRPC `Enroll` path against a
//! `nanofleet server` in a separate process, with one multi-use enrollment token.
//!
//! ```text
//! cargo build --release -p nanofleet          # the server binary this bench starts
//! cargo bench -p nanofleet-tests --bench enroll
//! NF_BENCH_QUICK=1 cargo bench -p nanofleet-tests --bench enroll   # smoke run
//! NF_BENCH_DEVICES=5000 NF_BENCH_CONCURRENCY=64 cargo bench -p nanofleet-tests --bench enroll
//! ```
//!
//! Each enrollment is what a device does, `nanofleet_agent::enroll::enroll`: a new P-256
//! key and CSR, a new TLS connection that trusts only the root named by the token (first
//! contact, no certificate yet), and the `Enroll` call; the server checks the token,
//! signs a certificate and commits the device, its certificate, the token's use and an
//! audit record. `NF_BENCH_CONCURRENCY` (32) enrollments are under way at a time. The
//! site and the token are made with the `nanofleet` CLI as an operator would.
//!
//! The peer, in the same run against the same server: as many first-contact
//! connections (the same pinned TLS configuration) each making one gRPC health check,
//! at the same concurrency. It is everything an enrollment costs for connecting and one
//! round trip, so the difference is what enrolling itself costs (key, CSR, signing,
//! the database commit).
//!
//! It measures; it asserts nothing about speed. It exits non-zero if an enrollment
//! failed.

use nanofleet_tests::bench::*;
use std::collections::HashSet;
use std::time::Duration;

use anyhow::Context as _;
use nanofleet_pki::{EnrollToken, tls};
use serde_json::json;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const SITE: &str = "bench-site";

// === settings ===

struct Settings {
    quick: bool,
    devices: usize,
    concurrency: usize,
}

impl Settings {
    fn from_env() -> Settings {
        let quick = quick();
        Settings {
            quick,
            // A token allows at most 10,000 uses.
            devices: env_count("NF_BENCH_DEVICES", if quick { 100 } else { 1_000 }, 1..=10_000),
            concurrency: env_count("NF_BENCH_CONCURRENCY", 32, 1..=1_024),
        }
    }
}

// === running many calls ===

const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The peer's call: a first-contact connection and one health check.
async fn connect_and_check(server: String, fingerprint: String) -> anyhow::Result<()> {
    let config = tls::pinned_client_config(&fingerprint)?;
    let channel = tls::connect_channel(&server, config).await.map_err(anyhow::Error::msg)?;
    let resp = HealthClient::new(channel)
        .check(HealthCheckRequest { service: "nanofleet.v1.EnrollmentService".into() })
        .await?
        .into_inner();
    anyhow::ensure!(
        resp.status == ServingStatus::Serving as i32,
        "EnrollmentService not serving (status {})",
        resp.status
    );
    Ok(())
}

// === the bench ===

fn main() {
    let s = Settings::from_env();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build();
    let result = rt.map_err(anyhow::Error::from).and_then(|rt| rt.block_on(run(s)));
    if let Err(e) = result {
        eprintln!("enroll: {e:#}");
        std::process::exit(1);
    }
}

async fn run(s: Settings) -> anyhow::Result<()> {
    nanofleet_pki::install_crypto_provider();
    let binary = nanofleet_binary()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load_before = load_average();
    println!(
        "enroll: {} devices through gRPC Enroll, {} at a time, one token{}",
        s.devices,
        s.concurrency,
        if s.quick { " (quick)" } else { "" }
    );
    println!("  server binary      {} ({})", binary.display(), binary_age(&binary));

    let server = ServerProcess::start(&binary, false)?;
    server.cli(&binary, &["sites", "create", SITE, "--name", "Bench site", "--reason", "enroll bench"])?;
    let uses = s.devices.to_string();
    let out = server.cli(
        &binary,
        &[
            "enroll-token",
            "create",
            "--site",
            SITE,
            "--uses",
            &uses,
            "--expires",
            "1h",
            "--reason",
            "enroll bench",
        ],
    )?;
    let token = out.lines().next().context("the CLI printed no token")?.trim().to_owned();
    let fingerprint = EnrollToken::parse(&token)?.root_fingerprint;

    let (cpu0, self0) = (cpu_secs(&server.pid()), cpu_secs("self"));
    let peer = run_concurrently(s.devices, s.concurrency, CALL_TIMEOUT, |_| {
        connect_and_check(server.grpc.clone(), fingerprint.clone())
    })
    .await;
    let (cpu1, self1) = (cpu_secs(&server.pid()), cpu_secs("self"));
    let enrolled = run_concurrently(s.devices, s.concurrency, CALL_TIMEOUT, |i| {
        let (server, token) = (server.grpc.clone(), token.clone());
        async move {
            let c =
                nanofleet_agent::enroll::enroll(&server, &token, "bench-pump", &format!("SN-{i:06}")).await?;
            Ok(c.device_id)
        }
    })
    .await;
    let (cpu2, self2) = (cpu_secs(&server.pid()), cpu_secs("self"));
    let load_after = load_average();

    let distinct = enrolled.results.iter().collect::<HashSet<_>>().len();
    let server_view = tokio::task::block_in_place(|| server.api_get("/api/fleet"));
    let devices_total = server_view.as_ref().ok().and_then(|v| v.get("devices_total")?.as_u64());
    let log_problems = server.problems();
    let (exit_code, server_stop) = tokio::task::block_in_place(|| server.interrupt())?;

    let cores_used = |cpu: f64, d: Duration| cpu / d.as_secs_f64();
    println!();
    println!("  machine            {cores} cores; load average {load_before} before, {load_after} after");
    enrolled.print("enrolled", s.devices);
    println!(
        "                     CPU: server {:.2} cores, devices (this process) {:.2} cores",
        cores_used(cpu2 - cpu1, enrolled.elapsed),
        cores_used(self2 - self1, enrolled.elapsed)
    );
    peer.print("peer: TLS + health", s.devices);
    println!(
        "                     CPU: server {:.2} cores, clients (this process) {:.2} cores",
        cores_used(cpu1 - cpu0, peer.elapsed),
        cores_used(self1 - self0, peer.elapsed)
    );
    println!(
        "  ratio              enrollments/s / (TLS connection + health check)/s = {:.2}",
        enrolled.rate() / peer.rate().max(1e-9)
    );
    println!(
        "  check              {distinct} distinct device ids; the server counts {} devices",
        devices_total.map_or("?".into(), |n| n.to_string())
    );
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

    let round2 = |v: f64| (v * 100.0).round() / 100.0;
    let mut enroll_json = enrolled.json();
    enroll_json["server_cpu_cores"] = round2(cores_used(cpu2 - cpu1, enrolled.elapsed)).into();
    enroll_json["bench_cpu_cores"] = round2(cores_used(self2 - self1, enrolled.elapsed)).into();
    let mut peer_json = peer.json();
    peer_json["server_cpu_cores"] = round2(cores_used(cpu1 - cpu0, peer.elapsed)).into();
    peer_json["bench_cpu_cores"] = round2(cores_used(self1 - self0, peer.elapsed)).into();
    let result = json!({
        "bench": "enroll",
        "quick": s.quick,
        "cores": cores,
        "load_before": load_before,
        "load_after": load_after,
        "devices": s.devices,
        "concurrency": s.concurrency,
        "enroll": enroll_json,
        "peer_tls_health_check": peer_json,
        "ratio": round2(enrolled.rate() / peer.rate().max(1e-9)),
        "distinct_device_ids": distinct,
        "server_devices_total": devices_total,
        "server_log_problems": log_problems,
        "server_exit_code": exit_code,
        "server_stop_s": round2(server_stop.as_secs_f64()),
    });
    println!("RESULT {result}");
    anyhow::ensure!(enrolled.failures == 0, "{} enrollments failed", enrolled.failures);
    Ok(())
}
