//! Getting released recipes, and the trust root versions that vouch for their
//! signers, to devices, and recording what each device answered.
//!
//! A release sends the version to every targeted device that is connected; a device
//! that connects later (or enrolls after the release) gets, right after its birth,
//! the trust root versions newer than the one it reports and every version still
//! waiting for its answer. A device's answer is stored before its MQTT message is
//! acknowledged; a refusal is audited with the device's reason.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use nanofleet_proto::Message as _;
use nanofleet_proto::device::v1::{
    Ack, AckResult, AckSubject, DeviceState, Envelope, Recipe, RecipeDelivery, Targets, TrustRootUpdate,
};
use nanofleet_proto::topics::Command;
use nanofleet_store::{AuditEntry, DeliveryRecord, Store};
use tokio::sync::{mpsc, oneshot};

use crate::Batches;
use crate::recipes::Released;
use crate::{Actor, Error, Recipes, now_ms};

/// Sends a command to a connected device; returns whether it reached the device's
/// subscription (false when the device is offline).
#[tonic::async_trait]
pub trait CommandSink: Send + Sync + 'static {
    async fn send(&self, device_id: &str, command: Command, payload: Vec<u8>) -> bool;
}

enum Job {
    Birth {
        device_id: String,
        root_version: u64,
    },
    /// Sends a command to each device (after the trust root versions it lacks);
    /// answers how many were reached.
    Send {
        devices: Arc<Vec<String>>,
        command: Command,
        payload: Arc<Vec<u8>>,
        done: Option<oneshot::Sender<usize>>,
    },
}

/// The delivery service; cheap to clone. Hand it to ingest as its
/// [`nanofleet_ingest::Commands`].
#[derive(Clone)]
pub struct Deliveries {
    store: Store,
    jobs: mpsc::UnboundedSender<Job>,
    answers: mpsc::Sender<Answer>,
    /// The trust root version each connected device holds, as it last said.
    roots: Arc<Mutex<HashMap<String, u64>>>,
}

impl std::fmt::Debug for Deliveries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliveries").finish_non_exhaustive()
    }
}

impl Deliveries {
    /// Starts the delivery task; it ends when every handle is dropped.
    pub fn start(store: Store, recipes: Recipes, sink: Arc<dyn CommandSink>) -> Deliveries {
        let (jobs, rx) = mpsc::unbounded_channel();
        let roots = Arc::new(Mutex::new(HashMap::new()));
        let worker = Worker {
            store: store.clone(),
            recipes: recipes.clone(),
            sink,
            roots: roots.clone(),
            cache: HashMap::new(),
            released: None,
        };
        tokio::spawn(worker.run(rx, recipes.subscribe()));
        let (answers, answers_rx) = mpsc::channel(ANSWER_QUEUE);
        tokio::spawn(record_answers(store.clone(), answers_rx));
        Deliveries { store, jobs, answers, roots }
    }

    /// Sends `payload` to every device in `devices` that is connected, each after the
    /// trust root versions it lacks, in order with what the worker sends at births.
    /// Returns how many devices it reached.
    pub async fn fan_out(&self, devices: Arc<Vec<String>>, command: Command, payload: Arc<Vec<u8>>) -> usize {
        let (done, reached) = oneshot::channel();
        if self.jobs.send(Job::Send { devices, command, payload, done: Some(done) }).is_err() {
            return 0;
        }
        reached.await.unwrap_or(0)
    }

    /// Queues `payload` for one device, behind its birth's trust root versions.
    pub fn send_later(&self, device_id: &str, command: Command, payload: Arc<Vec<u8>>) {
        let _ = self.jobs.send(Job::Send {
            devices: Arc::new(vec![device_id.to_owned()]),
            command,
            payload,
            done: None,
        });
    }

    /// The trust root version `device_id` said it holds (at its birth or in an
    /// answer since); `None` when it has not said since this server started.
    pub fn root_version(&self, device_id: &str) -> Option<u64> {
        self.roots.lock().unwrap_or_else(|p| p.into_inner()).get(device_id).copied()
    }
}

/// A device's answer waiting to be stored, and who waits for it.
type Answer = (DeliveryRecord, Option<AuditEntry>, oneshot::Sender<Result<(), String>>);

/// Answers waiting for storage before devices are slowed down, and most in one commit.
const ANSWER_QUEUE: usize = 20_000;
const ANSWER_BATCH: usize = 2_000;

