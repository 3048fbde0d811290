//! Releasing one recipe to a whole fleet: from QA's approval (the release) to every
//! simulated device's verified answer, against `nanofleet server` in a separate process.
//!
//! ```text
//! cargo build --release -p nanofleet          # the server binary this bench starts
//! cargo bench -p nanofleet-tests --bench recipe_release
//! NF_BENCH_QUICK=1 cargo bench -p nanofleet-tests --bench recipe_release   # smoke run
//! NF_BENCH_DEVICES=2000 cargo bench -p nanofleet-tests --bench recipe_release
//! ```
//!
//! Setup, before any clock runs: a site and one multi-use enrollment token (the
//! `nanofleet` CLI, as an operator would), a pharmacist of that site and a QA reviewer
//! with their API tokens (gRPC with the operator token). `NF_BENCH_DEVICES` (10,000;
//! quick 200) simulated NF-200s in this process (`nanofleet_agent::fleet::Fleet`)
//! enroll with the shared token and connect over mutual TLS to the MQTT address the
//! server gave them; each has a recipe book over the trust root pinned at enrollment.
//! Their telemetry is kept light (a reading every 5 s, a batch every 30 s) so that the
//! run measures recipe delivery. Once all are online and the server's CPU use has
//! settled:
//!
//! 1. the pharmacist saves a draft targeting the site and signs it AUTHORED; QA's
//!    APPROVED signature, the timed call, releases it. The signers' keys are new, so
//!    the server also sends every device the two trust root versions that add them;
//! 2. the same again for version 2 of the recipe: the devices now hold both keys, so
//!    only the recipe goes out (the steady state of later releases).
//!
//! For each release: the approve call's latency, and per device the time from the
//! server's `released_unix_ms` to its `answered_unix_ms` (both the server's clock), read
//! with `ListRecipeDeliveries` once a second until every device answered (or
//! `NF_BENCH_ANSWER_TIMEOUT_SECS`, 120 s). `sent_unix_ms` splits that time into the
//! server's fan-out (release → sent) and the device's part (sent → answered).
//!
//! The peer, in the same run: the same fan-out without signatures, trust roots or
//! storage. Mosquitto with as many rumqttc subscribers (each on its own
//! `nf/v1/{id}/cmd/recipe`, QoS 1), one publisher sending a two-signature delivery of
//! the same recipe to every device topic, each subscriber answering with an `Ack` on
//! its ack topic at QoS 1, and a collector subscribed to `nf/v1/+/ack` timing from the
//! first publish to each answer.
//!
//! It measures; it asserts nothing about speed. It exits non-zero if a device refused
//! a release or answers are missing after the timeout.

use nanofleet_tests::bench::*;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use nanofleet::cli::Bearer;
use nanofleet_agent::fleet::{Fleet, FleetEnrollment, FleetOptions, Tokens};
use nanofleet_agent::link::LinkOptions;
use nanofleet_proto::Message as _;
use nanofleet_proto::device::v1::{Ack, AckResult, AckSubject, RecipeDelivery, SignatureMeaning, Targets};
use nanofleet_proto::topics::{self, Channel, Command};
use nanofleet_proto::v1 as pb;
use nanofleet_proto::v1::recipe_service_client::RecipeServiceClient;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::json;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel as GrpcChannel;

const SITE: &str = "bench-site";
const RECIPE: &str = "bench-flu-h5";
/// The issue's target for p99 from release to acknowledgement.
const TARGET_P99_MS: f64 = 250.0;
/// Enrollments and connections started per second while the fleet comes up: below
/// what the server enrolls per second on this machine, so that none waits long.
const CONNECT_RATE: f64 = 500.0;
/// How far the server's CPU use may move between windows while it counts as settled.
const SETTLED_CORES: f64 = 0.05;

// === settings ===

struct Settings {
    quick: bool,
    devices: usize,
    answer_timeout: Duration,
    poll: Duration,
}

