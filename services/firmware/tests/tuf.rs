//! The image repository against the device's checks, and the attacks of the TUF
//! conformance suite that apply: expired and unsigned metadata, a revoked key,
//! mix-and-match, rollback, freeze, root rotation, repeated keys in a threshold.

use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use jiff::{SignedDuration, Timestamp};
use nanofleet_firmware::client::{self, Refusal, code};
use nanofleet_firmware::keys::Signer;
use nanofleet_firmware::repo::{Expiry, ImageRepo, NewRelease, RootKeys};
use nanofleet_pki::trust_root::{TrustRoot, key_id};
use tough::FilesystemTransport;
use tough::editor::signed::SignedRole;
use tough::schema::{KeyHolder, Root, Signed};
use url::Url;

const MODEL: &str = "NF-200";

fn key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

/// The fleet: its trust root (root key 1, firmware keys as given), the server's
/// online key, and a repository in a temporary directory.
struct Fleet {
    dir: tempfile::TempDir,
    root_key: SigningKey,
    online: SigningKey,
    trust: TrustRoot,
    repo: ImageRepo,
}

impl Fleet {
    async fn new(firmware: &[&SigningKey], threshold: u32) -> Fleet {
        Fleet::at(firmware, threshold, Timestamp::now(), Expiry::default()).await
    }

    async fn at(firmware: &[&SigningKey], threshold: u32, now: Timestamp, expiry: Expiry) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let root_key = key(1);
        let online = key(2);
        let v1 = TrustRoot::initial(&root_key, "2046-11-26T00:00:00Z");
        let mut body = v1.successor_body();
        for k in firmware {
            body.add_role_key("firmware", &k.verifying_key(), Some("person:rel"));
        }
        body.roles.get_mut("firmware").unwrap().threshold = threshold;
        body.add_role_key("director", &online.verifying_key(), None);
        let trust = TrustRoot::signed_by(body, &[&root_key]);
        let repo = ImageRepo::new(&dir.path().join("repo")).with_expiry(expiry);
        repo.create(&root_keys(&trust, &online), &[&root_key], now).await.unwrap();
        Fleet { dir, root_key, online, trust, repo }
    }

    fn image(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    async fn release(
        &self,
        version: &str,
        counter: u64,
        signer: &SigningKey,
    ) -> nanofleet_firmware::repo::Release {
        self.release_at(version, counter, signer, Timestamp::now()).await
    }

    async fn release_at(
        &self,
        version: &str,
        counter: u64,
        signer: &SigningKey,
        now: Timestamp,
    ) -> nanofleet_firmware::repo::Release {
        let img =
            self.image(&format!("{version}.img"), format!("firmware {version}").repeat(1000).as_bytes());
        let rel = NewRelease {
            model: MODEL.into(),
            version: version.into(),
            release_counter: counter,
            released_by: "person:rel".into(),
        };
        self.repo.release(&img, rel, signer, &self.online, now).await.unwrap()
    }

    /// The device: pins TUF root v1 and keeps what it trusted in `datastore`.
    fn device(&self) -> Device {
        let pinned = std::fs::read(self.repo.metadata_dir().join("1.root.json")).unwrap();
        Device { pinned, datastore: tempfile::tempdir().unwrap() }
    }
}

fn root_keys(trust: &TrustRoot, online: &SigningKey) -> RootKeys {
    RootKeys::of(trust, &online.verifying_key())
}

struct Device {
    pinned: Vec<u8>,
    datastore: tempfile::TempDir,
}

impl Device {
    async fn load(&self, fleet: &Fleet, trust: &TrustRoot) -> Result<tough::Repository, Refusal> {
        client::load(
            &self.pinned,
            trust,
            dir_url(&fleet.repo.metadata_dir()),
            dir_url(&fleet.repo.targets_dir()),
            self.datastore.path(),
            FilesystemTransport,
        )
        .await
    }
}

fn dir_url(p: &Path) -> Url {
    Url::from_directory_path(p).unwrap()
}

