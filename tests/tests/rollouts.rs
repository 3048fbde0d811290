//! Firmware rollouts end to end: a released image goes to an enrolled simulated
//! fleet in waves over MQTT (signed offers down, reports up) and HTTPS (TUF
//! metadata and the image); a faulty build is rolled back on the device and stops
//! the rollout at the error threshold; rollouts survive a server restart.

use std::time::Duration;

use nanofleet_agent::fleet::{Fleet, FleetOptions};
use nanofleet_agent::link::LinkOptions;
use nanofleet_agent::slots::{ImageHeader, sim_image};
use nanofleet_proto::v1 as pb;
use nanofleet_proto::v1::audit_service_client::AuditServiceClient;
use nanofleet_proto::v1::firmware_service_client::FirmwareServiceClient;
use nanofleet_proto::v1::fleet_service_client::FleetServiceClient;
use nanofleet_proto::v1::rollout_service_client::RolloutServiceClient;
use nanofleet_tests::{Sandbox, eventually, init_tracing};
use sha2::Digest as _;

fn fast(link: LinkOptions) -> LinkOptions {
    LinkOptions {
        sample_interval: Duration::from_millis(50),
        batch_interval: Duration::from_millis(200),
        ..link
    }
}

/// Releases `version` of NF-200 with `fault` built in ("none", "health", "no-boot").
async fn release(
    sb: &Sandbox,
    bearer: nanofleet::cli::Bearer,
    password: &str,
    version: &str,
    fault: &str,
) -> anyhow::Result<String> {
    use pb::upload_firmware_request::Part;
    let h = ImageHeader {
        model: "NF-200".into(),
        version: version.into(),
        release_counter: 1,
        fault: fault.into(),
    };
    let img = sim_image(&h, 200_000);
    let header = pb::FirmwareHeader {
        model: "NF-200".into(),
        version: version.into(),
        release_counter: 1,
        length: img.len() as u64,
        sha256: hex::encode(sha2::Sha256::digest(&img)),
        user_id: "rel".into(),
        password: password.into(),
        notes: format!("build {version}"),
    };
    let mut msgs = vec![pb::UploadFirmwareRequest { part: Some(Part::Header(header)) }];
    msgs.extend(
        img.chunks(64 * 1024).map(|c| pb::UploadFirmwareRequest { part: Some(Part::Chunk(c.to_vec())) }),
    );
    let mut fw = FirmwareServiceClient::with_interceptor(sb.grpc_channel().await?, bearer);
    Ok(fw.upload_firmware(futures::stream::iter(msgs)).await?.into_inner().release.unwrap_or_default().target)
}

fn count(r: &pb::Rollout, status: &str) -> u32 {
    r.counts.iter().find(|c| c.status == status).map_or(0, |c| c.devices)
}

async fn fleet(sb: &Sandbox, state: &std::path::Path, devices: usize) -> anyhow::Result<Fleet> {
    let opts = sb
        .enrolled(FleetOptions {
            sites: 1,
            devices_per_site: devices,
            link: fast(sb.link()),
            fault_rate: 0.0,
            state_dir: Some(state.to_path_buf()),
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
    let target = release(&sb, bearer.clone(), &password, "2.4.0", "none").await?;
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
    let target = release(&sb, bearer.clone(), &password, "2.5.0", "health").await?;
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
    let target = release(&sb, bearer.clone(), &password, "2.4.0", "none").await?;
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
    // QA may watch rollouts, not start them.
    let qa = sb.person("qa1", pb::Role::Qa, "").await?;
    let mut qa_api = RolloutServiceClient::with_interceptor(sb.grpc_channel().await?, qa);
    assert_eq!(qa_api.create_rollout(ok).await.unwrap_err().code(), tonic::Code::PermissionDenied);
    assert!(qa_api.list_rollouts(pb::ListRolloutsRequest::default()).await?.into_inner().rollouts.is_empty());
    sb.stop().await;
    Ok(())
}
