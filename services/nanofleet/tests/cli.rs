//! The `nanofleet` binary as a user runs it: the demo, and the CLI against a server.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_nanofleet");

fn nanofleet(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).env_remove("NANOFLEET_CA_FILE").output().expect("run nanofleet")
}

struct Demo {
    child: Child,
    grpc: String,
    ca_file: String,
    token: String,
    _dir: tempfile::TempDir,
}

impl Demo {
    fn start() -> Demo {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = Command::new(BIN)
            .args(["demo", "--data-dir"])
            .arg(dir.path())
            .args([
                "--grpc-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
                "--mqtt-listen",
                "127.0.0.1:0",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn demo");
        let stdout = child.stdout.take().expect("stdout");
        let mut grpc = None;
        let mut ca_file = None;
        let mut token = None;
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("read banner");
            if let Some(url) = line.trim().strip_prefix("grpc") {
                grpc = Some(url.trim().to_owned());
            }
            if let Some(rest) = line.trim().strip_prefix("fleet CA") {
                ca_file = rest.split_whitespace().next().map(str::to_owned);
            }
            if let Some(rest) = line.trim().strip_prefix("export NANOFLEET_TOKEN=") {
                token = Some(rest.trim().to_owned());
            }
            if line.contains("ready in") {
                break;
            }
        }
        Demo {
            child,
            grpc: grpc.expect("banner names the gRPC address"),
            ca_file: ca_file.expect("banner names the fleet CA"),
            token: token.expect("banner gives an API token"),
            _dir: dir,
        }
    }

    /// Runs the CLI against this demo, trusting its fleet root.
    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .args(args)
            .env("NANOFLEET_SERVER", &self.grpc)
            .env("NANOFLEET_CA_FILE", &self.ca_file)
            .env("NANOFLEET_TOKEN", &self.token)
            .output()
            .expect("run nanofleet")
    }

    fn interrupt(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "demo still running 15 s after SIGINT");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "exit {:?}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("stdout is JSON")
}

