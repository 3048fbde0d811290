//! Recipes from draft to release: validation, electronic signatures (21 CFR Part 11)
//! and the signing keys behind them. Transport-free, like [`crate::Fleet`].
//!
//! A pharmacist saves a draft and signs it as its author; a QA reviewer, another
//! person, approves it, which releases it. Each signature is a DSSE envelope over a
//! statement holding the exact recipe bytes and the signer's printed name, time and
//! meaning, signed with the signer's own ed25519 key. That key is created at the
//! person's first signature, sealed under their password, and added to the trust
//! root (a new version, which devices take along the chain) in the role the meaning
//! needs: `recipe-author` or `recipe-approver`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use ed25519_dalek::SigningKey;
use nanofleet_pki::trust_root::{self, TrustRoot, key_id};
use nanofleet_proto::Message as _;
use nanofleet_proto::device::v1::{Recipe, SignatureMeaning};
use nanofleet_proto::v1 as pb;
use nanofleet_store::{AuditEntry, RecipeRecord, RecipeSignatureRecord, SignCommit, SigningKeyRecord, Store};
use tokio::sync::{Mutex, broadcast};

use crate::trust::conflict_or;
use crate::{Caller, Error, People, Role, now_ms};

/// A version was released; the distributor sends it to its devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    pub recipe_id: String,
    pub version: i64,
    /// The active devices it targets, as of the release.
    pub devices: Arc<Vec<String>>,
}

/// Recipes and their signatures; cheap to clone.
#[derive(Clone)]
pub struct Recipes {
    store: Store,
    people: People,
    pki_dir: PathBuf,
    /// The current trust root; held while a new version is made.
    root: Arc<Mutex<TrustRoot>>,
    released: broadcast::Sender<Released>,
}

impl std::fmt::Debug for Recipes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recipes").field("pki_dir", &self.pki_dir).finish_non_exhaustive()
    }
}

const DRAFT: &str = "draft";
const AUTHORED: &str = "authored";
const RELEASED: &str = "released";
const REJECTED: &str = "rejected";

fn status_pb(s: &str) -> pb::RecipeStatus {
    match s {
        DRAFT => pb::RecipeStatus::Draft,
        AUTHORED => pb::RecipeStatus::Authored,
        RELEASED => pb::RecipeStatus::Released,
        REJECTED => pb::RecipeStatus::Rejected,
        _ => pb::RecipeStatus::Unspecified,
    }
}

fn status_str(s: pb::RecipeStatus) -> &'static str {
    match s {
        pb::RecipeStatus::Draft => DRAFT,
        pb::RecipeStatus::Authored => AUTHORED,
        pb::RecipeStatus::Released => RELEASED,
        pb::RecipeStatus::Rejected => REJECTED,
        pb::RecipeStatus::Unspecified => "",
    }
}

fn meaning_str(m: SignatureMeaning) -> &'static str {
    match m {
        SignatureMeaning::Authored => "authored",
        SignatureMeaning::Approved => "approved",
        SignatureMeaning::Released | SignatureMeaning::Rejected | SignatureMeaning::Unspecified => "",
    }
}

fn meaning_pb(s: &str) -> SignatureMeaning {
    match s {
        "authored" => SignatureMeaning::Authored,
        "approved" => SignatureMeaning::Approved,
        _ => SignatureMeaning::Unspecified,
    }
}

/// `recipe_id v3`, the audit subject of a version.
fn subject(recipe_id: &str, version: i64) -> String {
    format!("{recipe_id} v{version}")
}

fn audit(
    caller: &Caller,
    action: &str,
    subject: String,
    reason: String,
    new_value: serde_json::Value,
) -> AuditEntry {
    AuditEntry {
        at_ms: now_ms(),
        actor: caller.actor().0,
        action: action.into(),
        subject,
        site_id: None,
        reason,
        old_value: None,
        new_value: Some(new_value.to_string()),
    }
}

