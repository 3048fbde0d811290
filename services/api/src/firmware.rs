//! Firmware releases: an uploaded image becomes a signed TUF target in the image
//! repository ([`nanofleet_firmware::repo`]). Transport-free, like [`crate::Fleet`]:
//! the gRPC adapter feeds it the upload's chunks.
//!
//! Releasing signs `targets` with the caller's `firmware` key, unsealed with the
//! password they give again (created at their first release and added to the trust
//! root, as recipe keys are); `snapshot` and `timestamp` are signed with the
//! server's online key and re-signed by [`Firmware::refresh`] on a schedule.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::{Stream, StreamExt};
use nanofleet_firmware::repo::{ImageRepo, NewRelease, Release, RootKeys, target_name};
use nanofleet_pki::trust_root;
use nanofleet_proto::v1 as pb;
use nanofleet_store::{AuditEntry, Store};
use sha2::Digest as _;
use tokio::io::AsyncWriteExt as _;
use tokio::sync::Mutex;

use crate::{Caller, Error, People, Recipes, now_ms};

/// Largest image accepted, in bytes (the device takes no more either).
pub const MAX_IMAGE_BYTES: u64 = 512 * 1024 * 1024;

/// Released firmware; cheap to clone.
#[derive(Clone)]
pub struct Firmware {
    store: Store,
    people: People,
    recipes: Recipes,
    pki_dir: PathBuf,
    dir: PathBuf,
    repo: ImageRepo,
    /// One change of the repository at a time (versions must not race).
    lock: Arc<Mutex<()>>,
}

impl std::fmt::Debug for Firmware {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Firmware").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl Firmware {
    /// The repository in `dir` (`metadata/`, `targets/`, `uploads/`), keys from
    /// `pki_dir`.
    pub fn new(store: Store, people: People, recipes: Recipes, pki_dir: PathBuf, dir: PathBuf) -> Firmware {
        let repo = ImageRepo::new(&dir);
        Firmware { store, people, recipes, pki_dir, dir, repo, lock: Arc::new(Mutex::new(())) }
    }

    /// Where the signed metadata are (served at `/firmware/metadata/`).
    pub fn metadata_dir(&self) -> PathBuf {
        self.repo.metadata_dir()
    }

    /// Where the images are (served at `/firmware/targets/`).
    pub fn targets_dir(&self) -> PathBuf {
        self.repo.targets_dir()
    }

    /// Releases, the newest release counter first; `model` empty for all.
    pub fn list(&self, model: &str) -> Result<Vec<pb::FirmwareRelease>, Error> {
        if !self.repo.exists() {
            return Ok(Vec::new());
        }
        let mut out: Vec<Release> = self
            .repo
            .releases()
            .map_err(|e| Error::Unavailable(e.to_string()))?
            .into_iter()
            .filter(|r| model.is_empty() || r.model == model)
            .collect();
        out.sort_by(|a, b| b.release_counter.cmp(&a.release_counter).then(b.released_at.cmp(&a.released_at)));
        Ok(out.iter().map(release_pb).collect())
    }

