//! The device's verifier against deliveries an attacker or a mistake could produce.
//! Every case asserts the exact refusal code a device would send in its Ack.

use ed25519_dalek::SigningKey;
use nanofleet_pki::trust_root::{TrustRoot, key_id};
use nanofleet_proto::Message as _;
use nanofleet_proto::device::v1::{
    Envelope, Recipe, RecipeDelivery, RecipeStatement, SignatureMeaning, Targets,
};
use nanofleet_recipe::dsse::{self, DENY_LIST_PAYLOAD_TYPE, RECIPE_PAYLOAD_TYPE};
use nanofleet_recipe::example::example;
use nanofleet_recipe::sign::{APPROVER_ROLE, AUTHOR_ROLE, digest_hex, sign_statement, statement};
use nanofleet_recipe::verify::code;
use nanofleet_recipe::{
    DeviceContext, Held, MAX_DELIVERY_BYTES, Refusal, Verified, apply_root_updates, validate, verify_delivery,
};

const NOW: i64 = 1_750_000_000_000;
const DAY_MS: i64 = 86_400_000;
const DEVICE: &str = "NF-0001";
const SITE: &str = "site-a";
const EXPIRES: &str = "2046-01-01T00:00:00Z";

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// A trust root with one root key, alice's author key and quinn's approver key.
struct Fleet {
    root_key: SigningKey,
    author: SigningKey,
    approver: SigningKey,
    root: TrustRoot,
}

impl Fleet {
    fn new() -> Fleet {
        Fleet::with(|_| {})
    }

    /// Like `new`, with `more` changing the root's body before it is signed.
    fn with(more: impl FnOnce(&mut nanofleet_pki::trust_root::RootBody)) -> Fleet {
        let (root_key, author, approver) = (key(1), key(2), key(3));
        let mut body = TrustRoot::initial(&root_key, EXPIRES).signed;
        body.add_role_key(AUTHOR_ROLE, &author.verifying_key(), Some("alice"));
        body.add_role_key(APPROVER_ROLE, &approver.verifying_key(), Some("quinn"));
        more(&mut body);
        let root = TrustRoot::signed_by(body, &[&root_key]);
        root.verify_self_signed().unwrap();
        Fleet { root_key, author, approver, root }
    }

    fn ctx(&self) -> DeviceContext<'_> {
        ctx_with(&self.root)
    }

    /// The recipe signed by alice (author) and quinn (approver).
    fn deliver(&self, recipe: &Recipe) -> Vec<u8> {
        let bytes = recipe.encode_to_vec();
        delivery(vec![
            signed(&bytes, "alice", SignatureMeaning::Authored, &self.author),
            signed(&bytes, "quinn", SignatureMeaning::Approved, &self.approver),
        ])
    }
}

fn ctx_with(root: &TrustRoot) -> DeviceContext<'_> {
    DeviceContext {
        device_id: DEVICE,
        site_id: SITE,
        model: "NF-200",
        firmware_version: "2.1.0",
        now_unix_ms: NOW,
        root,
    }
}

fn recipe(version: u32) -> Recipe {
    example("flu-h5", version, Targets { site_ids: vec![SITE.into()], device_ids: Vec::new() }, NOW)
}

fn signed(recipe_bytes: &[u8], who: &str, meaning: SignatureMeaning, key: &SigningKey) -> Envelope {
    let printed = match who {
        "alice" => "Alice Martin, PharmD",
        "quinn" => "Quinn Roy",
        other => other,
    };
    sign_statement(&statement(recipe_bytes, who, printed, meaning, NOW - DAY_MS), key)
}

fn delivery(statements: Vec<Envelope>) -> Vec<u8> {
    RecipeDelivery { statements }.encode_to_vec()
}

fn nothing_held(_: &str) -> Option<Held> {
    None
}

fn refused(result: Result<Verified, Refusal>) -> Refusal {
    match result {
        Ok(v) => panic!("accepted {} v{}", v.recipe.recipe_id, v.recipe.version),
        Err(r) => r,
    }
}

fn refusal(fleet: &Fleet, bytes: &[u8]) -> Refusal {
    refused(verify_delivery(bytes, &fleet.ctx(), nothing_held))
}

// === accepted ===

