//! Ingest throughput: telemetry from many device connections through the embedded
//! broker into SQLite, counted when committed. In the same run, the same publishers
//! against a Mosquitto broker that forwards to one QoS 1 subscriber give the reference.
//!
//! ```text
//! cargo bench -p nanofleet-tests --bench ingest
//! NF_BENCH_QUICK=1 cargo bench -p nanofleet-tests --bench ingest     # smoke run
//! NF_BENCH_DEVICES=500 NF_BENCH_WINDOW_SECS=20 cargo bench ...       # other loads
//! NF_BENCH_TLS=1 cargo bench ...                                     # mutual TLS on both brokers
//! NF_BENCH_SAMPLES=100 cargo bench ...                               # 100 samples per message
//! ```
//!
//! With `NF_BENCH_TLS=1` each publisher enrolls with the server first (its own key and
//! certificate, as a device does) and connects to the mutual-TLS listener; the
//! reference Mosquitto then runs the TLS settings of `deploy/mosquitto` on the same
//! server certificate and fleet CA, and the same client certificates connect to it.
//!
//! Each publisher is one MQTT 5 connection whose client id is its device id. It
//! announces itself (birth), then publishes one-sample telemetry batches at QoS 1 with
//! sequence numbers 1, 2, 3, ... as fast as its window of unacknowledged publishes
//! allows. Publishers, broker and storage share the machine's cores, so the figures
//! are compared within one run, not across machines.
//!
//! This harness measures; it asserts nothing about speed. It exits non-zero only when
//! the stored rows do not match what was published.

