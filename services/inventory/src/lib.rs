//! Cartridge inventory as plain rules: what a scan says, what the catalogue allows,
//! where a cartridge's events may take it, what a temperature log shows, when a site
//! must reorder, and which cartridges a device must refuse. No I/O and no clock: the
//! server and the agent pass the time and the data in.
//!
//! # Layout
//! - [`gs1`]: GS1 element strings (`]d2` DataMatrix and the human-readable form),
//!   check digits and dates, with precise refusals.
//! - [`catalogue`]: cartridge types (GTIN-14), storage classes, lots and their release.
//! - [`movement`]: a serialised cartridge's events and the state they leave it in.
//! - [`coldchain`]: excursion minutes from a logger's readings.
//! - [`replenish`]: consumption rate, days of cover, reorder point, suggested order.
//! - [`denylist`]: signed deny lists and the device's offline check.
#![forbid(unsafe_code)]

pub mod catalogue;
pub mod coldchain;
pub mod denylist;
pub mod gs1;
pub mod movement;
pub mod replenish;

pub use catalogue::{CartridgeType, Lot, LotStatus, StorageClass};
pub use gs1::{CartridgeCode, ScanError};
pub use movement::{Movement, Status};

/// A field whose value is not allowed, and what is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} = {value:?}: allowed {allowed}")]
pub struct Invalid {
    pub field: &'static str,
    pub value: String,
    pub allowed: String,
}

impl Invalid {
    pub fn new(field: &'static str, value: &str, allowed: &str) -> Invalid {
        Invalid { field, value: value.to_owned(), allowed: allowed.to_owned() }
    }
}
