//! A lot recall at fleet scale: from QA's recall to every device's acknowledgement of
//! the signed deny list.
//!
//! ```text
//! cargo bench -p nanofleet-tests --bench recall
//! NF_BENCH_QUICK=1 cargo bench -p nanofleet-tests --bench recall     # 200 devices
//! NF_BENCH_DEVICES=2000 cargo bench -p nanofleet-tests --bench recall
//! ```
//!
//! Both ends of every connection are in this process, so it needs two file
//! descriptors per device: under a hard limit of 20,000 open files, 9,800 devices at
//! most.
//!
//! The server runs in this process (embedded broker, SQLite). Each device is one MQTT 5
//! connection on the server's loopback plaintext listener, client id = device id: it
//! announces itself (birth) and subscribes to its command topics; on a deny list it
//! answers with an `Ack` at QoS 1, which the server acknowledges (PUBACK) only after it
//! stored the answer. Operations register a cartridge type and two lots, QA releases
//! them; then QA recalls the first lot (its first recall: the server also creates QA's
//! deny-list key, so every device first gets the new trust root version), and later
//! the second (the steady state). For each recall, from the call:
//! - **received**: each device's receipt of the deny list;
//! - **acknowledged**: the server's PUBACK of each device's answer (stored);
//! - the recall call's own latency (the lot, the signed list, the fan-out, the trace).
//!
//! Peer: AWS IoT Jobs notifies at most 1,000 devices per minute (its documented maximum
//! rate). Measures and reports; exits non-zero only if a device never acknowledged.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nanofleet_proto::Message as _;
use nanofleet_proto::device::v1::{Ack, AckResult, AckSubject, DenyList, Envelope};
use nanofleet_proto::topics::{Channel, command_filter, device_topic};
use nanofleet_proto::v1 as pb;
use nanofleet_proto::v1::inventory_service_client::InventoryServiceClient;
use nanofleet_tests::bench::*;
use nanofleet_tests::{Sandbox, birth};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio_util::sync::CancellationToken;

const GTIN: &str = nanofleet_recipe::example::EXAMPLE_GTIN;

/// What one device saw of each deny list version (index = version - 1).
#[derive(Default, Clone, Copy)]
struct Seen {
    received: [Option<Instant>; 2],
    acked: [Option<Instant>; 2],
}

fn device_id(i: usize) -> String {
    format!("RC-{:05}", i + 1)
}

async fn device(
    addr: std::net::SocketAddr,
    id: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    index: usize,
    ready: tokio::sync::mpsc::UnboundedSender<()>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut opts = MqttOptions::new(&id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(60)).set_clean_start(true).set_outgoing_inflight_upper_limit(16);
    let (client, mut events) = AsyncClient::new(opts, 16);
    let state = device_topic(&id, Channel::State);
    let ack_topic = device_topic(&id, Channel::Ack);
    let mut announced = false;
    // Packet ids of answers in flight, with the version they answer.
    let mut answers: Vec<(u16, usize)> = Vec::new();
    let mut pending_version: Option<usize> = None;
    loop {
        let ev = tokio::select! {
            e = events.poll() => e?,
            _ = stop.cancelled() => break,
        };
        match ev {
            Event::Incoming(Packet::ConnAck(_)) => {
                client.subscribe(command_filter(&id), QoS::AtLeastOnce).await?;
                client.publish(state.clone(), QoS::AtLeastOnce, true, birth(&id, "bench-site", "s1")).await?;
            }
            Event::Incoming(Packet::PubAck(p)) => {
                if !announced {
                    announced = true;
                    let _ = ready.send(());
                } else if let Some(i) = answers.iter().position(|(pkid, _)| *pkid == p.pkid) {
                    let (_, v) = answers.remove(i);
                    seen.lock().unwrap()[index].acked[v] = Some(Instant::now());
                }
            }
            Event::Outgoing(rumqttc::Outgoing::Publish(pkid)) => {
                if let Some(v) = pending_version.take() {
                    answers.push((pkid, v));
                }
            }
            Event::Incoming(Packet::Publish(p)) if p.topic.ends_with(b"/cmd/deny-list") => {
                let now = Instant::now();
                let Ok(env) = Envelope::decode(p.payload.as_ref()) else { continue };
                let Ok(list) = DenyList::decode(env.payload.as_slice()) else { continue };
                let v = usize::try_from(list.version).unwrap_or(0);
                if !(1..=2).contains(&v) {
                    continue;
                }
                seen.lock().unwrap()[index].received[v - 1].get_or_insert(now);
                let ack = Ack {
                    device_id: id.clone(),
                    time_unix_ms: nanofleet_tests::now_ms(),
                    subject: AckSubject::DenyList as i32,
                    version: list.version,
                    result: AckResult::Accepted as i32,
                    ..Default::default()
                };
                pending_version = Some(v - 1);
                client.publish(ack_topic.clone(), QoS::AtLeastOnce, false, ack.encode_to_vec()).await?;
            }
            _ => {}
        }
    }
    let _ = client.disconnect().await;
    Ok(())
}

