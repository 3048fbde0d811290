//! Cartridge inventory against a real server and simulated devices over mutual TLS:
//! a type and its lots, QA's release, a shipment received by scans with its logger's
//! readings, a cold-chain excursion that blocks cartridges, runs consuming cartridges,
//! stock with its replenishment, and a recall signed by QA that reaches every device as
//! a deny list (the offline one when it connects), stops the lot on the device, and
//! prints the trace of runs and patients. Every bad input is refused by name, and
//! nothing of a refused request is applied.

use std::time::Duration;

use nanofleet_proto::device::v1::SignatureMeaning;
use nanofleet_proto::v1 as pb;
use nanofleet_proto::v1::batch_service_client::BatchServiceClient;
use nanofleet_proto::v1::inventory_service_client::InventoryServiceClient;
use nanofleet_proto::v1::recipe_service_client::RecipeServiceClient;
use nanofleet_recipe::example::EXAMPLE_GTIN;
use nanofleet_tests::agent::start_sim_device;
use nanofleet_tests::{Sandbox, eventually, now_ms};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Authed = InterceptedService<Channel, nanofleet::cli::Bearer>;
type Inventory = InventoryServiceClient<Authed>;

async fn inventory_as(
    sb: &Sandbox,
    id: &str,
    role: pb::Role,
    site: &str,
) -> anyhow::Result<(Inventory, String)> {
    let (bearer, password) = sb.person_named(id, id, role, site).await?;
    Ok((InventoryServiceClient::with_interceptor(sb.grpc_channel().await?, bearer), password))
}

fn readings(from_ms: i64, minutes: i64, celsius: impl Fn(i64) -> f64) -> Vec<pb::TemperatureReading> {
    (0..=minutes)
        .map(|m| pb::TemperatureReading { time_unix_ms: from_ms + m * 60_000, celsius: celsius(m) })
        .collect()
}

fn invalid(e: &tonic::Status, field: &str) {
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains(field), "{:?} does not name {field}", e.message());
}

async fn stock_of(inv: &mut Inventory, site: &str) -> anyhow::Result<pb::StockLine> {
    let lines = inv.get_stock(pb::GetStockRequest { site_id: site.into() }).await?.into_inner().lines;
    Ok(lines.into_iter().find(|l| l.gtin == EXAMPLE_GTIN).unwrap_or_default())
}

/// A refrigerated type for the example GTIN.
async fn add_example_type(ops: &mut Inventory) -> anyhow::Result<()> {
    let kind = pb::CartridgeType {
        gtin: EXAMPLE_GTIN.into(),
        name: "Example LNP cartridge 2 mL".into(),
        payload: "mRNA".into(),
        volume_ml: 2.0,
        storage_class: "refrigerated".into(),
        excursion_limit_min: 30,
        device_models: vec![],
        lead_time_days: 5,
        recipe_ids: vec![],
    };
    ops.create_cartridge_type(pb::CreateCartridgeTypeRequest { cartridge_type: Some(kind) }).await?;
    Ok(())
}

