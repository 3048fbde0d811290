//! Runs on the device: the interlocks a run must pass, the record of what the device
//! did, and the batch record it signs at the end.
//!
//! A pharmacist starts a run at the device (or the cloud sends the request on their
//! behalf on `nf/v1/{device}/cmd/run`). [`RunDesk::start`] checks, in this order:
//! the request is complete; it was not answered before (a repeat gets the same
//! answer); no run is under way; the dispensing site is this device's site; the
//! recipe is held, in the version asked for, and its delivery still verifies against
//! the pinned trust root now (signatures, roles, validity window, model, firmware,
//! hardware envelope); the cartridge is of the recipe's type, not expired, not on
//! the last deny list received (a recalled lot, a blocked cartridge) and not
//! used before on this device; the prescription is dated before the run. Each
//! refusal answers with a stable code and a reason naming the value and what was
//! allowed.
//!
//! While the run goes, [`RunDesk::observe`] takes every reading: per phase the
//! setpoints and actuals, every alarm raised, the QC results. When the device is idle
//! again the batch record is signed with the device key and kept in the state
//! directory until the cloud acknowledges it, so a record survives a lost connection
//! and an agent restart. A run that an agent restart interrupted is recorded as
//! aborted.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use nanofleet_inventory::denylist::Denied;
use nanofleet_inventory::gs1;
use nanofleet_proto::Message as _;
use nanofleet_proto::device::v1::{
    Ack, AckResult, AckSubject, AlarmPriority, AlarmRecord, BatchRecord, Cartridge, CartridgeLoad, Event,
    Person, PhaseChange, PhaseRecord, Recipe, RecipeDelivery, RunOutcome, RunPhase, RunRequest, event,
};
use nanofleet_recipe::verify::{DeviceContext, verify_delivery};
use rand::Rng;

use crate::hal::{Device, DeviceInfo, QcMeasurement, Reading, RunPlan};
pub use crate::recipes::Error;
use crate::recipes::{HeldRecipe, RecipeBook, io, write_atomic};

/// Refusal codes of a run request (`Ack.code`), besides the recipe verifier's own
/// (`nanofleet_recipe::verify::code`), which a held recipe that no longer verifies
/// answers with.
pub mod code {
    pub const MALFORMED: &str = "malformed";
    pub const INCOMPLETE: &str = "incomplete_request";
    pub const RUN_ACTIVE: &str = "run_active";
    pub const WRONG_SITE: &str = "wrong_site";
    pub const RECIPE_NOT_HELD: &str = "recipe_not_held";
    pub const RECIPE_VERSION: &str = "recipe_version_mismatch";
    pub const CARTRIDGE_WRONG_TYPE: &str = "cartridge_wrong_type";
    pub const CARTRIDGE_EXPIRED: &str = "cartridge_expired";
    pub const CARTRIDGE_USED: &str = "cartridge_used";
    pub const CARTRIDGE_RECALLED: &str = "cartridge_recalled";
    pub const CARTRIDGE_BLOCKED: &str = "cartridge_blocked";
    pub const CARTRIDGE_UNREADABLE: &str = "cartridge_unreadable";
    pub const PRESCRIPTION_NOT_BEFORE_RUN: &str = "prescription_not_before_run";
    pub const DEVICE_REFUSED: &str = "device_refused";
    pub const STORAGE: &str = "storage";
}

/// Longest identifier (request, prescription, patient pseudonym, lot, serial) taken.
pub const MAX_ID_LEN: usize = 64;

/// Requests whose answers are remembered, to answer a repeat the same way.
const REMEMBERED: usize = 256;

/// Events kept for the link to send (cartridge loads); older ones are dropped first.
const MAX_EVENTS: usize = 1_000;

/// The device key and certificate that sign batch records.
pub struct BatchSigner {
    key: aws_lc_rs::signature::EcdsaKeyPair,
    certificate: Vec<u8>,
}

impl std::fmt::Debug for BatchSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchSigner").field("certificate_len", &self.certificate.len()).finish()
    }
}

impl BatchSigner {
    /// The signer of an enrolled device: its key and the first certificate of its chain.
    pub fn from_credentials(c: &crate::enroll::Credentials) -> Result<BatchSigner, String> {
        let key = nanofleet_pki::tls::key_from_pem("device key", &c.key_pem).map_err(|e| e.to_string())?;
        let key = nanofleet_recipe::batch::device_key(key.secret_der())?;
        let chain = nanofleet_pki::tls::certs_from_pem("device certificate", &c.chain_pem)
            .map_err(|e| e.to_string())?;
        let certificate = chain.first().ok_or("the device chain holds no certificate")?.to_vec();
        Ok(BatchSigner { key, certificate })
    }
}

/// The signer in use; certificate renewal replaces it.
pub type SharedSigner = Arc<Mutex<BatchSigner>>;

/// The run desk of an enrolled device that holds a recipe book, kept in
/// `STATE_DIR/runs` when there is a state directory, and its signer (for renewal to
/// replace). Records left unacknowledged or a run interrupted by a restart are taken
/// up again.
pub fn desk_for_device(
    creds: &crate::enroll::Credentials,
    book: &RecipeBook,
    info: &DeviceInfo,
    state_dir: Option<&Path>,
) -> Result<(RunDesk, SharedSigner), Error> {
    let signer = BatchSigner::from_credentials(creds)
        .map_err(|reason| Error::Bad { path: PathBuf::from("device credentials"), reason })?;
    let signer = Arc::new(Mutex::new(signer));
    let dir = state_dir.map(|d| d.join("runs"));
    let mut desk = RunDesk::open(dir.as_deref(), signer.clone())?;
    desk.recover(book, info, now_ms())?;
    Ok((desk, signer))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// What the desk keeps across restarts.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct DeskState {
    /// Runs started on this device; numbers the batch records.
    runs: u64,
    /// `GTIN/serial` of every cartridge a run used.
    used_cartridges: Vec<String>,
}

