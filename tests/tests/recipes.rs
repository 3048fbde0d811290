//! Recipes from draft to release against a real server: validation, both
//! electronic signatures with the signer's password, the separation of author and
//! approver, the trust root growing a key per signer, immutability after release,
//! and every step in the audit chain.

use nanofleet_proto::Message as _;
use nanofleet_proto::device::v1::{Envelope, Recipe, RecipeDelivery, SignatureMeaning, Targets};
use nanofleet_proto::v1 as pb;
use nanofleet_proto::v1::audit_service_client::AuditServiceClient;
use nanofleet_proto::v1::people_service_client::PeopleServiceClient;
use nanofleet_proto::v1::recipe_service_client::RecipeServiceClient;
use nanofleet_tests::Sandbox;
use tonic::transport::Channel;

type Client =
    RecipeServiceClient<tonic::service::interceptor::InterceptedService<Channel, nanofleet::cli::Bearer>>;

/// A person with a role, their API client and their password.
struct Signer {
    id: String,
    password: String,
    recipes: Client,
}

async fn signer(sb: &Sandbox, id: &str, name: &str, role: pb::Role, site: &str) -> anyhow::Result<Signer> {
    let (bearer, password) = sb.person_named(id, name, role, site).await?;
    let recipes = RecipeServiceClient::with_interceptor(sb.grpc_channel().await?, bearer);
    Ok(Signer { id: id.into(), password, recipes })
}

impl Signer {
    async fn sign(
        &mut self,
        recipe_id: &str,
        version: u32,
        meaning: SignatureMeaning,
    ) -> Result<pb::RecipeVersion, tonic::Status> {
        self.sign_as(recipe_id, version, meaning, &self.id.clone(), &self.password.clone()).await
    }

    async fn sign_as(
        &mut self,
        recipe_id: &str,
        version: u32,
        meaning: SignatureMeaning,
        user: &str,
        password: &str,
    ) -> Result<pb::RecipeVersion, tonic::Status> {
        let req = pb::SignRecipeRequest {
            recipe_id: recipe_id.into(),
            version,
            meaning: meaning as i32,
            user_id: user.into(),
            password: password.into(),
        };
        Ok(self.recipes.sign_recipe(req).await?.into_inner().recipe.unwrap_or_default())
    }

    async fn save(&mut self, recipe: Recipe) -> Result<pb::RecipeVersion, tonic::Status> {
        Ok(self
            .recipes
            .save_draft(pb::SaveDraftRequest { recipe: Some(recipe) })
            .await?
            .into_inner()
            .recipe
            .unwrap_or_default())
    }
}

fn recipe(id: &str, site: &str) -> Recipe {
    let targets = Targets { site_ids: vec![site.into()], device_ids: vec![] };
    nanofleet_recipe::example::example(id, 0, targets, nanofleet_tests::now_ms())
}

fn expect_err(r: Result<pb::RecipeVersion, tonic::Status>, code: tonic::Code, text: &str) {
    match r {
        Ok(v) => panic!("expected {code:?} ({text}), got {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "{}", s.message());
            assert!(s.message().contains(text), "{:?} does not contain {text:?}", s.message());
        }
    }
}

