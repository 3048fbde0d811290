//! `nanofleet demo`: a server with an in-process simulated fleet of hospitals.

use std::time::Duration;

use nanofleet_agent::fleet::{self, Fleet, FleetOptions};
use nanofleet_agent::link::LinkOptions;

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
}

impl Demo {
    pub async fn start(opts: &Options) -> Result<Demo, server::Error> {
        let server = Server::start(&opts.server).await?;
        for site in fleet::sites(opts.sites) {
            server.upsert_site(&site.id, &site.name).await?;
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
            // Sequence numbers survive a demo restart on the same data directory.
            state_dir: Some(opts.server.data_dir.join("simulator")),
            ..FleetOptions::default()
        });
        Ok(Demo { server, fleet })
    }

    /// What to tell the person who started the demo.
    pub fn banner(&self) -> String {
        let s = &self.server;
        let grpc = format!("http://{}", s.grpc_addr);
        format!(
            "Nanofleet demo: {} hospitals, {} simulated devices\n\
             \n  dashboard  http://{}/\n  grpc       {grpc}\n  mqtt       mqtt://{}\n\
             \nTry:\n  nanofleet sites list --server {grpc}\n  nanofleet devices list --server {grpc}\n  \
             nanofleet devices show {} --server {grpc}\n  nanofleet telemetry {} --since 1m --server {grpc}\n  \
             nanofleet devices list --output json --server {grpc}\n\
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
            self.fleet.devices.first().map(|d| d.info.device_id.as_str()).unwrap_or("NF-SMH-01"),
            self.fleet.devices.first().map(|d| d.info.device_id.as_str()).unwrap_or("NF-SMH-01"),
        )
    }

    /// Stops the devices (each says goodbye), then the server.
    pub async fn stop(self) {
        self.fleet.stop().await;
        self.server.shutdown().await;
    }
}