/// Per phase: what the device was asked and what it did.
#[derive(Debug, Clone, Default)]
struct PhaseStats {
    phase: i32,
    started_ms: i64,
    ended_ms: i64,
    samples: u32,
    setpoint_aqueous: f64,
    setpoint_ethanol: f64,
    aqueous: f64,
    aqueous_sq: f64,
    ethanol: f64,
    temperature: f64,
    max_pressure: f64,
}

impl PhaseStats {
    fn record(&self, set_temperature_c: f64) -> PhaseRecord {
        let n = f64::from(self.samples.max(1));
        let (sa, se) = (self.setpoint_aqueous / n, self.setpoint_ethanol / n);
        let (aq, et) = (self.aqueous / n, self.ethanol / n);
        let sd = (self.aqueous_sq / n - aq * aq).max(0.0).sqrt();
        PhaseRecord {
            phase: self.phase,
            started_unix_ms: self.started_ms,
            ended_unix_ms: self.ended_ms,
            setpoint_total_flow_ml_min: (sa + se) / 1000.0,
            actual_total_flow_ml_min: (aq + et).max(0.0) / 1000.0,
            setpoint_flow_rate_ratio: if se > 0.0 { sa / se } else { 0.0 },
            actual_flow_rate_ratio: if se > 0.0 && et > 0.0 { aq / et } else { 0.0 },
            flow_cv: if sa > 0.0 && aq > 0.0 { sd / aq } else { 0.0 },
            setpoint_temperature_c: set_temperature_c,
            actual_temperature_c: self.temperature / n,
            max_pressure_mbar: self.max_pressure,
            samples: self.samples,
        }
    }
}

#[derive(Debug)]
struct ActiveRun {
    seq: u64,
    request: RunRequest,
    held: HeldRecipe,
    plan: RunPlan,
    batch_id: String,
    started_ms: i64,
    phases: Vec<PhaseStats>,
    alarms: Vec<AlarmRecord>,
    qc: Vec<QcMeasurement>,
    outcome: Option<RunOutcome>,
    abort_reason: String,
}

/// The device's run controller and batch recorder.
#[derive(Debug)]
pub struct RunDesk {
    dir: Option<PathBuf>,
    state: DeskState,
    active: Option<ActiveRun>,
    signer: SharedSigner,
    /// Signed records not yet acknowledged by the cloud, by number.
    pending: BTreeMap<u64, Bytes>,
    answered: VecDeque<(String, Ack)>,
    /// Cartridge loads to report, oldest first.
    events: VecDeque<Event>,
}

/// `ms` since the Unix epoch as `YYYYMMDD-HHMMSS` (UTC).
fn compact_utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Checks an identifier a run request carries (request, prescription, patient
/// pseudonym, lot, serial): 1 to [`MAX_ID_LEN`] characters of `A-Z a-z 0-9 - _ . / :`.
/// The error names `field` and the value.
pub fn valid_id(field: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{field} is missing"));
    }
    if value.len() > MAX_ID_LEN
        || !value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/' | b':'))
    {
        return Err(format!(
            "{field} {:?}: 1 to {MAX_ID_LEN} characters of A-Z a-z 0-9 - _ . / : allowed",
            value.chars().take(80).collect::<String>()
        ));
    }
    Ok(())
}

fn utc(ms: i64) -> String {
    let s = compact_utc(ms);
    format!("{}-{}-{} {}:{}:{} UTC", &s[0..4], &s[4..6], &s[6..8], &s[9..11], &s[11..13], &s[13..15])
}

