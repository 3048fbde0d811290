//! The device's recipe book: the trust root it pins and the recipes it accepted.
//!
//! Commands from the cloud arrive on `nf/v1/{device}/cmd/...`:
//! - `trust-root`: newer trust root documents, taken one version at a time, each
//!   signed by a threshold of the old and of the new root keys;
//! - `recipe`: a released recipe as signed statements, verified against the pinned
//!   root (roles, thresholds, two different people), its validity window, the
//!   version held (no rollback), its targets, this model's hardware envelope and
//!   firmware (see `nanofleet_recipe::verify`).
//!
//! - `deny-list`: the lots and cartridges to refuse, signed by a key of the root's
//!   `deny-list` role; a list older than the one held is refused, and the newest is
//!   kept, so the device refuses a recalled lot offline too.
//!
//! Every command is answered with an [`Ack`]: accepted, or refused with a code and a
//! reason. A refusal never touches what the device already holds. With a state
//! directory, accepted roots and recipes survive a restart.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use nanofleet_inventory::denylist::{self, DenyIndex};
use nanofleet_pki::trust_root::TrustRoot;
use nanofleet_proto::Message as _;
use nanofleet_proto::device::v1::{
    Ack, AckResult, AckSubject, Recipe, RecipeDelivery, RecipeStatement, TrustRootUpdate,
};
use nanofleet_proto::topics::Command;
use nanofleet_recipe::verify::{self, DeviceContext, Held};

use crate::hal::DeviceInfo;

/// A recipe the device accepted.
#[derive(Debug, Clone)]
pub struct HeldRecipe {
    pub recipe: Recipe,
    pub digest: String,
    /// The delivery as received (kept to show the signatures in batch records).
    pub delivery: Vec<u8>,
}

#[derive(Debug)]
pub struct RecipeBook {
    root: TrustRoot,
    recipes: HashMap<String, HeldRecipe>,
    /// The newest deny list accepted.
    deny: DenyIndex,
    /// Where accepted roots and recipes are kept; `None` keeps them in memory.
    dir: Option<PathBuf>,
}

/// A state file of the device (recipe book, run desk) that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {reason}")]
    Bad { path: PathBuf, reason: String },
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_owned(), source }
}

/// Writes through a temporary file, so a crash leaves the old or the new content.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// The recipe inside a delivery the device stored itself.
fn recipe_of(delivery: &[u8]) -> Option<(Recipe, String)> {
    let d = RecipeDelivery::decode(delivery).ok()?;
    let st = RecipeStatement::decode(d.statements.first()?.payload.as_slice()).ok()?;
    let recipe = Recipe::decode(st.recipe.as_slice()).ok()?;
    Some((recipe, nanofleet_recipe::sign::digest_hex(&st.recipe)))
}

impl RecipeBook {
    /// The book of an enrolled device: kept in `STATE_DIR/recipes` when there is a
    /// state directory, else in memory. `None` when the credentials hold no trust
    /// root (written before there was one): such a device takes no recipes.
    pub fn for_device(
        creds: &crate::enroll::Credentials,
        state_dir: Option<&Path>,
    ) -> Result<Option<RecipeBook>, Error> {
        if creds.trust_root_json.is_empty() {
            return Ok(None);
        }
        let root = TrustRoot::from_json(&creds.trust_root_json)
            .map_err(|e| Error::Bad { path: PathBuf::from("trust-root.json"), reason: e.to_string() })?;
        match state_dir {
            Some(dir) => RecipeBook::open(&dir.join("recipes"), root).map(Some),
            None => Ok(Some(RecipeBook::new(root))),
        }
    }

    /// A book over the root pinned at enrollment, in memory only.
    pub fn new(root: TrustRoot) -> RecipeBook {
        RecipeBook { root, recipes: HashMap::new(), deny: DenyIndex::default(), dir: None }
    }

