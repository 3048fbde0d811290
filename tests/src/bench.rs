//! Helpers shared by the benchmark harnesses in `benches/`: the `nanofleet server` child
//! process, HTTPS requests to its dashboard, and readings from `/proc`.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rustls::pki_types::ServerName;

/// The `nanofleet` binary of this workspace: next to this bench's profile first, then
/// release, then debug.
pub fn nanofleet_binary() -> anyhow::Result<PathBuf> {
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
    let found = candidates.into_iter().find(|p| p.is_file()).with_context(|| {
        format!(
            "no nanofleet binary under {}: run `cargo build --release -p nanofleet` first",
            target.display()
        )
    })?;
    if !cfg!(debug_assertions) && found.parent().and_then(Path::file_name).is_some_and(|d| d == "debug") {
        eprintln!(
            "WARNING: {} is an unoptimised build: its numbers are not representative; run `cargo build --release -p nanofleet` (`--benches` alone does not build it)",
            found.display()
        );
    }
    Ok(found)
}

pub fn binary_age(path: &Path) -> String {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .map_or_else(|| "unknown age".into(), |d| format!("built {} s ago", d.as_secs()))
}

/// `NF_BENCH_QUICK` is set (and not `0`): a smoke run.
pub fn quick() -> bool {
    std::env::var("NF_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// A whole number from the environment within `range`, else `default` (said on stderr
/// when the value was unreadable).
pub fn env_count(name: &str, default: usize, range: std::ops::RangeInclusive<usize>) -> usize {
    match std::env::var(name) {
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) => n.clamp(*range.start(), *range.end()),
            Err(_) => {
                eprintln!("{name}={v:?} is not a whole number; using {default}");
                default
            }
        },
        Err(_) => default,
    }
}

// === HTTPS ===

/// A minimal HTTP/1.1 GET over TLS returning a JSON body: the server's certificate must
/// chain to the root in `root_pem` (PEM file), and `bearer` goes in `Authorization`.
pub fn https_get_json(
    addr: &str,
    path: &str,
    root_pem: &Path,
    bearer: Option<&str>,
) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_str(&https_get(addr, path, root_pem, bearer)?)?)
}

/// GET over HTTPS: the body of a 200 answer.
pub fn https_get(addr: &str, path: &str, root_pem: &Path, bearer: Option<&str>) -> anyhow::Result<String> {
    nanofleet_pki::install_crypto_provider();
    let roots = nanofleet_pki::tls::certs_from_file(root_pem)?;
    let config = nanofleet_pki::tls::client_config(&roots, None)?;
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(host.to_owned())?;
    let conn = rustls::ClientConnection::new(Arc::new(config), name)?;
    let sock = TcpStream::connect(addr)?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    sock.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let auth = bearer.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(tls, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n")?;
    tls.flush()?;
    let mut raw = Vec::new();
    match tls.read_to_end(&mut raw) {
        Ok(_) => {}
        // A server that closes without close_notify after a complete response.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(e.into()),
    }
    response_body(path, raw)
}

fn response_body(path: &str, raw: Vec<u8>) -> anyhow::Result<String> {
    let text = String::from_utf8(raw)?;
    let (head, body) = text.split_once("\r\n\r\n").context("no end of headers")?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "GET {path}: {}", head.lines().next().unwrap_or(""));
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        Ok(body.to_owned())
    }
}

