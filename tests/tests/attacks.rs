//! Attacks on device trust and operator access, each answered by a clear refusal and,
//! where the design asks for it, an audit record: reused, expired and foreign
//! enrollment tokens, CSRs that ask for another identity or prove nothing, client
//! certificates the MQTT listener must not accept, a decommissioned device coming back,
//! a device speaking for another, calls without the right role or site, and tampering
//! with the audit trail in the database.

use std::path::Path;
use std::time::{Duration, SystemTime};

use nanofleet_agent::enroll::Credentials;
use nanofleet_api::Actor;
use nanofleet_pki::{FleetCa, ServerNames};
use nanofleet_proto::topics::{Channel, command_filter, device_topic};
use nanofleet_proto::v1 as pb;
use nanofleet_proto::v1::audit_service_client::AuditServiceClient;
use nanofleet_proto::v1::enrollment_service_client::EnrollmentServiceClient;
use nanofleet_proto::v1::fleet_service_client::FleetServiceClient;
use nanofleet_store::{AuditFilter, AuditRecord};
use nanofleet_tests::{
    ConnectOutcome, RawDevice, Sandbox, mqtt_options, skip_or_fail, telemetry, try_connect,
};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, PubAckReason, SubscribeReasonCode};
use rustls::pki_types::CertificateDer;
use sqlx::Connection as _;
use tonic::{Code, Status};

/// Long enough for a refusal to arrive, short enough to keep the suite fast.
const REFUSAL_WAIT: Duration = Duration::from_secs(5);

// === harness ===

async fn sandbox() -> anyhow::Result<Sandbox> {
    nanofleet_pki::install_crypto_provider();
    nanofleet_tests::init_tracing();
    Sandbox::start().await
}

/// A new key and a CSR for it, whose subject says `cn`.
fn key_and_csr(cn: &str) -> anyhow::Result<(KeyPair, Vec<u8>)> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    let csr = params.serialize_request(&key)?.der().to_vec();
    Ok((key, csr))
}

/// Enrolls as a device would, but reports the server's answer as it came.
async fn enroll_raw(
    sb: &Sandbox,
    token: &str,
    csr_der: Vec<u8>,
) -> anyhow::Result<Result<pb::EnrollResponse, Status>> {
    let mut api = EnrollmentServiceClient::new(sb.grpc_channel().await?);
    let req = pb::EnrollRequest {
        token: token.into(),
        csr_der,
        model: "NF-200".into(),
        hardware_serial: "HW-1".into(),
    };
    Ok(api.enroll(req).await.map(tonic::Response::into_inner))
}

/// A one-time token of `site_id` (created if missing) that assigns `device_id`.
async fn token_for(
    sb: &Sandbox,
    site_id: &str,
    device_id: &str,
) -> anyhow::Result<(pb::EnrollToken, String)> {
    sb.server.ensure_site(site_id, site_id, "UTC").await?;
    Ok(sb
        .server
        .trust
        .create_token(&Actor::system(), site_id, Duration::from_secs(600), 1, device_id, "attack test")
        .await?)
}

/// Asserts a refusal with `code` whose message holds every one of `words`.
#[track_caller]
fn assert_refused<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, words: &[&str]) {
    let status = result.expect_err("the call must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    for w in words {
        assert!(status.message().contains(w), "{:?} should name {w:?}", status.message());
    }
}

/// Audit records of exactly `action`.
async fn audited(sb: &Sandbox, action: &str) -> anyhow::Result<Vec<AuditRecord>> {
    let filter = AuditFilter { action: Some(action.into()), ..Default::default() };
    Ok(sb.server.store.list_audit(&filter).await?)
}

/// Waits until a record of `action` about `subject` is in the audit trail.
async fn wait_audited(sb: &Sandbox, action: &str, subject: &str) -> anyhow::Result<AuditRecord> {
    nanofleet_tests::eventually(
        &format!("{action} of {subject} in the audit trail"),
        REFUSAL_WAIT,
        || async { audited(sb, action).await.ok()?.into_iter().find(|r| r.entry.subject == subject) },
    )
    .await
}

/// A raw connection to the server's SQLite database, as someone with access to the
/// data directory has it: no server in between, triggers droppable.
async fn database(sb: &Sandbox) -> anyhow::Result<sqlx::SqliteConnection> {
    let path = sb.dir.path().join("nanofleet.db");
    Ok(sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display())).await?)
}