/// A lot of `quantity` example cartridges, released by QA and all shipped to `site`.
async fn shipped_lot(
    ops: &mut Inventory,
    qa: &mut Inventory,
    lot: &str,
    quantity: u32,
    site: &str,
) -> anyhow::Result<pb::Shipment> {
    let create = pb::CreateLotRequest {
        gtin: EXAMPLE_GTIN.into(),
        lot: lot.into(),
        produced: "2026-11-01".into(),
        expires: "2028-06-30".into(),
        quantity,
    };
    ops.create_lot(create).await?;
    qa.release_lot(pb::ReleaseLotRequest { gtin: String::new(), lot: lot.into(), reason: "ok".into() })
        .await?;
    let ship = pb::ShipCartridgesRequest {
        gtin: EXAMPLE_GTIN.into(),
        lot: lot.into(),
        site_id: site.into(),
        count: quantity,
    };
    let shipment = ops.ship_cartridges(ship).await?.into_inner().shipment;
    shipment.ok_or_else(|| anyhow::anyhow!("ShipCartridges answered without a shipment"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cartridges_move_from_lot_to_patient_and_a_recall_stops_the_lot_everywhere() -> anyhow::Result<()> {
    let sb = Sandbox::start().await?;
    let online = sb.enroll_device("site-b", "NF-B-01").await?;
    let later = sb.enroll_device("site-b", "NF-B-02").await?;
    sb.server.ensure_site("site-c", "Site C", "UTC").await?;
    let mut ops = InventoryServiceClient::with_interceptor(sb.grpc_channel().await?, sb.admin());
    let (mut qa, qa_password) = inventory_as(&sb, "quinn", pb::Role::Qa, "").await?;
    let (mut bob, _) = inventory_as(&sb, "bob", pb::Role::Pharmacist, "site-b").await?;
    let (mut carol, _) = inventory_as(&sb, "carol", pb::Role::Pharmacist, "site-c").await?;
    let store = sb.server.store.clone();

    // The catalogue: bad input named, then a type and a lot.
    let kind = pb::CartridgeType {
        gtin: EXAMPLE_GTIN.into(),
        name: "Example LNP cartridge 2 mL".into(),
        payload: "mRNA, SM-102 lipid mix".into(),
        volume_ml: 2.0,
        storage_class: "ultra-cold".into(),
        excursion_limit_min: 30,
        device_models: vec!["NF-200".into()],
        lead_time_days: 5,
        recipe_ids: vec![],
    };
    let mut bad = kind.clone();
    bad.gtin = "10614141000018".into();
    let e = ops
        .create_cartridge_type(pb::CreateCartridgeTypeRequest { cartridge_type: Some(bad) })
        .await
        .unwrap_err();
    invalid(&e, "check digit 8");
    let mut bad = kind.clone();
    bad.storage_class = "warm".into();
    let e = ops
        .create_cartridge_type(pb::CreateCartridgeTypeRequest { cartridge_type: Some(bad) })
        .await
        .unwrap_err();
    invalid(&e, "storage_class");
    ops.create_cartridge_type(pb::CreateCartridgeTypeRequest { cartridge_type: Some(kind.clone()) }).await?;
    let lot = |lot: &str, quantity: u32| pb::CreateLotRequest {
        gtin: EXAMPLE_GTIN.into(),
        lot: lot.into(),
        produced: "2026-11-01".into(),
        expires: "2028-12-31".into(),
        quantity,
    };
    let e = ops
        .create_lot(pb::CreateLotRequest { gtin: "09506000134352".into(), ..lot("L1", 10) })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{}", e.message());
    let e = ops.create_lot(lot("A-LOT-NUMBER-TOO-LONG", 10)).await.unwrap_err();
    invalid(&e, "at most 20");
    ops.create_lot(lot("L1", 12)).await?;

    // Shipped only once QA released it; QA only.
    let ship = |count: u32| pb::ShipCartridgesRequest {
        gtin: EXAMPLE_GTIN.into(),
        lot: "L1".into(),
        site_id: "site-b".into(),
        count,
    };
    let e = ops.ship_cartridges(ship(4)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{}", e.message());
    let e = ops
        .release_lot(pb::ReleaseLotRequest { gtin: String::new(), lot: "L1".into(), reason: String::new() })
        .await;
    assert_eq!(e.unwrap_err().code(), tonic::Code::PermissionDenied);
    qa.release_lot(pb::ReleaseLotRequest {
        gtin: String::new(),
        lot: "L1".into(),
        reason: "CoA reviewed".into(),
    })
    .await?;
    let e = ops.ship_cartridges(ship(13)).await.unwrap_err();
    invalid(&e, "at most 12");
    let shipment = ops.ship_cartridges(ship(4)).await?.into_inner().shipment.unwrap();
    assert_eq!(shipment.codes.len(), 4);

    // Receipt at the site: the wrong site, a bad scan and a stranger's serial are
    // refused, and none of them moves a cartridge.
    let now = now_ms();
    let cold = readings(now - 3_600_000, 60, |m| -75.0 + (m % 3) as f64);
    let receive =
        |site: &str, scans: Vec<String>, readings: Vec<pb::TemperatureReading>| pb::ReceiveShipmentRequest {
            shipment_id: shipment.shipment_id.clone(),
            site_id: site.into(),
            scans,
            readings,
        };
    let e =
        carol.receive_shipment(receive("site-b", shipment.codes.clone(), cold.clone())).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{}", e.message());
    let e = ops.receive_shipment(receive("site-c", shipment.codes.clone(), cold.clone())).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("goes to site site-b"), "{}", e.message());
    let mut scans = shipment.codes.clone();
    scans[2] = scans[2].replacen(EXAMPLE_GTIN, "10614141000018", 1);
    let e = bob.receive_shipment(receive("site-b", scans, cold.clone())).await.unwrap_err();
    invalid(&e, "scan 3: (01) GTIN 10614141000018 ends in check digit 8");
    let mut scans = shipment.codes.clone();
    scans[3] = scans[3].replace("10L1\u{1d}", "10L9\u{1d}");
    let e = bob.receive_shipment(receive("site-b", scans, cold.clone())).await.unwrap_err();
    invalid(&e, "belongs to lot L1");
    let mut scans = shipment.codes.clone();
    scans.push(scans[0].clone());
    let e = bob.receive_shipment(receive("site-b", scans, cold.clone())).await.unwrap_err();
    invalid(&e, "scanned twice");
    assert_eq!(stock_of(&mut bob, "site-b").await?.on_hand, 0, "nothing of a refused receipt applied");
    let got =
        bob.receive_shipment(receive("site-b", shipment.codes.clone(), cold.clone())).await?.into_inner();
    assert_eq!((got.received, got.blocked), (4, 0));
    let e = bob.receive_shipment(receive("site-b", shipment.codes.clone(), cold.clone())).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "a second receipt: {}", e.message());
    assert_eq!(stock_of(&mut bob, "site-b").await?.on_hand, 4);

    // A second shipment sat 40 minutes at -50 °C: received and blocked.
    let warm = ops.ship_cartridges(ship(2)).await?.into_inner().shipment.unwrap();
    let thawed = readings(now - 3_600_000, 60, |m| if (10..50).contains(&m) { -50.0 } else { -75.0 });
    let got = bob
        .receive_shipment(pb::ReceiveShipmentRequest {
            shipment_id: warm.shipment_id.clone(),
            site_id: "site-b".into(),
            scans: warm.codes.clone(),
            readings: thawed,
        })
        .await?
        .into_inner();
    assert_eq!((got.received, got.blocked), (2, 2), "{got:?}");
    assert!(got.excursion_minutes >= 40.0, "{got:?}");
    assert_eq!(stock_of(&mut bob, "site-b").await?.on_hand, 4, "blocked cartridges are not stock");

    // Devices, and a recipe for the type, written by a pharmacist and approved by QA.
    let state_online = tempfile::tempdir()?;
    let state_later = tempfile::tempdir()?;
    let _stop_online = start_sim_device(&sb, &online, state_online.path(), None)?;
    let stop_later = start_sim_device(&sb, &later, state_later.path(), None)?;
    let channel = sb.grpc_channel().await?;
    let (paula, paula_password) =
        sb.person_named("paula", "Paula Reyes, PharmD", pb::Role::Pharmacist, "site-b").await?;
    let (quentin, quentin_password) = sb.person_named("quentin", "Quentin Ade", pb::Role::Qa, "").await?;
    let mut paula_recipes = RecipeServiceClient::with_interceptor(channel.clone(), paula.clone());
    let mut runs = BatchServiceClient::with_interceptor(channel.clone(), paula);
    let recipe = nanofleet_tests::quick_recipe("inv-x", "site-b", 12, 9.0);
    paula_recipes.save_draft(pb::SaveDraftRequest { recipe: Some(recipe) }).await?;
    for (mut client, user, password, meaning) in [
        (paula_recipes.clone(), "paula", paula_password.clone(), SignatureMeaning::Authored),
        (
            RecipeServiceClient::with_interceptor(channel.clone(), quentin),
            "quentin",
            quentin_password,
            SignatureMeaning::Approved,
        ),
    ] {
        let req = pb::SignRecipeRequest {
            recipe_id: "inv-x".into(),
            version: 1,
            meaning: meaning as i32,
            user_id: user.into(),
            password,
        };
        client.sign_recipe(req).await?;
    }
    for device in ["NF-B-01", "NF-B-02"] {
        eventually("the recipe accepted", Duration::from_secs(30), || async {
            store
                .recipe_deliveries("inv-x", 1)
                .await
                .ok()?
                .into_iter()
                .find(|d| d.device_id == device && d.state == "accepted")
        })
        .await?;
    }
    // Both devices took the deny list that carries the blocked cartridges.
    eventually("deny list v1 on both devices", Duration::from_secs(30), || async {
        let s = ops.clone().get_deny_list_status(pb::GetDenyListStatusRequest {}).await.ok()?.into_inner();
        (s.version == 1 && s.cartridges == 2 && s.devices_acked == 2).then_some(())
    })
    .await?;

    // The pharmacist loads a cartridge; the device reads its code and judges the run.
    let run = |scan: &str, n: u32| pb::StartRunRequest {
        device_id: "NF-B-01".into(),
        recipe_id: "inv-x".into(),
        recipe_version: 0,
        cartridge: None,
        prescription_id: format!("RX-{n:04}"),
        prescription_unix_ms: now_ms() - 3_600_000,
        patient_pseudonym: format!("PT-{n:04X}"),
        cartridge_scan: scan.into(),
    };
    let scan = |code: &str| pb::ScanCartridgeRequest {
        scan: code.into(),
        device_id: "NF-B-01".into(),
        recipe_id: "inv-x".into(),
    };
    // A blocked cartridge: the scan says why, and the device refuses it.
    let blocked = bob.scan_cartridge(scan(&warm.codes[0])).await?.into_inner();
    assert!(!blocked.usable && blocked.problems.iter().any(|p| p.contains("blocked")), "{blocked:?}");
    let answer = runs.start_run(run(&warm.codes[0], 1)).await?.into_inner();
    assert_eq!((answer.accepted, answer.code.as_str()), (false, "cartridge_blocked"), "{answer:?}");
    // A code the device cannot read is refused by name.
    let misread = shipment.codes[0].replacen(EXAMPLE_GTIN, "10614141000018", 1);
    let answer = runs.start_run(run(&misread, 9)).await?.into_inner();
    assert_eq!((answer.accepted, answer.code.as_str()), (false, "cartridge_unreadable"), "{answer:?}");
    assert!(answer.reason.contains("ends in check digit 8"), "{answer:?}");

    // A good cartridge runs and is consumed; the stock follows.
    let good = bob.scan_cartridge(scan(&shipment.codes[0])).await?.into_inner();
    assert!(good.usable, "{good:?}");
    let answer = runs.start_run(run(&shipment.codes[0], 2)).await?.into_inner();
    assert!(answer.accepted, "{answer:?}");
    let serial = good.code.as_ref().unwrap().serial.clone();
    let used = eventually("the cartridge consumed", Duration::from_secs(90), || async {
        store.cartridge(EXAMPLE_GTIN, &serial).await.ok()?.filter(|c| c.status == "consumed")
    })
    .await?;
    assert!(!used.batch_id.is_empty());
    let line = stock_of(&mut bob, "site-b").await?;
    assert_eq!(line.on_hand, 3);
    assert!(line.consumption_per_day > 0.0, "{line:?}");
    let again = bob.scan_cartridge(scan(&shipment.codes[0])).await?.into_inner();
    assert!(again.problems.iter().any(|p| p.contains("consumed")), "{again:?}");
    let answer = runs.start_run(run(&shipment.codes[0], 3)).await?.into_inner();
    assert_eq!(answer.code, "cartridge_used", "a cartridge runs once: {answer:?}");

    // One device goes offline before the recall.
    stop_later.cancel();
    eventually("NF-B-02 offline", Duration::from_secs(30), || async {
        store.get_device("NF-B-02").await.ok()?.filter(|d| !d.online)
    })
    .await?;

    // The recall: QA only, with the right password, once.
    let recall = |password: &str| pb::RecallLotRequest {
        gtin: EXAMPLE_GTIN.into(),
        lot: "L1".into(),
        reason: "endotoxin above the limit in retained samples".into(),
        user_id: "quinn".into(),
        password: password.into(),
    };
    let e = bob.recall_lot(pb::RecallLotRequest { user_id: "bob".into(), ..recall("x") }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{}", e.message());
    assert!(qa.recall_lot(recall("wrong password")).await.is_err());
    let e = qa
        .recall_lot(pb::RecallLotRequest { reason: String::new(), ..recall(&qa_password) })
        .await
        .unwrap_err();
    invalid(&e, "reason");
    let started = std::time::Instant::now();
    let r = qa.recall_lot(recall(&qa_password)).await?.into_inner();
    assert_eq!(r.recall.as_ref().map(|x| x.deny_list_version), Some(2));
    assert_eq!(r.runs.len(), 1, "{r:?}");
    assert_eq!(
        (r.runs[0].patient_pseudonym.as_str(), r.runs[0].prescription_id.as_str()),
        ("PT-0002", "RX-0002")
    );
    assert_eq!(r.runs[0].batch_id, used.batch_id);
    assert!(
        r.places.iter().any(|p| p.site_id == "site-b" && p.status == "in-stock" && p.count == 3),
        "{:?}",
        r.places
    );
    let e = qa.recall_lot(recall(&qa_password)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "recalled once: {}", e.message());

    // The online device acknowledges within seconds; the offline one is shown pending.
    let status = eventually("NF-B-01 acknowledged the recall", Duration::from_secs(10), || async {
        let s = ops.clone().get_deny_list_status(pb::GetDenyListStatusRequest {}).await.ok()?.into_inner();
        (s.version == 2 && s.devices_acked == 1).then_some(s)
    })
    .await?;
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(
        status.pending.iter().map(|p| (p.device_id.as_str(), p.online)).collect::<Vec<_>>(),
        [("NF-B-02", false)]
    );
    assert_eq!(stock_of(&mut bob, "site-b").await?.on_hand, 0, "a recalled lot is not stock");

    // The device refuses the recalled lot on its own.
    let next = bob.scan_cartridge(scan(&shipment.codes[1])).await?.into_inner();
    assert!(next.problems.iter().any(|p| p.contains("recalled")), "{next:?}");
    let answer = runs.start_run(run(&shipment.codes[1], 4)).await?.into_inner();
    assert_eq!((answer.accepted, answer.code.as_str()), (false, "cartridge_recalled"), "{answer:?}");
    assert!(answer.reason.contains("deny list v2"), "{answer:?}");

    // The offline device gets it when it connects again.
    let _stop_later = start_sim_device(&sb, &later, state_later.path(), None)?;
    eventually("NF-B-02 acknowledged on reconnect", Duration::from_secs(30), || async {
        let s = ops.clone().get_deny_list_status(pb::GetDenyListStatusRequest {}).await.ok()?.into_inner();
        (s.devices_acked == 2 && s.pending.is_empty()).then_some(())
    })
    .await?;

    // The lot's page and the audit chain keep it.
    let lot = ops.get_lot(pb::GetLotRequest { gtin: String::new(), lot: "L1".into() }).await?.into_inner();
    assert_eq!(lot.lot.as_ref().map(|l| l.status.as_str()), Some("recalled"));
    assert_eq!(lot.recalls.len(), 1);
    let audit = store
        .list_audit(&nanofleet_store::AuditFilter { action: Some("lot.recall".into()), ..Default::default() })
        .await?;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].entry.actor, "person:quinn");
    let events = ops
        .get_cartridge(pb::GetCartridgeRequest { gtin: EXAMPLE_GTIN.into(), serial })
        .await?
        .into_inner()
        .events;
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["made", "shipped", "received", "loaded", "consumed"], "the device reported the load");
    assert_eq!((events[3].device_id.as_str(), events[3].actor.as_str()), ("NF-B-01", "device:NF-B-01"));
    // The loads the device refused are in the audit trail, with the interlock.
    let refused = eventually("three refused loads audited", Duration::from_secs(10), || async {
        let audit = store
            .list_audit(&nanofleet_store::AuditFilter {
                action: Some("cartridge.load.refused".into()),
                ..Default::default()
            })
            .await
            .ok()?;
        (audit.len() == 3).then_some(audit)
    })
    .await?;
    let mut codes: Vec<&str> = refused
        .iter()
        .filter_map(|a| {
            ["cartridge_blocked", "cartridge_used", "cartridge_recalled"]
                .into_iter()
                .find(|c| a.entry.reason.contains(c))
        })
        .collect();
    codes.sort_unstable();
    assert_eq!(codes, ["cartridge_blocked", "cartridge_recalled", "cartridge_used"]);
    assert!(refused.iter().all(|a| a.entry.actor == "device:NF-B-01"));

    // Past the lots' expiry, every unused cartridge gets its `expired` event; a used one
    // keeps its history.
    let later = now_ms() + 3 * 365 * 86_400_000;
    let expired = sb.server.inventory.expire_due(later).await?;
    assert_eq!(expired, 12 - 1 - 2, "all of L1 but the consumed and the two blocked cartridges");
    assert_eq!(sb.server.inventory.expire_due(later).await?, 0, "once");
    let unused = store.cartridge(EXAMPLE_GTIN, &next.code.as_ref().unwrap().serial).await?.unwrap();
    assert_eq!(unused.status, "expired");
    assert_eq!(store.cartridge(EXAMPLE_GTIN, &used.serial).await?.unwrap().status, "consumed");
    Ok(())
}