use nanofleet_tests::bench::*;
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nanofleet_proto::Message as _;
use nanofleet_proto::device::v1::TelemetryBatch;
use nanofleet_proto::topics::{Channel, device_topic};
use nanofleet_tests::{Sandbox, birth, telemetry};
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Unacknowledged QoS 1 publishes per connection (the embedded broker's receive maximum).
const WINDOW: u16 = 32;
const TELEMETRY_FILTER: &str = "nf/v1/+/telemetry";

// === settings ===

struct Settings {
    quick: bool,
    devices: usize,
    /// Samples per telemetry message.
    samples: usize,
    /// Mutual TLS for every connection (both brokers), else plaintext.
    tls: bool,
    warmup: Duration,
    window: Duration,
}

fn env_num(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    match v.trim().parse() {
        Ok(n) => Some(n),
        Err(_) => {
            eprintln!("ingest: {name}={v:?} is not a whole number; using the default");
            None
        }
    }
}

impl Settings {
    fn from_env() -> Settings {
        let quick = std::env::var("NF_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let (devices, warmup, window) = if quick { (20, 0.5, 2.0) } else { (200, 2.0, 10.0) };
        Settings {
            quick,
            devices: env_num("NF_BENCH_DEVICES").map_or(devices, |n| n.clamp(1, 10_000) as usize),
            samples: env_num("NF_BENCH_SAMPLES").map_or(1, |n| n.clamp(1, 1_000) as usize),
            tls: env_num("NF_BENCH_TLS").is_some_and(|n| n != 0),
            warmup: Duration::from_secs_f64(warmup),
            window: env_num("NF_BENCH_WINDOW_SECS")
                .map_or(Duration::from_secs_f64(window), |s| Duration::from_secs(s.clamp(1, 600))),
        }
    }
}

// === publishers ===

/// One connection's counters, shared between its publishing task and its event loop.
#[derive(Default)]
struct Counters {
    /// Publishes handed to the client (birth included).
    sent: AtomicU64,
    /// PUBACKs with a success reason.
    acked: AtomicU64,
    /// PUBACKs with a failure reason.
    refused: AtomicU64,
    /// Highest telemetry sequence number handed to the client.
    last_seq: AtomicU64,
}

impl Counters {
    fn answered(&self) -> u64 {
        self.acked.load(Relaxed) + self.refused.load(Relaxed)
    }
}

/// `count` publisher connections, each a device.
struct Publishers {
    counters: Vec<Arc<Counters>>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

fn device_id(i: usize) -> String {
    format!("BENCH-{:04}", i + 1)
}

impl Publishers {
    /// Connects every publisher and returns once each birth is acknowledged; telemetry
    /// starts right after a device's birth.
    /// With `tls` (one client configuration per device, index = device), over mutual
    /// TLS.
    async fn start(
        addr: SocketAddr,
        count: usize,
        samples: usize,
        tls: &[rustls::ClientConfig],
    ) -> anyhow::Result<Publishers> {
        let stop = CancellationToken::new();
        let mut counters = Vec::with_capacity(count);
        let mut tasks = Vec::with_capacity(count);
        for i in 0..count {
            let c = Arc::new(Counters::default());
            counters.push(c.clone());
            let config = tls.get(i).cloned();
            tasks.push(tokio::spawn(publish(addr, device_id(i), samples, config, c, stop.clone())));
        }
        let p = Publishers { counters, stop, tasks };
        let deadline = Instant::now() + Duration::from_secs(60);
        while p.counters.iter().any(|c| c.answered() == 0) {
            let failed = p.tasks.iter().any(|t| t.is_finished());
            if failed || Instant::now() > deadline {
                let outcome = p.stop().await;
                let first = outcome.errors.first().cloned().unwrap_or_else(|| "timed out after 60 s".into());
                anyhow::bail!("publishers did not all connect and announce themselves: {first}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let refused: u64 = p.counters.iter().map(|c| c.refused.load(Relaxed)).sum();
        anyhow::ensure!(refused == 0, "{refused} births refused");
        Ok(p)
    }

    fn acked(&self) -> u64 {
        self.counters.iter().map(|c| c.acked.load(Relaxed)).sum()
    }

    /// Stops publishing, waits for every outstanding PUBACK and disconnects. Returns the
    /// distinct (device, seq) pairs published and the failures seen.
    async fn stop(self) -> Outcome {
        self.stop.cancel();
        let mut errors = Vec::new();
        for t in self.tasks {
            match t.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push(format!("{e:#}")),
                Err(e) => errors.push(e.to_string()),
            }
        }
        Outcome {
            published: self.counters.iter().map(|c| c.last_seq.load(Relaxed)).sum(),
            refused: self.counters.iter().map(|c| c.refused.load(Relaxed)).sum(),
            errors,
        }
    }
}

struct Outcome {
    published: u64,
    refused: u64,
    errors: Vec<String>,
}

/// A device's telemetry messages: its `samples` samples are encoded once, and each
/// message is the device id and sequence number followed by them (protobuf fields
/// may come in any order), so the publishers spend little CPU on encoding.
struct Messages {
    id: String,
    tail: Vec<u8>,
}

impl Messages {
    fn new(id: &str, samples: usize) -> Messages {
        let whole = telemetry(id, 1, samples);
        let batch = TelemetryBatch::decode(whole.as_slice()).expect("own encoding");
        let tail = TelemetryBatch { samples: batch.samples, boot_id: batch.boot_id, ..Default::default() }
            .encode_to_vec();
        Messages { id: id.to_owned(), tail }
    }

    fn message(&self, seq: u64) -> Vec<u8> {
        let mut out =
            TelemetryBatch { device_id: self.id.clone(), seq, ..Default::default() }.encode_to_vec();
        out.extend_from_slice(&self.tail);
        out
    }
}

async fn publish(
    addr: SocketAddr,
    id: String,
    samples: usize,
    tls: Option<rustls::ClientConfig>,
    counters: Arc<Counters>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut opts = MqttOptions::new(&id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(30))
        .set_clean_start(true)
        .set_max_packet_size(Some(1 << 20))
        .set_outgoing_inflight_upper_limit(WINDOW);
    if let Some(config) = tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(config.into()));
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 2 * WINDOW as usize);
    let acks = counters.clone();
    let conn: JoinHandle<anyhow::Result<()>> = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(a))) => {
                    let ok = matches!(a.reason, PubAckReason::Success | PubAckReason::NoMatchingSubscribers);
                    let counter = if ok { &acks.acked } else { &acks.refused };
                    counter.fetch_add(1, Relaxed);
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e).context("connection"),
            }
        }
    });

    let state_topic = device_topic(&id, Channel::State);
    client.publish(state_topic, QoS::AtLeastOnce, false, birth(&id, "bench", "s-1")).await?;
    counters.sent.fetch_add(1, Relaxed);
    while counters.answered() == 0 {
        if conn.is_finished() {
            conn.await??;
            anyhow::bail!("{id}: closed before the birth PUBACK");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let topic = device_topic(&id, Channel::Telemetry);
    let messages = Messages::new(&id, samples);
    let mut seq = 0;
    // `publish` is never cancelled half-way: a message either is counted or was not sent.
    while !stop.is_cancelled() && !conn.is_finished() {
        seq += 1;
        client.publish(topic.clone(), QoS::AtLeastOnce, false, messages.message(seq)).await?;
        counters.sent.fetch_add(1, Relaxed);
        counters.last_seq.store(seq, Relaxed);
    }

    let deadline = Instant::now() + Duration::from_secs(30);
    while counters.answered() < counters.sent.load(Relaxed) && !conn.is_finished() {
        if Instant::now() > deadline {
            anyhow::bail!(
                "{id}: {} publishes unanswered 30 s after stop",
                counters.sent.load(Relaxed) - counters.answered()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = client.disconnect().await;
    match tokio::time::timeout(Duration::from_secs(5), conn).await {
        Ok(r) => r?.with_context(|| id.clone()),
        Err(_) => anyhow::bail!("{id}: connection did not close"),
    }
}

// === measurement ===

/// Cumulative counters at one instant.
#[derive(Clone, Copy)]
struct Point {
    at: Instant,
    /// Committed (nanofleet) or delivered to the subscriber (mosquitto).
    delivered: u64,
    acked: u64,
    batches: u64,
    /// CPU seconds of this process and of the broker process (if separate).
    cpu_self: f64,
    cpu_broker: f64,
}

struct Rates {
    secs: f64,
    delivered: f64,
    acked: f64,
    batches: f64,
    messages_per_batch: f64,
    cores_self: f64,
    cores_broker: f64,
}

impl Rates {
    fn between(a: Point, b: Point) -> Rates {
        let secs = b.at.duration_since(a.at).as_secs_f64();
        let delivered = (b.delivered - a.delivered) as f64;
        let batches = (b.batches - a.batches) as f64;
        Rates {
            secs,
            delivered: delivered / secs,
            acked: (b.acked - a.acked) as f64 / secs,
            batches: batches / secs,
            messages_per_batch: if batches > 0.0 { delivered / batches } else { 0.0 },
            cores_self: (b.cpu_self - a.cpu_self) / secs,
            cores_broker: (b.cpu_broker - a.cpu_broker) / secs,
        }
    }
}

async fn measure(s: &Settings, point: impl Fn() -> Point) -> Rates {
    tokio::time::sleep(s.warmup).await;
    let a = point();
    tokio::time::sleep(s.window).await;
    Rates::between(a, point())
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// User + system CPU seconds of a process, from `/proc/PID/stat`.
fn cpu_secs(pid: &str, ticks: f64) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    (n(11) + n(12)) / ticks
}

fn thousands(v: f64) -> String {
    let n = v.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

// === nanofleet ===

struct NanofleetRun {
    rates: Rates,
    stored: i64,
    outcome: Outcome,
    duplicates: u64,
    rejected: u64,
}

async fn run_nanofleet(
    s: &Settings,
    ticks: f64,
    sandbox: &Sandbox,
    tls: &[rustls::ClientConfig],
) -> anyhow::Result<NanofleetRun> {
    let addr = if s.tls { sandbox.mqtts_addr() } else { sandbox.mqtt_addr() };
    let publishers = Publishers::start(addr, s.devices, s.samples, tls).await?;
    let ingest = sandbox.server.ingest.clone();
    let rates = measure(s, || {
        let st = ingest.stats();
        Point {
            at: Instant::now(),
            delivered: st.accepted,
            acked: publishers.acked(),
            batches: st.batches_committed,
            cpu_self: cpu_secs("self", ticks),
            cpu_broker: 0.0,
        }
    })
    .await;
    let outcome = publishers.stop().await;
    let stats = ingest.stats();
    let stored = sandbox.server.store.telemetry_count().await?;
    Ok(NanofleetRun {
        rates,
        stored,
        outcome,
        duplicates: stats.duplicates,
        rejected: stats.rejected_total(),
    })
}

/// Client configurations for mutual TLS: one per device, enrolled with the sandbox as a
/// device would be, and one for the reference's subscriber.
async fn enroll_all(
    sandbox: &Sandbox,
    devices: usize,
) -> anyhow::Result<(Vec<rustls::ClientConfig>, rustls::ClientConfig)> {
    let mut configs = Vec::with_capacity(devices);
    for i in 0..devices {
        configs.push(sandbox.enroll_device("bench", &device_id(i)).await?.client_config()?);
    }
    let subscriber = sandbox.enroll_device("bench", "BENCH-SUBSCRIBER").await?.client_config()?;
    Ok((configs, subscriber))
}

// === mosquitto ===

/// The reference broker: our own Mosquitto on a free port, or one already listening on
/// 1883.
struct Mosquitto {
    addr: SocketAddr,
    version: String,
    process: Option<MosquittoProcess>,
}

/// What limits Mosquitto would otherwise put on a fast publisher.
const MOSQUITTO_UNLIMITED: &str = "max_inflight_messages 0\nmax_queued_messages 0\n";

impl Mosquitto {
    /// Plaintext, or with `pki_dir` mutual TLS on a Nanofleet server's certificates.
    fn start(pki_dir: Option<&std::path::Path>) -> Result<Mosquitto, String> {
        let spawned = match pki_dir {
            Some(dir) => MosquittoProcess::spawn_mtls(dir, MOSQUITTO_UNLIMITED),
            None => MosquittoProcess::spawn(|_, port| {
                Ok(format!(
                    "listener {port} 127.0.0.1\nallow_anonymous true\n{MOSQUITTO_UNLIMITED}persistence false\n"
                ))
            }),
        };
        if let (Err(e), Some(_)) = (&spawned, pki_dir) {
            return Err(format!("could not start {MOSQUITTO} with TLS ({e:#})"));
        }
        match spawned {
            Ok(p) => Ok(Mosquitto { addr: p.addr, version: p.version.clone(), process: Some(p) }),
            Err(e) => {
                let fallback = SocketAddr::from(([127, 0, 0, 1], 1883));
                if TcpStream::connect_timeout(&fallback, Duration::from_millis(200)).is_ok() {
                    eprintln!("ingest: could not start mosquitto ({e:#}); using the broker on {fallback}");
                    Ok(Mosquitto { addr: fallback, version: "unknown".into(), process: None })
                } else {
                    Err(format!("could not start {MOSQUITTO} ({e:#}) and nothing listens on {fallback}"))
                }
            }
        }
    }

    fn pid(&self) -> Option<String> {
        self.process.as_ref().map(MosquittoProcess::pid)
    }

    fn stop(self) {
        drop(self.process);
    }
}

/// One subscriber to every device's telemetry, counting what it receives.
async fn subscriber(
    addr: SocketAddr,
    tls: Option<rustls::ClientConfig>,
) -> anyhow::Result<(AsyncClient, Arc<AtomicU64>, JoinHandle<anyhow::Result<()>>)> {
    let mut opts = MqttOptions::new("BENCH-SUBSCRIBER", addr.ip().to_string(), addr.port());
    // Batched messages exceed rumqttc's default packet limit (10 KiB).
    opts.set_keep_alive(Duration::from_secs(30)).set_clean_start(true).set_max_packet_size(Some(1 << 20));
    if let Some(config) = tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(config.into()));
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let received = Arc::new(AtomicU64::new(0));
    let count = received.clone();
    let (subscribed, ready) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut subscribed = Some(subscribed);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    count.fetch_add(1, Relaxed);
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(s) = subscribed.take() {
                        let _ = s.send(());
                    }
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e).context("subscriber connection"),
            }
        }
    });
    client.subscribe(TELEMETRY_FILTER, QoS::AtLeastOnce).await?;
    tokio::time::timeout(Duration::from_secs(10), ready).await.context("no SUBACK")??;
    Ok((client, received, task))
}

