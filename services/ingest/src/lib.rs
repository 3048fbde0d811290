//! Nanofleet ingest: from an MQTT publish to a durable row.
//!
//! A message comes in from the embedded broker's hook (or any other transport) as an
//! [`Inbound`]. [`Ingest::handle`] decodes and validates it, checks that the topic's
//! device is the one that sent it and that the device is known, then hands telemetry
//! and events to a single writer task that commits them in batches (group commit:
//! whatever queued up while the previous transaction ran goes into the next one). The
//! call returns only once the message is committed, so a broker that acknowledges
//! after `handle` returns never acknowledges a message a crash could lose.
//!
//! Re-sent messages (same device and sequence number) are stored once. Rejected
//! messages are logged with the reason and counted in [`Stats`]; they never disturb
//! the valid messages around them.
//!
//! # Layout
//! - `validate`: pure checks on decoded payloads.
//! - `stats`: counters.
//! - `writer`: the batching writer task; it also folds stored telemetry into rollups.
//! - `rollup`: telemetry metrics, their per-minute and per-hour rollups.
#![forbid(unsafe_code)]

pub mod rollup;
pub mod stats;
pub mod validate;
mod writer;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nanofleet_proto::Message as _;
use nanofleet_proto::device::v1::{
    self as pb, Ack, DeviceState, EventBatch, TelemetryBatch, UpdateReport, event,
};
use nanofleet_proto::topics::{self, Channel, TopicError};
use nanofleet_store::{
    AlarmChange, Birth, Death, EventRecord, PresenceChange, Retention, Store, TelemetryRecord,
};
use tokio::sync::{mpsc, oneshot};

pub use stats::{Stats, StatsSnapshot};

/// What the cloud does with a device's answers to commands, and with a device that
/// comes online (it may lack recipes or trust root versions).
#[async_trait::async_trait]
pub trait Commands: Send + Sync + 'static {
    /// Stores a device's answer; the message is acknowledged only after it returns Ok.
    async fn answered(&self, device_id: &str, ack: Ack) -> Result<(), String>;
    /// A device's birth was stored. Must not wait: the birth's acknowledgement does.
    fn born(&self, state: &DeviceState);
    /// Verifies and stores a device's signed batch record; the message is
    /// acknowledged only after it returns Ok.
    async fn recorded(&self, device_id: &str, payload: &[u8]) -> Result<(), RecordError>;
    /// A device's report on a firmware update; acknowledged only after it returns Ok.
    async fn update_reported(&self, device_id: &str, report: UpdateReport) -> Result<(), String>;
    /// The device's scanner read a cartridge for a run (events stored before, in order);
    /// the batch is acknowledged only after it returns Ok.
    async fn cartridges_loaded(
        &self,
        device_id: &str,
        loads: &[(i64, pb::CartridgeLoad)],
    ) -> Result<(), String>;
}

/// Why a batch record was not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordError {
    /// Not acceptable (bad signature, another device's record, …): refused, and
    /// re-sending cannot help.
    Refused(String),
    /// Storage failed: not acknowledged, so the device sends it again.
    Storage(String),
}

/// Ingest settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Most messages in one storage transaction.
    pub max_batch: usize,
    /// Messages waiting for the writer before publishers are slowed down.
    pub queue: usize,
    /// How long raw telemetry and its rollups are kept.
    pub retention: Retention,
    /// Time between retention passes.
    pub expire_every: Duration,
    /// Time between sweeps that move landed telemetry to the main table and fold it
    /// into the rollups: the rollups lag the raw data by up to this much (plus the
    /// sweep). Longer sweeps fold more of each device's samples at once.
    pub settle_every: Duration,
}

impl Default for Options {
    fn default() -> Self {
        const DAY: i64 = 86_400_000;
        Options {
            max_batch: 2_000,
            queue: 20_000,
            retention: Retention { raw_ms: 30 * DAY, minute_ms: 90 * DAY, hour_ms: 5 * 365 * DAY },
            expire_every: Duration::from_secs(3_600),
            settle_every: Duration::from_secs(5),
        }
    }
}

