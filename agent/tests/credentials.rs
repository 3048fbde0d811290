//! Credentials on disk: what is saved comes back, readable by the device's user only,
//! and a renewal interrupted halfway leaves a usable set.

use std::os::unix::fs::PermissionsExt as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nanofleet_agent::enroll::Credentials;

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Credentials with a real key and a self-signed certificate standing in for the chain
/// and the root.
fn credentials() -> Credentials {
    nanofleet_pki::install_crypto_provider();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["NF-TST-01".into()]).unwrap().self_signed(&key).unwrap();
    Credentials {
        device_id: "NF-TST-01".into(),
        site_id: "test-site".into(),
        issued_ms: 1_700_000_000_000,
        not_after_ms: 1_700_000_900_000,
        server: "https://fleet.example.org:7400".into(),
        mqtt_address: "fleet.example.org:8883".into(),
        key_pem: key.serialize_pem(),
        chain_pem: cert.pem(),
        root_pem: cert.pem(),
        trust_root_json: String::new(),
    }
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn saved_credentials_load_back_and_only_their_owner_can_read_them() {
    let dir = tempfile::tempdir().unwrap();
    let identity = dir.path().join("identity");
    let c = credentials();
    c.save(&identity).unwrap();
    assert_eq!(mode(&identity), 0o700);
    let mut names: Vec<String> = std::fs::read_dir(&identity)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["device.key", "device.pem", "fleet-root.pem", "identity.json", "trust-root.json"]);
    for name in &names {
        assert_eq!(mode(&identity.join(name)), 0o600, "{name}");
    }
    // The metadata file holds no key material.
    let meta = std::fs::read_to_string(identity.join("identity.json")).unwrap();
    assert!(!meta.contains("PRIVATE KEY") && !meta.contains("CERTIFICATE"), "{meta}");

    let back = Credentials::load(&identity).unwrap().expect("saved credentials");
    assert_eq!(
        (&back.device_id, &back.site_id, back.issued_ms, back.not_after_ms, &back.server, &back.mqtt_address),
        (&c.device_id, &c.site_id, c.issued_ms, c.not_after_ms, &c.server, &c.mqtt_address)
    );
    assert_eq!((&back.key_pem, &back.chain_pem, &back.root_pem), (&c.key_pem, &c.chain_pem, &c.root_pem));
    back.client_config().expect("a usable TLS configuration");

    // Saving again (a renewal) replaces the set and keeps the permissions.
    let renewed = Credentials { not_after_ms: c.not_after_ms + 1, ..credentials() };
    renewed.save(&identity).unwrap();
    let back = Credentials::load(&identity).unwrap().unwrap();
    assert_eq!((back.not_after_ms, &back.key_pem), (renewed.not_after_ms, &renewed.key_pem));
    for name in &names {
        assert_eq!(mode(&identity.join(name)), 0o600, "{name}");
    }
}

#[test]
fn a_directory_without_credentials_loads_as_not_enrolled() {
    let dir = tempfile::tempdir().unwrap();
    assert!(Credentials::load(dir.path()).unwrap().is_none());
    assert!(Credentials::load(&dir.path().join("missing")).unwrap().is_none());
}

#[test]
fn a_missing_key_file_is_an_error_that_names_it() {
    let dir = tempfile::tempdir().unwrap();
    credentials().save(dir.path()).unwrap();
    std::fs::remove_file(dir.path().join("device.key")).unwrap();
    let err = Credentials::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("device.key"), "{err}");
}

#[test]
fn credentials_saved_before_the_issue_time_was_recorded_still_load() {
    let dir = tempfile::tempdir().unwrap();
    let c = credentials();
    c.save(dir.path()).unwrap();
    let meta = dir.path().join("identity.json");
    let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    json.as_object_mut().unwrap().remove("issued_ms");
    std::fs::write(&meta, serde_json::to_vec(&json).unwrap()).unwrap();
    let back = Credentials::load(dir.path()).unwrap().unwrap();
    assert_eq!(back.issued_ms, 0);
    // Unknown issue time: renewal is due at once.
    assert_eq!(back.renew_in(back.issued_ms), Duration::ZERO);
}

#[test]
fn a_renewal_interrupted_while_moving_files_in_is_finished_on_load() {
    let dir = tempfile::tempdir().unwrap();
    let old = credentials();
    old.save(dir.path()).unwrap();
    // A new set was staged completely; the key was moved in, then the power failed.
    let new = Credentials { not_after_ms: old.not_after_ms + 1, ..credentials() };
    std::fs::write(dir.path().join("device.key"), &new.key_pem).unwrap();
    std::fs::write(dir.path().join("device.pem.new"), &new.chain_pem).unwrap();
    std::fs::write(dir.path().join("fleet-root.pem.new"), &new.root_pem).unwrap();
    std::fs::write(dir.path().join("identity.json.new"), serde_json::to_vec(&new).unwrap()).unwrap();
    let back = Credentials::load(dir.path()).unwrap().unwrap();
    assert_eq!(
        (back.not_after_ms, &back.key_pem, &back.chain_pem),
        (new.not_after_ms, &new.key_pem, &new.chain_pem)
    );
    assert!(!dir.path().join("identity.json.new").exists());
    back.client_config().expect("key and certificate belong together");
}

#[test]
fn a_renewal_interrupted_while_staging_leaves_the_old_set() {
    let dir = tempfile::tempdir().unwrap();
    let old = credentials();
    old.save(dir.path()).unwrap();
    // Only part of the new set was written: no staged identity.json.
    std::fs::write(dir.path().join("device.key.new"), "half a key").unwrap();
    let back = Credentials::load(dir.path()).unwrap().unwrap();
    assert_eq!(back.key_pem, old.key_pem);
    back.client_config().unwrap();
}

#[test]
fn renewal_is_due_two_thirds_into_the_life_from_now() {
    let now = now_ms();
    // Issued 60 s ago, ends in 30 s: due 0 s from now (60 of 90).
    let c = Credentials { not_after_ms: now + 30_000, ..credentials() };
    assert!(c.renew_in(now - 60_000) <= Duration::from_millis(50));
    // Issued now, ends in 90 s: due in 60 s.
    let c = Credentials { not_after_ms: now + 90_000, ..credentials() };
    let due = c.renew_in(now);
    assert!(due <= Duration::from_secs(60) && due > Duration::from_secs(59), "{due:?}");
    // Long overdue, or already expired: at once.
    let c = Credentials { not_after_ms: now - 1_000, ..credentials() };
    assert_eq!(c.renew_in(now - 100_000), Duration::ZERO);
    assert_eq!(c.renew_due_ms(now - 100_000), now - 100_000 + 99_000 * 2 / 3);
}