impl RunDesk {
    /// Opens the desk kept in `dir` (created if missing; `None` keeps everything in
    /// memory). Records not yet acknowledged are queued again; a run an agent restart
    /// interrupted is recorded as aborted.
    pub fn open(dir: Option<&Path>, signer: SharedSigner) -> Result<RunDesk, Error> {
        let mut desk = RunDesk {
            dir: dir.map(Path::to_owned),
            state: DeskState::default(),
            active: None,
            signer,
            pending: BTreeMap::new(),
            answered: VecDeque::new(),
            events: VecDeque::new(),
        };
        let Some(dir) = dir else { return Ok(desk) };
        let pending_dir = dir.join("pending");
        std::fs::create_dir_all(&pending_dir).map_err(io(&pending_dir))?;
        let state_path = dir.join("state.json");
        match std::fs::read(&state_path) {
            Ok(bytes) => {
                desk.state = serde_json::from_slice(&bytes)
                    .map_err(|e| Error::Bad { path: state_path.clone(), reason: e.to_string() })?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&state_path)(e)),
        }
        for entry in std::fs::read_dir(&pending_dir).map_err(io(&pending_dir))? {
            let path = entry.map_err(io(&pending_dir))?.path();
            let Some(seq) = path
                .extension()
                .filter(|e| *e == "batch")
                .and(path.file_stem())
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            let bytes = std::fs::read(&path).map_err(io(&path))?;
            desk.pending.insert(seq, Bytes::from(bytes));
        }
        Ok(desk)
    }

    /// Records an interrupted run (one that was under way when the agent stopped) as
    /// aborted. `book` supplies the recipe it ran.
    pub fn recover(&mut self, book: &RecipeBook, info: &DeviceInfo, now_ms: i64) -> Result<(), Error> {
        let Some(dir) = self.dir.clone() else { return Ok(()) };
        let path = dir.join("active.request");
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(&path)(e)),
        };
        let Ok(request) = RunRequest::decode(bytes.as_slice()) else {
            let _ = std::fs::remove_file(&path);
            return Ok(());
        };
        if let Some(held) = book.recipe(&request.recipe_id) {
            let seq = self.state.runs;
            let started = request.requested_unix_ms;
            let mut run = self.active_run(seq, request, held.clone(), info, started);
            run.outcome = Some(RunOutcome::Aborted);
            run.abort_reason = "the agent stopped during the run; the batch was not completed".into();
            self.active = Some(run);
            self.finish(info, now_ms)?;
        }
        let _ = std::fs::remove_file(&path);
        Ok(())
    }

    /// Events to send, oldest first: a `CartridgeLoad` for every run request judged
    /// with a cartridge.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    /// The batch id of the run under way.
    pub fn active_batch(&self) -> Option<&str> {
        self.active.as_ref().map(|r| r.batch_id.as_str())
    }

    /// Signed records waiting for the cloud's acknowledgement, oldest first.
    pub fn pending(&self) -> impl Iterator<Item = (u64, &Bytes)> {
        self.pending.iter().map(|(k, v)| (*k, v))
    }

    /// The cloud acknowledged record `seq`: it is no longer kept.
    pub fn delivered(&mut self, seq: u64) {
        if self.pending.remove(&seq).is_some()
            && let Some(dir) = &self.dir
        {
            let path = dir.join("pending").join(format!("{seq:010}.batch"));
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "acknowledged batch record not removed");
            }
        }
    }

    fn save_state(&self) -> Result<(), Error> {
        match &self.dir {
            Some(dir) => write_atomic(
                &dir.join("state.json"),
                &serde_json::to_vec(&self.state)
                    .map_err(|e| Error::Bad { path: dir.join("state.json"), reason: e.to_string() })?,
            ),
            None => Ok(()),
        }
    }

    fn active_run(
        &self,
        seq: u64,
        request: RunRequest,
        held: HeldRecipe,
        info: &DeviceInfo,
        now_ms: i64,
    ) -> ActiveRun {
        let batch_id = format!("{}-{}", info.device_id, compact_utc(now_ms));
        let lot = request.cartridge.as_ref().map(|c| c.lot.as_str()).unwrap_or_default();
        let plan = RunPlan::from_recipe(&batch_id, &held.recipe).with_cartridge_lot(lot);
        ActiveRun {
            seq,
            request,
            held,
            plan,
            batch_id,
            started_ms: now_ms,
            phases: Vec::new(),
            alarms: Vec::new(),
            qc: Vec::new(),
            outcome: None,
            abort_reason: String::new(),
        }
    }

    /// Handles a run request from the cloud (`cmd/run`).
    pub fn handle_command(
        &mut self,
        payload: &[u8],
        book: &RecipeBook,
        device: &mut dyn Device,
        now_ms: i64,
    ) -> Ack {
        match RunRequest::decode(payload) {
            Ok(request) => self.start(request, book, device, now_ms),
            Err(e) => {
                let info = device.info();
                let ack = Ack {
                    device_id: info.device_id.clone(),
                    time_unix_ms: now_ms,
                    subject: AckSubject::Run as i32,
                    ..Ack::default()
                };
                refuse(ack, code::MALFORMED, &format!("run request: {e}"))
            }
        }
    }

    /// Checks the interlocks and starts the run, or says which one refused it.
    pub fn start(
        &mut self,
        mut request: RunRequest,
        book: &RecipeBook,
        device: &mut dyn Device,
        now_ms: i64,
    ) -> Ack {
        let info = device.info().clone();
        let mut ack = Ack {
            device_id: info.device_id.clone(),
            time_unix_ms: now_ms,
            subject: AckSubject::Run as i32,
            subject_id: request.request_id.chars().take(MAX_ID_LEN).collect(),
            version: u64::from(request.recipe_version),
            ..Ack::default()
        };
        if let Some((_, before)) = self.answered.iter().find(|(id, _)| *id == request.request_id) {
            return Ack { time_unix_ms: now_ms, ..before.clone() };
        }
        let judged = read_scan(&mut request, now_ms)
            .and_then(|()| self.check_and_start(&request, book, device, &info, now_ms));
        let answer = match judged {
            Ok(batch_id) => {
                ack.result = AckResult::Accepted as i32;
                ack.digest = batch_id;
                ack
            }
            Err((code, reason)) => refuse(ack, code, &reason),
        };
        if !request.request_id.is_empty() && answer.code != code::INCOMPLETE {
            if self.answered.len() >= REMEMBERED {
                self.answered.pop_front();
            }
            self.answered.push_back((request.request_id.clone(), answer.clone()));
        }
        // The scanner read a cartridge and the request was judged: the cloud learns
        // where the cartridge is, or that the device would not take it.
        let judged = ![code::INCOMPLETE, code::CARTRIDGE_UNREADABLE].contains(&answer.code.as_str());
        if let Some(c) = request.cartridge.as_ref().filter(|_| judged) {
            if self.events.len() >= MAX_EVENTS {
                self.events.pop_front();
            }
            let accepted = answer.code.is_empty();
            self.events.push_back(Event {
                time_unix_ms: now_ms,
                kind: Some(event::Kind::CartridgeLoad(CartridgeLoad {
                    gtin: c.gtin.clone(),
                    lot: c.lot.clone(),
                    serial: c.serial.clone(),
                    expires_unix_ms: c.expires_unix_ms,
                    request_id: request.request_id.clone(),
                    accepted,
                    code: answer.code.clone(),
                    reason: printable(&answer.reason, 512),
                    batch_id: if accepted { answer.digest.clone() } else { String::new() },
                })),
            });
        }
        answer
    }

    fn check_and_start(
        &mut self,
        r: &RunRequest,
        book: &RecipeBook,
        device: &mut dyn Device,
        info: &DeviceInfo,
        now_ms: i64,
    ) -> Result<String, (&'static str, String)> {
        let incomplete = |e: String| (code::INCOMPLETE, e);
        valid_id("request_id", &r.request_id).map_err(incomplete)?;
        valid_id("recipe_id", &r.recipe_id).map_err(incomplete)?;
        valid_id("prescription_id", &r.prescription_id).map_err(incomplete)?;
        valid_id("patient_pseudonym", &r.patient_pseudonym).map_err(incomplete)?;
        let who = r.started_by.as_ref().map(|p| p.user_id.as_str()).unwrap_or_default();
        valid_id("started_by.user_id", who).map_err(incomplete)?;
        let Some(cartridge) = &r.cartridge else {
            return Err(incomplete("cartridge is missing: scan the loaded cartridge".into()));
        };
        valid_id("cartridge.gtin", &cartridge.gtin).map_err(incomplete)?;
        valid_id("cartridge.lot", &cartridge.lot).map_err(incomplete)?;
        valid_id("cartridge.serial", &cartridge.serial).map_err(incomplete)?;
        if r.prescription_unix_ms <= 0 {
            return Err(incomplete("prescription_unix_ms is missing: the date of the prescription".into()));
        }
        if let Some(active) = &self.active {
            return Err((
                code::RUN_ACTIVE,
                format!("run {} is under way; one run at a time", active.batch_id),
            ));
        }
        if device.busy() {
            return Err((code::RUN_ACTIVE, "the device is busy with a run; one run at a time".into()));
        }
        if r.dispensing_site_id != info.site_id {
            return Err((
                code::WRONG_SITE,
                format!(
                    "dispensing site {:?}: this device prepares for site {:?} only",
                    r.dispensing_site_id, info.site_id
                ),
            ));
        }
        let Some(held) = book.recipe(&r.recipe_id) else {
            let mut ids: Vec<String> = book.recipes().map(|h| h.recipe.recipe_id.clone()).collect();
            ids.sort();
            return Err((
                code::RECIPE_NOT_HELD,
                format!("recipe {:?} is not held by this device; held: {ids:?}", r.recipe_id),
            ));
        };
        if r.recipe_version != 0 && r.recipe_version != held.recipe.version {
            return Err((
                code::RECIPE_VERSION,
                format!(
                    "recipe {:?} version {} asked for; this device holds version {} (versions only move forward)",
                    r.recipe_id, r.recipe_version, held.recipe.version
                ),
            ));
        }
        // What was accepted once must still verify now: a key revoked by a newer
        // trust root, an expired validity window or a firmware change stop the run.
        let ctx = DeviceContext {
            device_id: &info.device_id,
            site_id: &info.site_id,
            model: &info.model,
            firmware_version: &info.firmware_version,
            now_unix_ms: now_ms,
            root: book.trust_root(),
        };
        verify_delivery(&held.delivery, &ctx, |_| None).map_err(|refusal| (refusal.code, refusal.reason))?;
        if cartridge.gtin != held.recipe.cartridge_gtin {
            return Err((
                code::CARTRIDGE_WRONG_TYPE,
                format!(
                    "cartridge GTIN {} is not the recipe's cartridge type {}",
                    cartridge.gtin, held.recipe.cartridge_gtin
                ),
            ));
        }
        if cartridge.expires_unix_ms <= now_ms {
            return Err((
                code::CARTRIDGE_EXPIRED,
                format!(
                    "cartridge lot {} serial {} expired {}; the run starts {}",
                    cartridge.lot,
                    cartridge.serial,
                    utc(cartridge.expires_unix_ms),
                    utc(now_ms)
                ),
            ));
        }
        // From the last deny list received: offline too.
        match book.deny_list().check(&cartridge.gtin, &cartridge.lot, &cartridge.serial) {
            Some(Denied::Lot(why)) => {
                return Err((
                    code::CARTRIDGE_RECALLED,
                    format!(
                        "cartridge lot {} is on deny list v{}: {why}",
                        cartridge.lot,
                        book.deny_list().version
                    ),
                ));
            }
            Some(Denied::Cartridge(why)) => {
                return Err((
                    code::CARTRIDGE_BLOCKED,
                    format!(
                        "cartridge serial {} is on deny list v{}: {why}",
                        cartridge.serial,
                        book.deny_list().version
                    ),
                ));
            }
            None => {}
        }
        let used_key = format!("{}/{}", cartridge.gtin, cartridge.serial);
        if self.state.used_cartridges.contains(&used_key) {
            return Err((
                code::CARTRIDGE_USED,
                format!(
                    "cartridge serial {} was used by an earlier run; a cartridge runs once",
                    cartridge.serial
                ),
            ));
        }
        if r.prescription_unix_ms >= now_ms {
            return Err((
                code::PRESCRIPTION_NOT_BEFORE_RUN,
                format!(
                    "prescription {} is dated {}, not before the run ({})",
                    r.prescription_id,
                    utc(r.prescription_unix_ms),
                    utc(now_ms)
                ),
            ));
        }
        let seq = self.state.runs + 1;
        let run = self.active_run(seq, r.clone(), held.clone(), info, now_ms);
        // Kept before the run starts: a restart mid-run is then recorded as aborted.
        if let Some(dir) = &self.dir {
            write_atomic(&dir.join("active.request"), &r.encode_to_vec())
                .map_err(|e| (code::STORAGE, e.to_string()))?;
        }
        self.state.runs = seq;
        self.state.used_cartridges.push(used_key);
        let started = self
            .save_state()
            .map_err(|e| (code::STORAGE, e.to_string()))
            .and_then(|()| device.start_run(run.plan.clone(), now_ms).map_err(|e| (code::DEVICE_REFUSED, e)));
        if let Err(refusal) = started {
            // Nothing ran: the cartridge stays unused and no interrupted run is left behind.
            self.state.runs = seq - 1;
            self.state.used_cartridges.pop();
            if let Err(e) = self.save_state() {
                tracing::warn!(error = %e, "run desk state not restored after a refused start");
            }
            if let Some(dir) = &self.dir {
                let _ = std::fs::remove_file(dir.join("active.request"));
            }
            return Err(refusal);
        }
        let batch_id = run.batch_id.clone();
        tracing::info!(device_id = %info.device_id, %batch_id, recipe_id = %r.recipe_id, "run started");
        self.active = Some(run);
        Ok(batch_id)
    }

    /// Takes one reading; when a run ends, returns its signed record (number and
    /// bytes) to publish.
    pub fn observe(&mut self, reading: &Reading, info: &DeviceInfo, now_ms: i64) -> Option<(u64, Bytes)> {
        let run = self.active.as_mut()?;
        let s = &reading.sample;
        let mut ended = false;
        for e in &reading.events {
            match &e.kind {
                Some(event::Kind::Alarm(a)) if a.active && run.alarms.len() < 1000 => {
                    run.alarms.push(AlarmRecord {
                        time_unix_ms: e.time_unix_ms,
                        code: a.code,
                        priority: a.priority,
                        detail: a.detail.clone(),
                    });
                }
                Some(event::Kind::PhaseChange(PhaseChange { to, .. })) => match RunPhase::try_from(*to) {
                    Ok(RunPhase::Complete) => run.outcome = Some(RunOutcome::Complete),
                    Ok(RunPhase::Aborted) => {
                        run.outcome = Some(RunOutcome::Aborted);
                        run.abort_reason = run
                            .alarms
                            .iter()
                            .rev()
                            .find(|a| a.priority == AlarmPriority::High as i32)
                            .map(|a| format!("stopped by alarm: {}", a.detail))
                            .unwrap_or_else(|| "stopped by the device".into());
                    }
                    Ok(RunPhase::Idle) => ended = true,
                    _ => {}
                },
                _ => {}
            }
        }
        run.qc.extend(reading.qc.iter().copied());
        let phase = s.phase;
        let in_run = phase != RunPhase::Idle as i32 && phase != RunPhase::Unspecified as i32;
        if in_run && s.run_id == run.batch_id {
            if run.phases.last().is_none_or(|p| p.phase != phase) {
                run.phases.push(PhaseStats { phase, started_ms: s.time_unix_ms, ..PhaseStats::default() });
            }
            if let Some(p) = run.phases.last_mut() {
                p.ended_ms = s.time_unix_ms;
                p.samples += 1;
                let line = |i: usize| s.lines.get(i).cloned().unwrap_or_default();
                let (aq, et) = (line(0), line(1));
                p.setpoint_aqueous += aq.flow_setpoint_ul_min;
                p.setpoint_ethanol += et.flow_setpoint_ul_min;
                p.aqueous += aq.flow_ul_min;
                p.aqueous_sq += aq.flow_ul_min * aq.flow_ul_min;
                p.ethanol += et.flow_ul_min;
                p.temperature += s.chamber_temperature_c;
                p.max_pressure = p.max_pressure.max(aq.pressure_mbar).max(et.pressure_mbar);
            }
        }
        if !ended {
            return None;
        }
        if run.outcome.is_none() {
            run.outcome = Some(RunOutcome::Aborted);
            run.abort_reason = "the device stopped the run before it completed".into();
        }
        match self.finish(info, now_ms) {
            Ok(out) => out,
            Err(e) => {
                tracing::error!(device_id = %info.device_id, error = %e, "batch record not kept");
                None
            }
        }
    }

    /// Signs the record of the active run, keeps it, and clears the run.
    fn finish(&mut self, info: &DeviceInfo, now_ms: i64) -> Result<Option<(u64, Bytes)>, Error> {
        let Some(run) = self.active.take() else { return Ok(None) };
        let recipe = &run.held.recipe;
        let criteria = recipe.release_criteria.unwrap_or_default();
        let outcome = run.outcome.unwrap_or(RunOutcome::Aborted);
        let measured: Vec<_> = run.qc.iter().map(|m| (m.attribute, m.value)).collect();
        let qc = if outcome == RunOutcome::Complete {
            nanofleet_recipe::batch::evaluate(&criteria, &measured)
        } else {
            Vec::new()
        };
        let set_temperature = |phase: i32| {
            run.plan
                .steps
                .iter()
                .find(|s| s.phase as i32 == phase)
                .map_or(run.plan.temperature_c, |s| s.temperature_c)
        };
        let signatures =
            RecipeDelivery::decode(run.held.delivery.as_slice()).map(|d| d.statements).unwrap_or_default();
        let mut record = BatchRecord {
            batch_id: run.batch_id.clone(),
            request_id: run.request.request_id.clone(),
            device_id: info.device_id.clone(),
            site_id: info.site_id.clone(),
            model: info.model.clone(),
            firmware_version: info.firmware_version.clone(),
            recipe_id: recipe.recipe_id.clone(),
            recipe_version: recipe.version,
            recipe_digest: run.held.digest.clone(),
            recipe_signatures: signatures,
            cartridge: run.request.cartridge.clone(),
            prescription_id: run.request.prescription_id.clone(),
            prescription_unix_ms: run.request.prescription_unix_ms,
            patient_pseudonym: run.request.patient_pseudonym.clone(),
            started_by: run.request.started_by.clone(),
            started_unix_ms: run.started_ms,
            ended_unix_ms: now_ms,
            outcome: outcome as i32,
            abort_reason: run.abort_reason.clone(),
            phases: run.phases.iter().map(|p| p.record(set_temperature(p.phase))).collect(),
            alarms: run.alarms.clone(),
            qc,
            qc_passed: false,
        };
        record.qc_passed = nanofleet_recipe::batch::passed(&record);
        let signed = {
            let signer = self.signer.lock().unwrap_or_else(|p| p.into_inner());
            nanofleet_recipe::batch::sign(&record, &signer.key, &signer.certificate)
                .map_err(|reason| Error::Bad { path: PathBuf::from("device key"), reason })?
        };
        let bytes = Bytes::from(signed.encode_to_vec());
        if let Some(dir) = &self.dir {
            write_atomic(&dir.join("pending").join(format!("{:010}.batch", run.seq)), &bytes)?;
            let active = dir.join("active.request");
            if let Err(e) = std::fs::remove_file(&active)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                return Err(io(&active)(e));
            }
        }
        tracing::info!(
            device_id = %info.device_id, batch_id = %record.batch_id, outcome = outcome.as_str_name(),
            qc_passed = record.qc_passed, "run ended, batch record signed"
        );
        self.pending.insert(run.seq, bytes.clone());
        Ok(Some((run.seq, bytes)))
    }
}

