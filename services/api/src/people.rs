//! People: roles, what each role may call, and authentication (API tokens for scripts,
//! user id and password for the dashboard).
//!
//! [`GRPC_ACCESS`] is the one table of who may call what; the gRPC layer
//! ([`crate::auth_layer`]) checks it on every call, and a test walks it. Site-scoped
//! roles (site IT, pharmacist) are further limited to their site inside the methods
//! ([`Caller::check_site`]).

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use nanofleet_proto::v1 as pb;
use nanofleet_store::{AuditEntry, CredentialKind, CredentialRecord, PersonRecord, Store};
use sha2::Digest as _;

use crate::now_ms;
use crate::{Actor, Error};

/// What a person may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Manufacturer operations: every site, every action.
    Ops,
    /// Hospital IT of one site: onboarding and decommissioning its devices.
    SiteIt,
    /// Pharmacist of one site.
    Pharmacist,
    /// Quality assurance.
    Qa,
    /// Reads everything, changes nothing.
    Auditor,
}

impl Role {
    pub const ALL: [Role; 5] = [Role::Ops, Role::SiteIt, Role::Pharmacist, Role::Qa, Role::Auditor];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Ops => "ops",
            Role::SiteIt => "site-it",
            Role::Pharmacist => "pharmacist",
            Role::Qa => "qa",
            Role::Auditor => "auditor",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Roles bound to one site.
    pub fn site_scoped(self) -> bool {
        matches!(self, Role::SiteIt | Role::Pharmacist)
    }

    pub fn from_pb(r: i32) -> Option<Role> {
        match pb::Role::try_from(r).ok()? {
            pb::Role::Ops => Some(Role::Ops),
            pb::Role::SiteIt => Some(Role::SiteIt),
            pb::Role::Pharmacist => Some(Role::Pharmacist),
            pb::Role::Qa => Some(Role::Qa),
            pb::Role::Auditor => Some(Role::Auditor),
            pb::Role::Unspecified => None,
        }
    }

    pub fn to_pb(self) -> pb::Role {
        match self {
            Role::Ops => pb::Role::Ops,
            Role::SiteIt => pb::Role::SiteIt,
            Role::Pharmacist => pb::Role::Pharmacist,
            Role::Qa => pb::Role::Qa,
            Role::Auditor => pb::Role::Auditor,
        }
    }
}

/// Who may call a gRPC method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No operator credential: the method authenticates its caller itself (a device
    /// with its enrollment token or client certificate).
    Device,
    /// People in these roles.
    Roles(&'static [Role]),
}

const EVERYONE: &[Role] = &Role::ALL;
const OPS: &[Role] = &[Role::Ops];
const OPS_SITE_IT: &[Role] = &[Role::Ops, Role::SiteIt];
const OPS_AUDITOR: &[Role] = &[Role::Ops, Role::Auditor];
const OPS_SITE_IT_AUDITOR: &[Role] = &[Role::Ops, Role::SiteIt, Role::Auditor];
const OVERSIGHT: &[Role] = &[Role::Ops, Role::Qa, Role::Auditor];
const RECIPE_READERS: &[Role] = &[Role::Ops, Role::Pharmacist, Role::Qa, Role::Auditor];
const OPS_PHARMACIST: &[Role] = &[Role::Ops, Role::Pharmacist];
const SIGNERS: &[Role] = &[Role::Pharmacist, Role::Qa];
const QA: &[Role] = &[Role::Qa];
const OPS_QA: &[Role] = &[Role::Ops, Role::Qa];
const PHARMACIST: &[Role] = &[Role::Pharmacist];
/// Who handles cartridges at a site (ops for any site).
const SITE_STAFF: &[Role] = &[Role::Ops, Role::SiteIt, Role::Pharmacist];

