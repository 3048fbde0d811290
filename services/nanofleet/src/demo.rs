//! `nanofleet demo`: a server with an in-process simulated fleet of hospitals.

use std::time::Duration;

use nanofleet_agent::fleet::{self, Fleet, FleetEnrollment, FleetOptions, Tokens};
use nanofleet_agent::link::LinkOptions;
use nanofleet_agent::runs::{AutoRuns, Shelves};
use nanofleet_agent::sim::{self, Fault};
use nanofleet_api::{Actor, Caller};
use nanofleet_proto::device::v1::{Person, RunPhase};
use nanofleet_proto::device::v1::{SignatureMeaning, Targets};
use nanofleet_proto::v1 as pb;

use crate::server::{self, Server};

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct Options {
    pub server: server::Options,
    pub sites: usize,
    pub devices_per_site: usize,
    /// Fraction of simulated devices with an injected fault.
    pub fault_rate: f64,
    /// Simulated time per real time for the ageing of faults (pump wear, slow drift);
    /// `None`: faults at full severity from the start.
    pub time_scale: Option<f64>,
    /// A degraded cartridge lot the first hospital holds and uses in about a third of
    /// its runs.
    pub bad_lot: Option<String>,
    pub sample_interval: Duration,
    pub batch_interval: Duration,
}

/// A running demo: the server and the simulated fleet.
#[derive(Debug)]
pub struct Demo {
    pub server: Server,
    pub fleet: Fleet,
    pub people: DemoPeople,
    data_dir: std::path::PathBuf,
    time_scale: Option<f64>,
    bad_lot: Option<String>,
}

/// The demo's pharmacists (one per hospital) and QA reviewer, with their passwords:
/// they sign the demo's recipe, and anyone trying the demo may sign as them.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DemoPeople {
    /// The first hospital's pharmacist.
    pub pharmacist: String,
    pub pharmacist_password: String,
    pub qa: String,
    pub qa_password: String,
    /// The first hospital.
    pub site: String,
    /// The other hospitals' pharmacists (data directories of earlier versions lack
    /// them; they are added at the next start).
    #[serde(default)]
    pub other_pharmacists: Vec<SitePharmacist>,
}

/// A hospital's pharmacist in the demo.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SitePharmacist {
    pub site: String,
    pub user_id: String,
    pub password: String,
    pub printed_name: String,
}

/// Printed name of the first hospital's pharmacist.
const DEMO_PHARMACIST_NAME: &str = "Alice Martin, PharmD";
/// Printed names of the other hospitals' pharmacists, in site order.
const OTHER_PHARMACIST_NAMES: [&str; 5] = [
    "Ben Okoro, PharmD",
    "Chiara Rossi, PharmD",
    "Dmitri Volkov, PharmD",
    "Esther Lindqvist, PharmD",
    "Farah Haddad, PharmD",
];

/// The recipe the demo releases to each hospital (one version per hospital, signed by
/// its own pharmacist).
pub const DEMO_RECIPE: &str = "flu-h5-mrna";

/// The firmware every fourth device runs in the demo: a canary group to compare.
pub const DEMO_NEWER_FIRMWARE: &str = "2.4.0";

impl DemoPeople {
    /// Created on the first run; read back (DATA_DIR/demo-people.json, 0600) after.
    async fn ensure(
        server: &Server,
        data_dir: &std::path::Path,
        sites: &[String],
    ) -> Result<DemoPeople, server::Error> {
        let path = data_dir.join("demo-people.json");
        let admin = Caller {
            person_id: "system".into(),
            display_name: "Nanofleet demo".into(),
            role: nanofleet_api::Role::Ops,
            site_id: None,
            credential_id: String::new(),
        };
        let create = |id: &str, name: &str, role: pb::Role, site: &str| pb::CreatePersonRequest {
            id: id.into(),
            display_name: name.into(),
            role: role as i32,
            site_id: site.into(),
            reason: "demo: signs the demo's recipe".into(),
        };
        let first = sites.first().cloned().unwrap_or_default();
        let mut people = match std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| serde_json::from_str::<DemoPeople>(&text).ok())
        {
            Some(p) => p,
            None => {
                let (_, pharmacist_password) = server
                    .people
                    .create_person(
                        &admin,
                        &create("demo.pharmacist", DEMO_PHARMACIST_NAME, pb::Role::Pharmacist, &first),
                    )
                    .await?;
                let (_, qa_password) = server
                    .people
                    .create_person(&admin, &create("demo.qa", "Quinn Okafor (QA)", pb::Role::Qa, ""))
                    .await?;
                DemoPeople {
                    pharmacist: "demo.pharmacist".into(),
                    pharmacist_password,
                    qa: "demo.qa".into(),
                    qa_password,
                    site: first,
                    other_pharmacists: Vec::new(),
                }
            }
        };
        let mut added = false;
        for (i, site) in sites.iter().enumerate().skip(1) {
            if *site == people.site || people.other_pharmacists.iter().any(|p| p.site == *site) {
                continue;
            }
            let user_id = format!("demo.pharmacist{}", i + 1);
            let printed_name = OTHER_PHARMACIST_NAMES[(i - 1) % OTHER_PHARMACIST_NAMES.len()].to_owned();
            let (_, password) = server
                .people
                .create_person(&admin, &create(&user_id, &printed_name, pb::Role::Pharmacist, site))
                .await?;
            people.other_pharmacists.push(SitePharmacist {
                site: site.clone(),
                user_id,
                password,
                printed_name,
            });
            added = true;
        }
        if added || !path.exists() {
            nanofleet_pki::write_private(
                &path,
                serde_json::to_string_pretty(&people).unwrap_or_default().as_bytes(),
            )?;
        }
        Ok(people)
    }

    /// Every hospital's pharmacist, the first hospital's first.
    pub fn pharmacists(&self) -> Vec<SitePharmacist> {
        let first = SitePharmacist {
            site: self.site.clone(),
            user_id: self.pharmacist.clone(),
            password: self.pharmacist_password.clone(),
            printed_name: DEMO_PHARMACIST_NAME.into(),
        };
        std::iter::once(first).chain(self.other_pharmacists.iter().cloned()).collect()
    }
}

