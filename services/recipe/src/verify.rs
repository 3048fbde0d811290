//! The device's verifier: decides whether a delivered recipe may be stored and run, and
//! applies trust-root rotations. Pure: the device passes its identity, its clock, its
//! pinned trust root and what it already holds.
//!
//! Checks run in a fixed order so that a refusal code always means the same thing:
//! size, decoding, signatures (payload type, one recipe, key in role, owner, signature,
//! distinct people, thresholds), then the recipe (decoding, validation, validity window,
//! rollback, targeting, model, firmware, hardware envelope).

use nanofleet_pki::trust_root::TrustRoot;
use nanofleet_proto::Message as _;
use nanofleet_proto::device::v1::{Recipe, RecipeDelivery, RecipeStatement, SignatureMeaning};

use crate::dsse::{RECIPE_PAYLOAD_TYPE, verify_sig};
use crate::envelope;
use crate::sign::{APPROVER_ROLE, AUTHOR_ROLE, digest_hex, role_for};
use crate::validate::{semver, validate};

/// Largest delivery a device decodes.
pub const MAX_DELIVERY_BYTES: usize = 64 * 1024;

/// Refusal codes, as devices send them in `Ack.code`.
pub mod code {
    pub const OVERSIZED: &str = "oversized";
    pub const MALFORMED: &str = "malformed";
    pub const UNSIGNED: &str = "unsigned";
    pub const WRONG_PAYLOAD_TYPE: &str = "wrong_payload_type";
    pub const MIXED_RECIPES: &str = "mixed_recipes";
    pub const KEY_NOT_IN_ROLE: &str = "key_not_in_role";
    pub const SIGNER_MISMATCH: &str = "signer_mismatch";
    pub const BAD_SIGNATURE: &str = "bad_signature";
    pub const SAME_SIGNER: &str = "same_signer";
    pub const THRESHOLD_NOT_MET: &str = "threshold_not_met";
    pub const INVALID_RECIPE: &str = "invalid_recipe";
    pub const NOT_YET_VALID: &str = "not_yet_valid";
    pub const EXPIRED: &str = "expired";
    pub const ROLLBACK: &str = "rollback";
    pub const NOT_TARGETED: &str = "not_targeted";
    pub const WRONG_MODEL: &str = "wrong_model";
    pub const FIRMWARE_TOO_OLD: &str = "firmware_too_old";
    pub const UNKNOWN_MODEL: &str = "unknown_model";
    pub const OUTSIDE_ENVELOPE: &str = "outside_envelope";
    pub const ROOT_REJECTED: &str = "root_rejected";
}

/// What the device is and knows when it judges a delivery.
#[derive(Debug, Clone, Copy)]
pub struct DeviceContext<'a> {
    pub device_id: &'a str,
    pub site_id: &'a str,
    pub model: &'a str,
    pub firmware_version: &'a str,
    pub now_unix_ms: i64,
    pub root: &'a TrustRoot,
}

/// The version of a recipe id the device holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub version: u32,
    /// Hex SHA-256 of its recipe bytes.
    pub digest: String,
}

/// One verified signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signer {
    /// Person id, equal to the key's owner in the trust root.
    pub id: String,
    pub printed_name: String,
    pub meaning: SignatureMeaning,
    pub signed_unix_ms: i64,
    pub keyid: String,
}

/// An accepted delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub recipe: Recipe,
    /// The recipe exactly as signed.
    pub recipe_bytes: Vec<u8>,
    /// Hex SHA-256 of `recipe_bytes`.
    pub digest: String,
    /// In the order of the statements.
    pub signers: Vec<Signer>,
    /// The device already holds this version with these bytes.
    pub already_held: bool,
}

