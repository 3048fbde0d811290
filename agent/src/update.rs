//! The firmware update engine: a pure state machine after Mender's and RAUC's A/B model.
//!
//! Inputs go in (an offer, the result of a download, an install, a boot, a health
//! check), decisions come out: [`Action`]s for the edge ([`crate::updater`]) to carry
//! out and [`Report`]s for the cloud. No I/O and no clock. The edge persists the
//! [`Engine`] after every step and before it carries out the step's actions, so a
//! power loss at any point resumes from the last persisted state; every action is
//! safe to carry out twice.
//!
//! ```text
//! Idle ─offer─▶ Downloading ─hash ok─▶ Downloaded ─idle─▶ Installing ─written─▶ Rebooting
//!                                      (download-only:                          │ boots the
//!                                       waits to be told)                       │ new slot once
//!          Committed ◀─ Committing ◀─health ok─ Verifying ◀─────────────────────┘
//!                                                 │ health check failed, or the new
//!                                                 ▼ slot did not boot, or power lost
//!                                  RolledBack ◀─ RollingBack
//! ```
//!
//! The bootloader boots the committed slot by default and a freshly installed slot
//! once, on trial (U-Boot's `upgrade_available`, RAUC's boot attempts). A device that
//! loses power during the trial comes back on the committed slot: the new firmware
//! becomes the default only after it booted and passed its health check.
//!
//! Refused before anything is downloaded: an offer for another hardware model, a
//! release counter below the highest one committed (anti-rollback), an image larger
//! than the device takes. A device never installs while a run is under way: it
//! defers until idle.

use serde::{Deserialize, Serialize};

/// Largest image the device takes, in bytes.
pub const MAX_IMAGE_BYTES: u64 = 512 * 1024 * 1024;

/// Download attempts before the update fails (each resumes where the last stopped).
pub const MAX_DOWNLOAD_ATTEMPTS: u32 = 5;

/// Trial boots of a newly installed slot that never reached the bootloader (power
/// lost before the trial was armed) before the update fails.
pub const MAX_TRIAL_BOOTS: u32 = 3;

/// One of the two system partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }
}

/// How a device takes an offer (hawkBit's action types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActionType {
    /// Installs when the device is idle.
    Soft,
    /// Installs as soon as the device is idle, without further confirmation by the
    /// cloud; like `Soft` on the device (the cloud's windows differ).
    Forced,
    /// Downloads and verifies, then waits for [`Input::InstallNow`].
    DownloadOnly,
}

/// A firmware image offered to this device, as verified against the signed
/// metadata before it reaches the engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// The rollout the offer belongs to (or `local` for an install from a file).
    pub rollout_id: String,
    pub version: String,
    /// The hardware model the image is built for.
    pub model: String,
    /// Anti-rollback counter of the release; the device refuses a lower one than it
    /// has committed.
    pub release_counter: u64,
    /// Lowercase hex SHA-256 of the image.
    pub sha256: String,
    pub length: u64,
    pub action: ActionType,
    /// Where the image is: an `https://` address, or a file for a local install.
    pub url: String,
}

/// A firmware build a slot holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Firmware {
    pub version: String,
    pub release_counter: u64,
}

/// Where an update is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Downloading,
    /// Downloaded and its hash checked; waiting to install (idle device, or told to).
    Downloaded,
    Installing,
    /// The new slot is written; the device boots it once on trial.
    Rebooting,
    /// Running the new slot on trial; its health check is under way.
    Verifying,
    /// Health check passed; making the new slot the default.
    Committing,
    /// Going back to the committed slot.
    RollingBack,
}

/// The update under way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub offer: Offer,
    pub phase: Phase,
    /// The slot being written: the one not committed when the job started.
    pub target: Slot,
    pub download_attempts: u32,
    pub trial_boots: u32,
    /// Why it is rolling back (reported when the device is back on the old slot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_reason: Option<(String, String)>,
}

