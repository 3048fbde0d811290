//! What a rollout targets and how it advances.

use serde::{Deserialize, Serialize};

use crate::Device;

/// A refused rollout specification: the field, the value and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {value}: allowed {allowed}")]
pub struct SpecError {
    pub field: &'static str,
    pub value: String,
    pub allowed: String,
}

impl SpecError {
    pub fn new(field: &'static str, value: impl Into<String>, allowed: impl Into<String>) -> SpecError {
        SpecError { field, value: value.into(), allowed: allowed.into() }
    }
}

/// How devices take the offer (hawkBit's action types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActionType {
    /// Offered when the site's maintenance window is open; installed when idle.
    Soft,
    /// Offered at once, whatever the window; still installed only when idle.
    Forced,
    /// Downloaded and verified at once; installed when told.
    DownloadOnly,
}

impl ActionType {
    pub fn as_str(self) -> &'static str {
        match self {
            ActionType::Soft => "soft",
            ActionType::Forced => "forced",
            ActionType::DownloadOnly => "download-only",
        }
    }

    pub fn parse(s: &str) -> Option<ActionType> {
        [ActionType::Soft, ActionType::Forced, ActionType::DownloadOnly].into_iter().find(|a| a.as_str() == s)
    }
}

/// Which devices a rollout takes. Empty lists do not restrict.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    pub sites: Vec<String>,
    pub models: Vec<String>,
    /// Devices running one of these versions.
    pub from_versions: Vec<String>,
    /// Devices carrying every one of these tags.
    pub tags: Vec<String>,
    /// Exactly these devices (a rollback names those updated).
    pub devices: Vec<String>,
}

impl Filter {
    pub fn matches(&self, d: &Device) -> bool {
        let any = |list: &[String], v: &str| list.is_empty() || list.iter().any(|x| x == v);
        any(&self.sites, &d.site_id)
            && any(&self.models, &d.model)
            && any(&self.from_versions, &d.firmware_version)
            && any(&self.devices, &d.id)
            && self.tags.iter().all(|t| d.tags.contains(t))
    }
}

/// How the fleet is cut into waves, after the canary group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Waves {
    /// `canary` devices first, then waves reaching these cumulative percentages of
    /// the devices (the last must be 100), e.g. [10, 50, 100].
    Percent { canary: u32, steps: Vec<u32> },
    /// `canary` devices first, then waves of `first`, `first × factor`,
    /// `first × factor²`, … devices until all are in (AWS IoT Jobs' exponential rate).
    Exponential { canary: u32, first: u32, factor: u32 },
}

impl Waves {
    /// The size of each wave for `n` devices; every wave has at least one device, and
    /// the sizes add up to `n`.
    pub fn sizes(&self, n: usize) -> Vec<usize> {
        let (canary, rest) = match self {
            Waves::Percent { canary, .. } | Waves::Exponential { canary, .. } => {
                let c = (*canary as usize).min(n);
                (c, n - c)
            }
        };
        let mut sizes = Vec::new();
        if canary > 0 {
            sizes.push(canary);
        }
        match self {
            Waves::Percent { steps, .. } => {
                let mut done = 0usize;
                for pct in steps {
                    let upto = (rest * *pct as usize).div_ceil(100).min(rest);
                    if upto > done {
                        sizes.push(upto - done);
                        done = upto;
                    }
                }
                if done < rest {
                    sizes.push(rest - done);
                }
            }
            Waves::Exponential { first, factor, .. } => {
                let mut done = 0usize;
                let mut size = (*first).max(1) as usize;
                while done < rest {
                    let take = size.min(rest - done);
                    sizes.push(take);
                    done += take;
                    size = size.saturating_mul((*factor).max(1) as usize);
                }
            }
        }
        if sizes.is_empty() {
            sizes.push(0);
        }
        sizes
    }
}

/// A rollout: the release, the devices, the waves and the limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    /// The release offered (TUF target name) and its signed facts, copied at creation.
    pub target: String,
    pub model: String,
    pub version: String,
    pub release_counter: u64,
    pub sha256: String,
    pub length: u64,
    pub filter: Filter,
    pub waves: Waves,
    /// Share of the devices in the waves so far that must have committed before the
    /// next wave starts, in percent (1 to 100).
    pub success_threshold_pct: u32,
    /// Share of the devices offered so far that failed (refused, failed, rolled back,
    /// timed out) at which the rollout pauses, in percent (1 to 100).
    pub error_threshold_pct: u32,
    pub action: ActionType,
    /// A device with no final answer this long after an offer is offered again, or
    /// counts as timed out after `max_attempts` offers (ms).
    pub device_timeout_ms: i64,
    pub max_attempts: u32,
    /// With a health gate: how long after a wave succeeded its devices are watched
    /// before the gate compares them with those on the old version (ms; 0: no gate).
    pub health_watch_ms: i64,
    /// Offer the previous release to the updated devices when the gate finds a
    /// regression.
    pub rollback_on_regression: bool,
}

impl Spec {
    pub fn validate(&self) -> Result<(), SpecError> {
        let pct = |field: &'static str, v: u32| {
            if (1..=100).contains(&v) {
                Ok(())
            } else {
                Err(SpecError::new(field, v.to_string(), "1 to 100"))
            }
        };
        pct("success_threshold_pct", self.success_threshold_pct)?;
        pct("error_threshold_pct", self.error_threshold_pct)?;
        if !(60_000..=30 * 86_400_000).contains(&self.device_timeout_ms) {
            return Err(SpecError::new(
                "device_timeout",
                format!("{} s", self.device_timeout_ms / 1000),
                "1 minute to 30 days",
            ));
        }
        if !(1..=10).contains(&self.max_attempts) {
            return Err(SpecError::new("max_attempts", self.max_attempts.to_string(), "1 to 10"));
        }
        if !(0..=30 * 86_400_000).contains(&self.health_watch_ms) {
            return Err(SpecError::new(
                "health_watch",
                format!("{} s", self.health_watch_ms / 1000),
                "0 (no gate) to 30 days",
            ));
        }
        if self.rollback_on_regression && self.health_watch_ms == 0 {
            return Err(SpecError::new(
                "rollback_on_regression",
                "true",
                "only with a health gate (health_watch above 0)",
            ));
        }
        match &self.waves {
            Waves::Percent { steps, canary } => {
                if *canary > 100_000 {
                    return Err(SpecError::new("canary", canary.to_string(), "0 to 100000 devices"));
                }
                if steps.is_empty() || steps.last() != Some(&100) {
                    return Err(SpecError::new(
                        "waves",
                        format!("{steps:?}"),
                        "rising percentages ending at 100",
                    ));
                }
                if steps.windows(2).any(|w| w[0] >= w[1]) || steps.iter().any(|p| *p == 0 || *p > 100) {
                    return Err(SpecError::new(
                        "waves",
                        format!("{steps:?}"),
                        "rising percentages from 1 to 100",
                    ));
                }
            }
            Waves::Exponential { canary, first, factor } => {
                if *canary > 100_000 {
                    return Err(SpecError::new("canary", canary.to_string(), "0 to 100000 devices"));
                }
                if *first == 0 {
                    return Err(SpecError::new("first_wave", "0", "at least 1 device"));
                }
                if !(2..=10).contains(factor) {
                    return Err(SpecError::new("factor", factor.to_string(), "2 to 10"));
                }
            }
        }
        if self.target.is_empty() || self.sha256.len() != 64 || self.length == 0 {
            return Err(SpecError::new(
                "release",
                self.target.clone(),
                "a released image (target, sha256, length)",
            ));
        }
        Ok(())
    }
}