/// Runs `statements` on the server's database with the audit tables' append-only
/// triggers dropped first.
async fn tamper(sb: &Sandbox, statements: &[&str]) -> anyhow::Result<()> {
    let mut db = database(sb).await?;
    for sql in [
        "DROP TRIGGER IF EXISTS audit_log_no_update",
        "DROP TRIGGER IF EXISTS audit_log_no_delete",
        "DROP TRIGGER IF EXISTS audit_checkpoints_no_delete",
    ]
    .iter()
    .chain(statements)
    {
        sqlx::query(sql).execute(&mut db).await?;
    }
    db.close().await?;
    Ok(())
}

// === crafted client certificates ===

/// What is wrong with a crafted client certificate.
#[derive(Debug, Clone)]
struct Craft {
    not_before: SystemTime,
    not_after: SystemTime,
    is_ca: bool,
    eku: ExtendedKeyUsagePurpose,
}

impl Craft {
    /// A certificate like the ones the fleet CA issues.
    fn valid() -> Craft {
        let now = SystemTime::now();
        Craft {
            not_before: now - Duration::from_secs(300),
            not_after: now + Duration::from_secs(3_600),
            is_ca: false,
            eku: ExtendedKeyUsagePurpose::ClientAuth,
        }
    }
}

/// A client TLS configuration trusting `sb`'s root and presenting a certificate for
/// `device_id` made as `craft` says, signed by the CA whose `{issuer}.pem` and
/// `{issuer}.key` are in `ca_dir` (sent with that issuer in the chain).
fn crafted_client(
    sb: &Sandbox,
    ca_dir: &Path,
    issuer: &str,
    device_id: &str,
    craft: Craft,
) -> anyhow::Result<rustls::ClientConfig> {
    let issuer_pem = std::fs::read_to_string(ca_dir.join(format!("{issuer}.pem")))?;
    let issuer_key = KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join(format!("{issuer}.key")))?)?;
    let issuer_cert = nanofleet_pki::tls::certs_from_pem(issuer, &issuer_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&issuer_pem, issuer_key)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, "Nanofleet devices");
    params.distinguished_name.push(DnType::CommonName, device_id);
    params.not_before = craft.not_before.into();
    params.not_after = craft.not_after.into();
    if craft.is_ca {
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyCertSign];
    } else {
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    }
    params.extended_key_usages = vec![craft.eku];
    params.use_authority_key_identifier_extension = true;
    let leaf = params.signed_by(&key, &issuer)?;
    let chain =
        std::iter::once(leaf.der().clone()).chain(issuer_cert).collect::<Vec<CertificateDer<'static>>>();
    let key = nanofleet_pki::tls::key_from_pem("crafted key", &key.serialize_pem())?;
    Ok(nanofleet_pki::tls::client_config(&[sb.server.ca.root_cert().clone()], Some((chain, key)))?)
}

/// Connects to the mutual-TLS listener as `client_id` with `creds`' certificate.
async fn connect_as(sb: &Sandbox, client_id: &str, creds: &Credentials) -> anyhow::Result<ConnectOutcome> {
    let opts = mqtt_options(sb.mqtts_addr(), client_id, Some(creds.client_config()?));
    Ok(try_connect(opts, REFUSAL_WAIT).await)
}

/// Asserts that a connection got no CONNACK. If `alerts` is not empty, the server must
/// have sent one of these TLS alerts (they say which check refused the certificate).
#[track_caller]
fn assert_no_connack(outcome: &ConnectOutcome, what: &str, alerts: &[&str]) {
    let ConnectOutcome::NoConnAck(why) = outcome else {
        panic!("{what}: expected no CONNACK, got {outcome:?}");
    };
    assert!(
        alerts.is_empty() || alerts.iter().any(|a| why.contains(&format!("alert: {a}"))),
        "{what}: expected one of the TLS alerts {alerts:?}, got {why:?}"
    );
}

// === enrollment tokens ===

