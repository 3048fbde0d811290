//! Device onboarding and lifecycle: sites, enrollment tokens, certificates, and who may
//! connect. Transport-free, like [`crate::Fleet`].
//!
//! Every change commits with its audit record; every refusal of a device or token is
//! audited too, so an attack leaves a trace.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nanofleet_pki::{DeviceIdentity, EnrollToken, FleetCa, secret_matches};
use nanofleet_proto::topics::validate_device_id;
use nanofleet_proto::v1 as pb;
use nanofleet_store::{AuditEntry, CertRecord, EnrollCommit, EnrollTokenRecord, SiteRecord, Store};

use crate::Error;
use crate::now_ms;

/// Who makes a change, as the audit trail names them: `person:alice`, `device:NF-1`,
/// `system`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor(pub String);

impl Actor {
    pub fn system() -> Actor {
        Actor("system".into())
    }
    pub fn device(id: &str) -> Actor {
        Actor(format!("device:{id}"))
    }
}

/// Settings of device onboarding.
#[derive(Debug, Clone)]
pub struct TrustOptions {
    /// Life of a device certificate; devices renew at two thirds of it.
    pub device_cert_validity: Duration,
    /// The MQTT address devices are told to connect to (host:port).
    pub mqtt_address: String,
    /// The fleet's signed trust root, handed to devices at enrollment.
    pub trust_root_json: String,
}

impl Default for TrustOptions {
    fn default() -> Self {
        TrustOptions {
            device_cert_validity: Duration::from_secs(7 * 86_400),
            mqtt_address: String::new(),
            trust_root_json: String::new(),
        }
    }
}

/// Longest and shortest token life.
pub const TOKEN_MIN_LIFE: Duration = Duration::from_secs(60);
pub const TOKEN_MAX_LIFE: Duration = Duration::from_secs(30 * 86_400);
pub const TOKEN_MAX_USES: u32 = 10_000;

/// Who may connect, in memory: checked at every MQTT connect, so it must not wait for
/// the database. Only enrolled, active devices are admitted, and only with a
/// certificate the server issued to them that is not revoked: a certificate for any
/// other id or serial, even one signed by the fleet's own intermediate, is refused.
/// Kept current by every change made through [`Trust`] and reloaded periodically
/// (other servers sharing the database change it too).
///
/// A reload reads the database and then replaces the lists; a change this server
/// commits while the read is under way may be missing from what it read. Such changes
/// are kept in a journal and made again on top of the reloaded lists, so that a device
/// enrolled during a reload is not refused, nor a blocked one admitted again.
#[derive(Debug, Default)]
struct Blocklist {
    active_devices: HashSet<String>,
    /// Serials issued and not revoked, by device.
    issued: std::collections::HashMap<String, HashSet<String>>,
    /// Changes made so far (numbers the journal).
    changes: u64,
    /// Reloads reading the database now.
    reloading: usize,
    /// While `reloading > 0`: the changes made since the oldest of them began.
    journal: Vec<(u64, Change)>,
}

/// A change of who may connect, committed by this server.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Change {
    /// Enrolled: active, with this certificate.
    Enrolled { device_id: String, serial: String },
    /// Renewed: another certificate.
    Renewed { device_id: String, serial: String },
    /// Decommissioned or being replaced: nothing admitted.
    Blocked { device_id: String },
}

impl Blocklist {
    fn apply(&mut self, change: &Change) {
        match change {
            Change::Enrolled { device_id, serial } => {
                self.active_devices.insert(device_id.clone());
                self.issued.entry(device_id.clone()).or_default().insert(serial.clone());
            }
            Change::Renewed { device_id, serial } => {
                self.issued.entry(device_id.clone()).or_default().insert(serial.clone());
            }
            Change::Blocked { device_id } => {
                self.active_devices.remove(device_id);
                self.issued.remove(device_id);
            }
        }
    }

    /// Makes a change this server committed to the database.
    fn change(&mut self, change: Change) {
        self.apply(&change);
        self.changes += 1;
        if self.reloading > 0 {
            self.journal.push((self.changes, change));
        }
    }