impl Recipes {
    /// Opens the recipe book over the trust root in `pki_dir`. The database keeps
    /// every trust root version; the file beside the root key mirrors the newest and
    /// is brought up to date here if a crash left it behind.
    pub async fn open(store: Store, people: People, pki_dir: PathBuf) -> Result<Recipes, Error> {
        let pki_err = |e: nanofleet_pki::Error| Error::Unavailable(format!("trust root: {e}"));
        let mut root = trust_root::load_or_create(&pki_dir).map_err(pki_err)?;
        let version = root.signed.version as i64;
        store.ensure_trust_root(version, &root.to_json(), now_ms()).await?;
        for doc in store.trust_roots_after(version).await? {
            let next = TrustRoot::from_json(&doc).map_err(pki_err)?;
            trust_root::save_successor(&pki_dir, &root, &next).map_err(pki_err)?;
            tracing::info!(version = next.signed.version, "trust root file brought up to date");
            root = next;
        }
        let (released, _) = broadcast::channel(1024);
        Ok(Recipes { store, people, pki_dir, root: Arc::new(Mutex::new(root)), released })
    }

    /// Releases as they happen.
    pub fn subscribe(&self) -> broadcast::Receiver<Released> {
        self.released.subscribe()
    }

    /// The current trust root.
    pub async fn trust_root(&self) -> TrustRoot {
        self.root.lock().await.clone()
    }

    /// Saves a draft after checking every field against the physical ranges and
    /// the hardware envelope of each device model it names.
    pub async fn save_draft(&self, caller: &Caller, mut recipe: Recipe) -> Result<pb::RecipeVersion, Error> {
        let latest = self.store.latest_recipe_version(&recipe.recipe_id).await?;
        let latest_status = match latest {
            0 => None,
            v => self.store.get_recipe(&recipe.recipe_id, v).await?.map(|r| r.status),
        };
        // Version 0: the open draft, or the next number.
        if recipe.version == 0 {
            recipe.version = match latest_status.as_deref() {
                Some(DRAFT) => latest as u32,
                _ => latest as u32 + 1,
            };
        } else if i64::from(recipe.version) < latest {
            let v = i64::from(recipe.version);
            let existing = self.store.get_recipe(&recipe.recipe_id, v).await?;
            if existing.is_none_or(|r| r.status != DRAFT) {
                return Err(Error::invalid(
                    "recipe.version",
                    recipe.version.to_string(),
                    format!("{} or higher (version {latest} exists; a change is a new version)", latest + 1),
                ));
            }
        } else if i64::from(recipe.version) > latest + 1 {
            return Err(Error::invalid(
                "recipe.version",
                recipe.version.to_string(),
                format!("at most {} (versions are consecutive)", latest + 1),
            ));
        }
        check_recipe(&recipe)?;
        self.check_targets(caller, &recipe).await?;
        let body = recipe.encode_to_vec();
        let digest = nanofleet_recipe::sign::digest_hex(&body);
        let rec = RecipeRecord {
            recipe_id: recipe.recipe_id.clone(),
            version: i64::from(recipe.version),
            name: recipe.name.clone(),
            status: DRAFT.into(),
            body,
            digest: digest.clone(),
            created_by: caller.person_id.clone(),
            created_ms: now_ms(),
            released_ms: 0,
            rejected_by: String::new(),
            rejected_reason: String::new(),
        };
        let entry = audit(
            caller,
            "recipe.draft",
            subject(&rec.recipe_id, rec.version),
            "draft saved".into(),
            serde_json::json!({"name": rec.name, "digest": digest, "recipe": nanofleet_recipe::json::recipe_to_json(&recipe)}),
        );
        self.store.save_recipe_draft(&rec, &entry).await.map_err(conflict_or)?;
        self.version(&rec.recipe_id, rec.version).await
    }

