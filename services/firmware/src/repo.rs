//! The server's image repository: TUF metadata in `metadata/`, images in `targets/`
//! (named `{sha256}.{target}`, TUF's consistent snapshots), and the repository's own
//! bookkeeping in `repo.json` (metadata versions and the released images).
//!
//! Files are written to a temporary name and renamed into place, `timestamp.json`
//! last: a device reading while a release is published sees the old set or the new.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};
use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use tough::editor::RepositoryEditor;
use tough::editor::signed::SignedRole;
use tough::schema::decoded::Decoded;
use tough::schema::{
    Hashes, KeyHolder, Metafile, Role, RoleKeys, RoleType, Root, Signed, Snapshot, Target,
    Timestamp as TufTimestamp,
};

use crate::keys::{Signer, role_publics, sorted_publics, tuf_key};
use crate::{Error, Result, custom};

const SPEC_VERSION: &str = "1.0.0";

/// How long each role's metadata stays valid. `timestamp` is short: a device that is
/// fed the same metadata for longer (a freeze attack) refuses it, so the server
/// re-signs it well before it expires ([`ImageRepo::refresh`]).
#[derive(Debug, Clone, Copy)]
pub struct Expiry {
    pub root: SignedDuration,
    pub targets: SignedDuration,
    pub snapshot: SignedDuration,
    pub timestamp: SignedDuration,
}

impl Default for Expiry {
    fn default() -> Self {
        const DAY: i64 = 86_400;
        Expiry {
            root: SignedDuration::from_secs(365 * DAY),
            targets: SignedDuration::from_secs(365 * DAY),
            snapshot: SignedDuration::from_secs(7 * DAY),
            timestamp: SignedDuration::from_secs(DAY),
        }
    }
}

/// The keys a TUF root lists: the fleet trust root's `root` keys, its `firmware`
/// keys for `targets`, and the server's online key for `snapshot` and `timestamp`.
#[derive(Debug, Clone)]
pub struct RootKeys {
    pub root: Vec<VerifyingKey>,
    pub root_threshold: u64,
    pub targets: Vec<VerifyingKey>,
    pub targets_threshold: u64,
    pub online: VerifyingKey,
}

impl RootKeys {
    /// The keys the fleet trust root names: its root keys, its firmware keys for
    /// `targets`, and `online` for `snapshot` and `timestamp`.
    pub fn of(trust_root: &nanofleet_pki::trust_root::TrustRoot, online: &VerifyingKey) -> RootKeys {
        let (root, root_threshold) = crate::client::role_keys(trust_root, "root");
        let (targets, targets_threshold) = crate::client::role_keys(trust_root, crate::FIRMWARE_ROLE);
        RootKeys { root, root_threshold, targets, targets_threshold, online: *online }
    }
}

/// A released image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    /// The TUF target name: `{model}-{version}.img`.
    pub target: String,
    pub model: String,
    pub version: String,
    pub release_counter: u64,
    /// Lowercase hex SHA-256 of the image.
    pub sha256: String,
    pub length: u64,
    pub released_at: Timestamp,
    /// Who released it (`person:ID`).
    pub released_by: String,
}

/// What a release says of an image.
#[derive(Debug, Clone)]
pub struct NewRelease {
    pub model: String,
    pub version: String,
    pub release_counter: u64,
    pub released_by: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    root_version: u64,
    targets_version: u64,
    snapshot_version: u64,
    timestamp_version: u64,
    releases: BTreeMap<String, Release>,
}

/// The repository in a directory.
#[derive(Debug, Clone)]
pub struct ImageRepo {
    dir: PathBuf,
    expiry: Expiry,
}

impl ImageRepo {
    pub fn new(dir: &Path) -> ImageRepo {
        ImageRepo { dir: dir.to_owned(), expiry: Expiry::default() }
    }

    pub fn with_expiry(mut self, expiry: Expiry) -> ImageRepo {
        self.expiry = expiry;
        self
    }

    pub fn metadata_dir(&self) -> PathBuf {
        self.dir.join("metadata")
    }

    pub fn targets_dir(&self) -> PathBuf {
        self.dir.join("targets")
    }

    pub fn exists(&self) -> bool {
        self.dir.join("repo.json").exists()
    }