    /// A reload starts reading the database; returns its mark for [`Blocklist::reloaded`].
    fn reload_started(&mut self) -> u64 {
        self.reloading += 1;
        self.changes
    }

    /// Replaces the lists with what the reload that began at `mark` read, then makes
    /// again the changes made since `mark`, which the read may have missed.
    fn reloaded(&mut self, mark: u64, read: nanofleet_store::Revocations) {
        self.active_devices = read.active_devices.into_iter().collect();
        self.issued.clear();
        for (device, serial) in read.valid_certs {
            self.issued.entry(device).or_default().insert(serial);
        }
        let since: Vec<Change> =
            self.journal.iter().filter(|(n, _)| *n > mark).map(|(_, c)| c.clone()).collect();
        for change in &since {
            self.apply(change);
        }
    }

    /// A reload is over (done, failed or dropped).
    fn reload_ended(&mut self) {
        self.reloading = self.reloading.saturating_sub(1);
        if self.reloading == 0 {
            self.journal.clear();
        }
    }
}

/// Ends a reload however its future ends.
struct Reloading<'a>(&'a RwLock<Blocklist>);

impl Drop for Reloading<'_> {
    fn drop(&mut self) {
        self.0.write().unwrap_or_else(|e| e.into_inner()).reload_ended();
    }
}

/// Device onboarding; cheap to clone.
#[derive(Clone)]
pub struct Trust {
    store: Store,
    ca: Arc<FleetCa>,
    opts: TrustOptions,
    blocked: Arc<RwLock<Blocklist>>,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust").field("ca", &self.ca).finish_non_exhaustive()
    }
}