#[test]
fn a_properly_signed_recipe_is_accepted_and_a_second_copy_is_already_held() {
    let fleet = Fleet::new();
    let r = recipe(1);
    let bytes = fleet.deliver(&r);
    let v = verify_delivery(&bytes, &fleet.ctx(), nothing_held).unwrap();
    assert_eq!(v.recipe, r);
    assert_eq!(v.recipe_bytes, r.encode_to_vec());
    assert_eq!(v.digest, digest_hex(&v.recipe_bytes));
    assert!(!v.already_held);
    let who: Vec<(&str, SignatureMeaning)> = v.signers.iter().map(|s| (s.id.as_str(), s.meaning)).collect();
    assert_eq!(who, [("alice", SignatureMeaning::Authored), ("quinn", SignatureMeaning::Approved)]);
    assert_eq!(v.signers[0].keyid, key_id(&fleet.author.verifying_key()));
    assert_eq!(v.signers[1].printed_name, "Quinn Roy");

    let held = Held { version: 1, digest: v.digest.clone() };
    let again = verify_delivery(&bytes, &fleet.ctx(), |id| (id == "flu-h5").then(|| held.clone())).unwrap();
    assert!(again.already_held);
    assert_eq!(again.digest, v.digest);
}

#[test]
fn a_newer_version_than_the_held_one_is_accepted() {
    let fleet = Fleet::new();
    let held = Held { version: 1, digest: "00".repeat(32) };
    let v = verify_delivery(&fleet.deliver(&recipe(2)), &fleet.ctx(), |_| Some(held.clone())).unwrap();
    assert!(!v.already_held);
}

#[test]
fn a_device_listed_by_id_is_targeted_whatever_its_site() {
    let fleet = Fleet::new();
    let mut r = recipe(1);
    r.targets = Some(Targets { site_ids: Vec::new(), device_ids: vec![DEVICE.into()] });
    let ctx = DeviceContext { site_id: "site-z", ..fleet.ctx() };
    verify_delivery(&fleet.deliver(&r), &ctx, nothing_held).unwrap();
}

// === signatures ===

#[test]
fn a_flipped_signature_byte_is_a_bad_signature() {
    let fleet = Fleet::new();
    let mut d = RecipeDelivery::decode(fleet.deliver(&recipe(1)).as_slice()).unwrap();
    d.statements[1].signatures[0].sig[10] ^= 0x01;
    let r = refusal(&fleet, &d.encode_to_vec());
    assert_eq!(r.code, code::BAD_SIGNATURE, "{r}");
    // Decoded far enough to name the recipe in the Ack.
    assert_eq!((r.recipe_id.as_str(), r.version), ("flu-h5", 1));
    assert_eq!(r.digest, digest_hex(&recipe(1).encode_to_vec()));
}

#[test]
fn the_authors_signature_alone_does_not_meet_the_threshold() {
    let fleet = Fleet::new();
    let bytes = recipe(1).encode_to_vec();
    let r =
        refusal(&fleet, &delivery(vec![signed(&bytes, "alice", SignatureMeaning::Authored, &fleet.author)]));
    assert_eq!(r.code, code::THRESHOLD_NOT_MET, "{r}");
    assert!(r.reason.starts_with("0 valid recipe-approver signatures, 1 required"), "{r}");
}

#[test]
fn a_threshold_of_two_approvers_needs_two_people() {
    let fleet = Fleet::with(|body| {
        body.add_role_key(APPROVER_ROLE, &key(4).verifying_key(), Some("rosa"));
        if let Some(role) = body.roles.get_mut(APPROVER_ROLE) {
            role.threshold = 2;
        }
    });
    let bytes = recipe(1).encode_to_vec();
    let r = refusal(&fleet, &fleet.deliver(&recipe(1)));
    assert_eq!(r.code, code::THRESHOLD_NOT_MET, "{r}");
    assert!(r.reason.starts_with("1 valid recipe-approver signature, 2 required"), "{r}");
    let three = delivery(vec![
        signed(&bytes, "alice", SignatureMeaning::Authored, &fleet.author),
        signed(&bytes, "quinn", SignatureMeaning::Approved, &fleet.approver),
        signed(&bytes, "rosa", SignatureMeaning::Approved, &key(4)),
    ]);
    verify_delivery(&three, &fleet.ctx(), nothing_held).unwrap();
}

