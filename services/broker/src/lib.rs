//! The MQTT broker embedded in the Nanofleet server (the zero-setup default).
//!
//! Built on the `rmqtt` broker library (see `docs/decisions/0001-embedded-mqtt-broker.md`).
//! Devices connect with MQTT 3.1.1 or 5; what they publish is not routed through a
//! subscription but handed to ingest in-process from the broker's publish ACL hook:
//!
//! 1. the topic must be under `nf/v1/{client id}/` (a device speaks only for itself);
//! 2. ingest validates and durably stores the message;
//! 3. only then does the hook return, and the broker send the PUBACK.
//!
//! So an acknowledged QoS 1 message is always committed, and a message ingest could
//! not commit is never acknowledged: the connection is closed and the device re-sends.
//! Refused messages get a PUBACK with a failure reason code (MQTT 5), because
//! re-sending them cannot help.
//!
//! Last wills (a device's death message) do not pass the publish ACL hook in rmqtt;
//! they are taken from the publish hook instead. When a connection ends, ingest learns
//! it too, so a device that disconnects without a death message is still offline.
//! A client may subscribe only under its own prefix.
//!
//! Devices connect over mutual TLS: the client certificate must chain to the fleet's
//! device CA (checked in the handshake), its common name is the device id, the MQTT
//! client id must equal it, and [`Admission`] decides whether that device and that
//! certificate may connect now (not decommissioned, not revoked). A plaintext listener
//! exists only for development, and only on a loopback address.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nanofleet_ingest::{Inbound, Ingest, Outcome, Reject};
use nanofleet_proto::topics::{self, Channel, TopicError};
use rmqtt::codec::v5::{PublishAckReason, SubscribeAckReason};
use rmqtt::context::ServerContext;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType, Type};
use rmqtt::net::Builder;
use rmqtt::server::MqttServer;
use rmqtt::types::{AuthResult, FromType, PublishAclResult, PublishResult, SubscribeAclResult};

/// Decides whether a device whose client certificate verified may connect now.
#[async_trait]
pub trait Admission: Send + Sync + 'static {
    /// `cert_cn` and `serial` come from the verified client certificate. `Err` carries
    /// the reason for refusing.
    fn admit(&self, client_id: &str, cert_cn: &str, serial: &str) -> Result<(), String>;
    /// Called for each refused connection (to audit it): the client id it claimed, and
    /// the device id its certificate proves.
    async fn refused(&self, client_id: &str, cert_cn: &str, reason: &str);
}

/// The files of the mutual-TLS listener.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA certificates client certificates must chain to (PEM).
    pub client_ca: PathBuf,
}

/// Broker settings.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct Options {
    /// Address of the mutual-TLS MQTT listener (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Its certificates. Without them the listener on `listen` is plaintext, which is
    /// allowed on a loopback address only (development, tests).
    #[serde(skip)]
    pub tls: Option<TlsFiles>,
    /// An additional plaintext listener, loopback only (development).
    pub plaintext_listen: Option<SocketAddr>,
    /// QoS 1 messages a client may have unacknowledged towards the broker.
    pub max_inflight: u16,
    /// Largest MQTT packet accepted, bytes.
    pub max_packet_size: u32,
    /// Messages queued towards one slow subscriber before the broker drops them.
    /// rmqtt's default (1,000) silently drops QoS 1 messages; keep it high.
    pub max_mqueue_len: usize,
    /// Concurrent TLS/MQTT handshakes before new connections wait.
    pub max_handshaking: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            listen: SocketAddr::from(([127, 0, 0, 1], 8883)),
            tls: None,
            plaintext_listen: None,
            max_inflight: 32,
            max_packet_size: 256 * 1024,
            max_mqueue_len: 100_000,
            max_handshaking: 5_000,
        }
    }
}

/// Broker errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("mqtt listener on {addr}: {source}")]
    Bind { addr: SocketAddr, source: rmqtt::Error },
    #[error(
        "plaintext mqtt listener on {addr} refused: plaintext is allowed on a loopback address only \
         (devices connect with mutual TLS)"
    )]
    PlaintextNotLoopback { addr: SocketAddr },
}