struct MosquittoRun {
    version: String,
    rates: Rates,
    delivered_total: u64,
    outcome: Outcome,
}

async fn run_mosquitto(
    s: &Settings,
    ticks: f64,
    pki_dir: Option<&std::path::Path>,
    tls: &[rustls::ClientConfig],
    subscriber_tls: Option<rustls::ClientConfig>,
) -> anyhow::Result<Result<MosquittoRun, String>> {
    let broker = match Mosquitto::start(pki_dir) {
        Ok(b) => b,
        Err(reason) => return Ok(Err(reason)),
    };
    let run = async {
        let (sub, received, sub_task) = subscriber(broker.addr, subscriber_tls).await?;
        let publishers = Publishers::start(broker.addr, s.devices, s.samples, tls).await?;
        let broker_pid = broker.pid();
        let rates = measure(s, || Point {
            at: Instant::now(),
            delivered: received.load(Relaxed),
            acked: publishers.acked(),
            batches: 0,
            cpu_self: cpu_secs("self", ticks),
            cpu_broker: broker_pid.as_deref().map_or(0.0, |p| cpu_secs(p, ticks)),
        })
        .await;
        let outcome = publishers.stop().await;
        // Let the subscriber receive what the broker still queues for it.
        let deadline = Instant::now() + Duration::from_secs(60);
        while received.load(Relaxed) < outcome.published && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let delivered_total = received.load(Relaxed);
        let _ = sub.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), sub_task).await;
        anyhow::Ok(MosquittoRun { version: broker.version.clone(), rates, delivered_total, outcome })
    }
    .await;
    broker.stop();
    run.map(Ok)
}

