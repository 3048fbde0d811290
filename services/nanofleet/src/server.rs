//! One Nanofleet server: storage, ingest, embedded broker, gRPC API and dashboard.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nanofleet_api::{
    Actor, Api, AuditLog, Batches, Bootstrap, CommandSink, Deliveries, DeviceCommands, Firmware, Fleet,
    Inventory, Monitoring, People, Recipes, Rollouts, Trust, TrustOptions,
};
use nanofleet_broker::{Broker, Control};
use nanofleet_ingest::Ingest;
use nanofleet_pki::{FleetCa, ServerNames};
use nanofleet_proto::v1::audit_service_server::AuditServiceServer;
use nanofleet_proto::v1::batch_service_server::BatchServiceServer;
use nanofleet_proto::v1::enrollment_service_server::EnrollmentServiceServer;
use nanofleet_proto::v1::firmware_service_server::FirmwareServiceServer;
use nanofleet_proto::v1::fleet_service_server::FleetServiceServer;
use nanofleet_proto::v1::inventory_service_server::InventoryServiceServer;
use nanofleet_proto::v1::monitoring_service_server::MonitoringServiceServer;
use nanofleet_proto::v1::people_service_server::PeopleServiceServer;
use nanofleet_proto::v1::recipe_service_server::RecipeServiceServer;
use nanofleet_proto::v1::rollout_service_server::RolloutServiceServer;
use nanofleet_proto::v1::telemetry_service_server::TelemetryServiceServer;
use nanofleet_store::Store;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Default gRPC API address.
pub const DEFAULT_GRPC: &str = "127.0.0.1:7400";
/// Default dashboard address.
pub const DEFAULT_HTTP: &str = "127.0.0.1:7480";
/// Default device (MQTT over mutual TLS) address.
pub const DEFAULT_MQTT: &str = "127.0.0.1:8883";

/// Everything a server needs to start.
#[derive(Debug, Clone)]
pub struct Options {
    /// Holds the SQLite database (unless `database_url` points elsewhere).
    pub data_dir: PathBuf,
    /// `sqlite://...` or `postgres://...`; default: SQLite in `data_dir`.
    pub database_url: Option<String>,
    pub grpc_listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub mqtt: nanofleet_broker::Options,
    /// What devices are told to connect to (host:port); default: the MQTT listener's
    /// address.
    pub mqtt_advertise: Option<String>,
    /// Where devices fetch firmware (https://host:port); default: the HTTPS
    /// listener's address.
    pub http_advertise: Option<String>,
    pub ingest: nanofleet_ingest::Options,
    /// Host names and addresses in the server's TLS certificate.
    pub server_names: ServerNames,
    /// Life of a device certificate.
    pub device_cert_validity: Duration,
    /// How monitoring alerts are evaluated and delivered.
    pub alerts: nanofleet_api::AlertOptions,
}

impl Options {
    pub fn new(data_dir: PathBuf) -> Options {
        Options {
            data_dir,
            database_url: None,
            grpc_listen: DEFAULT_GRPC.parse().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 7400))),
            http_listen: DEFAULT_HTTP.parse().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 7480))),
            mqtt: nanofleet_broker::Options::default(),
            mqtt_advertise: None,
            http_advertise: None,
            ingest: nanofleet_ingest::Options::default(),
            server_names: ServerNames::default(),
            device_cert_validity: TrustOptions::default().device_cert_validity,
            alerts: nanofleet_api::AlertOptions::default(),
        }
    }

    /// All listeners on free loopback ports (tests).
    pub fn ephemeral(data_dir: PathBuf) -> Options {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut o = Options::new(data_dir);
        o.grpc_listen = any;
        o.http_listen = any;
        o.mqtt.listen = any;
        o
    }
}