/// Stores answers in group commits: the thousands of answers to one release arrive
/// within a second, and one transaction each would take tens of seconds.
async fn record_answers(store: Store, mut rx: mpsc::Receiver<Answer>) {
    let mut buf = Vec::with_capacity(ANSWER_BATCH);
    while rx.recv_many(&mut buf, ANSWER_BATCH).await > 0 {
        // One row per device and version: the newest answer wins.
        let mut rows: Vec<(DeliveryRecord, Option<AuditEntry>)> = Vec::with_capacity(buf.len());
        let mut index = HashMap::new();
        let mut waiting = Vec::with_capacity(buf.len());
        for (d, audit, done) in buf.drain(..) {
            waiting.push(done);
            let key = (d.device_id.clone(), d.recipe_id.clone(), d.version);
            match index.get(&key) {
                Some(&i) => {
                    let (_, kept): &mut (DeliveryRecord, Option<AuditEntry>) = &mut rows[i];
                    let audit = audit.or(kept.take());
                    rows[i] = (d, audit);
                }
                None => {
                    index.insert(key, rows.len());
                    rows.push((d, audit));
                }
            }
        }
        let result = store.record_delivery_answers(&rows).await.map_err(|e| e.to_string());
        if let Err(e) = &result {
            tracing::warn!(error = %e, answers = rows.len(), "device answers not stored; devices get the recipe again");
        }
        for done in waiting {
            let _ = done.send(result.clone());
        }
    }
}

/// What ingest hands devices' answers, births and batch records to: recipe and trust
/// root answers go to [`Deliveries`], run answers and batch records to [`Batches`].
#[derive(Debug, Clone)]
pub struct DeviceCommands {
    pub deliveries: Deliveries,
    pub batches: Batches,
    pub rollouts: crate::Rollouts,
    pub inventory: crate::Inventory,
}

#[tonic::async_trait]
impl nanofleet_ingest::Commands for DeviceCommands {
    async fn answered(&self, device_id: &str, ack: Ack) -> Result<(), String> {
        if ack.subject == AckSubject::Run as i32 {
            self.batches.run_answered(device_id, ack).await
        } else if ack.subject == AckSubject::DenyList as i32 {
            self.inventory.answered(device_id, ack).await
        } else {
            self.deliveries.answered(device_id, ack).await
        }
    }

    fn born(&self, state: &DeviceState) {
        self.deliveries.born(state);
        self.inventory.born(&state.device_id, state.deny_list_version);
        self.rollouts.born(state);
    }

    async fn update_reported(
        &self,
        device_id: &str,
        report: nanofleet_proto::device::v1::UpdateReport,
    ) -> Result<(), String> {
        self.rollouts.reported(device_id, report).await
    }

