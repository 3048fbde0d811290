//! Plain records the store reads and writes. Payloads stay encoded: the store does not
//! interpret protobuf.

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::Result;

/// One result row's columns, whichever driver read it.
pub(crate) trait Columns {
    type Error;
    fn int(&self, i: usize) -> std::result::Result<i64, Self::Error>;
    fn text(&self, i: usize) -> std::result::Result<String, Self::Error>;
    fn real(&self, i: usize) -> std::result::Result<Option<f64>, Self::Error>;
    fn bytes(&self, i: usize) -> std::result::Result<Vec<u8>, Self::Error>;
}

impl Columns for AnyRow {
    type Error = sqlx::Error;
    fn int(&self, i: usize) -> std::result::Result<i64, sqlx::Error> {
        self.try_get(i)
    }
    fn text(&self, i: usize) -> std::result::Result<String, sqlx::Error> {
        self.try_get(i)
    }
    fn real(&self, i: usize) -> std::result::Result<Option<f64>, sqlx::Error> {
        self.try_get(i)
    }
    fn bytes(&self, i: usize) -> std::result::Result<Vec<u8>, sqlx::Error> {
        self.try_get(i)
    }
}

impl Columns for rusqlite::Row<'_> {
    type Error = rusqlite::Error;
    fn int(&self, i: usize) -> std::result::Result<i64, rusqlite::Error> {
        self.get(i)
    }
    fn text(&self, i: usize) -> std::result::Result<String, rusqlite::Error> {
        self.get(i)
    }
    fn real(&self, i: usize) -> std::result::Result<Option<f64>, rusqlite::Error> {
        self.get(i)
    }
    fn bytes(&self, i: usize) -> std::result::Result<Vec<u8>, rusqlite::Error> {
        self.get(i)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SiteSummary {
    pub id: String,
    pub name: String,
    pub devices_total: i64,
    pub devices_online: i64,
    pub time_zone: String,
    /// Empty: always open.
    pub maintenance_window: String,
}

/// A device announced itself (MQTT birth).
#[derive(Debug, Clone)]
pub struct Birth {
    pub device_id: String,
    pub site_id: String,
    pub model: String,
    pub firmware_version: String,
    pub session_id: String,
    pub time_ms: i64,
}

/// A device's connection ended (MQTT death, or the connection closed).
#[derive(Debug, Clone)]
pub struct Death {
    pub device_id: String,
    /// The session the death belongs to; a death of an older session changes nothing.
    pub session_id: String,
    pub time_ms: i64,
}

/// A presence change, applied in order within a write batch.
#[derive(Debug, Clone)]
pub enum PresenceChange {
    Birth(Birth),
    Death(Death),
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRecord {
    pub id: String,
    pub site_id: String,
    pub model: String,
    pub firmware_version: String,
    pub online: bool,
    pub session_id: String,
    pub connected_ms: i64,
    pub last_seen_ms: i64,
    pub telemetry_seq: i64,
    pub last_sample_ms: i64,
    /// Encoded `nanofleet.device.v1.Sample`.
    pub last_sample: Option<Vec<u8>>,
    pub active_alarms: Vec<AlarmRecord>,
    /// `active`, `decommissioned` or `replacing`.
    pub status: String,
    pub enrolled_ms: i64,
    pub hardware_serial: String,
    pub cert_not_after_ms: i64,
    /// Labels given by operations, sorted.
    pub tags: Vec<String>,
}

impl DeviceRecord {
    pub(crate) fn from_row(r: &AnyRow) -> Result<DeviceRecord> {
        Ok(DeviceRecord {
            id: r.try_get(0)?,
            site_id: r.try_get(1)?,
            model: r.try_get(2)?,
            firmware_version: r.try_get(3)?,
            online: r.try_get::<i64, _>(4)? != 0,
            session_id: r.try_get(5)?,
            connected_ms: r.try_get(6)?,
            last_seen_ms: r.try_get(7)?,
            telemetry_seq: r.try_get(8)?,
            last_sample_ms: r.try_get(9)?,
            last_sample: r.try_get(10)?,
            active_alarms: Vec::new(),
            status: r.try_get(11)?,
            enrolled_ms: r.try_get(12)?,
            hardware_serial: r.try_get(13)?,
            cert_not_after_ms: r.try_get(14)?,
            tags: r
                .try_get::<String, _>(15)?
                .split(',')
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect(),
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AlarmRecord {
    pub code: i64,
    pub line: i64,
    pub priority: i64,
    pub detail: String,
    pub changed_ms: i64,
}

/// One telemetry batch as the device sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryRecord {
    pub device_id: String,
    pub seq: i64,
    pub first_ms: i64,
    pub last_ms: i64,
    pub samples: i64,
    /// Encoded `nanofleet.device.v1.TelemetryBatch`.
    pub payload: Vec<u8>,
}

impl TelemetryRecord {
    pub(crate) fn from_row(r: &AnyRow) -> Result<TelemetryRecord> {
        Ok(TelemetryRecord::from_columns(r)?)
    }

    /// A row of `device_id, seq, first_ms, last_ms, samples, payload`.
    pub(crate) fn from_columns<R: Columns>(r: &R) -> std::result::Result<TelemetryRecord, R::Error> {
        Ok(TelemetryRecord {
            device_id: r.text(0)?,
            seq: r.int(1)?,
            first_ms: r.int(2)?,
            last_ms: r.int(3)?,
            samples: r.int(4)?,
            payload: r.bytes(5)?,
        })
    }
}

/// One event batch as the device sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub device_id: String,
    pub seq: i64,
    pub time_ms: i64,
    /// Encoded `nanofleet.device.v1.EventBatch`.
    pub payload: Vec<u8>,
}

/// The newest state of one alarm of one device.
#[derive(Debug, Clone, PartialEq)]
pub struct AlarmChange {
    pub device_id: String,
    pub code: i64,
    pub line: i64,
    pub priority: i64,
    pub active: bool,
    pub detail: String,
    pub changed_ms: i64,
}

/// The newest values of one device seen in a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct LastValues {
    pub device_id: String,
    pub seen_ms: i64,
    pub telemetry_seq: i64,
    pub sample_ms: i64,
    /// Encoded `nanofleet.device.v1.Sample`.
    pub sample: Vec<u8>,
}

/// Everything one ingest transaction writes.
#[derive(Debug, Clone, Default)]
pub struct WriteBatch {
    pub presence: Vec<PresenceChange>,
    pub telemetry: Vec<TelemetryRecord>,
    pub events: Vec<EventRecord>,
    pub alarms: Vec<AlarmChange>,
    pub last_values: Vec<LastValues>,
}

impl WriteBatch {
    pub fn is_empty(&self) -> bool {
        self.presence.is_empty()
            && self.telemetry.is_empty()
            && self.events.is_empty()
            && self.alarms.is_empty()
            && self.last_values.is_empty()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteOutcome {
    pub telemetry_inserted: u64,
    pub events_inserted: u64,
    /// Deaths that marked a device offline (the others named an older session).
    pub deaths_applied: u64,
}

/// How much one step of [`crate::Store::settle_telemetry`] may move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettleStep {
    /// Most landed rows.
    pub rows: usize,
    /// Most devices (each adds two rollup rows to the fold).
    pub devices: usize,
}

/// A landed row's key: how far a sweep of the landing table has got.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LandedKey {
    pub device_id: String,
    pub seq: i64,
}

/// What one step of [`crate::Store::settle_telemetry`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settled {
    /// Landed rows taken out of the landing table.
    pub taken: u64,
    /// Of those, the rows that were new to the main table (and were folded).
    pub moved: u64,
    /// The step took as many rows as it was allowed: more may be waiting.
    pub more: bool,
    /// With `more`, the last key the step took: where the sweep's next step starts.
    pub last: Option<LandedKey>,
}

impl Settled {
    /// A step that took `taken` rows, `moved` of them new, up to the key `last`.
    pub(crate) fn of_step(taken: u64, moved: u64, last: Option<LandedKey>) -> Settled {
        let more = taken > 0 && last.is_some();
        Settled { taken, moved, more, last: last.filter(|_| more) }
    }
}
