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
//!   a late death of an old connection cannot mark the device offline;
//! - a refusal (the broker says no, or the TLS handshake fails: a decommissioned device,
//!   a revoked or expired certificate) is not retried soon: fast retries cannot help;
//! - a renewed certificate ([`LinkOptions::tls_updates`]) is set on the event loop's
//!   options, and a live connection is closed cleanly (DISCONNECT, so no last will) and
//!   made again with it at once, not at the next natural reconnect: the new certificate
//!   is proven while the old one is still valid, and a connection never outlives the
//!   certificate it was made with by more than a renewal period.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use nanofleet_proto::Message as _;
use nanofleet_proto::device::v1::{DeviceState, Event, EventBatch, Presence, Sample, TelemetryBatch};
use nanofleet_proto::topics::{self, Channel, Command};
use rand::Rng;
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet, PubAckReason};
use rumqttc::v5::{AsyncClient, ConnectionError, Event as MqttEvent, MqttOptions, StateError};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::hal::{Device, DeviceInfo};
use crate::outbox::{Outbox, OutboxStats, Stream};
use crate::recipes::RecipeBook;
use crate::runs::{AutoRuns, RunDesk};
use crate::seq::SeqCounter;

/// How a device talks to the cloud.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    pub broker_host: String,
    pub broker_port: u16,
    /// Mutual TLS (the device certificate and the pinned fleet root); `None` connects
    /// in plaintext, which only a development listener accepts.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Renewed client configurations (see [`crate::enroll::keep_renewed`]). Each one
    /// replaces `tls`, and a live connection is made again with it at once: within a
    /// batch interval (at most a keep-alive) of its arrival.
    pub tls_updates: Option<watch::Receiver<Arc<rustls::ClientConfig>>>,
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
    /// Wait after the broker refused the device or the TLS handshake failed; a renewed
    /// certificate ends it early.
    pub refused_backoff: Duration,
    /// On shutdown, how long to wait for the outbox to drain.
    pub drain_timeout: Duration,
    /// The device's trust root and recipes: with one, the device subscribes to its
    /// command topics, verifies what arrives and answers on its ack topic.
    pub recipes: Option<Arc<Mutex<RecipeBook>>>,
    /// The device's run desk (with `recipes`): runs requested on `cmd/run`, and
    /// signed batch records published on the batch topic until acknowledged.
    pub runs: Option<Arc<Mutex<RunDesk>>>,
    /// A simulated pharmacist who starts runs by themself (simulator only).
    pub auto_runs: Option<AutoRuns>,
    /// Firmware updates (with `recipes`, whose trust root checks the offers): offers
    /// on `cmd/update`, reports on the update topic.
    pub updates: Option<crate::updates::UpdateDesk>,
}

impl Default for LinkOptions {
    fn default() -> Self {
        LinkOptions {
            broker_host: "127.0.0.1".into(),
            broker_port: 8883,
            tls: None,
            tls_updates: None,
            sample_interval: Duration::from_millis(100),
            batch_interval: Duration::from_secs(1),
            keep_alive: Duration::from_secs(30),
            outbox_capacity: 10_000,
            window: 16,
            max_backoff: Duration::from_secs(30),
            refused_backoff: Duration::from_secs(300),
            drain_timeout: Duration::from_secs(2),
            recipes: None,
            runs: None,
            auto_runs: None,
            updates: None,
        }
    }
}

impl LinkOptions {
    /// The defaults, talking to the broker at `addr`.
    pub fn to_broker(addr: std::net::SocketAddr) -> LinkOptions {
        LinkOptions { broker_host: addr.ip().to_string(), broker_port: addr.port(), ..LinkOptions::default() }
    }
}

