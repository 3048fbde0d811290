//! Mutual-TLS MQTT connections: how fast the embedded broker of a `nanofleet server`
//! (a separate process) accepts them, and how much memory it holds per connection;
//! then the same against Mosquitto in the same run.
//!
//! ```text
//! cargo build --release -p nanofleet          # the server binary this bench starts
//! cargo bench -p nanofleet-tests --bench mtls_connect
//! NF_BENCH_QUICK=1 cargo bench -p nanofleet-tests --bench mtls_connect   # smoke run
//! NF_BENCH_CONNECTIONS=20000 NF_BENCH_CONCURRENCY=128 cargo bench -p nanofleet-tests --bench mtls_connect
//! ```
//!
//! Each connection has its own client certificate, issued before the clock starts from
//! the server's CA directory (one key and CSR, a distinct common name each), so every
//! handshake is a full one: no session is resumed. A connection is a TCP connect, a
//! TLS handshake with the client certificate, and a hand-written MQTT 3.1.1 CONNECT
//! (client id = the certificate's common name, keep-alive 600 s) answered by a CONNACK
//! that accepts it; `NF_BENCH_CONCURRENCY` (64) of them are under way at a time. The
//! client side is kept cheap (no MQTT client library), but it shares the machine's cores
//! with the broker, so the CPU time of each side is reported too.
//!
//! All connections stay open; the broker's resident memory (VmRSS) is read before the
//! first and after the last, and one PINGREQ on each connection checks they are all
//! still served. The broker's memory is read after a warm-up of a few connections, so
//! that what a broker allocates once on first use is not charged to the connections.
//!
//! The peer: Mosquitto (`/usr/sbin/mosquitto`) with the device rules of
//! `deploy/mosquitto/nanofleet.conf` (client certificate required, chaining to the fleet
//! root and device intermediate; the common name as user name), the server's own
//! certificate and key, no connection limit, the same certificates and the same client.
//!
//! It measures; it asserts nothing about speed or size.

use nanofleet_tests::bench::*;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nanofleet_pki::{DeviceIdentity, FleetCa, ServerNames, tls};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Connections opened and closed before the broker's idle memory is read.
const WARM_UP: usize = 64;
const KEEP_ALIVE_S: u16 = 600;

// === settings ===

struct Settings {
    quick: bool,
    connections: usize,
    concurrency: usize,
}

impl Settings {
    fn from_env() -> Settings {
        let quick = quick();
        Settings {
            quick,
            connections: env_count("NF_BENCH_CONNECTIONS", if quick { 500 } else { 10_000 }, 1..=30_000),
            concurrency: env_count("NF_BENCH_CONCURRENCY", 64, 1..=4_096),
        }
    }
}

// === client identities ===

/// One client: its id (the certificate's common name) and a TLS configuration
/// presenting its own certificate.
#[derive(Clone)]
struct Client {
    id: String,
    tls: TlsConnector,
}

/// A certificate issued for the bench, as the registry records it.
struct Issued {
    device_id: String,
    serial: String,
    not_before_ms: i64,
    not_after_ms: i64,
}

fn unix_ms(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// `n` clients with distinct certificates from the CA in `pki_dir`, plus the warm-up
/// clients. One key and CSR serve them all: the CA takes only the public key from the
/// CSR and writes the identity it is given. The broker admits only enrolled devices
/// with certificates the server issued: [`register`] records them as enrollment would
/// (the `enroll` bench measures enrollment itself).
fn clients(pki_dir: &Path, n: usize) -> anyhow::Result<(Vec<Client>, Vec<Client>, Vec<Issued>)> {
    let ca = FleetCa::load_or_create(pki_dir, &ServerNames::default())?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
    let key_pem = key.serialize_pem();
    let roots = [ca.root_cert().clone()];
    let issued = std::cell::RefCell::new(Vec::new());
    let make = |id: String| -> anyhow::Result<Client> {
        let who = DeviceIdentity { device_id: id.clone(), site_id: "bench".into() };
        let cert = ca.issue_device_cert(csr.der(), &who, Duration::from_secs(86_400))?;
        issued.borrow_mut().push(Issued {
            device_id: id.clone(),
            serial: cert.serial.clone(),
            not_before_ms: unix_ms(cert.not_before),
            not_after_ms: unix_ms(cert.not_after),
        });
        let chain = tls::certs_from_pem("device chain", &cert.chain_pem)?;
        let key = tls::key_from_pem("device key", &key_pem)?;
        let mut config: ClientConfig = tls::client_config(&roots, Some((chain, key)))?;
        // Every connection a full handshake, also when the same client connects to the
        // second broker.
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Client { id, tls: TlsConnector::from(Arc::new(config)) })
    };
    let warm = (0..WARM_UP).map(|i| make(format!("warm-{i:05}"))).collect::<anyhow::Result<_>>()?;
    let main = (0..n).map(|i| make(format!("mtls-{i:05}"))).collect::<anyhow::Result<_>>()?;
    Ok((warm, main, issued.into_inner()))
}

