//! A sandbox for end-to-end tests and benchmarks: real Nanofleet servers (embedded
//! broker, SQLite, gRPC, dashboard) on port 0 in a temporary directory, and raw MQTT
//! clients to talk to them like a device would.
#![forbid(unsafe_code)]

pub mod agent;
pub mod bench;

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nanofleet::server::{Options, Server};
use nanofleet_agent::fleet::{FleetEnrollment, FleetOptions, Tokens};
use nanofleet_agent::link::LinkOptions;
use nanofleet_api::Actor;
use nanofleet_proto::Message as _;
use nanofleet_proto::device::v1::{
    DeviceState, FluidLine, LineReading, Presence, RunPhase, Sample, TelemetryBatch,
};
use nanofleet_proto::topics::{Channel, device_topic};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A server in a temporary data directory, every listener on a free loopback port.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
    pub server: Server,
}

/// Test servers also open the loopback plaintext MQTT listener, for tests of ingest
/// that speak raw MQTT without a certificate.
fn sandbox_options(dir: &std::path::Path) -> Options {
    let mut o = Options::ephemeral(dir.to_path_buf());
    o.mqtt.plaintext_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    o
}

impl Sandbox {
    pub async fn start() -> anyhow::Result<Sandbox> {
        Sandbox::start_with(|_| {}).await
    }

    /// Starts a server with the sandbox's options changed by `change` (short device
    /// certificates, say).
    pub async fn start_with(change: impl FnOnce(&mut Options)) -> anyhow::Result<Sandbox> {
        nanofleet_pki::install_crypto_provider();
        let dir = tempfile::tempdir()?;
        let mut opts = sandbox_options(dir.path());
        change(&mut opts);
        let server = Server::start(&opts).await?;
        Ok(Sandbox { dir, server })
    }

    /// Starts a server on an existing data directory (a restart).
    pub async fn restart_in(dir: tempfile::TempDir) -> anyhow::Result<Sandbox> {
        let server = Server::start(&sandbox_options(dir.path())).await?;
        Ok(Sandbox { dir, server })
    }

    /// Stops the server and starts it again on the same data directory and the same
    /// addresses, so that connected devices and clients find it again.
    pub async fn restart_in_place(self) -> anyhow::Result<Sandbox> {
        let s = &self.server;
        let (grpc, http, mqtt, plain) = (s.grpc_addr, s.http_addr, s.mqtt_addr, s.mqtt_plaintext_addr);
        let dir = self.stop().await;
        let mut o = sandbox_options(dir.path());
        o.grpc_listen = grpc;
        o.http_listen = http;
        o.mqtt.listen = mqtt;
        o.mqtt.plaintext_listen = plain;
        let server = Server::start(&o).await?;
        Ok(Sandbox { dir, server })
    }

    /// The plaintext development listener (no client certificates).
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.server.mqtt_plaintext_addr.unwrap_or(self.server.mqtt_addr)
    }

    /// The mutual-TLS listener devices use.
    pub fn mqtts_addr(&self) -> SocketAddr {
        self.server.mqtt_addr
    }

    pub fn grpc_url(&self) -> String {
        format!("https://{}", self.server.grpc_addr)
    }

    /// A gRPC channel over TLS that trusts this server's fleet root.
    pub async fn grpc_channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        let config = nanofleet_pki::tls::client_config(&[self.server.ca.root_cert().clone()], None)?;
        nanofleet_pki::tls::connect_channel(&self.grpc_url(), config).await.map_err(anyhow::Error::msg)
    }

    /// The initial administrator's API token (ops).
    pub fn admin_token(&self) -> String {
        self.server.bootstrap.as_ref().map(|b| b.api_token.clone()).unwrap_or_default()
    }

    /// Adds the administrator's token to calls.
    pub fn admin(&self) -> nanofleet::cli::Bearer {
        nanofleet::cli::Bearer::new(&self.admin_token()).expect("printable token")
    }

    /// `opts` with the sites created and one enrollment token per planned device: its
    /// devices enroll and connect over mutual TLS.
    pub async fn enrolled(&self, mut opts: FleetOptions) -> anyhow::Result<FleetOptions> {
        let mut tokens = std::collections::HashMap::new();
        for site in nanofleet_agent::fleet::sites(opts.sites) {
            self.server.ensure_site(&site.id, &site.name, &site.time_zone).await?;
            for n in 1..=opts.devices_per_site {
                let id = nanofleet_agent::fleet::device_id(&site, n);
                let (_, secret) = self
                    .server
                    .trust
                    .create_token(&Actor::system(), &site.id, Duration::from_secs(600), 1, &id, "test fleet")
                    .await?;
                tokens.insert(id, secret);
            }
        }
        opts.link.broker_host = self.mqtts_addr().ip().to_string();
        opts.link.broker_port = self.mqtts_addr().port();
        opts.enrollment =
            Some(FleetEnrollment { server: self.grpc_url(), tokens: Tokens::PerDevice(tokens) });
        Ok(opts)
    }

    pub fn http_url(&self) -> String {
        format!("http://{}", self.server.http_addr)
    }

    /// Link options for agents that talk to this sandbox.
    pub fn link(&self) -> LinkOptions {
        LinkOptions::to_broker(self.mqtt_addr())
    }

    pub async fn stop(self) -> tempfile::TempDir {
        self.server.shutdown().await;
        self.dir
    }
}

