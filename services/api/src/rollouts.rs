//! Firmware rollouts: the edge around [`nanofleet_rollout::Rollout`]. Transport-free,
//! like [`crate::Fleet`].
//!
//! Rollouts under way live in memory and are written to the database (one JSON
//! document each, with the audit records of their decisions) by the scheduler, once a
//! second when they changed; a restarted server loads them and carries on. The
//! scheduler ticks each running rollout, sends the offers it decides on (signed by
//! the online key, on `nf/v1/{device}/cmd/update`), runs the health gate through the
//! monitoring service's cohort comparison, and audits every wave, pause and end.
//! Devices' reports arrive through ingest ([`Rollouts::reported`]) and change only
//! memory, so thousands a second cost a map update each.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nanofleet_proto::Message as _;
use nanofleet_proto::device::v1::{
    DeviceState, UpdateAction, UpdateCommand, UpdateOffer, UpdateReport, UpdateStatus, update_command,
};
use nanofleet_proto::topics::Command;
use nanofleet_proto::v1 as pb;
use nanofleet_rollout::{
    ActionType, Decision, Device, Filter, Outcome, Rollout, Spec, State, Status, Verdict, Waves,
};
use nanofleet_store::{AuditEntry, RolloutRow, Store};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{Caller, CommandSink, Deliveries, Error, Firmware, Monitoring, Recipes, Role, now_ms};

/// How often the scheduler ticks.
pub const TICK: Duration = Duration::from_secs(1);

struct Entry {
    rollout: Rollout,
    /// Changed since it was last written.
    dirty: bool,
    /// Audit records of decisions not written yet.
    audit: Vec<AuditEntry>,
    /// A health gate under way (not asked again until answered).
    gate_running: bool,
}

struct Inner {
    store: Store,
    firmware: Firmware,
    recipes: Recipes,
    monitoring: Monitoring,
    deliveries: Deliveries,
    sink: Arc<dyn CommandSink>,
    /// `https://host:port` devices fetch firmware from.
    base_url: String,
    rollouts: Mutex<HashMap<String, Entry>>,
    /// Bumped after every tick that changed something (for watchers).
    changed: watch::Sender<u64>,
}

/// Rollouts; cheap to clone.
#[derive(Clone)]
pub struct Rollouts(Arc<Inner>);