    /// Creates the repository: `1.root.json` signed by `signers` (a threshold of the
    /// root keys). Targets, snapshot and timestamp follow with the first release.
    pub async fn create(&self, keys: &RootKeys, signers: &[&SigningKey], now: Timestamp) -> Result<()> {
        if self.exists() {
            return Err(Error::Invalid(format!(
                "{} already holds a firmware repository",
                self.dir.display()
            )));
        }
        for d in [self.metadata_dir(), self.targets_dir()] {
            std::fs::create_dir_all(&d).map_err(io(&d))?;
        }
        let root = self.sign_root(keys, 1, signers, now).await?;
        self.put(&root.signed().signed.filename(true), root.buffer())?;
        self.save_state(&State { root_version: 1, ..State::default() })
    }

    /// Writes root version N+1 with `keys`, signed by a threshold of both the old
    /// root keys and the new ones (give the signers of both). Devices follow the
    /// chain of roots from the one they hold.
    pub async fn rotate_root(
        &self,
        keys: &RootKeys,
        signers: &[&SigningKey],
        online: &SigningKey,
        now: Timestamp,
    ) -> Result<u64> {
        let mut state = self.state()?;
        let next = state.root_version + 1;
        let root = self.sign_root(keys, next, signers, now).await?;
        let old = self.root(state.root_version)?;
        // The same bytes signed by the old root keys among `signers` (cross-signing).
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let holder = KeyHolder::Root(old.signed.clone());
        let old_signatures =
            match SignedRole::new(root.signed().signed.clone(), &holder, &Signer::boxed(signers), &rng).await
            {
                Ok(by_old) => by_old.signed().signatures.clone(),
                Err(_) => Vec::new(), // none of the signers is an old root key: refused below
            };
        let root = root.add_old_signatures(old_signatures)?;
        old.signed.verify_role(root.signed()).map_err(|e| {
            Error::Invalid(format!(
                "root v{next} lacks a threshold of signatures by the keys of root v{}: {e}",
                state.root_version
            ))
        })?;
        root.signed().signed.verify_role(root.signed()).map_err(|e| {
            Error::Invalid(format!("root v{next} lacks a threshold of signatures by its own root keys: {e}"))
        })?;
        self.put(&root.signed().signed.filename(true), root.buffer())?;
        state.root_version = next;
        self.save_state(&state)?;
        // Snapshot and timestamp again under the new root's online key; targets keep
        // their signatures (the firmware keys are offline).
        if state.targets_version > 0 {
            self.refresh(online, now).await?;
        }
        Ok(next)
    }

    /// Creates the repository, or rotates its root when `keys` differ from the newest
    /// root's (a firmware key added to or removed from the trust root, another online
    /// key). Returns the root version now in force.
    pub async fn ensure_root(
        &self,
        keys: &RootKeys,
        signers: &[&SigningKey],
        online: &SigningKey,
        now: Timestamp,
    ) -> Result<u64> {
        if !self.exists() {
            self.create(keys, signers, now).await?;
            return Ok(1);
        }
        let state = self.state()?;
        let root = self.root(state.root_version)?;
        let listed = |role: RoleType| role_publics(&root.signed, role);
        let wanted = |list: &[VerifyingKey], threshold: u64| (sorted_publics(list), threshold);
        let same = listed(RoleType::Root) == wanted(&keys.root, keys.root_threshold)
            && listed(RoleType::Targets) == wanted(&keys.targets, keys.targets_threshold)
            && listed(RoleType::Snapshot) == wanted(std::slice::from_ref(&keys.online), 1)
            && listed(RoleType::Timestamp) == wanted(std::slice::from_ref(&keys.online), 1);
        if same {
            return Ok(state.root_version);
        }
        self.rotate_root(keys, signers, online, now).await
    }

    /// The newest root, as a device pins it.
    pub fn root_json(&self) -> Result<Vec<u8>> {
        let state = self.state()?;
        let path = self.metadata_dir().join(format!("{}.root.json", state.root_version));
        std::fs::read(&path).map_err(io(&path))
    }

    pub fn releases(&self) -> Result<Vec<Release>> {
        Ok(self.state()?.releases.into_values().collect())
    }

