//! Firmware rollouts end to end: a released image goes to an enrolled simulated
//! fleet in waves over MQTT (signed offers down, reports up) and HTTPS (TUF
//! metadata and the image); a faulty build is rolled back on the device and stops
//! the rollout at the error threshold; rollouts survive a server restart.

use std::time::Duration;

use nanofleet_agent::fleet::{Fleet, FleetOptions};
use nanofleet_agent::link::LinkOptions;
use nanofleet_agent::runs::AutoRuns;
use nanofleet_proto::v1 as pb;
use nanofleet_proto::v1::audit_service_client::AuditServiceClient;
use nanofleet_proto::v1::fleet_service_client::FleetServiceClient;
use nanofleet_proto::v1::rollout_service_client::RolloutServiceClient;
use nanofleet_tests::{Sandbox, eventually, init_tracing, release_firmware};

fn fast(link: LinkOptions) -> LinkOptions {
    LinkOptions {
        sample_interval: Duration::from_millis(50),
        batch_interval: Duration::from_millis(200),
        ..link
    }
}

fn count(r: &pb::Rollout, status: &str) -> u32 {
    r.counts.iter().find(|c| c.status == status).map_or(0, |c| c.devices)
}

async fn fleet(sb: &Sandbox, state: &std::path::Path, devices: usize) -> anyhow::Result<Fleet> {
    fleet_with_runs(sb, state, devices, None).await
}

/// The fleet, with a pharmacist starting runs at every device when `runs`.
async fn fleet_with_runs(
    sb: &Sandbox,
    state: &std::path::Path,
    devices: usize,
    runs: Option<AutoRuns>,
) -> anyhow::Result<Fleet> {
    let opts = sb
        .enrolled(FleetOptions {
            sites: 1,
            devices_per_site: devices,
            link: fast(sb.link()),
            fault_rate: 0.0,
            state_dir: Some(state.to_path_buf()),
            auto_runs: runs,
            ..FleetOptions::default()
        })
        .await?;
    let fleet = Fleet::start(&opts);
    let mut api = FleetServiceClient::with_interceptor(sb.grpc_channel().await?, sb.admin());
    eventually("the fleet online", Duration::from_secs(30), || {
        let mut api = api.clone();
        async move {
            let ds = api.list_devices(pb::ListDevicesRequest::default()).await.ok()?.into_inner().devices;
            (ds.len() == devices && ds.iter().all(|d| d.online)).then_some(())
        }
    })
    .await?;
    api.list_sites(pb::ListSitesRequest {}).await?;
    Ok(fleet)
}

async fn wait_for(
    api: &RolloutServiceClient<
        tonic::service::interceptor::InterceptedService<tonic::transport::Channel, nanofleet::cli::Bearer>,
    >,
    id: &str,
    what: &str,
    done: impl Fn(&pb::Rollout) -> bool + Clone,
) -> anyhow::Result<pb::Rollout> {
    eventually(what, Duration::from_secs(60), || {
        let mut api = api.clone();
        let id = id.to_owned();
        let done = done.clone();
        async move {
            let r =
                api.get_rollout(pb::GetRolloutRequest { rollout_id: id }).await.ok()?.into_inner().rollout?;
            done(&r).then_some(r)
        }
    })
    .await
}

/// A one-hour window starting three hours from now in `time_zone`: closed now.
fn closed_window(time_zone: &str) -> anyhow::Result<String> {
    let local = jiff::Timestamp::now().to_zoned(jiff::tz::TimeZone::get(time_zone)?);
    let start = (local.hour() + 3) % 24;
    Ok(format!("daily {start:02}:00-{:02}:00", (start + 1) % 24))
}

/// A server, an enrolled fleet of `devices` with update state in `state`, a person
/// of the ops role, and a good release of 2.4.0.
struct Setup {
    sb: Sandbox,
    fleet: Fleet,
    _state: tempfile::TempDir,
    bearer: nanofleet::cli::Bearer,
    target: String,
}