/// Polls `check` until it returns `Some`, or fails after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A hand-driven MQTT 5 client: publishes exactly what a test tells it to and reports
/// each PUBACK's reason code.
pub struct RawDevice {
    pub client: AsyncClient,
    acks: mpsc::UnboundedReceiver<PubAckReason>,
    subacks: mpsc::UnboundedReceiver<Vec<SubscribeReasonCode>>,
    task: tokio::task::JoinHandle<()>,
}

impl RawDevice {
    pub async fn connect(addr: SocketAddr, client_id: &str) -> anyhow::Result<RawDevice> {
        let mut opts = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(Some(1024 * 1024))
            .set_outgoing_inflight_upper_limit(256);
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        let (tx, acks) = mpsc::unbounded_channel();
        let (sub_tx, subacks) = mpsc::unbounded_channel();
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut ready_tx = Some(ready_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(r) = ready_tx.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(a))) => {
                        let _ = tx.send(a.reason);
                    }
                    Ok(Event::Incoming(Packet::SubAck(a))) => {
                        let _ = sub_tx.send(a.return_codes);
                    }
                    // Close the socket once DISCONNECT is written, as a device would.
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready).await??;
        Ok(RawDevice { client, acks, subacks, task })
    }

    /// Publishes at QoS 1 and waits for the PUBACK's reason code.
    pub async fn publish(&mut self, topic: &str, payload: Vec<u8>) -> anyhow::Result<PubAckReason> {
        self.client.publish(topic, QoS::AtLeastOnce, false, payload).await?;
        let reason = tokio::time::timeout(Duration::from_secs(10), self.acks.recv()).await?;
        reason.ok_or_else(|| anyhow::anyhow!("connection closed before the PUBACK"))
    }

    /// Subscribes at QoS 1 and waits for the SUBACK's reason code.
    pub async fn subscribe(&mut self, filter: &str) -> anyhow::Result<SubscribeReasonCode> {
        self.client.subscribe(filter, QoS::AtLeastOnce).await?;
        let codes = tokio::time::timeout(Duration::from_secs(10), self.subacks.recv()).await?;
        codes.and_then(|c| c.first().copied()).ok_or_else(|| anyhow::anyhow!("no SUBACK"))
    }

    /// Announces the device (birth) so that its telemetry is accepted.
    pub async fn birth(&mut self, device_id: &str, site_id: &str) -> anyhow::Result<PubAckReason> {
        self.publish(&device_topic(device_id, Channel::State), birth(device_id, site_id, "s-1")).await
    }

    /// Sends DISCONNECT and closes the connection.
    pub async fn close(self) {
        let _ = self.client.disconnect().await;
        let abort = self.task.abort_handle();
        if tokio::time::timeout(Duration::from_secs(2), self.task).await.is_err() {
            abort.abort();
        }
    }
}

/// An encoded birth message.
pub fn birth(device_id: &str, site_id: &str, session_id: &str) -> Vec<u8> {
    DeviceState {
        device_id: device_id.into(),
        presence: Presence::Online as i32,
        session_id: session_id.into(),
        time_unix_ms: now_ms(),
        firmware_version: "2.3.1".into(),
        model: "NF-200".into(),
        site_id: site_id.into(),
        boot_id: "boot".into(),
        trust_root_version: 0,
        deny_list_version: 0,
    }
    .encode_to_vec()
}

/// A plausible sample at `time_ms`.
pub fn sample(time_ms: i64) -> Sample {
    let line = |line: FluidLine, flow: f64, p: f64| LineReading {
        line: line as i32,
        flow_ul_min: flow,
        flow_setpoint_ul_min: flow,
        pressure_mbar: p,
        temperature_c: 22.0,
        ..Default::default()
    };
    Sample {
        time_unix_ms: time_ms,
        phase: RunPhase::Collect as i32,
        lines: vec![line(FluidLine::Aqueous, 9_000.0, 1_500.0), line(FluidLine::Ethanol, 3_000.0, 1_100.0)],
        chamber_temperature_c: 22.0,
        cartridge_temperature_c: 21.5,
        mixer_pressure_drop_mbar: 350.0,
        door_closed: true,
        run_id: "R-1".into(),
    }
}