async fn refused(r: Result<tough::Repository, Refusal>) -> Refusal {
    match r {
        Ok(_) => panic!("metadata accepted"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn a_release_is_found_and_checked_by_the_device_and_its_bytes_verify() {
    let fw = key(10);
    let fleet = Fleet::new(&[&fw], 1).await;
    let rel = fleet.release("2.4.0", 8, &fw).await;
    let device = fleet.device();
    let repo = device.load(&fleet, &fleet.trust).await.unwrap();
    let c = client::check(&repo, &fleet.trust, &rel.target, MODEL, 7).unwrap();
    assert_eq!((c.version.as_str(), c.release_counter, c.length), ("2.4.0", 8, rel.length));
    assert_eq!(c.sha256, rel.sha256);
    let name = tough::TargetName::new(rel.target.as_str()).unwrap();
    let stream = repo.read_target(&name).await.unwrap().unwrap();
    let bytes = tough::IntoVec::into_vec(stream).await.unwrap();
    assert_eq!(bytes, "firmware 2.4.0".repeat(1000).into_bytes());
}

#[tokio::test]
async fn a_release_for_another_model_or_an_older_counter_is_refused() {
    let fw = key(10);
    let fleet = Fleet::new(&[&fw], 1).await;
    let rel = fleet.release("2.4.0", 8, &fw).await;
    let repo = fleet.device().load(&fleet, &fleet.trust).await.unwrap();
    assert_eq!(
        client::check(&repo, &fleet.trust, &rel.target, "NF-100", 0).unwrap_err().code,
        code::WRONG_MODEL
    );
    let e = client::check(&repo, &fleet.trust, &rel.target, MODEL, 9).unwrap_err();
    assert_eq!(e.code, code::RELEASE_COUNTER_TOO_LOW);
    assert!(e.detail.contains("release counter 8, below 9"), "{e}");
    assert_eq!(
        client::check(&repo, &fleet.trust, "NF-200-9.9.9.img", MODEL, 0).unwrap_err().code,
        code::NOT_RELEASED
    );
}

#[tokio::test]
async fn the_server_refuses_a_second_release_of_a_version_and_a_lower_counter() {
    let fw = key(10);
    let fleet = Fleet::new(&[&fw], 1).await;
    fleet.release("2.4.0", 8, &fw).await;
    let img = fleet.image("x.img", b"other bytes");
    let again = NewRelease {
        model: MODEL.into(),
        version: "2.4.0".into(),
        release_counter: 9,
        released_by: "p".into(),
    };
    let e = fleet.repo.release(&img, again, &fw, &fleet.online, Timestamp::now()).await.unwrap_err();
    assert!(e.to_string().contains("was released already"), "{e}");
    let lower = NewRelease {
        model: MODEL.into(),
        version: "2.5.0".into(),
        release_counter: 7,
        released_by: "p".into(),
    };
    let e = fleet.repo.release(&img, lower, &fw, &fleet.online, Timestamp::now()).await.unwrap_err();
    assert!(e.to_string().contains("release_counter 7 is below 8"), "{e}");
    let bad = NewRelease {
        model: "../etc".into(),
        version: "1".into(),
        release_counter: 9,
        released_by: "p".into(),
    };
    let e = fleet.repo.release(&img, bad, &fw, &fleet.online, Timestamp::now()).await.unwrap_err();
    assert!(e.to_string().contains("model \"../etc\""), "{e}");
}

#[tokio::test]
async fn a_tampered_image_does_not_verify() {
    let fw = key(10);
    let fleet = Fleet::new(&[&fw], 1).await;
    let rel = fleet.release("2.4.0", 8, &fw).await;
    let stored = fleet.repo.targets_dir().join(format!("{}.{}", rel.sha256, rel.target));
    let mut bytes = std::fs::read(&stored).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&stored, bytes).unwrap();
    let device = fleet.device();
    let repo = device.load(&fleet, &fleet.trust).await.unwrap();
    let name = tough::TargetName::new(rel.target.as_str()).unwrap();
    let stream = repo.read_target(&name).await.unwrap().unwrap();
    let e = tough::IntoVec::into_vec(stream).await.unwrap_err();
    assert!(e.to_string().to_lowercase().contains("hash"), "{e}");
}

#[tokio::test]
async fn expired_metadata_is_refused_a_freeze() {
    let fw = key(10);
    let long_ago = Timestamp::now() - SignedDuration::from_hours(49);
    let fleet = Fleet::at(&[&fw], 1, long_ago, Expiry::default()).await;
    fleet.release_at("2.4.0", 8, &fw, long_ago).await;
    // The timestamp (valid one day) expired a day ago: a server that stops refreshing,
    // or an attacker replaying a frozen view.
    let e = refused(fleet.device().load(&fleet, &fleet.trust).await).await;
    assert_eq!(e.code, code::EXPIRED, "{e}");
    // Refreshed by the online key, the same release loads again.
    fleet.repo.refresh(&fleet.online, Timestamp::now()).await.unwrap();
    fleet.device().load(&fleet, &fleet.trust).await.unwrap();
}

#[tokio::test]
async fn unsigned_metadata_is_refused() {
    let fw = key(10);
    let fleet = Fleet::new(&[&fw], 1).await;
    fleet.release("2.4.0", 8, &fw).await;
    let path = fleet.repo.metadata_dir().join("timestamp.json");
    let mut ts: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    ts["signatures"] = serde_json::json!([]);
    std::fs::write(&path, serde_json::to_vec(&ts).unwrap()).unwrap();
    let e = refused(fleet.device().load(&fleet, &fleet.trust).await).await;
    assert_eq!(e.code, code::METADATA, "{e}");
}

#[tokio::test]
async fn targets_signed_by_a_firmware_key_the_trust_root_revoked_are_refused() {
    let (old, new) = (key(10), key(11));
    let fleet = Fleet::new(&[&old, &new], 1).await;
    let rel = fleet.release("2.4.0", 8, &old).await;
    // The trust root's next version drops the old key (stolen, say); the TUF root still
    // lists it, but the device counts only firmware keys its trust root names.
    let mut body = fleet.trust.successor_body();
    body.remove_key(&key_id(&old.verifying_key()));
    let revoked = TrustRoot::signed_by(body, &[&fleet.root_key]);
    let device = fleet.device();
    let repo = device.load(&fleet, &revoked).await.unwrap();
    let e = client::check(&repo, &revoked, &rel.target, MODEL, 0).unwrap_err();
    assert_eq!(e.code, code::NOT_FIRMWARE_KEY, "{e}");
    // Re-signed by the key still in the role, the same release is accepted.
    let rel2 = fleet.release("2.4.1", 8, &new).await;
    let repo = device.load(&fleet, &revoked).await.unwrap();
    client::check(&repo, &revoked, &rel2.target, MODEL, 0).unwrap();
}

#[tokio::test]
async fn targets_from_another_version_are_refused_mix_and_match() {
    let fw = key(10);
    let fleet = Fleet::new(&[&fw], 1).await;
    fleet.release("2.4.0", 8, &fw).await;
    fleet.release("2.5.0", 9, &fw).await;
    // targets v2 (both releases) replaced by the bytes of targets v1 (one release):
    // snapshot pins v2's hash and length.
    let md = fleet.repo.metadata_dir();
    std::fs::copy(md.join("1.targets.json"), md.join("2.targets.json")).unwrap();
    let e = refused(fleet.device().load(&fleet, &fleet.trust).await).await;
    assert_eq!(e.code, code::METADATA, "{e}");
}

#[tokio::test]
async fn an_older_timestamp_than_the_device_saw_is_refused_rollback() {
    let fw = key(10);
    let fleet = Fleet::new(&[&fw], 1).await;
    fleet.release("2.4.0", 8, &fw).await;
    let md = fleet.repo.metadata_dir();
    let old_timestamp = std::fs::read(md.join("timestamp.json")).unwrap();
    fleet.release("2.5.0", 9, &fw).await;
    let device = fleet.device();
    device.load(&fleet, &fleet.trust).await.unwrap();
    // An attacker (or a stale mirror) serves the earlier, still valid timestamp.
    std::fs::write(md.join("timestamp.json"), old_timestamp).unwrap();
    let e = refused(device.load(&fleet, &fleet.trust).await).await;
    assert_eq!(e.code, code::ROLLBACK, "{e}");
}

#[tokio::test]
async fn a_root_rotation_signed_by_old_and_new_keys_is_followed_and_one_by_the_new_key_alone_is_not() {
    let fw = key(10);
    let fleet = Fleet::new(&[&fw], 1).await;
    fleet.release("2.3.9", 7, &fw).await;
    let device = fleet.device();
    device.load(&fleet, &fleet.trust).await.unwrap();
    let new_root = key(20);
    let mut keys = root_keys(&fleet.trust, &fleet.online);
    keys.root = vec![new_root.verifying_key()];
    // The server refuses to publish a rotation the old keys did not sign.
    let e = fleet.repo.rotate_root(&keys, &[&new_root], &fleet.online, Timestamp::now()).await.unwrap_err();
    assert!(e.to_string().contains("root v2 lacks a threshold of signatures by the keys of root v1"), "{e}");
    // Signed by both: the device follows the chain from its pinned v1.
    assert_eq!(
        fleet
            .repo
            .rotate_root(&keys, &[&fleet.root_key, &new_root], &fleet.online, Timestamp::now())
            .await
            .unwrap(),
        2
    );
    let rel = fleet.release("2.4.0", 8, &fw).await;
    let repo = device.load(&fleet, &fleet.trust).await.unwrap();
    assert_eq!(repo.root().signed.version.get(), 2);
    client::check(&repo, &fleet.trust, &rel.target, MODEL, 0).unwrap();
    // An attacker holding only a new key writes root v3 by itself: refused.
    let attacker = key(30);
    keys.root = vec![attacker.verifying_key()];
    let mut root: Signed<Root> =
        serde_json::from_slice(&std::fs::read(fleet.repo.metadata_dir().join("2.root.json")).unwrap())
            .unwrap();
    root.signed.version = std::num::NonZeroU64::new(3).unwrap();
    let id = nanofleet_firmware::keys::tuf_key(&attacker.verifying_key()).key_id().unwrap();
    root.signed.keys.insert(id.clone(), nanofleet_firmware::keys::tuf_key(&attacker.verifying_key()));
    root.signed.roles.get_mut(&tough::schema::RoleType::Root).unwrap().keyids = vec![id];
    let holder = KeyHolder::Root(root.signed.clone());
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let forged = SignedRole::new(root.signed, &holder, &Signer::boxed(&[&attacker]), &rng).await.unwrap();
    std::fs::write(fleet.repo.metadata_dir().join("3.root.json"), forged.buffer()).unwrap();
    let e = refused(device.load(&fleet, &fleet.trust).await).await;
    assert_eq!(e.code, code::METADATA, "{e}");
}

#[tokio::test]
async fn a_tuf_root_not_anchored_in_the_pinned_trust_root_is_refused() {
    let fw = key(10);
    let fleet = Fleet::new(&[&fw], 1).await;
    // A device whose trust root has another root key (another fleet's, say).
    let other = TrustRoot::initial(&key(40), "2046-11-26T00:00:00Z");
    let e = refused(fleet.device().load(&fleet, &other).await).await;
    assert_eq!(e.code, code::ROOT_NOT_ANCHORED, "{e}");
}

#[tokio::test]
async fn one_key_signing_twice_does_not_make_a_threshold_of_two() {
    let (a, b) = (key(10), key(11));
    let fleet = Fleet::new(&[&a, &b], 1).await;
    fleet.release("2.4.0", 8, &a).await;
    // The device's trust root wants two firmware signatures.
    let mut body = fleet.trust.successor_body();
    body.roles.get_mut("firmware").unwrap().threshold = 2;
    let strict = TrustRoot::signed_by(body, &[&fleet.root_key]);
    // targets carries a's signature twice; snapshot and timestamp re-signed over it.
    let md = fleet.repo.metadata_dir();
    let path = md.join("1.targets.json");
    let mut t: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let sig = t["signatures"][0].clone();
    t["signatures"].as_array_mut().unwrap().push(sig);
    std::fs::write(&path, serde_json::to_vec(&t).unwrap()).unwrap();
    fleet.repo.refresh(&fleet.online, Timestamp::now()).await.unwrap();
    // tough refuses a signature list naming one key twice; the pinned firmware
    // threshold would not count it twice either.
    let e = refused(fleet.device().load(&fleet, &strict).await).await;
    assert_eq!(e.code, code::METADATA, "{e}");
    assert!(e.detail.contains("uplicate"), "{e}");
}