#[tokio::test]
async fn a_recipe_needs_its_author_and_a_second_person_to_be_released() -> anyhow::Result<()> {
    let sb = Sandbox::start().await?;
    sb.enroll_device("site-a", "NF-A-01").await?;
    sb.enroll_device("site-b", "NF-B-01").await?;
    let mut alice = signer(&sb, "alice", "Alice Martin, PharmD", pb::Role::Pharmacist, "site-a").await?;
    let mut quinn = signer(&sb, "quinn", "Quinn Okafor", pb::Role::Qa, "").await?;

    // Field checks name the field, the value and the range.
    let mut bad = recipe("flu-h5", "site-a");
    bad.formula.as_mut().unwrap().lipids.as_mut().unwrap().cholesterol = 37.5;
    expect_err(alice.save(bad).await, tonic::Code::InvalidArgument, "formula.lipids");
    let mut bad = recipe("flu-h5", "site-a");
    bad.formula.as_mut().unwrap().total_flow_ml_min = 25.0;
    expect_err(alice.save(bad).await, tonic::Code::InvalidArgument, "total_flow_ml_min");
    // A pharmacist targets their own site only.
    expect_err(alice.save(recipe("flu-h5", "site-b")).await, tonic::Code::PermissionDenied, "site-a");

    let v1 = alice.save(recipe("flu-h5", "site-a")).await?;
    assert_eq!(v1.recipe.as_ref().unwrap().version, 1);
    assert_eq!(v1.status, pb::RecipeStatus::Draft as i32);
    // Saving again keeps the open draft.
    let again = alice.save(recipe("flu-h5", "site-a")).await?;
    assert_eq!(again.recipe.as_ref().unwrap().version, 1);

    // Roles, identity and password are checked before anything is signed.
    expect_err(
        alice.sign("flu-h5", 1, SignatureMeaning::Approved).await,
        tonic::Code::PermissionDenied,
        "qa",
    );
    expect_err(
        quinn.sign("flu-h5", 1, SignatureMeaning::Authored).await,
        tonic::Code::PermissionDenied,
        "pharmacist",
    );
    expect_err(
        alice.sign_as("flu-h5", 1, SignatureMeaning::Authored, "quinn", &quinn.password.clone()).await,
        tonic::Code::PermissionDenied,
        "signed-in person",
    );
    expect_err(
        alice.sign_as("flu-h5", 1, SignatureMeaning::Authored, "alice", "not her password").await,
        tonic::Code::Unauthenticated,
        "wrong",
    );
    // Approval before authoring is out of order.
    expect_err(
        quinn.sign("flu-h5", 1, SignatureMeaning::Approved).await,
        tonic::Code::FailedPrecondition,
        "draft",
    );

    let authored = alice.sign("flu-h5", 1, SignatureMeaning::Authored).await?;
    assert_eq!(authored.status, pb::RecipeStatus::Authored as i32);
    let sig = &authored.signatures[0];
    assert_eq!((sig.signer_id.as_str(), sig.printed_name.as_str()), ("alice", "Alice Martin, PharmD"));
    assert_eq!(sig.meaning, SignatureMeaning::Authored as i32);
    // Signed versions do not change.
    expect_err(
        alice.save(Recipe { version: 1, ..recipe("flu-h5", "site-a") }).await,
        tonic::Code::FailedPrecondition,
        "authored",
    );

    let released = quinn.sign("flu-h5", 1, SignatureMeaning::Approved).await?;
    assert_eq!(released.status, pb::RecipeStatus::Released as i32);
    assert!(released.released_unix_ms > 0);
    assert_eq!(released.signatures.len(), 2);
    expect_err(
        alice.save(Recipe { version: 1, ..recipe("flu-h5", "site-a") }).await,
        tonic::Code::FailedPrecondition,
        "released",
    );
    // The next change is version 2.
    assert_eq!(alice.save(recipe("flu-h5", "site-a")).await?.recipe.unwrap().version, 2);

    // Delivered to the targeted site's devices only.
    let deliveries = quinn
        .recipes
        .list_recipe_deliveries(pb::ListRecipeDeliveriesRequest { recipe_id: "flu-h5".into(), version: 1 })
        .await?
        .into_inner()
        .deliveries;
    let devices: Vec<_> = deliveries.iter().map(|d| (d.device_id.as_str(), d.state)).collect();
    assert_eq!(devices, [("NF-A-01", pb::DeliveryState::Pending as i32)]);

    // Each signer's key joined the trust root (v1 -> v2 -> v3), along a chain a device accepts.
    let root = sb.server.recipes.trust_root().await;
    assert_eq!(root.signed.version, 3);
    let docs = sb.server.store.trust_roots_after(1).await?;
    let first =
        nanofleet_pki::trust_root::TrustRoot::from_json(&sb.server.store.trust_roots_after(0).await?[0])?;
    let walked = nanofleet_recipe::verify::apply_root_updates(&first, &docs)
        .map_err(|r| anyhow::anyhow!("{}", r.reason))?;
    assert_eq!(walked, root);

    // The stored envelopes verify on a device of the site, as the agent would see them.
    let statements = sb
        .server
        .store
        .recipe_signatures("flu-h5", 1)
        .await?
        .iter()
        .map(|s| Envelope::decode(s.envelope.as_slice()))
        .collect::<Result<Vec<_>, _>>()?;
    let delivery = RecipeDelivery { statements }.encode_to_vec();
    let ctx = nanofleet_recipe::verify::DeviceContext {
        device_id: "NF-A-01",
        site_id: "site-a",
        model: "NF-200",
        firmware_version: "2.3.1",
        now_unix_ms: nanofleet_tests::now_ms(),
        root: &root,
    };
    let verified = nanofleet_recipe::verify::verify_delivery(&delivery, &ctx, |_| None)
        .map_err(|r| anyhow::anyhow!("{}: {}", r.code, r.reason))?;
    assert_eq!(verified.digest, released.digest);
    // ... and not on a device of another site.
    let other = nanofleet_recipe::verify::DeviceContext { device_id: "NF-B-01", site_id: "site-b", ..ctx };
    let refused = nanofleet_recipe::verify::verify_delivery(&delivery, &other, |_| None).unwrap_err();
    assert_eq!(refused.code, "not_targeted");

    // Every step is in the audit chain.
    let mut audit = AuditServiceClient::with_interceptor(sb.grpc_channel().await?, sb.admin());
    let records = audit
        .list_audit(pb::ListAuditRequest { limit: 1000, ..Default::default() })
        .await?
        .into_inner()
        .records;
    let actions: Vec<_> = records.iter().map(|r| (r.action.as_str(), r.subject.as_str())).collect();
    for want in [
        ("recipe.draft", "flu-h5 v1"),
        ("recipe.sign", "flu-h5 v1"),
        ("recipe.release", "flu-h5 v1"),
        ("signing-key.create", "alice"),
        ("signing-key.create", "quinn"),
        ("trust-root.update", "trust root v3"),
        ("login.failure", "alice"),
    ] {
        assert!(actions.contains(&want), "{want:?} not in the audit trail: {actions:?}");
    }
    assert!(audit.verify_audit(pb::VerifyAuditRequest::default()).await?.into_inner().intact);
    sb.stop().await;
    Ok(())
}