/// A simulated pharmacist at the device screen: starts a run with a recipe the device
/// holds, a freshly loaded cartridge and a new prescription, some time after the
/// device became idle. For demos and load tests; a real device's runs are started by
/// people.
#[derive(Debug, Clone)]
pub struct AutoRuns {
    /// Time the device stays idle between runs, ms (from, to).
    pub idle_ms: (i64, i64),
    pub operator: Person,
    /// Cartridge lots the site holds; each run loads one of them at random. Empty:
    /// every run of a month loads that month's lot, `L{YYMM}`.
    pub lots: Vec<String>,
    /// The sites' shelves of registered cartridges: when set, each run takes the next
    /// cartridge of its site's shelf, and no run starts while the shelf is empty.
    pub shelves: Option<Shelves>,
    next_ms: Option<i64>,
    count: u64,
}

/// Cartridges on each site's shelf, shared by the site's simulated pharmacists: each
/// run takes the next one. Whoever receives shipments at the site fills it.
#[derive(Debug, Clone, Default)]
pub struct Shelves(Arc<Mutex<BTreeMap<String, VecDeque<Cartridge>>>>);

impl Shelves {
    /// Puts cartridges on `site`'s shelf, behind those already there.
    pub fn stock(&self, site: &str, cartridges: impl IntoIterator<Item = Cartridge>) {
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        all.entry(site.to_owned()).or_default().extend(cartridges);
    }

