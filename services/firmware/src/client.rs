//! The device's side: trust the image repository only as far as the pinned fleet
//! trust root vouches for it, and check a release before anything is downloaded.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::path::Path;

use ed25519_dalek::VerifyingKey;
use nanofleet_pki::trust_root::TrustRoot;
use tough::schema::{RoleKeys, RoleType, Root, Signed};
use tough::{Repository, RepositoryLoader, TargetName, Transport};
use url::Url;

use crate::keys::{role_publics, sorted_publics, tuf_key};
use crate::{FIRMWARE_ROLE, custom};

/// Why the device refuses metadata or a release; `code` is stable, `detail` names the
/// values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {detail}")]
pub struct Refusal {
    pub code: &'static str,
    pub detail: String,
}

/// Stable codes of [`Refusal`].
pub mod code {
    /// The TUF root's root role is not the pinned trust root's.
    pub const ROOT_NOT_ANCHORED: &str = "root_not_anchored";
    /// Expired metadata (a freeze attack, or a server that stopped refreshing).
    pub const EXPIRED: &str = "metadata_expired";
    /// Older metadata than the device has seen (a rollback attack).
    pub const ROLLBACK: &str = "metadata_rollback";
    /// Missing, bad or too few signatures; metadata that disagree with each other.
    pub const METADATA: &str = "metadata_refused";
    /// `targets` is not signed by a threshold of the pinned trust root's firmware keys.
    pub const NOT_FIRMWARE_KEY: &str = "targets_key_not_in_firmware_role";
    pub const NOT_RELEASED: &str = "not_released";
    pub const WRONG_MODEL: &str = "wrong_model";
    pub const RELEASE_COUNTER_TOO_LOW: &str = "release_counter_too_low";
    pub const BAD_TARGET: &str = "bad_target_metadata";
}

fn refuse(code: &'static str, detail: impl Into<String>) -> Refusal {
    Refusal { code, detail: detail.into() }
}

/// An image the device may take: the signed facts of one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub target: String,
    pub model: String,
    pub version: String,
    pub release_counter: u64,
    /// Lowercase hex.
    pub sha256: String,
    pub length: u64,
}

/// The public keys the pinned trust root lists under `role`, and its threshold.
pub fn role_keys(trust_root: &TrustRoot, role: &str) -> (Vec<VerifyingKey>, u64) {
    let body = &trust_root.signed;
    let keys = body
        .roles
        .get(role)
        .map(|r| r.keyids.iter().filter_map(|id| body.keys.get(id)?.verifying_key()).collect())
        .unwrap_or_default();
    (keys, u64::from(body.threshold(role)))
}

/// Accepts `tuf_root` as the start of the chain only if its root role lists exactly
/// the pinned trust root's root keys with a threshold no lower. tough then checks it
/// is signed by them, and follows later roots from there.
pub fn anchor(tuf_root: &[u8], trust_root: &TrustRoot) -> Result<(), Refusal> {
    let root: Signed<Root> = serde_json::from_slice(tuf_root)
        .map_err(|e| refuse(code::ROOT_NOT_ANCHORED, format!("TUF root is not readable: {e}")))?;
    if !root.signed.roles.contains_key(&RoleType::Root) {
        return Err(refuse(code::ROOT_NOT_ANCHORED, "TUF root has no root role"));
    }
    let (listed, listed_threshold) = role_publics(&root.signed, RoleType::Root);
    let (pinned, threshold) = role_keys(trust_root, "root");
    let pinned = sorted_publics(&pinned);
    if listed != pinned || listed_threshold < threshold {
        return Err(refuse(
            code::ROOT_NOT_ANCHORED,
            format!(
                "TUF root role lists {} key(s) with threshold {}; the pinned trust root v{} has {} root key(s) with threshold {threshold}",
                listed.len(),
                listed_threshold,
                trust_root.signed.version,
                pinned.len()
            ),
        ));
    }
    root.signed
        .verify_role(&root)
        .map_err(|e| refuse(code::ROOT_NOT_ANCHORED, format!("TUF root is not signed by its root keys: {e}")))
}