    /// A site-scoped author may only target their own site and its devices; every
    /// target must exist.
    async fn check_targets(&self, caller: &Caller, recipe: &Recipe) -> Result<(), Error> {
        let targets = recipe.targets.clone().unwrap_or_default();
        let sites: BTreeSet<String> = self.store.list_sites().await?.into_iter().map(|s| s.id).collect();
        for s in &targets.site_ids {
            if !sites.contains(s) {
                return Err(Error::invalid("recipe.targets.site_ids", s.clone(), "an existing site id"));
            }
            caller.check_site(s)?;
        }
        for d in &targets.device_ids {
            let device = self.store.get_device(d).await?.ok_or_else(|| {
                Error::invalid("recipe.targets.device_ids", d.clone(), "an enrolled device id")
            })?;
            caller.check_device_site(d, &device.site_id).map_err(|_| {
                Error::invalid("recipe.targets.device_ids", d.clone(), "an enrolled device id")
            })?;
        }
        Ok(())
    }

    /// Signs a version with the caller's key after checking their password again.
    pub async fn sign(
        &self,
        caller: &Caller,
        req: &pb::SignRecipeRequest,
    ) -> Result<pb::RecipeVersion, Error> {
        let meaning = SignatureMeaning::try_from(req.meaning).unwrap_or(SignatureMeaning::Unspecified);
        let (role_needed, from_status, to_status) = match meaning {
            SignatureMeaning::Authored => (Role::Pharmacist, DRAFT, AUTHORED),
            SignatureMeaning::Approved => (Role::Qa, AUTHORED, RELEASED),
            SignatureMeaning::Unspecified | SignatureMeaning::Released | SignatureMeaning::Rejected => {
                return Err(Error::invalid("meaning", req.meaning.to_string(), "AUTHORED or APPROVED"));
            }
        };
        if req.user_id != caller.person_id {
            return Err(Error::PermissionDenied(format!(
                "a signature is made by the signed-in person: user id {:?} is not {:?}",
                req.user_id, caller.person_id
            )));
        }
        if caller.role != role_needed {
            return Err(Error::PermissionDenied(format!(
                "a {} signature needs the {} role; {} is {}",
                meaning_str(meaning),
                role_needed.as_str(),
                caller.person_id,
                caller.role.as_str()
            )));
        }
        let version = i64::from(req.version);
        let rec = self.record(&req.recipe_id, version).await?;
        if rec.status != from_status {
            return Err(Error::Conflict(format!(
                "recipe {} version {} is {}; a {} signature needs it {from_status}",
                rec.recipe_id,
                rec.version,
                rec.status,
                meaning_str(meaning)
            )));
        }
        let signatures = self.store.recipe_signatures(&rec.recipe_id, version).await?;
        match meaning {
            SignatureMeaning::Authored if rec.created_by != caller.person_id => {
                return Err(Error::PermissionDenied(format!(
                    "only the author of the draft, {}, can sign it as authored",
                    rec.created_by
                )));
            }
            SignatureMeaning::Approved if signatures.iter().any(|s| s.signer_id == caller.person_id) => {
                return Err(Error::PermissionDenied(
                    "the author cannot approve their own recipe: a second person must".into(),
                ));
            }
            _ => {}
        }
        // Both identification components, checked (and failures audited) now.
        self.people.verify_password(&req.user_id, &req.password, "recipe signature").await?;
        let role = if meaning == SignatureMeaning::Authored { "recipe-author" } else { "recipe-approver" };
        let key = self.signing_key(caller, role, &req.password).await?;
        let person = self.people.person(&caller.person_id).await?;
        let signed_ms = now_ms();
        let statement = nanofleet_recipe::sign::statement(
            &rec.body,
            &caller.person_id,
            &person.display_name,
            meaning,
            signed_ms,
        );
        let envelope = nanofleet_recipe::sign::sign_statement(&statement, &key);
        let mut entries = vec![audit(
            caller,
            "recipe.sign",
            subject(&rec.recipe_id, version),
            format!("signed as {}", meaning_str(meaning)),
            serde_json::json!({
                "meaning": meaning_str(meaning),
                "printed_name": person.display_name,
                "signed_unix_ms": signed_ms,
                "digest": rec.digest,
                "key_id": key_id(&key.verifying_key()),
            }),
        )];
        let (released_ms, targets) = if to_status == RELEASED {
            let recipe = Recipe::decode(rec.body.as_slice())
                .map_err(|e| Error::Unavailable(format!("stored recipe does not decode: {e}")))?;
            let devices = self.target_devices(&recipe).await?;
            entries.push(audit(
                caller,
                "recipe.release",
                subject(&rec.recipe_id, version),
                "approved: released to its targets".into(),
                serde_json::json!({"digest": rec.digest, "devices": devices.len()}),
            ));
            (signed_ms, devices)
        } else {
            (0, Vec::new())
        };
        let commit = SignCommit {
            signature: RecipeSignatureRecord {
                recipe_id: rec.recipe_id.clone(),
                version,
                meaning: meaning_str(meaning).into(),
                signer_id: caller.person_id.clone(),
                printed_name: person.display_name.clone(),
                key_id: key_id(&key.verifying_key()),
                signed_ms,
                envelope: envelope.encode_to_vec(),
            },
            from_status: from_status.into(),
            to_status: to_status.into(),
            released_ms,
            // Written by the distributor once it has sent the release, so that the
            // release is not held up by one row per device; a device whose row a crash
            // lost gets the version at its next connection.
            deliver_to: Vec::new(),
            audit: entries,
        };
        self.store.sign_recipe(&commit).await.map_err(conflict_or)?;
        if to_status == RELEASED {
            let _ = self.released.send(Released {
                recipe_id: rec.recipe_id.clone(),
                version,
                devices: Arc::new(targets),
            });
        }
        self.version(&rec.recipe_id, version).await
    }

