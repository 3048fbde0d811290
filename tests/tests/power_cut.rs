//! Power cuts during a firmware update, for real: each device is the agent binary,
//! whose simulated hardware hangs at one step of the update (`--sim-hang-at`); the
//! process is killed with SIGKILL there and started again. Every device must come
//! back on a bootable slot, finish the update or roll it back as the A/B scheme
//! says, report that to the rollout, and announce the version it runs. A device
//! enrolled after the rollout started joins it.

use std::path::Path;
use std::time::Duration;

use nanofleet_agent::slots::read_header;
use nanofleet_api::Actor;
use nanofleet_proto::v1 as pb;
use nanofleet_proto::v1::fleet_service_client::FleetServiceClient;
use nanofleet_proto::v1::rollout_service_client::RolloutServiceClient;
use nanofleet_tests::agent::{AgentProcess, agent_bin};
use nanofleet_tests::{Sandbox, eventually, init_tracing, release_firmware};

const SITE: &str = "power-cut-site";

/// Where the drill hangs, the phase the device has written to disk by then, and how
/// the update must end after the power comes back.
struct Drill {
    hang: &'static str,
    phase: &'static str,
    status: &'static str,
    version: &'static str,
}

const DRILLS: [Drill; 5] = [
    // The download resumes where it stopped.
    Drill { hang: "download", phase: "downloading", status: "committed", version: "2.4.0" },
    // A torn slot write is written again; the device ran the old slot all along.
    Drill { hang: "install", phase: "installing", status: "committed", version: "2.4.0" },
    // The trial boot was armed: the power-on boots the new slot on trial.
    Drill { hang: "reboot", phase: "rebooting", status: "committed", version: "2.4.0" },
    // Power lost during the trial: the bootloader is back on the old slot.
    Drill { hang: "verify", phase: "verifying", status: "rolled-back", version: "2.3.1" },
    Drill { hang: "commit", phase: "committing", status: "rolled-back", version: "2.3.1" },
];

fn device_id(i: usize) -> String {
    format!("NF-PWR-{:02}", i + 1)
}