    /// The next cartridge of `site`'s shelf.
    pub fn take(&self, site: &str) -> Option<Cartridge> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).get_mut(site)?.pop_front()
    }

    /// Takes every cartridge of `lot` off the shelves (a recall); returns how many.
    pub fn withdraw_lot(&self, lot: &str) -> usize {
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        for shelf in all.values_mut() {
            let before = shelf.len();
            shelf.retain(|c| c.lot != lot);
            n += before - shelf.len();
        }
        n
    }

    pub fn len(&self, site: &str) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).get(site).map_or(0, VecDeque::len)
    }
}

impl AutoRuns {
    pub fn new(idle: (std::time::Duration, std::time::Duration), operator: Person) -> AutoRuns {
        let ms = |d: std::time::Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let (a, b) = (ms(idle.0), ms(idle.1));
        AutoRuns {
            idle_ms: (a.min(b), a.max(b)),
            operator,
            lots: Vec::new(),
            shelves: None,
            next_ms: None,
            count: 0,
        }
    }

    /// Runs take their cartridges from the sites' shelves.
    pub fn with_shelves(mut self, shelves: Shelves) -> AutoRuns {
        self.shelves = Some(shelves);
        self
    }

    /// The same pharmacist at a site that holds `lots`.
    pub fn with_lots(mut self, lots: Vec<String>) -> AutoRuns {
        self.lots = lots;
        self
    }

