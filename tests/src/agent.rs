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