/// Every `nanofleet.v1` method and who may call it. A method missing here is refused.
pub const GRPC_ACCESS: &[(&str, Access)] = &[
    ("/nanofleet.v1.FleetService/ListSites", Access::Roles(EVERYONE)),
    ("/nanofleet.v1.FleetService/ListDevices", Access::Roles(EVERYONE)),
    ("/nanofleet.v1.FleetService/GetDevice", Access::Roles(EVERYONE)),
    ("/nanofleet.v1.FleetService/CreateSite", Access::Roles(OPS)),
    ("/nanofleet.v1.FleetService/DecommissionDevice", Access::Roles(OPS_SITE_IT)),
    ("/nanofleet.v1.FleetService/ReplaceDevice", Access::Roles(OPS_SITE_IT)),
    ("/nanofleet.v1.FleetService/SetMaintenanceWindow", Access::Roles(OPS_SITE_IT)),
    ("/nanofleet.v1.FleetService/SetDeviceTags", Access::Roles(OPS_SITE_IT)),
    ("/nanofleet.v1.TelemetryService/QueryTelemetry", Access::Roles(EVERYONE)),
    ("/nanofleet.v1.TelemetryService/QuerySeries", Access::Roles(EVERYONE)),
    ("/nanofleet.v1.TelemetryService/GetIngestStats", Access::Roles(OPS_AUDITOR)),
    ("/nanofleet.v1.EnrollmentService/CreateEnrollToken", Access::Roles(OPS_SITE_IT)),
    ("/nanofleet.v1.EnrollmentService/ListEnrollTokens", Access::Roles(OPS_SITE_IT_AUDITOR)),
    ("/nanofleet.v1.EnrollmentService/RevokeEnrollToken", Access::Roles(OPS_SITE_IT)),
    ("/nanofleet.v1.EnrollmentService/Enroll", Access::Device),
    ("/nanofleet.v1.EnrollmentService/Renew", Access::Device),
    ("/nanofleet.v1.PeopleService/WhoAmI", Access::Roles(EVERYONE)),
    ("/nanofleet.v1.PeopleService/CreatePerson", Access::Roles(OPS)),
    ("/nanofleet.v1.PeopleService/ListPeople", Access::Roles(OPS_AUDITOR)),
    ("/nanofleet.v1.PeopleService/GrantRole", Access::Roles(OPS)),
    ("/nanofleet.v1.PeopleService/DisablePerson", Access::Roles(OPS)),
    ("/nanofleet.v1.PeopleService/CreateApiToken", Access::Roles(EVERYONE)),
    ("/nanofleet.v1.PeopleService/RevokeApiToken", Access::Roles(EVERYONE)),
    ("/nanofleet.v1.AuditService/ListAudit", Access::Roles(OVERSIGHT)),
    ("/nanofleet.v1.AuditService/VerifyAudit", Access::Roles(OVERSIGHT)),
    ("/nanofleet.v1.RecipeService/SaveDraft", Access::Roles(OPS_PHARMACIST)),
    ("/nanofleet.v1.RecipeService/SignRecipe", Access::Roles(SIGNERS)),
    ("/nanofleet.v1.RecipeService/RejectRecipe", Access::Roles(QA)),
    ("/nanofleet.v1.RecipeService/GetRecipe", Access::Roles(RECIPE_READERS)),
    ("/nanofleet.v1.RecipeService/ListRecipes", Access::Roles(RECIPE_READERS)),
    ("/nanofleet.v1.RecipeService/ListRecipeDeliveries", Access::Roles(RECIPE_READERS)),
    ("/nanofleet.v1.BatchService/StartRun", Access::Roles(PHARMACIST)),
    ("/nanofleet.v1.BatchService/ListBatches", Access::Roles(RECIPE_READERS)),
    ("/nanofleet.v1.BatchService/GetBatch", Access::Roles(RECIPE_READERS)),
    ("/nanofleet.v1.BatchService/ReleaseBatch", Access::Roles(QA)),
    ("/nanofleet.v1.BatchService/ExportBatch", Access::Roles(RECIPE_READERS)),
    ("/nanofleet.v1.MonitoringService/GetControlChart", Access::Roles(EVERYONE)),
    ("/nanofleet.v1.MonitoringService/CompareStrata", Access::Roles(EVERYONE)),
    ("/nanofleet.v1.MonitoringService/CompareCohorts", Access::Roles(EVERYONE)),
    ("/nanofleet.v1.MonitoringService/GetFleetHealth", Access::Roles(EVERYONE)),
    ("/nanofleet.v1.MonitoringService/ListAlerts", Access::Roles(EVERYONE)),
    ("/nanofleet.v1.MonitoringService/AcknowledgeAlert", Access::Roles(OPS_QA)),
    ("/nanofleet.v1.MonitoringService/WatchAlerts", Access::Roles(EVERYONE)),
    ("/nanofleet.v1.FirmwareService/UploadFirmware", Access::Roles(OPS)),
    ("/nanofleet.v1.FirmwareService/ListFirmware", Access::Roles(OVERSIGHT)),
    ("/nanofleet.v1.RolloutService/CreateRollout", Access::Roles(OPS)),
    ("/nanofleet.v1.RolloutService/GetRollout", Access::Roles(OVERSIGHT)),
    ("/nanofleet.v1.RolloutService/ListRollouts", Access::Roles(OVERSIGHT)),
    ("/nanofleet.v1.RolloutService/PauseRollout", Access::Roles(OPS)),
    ("/nanofleet.v1.RolloutService/ResumeRollout", Access::Roles(OPS)),
    ("/nanofleet.v1.RolloutService/CancelRollout", Access::Roles(OPS)),
    ("/nanofleet.v1.RolloutService/RollbackRollout", Access::Roles(OPS)),
    ("/nanofleet.v1.RolloutService/WatchRollout", Access::Roles(OVERSIGHT)),
    ("/nanofleet.v1.InventoryService/CreateCartridgeType", Access::Roles(OPS)),
    ("/nanofleet.v1.InventoryService/ListCartridgeTypes", Access::Roles(EVERYONE)),
    ("/nanofleet.v1.InventoryService/CreateLot", Access::Roles(OPS)),
    ("/nanofleet.v1.InventoryService/ReleaseLot", Access::Roles(QA)),
    ("/nanofleet.v1.InventoryService/ListLots", Access::Roles(EVERYONE)),
    ("/nanofleet.v1.InventoryService/GetLot", Access::Roles(EVERYONE)),
    ("/nanofleet.v1.InventoryService/RecallLot", Access::Roles(QA)),
    ("/nanofleet.v1.InventoryService/GetDenyListStatus", Access::Roles(OVERSIGHT)),
    ("/nanofleet.v1.InventoryService/ShipCartridges", Access::Roles(OPS)),
    ("/nanofleet.v1.InventoryService/ListShipments", Access::Roles(EVERYONE)),
    ("/nanofleet.v1.InventoryService/ReceiveShipment", Access::Roles(SITE_STAFF)),
    ("/nanofleet.v1.InventoryService/ScanCartridge", Access::Roles(EVERYONE)),
    ("/nanofleet.v1.InventoryService/GetCartridge", Access::Roles(EVERYONE)),
    ("/nanofleet.v1.InventoryService/MoveCartridge", Access::Roles(SITE_STAFF)),
    ("/nanofleet.v1.InventoryService/GetStock", Access::Roles(EVERYONE)),
];