/// A refused delivery or trust-root update. `recipe_id`, `version` and `digest` are
/// empty (0) until the delivery is decoded far enough to know them; for a trust root,
/// `version` is the root version refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {reason}")]
pub struct Refusal {
    /// One of [`code`].
    pub code: &'static str,
    /// For people: names the value and what was allowed.
    pub reason: String,
    pub recipe_id: String,
    pub version: u32,
    pub digest: String,
}

/// What a refusal can say about the recipe so far.
#[derive(Default)]
struct Label {
    recipe_id: String,
    version: u32,
    digest: String,
}

impl Label {
    fn refuse(&self, code: &'static str, reason: String) -> Refusal {
        Refusal {
            code,
            reason,
            recipe_id: self.recipe_id.clone(),
            version: self.version,
            digest: self.digest.clone(),
        }
    }
}

/// Judges a `RecipeDelivery` received on `nf/v1/{device_id}/cmd/recipe`. `held` returns
/// the version the device holds for a recipe id, if any.
pub fn verify_delivery(
    bytes: &[u8],
    ctx: &DeviceContext,
    held: impl Fn(&str) -> Option<Held>,
) -> Result<Verified, Refusal> {
    let mut label = Label::default();
    if bytes.len() > MAX_DELIVERY_BYTES {
        return Err(label.refuse(
            code::OVERSIZED,
            format!("the delivery is {} bytes, allowed: at most {MAX_DELIVERY_BYTES}", bytes.len()),
        ));
    }
    let delivery = RecipeDelivery::decode(bytes)
        .map_err(|e| label.refuse(code::MALFORMED, format!("the delivery is not a RecipeDelivery ({e})")))?;
    let envelopes = delivery.statements;
    if envelopes.is_empty() {
        return Err(label.refuse(
            code::UNSIGNED,
            "the delivery holds no statement, allowed: one signed statement per signer".into(),
        ));
    }
    for (n, env) in numbered(&envelopes) {
        if env.payload_type != RECIPE_PAYLOAD_TYPE {
            return Err(label.refuse(
                code::WRONG_PAYLOAD_TYPE,
                format!(
                    "statement {n} has payload type {}, allowed: {RECIPE_PAYLOAD_TYPE:?}",
                    quoted(&env.payload_type)
                ),
            ));
        }
    }
    let mut statements = Vec::with_capacity(envelopes.len());
    for (n, env) in numbered(&envelopes) {
        let st = RecipeStatement::decode(env.payload.as_slice()).map_err(|e| {
            label.refuse(code::MALFORMED, format!("statement {n} is not a RecipeStatement ({e})"))
        })?;
        statements.push(st);
    }

    // === one recipe ===
    let Some(first) = statements.first() else {
        return Err(label.refuse(code::UNSIGNED, "the delivery holds no statement".into()));
    };
    let digest = digest_hex(&first.recipe);
    for (n, st) in numbered(&statements).skip(1) {
        if st.recipe != first.recipe {
            return Err(label.refuse(
                code::MIXED_RECIPES,
                format!(
                    "statement {n} signs recipe bytes {} but statement 1 signs {}, allowed: the same \
                     recipe bytes in every statement",
                    prefix(&digest_hex(&st.recipe)),
                    prefix(&digest)
                ),
            ));
        }
    }
    label.digest.clone_from(&digest);
    // Decoded now only to name the recipe in refusals; it is judged after the signatures.
    let decoded = Recipe::decode(first.recipe.as_slice());
    if let Ok(r) = &decoded {
        label.recipe_id.clone_from(&r.recipe_id);
        label.version = r.version;
    }

    // === signatures ===
    let root = &ctx.root.signed;
    let mut signers: Vec<Signer> = Vec::with_capacity(statements.len());
    for ((n, env), st) in numbered(&envelopes).zip(&statements) {
        let sig = match env.signatures.as_slice() {
            [sig] => sig,
            [] => return Err(label.refuse(code::UNSIGNED, format!("statement {n} carries no signature"))),
            more => {
                return Err(label.refuse(
                    code::MALFORMED,
                    format!("statement {n} carries {} signatures, allowed: exactly one", more.len()),
                ));
            }
        };
        let meaning = SignatureMeaning::try_from(st.meaning).unwrap_or(SignatureMeaning::Unspecified);
        let Some(role) = role_for(meaning) else {
            return Err(label.refuse(
                code::KEY_NOT_IN_ROLE,
                format!(
                    "statement {n} has meaning {}, which no trust-root role signs; allowed: \
                     AUTHORED ({AUTHOR_ROLE}) or APPROVED ({APPROVER_ROLE})",
                    SignatureMeaning::try_from(st.meaning)
                        .map_or_else(|_| st.meaning.to_string(), |m| m.as_str_name().to_owned())
                ),
            ));
        };
        let Some(key) = root.role_key(role, &sig.keyid) else {
            return Err(label.refuse(
                code::KEY_NOT_IN_ROLE,
                format!(
                    "statement {n} is signed by key {}, which is not a {role} key in trust root v{}",
                    prefix(&sig.keyid),
                    root.version
                ),
            ));
        };
        if key.owner.as_deref() != Some(st.signer_id.as_str()) {
            let holder = key.owner.as_deref().map_or_else(|| "nobody named in the trust root".into(), quoted);
            return Err(label.refuse(
                code::SIGNER_MISMATCH,
                format!(
                    "statement {n} names signer {} but key {} belongs to {holder}",
                    quoted(&st.signer_id),
                    prefix(&sig.keyid)
                ),
            ));
        }
        let Some(public) = key.verifying_key() else {
            return Err(label.refuse(
                code::BAD_SIGNATURE,
                format!(
                    "key {} in trust root v{} is not a usable ed25519 key",
                    prefix(&sig.keyid),
                    root.version
                ),
            ));
        };
        if !verify_sig(env, sig, &public) {
            return Err(label.refuse(
                code::BAD_SIGNATURE,
                format!(
                    "statement {n}: the {role} signature by key {} ({}) does not verify over the statement",
                    prefix(&sig.keyid),
                    quoted(&st.signer_id)
                ),
            ));
        }
        signers.push(Signer {
            id: st.signer_id.clone(),
            printed_name: st.printed_name.clone(),
            meaning,
            signed_unix_ms: st.signed_unix_ms,
            keyid: sig.keyid.clone(),
        });
    }

    // Two signatures by one key, or by one person with two keys, are one signature.
    for (i, s) in signers.iter().enumerate() {
        for (j, earlier) in signers.iter().enumerate().take(i) {
            if earlier.keyid == s.keyid {
                return Err(label.refuse(
                    code::SAME_SIGNER,
                    format!(
                        "statements {} and {} are both signed by key {}, allowed: a different key and \
                         person for each signature",
                        j + 1,
                        i + 1,
                        prefix(&s.keyid)
                    ),
                ));
            }
            if earlier.id == s.id {
                return Err(label.refuse(
                    code::SAME_SIGNER,
                    format!(
                        "statements {} and {} are both signed by {}, allowed: a different person for \
                         each signature",
                        j + 1,
                        i + 1,
                        quoted(&s.id)
                    ),
                ));
            }
        }
    }
    for role in [AUTHOR_ROLE, APPROVER_ROLE] {
        // A role without a threshold still needs one signature.
        let need = usize::try_from(root.threshold(role)).unwrap_or(usize::MAX).max(1);
        let got = signers.iter().filter(|s| role_for(s.meaning) == Some(role)).count();
        if got < need {
            return Err(label.refuse(
                code::THRESHOLD_NOT_MET,
                format!(
                    "{got} valid {role} signature{}, {need} required by trust root v{}",
                    if got == 1 { "" } else { "s" },
                    root.version
                ),
            ));
        }
    }

    // === the recipe ===
    let recipe = decoded
        .map_err(|e| label.refuse(code::MALFORMED, format!("the signed recipe is not a Recipe ({e})")))?;
    validate(&recipe).map_err(|invalid| label.refuse(code::INVALID_RECIPE, invalid.to_string()))?;
    let now = ctx.now_unix_ms;
    if now < recipe.valid_from_unix_ms {
        return Err(label.refuse(
            code::NOT_YET_VALID,
            format!(
                "the recipe is valid from {}, the device clock reads {}",
                utc(recipe.valid_from_unix_ms),
                utc(now)
            ),
        ));
    }
    if now > recipe.valid_until_unix_ms {
        return Err(label.refuse(
            code::EXPIRED,
            format!(
                "the recipe was valid until {}, the device clock reads {}",
                utc(recipe.valid_until_unix_ms),
                utc(now)
            ),
        ));
    }

    let mut already_held = false;
    if let Some(h) = held(&recipe.recipe_id) {
        if h.version > recipe.version {
            return Err(label.refuse(
                code::ROLLBACK,
                format!(
                    "{} version {} is older than the held version {}, allowed: version {} or newer",
                    recipe.recipe_id, recipe.version, h.version, h.version
                ),
            ));
        }
        if h.version == recipe.version {
            if h.digest != digest {
                return Err(label.refuse(
                    code::ROLLBACK,
                    format!(
                        "{} version {} has digest {} but the held version {} has {}, allowed: a \
                         change only as a new version",
                        recipe.recipe_id,
                        recipe.version,
                        prefix(&digest),
                        h.version,
                        prefix(&h.digest)
                    ),
                ));
            }
            // Still judged below: a copy the device would refuse today is refused again.
            already_held = true;
        }
    }

    let targets = recipe.targets.clone().unwrap_or_default();
    let targeted = targets.device_ids.iter().any(|d| d == ctx.device_id)
        || targets.site_ids.iter().any(|s| s == ctx.site_id);
    if !targeted {
        return Err(label.refuse(
            code::NOT_TARGETED,
            format!(
                "device {} at site {} is not a target, allowed: sites {} and devices {}",
                quoted(ctx.device_id),
                quoted(ctx.site_id),
                list(&targets.site_ids),
                list(&targets.device_ids)
            ),
        ));
    }

    let equipment = recipe.equipment.clone().unwrap_or_default();
    if !equipment.models.iter().any(|m| m == ctx.model) {
        return Err(label.refuse(
            code::WRONG_MODEL,
            format!("device model {}, allowed: {}", quoted(ctx.model), list(&equipment.models)),
        ));
    }
    match (semver(ctx.firmware_version), semver(&equipment.min_firmware)) {
        (Some(have), Some(need)) if have >= need => {}
        (Some(_), _) => {
            return Err(label.refuse(
                code::FIRMWARE_TOO_OLD,
                format!(
                    "device firmware {}, allowed: {} or newer",
                    quoted(ctx.firmware_version),
                    equipment.min_firmware
                ),
            ));
        }
        (None, _) => {
            return Err(label.refuse(
                code::FIRMWARE_TOO_OLD,
                format!(
                    "device firmware {} is not a semantic version MAJOR.MINOR.PATCH, allowed: {} or newer",
                    quoted(ctx.firmware_version),
                    equipment.min_firmware
                ),
            ));
        }
    }
    let Some(hardware) = envelope::for_model(ctx.model) else {
        return Err(label.refuse(
            code::UNKNOWN_MODEL,
            format!("no hardware envelope is known for model {}, allowed: NF-100, NF-200", quoted(ctx.model)),
        ));
    };
    envelope::check(&recipe, &hardware)
        .map_err(|invalid| label.refuse(code::OUTSIDE_ENVELOPE, invalid.to_string()))?;

    let recipe_bytes = statements.into_iter().next().map(|st| st.recipe).unwrap_or_default();
    Ok(Verified { recipe, recipe_bytes, digest, signers, already_held })
}

