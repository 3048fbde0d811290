//! Firmware rollouts as plain state: which devices are offered a release and when,
//! when a wave advances, when the rollout stops itself. No I/O and no clock: the
//! scheduler passes the time, the devices' reports and the sites' maintenance
//! windows in, and carries out the [`Decision`]s that come out.
//!
//! The device's report is the only truth about a device: a device counts as updated
//! when it says it committed the new slot, and as failed when it says it failed,
//! rolled back or refused, or when it says nothing final within the device timeout
//! after its last offer (offers are retried up to `max_attempts`).
//!
//! Waves (hawkBit's rollout groups, AWS IoT Jobs' rates): an optional canary group,
//! then either cumulative percentages of the fleet or an exponential series of sizes.
//! Devices are ordered by a hash of the rollout and device ids, so every wave mixes
//! sites, and the order is the same after a restart. A wave starts when the one before
//! it reached the success threshold (and, with a health gate, when its devices'
//! alarms and batch quality showed no regression over the watch period). The rollout
//! pauses as soon as the failed share of the devices offered so far reaches the error
//! threshold; no wave starts while it is paused.
//!
//! # Layout
//! - [`spec`]: what a rollout targets and how it advances, with validation.
//! - [`window`]: a site's maintenance window in its own time zone.
//! - this module: the rollout's state and its transitions.
#![forbid(unsafe_code)]

pub mod spec;
pub mod window;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

pub use spec::{ActionType, Filter, Spec, SpecError, Waves};

/// A device as the rollout sees it when it joins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub id: String,
    pub site_id: String,
    pub model: String,
    pub firmware_version: String,
    pub tags: Vec<String>,
}

/// What a device said last about the offer (the agent's update statuses), plus the
/// rollout's own `pending`, `offered` and `timed-out`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Not offered yet (its wave has not started, or its site's window is closed).
    Pending,
    /// Offered; the device has not answered yet.
    Offered,
    Downloading,
    Downloaded,
    /// The device defers the install until it is idle (a run is under way).
    Deferred,
    Installing,
    Rebooting,
    Verifying,
    Committed,
    RolledBack,
    Failed,
    Refused,
    /// No final answer within the device timeout after the last offer.
    TimedOut,
    /// Taken out of the rollout (cancelled before its update started).
    Cancelled,
}

impl Status {
    pub const ALL: [Status; 14] = [
        Status::Pending,
        Status::Offered,
        Status::Downloading,
        Status::Downloaded,
        Status::Deferred,
        Status::Installing,
        Status::Rebooting,
        Status::Verifying,
        Status::Committed,
        Status::RolledBack,
        Status::Failed,
        Status::Refused,
        Status::TimedOut,
        Status::Cancelled,
    ];

    pub fn is_final(self) -> bool {
        matches!(
            self,
            Status::Committed
                | Status::RolledBack
                | Status::Failed
                | Status::Refused
                | Status::TimedOut
                | Status::Cancelled
        )
    }

    pub fn is_failure(self) -> bool {
        matches!(self, Status::RolledBack | Status::Failed | Status::Refused | Status::TimedOut)
    }

    /// Under way on the device: offered and not final.
    pub fn in_flight(self) -> bool {
        !self.is_final() && self != Status::Pending
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Offered => "offered",
            Status::Downloading => "downloading",
            Status::Downloaded => "downloaded",
            Status::Deferred => "deferred",
            Status::Installing => "installing",
            Status::Rebooting => "rebooting",
            Status::Verifying => "verifying",
            Status::Committed => "committed",
            Status::RolledBack => "rolled-back",
            Status::Failed => "failed",
            Status::Refused => "refused",
            Status::TimedOut => "timed-out",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// One device in a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub device_id: String,
    pub site_id: String,
    pub wave: u32,
    pub status: Status,
    /// Offers sent so far.
    pub attempts: u32,
    /// When the last offer went out (ms since the Unix epoch); 0 before the first.
    pub offered_ms: i64,
    /// When the status last changed.
    pub updated_ms: i64,
    /// The device's code and words for a refusal or failure.
    pub code: String,
    pub detail: String,
    /// The version the device ran when it joined (a rollback offers it again).
    #[serde(default)]
    pub from_version: String,
    /// A failure a person saw and resumed the rollout over: no longer counted
    /// against the error threshold.
    #[serde(default)]
    pub accepted: bool,
    /// Its offer could not be sent (not connected): not offered again until the
    /// device comes online.
    #[serde(default)]
    pub offline: bool,
}

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Running,
    /// Stopped by a threshold, the health gate or a person; resumes on request.
    Paused,
    /// Every wave done.
    Completed,
    Cancelled,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Paused => "paused",
            State::Completed => "completed",
            State::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        [State::Running, State::Paused, State::Completed, State::Cancelled]
            .into_iter()
            .find(|st| st.as_str() == s)
    }
}