    /// The active devices a recipe targets: its devices and every device of its sites.
    pub async fn target_devices(&self, recipe: &Recipe) -> Result<Vec<String>, Error> {
        let targets = recipe.targets.clone().unwrap_or_default();
        let mut out = BTreeSet::new();
        for site in &targets.site_ids {
            for d in self.store.list_devices(Some(site)).await? {
                if d.status == "active" {
                    out.insert(d.id);
                }
            }
        }
        for d in &targets.device_ids {
            if self.store.get_device(d).await?.is_some_and(|d| d.status == "active") {
                out.insert(d.clone());
            }
        }
        Ok(out.into_iter().collect())
    }

    /// The caller's key for `role`, unsealed with their password; created at the
    /// first signature and added to a new trust root version.
    pub(crate) async fn signing_key(
        &self,
        caller: &Caller,
        role: &str,
        password: &str,
    ) -> Result<SigningKey, Error> {
        // Held from the lookup to the new root version: two first signatures of one
        // person at once make one key, and root versions never race.
        let mut root = self.root.lock().await;
        if let Some(k) = self.store.signing_key(&caller.person_id, role).await? {
            return seal::open(&k.sealed_key, password).ok_or_else(|| {
                Error::Conflict(format!(
                    "the {role} key of {} cannot be opened with this password (was the password reset?)",
                    caller.person_id
                ))
            });
        }
        let key = SigningKey::from_bytes(&rand::random());
        let id = key_id(&key.verifying_key());
        let sealed = seal::seal(&key, password).map_err(Error::Unavailable)?;
        let mut body = root.successor_body();
        body.add_role_key(role, &key.verifying_key(), Some(&caller.person_id));
        let root_key = trust_root::signing_key(&self.pki_dir)
            .map_err(|e| Error::Unavailable(format!("trust root key: {e}")))?;
        let next = TrustRoot::signed_by(body, &[&root_key]);
        root.verify_successor(&next).map_err(|e| Error::Unavailable(format!("new trust root: {e}")))?;
        let now = now_ms();
        let record = SigningKeyRecord {
            key_id: id.clone(),
            person_id: caller.person_id.clone(),
            role: role.into(),
            public_key: hex::encode(key.verifying_key().as_bytes()),
            sealed_key: sealed,
            created_ms: now,
            revoked_ms: 0,
        };
        let entries = [
            audit(
                caller,
                "signing-key.create",
                caller.person_id.clone(),
                format!("first {role} signature"),
                serde_json::json!({"key_id": id, "role": role}),
            ),
            AuditEntry {
                at_ms: now,
                actor: "system".into(),
                action: "trust-root.update".into(),
                subject: format!("trust root v{}", next.signed.version),
                site_id: None,
                reason: format!("{role} key of {} added", caller.person_id),
                old_value: Some(serde_json::json!({"version": root.signed.version}).to_string()),
                new_value: Some(
                    serde_json::json!({"version": next.signed.version, "added_key": id}).to_string(),
                ),
            },
        ];
        let version = next.signed.version as i64;
        self.store.add_signing_key(&record, version, &next.to_json(), &entries).await?;
        trust_root::save_successor(&self.pki_dir, &root, &next)
            .map_err(|e| Error::Unavailable(format!("trust root file: {e}")))?;
        tracing::info!(person = %caller.person_id, role, version, "signing key created; trust root updated");
        *root = next;
        Ok(key)
    }