/// What the device says of an update; the cloud's view is built from these alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Refused,
    Downloading,
    Downloaded,
    Deferred,
    Installing,
    Rebooting,
    Verifying,
    Committed,
    RolledBack,
    Failed,
    Cancelled,
}

impl Status {
    /// A final answer for the offer: the device takes no further step on it.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Status::Refused | Status::Committed | Status::RolledBack | Status::Failed | Status::Cancelled
        )
    }
}

/// One report for the cloud.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub rollout_id: String,
    /// The version offered.
    pub version: String,
    pub status: Status,
    /// Stable code of a refusal or failure (`wrong_model`, `release_counter_too_low`,
    /// `hash_mismatch`, `health_check_failed`, …); empty otherwise.
    pub code: String,
    /// Human-readable detail, naming the values.
    pub detail: String,
    /// The version the device runs now.
    pub running_version: String,
}

/// Stable codes of refusals and failures.
pub mod code {
    pub const WRONG_MODEL: &str = "wrong_model";
    pub const RELEASE_COUNTER_TOO_LOW: &str = "release_counter_too_low";
    pub const TOO_LARGE: &str = "too_large";
    pub const BUSY: &str = "update_in_progress";
    pub const HASH_MISMATCH: &str = "hash_mismatch";
    pub const DOWNLOAD_FAILED: &str = "download_failed";
    pub const INSTALL_FAILED: &str = "install_failed";
    pub const BOOT_FAILED: &str = "boot_failed";
    pub const HEALTH_CHECK_FAILED: &str = "health_check_failed";
    pub const POWER_LOST: &str = "power_lost_on_trial";
    pub const NOT_READY: &str = "not_ready";
}

/// What the edge must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Fetch the image, resuming after the bytes already held; answer
    /// [`Input::Downloaded`] or [`Input::DownloadFailed`].
    Download,
    /// Write the downloaded image into `slot`; answer [`Input::Written`].
    Install {
        slot: Slot,
    },
    /// Arm a one-time trial boot of `trial` (none: boot the default), then reboot;
    /// answer [`Input::Booted`] after the boot.
    Reboot {
        trial: Option<Slot>,
    },
    /// Check the device works; answer [`Input::HealthChecked`].
    HealthCheck,
    /// Make `slot` the bootloader's default; answer [`Input::CommitDone`].
    Commit {
        slot: Slot,
    },
    /// Remove the downloaded image.
    Discard,
    Report(Report),
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Offer(Offer),
    /// The download finished: the image's hash and length as computed on the device.
    Downloaded {
        sha256: String,
        length: u64,
    },
    DownloadFailed {
        reason: String,
    },
    /// The device may be idle now: a deferred install can start.
    Idle,
    /// Install a download-only image.
    InstallNow,
    Written(Result<(), String>),
    /// The device (re)started. `booted`: the slot it runs; `default`: the slot the
    /// bootloader boots by default; `trial`: the slot the bootloader tried once at
    /// this boot, if any.
    Booted {
        booted: Slot,
        default: Slot,
        trial: Option<Slot>,
    },
    HealthChecked(Result<(), String>),
    CommitDone,
    Cancel,
}

/// The device's update state: what it runs and the update under way. Serialisable:
/// the edge persists it after every step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Engine {
    pub model: String,
    /// The bootloader's default slot.
    pub committed: Slot,
    /// The firmware in the committed slot.
    pub running: Firmware,
    /// The highest release counter ever committed; never decreases.
    pub counter_floor: u64,
    pub job: Option<Job>,
}

impl Engine {
    /// A device fresh from the factory: `firmware` in slot A.
    pub fn factory(model: &str, firmware: Firmware) -> Engine {
        Engine {
            model: model.into(),
            committed: Slot::A,
            counter_floor: firmware.release_counter,
            running: firmware,
            job: None,
        }
    }