#[tokio::test]
async fn the_author_cannot_approve_their_own_recipe_even_as_qa() -> anyhow::Result<()> {
    let sb = Sandbox::start().await?;
    sb.server.ensure_site("site-a", "Site A", "UTC").await?;
    let mut alice = signer(&sb, "alice", "Alice Martin", pb::Role::Pharmacist, "site-a").await?;
    alice.save(recipe("sirna-x", "site-a")).await?;
    alice.sign("sirna-x", 1, SignatureMeaning::Authored).await?;
    // Alice moves to QA; her own recipe still needs someone else.
    let mut people = PeopleServiceClient::with_interceptor(sb.grpc_channel().await?, sb.admin());
    people
        .grant_role(pb::GrantRoleRequest {
            person_id: "alice".into(),
            role: pb::Role::Qa as i32,
            site_id: String::new(),
            reason: "moved to QA".into(),
        })
        .await?;
    expect_err(
        alice.sign("sirna-x", 1, SignatureMeaning::Approved).await,
        tonic::Code::PermissionDenied,
        "cannot approve their own",
    );
    // QA may send it back instead; then it can never be signed.
    let back = alice
        .recipes
        .reject_recipe(pb::RejectRecipeRequest {
            recipe_id: "sirna-x".into(),
            version: 1,
            reason: "N/P too low for this payload".into(),
        })
        .await?
        .into_inner()
        .recipe
        .unwrap_or_default();
    assert_eq!(back.status, pb::RecipeStatus::Rejected as i32);
    assert_eq!(back.rejected_reason, "N/P too low for this payload");
    sb.stop().await;
    Ok(())
}

#[tokio::test]
async fn released_recipes_and_signatures_cannot_be_edited_in_the_database() -> anyhow::Result<()> {
    let sb = Sandbox::start().await?;
    sb.server.ensure_site("site-a", "Site A", "UTC").await?;
    let mut alice = signer(&sb, "alice", "Alice Martin", pb::Role::Pharmacist, "site-a").await?;
    let mut quinn = signer(&sb, "quinn", "Quinn Okafor", pb::Role::Qa, "").await?;
    alice.save(recipe("mrna-y", "site-a")).await?;
    alice.sign("mrna-y", 1, SignatureMeaning::Authored).await?;
    quinn.sign("mrna-y", 1, SignatureMeaning::Approved).await?;
    let pool =
        sqlx::SqlitePool::connect(&format!("sqlite://{}", sb.dir.path().join("nanofleet.db").display()))
            .await?;
    for sql in [
        "UPDATE recipes SET name = 'changed' WHERE recipe_id = 'mrna-y'",
        "DELETE FROM recipes WHERE recipe_id = 'mrna-y'",
        "UPDATE recipe_signatures SET printed_name = 'someone else'",
        "DELETE FROM recipe_signatures",
    ] {
        let err = sqlx::query(sql).execute(&pool).await.expect_err(sql);
        assert!(err.to_string().contains("immutable") || err.to_string().contains("kept"), "{sql}: {err}");
    }
    pool.close().await;
    sb.stop().await;
    Ok(())
}

