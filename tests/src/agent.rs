//! The `nanofleet-agent` binary as a process of its own, for tests that stop it the
//! way the world does (SIGTERM, or kill -9 for a power cut).

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The agent binary, built next to the test (`cargo test --workspace` builds it; from
/// this crate alone, `cargo build -p nanofleet-agent` first).
pub fn agent_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    // target/debug/deps/test-… → target/debug/nanofleet-agent
    let bin = exe.parent().and_then(Path::parent).expect("target directory").join("nanofleet-agent");
    assert!(bin.exists(), "{} missing: build it first (cargo build -p nanofleet-agent)", bin.display());
    bin
}

/// A running `nanofleet-agent run` whose log lines are collected.
pub struct AgentProcess {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl AgentProcess {
    /// Runs the device enrolled in `state_dir`, with `extra` arguments.
    pub fn start(state_dir: &Path, extra: &[&str]) -> AgentProcess {
        let mut child = Command::new(agent_bin())
            .args(["run", "--state-dir"])
            .arg(state_dir)
            .args(["--sample-hz", "20", "--batch", "200ms"])
            .args(extra)
            .env("RUST_LOG", "nanofleet_agent=info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn agent");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        AgentProcess { child, log }
    }

    pub fn logged(&self, needle: &str) -> bool {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).iter().any(|l| l.contains(needle))
    }

    /// Log lines that contain `needle`.
    pub fn count_logged(&self, needle: &str) -> usize {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).iter().filter(|l| l.contains(needle)).count()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).join("\n")
    }

    /// SIGTERM, then the exit code.
    pub fn stop(mut self) -> Option<i32> {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        for _ in 0..100 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        None
    }

    /// SIGKILL: the process gets no chance to write or say anything (a power cut).
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An agent left running by a failed assertion is killed, not leaked.
impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A simulated NF-200 in this process, with a recipe book and a run desk kept in
/// `state_dir` and an optional fault, connected to the sandbox over mutual TLS.
pub fn start_sim_device(
    sb: &crate::Sandbox,
    creds: &nanofleet_agent::enroll::Credentials,
    state_dir: &std::path::Path,
    fault: Option<nanofleet_agent::sim::Fault>,
) -> anyhow::Result<tokio_util::sync::CancellationToken> {
    use nanofleet_agent::link::LinkOptions;
    use std::sync::{Arc, Mutex};
    let info = nanofleet_agent::hal::DeviceInfo {
        device_id: creds.device_id.clone(),
        site_id: creds.site_id.clone(),
        model: "NF-200".into(),
        firmware_version: "2.3.1".into(),
    };
    let book = nanofleet_agent::recipes::RecipeBook::for_device(creds, Some(state_dir))?
        .expect("enrolled with a trust root");
    let (desk, _signer) = nanofleet_agent::runs::desk_for_device(creds, &book, &info, Some(state_dir))?;
    let link = LinkOptions {
        tls: Some(creds.client_config_arc()?),
        sample_interval: Duration::from_millis(50),
        batch_interval: Duration::from_millis(200),
        max_backoff: Duration::from_millis(500),
        recipes: Some(Arc::new(Mutex::new(book))),
        runs: Some(Arc::new(Mutex::new(desk))),
        ..LinkOptions::to_broker(sb.mqtts_addr())
    };
    let mut sim = nanofleet_agent::sim::SimDevice::new(info, 5);
    if let Some(f) = fault {
        sim.inject(f);
    }
    let cancel = tokio_util::sync::CancellationToken::new();
    tokio::spawn(nanofleet_agent::link::run_device(
        sim,
        link,
        nanofleet_agent::seq::SeqCounter::from_clock(),
        cancel.clone(),
        Default::default(),
    ));
    Ok(cancel)
}