    async fn cartridges_loaded(
        &self,
        device_id: &str,
        loads: &[(i64, nanofleet_proto::device::v1::CartridgeLoad)],
    ) -> Result<(), String> {
        for (at_ms, load) in loads {
            self.inventory.loaded(device_id, *at_ms, load).await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    async fn recorded(&self, device_id: &str, payload: &[u8]) -> Result<(), nanofleet_ingest::RecordError> {
        let used = self.batches.recorded(device_id, payload).await?;
        // The record is stored; its cartridge's consumption follows it, and a failure
        // here does not make the device send the record again (the next start catches
        // it up).
        if let Some(u) = used
            && let Err(e) = self.inventory.consumed(&u).await
        {
            tracing::warn!(device_id, batch_id = %u.batch_id, error = %e, "cartridge consumption not recorded");
        }
        Ok(())
    }
}

impl Deliveries {
    /// Stores a device's answer about a recipe or trust root version.
    pub async fn answered(&self, device_id: &str, ack: Ack) -> Result<(), String> {
        let accepted = ack.result == AckResult::Accepted as i32;
        match AckSubject::try_from(ack.subject).unwrap_or(AckSubject::Unspecified) {
            AckSubject::TrustRoot => {
                if accepted {
                    self.roots
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(device_id.to_owned(), ack.version);
                } else {
                    let audit = refusal_audit(
                        device_id,
                        "trust-root.refused",
                        format!("trust root v{}", ack.version),
                        &ack,
                    );
                    self.store.audit_only(&audit).await.map_err(|e| e.to_string())?;
                    tracing::warn!(device_id, code = %ack.code, reason = %ack.reason, "device refused a trust root update");
                }
                Ok(())
            }
            AckSubject::Recipe => {
                if ack.subject_id.is_empty() || ack.version == 0 {
                    // Refused before the recipe could be read (malformed, oversized):
                    // nothing to attach it to but the audit trail.
                    let audit = refusal_audit(device_id, "recipe.refused", "unreadable recipe".into(), &ack);
                    return self.store.audit_only(&audit).await.map_err(|e| e.to_string());
                }
                let version = i64::try_from(ack.version).unwrap_or(i64::MAX);
                let record = DeliveryRecord {
                    device_id: device_id.to_owned(),
                    site_id: String::new(),
                    recipe_id: ack.subject_id.clone(),
                    version,
                    state: if accepted { "accepted" } else { "refused" }.into(),
                    code: ack.code.clone(),
                    reason: ack.reason.clone(),
                    sent_ms: 0,
                    answered_ms: now_ms(),
                };
                let audit = (!accepted).then(|| {
                    refusal_audit(
                        device_id,
                        "recipe.refused",
                        format!("{} v{}", ack.subject_id, ack.version),
                        &ack,
                    )
                });
                if !accepted {
                    tracing::warn!(device_id, recipe = %ack.subject_id, version = ack.version, code = %ack.code, reason = %ack.reason, "device refused a recipe");
                }
                let (done, stored) = oneshot::channel();
                self.answers.send((record, audit, done)).await.map_err(|_| "shutting down".to_owned())?;
                stored.await.map_err(|_| "shutting down".to_owned())?
            }
            AckSubject::Unspecified | AckSubject::Run | AckSubject::DenyList => {
                Err(format!("ack subject {} is not a recipe or a trust root", ack.subject))
            }
        }
    }

    /// A device came online: it gets what it lacks.
    pub fn born(&self, state: &DeviceState) {
        self.roots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(state.device_id.clone(), state.trust_root_version);
        let _ = self
            .jobs
            .send(Job::Birth { device_id: state.device_id.clone(), root_version: state.trust_root_version });
    }
}

fn refusal_audit(device_id: &str, action: &str, subject: String, ack: &Ack) -> AuditEntry {
    AuditEntry {
        at_ms: now_ms(),
        actor: Actor::device(device_id).0,
        action: action.into(),
        subject,
        site_id: None,
        reason: format!("{}: {}", ack.code, ack.reason),
        old_value: None,
        new_value: Some(serde_json::json!({"code": ack.code, "digest": ack.digest}).to_string()),
    }
}

struct Worker {
    store: Store,
    recipes: Recipes,
    sink: Arc<dyn CommandSink>,
    roots: Arc<Mutex<HashMap<String, u64>>>,
    /// Encoded deliveries of released versions (immutable once released).
    cache: HashMap<(String, i64), Arc<Vec<u8>>>,
    /// The newest released version of each recipe, with its targets, and when it was
    /// read; cleared by a release here, and read again after a few seconds for the
    /// releases of other servers sharing the database.
    released: Option<(std::time::Instant, Arc<Vec<NewestRelease>>)>,
}

/// A recipe id, its newest released version and that version's targets.
type NewestRelease = (String, i64, Targets);

/// How long the list of released versions is reused between births.
const RELEASED_FRESH: std::time::Duration = std::time::Duration::from_secs(5);

impl Worker {
    async fn run(
        mut self,
        mut jobs: mpsc::UnboundedReceiver<Job>,
        mut released: tokio::sync::broadcast::Receiver<Released>,
    ) {
        loop {
            let result = tokio::select! {
                job = jobs.recv() => match job {
                    Some(Job::Birth { device_id, root_version }) => self.birth(&device_id, root_version).await,
                    Some(Job::Send { devices, command, payload, done }) => {
                        let reached = self.send_all(&devices, command, &payload).await;
                        if let Some(done) = done {
                            let _ = done.send(reached.as_ref().map_or(0, Vec::len));
                        }
                        reached.map(|_| ())
                    }
                    None => break,
                },
                r = released.recv() => match r {
                    Ok(r) => {
                        self.released = None;
                        self.release(&r).await
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        self.released = None;
                        tracing::warn!(missed = n, "releases missed; devices get them at their next connection");
                        Ok(())
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                },
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "recipe delivery failed; retried at the device's next connection");
            }
        }
    }

    async fn delivery(&mut self, recipe_id: &str, version: i64) -> Result<Arc<Vec<u8>>, Error> {
        if let Some(d) = self.cache.get(&(recipe_id.to_owned(), version)) {
            return Ok(d.clone());
        }
        let statements = self
            .store
            .recipe_signatures(recipe_id, version)
            .await?
            .iter()
            .map(|s| Envelope::decode(s.envelope.as_slice()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Unavailable(format!("stored signature does not decode: {e}")))?;
        let bytes = Arc::new(RecipeDelivery { statements }.encode_to_vec());
        self.cache.insert((recipe_id.to_owned(), version), bytes.clone());
        Ok(bytes)
    }

    /// Sends the trust root versions a device lacks.
    async fn roots_for(&self, device_id: &str, has: u64) -> Result<(), Error> {
        let current = self.recipes.trust_root().await.signed.version;
        if has >= current {
            return Ok(());
        }
        let documents = self.store.trust_roots_after(i64::try_from(has).unwrap_or(i64::MAX)).await?;
        if !documents.is_empty() {
            self.sink
                .send(device_id, Command::TrustRoot, TrustRootUpdate { documents }.encode_to_vec())
                .await;
        }
        Ok(())
    }

    async fn send_recipe(&mut self, device_id: &str, recipe_id: &str, version: i64) -> Result<(), Error> {
        let payload = self.delivery(recipe_id, version).await?;
        if self.sink.send(device_id, Command::Recipe, payload.to_vec()).await {
            self.store.mark_delivery_sent(device_id, recipe_id, version, now_ms()).await?;
        }
        Ok(())
    }

    async fn birth(&mut self, device_id: &str, root_version: u64) -> Result<(), Error> {
        if root_version == 0 {
            // A device without a recipe book (an old agent): nothing it could verify.
            return Ok(());
        }
        self.roots_for(device_id, root_version).await?;
        // Released versions that target it but were never offered (it enrolled later).
        if let Some(device) = self.store.get_device(device_id).await? {
            for (recipe_id, version, targets) in self.newest_released().await?.iter() {
                if targets.site_ids.contains(&device.site_id)
                    || targets.device_ids.iter().any(|d| d == device_id)
                {
                    self.store.ensure_delivery(device_id, recipe_id, *version).await?;
                }
            }
        }
        for (recipe_id, version) in self.store.pending_deliveries(device_id).await? {
            self.send_recipe(device_id, &recipe_id, version).await?;
        }
        Ok(())
    }

    /// The newest released version of each recipe and its targets, kept for a few
    /// seconds: a fleet reconnecting at once asks for it per device.
    async fn newest_released(&mut self) -> Result<Arc<Vec<NewestRelease>>, Error> {
        if let Some((read, cached)) = &self.released
            && read.elapsed() < RELEASED_FRESH
        {
            return Ok(cached.clone());
        }
        let mut newest: Vec<NewestRelease> = Vec::new();
        for rec in self.store.list_recipes("", "released").await? {
            let Ok(recipe) = Recipe::decode(rec.body.as_slice()) else { continue };
            match newest.iter_mut().find(|(id, ..)| *id == rec.recipe_id) {
                Some(kept) if kept.1 >= rec.version => {}
                Some(kept) => {
                    *kept = (rec.recipe_id.clone(), rec.version, recipe.targets.unwrap_or_default())
                }
                None => newest.push((rec.recipe_id.clone(), rec.version, recipe.targets.unwrap_or_default())),
            }
        }
        let newest = Arc::new(newest);
        self.released = Some((std::time::Instant::now(), newest.clone()));
        Ok(newest)
    }

    async fn release(&mut self, r: &Released) -> Result<(), Error> {
        let devices = r.devices.clone();
        tracing::info!(recipe = %r.recipe_id, version = r.version, devices = devices.len(), "delivering a released recipe");
        let payload = self.delivery(&r.recipe_id, r.version).await?;
        let reached = self.send_all(&devices, Command::Recipe, &payload).await?;
        self.store.record_release_sends(&r.recipe_id, r.version, &devices, &reached, now_ms()).await?;
        tracing::info!(recipe = %r.recipe_id, version = r.version, devices = reached.len(), "released recipe sent");
        Ok(())
    }

    /// Sends `payload` to each connected device, after the trust root versions it
    /// lacks; returns the devices reached. Devices not seen since this server started
    /// get everything at their birth.
    async fn send_all(
        &mut self,
        devices: &[String],
        command: Command,
        payload: &[u8],
    ) -> Result<Vec<String>, Error> {
        let current = self.recipes.trust_root().await.signed.version;
        // The trust root versions each device lacks, encoded once per version it holds.
        let mut updates: HashMap<u64, Vec<u8>> = HashMap::new();
        let mut reached = Vec::with_capacity(devices.len());
        for device_id in devices {
            let has = self.roots.lock().unwrap_or_else(|p| p.into_inner()).get(device_id).copied();
            // Devices not seen since this server started get everything at their birth.
            let Some(has) = has else { continue };
            if has < current {
                let update = match updates.entry(has) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        let after = i64::try_from(has).unwrap_or(i64::MAX);
                        let documents = self.store.trust_roots_after(after).await?;
                        e.insert(TrustRootUpdate { documents }.encode_to_vec())
                    }
                };
                self.sink.send(device_id, Command::TrustRoot, update.clone()).await;
            }
            if self.sink.send(device_id, command, payload.to_vec()).await {
                reached.push(device_id.clone());
            }
        }
        Ok(reached)
    }
}