/// A simulated NF-200 with `creds` and a recipe book (kept in `state_dir` if given).
fn run_device(
    sb: &Sandbox,
    creds: &nanofleet_agent::enroll::Credentials,
    state_dir: Option<&std::path::Path>,
) -> anyhow::Result<(
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<Result<(), nanofleet_agent::link::Error>>,
)> {
    use nanofleet_agent::link::LinkOptions;
    let info = nanofleet_agent::hal::DeviceInfo {
        device_id: creds.device_id.clone(),
        site_id: creds.site_id.clone(),
        model: "NF-200".into(),
        firmware_version: "2.3.1".into(),
    };
    let book = nanofleet_agent::recipes::RecipeBook::for_device(creds, state_dir)?
        .expect("enrolled with a trust root");
    let link = LinkOptions {
        tls: Some(creds.client_config_arc()?),
        sample_interval: std::time::Duration::from_millis(50),
        batch_interval: std::time::Duration::from_millis(200),
        max_backoff: std::time::Duration::from_millis(500),
        recipes: Some(std::sync::Arc::new(std::sync::Mutex::new(book))),
        ..LinkOptions::to_broker(sb.mqtts_addr())
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(nanofleet_agent::link::run_device(
        nanofleet_agent::sim::SimDevice::new(info, 11),
        link,
        nanofleet_agent::seq::SeqCounter::from_clock(),
        cancel.clone(),
        Default::default(),
    ));
    Ok((cancel, task))
}

/// Waits until `device` answered for `recipe_id` v`version`; returns its delivery.
async fn answer(
    sb: &Sandbox,
    recipe_id: &str,
    version: i64,
    device: &str,
) -> anyhow::Result<nanofleet_store::DeliveryRecord> {
    let store = sb.server.store.clone();
    nanofleet_tests::eventually("the device's answer", std::time::Duration::from_secs(20), || async {
        let all = store.recipe_deliveries(recipe_id, version).await.ok()?;
        all.into_iter().find(|d| d.device_id == device && d.state != "pending")
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_recipes_reach_their_devices_now_or_when_they_connect() -> anyhow::Result<()> {
    let sb = Sandbox::start().await?;
    let first = sb.enroll_device("site-a", "NF-A-01").await?;
    let late = sb.enroll_device("site-a", "NF-A-02").await?;
    let mut alice = signer(&sb, "alice", "Alice Martin", pb::Role::Pharmacist, "site-a").await?;
    let mut quinn = signer(&sb, "quinn", "Quinn Okafor", pb::Role::Qa, "").await?;
    let state = tempfile::tempdir()?;
    let (stop_first, first_task) = run_device(&sb, &first, Some(state.path()))?;
    let store = sb.server.store.clone();
    nanofleet_tests::eventually("NF-A-01 online", std::time::Duration::from_secs(20), || async {
        store.get_device("NF-A-01").await.ok()?.filter(|d| d.online).map(|_| ())
    })
    .await?;

    // Released while NF-A-01 is online: it verifies both signatures against the trust
    // root (which gained both signers' keys after it enrolled) and accepts.
    alice.save(recipe("flu-h5", "site-a")).await?;
    alice.sign("flu-h5", 1, SignatureMeaning::Authored).await?;
    quinn.sign("flu-h5", 1, SignatureMeaning::Approved).await?;
    let d = answer(&sb, "flu-h5", 1, "NF-A-01").await?;
    assert_eq!((d.state.as_str(), d.code.as_str()), ("accepted", ""), "{d:?}");

    // NF-A-02 was offline at the release: it gets the recipe when it connects.
    let (stop_late, late_task) = run_device(&sb, &late, None)?;
    let d = answer(&sb, "flu-h5", 1, "NF-A-02").await?;
    assert_eq!(d.state, "accepted", "{d:?}");

    // A recipe validated for another model: the device refuses it with its reason,
    // and keeps what it had.
    let mut other = recipe("sirna-z", "site-a");
    other.equipment.as_mut().unwrap().models = vec!["NF-100".into()];
    alice.save(other).await?;
    alice.sign("sirna-z", 1, SignatureMeaning::Authored).await?;
    quinn.sign("sirna-z", 1, SignatureMeaning::Approved).await?;
    let d = answer(&sb, "sirna-z", 1, "NF-A-01").await?;
    assert_eq!((d.state.as_str(), d.code.as_str()), ("refused", "wrong_model"), "{d:?}");
    assert!(d.reason.contains("NF-200"), "{}", d.reason);
    let refusals = sb
        .server
        .store
        .list_audit(&nanofleet_store::AuditFilter {
            action: Some("recipe.refused".into()),
            ..Default::default()
        })
        .await?;
    assert!(
        refusals
            .iter()
            .any(|r| r.entry.actor == "device:NF-A-01" && r.entry.reason.starts_with("wrong_model")),
        "{refusals:?}"
    );

    // What the device accepted survives its restart.
    stop_first.cancel();
    first_task.await??;
    stop_late.cancel();
    late_task.await??;
    let root = nanofleet_pki::trust_root::TrustRoot::from_json(&first.trust_root_json)?;
    let book = nanofleet_agent::recipes::RecipeBook::open(&state.path().join("recipes"), root)?;
    assert_eq!(book.recipe("flu-h5").map(|h| h.recipe.version), Some(1));
    assert!(book.recipe("sirna-z").is_none());
    assert_eq!(book.trust_root().signed.version, 3);
    sb.stop().await;
    Ok(())
}

/// The delivery the server sends for a released version: its signed statements.
async fn stored_delivery(sb: &Sandbox, recipe_id: &str, version: i64) -> anyhow::Result<Vec<Envelope>> {
    let sigs = sb.server.store.recipe_signatures(recipe_id, version).await?;
    sigs.iter().map(|s| Ok(Envelope::decode(s.envelope.as_slice())?)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attacks_sent_to_a_device_are_refused_with_their_reason_answered_and_audited() -> anyhow::Result<()> {
    use nanofleet_proto::topics::Command;
    let sb = Sandbox::start().await?;
    let creds = sb.enroll_device("site-a", "NF-A-05").await?;
    let mut alice = signer(&sb, "alice", "Alice Martin", pb::Role::Pharmacist, "site-a").await?;
    let mut quinn = signer(&sb, "quinn", "Quinn Okafor", pb::Role::Qa, "").await?;
    let state = tempfile::tempdir()?;
    let (stop, task) = run_device(&sb, &creds, Some(state.path()))?;
    // flu-x targets another device of the site only.
    sb.enroll_device("site-a", "NF-A-06").await?;
    let mut only_a06 = recipe("flu-x", "site-a");
    only_a06.targets = Some(Targets { site_ids: vec![], device_ids: vec!["NF-A-06".into()] });
    for r in [recipe("flu-a", "site-a"), recipe("flu-b", "site-a"), only_a06] {
        let id = r.recipe_id.clone();
        alice.save(r).await?;
        alice.sign(&id, 1, SignatureMeaning::Authored).await?;
        quinn.sign(&id, 1, SignatureMeaning::Approved).await?;
    }
    alice.save(recipe("flu-a", "site-a")).await?;
    alice.sign("flu-a", 2, SignatureMeaning::Authored).await?;
    quinn.sign("flu-a", 2, SignatureMeaning::Approved).await?;
    answer(&sb, "flu-a", 2, "NF-A-05").await?;
    answer(&sb, "flu-b", 1, "NF-A-05").await?;

    let a2 = stored_delivery(&sb, "flu-a", 2).await?;
    let a1 = stored_delivery(&sb, "flu-a", 1).await?;
    let b1 = stored_delivery(&sb, "flu-b", 1).await?;
    let x1 = stored_delivery(&sb, "flu-x", 1).await?;
    let encode = |statements: Vec<Envelope>| RecipeDelivery { statements }.encode_to_vec();
    let mut flipped = a2.clone();
    flipped[0].signatures[0].sig[5] ^= 0x01;
    let mut retyped = a2.clone();
    retyped[1].payload_type = nanofleet_recipe::dsse::FIRMWARE_PAYLOAD_TYPE.into();
    let whole = encode(a2.clone());
    // A correct statement of flu-a v3 signed by a key the trust root does not list.
    let forger = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let mut v3 = recipe("flu-a", "site-a");
    v3.version = 3;
    let forged = nanofleet_recipe::sign::sign_statement(
        &nanofleet_recipe::sign::statement(
            &v3.encode_to_vec(),
            "quinn",
            "Quinn Okafor",
            SignatureMeaning::Approved,
            nanofleet_tests::now_ms(),
        ),
        &forger,
    );
    let attacks: Vec<(&str, Vec<u8>)> = vec![
        ("bad_signature", encode(flipped)),
        ("threshold_not_met", encode(vec![a2[0].clone()])),
        ("same_signer", encode(vec![a2[0].clone(), a2[0].clone()])),
        ("mixed_recipes", encode(vec![a2[0].clone(), b1[1].clone()])),
        ("key_not_in_role", encode(vec![forged])),
        ("wrong_payload_type", encode(retyped)),
        ("rollback", encode(a1)),
        ("not_targeted", encode(x1)),
        ("malformed", whole[..whole.len() - 10].to_vec()),
        ("oversized", vec![0x0a; nanofleet_recipe::MAX_DELIVERY_BYTES + 1]),
    ];
    let commands = sb.server.commands();
    let store = sb.server.store.clone();
    let refusals = || async {
        store
            .list_audit(&nanofleet_store::AuditFilter {
                action: Some("recipe.refused".into()),
                ..Default::default()
            })
            .await
            .map(|all| all.into_iter().filter(|r| r.entry.actor == "device:NF-A-05").collect::<Vec<_>>())
    };
    for (code, payload) in attacks {
        let before = refusals().await?.len();
        assert!(commands.send("NF-A-05", Command::Recipe, payload).await, "{code}: the device is connected");
        let after = nanofleet_tests::eventually(code, std::time::Duration::from_secs(20), || async {
            refusals().await.ok().filter(|all| all.len() > before)
        })
        .await?;
        let reason = &after.last().expect("one more").entry.reason;
        assert!(reason.starts_with(&format!("{code}: ")), "expected {code}, the device answered {reason:?}");
        assert!(reason.len() > code.len() + 3, "{code}: the reason says why: {reason:?}");
    }

    // Trust root attacks: a version skipped, and a rotation the old root key did not sign.
    use nanofleet_pki::trust_root::{TrustRoot, key_id, signing_key};
    let current = sb.server.recipes.trust_root().await;
    let root_key = signing_key(&sb.dir.path().join("pki"))?;
    let v4 = TrustRoot::signed_by(current.successor_body(), &[&root_key]);
    let v5 = TrustRoot::signed_by(v4.successor_body(), &[&root_key]);
    let intruder = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let mut seized = current.successor_body();
    seized.remove_key(&key_id(&root_key.verifying_key()));
    seized.add_role_key("root", &intruder.verifying_key(), None);
    let seized = TrustRoot::signed_by(seized, &[&intruder]);
    let root_refusals = || async {
        store
            .list_audit(&nanofleet_store::AuditFilter {
                action: Some("trust-root.refused".into()),
                ..Default::default()
            })
            .await
            .map(|all| all.into_iter().filter(|r| r.entry.actor == "device:NF-A-05").collect::<Vec<_>>())
    };
    for (what, documents) in
        [("a skipped version", vec![v5.to_json()]), ("a seized root", vec![seized.to_json()])]
    {
        let before = root_refusals().await?.len();
        let update = nanofleet_proto::device::v1::TrustRootUpdate { documents }.encode_to_vec();
        assert!(
            commands.send("NF-A-05", Command::TrustRoot, update).await,
            "{what}: the device is connected"
        );
        let after = nanofleet_tests::eventually(what, std::time::Duration::from_secs(20), || async {
            root_refusals().await.ok().filter(|all| all.len() > before)
        })
        .await?;
        let reason = &after.last().expect("one more").entry.reason;
        assert!(reason.starts_with("root_rejected: "), "{what}: the device answered {reason:?}");
    }

    // The device keeps what it had: flu-a v2 and flu-b v1 still run, under root v3.
    let book = nanofleet_agent::recipes::RecipeBook::open(
        &state.path().join("recipes"),
        nanofleet_pki::trust_root::TrustRoot::from_json(&creds.trust_root_json)?,
    )?;
    assert_eq!(book.recipe("flu-a").map(|h| h.recipe.version), Some(2));
    assert_eq!(book.recipe("flu-b").map(|h| h.recipe.version), Some(1));
    assert!(book.recipe("flu-x").is_none());
    assert_eq!(book.trust_root().signed.version, current.signed.version);
    stop.cancel();
    task.await??;
    sb.stop().await;
    Ok(())
}