/// Why a server did not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("data directory {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Store(#[from] nanofleet_store::Error),
    #[error(transparent)]
    Ingest(#[from] nanofleet_ingest::Error),
    #[error(transparent)]
    Broker(#[from] nanofleet_broker::Error),
    #[error("{what} listener on {addr}: {source}")]
    Bind { what: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("grpc reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("fleet CA: {0}")]
    Pki(#[from] nanofleet_pki::Error),
    #[error("grpc TLS: {0}")]
    GrpcTls(#[from] tonic::transport::Error),
    #[error(transparent)]
    Api(#[from] nanofleet_api::Error),
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub mqtt_addr: SocketAddr,
    pub store: Store,
    pub ingest: Ingest,
    pub fleet: Fleet,
    pub trust: Trust,
    pub people: People,
    pub audit: AuditLog,
    pub recipes: Recipes,
    pub monitoring: Monitoring,
    pub firmware: Firmware,
    pub rollouts: Rollouts,
    pub inventory: Inventory,
    pub ca: Arc<FleetCa>,
    /// The administrator created at the first start (its password and API token are
    /// also in `admin-password` and `admin.token` in the data directory).
    pub bootstrap: Option<Bootstrap>,
    /// Development plaintext MQTT listener, if enabled.
    pub mqtt_plaintext_addr: Option<SocketAddr>,
    broker: Broker,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr).await.map_err(|source| Error::Bind { what, addr, source })
}

impl Server {
    /// Sends commands to connected devices through the embedded broker, as the
    /// recipe delivery and run requests do.
    pub fn commands(&self) -> Arc<dyn CommandSink> {
        Arc::new(BrokerCommands(self.broker.control()))
    }

    pub async fn start(opts: &Options) -> Result<Server, Error> {
        nanofleet_pki::install_crypto_provider();
        std::fs::create_dir_all(&opts.data_dir)
            .map_err(|source| Error::DataDir { path: opts.data_dir.clone(), source })?;
        let ca = Arc::new(FleetCa::load_or_create(&opts.data_dir.join("pki"), &opts.server_names)?);
        let store_opts = match &opts.database_url {
            Some(url) => {
                nanofleet_store::Options { url: url.clone(), max_connections: 8, sqlite_sync_full: true }
            }
            None => nanofleet_store::Options::sqlite(&opts.data_dir.join("nanofleet.db")),
        };
        let store = Store::open(&store_opts).await?;
        // The embedded broker starts with no connections: nobody is online yet. Not on
        // PostgreSQL, which several servers may share: each would mark the others'
        // devices offline. There a device's presence follows its own births and deaths.
        if store.backend() == nanofleet_store::Backend::Sqlite {
            let stale = store.mark_all_offline().await?;
            if stale > 0 {
                tracing::info!(devices = stale, "marked offline until they reconnect");
            }
        }
        let (ingest, _writer) = Ingest::start(store.clone(), &opts.ingest).await?;
        let fleet = Fleet::new(store.clone(), ingest.clone());

        let grpc = bind("grpc", opts.grpc_listen).await?;
        let http = bind("http", opts.http_listen).await?;
        let grpc_addr = grpc.local_addr().map_err(|source| Error::Bind {
            what: "grpc",
            addr: opts.grpc_listen,
            source,
        })?;
        let http_addr = http.local_addr().map_err(|source| Error::Bind {
            what: "http",
            addr: opts.http_listen,
            source,
        })?;
        let mut mqtt_opts = opts.mqtt.clone();
        mqtt_opts.tls = Some(nanofleet_broker::TlsFiles {
            cert: ca.server_cert_path(),
            key: ca.server_key_path(),
            client_ca: ca.device_bundle_path(),
        });
        // Who may connect is decided before the broker accepts anyone.
        let trust_root = nanofleet_pki::trust_root::load_or_create(&opts.data_dir.join("pki"))?;
        let mut trust_opts = TrustOptions {
            device_cert_validity: opts.device_cert_validity,
            trust_root_json: trust_root.to_json(),
            ..Default::default()
        };
        let trust = Trust::new(store.clone(), ca.clone(), trust_opts.clone()).await?;
        let broker = Broker::start(
            &mqtt_opts,
            ingest.clone(),
            Some(Arc::new(TrustAdmission(trust.clone(), Default::default()))),
        )
        .await?;
        let mqtt_addr = broker.local_addr();
        trust_opts.mqtt_address = opts.mqtt_advertise.clone().unwrap_or_else(|| advertised(mqtt_addr));
        let trust = trust.with_options(trust_opts);
        let people = People::new(store.clone());
        let bootstrap = people.bootstrap(&opts.data_dir).await?;
        if let Some(b) = &bootstrap {
            tracing::info!(person = %b.person_id, dir = %opts.data_dir.display(), "first start: administrator created (admin-password, admin.token)");
        }
        let audit = AuditLog::open(
            store.clone(),
            &opts.data_dir.join("pki"),
            opts.data_dir.join("audit-checkpoint.json"),
        )?;
        let recipes = Recipes::open(store.clone(), people.clone(), opts.data_dir.join("pki")).await?;
        // Devices' answers and births reach the recipe deliveries through ingest.
        let sink: Arc<dyn CommandSink> = Arc::new(BrokerCommands(broker.control()));
        let deliveries = Deliveries::start(store.clone(), recipes.clone(), sink.clone());
        let rollout_deliveries = deliveries.clone();
        let batches = Batches::new(store.clone(), people.clone(), fleet.clone(), ca.clone(), sink.clone());
        let monitoring = Monitoring::new(store.clone(), fleet.clone());
        let firmware = Firmware::new(
            store.clone(),
            people.clone(),
            recipes.clone(),
            opts.data_dir.join("pki"),
            opts.data_dir.join("firmware"),
        );
        let firmware_base =
            opts.http_advertise.clone().unwrap_or_else(|| format!("https://{}", advertised(http_addr)));
        let rollouts = Rollouts::open(
            store.clone(),
            firmware.clone(),
            recipes.clone(),
            monitoring.clone(),
            rollout_deliveries,
            sink,
            firmware_base,
        )
        .await?;
        let inventory =
            Inventory::open(store.clone(), people.clone(), recipes.clone(), deliveries.clone()).await?;
        ingest.set_commands(Arc::new(DeviceCommands {
            deliveries,
            batches: batches.clone(),
            rollouts: rollouts.clone(),
            inventory: inventory.clone(),
        }));
        let derived = monitoring.backfill().await?;
        if derived > 0 {
            tracing::info!(batches = derived, "monitoring metrics derived from stored batch records");
        }
        let api = Api {
            fleet: fleet.clone(),
            trust: trust.clone(),
            people: people.clone(),
            audit: audit.clone(),
            recipes: recipes.clone(),
            batches,
            monitoring: monitoring.clone(),
            firmware: firmware.clone(),
            rollouts: rollouts.clone(),
            inventory: inventory.clone(),
            disconnect: Some(Arc::new(BrokerDisconnect(broker.control()))),
        };

        let cancel = CancellationToken::new();
        let mut tasks = Vec::new();

        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<FleetServiceServer<Api>>().await;
        health.set_serving::<TelemetryServiceServer<Api>>().await;
        health.set_serving::<EnrollmentServiceServer<Api>>().await;
        health.set_serving::<PeopleServiceServer<Api>>().await;
        health.set_serving::<AuditServiceServer<Api>>().await;
        health.set_serving::<RecipeServiceServer<Api>>().await;
        health.set_serving::<BatchServiceServer<Api>>().await;
        health.set_serving::<MonitoringServiceServer<Api>>().await;
        health.set_serving::<FirmwareServiceServer<Api>>().await;
        health.set_serving::<InventoryServiceServer<Api>>().await;
        health.set_serving::<RolloutServiceServer<Api>>().await;
        // Both reflection versions: older tools (grpcurl before 1.8.8) ask for v1alpha.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(nanofleet_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;
        // TLS with the server certificate; a client certificate is optional (devices
        // present theirs to renew).
        let tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(ca.server_chain_pem(), ca.server_key_pem()))
            .client_ca_root(tonic::transport::Certificate::from_pem(
                ca.device_client_roots().iter().map(|c| nanofleet_pki::cert_pem(c)).collect::<String>(),
            ))
            .client_auth_optional(true);
        let router = tonic::transport::Server::builder()
            .tls_config(tls)?
            // Every call is authenticated and its role checked before its method runs.
            .layer(nanofleet_api::auth_layer::AuthLayer::new(people.clone()))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(FleetServiceServer::new(api.clone()))
            .add_service(InventoryServiceServer::new(api.clone()))
            .add_service(TelemetryServiceServer::new(api.clone()))
            .add_service(EnrollmentServiceServer::new(api.clone()))
            .add_service(PeopleServiceServer::new(api.clone()))
            .add_service(AuditServiceServer::new(api.clone()))
            .add_service(RecipeServiceServer::new(api.clone()))
            .add_service(BatchServiceServer::new(api.clone()))
            .add_service(MonitoringServiceServer::new(api.clone()))
            .add_service(FirmwareServiceServer::new(api.clone()))
            .add_service(RolloutServiceServer::new(api.clone()));
        let stop = cancel.clone();
        tasks.push(tokio::spawn(async move {
            // Without TCP_NODELAY a response larger than one segment waits for the
            // client's delayed ACK (40 ms on Linux): a chart took 50 ms instead of 8.
            let incoming = tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true));
            if let Err(e) = router.serve_with_incoming_shutdown(incoming, stop.cancelled_owned()).await {
                tracing::error!(error = %e, "grpc server stopped");
            }
        }));

        let stop = cancel.clone();
        let dash_api = api.clone();
        // A client certificate is optional: devices fetching firmware present theirs.
        let dash_tls = Arc::new(nanofleet_pki::tls::server_config_optional_client(
            ca.server_chain().to_vec(),
            ca.server_key()?,
            ca.device_client_roots(),
        )?);
        tasks.push(tokio::spawn(async move {
            if let Err(e) = nanofleet_dashboard::run(http, dash_api, dash_tls, stop.cancelled_owned()).await {
                tracing::error!(error = %e, "dashboard stopped");
            }
        }));

        tasks.push(monitoring.spawn_alerts(opts.alerts.clone(), cancel.clone()));
        tasks.push(rollouts.spawn_scheduler(cancel.clone()));

        // The firmware repository's timestamp lives a day: re-sign it at start (after
        // downtime) and every hour.
        let stop = cancel.clone();
        let refresher = firmware.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(3600));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if let Err(e) = refresher.refresh().await {
                            tracing::warn!(error = %e, "firmware timestamp refresh");
                        }
                    }
                    _ = stop.cancelled() => break,
                }
            }
        }));

        // Cartridges past their expiry date while unused get their `expired` event: at
        // start (after downtime) and every ten minutes. At start, first, the consumption
        // of any batch record whose event a crash cut off.
        let stop = cancel.clone();
        let expiry = inventory.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = expiry.reconcile().await {
                tracing::warn!(error = %e, "cartridge consumption catch-up");
            }
            let mut tick = tokio::time::interval(Duration::from_secs(600));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if let Err(e) = expiry.expire_due(now_ms()).await {
                            tracing::warn!(error = %e, "cartridge expiry");
                        }
                    }
                    _ = stop.cancelled() => break,
                }
            }
        }));

        // Other servers sharing the database may decommission devices: re-read who is
        // blocked now and then.
        // The audit chain's head is signed whenever it moved.
        let stop = cancel.clone();
        let reload = trust.clone();
        let signer = audit.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if let Err(e) = reload.reload().await {
                            tracing::warn!(error = %e, "blocklist reload");
                        }
                        if let Err(e) = signer.checkpoint().await {
                            tracing::warn!(error = %e, "audit checkpoint");
                        }
                    }
                    _ = stop.cancelled() => break,
                }
            }
        }));

        let mqtt_plaintext_addr = broker.plaintext_addr();
        tracing::info!(%grpc_addr, %http_addr, %mqtt_addr, root = %ca.root_fingerprint(), "nanofleet server ready");
        Ok(Server {
            grpc_addr,
            http_addr,
            mqtt_addr,
            store,
            ingest,
            fleet,
            trust,
            people,
            audit,
            recipes,
            monitoring,
            firmware,
            rollouts,
            inventory,
            ca,
            bootstrap,
            mqtt_plaintext_addr,
            broker,
            cancel,
            tasks,
        })
    }

    /// A site created by the system (the demo's hospitals); an existing one is kept.
    pub async fn ensure_site(&self, id: &str, name: &str, time_zone: &str) -> Result<(), Error> {
        match self.trust.create_site(&Actor::system(), id, name, time_zone, "demo fleet").await {
            Ok(_) | Err(nanofleet_api::Error::Conflict(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Creates or renames a site.
    pub async fn upsert_site(&self, id: &str, name: &str) -> Result<(), Error> {
        Ok(self.store.upsert_site(id, name, now_ms()).await?)
    }

    /// Closes a device's MQTT connection (its last will is published).
    pub async fn kick_device(&self, device_id: &str) -> bool {
        self.broker.kick(device_id).await
    }

    pub async fn mqtt_connections(&self) -> usize {
        self.broker.connections().await
    }

    /// Stops accepting, closes device connections (recording them offline), finishes
    /// in-flight API calls, commits what ingest holds, and closes the database.
    pub async fn shutdown(self) {
        self.broker.shutdown().await;
        self.cancel.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        if let Err(e) = self.ingest.flush().await {
            tracing::warn!(error = %e, "ingest flush at shutdown");
        }
        if let Err(e) = self.audit.checkpoint().await {
            tracing::warn!(error = %e, "audit checkpoint at shutdown");
        }
        self.store.close().await;
        tracing::info!("nanofleet server stopped");
    }
}

/// The MQTT address to tell devices: the listener's, or loopback for a wildcard bind.
fn advertised(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() { format!("127.0.0.1:{}", addr.port()) } else { addr.to_string() }
}

/// The broker asks [`Trust`] who may connect. A refused device retries; its refusals
/// are audited once per [`REFUSAL_AUDIT_EVERY`] so the trail records the attempt
/// without filling up.
struct TrustAdmission(Trust, std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>);

const REFUSAL_AUDIT_EVERY: Duration = Duration::from_secs(600);

#[async_trait::async_trait]
impl nanofleet_broker::Admission for TrustAdmission {
    fn admit(&self, client_id: &str, cert_cn: &str, serial: &str) -> Result<(), String> {
        self.0.admit(client_id, cert_cn, serial)
    }

    async fn refused(&self, client_id: &str, cert_cn: &str, reason: &str) {
        // Keyed and attributed by the certificate: the client id is only a claim.
        let who = if cert_cn.is_empty() { client_id } else { cert_cn };
        let now = std::time::Instant::now();
        {
            let mut last = self.1.lock().unwrap_or_else(|e| e.into_inner());
            if last.get(who).is_some_and(|t| now.duration_since(*t) < REFUSAL_AUDIT_EVERY) {
                return;
            }
            if last.len() > 100_000 {
                last.retain(|_, t| now.duration_since(*t) < REFUSAL_AUDIT_EVERY);
            }
            last.insert(who.to_owned(), now);
        }
        self.0.audit_refusal(&Actor::device(who), "device.connect.refused", client_id, reason).await;
    }
}

/// Decommissioning closes the device's connection at once.
struct BrokerDisconnect(Control);

#[tonic::async_trait]
impl nanofleet_api::Disconnect for BrokerDisconnect {
    async fn disconnect(&self, device_id: &str) -> bool {
        self.0.kick(device_id).await
    }
}

/// Commands to devices go out through the embedded broker.
struct BrokerCommands(Control);

#[tonic::async_trait]
impl CommandSink for BrokerCommands {
    async fn send(
        &self,
        device_id: &str,
        command: nanofleet_proto::topics::Command,
        payload: Vec<u8>,
    ) -> bool {
        self.0.send(&nanofleet_proto::topics::command_topic(device_id, command), payload).await > 0
    }
}