/// The access rule of a gRPC path; `None` for paths outside `nanofleet.v1`.
pub fn grpc_access(path: &str) -> Option<Access> {
    GRPC_ACCESS.iter().find(|(p, _)| *p == path).map(|(_, a)| *a)
}

/// An authenticated person making a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub person_id: String,
    pub display_name: String,
    pub role: Role,
    /// The site of a site-scoped role.
    pub site_id: Option<String>,
    /// The API token or session used.
    pub credential_id: String,
}

impl Caller {
    pub fn actor(&self) -> Actor {
        Actor(format!("person:{}", self.person_id))
    }

    /// The site a site-scoped caller is limited to; `None` sees all sites.
    pub fn site_limit(&self) -> Option<&str> {
        if self.role.site_scoped() { self.site_id.as_deref().or(Some("")) } else { None }
    }

    /// A device of another site does not exist for a site-scoped caller: the same
    /// answer as for an unknown id, so ids of other hospitals cannot be probed.
    pub fn check_device_site(&self, device_id: &str, site_id: &str) -> Result<(), Error> {
        match self.site_limit() {
            Some(own) if own != site_id => Err(Error::NotFound { what: "device", id: device_id.into() }),
            _ => Ok(()),
        }
    }

    /// The site a listing covers: what was asked for (empty: all), held to the caller's
    /// own site for site-scoped roles (empty means theirs; another is refused).
    pub fn listing_site(&self, requested: &str) -> Result<String, Error> {
        match self.site_limit() {
            Some(own) if requested.is_empty() => Ok(own.to_owned()),
            Some(_) => self.check_site(requested).map(|()| requested.to_owned()),
            None => Ok(requested.to_owned()),
        }
    }