/// One message as the broker received it.
#[derive(Debug, Clone, Copy)]
pub struct Inbound<'a> {
    /// The MQTT client id of the sender, when the transport knows it. It must equal
    /// the device id in the topic.
    pub client_id: Option<&'a str>,
    /// Identifies the client's connection, when the transport knows it: a device whose
    /// connection closes without a death message is then still recorded offline.
    pub connection: Option<&'a str>,
    pub topic: &'a str,
    pub payload: &'a [u8],
}

/// Why a message was refused. Each reason is a counter label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    BadTopic,
    IdentityMismatch,
    MalformedPayload,
    OutOfRange,
    UnknownDevice,
    UnsupportedChannel,
    BadRecord,
}

impl Reason {
    pub const ALL: [Reason; 7] = [
        Reason::BadTopic,
        Reason::IdentityMismatch,
        Reason::MalformedPayload,
        Reason::OutOfRange,
        Reason::UnknownDevice,
        Reason::UnsupportedChannel,
        Reason::BadRecord,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::BadTopic => "bad_topic",
            Reason::IdentityMismatch => "identity_mismatch",
            Reason::MalformedPayload => "malformed_payload",
            Reason::OutOfRange => "out_of_range",
            Reason::UnknownDevice => "unknown_device",
            Reason::UnsupportedChannel => "unsupported_channel",
            Reason::BadRecord => "bad_record",
        }
    }
}

/// A refused message, with what was wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Reject {
    #[error(transparent)]
    Topic(#[from] TopicError),
    #[error("client {client_id:?} may not publish for device {topic_device:?}")]
    ClientIdentity { client_id: String, topic_device: String },
    #[error("payload names device {payload_device:?} but was published on the topic of {topic_device:?}")]
    PayloadIdentity { topic_device: String, payload_device: String },
    #[error("{channel} payload is not a valid protobuf message: {error}")]
    Malformed { channel: Channel, error: String },
    #[error("{field} = {value} is out of range, allowed: {allowed}")]
    OutOfRange { field: String, value: String, allowed: String },
    #[error("device {device_id:?} is not registered")]
    UnknownDevice { device_id: String },
    #[error("channel {channel} carries nothing the cloud accepts yet")]
    UnsupportedChannel { channel: Channel },
    #[error("batch record refused: {reason}")]
    BadRecord { reason: String },
}

impl Reject {
    pub fn reason(&self) -> Reason {
        match self {
            Reject::Topic(_) => Reason::BadTopic,
            Reject::ClientIdentity { .. } | Reject::PayloadIdentity { .. } => Reason::IdentityMismatch,
            Reject::Malformed { .. } => Reason::MalformedPayload,
            Reject::OutOfRange { .. } => Reason::OutOfRange,
            Reject::UnknownDevice { .. } => Reason::UnknownDevice,
            Reject::UnsupportedChannel { .. } => Reason::UnsupportedChannel,
            Reject::BadRecord { .. } => Reason::BadRecord,
        }
    }
}

/// What became of a message.
#[derive(Debug)]
pub enum Outcome {
    /// Durably stored (or already stored before: a re-send). Acknowledge it.
    Stored,
    /// Refused; acknowledging it is fine, re-sending it would not help.
    Rejected(Reject),
}