/// Records the bench's devices and certificates in the server's SQLite registry, as
/// enrollment does, then waits for the server to reload who may connect (every 5 s).
async fn register(db: &Path, issued: &[Issued]) -> anyhow::Result<()> {
    use sqlx::Connection as _;
    let url = format!("sqlite://{}", db.display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.with_context(|| format!("opening {url}"))?;
    let now = unix_ms(std::time::SystemTime::now());
    let mut tx = conn.begin().await?;
    sqlx::query(
        "INSERT INTO sites (id, name, created_ms) VALUES ('bench', 'Bench', ?) ON CONFLICT (id) DO NOTHING",
    )
    .bind(now)
    .execute(&mut *tx)
    .await?;
    for i in issued {
        sqlx::query(
            "INSERT INTO devices (id, site_id, model, status, enrolled_ms, cert_not_after_ms) \
             VALUES (?, 'bench', 'bench', 'active', ?, ?)",
        )
        .bind(&i.device_id)
        .bind(now)
        .bind(i.not_after_ms)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO device_certs (serial, device_id, not_before_ms, not_after_ms, issued_ms) \
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&i.serial)
        .bind(&i.device_id)
        .bind(i.not_before_ms)
        .bind(i.not_after_ms)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    tokio::time::sleep(Duration::from_secs(6)).await;
    Ok(())
}

// === MQTT 3.1.1, the two packets needed ===

/// CONNECT: clean session, no will, no user name or password.
fn connect_packet(client_id: &str) -> Vec<u8> {
    let id = client_id.as_bytes();
    let remaining = 10 + 2 + id.len();
    assert!(remaining < 128, "one-byte remaining length");
    let mut p = vec![0x10, remaining as u8, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02];
    p.extend_from_slice(&KEEP_ALIVE_S.to_be_bytes());
    p.extend_from_slice(&(id.len() as u16).to_be_bytes());
    p.extend_from_slice(id);
    p
}

type Conn = TlsStream<TcpStream>;

/// TCP connect, TLS handshake, CONNECT, and a CONNACK that accepts.
async fn open(addr: SocketAddr, client: &Client) -> anyhow::Result<Conn> {
    let tcp = TcpStream::connect(addr).await.context("tcp connect")?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from("localhost")?;
    let mut tls = client.tls.connect(name, tcp).await.context("tls handshake")?;
    tls.write_all(&connect_packet(&client.id)).await?;
    tls.flush().await?;
    let mut ack = [0u8; 4];
    tls.read_exact(&mut ack).await.context("waiting for CONNACK")?;
    anyhow::ensure!(ack[0] == 0x20 && ack[1] == 2, "not a CONNACK: {ack:02x?}");
    anyhow::ensure!(ack[3] == 0, "CONNACK refused the connection (return code {})", ack[3]);
    Ok(tls)
}

/// PINGREQ, and its PINGRESP.
async fn ping(conn: &mut Conn) -> anyhow::Result<()> {
    conn.write_all(&[0xc0, 0]).await?;
    conn.flush().await?;
    let mut resp = [0u8; 2];
    conn.read_exact(&mut resp).await?;
    anyhow::ensure!(resp == [0xd0, 0], "not a PINGRESP: {resp:02x?}");
    Ok(())
}

/// Opens a connection for each client, `concurrency` under way at a time, on all of the
/// runtime's threads.
async fn open_all(addr: SocketAddr, clients: Vec<Client>, concurrency: usize) -> Batch<Conn> {
    let n = clients.len();
    let clients = Arc::new(clients);
    run_concurrently(n, concurrency, Duration::from_secs(30), |i| {
        let clients = clients.clone();
        async move { open(addr, &clients[i]).await }
    })
    .await
}

/// One PINGREQ on every connection; returns them and how many answered.
async fn ping_all(conns: Vec<Conn>, concurrency: usize) -> (Vec<Conn>, usize) {
    let permits = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            let permits = permits.clone();
            tokio::spawn(async move {
                let _permit = permits.acquire_owned().await;
                let ok = tokio::time::timeout(Duration::from_secs(10), ping(&mut c))
                    .await
                    .is_ok_and(|r| r.is_ok());
                (c, ok)
            })
        })
        .collect();
    let mut back = Vec::with_capacity(tasks.len());
    let mut answered = 0;
    for t in tasks {
        if let Ok((c, ok)) = t.await {
            answered += usize::from(ok);
            back.push(c);
        }
    }
    (back, answered)
}

// === one broker's run ===

