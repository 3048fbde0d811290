//! The device hardware-abstraction layer: what the agent needs from a formulation
//! device. The simulated device in [`crate::sim`] implements it; a real device's
//! driver would too.

use nanofleet_proto::device::v1::{Event, Sample};

/// Fixed facts about a device, reported at birth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub device_id: String,
    pub site_id: String,
    pub model: String,
    pub firmware_version: String,
}

/// One reading of the device, and what happened since the last one.
#[derive(Debug, Clone, Default)]
pub struct Reading {
    pub sample: Sample,
    pub events: Vec<Event>,
}

/// A formulation device as the agent sees it. Time is passed in: the agent owns the
/// clock, so the same device logic runs in real time or simulated time.
pub trait Device: Send {
    fn info(&self) -> &DeviceInfo;
    /// Reads every sensor at `now_ms`, `dt_ms` after the previous reading.
    fn read(&mut self, now_ms: i64, dt_ms: i64) -> Reading;
}
