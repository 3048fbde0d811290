//! The agent binary's answers to bad command lines and states: one readable line and
//! exit code 64 before anything touches the network, exit 1 with the cause when the
//! server cannot be reached.

use std::process::{Command, Output};

use nanofleet_agent::enroll::{Credentials, identity_dir};

const BIN: &str = env!("CARGO_BIN_EXE_nanofleet-agent");

fn agent(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("NANOFLEET_ENROLL_TOKEN")
        .env_remove("NANOFLEET_BROKER")
        .output()
        .expect("run nanofleet-agent")
}

/// Exit code and stderr; stdout must be empty.
fn fails(args: &[&str]) -> (i32, String) {
    let out = agent(args);
    assert!(out.stdout.is_empty(), "stdout: {}", String::from_utf8_lossy(&out.stdout));
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn token() -> String {
    nanofleet_pki::EnrollToken::generate(&nanofleet_pki::fingerprint(b"some fleet root")).reveal()
}

fn saved_credentials(state_dir: &std::path::Path) {
    let c = Credentials {
        device_id: "NF-TST-01".into(),
        site_id: "test-site".into(),
        issued_ms: 1,
        not_after_ms: 2,
        server: "https://127.0.0.1:7400".into(),
        mqtt_address: "127.0.0.1:8883".into(),
        key_pem: "key".into(),
        chain_pem: "chain".into(),
        root_pem: "root".into(),
        trust_root_json: String::new(),
    };
    c.save(&identity_dir(state_dir)).expect("save");
}

#[test]
fn enroll_without_a_server_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let t = token();
    let (code, err) = fails(&["enroll", "--token", &t, "--state-dir", dir.path().to_str().unwrap()]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--server"), "{err}");
}

#[test]
fn enroll_with_a_malformed_token_names_the_wrong_part() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().to_str().unwrap();
    let good = token();
    let parts: Vec<&str> = good.split('.').collect();
    let cases = [
        ("nfe1.abc".to_owned(), "expected 4 parts"),
        (format!("nfe9.{}.{}.{}", parts[1], parts[2], parts[3]), "starts with \"nfe9\""),
        (format!("nfe1.UPPERCASE1.{}.{}", parts[2], parts[3]), "id \"UPPERCASE1\""),
        (format!("nfe1.{}.short.{}", parts[1], parts[3]), "secret part"),
        (format!("nfe1.{}.{}.not-a-hash", parts[1], parts[2]), "fingerprint part"),
    ];
    for (bad, expected) in cases {
        let (code, err) =
            fails(&["enroll", "--server", "https://127.0.0.1:7400", "--token", &bad, "--state-dir", state]);
        assert_eq!(code, 64, "{bad}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(err.starts_with("nanofleet-agent: --token: enrollment token"), "{err}");
        assert!(err.contains(expected), "{bad}: expected {expected:?} in {err}");
        assert!(!err.contains(parts[2]), "the secret is never printed: {err}");
    }
}

#[test]
fn enroll_with_a_server_that_is_not_https_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let t = token();
    for (server, expected) in [
        ("http://127.0.0.1:7400", "must start with https://"),
        ("127.0.0.1:7400", "must start with https://"),
        ("https://127.0.0.1:99999", "port \"99999\""),
        ("https://", "expected https://HOST:PORT"),
    ] {
        let (code, err) = fails(&[
            "enroll",
            "--server",
            server,
            "--token",
            &t,
            "--state-dir",
            dir.path().to_str().unwrap(),
        ]);
        assert_eq!(code, 64, "{server}: {err}");
        assert!(err.contains(&format!("--server {server:?}")) && err.contains(expected), "{err}");
    }
}

#[test]
fn enroll_refuses_to_replace_existing_credentials_without_force() {
    let dir = tempfile::tempdir().unwrap();
    saved_credentials(dir.path());
    let t = token();
    let (code, err) = fails(&[
        "enroll",
        "--server",
        "https://127.0.0.1:7400",
        "--token",
        &t,
        "--state-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("NF-TST-01") && err.contains("--force"), "{err}");
    // Untouched.
    let kept = Credentials::load(&identity_dir(dir.path())).unwrap().unwrap();
    assert_eq!(kept.key_pem, "key");
}

#[test]
fn enroll_at_an_unreachable_server_says_so_and_saves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let server = format!("https://127.0.0.1:{port}");
    let t = token();
    let (code, err) =
        fails(&["enroll", "--server", &server, "--token", &t, "--state-dir", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with("nanofleet-agent: cannot reach") && last.contains(&server), "{err}");
    assert!(Credentials::load(&identity_dir(dir.path())).unwrap().is_none());
}

#[test]
fn run_without_credentials_needs_a_device_id_and_a_site() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = fails(&["run", "--state-dir", dir.path().to_str().unwrap()]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--device-id and --site are required") && err.contains("enroll"), "{err}");
}

#[test]
fn run_with_credentials_refuses_another_device_id_or_site() {
    let dir = tempfile::tempdir().unwrap();
    saved_credentials(dir.path());
    let state = dir.path().to_str().unwrap();
    let (code, err) = fails(&["run", "--state-dir", state, "--device-id", "NF-OTHER-01"]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--device-id \"NF-OTHER-01\"") && err.contains("\"NF-TST-01\""), "{err}");
    let (code, err) = fails(&["run", "--state-dir", state, "--site", "elsewhere"]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--site \"elsewhere\"") && err.contains("\"test-site\""), "{err}");
}

#[test]
fn simulate_enrollment_needs_a_server_and_a_good_token() {
    let t = token();
    let (code, err) = fails(&["simulate", "--token", &t]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--enroll-server"), "{err}");
    let (code, err) = fails(&["simulate", "--enroll-server", "https://127.0.0.1:7400", "--token", "nope"]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--token: enrollment token"), "{err}");
}