/// Applies trust-root documents received in a `TrustRootUpdate`, in order, one version
/// at a time; documents not newer than the root reached so far are skipped. Returns the
/// newest root; nothing is applied if any document is refused.
pub fn apply_root_updates(current: &TrustRoot, documents: &[String]) -> Result<TrustRoot, Refusal> {
    let refuse = |version: u64, reason: String| Refusal {
        code: code::ROOT_REJECTED,
        reason,
        recipe_id: String::new(),
        version: u32::try_from(version).unwrap_or(u32::MAX),
        digest: String::new(),
    };
    let mut root = current.clone();
    for (n, text) in documents.iter().enumerate().map(|(i, t)| (i + 1, t)) {
        let next = TrustRoot::from_json(text).map_err(|e| refuse(0, format!("document {n}: {e}")))?;
        let (have, version) = (root.signed.version, next.signed.version);
        if version <= have {
            continue;
        }
        // The rotation check needs the held root's threshold; without one no successor
        // can be vouched for.
        if root.signed.roles.get("root").is_none_or(|r| r.threshold == 0) {
            return Err(refuse(
                version,
                format!("trust root v{have} names no root threshold, so it cannot vouch for v{version}"),
            ));
        }
        root.verify_successor(&next).map_err(|e| refuse(version, format!("document {n}: {e}")))?;
        root = next;
    }
    Ok(root)
}