/// The health gate's answer for a wave: does the updated cohort perform worse than
/// the devices still on the old version?
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub outcome: Outcome,
    /// What was compared and found, in words (goes to the pause reason and the audit).
    pub evidence: String,
}

/// What the health gate found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// No significant regression: the next wave may start.
    Passed,
    /// The updated devices do significantly worse.
    Regressed,
    /// Too few batches or alarms to judge (or the comparison failed): watched for
    /// another period, up to [`GATE_MAX_WATCHES`], then paused for a person.
    Insufficient,
    /// A person resumed the rollout over the gate's pause.
    Waived,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Passed => "passed",
            Outcome::Regressed => "regressed",
            Outcome::Insufficient => "insufficient",
            Outcome::Waived => "waived",
        }
    }
}

/// Watch periods a wave is watched for without enough evidence before the rollout
/// pauses for a person to decide.
pub const GATE_MAX_WATCHES: u32 = 4;

/// One answer of the health gate, kept with the rollout as its evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub wave: u32,
    pub at_ms: i64,
    pub outcome: Outcome,
    pub evidence: String,
}

/// Health checks kept per rollout (the oldest go first).
const HEALTH_KEPT: usize = 50;

/// What the scheduler must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Send the offer to this device (again, when `attempt` > 1).
    Offer {
        device_id: String,
        attempt: u32,
    },
    /// Tell this device its offer is withdrawn (cancel: those not past the reboot stop).
    Withdraw {
        device_id: String,
    },
    /// A wave started: its devices will be offered as their windows open.
    WaveStarted {
        wave: u32,
        devices: usize,
        reason: String,
    },
    /// Run the health gate for the devices updated so far and answer with
    /// [`Rollout::on_health`].
    CheckHealth {
        wave: u32,
    },
    /// The gate found a regression and the spec says roll back: offer the updated
    /// devices the release each ran before (device ids by that version).
    RollBack {
        devices_by_version: BTreeMap<String, Vec<String>>,
    },
    Paused {
        reason: String,
    },
    Completed,
}

/// A rollout and its devices. Serialisable; the scheduler persists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: String,
    pub spec: Spec,
    pub state: State,
    /// Why it is paused or cancelled; empty otherwise.
    pub reason: String,
    /// The highest wave started.
    pub wave: u32,
    /// Number of waves planned for the devices known at creation.
    pub waves: u32,
    /// The health gate passed for waves below this one.
    pub gate_passed: u32,
    /// When the current wave reached its success threshold (0: not yet).
    pub wave_succeeded_ms: i64,
    /// Watch periods of the current wave that ended without enough evidence.
    #[serde(default)]
    pub gate_watches: u32,
    /// Paused by the health gate (a person's resume waives it for the wave).
    #[serde(default)]
    pub gate_paused: bool,
    /// The health gate's answers, oldest first.
    #[serde(default)]
    pub health: Vec<HealthCheck>,
    pub created_ms: i64,
    pub members: BTreeMap<String, Member>,
}

/// Devices per status, for one wave or all.
pub type Counts = BTreeMap<Status, usize>;

impl Rollout {
    /// A rollout of `spec` over the `devices` that match its filter, in waves.
    pub fn new(id: &str, spec: Spec, devices: &[Device], now_ms: i64) -> Result<Rollout, SpecError> {
        spec.validate()?;
        let mut chosen: Vec<&Device> = devices.iter().filter(|d| spec.filter.matches(d)).collect();
        if chosen.is_empty() {
            return Err(SpecError::new(
                "filter",
                "matches no device",
                "a filter that selects at least one device",
            ));
        }
        chosen.sort_by_cached_key(|d| order_key(id, &d.id));
        let sizes = spec.waves.sizes(chosen.len());
        let mut members = BTreeMap::new();
        let mut wave = 0u32;
        let mut left_in_wave = sizes[0];
        for d in chosen {
            while left_in_wave == 0 {
                wave += 1;
                left_in_wave = sizes[wave as usize];
            }
            left_in_wave -= 1;
            members.insert(d.id.clone(), Member::new(d, wave));
        }
        Ok(Rollout {
            id: id.into(),
            spec,
            state: State::Running,
            reason: String::new(),
            wave: 0,
            waves: sizes.len() as u32,
            gate_passed: 0,
            wave_succeeded_ms: 0,
            gate_watches: 0,
            gate_paused: false,
            health: Vec::new(),
            created_ms: now_ms,
            members,
        })
    }