    /// Takes one input; `busy` says a run is under way (no install starts then).
    pub fn step(&mut self, input: Input, busy: bool) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::Offer(offer) => self.on_offer(offer, busy, &mut out),
            Input::Downloaded { sha256, length } => self.on_downloaded(&sha256, length, busy, &mut out),
            Input::DownloadFailed { reason } => self.on_download_failed(reason, &mut out),
            Input::Idle => {
                if self.phase() == Some(Phase::Downloaded) {
                    self.install_when_idle(busy, false, &mut out);
                }
            }
            Input::InstallNow => match self.phase() {
                Some(Phase::Downloaded) => self.install_when_idle(busy, true, &mut out),
                _ => {
                    if let Some(job) = &self.job {
                        let detail = format!("install requested in phase {:?}", job.phase);
                        out.push(self.report(Status::from(job.phase), code::NOT_READY, detail));
                    }
                }
            },
            Input::Written(result) => self.on_written(result, &mut out),
            Input::Booted { booted, default, trial } => {
                self.on_booted(booted, default, trial, busy, &mut out)
            }
            Input::HealthChecked(Ok(())) => {
                if let Some(job) = self.job.as_mut().filter(|j| j.phase == Phase::Verifying) {
                    job.phase = Phase::Committing;
                    out.push(Action::Commit { slot: job.target });
                }
            }
            Input::HealthChecked(Err(reason)) => {
                if self.phase() == Some(Phase::Verifying) {
                    self.roll_back(
                        code::HEALTH_CHECK_FAILED,
                        format!("health check failed: {reason}"),
                        &mut out,
                    );
                }
            }
            Input::CommitDone => self.on_committed(&mut out),
            Input::Cancel => self.on_cancel(&mut out),
        }
        out
    }

    pub fn phase(&self) -> Option<Phase> {
        self.job.as_ref().map(|j| j.phase)
    }

    fn on_offer(&mut self, offer: Offer, busy: bool, out: &mut Vec<Action>) {
        if let Some(job) = &self.job {
            if job.offer == offer {
                // The cloud repeats an offer until it hears of it: say where it is.
                out.push(self.report(Status::from(job.phase), "", "offer already taken".into()));
                return;
            }
            let detail = format!(
                "update to {} ({}) is in phase {:?}; cancel it first",
                job.offer.version, job.offer.rollout_id, job.phase
            );
            out.push(self.report_for(&offer, Status::Refused, code::BUSY, detail));
            return;
        }
        let refusal = if offer.model != self.model {
            Some((
                code::WRONG_MODEL,
                format!("image is for model {:?}, this device is {:?}", offer.model, self.model),
            ))
        } else if offer.release_counter < self.counter_floor {
            Some((
                code::RELEASE_COUNTER_TOO_LOW,
                format!(
                    "release counter {} is below {} (the highest committed): a rollback to an older build is refused",
                    offer.release_counter, self.counter_floor
                ),
            ))
        } else if offer.length == 0 || offer.length > MAX_IMAGE_BYTES {
            Some((
                code::TOO_LARGE,
                format!("image length {} bytes, allowed: 1 to {MAX_IMAGE_BYTES}", offer.length),
            ))
        } else {
            None
        };
        if let Some((code, detail)) = refusal {
            out.push(self.report_for(&offer, Status::Refused, code, detail));
            return;
        }
        if offer.version == self.running.version && offer.release_counter == self.running.release_counter {
            out.push(self.report_for(&offer, Status::Committed, "", "already running this version".into()));
            return;
        }
        let _ = busy; // downloads go ahead during a run; installs wait
        self.job = Some(Job {
            target: self.committed.other(),
            offer,
            phase: Phase::Downloading,
            download_attempts: 1,
            trial_boots: 0,
            rollback_reason: None,
        });
        out.push(self.report(Status::Downloading, "", String::new()));
        out.push(Action::Download);
    }

    fn on_downloaded(&mut self, sha256: &str, length: u64, busy: bool, out: &mut Vec<Action>) {
        let Some(job) = self.job.as_mut().filter(|j| j.phase == Phase::Downloading) else { return };
        if !sha256.eq_ignore_ascii_case(&job.offer.sha256) || length != job.offer.length {
            let detail = format!(
                "image sha256 {sha256} ({length} bytes), signed metadata says {} ({} bytes)",
                job.offer.sha256, job.offer.length
            );
            out.push(Action::Discard);
            self.fail(code::HASH_MISMATCH, detail, out);
            return;
        }
        job.phase = Phase::Downloaded;
        out.push(self.report(Status::Downloaded, "", format!("{length} bytes, sha256 verified")));
        self.install_when_idle(busy, false, out);
    }

    fn on_download_failed(&mut self, reason: String, out: &mut Vec<Action>) {
        let Some(job) = self.job.as_mut().filter(|j| j.phase == Phase::Downloading) else { return };
        if job.download_attempts >= MAX_DOWNLOAD_ATTEMPTS {
            let detail = format!("{reason} (after {} attempts)", job.download_attempts);
            self.fail(code::DOWNLOAD_FAILED, detail, out);
            return;
        }
        job.download_attempts += 1;
        let detail =
            format!("{reason}; attempt {} of {MAX_DOWNLOAD_ATTEMPTS} resumes", job.download_attempts);
        out.push(self.report(Status::Downloading, "", detail));
        out.push(Action::Download);
    }

    fn install_when_idle(&mut self, busy: bool, told: bool, out: &mut Vec<Action>) {
        let Some(job) = self.job.as_mut() else { return };
        if job.offer.action == ActionType::DownloadOnly && !told {
            return;
        }
        if busy {
            out.push(self.report(
                Status::Deferred,
                "",
                "a run is under way; installs when the device is idle".into(),
            ));
            return;
        }
        job.phase = Phase::Installing;
        let slot = job.target;
        out.push(self.report(Status::Installing, "", format!("writing slot {}", slot.name())));
        out.push(Action::Install { slot });
    }

    fn on_written(&mut self, result: Result<(), String>, out: &mut Vec<Action>) {
        let Some(job) = self.job.as_mut().filter(|j| j.phase == Phase::Installing) else { return };
        match result {
            Ok(()) => {
                job.phase = Phase::Rebooting;
                job.trial_boots += 1;
                let slot = job.target;
                out.push(self.report(Status::Rebooting, "", format!("trial boot of slot {}", slot.name())));
                out.push(Action::Reboot { trial: Some(slot) });
            }
            Err(reason) => {
                out.push(Action::Discard);
                self.fail(code::INSTALL_FAILED, reason, out);
            }
        }
    }

    fn on_booted(
        &mut self,
        booted: Slot,
        default: Slot,
        trial: Option<Slot>,
        busy: bool,
        out: &mut Vec<Action>,
    ) {
        let Some(job) = self.job.as_mut() else {
            // No update under way: the bootloader's default is what runs.
            self.committed = default;
            return;
        };
        let target = job.target;
        match job.phase {
            Phase::Downloading => out.push(Action::Download),
            Phase::Downloaded => self.install_when_idle(busy, false, out),
            // A slot write cut short is written again from the start; the device
            // still runs the committed slot.
            Phase::Installing => out.push(Action::Install { slot: target }),
            Phase::Rebooting if booted == target => {
                job.phase = Phase::Verifying;
                out.push(self.report(
                    Status::Verifying,
                    "",
                    format!("booted slot {} on trial", target.name()),
                ));
                out.push(Action::HealthCheck);
            }
            Phase::Rebooting if trial == Some(target) => {
                let detail = format!(
                    "slot {} did not boot; the bootloader went back to slot {}",
                    target.name(),
                    booted.name()
                );
                self.finish_rollback(code::BOOT_FAILED, detail, out);
            }
            Phase::Rebooting => {
                // Power was lost before the trial boot was armed: arm it again.
                if job.trial_boots >= MAX_TRIAL_BOOTS {
                    let detail =
                        format!("slot {} was not tried after {} reboots", target.name(), job.trial_boots);
                    self.finish_rollback(code::BOOT_FAILED, detail, out);
                } else {
                    job.trial_boots += 1;
                    out.push(Action::Reboot { trial: Some(target) });
                }
            }
            Phase::Verifying | Phase::Committing if booted == target && default == target => {
                self.on_committed(out)
            }
            Phase::Verifying | Phase::Committing if booted == target => {
                // The agent restarted on the trial slot (no reboot): check again.
                job.phase = Phase::Verifying;
                out.push(Action::HealthCheck);
            }
            Phase::Verifying | Phase::Committing => {
                let detail = format!(
                    "the device restarted during the trial of slot {} and came back on slot {}",
                    target.name(),
                    booted.name()
                );
                self.finish_rollback(code::POWER_LOST, detail, out);
            }
            Phase::RollingBack if booted != target => {
                let (code, detail) = job.rollback_reason.clone().unwrap_or_default();
                self.finish_rollback(&code, detail, out);
            }
            Phase::RollingBack => out.push(Action::Reboot { trial: None }),
        }
    }

    fn on_committed(&mut self, out: &mut Vec<Action>) {
        let Some(job) = self.job.take() else { return };
        if !matches!(job.phase, Phase::Committing | Phase::Verifying) {
            self.job = Some(job);
            return;
        }
        self.committed = job.target;
        self.running =
            Firmware { version: job.offer.version.clone(), release_counter: job.offer.release_counter };
        self.counter_floor = self.counter_floor.max(job.offer.release_counter);
        out.push(Action::Discard);
        out.push(self.report_for(
            &job.offer,
            Status::Committed,
            "",
            format!("running slot {}", job.target.name()),
        ));
    }

    fn on_cancel(&mut self, out: &mut Vec<Action>) {
        let Some(job) = &self.job else { return };
        match job.phase {
            Phase::Downloading | Phase::Downloaded | Phase::Installing => {
                let job = self.job.take().expect("checked above");
                out.push(Action::Discard);
                out.push(self.report_for(
                    &job.offer,
                    Status::Cancelled,
                    "",
                    "cancelled before the reboot".into(),
                ));
            }
            // Past the point of no return: the trial decides.
            _ => {
                let detail = format!("cannot cancel in phase {:?}; the trial boot decides", job.phase);
                out.push(self.report(Status::from(job.phase), code::NOT_READY, detail));
            }
        }
    }

    /// Health check failed on the trial slot: reboot into the committed one.
    fn roll_back(&mut self, code: &str, detail: String, out: &mut Vec<Action>) {
        let Some(job) = self.job.as_mut() else { return };
        job.phase = Phase::RollingBack;
        job.rollback_reason = Some((code.into(), detail));
        out.push(Action::Reboot { trial: None });
    }

    /// Back on the committed slot: the update ends rolled back.
    fn finish_rollback(&mut self, code: &str, detail: String, out: &mut Vec<Action>) {
        let Some(job) = self.job.take() else { return };
        out.push(Action::Discard);
        out.push(self.report_for(&job.offer, Status::RolledBack, code, detail));
    }

    fn fail(&mut self, code: &str, detail: String, out: &mut Vec<Action>) {
        let Some(job) = self.job.take() else { return };
        out.push(self.report_for(&job.offer, Status::Failed, code, detail));
    }

    fn report(&self, status: Status, code: &str, detail: String) -> Action {
        match &self.job {
            Some(job) => self.report_for(&job.offer, status, code, detail),
            None => Action::Report(Report {
                rollout_id: String::new(),
                version: String::new(),
                status,
                code: code.into(),
                detail,
                running_version: self.running.version.clone(),
            }),
        }
    }

    fn report_for(&self, offer: &Offer, status: Status, code: &str, detail: String) -> Action {
        Action::Report(Report {
            rollout_id: offer.rollout_id.clone(),
            version: offer.version.clone(),
            status,
            code: code.into(),
            detail,
            running_version: self.running.version.clone(),
        })
    }
}