#[tokio::test]
async fn a_one_time_token_enrolls_once_and_a_second_attempt_changes_nothing() -> anyhow::Result<()> {
    let sb = sandbox().await?;
    let (token, secret) = token_for(&sb, "site-a", "NF-ONCE-01").await?;
    let first = enroll_raw(&sb, &secret, key_and_csr("NF-ONCE-01")?.1).await??;
    assert_eq!(first.device_id, "NF-ONCE-01");

    let second = enroll_raw(&sb, &secret, key_and_csr("NF-ONCE-02")?.1).await?;
    assert_refused(second, Code::Unauthenticated, &[&token.id, "used already"]);

    let refusal = wait_audited(&sb, "device.enroll.refused", &token.id).await?;
    assert!(refusal.entry.reason.contains("used already"), "{:?}", refusal.entry.reason);
    assert_eq!(sb.server.store.list_devices(None).await?.len(), 1, "no second device");
    assert_eq!(sb.server.store.device_certs("NF-ONCE-01").await?.len(), 1, "no second certificate");
    let stored = sb.server.store.get_enroll_token(&token.id).await?.expect("token kept");
    assert_eq!(stored.uses_left, 0);
    assert_eq!(audited(&sb, "device.enroll").await?.len(), 1);

    // Two devices racing with one use between them: exactly one gets it.
    let (_, shared) = sb
        .server
        .trust
        .create_token(&Actor::system(), "site-a", Duration::from_secs(600), 1, "", "race")
        .await?;
    let (a, b) = tokio::join!(
        enroll_raw(&sb, &shared, key_and_csr("racer-a")?.1),
        enroll_raw(&sb, &shared, key_and_csr("racer-b")?.1)
    );
    let (a, b) = (a?, b?);
    assert_eq!(a.is_ok() as u8 + b.is_ok() as u8, 1, "exactly one enrollment wins: {a:?} {b:?}");
    assert_eq!(sb.server.store.list_devices(None).await?.len(), 2, "one device more, not two");
    sb.stop().await;
    Ok(())
}

#[tokio::test]
async fn an_expired_or_revoked_token_is_refused() -> anyhow::Result<()> {
    let sb = sandbox().await?;
    let (token, secret) = token_for(&sb, "site-a", "NF-EXP-01").await?;
    let mut db = database(&sb).await?;
    sqlx::query("UPDATE enroll_tokens SET expires_ms = 1 WHERE id = ?")
        .bind(&token.id)
        .execute(&mut db)
        .await?;
    db.close().await?;
    let refused = enroll_raw(&sb, &secret, key_and_csr("NF-EXP-01")?.1).await?;
    assert_refused(refused, Code::Unauthenticated, &[&token.id, "expired"]);
    wait_audited(&sb, "device.enroll.refused", &token.id).await?;

    let (token, secret) = token_for(&sb, "site-a", "NF-REV-01").await?;
    sb.server.trust.revoke_token(&Actor::system(), &token.id, "handed to the wrong person").await?;
    let refused = enroll_raw(&sb, &secret, key_and_csr("NF-REV-01")?.1).await?;
    assert_refused(refused, Code::Unauthenticated, &[&token.id, "revoked"]);
    assert!(sb.server.store.list_devices(None).await?.is_empty());
    sb.stop().await;
    Ok(())
}

#[tokio::test]
async fn tokens_stay_in_their_site_and_their_fleet() -> anyhow::Result<()> {
    let sb = sandbox().await?;
    sb.server.ensure_site("site-a", "Site A", "UTC").await?;
    sb.server.ensure_site("site-b", "Site B", "UTC").await?;
    let it_a = sb.person("it-a", pb::Role::SiteIt, "site-a").await?;
    let mut api = EnrollmentServiceClient::with_interceptor(sb.grpc_channel().await?, it_a);
    let request = |site: &str| pb::CreateEnrollTokenRequest {
        site_id: site.into(),
        expires_in_seconds: 600,
        uses: 1,
        device_id: String::new(),
        reason: "new pump".into(),
    };
    assert_refused(
        api.create_enroll_token(request("site-b")).await,
        Code::PermissionDenied,
        &["site-a", "site-b"],
    );
    assert!(sb.server.store.list_enroll_tokens(Some("site-b")).await?.is_empty());
    let own = api.create_enroll_token(request("site-a")).await?.into_inner();

    // The same token, but naming another fleet's root.
    let other_root = nanofleet_pki::fingerprint(b"the root of another fleet");
    let (head, _) = own.secret_token.rsplit_once('.').expect("nfe1.ID.SECRET.FINGERPRINT");
    let foreign = format!("{head}.{other_root}");
    let refused = enroll_raw(&sb, &foreign, key_and_csr("NF-X")?.1).await?;
    let token_id = own.token.expect("token").id;
    assert_refused(refused, Code::Unauthenticated, &[&token_id, "another fleet"]);
    wait_audited(&sb, "device.enroll.refused", &token_id).await?;
    let stored = sb.server.store.get_enroll_token(&token_id).await?.expect("token kept");
    assert_eq!(stored.uses_left, 1, "a refused attempt takes no use");
    sb.stop().await;
    Ok(())
}

// === certificate signing requests ===

