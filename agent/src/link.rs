//! Runs one device: reads its HAL on a timer, batches samples, numbers and queues the
//! batches, and keeps an MQTT connection that delivers them at QoS 1.
//!
//! Designed around rumqttc's habits:
//! - the outbox, not the client, keeps unacknowledged messages (see [`crate::outbox`]);
//! - `poll()` retries at once after an error, so the connection task backs off itself
//!   (exponential, with jitter, up to `max_backoff`);
//! - at most `window` publishes are handed to the client at once, so `publish().await`
//!   never waits on a full request queue;
//! - the maximum packet size is raised from rumqttc's 10 KiB default;
//! - the in-flight limit is set to the window: rumqttc preallocates a slot per possible
//!   packet id up to it (13 MiB per connection at its default of 65,535);
//! - every connection gets a new session id, carried by its birth and its last will, so
//!   a late death of an old connection cannot mark the device offline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use nanofleet_proto::Message as _;
use nanofleet_proto::device::v1::{DeviceState, Event, EventBatch, Presence, Sample, TelemetryBatch};
use nanofleet_proto::topics::{self, Channel};
use rand::Rng;
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet, PubAckReason};
use rumqttc::v5::{AsyncClient, Event as MqttEvent, MqttOptions};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::hal::{Device, DeviceInfo};
use crate::outbox::{Outbox, OutboxStats, Stream};
use crate::seq::SeqCounter;

/// How a device talks to the cloud.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    pub broker_host: String,
    pub broker_port: u16,
    /// Mutual TLS (the device certificate and the pinned fleet root); `None` connects
    /// in plaintext, which only a development listener accepts.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Time between two sensor readings.
    pub sample_interval: Duration,
    /// Time covered by one telemetry batch.
    pub batch_interval: Duration,
    pub keep_alive: Duration,
    /// Messages kept while the cloud is unreachable.
    pub outbox_capacity: usize,
    /// Unacknowledged publishes on the wire.
    pub window: usize,
    pub max_backoff: Duration,
    /// On shutdown, how long to wait for the outbox to drain.
    pub drain_timeout: Duration,
}

impl Default for LinkOptions {
    fn default() -> Self {
        LinkOptions {
            broker_host: "127.0.0.1".into(),
            broker_port: 8883,
            tls: None,
            sample_interval: Duration::from_millis(100),
            batch_interval: Duration::from_secs(1),
            keep_alive: Duration::from_secs(30),
            outbox_capacity: 10_000,
            window: 16,
            max_backoff: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(2),
        }
    }
}

impl LinkOptions {
    /// The defaults, talking to the broker at `addr`.
    pub fn to_broker(addr: std::net::SocketAddr) -> LinkOptions {
        LinkOptions { broker_host: addr.ip().to_string(), broker_port: addr.port(), ..LinkOptions::default() }
    }
}

/// What a running device reports about itself.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LinkStatus {
    pub connected: bool,
    pub connects: u64,
    pub disconnects: u64,
    pub telemetry_batches: u64,
    pub event_batches: u64,
    pub outbox: OutboxStats,
}