// === helpers ===

/// Items numbered from 1, as reasons name them.
fn numbered<T>(items: &[T]) -> impl Iterator<Item = (usize, &T)> {
    items.iter().enumerate().map(|(i, x)| (i + 1, x))
}

/// `text` quoted, cut to 64 characters: the text may come from the sender.
fn quoted(text: &str) -> String {
    const MAX: usize = 64;
    if text.chars().count() <= MAX {
        format!("{text:?}")
    } else {
        let cut: String = text.chars().take(MAX).collect();
        format!("{cut:?}…")
    }
}

/// The start of a hex key id or digest, enough for people to tell them apart.
fn prefix(hex: &str) -> String {
    const LEN: usize = 12;
    if hex.is_empty() {
        return "\"\"".into();
    }
    let cut: String = hex.chars().take(LEN).collect();
    if hex.chars().nth(LEN).is_some() { format!("{cut}…") } else { cut }
}

/// A short list of ids for a reason.
fn list(ids: &[String]) -> String {
    const SHOWN: usize = 5;
    if ids.is_empty() {
        return "none".into();
    }
    let shown: Vec<String> = ids.iter().take(SHOWN).map(|id| quoted(id)).collect();
    if ids.len() > SHOWN {
        format!("[{}, … ({} in all)]", shown.join(", "), ids.len())
    } else {
        format!("[{}]", shown.join(", "))
    }
}

/// Milliseconds since the Unix epoch as an RFC 3339 UTC time, to the second.
fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let second_of_day = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant, "chrono-Compatible Low-Level
    // Date Algorithms").
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_in_reasons_read_as_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(1_750_000_000_000), "2025-06-15T15:06:40Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc(-1), "1969-12-31T23:59:59Z");
        // Extremes format without overflowing.
        assert!(!utc(i64::MIN).is_empty());
        assert!(!utc(i64::MAX).is_empty());
    }

    #[test]
    fn sender_text_in_reasons_is_bounded() {
        assert_eq!(quoted("alice"), "\"alice\"");
        assert_eq!(quoted(&"x".repeat(10_000)).chars().count(), 64 + 3);
        assert_eq!(prefix("0123456789abcdef"), "0123456789ab…");
        assert_eq!(prefix("abc"), "abc");
        assert_eq!(list(&[]), "none");
        let many: Vec<String> = (0..7).map(|i| format!("d{i}")).collect();
        assert_eq!(list(&many), "[\"d0\", \"d1\", \"d2\", \"d3\", \"d4\", … (7 in all)]");
    }
}
