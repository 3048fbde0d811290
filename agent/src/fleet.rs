//! The fleet simulator: many simulated devices in one process, each with its own MQTT
//! connection, for demos and load tests.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::enroll::Credentials;
use crate::hal::DeviceInfo;
use crate::link::{LinkOptions, LinkStatus, SharedStatus, run_device};
use crate::seq::SeqCounter;
use crate::sim::{Fault, SimDevice};

/// A hospital of the simulated fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimSite {
    pub id: String,
    pub name: String,
    /// Short code used in device ids.
    pub code: String,
    /// IANA time zone.
    pub time_zone: String,
}

const HOSPITALS: &[(&str, &str, &str, &str)] = &[
    ("st-marys-london", "St Mary's Hospital Pharmacy, London", "SMH", "Europe/London"),
    ("karolinska-solna", "Karolinska University Hospital Pharmacy, Solna", "KUH", "Europe/Stockholm"),
    ("charite-berlin", "Charité Hospital Pharmacy, Berlin", "CHB", "Europe/Berlin"),
    ("mgh-boston", "Massachusetts General Hospital Pharmacy, Boston", "MGH", "America/New_York"),
    ("hug-geneva", "Geneva University Hospitals Pharmacy", "HUG", "Europe/Zurich"),
    ("rigshospitalet-cph", "Rigshospitalet Pharmacy, Copenhagen", "RHC", "Europe/Copenhagen"),
];

/// The id of the `n`th (from 1) simulated device of `site`.
pub fn device_id(site: &SimSite, n: usize) -> String {
    format!("NF-{}-{n:02}", site.code)
}

/// The first `n` sites of the simulated fleet: named hospitals, then numbered ones.
pub fn sites(n: usize) -> Vec<SimSite> {
    (0..n)
        .map(|i| match HOSPITALS.get(i) {
            Some((id, name, code, tz)) => SimSite {
                id: (*id).into(),
                name: (*name).into(),
                code: (*code).into(),
                time_zone: (*tz).into(),
            },
            None => SimSite {
                id: format!("site-{i:04}"),
                name: format!("Hospital {i:04} Pharmacy"),
                code: format!("S{i:04}"),
                time_zone: "UTC".into(),
            },
        })
        .collect()
}

/// What to simulate.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    pub sites: usize,
    pub devices_per_site: usize,
    /// Fraction of devices (0 to 1) that get one random fault.
    pub fault_rate: f64,
    /// New connections per second while the fleet starts.
    pub connect_rate: f64,
    pub link: LinkOptions,
    /// Where each device keeps its sequence numbers; None numbers from the clock.
    pub state_dir: Option<PathBuf>,
    pub seed: u64,
    pub model: String,
    pub firmware_version: String,
    /// Devices enroll (or load the credentials they saved in `state_dir`) and connect
    /// over mutual TLS; `None` connects in plaintext (development listener).
    pub enrollment: Option<FleetEnrollment>,
    /// With `enrollment`: connect to the MQTT address the server gave each device at
    /// enrollment, not to `link`'s broker.
    pub broker_from_enrollment: bool,
    /// Simulated pharmacists start runs on devices that hold a recipe.
    pub auto_runs: Option<crate::runs::AutoRuns>,
}

/// How simulated devices get their certificates.
#[derive(Debug, Clone)]
pub struct FleetEnrollment {
    /// The server's gRPC address, `https://host:port`.
    pub server: String,
    pub tokens: Tokens,
}

/// Enrollment tokens for a simulated fleet.
#[derive(Clone)]
pub enum Tokens {
    /// One token per device, by the device id the simulator plans for it.
    PerDevice(std::collections::HashMap<String, String>),
    /// One multi-use token for every device; the server assigns the ids.
    Shared(String),
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tokens::PerDevice(m) => write!(f, "PerDevice({} tokens)", m.len()),
            Tokens::Shared(_) => write!(f, "Shared"),
        }
    }
}