/// A running embedded broker; dropping it does not stop it, call [`Broker::shutdown`].
pub struct Broker {
    scx: ServerContext,
    local_addr: SocketAddr,
    plaintext_addr: Option<SocketAddr>,
    server: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("local_addr", &self.local_addr).finish_non_exhaustive()
    }
}

impl Broker {
    /// Binds the listeners and starts accepting devices; their messages go to `ingest`,
    /// and `admission` decides who may connect over TLS.
    pub async fn start(
        opts: &Options,
        ingest: Ingest,
        admission: Option<Arc<dyn Admission>>,
    ) -> Result<Broker, Error> {
        if opts.tls.is_none() && !opts.listen.ip().is_loopback() {
            return Err(Error::PlaintextNotLoopback { addr: opts.listen });
        }
        if let Some(addr) = opts.plaintext_listen.filter(|a| !a.ip().is_loopback()) {
            return Err(Error::PlaintextNotLoopback { addr });
        }
        let scx = ServerContext::new().busy_check_enable(false).build().await;
        let hooks = IngestHook { ingest, admission };
        let register = scx.extends.hook_mgr().register();
        register.add_priority(Type::ClientAuthenticate, 100, Box::new(hooks.clone())).await;
        register.add_priority(Type::MessagePublishCheckAcl, 100, Box::new(hooks.clone())).await;
        register.add_priority(Type::MessagePublish, 100, Box::new(hooks.clone())).await;
        register.add_priority(Type::ClientSubscribeCheckAcl, 100, Box::new(hooks.clone())).await;
        register.add_priority(Type::ClientDisconnected, 100, Box::new(hooks)).await;
        register.start().await;

        let (main, local_addr) = bind(opts, opts.listen, opts.tls.as_ref())?;
        let mut server = MqttServer::new(scx.clone()).listener_by_id(main, 1);
        let mut plaintext_addr = None;
        if let Some(addr) = opts.plaintext_listen {
            let (l, a) = bind(opts, addr, None)?;
            server = server.listener_by_id(l, 2);
            plaintext_addr = Some(a);
            tracing::warn!(local_addr = %a, "plaintext mqtt listener (development only): clients are not authenticated");
        }
        let server = server.build();
        let server = tokio::spawn(async move {
            if let Err(e) = server.run().await {
                tracing::error!(error = %e, "mqtt server stopped");
            }
        });
        tracing::info!(%local_addr, tls = opts.tls.is_some(), "mqtt listening");
        Ok(Broker { scx, local_addr, plaintext_addr, server })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The development plaintext listener, if any.
    pub fn plaintext_addr(&self) -> Option<SocketAddr> {
        self.plaintext_addr
    }

    /// Number of connected clients.
    pub async fn connections(&self) -> usize {
        self.scx.extends.shared().await.sessions_count()
    }

    /// Closes one client's connection, as a server-side kick (its last will is
    /// published). Returns whether it was connected.
    pub async fn kick(&self, client_id: &str) -> bool {
        self.control().kick(client_id).await
    }

    /// A handle that closes connections and sends commands to devices.
    pub fn control(&self) -> Control {
        Control { scx: self.scx.clone() }
    }

    /// Stops accepting, closes every connection and waits for their last wills to be
    /// ingested.
    pub async fn shutdown(self) {
        self.server.abort();
        let _ = self.server.await;
        let entries: Vec<_> = {
            let shared = self.scx.extends.shared().await;
            shared.iter().collect()
        };
        let n = entries.len();
        for mut entry in entries {
            let _ = tokio::time::timeout(Duration::from_secs(2), entry.kick(true, true, true)).await;
        }
        tracing::info!(closed = n, "mqtt stopped");
    }
}

fn bind(
    opts: &Options,
    addr: SocketAddr,
    tls: Option<&TlsFiles>,
) -> Result<(rmqtt::net::Listener, SocketAddr), Error> {
    let bind_err = |source| Error::Bind { addr, source };
    let path = |p: &PathBuf| p.display().to_string();
    let mut b = Builder::new()
        .name(if tls.is_some() { "mqtts" } else { "mqtt" })
        .laddr(addr)
        .nodelay(true)
        // Restart at once even while old connections linger in TIME_WAIT.
        .reuseaddr(Some(true))
        .max_inflight(NonZeroU16::new(opts.max_inflight.max(1)).unwrap_or(NonZeroU16::MIN))
        .max_packet_size(opts.max_packet_size)
        .max_mqueue_len(opts.max_mqueue_len)
        .max_handshaking_limit(opts.max_handshaking)
        .max_clientid_len(nanofleet_proto::topics::MAX_DEVICE_ID_LEN)
        // Every connection passes the authenticate hook (below), with or without a
        // user name.
        .allow_anonymous(false);
    if let Some(t) = tls {
        b = b
            .tls_cross_certificate(true)
            .tls_cert(Some(path(&t.cert)))
            .tls_key(Some(path(&t.key)))
            .tls_client_ca_certs(Some(path(&t.client_ca)))
            .collect_cert_info(true);
    }
    let listener = b.bind().map_err(bind_err)?;
    let local = listener.local_addr().map_err(bind_err)?;
    let listener = match tls {
        Some(_) => listener.tls(),
        None => listener.tcp(),
    }
    .map_err(|source| Error::Bind { addr: local, source })?;
    Ok((listener, local))
}

/// Closes client connections of a running broker and sends messages to its clients;
/// cheap to clone.
#[derive(Clone)]
pub struct Control {
    scx: ServerContext,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").finish_non_exhaustive()
    }
}

