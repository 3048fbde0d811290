//! The device's side of firmware rollouts: checks an offer from the cloud and runs
//! the update engine ([`crate::updater`]) on a thread of its own.
//!
//! An offer is taken only if it is signed by a key of the pinned trust root's
//! `director` role, names this device and has not expired. The worker then loads the
//! release metadata over HTTPS through tough, anchored in the pinned trust root
//! (`nanofleet_firmware::client`), checks the release is for this model and not below
//! the highest release counter committed, and that the offer agrees with it (target,
//! hash, length, version, counter). Only then does it download, with range requests,
//! and install. Every step is reported on `nf/v1/{device}/update`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use http_body_util::BodyExt as _;
use nanofleet_firmware::client;
use nanofleet_firmware::https::Https;
use nanofleet_pki::trust_root::TrustRoot;
use nanofleet_proto::Message as _;
use nanofleet_proto::device::v1::{
    Envelope, UpdateAction, UpdateCommand, UpdateOffer, UpdateReport, UpdateStatus, update_command,
};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use crate::slots::{FileSlots, HangAt, ImageHeader, sim_image};
use crate::update::{ActionType, Firmware, Input, Offer, Report, Status};
use crate::updater::{Fetch, Updater};

/// Where a device keeps its update state: `update.json`, the download, the anchored
/// TUF root and tough's datastore under `dir/update/`, the simulated slots under
/// `dir/slots/`.
#[derive(Debug, Clone)]
pub struct UpdateOptions {
    pub dir: PathBuf,
    pub device_id: String,
    pub model: String,
    /// The firmware the device left the factory with (slot A).
    pub factory_version: String,
    /// TLS for HTTPS downloads: the device certificate and the fleet root.
    pub tls: Arc<rustls::ClientConfig>,
    /// Renewed TLS configurations (the certificate is short-lived).
    pub tls_updates: Option<tokio::sync::watch::Receiver<Arc<rustls::ClientConfig>>>,
    /// Power-cut drills: the simulated hardware hangs at this step of an update.
    pub sim_hang_at: Option<HangAt>,
}

enum Job {
    Offer(Box<UpdateOffer>, Box<TrustRoot>),
    Withdraw(String),
    InstallNow(String),
}

/// Takes commands from the link and runs updates on a worker thread; reports go to
/// the channel given at start.
#[derive(Debug, Clone)]
pub struct UpdateDesk {
    device_id: String,
    jobs: mpsc::Sender<JobMsg>,
    busy: Arc<AtomicBool>,
    running: Arc<std::sync::Mutex<Running>>,
    /// Reports for the link, taken once by the link that runs the device.
    reports: Arc<std::sync::Mutex<Option<UnboundedReceiver<UpdateReport>>>>,
}

struct JobMsg(Job);

impl std::fmt::Debug for JobMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobMsg")
    }
}

/// Stable codes of refusals made before the engine sees the offer.
pub mod code {
    pub const MALFORMED: &str = "malformed";
    pub const BAD_SIGNATURE: &str = "bad_signature";
    pub const WRONG_DEVICE: &str = "wrong_device";
    pub const EXPIRED: &str = "offer_expired";
    pub const OFFER_MISMATCH: &str = "offer_mismatch";
    pub const STORAGE: &str = "storage";
}