    /// Takes an upload: checks the header, stores the bytes while hashing them,
    /// checks length and hash, then signs and publishes the release.
    pub async fn upload<S>(
        &self,
        caller: &Caller,
        header: pb::FirmwareHeader,
        chunks: S,
    ) -> Result<pb::FirmwareRelease, Error>
    where
        S: Stream<Item = Result<Vec<u8>, Error>> + Unpin,
    {
        let pb::FirmwareHeader { model, version, release_counter, length, sha256, user_id, password, notes } =
            header;
        target_name(&model, &version).map_err(|e| {
            Error::invalid("header.model/version", format!("{model}/{version}"), e.to_string())
        })?;
        if length == 0 || length > MAX_IMAGE_BYTES {
            return Err(Error::invalid(
                "header.length",
                length.to_string(),
                format!("1 to {MAX_IMAGE_BYTES} bytes"),
            ));
        }
        let sha256 = sha256.to_ascii_lowercase();
        if !sha256.is_empty() && (sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit())) {
            return Err(Error::invalid("header.sha256", sha256, "64 hex digits, or empty"));
        }
        if notes.trim().is_empty() {
            return Err(Error::invalid(
                "header.notes",
                "",
                "why this release, in words (for the audit chain)",
            ));
        }
        if user_id != caller.person_id {
            return Err(Error::PermissionDenied(format!(
                "header.user_id {user_id:?} is not the caller ({}): a release is signed by the person who makes it",
                caller.person_id
            )));
        }
        // Both identification components before any byte is stored.
        self.people.verify_password(&user_id, &password, "firmware release").await?;
        let uploads = self.dir.join("uploads");
        tokio::fs::create_dir_all(&uploads).await.map_err(|e| io_err(&uploads, e))?;
        let part = uploads.join(format!("{}.part", hex::encode(rand::random::<[u8; 8]>())));
        let received = receive(&part, chunks, length).await;
        let result = match received {
            Ok(hash) if !sha256.is_empty() && hash != sha256 => Err(Error::invalid(
                "header.sha256",
                sha256.clone(),
                format!("the SHA-256 of the bytes received, {hash}"),
            )),
            Ok(_) => self.release(caller, &part, &model, &version, release_counter, &password, &notes).await,
            Err(e) => Err(e),
        };
        let _ = tokio::fs::remove_file(&part).await;
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn release(
        &self,
        caller: &Caller,
        image: &Path,
        model: &str,
        version: &str,
        release_counter: u64,
        password: &str,
        notes: &str,
    ) -> Result<pb::FirmwareRelease, Error> {
        let firmware_key =
            self.recipes.signing_key(caller, nanofleet_firmware::FIRMWARE_ROLE, password).await?;
        let online = self.recipes.online_key().await?;
        let root_key = trust_root::signing_key(&self.pki_dir)
            .map_err(|e| Error::Unavailable(format!("trust root key: {e}")))?;
        let trust = self.recipes.trust_root().await;
        let _guard = self.lock.lock().await;
        let now = jiff::Timestamp::now();
        let keys = RootKeys::of(&trust, &online.verifying_key());
        let root_version =
            self.repo.ensure_root(&keys, &[&root_key], &online, now).await.map_err(unavailable)?;
        let rel = NewRelease {
            model: model.into(),
            version: version.into(),
            release_counter,
            released_by: caller.actor().0,
        };
        let release = match self.repo.release(image, rel, &firmware_key, &online, now).await {
            Ok(r) => r,
            Err(nanofleet_firmware::Error::Invalid(msg)) => return Err(Error::Conflict(msg)),
            Err(e) => return Err(unavailable(e)),
        };
        self.store
            .audit_only(&AuditEntry {
                at_ms: now_ms(),
                actor: caller.actor().0,
                action: "firmware.release".into(),
                subject: release.target.clone(),
                site_id: None,
                reason: notes.into(),
                old_value: None,
                new_value: Some(
                    serde_json::json!({
                        "model": release.model,
                        "version": release.version,
                        "release_counter": release.release_counter,
                        "sha256": release.sha256,
                        "length": release.length,
                        "tuf_root_version": root_version,
                    })
                    .to_string(),
                ),
            })
            .await?;
        tracing::info!(target = %release.target, counter = release.release_counter, by = %caller.person_id, "firmware released");
        Ok(release_pb(&release))
    }

    /// Re-signs snapshot and timestamp with the online key, so devices never see
    /// them expire (they live one day); run every few hours.
    pub async fn refresh(&self) -> Result<(), Error> {
        if !self.repo.exists() {
            return Ok(());
        }
        let online = self.recipes.online_key().await?;
        let _guard = self.lock.lock().await;
        self.repo.refresh(&online, jiff::Timestamp::now()).await.map_err(unavailable)
    }
}

/// Writes the chunks to `path`, hashing them; refuses more or fewer bytes than
/// `length`. Returns the hex SHA-256.
async fn receive<S>(path: &Path, mut chunks: S, length: u64) -> Result<String, Error>
where
    S: Stream<Item = Result<Vec<u8>, Error>> + Unpin,
{
    let mut file = tokio::fs::File::create(path).await.map_err(|e| io_err(path, e))?;
    let mut hasher = sha2::Sha256::new();
    let mut got = 0u64;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        got += chunk.len() as u64;
        if got > length {
            return Err(Error::invalid(
                "header.length",
                length.to_string(),
                format!("at least {got}: more bytes arrived"),
            ));
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(|e| io_err(path, e))?;
    }
    if got != length {
        return Err(Error::invalid(
            "header.length",
            length.to_string(),
            format!("{got}, the bytes that arrived before the upload ended"),
        ));
    }
    file.sync_all().await.map_err(|e| io_err(path, e))?;
    Ok(hex::encode(hasher.finalize()))
}

fn release_pb(r: &Release) -> pb::FirmwareRelease {
    pb::FirmwareRelease {
        target: r.target.clone(),
        model: r.model.clone(),
        version: r.version.clone(),
        release_counter: r.release_counter,
        sha256: r.sha256.clone(),
        length: r.length,
        released_unix_ms: r.released_at.as_millisecond(),
        released_by: r.released_by.clone(),
    }
}

fn io_err(path: &Path, e: std::io::Error) -> Error {
    Error::Unavailable(format!("{}: {e}", path.display()))
}

fn unavailable(e: nanofleet_firmware::Error) -> Error {
    Error::Unavailable(e.to_string())
}