    /// Releases the image in the file `image`: stores it, adds it to `targets`
    /// (signed by `firmware_key`, a key of the trust root's firmware role) and
    /// publishes new snapshot and timestamp (signed by `online`).
    pub async fn release(
        &self,
        image: &Path,
        rel: NewRelease,
        firmware_key: &SigningKey,
        online: &SigningKey,
        now: Timestamp,
    ) -> Result<Release> {
        let mut state = self.state()?;
        let target = target_name(&rel.model, &rel.version)?;
        if let Some(old) = state.releases.get(&target) {
            return Err(Error::Invalid(format!(
                "model {} version {} was released already (sha256 {}); release a new version",
                rel.model, rel.version, old.sha256
            )));
        }
        if let Some(top) =
            state.releases.values().filter(|r| r.model == rel.model).map(|r| r.release_counter).max()
            && rel.release_counter < top
        {
            return Err(Error::Invalid(format!(
                "release_counter {} is below {top}, the highest released for model {}: devices would refuse it",
                rel.release_counter, rel.model
            )));
        }
        let (sha256, length) = hash_file(image)?;
        let stored = self.targets_dir().join(format!("{sha256}.{target}"));
        if !stored.exists() {
            let tmp = stored.with_extension("part");
            std::fs::copy(image, &tmp).map_err(io(&tmp))?;
            std::fs::rename(&tmp, &stored).map_err(io(&stored))?;
        }
        let release = Release {
            target: target.clone(),
            model: rel.model,
            version: rel.version,
            release_counter: rel.release_counter,
            sha256,
            length,
            released_at: now,
            released_by: rel.released_by,
        };
        state.releases.insert(target, release.clone());
        self.publish(&mut state, &[firmware_key, online], now).await?;
        Ok(release)
    }

    /// Re-signs `snapshot` and `timestamp` with the online key, the released images
    /// unchanged: run well within [`Expiry::timestamp`].
    pub async fn refresh(&self, online: &SigningKey, now: Timestamp) -> Result<()> {
        let mut state = self.state()?;
        if state.targets_version == 0 {
            return Ok(()); // nothing released yet
        }
        let root = self.root(state.root_version)?;
        let targets_path = self.metadata_dir().join(format!("{}.targets.json", state.targets_version));
        let targets_buf = std::fs::read(&targets_path).map_err(io(&targets_path))?;
        let keys = Signer::boxed(&[online]);
        let holder = KeyHolder::Root(root.signed.clone());
        let rng = aws_lc_rs::rand::SystemRandom::new();
        state.snapshot_version += 1;
        state.timestamp_version += 1;
        let mut snapshot =
            Snapshot::new(SPEC_VERSION.into(), nonzero(state.snapshot_version), now + self.expiry.snapshot);
        snapshot.meta.insert("targets.json".into(), metafile(&targets_buf, state.targets_version));
        let snapshot = SignedRole::new(snapshot, &holder, &keys, &rng).await?;
        let mut timestamp = TufTimestamp::new(
            SPEC_VERSION.into(),
            nonzero(state.timestamp_version),
            now + self.expiry.timestamp,
        );
        timestamp.meta.insert("snapshot.json".into(), metafile(snapshot.buffer(), state.snapshot_version));
        let timestamp = SignedRole::new(timestamp, &holder, &keys, &rng).await?;
        self.put(&snapshot.signed().signed.filename(true), snapshot.buffer())?;
        self.put("timestamp.json", timestamp.buffer())?;
        self.save_state(&state)
    }

    /// Signs targets (with `keys`, which must hold the targets keys unless there is
    /// nothing to sign anew), snapshot and timestamp with the next versions.
    async fn publish(&self, state: &mut State, keys: &[&SigningKey], now: Timestamp) -> Result<()> {
        let root_path = self.metadata_dir().join(format!("{}.root.json", state.root_version));
        let mut editor = RepositoryEditor::new(&root_path).await?;
        state.targets_version += 1;
        state.snapshot_version += 1;
        state.timestamp_version += 1;
        editor
            .targets_version(nonzero(state.targets_version))?
            .targets_expires(now + self.expiry.targets)?
            .snapshot_version(nonzero(state.snapshot_version))
            .snapshot_expires(now + self.expiry.snapshot)
            .timestamp_version(nonzero(state.timestamp_version))
            .timestamp_expires(now + self.expiry.timestamp);
        for r in state.releases.values() {
            editor.add_target(r.target.as_str(), target_of(r)?)?;
        }
        let signed = editor.sign(&Signer::boxed(keys)).await?;
        let staging = self.dir.join("staging");
        let _ = std::fs::remove_dir_all(&staging);
        signed.write(&staging).await?;
        // Versioned files first, the unversioned timestamp last.
        let mut names: Vec<String> = std::fs::read_dir(&staging)
            .map_err(io(&staging))?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        names.sort_by_key(|n| n == "timestamp.json");
        for name in names {
            let from = staging.join(&name);
            let to = self.metadata_dir().join(&name);
            std::fs::rename(&from, &to).map_err(io(&to))?;
        }
        std::fs::remove_dir_all(&staging).map_err(io(&staging))?;
        self.save_state(state)
    }