#[test]
fn an_empty_delivery_and_an_envelope_without_signature_are_unsigned() {
    let fleet = Fleet::new();
    assert_eq!(refusal(&fleet, &delivery(Vec::new())).code, code::UNSIGNED);
    assert_eq!(refusal(&fleet, &[]).code, code::UNSIGNED);
    let mut d = RecipeDelivery::decode(fleet.deliver(&recipe(1)).as_slice()).unwrap();
    d.statements[0].signatures.clear();
    assert_eq!(refusal(&fleet, &d.encode_to_vec()).code, code::UNSIGNED);
}

#[test]
fn two_signatures_in_one_statement_are_malformed() {
    let fleet = Fleet::new();
    let mut d = RecipeDelivery::decode(fleet.deliver(&recipe(1)).as_slice()).unwrap();
    let extra = d.statements[0].signatures[0].clone();
    d.statements[0].signatures.push(extra);
    assert_eq!(refusal(&fleet, &d.encode_to_vec()).code, code::MALFORMED);
}

#[test]
fn one_key_in_both_roles_signing_twice_is_the_same_signer() {
    let author = key(2);
    let fleet = Fleet::with(|body| {
        body.add_role_key(APPROVER_ROLE, &author.verifying_key(), Some("alice"));
    });
    let bytes = recipe(1).encode_to_vec();
    let r = refusal(
        &fleet,
        &delivery(vec![
            signed(&bytes, "alice", SignatureMeaning::Authored, &fleet.author),
            signed(&bytes, "alice", SignatureMeaning::Approved, &fleet.author),
        ]),
    );
    assert_eq!(r.code, code::SAME_SIGNER, "{r}");
    assert!(r.reason.contains("key"), "{r}");
}

#[test]
fn one_person_with_a_key_in_each_role_is_the_same_signer() {
    let second = key(5);
    let fleet = Fleet::with(|body| {
        body.add_role_key(APPROVER_ROLE, &second.verifying_key(), Some("alice"));
    });
    let bytes = recipe(1).encode_to_vec();
    let r = refusal(
        &fleet,
        &delivery(vec![
            signed(&bytes, "alice", SignatureMeaning::Authored, &fleet.author),
            signed(&bytes, "alice", SignatureMeaning::Approved, &second),
        ]),
    );
    assert_eq!(r.code, code::SAME_SIGNER, "{r}");
    assert!(r.reason.contains("\"alice\""), "{r}");
}

#[test]
fn the_same_statement_twice_is_the_same_signer() {
    let fleet = Fleet::new();
    let bytes = recipe(1).encode_to_vec();
    let approval = signed(&bytes, "quinn", SignatureMeaning::Approved, &fleet.approver);
    let d = delivery(vec![
        signed(&bytes, "alice", SignatureMeaning::Authored, &fleet.author),
        approval.clone(),
        approval,
    ]);
    assert_eq!(refusal(&fleet, &d).code, code::SAME_SIGNER);
}

#[test]
fn a_key_the_root_does_not_list_is_not_in_the_role() {
    let fleet = Fleet::new();
    let stranger = key(9);
    let bytes = recipe(1).encode_to_vec();
    let r = refusal(
        &fleet,
        &delivery(vec![
            signed(&bytes, "alice", SignatureMeaning::Authored, &fleet.author),
            signed(&bytes, "quinn", SignatureMeaning::Approved, &stranger),
        ]),
    );
    assert_eq!(r.code, code::KEY_NOT_IN_ROLE, "{r}");
    assert!(r.reason.contains("recipe-approver"), "{r}");
    assert!(r.reason.contains(&key_id(&stranger.verifying_key())[..12]), "{r}");
}

#[test]
fn an_author_key_cannot_approve() {
    let fleet = Fleet::new();
    let bytes = recipe(1).encode_to_vec();
    let r = refusal(
        &fleet,
        &delivery(vec![
            signed(&bytes, "quinn", SignatureMeaning::Authored, &fleet.approver),
            signed(&bytes, "alice", SignatureMeaning::Approved, &fleet.author),
        ]),
    );
    assert_eq!(r.code, code::KEY_NOT_IN_ROLE, "{r}");
}