impl std::fmt::Debug for Rollouts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rollouts").field("base_url", &self.0.base_url).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Rollouts {
    /// Loads the rollouts that were running or paused.
    pub async fn open(
        store: Store,
        firmware: Firmware,
        recipes: Recipes,
        monitoring: Monitoring,
        deliveries: Deliveries,
        sink: Arc<dyn CommandSink>,
        base_url: String,
    ) -> Result<Rollouts, Error> {
        let mut map = HashMap::new();
        for row in store.rollouts(&["running", "paused"]).await? {
            match serde_json::from_str::<Rollout>(&row.document) {
                Ok(r) => {
                    map.insert(
                        row.id.clone(),
                        Entry { rollout: r, dirty: false, audit: Vec::new(), gate_running: false },
                    );
                }
                Err(e) => {
                    tracing::error!(rollout = %row.id, error = %e, "stored rollout unreadable; left alone")
                }
            }
        }
        if !map.is_empty() {
            tracing::info!(rollouts = map.len(), "rollouts under way loaded");
        }
        let (changed, _) = watch::channel(0);
        Ok(Rollouts(Arc::new(Inner {
            store,
            firmware,
            recipes,
            monitoring,
            deliveries,
            sink,
            base_url,
            rollouts: Mutex::new(map),
            changed,
        })))
    }

    /// Starts a rollout of a released image.
    pub async fn create(&self, caller: &Caller, req: pb::CreateRolloutRequest) -> Result<pb::Rollout, Error> {
        let pb::CreateRolloutRequest {
            target,
            filter,
            waves,
            success_threshold_pct,
            error_threshold_pct,
            action,
            device_timeout_seconds,
            max_attempts,
            health_watch_seconds,
            rollback_on_regression,
            reason,
        } = req;
        if reason.trim().is_empty() {
            return Err(Error::invalid("reason", "", "why this rollout, in words (for the audit chain)"));
        }
        let release = self
            .0
            .firmware
            .list("")?
            .into_iter()
            .find(|r| r.target == target)
            .ok_or_else(|| Error::NotFound { what: "firmware release", id: target.clone() })?;
        let pb::RolloutFilter { site_ids, models, from_versions, tags, device_ids } =
            filter.unwrap_or_default();
        let mut models = models;
        if models.is_empty() {
            models.push(release.model.clone());
        } else if models.iter().any(|m| *m != release.model) {
            return Err(Error::invalid(
                "filter.models",
                models.join(","),
                format!("{} only: the release is built for it", release.model),
            ));
        }
        let pb::WavePlan { canary, percent_steps, exponential_first, exponential_factor } =
            waves.unwrap_or_default();
        let waves = if exponential_first > 0 {
            Waves::Exponential { canary, first: exponential_first, factor: exponential_factor }
        } else if percent_steps.is_empty() {
            Waves::Percent { canary, steps: vec![100] }
        } else {
            Waves::Percent { canary, steps: percent_steps }
        };
        let action = match UpdateAction::try_from(action).unwrap_or(UpdateAction::Unspecified) {
            UpdateAction::Unspecified | UpdateAction::Soft => ActionType::Soft,
            UpdateAction::Forced => ActionType::Forced,
            UpdateAction::DownloadOnly => ActionType::DownloadOnly,
        };
        let or = |v: u32, d: u32| if v == 0 { d } else { v };
        let spec = Spec {
            target: release.target.clone(),
            model: release.model.clone(),
            version: release.version.clone(),
            release_counter: release.release_counter,
            sha256: release.sha256.clone(),
            length: release.length,
            filter: Filter { sites: site_ids, models, from_versions, tags, devices: device_ids },
            waves,
            success_threshold_pct: or(success_threshold_pct, 90),
            error_threshold_pct: or(error_threshold_pct, 10),
            action,
            device_timeout_ms: if device_timeout_seconds == 0 {
                2 * 3_600_000
            } else {
                device_timeout_seconds.saturating_mul(1000)
            },
            max_attempts: or(max_attempts, 2),
            health_watch_ms: health_watch_seconds.saturating_mul(1000),
            rollback_on_regression,
        };
        let devices = self.devices().await?;
        let id = format!("ro-{}", hex::encode(rand::random::<[u8; 5]>()));
        let now = now_ms();
        let rollout = Rollout::new(&id, spec, &devices, now)
            .map_err(|e| Error::invalid(e.field, e.value, e.allowed))?;
        let audit = entry(
            &caller.actor().0,
            "rollout.create",
            &rollout,
            reason,
            serde_json::json!({
                "target": rollout.spec.target,
                "devices": rollout.members.len(),
                "waves": rollout.waves,
                "action": rollout.spec.action.as_str(),
            }),
        );
        self.write(&rollout, &[audit]).await?;
        tracing::info!(rollout = %id, target = %rollout.spec.target, devices = rollout.members.len(), by = %caller.person_id, "rollout created");
        let out = summary(&rollout, true);
        lock(&self.0.rollouts)
            .insert(id, Entry { rollout, dirty: false, audit: Vec::new(), gate_running: false });
        Ok(out)
    }

    /// One rollout; with its devices when `devices`.
    pub async fn get(&self, id: &str, devices: bool) -> Result<pb::Rollout, Error> {
        if let Some(e) = lock(&self.0.rollouts).get(id) {
            return Ok(summary(&e.rollout, devices));
        }
        let row = self
            .0
            .store
            .get_rollout(id)
            .await?
            .ok_or_else(|| Error::NotFound { what: "rollout", id: id.into() })?;
        Ok(summary(&parse(&row)?, devices))
    }

    pub async fn list(&self, state: &str) -> Result<Vec<pb::Rollout>, Error> {
        if !state.is_empty() && State::parse(state).is_none() {
            return Err(Error::invalid("state", state, "running, paused, completed or cancelled, or empty"));
        }
        let states: Vec<&str> = if state.is_empty() { Vec::new() } else { vec![state] };
        let rows = self.0.store.rollouts(&states).await?;
        let live = lock(&self.0.rollouts);
        rows.iter()
            .map(|row| match live.get(&row.id) {
                Some(e) => Ok(summary(&e.rollout, false)),
                None => parse(row).map(|r| summary(&r, false)),
            })
            .filter(|r| r.as_ref().map_or(true, |r| state.is_empty() || r.state == state))
            .collect()
    }

    /// Pause, resume or cancel by a person; written at once with its audit record.
    pub async fn control(
        &self,
        caller: &Caller,
        id: &str,
        what: Control,
        reason: &str,
    ) -> Result<pb::Rollout, Error> {
        if reason.trim().is_empty() {
            return Err(Error::invalid("reason", "", "why, in words (for the audit chain)"));
        }
        let now = now_ms();
        let (rollout, decisions, old_state) = {
            let mut map = lock(&self.0.rollouts);
            let e = map.get_mut(id).ok_or_else(|| match what {
                Control::Pause | Control::Resume | Control::Cancel => Error::Conflict(format!(
                    "rollout {id} is not under way (unknown, completed or cancelled)"
                )),
            })?;
            let old = e.rollout.state;
            let decisions = match what {
                Control::Pause => e.rollout.pause_by(reason).map_err(Error::Conflict)?,
                Control::Resume => {
                    e.rollout.resume(now_ms()).map(|()| Vec::new()).map_err(Error::Conflict)?
                }
                Control::Cancel => e.rollout.cancel(reason, now).map_err(Error::Conflict)?,
            };
            e.dirty = false;
            (e.rollout.clone(), decisions, old)
        };
        let action = match what {
            Control::Pause => "rollout.pause",
            Control::Resume => "rollout.resume",
            Control::Cancel => "rollout.cancel",
        };
        let mut audit = entry(
            &caller.actor().0,
            action,
            &rollout,
            reason.into(),
            serde_json::json!({"state": rollout.state.as_str()}),
        );
        audit.old_value = Some(serde_json::json!({"state": old_state.as_str()}).to_string());
        self.write(&rollout, &[audit]).await?;
        self.carry_out(&rollout, decisions).await;
        if matches!(rollout.state, State::Cancelled | State::Completed) {
            lock(&self.0.rollouts).remove(id);
        }
        self.0.changed.send_modify(|v| *v += 1);
        Ok(summary(&rollout, false))
    }

    /// Offers `target` to the devices rollout `id` updated, as a new forced rollout,
    /// and cancels `id` if it is still under way.
    pub async fn rollback(
        &self,
        caller: &Caller,
        id: &str,
        target: &str,
        reason: &str,
    ) -> Result<pb::Rollout, Error> {
        let old = self.get(id, true).await?;
        let updated: Vec<String> = old
            .devices
            .iter()
            .filter(|d| d.status == Status::Committed.as_str())
            .map(|d| d.device_id.clone())
            .collect();
        if updated.is_empty() {
            return Err(Error::Conflict(format!("rollout {id} updated no device: nothing to roll back")));
        }
        if matches!(old.state.as_str(), "running" | "paused") {
            self.control(caller, id, Control::Cancel, &format!("rolled back: {reason}")).await?;
        }
        self.offer_previous(caller, id, target, updated, reason).await
    }

    /// A forced rollout of `target` to `devices`, all at once: a rollback of `id`.
    async fn offer_previous(
        &self,
        caller: &Caller,
        id: &str,
        target: &str,
        devices: Vec<String>,
        reason: &str,
    ) -> Result<pb::Rollout, Error> {
        let req = pb::CreateRolloutRequest {
            target: target.into(),
            filter: Some(pb::RolloutFilter { device_ids: devices, ..Default::default() }),
            waves: Some(pb::WavePlan { percent_steps: vec![100], ..Default::default() }),
            action: UpdateAction::Forced as i32,
            error_threshold_pct: 100,
            reason: format!("rollback of {id}: {reason}"),
            ..Default::default()
        };
        self.create(caller, req).await
    }

    /// A device's report (through ingest).
    pub async fn reported(&self, device_id: &str, report: UpdateReport) -> Result<(), String> {
        let status = match UpdateStatus::try_from(report.status).unwrap_or(UpdateStatus::Unspecified) {
            UpdateStatus::Unspecified => return Ok(()),
            UpdateStatus::Refused => Status::Refused,
            UpdateStatus::Downloading => Status::Downloading,
            UpdateStatus::Downloaded => Status::Downloaded,
            UpdateStatus::Deferred => Status::Deferred,
            UpdateStatus::Installing => Status::Installing,
            UpdateStatus::Rebooting => Status::Rebooting,
            UpdateStatus::Verifying => Status::Verifying,
            UpdateStatus::Committed => Status::Committed,
            UpdateStatus::RolledBack => Status::RolledBack,
            UpdateStatus::Failed => Status::Failed,
            UpdateStatus::Cancelled => Status::Cancelled,
        };
        let mut map = lock(&self.0.rollouts);
        let Some(e) = map.get_mut(&report.rollout_id) else { return Ok(()) };
        let decisions = e.rollout.on_report(device_id, status, &report.code, &report.detail, now_ms());
        e.dirty = true;
        for d in decisions {
            if let Decision::Paused { reason } = d {
                tracing::warn!(rollout = %e.rollout.id, %reason, "rollout paused");
                let a = entry(
                    "system",
                    "rollout.pause",
                    &e.rollout,
                    reason,
                    serde_json::json!({"state": "paused"}),
                );
                e.audit.push(a);
            }
        }
        Ok(())
    }

    /// A device came online: it joins a running rollout it matches, and an offer that
    /// could not reach it before is sent at the next round.
    pub fn born(&self, s: &DeviceState) {
        let by_tag = {
            let map = lock(&self.0.rollouts);
            if map.is_empty() {
                return;
            }
            map.values().any(|e| !e.rollout.spec.filter.tags.is_empty())
        };
        let mut d = Device {
            id: s.device_id.clone(),
            site_id: s.site_id.clone(),
            model: s.model.clone(),
            firmware_version: s.firmware_version.clone(),
            tags: Vec::new(),
        };
        if !by_tag {
            self.join(&d);
            return;
        }
        // Its tags are the cloud's, not in the birth: read only when a rollout asks.
        let me = self.clone();
        tokio::spawn(async move {
            match me.0.store.get_device(&d.id).await {
                Ok(Some(row)) => d.tags = row.tags,
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(device_id = %d.id, error = %e, "device tags not read; matched without them")
                }
            }
            me.join(&d);
        });
    }

    fn join(&self, d: &Device) {
        for e in lock(&self.0.rollouts).values_mut() {
            if e.rollout.join(d) {
                tracing::info!(rollout = %e.rollout.id, device_id = %d.id, "device online: joins the rollout or is offered again");
                e.dirty = true;
            }
        }
    }

    /// Waits until a rollout changed (or `timeout`).
    pub async fn changed(&self, timeout: Duration) {
        let mut rx = self.0.changed.subscribe();
        let _ = tokio::time::timeout(timeout, rx.changed()).await;
    }

    /// Runs the scheduler until `cancel`.
    pub fn spawn_scheduler(&self, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => me.tick().await,
                    _ = cancel.cancelled() => break,
                }
            }
            me.tick().await; // write what changed last
        })
    }

    /// One scheduler round: decide, write, then send.
    pub async fn tick(&self) {
        let now = now_ms();
        if lock(&self.0.rollouts).is_empty() {
            return;
        }
        // Each site's window, in its time zone; a site without one (or unknown) is open.
        let windows: HashMap<String, (String, nanofleet_rollout::window::Windows)> =
            match self.0.store.list_sites().await {
                Ok(sites) => sites
                    .into_iter()
                    .filter_map(|s| Some((s.id, (s.time_zone, s.maintenance_window.parse().ok()?))))
                    .collect(),
                Err(e) => {
                    tracing::warn!(error = %e, "site windows not read; offers wait for the next tick");
                    return;
                }
            };
        let open = |site: &str| match windows.get(site) {
            Some((tz, w)) => w.is_open(now, tz).unwrap_or(true),
            None => true,
        };
        let mut work = Vec::new();
        {
            let mut map = lock(&self.0.rollouts);
            for e in map.values_mut() {
                let decisions = e.rollout.tick(now, &open);
                let mut gates = Vec::new();
                for d in &decisions {
                    match d {
                        Decision::WaveStarted { wave, devices, reason } => {
                            tracing::info!(rollout = %e.rollout.id, wave, devices, "wave started");
                            let a = entry(
                                "system",
                                "rollout.wave",
                                &e.rollout,
                                reason.clone(),
                                serde_json::json!({"wave": wave, "devices": devices}),
                            );
                            e.audit.push(a);
                        }
                        Decision::Paused { reason } => {
                            tracing::warn!(rollout = %e.rollout.id, %reason, "rollout paused");
                            let a = entry(
                                "system",
                                "rollout.pause",
                                &e.rollout,
                                reason.clone(),
                                serde_json::json!({"state": "paused"}),
                            );
                            e.audit.push(a);
                        }
                        Decision::Completed => {
                            tracing::info!(rollout = %e.rollout.id, "rollout completed");
                            let counts = e.rollout.counts(None);
                            let a = entry(
                                "system",
                                "rollout.complete",
                                &e.rollout,
                                "every wave done".into(),
                                serde_json::json!({"committed": counts.get(&Status::Committed).copied().unwrap_or(0)}),
                            );
                            e.audit.push(a);
                        }
                        Decision::CheckHealth { wave } if !e.gate_running => {
                            e.gate_running = true;
                            gates.push(*wave);
                        }
                        _ => {}
                    }
                }
                if !decisions.is_empty() {
                    e.dirty = true;
                }
                if e.dirty || !e.audit.is_empty() {
                    work.push((e.rollout.clone(), std::mem::take(&mut e.audit), decisions, gates));
                    e.dirty = false;
                } else if !gates.is_empty() {
                    work.push((e.rollout.clone(), Vec::new(), decisions, gates));
                }
            }
        }
        if work.is_empty() {
            return;
        }
        for (rollout, audit, decisions, gates) in work {
            if let Err(e) = self.write(&rollout, &audit).await {
                tracing::warn!(rollout = %rollout.id, error = %e, "rollout not written; tried again next tick");
                let mut map = lock(&self.0.rollouts);
                if let Some(entry) = map.get_mut(&rollout.id) {
                    entry.dirty = true;
                    let mut back = audit;
                    back.append(&mut entry.audit);
                    entry.audit = back;
                }
                continue;
            }
            self.carry_out(&rollout, decisions).await;
            for wave in gates {
                let me = self.clone();
                let r = rollout.clone();
                tokio::spawn(async move { me.gate(r, wave).await });
            }
            if matches!(rollout.state, State::Completed | State::Cancelled) {
                lock(&self.0.rollouts).remove(&rollout.id);
            }
        }
        self.0.changed.send_modify(|v| *v += 1);
    }

    /// Sends offers and withdrawals (after the decision was written).
    async fn carry_out(&self, rollout: &Rollout, decisions: Vec<Decision>) {
        let mut offers = 0usize;
        let mut unsent = Vec::new();
        // Looked up once for the round: the key, the trust root version, and the root
        // updates by the version a device holds.
        let mut round = None;
        for d in decisions {
            match d {
                Decision::Offer { device_id, attempt } => {
                    match self.offer(rollout, &device_id, &mut round).await {
                        Ok(()) => offers += 1,
                        Err(Error::DeviceUnavailable(_)) => unsent.push(device_id),
                        Err(e) => {
                            tracing::warn!(rollout = %rollout.id, %device_id, attempt, error = %e, "offer not sent; retried after the device timeout")
                        }
                    }
                }
                Decision::Withdraw { device_id } => {
                    let cmd = UpdateCommand {
                        command: Some(update_command::Command::WithdrawRolloutId(rollout.id.clone())),
                    };
                    self.0.sink.send(&device_id, Command::Update, cmd.encode_to_vec()).await;
                }
                _ => {}
            }
        }
        if offers > 0 {
            tracing::info!(rollout = %rollout.id, offers, "offers sent");
        }
        if !unsent.is_empty() {
            // Offered again when they come online (their birth).
            tracing::info!(rollout = %rollout.id, devices = unsent.len(), "devices offline; offered when they connect");
            let mut map = lock(&self.0.rollouts);
            if let Some(e) = map.get_mut(&rollout.id) {
                for id in &unsent {
                    e.rollout.unsent(id);
                }
                e.dirty = true;
            }
        }
    }

    async fn offer(
        &self,
        rollout: &Rollout,
        device_id: &str,
        round: &mut Option<Round>,
    ) -> Result<(), Error> {
        if round.is_none() {
            *round = Some(Round {
                key: self.0.recipes.online_key().await?,
                root_version: self.0.recipes.trust_root().await.signed.version,
                updates: HashMap::new(),
            });
        }
        let Some(r) = round.as_mut() else { return Ok(()) };
        // The device checks the offer and the release against its trust root: it
        // needs the versions that added the director and firmware keys first (sent
        // on the same connection, so they arrive before the offer).
        let has = self.0.deliveries.root_version(device_id).unwrap_or(0);
        if has < r.root_version {
            let update = match r.updates.get(&has) {
                Some(u) => u.clone(),
                None => {
                    let documents = self.0.store.trust_roots_after(i64::try_from(has).unwrap_or(0)).await?;
                    let u =
                        Arc::new(nanofleet_proto::device::v1::TrustRootUpdate { documents }.encode_to_vec());
                    r.updates.insert(has, u.clone());
                    u
                }
            };
            self.0.sink.send(device_id, Command::TrustRoot, update.to_vec()).await;
        }
        let key = &r.key;
        let now = now_ms();
        let s = &rollout.spec;
        let offer = UpdateOffer {
            rollout_id: rollout.id.clone(),
            device_id: device_id.into(),
            target: s.target.clone(),
            model: s.model.clone(),
            version: s.version.clone(),
            release_counter: s.release_counter,
            sha256: s.sha256.clone(),
            length: s.length,
            action: match s.action {
                ActionType::Soft => UpdateAction::Soft,
                ActionType::Forced => UpdateAction::Forced,
                ActionType::DownloadOnly => UpdateAction::DownloadOnly,
            } as i32,
            metadata_url: format!("{}/firmware/metadata/", self.0.base_url),
            targets_url: format!("{}/firmware/targets/", self.0.base_url),
            issued_unix_ms: now,
            expires_unix_ms: now + s.device_timeout_ms,
        };
        let envelope = nanofleet_recipe::dsse::sign(
            nanofleet_recipe::dsse::FIRMWARE_PAYLOAD_TYPE,
            &offer.encode_to_vec(),
            key,
        );
        let cmd = UpdateCommand { command: Some(update_command::Command::Offer(envelope)) };
        if self.0.sink.send(device_id, Command::Update, cmd.encode_to_vec()).await {
            Ok(())
        } else {
            Err(Error::DeviceUnavailable(format!("device {device_id} is not connected")))
        }
    }

    /// The health gate: the devices this rollout updated against those of its filter
    /// still on another version, over the batches since the rollout started.
    async fn gate(&self, rollout: Rollout, wave: u32) {
        let system = Caller {
            person_id: "system".into(),
            display_name: "rollout scheduler".into(),
            role: Role::Ops,
            site_id: None,
            credential_id: String::new(),
        };
        let updated = rollout.updated_devices();
        let others: Vec<String> = rollout
            .members
            .values()
            .filter(|m| m.status != Status::Committed)
            .map(|m| m.device_id.clone())
            .collect();
        let since = rollout.created_ms;
        let req = pb::CompareCohortsRequest {
            cohort_a: Some(pb::BatchSelection {
                device_ids: updated.clone(),
                firmware_versions: vec![rollout.spec.version.clone()],
                since_unix_ms: since,
                ..Default::default()
            }),
            cohort_b: Some(pb::BatchSelection {
                device_ids: others,
                since_unix_ms: since,
                ..Default::default()
            }),
            ..Default::default()
        };
        let verdict = match self.0.monitoring.compare_cohorts(&system, req).await {
            Ok(r) => Verdict {
                outcome: match pb::Verdict::try_from(r.verdict).unwrap_or(pb::Verdict::Unspecified) {
                    pb::Verdict::Regressed => Outcome::Regressed,
                    pb::Verdict::NoRegression => Outcome::Passed,
                    pb::Verdict::InsufficientData | pb::Verdict::Unspecified => Outcome::Insufficient,
                },
                evidence: format!("{} ({} batches updated, {} not)", r.summary, r.batches_a, r.batches_b),
            },
            Err(e) => {
                Verdict { outcome: Outcome::Insufficient, evidence: format!("gate not evaluated: {e}") }
            }
        };
        let now = now_ms();
        let rollback = {
            let mut map = lock(&self.0.rollouts);
            let Some(e) = map.get_mut(&rollout.id) else { return };
            e.gate_running = false;
            let decisions = e.rollout.on_health(wave, &verdict, now);
            let outcome = verdict.outcome.as_str();
            tracing::info!(rollout = %rollout.id, wave, outcome, evidence = %verdict.evidence, "health gate");
            let a = entry(
                "system",
                &format!("rollout.health-gate.{outcome}"),
                &e.rollout,
                verdict.evidence.clone(),
                serde_json::json!({"wave": wave, "updated": updated.len(), "state": e.rollout.state.as_str()}),
            );
            e.audit.push(a);
            e.dirty = true;
            // Waves and offers go out at the next tick; a rollback is a rollout of its own.
            decisions.into_iter().find_map(|d| match d {
                Decision::RollBack { devices_by_version } => Some(devices_by_version),
                _ => None,
            })
        };
        if let Some(groups) = rollback {
            self.roll_back_regression(&system, &rollout, groups, &verdict.evidence).await;
        }
    }

    /// After a regression, with `rollback_on_regression`: offers each updated device
    /// the release it ran before, as forced rollouts; audits what could not be.
    async fn roll_back_regression(
        &self,
        system: &Caller,
        rollout: &Rollout,
        groups: std::collections::BTreeMap<String, Vec<String>>,
        evidence: &str,
    ) {
        let releases = self.0.firmware.list("").unwrap_or_default();
        for (version, devices) in groups {
            let release = releases
                .iter()
                .find(|r| r.model == rollout.spec.model && r.version == version && !version.is_empty());
            let (action, detail) = match release {
                Some(release) => {
                    let reason = format!("health gate regression: {evidence}");
                    match self
                        .offer_previous(system, &rollout.id, &release.target, devices.clone(), &reason)
                        .await
                    {
                        Ok(r) => (
                            "rollout.rollback",
                            format!("{} devices back to {version} in {}", devices.len(), r.rollout_id),
                        ),
                        Err(e) => (
                            "rollout.rollback.failed",
                            format!("{} devices not rolled back to {version}: {e}", devices.len()),
                        ),
                    }
                }
                None => (
                    "rollout.rollback.failed",
                    format!(
                        "{} devices not rolled back: {} {version} was never released here (upload it, then roll back)",
                        devices.len(),
                        rollout.spec.model
                    ),
                ),
            };
            tracing::warn!(rollout = %rollout.id, %detail, "rollback after a regression");
            let mut map = lock(&self.0.rollouts);
            if let Some(e) = map.get_mut(&rollout.id) {
                let a = entry(
                    "system",
                    action,
                    &e.rollout,
                    detail,
                    serde_json::json!({"version": version, "devices": devices}),
                );
                e.audit.push(a);
                e.dirty = true;
            }
        }
    }

    async fn devices(&self) -> Result<Vec<Device>, Error> {
        Ok(self
            .0
            .store
            .list_devices(None)
            .await?
            .into_iter()
            .filter(|d| d.status == "active")
            .map(|d| Device {
                id: d.id,
                site_id: d.site_id,
                model: d.model,
                firmware_version: d.firmware_version,
                tags: d.tags,
            })
            .collect())
    }

    async fn write(&self, r: &Rollout, audit: &[AuditEntry]) -> Result<(), Error> {
        let document =
            serde_json::to_string(r).map_err(|e| Error::Unavailable(format!("rollout {}: {e}", r.id)))?;
        let row = RolloutRow {
            id: r.id.clone(),
            state: r.state.as_str().into(),
            target: r.spec.target.clone(),
            created_ms: r.created_ms,
            updated_ms: now_ms(),
            document,
        };
        self.0.store.save_rollout(&row, audit).await?;
        Ok(())
    }
}