/// Figures of one broker.
struct BrokerRun {
    accepted: usize,
    failures: usize,
    first_error: Option<String>,
    seconds: f64,
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    broker_cpu_s: f64,
    bench_cpu_s: f64,
    rss_idle: u64,
    rss_loaded: u64,
    pings_answered: usize,
}

impl BrokerRun {
    fn per_connection(&self) -> f64 {
        self.rss_loaded.saturating_sub(self.rss_idle) as f64 / self.accepted.max(1) as f64
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "accepted": self.accepted,
            "failures": self.failures,
            "first_error": self.first_error,
            "seconds": (self.seconds * 1000.0).round() / 1000.0,
            "connections_per_s": self.rate.round(),
            "latency_ms": { "p50": round1(self.p50_ms), "p99": round1(self.p99_ms), "max": round1(self.max_ms) },
            "broker_cpu_cores": round2(self.broker_cpu_s / self.seconds),
            "bench_cpu_cores": round2(self.bench_cpu_s / self.seconds),
            "connections_per_broker_cpu_s": (self.accepted as f64 / self.broker_cpu_s.max(1e-9)).round(),
            "rss_idle_bytes": self.rss_idle,
            "rss_loaded_bytes": self.rss_loaded,
            "bytes_per_connection": self.per_connection().round(),
            "pings_answered": self.pings_answered,
        })
    }

    fn print(&self, name: &str, total: usize) {
        println!("  {name}");
        println!(
            "    accepted         {} of {total} in {:.2} s: {:.0} connections/s; {} failed{}",
            self.accepted,
            self.seconds,
            self.rate,
            self.failures,
            self.first_error.as_ref().map(|e| format!(" (first: {e})")).unwrap_or_default()
        );
        println!(
            "    connect→CONNACK  p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            self.p50_ms, self.p99_ms, self.max_ms
        );
        println!(
            "    CPU              broker {:.2} cores, bench clients {:.2} cores ({:.0} connections per broker CPU-second)",
            self.broker_cpu_s / self.seconds,
            self.bench_cpu_s / self.seconds,
            self.accepted as f64 / self.broker_cpu_s.max(1e-9)
        );
        println!(
            "    memory           {:.1} MiB idle, {:.1} MiB holding {}: {:.1} KiB per connection",
            mib(self.rss_idle),
            mib(self.rss_loaded),
            self.accepted,
            self.per_connection() / 1024.0
        );
        println!(
            "    held             {} of {} answered a PINGREQ after all were open",
            self.pings_answered, self.accepted
        );
    }
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// Warm-up, idle memory, all connections, loaded memory, pings; then closes them.
async fn measure(
    addr: SocketAddr,
    pid: &str,
    warm: Vec<Client>,
    clients: Vec<Client>,
    concurrency: usize,
) -> anyhow::Result<BrokerRun> {
    let w = open_all(addr, warm, concurrency).await;
    anyhow::ensure!(
        w.failures == 0,
        "warm-up: {} of {} connections failed: {}",
        w.failures,
        w.failures + w.results.len(),
        w.first_error.unwrap_or_default()
    );
    drop(w.results);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle = vm_rss(pid).unwrap_or(0);
    let (broker_cpu, bench_cpu) = (cpu_secs(pid), cpu_secs("self"));
    let opened = open_all(addr, clients, concurrency).await;
    let (broker_cpu_s, bench_cpu_s) = (cpu_secs(pid) - broker_cpu, cpu_secs("self") - bench_cpu);
    // Let the broker finish what follows a CONNACK (sessions, hooks) before reading.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_loaded = vm_rss(pid).unwrap_or(0);
    let (conns, pings_answered) = ping_all(opened.results, concurrency).await;
    let accepted = conns.len();
    drop(conns);
    let seconds = opened.elapsed.as_secs_f64();
    let lat = &opened.latencies;
    Ok(BrokerRun {
        accepted,
        failures: opened.failures,
        first_error: opened.first_error,
        seconds,
        rate: accepted as f64 / seconds,
        p50_ms: percentile_ms(lat, 50.0),
        p99_ms: percentile_ms(lat, 99.0),
        max_ms: percentile_ms(lat, 100.0),
        broker_cpu_s,
        bench_cpu_s,
        rss_idle,
        rss_loaded,
        pings_answered,
    })
}

// === Mosquitto ===

/// Mosquitto with the TLS settings of deploy/mosquitto, on the server's certificates.
fn start_mosquitto(pki_dir: &Path) -> anyhow::Result<MosquittoProcess> {
    MosquittoProcess::spawn_mtls(pki_dir, "")
}

// === the bench ===