#[test]
fn a_statement_without_meaning_has_no_role() {
    let fleet = Fleet::new();
    let bytes = recipe(1).encode_to_vec();
    let d = delivery(vec![
        signed(&bytes, "alice", SignatureMeaning::Authored, &fleet.author),
        signed(&bytes, "quinn", SignatureMeaning::Unspecified, &fleet.approver),
    ]);
    assert_eq!(refusal(&fleet, &d).code, code::KEY_NOT_IN_ROLE);
}

#[test]
fn a_key_revoked_by_a_root_rotation_is_no_longer_in_the_role() {
    let fleet = Fleet::new();
    let bytes = fleet.deliver(&recipe(1));
    verify_delivery(&bytes, &fleet.ctx(), nothing_held).unwrap();

    let mut body = fleet.root.successor_body();
    body.remove_key(&key_id(&fleet.approver.verifying_key()));
    let v2 = TrustRoot::signed_by(body, &[&fleet.root_key]);
    let root = apply_root_updates(&fleet.root, &[fleet.root.to_json(), v2.to_json()]).unwrap();
    assert_eq!(root, v2);

    let r = refused(verify_delivery(&bytes, &ctx_with(&root), nothing_held));
    assert_eq!(r.code, code::KEY_NOT_IN_ROLE, "{r}");
    assert!(r.reason.contains("trust root v2"), "{r}");
}

#[test]
fn a_statement_naming_someone_else_than_the_keys_owner_is_a_signer_mismatch() {
    let fleet = Fleet::new();
    let bytes = recipe(1).encode_to_vec();
    let r = refusal(
        &fleet,
        &delivery(vec![
            signed(&bytes, "alice", SignatureMeaning::Authored, &fleet.author),
            signed(&bytes, "mallory", SignatureMeaning::Approved, &fleet.approver),
        ]),
    );
    assert_eq!(r.code, code::SIGNER_MISMATCH, "{r}");
    assert!(r.reason.contains("\"mallory\"") && r.reason.contains("\"quinn\""), "{r}");
}

// === moved and edited signatures ===

#[test]
fn signatures_over_two_different_recipes_are_mixed_recipes() {
    let fleet = Fleet::new();
    let a = recipe(1).encode_to_vec();
    let mut other = recipe(1);
    other.formula.as_mut().unwrap().dose_ug = 200.0;
    let b = other.encode_to_vec();
    let r = refusal(
        &fleet,
        &delivery(vec![
            signed(&a, "alice", SignatureMeaning::Authored, &fleet.author),
            signed(&b, "quinn", SignatureMeaning::Approved, &fleet.approver),
        ]),
    );
    assert_eq!(r.code, code::MIXED_RECIPES, "{r}");
}

#[test]
fn a_recipe_edited_in_every_statement_after_signing_has_bad_signatures() {
    let fleet = Fleet::new();
    let mut d = RecipeDelivery::decode(fleet.deliver(&recipe(1)).as_slice()).unwrap();
    let mut edited = recipe(1);
    edited.formula.as_mut().unwrap().dose_ug = 1_000.0;
    for env in &mut d.statements {
        let mut st = RecipeStatement::decode(env.payload.as_slice()).unwrap();
        st.recipe = edited.encode_to_vec();
        env.payload = st.encode_to_vec();
    }
    let r = refusal(&fleet, &d.encode_to_vec());
    assert_eq!(r.code, code::BAD_SIGNATURE, "{r}");
    assert_eq!(r.digest, digest_hex(&edited.encode_to_vec()));
}

#[test]
fn a_printed_name_edited_after_signing_is_a_bad_signature() {
    let fleet = Fleet::new();
    let mut d = RecipeDelivery::decode(fleet.deliver(&recipe(1)).as_slice()).unwrap();
    let mut st = RecipeStatement::decode(d.statements[1].payload.as_slice()).unwrap();
    st.printed_name = "Someone Else".into();
    d.statements[1].payload = st.encode_to_vec();
    assert_eq!(refusal(&fleet, &d.encode_to_vec()).code, code::BAD_SIGNATURE);
}