fn ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl Trust {
    /// Loads who is blocked from the store.
    pub async fn new(store: Store, ca: Arc<FleetCa>, opts: TrustOptions) -> Result<Trust, Error> {
        let trust = Trust { store, ca, opts, blocked: Arc::default() };
        trust.reload().await?;
        Ok(trust)
    }

    /// The same state with other settings.
    pub fn with_options(mut self, opts: TrustOptions) -> Trust {
        self.opts = opts;
        self
    }

    pub fn ca(&self) -> &FleetCa {
        &self.ca
    }

    /// Re-reads who is blocked (other servers sharing a PostgreSQL database may have
    /// decommissioned a device).
    pub async fn reload(&self) -> Result<(), Error> {
        let mark = self.blocked.write().unwrap_or_else(|e| e.into_inner()).reload_started();
        let _reloading = Reloading(&self.blocked);
        let read = self.store.revocations(now_ms()).await?;
        self.blocked.write().unwrap_or_else(|e| e.into_inner()).reloaded(mark, read);
        Ok(())
    }

    /// May this TLS client connect? `cert_cn` and `serial` come from its verified client
    /// certificate. Returns the refusal reason otherwise.
    pub fn admit(&self, client_id: &str, cert_cn: &str, serial: &str) -> Result<(), String> {
        if client_id != cert_cn {
            return Err(format!(
                "client id {client_id:?} differs from the certificate's device id {cert_cn:?}"
            ));
        }
        let b = self.blocked.read().unwrap_or_else(|e| e.into_inner());
        if !b.active_devices.contains(cert_cn) {
            return Err(format!(
                "device {cert_cn:?} is not an active enrolled device (decommissioned, being replaced, or never enrolled)"
            ));
        }
        if !b.issued.get(cert_cn).is_some_and(|s| s.contains(serial)) {
            return Err(format!(
                "certificate {serial} of device {cert_cn:?} is revoked, expired or was never issued by this server"
            ));
        }
        Ok(())
    }

    /// Records a refused connection or enrollment in the audit trail.
    pub async fn audit_refusal(&self, actor: &Actor, action: &str, subject: &str, reason: &str) {
        let entry = AuditEntry {
            at_ms: now_ms(),
            actor: actor.0.clone(),
            action: action.into(),
            subject: subject.into(),
            site_id: None,
            reason: reason.into(),
            old_value: None,
            new_value: None,
        };
        if let Err(e) = self.store.append_audit(entry).await {
            tracing::error!(error = %e, action, subject, "audit record of a refusal not written");
        }
    }

    // === sites ===

    pub async fn create_site(
        &self,
        actor: &Actor,
        id: &str,
        name: &str,
        time_zone: &str,
        reason: &str,
    ) -> Result<SiteRecord, Error> {
        validate_site_id(id)?;
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
            return Err(Error::invalid("name", name, "1 to 100 printable characters"));
        }
        let tz = if time_zone.is_empty() { "UTC" } else { time_zone };
        if jiff::tz::TimeZone::get(tz).is_err() {
            return Err(Error::invalid(
                "time_zone",
                tz,
                "an IANA time zone name such as Europe/Paris or UTC",
            ));
        }
        let site =
            SiteRecord { id: id.into(), name: name.into(), time_zone: tz.into(), created_ms: now_ms() };
        let audit = AuditEntry {
            at_ms: site.created_ms,
            actor: actor.0.clone(),
            action: "site.create".into(),
            subject: id.into(),
            site_id: Some(id.into()),
            reason: reason.into(),
            old_value: None,
            new_value: Some(serde_json::json!({"name": site.name, "time_zone": site.time_zone}).to_string()),
        };
        self.store.create_site(&site, &audit).await.map_err(conflict_or)?;
        Ok(site)
    }

    // === tokens ===

    /// Creates a token; returns its record and the secret string (shown once).
    pub async fn create_token(
        &self,
        actor: &Actor,
        site_id: &str,
        life: Duration,
        uses: u32,
        device_id: &str,
        reason: &str,
    ) -> Result<(pb::EnrollToken, String), Error> {
        if self.store.get_site(site_id).await?.is_none() {
            return Err(Error::NotFound { what: "site", id: site_id.into() });
        }
        if !(TOKEN_MIN_LIFE..=TOKEN_MAX_LIFE).contains(&life) {
            return Err(Error::invalid("expires_in_seconds", life.as_secs().to_string(), "60 s to 30 days"));
        }
        if !(1..=TOKEN_MAX_USES).contains(&uses) {
            return Err(Error::invalid("uses", uses.to_string(), "1 to 10000"));
        }
        if !device_id.is_empty() {
            validate_device_id(device_id)
                .map_err(|e| Error::invalid("device_id", device_id, e.to_string()))?;
            if uses != 1 {
                return Err(Error::invalid("uses", uses.to_string(), "1 when the token names a device id"));
            }
            if self.store.get_device(device_id).await?.is_some() {
                return Err(Error::Conflict(format!(
                    "device {device_id:?} is enrolled already; to put new hardware in its place, replace it"
                )));
            }
        }
        let token = EnrollToken::generate(&self.ca.root_fingerprint());
        let now = now_ms();
        let rec = EnrollTokenRecord {
            id: token.id.clone(),
            site_id: site_id.into(),
            device_id: device_id.into(),
            replacement: false,
            secret_hash: token.secret_hash(),
            created_ms: now,
            expires_ms: now + life.as_millis() as i64,
            uses_allowed: uses.into(),
            uses_left: uses.into(),
            created_by: actor.0.clone(),
            revoked_ms: 0,
        };
        let audit = AuditEntry {
            at_ms: now,
            actor: actor.0.clone(),
            action: "enroll_token.create".into(),
            subject: rec.id.clone(),
            site_id: Some(site_id.into()),
            reason: reason.into(),
            old_value: None,
            new_value: Some(token_json(&rec).to_string()),
        };
        self.store.insert_enroll_token(&rec, &audit).await?;
        Ok((token_pb(&rec), token.reveal()))
    }

    pub async fn list_tokens(&self, site_id: Option<&str>) -> Result<Vec<pb::EnrollToken>, Error> {
        Ok(self
            .store
            .list_enroll_tokens(site_id.filter(|s| !s.is_empty()))
            .await?
            .iter()
            .map(token_pb)
            .collect())
    }

    /// The site a token belongs to (for permission checks before acting on it).
    pub async fn token_site(&self, token_id: &str) -> Result<String, Error> {
        match self.store.get_enroll_token(token_id).await? {
            Some(t) => Ok(t.site_id),
            None => Err(Error::NotFound { what: "enrollment token", id: token_id.into() }),
        }
    }

    pub async fn revoke_token(
        &self,
        actor: &Actor,
        token_id: &str,
        reason: &str,
    ) -> Result<pb::EnrollToken, Error> {
        let old = self
            .store
            .get_enroll_token(token_id)
            .await?
            .ok_or_else(|| Error::NotFound { what: "enrollment token", id: token_id.into() })?;
        let now = now_ms();
        let audit = AuditEntry {
            at_ms: now,
            actor: actor.0.clone(),
            action: "enroll_token.revoke".into(),
            subject: token_id.into(),
            site_id: Some(old.site_id.clone()),
            reason: reason.into(),
            old_value: Some(token_json(&old).to_string()),
            new_value: Some(serde_json::json!({"revoked_ms": now}).to_string()),
        };
        let rec = self.store.revoke_enroll_token(token_id, now, &audit).await.map_err(conflict_or)?;
        Ok(token_pb(&rec))
    }

    // === devices ===

    /// Enrolls a device: checks the token, signs the CSR's key under the identity the
    /// token gives, and commits. Refusals are audited.
    pub async fn enroll(&self, req: &pb::EnrollRequest) -> Result<pb::EnrollResponse, Error> {
        match self.enroll_inner(req).await {
            Ok(r) => Ok(r),
            Err(e) => {
                let subject = EnrollToken::parse(&req.token)
                    .map(|t| t.id)
                    .unwrap_or_else(|_| "(unreadable token)".into());
                self.audit_refusal(
                    &Actor("anonymous".into()),
                    "device.enroll.refused",
                    &subject,
                    &e.to_string(),
                )
                .await;
                Err(e)
            }
        }
    }

    async fn enroll_inner(&self, req: &pb::EnrollRequest) -> Result<pb::EnrollResponse, Error> {
        let token = EnrollToken::parse(&req.token).map_err(|e| Error::Unauthenticated(e.to_string()))?;
        if token.root_fingerprint != self.ca.root_fingerprint() {
            return Err(Error::Unauthenticated(format!(
                "enrollment token {} is for another fleet (its root fingerprint differs from this server's)",
                token.id
            )));
        }
        let rec = self
            .store
            .get_enroll_token(&token.id)
            .await?
            .filter(|r| secret_matches(&token, &r.secret_hash))
            .ok_or_else(|| {
                Error::Unauthenticated(format!("enrollment token {} is not recognised", token.id))
            })?;
        let now = now_ms();
        if rec.revoked_ms != 0 {
            return Err(Error::Unauthenticated(format!("enrollment token {} was revoked", rec.id)));
        }
        if rec.expires_ms <= now {
            return Err(Error::Unauthenticated(format!(
                "enrollment token {} expired at {}",
                rec.id,
                humanize_ms(rec.expires_ms)
            )));
        }
        if rec.uses_left <= 0 {
            return Err(Error::Unauthenticated(format!(
                "enrollment token {} was used already ({} of {} uses taken)",
                rec.id, rec.uses_allowed, rec.uses_allowed
            )));
        }
        check_text("model", &req.model, 64)?;
        check_text("hardware_serial", &req.hardware_serial, 64)?;
        let device_id = if rec.device_id.is_empty() { new_device_id() } else { rec.device_id.clone() };
        let who = DeviceIdentity { device_id: device_id.clone(), site_id: rec.site_id.clone() };
        let cert = self
            .ca
            .issue_device_cert(&req.csr_der, &who, self.opts.device_cert_validity)
            .map_err(|e| Error::invalid("csr_der", format!("{} bytes", req.csr_der.len()), e.to_string()))?;
        let cert_rec = CertRecord {
            serial: cert.serial.clone(),
            device_id: device_id.clone(),
            not_before_ms: ms(cert.not_before),
            not_after_ms: ms(cert.not_after),
            issued_ms: now,
            revoked_ms: 0,
        };
        let commit = EnrollCommit {
            token_id: rec.id.clone(),
            now_ms: now,
            device_id: device_id.clone(),
            site_id: rec.site_id.clone(),
            replacement: rec.replacement,
            model: req.model.clone(),
            hardware_serial: req.hardware_serial.clone(),
            cert: cert_rec.clone(),
            audit: AuditEntry {
                at_ms: now,
                actor: format!("enroll_token:{}", rec.id),
                action: if rec.replacement { "device.replace.enroll" } else { "device.enroll" }.into(),
                subject: device_id.clone(),
                site_id: Some(rec.site_id.clone()),
                reason: format!("enrolled with token {} created by {}", rec.id, rec.created_by),
                old_value: None,
                new_value: Some(
                    serde_json::json!({
                        "site_id": rec.site_id, "serial": cert.serial, "not_after_ms": cert_rec.not_after_ms,
                        "model": req.model, "hardware_serial": req.hardware_serial,
                    })
                    .to_string(),
                ),
            },
        };
        self.store.commit_enrollment(&commit).await.map_err(conflict_or)?;
        self.blocked
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .change(Change::Enrolled { device_id: device_id.clone(), serial: cert.serial.clone() });
        tracing::info!(device_id, site_id = %rec.site_id, token = %rec.id, serial = %cert.serial, "device enrolled");
        Ok(pb::EnrollResponse {
            device_id,
            site_id: rec.site_id,
            certificate_chain_pem: cert.chain_pem,
            root_ca_pem: self.ca.root_pem(),
            not_after_unix_ms: cert_rec.not_after_ms,
            mqtt_address: self.opts.mqtt_address.clone(),
            trust_root_json: self.opts.trust_root_json.clone(),
        })
    }

    /// Renews the certificate of an active device, which authenticated with its current
    /// one (`device_id` and `serial` come from that verified certificate).
    pub async fn renew(
        &self,
        device_id: &str,
        serial: &str,
        csr_der: &[u8],
    ) -> Result<pb::RenewResponse, Error> {
        let refuse = |reason: String| async move {
            self.audit_refusal(&Actor::device(device_id), "device.renew.refused", device_id, &reason).await;
            Err(Error::PermissionDenied(reason))
        };
        if let Err(reason) = self.admit(device_id, device_id, serial) {
            return refuse(reason).await;
        }
        let Some(device) = self.store.get_device(device_id).await? else {
            return refuse(format!("device {device_id:?} is not enrolled")).await;
        };
        if device.status != "active" {
            return refuse(format!("device {device_id:?} is {}", device.status)).await;
        }
        let who = DeviceIdentity { device_id: device_id.into(), site_id: device.site_id.clone() };
        let cert = self
            .ca
            .issue_device_cert(csr_der, &who, self.opts.device_cert_validity)
            .map_err(|e| Error::invalid("csr_der", format!("{} bytes", csr_der.len()), e.to_string()))?;
        let now = now_ms();
        let rec = CertRecord {
            serial: cert.serial.clone(),
            device_id: device_id.into(),
            not_before_ms: ms(cert.not_before),
            not_after_ms: ms(cert.not_after),
            issued_ms: now,
            revoked_ms: 0,
        };
        let audit = AuditEntry {
            at_ms: now,
            actor: Actor::device(device_id).0,
            action: "device.renew".into(),
            subject: device_id.into(),
            site_id: Some(device.site_id.clone()),
            reason: format!("renewed before the end of certificate {serial}"),
            old_value: Some(
                serde_json::json!({"serial": serial, "not_after_ms": device.cert_not_after_ms}).to_string(),
            ),
            new_value: Some(
                serde_json::json!({"serial": rec.serial, "not_after_ms": rec.not_after_ms}).to_string(),
            ),
        };
        self.store.record_renewal(&rec, &audit).await.map_err(conflict_or)?;
        self.blocked
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .change(Change::Renewed { device_id: device_id.to_owned(), serial: rec.serial.clone() });
        Ok(pb::RenewResponse { certificate_chain_pem: cert.chain_pem, not_after_unix_ms: rec.not_after_ms })
    }

    /// Decommissions a device: revoked at once, its connection closed by the broker.
    pub async fn decommission(&self, actor: &Actor, device_id: &str, reason: &str) -> Result<(), Error> {
        if reason.trim().is_empty() {
            return Err(Error::invalid("reason", reason, "a non-empty reason (it goes to the audit trail)"));
        }
        let old = self
            .store
            .get_device(device_id)
            .await?
            .ok_or_else(|| Error::NotFound { what: "device", id: device_id.into() })?;
        let now = now_ms();
        let audit = AuditEntry {
            at_ms: now,
            actor: actor.0.clone(),
            action: "device.decommission".into(),
            subject: device_id.into(),
            site_id: Some(old.site_id.clone()),
            reason: reason.into(),
            old_value: Some(serde_json::json!({"status": old.status}).to_string()),
            new_value: Some(serde_json::json!({"status": "decommissioned"}).to_string()),
        };
        self.store.decommission_device(device_id, now, &audit).await.map_err(conflict_or)?;
        self.block(device_id).await;
        Ok(())
    }

    /// Starts replacing a device by new hardware; returns the one-time token for it.
    pub async fn replace(
        &self,
        actor: &Actor,
        device_id: &str,
        life: Duration,
        reason: &str,
    ) -> Result<String, Error> {
        if reason.trim().is_empty() {
            return Err(Error::invalid("reason", reason, "a non-empty reason (it goes to the audit trail)"));
        }
        if !(TOKEN_MIN_LIFE..=TOKEN_MAX_LIFE).contains(&life) {
            return Err(Error::invalid("expires_in_seconds", life.as_secs().to_string(), "60 s to 30 days"));
        }
        let old = self
            .store
            .get_device(device_id)
            .await?
            .ok_or_else(|| Error::NotFound { what: "device", id: device_id.into() })?;
        let token = EnrollToken::generate(&self.ca.root_fingerprint());
        let now = now_ms();
        let rec = EnrollTokenRecord {
            id: token.id.clone(),
            site_id: old.site_id.clone(),
            device_id: device_id.into(),
            replacement: true,
            secret_hash: token.secret_hash(),
            created_ms: now,
            expires_ms: now + life.as_millis() as i64,
            uses_allowed: 1,
            uses_left: 1,
            created_by: actor.0.clone(),
            revoked_ms: 0,
        };
        let audit = AuditEntry {
            at_ms: now,
            actor: actor.0.clone(),
            action: "device.replace".into(),
            subject: device_id.into(),
            site_id: Some(old.site_id.clone()),
            reason: reason.into(),
            old_value: Some(
                serde_json::json!({"status": old.status, "hardware_serial": old.hardware_serial}).to_string(),
            ),
            new_value: Some(serde_json::json!({"status": "replacing", "token": rec.id}).to_string()),
        };
        self.store.begin_replacement(&rec, now, &audit).await.map_err(conflict_or)?;
        self.block(device_id).await;
        Ok(token.reveal())
    }

    async fn block(&self, device_id: &str) {
        let forget = |b: &mut Blocklist| b.change(Change::Blocked { device_id: device_id.to_owned() });
        forget(&mut self.blocked.write().unwrap_or_else(|e| e.into_inner()));
        if let Err(e) = self.reload().await {
            tracing::warn!(error = %e, "admission reload failed; the device stays refused");
            forget(&mut self.blocked.write().unwrap_or_else(|e| e.into_inner()));
        }
    }
}