/// The cumulative buckets `(le, count)` of Prometheus histogram `name` in `text`, in
/// order, `+Inf` last.
pub fn histogram_buckets(text: &str, name: &str) -> Vec<(f64, u64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// The `q` quantile of the observations between two readings of one histogram, as the
/// upper bound of the bucket holding it.
pub fn histogram_quantile(before: &[(f64, u64)], after: &[(f64, u64)], q: f64) -> Option<f64> {
    let delta: Vec<(f64, u64)> = after
        .iter()
        .map(|&(le, n)| (le, n.saturating_sub(before.iter().find(|b| b.0 == le).map_or(0, |b| b.1))))
        .collect();
    let total = delta.last()?.1;
    if total == 0 {
        return None;
    }
    let want = (q * total as f64).ceil().max(1.0) as u64;
    delta.iter().find(|&&(_, n)| n >= want).map(|&(le, _)| le)
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

// === the server process ===

/// A `nanofleet server` child process on a fresh data directory, every listener on a
/// free loopback port; killed if dropped while running.
pub struct ServerProcess {
    child: Child,
    /// The mutual-TLS MQTT listener.
    pub mqtt: SocketAddr,
    /// The loopback plaintext MQTT listener, if asked for.
    pub mqtt_plaintext: Option<SocketAddr>,
    /// The dashboard, `host:port` (HTTPS).
    pub http: String,
    /// The gRPC API, `https://host:port`.
    pub grpc: String,
    /// The server's data directory.
    pub data_dir: PathBuf,
    /// The operator API token the first start wrote to `DATA_DIR/admin.token`.
    pub admin_token: String,
    /// Warning and error lines of the server's log, counted by level and target.
    problems: Arc<Mutex<BTreeMap<String, usize>>>,
    /// The first warning or error line of each level and target.
    problem_examples: Arc<Mutex<BTreeMap<String, String>>>,
    _dir: tempfile::TempDir,
}

impl ServerProcess {
    /// Starts the server with an open-file limit of 65,536 (so that it can hold tens of
    /// thousands of connections), with the loopback plaintext MQTT listener if
    /// `plaintext_mqtt`.
    pub fn start(binary: &Path, plaintext_mqtt: bool) -> anyhow::Result<ServerProcess> {
        let dir = tempfile::tempdir()?;
        let data_dir = dir.path().join("data");
        let mut args: Vec<String> = [
            "server",
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--data-dir",
        ]
        .map(String::from)
        .into();
        args.push(data_dir.display().to_string());
        if plaintext_mqtt {
            args.extend(["--mqtt-plaintext-dev".into(), "127.0.0.1:0".into()]);
        }
        let mut child = with_nofile_limit(binary, &args)
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
        let mut banner = None;
        let mut plaintext = None;
        while banner.is_none() || (plaintext_mqtt && plaintext.is_none()) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.starts_with("nanofleet server:") => banner = Some(line),
                Ok(line) if line.trim_start().starts_with("mqtt-plaintext-dev ") => {
                    plaintext = line.split_whitespace().nth(1).and_then(|a| a.parse::<SocketAddr>().ok());
                }
                Ok(line) => seen.push(line),
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    anyhow::bail!("the server did not print its addresses; its output:\n{}", seen.join("\n"));
                }
            }
        }
        let banner = banner.unwrap_or_default();
        // Drain the rest of the log in the background, keeping what went wrong.
        let problems = Arc::new(Mutex::new(BTreeMap::new()));
        let problem_examples = Arc::new(Mutex::new(BTreeMap::new()));
        let (seen_problems, seen_examples) = (problems.clone(), problem_examples.clone());
        std::thread::spawn(move || {
            for line in rx {
                let line = strip_ansi(&line);
                // `TIME LEVEL TARGET: message`
                let mut words = line.split_whitespace().skip(1);
                if let (Some(level @ ("WARN" | "ERROR")), Some(target)) = (words.next(), words.next()) {
                    let key = format!("{level} {}", target.trim_end_matches(':'));
                    *seen_problems
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(key.clone())
                        .or_insert(0) += 1;
                    seen_examples.lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_insert(line);
                }
            }
        });
        // `dashboard https://A/  grpc https://B  mqtt (mutual TLS) C`
        let after = |word: &str| {
            let mut words = banner.split_whitespace();
            words.find(|w| *w == word).and_then(|_| words.next()).map(str::to_owned)
        };
        let mqtt = after("TLS)")
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("no mqtt address in {banner:?}"))?;
        let http = after("dashboard")
            .map(|u| u.trim_start_matches("https://").trim_end_matches('/').to_owned())
            .with_context(|| format!("no dashboard address in {banner:?}"))?;
        let grpc = after("grpc").with_context(|| format!("no grpc address in {banner:?}"))?;
        let admin_token = std::fs::read_to_string(data_dir.join("admin.token"))
            .with_context(|| format!("reading {}", data_dir.join("admin.token").display()))?
            .trim()
            .to_owned();
        Ok(ServerProcess {
            child,
            mqtt,
            mqtt_plaintext: plaintext,
            http,
            grpc,
            data_dir,
            admin_token,
            problems,
            problem_examples,
            _dir: dir,
        })
    }

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    pub fn rss(&self) -> Option<u64> {
        vm_rss(&self.pid())
    }

    /// The server's CA directory.
    pub fn pki_dir(&self) -> PathBuf {
        self.data_dir.join("pki")
    }

    /// The fleet root certificate (PEM file).
    pub fn root_pem(&self) -> PathBuf {
        self.pki_dir().join("root.pem")
    }

    pub fn problems(&self) -> BTreeMap<String, usize> {
        self.problems.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The first logged line of each kind [`ServerProcess::problems`] counts.
    pub fn problem_examples(&self) -> BTreeMap<String, String> {
        self.problem_examples.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// `GET` a dashboard JSON API path with the operator token.
    pub fn api_get(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        https_get_json(&self.http, path, &self.root_pem(), Some(&self.admin_token))
    }

    /// The server's `/metrics` text.
    pub fn metrics(&self) -> anyhow::Result<String> {
        https_get(&self.http, "/metrics", &self.root_pem(), Some(&self.admin_token))
    }

    pub fn devices_online(&self) -> Option<u64> {
        self.api_get("/api/fleet").ok()?.get("devices_online")?.as_u64()
    }

    /// Runs `nanofleet ARGS` as an operator of this server; returns its stdout.
    pub fn cli(&self, binary: &Path, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(binary)
            .args(args)
            .env("NANOFLEET_SERVER", &self.grpc)
            .env("NANOFLEET_CA_FILE", self.root_pem())
            .env("NANOFLEET_TOKEN", &self.admin_token)
            .stdin(Stdio::null())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "nanofleet {}: {}; {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Ctrl-C, then waits for the exit; returns the exit code and how long it took.
    pub fn interrupt(mut self) -> anyhow::Result<(Option<i32>, Duration)> {
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

/// A command that runs `program ARGS` with the open-file limit raised to 65,536: the
/// limit is per process and inherited, and `sh`'s `ulimit` raises it without any code
/// of ours touching the process's resource limits. `exec` keeps the pid, so the child's
/// pid is the program's.
pub fn with_nofile_limit(program: &Path, args: &[String]) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("ulimit -n 65536 2>/dev/null || ulimit -n \"$(ulimit -Hn)\"; exec \"$0\" \"$@\"")
        .arg(program)
        .args(args);
    cmd
}

/// The soft open-file limit of this process, from `/proc/self/limits`.
pub fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Makes sure this process may open `needed` files: if its limit is lower, runs this
/// same bench again under a raised limit (see [`with_nofile_limit`]) and exits with its
/// exit code.
pub fn ensure_open_files(needed: u64) -> anyhow::Result<()> {
    let limit = open_file_limit().unwrap_or(0);
    if limit >= needed {
        return Ok(());
    }
    anyhow::ensure!(
        std::env::var_os("NF_BENCH_NOFILE_RAISED").is_none(),
        "the open-file limit is {limit} after raising it; {needed} needed (lower the number of connections)"
    );
    eprintln!("open-file limit {limit} < {needed}: running again under `ulimit -n 65536`");
    let exe = std::env::current_exe()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let status = with_nofile_limit(&exe, &args).env("NF_BENCH_NOFILE_RAISED", "1").status()?;
    std::process::exit(status.code().unwrap_or(1));
}

/// The `main` of a bench that connects a fleet of simulated devices: takes the device
/// count from `NF_BENCH_DEVICES` (200 quick, else 10,000; at most 20,000), makes room
/// for a client and a server connection per device in this process, and runs
/// `run(devices)`; an error is printed under `name` and exits 1.
pub fn fleet_main<F, Fut>(name: &str, run: F)
where
    F: FnOnce(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let devices = env_count("NF_BENCH_DEVICES", if quick() { 200 } else { 10_000 }, 1..=20_000);
    let result = ensure_open_files(devices as u64 * 2 + 256).and_then(|()| {
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        rt.block_on(run(devices))
    });
    if let Err(e) = result {
        eprintln!("{name}: {e:#}");
        std::process::exit(1);
    }
}

/// A log line without its terminal colours.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

// === /proc readings ===

/// Resident memory of a process (`self` or a pid), from `/proc/PID/status`.
pub fn vm_rss(pid: &str) -> Option<u64> {
    status_kb(pid, "VmRSS:")
}

pub fn status_kb(pid: &str, field: &str) -> Option<u64> {
    status_kb_in(&format!("/proc/{pid}/status"), field)
}

/// A `Field:   N kB` line of a /proc file, in bytes.
pub fn status_kb_in(path: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(path).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// User + system CPU seconds of a process (`self` or a pid), from `/proc/PID/stat`,
/// with the kernel's usual 100 ticks per second.
pub fn cpu_secs(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    (n(11) + n(12)) / 100.0
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// The `p`-th percentile (0–100) of sorted durations, in milliseconds.
pub fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1000.0
}

/// A free TCP port on loopback (free when asked; another process may take it after).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Debian's Mosquitto, the peer the benches measure against.
pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// A Mosquitto child process on a free loopback port, with the configuration
/// `config(dir, port)` returns (written into a temporary `dir`); stopped (SIGTERM, then
/// SIGKILL after 5 s) when dropped.
pub struct MosquittoProcess {
    pub addr: SocketAddr,
    pub version: String,
    child: Child,
    dir: tempfile::TempDir,
}

impl MosquittoProcess {
    /// Mosquitto with the TLS settings of `deploy/mosquitto` (client certificate
    /// required, chaining to the fleet root and device intermediate; the common name as
    /// user name and client id) on a Nanofleet server's certificates in `pki_dir`, plus
    /// the configuration lines `extra`.
    pub fn spawn_mtls(pki_dir: &Path, extra: &str) -> anyhow::Result<MosquittoProcess> {
        MosquittoProcess::spawn(|dir, port| {
            // OpenSSL wants the chain to end at a self-signed certificate: root first.
            let ca = dir.join("ca.pem");
            std::fs::write(
                &ca,
                std::fs::read_to_string(pki_dir.join("root.pem"))?
                    + &std::fs::read_to_string(pki_dir.join("devices-bundle.pem"))?,
            )?;
            Ok(format!(
                "user root\npersistence false\nlog_dest stderr\nlog_type error\nlog_type warning\n\
                 listener {port} 127.0.0.1\nprotocol mqtt\nmax_connections -1\n\
                 cafile {}\ncertfile {}\nkeyfile {}\ntls_version tlsv1.2\n\
                 require_certificate true\nuse_identity_as_username true\nuse_username_as_clientid true\n\
                 allow_anonymous false\n{extra}",
                ca.display(),
                pki_dir.join("server.pem").display(),
                pki_dir.join("server.key").display(),
            ))
        })
    }

    pub fn spawn(
        config: impl FnOnce(&Path, u16) -> anyhow::Result<String>,
    ) -> anyhow::Result<MosquittoProcess> {
        anyhow::ensure!(Path::new(MOSQUITTO).exists(), "{MOSQUITTO} not found");
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(&conf, config(dir.path(), port)?)?;
        let log = std::fs::File::create(dir.path().join("mosquitto.log"))?;
        let mut child = with_nofile_limit(Path::new(MOSQUITTO), &["-c".into(), conf.display().to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(dir.path().join("mosquitto.log")).unwrap_or_default();
                anyhow::bail!("mosquitto exited with {status}: {}", log.trim());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("mosquitto did not listen on {addr} within 5 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let version = Command::new(MOSQUITTO)
            .arg("-h")
            .output()
            .ok()
            .and_then(|o| {
                let text =
                    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
                text.lines().find(|l| l.contains("version")).map(|l| l.trim().to_owned())
            })
            .unwrap_or_else(|| "mosquitto".into());
        Ok(MosquittoProcess { addr, version, child, dir })
    }

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for MosquittoProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// === many calls at once ===

/// What `n` calls made `concurrency` at a time gave: results, latencies, failures.
pub struct Batch<T> {
    pub results: Vec<T>,
    /// Sorted.
    pub latencies: Vec<Duration>,
    pub failures: usize,
    pub first_error: Option<String>,
    pub elapsed: Duration,
}

impl<T> Batch<T> {
    pub fn rate(&self) -> f64 {
        self.results.len() as f64 / self.elapsed.as_secs_f64()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "done": self.results.len(),
            "failures": self.failures,
            "first_error": self.first_error,
            "seconds": (self.elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
            "per_s": (self.rate() * 10.0).round() / 10.0,
            "latency_ms": {
                "p50": round1(percentile_ms(&self.latencies, 50.0)),
                "p99": round1(percentile_ms(&self.latencies, 99.0)),
                "max": round1(percentile_ms(&self.latencies, 100.0)),
            },
        })
    }

    pub fn print(&self, name: &str, n: usize) {
        println!(
            "  {name:<18} {} of {n} in {:.2} s: {:.1}/s; p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {} failed{}",
            self.results.len(),
            self.elapsed.as_secs_f64(),
            self.rate(),
            percentile_ms(&self.latencies, 50.0),
            percentile_ms(&self.latencies, 99.0),
            percentile_ms(&self.latencies, 100.0),
            self.failures,
            self.first_error.as_ref().map(|e| format!(" (first: {e})")).unwrap_or_default()
        );
    }
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// Runs `call(0..n)`, `concurrency` at a time on all of the runtime's threads, each
/// given at most `timeout`.
pub async fn run_concurrently<T, F, Fut>(n: usize, concurrency: usize, timeout: Duration, call: F) -> Batch<T>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
{
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency));
    let started = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let permits = permits.clone();
            let fut = call(i);
            tokio::spawn(async move {
                let _permit = permits.acquire_owned().await;
                let t = Instant::now();
                let r = tokio::time::timeout(timeout, fut)
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {} s", timeout.as_secs())));
                (r, t.elapsed())
            })
        })
        .collect();
    let mut calls = Batch {
        results: Vec::with_capacity(n),
        latencies: Vec::with_capacity(n),
        failures: 0,
        first_error: None,
        elapsed: Duration::ZERO,
    };
    for t in tasks {
        match t.await {
            Ok((Ok(v), took)) => {
                calls.results.push(v);
                calls.latencies.push(took);
            }
            Ok((Err(e), _)) => {
                calls.failures += 1;
                calls.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
            Err(e) => {
                calls.failures += 1;
                calls.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    calls.elapsed = started.elapsed();
    calls.latencies.sort();
    calls
}

/// The cartridge type the inventory benches register (GTIN of the example recipe's
/// cartridge).
pub fn bench_cartridge_type() -> nanofleet_proto::v1::CartridgeType {
    nanofleet_proto::v1::CartridgeType {
        gtin: nanofleet_recipe::example::EXAMPLE_GTIN.into(),
        name: "bench cartridge".into(),
        payload: "mRNA".into(),
        volume_ml: 2.0,
        storage_class: "ultra-cold".into(),
        excursion_limit_min: 30,
        device_models: vec![],
        lead_time_days: 3,
        recipe_ids: vec![],
    }
}