#[test]
fn a_deny_list_envelope_is_the_wrong_payload_type() {
    let fleet = Fleet::new();
    let bytes = recipe(1).encode_to_vec();
    let approval = statement(&bytes, "quinn", "Quinn Roy", SignatureMeaning::Approved, NOW);
    let d = delivery(vec![
        signed(&bytes, "alice", SignatureMeaning::Authored, &fleet.author),
        dsse::sign(DENY_LIST_PAYLOAD_TYPE, &approval.encode_to_vec(), &fleet.approver),
    ]);
    let r = refusal(&fleet, &d);
    assert_eq!(r.code, code::WRONG_PAYLOAD_TYPE, "{r}");
    assert!(r.reason.contains(DENY_LIST_PAYLOAD_TYPE), "{r}");
}

#[test]
fn a_payload_type_rewritten_after_signing_is_a_bad_signature() {
    let fleet = Fleet::new();
    let bytes = recipe(1).encode_to_vec();
    let approval = statement(&bytes, "quinn", "Quinn Roy", SignatureMeaning::Approved, NOW);
    let mut moved = dsse::sign(DENY_LIST_PAYLOAD_TYPE, &approval.encode_to_vec(), &fleet.approver);
    moved.payload_type = RECIPE_PAYLOAD_TYPE.into();
    let d = delivery(vec![signed(&bytes, "alice", SignatureMeaning::Authored, &fleet.author), moved]);
    assert_eq!(refusal(&fleet, &d).code, code::BAD_SIGNATURE);
}

// === trust root rotation ===

#[test]
fn a_rotation_without_the_old_root_keys_is_rejected() {
    let fleet = Fleet::new();
    let new_root_key = key(7);
    let mut body = fleet.root.successor_body();
    body.remove_key(&key_id(&fleet.root_key.verifying_key()));
    body.add_role_key("root", &new_root_key.verifying_key(), None);
    let v2 = TrustRoot::signed_by(body.clone(), &[&new_root_key]);
    let r = apply_root_updates(&fleet.root, &[v2.to_json()]).unwrap_err();
    assert_eq!(r.code, code::ROOT_REJECTED, "{r}");
    assert_eq!(r.version, 2);
    // Signed by the old and the new root keys, the same rotation is accepted.
    let v2 = TrustRoot::signed_by(body, &[&new_root_key, &fleet.root_key]);
    assert_eq!(apply_root_updates(&fleet.root, &[v2.to_json()]).unwrap(), v2);
}

#[test]
fn a_skipped_root_version_is_rejected() {
    let fleet = Fleet::new();
    let mut body = fleet.root.successor_body();
    body.version = 3;
    let v3 = TrustRoot::signed_by(body, &[&fleet.root_key]);
    let r = apply_root_updates(&fleet.root, &[v3.to_json()]).unwrap_err();
    assert_eq!(r.code, code::ROOT_REJECTED, "{r}");
}

#[test]
fn root_updates_apply_one_version_at_a_time_and_skip_old_ones() {
    let fleet = Fleet::new();
    let v2 = TrustRoot::signed_by(fleet.root.successor_body(), &[&fleet.root_key]);
    let v3 = TrustRoot::signed_by(v2.successor_body(), &[&fleet.root_key]);
    let docs = [fleet.root.to_json(), v2.to_json(), v3.to_json()];
    assert_eq!(apply_root_updates(&fleet.root, &docs).unwrap(), v3);
    assert_eq!(apply_root_updates(&v3, &docs).unwrap(), v3);
    assert_eq!(apply_root_updates(&fleet.root, &[]).unwrap(), fleet.root);
}

#[test]
fn a_held_root_without_a_root_threshold_cannot_vouch_for_a_successor() {
    let fleet = Fleet::new();
    let v2 = TrustRoot::signed_by(fleet.root.successor_body(), &[&fleet.root_key]);
    let mut broken = fleet.root.clone();
    broken.signed.roles.remove("root");
    let r = apply_root_updates(&broken, &[v2.to_json()]).unwrap_err();
    assert_eq!(r.code, code::ROOT_REJECTED, "{r}");
}

#[test]
fn a_document_that_is_not_a_trust_root_is_rejected() {
    let fleet = Fleet::new();
    let r = apply_root_updates(&fleet.root, &["{\"signed\": 1}".into()]).unwrap_err();
    assert_eq!(r.code, code::ROOT_REJECTED, "{r}");
}