    /// Refuses a site-scoped caller acting on another site.
    pub fn check_site(&self, site_id: &str) -> Result<(), Error> {
        match self.site_limit() {
            Some(own) if own != site_id => Err(Error::PermissionDenied(format!(
                "{} {} may act on site {own:?} only, not {site_id:?}",
                self.role.as_str(),
                self.person_id
            ))),
            _ => Ok(()),
        }
    }
}

/// Failed logins in a row before a person is locked out, and for how long.
pub const LOCK_AFTER: i64 = 5;
pub const LOCK_FOR: Duration = Duration::from_secs(15 * 60);
/// Dashboard session life.
pub const SESSION_LIFE: Duration = Duration::from_secs(12 * 3600);
const TOKEN_DEFAULT_LIFE: Duration = Duration::from_secs(90 * 86_400);
const TOKEN_MAX_LIFE: Duration = Duration::from_secs(397 * 86_400);

/// People and their credentials; cheap to clone.
#[derive(Debug, Clone)]
pub struct People {
    store: Store,
}

/// A credential string: `{prefix}.{id}.{secret}`; only the secret's hash is stored.
struct Secret {
    id: String,
    secret: String,
}

impl Secret {
    fn generate() -> Secret {
        let id: [u8; 9] = rand::random();
        let secret: [u8; 24] = rand::random();
        Secret { id: hex::encode(id), secret: URL_SAFE_NO_PAD.encode(secret) }
    }

    fn parse(prefix: &str, s: &str) -> Option<Secret> {
        let mut parts = s.trim().splitn(3, '.');
        let (p, id, secret) = (parts.next()?, parts.next()?, parts.next()?);
        (p == prefix && id.len() == 18 && !secret.is_empty())
            .then(|| Secret { id: id.into(), secret: secret.into() })
    }

    fn reveal(&self, prefix: &str) -> String {
        format!("{prefix}.{}.{}", self.id, self.secret)
    }

    fn hash(&self) -> String {
        hex::encode(sha2::Sha256::digest(self.secret.as_bytes()))
    }
}

const TOKEN_PREFIX: &str = "nfo1";
const SESSION_PREFIX: &str = "nfs1";

fn hash_password(password: &str) -> Result<String, Error> {
    use argon2::password_hash::{PasswordHasher as _, SaltString, rand_core::OsRng};
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &SaltString::generate(&mut OsRng))
        .map(|h| h.to_string())
        .map_err(|e| Error::Unavailable(format!("password hashing: {e}")))
}

fn password_matches(password: &str, hash: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier as _};
    PasswordHash::new(hash)
        .is_ok_and(|h| argon2::Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
}

/// A random password people can type: 20 characters without look-alikes.
fn new_password() -> String {
    use rand::Rng as _;
    const A: &[u8] = b"abcdefghjkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::rng();
    (0..20).map(|_| A[rng.random_range(0..A.len())] as char).collect()
}

/// Person ids: 2 to 64 of lowercase letters, digits, `.`, `-`, `_`.
fn validate_person_id(id: &str) -> Result<(), Error> {
    let ok = (2..=64).contains(&id.len())
        && id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'));
    if ok { Ok(()) } else { Err(Error::invalid("id", id, "2 to 64 of a-z, 0-9, '.', '-', '_'")) }
}

pub(crate) fn person_pb(p: &PersonRecord) -> pb::Person {
    pb::Person {
        id: p.id.clone(),
        display_name: p.display_name.clone(),
        role: Role::parse(&p.role).map(|r| r.to_pb()).unwrap_or(pb::Role::Unspecified) as i32,
        site_id: p.site_id.clone(),
        created_unix_ms: p.created_ms,
        disabled_unix_ms: p.disabled_ms,
    }
}

fn person_json(p: &PersonRecord) -> String {
    serde_json::json!({"display_name": p.display_name, "role": p.role, "site_id": p.site_id}).to_string()
}

/// What the first start creates: an ops person and an API token for them.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    pub person_id: String,
    pub password: String,
    pub api_token: String,
}

impl People {
    pub fn new(store: Store) -> People {
        People { store }
    }