impl Control {
    /// Closes every connection of `client_id` (its last will is published). Returns
    /// whether one was open.
    pub async fn kick(&self, client_id: &str) -> bool {
        let entries: Vec<_> = {
            let shared = self.scx.extends.shared().await;
            shared.iter().filter(|e| e.session().is_some_and(|s| &*s.id.client_id == client_id)).collect()
        };
        let mut any = false;
        for mut entry in entries {
            any |= entry.kick(true, true, true).await.is_ok();
        }
        any
    }

    /// Publishes a QoS 1 message from the server to whoever subscribes to `topic`
    /// (a device to its own command topics). Returns how many subscribers it reached:
    /// 0 when the device is not connected or not subscribed yet.
    pub async fn send(&self, topic: &str, payload: Vec<u8>) -> usize {
        let codec = rmqtt::codec::types::Publish {
            dup: false,
            retain: false,
            qos: rmqtt::codec::types::QoS::AtLeastOnce,
            topic: topic.into(),
            packet_id: None,
            payload: payload.into(),
            properties: None,
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let publish = rmqtt::types::Publish::new(Box::new(codec), None, None, Some(now));
        let from = rmqtt::types::From::from_system(rmqtt::types::Id::from(
            self.scx.node.id(),
            rmqtt::types::ClientId::from_static("nanofleet-server"),
        ));
        match self.scx.extends.shared().await.forwards(None, from, publish).await {
            Ok(n) => n,
            Err((n, failures)) => {
                for (to, _, _, reason) in failures {
                    tracing::warn!(to = ?to, %reason, topic, "command not delivered");
                }
                n
            }
        }
    }
}

/// Names one connection of a client: its start time and remote address.
fn connection_token(id: &rmqtt::types::Id) -> String {
    format!("{}@{:?}", id.create_time, id.remote_addr)
}

#[derive(Clone)]
struct IngestHook {
    ingest: Ingest,
    admission: Option<Arc<dyn Admission>>,
}

#[async_trait]
impl Handler for IngestHook {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        match param {
            Parameter::ClientAuthenticate(connect) => {
                let client_id = &connect.id().client_id;
                let cert_cn = connect.cert().and_then(|c| c.common_name.clone()).unwrap_or_default();
                let verdict = match (connect.cert(), &self.admission) {
                    // Plaintext (loopback development listener): no identity to check.
                    (None, _) => Ok(()),
                    (Some(cert), Some(admission)) => {
                        let cn = cert.common_name.as_deref().unwrap_or_default();
                        let serial = cert.serial.as_deref().unwrap_or_default();
                        admission.admit(client_id, cn, serial)
                    }
                    (Some(_), None) => Ok(()),
                };
                let result = match verdict {
                    Ok(()) => AuthResult::Allow(false, None),
                    Err(reason) => {
                        tracing::warn!(%client_id, %cert_cn, %reason, "connection refused");
                        if let Some(a) = &self.admission {
                            a.refused(client_id, &cert_cn, &reason).await;
                        }
                        AuthResult::NotAuthorized
                    }
                };
                (false, Some(HookResult::AuthResult(result)))
            }
            Parameter::MessagePublishCheckAcl(session, publish) => {
                // Only presence messages need to know their connection.
                let presence =
                    topics::parse_device_topic(&publish.topic).is_ok_and(|(_, c)| c == Channel::State);
                let connection = presence.then(|| connection_token(&session.id));
                let inbound = Inbound {
                    client_id: Some(&session.id.client_id),
                    connection: connection.as_deref(),
                    topic: &publish.topic,
                    payload: &publish.payload,
                };
                let result = match self.ingest.handle(inbound).await {
                    Ok(Outcome::Stored) => PublishAclResult::allow(),
                    Ok(Outcome::Rejected(r)) => {
                        let code = match &r {
                            Reject::Topic(TopicError::UnknownChannel { .. })
                            | Reject::UnsupportedChannel { .. } => PublishAckReason::TopicNameInvalid,
                            Reject::Topic(_)
                            | Reject::ClientIdentity { .. }
                            | Reject::PayloadIdentity { .. }
                            | Reject::UnknownDevice { .. } => PublishAckReason::NotAuthorized,
                            Reject::Malformed { .. }
                            | Reject::OutOfRange { .. }
                            | Reject::BadRecord { .. } => PublishAckReason::PayloadFormatInvalid,
                        };
                        PublishAclResult(PublishResult::reason_code(code, Some(r.to_string().into()), false))
                    }
                    // Not committed: no PUBACK; closing the connection makes the device re-send.
                    Err(e) => PublishAclResult(PublishResult::reason_code(
                        PublishAckReason::ImplementationSpecificError,
                        Some(e.to_string().into()),
                        true,
                    )),
                };
                (false, Some(HookResult::PublishAclResult(result)))
            }
            Parameter::MessagePublish(_, from, publish) if matches!(from.typ(), FromType::LastWill) => {
                let connection = connection_token(&from.id);
                let inbound = Inbound {
                    client_id: Some(&from.id.client_id),
                    connection: Some(&connection),
                    topic: &publish.topic,
                    payload: &publish.payload,
                };
                let _ = self.ingest.handle(inbound).await;
                (true, acc)
            }
            // A device subscribes only under its own prefix (commands to it).
            Parameter::ClientSubscribeCheckAcl(session, subscribe) => {
                let prefix = topics::device_prefix(&session.id.client_id);
                let result = if subscribe.topic_filter.starts_with(&prefix) {
                    SubscribeAclResult::new_success(subscribe.opts.qos(), None)
                } else {
                    tracing::warn!(
                        client_id = %session.id.client_id,
                        filter = %subscribe.topic_filter,
                        "subscription refused: outside the client's own prefix"
                    );
                    SubscribeAclResult::new_failure(SubscribeAckReason::NotAuthorized)
                };
                (false, Some(HookResult::SubscribeAclResult(result)))
            }
            Parameter::ClientDisconnected(session, _) => {
                let connection = connection_token(&session.id);
                if let Err(e) = self.ingest.connection_closed(&session.id.client_id, &connection).await {
                    tracing::warn!(client_id = %session.id.client_id, error = %e, "presence not updated");
                }
                (true, acc)
            }
            _ => (true, acc),
        }
    }
}
