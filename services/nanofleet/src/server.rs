//! One Nanofleet server: storage, ingest, embedded broker, gRPC API and dashboard.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use nanofleet_api::Fleet;
use nanofleet_broker::Broker;
use nanofleet_ingest::Ingest;
use nanofleet_proto::v1::fleet_service_server::FleetServiceServer;
use nanofleet_proto::v1::telemetry_service_server::TelemetryServiceServer;
use nanofleet_store::Store;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Default gRPC API address.
pub const DEFAULT_GRPC: &str = "127.0.0.1:7400";
/// Default dashboard address.
pub const DEFAULT_HTTP: &str = "127.0.0.1:7480";
/// Default device (MQTT) address.
pub const DEFAULT_MQTT: &str = "127.0.0.1:7883";

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
    pub ingest: nanofleet_ingest::Options,
}

impl Options {
    pub fn new(data_dir: PathBuf) -> Options {
        Options {
            data_dir,
            database_url: None,
            grpc_listen: DEFAULT_GRPC.parse().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 7400))),
            http_listen: DEFAULT_HTTP.parse().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 7480))),
            mqtt: nanofleet_broker::Options::default(),
            ingest: nanofleet_ingest::Options::default(),
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
    pub async fn start(opts: &Options) -> Result<Server, Error> {
        std::fs::create_dir_all(&opts.data_dir)
            .map_err(|source| Error::DataDir { path: opts.data_dir.clone(), source })?;
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
        let broker = Broker::start(&opts.mqtt, ingest.clone()).await?;
        let mqtt_addr = broker.local_addr();

        let cancel = CancellationToken::new();
        let mut tasks = Vec::new();

        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<FleetServiceServer<Fleet>>().await;
        health.set_serving::<TelemetryServiceServer<Fleet>>().await;
        // Both reflection versions: older tools (grpcurl before 1.8.8) ask for v1alpha.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(nanofleet_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;
        let router = tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(FleetServiceServer::new(fleet.clone()))
            .add_service(TelemetryServiceServer::new(fleet.clone()));
        let stop = cancel.clone();
        tasks.push(tokio::spawn(async move {
            let incoming = tonic::transport::server::TcpIncoming::from(grpc);
            if let Err(e) = router.serve_with_incoming_shutdown(incoming, stop.cancelled_owned()).await {
                tracing::error!(error = %e, "grpc server stopped");
            }
        }));

        let stop = cancel.clone();
        let dash_fleet = fleet.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = nanofleet_dashboard::run(http, dash_fleet, stop.cancelled_owned()).await {
                tracing::error!(error = %e, "dashboard stopped");
            }
        }));

        tracing::info!(%grpc_addr, %http_addr, %mqtt_addr, "nanofleet server ready");
        Ok(Server { grpc_addr, http_addr, mqtt_addr, store, ingest, fleet, broker, cancel, tasks })
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
        self.store.close().await;
        tracing::info!("nanofleet server stopped");
    }
}