    /// A device came online: a member whose offer could not be sent is offered again
    /// at the next tick; a device enrolled (or changed) after the rollout started joins
    /// the wave under way if it matches. Returns whether anything changed.
    pub fn join(&mut self, d: &Device) -> bool {
        if matches!(self.state, State::Completed | State::Cancelled) {
            return false;
        }
        if let Some(m) = self.members.get_mut(&d.id) {
            let was = m.offline;
            m.offline = false;
            return was;
        }
        if !self.spec.filter.matches(d) {
            return false;
        }
        self.members.insert(d.id.clone(), Member::new(d, self.wave));
        true
    }

    /// The offer to `device_id` could not be sent (the device is not connected): it
    /// goes back to pending, the attempt not counted, until the device comes online.
    pub fn unsent(&mut self, device_id: &str) {
        if let Some(m) = self.members.get_mut(device_id)
            && m.status == Status::Offered
        {
            m.status = Status::Pending;
            m.attempts = m.attempts.saturating_sub(1);
            m.offline = true;
        }
    }

    /// A device's report. Reports about other rollouts' offers, from devices not in
    /// this one, or after a final answer, change nothing.
    pub fn on_report(
        &mut self,
        device_id: &str,
        status: Status,
        code: &str,
        detail: &str,
        now_ms: i64,
    ) -> Vec<Decision> {
        let Some(m) = self.members.get_mut(device_id) else { return Vec::new() };
        if m.status.is_final() || matches!(status, Status::Pending | Status::Offered | Status::TimedOut) {
            return Vec::new();
        }
        m.status = status;
        m.updated_ms = now_ms;
        m.code = code.chars().take(64).collect();
        m.detail = detail.chars().take(500).collect();
        let mut out = Vec::new();
        // Only a failure can raise the failed share (the devices offered do not change
        // on a report): the wave is counted then, not on each of thousands of reports.
        if status.is_failure() {
            self.check_errors(&mut out);
        }
        out
    }

    /// Time passes: offers for started waves whose windows are open, retries and
    /// timeouts, the error threshold, the next wave, the end.
    pub fn tick(&mut self, now_ms: i64, window_open: &dyn Fn(&str) -> bool) -> Vec<Decision> {
        let mut out = Vec::new();
        if self.state != State::Running {
            return out;
        }
        // Offers without a final answer in time: again, or timed out.
        let timeout = self.spec.device_timeout_ms;
        let max_attempts = self.spec.max_attempts;
        for m in self.members.values_mut() {
            if m.status.in_flight() && now_ms - m.offered_ms >= timeout {
                if m.attempts < max_attempts {
                    m.attempts += 1;
                    m.offered_ms = now_ms;
                    m.status = Status::Offered;
                    m.updated_ms = now_ms;
                    out.push(Decision::Offer { device_id: m.device_id.clone(), attempt: m.attempts });
                } else {
                    m.status = Status::TimedOut;
                    m.updated_ms = now_ms;
                    m.code = "timeout".into();
                    m.detail = format!("no final answer {} s after offer {}", timeout / 1000, m.attempts);
                }
            }
        }
        if self.check_errors(&mut out) {
            return out;
        }
        // New offers in the started waves, where the site's window allows.
        let ignores_windows = self.spec.action != ActionType::Soft;
        for m in self.members.values_mut() {
            if m.status == Status::Pending
                && !m.offline
                && m.wave <= self.wave
                && (ignores_windows || window_open(&m.site_id))
            {
                m.status = Status::Offered;
                m.attempts = 1;
                m.offered_ms = now_ms;
                m.updated_ms = now_ms;
                out.push(Decision::Offer { device_id: m.device_id.clone(), attempt: 1 });
            }
        }
        self.advance(now_ms, &mut out);
        out
    }