pub type SharedStatus = Arc<Mutex<LinkStatus>>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Seq(#[from] crate::seq::SeqError),
    #[error("mqtt client: {0}")]
    Client(#[from] rumqttc::v5::ClientError),
}

/// What the connection task reports; `generation` counts CONNACKs.
enum Link {
    Connected { session_id: String, generation: u64 },
    Sent { pkid: u16, generation: u64 },
    Acked { pkid: u16, accepted: bool, reason: PubAckReason },
    Disconnected { error: String, generation: u64 },
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn new_session_id() -> String {
    format!("{:016x}", rand::rng().random::<u64>())
}

fn state_message(info: &DeviceInfo, presence: Presence, session_id: &str, boot_id: &str) -> Vec<u8> {
    let online = presence == Presence::Online;
    DeviceState {
        device_id: info.device_id.clone(),
        presence: presence as i32,
        session_id: session_id.to_owned(),
        time_unix_ms: now_ms(),
        firmware_version: if online { info.firmware_version.clone() } else { String::new() },
        model: if online { info.model.clone() } else { String::new() },
        site_id: if online { info.site_id.clone() } else { String::new() },
        boot_id: boot_id.to_owned(),
    }
    .encode_to_vec()
}

fn last_will(info: &DeviceInfo, session_id: &str, boot_id: &str) -> LastWill {
    LastWill::new(
        topics::device_topic(&info.device_id, Channel::State),
        state_message(info, Presence::Offline, session_id, boot_id),
        QoS::AtLeastOnce,
        false,
        None,
    )
}

/// Runs `device` until `cancel` fires, then publishes its death, waits briefly for the
/// outbox to drain, and disconnects.
pub async fn run_device<D: Device>(
    mut device: D,
    opts: LinkOptions,
    mut seqs: SeqCounter,
    cancel: CancellationToken,
    status: SharedStatus,
) -> Result<(), Error> {
    let info = device.info().clone();
    let boot_id = new_session_id();
    let first_session = new_session_id();
    let mut mqtt = MqttOptions::new(&info.device_id, &opts.broker_host, opts.broker_port);
    mqtt.set_keep_alive(opts.keep_alive)
        .set_clean_start(true)
        .set_max_packet_size(Some(256 * 1024))
        // rumqttc sizes a per-connection table by this limit (u16::MAX by default,
        // about 13 MiB per connection); the outbox never has more on the wire than
        // `window` plus a birth or death.
        .set_outgoing_inflight_upper_limit(u16::try_from(opts.window + 2).unwrap_or(u16::MAX))
        .set_last_will(last_will(&info, &first_session, &boot_id));
    if let Some(tls) = &opts.tls {
        mqtt.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
            tls.clone(),
        )));
    }
    let (client, mut eventloop) = AsyncClient::new(mqtt, opts.window + 8);
    let (tx, mut rx) = mpsc::unbounded_channel();

    // The connection task: polls the client, reports what happens, backs off on errors.
    let conn_info = info.clone();
    let conn_boot = boot_id.clone();
    let max_backoff = opts.max_backoff;
    let generation = Arc::new(AtomicU64::new(0));
    let conn_generation = generation.clone();
    let conn = tokio::spawn(async move {
        let mut session = first_session;
        let mut backoff = Duration::from_millis(100);
        let mut generation = 0u64;
        let mut failures = 0u64;
        loop {
            let report = match eventloop.poll().await {
                Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                    backoff = Duration::from_millis(100);
                    failures = 0;
                    generation += 1;
                    conn_generation.store(generation, Ordering::SeqCst);
                    Some(Link::Connected { session_id: session.clone(), generation })
                }
                Ok(MqttEvent::Incoming(Packet::PubAck(ack))) => Some(Link::Acked {
                    pkid: ack.pkid,
                    accepted: matches!(
                        ack.reason,
                        PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                    ),
                    reason: ack.reason,
                }),
                Ok(MqttEvent::Outgoing(Outgoing::Publish(pkid))) => Some(Link::Sent { pkid, generation }),
                Ok(MqttEvent::Outgoing(Outgoing::Disconnect)) => break,
                Ok(_) => None,
                Err(e) => {
                    if tx.is_closed() {
                        break;
                    }
                    // Our outbox re-sends; the client must not replay its own copies.
                    eventloop.pending.clear();
                    session = new_session_id();
                    eventloop.options.set_last_will(last_will(&conn_info, &session, &conn_boot));
                    failures += 1;
                    // The first failure in a row and then every tenth, not every retry.
                    if failures == 1 || failures.is_multiple_of(10) {
                        tracing::warn!(
                            device_id = %conn_info.device_id,
                            failures,
                            retry_in_ms = backoff.as_millis() as u64,
                            error = %e,
                            "cannot reach the broker"
                        );
                    }
                    let _ = tx.send(Link::Disconnected { error: e.to_string(), generation });
                    let jitter = rand::rng().random_range(0.5..1.5);
                    tokio::time::sleep(backoff.mul_f64(jitter)).await;
                    backoff = (backoff * 2).min(max_backoff);
                    None
                }
            };
            if let Some(r) = report
                && tx.send(r).is_err()
            {
                break;
            }
        }
    });

    let mut outbox = Outbox::new(opts.outbox_capacity, opts.window);
    let mut connected = false;
    let mut session: Option<String> = None;
    let mut samples: Vec<Sample> = Vec::new();
    let mut events: Vec<Event> = Vec::new();
    let mut batch_started = now_ms();
    let mut last_read = now_ms();
    let mut tick = tokio::time::interval(opts.sample_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let batch_ms = opts.batch_interval.as_millis() as i64;
    let telemetry_topic = topics::device_topic(&info.device_id, Channel::Telemetry);
    let events_topic = topics::device_topic(&info.device_id, Channel::Events);
    let state_topic = topics::device_topic(&info.device_id, Channel::State);

    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {
                let now = now_ms();
                let reading = device.read(now, (now - last_read).max(1));
                last_read = now;
                samples.push(reading.sample);
                events.extend(reading.events);
                if now - batch_started >= batch_ms || samples.len() >= 1_000 {
                    let seq = seqs.next(Stream::Telemetry)?;
                    let batch = TelemetryBatch {
                        device_id: info.device_id.clone(),
                        seq,
                        samples: std::mem::take(&mut samples),
                        boot_id: boot_id.clone(),
                    };
                    outbox.push(Stream::Telemetry, seq, telemetry_topic.clone(), Bytes::from(batch.encode_to_vec()), now);
                    batch_started = now;
                    status.lock().unwrap_or_else(|p| p.into_inner()).telemetry_batches += 1;
                }
                // Events go out at once: an alarm should not wait for the batch timer.
                if !events.is_empty() {
                    let seq = seqs.next(Stream::Events)?;
                    let batch = EventBatch {
                        device_id: info.device_id.clone(),
                        seq,
                        events: std::mem::take(&mut events),
                        boot_id: boot_id.clone(),
                    };
                    outbox.push(Stream::Events, seq, events_topic.clone(), Bytes::from(batch.encode_to_vec()), now);
                    status.lock().unwrap_or_else(|p| p.into_inner()).event_batches += 1;
                }
            }
            Some(link) = rx.recv() => match link {
                Link::Connected { session_id, generation } => {
                    connected = true;
                    let birth = state_message(&info, Presence::Online, &session_id, &boot_id);
                    session = Some(session_id.clone());
                    client.publish(state_topic.clone(), QoS::AtLeastOnce, true, birth).await?;
                    outbox.handed_untracked(generation);
                    let mut st = status.lock().unwrap_or_else(|p| p.into_inner());
                    st.connected = true;
                    st.connects += 1;
                    tracing::debug!(device_id = %info.device_id, %session_id, "connected");
                }
                Link::Sent { pkid, generation } => outbox.on_sent(pkid, generation),
                Link::Acked { pkid, accepted, reason } => {
                    if !accepted {
                        tracing::warn!(device_id = %info.device_id, ?reason, "cloud refused a message");
                    }
                    outbox.on_acked(pkid, accepted);
                }
                Link::Disconnected { error, generation } => {
                    if connected {
                        tracing::info!(device_id = %info.device_id, %error, "connection lost, will re-send unacknowledged messages");
                    }
                    connected = false;
                    outbox.on_disconnected(generation);
                    let mut st = status.lock().unwrap_or_else(|p| p.into_inner());
                    st.connected = false;
                    st.disconnects += 1;
                }
            },
        }
        if connected {
            let g = generation.load(Ordering::SeqCst);
            while let Some(send) = outbox.next_send(g) {
                client.publish(send.topic, QoS::AtLeastOnce, false, send.payload).await?;
            }
        }
        status.lock().unwrap_or_else(|p| p.into_inner()).outbox = outbox.stats();
    }

    // Orderly goodbye: drain what we can, announce the death ourselves (a clean
    // DISCONNECT discards the last will), wait for its PUBACK, then disconnect.
    if let (true, Some(session_id)) = (connected, &session) {
        let deadline = tokio::time::Instant::now() + opts.drain_timeout;
        let mut death_sent = false;
        let g = generation.load(Ordering::SeqCst);
        loop {
            while let Some(send) = outbox.next_send(g) {
                client.publish(send.topic, QoS::AtLeastOnce, false, send.payload).await?;
            }
            if outbox.is_empty() && !death_sent {
                let death = state_message(&info, Presence::Offline, session_id, &boot_id);
                client.publish(state_topic.clone(), QoS::AtLeastOnce, false, death).await?;
                outbox.handed_untracked(g);
                death_sent = true;
            }
            if death_sent && outbox.on_wire() == 0 {
                break;
            }
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Link::Sent { pkid, generation })) => outbox.on_sent(pkid, generation),
                Ok(Some(Link::Acked { pkid, accepted, .. })) => outbox.on_acked(pkid, accepted),
                Ok(Some(Link::Connected { .. })) => {}
                Ok(Some(Link::Disconnected { error, .. })) => {
                    tracing::warn!(device_id = %info.device_id, %error, left = outbox.stats().queued, "connection lost while stopping");
                    break;
                }
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(device_id = %info.device_id, left = outbox.stats().queued, on_wire = outbox.on_wire(), "stopped before the cloud acknowledged everything");
                    break;
                }
            }
        }
    }
    let _ = client.disconnect().await;
    drop(rx);
    if tokio::time::timeout(Duration::from_secs(2), conn).await.is_err() {
        tracing::debug!(device_id = %info.device_id, "connection task did not stop in time");
    }
    let mut st = status.lock().unwrap_or_else(|p| p.into_inner());
    st.connected = false;
    st.outbox = outbox.stats();
    Ok(())
}