impl Default for FleetOptions {
    fn default() -> Self {
        FleetOptions {
            sites: 3,
            devices_per_site: 8,
            fault_rate: 0.15,
            connect_rate: 2_000.0,
            link: LinkOptions::default(),
            state_dir: None,
            seed: 42,
            model: "NF-200".into(),
            firmware_version: "2.3.1".into(),
            enrollment: None,
            broker_from_enrollment: false,
            auto_runs: None,
        }
    }
}

/// Where a simulated device keeps its credentials.
fn identity_dir(state_dir: Option<&std::path::Path>, planned: &DeviceInfo) -> Option<PathBuf> {
    state_dir.map(|d| crate::enroll::identity_dir(&d.join(&planned.device_id)))
}

/// The saved credentials of a simulated device, or new ones from enrollment (saved
/// when there is a state directory).
async fn credentials(
    en: &FleetEnrollment,
    planned: &DeviceInfo,
    state_dir: Option<&std::path::Path>,
) -> Result<Credentials, crate::enroll::Error> {
    let dir = identity_dir(state_dir, planned);
    if let Some(dir) = &dir
        && let Some(c) = Credentials::load(dir)?
    {
        return Ok(c);
    }
    let token = match &en.tokens {
        Tokens::PerDevice(m) => m.get(&planned.device_id).cloned().unwrap_or_default(),
        Tokens::Shared(t) => t.clone(),
    };
    let serial = format!("SIM-{}", planned.device_id);
    let c = crate::enroll::enroll(&en.server, &token, &planned.model, &serial).await?;
    if let Some(dir) = &dir {
        c.save(dir)?;
    }
    Ok(c)
}

/// One simulated device's identity and status.
#[derive(Debug, Clone)]
pub struct SimDeviceHandle {
    pub info: DeviceInfo,
    pub fault: Option<Fault>,
    pub status: SharedStatus,
}

/// A running simulated fleet.
#[derive(Debug)]
pub struct Fleet {
    pub devices: Vec<SimDeviceHandle>,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
}

