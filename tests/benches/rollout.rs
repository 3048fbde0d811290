//! A rollout at fleet scale: how fast the offers of a wave reach every device, and how
//! fast the server's bookkeeping takes the devices' reports.
//!
//! ```text
//! cargo bench -p nanofleet-tests --bench rollout
//! NF_BENCH_QUICK=1 cargo bench -p nanofleet-tests --bench rollout     # 200 devices
//! NF_BENCH_DEVICES=2000 cargo bench -p nanofleet-tests --bench rollout
//! ```
//!
//! Both ends of every connection are in this process, so it needs two file
//! descriptors per device: under a hard limit of 20,000 open files, 9,800 devices at
//! most.
//!
//! The server runs in this process (embedded broker, SQLite). Each device is one MQTT 5
//! connection on the server's loopback plaintext listener, client id = device id: it
//! announces itself (birth) and subscribes to its command topics. A person releases an
//! image and creates a forced rollout of one wave over every device. Measured:
//! - **notification**: from the rollout's creation to each device's receipt of its
//!   signed offer (the scheduler ticks once a second, so up to a second of it is the
//!   wait for the first tick);
//! - **bookkeeping**: once every device has its offer, all of them report at once the
//!   six steps an update goes through (downloading, downloaded, installing, rebooting,
//!   verifying, committed), as `UpdateReport`s at QoS 1; reports acknowledged per
//!   second (ingest acknowledges a report after the rollout has recorded it), and the
//!   time until the rollout is complete.
//!
//! Peer: AWS IoT Jobs notifies at most 1,000 devices per minute (its documented
//! maximum rollout rate). The harness measures and reports; it asserts nothing about
//! speed, and exits non-zero only if a device got no offer or the rollout does not
//! complete.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nanofleet_proto::Message as _;
use nanofleet_proto::device::v1::{UpdateCommand, UpdateOffer, UpdateReport, UpdateStatus, update_command};
use nanofleet_proto::topics::{Channel, command_filter, device_topic};
use nanofleet_proto::v1 as pb;
use nanofleet_proto::v1::firmware_service_client::FirmwareServiceClient;
use nanofleet_proto::v1::rollout_service_client::RolloutServiceClient;
use nanofleet_tests::bench::*;
use nanofleet_tests::{Sandbox, birth};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use sha2::Digest as _;
use tokio_util::sync::CancellationToken;

/// What one device saw.
#[derive(Default, Clone, Copy)]
struct Seen {
    offer_at: Option<Instant>,
    /// When its last report was acknowledged.
    reports_acked: Option<Instant>,
}

/// The steps a device reports, in order.
const STEPS: [UpdateStatus; 6] = [
    UpdateStatus::Downloading,
    UpdateStatus::Downloaded,
    UpdateStatus::Installing,
    UpdateStatus::Rebooting,
    UpdateStatus::Verifying,
    UpdateStatus::Committed,
];

fn device_id(i: usize) -> String {
    format!("RB-{:05}", i + 1)
}