/// What one scheduler round looks up once for all its offers.
struct Round {
    key: ed25519_dalek::SigningKey,
    root_version: u64,
    /// Encoded trust root updates by the version a device holds.
    updates: HashMap<u64, Arc<Vec<u8>>>,
}

/// What a person does to a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Pause,
    Resume,
    Cancel,
}

fn parse(row: &RolloutRow) -> Result<Rollout, Error> {
    serde_json::from_str(&row.document)
        .map_err(|e| Error::Unavailable(format!("stored rollout {}: {e}", row.id)))
}

fn entry(actor: &str, action: &str, r: &Rollout, reason: String, new_value: serde_json::Value) -> AuditEntry {
    AuditEntry {
        at_ms: now_ms(),
        actor: actor.into(),
        action: action.into(),
        subject: format!("{} ({})", r.id, r.spec.target),
        site_id: None,
        reason,
        old_value: None,
        new_value: Some(new_value.to_string()),
    }
}

fn counts_pb(c: &nanofleet_rollout::Counts) -> Vec<pb::StatusCount> {
    c.iter().map(|(s, n)| pb::StatusCount { status: s.as_str().into(), devices: *n as u32 }).collect()
}

/// The API's view of a rollout.
pub fn summary(r: &Rollout, devices: bool) -> pb::Rollout {
    let waves = r.members.values().map(|m| m.wave).max().map_or(0, |w| w + 1);
    pb::Rollout {
        rollout_id: r.id.clone(),
        target: r.spec.target.clone(),
        model: r.spec.model.clone(),
        version: r.spec.version.clone(),
        state: r.state.as_str().into(),
        reason: r.reason.clone(),
        wave: r.wave,
        waves,
        created_unix_ms: r.created_ms,
        action: r.spec.action.as_str().into(),
        success_threshold_pct: r.spec.success_threshold_pct,
        error_threshold_pct: r.spec.error_threshold_pct,
        counts: counts_pb(&r.counts(None)),
        wave_summaries: (0..waves)
            .map(|w| pb::WaveSummary { wave: w, counts: counts_pb(&r.counts(Some(w))) })
            .collect(),
        devices: if devices {
            r.members
                .values()
                .map(|m| pb::RolloutDevice {
                    device_id: m.device_id.clone(),
                    site_id: m.site_id.clone(),
                    wave: m.wave,
                    status: m.status.as_str().into(),
                    attempts: m.attempts,
                    code: m.code.clone(),
                    detail: m.detail.clone(),
                    updated_unix_ms: m.updated_ms,
                    from_version: m.from_version.clone(),
                })
                .collect()
        } else {
            Vec::new()
        },
        health_watch_seconds: r.spec.health_watch_ms / 1000,
        rollback_on_regression: r.spec.rollback_on_regression,
        health_checks: r
            .health
            .iter()
            .map(|h| pb::HealthCheck {
                wave: h.wave,
                at_unix_ms: h.at_ms,
                outcome: h.outcome.as_str().into(),
                evidence: h.evidence.clone(),
            })
            .collect(),
    }
}