pub(crate) fn conflict_or(e: nanofleet_store::Error) -> Error {
    match e {
        nanofleet_store::Error::Conflict(m) => Error::Conflict(m),
        other => other.into(),
    }
}

/// Site ids: lowercase letters, digits and dashes, 2 to 32 characters, starting with a
/// letter. They appear in certificates and URLs.
pub fn validate_site_id(id: &str) -> Result<(), Error> {
    let ok = (2..=32).contains(&id.len())
        && id.starts_with(|c: char| c.is_ascii_lowercase())
        && id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid("site_id", id, "2 to 32 of a-z, 0-9 and -, starting with a letter"))
    }
}

fn check_text(field: &'static str, v: &str, max: usize) -> Result<(), Error> {
    if v.chars().count() > max || v.chars().any(char::is_control) {
        return Err(Error::invalid(
            field,
            v.chars().take(80).collect::<String>(),
            format!("at most {max} printable characters"),
        ));
    }
    Ok(())
}

/// `NF-` and 8 characters without look-alikes.
fn new_device_id() -> String {
    use rand::Rng as _;
    const A: &[u8] = b"ABCDEFGHJKMNPQRSTUVWXYZ23456789";
    let mut rng = rand::rng();
    let tail: String = (0..8).map(|_| A[rng.random_range(0..A.len())] as char).collect();
    format!("NF-{tail}")
}