/// One device: birth, subscribe, answer the offer.
async fn device(
    addr: std::net::SocketAddr,
    id: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    index: usize,
    ready: tokio::sync::mpsc::UnboundedSender<()>,
    mut go: tokio::sync::watch::Receiver<bool>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut opts = MqttOptions::new(&id, addr.ip().to_string(), addr.port());
    // rumqttc sizes a per-connection table by this limit (u16::MAX by default, about
    // 13 MiB per connection).
    opts.set_keep_alive(Duration::from_secs(60)).set_clean_start(true).set_outgoing_inflight_upper_limit(16);
    let (client, mut events) = AsyncClient::new(opts, 16);
    let state = device_topic(&id, Channel::State);
    let update = device_topic(&id, Channel::Update);
    let mut acks = 0usize;
    let mut offer: Option<UpdateOffer> = None;
    let mut reported = false;
    loop {
        let ev = tokio::select! {
            e = events.poll() => e?,
            _ = stop.cancelled() => break,
            Ok(()) = go.changed(), if !reported => {
                let Some(o) = &offer else { continue };
                reported = true;
                for step in STEPS {
                    let report = UpdateReport {
                        device_id: id.clone(),
                        rollout_id: o.rollout_id.clone(),
                        version: o.version.clone(),
                        status: step as i32,
                        running_version: if step == UpdateStatus::Committed { o.version.clone() } else { "2.3.1".into() },
                        time_unix_ms: nanofleet_tests::now_ms(),
                        ..Default::default()
                    };
                    client.publish(update.clone(), QoS::AtLeastOnce, false, report.encode_to_vec()).await?;
                }
                continue;
            }
        };
        match ev {
            Event::Incoming(Packet::ConnAck(_)) => {
                client.subscribe(command_filter(&id), QoS::AtLeastOnce).await?;
                client.publish(state.clone(), QoS::AtLeastOnce, true, birth(&id, "bench-site", "s1")).await?;
            }
            Event::Incoming(Packet::PubAck(_)) => {
                // The birth's, then the six reports'.
                acks += 1;
                if acks == 1 {
                    let _ = ready.send(());
                } else if acks == 1 + STEPS.len() {
                    seen.lock().unwrap()[index].reports_acked = Some(Instant::now());
                }
            }
            Event::Incoming(Packet::Publish(p)) if p.topic.ends_with(b"/cmd/update") => {
                let now = Instant::now();
                let Ok(cmd) = UpdateCommand::decode(p.payload.as_ref()) else { continue };
                let Some(update_command::Command::Offer(env)) = cmd.command else { continue };
                let Ok(o) = UpdateOffer::decode(env.payload.as_slice()) else { continue };
                let mut s = seen.lock().unwrap();
                if s[index].offer_at.is_none() {
                    s[index].offer_at = Some(now);
                    offer = Some(o);
                }
            }
            _ => {}
        }
    }
    let _ = client.disconnect().await;
    Ok(())
}

fn main() {
    fleet_main("rollout", run);
}