/// Loads the repository's metadata: the chain of roots from `tuf_root` (anchored in
/// the pinned trust root), then timestamp, snapshot and targets, each checked for
/// signatures, versions and expiry. `datastore` keeps what was last trusted, so
/// older metadata are refused next time (rollback).
pub async fn load(
    tuf_root: &[u8],
    trust_root: &TrustRoot,
    metadata_url: Url,
    targets_url: Url,
    datastore: &Path,
    transport: impl Transport + 'static,
) -> Result<Repository, Refusal> {
    anchor(tuf_root, trust_root)?;
    RepositoryLoader::new(&tuf_root, metadata_url, targets_url)
        .transport(transport)
        .datastore(datastore)
        .load()
        .await
        .map_err(classify)
}

fn classify(e: tough::error::Error) -> Refusal {
    use tough::error::Error as E;
    let detail = error_chain(&e);
    match e {
        E::ExpiredMetadata { .. } => refuse(code::EXPIRED, detail),
        E::OlderMetadata { .. } => refuse(code::ROLLBACK, detail),
        _ => refuse(code::METADATA, detail),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Checks release `target` for a device of `model` whose highest committed release
/// counter is `counter_floor`: `targets` carries a threshold of signatures by the
/// pinned trust root's firmware keys (a key removed from the trust root no longer
/// counts, whatever the TUF root says), the target exists, is for this model and is
/// not older than what the device committed.
pub fn check(
    repo: &Repository,
    trust_root: &TrustRoot,
    target: &str,
    model: &str,
    counter_floor: u64,
) -> Result<Checked, Refusal> {
    let (firmware, threshold) = role_keys(trust_root, FIRMWARE_ROLE);
    let threshold = NonZeroU64::new(threshold).ok_or_else(|| {
        refuse(
            code::NOT_FIRMWARE_KEY,
            format!("the pinned trust root v{} names no firmware key", trust_root.signed.version),
        )
    })?;
    let mut pinned = Root {
        spec_version: "1.0.0".into(),
        consistent_snapshot: true,
        version: NonZeroU64::MIN,
        expires: repo.root().signed.expires,
        keys: HashMap::new(),
        roles: HashMap::new(),
        _extra: HashMap::new(),
    };
    let mut keyids = Vec::new();
    for k in &firmware {
        let key = tuf_key(k);
        if let Ok(id) = key.key_id() {
            pinned.keys.insert(id.clone(), key);
            keyids.push(id);
        }
    }
    pinned.roles.insert(RoleType::Targets, RoleKeys { keyids, threshold, _extra: HashMap::new() });
    pinned.verify_role(repo.targets()).map_err(|e| {
        refuse(
            code::NOT_FIRMWARE_KEY,
            format!(
                "targets v{} is not signed by {threshold} firmware key(s) of the pinned trust root v{}: {e}",
                repo.targets().signed.version,
                trust_root.signed.version
            ),
        )
    })?;
    let name =
        TargetName::new(target).map_err(|e| refuse(code::NOT_RELEASED, format!("target {target:?}: {e}")))?;
    let t = repo.targets().signed.targets.get(&name).ok_or_else(|| {
        refuse(
            code::NOT_RELEASED,
            format!("target {target:?} is not in targets v{}", repo.targets().signed.version),
        )
    })?;
    let text = |key: &str| t.custom.get(key).and_then(|v| v.as_str()).map(str::to_owned);
    let (Some(t_model), Some(version), Some(counter)) = (
        text(custom::HARDWARE_MODEL),
        text(custom::VERSION),
        t.custom.get(custom::RELEASE_COUNTER).and_then(serde_json::Value::as_u64),
    ) else {
        return Err(refuse(
            code::BAD_TARGET,
            format!(
                "target {target:?} lacks {}, {} or {}",
                custom::HARDWARE_MODEL,
                custom::VERSION,
                custom::RELEASE_COUNTER
            ),
        ));
    };
    if t_model != model {
        return Err(refuse(
            code::WRONG_MODEL,
            format!("target {target:?} is for model {t_model:?}, this device is {model:?}"),
        ));
    }
    if counter < counter_floor {
        return Err(refuse(
            code::RELEASE_COUNTER_TOO_LOW,
            format!(
                "target {target:?} has release counter {counter}, below {counter_floor} (the highest this device committed)"
            ),
        ));
    }
    Ok(Checked {
        target: target.into(),
        model: t_model,
        version,
        release_counter: counter,
        sha256: hex::encode(t.hashes.sha256.as_ref()),
        length: t.length,
    })
}