/// Ingest errors: the message was not stored and must not be acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("storage: {0}")]
    Store(#[from] nanofleet_store::Error),
    #[error("storage commit failed: {0}")]
    Commit(String),
    #[error("ingest is shutting down")]
    ShuttingDown,
    #[error("cannot start the storage writer: {0}")]
    Start(#[from] std::io::Error),
}

#[derive(Debug, Clone, Default)]
struct Presence {
    session_id: String,
    connection: Option<String>,
}

struct Inner {
    stats: Stats,
    /// Devices that announced themselves (now or before a restart), with the session
    /// and connection of their latest birth.
    devices: RwLock<HashMap<String, Presence>>,
    writer: mpsc::Sender<writer::Item>,
    commands: OnceLock<Arc<dyn Commands>>,
}

/// Handle to the ingest pipeline; cheap to clone.
#[derive(Clone)]
pub struct Ingest {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest").finish_non_exhaustive()
    }
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl Ingest {
    /// Loads the known devices and starts the writer. The writer ends when every
    /// handle is dropped; await the returned task to see the last batch committed.
    pub async fn start(store: Store, opts: &Options) -> Result<(Ingest, tokio::task::JoinHandle<()>), Error> {
        let devices = store
            .list_devices(None)
            .await?
            .into_iter()
            .map(|d| (d.id, Presence { session_id: d.session_id, connection: None }))
            .collect();
        let (tx, rx) = mpsc::channel(opts.queue.max(1));
        let inner = Arc::new(Inner {
            stats: Stats::default(),
            devices: RwLock::new(devices),
            writer: tx,
            commands: OnceLock::new(),
        });
        // The writer gets a thread and a runtime of its own. On the shared runtime each
        // of its awaits (one per statement) would wait behind every ready connection
        // task, and a commit of a few hundred messages would take many times its
        // database time.
        // It ends when every handle is dropped, or when the runtime that started it
        // shuts down (whose shutdown waits for it): a task there holds `alive`.
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let max_batch = opts.max_batch.max(1);
        let settle_every = opts.settle_every;
        let weak = Arc::downgrade(&inner);
        let (alive, gone) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _alive = alive;
            std::future::pending::<()>().await
        });
        tokio::spawn(expire(store.clone(), opts.retention, opts.expire_every, Arc::downgrade(&inner)));
        let task = tokio::task::spawn_blocking(move || {
            runtime.block_on(async {
                tokio::select! {
                    () = writer::run(store, rx, max_batch, settle_every, weak) => {}
                    _ = gone => tracing::debug!("runtime shut down; storage writer stopped"),
                }
            })
        });
        Ok((Ingest { inner }, task))
    }

    /// Where answers to commands and births go; set once, after start. Until then
    /// answers are refused as an unsupported channel.
    pub fn set_commands(&self, commands: Arc<dyn Commands>) {
        let _ = self.inner.commands.set(commands);
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.inner.stats.snapshot()
    }

    /// Handles one message; returns once it is durably stored or refused.
    pub async fn handle(&self, msg: Inbound<'_>) -> Result<Outcome, Error> {
        match self.classify(msg).await {
            Ok(()) => Ok(Outcome::Stored),
            Err(HandleError::Reject(r)) => {
                self.inner.stats.reject(r.reason());
                tracing::warn!(topic = msg.topic, client_id = msg.client_id, reason = r.reason().as_str(), error = %r, "message rejected");
                Ok(Outcome::Rejected(r))
            }
            Err(HandleError::Fatal(e)) => {
                self.inner.stats.storage_error();
                tracing::error!(topic = msg.topic, error = %e, "message not stored");
                Err(e)
            }
        }
    }

    async fn classify(&self, msg: Inbound<'_>) -> Result<(), HandleError> {
        let (device, channel) = topics::parse_device_topic(msg.topic).map_err(Reject::from)?;
        if let Some(client) = msg.client_id
            && client != device
        {
            return Err(Reject::ClientIdentity {
                client_id: client.to_owned(),
                topic_device: device.to_owned(),
            }
            .into());
        }
        let malformed =
            |e: nanofleet_proto::prost::DecodeError| Reject::Malformed { channel, error: e.to_string() };
        let now = now_ms();
        match channel {
            Channel::Telemetry => {
                let arrived = std::time::Instant::now();
                let batch = TelemetryBatch::decode(msg.payload).map_err(malformed)?;
                let seq = validate::telemetry(&batch, device, now)?;
                self.known(device)?;
                let item = telemetry_item(device, seq, batch, msg.payload);
                self.write(item).await?;
                self.inner.stats.commit_took(arrived.elapsed());
                Ok(())
            }
            Channel::Events => {
                let batch = EventBatch::decode(msg.payload).map_err(malformed)?;
                let seq = validate::events(&batch, device, now)?;
                self.known(device)?;
                self.write(event_item(device, seq, &batch, msg.payload)).await?;
                let loads: Vec<_> = batch
                    .events
                    .into_iter()
                    .filter_map(|e| match e.kind {
                        Some(event::Kind::CartridgeLoad(c)) => Some((e.time_unix_ms, c)),
                        _ => None,
                    })
                    .collect();
                if loads.is_empty() {
                    return Ok(());
                }
                // Not acknowledged until the loads are applied: while the server starts,
                // the device sends the batch again.
                let commands = self.inner.commands.get().ok_or_else(|| {
                    HandleError::Fatal(Error::Commit(
                        "cartridge loads arrived before the inventory is ready".into(),
                    ))
                })?;
                commands
                    .cartridges_loaded(device, &loads)
                    .await
                    .map_err(|e| HandleError::Fatal(Error::Commit(e)))
            }
            Channel::State => {
                let state = DeviceState::decode(msg.payload).map_err(malformed)?;
                match validate::state(&state, device, now)? {
                    pb::Presence::Online => self.birth(&state, msg.connection).await,
                    _ => self.death(&state).await,
                }
            }
            Channel::Ack => {
                let Some(commands) = self.inner.commands.get() else {
                    return Err(Reject::UnsupportedChannel { channel }.into());
                };
                let ack = Ack::decode(msg.payload).map_err(malformed)?;
                if ack.device_id != device {
                    return Err(Reject::PayloadIdentity {
                        topic_device: device.to_owned(),
                        payload_device: ack.device_id,
                    }
                    .into());
                }
                self.known(device)?;
                commands.answered(device, ack).await.map_err(|e| HandleError::Fatal(Error::Commit(e)))
            }
            Channel::Update => {
                let Some(commands) = self.inner.commands.get() else {
                    return Err(Reject::UnsupportedChannel { channel }.into());
                };
                let report = UpdateReport::decode(msg.payload).map_err(malformed)?;
                if report.device_id != device {
                    return Err(Reject::PayloadIdentity {
                        topic_device: device.to_owned(),
                        payload_device: report.device_id,
                    }
                    .into());
                }
                self.known(device)?;
                commands
                    .update_reported(device, report)
                    .await
                    .map_err(|e| HandleError::Fatal(Error::Commit(e)))
            }
            Channel::Batch => {
                let Some(commands) = self.inner.commands.get() else {
                    return Err(Reject::UnsupportedChannel { channel }.into());
                };
                self.known(device)?;
                commands.recorded(device, msg.payload).await.map_err(|e| match e {
                    RecordError::Refused(reason) => Reject::BadRecord { reason }.into(),
                    RecordError::Storage(e) => HandleError::Fatal(Error::Commit(e)),
                })
            }
        }
    }

    fn known(&self, device: &str) -> Result<(), Reject> {
        let devices = self.inner.devices.read().unwrap_or_else(|p| p.into_inner());
        if devices.contains_key(device) {
            Ok(())
        } else {
            Err(Reject::UnknownDevice { device_id: device.to_owned() })
        }
    }

    async fn birth(&self, s: &DeviceState, connection: Option<&str>) -> Result<(), HandleError> {
        let birth = Birth {
            device_id: s.device_id.clone(),
            site_id: s.site_id.clone(),
            model: s.model.clone(),
            firmware_version: s.firmware_version.clone(),
            session_id: s.session_id.clone(),
            time_ms: s.time_unix_ms,
        };
        self.write(writer::Payload::Presence(PresenceChange::Birth(birth))).await?;
        self.inner.devices.write().unwrap_or_else(|p| p.into_inner()).insert(
            s.device_id.clone(),
            Presence { session_id: s.session_id.clone(), connection: connection.map(str::to_owned) },
        );
        tracing::info!(device_id = %s.device_id, site_id = %s.site_id, firmware = %s.firmware_version, "device online");
        if let Some(c) = self.inner.commands.get() {
            c.born(s);
        }
        Ok(())
    }

    async fn death(&self, s: &DeviceState) -> Result<(), HandleError> {
        let death = Death {
            device_id: s.device_id.clone(),
            session_id: s.session_id.clone(),
            time_ms: s.time_unix_ms,
        };
        self.write(writer::Payload::Presence(PresenceChange::Death(death))).await?;
        tracing::debug!(device_id = %s.device_id, session_id = %s.session_id, "death recorded");
        Ok(())
    }

    /// A transport connection closed. If it carried the device's latest birth, the
    /// device is offline, whether or not a death message said so (a clean disconnect
    /// discards the last will; a device may also simply not send one).
    pub async fn connection_closed(&self, device_id: &str, connection: &str) -> Result<(), Error> {
        let session = {
            let devices = self.inner.devices.read().unwrap_or_else(|p| p.into_inner());
            match devices.get(device_id) {
                Some(p) if p.connection.as_deref() == Some(connection) => Some(p.session_id.clone()),
                _ => None,
            }
        };
        if let Some(session_id) = session {
            let death = Death { device_id: device_id.to_owned(), session_id, time_ms: now_ms() };
            match self.write(writer::Payload::Presence(PresenceChange::Death(death))).await {
                Ok(()) => tracing::debug!(device_id, "connection closed"),
                Err(HandleError::Fatal(e)) => return Err(e),
                Err(HandleError::Reject(_)) => {}
            }
        }
        Ok(())
    }

    async fn write(&self, item: writer::Payload) -> Result<(), HandleError> {
        let (done, wait) = oneshot::channel();
        self.inner
            .writer
            .send(writer::Item { payload: item, done })
            .await
            .map_err(|_| Error::ShuttingDown)?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(HandleError::Fatal(e)),
            Err(_) => Err(Error::ShuttingDown.into()),
        }
    }

    /// Waits until everything queued so far is committed (for orderly shutdown and tests).
    pub async fn flush(&self) -> Result<(), Error> {
        let (done, wait) = oneshot::channel();
        self.inner
            .writer
            .send(writer::Item { payload: writer::Payload::Barrier, done })
            .await
            .map_err(|_| Error::ShuttingDown)?;
        match tokio::time::timeout(Duration::from_secs(60), wait).await {
            Ok(Ok(r)) => r,
            _ => Err(Error::ShuttingDown),
        }
    }
}