/// Drafts, signs and approves the demo recipe for each hospital that has no version
/// of it yet, as that hospital's pharmacist and the QA reviewer would: a pharmacist
/// may target only their own site, so each hospital gets its own version.
async fn release_demo_recipe(
    recipes: nanofleet_api::Recipes,
    staff: nanofleet_api::People,
    people: DemoPeople,
) -> Result<(), nanofleet_api::Error> {
    let existing = recipes.list(&pb::ListRecipesRequest { recipe_id: DEMO_RECIPE.into(), status: 0 }).await?;
    let covered: std::collections::BTreeSet<String> = existing
        .iter()
        .filter_map(|v| v.recipe.as_ref())
        .filter_map(|r| r.targets.as_ref())
        .flat_map(|t| t.site_ids.iter().cloned())
        .collect();
    let qa = staff.verify_password(&people.qa, &people.qa_password, "demo recipe").await?;
    for p in people.pharmacists().into_iter().filter(|p| !covered.contains(&p.site)) {
        let pharmacist = staff.verify_password(&p.user_id, &p.password, "demo recipe").await?;
        let targets = Targets { site_ids: vec![p.site.clone()], device_ids: vec![] };
        let mut recipe = nanofleet_recipe::example::example(
            DEMO_RECIPE,
            0,
            targets,
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0),
        );
        recipe.name = "Flu H5 mRNA-LNP, 100 ug".into();
        // A quicker procedure than the example's, so the demo shows batches within
        // minutes: the same 2 mL collected, buffer exchanged at a higher flow.
        use nanofleet_recipe::example::step;
        recipe.procedure = vec![
            step(RunPhase::SelfTest, 3, 0.0),
            step(RunPhase::CartridgeVerify, 2, 0.0),
            step(RunPhase::Prime, 5, 2.0),
            step(RunPhase::Equilibrate, 5, 0.0),
            step(RunPhase::StartWaste, 3, 12.0),
            step(RunPhase::Collect, 10, 12.0),
            step(RunPhase::EndWaste, 3, 12.0),
            step(RunPhase::BufferExchange, 20, 18.0),
            step(RunPhase::Flush, 5, 6.0),
            step(RunPhase::QcSample, 5, 0.0),
        ];
        let version = recipes.save_draft(&pharmacist, recipe).await?.recipe.map_or(0, |r| r.version);
        let sign = |who: &Caller, password: &str, meaning: SignatureMeaning| pb::SignRecipeRequest {
            recipe_id: DEMO_RECIPE.into(),
            version,
            meaning: meaning as i32,
            user_id: who.person_id.clone(),
            password: password.into(),
        };
        recipes.sign(&pharmacist, &sign(&pharmacist, &p.password, SignatureMeaning::Authored)).await?;
        recipes.sign(&qa, &sign(&qa, &people.qa_password, SignatureMeaning::Approved)).await?;
        tracing::info!(recipe = DEMO_RECIPE, version, site = %p.site, "demo recipe released");
    }
    Ok(())
}

/// What `fault` does, with how fast it grows at `time_scale`.
/// The demo's firmware builds: a good one, and one that fails its health check.
pub const DEMO_GOOD_FIRMWARE: &str = "2.5.0";
pub const DEMO_FAULTY_FIRMWARE: &str = "2.6.0";

