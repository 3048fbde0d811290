//! Ingest counters, shared by every connection and read by the API and `/metrics`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::Reason;

/// Upper bounds (seconds) of the buckets of the time from a telemetry message's
/// arrival at ingest to its commit.
pub const LATENCY_BOUNDS: [f64; 15] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Debug, Default)]
pub struct Stats {
    accepted: AtomicU64,
    duplicates: AtomicU64,
    batches: AtomicU64,
    storage_errors: AtomicU64,
    rejected: [AtomicU64; Reason::ALL.len()],
    /// Per bucket of [`LATENCY_BOUNDS`], then one for longer.
    latency: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    latency_sum_us: AtomicU64,
}

/// A consistent-enough copy of the counters.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct StatsSnapshot {
    pub accepted: u64,
    pub duplicates: u64,
    pub batches_committed: u64,
    pub storage_errors: u64,
    pub rejected: BTreeMap<&'static str, u64>,
    /// Telemetry messages by time from arrival to commit: per bucket of
    /// [`LATENCY_BOUNDS`] (not cumulative), then those slower than the last bound.
    pub commit_latency: Vec<u64>,
    /// Sum of those times, seconds.
    pub commit_latency_sum_s: f64,
}

impl StatsSnapshot {
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }

    /// The `q` quantile of the commit latency between `earlier` and this snapshot,
    /// as the upper bound of the bucket holding it (None: no messages, or beyond the
    /// last bound).
    pub fn latency_quantile_since(&self, earlier: &StatsSnapshot, q: f64) -> Option<f64> {
        let counts: Vec<u64> = self
            .commit_latency
            .iter()
            .enumerate()
            .map(|(i, n)| n.saturating_sub(earlier.commit_latency.get(i).copied().unwrap_or(0)))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let want = (q.clamp(0.0, 1.0) * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in counts.iter().enumerate() {
            seen += n;
            if seen >= want {
                return LATENCY_BOUNDS.get(i).copied();
            }
        }
        None
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

    pub(crate) fn commit_took(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BOUNDS.iter().position(|&b| secs <= b).unwrap_or(LATENCY_BOUNDS.len());
        self.latency[i].fetch_add(1, Relaxed);
        self.latency_sum_us.fetch_add(d.as_micros() as u64, Relaxed);
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
            commit_latency: self.latency.iter().map(|n| n.load(Relaxed)).collect(),
            commit_latency_sum_s: self.latency_sum_us.load(Relaxed) as f64 / 1e6,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn latency_lands_in_its_bucket_and_quantiles_read_bounds() {
        let s = Stats::default();
        let before = s.snapshot();
        for _ in 0..98 {
            s.commit_took(Duration::from_micros(800));
        }
        s.commit_took(Duration::from_millis(30));
        s.commit_took(Duration::from_secs(20));
        let after = s.snapshot();
        assert_eq!(after.commit_latency[0], 98);
        assert_eq!(after.commit_latency[5], 1, "30 ms is in the 50 ms bucket");
        assert_eq!(after.commit_latency[LATENCY_BOUNDS.len()], 1, "20 s is beyond the last bound");
        assert_eq!(after.latency_quantile_since(&before, 0.5), Some(0.001));
        assert_eq!(after.latency_quantile_since(&before, 0.99), Some(0.05));
        assert_eq!(after.latency_quantile_since(&before, 1.0), None);
        assert_eq!(after.latency_quantile_since(&after, 0.5), None, "nothing in between");
        assert!((after.commit_latency_sum_s - (98.0 * 0.0008 + 0.03 + 20.0)).abs() < 1e-6);
    }
}