    /// The health gate's answer for `wave`.
    pub fn on_health(&mut self, wave: u32, verdict: &Verdict, now_ms: i64) -> Vec<Decision> {
        let mut out = Vec::new();
        if wave != self.wave || self.state != State::Running {
            return out;
        }
        self.record_health(wave, verdict.outcome, &verdict.evidence, now_ms);
        match verdict.outcome {
            Outcome::Regressed => {
                self.gate_paused = true;
                self.pause(&format!("health gate after wave {wave}: {}", verdict.evidence), &mut out);
                if self.spec.rollback_on_regression {
                    let mut devices_by_version: BTreeMap<String, Vec<String>> = BTreeMap::new();
                    for m in self.members.values().filter(|m| m.status == Status::Committed) {
                        devices_by_version
                            .entry(m.from_version.clone())
                            .or_default()
                            .push(m.device_id.clone());
                    }
                    if !devices_by_version.is_empty() {
                        out.push(Decision::RollBack { devices_by_version });
                    }
                }
            }
            Outcome::Insufficient if self.gate_watches + 1 >= GATE_MAX_WATCHES => {
                self.gate_watches += 1;
                self.gate_paused = true;
                let reason = format!(
                    "health gate after wave {wave}: not enough evidence after {} watch periods ({}); resume to go on without it",
                    self.gate_watches, verdict.evidence
                );
                self.pause(&reason, &mut out);
            }
            Outcome::Insufficient => {
                // Watched for another period from now.
                self.gate_watches += 1;
                self.wave_succeeded_ms = now_ms;
            }
            Outcome::Passed | Outcome::Waived => {
                self.gate_passed = wave + 1;
                self.advance(now_ms, &mut out);
            }
        }
        out
    }

    fn record_health(&mut self, wave: u32, outcome: Outcome, evidence: &str, now_ms: i64) {
        self.health.push(HealthCheck { wave, at_ms: now_ms, outcome, evidence: evidence.into() });
        if self.health.len() > HEALTH_KEPT {
            self.health.remove(0);
        }
    }

    /// Paused by a person.
    pub fn pause_by(&mut self, reason: &str) -> Result<Vec<Decision>, String> {
        if self.state != State::Running {
            return Err(format!("rollout {} is {}, not running", self.id, self.state.as_str()));
        }
        let mut out = Vec::new();
        self.pause(reason, &mut out);
        Ok(out)
    }

    /// Resumed by a person: the failures so far are accepted (they no longer count
    /// against the error threshold); new ones do.
    pub fn resume(&mut self, now_ms: i64) -> Result<(), String> {
        if self.state != State::Paused {
            return Err(format!("rollout {} is {}, not paused", self.id, self.state.as_str()));
        }
        for m in self.members.values_mut().filter(|m| m.status.is_failure()) {
            m.accepted = true;
        }
        if self.gate_paused {
            // The person who resumes decides over the gate for this wave.
            let evidence = format!("resumed over: {}", self.reason);
            self.record_health(self.wave, Outcome::Waived, &evidence, now_ms);
            self.gate_passed = self.wave + 1;
            self.gate_paused = false;
        }
        self.state = State::Running;
        self.reason.clear();
        Ok(())
    }

    /// Cancelled by a person: devices not offered yet are taken out; devices with an
    /// offer are told it is withdrawn (those past their reboot finish either way).
    pub fn cancel(&mut self, reason: &str, now_ms: i64) -> Result<Vec<Decision>, String> {
        if matches!(self.state, State::Completed | State::Cancelled) {
            return Err(format!("rollout {} is {} already", self.id, self.state.as_str()));
        }
        let mut out = Vec::new();
        for m in self.members.values_mut() {
            match m.status {
                Status::Pending => {
                    m.status = Status::Cancelled;
                    m.updated_ms = now_ms;
                }
                s if s.in_flight() => out.push(Decision::Withdraw { device_id: m.device_id.clone() }),
                _ => {}
            }
        }
        self.state = State::Cancelled;
        self.reason = reason.into();
        Ok(out)
    }

    /// Devices that committed this rollout's release (a rollback offers them the
    /// previous one).
    pub fn updated_devices(&self) -> Vec<String> {
        self.members.values().filter(|m| m.status == Status::Committed).map(|m| m.device_id.clone()).collect()
    }

