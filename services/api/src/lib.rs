//! Nanofleet's operator API.
//!
//! [`Fleet`] answers the questions operators ask (sites, devices, telemetry); the
//! `grpc` module adapts it to the `nanofleet.v1` services, and the dashboard serves
//! the same answers as JSON. Errors come from one vocabulary, [`Error`], mapped to
//! gRPC codes and HTTP statuses in one place.
#![forbid(unsafe_code)]

mod alerting;
mod api;
mod audit;
pub mod auth_layer;
pub mod batch_doc;
mod batches;
mod deliver;
mod error;
mod firmware;
mod fleet;
mod grpc;
mod inventory;
pub mod json;
pub mod monitoring;
pub mod people;
mod recipes;
mod rollouts;
pub mod series;
mod trust;
pub mod webhook;

pub use alerting::{AlertOptions, Evaluation, alert_kind_named, alert_pb, alert_states_named};
pub use api::{Api, Disconnect};
pub use audit::AuditLog;
pub use batches::{Batches, RUN_ANSWER_TIMEOUT, batch_json, summary_json};
pub use deliver::{CommandSink, Deliveries, DeviceCommands};
pub use error::Error;
pub use firmware::Firmware;
pub use fleet::{DEFAULT_SAMPLE_LIMIT, Fleet, MAX_SAMPLE_LIMIT, TelemetryWindow};
pub use inventory::Inventory;
pub use monitoring::{Monitoring, factor_named};
pub use people::{Bootstrap, Caller, People, Role};
pub use recipes::{Recipes, Released};
pub use rollouts::{Control, Rollouts};
pub use trust::{Actor, Trust, TrustOptions, validate_site_id};

/// The server clock, ms since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