struct DemoFirmware {
    people: nanofleet_api::People,
    fleet: nanofleet_api::Fleet,
    firmware: nanofleet_api::Firmware,
    rollouts: nanofleet_api::Rollouts,
    store: nanofleet_store::Store,
    data_dir: std::path::PathBuf,
    admin_password: String,
    sites: Vec<String>,
    devices: usize,
}

/// Ships firmware to the demo fleet, as operations would: releases a good build and a
/// faulty one; rolls the good one out to the first hospitals in waves; offers it to the
/// last hospital too, whose maintenance window opens hours from now, so that rollout
/// waits; then rolls the faulty build out to the updated devices, whose canaries fail
/// their health check and roll back, which stops it. Done once per data directory.
async fn ship_demo_firmware(d: DemoFirmware) -> anyhow::Result<()> {
    if !d.rollouts.list("").await?.is_empty() || d.sites.len() < 2 {
        return Ok(());
    }
    // Most of the fleet online first, so the waves have devices to offer to.
    for _ in 0..60 {
        let online = d.store.list_devices(None).await?.iter().filter(|x| x.online).count();
        if online * 4 >= d.devices * 3 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let admin = d.people.verify_password("admin", &d.admin_password, "demo firmware").await?;
    let dir = d.data_dir.join("firmware-builds");
    std::fs::create_dir_all(&dir)?;
    let mut targets = Vec::new();
    for (version, fault, notes) in [
        (DEMO_GOOD_FIRMWARE, "none", "demo: pump pressure overshoot fixed"),
        (DEMO_FAULTY_FIRMWARE, "health", "demo: a build whose self-test fails"),
    ] {
        let header = nanofleet_agent::slots::ImageHeader {
            model: "NF-200".into(),
            version: version.into(),
            release_counter: 1,
            fault: fault.into(),
        };
        let image = nanofleet_agent::slots::sim_image(&header, 256 * 1024);
        std::fs::write(dir.join(format!("nf200-{version}.img")), &image)?;
        let h = pb::FirmwareHeader {
            model: "NF-200".into(),
            version: version.into(),
            release_counter: 1,
            length: image.len() as u64,
            sha256: String::new(),
            user_id: admin.person_id.clone(),
            password: d.admin_password.clone(),
            notes: notes.into(),
        };
        let chunks = futures::stream::iter([Ok::<_, nanofleet_api::Error>(image)]);
        targets.push(d.firmware.upload(&admin, h, chunks).await?.target);
    }
    let (first, last) = (d.sites[..d.sites.len() - 1].to_vec(), d.sites[d.sites.len() - 1].clone());
    // The last hospital updates at night only: its window opens hours from now.
    let tz = d
        .store
        .list_sites()
        .await?
        .into_iter()
        .find(|s| s.id == last)
        .map(|s| s.time_zone)
        .unwrap_or_default();
    let hour = jiff::tz::TimeZone::get(&tz).map(|z| jiff::Timestamp::now().to_zoned(z).hour()).unwrap_or(0);
    let start = (hour + 6) % 24;
    let window = format!("daily {start:02}:00-{:02}:00", (start + 2) % 24);
    d.fleet.set_window(&admin, &last, &window, "demo: this hospital updates at night").await?;
    let rollout =
        |target: &str, sites: Vec<String>, from: &str, canary: u32, steps: Vec<u32>, reason: &str| {
            pb::CreateRolloutRequest {
                target: target.into(),
                filter: Some(pb::RolloutFilter {
                    site_ids: sites,
                    from_versions: vec![from.into()],
                    ..Default::default()
                }),
                waves: Some(pb::WavePlan { canary, percent_steps: steps, ..Default::default() }),
                reason: reason.into(),
                ..Default::default()
            }
        };
    let good = d
        .rollouts
        .create(
            &admin,
            rollout(&targets[0], first.clone(), "2.3.1", 2, vec![50, 100], "demo: pump pressure fix"),
        )
        .await?;
    // Listings order rollouts by creation time: the night rollout is the newer one.
    tokio::time::sleep(Duration::from_millis(20)).await;
    d.rollouts
        .create(
            &admin,
            rollout(&targets[0], vec![last], "2.3.1", 1, vec![100], "demo: pump pressure fix, night window"),
        )
        .await?;
    // The faulty build goes to the devices the good one updated, once it is done.
    for _ in 0..600 {
        if matches!(d.rollouts.get(&good.rollout_id, false).await?.state.as_str(), "completed" | "cancelled")
        {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    d.rollouts
        .create(&admin, rollout(&targets[1], first, DEMO_GOOD_FIRMWARE, 2, vec![100], "demo: the next build"))
        .await?;
    Ok(())
}

fn fault_line(fault: Fault, time_scale: Option<f64>) -> String {
    // Real time that `days` of simulated time take.
    let real =
        |days: f64, x: f64| humantime::format_duration(Duration::from_secs((days * 86_400.0 / x) as u64));
    match (fault, time_scale) {
        (Fault::PumpWear, Some(x)) => format!(
            "pump wear (flow CV {} to {}, PDI past 0.2, over {} simulated days = {} real)",
            sim::FLOW_CV,
            sim::WORN_FLOW_CV,
            sim::PUMP_WEAR_DAYS,
            real(sim::PUMP_WEAR_DAYS, x)
        ),
        (Fault::SlowDrift, Some(x)) => format!(
            "slow drift (chamber +{} °C per simulated week = {} real, up to +{} °C; particles grow)",
            sim::DRIFT_C_PER_WEEK,
            real(7.0, x),
            sim::MAX_DRIFT_C
        ),
        (Fault::PumpWear, None) => format!("pump wear (flow CV {}, PDI past 0.2)", sim::WORN_FLOW_CV),
        (Fault::SlowDrift, None) => "slow drift (chamber warmer run after run)".into(),
        (Fault::PartialClog, _) => {
            "partial clog (pressure creeps up until an occlusion aborts the run)".into()
        }
        (Fault::Bubbles, _) => "bubbles (air in line aborts runs)".into(),
        (Fault::EthanolLineFault, _) => "ethanol line fault (FRR drift, encapsulation drops)".into(),
        (Fault::SensorCrc, _) => "sensor CRC errors (low-priority alarms)".into(),
    }
}

fn read_secret(path: &std::path::Path) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| format!("(see {})", path.display()))
}

impl Demo {
    /// Starts the server, creates the hospitals and one enrollment token per simulated
    /// device (as hospital IT would), and starts the fleet: each device enrolls with
    /// its token and connects over mutual TLS. On a data directory of an earlier run,
    /// devices reuse the certificates they saved.
    pub async fn start(opts: &Options) -> Result<Demo, server::Error> {
        let server = Server::start(&opts.server).await?;
        let state_dir = opts.server.data_dir.join("simulator");
        let first_site = fleet::sites(opts.sites.max(1)).first().map(|s| s.id.clone()).unwrap_or_default();
        server.ensure_site(&first_site, &first_site, "UTC").await?;
        let mut tokens = std::collections::HashMap::new();
        for site in fleet::sites(opts.sites) {
            server.ensure_site(&site.id, &site.name, &site.time_zone).await?;
            for n in 1..=opts.devices_per_site {
                let id = fleet::device_id(&site, n);
                if state_dir.join(&id).join("identity").join("identity.json").exists()
                    || server.store.get_device(&id).await?.is_some()
                {
                    continue;
                }
                let (_, secret) = server
                    .trust
                    .create_token(
                        &Actor::system(),
                        &site.id,
                        Duration::from_secs(600),
                        1,
                        &id,
                        "demo: hospital IT enrolls a simulated device",
                    )
                    .await?;
                tokens.insert(id, secret);
            }
        }
        let site_ids: Vec<String> = fleet::sites(opts.sites.max(1)).into_iter().map(|s| s.id).collect();
        let people = DemoPeople::ensure(&server, &opts.server.data_dir, &site_ids).await?;
        // The hospitals' cartridge shelves: the supply fills them, runs take from them.
        let shelves = Shelves::default();
        let fleet = Fleet::start(&FleetOptions {
            sites: opts.sites,
            devices_per_site: opts.devices_per_site,
            fault_rate: opts.fault_rate,
            time_scale: opts.time_scale,
            bad_lot: opts.bad_lot.clone(),
            link: LinkOptions {
                sample_interval: opts.sample_interval,
                batch_interval: opts.batch_interval,
                ..LinkOptions::to_broker(server.mqtt_addr)
            },
            // Sequence numbers and certificates survive a demo restart on the same data
            // directory.
            state_dir: Some(state_dir),
            enrollment: Some(FleetEnrollment {
                server: format!("https://{}", server.grpc_addr),
                tokens: Tokens::PerDevice(tokens),
            }),
            // The site's pharmacist starts runs at the devices' screens whenever a
            // device is idle and holds the recipe.
            auto_runs: Some(
                AutoRuns::new(
                    (Duration::from_secs(10), Duration::from_secs(40)),
                    Person { user_id: people.pharmacist.clone(), printed_name: DEMO_PHARMACIST_NAME.into() },
                )
                .with_shelves(shelves.clone()),
            ),
            site_operators: people
                .pharmacists()
                .into_iter()
                .map(|p| (p.site, Person { user_id: p.user_id, printed_name: p.printed_name }))
                .collect(),
            newer_firmware: Some(DEMO_NEWER_FIRMWARE.into()),
            ..FleetOptions::default()
        });
        // Released while the fleet connects: devices online get it at once, the others
        // right after they announce themselves.
        let release = release_demo_recipe(server.recipes.clone(), server.people.clone(), people.clone());
        tokio::spawn(async move {
            if let Err(e) = release.await {
                tracing::warn!(error = %e, "demo recipe not released");
            }
        });
        let ship = ship_demo_firmware(DemoFirmware {
            people: server.people.clone(),
            fleet: server.fleet.clone(),
            firmware: server.firmware.clone(),
            rollouts: server.rollouts.clone(),
            store: server.store.clone(),
            data_dir: opts.server.data_dir.clone(),
            admin_password: match &server.bootstrap {
                Some(b) => b.password.clone(),
                None => read_secret(&opts.server.data_dir.join("admin-password")),
            },
            sites: fleet::sites(opts.sites).into_iter().map(|s| s.id).collect(),
            devices: opts.sites * opts.devices_per_site,
        });
        tokio::spawn(async move {
            if let Err(e) = ship.await {
                tracing::warn!(error = %e, "demo firmware not shipped");
            }
        });
        let supply = run_demo_inventory(DemoInventory {
            inventory: server.inventory.clone(),
            people: server.people.clone(),
            store: server.store.clone(),
            staff: people.clone(),
            admin_password: match &server.bootstrap {
                Some(b) => b.password.clone(),
                None => read_secret(&opts.server.data_dir.join("admin-password")),
            },
            sites: site_ids.clone(),
            shelves,
            bad_lot: opts.bad_lot.clone(),
        });
        tokio::spawn(async move {
            if let Err(e) = supply.await {
                tracing::warn!(error = %e, "demo cartridge supply stopped");
            }
        });
        Ok(Demo {
            server,
            fleet,
            people,
            data_dir: opts.server.data_dir.clone(),
            time_scale: opts.time_scale,
            bad_lot: opts.bad_lot.clone(),
        })
    }

    /// What to tell the person who started the demo.
    pub fn banner(&self) -> String {
        let s = &self.server;
        let grpc = format!("https://{}", s.grpc_addr);
        let first = self.fleet.devices.first().map(|d| d.info.device_id.as_str()).unwrap_or("NF-SMH-01");
        let site = self.fleet.devices.first().map(|d| d.info.site_id.as_str()).unwrap_or("st-marys-london");
        format!(
            "Nanofleet demo: {} hospitals, {} simulated devices, enrolled with tokens, on mutual TLS\n\
             \n  dashboard  https://{}/\n  grpc       {grpc}\n  mqtt       mqtts://{} (client certificates)\n  \
             fleet CA   {} (sha256 {})\n\
             \n  login      admin / {}   (dashboard)\n  \
             pharmacist {} / {}   (site {}; signs recipes as author; the other sites' in demo-people.json)\n  \
             qa         {} / {}   (approves recipes, releases batches)\n\
             \nTry, in another terminal:\n  export NANOFLEET_SERVER={grpc} NANOFLEET_CA_FILE={}\n  \
             export NANOFLEET_TOKEN={}\n  nanofleet whoami\n  \
             nanofleet sites list\n  nanofleet devices list\n  nanofleet devices show {first}\n  \
             nanofleet telemetry {first} --since 1m\n  nanofleet enroll-token create --site {site} --expires 1h\n  \
             nanofleet devices list --output json\n  \
             nanofleet recipes list\n  nanofleet recipes show {DEMO_RECIPE}\n  nanofleet recipes deliveries {DEMO_RECIPE}\n  \
             nanofleet batches list   (runs end every few minutes at every hospital)\n  \
             nanofleet quality chart pdi --by device   (control charts; the dashboard's Quality page)\n  \
             nanofleet quality compare size_nm --by lot\n  \
             nanofleet quality gate --a firmware={DEMO_NEWER_FIRMWARE} --b firmware=2.3.1   (every 4th device runs {DEMO_NEWER_FIRMWARE})\n  \
             nanofleet telemetry {first} --metric total_flow --since 1h\n  nanofleet alerts list\n  \
             nanofleet rollouts list   (firmware {DEMO_GOOD_FIRMWARE} in waves; one hospital's window defers it; {DEMO_FAULTY_FIRMWARE} is stopped by its canaries)\n\
             {}\
             \nCtrl-C stops everything.",
            self.fleet
                .devices
                .iter()
                .map(|d| &d.info.site_id)
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            self.fleet.devices.len(),
            s.http_addr,
            s.mqtt_addr,
            s.ca.root_path().display(),
            s.ca.root_fingerprint(),
            self.admin_password(),
            self.people.pharmacist,
            self.people.pharmacist_password,
            self.people.site,
            self.people.qa,
            self.people.qa_password,
            s.ca.root_path().display(),
            self.admin_token(),
            self.to_find(),
        )
    }

    /// What the dashboard should reveal: which devices have which fault, and where the
    /// bad lot is; one line each.
    fn to_find(&self) -> String {
        let mut by_fault: std::collections::BTreeMap<String, Vec<&str>> = Default::default();
        for d in &self.fleet.devices {
            if let Some(f) = d.fault {
                by_fault.entry(fault_line(f, self.time_scale)).or_default().push(&d.info.device_id);
            }
        }
        let mut lines: Vec<String> =
            by_fault.into_iter().map(|(what, ids)| format!("  {}: {what}\n", ids.join(", "))).collect();
        if let Some(lot) = &self.bad_lot {
            for site in self.fleet.sites_holding(lot) {
                lines.push(format!(
                    "  {site}: bad cartridge lot {lot} (about a third of its runs; \
                     size +{} nm, encapsulation -{} points)\n",
                    sim::BAD_LOT_SIZE_NM,
                    sim::BAD_LOT_ENCAPSULATION_PCT
                ));
            }
        }
        if lines.is_empty() {
            return String::new();
        }
        let clock = match self.time_scale {
            Some(x) => format!(
                "simulated time x{x}: a real minute is {} of device ageing",
                humantime::format_duration(Duration::from_secs((60.0 * x).round() as u64))
            ),
            None => "faults at full severity from the start".into(),
        };
        format!("\nWhat the dashboard should reveal ({clock}):\n{}", lines.concat())
    }

    /// The initial administrator's password (this run's, or the one an earlier run on
    /// the same data directory wrote).
    pub fn admin_password(&self) -> String {
        match &self.server.bootstrap {
            Some(b) => b.password.clone(),
            None => read_secret(&self.data_dir.join("admin-password")),
        }
    }

    /// The initial administrator's API token.
    pub fn admin_token(&self) -> String {
        match &self.server.bootstrap {
            Some(b) => b.api_token.clone(),
            None => read_secret(&self.data_dir.join("admin.token")),
        }
    }

    /// Stops the devices (each says goodbye), then the server.
    pub async fn stop(self) {
        self.fleet.stop().await;
        self.server.shutdown().await;
    }
}

/// What the demo's pharmacy supply needs.
struct DemoInventory {
    inventory: nanofleet_api::Inventory,
    people: nanofleet_api::People,
    store: nanofleet_store::Store,
    staff: DemoPeople,
    admin_password: String,
    sites: Vec<String>,
    shelves: Shelves,
    bad_lot: Option<String>,
}

/// Cartridges per lot the demo registers.
const DEMO_LOT_SIZE: u32 = 4_000;
/// Largest order the demo places at once.
const DEMO_MAX_ORDER: u32 = 40;
/// Seconds a demo shipment travels.
const DEMO_TRANSIT: Duration = Duration::from_secs(30);
/// When QA recalls the bad lot, after the demo starts.
const DEMO_RECALL_AFTER: Duration = Duration::from_secs(240);

/// A logger's readings for a shipment that stayed cold: one a minute for an hour.
fn cold_readings(now: i64) -> Vec<pb::TemperatureReading> {
    (0..=60)
        .map(|m| pb::TemperatureReading {
            time_unix_ms: now - (60 - m) * 60_000,
            celsius: -76.0 + (m % 5) as f64 * 0.4,
        })
        .collect()
}

fn cartridge_of(code: &str, year: i16) -> Option<nanofleet_proto::device::v1::Cartridge> {
    let c = nanofleet_inventory::gs1::parse_cartridge(code, year).ok()?;
    Some(nanofleet_proto::device::v1::Cartridge {
        expires_unix_ms: c.expires_unix_ms(),
        gtin: c.gtin,
        lot: c.lot,
        serial: c.serial,
    })
}

/// The demo's pharmacy supply, as operations, QA and the hospitals would run it:
/// a cartridge type for the demo recipe and released lots; every hospital stocked by a
/// shipment received with its logger's readings; then, in a loop, an order shipped
/// wherever the stock falls to its reorder point (received after a short transit),
/// new lots as lots run out, and QA's recall of the bad lot a few minutes in, which
/// every device receives as a deny list. Runs take their cartridges from the shelves.
async fn run_demo_inventory(d: DemoInventory) -> anyhow::Result<()> {
    use nanofleet_recipe::example::EXAMPLE_GTIN;
    let started = std::time::Instant::now();
    let admin = d.people.verify_password("admin", &d.admin_password, "demo inventory").await?;
    let qa = d.people.verify_password(&d.staff.qa, &d.staff.qa_password, "demo inventory").await?;
    let mut pharmacists = std::collections::HashMap::new();
    for p in d.staff.pharmacists() {
        let caller = d.people.verify_password(&p.user_id, &p.password, "demo inventory").await?;
        pharmacists.insert(p.site.clone(), caller);
    }
    let inv = &d.inventory;
    if d.store.cartridge_type(EXAMPLE_GTIN).await?.is_none() {
        let t = pb::CartridgeType {
            gtin: EXAMPLE_GTIN.into(),
            name: "Flu H5 LNP cartridge 2 mL".into(),
            payload: "H5 HA mRNA, SM-102 / DSPC / cholesterol / PEG-lipid".into(),
            volume_ml: 2.0,
            storage_class: "ultra-cold".into(),
            excursion_limit_min: 30,
            device_models: vec!["NF-200".into()],
            lead_time_days: 3,
            recipe_ids: vec![],
        };
        inv.create_type(&admin, t).await?;
    }
    let today = jiff::Zoned::now().date();
    let mut lots: Vec<String> = nanofleet_agent::fleet::COMMON_LOTS.iter().map(|l| (*l).to_owned()).collect();
    lots.extend(d.bad_lot.clone());
    for lot in &lots {
        ensure_lot(inv, &d.store, &admin, &qa, lot, today).await?;
    }
    let year = today.year();
    // Shelves from what the hospitals hold (a restart), else a first shipment each.
    for site in &d.sites {
        for lot in &lots {
            let held = d.store.lot_cartridges(EXAMPLE_GTIN, lot, "in-stock", 100_000).await?;
            let held = held.into_iter().filter(|c| c.site_id == *site).map(|c| {
                nanofleet_proto::device::v1::Cartridge {
                    gtin: c.gtin,
                    lot: c.lot,
                    serial: c.serial,
                    expires_unix_ms: c.expires_ms,
                }
            });
            d.shelves.stock(site, held);
        }
    }
    let never_shipped = d.store.shipments(None, 1).await?.is_empty();
    if never_shipped {
        for (i, site) in d.sites.iter().enumerate() {
            let mut batches = Vec::new();
            let mut site_lots: Vec<&String> = nanofleet_agent::fleet::COMMON_LOTS
                .iter()
                .filter_map(|l| lots.iter().find(|x| *x == l))
                .collect();
            if i == 0
                && let Some(bad) = &d.bad_lot
            {
                site_lots.push(bad);
            }
            for lot in site_lots {
                batches
                    .push(ship_and_receive(inv, &admin, pharmacists.get(site), site, lot, 10, year).await?);
            }
            // Interleaved, so each lot is loaded in turn.
            let longest = batches.iter().map(Vec::len).max().unwrap_or(0);
            let mut shelf = Vec::new();
            for k in 0..longest {
                shelf.extend(batches.iter().filter_map(|b| b.get(k).cloned()));
            }
            d.shelves.stock(site, shelf);
        }
    }
    let mut in_transit: Vec<(String, String, std::time::Instant)> = Vec::new();
    let mut next_lot = 0usize;
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        // Shipments arriving.
        let mut arrived = Vec::new();
        in_transit.retain(|(site, shipment, due)| {
            if due.elapsed() > Duration::ZERO {
                arrived.push((site.clone(), shipment.clone()));
                false
            } else {
                true
            }
        });
        for (site, shipment) in arrived {
            let Some(caller) = pharmacists.get(&site) else { continue };
            let codes: Vec<String> = d
                .store
                .shipment_cartridges(&shipment)
                .await?
                .iter()
                .filter(|c| c.status == "in-transit")
                .map(|c| {
                    format!("(01){}(17){}(10){}(21){}", c.gtin, expiry_yymmdd(c.expires_ms), c.lot, c.serial)
                })
                .collect();
            let req = pb::ReceiveShipmentRequest {
                shipment_id: shipment.clone(),
                site_id: site.clone(),
                scans: codes.clone(),
                readings: cold_readings(now_ms()),
            };
            inv.receive(caller, req).await?;
            d.shelves.stock(&site, codes.iter().filter_map(|c| cartridge_of(c, year)));
        }
        // Orders where the stock reached its reorder point.
        let lines = inv.stock(&admin, "").await?;
        for line in
            lines.iter().filter(|l| l.gtin == EXAMPLE_GTIN && l.suggested_order > 0 && l.in_transit == 0)
        {
            if in_transit.iter().any(|(s, ..)| *s == line.site_id) {
                continue;
            }
            let lot =
                fresh_lot(inv, &d.store, &admin, &qa, d.bad_lot.as_deref(), &mut next_lot, today).await?;
            let count = line.suggested_order.min(DEMO_MAX_ORDER);
            let req = pb::ShipCartridgesRequest {
                gtin: EXAMPLE_GTIN.into(),
                lot: lot.clone(),
                site_id: line.site_id.clone(),
                count,
            };
            let s = inv.ship(&admin, req).await?;
            tracing::info!(site = %line.site_id, lot, count, "demo: reorder shipped");
            in_transit.push((line.site_id.clone(), s.shipment_id, std::time::Instant::now() + DEMO_TRANSIT));
        }
        // QA recalls the bad lot once runs have used it.
        if let Some(bad) = &d.bad_lot
            && started.elapsed() > DEMO_RECALL_AFTER
            && d.store.lot(EXAMPLE_GTIN, bad).await?.is_some_and(|l| l.status != "recalled")
            && !d.store.lot_trace(EXAMPLE_GTIN, bad).await?.is_empty()
        {
            let req = pb::RecallLotRequest {
                gtin: EXAMPLE_GTIN.into(),
                lot: bad.clone(),
                reason: "demo: particle size and encapsulation out of trend (lot comparison)".into(),
                user_id: d.staff.qa.clone(),
                password: d.staff.qa_password.clone(),
            };
            let r = inv.recall(&qa, req).await?;
            let withdrawn = d.shelves.withdraw_lot(bad);
            tracing::info!(lot = %bad, runs = r.runs.len(), devices = r.devices_sent, withdrawn, "demo: bad lot recalled");
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn expiry_yymmdd(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.to_zoned(jiff::tz::TimeZone::UTC).date())
        .map(|d| format!("{:02}{:02}{:02}", d.year() % 100, d.month(), d.day()))
        .unwrap_or_default()
}

/// Registers (and QA releases) `lot` if the catalogue lacks it.
async fn ensure_lot(
    inv: &nanofleet_api::Inventory,
    store: &nanofleet_store::Store,
    admin: &Caller,
    qa: &Caller,
    lot: &str,
    today: jiff::civil::Date,
) -> anyhow::Result<()> {
    use nanofleet_recipe::example::EXAMPLE_GTIN;
    if store.lot(EXAMPLE_GTIN, lot).await?.is_none() {
        let req = pb::CreateLotRequest {
            gtin: EXAMPLE_GTIN.into(),
            lot: lot.into(),
            produced: today.saturating_sub(jiff::Span::new().days(20)).to_string(),
            expires: today.saturating_add(jiff::Span::new().days(180)).to_string(),
            quantity: DEMO_LOT_SIZE,
        };
        inv.create_lot(admin, req).await?;
    }
    if store.lot(EXAMPLE_GTIN, lot).await?.is_some_and(|l| l.status == "quarantine") {
        let req = pb::ReleaseLotRequest {
            gtin: EXAMPLE_GTIN.into(),
            lot: lot.into(),
            reason: "demo: CoA reviewed".into(),
        };
        inv.release_lot(qa, req).await?;
    }
    Ok(())
}

/// A released lot other than the bad one with an order's worth left to ship, taking
/// the lots in turn and registering a new one when all run low.
async fn fresh_lot(
    inv: &nanofleet_api::Inventory,
    store: &nanofleet_store::Store,
    admin: &Caller,
    qa: &Caller,
    bad_lot: Option<&str>,
    turn: &mut usize,
    today: jiff::civil::Date,
) -> anyhow::Result<String> {
    use nanofleet_recipe::example::EXAMPLE_GTIN;
    let mut good: Vec<String> = store
        .lots(Some(EXAMPLE_GTIN), None, Some("released"))
        .await?
        .into_iter()
        .map(|l| l.lot)
        .filter(|l| Some(l.as_str()) != bad_lot)
        .collect();
    good.sort();
    for _ in 0..good.len() {
        *turn += 1;
        let lot = &good[*turn % good.len()];
        let left = store.lot_cartridges(EXAMPLE_GTIN, lot, "made", i64::from(DEMO_MAX_ORDER)).await?.len();
        if left >= DEMO_MAX_ORDER as usize {
            return Ok(lot.clone());
        }
    }
    // Every good lot is shipped out: a new one.
    let name = format!("L{}-{:02}", jiff::Zoned::now().strftime("%y%m"), good.len() + 1);
    ensure_lot(inv, store, admin, qa, &name, today).await?;
    Ok(name)
}

/// Ships `count` cartridges of `lot` to `site` and receives them there at once, with a
/// cold logger; returns them as the site's pharmacist would scan them.
async fn ship_and_receive(
    inv: &nanofleet_api::Inventory,
    admin: &Caller,
    pharmacist: Option<&Caller>,
    site: &str,
    lot: &str,
    count: u32,
    year: i16,
) -> anyhow::Result<Vec<nanofleet_proto::device::v1::Cartridge>> {
    use nanofleet_recipe::example::EXAMPLE_GTIN;
    let req =
        pb::ShipCartridgesRequest { gtin: EXAMPLE_GTIN.into(), lot: lot.into(), site_id: site.into(), count };
    let s = inv.ship(admin, req).await?;
    let receiver = pharmacist.unwrap_or(admin);
    let req = pb::ReceiveShipmentRequest {
        shipment_id: s.shipment_id.clone(),
        site_id: site.into(),
        scans: s.codes.clone(),
        readings: cold_readings(now_ms()),
    };
    inv.receive(receiver, req).await?;
    Ok(s.codes.iter().filter_map(|c| cartridge_of(c, year)).collect())
}