/// An encoded telemetry batch of `n` samples.
pub fn telemetry(device_id: &str, seq: u64, n: usize) -> Vec<u8> {
    let t = now_ms();
    TelemetryBatch {
        device_id: device_id.into(),
        seq,
        samples: (0..n).map(|i| sample(t - (n - i) as i64 * 100)).collect(),
        boot_id: "boot".into(),
    }
    .encode_to_vec()
}

/// Whether a test that needs an external service must fail (CI) rather than skip
/// when the service is missing.
pub fn services_required() -> bool {
    std::env::var_os("NANOFLEET_REQUIRE_SERVICES").is_some_and(|v| v != "0")
}

/// Skips the calling test with a visible reason, or fails it where services are
/// required.
pub fn skip_or_fail(reason: &str) {
    assert!(!services_required(), "required service missing: {reason}");
    eprintln!("SKIPPED: {reason}");
}

// === devices over mutual TLS ===

/// How an MQTT connection attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectOutcome {
    /// A CONNACK that accepts.
    Accepted,
    /// A CONNACK that refuses, with its reason.
    Refused(rumqttc::v5::mqttbytes::v5::ConnectReturnCode),
    /// No CONNACK at all: the TLS handshake or the connection failed, or nothing came
    /// in time. Says what happened.
    NoConnAck(String),
}

/// MQTT 5 options for `client_id` at `addr`: over TLS with `tls`, or plaintext without.
pub fn mqtt_options(addr: SocketAddr, client_id: &str, tls: Option<rustls::ClientConfig>) -> MqttOptions {
    let mut opts = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(Some(1024 * 1024))
        .set_outgoing_inflight_upper_limit(256);
    if let Some(config) = tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(config.into()));
    }
    opts
}

/// Tries to connect with `opts` and reports how it ended, waiting at most `timeout`.
/// The connection, if any, is dropped.
pub async fn try_connect(opts: MqttOptions, timeout: Duration) -> ConnectOutcome {
    let (_client, mut eventloop) = AsyncClient::new(opts, 10);
    let attempt = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return ConnectOutcome::Accepted,
                Ok(_) => {}
                Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => {
                    return ConnectOutcome::Refused(code);
                }
                Err(e) => return ConnectOutcome::NoConnAck(e.to_string()),
            }
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| ConnectOutcome::NoConnAck(format!("no CONNACK within {timeout:?}")))
}

impl RawDevice {
    /// Like [`RawDevice::connect`], with any options (a TLS transport, say).
    pub async fn connect_with(opts: MqttOptions) -> anyhow::Result<RawDevice> {
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        let (tx, acks) = mpsc::unbounded_channel();
        let (sub_tx, subacks) = mpsc::unbounded_channel();
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut ready_tx = Some(ready_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(r) = ready_tx.take() {
                            let _ = r.send(Ok(()));
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(a))) => {
                        let _ = tx.send(a.reason);
                    }
                    Ok(Event::Incoming(Packet::SubAck(a))) => {
                        let _ = sub_tx.send(a.return_codes);
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    Err(e) => {
                        if let Some(r) = ready_tx.take() {
                            let _ = r.send(Err(e.to_string()));
                        }
                        break;
                    }
                }
            }
        });
        match tokio::time::timeout(Duration::from_secs(10), ready).await?? {
            Ok(()) => Ok(RawDevice { client, acks, subacks, task }),
            Err(e) => anyhow::bail!("connection refused or failed: {e}"),
        }
    }

    /// Whether the connection has ended (closed by the broker, or failed).
    pub fn is_closed(&self) -> bool {
        self.task.is_finished()
    }
}

// === people and enrolled devices ===

/// Creates a person with `role` (bound to `site_id` for site-scoped roles) through the
/// server at `channel` as `admin`; returns an interceptor carrying a new API token of
/// theirs (an hour) and their initial password (what they sign with).
pub async fn create_person(
    channel: &tonic::transport::Channel,
    admin: &nanofleet::cli::Bearer,
    id: &str,
    name: &str,
    role: nanofleet_proto::v1::Role,
    site_id: &str,
) -> anyhow::Result<(nanofleet::cli::Bearer, String)> {
    use nanofleet_proto::v1 as pb;
    use nanofleet_proto::v1::people_service_client::PeopleServiceClient;
    let mut people = PeopleServiceClient::with_interceptor(channel.clone(), admin.clone());
    let password = people
        .create_person(pb::CreatePersonRequest {
            id: id.into(),
            display_name: name.into(),
            role: role as i32,
            site_id: site_id.into(),
            reason: "test".into(),
        })
        .await?
        .into_inner()
        .initial_password;
    let token = people
        .create_api_token(pb::CreateApiTokenRequest {
            person_id: id.into(),
            expires_in_seconds: 3_600,
            description: "test".into(),
        })
        .await?
        .into_inner();
    Ok((nanofleet::cli::Bearer::new(&token.secret_token)?, password))
}

