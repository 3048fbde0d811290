//! Time to a working demo: from starting `nanofleet demo` on a fresh data directory to
//! the dashboard banner, and on to the dashboard API reporting all 24 simulated devices
//! online (`GET /api/fleet` over HTTPS, trusting the fleet CA and with the operator
//! token the banner prints). Each run ends with Ctrl-C (SIGINT); the exit code and
//! shutdown time are reported too.
//!
//! ```text
//! cargo build --release -p nanofleet          # the binary this bench starts
//! cargo bench -p nanofleet-tests --bench demo_ready
//! NF_BENCH_QUICK=1 cargo bench -p nanofleet-tests --bench demo_ready   # smoke run
//! NF_BENCH_RUNS=20 cargo bench -p nanofleet-tests --bench demo_ready
//! ```
//!
//! It measures; it asserts nothing about speed. It exits non-zero only if a demo never
//! got all devices online or did not exit with code 0.

use nanofleet_tests::bench::*;
use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::json;

/// Devices in the default demo: 3 hospitals x 8 devices.
const DEMO_DEVICES: u64 = 24;

// === the demo process ===

/// One demo run's timings.
struct Run {
    banner: Duration,
    all_online: Duration,
    /// What the demo itself printed as `ready in N ms`.
    self_reported_ms: Option<u64>,
    exit_code: Option<i32>,
    shutdown: Duration,
}