// === report ===

/// Cost of building one message in the publishers, so their share of the CPU is known.
fn encode_cost(samples: usize) -> Duration {
    let n = 20_000u32;
    let messages = Messages::new("BENCH-0001", samples);
    let started = Instant::now();
    let mut bytes = 0usize;
    for seq in 1..=n {
        bytes += messages.message(u64::from(seq)).len();
    }
    std::hint::black_box(bytes);
    started.elapsed() / n
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("ingest: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    // `RUST_LOG=nanofleet_ingest=trace` shows each commit's size and duration.
    nanofleet_tests::init_tracing();
    let s = Settings::from_env();
    let ticks = clock_ticks();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load_before = load_average();
    let message_bytes = Messages::new("BENCH-0001", s.samples).message(1).len();
    let encode = encode_cost(s.samples);

    println!(
        "ingest: {} device connections, QoS 1, {} unacknowledged per connection, {} samples per message \
         ({message_bytes} bytes), {}; warm-up {:?}, window {:?}{}",
        s.devices,
        WINDOW,
        s.samples,
        if s.tls { "mutual TLS" } else { "plaintext" },
        s.warmup,
        s.window,
        if s.quick { " (quick)" } else { "" }
    );
    let sandbox = Sandbox::start().await?;
    let (tls, subscriber_tls) = if s.tls {
        let started = Instant::now();
        let (devices, sub) = enroll_all(&sandbox, s.devices).await?;
        println!(
            "  enrolled {} devices for mutual TLS in {:.1} s",
            devices.len(),
            started.elapsed().as_secs_f64()
        );
        (devices, Some(sub))
    } else {
        (Vec::new(), None)
    };
    let nf = run_nanofleet(&s, ticks, &sandbox, &tls).await?;
    // The server's certificates stay for the reference broker.
    let data_dir = sandbox.stop().await;
    let pki_dir = data_dir.path().join("pki");
    let mq = run_mosquitto(&s, ticks, s.tls.then_some(pki_dir.as_path()), &tls, subscriber_tls).await?;
    let load_after = load_average();

    let check_ok = nf.stored >= 0
        && nf.stored as u64 == nf.outcome.published
        && nf.duplicates == 0
        && nf.outcome.errors.is_empty();

    println!();
    println!("  machine            {cores} cores; load average {load_before} before, {load_after} after");
    println!("  message encoding   {:.2} µs each, inside the publishers", encode.as_secs_f64() * 1e6);
    println!();
    println!("  nanofleet: embedded broker -> ingest -> SQLite, counted when committed");
    println!(
        "    committed        {:>10} msg/s = {} samples/s",
        thousands(nf.rates.delivered),
        thousands(nf.rates.delivered * s.samples as f64)
    );
    println!("    acknowledged     {:>10} msg/s (PUBACKs at the publishers)", thousands(nf.rates.acked));
    println!(
        "    commits          {:>10.1} /s, {:.1} messages per commit",
        nf.rates.batches, nf.rates.messages_per_batch
    );
    println!(
        "    cpu              {:>10.2} cores (one process: publishers, broker, ingest, SQLite)",
        nf.rates.cores_self
    );
    let mut ratio = None;
    match &mq {
        Ok(m) => {
            let r = if m.rates.delivered > 0.0 { nf.rates.delivered / m.rates.delivered } else { 0.0 };
            ratio = Some(r);
            println!();
            println!("  reference: {} forwarding to one QoS 1 subscriber", m.version);
            println!(
                "    delivered        {:>10} msg/s (received by the subscriber)",
                thousands(m.rates.delivered)
            );
            println!(
                "    acknowledged     {:>10} msg/s (PUBACKs at the publishers)",
                thousands(m.rates.acked)
            );
            println!(
                "    cpu              {:>10.2} cores publishers + subscriber, {:.2} cores mosquitto",
                m.rates.cores_self, m.rates.cores_broker
            );
            println!(
                "    drained          {} of {} published reached the subscriber after stop",
                thousands(m.delivered_total as f64),
                thousands(m.outcome.published as f64)
            );
            if !m.outcome.errors.is_empty() {
                println!("    errors           {}: {}", m.outcome.errors.len(), m.outcome.errors[0]);
            }
            println!();
            println!("  ratio nanofleet committed / mosquitto delivered = {r:.2}");
        }
        Err(reason) => {
            println!();
            println!("  reference skipped: {reason}");
        }
    }
    println!();
    println!(
        "  check: {} rows stored, {} distinct (device, seq) published, {} duplicates, {} rejected, \
         {} refused PUBACKs, {} publisher errors: {}",
        thousands(nf.stored as f64),
        thousands(nf.outcome.published as f64),
        nf.duplicates,
        nf.rejected,
        nf.outcome.refused,
        nf.outcome.errors.len(),
        if check_ok { "nothing lost or duplicated" } else { "MISMATCH" }
    );
    for e in nf.outcome.errors.iter().take(3) {
        println!("    {e}");
    }

    let reference = mq.as_ref().ok().map(|m| {
        json!({
            "broker": m.version,
            "delivered_msgs_per_s": m.rates.delivered.round(),
            "acked_msgs_per_s": m.rates.acked.round(),
            "cpu_cores_publishers": (m.rates.cores_self * 100.0).round() / 100.0,
            "cpu_cores_broker": (m.rates.cores_broker * 100.0).round() / 100.0,
            "published": m.outcome.published,
            "delivered_total": m.delivered_total,
        })
    });
    let result = json!({
        "bench": "ingest",
        "quick": s.quick,
        "devices": s.devices,
        "samples_per_message": s.samples,
        "transport": if s.tls { "mtls" } else { "plaintext" },
        "committed_samples_per_s": (nf.rates.delivered * s.samples as f64).round(),
        "window_s": (nf.rates.secs * 100.0).round() / 100.0,
        "inflight_per_connection": WINDOW,
        "message_bytes": message_bytes,
        "cores": cores,
        "load_before": load_before,
        "load_after": load_after,
        "committed_msgs_per_s": nf.rates.delivered.round(),
        "acked_msgs_per_s": nf.rates.acked.round(),
        "commits_per_s": (nf.rates.batches * 10.0).round() / 10.0,
        "messages_per_commit": (nf.rates.messages_per_batch * 10.0).round() / 10.0,
        "cpu_cores": (nf.rates.cores_self * 100.0).round() / 100.0,
        "reference": reference,
        "skipped_reference": mq.as_ref().err(),
        "ratio": ratio.map(|r| (r * 1000.0).round() / 1000.0),
        "stored_rows": nf.stored,
        "published": nf.outcome.published,
        "duplicates": nf.duplicates,
        "rejected": nf.rejected,
        "check_ok": check_ok,
    });
    println!("RESULT {result}");
    if !check_ok {
        anyhow::bail!("stored rows do not match what was published");
    }
    Ok(())
}