    /// The server's online key (trust-root role `director`): it signs the firmware
    /// repository's snapshot and timestamp, which must be re-signed without a person.
    /// Created at first use as `online.key` (0600) beside the root key and added to a
    /// new trust root version.
    pub(crate) async fn online_key(&self) -> Result<SigningKey, Error> {
        self.online_role_key(nanofleet_firmware::ONLINE_ROLE).await
    }

    /// The server's own key of trust-root `role`, created at first use (`online.key`
    /// for the director, `{role}.key` otherwise) and added to a new root version.
    pub(crate) async fn online_role_key(&self, role: &str) -> Result<SigningKey, Error> {
        let unavailable = |e: nanofleet_pki::Error| Error::Unavailable(format!("online key: {e}"));
        let mut root = self.root.lock().await;
        let file = if role == nanofleet_firmware::ONLINE_ROLE {
            "online.key".to_owned()
        } else {
            format!("{role}.key")
        };
        let path = self.pki_dir.join(file);
        let key = if path.exists() {
            nanofleet_pki::check_private(&path).map_err(unavailable)?;
            let text = std::fs::read_to_string(&path)
                .map_err(|e| Error::Unavailable(format!("{}: {e}", path.display())))?;
            hex::decode(text.trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .map(|b| SigningKey::from_bytes(&b))
                .ok_or_else(|| Error::Unavailable(format!("{}: not a hex ed25519 key", path.display())))?
        } else {
            let key = SigningKey::from_bytes(&rand::random());
            nanofleet_pki::write_private(&path, hex::encode(key.to_bytes()).as_bytes())
                .map_err(unavailable)?;
            key
        };
        let id = key_id(&key.verifying_key());
        if root.signed.role_key(role, &id).is_some() {
            return Ok(key);
        }
        let mut body = root.successor_body();
        body.add_role_key(role, &key.verifying_key(), None);
        let root_key = trust_root::signing_key(&self.pki_dir).map_err(unavailable)?;
        let next = TrustRoot::signed_by(body, &[&root_key]);
        root.verify_successor(&next).map_err(|e| Error::Unavailable(format!("new trust root: {e}")))?;
        let now = now_ms();
        self.store.ensure_trust_root(next.signed.version as i64, &next.to_json(), now).await?;
        self.store
            .audit_only(&AuditEntry {
                at_ms: now,
                actor: "system".into(),
                action: "trust-root.update".into(),
                subject: format!("trust root v{}", next.signed.version),
                site_id: None,
                reason: format!("the server's online key added to the {role} role"),
                old_value: Some(serde_json::json!({"version": root.signed.version}).to_string()),
                new_value: Some(
                    serde_json::json!({"version": next.signed.version, "added_key": id}).to_string(),
                ),
            })
            .await?;
        trust_root::save_successor(&self.pki_dir, &root, &next)
            .map_err(|e| Error::Unavailable(format!("trust root file: {e}")))?;
        tracing::info!(version = next.signed.version, role, "online key added to the trust root");
        *root = next;
        Ok(key)
    }

    /// Sends a version back (QA).
    pub async fn reject(
        &self,
        caller: &Caller,
        req: &pb::RejectRecipeRequest,
    ) -> Result<pb::RecipeVersion, Error> {
        if req.reason.trim().is_empty() {
            return Err(Error::invalid("reason", "", "why the version is sent back, in words"));
        }
        let version = i64::from(req.version);
        self.record(&req.recipe_id, version).await?;
        let entry = audit(
            caller,
            "recipe.reject",
            subject(&req.recipe_id, version),
            req.reason.clone(),
            serde_json::json!({"status": REJECTED}),
        );
        self.store
            .reject_recipe(&req.recipe_id, version, &caller.person_id, &req.reason, &entry)
            .await
            .map_err(conflict_or)?;
        self.version(&req.recipe_id, version).await
    }

    async fn record(&self, recipe_id: &str, version: i64) -> Result<RecipeRecord, Error> {
        let newest = version == 0;
        let version = if newest { self.store.latest_recipe_version(recipe_id).await? } else { version };
        let missing = || Error::NotFound {
            what: "recipe",
            id: if newest { recipe_id.to_owned() } else { subject(recipe_id, version) },
        };
        self.store.get_recipe(recipe_id, version).await?.ok_or_else(missing)
    }

    /// One version as people read it (version 0: the newest).
    pub async fn version(&self, recipe_id: &str, version: i64) -> Result<pb::RecipeVersion, Error> {
        let rec = self.record(recipe_id, version).await?;
        self.to_pb(rec).await
    }

    async fn to_pb(&self, rec: RecipeRecord) -> Result<pb::RecipeVersion, Error> {
        let signatures = self.store.recipe_signatures(&rec.recipe_id, rec.version).await?;
        let recipe = Recipe::decode(rec.body.as_slice())
            .map_err(|e| Error::Unavailable(format!("stored recipe does not decode: {e}")))?;
        Ok(pb::RecipeVersion {
            recipe: Some(recipe),
            status: status_pb(&rec.status) as i32,
            digest: rec.digest,
            created_by: rec.created_by,
            created_unix_ms: rec.created_ms,
            signatures: signatures
                .into_iter()
                .map(|s| pb::RecipeSignature {
                    signer_id: s.signer_id,
                    printed_name: s.printed_name,
                    meaning: meaning_pb(&s.meaning) as i32,
                    signed_unix_ms: s.signed_ms,
                    key_id: s.key_id,
                })
                .collect(),
            released_unix_ms: rec.released_ms,
            rejected_by: rec.rejected_by,
            rejected_reason: rec.rejected_reason,
        })
    }

    pub async fn list(&self, req: &pb::ListRecipesRequest) -> Result<Vec<pb::RecipeVersion>, Error> {
        let status = pb::RecipeStatus::try_from(req.status).unwrap_or(pb::RecipeStatus::Unspecified);
        let mut out = Vec::new();
        for rec in self.store.list_recipes(&req.recipe_id, status_str(status)).await? {
            out.push(self.to_pb(rec).await?);
        }
        Ok(out)
    }

    /// Per-device delivery state; a site-scoped caller sees their site's devices.
    pub async fn deliveries(
        &self,
        caller: &Caller,
        recipe_id: &str,
        version: i64,
    ) -> Result<Vec<pb::RecipeDelivery>, Error> {
        let mut out = Vec::new();
        for d in self.store.recipe_deliveries(recipe_id, version).await? {
            if caller.site_limit().is_some_and(|own| own != d.site_id) {
                continue;
            }
            let state = match d.state.as_str() {
                "pending" => pb::DeliveryState::Pending,
                "accepted" => pb::DeliveryState::Accepted,
                "refused" => pb::DeliveryState::Refused,
                _ => pb::DeliveryState::Unspecified,
            };
            out.push(pb::RecipeDelivery {
                device_id: d.device_id,
                site_id: d.site_id,
                recipe_id: d.recipe_id,
                version: d.version as u32,
                state: state as i32,
                code: d.code,
                reason: d.reason,
                sent_unix_ms: d.sent_ms,
                answered_unix_ms: d.answered_ms,
            });
        }
        Ok(out)
    }
}

/// Checks a recipe's fields and, for every device model it names, its hardware
/// envelope. The first refusal names the field, the value and what is allowed.
fn check_recipe(recipe: &Recipe) -> Result<(), Error> {
    let refused = |inv: nanofleet_recipe::validate::Invalid| Error::InvalidRecipe(inv.to_string());
    nanofleet_recipe::validate::validate(recipe).map_err(refused)?;
    let models = recipe.equipment.as_ref().map(|e| e.models.clone()).unwrap_or_default();
    for model in &models {
        let Some(env) = nanofleet_recipe::envelope::for_model(model) else {
            return Err(Error::invalid(
                "recipe.equipment.models",
                model.clone(),
                format!("a known device model: {}", nanofleet_recipe::envelope::MODELS.join(", ")),
            ));
        };
        nanofleet_recipe::envelope::check(recipe, &env).map_err(refused)?;
    }
    Ok(())
}

/// Sealing a signing key under its owner's password: argon2id derives a key from
/// the password and a random salt; AES-256-GCM encrypts the ed25519 seed.
/// Format: `v1.SALT.NONCE.CIPHERTEXT`, each hex.
mod seal {
    use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
    use ed25519_dalek::SigningKey;

