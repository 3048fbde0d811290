//! The fleet simulator: many simulated devices in one process, each with its own MQTT
//! connection, for demos and load tests.
//!
//! To give monitoring something to find, faults can age in simulated time (a worn
//! pump, a slowly warming chamber; see [`FleetOptions::time_scale`]) and the first
//! site can hold a bad cartridge lot ([`FleetOptions::bad_lot`]).

use std::collections::{BTreeSet, HashSet};
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

/// The cartridge lots every simulated site holds.
pub const COMMON_LOTS: [&str; 2] = ["L2611-A", "L2611-B"];

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
    /// Simulated time per real time for the ageing of faults (2,000: a real minute is
    /// about 33 simulated hours): pump wear and slow drift start at nothing and grow
    /// (see [`SimDevice::set_time_scale`]), and with a `fault_rate` above 0 the first
    /// site has at least one device with each. `None`: faults at full severity from
    /// the start.
    pub time_scale: Option<f64>,
    /// A degraded cartridge lot (larger particles, lower encapsulation) that the first
    /// site holds besides [`COMMON_LOTS`]: its simulated pharmacist loads it in about
    /// a third of the runs. No other site holds it.
    pub bad_lot: Option<String>,
    /// New connections per second while the fleet starts.
    pub connect_rate: f64,
    pub link: LinkOptions,
    /// Where each device keeps its sequence numbers; None numbers from the clock.
    pub state_dir: Option<PathBuf>,
    pub seed: u64,
    pub model: String,
    pub firmware_version: String,
    /// Every fourth device of each site (the 4th, 8th, …) runs this firmware instead:
    /// a canary group on a newer release, for cohort comparisons.
    pub newer_firmware: Option<String>,
    /// Devices enroll (or load the credentials they saved in `state_dir`) and connect
    /// over mutual TLS; `None` connects in plaintext (development listener).
    pub enrollment: Option<FleetEnrollment>,
    /// With `enrollment`: connect to the MQTT address the server gave each device at
    /// enrollment, not to `link`'s broker.
    pub broker_from_enrollment: bool,
    /// Simulated pharmacists start runs on devices that hold a recipe.
    pub auto_runs: Option<crate::runs::AutoRuns>,
    /// With `auto_runs`: the pharmacist who starts the runs at a site, by site id
    /// (others: `auto_runs`' operator).
    pub site_operators: std::collections::HashMap<String, nanofleet_proto::device::v1::Person>,
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
            time_scale: None,
            bad_lot: None,
            connect_rate: 2_000.0,
            link: LinkOptions::default(),
            state_dir: None,
            seed: 42,
            model: "NF-200".into(),
            firmware_version: "2.3.1".into(),
            newer_firmware: None,
            enrollment: None,
            broker_from_enrollment: false,
            auto_runs: None,
            site_operators: std::collections::HashMap::new(),
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
    /// Cartridge lots its site holds (its simulated pharmacist loads one per run).
    pub lots: Vec<String>,
    pub status: SharedStatus,
}

/// A running simulated fleet.
#[derive(Debug)]
pub struct Fleet {
    pub devices: Vec<SimDeviceHandle>,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
}

/// The cartridge lots site number `index` (from 0) holds: the simulated pharmacist's
/// own list if it has one, else [`COMMON_LOTS`]; the first site also holds the bad lot.
fn site_lots(opts: &FleetOptions, index: usize) -> Vec<String> {
    let mut lots = match &opts.auto_runs {
        Some(auto) if !auto.lots.is_empty() => auto.lots.clone(),
        _ => COMMON_LOTS.iter().map(|l| (*l).to_owned()).collect(),
    };
    if let Some(bad) = &opts.bad_lot
        && index == 0
        && !lots.contains(bad)
    {
        lots.push(bad.clone());
    }
    lots
}

/// Makes sure the first site (whose devices `first_site` indexes) has a device with
/// each ageing fault, so a demo always has a drifting device to find: a healthy device
/// of the first site gets it, else one with an acute fault, else a healthy device
/// elsewhere. Chosen with `rng`, so the same seed picks the same devices.
fn ensure_ageing_faults(faults: &mut [Option<Fault>], first_site: usize, rng: &mut SmallRng) {
    let first_site = first_site.min(faults.len());
    for wanted in Fault::AGEING {
        if faults[..first_site].contains(&Some(wanted)) {
            continue;
        }
        let pick =
            |faults: &[Option<Fault>], range: std::ops::Range<usize>, ok: &dyn Fn(Option<Fault>) -> bool| {
                range.filter(|i| ok(faults[*i])).collect::<Vec<usize>>()
            };
        let acute = |f: Option<Fault>| f.is_some_and(|f| !Fault::AGEING.contains(&f));
        let mut candidates = pick(faults, 0..first_site, &|f| f.is_none());
        if candidates.is_empty() {
            candidates = pick(faults, 0..first_site, &acute);
        }
        if candidates.is_empty() {
            candidates = pick(faults, first_site..faults.len(), &|f| f.is_none());
        }
        if !candidates.is_empty() {
            faults[candidates[rng.random_range(0..candidates.len())]] = Some(wanted);
        }
    }
}

