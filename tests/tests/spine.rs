//! The spine end to end: simulated devices → embedded broker → ingest → SQLite → gRPC.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nanofleet_agent::fleet::{Fleet, FleetOptions};
use nanofleet_agent::hal::DeviceInfo;
use nanofleet_agent::link::{LinkOptions, LinkStatus, run_device};
use nanofleet_agent::seq::SeqCounter;
use nanofleet_agent::sim::SimDevice;
use nanofleet_proto::v1 as pb;
use nanofleet_proto::v1::fleet_service_client::FleetServiceClient;
use nanofleet_proto::v1::telemetry_service_client::TelemetryServiceClient;
use nanofleet_tests::{Sandbox, eventually, init_tracing, now_ms};
use tokio_util::sync::CancellationToken;

fn fast(link: LinkOptions) -> LinkOptions {
    LinkOptions {
        sample_interval: Duration::from_millis(20),
        batch_interval: Duration::from_millis(100),
        ..link
    }
}

fn device(id: &str) -> SimDevice {
    let info = DeviceInfo {
        device_id: id.into(),
        site_id: "test-site".into(),
        model: "NF-200".into(),
        firmware_version: "2.3.1".into(),
    };
    SimDevice::new(info, 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_lands_exactly_once_across_agent_reconnects() -> anyhow::Result<()> {
    init_tracing();
    let sb = Sandbox::start().await?;
    let status = Arc::new(Mutex::new(LinkStatus::default()));
    let cancel = CancellationToken::new();
    let agent = tokio::spawn(run_device(
        device("NF-E2E-01"),
        fast(sb.link()),
        SeqCounter::starting_at(1),
        cancel.clone(),
        status.clone(),
    ));
    let store = sb.server.store.clone();
    let stored = || {
        let store = store.clone();
        async move { store.telemetry_seqs("NF-E2E-01").await.ok().map(|s| s.len()) }
    };

    // Three times: let data flow, then the server drops the connection while
    // publishes are in flight.
    for round in 1..=3u64 {
        let before = stored().await.unwrap_or(0);
        eventually("telemetry to flow", Duration::from_secs(20), || async {
            stored().await.filter(|n| *n >= before + 10)
        })
        .await?;
        assert!(sb.server.kick_device("NF-E2E-01").await, "device connected before kick {round}");
        eventually("the agent to reconnect", Duration::from_secs(20), || async {
            let s = status.lock().map(|s| (s.connects, s.connected)).unwrap_or_default();
            (s.0 > round && s.1).then_some(())
        })
        .await?;
    }
    cancel.cancel();
    agent.await??;

    let st = status.lock().map(|s| s.clone()).unwrap_or_default();
    let seqs = store.telemetry_seqs("NF-E2E-01").await?;
    let expected: Vec<i64> = (1..=st.telemetry_batches as i64).collect();
    assert_eq!(
        seqs.len(),
        expected.len(),
        "every batch the agent made is stored once (outbox left: {:?})",
        st.outbox
    );
    assert_eq!(seqs, expected, "no gap, no duplicate");
    assert_eq!(st.outbox.queued, 0, "the agent drained its outbox before stopping");
    assert!(st.disconnects >= 3);

    // The orderly goodbye marks the device offline.
    let d = store.get_device("NF-E2E-01").await?.expect("device registered");
    assert!(!d.online, "offline after the agent stopped");
    sb.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_fleet_is_visible_over_grpc() -> anyhow::Result<()> {
    init_tracing();
    let sb = Sandbox::start().await?;
    let fleet = Fleet::start(
        &sb.enrolled(FleetOptions {
            sites: 2,
            devices_per_site: 3,
            link: fast(sb.link()),
            fault_rate: 0.0,
            ..FleetOptions::default()
        })
        .await?,
    );
    let channel = sb.grpc_channel().await?;
    let mut fleet_api = FleetServiceClient::with_interceptor(channel.clone(), sb.admin());
    let mut telemetry_api = TelemetryServiceClient::with_interceptor(channel.clone(), sb.admin());

    let devices = eventually("6 devices online with telemetry", Duration::from_secs(20), || {
        let mut api = fleet_api.clone();
        async move {
            let ds = api.list_devices(pb::ListDevicesRequest::default()).await.ok()?.into_inner().devices;
            (ds.len() == 6 && ds.iter().all(|d| d.online && d.last_sample.is_some())).then_some(ds)
        }
    })
    .await?;
    assert_eq!(devices[0].model, "NF-200");

    let sites = fleet_api.list_sites(pb::ListSitesRequest {}).await?.into_inner().sites;
    assert_eq!(sites.len(), 2);
    assert!(sites.iter().all(|s| s.devices_total == 3 && s.devices_online == 3), "{sites:?}");

    let one =
        fleet_api.list_devices(pb::ListDevicesRequest { site_id: sites[0].id.clone() }).await?.into_inner();
    assert_eq!(one.devices.len(), 3);

    let id = devices[0].id.clone();
    let got = fleet_api.get_device(pb::GetDeviceRequest { device_id: id.clone() }).await?.into_inner();
    assert_eq!(got.device.map(|d| d.id), Some(id.clone()));

    let missing =
        fleet_api.get_device(pb::GetDeviceRequest { device_id: "NF-NOPE".into() }).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let invalid =
        fleet_api.get_device(pb::GetDeviceRequest { device_id: "bad/id".into() }).await.unwrap_err();
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);
    assert!(invalid.message().contains("device_id"), "{}", invalid.message());

    let window = telemetry_api
        .query_telemetry(pb::QueryTelemetryRequest {
            device_id: id.clone(),
            since_unix_ms: now_ms() - 60_000,
            until_unix_ms: 0,
            limit: 0,
        })
        .await?
        .into_inner();
    assert!(!window.samples.is_empty());
    assert!(window.samples.windows(2).all(|w| w[0].time_unix_ms <= w[1].time_unix_ms), "oldest first");
    let limited = telemetry_api
        .query_telemetry(pb::QueryTelemetryRequest {
            device_id: id,
            since_unix_ms: now_ms() - 60_000,
            until_unix_ms: 0,
            limit: 3,
        })
        .await?
        .into_inner();
    assert_eq!(limited.samples.len(), 3);
    assert!(limited.truncated);

    // Standard gRPC health answers for the API.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let h = health
        .check(tonic_health::pb::HealthCheckRequest { service: "nanofleet.v1.FleetService".into() })
        .await?
        .into_inner();
    assert_eq!(h.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    // Reflection lets any standard gRPC client discover the API.
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(sb.grpc_channel().await?);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection.server_reflection_info(futures::stream::iter([request])).await?.into_inner();
    let Some(Ok(answer)) = futures::StreamExt::next(&mut answers).await else {
        anyhow::bail!("no reflection answer")
    };
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        anyhow::bail!("reflection answered something else")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["nanofleet.v1.FleetService", "nanofleet.v1.TelemetryService", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == want), "{want} not listed: {names:?}");
    }

    fleet.stop().await;
    let offline = eventually("devices offline after the fleet stopped", Duration::from_secs(10), || {
        let mut api = fleet_api.clone();
        async move {
            let ds = api.list_devices(pb::ListDevicesRequest::default()).await.ok()?.into_inner().devices;
            ds.iter().all(|d| !d.online).then_some(ds.len())
        }
    })
    .await?;
    assert_eq!(offline, 6);
    sb.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_data_and_deduplication_survive_a_server_restart() -> anyhow::Result<()> {
    init_tracing();
    let sb = Sandbox::start().await?;
    let mut dev = nanofleet_tests::RawDevice::connect(sb.mqtt_addr(), "NF-RST-01").await?;
    dev.birth("NF-RST-01", "site-a").await?;
    for seq in 1..=5 {
        dev.publish("nf/v1/NF-RST-01/telemetry", nanofleet_tests::telemetry("NF-RST-01", seq, 3)).await?;
    }
    dev.close().await;
    let dir = sb.stop().await;

    let sb = Sandbox::restart_in(dir).await?;
    let d = sb.server.store.get_device("NF-RST-01").await?.expect("device kept");
    assert!(!d.online, "nobody is connected to a freshly started broker");
    assert_eq!(d.telemetry_seq, 5);
    let mut dev = nanofleet_tests::RawDevice::connect(sb.mqtt_addr(), "NF-RST-01").await?;
    // Known from before the restart: no birth needed for the re-send to be accepted.
    let reason =
        dev.publish("nf/v1/NF-RST-01/telemetry", nanofleet_tests::telemetry("NF-RST-01", 5, 3)).await?;
    assert_eq!(reason, rumqttc::v5::mqttbytes::v5::PubAckReason::Success);
    dev.publish("nf/v1/NF-RST-01/telemetry", nanofleet_tests::telemetry("NF-RST-01", 6, 3)).await?;
    assert_eq!(sb.server.store.telemetry_seqs("NF-RST-01").await?, vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(sb.server.ingest.stats().duplicates, 1);
    dev.close().await;
    sb.stop().await;
    Ok(())
}