impl UpdateDesk {
    /// Opens the update state (a power-on: the simulated bootloader picks a slot),
    /// starts the worker, and resumes an update under way.
    pub fn start(opts: UpdateOptions) -> Result<UpdateDesk, String> {
        let (reports, reports_rx) = tokio::sync::mpsc::unbounded_channel();
        let slots_dir = opts.dir.join("slots");
        let header = ImageHeader {
            model: opts.model.clone(),
            version: opts.factory_version.clone(),
            release_counter: 0,
            fault: "none".into(),
        };
        let slots = FileSlots::power_on(&slots_dir, &sim_image(&header, 4096))
            .map_err(|e| format!("slots in {}: {e}", slots_dir.display()))?
            .hang_at(opts.sim_hang_at);
        let factory = Firmware { version: opts.factory_version.clone(), release_counter: 0 };
        let state = opts.dir.join("update");
        let device_id = opts.device_id.clone();
        let out = reports.clone();
        let hear = move |r: &Report| {
            let _ = out.send(report_pb(&device_id, r));
        };
        let updater = Updater::open(&state, slots, &opts.model, factory)
            .map_err(|e| e.to_string())?
            .with_reporter(Box::new(hear));
        let running = Arc::new(std::sync::Mutex::new(Running::of(&updater)));
        let busy = Arc::new(AtomicBool::new(false));
        let (jobs, rx) = mpsc::channel();
        let rt = tokio::runtime::Handle::current();
        let worker = Worker {
            https: Https::new(opts.tls.clone()),
            opts: opts.clone(),
            updater,
            rt,
            busy: busy.clone(),
            running: running.clone(),
            reports,
        };
        std::thread::Builder::new()
            .name(format!("update-{}", opts.device_id))
            .spawn(move || worker.run(rx))
            .map_err(|e| format!("update worker: {e}"))?;
        Ok(UpdateDesk {
            device_id: opts.device_id,
            jobs,
            busy,
            running,
            reports: Arc::new(std::sync::Mutex::new(Some(reports_rx))),
        })
    }