impl From<Phase> for Status {
    fn from(p: Phase) -> Status {
        match p {
            Phase::Downloading => Status::Downloading,
            Phase::Downloaded => Status::Downloaded,
            Phase::Installing => Status::Installing,
            Phase::Rebooting => Status::Rebooting,
            Phase::Verifying | Phase::Committing => Status::Verifying,
            Phase::RollingBack => Status::Verifying,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> Engine {
        Engine::factory("NF-MX200", Firmware { version: "2.3.1".into(), release_counter: 7 })
    }

    fn offer() -> Offer {
        Offer {
            rollout_id: "r1".into(),
            version: "2.4.0".into(),
            model: "NF-MX200".into(),
            release_counter: 8,
            sha256: "ab".repeat(32),
            length: 1000,
            action: ActionType::Soft,
            url: "https://example.invalid/fw.img".into(),
        }
    }

    fn reports(actions: &[Action]) -> Vec<(Status, String)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Report(r) => Some((r.status, r.code.clone())),
                _ => None,
            })
            .collect()
    }

    fn without_reports(actions: Vec<Action>) -> Vec<Action> {
        actions.into_iter().filter(|a| !matches!(a, Action::Report(_))).collect()
    }

    fn downloaded() -> Input {
        Input::Downloaded { sha256: "ab".repeat(32), length: 1000 }
    }

    /// Takes the engine through to the trial boot of slot B.
    fn to_rebooting(e: &mut Engine) {
        e.step(Input::Offer(offer()), false);
        e.step(downloaded(), false);
        assert_eq!(
            without_reports(e.step(Input::Written(Ok(())), false)),
            vec![Action::Reboot { trial: Some(Slot::B) }]
        );
    }

    #[test]
    fn a_good_update_installs_to_the_inactive_slot_and_commits_after_the_health_check() {
        let mut e = engine();
        assert_eq!(without_reports(e.step(Input::Offer(offer()), false)), vec![Action::Download]);
        assert_eq!(without_reports(e.step(downloaded(), false)), vec![Action::Install { slot: Slot::B }]);
        assert_eq!(
            without_reports(e.step(Input::Written(Ok(())), false)),
            vec![Action::Reboot { trial: Some(Slot::B) }]
        );
        let a = e.step(Input::Booted { booted: Slot::B, default: Slot::A, trial: Some(Slot::B) }, false);
        assert_eq!(without_reports(a), vec![Action::HealthCheck]);
        assert_eq!(
            without_reports(e.step(Input::HealthChecked(Ok(())), false)),
            vec![Action::Commit { slot: Slot::B }]
        );
        let a = e.step(Input::CommitDone, false);
        assert_eq!(reports(&a), vec![(Status::Committed, String::new())]);
        assert_eq!(e.committed, Slot::B);
        assert_eq!(e.running.version, "2.4.0");
        assert_eq!(e.counter_floor, 8);
        assert!(e.job.is_none());
    }

    #[test]
    fn offers_for_another_model_or_an_older_counter_are_refused_before_any_download() {
        let mut e = engine();
        let a = e.step(Input::Offer(Offer { model: "NF-MX100".into(), ..offer() }), false);
        assert_eq!(reports(&a), vec![(Status::Refused, code::WRONG_MODEL.into())]);
        let a = e.step(Input::Offer(Offer { release_counter: 6, ..offer() }), false);
        assert_eq!(reports(&a), vec![(Status::Refused, code::RELEASE_COUNTER_TOO_LOW.into())]);
        let a = e.step(Input::Offer(Offer { length: MAX_IMAGE_BYTES + 1, ..offer() }), false);
        assert_eq!(reports(&a), vec![(Status::Refused, code::TOO_LARGE.into())]);
        assert!(e.job.is_none());
    }

    #[test]
    fn a_committed_counter_stops_a_later_offer_of_the_build_before_it() {
        let mut e = engine();
        to_rebooting(&mut e);
        e.step(Input::Booted { booted: Slot::B, default: Slot::A, trial: Some(Slot::B) }, false);
        e.step(Input::HealthChecked(Ok(())), false);
        e.step(Input::CommitDone, false);
        let old = Offer { version: "2.3.9".into(), release_counter: 7, ..offer() };
        let a = e.step(Input::Offer(old), false);
        assert_eq!(reports(&a), vec![(Status::Refused, code::RELEASE_COUNTER_TOO_LOW.into())]);
    }

    #[test]
    fn an_image_whose_hash_differs_from_the_signed_one_is_discarded() {
        let mut e = engine();
        e.step(Input::Offer(offer()), false);
        let a = e.step(Input::Downloaded { sha256: "cd".repeat(32), length: 1000 }, false);
        assert!(a.contains(&Action::Discard));
        assert_eq!(reports(&a), vec![(Status::Failed, code::HASH_MISMATCH.into())]);
        assert!(e.job.is_none());
    }

    #[test]
    fn the_install_waits_while_a_run_is_under_way() {
        let mut e = engine();
        e.step(Input::Offer(offer()), true);
        let a = e.step(downloaded(), true);
        assert_eq!(reports(&a).last().unwrap().0, Status::Deferred);
        assert!(without_reports(a).is_empty());
        assert!(without_reports(e.step(Input::Idle, true)).is_empty());
        assert_eq!(without_reports(e.step(Input::Idle, false)), vec![Action::Install { slot: Slot::B }]);
    }

    #[test]
    fn a_download_only_offer_waits_to_be_told() {
        let mut e = engine();
        e.step(Input::Offer(Offer { action: ActionType::DownloadOnly, ..offer() }), false);
        assert!(without_reports(e.step(downloaded(), false)).is_empty());
        assert!(without_reports(e.step(Input::Idle, false)).is_empty());
        assert_eq!(
            without_reports(e.step(Input::InstallNow, false)),
            vec![Action::Install { slot: Slot::B }]
        );
    }

    #[test]
    fn a_failed_health_check_rolls_back_to_the_committed_slot() {
        let mut e = engine();
        to_rebooting(&mut e);
        e.step(Input::Booted { booted: Slot::B, default: Slot::A, trial: Some(Slot::B) }, false);
        let a = e.step(Input::HealthChecked(Err("pump self-test: no pressure".into())), false);
        assert_eq!(without_reports(a), vec![Action::Reboot { trial: None }]);
        let a = e.step(Input::Booted { booted: Slot::A, default: Slot::A, trial: None }, false);
        assert_eq!(reports(&a), vec![(Status::RolledBack, code::HEALTH_CHECK_FAILED.into())]);
        assert_eq!(e.committed, Slot::A);
        assert_eq!(e.running.version, "2.3.1");
        assert_eq!(e.counter_floor, 7, "a rolled-back release does not raise the floor");
    }

    #[test]
    fn a_slot_that_does_not_boot_is_rolled_back() {
        let mut e = engine();
        to_rebooting(&mut e);
        let a = e.step(Input::Booted { booted: Slot::A, default: Slot::A, trial: Some(Slot::B) }, false);
        assert_eq!(reports(&a), vec![(Status::RolledBack, code::BOOT_FAILED.into())]);
    }

    #[test]
    fn power_lost_before_the_trial_was_armed_arms_it_again() {
        let mut e = engine();
        to_rebooting(&mut e);
        let a = e.step(Input::Booted { booted: Slot::A, default: Slot::A, trial: None }, false);
        assert_eq!(a, vec![Action::Reboot { trial: Some(Slot::B) }]);
        e.step(Input::Booted { booted: Slot::A, default: Slot::A, trial: None }, false);
        let a = e.step(Input::Booted { booted: Slot::A, default: Slot::A, trial: None }, false);
        assert_eq!(
            reports(&a),
            vec![(Status::RolledBack, code::BOOT_FAILED.into())],
            "gives up after {MAX_TRIAL_BOOTS}"
        );
    }

    #[test]
    fn power_lost_during_the_trial_comes_back_on_the_committed_slot() {
        let mut e = engine();
        to_rebooting(&mut e);
        e.step(Input::Booted { booted: Slot::B, default: Slot::A, trial: Some(Slot::B) }, false);
        let a = e.step(Input::Booted { booted: Slot::A, default: Slot::A, trial: None }, false);
        assert_eq!(reports(&a), vec![(Status::RolledBack, code::POWER_LOST.into())]);
        assert_eq!(e.running.version, "2.3.1");
    }

    #[test]
    fn an_agent_restart_on_the_trial_slot_checks_again_and_a_finished_commit_is_recognised() {
        let mut e = engine();
        to_rebooting(&mut e);
        e.step(Input::Booted { booted: Slot::B, default: Slot::A, trial: Some(Slot::B) }, false);
        let a = e.step(Input::Booted { booted: Slot::B, default: Slot::A, trial: None }, false);
        assert_eq!(a, vec![Action::HealthCheck]);
        e.step(Input::HealthChecked(Ok(())), false);
        // Power lost after the bootloader's default changed, before CommitDone.
        let a = e.step(Input::Booted { booted: Slot::B, default: Slot::B, trial: None }, false);
        assert_eq!(reports(&a), vec![(Status::Committed, String::new())]);
        assert_eq!(e.committed, Slot::B);
    }

    #[test]
    fn a_second_offer_during_an_update_is_refused_and_a_repeat_is_answered() {
        let mut e = engine();
        e.step(Input::Offer(offer()), false);
        let a = e.step(Input::Offer(offer()), false);
        assert_eq!(reports(&a), vec![(Status::Downloading, String::new())]);
        assert!(without_reports(a).is_empty(), "a repeat starts nothing");
        let a = e.step(Input::Offer(Offer { version: "2.5.0".into(), release_counter: 9, ..offer() }), false);
        assert_eq!(reports(&a), vec![(Status::Refused, code::BUSY.into())]);
    }

    #[test]
    fn cancel_works_until_the_reboot_and_not_after() {
        let mut e = engine();
        e.step(Input::Offer(offer()), false);
        let a = e.step(Input::Cancel, false);
        assert_eq!(reports(&a), vec![(Status::Cancelled, String::new())]);
        to_rebooting(&mut e);
        let a = e.step(Input::Cancel, false);
        assert_eq!(reports(&a), vec![(Status::Rebooting, code::NOT_READY.into())]);
        assert!(e.job.is_some());
    }

    #[test]
    fn downloads_resume_and_fail_after_the_last_attempt() {
        let mut e = engine();
        e.step(Input::Offer(offer()), false);
        for _ in 1..MAX_DOWNLOAD_ATTEMPTS {
            let a = e.step(Input::DownloadFailed { reason: "connection reset".into() }, false);
            assert_eq!(without_reports(a), vec![Action::Download]);
        }
        let a = e.step(Input::DownloadFailed { reason: "connection reset".into() }, false);
        assert_eq!(reports(&a), vec![(Status::Failed, code::DOWNLOAD_FAILED.into())]);
    }

    #[test]
    fn the_engine_survives_serialisation_in_every_phase() {
        let mut e = engine();
        to_rebooting(&mut e);
        let json = serde_json::to_string(&e).unwrap();
        let back: Engine = serde_json::from_str(&json).unwrap();
        assert_eq!(back, e);
    }
}