impl Fleet {
    /// Starts every device; connections ramp up at `connect_rate`.
    pub fn start(opts: &FleetOptions) -> Fleet {
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let mut rng = SmallRng::seed_from_u64(opts.seed);
        let mut devices = Vec::new();
        let gap = Duration::from_secs_f64(1.0 / opts.connect_rate.max(1.0));
        for site in sites(opts.sites) {
            for n in 1..=opts.devices_per_site {
                let info = DeviceInfo {
                    device_id: device_id(&site, n),
                    site_id: site.id.clone(),
                    model: opts.model.clone(),
                    firmware_version: opts.firmware_version.clone(),
                };
                let fault = rng.random_bool(opts.fault_rate.clamp(0.0, 1.0)).then(|| {
                    let i = rng.random_range(0..Fault::ALL.len());
                    Fault::ALL[i]
                });
                let status: SharedStatus = Arc::new(Mutex::new(LinkStatus::default()));
                devices.push(SimDeviceHandle { info: info.clone(), fault, status: status.clone() });
                let sim_seed: u64 = rng.random();
                let delay = gap.mul_f64(devices.len() as f64 - 1.0);
                let mut link = opts.link.clone();
                let state_dir = opts.state_dir.clone();
                let enrollment = opts.enrollment.clone();
                let broker_from_enrollment = opts.broker_from_enrollment;
                let auto_runs = opts.auto_runs.clone();
                let cancel = cancel.clone();
                tasks.spawn(async move {
                    let mut info = info;
                    let mut renewal = None;
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = cancel.cancelled() => return,
                    }
                    if let Some(en) = &enrollment {
                        let creds = tokio::select! {
                            c = credentials(en, &info, state_dir.as_deref()) => c,
                            _ = cancel.cancelled() => return,
                        };
                        let dir = identity_dir(state_dir.as_deref(), &info);
                        match creds.and_then(|c| Ok((c.client_config_arc()?, c))) {
                            Ok((tls, c)) => {
                                if broker_from_enrollment {
                                    match crate::link::parse_host_port(&c.mqtt_address) {
                                        Ok((host, port)) => (link.broker_host, link.broker_port) = (host, port),
                                        Err(e) => {
                                            tracing::error!(device_id = %c.device_id, error = %e, "mqtt address from enrollment");
                                            return;
                                        }
                                    }
                                }
                                info.device_id.clone_from(&c.device_id);
                                info.site_id.clone_from(&c.site_id);
                                let book_dir = state_dir.as_ref().map(|d| d.join(&info.device_id));
                                let book = match crate::recipes::RecipeBook::for_device(&c, book_dir.as_deref()) {
                                    Ok(book) => book,
                                    Err(e) => {
                                        tracing::error!(device_id = %c.device_id, error = %e, "recipe book");
                                        return;
                                    }
                                };
                                let mut signer = None;
                                if let Some(book) = &book {
                                    match crate::runs::desk_for_device(&c, book, &info, book_dir.as_deref()) {
                                        Ok((desk, s)) => {
                                            link.runs = Some(Arc::new(Mutex::new(desk)));
                                            signer = Some(s);
                                        }
                                        Err(e) => {
                                            tracing::error!(device_id = %c.device_id, error = %e, "run desk");
                                            return;
                                        }
                                    }
                                    if let Some(auto) = &auto_runs {
                                        link.auto_runs = Some(auto.clone());
                                    }
                                }
                                link.recipes = book.map(|b| Arc::new(Mutex::new(b)));
                                let (updates, rx) = tokio::sync::watch::channel(tls.clone());
                                link.tls = Some(tls);
                                link.tls_updates = Some(rx);
                                let stop = cancel.child_token();
                                renewal = Some((
                                    crate::enroll::keep_renewed(c, dir, updates, signer, stop.clone()),
                                    stop,
                                ));
                            }
                            Err(e) => {
                                tracing::error!(device_id = %info.device_id, error = %e, "device not enrolled");
                                return;
                            }
                        }
                    }
                    let mut sim = SimDevice::new(info.clone(), sim_seed);
                    if let Some(f) = fault {
                        sim.inject(f);
                    }
                    let seqs = match &state_dir {
                        Some(dir) => match SeqCounter::load(dir, &info.device_id) {
                            Ok(s) => s,
                            Err(e) => {
                                tracing::error!(device_id = %info.device_id, error = %e, "device not started");
                                return;
                            }
                        },
                        None => SeqCounter::from_clock(),
                    };
                    let device = async {
                        if let Err(e) = run_device(sim, link, seqs, cancel.clone(), status).await {
                            tracing::error!(device_id = %info.device_id, error = %e, "device stopped");
                        }
                    };
                    match renewal {
                        Some((renewal, stop)) => {
                            let device = async {
                                device.await;
                                stop.cancel();
                            };
                            tokio::join!(device, renewal);
                        }
                        None => device.await,
                    }
                });
            }
        }
        Fleet { devices, cancel, tasks }
    }

    /// Devices currently connected.
    pub fn connected(&self) -> usize {
        self.devices.iter().filter(|d| d.status.lock().map(|s| s.connected).unwrap_or(false)).count()
    }

    /// Sum of every device's status.
    pub fn totals(&self) -> LinkStatus {
        let mut t = LinkStatus::default();
        for d in &self.devices {
            let s = d.status.lock().unwrap_or_else(|p| p.into_inner());
            t.connected |= s.connected;
            t.connects += s.connects;
            t.disconnects += s.disconnects;
            t.telemetry_batches += s.telemetry_batches;
            t.event_batches += s.event_batches;
            t.outbox.queued += s.outbox.queued;
            t.outbox.acked += s.outbox.acked;
            t.outbox.refused += s.outbox.refused;
            t.outbox.resent += s.outbox.resent;
            t.outbox.overflowed += s.outbox.overflowed;
        }
        t
    }

    /// Stops every device: each publishes its death and disconnects.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}