    fn derive(password: &str, salt: &[u8]) -> Option<LessSafeKey> {
        let mut key = [0u8; 32];
        argon2::Argon2::default().hash_password_into(password.as_bytes(), salt, &mut key).ok()?;
        UnboundKey::new(&AES_256_GCM, &key).ok().map(LessSafeKey::new)
    }

    pub fn seal(key: &SigningKey, password: &str) -> Result<String, String> {
        let salt: [u8; 16] = rand::random();
        let nonce: [u8; 12] = rand::random();
        let sealing = derive(password, &salt).ok_or("key derivation failed")?;
        let mut data = key.to_bytes().to_vec();
        sealing
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut data)
            .map_err(|_| "sealing failed".to_owned())?;
        Ok(format!("v1.{}.{}.{}", hex::encode(salt), hex::encode(nonce), hex::encode(data)))
    }

    pub fn open(sealed: &str, password: &str) -> Option<SigningKey> {
        let mut parts = sealed.split('.');
        if parts.next()? != "v1" {
            return None;
        }
        let salt = hex::decode(parts.next()?).ok()?;
        let nonce: [u8; 12] = hex::decode(parts.next()?).ok()?.try_into().ok()?;
        let mut data = hex::decode(parts.next()?).ok()?;
        let opening = derive(password, &salt)?;
        let plain =
            opening.open_in_place(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut data).ok()?;
        let seed: [u8; 32] = plain.try_into().ok()?;
        Some(SigningKey::from_bytes(&seed))
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn a_sealed_key_opens_with_its_password_only() {
            let key = super::SigningKey::from_bytes(&rand::random());
            let sealed = super::seal(&key, "correct horse").unwrap();
            assert_eq!(super::open(&sealed, "correct horse").unwrap().to_bytes(), key.to_bytes());
            assert!(super::open(&sealed, "wrong horse").is_none());
            assert!(super::open("v1.00.00.00", "correct horse").is_none());
        }
    }
}