    /// The channel the worker reports on; `None` after the first call.
    pub fn take_reports(&self) -> Option<UnboundedReceiver<UpdateReport>> {
        self.reports.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// The version the device runs (after a committed update, the new one).
    pub fn running_version(&self) -> String {
        self.running.lock().unwrap_or_else(|p| p.into_inner()).version.clone()
    }

    /// The fault built into the running image (simulated images; `none` otherwise),
    /// if it is not `known`: asked at every reading, so nothing is copied otherwise.
    pub fn running_fault_unless(&self, known: &str) -> Option<String> {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        (running.fault != known).then(|| running.fault.clone())
    }

    /// A run is under way (installs wait) or not.
    pub fn set_busy(&self, busy: bool) {
        self.busy.store(busy, Ordering::Relaxed);
    }

    /// A command on `cmd/update`. A refusal is returned at once as a report; an
    /// accepted offer goes to the worker, which reports as it goes.
    pub fn command(&self, payload: &[u8], trust: &TrustRoot, now_ms: i64) -> Option<UpdateReport> {
        let refuse = |rollout: &str, code: &str, detail: String| {
            Some(UpdateReport {
                device_id: self.device_id.clone(),
                rollout_id: rollout.into(),
                status: UpdateStatus::Refused as i32,
                code: code.into(),
                detail,
                running_version: self.running_version(),
                time_unix_ms: now_ms,
                ..UpdateReport::default()
            })
        };
        let cmd = match UpdateCommand::decode(payload) {
            Ok(c) => c,
            Err(e) => return refuse("", code::MALFORMED, format!("update command: {e}")),
        };
        let job = match cmd.command {
            Some(update_command::Command::Offer(env)) => {
                match verify_offer(&env, trust, &self.device_id, now_ms) {
                    Ok(offer) => Job::Offer(Box::new(offer), Box::new(trust.clone())),
                    Err((rollout, code, detail)) => return refuse(&rollout, code, detail),
                }
            }
            Some(update_command::Command::WithdrawRolloutId(id)) => Job::Withdraw(id),
            Some(update_command::Command::InstallRolloutId(id)) => Job::InstallNow(id),
            None => return refuse("", code::MALFORMED, "update command without a command".into()),
        };
        let _ = self.jobs.send(JobMsg(job));
        None
    }
}

/// Checks the director's signature, the device and the expiry of an offer.
fn verify_offer(
    env: &Envelope,
    trust: &TrustRoot,
    device_id: &str,
    now_ms: i64,
) -> Result<UpdateOffer, (String, &'static str, String)> {
    let offer = UpdateOffer::decode(env.payload.as_slice());
    let rollout = offer.as_ref().map(|o| o.rollout_id.clone()).unwrap_or_default();
    if env.payload_type != nanofleet_recipe::dsse::FIRMWARE_PAYLOAD_TYPE {
        return Err((
            rollout,
            code::BAD_SIGNATURE,
            format!("payload type {:?} is not a firmware offer", env.payload_type),
        ));
    }
    let (directors, threshold) = client::role_keys(trust, nanofleet_firmware::ONLINE_ROLE);
    let mut good = std::collections::BTreeSet::new();
    for sig in &env.signatures {
        for k in &directors {
            if nanofleet_pki::trust_root::key_id(k) == sig.keyid
                && nanofleet_recipe::dsse::verify_sig(env, sig, k)
            {
                good.insert(sig.keyid.clone());
            }
        }
    }
    if threshold == 0 || (good.len() as u64) < threshold {
        return Err((
            rollout,
            code::BAD_SIGNATURE,
            format!(
                "offer carries {} valid signature(s) by director keys of trust root v{}, {threshold} needed",
                good.len(),
                trust.signed.version
            ),
        ));
    }
    let offer = offer.map_err(|e| (String::new(), code::MALFORMED, format!("offer: {e}")))?;
    if offer.device_id != device_id {
        return Err((
            rollout,
            code::WRONG_DEVICE,
            format!("offer is for device {:?}, this is {device_id:?}", offer.device_id),
        ));
    }
    if now_ms > offer.expires_unix_ms {
        return Err((
            rollout,
            code::EXPIRED,
            format!("offer expired at {} (ms), now {now_ms}", offer.expires_unix_ms),
        ));
    }
    Ok(offer)
}

/// What the device runs: the committed version, and the fault its simulated image
/// carries.
#[derive(Debug, Clone)]
struct Running {
    version: String,
    fault: String,
}

impl Running {
    fn of(updater: &Updater<FileSlots>) -> Running {
        Running {
            version: updater.engine().running.version.clone(),
            fault: updater.slots().running_header().map_or_else(|| "none".into(), |h| h.fault),
        }
    }
}

struct Worker {
    https: Https,
    opts: UpdateOptions,
    updater: Updater<FileSlots>,
    rt: tokio::runtime::Handle,
    busy: Arc<AtomicBool>,
    running: Arc<std::sync::Mutex<Running>>,
    reports: UnboundedSender<UpdateReport>,
}

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<JobMsg>) {
        let hang = (self.opts.sim_hang_at == Some(HangAt::Download)).then_some(HangAt::Download);
        let mut fetch = HttpsFetch { https: self.https.clone(), rt: self.rt.clone(), hang };
        if let Err(e) = self.updater.resume(self.busy(), &mut fetch) {
            tracing::error!(device_id = %self.opts.device_id, error = %e, "update state: resume failed");
        }
        self.publish_running();
        loop {
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(JobMsg(Job::Offer(offer, trust))) => self.offer(*offer, &trust, &mut fetch),
                Ok(JobMsg(Job::Withdraw(id))) => {
                    if self.updater.engine().job.as_ref().is_some_and(|j| j.offer.rollout_id == id) {
                        self.input(Input::Cancel, &mut fetch);
                    }
                }
                Ok(JobMsg(Job::InstallNow(id))) => {
                    if self.updater.engine().job.as_ref().is_some_and(|j| j.offer.rollout_id == id) {
                        self.input(Input::InstallNow, &mut fetch);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if self.updater.engine().phase() == Some(crate::update::Phase::Downloaded) && !self.busy()
                    {
                        self.input(Input::Idle, &mut fetch);
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
    }

    fn busy(&self) -> bool {
        self.busy.load(Ordering::Relaxed)
    }

    fn input(&mut self, input: Input, fetch: &mut HttpsFetch) {
        let busy = self.busy();
        if let Err(e) = self.updater.handle(input, busy, fetch) {
            tracing::error!(device_id = %self.opts.device_id, error = %e, "update state");
        }
        self.publish_running();
    }

    fn publish_running(&self) {
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = Running::of(&self.updater);
    }

    fn refuse(&self, offer: &UpdateOffer, code: &str, detail: String) {
        tracing::warn!(device_id = %self.opts.device_id, rollout = %offer.rollout_id, code, %detail, "update offer refused");
        let _ = self.reports.send(UpdateReport {
            device_id: self.opts.device_id.clone(),
            rollout_id: offer.rollout_id.clone(),
            version: offer.version.clone(),
            status: UpdateStatus::Refused as i32,
            code: code.into(),
            detail,
            running_version: self.updater.engine().running.version.clone(),
            time_unix_ms: crate::link::now_ms(),
        });
    }

    /// Checks the offer against the signed release metadata, then hands it to the
    /// engine.
    fn offer(&mut self, offer: UpdateOffer, trust: &TrustRoot, fetch: &mut HttpsFetch) {
        if let Some(rx) = &mut self.opts.tls_updates
            && rx.has_changed().unwrap_or(false)
        {
            self.https = Https::new(rx.borrow_and_update().clone());
            fetch.https = self.https.clone();
        }
        // A repeat of the offer under way: the engine answers where it is.
        let repeat =
            self.updater.engine().job.as_ref().is_some_and(|j| j.offer.rollout_id == offer.rollout_id);
        let checked = if repeat { Ok(None) } else { self.check(&offer, trust).map(Some) };
        let url = match checked {
            Ok(Some(c)) => format!("{}{}.{}", offer.targets_url, c.sha256, c.target),
            Ok(None) => self.updater.engine().job.as_ref().map(|j| j.offer.url.clone()).unwrap_or_default(),
            Err((code, detail)) => return self.refuse(&offer, code, detail),
        };
        let action = match UpdateAction::try_from(offer.action).unwrap_or(UpdateAction::Soft) {
            UpdateAction::DownloadOnly => ActionType::DownloadOnly,
            UpdateAction::Forced => ActionType::Forced,
            _ => ActionType::Soft,
        };
        let engine_offer = match &self.updater.engine().job {
            Some(j) if repeat => j.offer.clone(),
            _ => Offer {
                rollout_id: offer.rollout_id.clone(),
                version: offer.version.clone(),
                model: offer.model.clone(),
                release_counter: offer.release_counter,
                sha256: offer.sha256.clone(),
                length: offer.length,
                action,
                url,
            },
        };
        self.input(Input::Offer(engine_offer), fetch);
    }

    fn check(
        &self,
        offer: &UpdateOffer,
        trust: &TrustRoot,
    ) -> Result<client::Checked, (&'static str, String)> {
        let dir = self.opts.dir.join("update");
        let datastore = dir.join("tuf");
        std::fs::create_dir_all(&datastore)
            .map_err(|e| (code::STORAGE, format!("{}: {e}", datastore.display())))?;
        let metadata = url::Url::parse(&offer.metadata_url)
            .map_err(|e| (code::MALFORMED, format!("metadata_url {:?}: {e}", offer.metadata_url)))?;
        let targets = url::Url::parse(&offer.targets_url)
            .map_err(|e| (code::MALFORMED, format!("targets_url {:?}: {e}", offer.targets_url)))?;
        let anchored = dir.join("tuf-root.json");
        let root = match std::fs::read(&anchored) {
            Ok(b) => b,
            Err(_) => {
                let url = metadata.join("1.root.json").map_err(|e| (code::MALFORMED, e.to_string()))?;
                self.rt
                    .block_on(async {
                        let resp = self.https.get(&url, None).await?;
                        resp.into_body().collect().await.map(|b| b.to_bytes().to_vec()).map_err(|e| {
                            nanofleet_firmware::https::GetError {
                                url: url.to_string(),
                                reason: e.to_string(),
                                status: None,
                            }
                        })
                    })
                    .map_err(|e| (client::code::METADATA, e.to_string()))?
            }
        };
        let repo = self
            .rt
            .block_on(client::load(&root, trust, metadata, targets, &datastore, self.https.clone()))
            .map_err(|r| (r.code, r.detail))?;
        if !anchored.exists() {
            crate::slots::write_synced(&anchored, &root)
                .map_err(|e| (code::STORAGE, format!("{}: {e}", anchored.display())))?;
        }
        let checked =
            client::check(&repo, trust, &offer.target, &self.opts.model, self.updater.engine().counter_floor)
                .map_err(|r| (r.code, r.detail))?;
        if checked.sha256 != offer.sha256.to_ascii_lowercase()
            || checked.length != offer.length
            || checked.version != offer.version
            || checked.release_counter != offer.release_counter
        {
            return Err((
                code::OFFER_MISMATCH,
                format!(
                    "offer says {} {} bytes sha256 {} counter {}; the signed release says {} {} bytes sha256 {} counter {}",
                    offer.version,
                    offer.length,
                    offer.sha256,
                    offer.release_counter,
                    checked.version,
                    checked.length,
                    checked.sha256,
                    checked.release_counter
                ),
            ));
        }
        Ok(checked)
    }
}

/// Downloads over HTTPS with range requests, on the runtime of the agent.
struct HttpsFetch {
    https: Https,
    rt: tokio::runtime::Handle,
    /// A power-cut drill: hang after the first part arrived.
    hang: Option<HangAt>,
}

impl Fetch for HttpsFetch {
    fn fetch(&mut self, url: &str, offset: u64, out: &mut dyn std::io::Write) -> Result<u64, String> {
        let url = url::Url::parse(url).map_err(|e| format!("image address {url:?}: {e}"))?;
        self.rt.block_on(async {
            let resp =
                self.https.get(&url, (offset > 0).then_some(offset)).await.map_err(|e| e.to_string())?;
            if offset > 0 && resp.status() != 206 {
                return Err(format!("{url}: the server ignored the range request (HTTP {})", resp.status()));
            }
            let mut body = resp.into_body();
            let mut n = 0u64;
            while let Some(data) =
                self.https.next_chunk(&mut body).await.map_err(|e| format!("{url}: {e}"))?
            {
                if let Some(at) = self.hang {
                    // Half of what arrived is on disk when the power goes.
                    out.write_all(&data[..data.len() / 2])
                        .map_err(|e| format!("writing the download: {e}"))?;
                    out.flush().map_err(|e| format!("writing the download: {e}"))?;
                    crate::slots::hang(at);
                }
                out.write_all(&data).map_err(|e| format!("writing the download: {e}"))?;
                n += data.len() as u64;
            }
            Ok(n)
        })
    }
}

/// The protobuf form of an engine report.
pub fn report_pb(device_id: &str, r: &Report) -> UpdateReport {
    UpdateReport {
        device_id: device_id.into(),
        rollout_id: r.rollout_id.clone(),
        version: r.version.clone(),
        status: match r.status {
            Status::Refused => UpdateStatus::Refused,
            Status::Downloading => UpdateStatus::Downloading,
            Status::Downloaded => UpdateStatus::Downloaded,
            Status::Deferred => UpdateStatus::Deferred,
            Status::Installing => UpdateStatus::Installing,
            Status::Rebooting => UpdateStatus::Rebooting,
            Status::Verifying => UpdateStatus::Verifying,
            Status::Committed => UpdateStatus::Committed,
            Status::RolledBack => UpdateStatus::RolledBack,
            Status::Failed => UpdateStatus::Failed,
            Status::Cancelled => UpdateStatus::Cancelled,
        } as i32,
        code: r.code.clone(),
        detail: r.detail.clone(),
        running_version: r.running_version.clone(),
        time_unix_ms: crate::link::now_ms(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use nanofleet_recipe::dsse::{FIRMWARE_PAYLOAD_TYPE, sign};

    fn fleet() -> (TrustRoot, SigningKey) {
        let root_key = SigningKey::from_bytes(&[1; 32]);
        let director = SigningKey::from_bytes(&[2; 32]);
        let v1 = TrustRoot::initial(&root_key, "2046-11-26T00:00:00Z");
        let mut body = v1.successor_body();
        body.add_role_key(nanofleet_firmware::ONLINE_ROLE, &director.verifying_key(), None);
        (TrustRoot::signed_by(body, &[&root_key]), director)
    }

    fn offer(device: &str, expires: i64) -> UpdateOffer {
        UpdateOffer {
            rollout_id: "ro-1".into(),
            device_id: device.into(),
            target: "NF-200-2.4.0.img".into(),
            version: "2.4.0".into(),
            expires_unix_ms: expires,
            ..UpdateOffer::default()
        }
    }

    fn code_of(r: Result<UpdateOffer, (String, &'static str, String)>) -> &'static str {
        match r {
            Ok(_) => "accepted",
            Err((_, code, _)) => code,
        }
    }

    #[test]
    fn an_offer_signed_by_the_director_for_this_device_in_time_is_taken() {
        let (trust, director) = fleet();
        let env = sign(FIRMWARE_PAYLOAD_TYPE, &offer("NF-1", 2_000).encode_to_vec(), &director);
        let o = verify_offer(&env, &trust, "NF-1", 1_000).unwrap();
        assert_eq!(o.version, "2.4.0");
    }

    #[test]
    fn offers_not_signed_by_a_director_key_are_refused() {
        let (trust, _) = fleet();
        let stranger = SigningKey::from_bytes(&[9; 32]);
        let env = sign(FIRMWARE_PAYLOAD_TYPE, &offer("NF-1", 2_000).encode_to_vec(), &stranger);
        assert_eq!(code_of(verify_offer(&env, &trust, "NF-1", 1_000)), code::BAD_SIGNATURE);
        // A director's key that the device's trust root does not name yet counts as a stranger's.
        let (_, director) = fleet();
        let old = TrustRoot::initial(&SigningKey::from_bytes(&[1; 32]), "2046-11-26T00:00:00Z");
        let env = sign(FIRMWARE_PAYLOAD_TYPE, &offer("NF-1", 2_000).encode_to_vec(), &director);
        assert_eq!(code_of(verify_offer(&env, &old, "NF-1", 1_000)), code::BAD_SIGNATURE);
    }

    #[test]
    fn a_tampered_offer_another_payload_type_another_device_or_an_expired_offer_is_refused() {
        let (trust, director) = fleet();
        let mut env = sign(FIRMWARE_PAYLOAD_TYPE, &offer("NF-1", 2_000).encode_to_vec(), &director);
        env.payload = offer("NF-1", 9_000_000).encode_to_vec();
        assert_eq!(code_of(verify_offer(&env, &trust, "NF-1", 1_000)), code::BAD_SIGNATURE, "tampered");
        let env = sign(
            nanofleet_recipe::dsse::DENY_LIST_PAYLOAD_TYPE,
            &offer("NF-1", 2_000).encode_to_vec(),
            &director,
        );
        assert_eq!(code_of(verify_offer(&env, &trust, "NF-1", 1_000)), code::BAD_SIGNATURE, "payload type");
        let env = sign(FIRMWARE_PAYLOAD_TYPE, &offer("NF-2", 2_000).encode_to_vec(), &director);
        assert_eq!(code_of(verify_offer(&env, &trust, "NF-1", 1_000)), code::WRONG_DEVICE);
        let env = sign(FIRMWARE_PAYLOAD_TYPE, &offer("NF-1", 2_000).encode_to_vec(), &director);
        assert_eq!(code_of(verify_offer(&env, &trust, "NF-1", 3_000)), code::EXPIRED);
    }
}