impl Settings {
    fn from_env() -> Settings {
        let quick = quick();
        Settings {
            quick,
            // A token allows at most 10,000 uses.
            devices: env_count("NF_BENCH_DEVICES", if quick { 200 } else { 10_000 }, 1..=10_000),
            answer_timeout: Duration::from_secs(env_count(
                "NF_BENCH_ANSWER_TIMEOUT_SECS",
                if quick { 30 } else { 120 },
                1..=3_600,
            ) as u64),
            poll: Duration::from_millis(if quick { 200 } else { 1_000 }),
        }
    }
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn ms_json(sorted: &[Duration]) -> serde_json::Value {
    json!({
        "p50": round1(percentile_ms(sorted, 50.0)),
        "p90": round1(percentile_ms(sorted, 90.0)),
        "p99": round1(percentile_ms(sorted, 99.0)),
        "max": round1(percentile_ms(sorted, 100.0)),
    })
}

fn ms_line(sorted: &[Duration]) -> String {
    format!(
        "p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        percentile_ms(sorted, 50.0),
        percentile_ms(sorted, 90.0),
        percentile_ms(sorted, 99.0),
        percentile_ms(sorted, 100.0)
    )
}

/// Server-clock milliseconds from `from` to `to` as a duration (0 if `to` is earlier).
fn between(from: i64, to: i64) -> Duration {
    Duration::from_millis(u64::try_from(to - from).unwrap_or(0))
}

/// Waits (at most `max`) until the CPU use of `pid` has settled: three windows in a row
/// within [`SETTLED_CORES`] of each other, after enrollment, births or a release. With
/// the fleet connected it settles at the fleet's background load (keep-alives,
/// telemetry, events), not at zero. Returns how long it waited and the use (cores) of
/// the last window.
async fn wait_settled(pid: &str, window: Duration, max: Duration) -> (Duration, f64) {
    let started = Instant::now();
    let mut recent: Vec<f64> = Vec::new();
    loop {
        let c0 = cpu_secs(pid);
        tokio::time::sleep(window).await;
        recent.push((cpu_secs(pid) - c0) / window.as_secs_f64());
        let last3 = &recent[recent.len().saturating_sub(3)..];
        let spread =
            last3.iter().copied().fold(f64::MIN, f64::max) - last3.iter().copied().fold(f64::MAX, f64::min);
        if (last3.len() == 3 && spread <= SETTLED_CORES) || started.elapsed() > max {
            return (started.elapsed(), recent.last().copied().unwrap_or(0.0));
        }
    }
}

// === people and their signatures ===

type Authed = InterceptedService<GrpcChannel, Bearer>;

/// A person with a role, their recipe client and their password.
struct Signer {
    id: String,
    password: String,
    recipes: RecipeServiceClient<Authed>,
}

async fn signer(
    channel: &GrpcChannel,
    admin: &Bearer,
    id: &str,
    name: &str,
    role: pb::Role,
    site: &str,
) -> anyhow::Result<Signer> {
    let (bearer, password) = nanofleet_tests::create_person(channel, admin, id, name, role, site).await?;
    let recipes = RecipeServiceClient::with_interceptor(channel.clone(), bearer)
        // 10,000 deliveries are about a megabyte.
        .max_decoding_message_size(64 << 20);
    Ok(Signer { id: id.into(), password, recipes })
}

/// Calls made again after the server answered `Unavailable` (storage busy), as a
/// person would, with the first such answer. Reported, never hidden.
#[derive(Debug, Default)]
struct Retries {
    count: usize,
    first: Option<String>,
}

/// Tries of one call before the bench gives up.
const ATTEMPTS: usize = 3;

impl Retries {
    /// Whether to try `what` again after `status`.
    fn again(&mut self, what: &str, status: &tonic::Status, attempt: usize) -> bool {
        if status.code() != tonic::Code::Unavailable || attempt >= ATTEMPTS {
            return false;
        }
        self.count += 1;
        self.first.get_or_insert_with(|| format!("{what}: {}", status.message()));
        true
    }
}

impl Signer {
    /// Saves a draft of the bench recipe targeting the site; returns its version.
    async fn save_draft(&mut self, retries: &mut Retries) -> anyhow::Result<u32> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let targets = Targets { site_ids: vec![SITE.into()], device_ids: Vec::new() };
            let recipe = nanofleet_recipe::example::example(RECIPE, 0, targets, nanofleet_tests::now_ms());
            match self.recipes.save_draft(pb::SaveDraftRequest { recipe: Some(recipe) }).await {
                Ok(r) => {
                    let saved =
                        r.into_inner().recipe.and_then(|v| v.recipe).context("no draft in the answer")?;
                    return Ok(saved.version);
                }
                Err(e) if retries.again("save draft", &e, attempt) => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(anyhow::Error::from(e).context("save draft")),
            }
        }
    }

    /// Signs `version` with `meaning`; returns the signed version and how long the
    /// call that succeeded took.
    async fn sign(
        &mut self,
        version: u32,
        meaning: SignatureMeaning,
        retries: &mut Retries,
    ) -> anyhow::Result<(pb::RecipeVersion, Duration)> {
        let what = format!("{} signature of version {version}", meaning.as_str_name());
        let mut attempt = 0;
        loop {
            attempt += 1;
            let req = pb::SignRecipeRequest {
                recipe_id: RECIPE.into(),
                version,
                meaning: meaning as i32,
                user_id: self.id.clone(),
                password: self.password.clone(),
            };
            let started = Instant::now();
            match self.recipes.sign_recipe(req).await {
                Ok(r) => {
                    let took = started.elapsed();
                    return Ok((r.into_inner().recipe.context("no recipe in the answer")?, took));
                }
                Err(e) if retries.again(&what, &e, attempt) => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(anyhow::Error::from(e).context(what)),
            }
        }
    }
}