    /// Another pharmacist (of another site) with the same habits.
    pub fn with_operator(mut self, operator: Person) -> AutoRuns {
        self.operator = operator;
        self
    }

    /// A run request when one is due: the device is idle, holds a recipe, and has been
    /// idle long enough.
    pub fn due(
        &mut self,
        busy: bool,
        book: &RecipeBook,
        info: &DeviceInfo,
        now_ms: i64,
    ) -> Option<RunRequest> {
        let mut rng = rand::rng();
        if busy {
            self.next_ms = None;
            return None;
        }
        let (lo, hi) = self.idle_ms;
        let next = *self.next_ms.get_or_insert_with(|| now_ms + rng.random_range(lo..=hi.max(lo)));
        if now_ms < next {
            return None;
        }
        self.next_ms = Some(now_ms + rng.random_range(lo..=hi.max(lo)));
        let mut held: Vec<&HeldRecipe> = book
            .recipes()
            .filter(|h| h.recipe.valid_from_unix_ms <= now_ms && now_ms < h.recipe.valid_until_unix_ms)
            .collect();
        held.sort_by(|a, b| a.recipe.recipe_id.cmp(&b.recipe.recipe_id));
        let recipe = &held.get(usize::try_from(self.count).unwrap_or(0) % held.len().max(1))?.recipe;
        let cartridge = match &self.shelves {
            // The site ran out: no run until a shipment is received.
            Some(shelves) => Some(shelves.take(&info.site_id)?),
            None => None,
        };
        self.count += 1;
        let mut request = self.request(recipe, info, now_ms, &mut rng);
        if let Some(c) = cartridge {
            // A registered cartridge: the device reads it off its code.
            request.cartridge = None;
            request.cartridge_scan = scan_of(&c);
        }
        Some(request)
    }