// === the recipe ===

#[test]
fn an_expired_recipe_is_refused() {
    let fleet = Fleet::new();
    let ctx = DeviceContext { now_unix_ms: NOW + 400 * DAY_MS, ..fleet.ctx() };
    let r = refused(verify_delivery(&fleet.deliver(&recipe(1)), &ctx, nothing_held));
    assert_eq!(r.code, code::EXPIRED, "{r}");
}

#[test]
fn a_recipe_not_yet_valid_is_refused() {
    let fleet = Fleet::new();
    let ctx = DeviceContext { now_unix_ms: NOW - 2 * 3_600_000, ..fleet.ctx() };
    let r = refused(verify_delivery(&fleet.deliver(&recipe(1)), &ctx, nothing_held));
    assert_eq!(r.code, code::NOT_YET_VALID, "{r}");
    assert!(r.reason.contains("2025-06-15T14:06:40Z"), "{r}");
}

#[test]
fn an_older_version_than_the_held_one_is_a_rollback() {
    let fleet = Fleet::new();
    let held = Held { version: 3, digest: digest_hex(&recipe(3).encode_to_vec()) };
    let r = refused(verify_delivery(&fleet.deliver(&recipe(2)), &fleet.ctx(), |_| Some(held.clone())));
    assert_eq!(r.code, code::ROLLBACK, "{r}");
    assert_eq!(r.version, 2);
}

#[test]
fn the_held_version_with_different_bytes_is_a_rollback() {
    let fleet = Fleet::new();
    let mut other = recipe(2);
    other.description = "the same version, changed".into();
    let held = Held { version: 2, digest: digest_hex(&other.encode_to_vec()) };
    let r = refused(verify_delivery(&fleet.deliver(&recipe(2)), &fleet.ctx(), |_| Some(held.clone())));
    assert_eq!(r.code, code::ROLLBACK, "{r}");
}

#[test]
fn another_device_is_not_targeted() {
    let fleet = Fleet::new();
    let mut r = recipe(1);
    r.targets = Some(Targets { site_ids: Vec::new(), device_ids: vec!["NF-0002".into()] });
    let refusal = refusal(&fleet, &fleet.deliver(&r));
    assert_eq!(refusal.code, code::NOT_TARGETED, "{refusal}");
    assert!(refusal.reason.contains("\"NF-0002\""), "{refusal}");
}

#[test]
fn a_device_at_another_site_is_not_targeted() {
    let fleet = Fleet::new();
    let ctx = DeviceContext { site_id: "site-b", ..fleet.ctx() };
    let r = refused(verify_delivery(&fleet.deliver(&recipe(1)), &ctx, nothing_held));
    assert_eq!(r.code, code::NOT_TARGETED, "{r}");
}

#[test]
fn a_flow_beyond_the_nf_100_is_outside_its_envelope() {
    let fleet = Fleet::new();
    let mut r = recipe(1);
    r.equipment.as_mut().unwrap().models = vec!["NF-100".into()];
    r.formula.as_mut().unwrap().total_flow_ml_min = 15.0;
    for step in &mut r.procedure {
        if step.total_flow_ml_min == 12.0 {
            step.total_flow_ml_min = 15.0;
        }
    }
    validate(&r).unwrap();
    let ctx = DeviceContext { model: "NF-100", ..fleet.ctx() };
    let refusal = refused(verify_delivery(&fleet.deliver(&r), &ctx, nothing_held));
    assert_eq!(refusal.code, code::OUTSIDE_ENVELOPE, "{refusal}");
    assert!(refusal.reason.contains("the NF-100 allows 1 to 12 mL/min"), "{refusal}");
}

#[test]
fn lipid_ratios_not_summing_to_100_are_an_invalid_recipe() {
    let fleet = Fleet::new();
    let mut r = recipe(1);
    r.formula.as_mut().unwrap().lipids.as_mut().unwrap().cholesterol = 40.0;
    let err = validate(&r).unwrap_err();
    assert_eq!(err.problems.len(), 1, "{err}");
    assert_eq!(err.problems[0].field, "formula.lipids");
    let refusal = refusal(&fleet, &fleet.deliver(&r));
    assert_eq!(refusal.code, code::INVALID_RECIPE, "{refusal}");
    assert!(refusal.reason.starts_with("formula.lipids = "), "{refusal}");
}