fn kill_on_error(child: &mut Child) {
    if matches!(child.try_wait(), Ok(None)) {
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn one_run(binary: &Path) -> anyhow::Result<Run> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let log = std::fs::File::create(dir.path().join("demo.log"))?;
    let started = Instant::now();
    let mut child = Command::new(binary)
        .arg("demo")
        .arg("--data-dir")
        .arg(&data)
        .args([
            "--http-listen",
            "127.0.0.1:0",
            "--grpc-listen",
            "127.0.0.1:0",
            "--mqtt-listen",
            "127.0.0.1:0",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let result = watch(&mut child, started, &dir);
    kill_on_error(&mut child);
    result
}

fn watch(child: &mut Child, started: Instant, dir: &tempfile::TempDir) -> anyhow::Result<Run> {
    let stdout = child.stdout.take().context("demo stdout")?;
    let (tx, rx) = mpsc::channel();
    // Timestamps each line as it arrives, and keeps the pipe drained.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    let log = || std::fs::read_to_string(dir.path().join("demo.log")).unwrap_or_default();

    let deadline = started + Duration::from_secs(60);
    let next = |what: &str| {
        let left = deadline.saturating_duration_since(Instant::now());
        rx.recv_timeout(left).map_err(|_| anyhow::anyhow!("no {what} line within 60 s; log:\n{}", log()))
    };
    // `  dashboard  https://ADDR/`
    let (banner_at, http) = loop {
        let (at, line) = next("dashboard")?;
        if line.contains("dashboard") {
            let url = line.split_whitespace().find(|w| w.starts_with("https://")).unwrap_or_default();
            break (at, url.trim_start_matches("https://").trim_end_matches('/').to_owned());
        }
    };
    anyhow::ensure!(!http.is_empty(), "no dashboard address in the banner");
    // `  fleet CA   PATH (sha256 ...)`, then `  export NANOFLEET_TOKEN=...`, in the same banner.
    let mut root = None;
    let token = loop {
        let (_, line) = next("NANOFLEET_TOKEN")?;
        if let Some(rest) = line.trim().strip_prefix("fleet CA") {
            root = rest.split_whitespace().next().map(std::path::PathBuf::from);
        }
        if let Some(t) = line.trim().strip_prefix("export NANOFLEET_TOKEN=") {
            break t.trim().to_owned();
        }
    };
    let root = root.context("no fleet CA line in the banner")?;

    let online_deadline = Instant::now() + Duration::from_secs(60);
    let all_online_at = loop {
        let online = https_get_json(&http, "/api/fleet", &root, Some(&token))
            .ok()
            .and_then(|v| v.get("devices_online")?.as_u64());
        if online == Some(DEMO_DEVICES) {
            break Instant::now();
        }
        if Instant::now() > online_deadline {
            anyhow::bail!("devices_online was {online:?}, not {DEMO_DEVICES}, 60 s after the banner");
        }
        std::thread::sleep(Duration::from_millis(10));
    };

    // The banner is followed by `ready in N ms`; it has arrived by now.
    let self_reported_ms = rx.try_iter().find_map(|(_, line)| {
        line.trim().strip_prefix("ready in")?.trim().strip_suffix("ms")?.trim().parse().ok()
    });

    let stop_started = Instant::now();
    let status = Command::new("kill").arg("-INT").arg(child.id().to_string()).status()?;
    anyhow::ensure!(status.success(), "kill -INT failed: {status}");
    let stop_deadline = stop_started + Duration::from_secs(60);
    let exit = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > stop_deadline {
            anyhow::bail!("the demo did not exit within 60 s of SIGINT");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(Run {
        banner: banner_at.duration_since(started),
        all_online: all_online_at.duration_since(started),
        self_reported_ms,
        exit_code: exit.code(),
        shutdown: stop_started.elapsed(),
    })
}

// === report ===

/// Min, median and max in milliseconds.
fn spread(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let n = v.len();
    let median = if n % 2 == 1 { ms(v[n / 2]) } else { (ms(v[n / 2 - 1]) + ms(v[n / 2])) / 2.0 };
    (ms(v[0]), median, ms(v[n - 1]))
}

fn main() {
    if let Err(e) = run() {
        eprintln!("demo_ready: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let quick = std::env::var("NF_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let runs = std::env::var("NF_BENCH_RUNS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(if quick { 3 } else { 10 })
        .clamp(1, 1_000);
    let binary = nanofleet_binary()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load_before = load_average();
    println!(
        "demo_ready: {runs} runs of `nanofleet demo` on a fresh data directory{}",
        if quick { " (quick)" } else { "" }
    );
    println!("  binary             {} ({})", binary.display(), binary_age(&binary));

    let mut runs_done = Vec::with_capacity(runs);
    for i in 1..=runs {
        let r = one_run(&binary).with_context(|| format!("run {i}"))?;
        println!(
            "  run {i:>2}             banner {:>6.0} ms, {DEMO_DEVICES} online {:>6.0} ms, \
             self-reported {:>4} ms, exit {} after {:.0} ms",
            r.banner.as_secs_f64() * 1000.0,
            r.all_online.as_secs_f64() * 1000.0,
            r.self_reported_ms.map_or("?".into(), |v| v.to_string()),
            r.exit_code.map_or("none (signal)".into(), |c| c.to_string()),
            r.shutdown.as_secs_f64() * 1000.0
        );
        runs_done.push(r);
    }
    let load_after = load_average();

    let banner = spread(runs_done.iter().map(|r| r.banner).collect());
    let online = spread(runs_done.iter().map(|r| r.all_online).collect());
    let shutdown = spread(runs_done.iter().map(|r| r.shutdown).collect());
    let exit_codes: Vec<Option<i32>> = runs_done.iter().map(|r| r.exit_code).collect();
    let clean = exit_codes.iter().all(|c| *c == Some(0));

    println!();
    println!("  machine            {cores} cores; load average {load_before} before, {load_after} after");
    println!("                     min      median   max");
    let row = |name: &str, (a, m, b): (f64, f64, f64)| {
        println!("  {name:<18} {a:>6.0} ms {m:>6.0} ms {b:>6.0} ms");
    };
    row("banner", banner);
    row("24 devices online", online);
    row("shutdown (SIGINT)", shutdown);
    println!("  exit codes         {}", if clean { "all 0".to_owned() } else { format!("{exit_codes:?}") });

    let triple =
        |(a, m, b): (f64, f64, f64)| json!({ "min": a.round(), "median": m.round(), "max": b.round() });
    let result = json!({
        "bench": "demo_ready",
        "quick": quick,
        "runs": runs,
        "cores": cores,
        "load_before": load_before,
        "load_after": load_after,
        "banner_ms": triple(banner),
        "all_online_ms": triple(online),
        "shutdown_ms": triple(shutdown),
        "self_reported_ms": runs_done.iter().map(|r| r.self_reported_ms).collect::<Vec<_>>(),
        "exit_codes": exit_codes,
    });
    println!("RESULT {result}");
    anyhow::ensure!(clean, "a demo did not exit with code 0 after SIGINT");
    Ok(())
}