// === one release ===

/// What one release gave.
struct Release {
    version: u32,
    author_call: Duration,
    approve_call: Duration,
    /// Release → answer, per device that answered; sorted.
    answered: Vec<Duration>,
    /// Release → sent, per device the server marked as sent; sorted.
    sent: Vec<Duration>,
    /// Sent → answered, per device with both; sorted.
    device_part: Vec<Duration>,
    listed: usize,
    accepted: usize,
    refused: usize,
    pending: usize,
    first_refusal: Option<String>,
    /// From the approve call to the poll that saw every answer (or the timeout).
    observed: Duration,
    polls: usize,
    server_cpu_s: f64,
    bench_cpu_s: f64,
    server_rss_before: u64,
    server_rss_after: u64,
    retries: Retries,
}

impl Release {
    fn complete(&self, devices: usize) -> bool {
        self.accepted == devices && self.refused == 0
    }

    fn json(&self, devices: usize) -> serde_json::Value {
        json!({
            "version": self.version,
            "author_call_ms": round1(self.author_call.as_secs_f64() * 1000.0),
            "approve_call_ms": round1(self.approve_call.as_secs_f64() * 1000.0),
            "deliveries_listed": self.listed,
            "accepted": self.accepted,
            "refused": self.refused,
            "pending": self.pending,
            "missing": devices.saturating_sub(self.listed),
            "first_refusal": self.first_refusal,
            "release_to_answer_ms": ms_json(&self.answered),
            "release_to_sent_ms": ms_json(&self.sent),
            "sent_to_answer_ms": ms_json(&self.device_part),
            "last_answer_s": round2(percentile_ms(&self.answered, 100.0) / 1000.0),
            "target_p99_met": self.complete(devices) && percentile_ms(&self.answered, 99.0) <= TARGET_P99_MS,
            "observed_s": round2(self.observed.as_secs_f64()),
            "polls": self.polls,
            "server_cpu_s": round2(self.server_cpu_s),
            "bench_cpu_s": round2(self.bench_cpu_s),
            "server_rss_before_bytes": self.server_rss_before,
            "server_rss_after_bytes": self.server_rss_after,
            "calls_retried": self.retries.count,
            "first_retried_error": self.retries.first,
        })
    }

    fn print(&self, name: &str, devices: usize) {
        let last = percentile_ms(&self.answered, 100.0) / 1000.0;
        println!("  {name}");
        println!(
            "    calls            authored {:.0} ms; approved (the release) {:.0} ms",
            self.author_call.as_secs_f64() * 1000.0,
            self.approve_call.as_secs_f64() * 1000.0
        );
        if let Some(first) = &self.retries.first {
            println!("    calls retried    {} after Unavailable (first: {first})", self.retries.count);
        }
        println!(
            "    answers          {} accepted, {} refused, {} pending, {} missing of {devices}{}",
            self.accepted,
            self.refused,
            self.pending,
            devices.saturating_sub(self.listed),
            self.first_refusal.as_ref().map(|r| format!(" (first refusal: {r})")).unwrap_or_default()
        );
        println!("    release → answer {}", ms_line(&self.answered));
        println!("    release → sent   {}", ms_line(&self.sent));
        println!("    sent → answer    {}", ms_line(&self.device_part));
        println!(
            "    last answer      {last:.2} s after the release ({} polls of the deliveries, all seen after {:.2} s)",
            self.polls,
            self.observed.as_secs_f64()
        );
        println!(
            "    CPU              server {:.2} s, fleet (this process) {:.2} s over those {:.2} s",
            self.server_cpu_s,
            self.bench_cpu_s,
            self.observed.as_secs_f64()
        );
        println!(
            "    server memory    {:.1} MiB before, {:.1} MiB after",
            mib(self.server_rss_before),
            mib(self.server_rss_after)
        );
    }
}