#[tokio::test]
async fn the_certificate_names_the_token_s_device_not_the_csr_s() -> anyhow::Result<()> {
    let sb = sandbox().await?;
    let victim = sb.enroll_device("site-a", "NF-VICTIM-01").await?;
    assert_eq!(victim.device_id, "NF-VICTIM-01");
    let (_, secret) = token_for(&sb, "site-b", "NF-ATTK-01").await?;

    // The CSR asks for the victim's name, as subject and as alternative name, and to be a CA.
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, "NF-VICTIM-01");
    params.distinguished_name.push(DnType::OrganizationalUnitName, "site-a");
    params.subject_alt_names = vec![SanType::DnsName("NF-VICTIM-01".try_into()?)];
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let csr = params.serialize_request(&key)?.der().to_vec();
    let resp = enroll_raw(&sb, &secret, csr).await??;
    assert_eq!((resp.device_id.as_str(), resp.site_id.as_str()), ("NF-ATTK-01", "site-b"));

    let chain = nanofleet_pki::tls::certs_from_pem("issued", &resp.certificate_chain_pem)?;
    let (who, serial) = nanofleet_pki::device_identity_of(&chain[0]).expect("a readable certificate");
    assert_eq!((who.device_id.as_str(), who.site_id.as_str()), ("NF-ATTK-01", "site-b"));
    assert_eq!(sb.server.store.device_certs("NF-ATTK-01").await?[0].serial, serial);
    let victim_name = b"NF-VICTIM-01";
    assert!(
        !chain[0].windows(victim_name.len()).any(|w| w == victim_name),
        "the victim's name appears nowhere in the issued certificate"
    );

    let attacker = Credentials {
        device_id: resp.device_id,
        site_id: resp.site_id,
        issued_ms: 0,
        not_after_ms: resp.not_after_unix_ms,
        server: sb.grpc_url(),
        mqtt_address: resp.mqtt_address,
        key_pem: key.serialize_pem(),
        chain_pem: resp.certificate_chain_pem,
        root_pem: resp.root_ca_pem,
        trust_root_json: resp.trust_root_json,
    };
    assert_eq!(
        connect_as(&sb, "NF-VICTIM-01", &attacker).await?,
        ConnectOutcome::Refused(ConnectReturnCode::NotAuthorized),
        "the certificate does not pass for the victim"
    );
    // Accepted as a client certificate at all: so not a CA (the listener refuses those).
    assert_eq!(connect_as(&sb, "NF-ATTK-01", &attacker).await?, ConnectOutcome::Accepted);
    sb.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_csr_without_proof_of_possession_is_refused_and_the_token_kept() -> anyhow::Result<()> {
    let sb = sandbox().await?;
    let (token, secret) = token_for(&sb, "site-a", "NF-POP-01").await?;
    let (_, mut csr) = key_and_csr("NF-POP-01")?;
    // The last byte belongs to the signature: the CSR still parses, its signature fails.
    let last = csr.len() - 1;
    csr[last] ^= 0x01;
    let refused = enroll_raw(&sb, &secret, csr).await?;
    assert_refused(refused, Code::InvalidArgument, &["csr_der", "proof of possession"]);
    wait_audited(&sb, "device.enroll.refused", &token.id).await?;
    let stored = sb.server.store.get_enroll_token(&token.id).await?.expect("token kept");
    assert_eq!(stored.uses_left, 1, "the token is not consumed");
    assert!(sb.server.store.get_device("NF-POP-01").await?.is_none());
    // The genuine device still enrolls with it.
    let ok = enroll_raw(&sb, &secret, key_and_csr("NF-POP-01")?.1).await??;
    assert_eq!(ok.device_id, "NF-POP-01");
    sb.stop().await;
    Ok(())
}

// === the MQTT listener ===

#[tokio::test]
async fn a_certificate_for_a_device_that_never_enrolled_is_refused() -> anyhow::Result<()> {
    // Even one signed by the fleet's own device intermediate (a leaked devices.key).
    let sb = sandbox().await?;
    let ca_dir = sb.server.ca.dir().to_owned();
    let forged = crafted_client(&sb, &ca_dir, "devices", "NF-GHOST-01", Craft::valid())?;
    let outcome = try_connect(mqtt_options(sb.mqtts_addr(), "NF-GHOST-01", Some(forged)), REFUSAL_WAIT).await;
    assert_eq!(outcome, ConnectOutcome::Refused(ConnectReturnCode::NotAuthorized));
    assert!(sb.server.store.get_device("NF-GHOST-01").await?.is_none(), "nothing registered");
    sb.stop().await;
    Ok(())
}

