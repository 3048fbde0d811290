//! `nanofleet demo`: a server with an in-process simulated fleet of hospitals.

use std::time::Duration;

use nanofleet_agent::fleet::{self, Fleet, FleetEnrollment, FleetOptions, Tokens};
use nanofleet_agent::link::LinkOptions;
use nanofleet_api::Actor;

use crate::server::{self, Server};

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct Options {
    pub server: server::Options,
    pub sites: usize,
    pub devices_per_site: usize,
    /// Fraction of simulated devices with an injected fault.
    pub fault_rate: f64,
    pub sample_interval: Duration,
    pub batch_interval: Duration,
}

/// A running demo: the server and the simulated fleet.
#[derive(Debug)]
pub struct Demo {
    pub server: Server,
    pub fleet: Fleet,
    data_dir: std::path::PathBuf,
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
        let fleet = Fleet::start(&FleetOptions {
            sites: opts.sites,
            devices_per_site: opts.devices_per_site,
            fault_rate: opts.fault_rate,
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
            ..FleetOptions::default()
        });
        Ok(Demo { server, fleet, data_dir: opts.server.data_dir.clone() })
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
             \n  login      admin / {}   (dashboard)\n\
             \nTry, in another terminal:\n  export NANOFLEET_SERVER={grpc} NANOFLEET_CA_FILE={}\n  \
             export NANOFLEET_TOKEN={}\n  nanofleet whoami\n  \
             nanofleet sites list\n  nanofleet devices list\n  nanofleet devices show {first}\n  \
             nanofleet telemetry {first} --since 1m\n  nanofleet enroll-token create --site {site} --expires 1h\n  \
             nanofleet devices list --output json\n\
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
            s.ca.root_path().display(),
            self.admin_token(),
        )
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