impl Sandbox {
    /// Creates a person with `role` (bound to `site_id` for site-scoped roles) as the
    /// administrator, and returns an interceptor carrying a new API token of theirs.
    pub async fn person(
        &self,
        id: &str,
        role: nanofleet_proto::v1::Role,
        site_id: &str,
    ) -> anyhow::Result<nanofleet::cli::Bearer> {
        Ok(self.person_named(id, &format!("Test {id}"), role, site_id).await?.0)
    }

    /// Like [`Sandbox::person`], with a printed name; also returns their initial
    /// password (what they sign with).
    pub async fn person_named(
        &self,
        id: &str,
        name: &str,
        role: nanofleet_proto::v1::Role,
        site_id: &str,
    ) -> anyhow::Result<(nanofleet::cli::Bearer, String)> {
        create_person(&self.grpc_channel().await?, &self.admin(), id, name, role, site_id).await
    }

    /// Enrolls `device_id` into `site_id` (created if missing) the way a device does:
    /// a one-time token, its own key, a CSR.
    pub async fn enroll_device(
        &self,
        site_id: &str,
        device_id: &str,
    ) -> anyhow::Result<nanofleet_agent::enroll::Credentials> {
        self.server.ensure_site(site_id, site_id, "UTC").await?;
        let (_, token) = self
            .server
            .trust
            .create_token(&Actor::system(), site_id, Duration::from_secs(600), 1, device_id, "test device")
            .await?;
        Ok(nanofleet_agent::enroll::enroll(&self.grpc_url(), &token, "NF-200", &format!("HW-{device_id}"))
            .await?)
    }
}

/// Releases `version` of NF-200 (a simulated image of 200 kB, release counter 1) with
/// `fault` built in ("none", "health", "no-boot", "qc"), as the person `rel`.
pub async fn release_firmware(
    sb: &Sandbox,
    bearer: nanofleet::cli::Bearer,
    password: &str,
    version: &str,
    fault: &str,
) -> anyhow::Result<String> {
    use nanofleet_agent::slots::{ImageHeader, sim_image};
    use nanofleet_proto::v1::firmware_service_client::FirmwareServiceClient;
    use nanofleet_proto::v1::upload_firmware_request::Part;
    use sha2::Digest as _;
    let h = ImageHeader {
        model: "NF-200".into(),
        version: version.into(),
        release_counter: 1,
        fault: fault.into(),
    };
    let img = sim_image(&h, 200_000);
    let header = nanofleet_proto::v1::FirmwareHeader {
        model: "NF-200".into(),
        version: version.into(),
        release_counter: 1,
        length: img.len() as u64,
        sha256: hex::encode(sha2::Sha256::digest(&img)),
        user_id: "rel".into(),
        password: password.into(),
        notes: format!("build {version}"),
    };
    let mut msgs = vec![nanofleet_proto::v1::UploadFirmwareRequest { part: Some(Part::Header(header)) }];
    msgs.extend(
        img.chunks(64 * 1024)
            .map(|c| nanofleet_proto::v1::UploadFirmwareRequest { part: Some(Part::Chunk(c.to_vec())) }),
    );
    let mut fw = FirmwareServiceClient::with_interceptor(sb.grpc_channel().await?, bearer);
    Ok(fw.upload_firmware(futures::stream::iter(msgs)).await?.into_inner().release.unwrap_or_default().target)
}

/// The example recipe for `site` with a short procedure: 0.6 mL collected at
/// 12 mL/min, then buffer exchanged for `exchange_s` at `exchange_ml_min`.
pub fn quick_recipe(
    id: &str,
    site: &str,
    exchange_s: u32,
    exchange_ml_min: f64,
) -> nanofleet_proto::device::v1::Recipe {
    use nanofleet_proto::device::v1::{RunPhase, Targets};
    use nanofleet_recipe::example::step;
    let targets = Targets { site_ids: vec![site.into()], device_ids: vec![] };
    let mut r = nanofleet_recipe::example::example(id, 0, targets, now_ms());
    r.procedure = vec![
        step(RunPhase::SelfTest, 1, 0.0),
        step(RunPhase::CartridgeVerify, 1, 0.0),
        step(RunPhase::Prime, 1, 2.0),
        step(RunPhase::StartWaste, 1, 12.0),
        step(RunPhase::Collect, 3, 12.0),
        step(RunPhase::EndWaste, 1, 12.0),
        step(RunPhase::BufferExchange, exchange_s, exchange_ml_min),
        step(RunPhase::QcSample, 1, 0.0),
    ];
    if let Some(f) = r.formula.as_mut() {
        f.batch_volume_ml = 0.6;
    }
    r
}