/// Drafts the next version of the bench recipe for the site, signs it as its author,
/// then times QA's approval and reads the deliveries until every device answered.
async fn release(
    s: &Settings,
    server: &ServerProcess,
    pharmacist: &mut Signer,
    qa: &mut Signer,
) -> anyhow::Result<Release> {
    let mut retries = Retries::default();
    let version = pharmacist.save_draft(&mut retries).await?;
    let (_, author_call) = pharmacist.sign(version, SignatureMeaning::Authored, &mut retries).await?;

    let pid = server.pid();
    let server_rss_before = server.rss().unwrap_or(0);
    let (server_cpu0, bench_cpu0) = (cpu_secs(&pid), cpu_secs("self"));
    let started = Instant::now();
    let (released, approve_call) = qa.sign(version, SignatureMeaning::Approved, &mut retries).await?;
    anyhow::ensure!(
        released.status == pb::RecipeStatus::Released as i32,
        "version {version} is not released after QA's approval (status {})",
        released.status
    );
    let released_ms = released.released_unix_ms;

    let deadline = started + s.answer_timeout;
    let mut polls = 0;
    let deliveries = loop {
        tokio::time::sleep(s.poll).await;
        polls += 1;
        let all = qa
            .recipes
            .list_recipe_deliveries(pb::ListRecipeDeliveriesRequest { recipe_id: RECIPE.into(), version })
            .await
            .context("list deliveries")?
            .into_inner()
            .deliveries;
        let pending = all.iter().filter(|d| d.state == pb::DeliveryState::Pending as i32).count();
        if (all.len() >= s.devices && pending == 0) || Instant::now() > deadline {
            break all;
        }
    };
    let observed = started.elapsed();
    let (server_cpu1, bench_cpu1) = (cpu_secs(&pid), cpu_secs("self"));

    let state = |d: &pb::RecipeDelivery| pb::DeliveryState::try_from(d.state).unwrap_or_default();
    let answered_at =
        |d: &pb::RecipeDelivery| (state(d) != pb::DeliveryState::Pending).then_some(d.answered_unix_ms);
    let mut answered: Vec<_> =
        deliveries.iter().filter_map(answered_at).map(|a| between(released_ms, a)).collect();
    let mut sent: Vec<_> = deliveries
        .iter()
        .filter(|d| d.sent_unix_ms > 0)
        .map(|d| between(released_ms, d.sent_unix_ms))
        .collect();
    let mut device_part: Vec<_> = deliveries
        .iter()
        .filter(|d| d.sent_unix_ms > 0)
        .filter_map(|d| answered_at(d).map(|a| between(d.sent_unix_ms, a)))
        .collect();
    answered.sort();
    sent.sort();
    device_part.sort();
    let count = |want: pb::DeliveryState| deliveries.iter().filter(|d| state(d) == want).count();
    Ok(Release {
        version,
        author_call,
        approve_call,
        answered,
        sent,
        device_part,
        listed: deliveries.len(),
        accepted: count(pb::DeliveryState::Accepted),
        refused: count(pb::DeliveryState::Refused),
        pending: count(pb::DeliveryState::Pending),
        first_refusal: deliveries
            .iter()
            .find(|d| state(d) == pb::DeliveryState::Refused)
            .map(|d| format!("{}: {}: {}", d.device_id, d.code, d.reason)),
        observed,
        polls,
        server_cpu_s: server_cpu1 - server_cpu0,
        bench_cpu_s: bench_cpu1 - bench_cpu0,
        server_rss_before,
        server_rss_after: server.rss().unwrap_or(0),
        retries,
    })
}

// === the peer: the same fan-out through Mosquitto ===

/// A two-signature delivery of the bench recipe, signed here with two fixed keys: the
/// size and shape of what the server sends, for the peer to publish.
fn peer_delivery() -> Vec<u8> {
    let now = nanofleet_tests::now_ms();
    let targets = Targets { site_ids: vec![SITE.into()], device_ids: Vec::new() };
    let recipe = nanofleet_recipe::example::example(RECIPE, 1, targets, now).encode_to_vec();
    let sign = |signer: &str, name: &str, meaning, seed: u8| {
        let st = nanofleet_recipe::sign::statement(&recipe, signer, name, meaning, now);
        nanofleet_recipe::sign::sign_statement(&st, &ed25519_dalek::SigningKey::from_bytes(&[seed; 32]))
    };
    let statements = vec![
        sign("pharmacist", "Bench Pharmacist, PharmD", SignatureMeaning::Authored, 2),
        sign("qa", "Bench QA Reviewer", SignatureMeaning::Approved, 3),
    ];
    RecipeDelivery { statements }.encode_to_vec()
}