    /// On a store without people: creates `admin` (ops) with a random password and an
    /// API token, writes both to `dir` (0600), and returns them. `None` when people
    /// exist already.
    pub async fn bootstrap(&self, dir: &Path) -> Result<Option<Bootstrap>, Error> {
        if self.store.count_people().await? > 0 {
            return Ok(None);
        }
        let password = new_password();
        let now = now_ms();
        let admin = PersonRecord {
            id: "admin".into(),
            display_name: "Fleet administrator".into(),
            role: Role::Ops.as_str().into(),
            site_id: String::new(),
            password_hash: hash_password(&password)?,
            created_ms: now,
            disabled_ms: 0,
            failed_logins: 0,
            locked_until_ms: 0,
        };
        let audit = AuditEntry {
            at_ms: now,
            actor: Actor::system().0,
            action: "person.create".into(),
            subject: admin.id.clone(),
            site_id: None,
            reason: "first start: the initial administrator".into(),
            old_value: None,
            new_value: Some(person_json(&admin)),
        };
        self.store.create_person(&admin, &audit).await.map_err(crate::trust::conflict_or)?;
        let token = self
            .issue_token(&Actor::system(), &admin.id, TOKEN_DEFAULT_LIFE, "initial administrator token")
            .await?;
        for (name, value) in [("admin-password", &password), ("admin.token", &token.1)] {
            nanofleet_pki::write_private(&dir.join(name), format!("{value}\n").as_bytes())
                .map_err(|e| Error::Unavailable(format!("{}: {e}", dir.join(name).display())))?;
        }
        Ok(Some(Bootstrap { person_id: admin.id, password, api_token: token.1 }))
    }

    /// The caller an API token (`Bearer nfo1...`) stands for.
    pub async fn authenticate_token(&self, bearer: &str) -> Result<Caller, Error> {
        let Some(secret) = Secret::parse(TOKEN_PREFIX, bearer) else {
            return Err(Error::Unauthenticated("not a Nanofleet API token (expected nfo1.ID.SECRET)".into()));
        };
        self.authenticate(CredentialKind::ApiToken, &secret).await
    }

    /// The caller a dashboard session cookie stands for.
    pub async fn authenticate_session(&self, cookie: &str) -> Result<Caller, Error> {
        let Some(secret) = Secret::parse(SESSION_PREFIX, cookie) else {
            return Err(Error::Unauthenticated("no valid session".into()));
        };
        self.authenticate(CredentialKind::Session, &secret).await
    }

    async fn authenticate(&self, kind: CredentialKind, secret: &Secret) -> Result<Caller, Error> {
        let what = if kind == CredentialKind::ApiToken { "API token" } else { "session" };
        let cred = self
            .store
            .get_credential(kind, &secret.id)
            .await?
            .filter(|c| nanofleet_pki::constant_time_eq(&c.secret_hash, &secret.hash()))
            .ok_or_else(|| Error::Unauthenticated(format!("{what} {} is not recognised", secret.id)))?;
        if cred.revoked_ms != 0 {
            return Err(Error::Unauthenticated(format!("{what} {} was revoked", cred.id)));
        }
        if cred.expires_ms <= now_ms() {
            return Err(Error::Unauthenticated(format!("{what} {} has expired", cred.id)));
        }
        let person = self.active_person(&cred.person_id).await?;
        caller_of(&person, &cred.id)
    }

    async fn active_person(&self, id: &str) -> Result<PersonRecord, Error> {
        let p = self
            .store
            .get_person(id)
            .await?
            .ok_or_else(|| Error::Unauthenticated(format!("person {id:?} does not exist")))?;
        if p.disabled_ms != 0 {
            return Err(Error::Unauthenticated(format!("person {id:?} is disabled")));
        }
        Ok(p)
    }