fn main() {
    fleet_main("recall", run);
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn run(n: usize) -> anyhow::Result<()> {
    let sb = Sandbox::start().await?;
    let addr = sb.mqtt_addr();
    println!("recall: {n} devices on {addr} (in-process server, SQLite), load average {}", load_average());
    let seen = Arc::new(Mutex::new(vec![Seen::default(); n]));
    let stop = CancellationToken::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel();
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        tasks.push(tokio::spawn(device(addr, device_id(i), seen.clone(), i, ready_tx.clone(), stop.clone())));
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
    // Births are handled (trust root versions noted) before the recall.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut ops = InventoryServiceClient::with_interceptor(sb.grpc_channel().await?, sb.admin());
    let (qa_bearer, qa_password) = sb.person_named("qa", "Quinn QA", pb::Role::Qa, "").await?;
    let mut qa = InventoryServiceClient::with_interceptor(sb.grpc_channel().await?, qa_bearer)
        .max_decoding_message_size(64 << 20);
    let kind = bench_cartridge_type();
    ops.create_cartridge_type(pb::CreateCartridgeTypeRequest { cartridge_type: Some(kind) }).await?;
    let today = jiff::Zoned::now().date();
    for lot in ["LR-1", "LR-2"] {
        let req = pb::CreateLotRequest {
            gtin: GTIN.into(),
            lot: lot.into(),
            produced: today.saturating_sub(jiff::Span::new().days(10)).to_string(),
            expires: today.saturating_add(jiff::Span::new().days(200)).to_string(),
            quantity: 10,
        };
        ops.create_lot(req).await?;
        qa.release_lot(pb::ReleaseLotRequest { gtin: GTIN.into(), lot: lot.into(), reason: "bench".into() })
            .await?;
    }

    let mut results = Vec::new();
    for (v, lot) in ["LR-1", "LR-2"].into_iter().enumerate() {
        let t0 = Instant::now();
        qa.recall_lot(pb::RecallLotRequest {
            gtin: GTIN.into(),
            lot: lot.into(),
            reason: "bench".into(),
            user_id: "qa".into(),
            password: qa_password.clone(),
        })
        .await?;
        let call = t0.elapsed();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let done = seen.lock().unwrap().iter().filter(|s| s.acked[v].is_some()).count();
            if done == n {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{done} of {n} devices acknowledged deny list v{} after 120 s",
                v + 1
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let s = seen.lock().unwrap().clone();
        let mut received: Vec<Duration> = s.iter().filter_map(|x| x.received[v].map(|t| t - t0)).collect();
        let mut acked: Vec<Duration> = s.iter().filter_map(|x| x.acked[v].map(|t| t - t0)).collect();
        received.sort();
        acked.sort();
        let what =
            if v == 0 { "first recall (with QA's new key in a trust root update)" } else { "second recall" };
        println!("{what}:");
        println!("  recall call                  {:.0} ms (signed list, fan-out, trace)", ms(call));
        println!(
            "  received                     p50 {:.0} ms, p99 {:.0} ms, all {:.0} ms",
            percentile_ms(&received, 50.0),
            percentile_ms(&received, 99.0),
            ms(*received.last().unwrap_or(&Duration::ZERO))
        );
        println!(
            "  acknowledged (stored)        p50 {:.0} ms, p99 {:.0} ms, all {:.0} ms",
            percentile_ms(&acked, 50.0),
            percentile_ms(&acked, 99.0),
            ms(*acked.last().unwrap_or(&Duration::ZERO))
        );
        results.push(serde_json::json!({
            "recall": v + 1,
            "call_ms": ms(call),
            "received_p50_ms": percentile_ms(&received, 50.0),
            "received_p99_ms": percentile_ms(&received, 99.0),
            "acked_p50_ms": percentile_ms(&acked, 50.0),
            "acked_p99_ms": percentile_ms(&acked, 99.0),
            "acked_all_ms": ms(*acked.last().unwrap_or(&Duration::ZERO)),
        }));
    }
    println!(
        "peer (AWS IoT Jobs maximum)    1,000 devices per minute: {n} devices in {:.0} s",
        n as f64 / 1000.0 * 60.0
    );
    println!("RESULT {}", serde_json::json!({ "bench": "recall", "devices": n, "recalls": results }));
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    sb.stop().await;
    Ok(())
}