/// A batch record stored just before a crash, whose cartridge's consumption was never
/// written: the restart catches it up, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumption_cut_off_by_a_crash_is_caught_up_at_the_next_start() -> anyhow::Result<()> {
    let sb = Sandbox::start().await?;
    sb.server.ensure_site("site-b", "Site B", "UTC").await?;
    let mut ops = InventoryServiceClient::with_interceptor(sb.grpc_channel().await?, sb.admin());
    let (mut qa, _) = inventory_as(&sb, "quinn", pb::Role::Qa, "").await?;
    add_example_type(&mut ops).await?;
    let shipment = shipped_lot(&mut ops, &mut qa, "L7", 2, "site-b").await?;
    let now = now_ms();
    ops.receive_shipment(pb::ReceiveShipmentRequest {
        shipment_id: shipment.shipment_id.clone(),
        site_id: "site-b".into(),
        scans: shipment.codes.clone(),
        readings: readings(now - 1_800_000, 30, |_| 5.0),
    })
    .await?;
    let serial = sb.server.store.shipment_cartridges(&shipment.shipment_id).await?[0].serial.clone();

    // The batch's cartridge row, as the record's transaction wrote it; no event.
    let pool =
        sqlx::SqlitePool::connect(&format!("sqlite://{}", sb.dir.path().join("nanofleet.db").display()))
            .await?;
    sqlx::query(
        "INSERT INTO batch_cartridges (batch_id, gtin, lot, serial, device_id, site_id, prescription_id, \
         patient_pseudonym, started_ms) VALUES ('B-CUT', $1, 'L7', $2, 'NF-B-01', 'site-b', 'RX-1', 'PT-1', $3)",
    )
    .bind(EXAMPLE_GTIN)
    .bind(&serial)
    .bind(now)
    .execute(&pool)
    .await?;
    pool.close().await;
    assert_eq!(stock_of(&mut ops, "site-b").await?.on_hand, 2);

    assert_eq!(sb.server.inventory.reconcile().await?, 1);
    let c = sb.server.store.cartridge(EXAMPLE_GTIN, &serial).await?.unwrap();
    assert_eq!((c.status.as_str(), c.batch_id.as_str()), ("consumed", "B-CUT"));
    assert_eq!(stock_of(&mut ops, "site-b").await?.on_hand, 1);
    assert_eq!(sb.server.inventory.reconcile().await?, 0, "once");
    Ok(())
}