    /// Opens the book kept in `dir` (created if missing): the newest root accepted
    /// there (else `enrolled`) and the recipes accepted before.
    pub fn open(dir: &Path, enrolled: TrustRoot) -> Result<RecipeBook, Error> {
        std::fs::create_dir_all(dir.join("accepted")).map_err(io(dir))?;
        let root_path = dir.join("trust-root.json");
        let root = match std::fs::read_to_string(&root_path) {
            Ok(text) => {
                let held = TrustRoot::from_json(&text)
                    .map_err(|e| Error::Bad { path: root_path.clone(), reason: e.to_string() })?;
                if held.signed.version >= enrolled.signed.version { held } else { enrolled }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => enrolled,
            Err(e) => return Err(io(&root_path)(e)),
        };
        let mut recipes = HashMap::new();
        let recipes_dir = dir.join("accepted");
        for entry in std::fs::read_dir(&recipes_dir).map_err(io(&recipes_dir))? {
            let path = entry.map_err(io(&recipes_dir))?.path();
            if path.extension().is_none_or(|e| e != "delivery") {
                continue;
            }
            let delivery = std::fs::read(&path).map_err(io(&path))?;
            let Some((recipe, digest)) = recipe_of(&delivery) else {
                return Err(Error::Bad { path, reason: "not a recipe delivery".into() });
            };
            recipes.insert(recipe.recipe_id.clone(), HeldRecipe { recipe, digest, delivery });
        }
        let deny_path = dir.join(DENY_LIST_FILE);
        let deny = match std::fs::read(&deny_path) {
            // Checked again: a list edited on disk is not believed, and the device does
            // not start rather than run without it.
            Ok(bytes) => denylist::verify(&bytes, &root, 0)
                .map(|l| DenyIndex::new(&l))
                .map_err(|e| Error::Bad { path: deny_path.clone(), reason: e.reason })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => DenyIndex::default(),
            Err(e) => return Err(io(&deny_path)(e)),
        };
        Ok(RecipeBook { root, recipes, deny, dir: Some(dir.to_owned()) })
    }

    pub fn trust_root(&self) -> &TrustRoot {
        &self.root
    }

    /// The deny list held (empty before the first).
    pub fn deny_list(&self) -> &DenyIndex {
        &self.deny
    }

    /// The trust root and deny list versions held, as the birth reports them.
    pub fn held_versions(&self) -> (u64, u64) {
        (self.root.signed.version, self.deny.version)
    }

    pub fn recipe(&self, recipe_id: &str) -> Option<&HeldRecipe> {
        self.recipes.get(recipe_id)
    }

    pub fn recipes(&self) -> impl Iterator<Item = &HeldRecipe> {
        self.recipes.values()
    }

    /// Handles one command; returns the answer to publish.
    pub fn handle(&mut self, command: Command, payload: &[u8], device: &DeviceInfo, now_ms: i64) -> Ack {
        let mut ack = Ack { device_id: device.device_id.clone(), time_unix_ms: now_ms, ..Ack::default() };
        match command {
            Command::TrustRoot => {
                ack.subject = AckSubject::TrustRoot as i32;
                let documents = match TrustRootUpdate::decode(payload) {
                    Ok(u) => u.documents,
                    Err(e) => {
                        return refuse(ack, verify::code::MALFORMED, &format!("trust root update: {e}"));
                    }
                };
                match verify::apply_root_updates(&self.root, &documents) {
                    Ok(next) => {
                        if next.signed.version > self.root.signed.version
                            && let Some(dir) = &self.dir
                            && let Err(e) =
                                write_atomic(&dir.join("trust-root.json"), next.to_json().as_bytes())
                        {
                            return refuse(ack, "storage", &e.to_string());
                        }
                        ack.version = next.signed.version;
                        ack.result = AckResult::Accepted as i32;
                        self.root = next;
                        ack
                    }
                    Err(r) => {
                        ack.version = self.root.signed.version;
                        refuse(ack, r.code, &r.reason)
                    }
                }
            }
            Command::Run => {
                ack.subject = AckSubject::Run as i32;
                refuse(ack, "unsupported", "this device has no run desk and takes no run requests")
            }
            Command::Update => refuse(ack, "unsupported", "this device takes no firmware updates"),
            Command::DenyList => {
                ack.subject = AckSubject::DenyList as i32;
                match denylist::verify(payload, &self.root, self.deny.version) {
                    Ok(list) => {
                        ack.version = list.version;
                        if list.version > self.deny.version || self.deny.version == 0 {
                            if let Some(dir) = &self.dir
                                && let Err(e) = write_atomic(&dir.join(DENY_LIST_FILE), payload)
                            {
                                return refuse(ack, "storage", &e.to_string());
                            }
                            self.deny = DenyIndex::new(&list);
                        }
                        ack.result = AckResult::Accepted as i32;
                        ack
                    }
                    Err(r) => {
                        ack.version = self.deny.version;
                        refuse(ack, r.code, &r.reason)
                    }
                }
            }
            Command::Recipe => {
                ack.subject = AckSubject::Recipe as i32;
                let ctx = DeviceContext {
                    device_id: &device.device_id,
                    site_id: &device.site_id,
                    model: &device.model,
                    firmware_version: &device.firmware_version,
                    now_unix_ms: now_ms,
                    root: &self.root,
                };
                let held = |id: &str| {
                    self.recipes.get(id).map(|h| Held { version: h.recipe.version, digest: h.digest.clone() })
                };
                match verify::verify_delivery(payload, &ctx, held) {
                    Ok(v) => {
                        ack.subject_id.clone_from(&v.recipe.recipe_id);
                        ack.version = u64::from(v.recipe.version);
                        ack.digest.clone_from(&v.digest);
                        if !v.already_held {
                            if let Some(dir) = &self.dir {
                                let path =
                                    dir.join("accepted").join(format!("{}.delivery", v.recipe.recipe_id));
                                if let Err(e) = write_atomic(&path, payload) {
                                    return refuse(ack, "storage", &e.to_string());
                                }
                            }
                            let held =
                                HeldRecipe { recipe: v.recipe, digest: v.digest, delivery: payload.to_vec() };
                            self.recipes.insert(held.recipe.recipe_id.clone(), held);
                        }
                        ack.result = AckResult::Accepted as i32;
                        ack
                    }
                    Err(r) => {
                        ack.subject_id = r.recipe_id.clone();
                        ack.version = u64::from(r.version);
                        ack.digest = r.digest.clone();
                        refuse(ack, r.code, &r.reason)
                    }
                }
            }
        }
    }
}

/// The deny list held, as received (its signature is checked again at start).
const DENY_LIST_FILE: &str = "deny-list.dsse";

fn refuse(mut ack: Ack, code: &str, reason: &str) -> Ack {
    ack.result = AckResult::Refused as i32;
    ack.code = code.into();
    ack.reason = reason.into();
    ack
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;
    use nanofleet_pki::trust_root::TrustRoot;
    use nanofleet_proto::device::v1::{DeniedLot, DenyList};

    use super::*;

    fn root_with(qa: &SigningKey) -> TrustRoot {
        let root_key = SigningKey::from_bytes(&[9; 32]);
        let mut body = TrustRoot::initial(&root_key, "2046-01-01T00:00:00Z").successor_body();
        body.add_role_key(denylist::ROLE, &qa.verifying_key(), Some("qa"));
        TrustRoot::signed_by(body, &[&root_key])
    }

    fn list(version: u64, lot: &str) -> DenyList {
        DenyList {
            version,
            issued_unix_ms: 1,
            lots: vec![DeniedLot {
                gtin: "10614141000019".into(),
                lot: lot.into(),
                reason: "recall".into(),
                since_unix_ms: 1,
            }],
            cartridges: vec![],
        }
    }

    fn device() -> DeviceInfo {
        DeviceInfo {
            device_id: "NF-1".into(),
            site_id: "site-a".into(),
            model: "NF-200".into(),
            firmware_version: "2.3.1".into(),
        }
    }

    #[test]
    fn a_deny_list_is_kept_across_restarts_and_never_replaced_by_a_forged_or_older_one() {
        let qa = SigningKey::from_bytes(&[1; 32]);
        let dir = tempfile::tempdir().unwrap();
        let mut book = RecipeBook::open(dir.path(), root_with(&qa)).unwrap();
        let answer =
            |book: &mut RecipeBook, payload: Vec<u8>| book.handle(Command::DenyList, &payload, &device(), 5);

        let ack = answer(&mut book, denylist::sign(&list(2, "L1"), &qa).encode_to_vec());
        assert_eq!(
            (ack.result, ack.subject, ack.version),
            (AckResult::Accepted as i32, AckSubject::DenyList as i32, 2)
        );

        // Signed by a key outside the deny-list role, or altered: refused, nothing changes.
        let stranger = SigningKey::from_bytes(&[2; 32]);
        let ack = answer(&mut book, denylist::sign(&list(3, "L9"), &stranger).encode_to_vec());
        assert_eq!(
            (ack.result, ack.code.as_str()),
            (AckResult::Refused as i32, denylist::code::KEY_NOT_IN_ROLE)
        );
        let mut forged = denylist::sign(&list(3, "L9"), &qa);
        forged.payload = list(3, "L8").encode_to_vec();
        let ack = answer(&mut book, forged.encode_to_vec());
        assert_eq!(ack.code, denylist::code::BAD_SIGNATURE);
        // An older list cannot bring a lot back.
        let ack =
            answer(&mut book, denylist::sign(&DenyList { lots: vec![], ..list(1, "") }, &qa).encode_to_vec());
        assert_eq!((ack.code.as_str(), ack.version), (denylist::code::ROLLBACK, 2));
        assert!(book.deny_list().check("10614141000019", "L1", "S1").is_some());
        assert!(book.deny_list().check("10614141000019", "L9", "S1").is_none());

        // After a restart the device holds the same list.
        let again = RecipeBook::open(dir.path(), root_with(&qa)).unwrap();
        assert_eq!(again.held_versions().1, 2);
        assert!(again.deny_list().check("10614141000019", "L1", "S1").is_some());

        // A list edited on disk is not believed: the device does not start on it.
        let path = dir.path().join(DENY_LIST_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert!(matches!(RecipeBook::open(dir.path(), root_with(&qa)), Err(Error::Bad { .. })));
    }
}
