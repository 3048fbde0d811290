//! The fleet simulator: many simulated devices in one process, each with its own MQTT
//! connection, for demos and load tests.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

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
}

const HOSPITALS: &[(&str, &str, &str)] = &[
    ("st-marys-london", "St Mary's Hospital Pharmacy, London", "SMH"),
    ("karolinska-solna", "Karolinska University Hospital Pharmacy, Solna", "KUH"),
    ("charite-berlin", "Charité Hospital Pharmacy, Berlin", "CHB"),
    ("mgh-boston", "Massachusetts General Hospital Pharmacy, Boston", "MGH"),
    ("hug-geneva", "Geneva University Hospitals Pharmacy", "HUG"),
    ("rigshospitalet-cph", "Rigshospitalet Pharmacy, Copenhagen", "RHC"),
];

/// The first `n` sites of the simulated fleet: named hospitals, then numbered ones.
pub fn sites(n: usize) -> Vec<SimSite> {
    (0..n)
        .map(|i| match HOSPITALS.get(i) {
            Some((id, name, code)) => {
                SimSite { id: (*id).into(), name: (*name).into(), code: (*code).into() }
            }
            None => SimSite {
                id: format!("site-{i:04}"),
                name: format!("Hospital {i:04} Pharmacy"),
                code: format!("S{i:04}"),
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
        }
    }
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
                    device_id: format!("NF-{}-{n:02}", site.code),
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
                let mut sim = SimDevice::new(info.clone(), rng.random());
                if let Some(f) = fault {
                    sim.inject(f);
                }
                let delay = gap.mul_f64(devices.len() as f64 - 1.0);
                let link = opts.link.clone();
                let state_dir = opts.state_dir.clone();
                let cancel = cancel.clone();
                tasks.spawn(async move {
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = cancel.cancelled() => return,
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
                    if let Err(e) = run_device(sim, link, seqs, cancel, status).await {
                        tracing::error!(device_id = %info.device_id, error = %e, "device stopped");
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