fn main() {
    let s = Settings::from_env();
    // Every connection is a socket of this process.
    if let Err(e) = ensure_open_files(s.connections as u64 + 1_024) {
        eprintln!("mtls_connect: {e:#}");
        std::process::exit(1);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build();
    let result = rt.map_err(anyhow::Error::from).and_then(|rt| rt.block_on(run(s)));
    if let Err(e) = result {
        eprintln!("mtls_connect: {e:#}");
        std::process::exit(1);
    }
}

async fn run(s: Settings) -> anyhow::Result<()> {
    nanofleet_pki::install_crypto_provider();
    let binary = nanofleet_binary()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load_before = load_average();
    println!(
        "mtls_connect: {} mutual-TLS MQTT connections, {} handshakes at a time, each with its own certificate{}",
        s.connections,
        s.concurrency,
        if s.quick { " (quick)" } else { "" }
    );
    println!("  server binary      {} ({})", binary.display(), binary_age(&binary));
    println!(
        "  open-file limit    {} (bench process)",
        open_file_limit().map_or("?".into(), |n| n.to_string())
    );

    let server = ServerProcess::start(&binary, false)?;
    let pki = server.pki_dir();
    let issue_started = Instant::now();
    let (warm, clients, registry) = tokio::task::block_in_place(|| clients(&pki, s.connections))?;
    let issued = issue_started.elapsed();
    register(&server.data_dir.join("nanofleet.db"), &registry).await?;
    println!(
        "  certificates       {} issued in {:.2} s before the clock starts ({:.0}/s, one thread)",
        s.connections + WARM_UP,
        issued.as_secs_f64(),
        (s.connections + WARM_UP) as f64 / issued.as_secs_f64()
    );

    // Mosquitto runs after the server has stopped and its data directory is gone: it
    // gets a copy of the files it needs.
    let peer_pki = tempfile::tempdir()?;
    for f in ["root.pem", "devices-bundle.pem", "server.pem", "server.key"] {
        std::fs::copy(pki.join(f), peer_pki.path().join(f)).with_context(|| format!("copying {f}"))?;
    }
    // The same clients, certificates and TLS configurations for both brokers.
    let (warm2, clients2) = (warm.clone(), clients.clone());
    let nanofleet = measure(server.mqtt, &server.pid(), warm, clients, s.concurrency).await?;
    let log_problems = server.problems();
    let (exit_code, server_stop) = tokio::task::block_in_place(|| server.interrupt())?;
    let load_middle = load_average();

    let mosquitto = match start_mosquitto(peer_pki.path()) {
        Ok(m) => {
            let r = measure(m.addr, &m.pid(), warm2, clients2, s.concurrency).await;
            let log = m.log();
            let version = m.version.clone();
            drop(m);
            match r {
                Ok(r) => Ok((r, version)),
                Err(e) => Err(format!("{e:#}; mosquitto's log: {}", log.trim())),
            }
        }
        Err(e) => Err(format!("{e:#}")),
    };
    let load_after = load_average();

    println!();
    println!(
        "  machine            {cores} cores; load average {load_before} before, {load_middle} between, {load_after} after"
    );
    nanofleet.print("nanofleet server (embedded broker)", s.connections);
    let problem_total: usize = log_problems.values().sum();
    println!("    server log       {problem_total} warnings or errors");
    for (kind, n) in &log_problems {
        println!("                     {n:>6} x {kind}");
    }
    println!(
        "    server stop      exit code {} after SIGINT, {:.2} s",
        exit_code.map_or("none (signal)".into(), |c| c.to_string()),
        server_stop.as_secs_f64()
    );
    match &mosquitto {
        Ok((m, version)) => {
            m.print(&format!("peer: {version}"), s.connections);
            println!(
                "  ratio nanofleet / Mosquitto: {:.2} accept rate, {:.2} memory per connection",
                nanofleet.rate / m.rate.max(1e-9),
                nanofleet.per_connection() / m.per_connection().max(1.0)
            );
        }
        Err(e) => println!("  peer: Mosquitto not measured: {e}"),
    }

    let result = json!({
        "bench": "mtls_connect",
        "quick": s.quick,
        "cores": cores,
        "load_before": load_before,
        "load_between": load_middle,
        "load_after": load_after,
        "connections": s.connections,
        "concurrency": s.concurrency,
        "keep_alive_s": KEEP_ALIVE_S,
        "nanofleet": nanofleet.json(),
        "server_log_problems": log_problems,
        "server_exit_code": exit_code,
        "server_stop_s": round2(server_stop.as_secs_f64()),
        "mosquitto": mosquitto.as_ref().ok().map(|(m, v)| {
            let mut j = m.json();
            j["version"] = v.clone().into();
            j
        }),
        "skipped_reference": mosquitto.as_ref().err(),
        "ratio_rate": mosquitto.as_ref().ok().map(|(m, _)| round2(nanofleet.rate / m.rate.max(1e-9))),
        "ratio_memory": mosquitto.as_ref().ok().map(|(m, _)| round2(nanofleet.per_connection() / m.per_connection().max(1.0))),
    });
    println!("RESULT {result}");
    Ok(())
}