#[test]
fn the_demo_runs_three_hospitals_of_eight_devices_and_the_cli_sees_them() {
    let demo = Demo::start();

    // All 24 devices come online with telemetry.
    let deadline = Instant::now() + Duration::from_secs(30);
    let devices = loop {
        let v = json(&demo.cli(&["devices", "list", "--output", "json"]));
        let devices = v["devices"].as_array().cloned().unwrap_or_default();
        let ready = devices.iter().filter(|d| d["online"] == true && !d["last_sample"].is_null()).count();
        if ready == 24 {
            break devices;
        }
        assert!(Instant::now() < deadline, "only {ready} of 24 devices online with telemetry");
        std::thread::sleep(Duration::from_millis(250));
    };
    let sites = json(&demo.cli(&["sites", "list", "--output", "json"]));
    let sites = sites["sites"].as_array().cloned().unwrap_or_default();
    assert_eq!(sites.len(), 3);
    assert!(sites.iter().all(|s| s["devices_total"] == 8), "{sites:?}");
    assert!(sites[0]["name"].as_str().is_some_and(|n| n.contains("Pharmacy")));

    let id = devices[0]["id"].as_str().expect("id").to_owned();
    let one = json(&demo.cli(&["devices", "show", &id, "--output", "json"]));
    assert_eq!(one["id"], id.as_str());
    let t = json(&demo.cli(&["telemetry", &id, "--since", "1m", "--output", "json"]));
    assert!(t["samples"].as_array().is_some_and(|s| !s.is_empty()));

    // Tables for people.
    let table = demo.cli(&["devices", "list"]);
    assert!(table.status.success());
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains(&id) && text.contains("24 devices"), "{text}");

    // A device that does not exist: a clear error, exit 1.
    let missing = demo.cli(&["devices", "show", "NF-NOPE-99"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("\"NF-NOPE-99\" not found"));

    // Without a token: refused, and told where to find one.
    let anonymous = Command::new(BIN)
        .args(["devices", "list", "--server", &demo.grpc, "--ca-file", &demo.ca_file])
        .env_remove("NANOFLEET_TOKEN")
        .output()
        .expect("run");
    assert_eq!(anonymous.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&anonymous.stderr).contains("--token"));
    let me = json(&demo.cli(&["whoami", "--output", "json"]));
    assert_eq!(me["role"], "ops");

    // Cartridges: the demo stocks every hospital; a shipment is sent, scanned in at its
    // site with its logger's readings, and its cartridges become usable there.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let lots = json(&demo.cli(&["lots", "list", "--status", "released", "--output", "json"]));
        let stock = json(&demo.cli(&["stock", "--output", "json"]));
        let stocked = stock["lines"].as_array().map_or(0, Vec::len);
        if lots["lots"].as_array().is_some_and(|l| l.iter().any(|l| l["lot"] == "L2611-A")) && stocked == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "the demo's lots and stock: {lots} / {stocked} sites");
        std::thread::sleep(Duration::from_millis(500));
    }
    let site = sites[1]["id"].as_str().expect("site id").to_owned();
    let work = tempfile::tempdir().expect("tempdir");
    let codes = work.path().join("codes.txt");
    let codes_arg = codes.to_str().expect("utf-8 path");
    let sent = json(&demo.cli(&[
        "shipments",
        "send",
        "--lot",
        "L2611-A",
        "--site",
        &site,
        "--count",
        "2",
        "--codes",
        codes_arg,
        "--output",
        "json",
    ]));
    let shipment = sent["shipment_id"].as_str().expect("shipment id").to_owned();
    let first =
        std::fs::read_to_string(&codes).expect("codes written").lines().next().expect("a code").to_owned();
    let scan = demo.cli(&["cartridges", "scan", &first]);
    assert_eq!(scan.status.code(), Some(3), "in transit: not usable yet");
    assert!(String::from_utf8_lossy(&scan.stdout).contains("in-transit"));
    let readings = work.path().join("logger.csv");
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as i64;
    let csv: String = (0..=30).map(|m| format!("{},{:.1}\n", now - (30 - m) * 60_000, -75.0)).collect();
    std::fs::write(&readings, format!("time,celsius\n{csv}")).expect("write readings");
    let received = demo.cli(&[
        "cartridges",
        "receive",
        &shipment,
        "--site",
        &site,
        "--scans",
        codes_arg,
        "--readings",
        readings.to_str().expect("utf-8 path"),
    ]);
    assert!(received.status.success(), "{}", String::from_utf8_lossy(&received.stderr));
    assert!(String::from_utf8_lossy(&received.stdout).contains("2 received"));
    let scan = demo.cli(&["cartridges", "scan", &first]);
    assert_eq!(scan.status.code(), Some(0), "{}", String::from_utf8_lossy(&scan.stdout));
    // A misread code: exit 1, the field and what is wrong.
    let bad = demo.cli(&["cartridges", "scan", "(01)10614141000018(17)271231(10)L1(21)S1"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("check digit 8"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let lot = json(&demo.cli(&["lots", "show", "L2611-A", "--output", "json"]));
    assert_eq!(lot["lot"]["status"], "released");
    assert!(lot["places"].as_array().is_some_and(|p| p.iter().any(|p| p["site_id"] == site.as_str())));
    // The simulated pharmacists load cartridges off their shelves; each device reads the
    // code and reports the load, so cartridges show up in devices.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let in_devices = ["L2611-A", "L2611-B", "L2611-X"].iter().any(|lot| {
            let lot = json(&demo.cli(&["lots", "show", lot, "--output", "json"]));
            lot["places"].as_array().is_some_and(|p| p.iter().any(|p| p["status"] == "loaded"))
        });
        if in_devices {
            break;
        }
        assert!(Instant::now() < deadline, "no device reported loading a cartridge");
        std::thread::sleep(Duration::from_secs(1));
    }

    // Ctrl-C stops everything cleanly.
    let status = demo.interrupt();
    assert!(status.success(), "demo exit status after SIGINT: {status:?}");
}

#[test]
fn an_unreachable_server_is_named_in_the_error() {
    nanofleet_pki::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = nanofleet_pki::FleetCa::load_or_create(dir.path(), &Default::default()).expect("ca");
    let root = ca.root_path();
    let root = root.to_str().expect("path");
    let out = nanofleet(&["devices", "list", "--server", "https://127.0.0.1:9", "--ca-file", root]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the Nanofleet server at https://127.0.0.1:9"), "{err}");

    // Plain http is refused: the API is served over TLS only.
    let out = nanofleet(&["devices", "list", "--server", "http://127.0.0.1:9", "--ca-file", root]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be an https:// URL"));
    // Without the fleet root the CLI says where to find it.
    let out = nanofleet(&["devices", "list", "--server", "https://127.0.0.1:9"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ca-file"));
}

#[test]
fn invalid_configuration_exits_64_with_one_readable_line() {
    let out = nanofleet(&["server", "--grpc-listen", "not-an-address", "--data-dir", "/tmp/x"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--grpc-listen"));
    let out = nanofleet(&["server"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--data-dir"));
    let out = nanofleet(&["demo", "--fault-rate", "2"]);
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn help_teaches_with_examples() {
    let out = nanofleet(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("nanofleet demo") && text.contains("Examples"), "{text}");
    let out = nanofleet(&["telemetry", "--help"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("--since"));
}