    /// Devices per status, in `wave` or (None) in all.
    pub fn counts(&self, wave: Option<u32>) -> Counts {
        let mut c = Counts::new();
        for m in self.members.values().filter(|m| wave.is_none_or(|w| m.wave == w)) {
            *c.entry(m.status).or_default() += 1;
        }
        c
    }

    /// Pauses when the failed share of the devices offered in the current wave
    /// reaches the error threshold (failures a person accepted by resuming do not
    /// count). Returns whether it paused.
    fn check_errors(&mut self, out: &mut Vec<Decision>) -> bool {
        if self.state != State::Running {
            return false;
        }
        let wave = self.members.values().filter(|m| m.wave == self.wave);
        let offered =
            wave.clone().filter(|m| m.status != Status::Pending && m.status != Status::Cancelled).count();
        let failed = wave.filter(|m| m.status.is_failure() && !m.accepted).count();
        if failed > 0 && failed * 100 >= self.spec.error_threshold_pct as usize * offered {
            let reason = format!(
                "{failed} of {offered} devices offered in wave {} failed ({}%), at or above the error threshold of {}%",
                self.wave,
                failed * 100 / offered.max(1),
                self.spec.error_threshold_pct
            );
            self.pause(&reason, out);
            return true;
        }
        false
    }

    fn pause(&mut self, reason: &str, out: &mut Vec<Decision>) {
        self.state = State::Paused;
        self.reason = reason.into();
        out.push(Decision::Paused { reason: reason.into() });
    }

    /// Starts the next wave once this one succeeded (and passed the gate), or ends
    /// the rollout after the last.
    fn advance(&mut self, now_ms: i64, out: &mut Vec<Decision>) {
        if self.state != State::Running {
            return;
        }
        let wave: Vec<&Member> = self.members.values().filter(|m| m.wave <= self.wave).collect();
        let committed = wave.iter().filter(|m| m.status == Status::Committed).count();
        let needed = wave.len() * self.spec.success_threshold_pct as usize;
        if committed * 100 < needed || wave.is_empty() {
            // Every device has its final answer and too few committed: nothing more
            // will change without a person.
            if !wave.is_empty() && wave.iter().all(|m| m.status.is_final()) {
                let reason = format!(
                    "wave {} ended with {committed} of {} devices committed ({}%), below the success threshold of {}%",
                    self.wave,
                    wave.len(),
                    committed * 100 / wave.len(),
                    self.spec.success_threshold_pct
                );
                self.pause(&reason, out);
            }
            return;
        }
        if self.wave_succeeded_ms == 0 {
            self.wave_succeeded_ms = now_ms;
        }
        if self.spec.health_watch_ms > 0 && self.gate_passed <= self.wave {
            if now_ms - self.wave_succeeded_ms >= self.spec.health_watch_ms {
                out.push(Decision::CheckHealth { wave: self.wave });
            }
            return;
        }
        let later = self.members.values().any(|m| m.wave > self.wave);
        if later {
            self.wave += 1;
            self.wave_succeeded_ms = 0;
            self.gate_watches = 0;
            let devices = self.members.values().filter(|m| m.wave == self.wave).count();
            let reason = format!(
                "{committed} of {} devices in waves up to {} committed ({}%), at or above the success threshold of {}%",
                wave.len(),
                self.wave - 1,
                committed * 100 / wave.len(),
                self.spec.success_threshold_pct
            );
            out.push(Decision::WaveStarted { wave: self.wave, devices, reason });
        } else if self.members.values().all(|m| m.status.is_final()) {
            self.state = State::Completed;
            out.push(Decision::Completed);
        }
    }
}

impl Member {
    fn new(d: &Device, wave: u32) -> Member {
        Member {
            device_id: d.id.clone(),
            site_id: d.site_id.clone(),
            wave,
            status: Status::Pending,
            attempts: 0,
            offered_ms: 0,
            updated_ms: 0,
            code: String::new(),
            detail: String::new(),
            from_version: d.firmware_version.clone(),
            accepted: false,
            offline: false,
        }
    }
}

/// The position of a device in a rollout's order.
fn order_key(rollout_id: &str, device_id: &str) -> [u8; 32] {
    let mut h = sha2::Sha256::new();
    h.update(rollout_id.as_bytes());
    h.update([0]);
    h.update(device_id.as_bytes());
    h.finalize().into()
}

#[cfg(test)]
mod tests;