#[tokio::test]
async fn the_mqtt_listener_refuses_bad_client_certificates() -> anyhow::Result<()> {
    let sb = sandbox().await?;
    let ca_dir = sb.server.ca.dir().to_owned();
    let foreign_dir = tempfile::tempdir()?;
    FleetCa::load_or_create(foreign_dir.path(), &ServerNames::default())?;
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let connect = |config: rustls::ClientConfig| {
        try_connect(mqtt_options(sb.mqtts_addr(), "NF-CRAFT-01", Some(config)), REFUSAL_WAIT)
    };

    // The id is enrolled (only enrolled, active devices are admitted at all), so what
    // refuses the crafted certificates below is the certificate itself.
    let enrolled = sb.enroll_device("site-a", "NF-CRAFT-01").await?;

    // Control: the certificate the server issued is accepted.
    assert_eq!(connect(enrolled.client_config()?).await, ConnectOutcome::Accepted);

    // A certificate crafted the same way, with nothing wrong in it and signed by the
    // fleet's own device intermediate (a leaked devices.key), but never issued by the
    // server: the handshake passes, admission refuses it.
    let forged = crafted_client(&sb, &ca_dir, "devices", "NF-CRAFT-01", Craft::valid())?;
    assert_eq!(connect(forged).await, ConnectOutcome::Refused(ConnectReturnCode::NotAuthorized));

    // What is wrong, who signed it, and the TLS alert that says the listener saw it.
    let cases = [
        (
            "expired",
            ca_dir.as_path(),
            "devices",
            Craft { not_before: now - 2 * day, not_after: now - day, ..Craft::valid() },
            &["CertificateExpired"][..],
        ),
        (
            "not yet valid",
            &ca_dir,
            "devices",
            Craft { not_before: now + day, not_after: now + 2 * day, ..Craft::valid() },
            &["CertificateExpired"],
        ),
        (
            "a CA certificate",
            &ca_dir,
            "devices",
            Craft { is_ca: true, ..Craft::valid() },
            &["CertificateUnknown"],
        ),
        (
            "for servers only",
            &ca_dir,
            "devices",
            Craft { eku: ExtendedKeyUsagePurpose::ServerAuth, ..Craft::valid() },
            &["UnsupportedCertificate"],
        ),
        ("signed by the fleet root, not the device CA", &ca_dir, "root", Craft::valid(), &["UnknownCA"]),
        // A device CA made in the same second bears the same name as this fleet's: then
        // its signature, not its name, gives it away.
        (
            "from another fleet's device CA",
            foreign_dir.path(),
            "devices",
            Craft::valid(),
            &["UnknownCA", "DecryptError"],
        ),
    ];
    for (what, dir, issuer, craft, alert) in cases {
        let config = crafted_client(&sb, dir, issuer, "NF-CRAFT-01", craft)?;
        assert_no_connack(&connect(config).await, what, alert);
    }
    let anonymous = nanofleet_pki::tls::client_config(&[sb.server.ca.root_cert().clone()], None)?;
    assert_no_connack(&connect(anonymous).await, "without a client certificate", &["CertificateRequired"]);
    sb.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_decommissioned_device_is_cut_off_refused_and_cannot_renew() -> anyhow::Result<()> {
    let sb = sandbox().await?;
    let creds = sb.enroll_device("site-a", "NF-GONE-01").await?;
    let opts = mqtt_options(sb.mqtts_addr(), "NF-GONE-01", Some(creds.client_config()?));
    let mut dev = RawDevice::connect_with(opts).await?;
    assert_eq!(dev.birth("NF-GONE-01", "site-a").await?, PubAckReason::Success);

    let mut fleet = FleetServiceClient::with_interceptor(sb.grpc_channel().await?, sb.admin());
    let resp = fleet
        .decommission_device(pb::DecommissionDeviceRequest {
            device_id: "NF-GONE-01".into(),
            reason: "stolen from the ward".into(),
        })
        .await?
        .into_inner();
    assert!(resp.disconnected, "the live connection was closed");
    nanofleet_tests::eventually("the device's connection to end", REFUSAL_WAIT, || async {
        dev.is_closed().then_some(())
    })
    .await?;

    assert_eq!(
        connect_as(&sb, "NF-GONE-01", &creds).await?,
        ConnectOutcome::Refused(ConnectReturnCode::NotAuthorized)
    );
    wait_audited(&sb, "device.decommission", "NF-GONE-01").await?;
    let refusal = wait_audited(&sb, "device.connect.refused", "NF-GONE-01").await?;
    assert!(refusal.entry.reason.contains("decommissioned"), "{:?}", refusal.entry.reason);

    // Renewal with the old certificate, over mutual TLS.
    let channel = nanofleet_pki::tls::connect_channel(&sb.grpc_url(), creds.client_config()?)
        .await
        .map_err(anyhow::Error::msg)?;
    let renew = EnrollmentServiceClient::new(channel)
        .renew(pb::RenewRequest { csr_der: key_and_csr("NF-GONE-01")?.1 })
        .await;
    assert_refused(renew, Code::PermissionDenied, &["NF-GONE-01", "decommissioned"]);
    wait_audited(&sb, "device.renew.refused", "NF-GONE-01").await?;
    assert_eq!(audited(&sb, "device.renew").await?.len(), 0, "no certificate was renewed");
    sb.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_client_id_other_than_the_certificate_s_is_refused() -> anyhow::Result<()> {
    let sb = sandbox().await?;
    let creds = sb.enroll_device("site-a", "NF-IDA-01").await?;
    sb.enroll_device("site-a", "NF-IDB-01").await?;
    assert_eq!(
        connect_as(&sb, "NF-IDB-01", &creds).await?,
        ConnectOutcome::Refused(ConnectReturnCode::NotAuthorized)
    );
    let refusal = wait_audited(&sb, "device.connect.refused", "NF-IDB-01").await?;
    assert!(refusal.entry.reason.contains("NF-IDA-01"), "{:?}", refusal.entry.reason);
    assert_eq!(connect_as(&sb, "NF-IDA-01", &creds).await?, ConnectOutcome::Accepted);
    sb.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_device_cannot_publish_or_subscribe_for_another() -> anyhow::Result<()> {
    let sb = sandbox().await?;
    let a = sb.enroll_device("site-a", "NF-PUBA-01").await?;
    sb.enroll_device("site-a", "NF-PUBB-01").await?;
    let mut dev =
        RawDevice::connect_with(mqtt_options(sb.mqtts_addr(), "NF-PUBA-01", Some(a.client_config()?)))
            .await?;
    assert_eq!(dev.birth("NF-PUBA-01", "site-a").await?, PubAckReason::Success, "control: its own topic");
    assert_eq!(
        dev.publish(&device_topic("NF-PUBA-01", Channel::Telemetry), telemetry("NF-PUBA-01", 1, 2)).await?,
        PubAckReason::Success
    );

    // Well-formed messages in B's name, on B's topics.
    let b_telemetry = telemetry("NF-PUBB-01", 1, 2);
    assert_eq!(
        dev.publish(&device_topic("NF-PUBB-01", Channel::Telemetry), b_telemetry).await?,
        PubAckReason::NotAuthorized
    );
    assert_eq!(
        dev.publish(
            &device_topic("NF-PUBB-01", Channel::State),
            nanofleet_tests::birth("NF-PUBB-01", "site-a", "s-x")
        )
        .await?,
        PubAckReason::NotAuthorized
    );
    assert_eq!(sb.server.store.telemetry_seqs("NF-PUBB-01").await?, Vec::<i64>::new());
    let b = sb.server.store.get_device("NF-PUBB-01").await?.expect("B enrolled");
    assert!(!b.online, "B was not brought online by A");

    for filter in
        [command_filter("NF-PUBB-01"), "nf/v1/NF-PUBB-01/#".into(), "#".into(), "nf/v1/+/cmd/#".into()]
    {
        assert_eq!(dev.subscribe(&filter).await?, SubscribeReasonCode::NotAuthorized, "{filter}");
    }
    assert!(matches!(dev.subscribe(&command_filter("NF-PUBA-01")).await?, SubscribeReasonCode::Success(_)));
    dev.close().await;
    sb.stop().await;
    Ok(())
}

/// Runs `mosquitto_pub` over mutual TLS with the certificate and key in `files`, as
/// `client_id`; returns whether it exited successfully and what it printed. Retries
/// while the broker still closes the previous connection of the same client id.
fn mosquitto_pub_tls(
    sb: &Sandbox,
    files: &Path,
    client_id: &str,
    topic: &str,
    payload: &[u8],
) -> anyhow::Result<(bool, String)> {
    let message = files.join(format!("message-{}.bin", nanofleet_tests::now_ms()));
    std::fs::write(&message, payload)?;
    let mut last = (false, String::new());
    for _ in 0..20 {
        let out = std::process::Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &sb.mqtts_addr().port().to_string()])
            .arg("--cafile")
            .arg(files.join("root.pem"))
            .arg("--cert")
            .arg(files.join("device.pem"))
            .arg("--key")
            .arg(files.join("device.key"))
            .args(["-V", "mqttv5", "-q", "1", "-d", "-i", client_id, "-t", topic, "-f"])
            .arg(&message)
            .output()?;
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        last = (out.status.success(), text);
        if !last.1.contains("unavailable") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_cannot_publish_or_subscribe_for_another_device() -> anyhow::Result<()> {
    if std::process::Command::new("mosquitto_pub").arg("--help").output().is_err() {
        skip_or_fail("mosquitto_pub is not installed (Debian: mosquitto-clients)");
        return Ok(());
    }
    let sb = sandbox().await?;
    let a = sb.enroll_device("site-a", "NF-MOSA-01").await?;
    sb.enroll_device("site-a", "NF-MOSB-01").await?;
    let files = tempfile::tempdir()?;
    for (name, text) in [("root.pem", &a.root_pem), ("device.pem", &a.chain_pem), ("device.key", &a.key_pem)]
    {
        std::fs::write(files.path().join(name), text)?;
    }
    let publish = |topic: String, payload: Vec<u8>| {
        tokio::task::block_in_place(|| mosquitto_pub_tls(&sb, files.path(), "NF-MOSA-01", &topic, &payload))
    };

    // Control: its own birth goes through.
    let (ok, text) = publish(
        device_topic("NF-MOSA-01", Channel::State),
        nanofleet_tests::birth("NF-MOSA-01", "site-a", "s-1"),
    )?;
    assert!(ok && text.contains("received PUBACK (Mid: 1, RC:0)"), "control publish failed: {text}");

    // mosquitto_pub 2.0 prints a refused PUBACK as a warning and still exits 0: the
    // refusal is read from its output (-d shows the reason code, 135 = not authorized).
    let (_, text) = publish(device_topic("NF-MOSB-01", Channel::Telemetry), telemetry("NF-MOSB-01", 1, 2))?;
    assert!(text.contains("received PUBACK (Mid: 1, RC:135)"), "{text}");
    assert!(text.contains("Publish 1 failed: Not authorized"), "{text}");
    assert!(text.contains(r#"may not publish for device "NF-MOSB-01""#), "the broker's reason: {text}");
    assert_eq!(sb.server.store.telemetry_seqs("NF-MOSB-01").await?, Vec::<i64>::new());

    // mosquitto_sub, subscribing to the other device's commands, is denied.
    let out = tokio::task::block_in_place(|| {
        std::process::Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &sb.mqtts_addr().port().to_string()])
            .arg("--cafile")
            .arg(files.path().join("root.pem"))
            .arg("--cert")
            .arg(files.path().join("device.pem"))
            .arg("--key")
            .arg(files.path().join("device.key"))
            .args(["-V", "mqttv5", "-q", "1", "-d", "-i", "NF-MOSA-01", "-t", "nf/v1/NF-MOSB-01/#"])
            .args(["-C", "1", "-W", "3"])
            .output()
    })?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("Subscribed (mid: 1): 135"), "SUBACK not authorized expected: {text}");
    assert!(text.contains("All subscription requests were denied."), "{text}");
    sb.stop().await;
    Ok(())
}

#[tokio::test]
async fn plaintext_mqtt_on_the_tls_port_gets_no_connack() -> anyhow::Result<()> {
    let sb = sandbox().await?;
    sb.enroll_device("site-a", "NF-PLAIN-01").await?;
    let outcome = try_connect(mqtt_options(sb.mqtts_addr(), "NF-PLAIN-01", None), REFUSAL_WAIT).await;
    assert_no_connack(&outcome, "plaintext MQTT on the TLS port", &[]);
    sb.stop().await;
    Ok(())
}

// === operators ===

#[tokio::test]
async fn grpc_refuses_missing_credentials_wrong_roles_and_other_sites() -> anyhow::Result<()> {
    let sb = sandbox().await?;
    sb.enroll_device("site-a", "NF-SA-01").await?;
    sb.enroll_device("site-b", "NF-SB-01").await?;
    let channel = sb.grpc_channel().await?;

    let mut anonymous = FleetServiceClient::new(channel.clone());
    assert_refused(
        anonymous.list_sites(pb::ListSitesRequest {}).await,
        Code::Unauthenticated,
        &["no credential"],
    );
    let forged = nanofleet::cli::Bearer::new("nfo1.0123456789abcdef01.bm90LWEtc2VjcmV0")?;
    let mut forged = FleetServiceClient::with_interceptor(channel.clone(), forged);
    assert_refused(
        forged.list_sites(pb::ListSitesRequest {}).await,
        Code::Unauthenticated,
        &["not recognised"],
    );

    let auditor = sb.person("audra", pb::Role::Auditor, "").await?;
    let mut auditor = FleetServiceClient::with_interceptor(channel.clone(), auditor);
    let create = pb::CreateSiteRequest {
        site_id: "site-z".into(),
        name: "Z".into(),
        time_zone: "UTC".into(),
        reason: "audit".into(),
    };
    assert_refused(
        auditor.create_site(create).await,
        Code::PermissionDenied,
        &["may not call", "CreateSite"],
    );
    assert!(sb.server.store.get_site("site-z").await?.is_none());

    let it_a = sb.person("it-a", pb::Role::SiteIt, "site-a").await?;
    let mut it_a = FleetServiceClient::with_interceptor(channel, it_a);
    let own = it_a.list_devices(pb::ListDevicesRequest { site_id: String::new() }).await?.into_inner();
    assert_eq!(own.devices.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["NF-SA-01"], "control");
    let list_b = it_a.list_devices(pb::ListDevicesRequest { site_id: "site-b".into() }).await;
    assert_refused(list_b, Code::PermissionDenied, &["site-a", "site-b"]);
    // Another site's device does not exist for site IT: the same answer as an unknown id.
    let get_b = it_a.get_device(pb::GetDeviceRequest { device_id: "NF-SB-01".into() }).await;
    assert_refused(get_b, Code::NotFound, &["NF-SB-01", "not found"]);
    let unknown = it_a.get_device(pb::GetDeviceRequest { device_id: "NF-NONE-01".into() }).await;
    assert_refused(unknown, Code::NotFound, &["NF-NONE-01", "not found"]);
    let decommission_b = it_a
        .decommission_device(pb::DecommissionDeviceRequest {
            device_id: "NF-SB-01".into(),
            reason: "x".into(),
        })
        .await;
    assert_refused(decommission_b, Code::NotFound, &["NF-SB-01", "not found"]);
    assert_eq!(sb.server.store.get_device("NF-SB-01").await?.expect("kept").status, "active");
    sb.stop().await;
    Ok(())
}

// === the audit trail ===

/// Some activity worth auditing, then a signed checkpoint of it.
async fn activity(sb: &Sandbox) -> anyhow::Result<()> {
    sb.enroll_device("site-a", "NF-AUD-01").await?;
    sb.enroll_device("site-a", "NF-AUD-02").await?;
    sb.server.audit.checkpoint().await?;
    Ok(())
}

async fn verify(sb: &Sandbox) -> anyhow::Result<pb::VerifyAuditResponse> {
    let mut audit = AuditServiceClient::with_interceptor(sb.grpc_channel().await?, sb.admin());
    Ok(audit
        .verify_audit(pb::VerifyAuditRequest { external_checkpoint_json: String::new() })
        .await?
        .into_inner())
}

#[tokio::test]
async fn an_edited_audit_record_is_named_by_verify_audit() -> anyhow::Result<()> {
    let sb = sandbox().await?;
    activity(&sb).await?;
    let before = verify(&sb).await?;
    assert!(before.intact, "{before:?}");
    assert!(before.checkpoints_checked >= 1, "{before:?}");

    let enrolled = wait_audited(&sb, "device.enroll", "NF-AUD-01").await?;
    let edit = format!("UPDATE audit_log SET reason = 'nothing happened' WHERE seq = {}", enrolled.seq);
    tamper(&sb, &[&edit]).await?;
    let after = verify(&sb).await?;
    assert!(!after.intact, "{after:?}");
    assert_eq!(after.broken_seq, enrolled.seq, "{after:?}");
    assert!(after.broken_reason.contains("changed"), "{after:?}");
    sb.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_deleted_audit_tail_is_found_by_verify_audit() -> anyhow::Result<()> {
    let sb = sandbox().await?;
    activity(&sb).await?;
    let before = verify(&sb).await?;
    assert!(before.intact, "{before:?}");
    let head = before.head_seq;
    assert!(head >= 4, "enough records to cut: {before:?}");
    let keep = head - 2;
    // The tail deleted and the head row set back to match: only the checkpoint knows.
    let delete = format!("DELETE FROM audit_log WHERE seq > {keep}");
    let reset =
        format!("UPDATE audit_head SET seq = {keep}, hash = (SELECT hash FROM audit_log WHERE seq = {keep})");
    tamper(&sb, &[&delete, &reset]).await?;
    let after = verify(&sb).await?;
    assert!(!after.intact, "{after:?}");
    assert_eq!(after.broken_seq, keep + 1, "{after:?}");
    assert!(after.broken_reason.contains("deleted from the end"), "{after:?}");
    sb.stop().await;
    Ok(())
}