enum HandleError {
    Reject(Reject),
    Fatal(Error),
}

impl From<Reject> for HandleError {
    fn from(r: Reject) -> Self {
        HandleError::Reject(r)
    }
}

impl From<Error> for HandleError {
    fn from(e: Error) -> Self {
        HandleError::Fatal(e)
    }
}

fn telemetry_item(device: &str, seq: i64, b: TelemetryBatch, payload: &[u8]) -> writer::Payload {
    // validate::telemetry guarantees at least one sample.
    let first = b.samples.iter().map(|s| s.time_unix_ms).min().unwrap_or_default();
    let last = b.samples.iter().map(|s| s.time_unix_ms).max().unwrap_or_default();
    let samples = b.samples.len() as i64;
    let newest = b.samples.into_iter().max_by_key(|s| s.time_unix_ms).unwrap_or_default();
    writer::Payload::Telemetry(
        TelemetryRecord {
            device_id: device.to_owned(),
            seq,
            first_ms: first,
            last_ms: last,
            samples,
            payload: payload.to_vec(),
        },
        writer::Newest { seen_ms: now_ms(), sample: newest },
    )
}

fn event_item(device: &str, seq: i64, b: &EventBatch, payload: &[u8]) -> writer::Payload {
    let alarms = b
        .events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(event::Kind::Alarm(a)) => Some(AlarmChange {
                device_id: device.to_owned(),
                code: i64::from(a.code),
                line: i64::from(a.line),
                priority: i64::from(a.priority),
                active: a.active,
                detail: a.detail.clone(),
                changed_ms: e.time_unix_ms,
            }),
            _ => None,
        })
        .collect();
    let time_ms = b.events.iter().map(|e| e.time_unix_ms).max().unwrap_or_default();
    writer::Payload::Events(
        EventRecord { device_id: device.to_owned(), seq, time_ms, payload: payload.to_vec() },
        alarms,
    )
}

/// Deletes telemetry past its retention, one pass every `every` (the first a minute
/// after start), while ingest runs.
async fn expire(store: Store, retention: Retention, every: Duration, inner: std::sync::Weak<Inner>) {
    let mut wait = every.min(Duration::from_secs(60));
    loop {
        tokio::time::sleep(wait).await;
        wait = every;
        if inner.upgrade().is_none() {
            return;
        }
        let started = std::time::Instant::now();
        match store.expire_telemetry(retention, now_ms()).await {
            Ok(e) => tracing::info!(
                raw = e.raw,
                minute = e.minute,
                hour = e.hour,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "telemetry past its retention deleted"
            ),
            Err(e) => tracing::warn!(error = %e, "telemetry retention pass failed; will retry"),
        }
    }
}
