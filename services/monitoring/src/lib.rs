//! Cross-site monitoring: statistical process control over batch quality and process
//! signals, comparisons between strata (device, site, firmware, recipe, cartridge lot)
//! and the cohort gate the firmware rollout uses. Plain types, no I/O, no clock: data
//! and time come in as arguments.
//!
//! # Layout
//! - [`spc`]: individuals / moving-range charts, Western Electric and Nelson rules,
//!   EWMA, CUSUM and process capability.
//! - [`chart`]: control charts over a selection of batches, split by a factor.
//! - [`index`]: the in-memory column index of batch measurements charts read.
//! - [`sketch`]: a mergeable quantile sketch and the summaries telemetry rollups keep.
//! - [`compare`]: which stratum differs and by how much, adjusted for the other
//!   factors, and the cohort gate.

#![forbid(unsafe_code)]

pub mod chart;
pub mod compare;
pub mod index;
pub mod sketch;
pub mod spc;