async fn setup(devices: usize) -> anyhow::Result<Setup> {
    init_tracing();
    let sb = Sandbox::start().await?;
    let state = tempfile::tempdir()?;
    let fleet = fleet(&sb, state.path(), devices).await?;
    let (bearer, password) = sb.person_named("rel", "Rel Ops", pb::Role::Ops, "").await?;
    let target = release_firmware(&sb, bearer.clone(), &password, "2.4.0", "none").await?;
    Ok(Setup { sb, fleet, _state: state, bearer, target })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_reaches_the_fleet_in_waves_and_the_devices_run_it() -> anyhow::Result<()> {
    let Setup { sb, fleet, _state, bearer, target } = setup(4).await?;
    let mut api = RolloutServiceClient::with_interceptor(sb.grpc_channel().await?, bearer.clone());
    let created = api
        .create_rollout(pb::CreateRolloutRequest {
            target: target.clone(),
            waves: Some(pb::WavePlan { canary: 1, percent_steps: vec![100], ..Default::default() }),
            reason: "pump pressure fix".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .rollout
        .unwrap_or_default();
    assert_eq!((created.waves, created.state.as_str()), (2, "running"));
    assert_eq!(count(&created, "pending"), 4);
    let done = wait_for(&api, &created.rollout_id, "rollout completed", |r| r.state == "completed").await?;
    assert_eq!(count(&done, "committed"), 4, "{:?}", done.devices);

    // The devices say so themselves: a new birth with the version they run.
    let mut fleet_api = FleetServiceClient::with_interceptor(sb.grpc_channel().await?, sb.admin());
    eventually("devices on 2.4.0", Duration::from_secs(10), || {
        let mut api = fleet_api.clone();
        async move {
            let ds = api.list_devices(pb::ListDevicesRequest::default()).await.ok()?.into_inner().devices;
            ds.iter().all(|d| d.firmware_version == "2.4.0").then_some(())
        }
    })
    .await?;
    let _ = fleet_api.list_sites(pb::ListSitesRequest {}).await?;

    // Every decision is in the audit chain.
    let mut audit = AuditServiceClient::with_interceptor(sb.grpc_channel().await?, sb.admin());
    let actions: Vec<String> = audit
        .list_audit(pb::ListAuditRequest::default())
        .await?
        .into_inner()
        .records
        .into_iter()
        .map(|r| r.action)
        .collect();
    for a in ["firmware.release", "rollout.create", "rollout.wave", "rollout.complete"] {
        assert!(actions.iter().any(|x| x == a), "{a} missing from {actions:?}");
    }
    fleet.stop().await;
    sb.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_that_fails_its_health_check_is_rolled_back_and_stops_the_rollout() -> anyhow::Result<()> {
    init_tracing();
    let sb = Sandbox::start().await?;
    let state = tempfile::tempdir()?;
    let fleet = fleet(&sb, state.path(), 4).await?;
    let (bearer, password) = sb.person_named("rel", "Rel Ops", pb::Role::Ops, "").await?;
    let target = release_firmware(&sb, bearer.clone(), &password, "2.5.0", "health").await?;
    let mut api = RolloutServiceClient::with_interceptor(sb.grpc_channel().await?, bearer.clone());
    let created = api
        .create_rollout(pb::CreateRolloutRequest {
            target,
            waves: Some(pb::WavePlan { canary: 1, percent_steps: vec![100], ..Default::default() }),
            reason: "faulty build".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .rollout
        .unwrap_or_default();
    let paused = wait_for(&api, &created.rollout_id, "rollout paused", |r| r.state == "paused").await?;
    assert!(paused.reason.contains("1 of 1 devices offered in wave 0 failed"), "{}", paused.reason);
    assert_eq!(count(&paused, "rolled-back"), 1);
    assert_eq!(count(&paused, "pending"), 3, "no further wave");
    let canary = paused.devices.iter().find(|d| d.status == "rolled-back").expect("the canary");
    assert_eq!(canary.code, "health_check_failed");
    assert!(canary.detail.contains("pump pressure"), "{}", canary.detail);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let still = api
        .get_rollout(pb::GetRolloutRequest { rollout_id: created.rollout_id.clone() })
        .await?
        .into_inner()
        .rollout
        .unwrap_or_default();
    assert_eq!(count(&still, "pending"), 3, "paused: nothing more offered");

    // Paused rollouts survive a restart of the server, with their devices' reports.
    fleet.stop().await;
    let sb = Sandbox::restart_in(sb.stop().await).await?;
    let api = RolloutServiceClient::with_interceptor(sb.grpc_channel().await?, bearer.clone());
    let mut api2 = api.clone();
    let back = api2
        .get_rollout(pb::GetRolloutRequest { rollout_id: created.rollout_id.clone() })
        .await?
        .into_inner()
        .rollout
        .unwrap_or_default();
    assert_eq!((back.state.as_str(), count(&back, "rolled-back"), count(&back, "pending")), ("paused", 1, 3));
    let listed =
        api2.list_rollouts(pb::ListRolloutsRequest { state: "paused".into() }).await?.into_inner().rollouts;
    assert_eq!(listed.len(), 1);
    let cancelled = api2
        .cancel_rollout(pb::CancelRolloutRequest {
            rollout_id: created.rollout_id.clone(),
            reason: "bad build".into(),
        })
        .await?
        .into_inner()
        .rollout
        .unwrap_or_default();
    assert_eq!((cancelled.state.as_str(), count(&cancelled, "cancelled")), ("cancelled", 3));
    let e = api2
        .resume_rollout(pb::ResumeRolloutRequest {
            rollout_id: created.rollout_id.clone(),
            reason: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{}", e.message());
    drop(api);
    sb.stop().await;
    Ok(())
}

/// Releases a short recipe to `site`, authored by a pharmacist there and approved by
/// QA; returns the pharmacist as the person at the devices' screens.
async fn release_quick_recipe(
    sb: &Sandbox,
    site: &str,
) -> anyhow::Result<nanofleet_proto::device::v1::Person> {
    use nanofleet_proto::device::v1::SignatureMeaning;
    use nanofleet_proto::v1::recipe_service_client::RecipeServiceClient;
    let (pharm, pharm_pw) =
        sb.person_named("phil", "Phil Apotheker, PharmD", pb::Role::Pharmacist, site).await?;
    let (qa, qa_pw) = sb.person_named("quinn", "Quinn Okafor", pb::Role::Qa, "").await?;
    // About ten seconds a run: 0.6 mL collected at 12 mL/min, one volume exchanged.
    let recipe = nanofleet_tests::quick_recipe("quick", site, 2, 18.0);
    let channel = sb.grpc_channel().await?;
    let mut author = RecipeServiceClient::with_interceptor(channel.clone(), pharm);
    author.save_draft(pb::SaveDraftRequest { recipe: Some(recipe) }).await?;
    let sign = |user: &str, password: &str, meaning: SignatureMeaning| pb::SignRecipeRequest {
        recipe_id: "quick".into(),
        version: 1,
        meaning: meaning as i32,
        user_id: user.into(),
        password: password.into(),
    };
    author.sign_recipe(sign("phil", &pharm_pw, SignatureMeaning::Authored)).await?;
    RecipeServiceClient::with_interceptor(channel, qa)
        .sign_recipe(sign("quinn", &qa_pw, SignatureMeaning::Approved))
        .await?;
    Ok(nanofleet_proto::device::v1::Person {
        user_id: "phil".into(),
        printed_name: "Phil Apotheker, PharmD".into(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_whose_batches_regress_is_stopped_by_the_health_gate_and_rolled_back() -> anyhow::Result<()>
{
    init_tracing();
    let sb = Sandbox::start().await?;
    let state = tempfile::tempdir()?;
    let site = nanofleet_agent::fleet::sites(1).remove(0).id;
    sb.server.ensure_site(&site, "St Mary's", "Europe/London").await?;
    let operator = release_quick_recipe(&sb, &site).await?;
    let runs = AutoRuns::new((Duration::from_secs(2), Duration::from_secs(4)), operator);
    let fleet = fleet_with_runs(&sb, state.path(), 4, Some(runs)).await?;
    let (bearer, password) = sb.person_named("rel", "Rel Ops", pb::Role::Ops, "").await?;
    // What the fleet runs now (to roll back to), and a build whose batches come out worse.
    release_firmware(&sb, bearer.clone(), &password, "2.3.1", "none").await?;
    let target = release_firmware(&sb, bearer.clone(), &password, "2.5.0", "qc").await?;
    let mut api = RolloutServiceClient::with_interceptor(sb.grpc_channel().await?, bearer.clone());
    let created = api
        .create_rollout(pb::CreateRolloutRequest {
            target,
            waves: Some(pb::WavePlan { canary: 2, percent_steps: vec![100], ..Default::default() }),
            health_watch_seconds: 30,
            rollback_on_regression: true,
            reason: "flow controller rework".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .rollout
        .unwrap_or_default();
    assert_eq!((created.health_watch_seconds, created.rollback_on_regression), (30, true));

    // The canaries commit (the build passes its own health check), make batches with
    // larger particles and less encapsulation, and the gate pauses the rollout.
    let paused = eventually("paused by the health gate", Duration::from_secs(300), || {
        let mut api = api.clone();
        let id = created.rollout_id.clone();
        async move {
            let r =
                api.get_rollout(pb::GetRolloutRequest { rollout_id: id }).await.ok()?.into_inner().rollout?;
            (r.state == "paused").then_some(r)
        }
    })
    .await?;
    assert!(paused.reason.starts_with("health gate after wave 0"), "{}", paused.reason);
    let last = paused.health_checks.last().expect("the gate's evidence");
    assert_eq!(last.outcome, "regressed", "{:?}", paused.health_checks);
    assert!(last.evidence.contains("batches updated"), "{}", last.evidence);
    assert_eq!(count(&paused, "committed"), 2, "the canaries");
    assert_eq!(count(&paused, "pending"), 2, "no further wave");
    let canaries: Vec<String> =
        paused.devices.iter().filter(|d| d.status == "committed").map(|d| d.device_id.clone()).collect();
    assert!(paused.devices.iter().all(|d| d.from_version == "2.3.1"));

    // Rolled back: a forced rollout of what they ran before, to the canaries only.
    // It is created just after the pause is recorded.
    let back = eventually("the rollback rollout", Duration::from_secs(10), || {
        let mut api = api.clone();
        let original = created.rollout_id.clone();
        async move {
            let list =
                api.list_rollouts(pb::ListRolloutsRequest::default()).await.ok()?.into_inner().rollouts;
            list.into_iter().find(|r| r.rollout_id != original)
        }
    })
    .await?;
    assert_eq!((back.version.as_str(), back.action.as_str()), ("2.3.1", "forced"));
    let back = wait_for(&api, &back.rollout_id, "the rollback completed", |r| r.state == "completed").await?;
    let mut rolled: Vec<String> = back.devices.iter().map(|d| d.device_id.clone()).collect();
    rolled.sort();
    let mut expected = canaries.clone();
    expected.sort();
    assert_eq!(rolled, expected);
    let mut fleet_api = FleetServiceClient::with_interceptor(sb.grpc_channel().await?, sb.admin());
    eventually("every device on 2.3.1 again", Duration::from_secs(30), || {
        let mut api = fleet_api.clone();
        async move {
            let ds = api.list_devices(pb::ListDevicesRequest::default()).await.ok()?.into_inner().devices;
            ds.iter().all(|d| d.firmware_version == "2.3.1").then_some(())
        }
    })
    .await?;
    let _ = fleet_api.list_sites(pb::ListSitesRequest {}).await?;

    // The gate's verdict and the rollback are in the audit chain.
    let mut audit = AuditServiceClient::with_interceptor(sb.grpc_channel().await?, sb.admin());
    let records = audit.list_audit(pb::ListAuditRequest::default()).await?.into_inner().records;
    let regressed =
        records.iter().find(|r| r.action == "rollout.health-gate.regressed").expect("gate audited");
    assert!(regressed.reason.contains("batches updated"), "{}", regressed.reason);
    let rollback = records.iter().find(|r| r.action == "rollout.rollback").expect("rollback audited");
    assert!(rollback.reason.contains(&back.rollout_id), "{}", rollback.reason);
    assert!(rollback.subject.starts_with(&created.rollout_id), "{}", rollback.subject);
    fleet.stop().await;
    sb.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soft_rollout_waits_for_the_sites_maintenance_window() -> anyhow::Result<()> {
    let Setup { sb, fleet, _state, bearer, target } = setup(2).await?;
    let mut sites = FleetServiceClient::with_interceptor(sb.grpc_channel().await?, bearer.clone());
    let site = sites.list_sites(pb::ListSitesRequest {}).await?.into_inner().sites.remove(0);
    let window = closed_window(&site.time_zone)?;
    let set = sites
        .set_maintenance_window(pb::SetMaintenanceWindowRequest {
            site_id: site.id.clone(),
            window: window.clone(),
            reason: "night shift only".into(),
        })
        .await?
        .into_inner()
        .site
        .unwrap_or_default();
    assert_eq!(set.maintenance_window, window);
    let bad = sites
        .set_maintenance_window(pb::SetMaintenanceWindowRequest {
            site_id: site.id.clone(),
            window: "Funday 01:00-02:00".into(),
            reason: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("window"), "{}", bad.message());

    let mut api = RolloutServiceClient::with_interceptor(sb.grpc_channel().await?, bearer.clone());
    let created = api
        .create_rollout(pb::CreateRolloutRequest {
            target,
            reason: "in the window".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .rollout
        .unwrap_or_default();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = api
        .get_rollout(pb::GetRolloutRequest { rollout_id: created.rollout_id.clone() })
        .await?
        .into_inner()
        .rollout
        .unwrap_or_default();
    assert_eq!(count(&r, "pending"), 2, "the window is closed: {:?}", r.devices);
    // The window opens (here: is set to always); the offers go out.
    sites
        .set_maintenance_window(pb::SetMaintenanceWindowRequest {
            site_id: site.id.clone(),
            window: String::new(),
            reason: "urgent fix".into(),
        })
        .await?;
    wait_for(&api, &created.rollout_id, "rollout completed", |r| r.state == "completed").await?;
    fleet.stop().await;
    sb.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_rollout_carries_on_after_a_server_restart() -> anyhow::Result<()> {
    let Setup { sb, fleet, _state, bearer, target } = setup(3).await?;
    let mut sites = FleetServiceClient::with_interceptor(sb.grpc_channel().await?, bearer.clone());
    let site = sites.list_sites(pb::ListSitesRequest {}).await?.into_inner().sites.remove(0);
    let window = closed_window(&site.time_zone)?;
    let closed = pb::SetMaintenanceWindowRequest { site_id: site.id.clone(), window, reason: "night".into() };
    sites.set_maintenance_window(closed).await?;
    let mut api = RolloutServiceClient::with_interceptor(sb.grpc_channel().await?, bearer.clone());
    let created = api
        .create_rollout(pb::CreateRolloutRequest {
            target,
            reason: "across a restart".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .rollout
        .unwrap_or_default();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The server stops while the rollout runs (its devices waiting for their window)
    // and starts again on the same addresses; the devices reconnect.
    let sb = sb.restart_in_place().await?;
    let mut api = RolloutServiceClient::with_interceptor(sb.grpc_channel().await?, bearer.clone());
    let back = api
        .get_rollout(pb::GetRolloutRequest { rollout_id: created.rollout_id.clone() })
        .await?
        .into_inner()
        .rollout
        .unwrap_or_default();
    assert_eq!((back.state.as_str(), count(&back, "pending")), ("running", 3));
    let mut sites = FleetServiceClient::with_interceptor(sb.grpc_channel().await?, bearer.clone());
    let open = pb::SetMaintenanceWindowRequest {
        site_id: site.id.clone(),
        window: String::new(),
        reason: "now".into(),
    };
    sites.set_maintenance_window(open).await?;
    let done = wait_for(&api, &created.rollout_id, "rollout completed after the restart", |r| {
        r.state == "completed"
    })
    .await?;
    assert_eq!(count(&done, "committed"), 3);
    let _ = api.list_rollouts(pb::ListRolloutsRequest::default()).await?;
    fleet.stop().await;
    sb.stop().await;
    Ok(())
}

#[tokio::test]
async fn bad_rollouts_are_refused_naming_the_field() -> anyhow::Result<()> {
    let sb = Sandbox::start().await?;
    let (bearer, password) = sb.person_named("rel", "Rel Ops", pb::Role::Ops, "").await?;
    let target = release_firmware(&sb, bearer.clone(), &password, "2.4.0", "none").await?;
    sb.enroll_device("st-a", "NF-RO-1").await?;
    let mut api = RolloutServiceClient::with_interceptor(sb.grpc_channel().await?, bearer);
    let ok = pb::CreateRolloutRequest { target: target.clone(), reason: "r".into(), ..Default::default() };
    let cases = [
        (
            pb::CreateRolloutRequest { target: "NF-200-9.9.9.img".into(), ..ok.clone() },
            tonic::Code::NotFound,
            "NF-200-9.9.9.img",
        ),
        (
            pb::CreateRolloutRequest { reason: String::new(), ..ok.clone() },
            tonic::Code::InvalidArgument,
            "reason",
        ),
        (
            pb::CreateRolloutRequest { error_threshold_pct: 101, ..ok.clone() },
            tonic::Code::InvalidArgument,
            "error_threshold_pct",
        ),
        (
            pb::CreateRolloutRequest { rollback_on_regression: true, ..ok.clone() },
            tonic::Code::InvalidArgument,
            "rollback_on_regression",
        ),
        (
            pb::CreateRolloutRequest {
                waves: Some(pb::WavePlan { percent_steps: vec![50, 20], ..Default::default() }),
                ..ok.clone()
            },
            tonic::Code::InvalidArgument,
            "waves",
        ),
        (
            pb::CreateRolloutRequest {
                filter: Some(pb::RolloutFilter { models: vec!["NF-100".into()], ..Default::default() }),
                ..ok.clone()
            },
            tonic::Code::InvalidArgument,
            "filter.models",
        ),
        (
            pb::CreateRolloutRequest {
                filter: Some(pb::RolloutFilter { site_ids: vec!["nowhere".into()], ..Default::default() }),
                ..ok.clone()
            },
            tonic::Code::InvalidArgument,
            "filter",
        ),
    ];
    for (req, code, text) in cases {
        let e = api.create_rollout(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{}", e.message());
        assert!(e.message().contains(text), "{:?} lacks {text:?}", e.message());
    }
    // Tags: set by operations (named when bad), then a filter by tag selects the device.
    let mut fleet = FleetServiceClient::with_interceptor(sb.grpc_channel().await?, sb.admin());
    let tag = |add: &[&str], remove: &[&str]| pb::SetDeviceTagsRequest {
        device_id: "NF-RO-1".into(),
        add: add.iter().map(|t| t.to_string()).collect(),
        remove: remove.iter().map(|t| t.to_string()).collect(),
        reason: "ward".into(),
    };
    let e = fleet.set_device_tags(tag(&["ICU"], &[])).await.unwrap_err();
    assert!(e.message().contains("add") && e.message().contains("ICU"), "{}", e.message());
    let d =
        fleet.set_device_tags(tag(&["icu", "ring-1"], &[])).await?.into_inner().device.unwrap_or_default();
    assert_eq!(d.tags, ["icu", "ring-1"]);
    let d = fleet.set_device_tags(tag(&[], &["ring-1"])).await?.into_inner().device.unwrap_or_default();
    assert_eq!(d.tags, ["icu"]);
    let by_tag = |t: &str| pb::CreateRolloutRequest {
        filter: Some(pb::RolloutFilter { tags: vec![t.into()], ..Default::default() }),
        ..ok.clone()
    };
    let e = api.create_rollout(by_tag("oncology")).await.unwrap_err();
    assert!(e.message().contains("filter"), "{}", e.message());
    let r = api.create_rollout(by_tag("icu")).await?.into_inner().rollout.unwrap_or_default();
    assert_eq!(r.counts.iter().map(|c| c.devices).sum::<u32>(), 1, "the tagged device");
    api.cancel_rollout(pb::CancelRolloutRequest { rollout_id: r.rollout_id, reason: "test".into() }).await?;

    // QA may watch rollouts, not start them.
    let qa = sb.person("qa1", pb::Role::Qa, "").await?;
    let mut qa_api = RolloutServiceClient::with_interceptor(sb.grpc_channel().await?, qa);
    assert_eq!(qa_api.create_rollout(ok).await.unwrap_err().code(), tonic::Code::PermissionDenied);
    assert_eq!(
        qa_api.list_rollouts(pb::ListRolloutsRequest::default()).await?.into_inner().rollouts.len(),
        1
    );
    sb.stop().await;
    Ok(())
}