fn humanize_ms(t: i64) -> String {
    jiff::Timestamp::from_millisecond(t).map(|t| t.to_string()).unwrap_or_else(|_| t.to_string())
}

fn token_json(t: &EnrollTokenRecord) -> serde_json::Value {
    serde_json::json!({
        "site_id": t.site_id, "device_id": t.device_id, "replacement": t.replacement,
        "expires_ms": t.expires_ms, "uses_allowed": t.uses_allowed, "uses_left": t.uses_left,
        "revoked_ms": t.revoked_ms,
    })
}

pub(crate) fn token_pb(t: &EnrollTokenRecord) -> pb::EnrollToken {
    pb::EnrollToken {
        id: t.id.clone(),
        site_id: t.site_id.clone(),
        device_id: t.device_id.clone(),
        replacement: t.replacement,
        created_unix_ms: t.created_ms,
        expires_unix_ms: t.expires_ms,
        uses_allowed: t.uses_allowed.try_into().unwrap_or(0),
        uses_left: t.uses_left.try_into().unwrap_or(0),
        created_by: t.created_by.clone(),
        revoked_unix_ms: t.revoked_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nanofleet_store::Revocations;

    fn enrolled(id: &str, serial: &str) -> Change {
        Change::Enrolled { device_id: id.into(), serial: serial.into() }
    }

    fn admits(b: &Blocklist, id: &str, serial: &str) -> bool {
        b.active_devices.contains(id) && b.issued.get(id).is_some_and(|s| s.contains(serial))
    }

    fn read(devices: &[(&str, &str)]) -> Revocations {
        Revocations {
            active_devices: devices.iter().map(|(d, _)| (*d).to_owned()).collect(),
            valid_certs: devices.iter().map(|(d, s)| ((*d).to_owned(), (*s).to_owned())).collect(),
        }
    }

    #[test]
    fn a_device_enrolled_while_a_reload_reads_stays_admitted() {
        let mut b = Blocklist::default();
        b.change(enrolled("NF-1", "01"));
        let mark = b.reload_started();
        b.change(enrolled("NF-2", "02"));
        // The read began before NF-2's commit.
        b.reloaded(mark, read(&[("NF-1", "01")]));
        b.reload_ended();
        assert!(admits(&b, "NF-1", "01"));
        assert!(admits(&b, "NF-2", "02"));
        assert!(b.journal.is_empty());
    }

    #[test]
    fn a_device_blocked_while_a_reload_reads_stays_blocked() {
        let mut b = Blocklist::default();
        b.change(enrolled("NF-1", "01"));
        let mark = b.reload_started();
        b.change(Change::Blocked { device_id: "NF-1".into() });
        b.reloaded(mark, read(&[("NF-1", "01")]));
        b.reload_ended();
        assert!(!admits(&b, "NF-1", "01"));
    }

    #[test]
    fn changes_made_before_a_reload_began_yield_to_what_it_read() {
        let mut b = Blocklist::default();
        b.change(enrolled("NF-1", "01"));
        // Another server decommissioned NF-1; this reload reads that.
        let mark = b.reload_started();
        b.reloaded(mark, read(&[]));
        b.reload_ended();
        assert!(!admits(&b, "NF-1", "01"));
    }

    #[test]
    fn overlapping_reloads_keep_the_changes_the_later_one_may_have_missed() {
        let mut b = Blocklist::default();
        let first = b.reload_started();
        b.change(enrolled("NF-1", "01"));
        let second = b.reload_started();
        b.change(Change::Renewed { device_id: "NF-1".into(), serial: "02".into() });
        b.reloaded(first, read(&[]));
        b.reload_ended();
        assert!(admits(&b, "NF-1", "01") && admits(&b, "NF-1", "02"));
        // The second read saw the enrollment but not the renewal.
        b.reloaded(second, read(&[("NF-1", "01")]));
        b.reload_ended();
        assert!(admits(&b, "NF-1", "01") && admits(&b, "NF-1", "02"));
        assert!(b.journal.is_empty() && b.reloading == 0);
    }
}