    /// Checks a user id and password (the two identification components). Failures
    /// are audited and lock the person out after [`LOCK_AFTER`] in a row.
    pub async fn verify_password(
        &self,
        person_id: &str,
        password: &str,
        purpose: &str,
    ) -> Result<Caller, Error> {
        let now = now_ms();
        let fail = |reason: String| AuditEntry {
            at_ms: now,
            actor: format!("person:{person_id}"),
            action: "login.failure".into(),
            subject: person_id.chars().take(64).collect(),
            site_id: None,
            reason: format!("{purpose}: {reason}"),
            old_value: None,
            new_value: None,
        };
        let refused = || Error::Unauthenticated("user id or password is wrong".into());
        let Some(p) = self.store.get_person(person_id).await? else {
            self.store.audit_only(&fail("unknown user id".into())).await?;
            return Err(refused());
        };
        if p.disabled_ms != 0 {
            self.store.audit_only(&fail("person is disabled".into())).await?;
            return Err(refused());
        }
        if p.locked_until_ms > now {
            self.store.audit_only(&fail("locked after repeated failures".into())).await?;
            return Err(Error::Unauthenticated(format!(
                "too many failed attempts: locked for {} more minutes",
                (p.locked_until_ms - now) / 60_000 + 1
            )));
        }
        if !password_matches(password, &p.password_hash) {
            let lock_until = now + LOCK_FOR.as_millis() as i64;
            let n = self
                .store
                .record_login_failure(&p.id, now, LOCK_AFTER, lock_until, &fail("wrong password".into()))
                .await?;
            if n >= LOCK_AFTER {
                return Err(Error::Unauthenticated(format!(
                    "too many failed attempts: locked for {} minutes",
                    LOCK_FOR.as_secs() / 60
                )));
            }
            return Err(refused());
        }
        caller_of(&p, "password")
    }

    /// Dashboard login: returns the caller and the session cookie value.
    pub async fn login(&self, person_id: &str, password: &str) -> Result<(Caller, String), Error> {
        let caller = self.verify_password(person_id, password, "dashboard login").await?;
        let secret = Secret::generate();
        let now = now_ms();
        let session = CredentialRecord {
            id: secret.id.clone(),
            person_id: caller.person_id.clone(),
            secret_hash: secret.hash(),
            description: String::new(),
            created_ms: now,
            expires_ms: now + SESSION_LIFE.as_millis() as i64,
            revoked_ms: 0,
        };
        let audit = AuditEntry {
            at_ms: now,
            actor: caller.actor().0,
            action: "login.success".into(),
            subject: caller.person_id.clone(),
            site_id: caller.site_id.clone(),
            reason: "dashboard login".into(),
            old_value: None,
            new_value: Some(serde_json::json!({"session": session.id}).to_string()),
        };
        self.store.record_login(&session, &audit).await?;
        Ok((Caller { credential_id: secret.id.clone(), ..caller }, secret.reveal(SESSION_PREFIX)))
    }

    pub async fn logout(&self, cookie: &str) {
        if let Some(s) = Secret::parse(SESSION_PREFIX, cookie) {
            let _ = self.store.revoke_credential(CredentialKind::Session, &s.id, now_ms(), None).await;
        }
    }