#[test]
fn signed_bytes_that_are_not_a_recipe_are_malformed() {
    let fleet = Fleet::new();
    let junk = [0xff_u8; 16];
    let d = delivery(vec![
        signed(&junk, "alice", SignatureMeaning::Authored, &fleet.author),
        signed(&junk, "quinn", SignatureMeaning::Approved, &fleet.approver),
    ]);
    let r = refusal(&fleet, &d);
    assert_eq!(r.code, code::MALFORMED, "{r}");
    assert_eq!((r.recipe_id.as_str(), r.version), ("", 0));
    assert_eq!(r.digest, digest_hex(&junk));
}

#[test]
fn a_truncated_delivery_is_malformed() {
    let fleet = Fleet::new();
    let bytes = fleet.deliver(&recipe(1));
    for cut in [bytes.len() / 2, bytes.len() - 1, 1] {
        let r = refusal(&fleet, &bytes[..cut]);
        assert_eq!(r.code, code::MALFORMED, "cut at {cut}: {r}");
        assert_eq!((r.recipe_id.as_str(), r.version, r.digest.as_str()), ("", 0, ""));
    }
}

#[test]
fn a_statement_that_does_not_decode_is_malformed() {
    let fleet = Fleet::new();
    let d = delivery(vec![dsse::sign(RECIPE_PAYLOAD_TYPE, &[0xff; 8], &fleet.author)]);
    assert_eq!(refusal(&fleet, &d).code, code::MALFORMED);
}

#[test]
fn an_oversized_delivery_is_refused_before_decoding() {
    let fleet = Fleet::new();
    let r = refusal(&fleet, &vec![0u8; MAX_DELIVERY_BYTES + 1]);
    assert_eq!(r.code, code::OVERSIZED, "{r}");
    // A delivery padded past the limit with a long description is refused the same way.
    let mut big = recipe(1);
    big.description = "x".repeat(MAX_DELIVERY_BYTES);
    assert_eq!(refusal(&fleet, &fleet.deliver(&big)).code, code::OVERSIZED);
}

#[test]
fn a_model_the_recipe_does_not_list_is_the_wrong_model() {
    let fleet = Fleet::new();
    let ctx = DeviceContext { model: "NF-100", ..fleet.ctx() };
    let r = refused(verify_delivery(&fleet.deliver(&recipe(1)), &ctx, nothing_held));
    assert_eq!(r.code, code::WRONG_MODEL, "{r}");
    assert!(r.reason.contains("[\"NF-200\"]"), "{r}");
}

#[test]
fn a_listed_model_without_a_known_envelope_is_an_unknown_model() {
    let fleet = Fleet::new();
    let mut r = recipe(1);
    r.equipment.as_mut().unwrap().models.push("NF-300".into());
    let ctx = DeviceContext { model: "NF-300", ..fleet.ctx() };
    let refusal = refused(verify_delivery(&fleet.deliver(&r), &ctx, nothing_held));
    assert_eq!(refusal.code, code::UNKNOWN_MODEL, "{refusal}");
}

#[test]
fn older_firmware_than_required_is_refused() {
    let fleet = Fleet::new();
    for firmware in ["1.9.9", "1.99.0", "banana", "2.0", ""] {
        let ctx = DeviceContext { firmware_version: firmware, ..fleet.ctx() };
        let r = refused(verify_delivery(&fleet.deliver(&recipe(1)), &ctx, nothing_held));
        assert_eq!(r.code, code::FIRMWARE_TOO_OLD, "{firmware}: {r}");
        assert!(r.reason.contains("2.0.0 or newer"), "{r}");
    }
    // Compared as numbers, not text.
    let mut r = recipe(1);
    r.equipment.as_mut().unwrap().min_firmware = "2.9.0".into();
    let ctx = DeviceContext { firmware_version: "2.10.0", ..fleet.ctx() };
    verify_delivery(&fleet.deliver(&r), &ctx, nothing_held).unwrap();
}