    async fn sign_root(
        &self,
        keys: &RootKeys,
        version: u64,
        signers: &[&SigningKey],
        now: Timestamp,
    ) -> Result<SignedRole<Root>> {
        let mut root = Root {
            spec_version: SPEC_VERSION.into(),
            consistent_snapshot: true,
            version: nonzero(version),
            expires: now + self.expiry.root,
            keys: HashMap::new(),
            roles: HashMap::new(),
            _extra: HashMap::new(),
        };
        let mut role = |role: RoleType, list: &[VerifyingKey], threshold: u64| -> Result<()> {
            let mut keyids = Vec::new();
            for k in list {
                let key = tuf_key(k);
                let id = key.key_id()?;
                root.keys.insert(id.clone(), key);
                keyids.push(id);
            }
            let threshold =
                NonZeroU64::new(threshold).ok_or_else(|| Error::Invalid(format!("{role} threshold 0")))?;
            if (keyids.len() as u64) < threshold.get() {
                return Err(Error::Invalid(format!(
                    "{role} role: threshold {threshold} with {} keys; add keys first",
                    keyids.len()
                )));
            }
            root.roles.insert(role, RoleKeys { keyids, threshold, _extra: HashMap::new() });
            Ok(())
        };
        role(RoleType::Root, &keys.root, keys.root_threshold)?;
        role(RoleType::Targets, &keys.targets, keys.targets_threshold)?;
        role(RoleType::Snapshot, std::slice::from_ref(&keys.online), 1)?;
        role(RoleType::Timestamp, std::slice::from_ref(&keys.online), 1)?;
        let holder = KeyHolder::Root(root.clone());
        let rng = aws_lc_rs::rand::SystemRandom::new();
        Ok(SignedRole::new(root, &holder, &Signer::boxed(signers), &rng).await?)
    }

    fn root(&self, version: u64) -> Result<Signed<Root>> {
        let path = self.metadata_dir().join(format!("{version}.root.json"));
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))
    }

    fn state(&self) -> Result<State> {
        let path = self.dir.join("repo.json");
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))
    }

    fn save_state(&self, state: &State) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| Error::Invalid(e.to_string()))?;
        self.put_at(&self.dir.join("repo.json"), &bytes)
    }

    fn put(&self, name: &str, bytes: &[u8]) -> Result<()> {
        self.put_at(&self.metadata_dir().join(name), bytes)
    }

    fn put_at(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))
    }
}

/// The TUF target name of a model's version: `{model}-{version}.img`, from letters,
/// digits, `.`, `_` and `-` only.
pub fn target_name(model: &str, version: &str) -> Result<String> {
    for (field, value) in [("model", model), ("version", version)] {
        let ok = !value.is_empty()
            && value.len() <= 64
            && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            && !value.starts_with('.');
        if !ok {
            return Err(Error::Invalid(format!(
                "{field} {value:?}: allowed 1 to 64 of A-Z a-z 0-9 . _ -, not starting with a dot"
            )));
        }
    }
    Ok(format!("{model}-{version}.img"))
}

fn target_of(r: &Release) -> Result<Target> {
    let sha = hex::decode(&r.sha256).map_err(|e| Error::Invalid(format!("sha256 {:?}: {e}", r.sha256)))?;
    let mut custom = HashMap::new();
    custom.insert(custom::HARDWARE_MODEL.into(), r.model.clone().into());
    custom.insert(custom::VERSION.into(), r.version.clone().into());
    custom.insert(custom::RELEASE_COUNTER.into(), r.release_counter.into());
    Ok(Target {
        length: r.length,
        hashes: Hashes { sha256: Decoded::from(sha), _extra: HashMap::new() },
        custom,
        _extra: HashMap::new(),
    })
}

fn metafile(buffer: &[u8], version: u64) -> Metafile {
    Metafile {
        length: Some(buffer.len() as u64),
        hashes: Some(Hashes {
            sha256: Decoded::from(sha2::Sha256::digest(buffer).to_vec()),
            _extra: HashMap::new(),
        }),
        version: nonzero(version),
        _extra: HashMap::new(),
    }
}

fn nonzero(v: u64) -> NonZeroU64 {
    NonZeroU64::new(v).unwrap_or(NonZeroU64::MIN)
}

/// SHA-256 (hex) and length of a file.
pub fn hash_file(path: &Path) -> Result<(String, u64)> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut h = sha2::Sha256::new();
    let n = std::io::copy(&mut f, &mut h).map_err(io(path))?;
    Ok((hex::encode(h.finalize()), n))
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_owned(), source }
}