async fn run(n: usize) -> anyhow::Result<()> {
    let sb = Sandbox::start().await?;
    let addr = sb.mqtt_addr();
    println!("rollout: {n} devices on {addr} (in-process server, SQLite), load average {}", load_average());

    // The fleet connects and announces itself.
    let seen = Arc::new(Mutex::new(vec![Seen::default(); n]));
    let stop = CancellationToken::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel();
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        tasks.push(tokio::spawn(device(
            addr,
            device_id(i),
            seen.clone(),
            i,
            ready_tx.clone(),
            go_rx.clone(),
            stop.clone(),
        )));
        if i % 500 == 499 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut ready = 0;
    while ready < n {
        match tokio::time::timeout(Duration::from_secs(120), ready_rx.recv()).await {
            Ok(Some(())) => ready += 1,
            _ => anyhow::bail!("only {ready} of {n} devices announced themselves"),
        }
    }
    println!("connected and announced: {n} in {:.1} s", started.elapsed().as_secs_f64());

    // A release and a forced rollout of one wave over every device.
    let (bearer, password) = sb.person_named("rel", "Rel Ops", pb::Role::Ops, "").await?;
    let img = vec![7u8; 100_000];
    let header = pb::FirmwareHeader {
        model: "NF-200".into(),
        version: "2.4.0".into(),
        release_counter: 1,
        length: img.len() as u64,
        sha256: hex::encode(sha2::Sha256::digest(&img)),
        user_id: "rel".into(),
        password,
        notes: "bench".into(),
    };
    use pb::upload_firmware_request::Part;
    let msgs = vec![
        pb::UploadFirmwareRequest { part: Some(Part::Header(header)) },
        pb::UploadFirmwareRequest { part: Some(Part::Chunk(img)) },
    ];
    let mut fw = FirmwareServiceClient::with_interceptor(sb.grpc_channel().await?, bearer.clone());
    let target = fw
        .upload_firmware(futures::stream::iter(msgs))
        .await?
        .into_inner()
        .release
        .unwrap_or_default()
        .target;
    let mut api = RolloutServiceClient::with_interceptor(sb.grpc_channel().await?, bearer)
        .max_decoding_message_size(256 * 1024 * 1024);
    let t0 = Instant::now();
    let created = api
        .create_rollout(pb::CreateRolloutRequest {
            target,
            action: nanofleet_proto::device::v1::UpdateAction::Forced as i32,
            error_threshold_pct: 100,
            reason: "bench".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .rollout
        .unwrap_or_default();
    let id = created.rollout_id;
    let members: u32 = created.counts.iter().map(|c| c.devices).sum();
    anyhow::ensure!(members as usize == n, "the rollout took {members} of {n} devices");

    // Every device has its offer; then all report at once.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let got = seen.lock().unwrap().iter().filter(|s| s.offer_at.is_some()).count();
        if got == n {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "{got} of {n} devices got their offer after 300 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let go_at = Instant::now();
    go_tx.send(true)?;
    let completed_at = loop {
        let r = api
            .get_rollout(pb::GetRolloutRequest { rollout_id: id.clone() })
            .await?
            .into_inner()
            .rollout
            .unwrap_or_default();
        if r.state == "completed" {
            break Instant::now();
        }
        anyhow::ensure!(Instant::now() < deadline, "rollout not complete after 300 s: {:?}", r.counts);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let seen = seen.lock().unwrap().clone();
    let mut offers: Vec<Duration> = seen.iter().filter_map(|s| s.offer_at.map(|t| t - t0)).collect();
    anyhow::ensure!(offers.len() == n, "{} of {n} devices got their offer", offers.len());
    offers.sort();
    let last_ack = seen.iter().filter_map(|s| s.reports_acked).max().unwrap_or(completed_at);
    let acked = seen.iter().filter(|s| s.reports_acked.is_some()).count() * STEPS.len();
    let report_secs = (last_ack - go_at).as_secs_f64().max(1e-6);
    let all_notified = offers.last().copied().unwrap_or_default();
    let first_offer = offers.first().copied().unwrap_or_default();
    println!("devices                        {n}");
    println!(
        "offers received                first {:.0} ms, p50 {:.0} ms, p99 {:.0} ms, all {:.0} ms after creation",
        first_offer.as_secs_f64() * 1e3,
        percentile_ms(&offers, 50.0),
        percentile_ms(&offers, 99.0),
        all_notified.as_secs_f64() * 1e3
    );
    println!(
        "spread of one wave's offers    {:.0} ms ({:.0} offers/s)",
        (all_notified - first_offer).as_secs_f64() * 1e3,
        n as f64 / (all_notified - first_offer).as_secs_f64().max(1e-3)
    );
    println!(
        "reports acknowledged           {acked} in {:.2} s: {:.0} reports/s (all devices report at once, 6 steps each)",
        report_secs,
        acked as f64 / report_secs
    );
    println!(
        "rollout complete               {:.2} s after creation, {:.2} s after the reports began",
        (completed_at - t0).as_secs_f64(),
        (completed_at - go_at).as_secs_f64()
    );
    println!(
        "peer (AWS IoT Jobs maximum)    1,000 devices per minute: {n} devices in {:.0} s",
        n as f64 / 1000.0 * 60.0
    );
    println!(
        "RESULT {}",
        serde_json::json!({
            "bench": "rollout",
            "devices": n,
            "first_offer_ms": first_offer.as_millis(),
            "p50_offer_ms": percentile_ms(&offers, 50.0),
            "p99_offer_ms": percentile_ms(&offers, 99.0),
            "all_notified_ms": all_notified.as_millis(),
            "offers_per_s": n as f64 / (all_notified - first_offer).as_secs_f64().max(1e-3),
            "reports_per_s": acked as f64 / report_secs,
            "complete_s": (completed_at - t0).as_secs_f64(),
        })
    );
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    sb.stop().await;
    Ok(())
}