/// `HOST:PORT` (an IPv6 host may be in brackets) as host and port.
pub fn parse_host_port(addr: &str) -> Result<(String, u16), String> {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(format!("{addr:?}: expected HOST:PORT"));
    };
    let host = host.trim_matches(['[', ']']);
    if host.is_empty() {
        return Err(format!("{addr:?}: no host before the port"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok((host.to_owned(), p)),
        _ => Err(format!("{addr:?}: port {port:?} is not a number from 1 to 65535")),
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
    Connected {
        session_id: String,
        generation: u64,
    },
    Sent {
        pkid: u16,
        generation: u64,
    },
    Acked {
        pkid: u16,
        accepted: bool,
        reason: PubAckReason,
    },
    /// `planned`: closed to reconnect with a renewed certificate.
    Disconnected {
        error: String,
        generation: u64,
        planned: bool,
    },
    /// A message from the cloud on one of the device's command topics.
    Command {
        topic: Bytes,
        payload: Bytes,
    },
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn new_session_id() -> String {
    format!("{:016x}", rand::rng().random::<u64>())
}

fn state_message(
    info: &DeviceInfo,
    presence: Presence,
    session_id: &str,
    boot_id: &str,
    (trust_root_version, deny_list_version): (u64, u64),
) -> Vec<u8> {
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
        trust_root_version: if online { trust_root_version } else { 0 },
        deny_list_version: if online { deny_list_version } else { 0 },
    }
    .encode_to_vec()
}

/// Pause between closing a connection to use a renewed certificate and opening the
/// next one.
const PLANNED_RECONNECT_PAUSE: Duration = Duration::from_millis(500);

fn tls_transport(config: Arc<rustls::ClientConfig>) -> rumqttc::Transport {
    rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(config))
}

/// Failures that retrying soon cannot fix: the broker refused this device, or TLS
/// failed (a certificate the broker does not accept, or a server that is not the
/// fleet's, such as a proxy inspecting TLS), as opposed to a network that is down or
/// a broker that is busy (it answers "unavailable" while it still ends the device's
/// previous session, for one).
fn is_refusal(e: &ConnectionError) -> bool {
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as Code;
    let tls_io = |io: &std::io::Error| io.get_ref().is_some_and(|inner| inner.is::<rustls::Error>());
    let refuses_device = |code: &Code| {
        matches!(
            code,
            Code::NotAuthorized
                | Code::BadUserNamePassword
                | Code::Banned
                | Code::BadClientId
                | Code::ClientIdentifierNotValid
                | Code::BadAuthenticationMethod
        )
    };
    match e {
        ConnectionError::ConnectionRefused(code)
        | ConnectionError::MqttState(StateError::ConnFail { reason: code }) => refuses_device(code),
        ConnectionError::Tls(_) => true,
        ConnectionError::Io(io) | ConnectionError::MqttState(StateError::Io(io)) => tls_io(io),
        _ => false,
    }
}

fn last_will(info: &DeviceInfo, session_id: &str, boot_id: &str) -> LastWill {
    LastWill::new(
        topics::device_topic(&info.device_id, Channel::State),
        state_message(info, Presence::Offline, session_id, boot_id, (0, 0)),
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
    let mut info = device.info().clone();
    if let Some(desk) = &opts.updates {
        // What the slots hold decides the version, not the flag the agent started with.
        info.firmware_version = desk.running_version();
    }
    // The fault built into the image the device runs, as last told to the device.
    let mut booted_fault = String::new();
    // The update engine's latest report.
    let mut last_report: Option<nanofleet_proto::device::v1::UpdateReport> = None;
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
    let mut tls_updates = opts.tls_updates.clone();
    let latest_tls = tls_updates.as_mut().map(|rx| rx.borrow_and_update().clone());
    if let Some(tls) = latest_tls.or_else(|| opts.tls.clone()) {
        mqtt.set_transport(tls_transport(tls));
    }
    let (client, mut eventloop) = AsyncClient::new(mqtt, opts.window + 8);
    let (tx, mut rx) = mpsc::unbounded_channel();

    // The connection task: polls the client, reports what happens, backs off on errors.
    let conn_info = info.clone();
    let conn_boot = boot_id.clone();
    let max_backoff = opts.max_backoff;
    let refused_backoff = opts.refused_backoff;
    let generation = Arc::new(AtomicU64::new(0));
    let conn_generation = generation.clone();
    let conn_client = client.clone();
    let conn_cancel = cancel.clone();
    let conn = tokio::spawn(async move {
        let mut session = first_session;
        let mut backoff = Duration::from_millis(100);
        let mut generation = 0u64;
        let mut failures = 0u64;
        // Connected now; a renewed certificate waits to be put in use; our own
        // DISCONNECT for that is on its way.
        let mut up = false;
        let mut renewed = false;
        let mut reconnecting = false;
        loop {
            if let Some(rx) = &mut tls_updates
                && rx.has_changed().unwrap_or(false)
            {
                eventloop.options.set_transport(tls_transport(rx.borrow_and_update().clone()));
                renewed = true;
            }
            if renewed && !up {
                // The next connection attempt uses it anyway.
                renewed = false;
            }
            if renewed && !reconnecting && conn_client.try_disconnect().is_ok() {
                reconnecting = true;
            }
            let report = match eventloop.poll().await {
                Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                    up = true;
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
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                    Some(Link::Command { topic: p.topic, payload: p.payload })
                }
                Ok(MqttEvent::Outgoing(Outgoing::Disconnect))
                    if reconnecting && !conn_cancel.is_cancelled() =>
                {
                    // Our own DISCONNECT, for a renewed certificate: connect again at once.
                    up = false;
                    renewed = false;
                    reconnecting = false;
                    eventloop.clean();
                    eventloop.pending.clear();
                    session = new_session_id();
                    eventloop.options.set_last_will(last_will(&conn_info, &session, &conn_boot));
                    tracing::info!(device_id = %conn_info.device_id, "reconnecting with the renewed certificate");
                    let report = Link::Disconnected {
                        error: "reconnecting with the renewed certificate".into(),
                        generation,
                        planned: true,
                    };
                    if tx.send(report).is_err() {
                        break;
                    }
                    // The broker refuses a client id whose previous session it is still
                    // ending ("server unavailable"): give it a moment.
                    tokio::time::sleep(PLANNED_RECONNECT_PAUSE).await;
                    None
                }
                Ok(MqttEvent::Outgoing(Outgoing::Disconnect)) => break,
                Ok(_) => None,
                Err(e) => {
                    if tx.is_closed() {
                        break;
                    }
                    up = false;
                    // A DISCONNECT still queued for a renewal is moot now (and must not
                    // end the next connection).
                    reconnecting = false;
                    // Our outbox re-sends; the client must not replay its own copies.
                    eventloop.pending.clear();
                    session = new_session_id();
                    eventloop.options.set_last_will(last_will(&conn_info, &session, &conn_boot));
                    failures += 1;
                    let refused = is_refusal(&e);
                    let wait = if refused {
                        refused_backoff
                    } else {
                        backoff.mul_f64(rand::rng().random_range(0.5..1.5))
                    };
                    let retry_in_ms = wait.as_millis() as u64;
                    if refused {
                        tracing::warn!(
                            device_id = %conn_info.device_id, failures, retry_in_ms, error = %e,
                            "the broker refused the device or its certificate; retrying later"
                        );
                    } else if failures == 1 || failures.is_multiple_of(10) {
                        // The first failure in a row and then every tenth, not every retry.
                        tracing::warn!(
                            device_id = %conn_info.device_id, failures, retry_in_ms, error = %e,
                            "cannot reach the broker"
                        );
                    }
                    let _ = tx.send(Link::Disconnected { error: e.to_string(), generation, planned: false });
                    backoff = (backoff * 2).min(max_backoff);
                    // A renewed certificate is worth trying at once.
                    let renewal = async {
                        if let Some(rx) = &mut tls_updates
                            && rx.changed().await.is_ok()
                        {
                            return rx.borrow_and_update().clone();
                        }
                        std::future::pending().await
                    };
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        tls = renewal => {
                            eventloop.options.set_transport(tls_transport(tls));
                            backoff = Duration::from_millis(100);
                        }
                    }
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
    let ack_topic = topics::device_topic(&info.device_id, Channel::Ack);
    let batch_topic = topics::device_topic(&info.device_id, Channel::Batch);
    let update_topic = topics::device_topic(&info.device_id, Channel::Update);
    let mut update_reports = opts.updates.as_ref().and_then(|d| d.take_reports());
    let mut auto_runs = opts.auto_runs.clone();
    if let Some(desk) = &opts.runs {
        // Records an earlier connection or process did not get acknowledged.
        let desk = desk.lock().unwrap_or_else(|p| p.into_inner());
        for (seq, bytes) in desk.pending() {
            outbox.push(Stream::Batch, seq, batch_topic.clone(), bytes.clone(), now_ms());
        }
    }

    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {
                let now = now_ms();
                let reading = device.read(now, (now - last_read).max(1));
                last_read = now;
                if let Some(updates) = &opts.updates {
                    let run_active = opts.runs.as_ref().is_some_and(|d| d.lock().unwrap_or_else(|p| p.into_inner()).active_batch().is_some());
                    updates.set_busy(device.busy() || run_active);
                    if let Some(fault) = updates.running_fault_unless(&booted_fault) {
                        device.firmware_booted(&fault);
                        booted_fault = fault;
                    }
                }
                if let Some(desk) = &opts.runs {
                    let mut desk = desk.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some((seq, record)) = desk.observe(&reading, &info, now) {
                        outbox.push(Stream::Batch, seq, batch_topic.clone(), record, now);
                    }
                    if let (Some(auto), Some(book)) = (&mut auto_runs, &opts.recipes) {
                        let book = book.lock().unwrap_or_else(|p| p.into_inner());
                        let busy = device.busy() || desk.active_batch().is_some();
                        if let Some(request) = auto.due(busy, &book, &info, now) {
                            let ack = desk.start(request, &book, &mut device, now);
                            if !ack.code.is_empty() {
                                tracing::warn!(device_id = %info.device_id, code = %ack.code, reason = %ack.reason, "simulated run refused");
                            }
                        }
                    }
                    // Cartridge loads, from runs started here or asked for on cmd/run.
                    events.extend(desk.take_events());
                }
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
            Some(report) = next_report(&mut update_reports) => {
                if report.status == nanofleet_proto::device::v1::UpdateStatus::Committed as i32
                    && !report.running_version.is_empty()
                    && report.running_version != info.firmware_version
                {
                    // The device rebooted into the new firmware: a new birth says so.
                    info.firmware_version.clone_from(&report.running_version);
                    if let Some(session_id) = &session
                        && connected
                    {
                        let root_version = opts.recipes.as_ref().map_or((0, 0), |b| b.lock().unwrap_or_else(|p| p.into_inner()).held_versions());
                        let birth = state_message(&info, Presence::Online, session_id, &boot_id, root_version);
                        client.publish(state_topic.clone(), QoS::AtLeastOnce, true, birth).await?;
                        outbox.handed_untracked(generation.load(Ordering::SeqCst));
                    }
                }
                if connected {
                    client.publish(update_topic.clone(), QoS::AtLeastOnce, false, report.encode_to_vec()).await?;
                    outbox.handed_untracked(generation.load(Ordering::SeqCst));
                }
                // Only the latest is kept, and said again at each connection: reports
                // made offline (an update resumed at power-on) are not lost, and the
                // cloud offers again what it still has no final answer for.
                last_report = Some(report);
            }
            Some(link) = rx.recv() => match link {
                Link::Connected { session_id, generation } => {
                    connected = true;
                    let root_version = match &opts.recipes {
                        Some(book) => {
                            // Subscribed before the birth: the cloud answers a birth with
                            // what the device lacks, and it must not arrive unheard.
                            client.subscribe(topics::command_filter(&info.device_id), QoS::AtLeastOnce).await?;
                            book.lock().unwrap_or_else(|p| p.into_inner()).held_versions()
                        }
                        None => (0, 0),
                    };
                    let birth = state_message(&info, Presence::Online, &session_id, &boot_id, root_version);
                    session = Some(session_id.clone());
                    client.publish(state_topic.clone(), QoS::AtLeastOnce, true, birth).await?;
                    outbox.handed_untracked(generation);
                    if let Some(report) = &last_report {
                        client.publish(update_topic.clone(), QoS::AtLeastOnce, false, report.encode_to_vec()).await?;
                        outbox.handed_untracked(generation);
                    }
                    let mut st = status.lock().unwrap_or_else(|p| p.into_inner());
                    st.connected = true;
                    st.connects += 1;
                    tracing::debug!(device_id = %info.device_id, %session_id, "connected");
                }
                Link::Sent { pkid, generation } => outbox.on_sent(pkid, generation),
                Link::Command { topic, payload } => {
                    let command = std::str::from_utf8(&topic)
                        .ok()
                        .and_then(|t| topics::parse_command_topic(&info.device_id, t));
                    match (command, &opts.recipes) {
                        (Some(Command::Update), Some(book)) => {
                            let refusal = match &opts.updates {
                                Some(desk) => {
                                    let root = book.lock().unwrap_or_else(|p| p.into_inner()).trust_root().clone();
                                    desk.command(&payload, &root, now_ms())
                                }
                                None => Some(nanofleet_proto::device::v1::UpdateReport {
                                    device_id: info.device_id.clone(),
                                    status: nanofleet_proto::device::v1::UpdateStatus::Refused as i32,
                                    code: "unsupported".into(),
                                    detail: "this agent runs without update state (no state directory)".into(),
                                    running_version: info.firmware_version.clone(),
                                    time_unix_ms: now_ms(),
                                    ..Default::default()
                                }),
                            };
                            if let Some(report) = refusal {
                                tracing::warn!(device_id = %info.device_id, code = %report.code, detail = %report.detail, "update command refused");
                                if connected {
                                    client.publish(update_topic.clone(), QoS::AtLeastOnce, false, report.encode_to_vec()).await?;
                                    outbox.handed_untracked(generation.load(Ordering::SeqCst));
                                }
                            }
                        }
                        (Some(command), Some(book)) => {
                            let ack = match (command, &opts.runs) {
                                (Command::Run, Some(desk)) => {
                                    let book = book.lock().unwrap_or_else(|p| p.into_inner());
                                    desk.lock().unwrap_or_else(|p| p.into_inner()).handle_command(&payload, &book, &mut device, now_ms())
                                }
                                _ => book.lock().unwrap_or_else(|p| p.into_inner()).handle(command, &payload, &info, now_ms()),
                            };
                            if ack.code.is_empty() {
                                tracing::info!(device_id = %info.device_id, command = command.as_str(), subject = %ack.subject_id, version = ack.version, "command accepted");
                            } else {
                                tracing::warn!(device_id = %info.device_id, command = command.as_str(), subject = %ack.subject_id, code = %ack.code, reason = %ack.reason, "command refused");
                            }
                            if connected {
                                // Not kept for re-sending: the cloud sends again what it
                                // has no answer for, at the next connection.
                                client.publish(ack_topic.clone(), QoS::AtLeastOnce, false, ack.encode_to_vec()).await?;
                                outbox.handed_untracked(generation.load(Ordering::SeqCst));
                            }
                        }
                        _ => tracing::warn!(device_id = %info.device_id, topic = %String::from_utf8_lossy(&topic), "message on an unknown topic ignored"),
                    }
                }
                Link::Acked { pkid, accepted, reason } => {
                    if !accepted {
                        tracing::warn!(device_id = %info.device_id, ?reason, "cloud refused a message");
                    }
                    if let (Some((Stream::Batch, seq)), Some(desk)) = (outbox.on_acked(pkid, accepted), &opts.runs) {
                        if accepted {
                            desk.lock().unwrap_or_else(|p| p.into_inner()).delivered(seq);
                        } else {
                            tracing::error!(device_id = %info.device_id, seq, "the cloud refused a batch record; it stays on the device and is sent again when the agent restarts");
                        }
                    }
                }
                Link::Disconnected { error, generation, planned } => {
                    if connected && !planned {
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
                let death = state_message(&info, Presence::Offline, session_id, &boot_id, (0, 0));
                client.publish(state_topic.clone(), QoS::AtLeastOnce, false, death).await?;
                outbox.handed_untracked(g);
                death_sent = true;
            }
            if death_sent && outbox.on_wire() == 0 {
                break;
            }
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Link::Sent { pkid, generation })) => outbox.on_sent(pkid, generation),
                Ok(Some(Link::Acked { pkid, accepted, .. })) => {
                    if let (Some((Stream::Batch, seq)), Some(desk), true) =
                        (outbox.on_acked(pkid, accepted), &opts.runs, accepted)
                    {
                        desk.lock().unwrap_or_else(|p| p.into_inner()).delivered(seq);
                    }
                }
                Ok(Some(Link::Connected { .. } | Link::Command { .. })) => {}
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

/// The next update report, or never when the device takes no updates.
async fn next_report(
    rx: &mut Option<tokio::sync::mpsc::UnboundedReceiver<nanofleet_proto::device::v1::UpdateReport>>,
) -> Option<nanofleet_proto::device::v1::UpdateReport> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port_are_split_at_the_last_colon() {
        assert_eq!(parse_host_port("fleet.example.org:8883"), Ok(("fleet.example.org".into(), 8883)));
        assert_eq!(parse_host_port("[::1]:8883"), Ok(("::1".into(), 8883)));
        for bad in ["fleet.example.org", ":8883", "host:0", "host:65536", "host:mqtt"] {
            assert!(parse_host_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn refusals_are_told_from_a_network_that_is_down() {
        use rumqttc::v5::mqttbytes::v5::ConnectReturnCode;
        let refused = ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized);
        assert!(is_refusal(&refused));
        let busy = ConnectionError::ConnectionRefused(ConnectReturnCode::ServerUnavailable);
        assert!(!is_refusal(&busy));
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateExpired);
        let tls = std::io::Error::new(std::io::ErrorKind::InvalidData, alert);
        assert!(is_refusal(&ConnectionError::MqttState(StateError::Io(tls))));
        let down = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(!is_refusal(&ConnectionError::Io(down)));
    }
}
