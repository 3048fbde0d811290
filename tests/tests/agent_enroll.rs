//! The agent binary against a real server: enrollment with a token, a run over mutual
//! TLS, renewal of a short certificate (the connection is made again with the new
//! one), and a decommissioned device that is refused without being retried fast.

use std::process::{Command, Output};
use std::time::Duration;

use nanofleet_agent::enroll::{Credentials, identity_dir};
use nanofleet_api::Actor;
use nanofleet_proto::v1 as pb;
use nanofleet_proto::v1::fleet_service_client::FleetServiceClient;

type Api = FleetServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, nanofleet::cli::Bearer>,
>;
use nanofleet_tests::agent::{AgentProcess, agent_bin};
use nanofleet_tests::{Sandbox, eventually, init_tracing, now_ms};

const DEVICE: &str = "NF-ENR-01";
const SITE: &str = "enroll-site";

fn agent(args: &[&str]) -> Output {
    Command::new(agent_bin()).args(args).env_remove("NANOFLEET_ENROLL_TOKEN").output().expect("run agent")
}

async fn device(api: &mut Api) -> Option<pb::Device> {
    api.get_device(pb::GetDeviceRequest { device_id: DEVICE.into() }).await.ok()?.into_inner().device
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolled_agent_runs_over_mutual_tls_and_renews_its_certificate() -> anyhow::Result<()> {
    init_tracing();
    let sb = Sandbox::start_with(|o| o.device_cert_validity = Duration::from_secs(20)).await?;
    sb.server.ensure_site(SITE, "Enrollment Test Hospital", "UTC").await?;
    let (_, token) = sb
        .server
        .trust
        .create_token(&Actor::system(), SITE, Duration::from_secs(600), 1, DEVICE, "agent enrollment test")
        .await?;
    let state = tempfile::tempdir()?;
    let state_dir = state.path().to_str().expect("utf-8 path");

    // Enrollment: the identity comes from the token, the credentials land in identity/.
    let grpc = sb.grpc_url();
    let out = agent(&[
        "enroll",
        "--server",
        &grpc,
        "--token",
        &token,
        "--state-dir",
        state_dir,
        "--output",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(printed["device_id"], DEVICE);
    assert_eq!(printed["site_id"], SITE);
    assert_eq!(printed["mqtt_address"], sb.mqtts_addr().to_string());
    let first = Credentials::load(&identity_dir(state.path()))?.expect("saved credentials");
    assert_eq!(first.device_id, DEVICE);

    // The token is used up, and existing credentials are not replaced by accident.
    let again = agent(&["enroll", "--server", &grpc, "--token", &token, "--state-dir", state_dir]);
    assert_eq!(again.status.code(), Some(64), "{}", String::from_utf8_lossy(&again.stderr));
    let other = tempfile::tempdir()?;
    let used = agent(&[
        "enroll",
        "--server",
        &grpc,
        "--token",
        &token,
        "--state-dir",
        other.path().to_str().expect("utf-8 path"),
    ]);
    assert_eq!(used.status.code(), Some(1));
    let err = String::from_utf8_lossy(&used.stderr);
    assert!(err.contains("the server refused"), "{err}");

    // Running: over mutual TLS to the address from enrollment, identity from the credentials.
    let agent = AgentProcess::start(state.path(), &[]);
    let api = FleetServiceClient::with_interceptor(sb.grpc_channel().await?, sb.admin());
    let first_connection = eventually("the enrolled device online", Duration::from_secs(15), || {
        let mut api = api.clone();
        async move { device(&mut api).await.filter(|d| d.online && d.last_sample.is_some()) }
    })
    .await?
    .connected_since_unix_ms;
    assert!(!agent.logged("plaintext"), "{}", agent.log_text());

    // Renewal two thirds into the 20 s life: new certificate on disk, and a new
    // connection made with it.
    let renewed = eventually("the certificate renewed", Duration::from_secs(25), || async {
        Credentials::load(&identity_dir(state.path()))
            .ok()
            .flatten()
            .filter(|c| c.not_after_ms > first.not_after_ms && c.chain_pem != first.chain_pem)
    })
    .await?;
    assert_ne!(renewed.key_pem, first.key_pem, "a renewal brings a new key");
    eventually("a connection with the renewed certificate", Duration::from_secs(15), || {
        let mut api = api.clone();
        async move {
            device(&mut api).await.filter(|d| d.online && d.connected_since_unix_ms > first_connection)
        }
    })
    .await?;
    assert!(agent.logged("reconnecting with the renewed certificate"), "{}", agent.log_text());
    // Still publishing after the first certificate's end.
    let after_expiry = first.not_after_ms + 1_000;
    eventually("telemetry after the first certificate expired", Duration::from_secs(25), || {
        let mut api = api.clone();
        async move {
            let d = device(&mut api).await?;
            (now_ms() > after_expiry && d.online && d.last_seen_unix_ms > after_expiry).then_some(())
        }
    })
    .await?;

    // Renewal went without a failed connection.
    assert!(!agent.logged("cannot reach the broker") && !agent.logged("refused"), "{}", agent.log_text());

    // Decommissioned: the broker refuses the device, renewal is refused, both said
    // clearly, and the connection is not retried in a tight loop.
    sb.server.trust.decommission(&Actor::system(), DEVICE, "end of agent test").await?;
    sb.server.kick_device(DEVICE).await;
    eventually("the refusal logged", Duration::from_secs(15), || async {
        agent.logged("the broker refused the device").then_some(())
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let refusals = agent.count_logged("broker refused");
    assert_eq!(refusals, 1, "retried too fast:\n{}", agent.log_text());
    eventually("the renewal refusal logged", Duration::from_secs(25), || async {
        agent.logged("the server refuses to renew").then_some(())
    })
    .await?;

    assert_eq!(agent.stop(), Some(0));
    sb.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_fleet_enrolls_with_one_shared_token() -> anyhow::Result<()> {
    init_tracing();
    let sb = Sandbox::start().await?;
    sb.server.ensure_site(SITE, "Enrollment Test Hospital", "UTC").await?;
    let (_, token) = sb
        .server
        .trust
        .create_token(&Actor::system(), SITE, Duration::from_secs(600), 3, "", "simulated fleet")
        .await?;
    let grpc = sb.grpc_url();
    let out = tokio::task::spawn_blocking(move || {
        agent(&[
            "simulate",
            "--sites",
            "1",
            "--devices-per-site",
            "3",
            "--fault-rate",
            "0",
            "--enroll-server",
            &grpc,
            "--token",
            &token,
            "--duration",
            "5s",
            "--output",
            "json",
        ])
    })
    .await?;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let last = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().to_owned();
    let report: serde_json::Value = serde_json::from_str(&last)?;
    assert!(report["acked"].as_u64() > Some(0), "{last}");
    // The server assigned the ids; every device is in the token's site and sent data.
    let mut api = FleetServiceClient::with_interceptor(sb.grpc_channel().await?, sb.admin());
    let devices =
        api.list_devices(pb::ListDevicesRequest { site_id: SITE.into() }).await?.into_inner().devices;
    assert_eq!(devices.len(), 3, "{devices:?}");
    assert!(devices.iter().all(|d| d.last_sample.is_some()), "{devices:?}");
    sb.stop().await;
    Ok(())
}