    /// The request for run number `self.count` of `recipe`, with a cartridge of one of
    /// the site's lots.
    fn request(&self, recipe: &Recipe, info: &DeviceInfo, now_ms: i64, rng: &mut impl Rng) -> RunRequest {
        let n = self.count;
        let stamp = compact_utc(now_ms);
        let lot = if self.lots.is_empty() {
            format!("L{}", &stamp[2..6])
        } else {
            self.lots[rng.random_range(0..self.lots.len())].clone()
        };
        const DAY_MS: i64 = 86_400_000;
        RunRequest {
            request_id: format!("{}-{stamp}-{n}", info.device_id),
            recipe_id: recipe.recipe_id.clone(),
            recipe_version: recipe.version,
            cartridge: Some(Cartridge {
                gtin: recipe.cartridge_gtin.clone(),
                lot,
                serial: format!("{}-{stamp}", info.device_id),
                expires_unix_ms: now_ms + 120 * DAY_MS,
            }),
            prescription_id: format!("RX-{}-{n:05}", info.device_id),
            prescription_unix_ms: now_ms - rng.random_range(15 * 60_000..=4 * 3_600_000),
            patient_pseudonym: format!("PT-{:08X}", rng.random::<u32>()),
            dispensing_site_id: info.site_id.clone(),
            started_by: Some(self.operator.clone()),
            requested_unix_ms: now_ms,
            cartridge_scan: String::new(),
        }
    }
}

/// Reads the cartridge from the request's scan, when it carries one; a cartridge the
/// request also names must be the one scanned. A cartridge named without a scan must
/// have a GTIN-14 with its check digit.
fn read_scan(r: &mut RunRequest, now_ms: i64) -> Result<(), (&'static str, String)> {
    if r.cartridge_scan.is_empty() {
        return match &r.cartridge {
            Some(c) if !c.gtin.is_empty() => gs1::check_gtin(&c.gtin)
                .map_err(|e| (code::CARTRIDGE_UNREADABLE, format!("cartridge.gtin: {e}"))),
            _ => Ok(()),
        };
    }
    let shown: String =
        r.cartridge_scan.chars().take(80).map(|c| if c.is_control() { '␝' } else { c }).collect();
    let year = gs1::date_at_ms(now_ms).year();
    let code = gs1::parse_cartridge(&r.cartridge_scan, year)
        .map_err(|e| (code::CARTRIDGE_UNREADABLE, format!("cartridge_scan {shown:?}: {e}")))?;
    let read = Cartridge {
        gtin: code.gtin.clone(),
        lot: code.lot.clone(),
        serial: code.serial.clone(),
        expires_unix_ms: code.expires_unix_ms(),
    };
    if let Some(named) = &r.cartridge
        && (named.gtin != read.gtin || named.lot != read.lot || named.serial != read.serial)
    {
        return Err((
            code::CARTRIDGE_UNREADABLE,
            format!(
                "the request names cartridge {} lot {} serial {}, the scan reads {} lot {} serial {}",
                named.gtin, named.lot, named.serial, read.gtin, read.lot, read.serial
            ),
        ));
    }
    r.cartridge = Some(read);
    Ok(())
}