/// The answer a device sends for an accepted recipe.
fn peer_ack(device_id: &str) -> Vec<u8> {
    Ack {
        device_id: device_id.into(),
        subject: AckSubject::Recipe as i32,
        subject_id: RECIPE.into(),
        version: 1,
        digest: "0".repeat(64),
        result: AckResult::Accepted as i32,
        time_unix_ms: nanofleet_tests::now_ms(),
        ..Ack::default()
    }
    .encode_to_vec()
}

struct Peer {
    broker: String,
    payload_bytes: usize,
    subscribed: usize,
    connect: Duration,
    /// First publish → each answer at the collector; sorted.
    answered: Vec<Duration>,
    publish_all: Duration,
    broker_cpu_s: f64,
    bench_cpu_s: f64,
    broker_rss: u64,
}

impl Peer {
    fn json(&self) -> serde_json::Value {
        json!({
            "broker": self.broker,
            "payload_bytes": self.payload_bytes,
            "subscribed": self.subscribed,
            "connect_s": round2(self.connect.as_secs_f64()),
            "answered": self.answered.len(),
            "publish_to_answer_ms": ms_json(&self.answered),
            "last_answer_s": round2(percentile_ms(&self.answered, 100.0) / 1000.0),
            "publish_all_s": round2(self.publish_all.as_secs_f64()),
            "broker_cpu_s": round2(self.broker_cpu_s),
            "bench_cpu_s": round2(self.bench_cpu_s),
            "broker_rss_bytes": self.broker_rss,
        })
    }
}

fn peer_options(id: &str, addr: std::net::SocketAddr, inflight: u16) -> MqttOptions {
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(60))
        .set_clean_start(true)
        .set_max_packet_size(Some(256 * 1024))
        // rumqttc's default table preallocates 65,535 slots per client.
        .set_outgoing_inflight_upper_limit(inflight);
    opts
}