    pub async fn create_person(
        &self,
        caller: &Caller,
        req: &pb::CreatePersonRequest,
    ) -> Result<(pb::Person, String), Error> {
        validate_person_id(&req.id)?;
        let name = req.display_name.trim();
        if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
            return Err(Error::invalid(
                "display_name",
                name,
                "1 to 100 printable characters (the printed name on signatures)",
            ));
        }
        let (role, site) = self.role_and_site(req.role, &req.site_id).await?;
        let password = new_password();
        let now = now_ms();
        let p = PersonRecord {
            id: req.id.clone(),
            display_name: name.into(),
            role: role.as_str().into(),
            site_id: site,
            password_hash: hash_password(&password)?,
            created_ms: now,
            disabled_ms: 0,
            failed_logins: 0,
            locked_until_ms: 0,
        };
        let audit = AuditEntry {
            at_ms: now,
            actor: caller.actor().0,
            action: "person.create".into(),
            subject: p.id.clone(),
            site_id: (!p.site_id.is_empty()).then(|| p.site_id.clone()),
            reason: req.reason.clone(),
            old_value: None,
            new_value: Some(person_json(&p)),
        };
        self.store.create_person(&p, &audit).await.map_err(crate::trust::conflict_or)?;
        Ok((person_pb(&p), password))
    }

    async fn role_and_site(&self, role: i32, site_id: &str) -> Result<(Role, String), Error> {
        let role = Role::from_pb(role).ok_or_else(|| {
            Error::invalid("role", role.to_string(), "ops, site-it, pharmacist, qa or auditor")
        })?;
        if role.site_scoped() {
            if self.store.get_site(site_id).await?.is_none() {
                return Err(Error::invalid(
                    "site_id",
                    site_id,
                    format!("an existing site (role {} is bound to one)", role.as_str()),
                ));
            }
            Ok((role, site_id.into()))
        } else if !site_id.is_empty() {
            Err(Error::invalid("site_id", site_id, format!("empty: role {} covers all sites", role.as_str())))
        } else {
            Ok((role, String::new()))
        }
    }

    pub async fn list_people(&self) -> Result<Vec<pb::Person>, Error> {
        Ok(self.store.list_people().await?.iter().map(person_pb).collect())
    }

    pub async fn grant_role(&self, caller: &Caller, req: &pb::GrantRoleRequest) -> Result<pb::Person, Error> {
        let old = self
            .store
            .get_person(&req.person_id)
            .await?
            .ok_or_else(|| Error::NotFound { what: "person", id: req.person_id.clone() })?;
        let (role, site) = self.role_and_site(req.role, &req.site_id).await?;
        if old.id == caller.person_id && role != Role::Ops {
            return Err(Error::PermissionDenied("ops cannot take their own ops role away".into()));
        }
        let audit = AuditEntry {
            at_ms: now_ms(),
            actor: caller.actor().0,
            action: "role.grant".into(),
            subject: old.id.clone(),
            site_id: (!site.is_empty()).then(|| site.clone()),
            reason: req.reason.clone(),
            old_value: Some(serde_json::json!({"role": old.role, "site_id": old.site_id}).to_string()),
            new_value: Some(serde_json::json!({"role": role.as_str(), "site_id": site}).to_string()),
        };
        self.store
            .set_role(&old.id, role.as_str(), &site, &audit)
            .await
            .map_err(crate::trust::conflict_or)?;
        let p =
            self.store.get_person(&old.id).await?.ok_or(Error::NotFound { what: "person", id: old.id })?;
        Ok(person_pb(&p))
    }

    pub async fn disable_person(
        &self,
        caller: &Caller,
        person_id: &str,
        reason: &str,
    ) -> Result<pb::Person, Error> {
        if person_id == caller.person_id {
            return Err(Error::PermissionDenied("a person cannot disable themselves".into()));
        }
        if reason.trim().is_empty() {
            return Err(Error::invalid("reason", reason, "a non-empty reason (it goes to the audit trail)"));
        }
        let now = now_ms();
        let audit = AuditEntry {
            at_ms: now,
            actor: caller.actor().0,
            action: "person.disable".into(),
            subject: person_id.into(),
            site_id: None,
            reason: reason.into(),
            old_value: Some(serde_json::json!({"disabled_ms": 0}).to_string()),
            new_value: Some(serde_json::json!({"disabled_ms": now}).to_string()),
        };
        self.store.disable_person(person_id, now, &audit).await.map_err(crate::trust::conflict_or)?;
        let p = self
            .store
            .get_person(person_id)
            .await?
            .ok_or_else(|| Error::NotFound { what: "person", id: person_id.into() })?;
        Ok(person_pb(&p))
    }

    /// An API token for `person_id` (empty: the caller). Only ops may create tokens
    /// for someone else.
    pub async fn create_api_token(
        &self,
        caller: &Caller,
        person_id: &str,
        life: Duration,
        description: &str,
    ) -> Result<(String, String, i64), Error> {
        let owner = if person_id.is_empty() { caller.person_id.as_str() } else { person_id };
        if owner != caller.person_id && caller.role != Role::Ops {
            return Err(Error::PermissionDenied("only ops may create API tokens for someone else".into()));
        }
        let life = if life.is_zero() { TOKEN_DEFAULT_LIFE } else { life };
        if life > TOKEN_MAX_LIFE || life < Duration::from_secs(60) {
            return Err(Error::invalid("expires_in_seconds", life.as_secs().to_string(), "60 s to 397 days"));
        }
        self.active_person(owner).await.map_err(|_| Error::NotFound { what: "person", id: owner.into() })?;
        let (id, secret, expires) = self.issue_token(&caller.actor(), owner, life, description).await?;
        Ok((id, secret, expires))
    }

    async fn issue_token(
        &self,
        actor: &Actor,
        owner: &str,
        life: Duration,
        description: &str,
    ) -> Result<(String, String, i64), Error> {
        let secret = Secret::generate();
        let now = now_ms();
        let rec = CredentialRecord {
            id: secret.id.clone(),
            person_id: owner.into(),
            secret_hash: secret.hash(),
            description: description.chars().take(200).collect(),
            created_ms: now,
            expires_ms: now + life.as_millis() as i64,
            revoked_ms: 0,
        };
        let audit = AuditEntry {
            at_ms: now,
            actor: actor.0.clone(),
            action: "api_token.create".into(),
            subject: owner.into(),
            site_id: None,
            reason: description.into(),
            old_value: None,
            new_value: Some(serde_json::json!({"token": rec.id, "expires_ms": rec.expires_ms}).to_string()),
        };
        self.store.insert_credential(CredentialKind::ApiToken, &rec, &audit).await?;
        Ok((rec.id, secret.reveal(TOKEN_PREFIX), rec.expires_ms))
    }

    pub async fn revoke_api_token(&self, caller: &Caller, token_id: &str, reason: &str) -> Result<(), Error> {
        let tok = self
            .store
            .get_credential(CredentialKind::ApiToken, token_id)
            .await?
            .ok_or_else(|| Error::NotFound { what: "API token", id: token_id.into() })?;
        if tok.person_id != caller.person_id && caller.role != Role::Ops {
            return Err(Error::PermissionDenied("only ops may revoke someone else's API token".into()));
        }
        let now = now_ms();
        let audit = AuditEntry {
            at_ms: now,
            actor: caller.actor().0,
            action: "api_token.revoke".into(),
            subject: tok.person_id.clone(),
            site_id: None,
            reason: reason.into(),
            old_value: Some(serde_json::json!({"token": tok.id}).to_string()),
            new_value: Some(serde_json::json!({"revoked_ms": now}).to_string()),
        };
        self.store
            .revoke_credential(CredentialKind::ApiToken, token_id, now, Some(&audit))
            .await
            .map_err(crate::trust::conflict_or)
    }

    pub async fn person(&self, id: &str) -> Result<pb::Person, Error> {
        let p = self
            .store
            .get_person(id)
            .await?
            .ok_or_else(|| Error::NotFound { what: "person", id: id.into() })?;
        Ok(person_pb(&p))
    }
}