/// The phase in the device's persisted update state, if an update is under way.
fn phase(state: &Path) -> Option<String> {
    let bytes = std::fs::read(state.join("update").join("update.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.pointer("/job/phase").and_then(|p| p.as_str()).map(str::to_owned)
}

/// The version in the slot the simulated bootloader boots by default.
fn default_slot_version(state: &Path) -> Option<String> {
    let slots = state.join("slots");
    let env: serde_json::Value =
        serde_json::from_slice(&std::fs::read(slots.join("bootenv.json")).ok()?).ok()?;
    let slot = env.get("default")?.as_str()?.to_lowercase();
    read_header(&slots.join(format!("slot-{slot}.img"))).map(|h| h.version)
}

/// Enrolls device `i` with the agent binary into a new state directory.
async fn enroll(sb: &Sandbox, i: usize) -> anyhow::Result<tempfile::TempDir> {
    let (_, token) = sb
        .server
        .trust
        .create_token(&Actor::system(), SITE, Duration::from_secs(600), 1, &device_id(i), "power cut drill")
        .await?;
    let state = tempfile::tempdir()?;
    let out = std::process::Command::new(agent_bin())
        .args(["enroll", "--server", &sb.grpc_url(), "--token", &token, "--state-dir"])
        .arg(state.path())
        .env_remove("NANOFLEET_ENROLL_TOKEN")
        .output()?;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_killed_at_every_step_of_an_update_comes_back_on_a_good_slot() -> anyhow::Result<()> {
    init_tracing();
    let sb = Sandbox::start().await?;
    sb.server.ensure_site(SITE, "Power Cut Hospital", "UTC").await?;
    let mut states = Vec::new();
    let mut agents = Vec::new();
    for (i, drill) in DRILLS.iter().enumerate() {
        let state = enroll(&sb, i).await?;
        agents.push(AgentProcess::start(state.path(), &["--sim-hang-at", drill.hang]));
        states.push(state);
    }
    let mut fleet = FleetServiceClient::with_interceptor(sb.grpc_channel().await?, sb.admin());
    eventually("the drilled devices online", Duration::from_secs(30), || {
        let mut api = fleet.clone();
        async move {
            let ds = api.list_devices(pb::ListDevicesRequest::default()).await.ok()?.into_inner().devices;
            (ds.len() == DRILLS.len() && ds.iter().all(|d| d.online)).then_some(())
        }
    })
    .await?;

    let (bearer, password) = sb.person_named("rel", "Rel Ops", pb::Role::Ops, "").await?;
    let target = release_firmware(&sb, bearer.clone(), &password, "2.4.0", "none").await?;
    let mut api = RolloutServiceClient::with_interceptor(sb.grpc_channel().await?, bearer);
    let rollout = api
        .create_rollout(pb::CreateRolloutRequest {
            target,
            action: nanofleet_proto::device::v1::UpdateAction::Forced as i32,
            // Two of the five must roll back: the rollout completes all the same.
            success_threshold_pct: 50,
            error_threshold_pct: 100,
            reason: "power cut drill".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .rollout
        .unwrap_or_default();

    // A device enrolled after the rollout started joins it when it comes online.
    let late = enroll(&sb, DRILLS.len()).await?;
    let late_agent = AgentProcess::start(late.path(), &[]);

    // Each device reaches its step, says it hangs there, and loses its power.
    for ((drill, state), agent) in DRILLS.iter().zip(&states).zip(agents.drain(..)) {
        let what = format!("{} hanging while {}", drill.hang, drill.phase);
        let reached = eventually(&what, Duration::from_secs(60), || async {
            (phase(state.path()).as_deref() == Some(drill.phase)
                && agent.logged("simulated hardware hangs here"))
            .then_some(())
        })
        .await;
        if let Err(e) = reached {
            panic!("{e}: phase {:?}\n{}", phase(state.path()), agent.log_text());
        }
        agent.kill9();
    }

    // Power back: the same agents, without the drill.
    let agents: Vec<AgentProcess> = states.iter().map(|s| AgentProcess::start(s.path(), &[])).collect();
    let id = rollout.rollout_id.clone();
    let done = eventually("every device's final answer", Duration::from_secs(90), || {
        let mut api = api.clone();
        let id = id.clone();
        async move {
            let r =
                api.get_rollout(pb::GetRolloutRequest { rollout_id: id }).await.ok()?.into_inner().rollout?;
            (r.state == "completed").then_some(r)
        }
    })
    .await;
    let done = match done {
        Ok(r) => r,
        Err(e) => {
            let r = api.get_rollout(pb::GetRolloutRequest { rollout_id: id }).await?.into_inner().rollout;
            let logs = agents.iter().map(AgentProcess::log_text).collect::<Vec<_>>().join("\n---\n");
            panic!("{e}: {:?}\n{logs}", r.map(|r| (r.state, r.reason, r.devices)));
        }
    };
    for (i, (drill, state)) in DRILLS.iter().zip(&states).enumerate() {
        let d = done.devices.iter().find(|d| d.device_id == device_id(i)).expect("a member");
        assert_eq!(d.status, drill.status, "killed at {}: {} {}", drill.hang, d.code, d.detail);
        if drill.status == "rolled-back" {
            assert_eq!(d.code, "power_lost_on_trial", "killed at {}: {}", drill.hang, d.detail);
        }
        assert_eq!(phase(state.path()), None, "killed at {}: the update is over", drill.hang);
        assert_eq!(
            default_slot_version(state.path()).as_deref(),
            Some(drill.version),
            "killed at {}: the bootloader's default slot",
            drill.hang
        );
    }
    let joined =
        done.devices.iter().find(|d| d.device_id == device_id(DRILLS.len())).expect("the late device");
    assert_eq!(joined.status, "committed", "{}", joined.detail);
    assert_eq!(default_slot_version(late.path()).as_deref(), Some("2.4.0"));
    // The cut download went on from the bytes it held, not from the start.
    assert!(agents[0].logged("download resumes after the bytes held"), "{}", agents[0].log_text());
    // Each device announces what it runs.
    eventually("each device's version in its birth", Duration::from_secs(20), || {
        let mut api = fleet.clone();
        async move {
            let ds = api.list_devices(pb::ListDevicesRequest::default()).await.ok()?.into_inner().devices;
            DRILLS
                .iter()
                .enumerate()
                .all(|(i, drill)| {
                    ds.iter().any(|d| d.id == device_id(i) && d.online && d.firmware_version == drill.version)
                })
                .then_some(())
        }
    })
    .await?;
    let _ = fleet.list_sites(pb::ListSitesRequest {}).await?;
    for agent in agents.into_iter().chain([late_agent]) {
        assert_eq!(agent.stop(), Some(0));
    }
    sb.stop().await;
    Ok(())
}