/// The loads devices report: a cartridge loaded before it was scanned in at its site has
/// arrived there, a repeat changes nothing, a refusal and a load the inventory cannot
/// apply are audited, and the shipment's receipt later takes the loaded cartridge as
/// already there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loads_reported_by_devices_move_cartridges_into_them() -> anyhow::Result<()> {
    use nanofleet_proto::device::v1::CartridgeLoad;
    let sb = Sandbox::start().await?;
    sb.enroll_device("site-b", "NF-B-01").await?;
    sb.enroll_device("site-c", "NF-C-01").await?;
    let mut ops = InventoryServiceClient::with_interceptor(sb.grpc_channel().await?, sb.admin());
    let (mut qa, _) = inventory_as(&sb, "quinn", pb::Role::Qa, "").await?;
    add_example_type(&mut ops).await?;
    let shipment = shipped_lot(&mut ops, &mut qa, "L8", 3, "site-b").await?;
    let serials: Vec<String> = sb
        .server
        .store
        .shipment_cartridges(&shipment.shipment_id)
        .await?
        .into_iter()
        .map(|c| c.serial)
        .collect();
    let inventory = &sb.server.inventory;
    let load = |serial: &str, accepted: bool| CartridgeLoad {
        gtin: EXAMPLE_GTIN.into(),
        lot: "L8".into(),
        serial: serial.into(),
        expires_unix_ms: now_ms() + 86_400_000,
        request_id: "RQ-1".into(),
        accepted,
        code: if accepted { String::new() } else { "cartridge_expired".into() },
        reason: if accepted { String::new() } else { "expired yesterday".into() },
        batch_id: if accepted { "NF-B-01-20261127-120000".into() } else { String::new() },
    };
    let now = now_ms();
    let receipt = |s: &pb::Shipment, readings: Vec<pb::TemperatureReading>| pb::ReceiveShipmentRequest {
        shipment_id: s.shipment_id.clone(),
        site_id: "site-b".into(),
        scans: s.codes.clone(),
        readings,
    };

    // Loaded before its scan-in: in the device, at the site.
    inventory.loaded("NF-B-01", now, &load(&serials[0], true)).await?;
    let c = sb.server.store.cartridge(EXAMPLE_GTIN, &serials[0]).await?.unwrap();
    assert_eq!(
        (c.status.as_str(), c.device_id.as_str(), c.site_id.as_str()),
        ("loaded", "NF-B-01", "site-b")
    );
    // Reported twice (a re-sent event): one event.
    inventory.loaded("NF-B-01", now, &load(&serials[0], true)).await?;
    let kinds =
        |events: Vec<nanofleet_store::CartridgeEvent>| events.into_iter().map(|e| e.kind).collect::<Vec<_>>();
    assert_eq!(
        kinds(sb.server.store.cartridge_events(EXAMPLE_GTIN, &serials[0]).await?),
        ["made", "shipped", "loaded"]
    );
    // A device at another site: not applied, audited.
    inventory.loaded("NF-C-01", now, &load(&serials[1], true)).await?;
    assert_eq!(sb.server.store.cartridge(EXAMPLE_GTIN, &serials[1]).await?.unwrap().status, "in-transit");
    // A refused load changes nothing, and is audited, once however often it is re-sent.
    inventory.loaded("NF-B-01", now, &load(&serials[2], false)).await?;
    inventory.loaded("NF-B-01", now, &load(&serials[2], false)).await?;
    inventory.loaded("NF-C-01", now, &load(&serials[1], true)).await?;
    assert_eq!(sb.server.store.cartridge(EXAMPLE_GTIN, &serials[2]).await?.unwrap().status, "in-transit");
    // A cartridge the inventory does not know: nothing to do.
    inventory.loaded("NF-B-01", now, &load("9999-000001", true)).await?;
    for (action, reason) in [
        ("cartridge.load.unrecorded", "shipped to site site-b, not site-c"),
        ("cartridge.load.refused", "expired yesterday (cartridge_expired)"),
    ] {
        let audit = sb
            .server
            .store
            .list_audit(&nanofleet_store::AuditFilter { action: Some(action.into()), ..Default::default() })
            .await?;
        assert_eq!(audit.len(), 1, "{action}: {audit:?}");
        assert!(audit[0].entry.reason.contains(reason), "{action}: {:?}", audit[0].entry.reason);
    }

    // The shipment arrives: the loaded cartridge is already there, the others are received.
    let got =
        ops.receive_shipment(receipt(&shipment, readings(now - 1_800_000, 30, |_| 5.0))).await?.into_inner();
    assert_eq!((got.received, got.blocked), (3, 0), "{got:?}");
    assert_eq!(stock_of(&mut ops, "site-b").await?.on_hand, 3, "two on the shelf and one in a device");
    assert_eq!(sb.server.store.cartridge(EXAMPLE_GTIN, &serials[0]).await?.unwrap().status, "loaded");
    // Received once: the loaded cartridge's scan-in is not counted again.
    let again =
        ops.receive_shipment(receipt(&shipment, readings(now - 1_800_000, 30, |_| 5.0))).await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition, "{}", again.message());

    // A second shipment, one cartridge loaded before a scan-in that reveals a warm
    // journey: the loaded cartridge is blocked with the others.
    let warm = shipped_lot(&mut ops, &mut qa, "L9", 2, "site-b").await?;
    let warm_serials: Vec<String> =
        sb.server.store.shipment_cartridges(&warm.shipment_id).await?.into_iter().map(|c| c.serial).collect();
    inventory
        .loaded("NF-B-01", now, &CartridgeLoad { lot: "L9".into(), ..load(&warm_serials[0], true) })
        .await?;
    let got = ops
        .receive_shipment(receipt(&warm, readings(now - 3_600_000, 60, |m| if m < 45 { 20.0 } else { 5.0 })))
        .await?
        .into_inner();
    assert_eq!((got.received, got.blocked), (2, 2), "{got:?}");
    for serial in &warm_serials {
        assert_eq!(sb.server.store.cartridge(EXAMPLE_GTIN, serial).await?.unwrap().status, "blocked");
    }
    Ok(())
}