fn caller_of(p: &PersonRecord, credential_id: &str) -> Result<Caller, Error> {
    let role = Role::parse(&p.role).ok_or_else(|| {
        Error::Unauthenticated(format!("person {:?} has an unknown role {:?}", p.id, p.role))
    })?;
    Ok(Caller {
        person_id: p.id.clone(),
        display_name: p.display_name.clone(),
        role,
        site_id: (!p.site_id.is_empty()).then(|| p.site_id.clone()),
        credential_id: credential_id.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_round_trips_and_site_scope_is_right() {
        for r in Role::ALL {
            assert_eq!(Role::parse(r.as_str()), Some(r));
            assert_eq!(Role::from_pb(r.to_pb() as i32), Some(r));
        }
        assert!(Role::SiteIt.site_scoped() && Role::Pharmacist.site_scoped());
        assert!(!Role::Ops.site_scoped() && !Role::Qa.site_scoped() && !Role::Auditor.site_scoped());
    }

    #[test]
    fn a_site_scoped_caller_is_held_to_its_site() {
        let c = Caller {
            person_id: "it".into(),
            display_name: "IT".into(),
            role: Role::SiteIt,
            site_id: Some("a".into()),
            credential_id: "x".into(),
        };
        assert!(c.check_site("a").is_ok());
        assert!(matches!(c.check_site("b"), Err(Error::PermissionDenied(_))));
        let ops = Caller { role: Role::Ops, site_id: None, ..c };
        assert!(ops.check_site("b").is_ok());
    }

    #[test]
    fn secrets_parse_only_with_their_prefix() {
        let s = Secret::generate();
        let t = s.reveal(TOKEN_PREFIX);
        assert!(Secret::parse(TOKEN_PREFIX, &t).is_some());
        assert!(Secret::parse(SESSION_PREFIX, &t).is_none());
        assert!(Secret::parse(TOKEN_PREFIX, "nfo1.short.x").is_none());
    }
}