/// `s` without control characters, cut to at most `max` bytes.
fn printable(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    for c in s.chars().map(|c| if c.is_control() { ' ' } else { c }) {
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    out
}

/// The element string a scanner reads off `c`'s DataMatrix.
pub fn scan_of(c: &Cartridge) -> String {
    gs1::CartridgeCode {
        gtin: c.gtin.clone(),
        lot: c.lot.clone(),
        serial: c.serial.clone(),
        expiry: gs1::date_at_ms(c.expires_unix_ms),
        production: None,
        expiry_time: None,
    }
    .element_string()
}

fn refuse(mut ack: Ack, code: &str, reason: &str) -> Ack {
    ack.result = AckResult::Refused as i32;
    ack.code = code.into();
    ack.reason = reason.into();
    ack
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng as _;

    use super::*;

    #[test]
    fn batch_ids_carry_the_utc_start_time() {
        assert_eq!(compact_utc(0), "19700101-000000");
        assert_eq!(compact_utc(1_795_000_000_123), "20261118-110640");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
    }

    #[test]
    fn identifiers_are_bounded_and_plain() {
        assert!(valid_id("prescription_id", "RX-2026/0042").is_ok());
        let e = valid_id("patient_pseudonym", "Jane Doe").expect_err("space");
        assert!(e.contains("patient_pseudonym") && e.contains("Jane Doe"), "{e}");
        assert!(valid_id("request_id", "").expect_err("empty").contains("missing"));
        assert!(valid_id("request_id", &"x".repeat(65)).is_err());
    }

    fn pharmacist() -> AutoRuns {
        let operator = Person { user_id: "ph.one".into(), printed_name: "P. One".into() };
        AutoRuns::new((std::time::Duration::from_secs(1), std::time::Duration::from_secs(2)), operator)
    }

    fn info() -> DeviceInfo {
        DeviceInfo {
            device_id: "NF-T-01".into(),
            site_id: "test".into(),
            model: "NF-200".into(),
            firmware_version: "1.0.0".into(),
        }
    }

    fn lot_of(r: &RunRequest) -> String {
        r.cartridge.as_ref().map(|c| c.lot.clone()).unwrap_or_default()
    }

    #[test]
    fn auto_runs_load_cartridges_only_from_the_lots_the_site_holds() {
        let recipe = nanofleet_recipe::example::example("flu", 1, Default::default(), 1_700_000_000_000);
        let auto = pharmacist().with_lots(vec!["L2611-A".into(), "L2611-B".into(), "L2611-X".into()]);
        let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
        let mut seen = std::collections::BTreeMap::<String, u32>::new();
        for i in 0..300 {
            let r = auto.request(&recipe, &info(), 1_795_000_000_000 + i * 60_000, &mut rng);
            *seen.entry(lot_of(&r)).or_default() += 1;
        }
        assert_eq!(seen.keys().collect::<Vec<_>>(), ["L2611-A", "L2611-B", "L2611-X"], "{seen:?}");
        // Uniform choice: each lot in about a third of the runs.
        assert!(seen.values().all(|n| (70..=130).contains(n)), "{seen:?}");
    }

    #[test]
    fn the_device_reads_the_cartridge_off_its_scan() {
        let now = 1_795_000_000_000;
        let cartridge = Cartridge {
            gtin: nanofleet_recipe::example::EXAMPLE_GTIN.into(),
            lot: "L2611-A".into(),
            serial: "11-A-000042".into(),
            // The end of 2026-06-30 (UTC).
            expires_unix_ms: 20_635 * 86_400_000 - 1,
        };
        let scan = scan_of(&cartridge);
        assert!(scan.starts_with("]d201"), "{scan:?}");
        let mut r = RunRequest { cartridge_scan: scan.clone(), ..RunRequest::default() };
        read_scan(&mut r, now).unwrap();
        assert_eq!(
            r.cartridge.as_ref(),
            Some(&cartridge),
            "the scan round-trips, expiry at the end of its day"
        );

        // A scan and a named cartridge that disagree.
        let other = Cartridge { serial: "11-A-000043".into(), ..cartridge.clone() };
        let mut r =
            RunRequest { cartridge_scan: scan.clone(), cartridge: Some(other), ..RunRequest::default() };
        let (code, reason) = read_scan(&mut r, now).unwrap_err();
        assert_eq!(code, code::CARTRIDGE_UNREADABLE);
        assert!(reason.contains("11-A-000043") && reason.contains("11-A-000042"), "{reason}");

        // A misread GTIN: named, with the scan shown without its control characters.
        let bad = scan.replacen("]d20110614", "]d20110714", 1);
        let mut r = RunRequest { cartridge_scan: bad, ..RunRequest::default() };
        let (code, reason) = read_scan(&mut r, now).unwrap_err();
        assert_eq!(code, code::CARTRIDGE_UNREADABLE);
        assert!(reason.contains("check digit") && !reason.contains('\u{1d}'), "{reason}");
        assert!(r.cartridge.is_none());

        // Named without a scan: the GTIN's check digit is still checked.
        let misread = Cartridge { gtin: "10614141000018".into(), ..cartridge.clone() };
        let mut r = RunRequest { cartridge: Some(misread), ..RunRequest::default() };
        let (code, reason) = read_scan(&mut r, now).unwrap_err();
        assert_eq!(code, code::CARTRIDGE_UNREADABLE);
        assert!(reason.contains("cartridge.gtin") && reason.contains("check digit 8"), "{reason}");
        let mut r = RunRequest { cartridge: Some(cartridge.clone()), ..RunRequest::default() };
        assert!(read_scan(&mut r, now).is_ok());
    }

    #[test]
    fn reasons_sent_are_printable_and_bounded() {
        assert_eq!(printable("a\nb", 10), "a b");
        assert_eq!(printable(&"é".repeat(300), 511).len(), 510);
    }

    #[test]
    fn auto_runs_without_lots_load_the_lot_of_the_month() {
        let recipe = nanofleet_recipe::example::example("flu", 1, Default::default(), 1_700_000_000_000);
        let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
        let r = pharmacist().request(&recipe, &info(), 1_795_000_000_123, &mut rng);
        assert_eq!(lot_of(&r), "L2611");
    }

    #[test]
    fn the_desk_plans_a_run_with_the_lot_of_the_requested_cartridge() {
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
        let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).expect("key");
        let desk = RunDesk::open(None, Arc::new(Mutex::new(BatchSigner { key, certificate: Vec::new() })))
            .expect("a desk in memory");
        let recipe = nanofleet_recipe::example::example("flu", 1, Default::default(), 1_700_000_000_000);
        let held = HeldRecipe { recipe, digest: String::new(), delivery: Vec::new() };
        let request = RunRequest {
            cartridge: Some(Cartridge { lot: "L2611-X".into(), ..Cartridge::default() }),
            ..RunRequest::default()
        };
        let run = desk.active_run(1, request, held, &info(), 1_795_000_000_000);
        assert_eq!(run.plan.cartridge_lot, "L2611-X");
    }
}
