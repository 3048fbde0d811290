//! Ingest counters, shared by every connection and read by the API and `/metrics`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::Reason;

#[derive(Debug, Default)]
pub struct Stats {
    accepted: AtomicU64,
    duplicates: AtomicU64,
    batches: AtomicU64,
    storage_errors: AtomicU64,
    rejected: [AtomicU64; Reason::ALL.len()],
}

/// A consistent-enough copy of the counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatsSnapshot {
    pub accepted: u64,
    pub duplicates: u64,
    pub batches_committed: u64,
    pub storage_errors: u64,
    pub rejected: BTreeMap<&'static str, u64>,
}

impl StatsSnapshot {
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }
}

impl Stats {
    pub(crate) fn reject(&self, r: Reason) {
        self.rejected[r as usize].fetch_add(1, Relaxed);
    }

    pub(crate) fn committed(&self, accepted: u64, duplicates: u64) {
        self.accepted.fetch_add(accepted, Relaxed);
        self.duplicates.fetch_add(duplicates, Relaxed);
        self.batches.fetch_add(1, Relaxed);
    }

    pub(crate) fn storage_error(&self) {
        self.storage_errors.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            accepted: self.accepted.load(Relaxed),
            duplicates: self.duplicates.load(Relaxed),
            batches_committed: self.batches.load(Relaxed),
            storage_errors: self.storage_errors.load(Relaxed),
            rejected: Reason::ALL
                .iter()
                .map(|r| (r.as_str(), self.rejected[*r as usize].load(Relaxed)))
                .collect(),
        }
    }
}