impl Fleet {
    /// Starts every device; connections ramp up at `connect_rate`.
    pub fn start(opts: &FleetOptions) -> Fleet {
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let mut rng = SmallRng::seed_from_u64(opts.seed);
        let mut devices = Vec::new();
        let gap = Duration::from_secs_f64(1.0 / opts.connect_rate.max(1.0));
        // Planned first, in the order the random numbers were always drawn, so a seed
        // gives the fleet it gave before.
        let mut planned = Vec::new();
        for (index, site) in sites(opts.sites).into_iter().enumerate() {
            let lots = site_lots(opts, index);
            for n in 1..=opts.devices_per_site {
                let info = DeviceInfo {
                    device_id: device_id(&site, n),
                    site_id: site.id.clone(),
                    model: opts.model.clone(),
                    firmware_version: match &opts.newer_firmware {
                        Some(newer) if n % 4 == 0 => newer.clone(),
                        _ => opts.firmware_version.clone(),
                    },
                };
                let fault = rng.random_bool(opts.fault_rate.clamp(0.0, 1.0)).then(|| {
                    let i = rng.random_range(0..Fault::ALL.len());
                    Fault::ALL[i]
                });
                let sim_seed: u64 = rng.random();
                planned.push((info, fault, lots.clone(), sim_seed));
            }
        }
        if opts.time_scale.is_some() && opts.fault_rate > 0.0 {
            let mut faults: Vec<Option<Fault>> = planned.iter().map(|p| p.1).collect();
            let mut picker = SmallRng::seed_from_u64(opts.seed ^ 0x5eed_a9e1);
            ensure_ageing_faults(&mut faults, opts.devices_per_site, &mut picker);
            for (p, f) in planned.iter_mut().zip(faults) {
                p.1 = f;
            }
        }
        let bad_lots: Arc<HashSet<String>> = Arc::new(opts.bad_lot.iter().cloned().collect());
        for (info, fault, lots, sim_seed) in planned {
            let status: SharedStatus = Arc::new(Mutex::new(LinkStatus::default()));
            devices.push(SimDeviceHandle {
                info: info.clone(),
                fault,
                lots: lots.clone(),
                status: status.clone(),
            });
            let delay = gap.mul_f64(devices.len() as f64 - 1.0);
            let mut link = opts.link.clone();
            let state_dir = opts.state_dir.clone();
            let enrollment = opts.enrollment.clone();
            let broker_from_enrollment = opts.broker_from_enrollment;
            let auto_runs = opts.auto_runs.clone().map(|a| {
                let a = a.with_lots(lots);
                match opts.site_operators.get(&info.site_id) {
                    Some(p) => a.with_operator(p.clone()),
                    None => a,
                }
            });
            let time_scale = opts.time_scale;
            let bad_lots = bad_lots.clone();
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
                            let (updates, rx) = tokio::sync::watch::channel(tls.clone());
                            if let (Some(_), Some(dir)) = (&book, &book_dir) {
                                let opts = crate::updates::UpdateOptions {
                                    dir: dir.clone(),
                                    device_id: info.device_id.clone(),
                                    model: info.model.clone(),
                                    factory_version: info.firmware_version.clone(),
                                    tls: tls.clone(),
                                    tls_updates: Some(rx.clone()),
                                    sim_hang_at: None,
                                };
                                match crate::updates::UpdateDesk::start(opts) {
                                    Ok(desk) => link.updates = Some(desk),
                                    Err(e) => tracing::error!(device_id = %info.device_id, error = %e, "firmware update state"),
                                }
                            }
                            link.recipes = book.map(|b| Arc::new(Mutex::new(b)));
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
                if let Some(scale) = time_scale {
                    sim.set_time_scale(scale);
                }
                sim.set_bad_lots(bad_lots);
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
        Fleet { devices, cancel, tasks }
    }

    /// The sites (ids) whose devices hold cartridge `lot`.
    pub fn sites_holding(&self, lot: &str) -> BTreeSet<&str> {
        self.devices
            .iter()
            .filter(|d| d.lots.iter().any(|l| l == lot))
            .map(|d| d.info.site_id.as_str())
            .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_first_site_holds_the_bad_lot_besides_the_common_ones() {
        let opts = FleetOptions { bad_lot: Some("L2611-X".into()), ..FleetOptions::default() };
        assert_eq!(site_lots(&opts, 0), ["L2611-A", "L2611-B", "L2611-X"]);
        assert_eq!(site_lots(&opts, 1), COMMON_LOTS);
        assert_eq!(site_lots(&FleetOptions::default(), 0), COMMON_LOTS);
    }

    #[test]
    fn the_first_site_always_gets_a_worn_pump_and_a_drifting_chamber() {
        for seed in 0..50 {
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut faults = vec![None, Some(Fault::Bubbles), None, None, Some(Fault::PumpWear), None];
            ensure_ageing_faults(&mut faults, 3, &mut rng);
            assert!(faults[..3].contains(&Some(Fault::PumpWear)), "{faults:?}");
            assert!(faults[..3].contains(&Some(Fault::SlowDrift)), "{faults:?}");
            assert_eq!(faults[3..], [None, Some(Fault::PumpWear), None], "other sites untouched");
        }
        // A site of one device: the second ageing fault goes to a healthy device elsewhere.
        let mut faults = vec![None, None, Some(Fault::Bubbles)];
        ensure_ageing_faults(&mut faults, 1, &mut SmallRng::seed_from_u64(1));
        assert_eq!(faults, [Some(Fault::PumpWear), Some(Fault::SlowDrift), Some(Fault::Bubbles)]);
    }
}