async fn wait_for(what: &str, timeout: Duration, done: impl Fn() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !done() {
        anyhow::ensure!(Instant::now() < deadline, "{what}: not within {} s", timeout.as_secs());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

async fn mosquitto_fanout(devices: usize, timeout: Duration) -> anyhow::Result<Peer> {
    let broker = tokio::task::block_in_place(|| {
        MosquittoProcess::spawn(|_, port| {
            Ok(format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 0\n\
                 max_queued_messages 0\npersistence false\nmax_connections -1\n"
            ))
        })
    })?;
    let addr = broker.addr;
    let payload = Bytes::from(peer_delivery());
    let mut tasks = tokio::task::JoinSet::new();

    // Subscribers: one per device, each answering on its ack topic.
    let subscribed = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    for i in 0..devices {
        let id = format!("NF-PEER-{i:05}");
        let (client, mut eventloop) = AsyncClient::new(peer_options(&id, addr, 16), 16);
        client.try_subscribe(topics::command_topic(&id, Command::Recipe), QoS::AtLeastOnce)?;
        let ack_topic = topics::device_topic(&id, Channel::Ack);
        let subscribed = subscribed.clone();
        tasks.spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        subscribed.fetch_add(1, Relaxed);
                    }
                    Ok(Event::Incoming(Packet::Publish(_))) => {
                        let _ = client.try_publish(ack_topic.clone(), QoS::AtLeastOnce, false, peer_ack(&id));
                    }
                    Ok(_) => {}
                    // rumqttc reconnects on the next poll.
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        // The fleet's ramp, in steps the timer can keep.
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    wait_for("peer subscribers subscribed", Duration::from_secs(120), || subscribed.load(Relaxed) >= devices)
        .await?;
    let connect = started.elapsed();

    // The collector: every answer, with when it arrived.
    let answers: Arc<Mutex<Vec<(String, Instant)>>> = Arc::new(Mutex::new(Vec::with_capacity(devices)));
    let collector_ready = Arc::new(AtomicUsize::new(0));
    {
        let (client, mut eventloop) = AsyncClient::new(peer_options("NF-PEER-COLLECTOR", addr, 16), 16);
        client.try_subscribe(format!("{}/+/{}", topics::ROOT, Channel::Ack.as_str()), QoS::AtLeastOnce)?;
        let (answers, ready) = (answers.clone(), collector_ready.clone());
        tasks.spawn(async move {
            let _client = client;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        ready.fetch_add(1, Relaxed);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let topic = String::from_utf8_lossy(&p.topic).into_owned();
                        answers.lock().unwrap_or_else(|e| e.into_inner()).push((topic, Instant::now()));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
    }
    // The publisher, with the cloud's side of the wire to itself.
    let publisher_ready = Arc::new(AtomicUsize::new(0));
    let (publisher, mut eventloop) = AsyncClient::new(peer_options("NF-PEER-PUBLISHER", addr, 1_024), 1_024);
    {
        let ready = publisher_ready.clone();
        tasks.spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        ready.fetch_add(1, Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
    }
    wait_for("peer collector and publisher", Duration::from_secs(30), || {
        collector_ready.load(Relaxed) > 0 && publisher_ready.load(Relaxed) > 0
    })
    .await?;

    let (broker_cpu0, bench_cpu0) = (cpu_secs(&broker.pid()), cpu_secs("self"));
    let first_publish = Instant::now();
    for i in 0..devices {
        let topic = topics::command_topic(&format!("NF-PEER-{i:05}"), Command::Recipe);
        publisher.publish(topic, QoS::AtLeastOnce, false, payload.clone()).await?;
    }
    let publish_all = first_publish.elapsed();
    let count = || answers.lock().unwrap_or_else(|e| e.into_inner()).len();
    let _ = wait_for("peer answers", timeout, || count() >= devices).await;
    let broker_cpu_s = cpu_secs(&broker.pid()) - broker_cpu0;
    let bench_cpu_s = cpu_secs("self") - bench_cpu0;
    let broker_rss = vm_rss(&broker.pid()).unwrap_or(0);
    tasks.shutdown().await;

    let answers = answers.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut seen = HashSet::new();
    let mut answered: Vec<Duration> = answers
        .into_iter()
        .filter(|(topic, _)| seen.insert(topic.clone()))
        .map(|(_, at)| at.duration_since(first_publish))
        .collect();
    answered.sort();
    Ok(Peer {
        broker: broker.version.clone(),
        payload_bytes: payload.len(),
        subscribed: subscribed.load(Relaxed),
        connect,
        answered,
        publish_all,
        broker_cpu_s,
        bench_cpu_s,
        broker_rss,
    })
}

// === the bench ===

fn main() {
    let s = Settings::from_env();
    // Every device is a socket of this process; so is every peer subscriber later.
    if let Err(e) = ensure_open_files(s.devices as u64 + 2_048) {
        eprintln!("recipe_release: {e:#}");
        std::process::exit(1);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build();
    let result = rt.map_err(anyhow::Error::from).and_then(|rt| rt.block_on(run(s)));
    if let Err(e) = result {
        eprintln!("recipe_release: {e:#}");
        std::process::exit(1);
    }
}

async fn run(s: Settings) -> anyhow::Result<()> {
    nanofleet_pki::install_crypto_provider();
    // A device that cannot enroll or connect says why (`RUST_LOG` for more).
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .try_init();
    let binary = nanofleet_binary()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load_before = load_average();
    println!(
        "recipe_release: one recipe released to {} simulated devices over mutual TLS, twice{}",
        s.devices,
        if s.quick { " (quick)" } else { "" }
    );
    println!("  server binary      {} ({})", binary.display(), binary_age(&binary));

    // --- setup: site, token, people ---
    let server = ServerProcess::start(&binary, false)?;
    let reason = "recipe release bench";
    server.cli(&binary, &["sites", "create", SITE, "--name", "Bench site", "--reason", reason])?;
    let uses = s.devices.to_string();
    let out = server.cli(
        &binary,
        &["enroll-token", "create", "--site", SITE, "--uses", &uses, "--expires", "1h", "--reason", reason],
    )?;
    let token = out.lines().next().context("the CLI printed no token")?.trim().to_owned();
    let roots = nanofleet_pki::tls::certs_from_file(&server.root_pem())?;
    let config = nanofleet_pki::tls::client_config(&roots, None)?;
    let channel =
        nanofleet_pki::tls::connect_channel(&server.grpc, config).await.map_err(anyhow::Error::msg)?;
    let admin = Bearer::new(&server.admin_token)?;
    let mut pharmacist =
        signer(&channel, &admin, "pharmacist", "Bench Pharmacist, PharmD", pb::Role::Pharmacist, SITE)
            .await?;
    let mut qa = signer(&channel, &admin, "qa", "Bench QA Reviewer", pb::Role::Qa, "").await?;

    // --- the fleet ---
    let server_idle = server.rss().unwrap_or(0);
    let self_before = nanofleet_agent::resident_bytes().unwrap_or(0);
    let started = Instant::now();
    let fleet = Fleet::start(&FleetOptions {
        sites: 1,
        devices_per_site: s.devices,
        fault_rate: 0.0,
        connect_rate: CONNECT_RATE,
        link: LinkOptions {
            sample_interval: Duration::from_secs(5),
            batch_interval: Duration::from_secs(30),
            ..LinkOptions::default()
        },
        enrollment: Some(FleetEnrollment { server: server.grpc.clone(), tokens: Tokens::Shared(token) }),
        broker_from_enrollment: true,
        ..FleetOptions::default()
    });
    let online_deadline =
        started + Duration::from_secs(60) + Duration::from_secs_f64(s.devices as f64 / 100.0);
    let mut online = 0;
    let mut progress = Instant::now();
    while Instant::now() < online_deadline {
        if fleet.connected() >= s.devices {
            online = tokio::task::block_in_place(|| server.devices_online()).unwrap_or(0) as usize;
            if online >= s.devices {
                break;
            }
        }
        if progress.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "  {:>5.0} s: {} of {} devices connected",
                started.elapsed().as_secs_f64(),
                fleet.connected(),
                s.devices
            );
            progress = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let online_after = started.elapsed();
    if online < s.devices {
        let connected = fleet.connected();
        online = tokio::task::block_in_place(|| server.devices_online()).unwrap_or(0) as usize;
        fleet.stop().await;
        anyhow::bail!(
            "{connected} of {} devices connected and the server sees {online} online after {:.0} s; \
             server log problems: {:?}; first of each: {:#?}",
            s.devices,
            online_after.as_secs_f64(),
            server.problems(),
            server.problem_examples()
        );
    }
    let settle_window = Duration::from_millis(if s.quick { 500 } else { 2_000 });
    let (settled_after_online, background_cores) =
        wait_settled(&server.pid(), settle_window, Duration::from_secs(60)).await;
    let server_loaded = server.rss().unwrap_or(0);
    let self_loaded = nanofleet_agent::resident_bytes().unwrap_or(0);

    // --- the releases ---
    let first = release(&s, &server, &mut pharmacist, &mut qa).await?;
    let (settled_between, _) = wait_settled(&server.pid(), settle_window, Duration::from_secs(60)).await;
    let second = release(&s, &server, &mut pharmacist, &mut qa).await?;
    let totals = fleet.totals();
    let fleet_ran = started.elapsed();
    let load_after = load_average();

    let stop_started = Instant::now();
    fleet.stop().await;
    let fleet_stop = stop_started.elapsed();
    let log_problems = server.problems();
    let problem_examples = server.problem_examples();
    let (exit_code, server_stop) = tokio::task::block_in_place(|| server.interrupt())?;

    // --- the peer ---
    let peer = mosquitto_fanout(s.devices, s.answer_timeout.min(Duration::from_secs(60))).await;
    let load_after_peer = load_average();

    // --- report ---
    println!();
    println!(
        "  machine            {cores} cores; load average {load_before} before, {load_after} after the \
         releases, {load_after_peer} after the peer"
    );
    println!(
        "  fleet              {} devices enrolled and online after {:.1} s (ramp {CONNECT_RATE:.0}/s); \
         server settled {:.1} s later at {:.2} cores (the fleet's background load)",
        s.devices,
        online_after.as_secs_f64(),
        settled_after_online.as_secs_f64(),
        background_cores
    );
    println!(
        "  memory             server {:.1} MiB idle, {:.1} MiB with the fleet; fleet (this process) \
         {:.1} → {:.1} MiB",
        mib(server_idle),
        mib(server_loaded),
        mib(self_before),
        mib(self_loaded)
    );
    first.print(
        "first release (v1; each device also gets the trust root versions adding both signers)",
        s.devices,
    );
    println!("  server settled again after {:.1} s", settled_between.as_secs_f64());
    second.print("second release (v2; the devices already trust both signers)", s.devices);
    match &peer {
        Ok(p) => {
            println!("  peer: {} fan-out, no signatures or storage", p.broker);
            println!(
                "    subscribers      {} of {} subscribed after {:.1} s; payload {} bytes",
                p.subscribed,
                s.devices,
                p.connect.as_secs_f64(),
                p.payload_bytes
            );
            println!("    publish → answer {} answers; {}", p.answered.len(), ms_line(&p.answered));
            println!(
                "    last answer      {:.2} s after the first publish (publishing took {:.2} s)",
                percentile_ms(&p.answered, 100.0) / 1000.0,
                p.publish_all.as_secs_f64()
            );
            println!(
                "    CPU              broker {:.2} s, clients (this process) {:.2} s; broker {:.1} MiB",
                p.broker_cpu_s,
                p.bench_cpu_s,
                mib(p.broker_rss)
            );
        }
        Err(e) => println!("  peer               not run: {e:#}"),
    }
    let ratio = |r: &Release, q: f64| {
        peer.as_ref()
            .ok()
            .map(|p| round2(percentile_ms(&r.answered, q) / percentile_ms(&p.answered, q).max(1.0)))
    };
    if peer.is_ok() {
        let show = |v: Option<f64>| v.map_or("?".into(), |v| format!("{v:.2}"));
        println!(
            "  ratio nanofleet / Mosquitto  p50 {} and {}, p99 {} and {}, last answer {} and {} (first and second release)",
            show(ratio(&first, 50.0)),
            show(ratio(&second, 50.0)),
            show(ratio(&first, 99.0)),
            show(ratio(&second, 99.0)),
            show(ratio(&first, 100.0)),
            show(ratio(&second, 100.0))
        );
    }
    let met = |r: &Release| {
        if !r.complete(s.devices) {
            "not all accepted"
        } else if percentile_ms(&r.answered, 99.0) <= TARGET_P99_MS {
            "met"
        } else {
            "not met"
        }
    };
    println!(
        "  target             p99 ≤ {TARGET_P99_MS:.0} ms from release to answer: first release {}, second {}",
        met(&first),
        met(&second)
    );
    println!(
        "  fleet              {} telemetry batches; {} messages acked in {:.0} s ({:.0}/s), {} refused, \
         {} reconnects; stop {:.2} s",
        totals.telemetry_batches,
        totals.outbox.acked,
        fleet_ran.as_secs_f64(),
        totals.outbox.acked as f64 / fleet_ran.as_secs_f64(),
        totals.outbox.refused,
        totals.disconnects,
        fleet_stop.as_secs_f64()
    );
    let problem_total: usize = log_problems.values().sum();
    println!("  server log         {problem_total} warnings or errors");
    for (kind, n) in &log_problems {
        println!("                     {n:>6} x {kind}");
        if let Some(line) = problem_examples.get(kind) {
            println!("                            first: {}", line.chars().take(400).collect::<String>());
        }
    }
    println!(
        "  server stop        exit code {} after SIGINT, {:.2} s",
        exit_code.map_or("none (signal)".into(), |c| c.to_string()),
        server_stop.as_secs_f64()
    );

    let result = json!({
        "bench": "recipe_release",
        "quick": s.quick,
        "cores": cores,
        "load_before": load_before,
        "load_after": load_after,
        "load_after_peer": load_after_peer,
        "devices": s.devices,
        "connect_rate": CONNECT_RATE,
        "online_s": round2(online_after.as_secs_f64()),
        "settled_after_online_s": round2(settled_after_online.as_secs_f64()),
        "server_background_cores": round2(background_cores),
        "settled_between_s": round2(settled_between.as_secs_f64()),
        "fleet_messages_per_s": round1(totals.outbox.acked as f64 / fleet_ran.as_secs_f64()),
        "server_rss_idle_bytes": server_idle,
        "server_rss_loaded_bytes": server_loaded,
        "fleet_rss_before_bytes": self_before,
        "fleet_rss_loaded_bytes": self_loaded,
        "target_p99_ms": TARGET_P99_MS,
        "first_release": first.json(s.devices),
        "second_release": second.json(s.devices),
        "peer_mosquitto": peer.as_ref().ok().map(Peer::json),
        "skipped_peer": peer.as_ref().err().map(|e| format!("{e:#}")),
        "ratio_p50": [ratio(&first, 50.0), ratio(&second, 50.0)],
        "ratio_p99": [ratio(&first, 99.0), ratio(&second, 99.0)],
        "ratio_last": [ratio(&first, 100.0), ratio(&second, 100.0)],
        "telemetry_batches": totals.telemetry_batches,
        "acked": totals.outbox.acked,
        "refused": totals.outbox.refused,
        "disconnects": totals.disconnects,
        "fleet_stop_s": round2(fleet_stop.as_secs_f64()),
        "server_log_problems": log_problems,
        "server_exit_code": exit_code,
        "server_stop_s": round2(server_stop.as_secs_f64()),
    });
    println!("RESULT {result}");
    for (name, r) in [("first", &first), ("second", &second)] {
        anyhow::ensure!(
            r.complete(s.devices),
            "{name} release: {} of {} devices accepted ({} refused, {} pending, {} missing)",
            r.accepted,
            s.devices,
            r.refused,
            r.pending,
            s.devices.saturating_sub(r.listed)
        );
    }
    Ok(())
}
