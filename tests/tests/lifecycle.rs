//! A device's life over mutual TLS: enrollment with a token, data flowing, replacement
//! of broken hardware that keeps the device's id, site and history.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nanofleet_agent::hal::DeviceInfo;
use nanofleet_agent::link::{LinkOptions, LinkStatus, SharedStatus, run_device};
use nanofleet_agent::seq::SeqCounter;
use nanofleet_agent::sim::SimDevice;
use nanofleet_api::Actor;
use nanofleet_proto::v1 as pb;
use nanofleet_proto::v1::fleet_service_client::FleetServiceClient;
use nanofleet_store::AuditFilter;
use nanofleet_tests::{Sandbox, eventually};
use tokio_util::sync::CancellationToken;

const DEV: &str = "NF-LIFE-01";
const SITE: &str = "site-life";

struct Running {
    cancel: CancellationToken,
    status: SharedStatus,
    task: tokio::task::JoinHandle<Result<(), nanofleet_agent::link::Error>>,
}

/// Runs a simulated device with `creds` against the sandbox's mutual-TLS listener.
fn run(sb: &Sandbox, creds: &nanofleet_agent::enroll::Credentials) -> anyhow::Result<Running> {
    let info = DeviceInfo {
        device_id: creds.device_id.clone(),
        site_id: creds.site_id.clone(),
        model: "NF-200".into(),
        firmware_version: "2.3.1".into(),
    };
    let link = LinkOptions {
        tls: Some(creds.client_config_arc()?),
        sample_interval: Duration::from_millis(20),
        batch_interval: Duration::from_millis(100),
        max_backoff: Duration::from_millis(500),
        ..LinkOptions::to_broker(sb.mqtts_addr())
    };
    let cancel = CancellationToken::new();
    let status: SharedStatus = Arc::new(Mutex::new(LinkStatus::default()));
    let task = tokio::spawn(run_device(
        SimDevice::new(info, 7),
        link,
        SeqCounter::from_clock(),
        cancel.clone(),
        status.clone(),
    ));
    Ok(Running { cancel, status, task })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_hardware_keeps_the_device_id_site_and_history() -> anyhow::Result<()> {
    let sb = Sandbox::start().await?;
    sb.server.ensure_site(SITE, "Site Life", "Europe/Paris").await?;
    let (_, token) = sb
        .server
        .trust
        .create_token(&Actor::system(), SITE, Duration::from_secs(600), 1, DEV, "first unit")
        .await?;
    let first = nanofleet_agent::enroll::enroll(&sb.grpc_url(), &token, "NF-200", "SER-OLD").await?;
    assert_eq!((first.device_id.as_str(), first.site_id.as_str()), (DEV, SITE));
    let old = run(&sb, &first)?;
    let store = sb.server.store.clone();
    eventually("the first unit online with telemetry", Duration::from_secs(20), || async {
        let d = store.get_device(DEV).await.ok()??;
        (d.online && d.telemetry_seq > 2).then_some(())
    })
    .await?;
    let history_before = store.telemetry_seqs(DEV).await?.len();
    assert!(history_before > 0);

    // Hospital IT replaces the broken unit.
    let channel = sb.grpc_channel().await?;
    let mut fleet = FleetServiceClient::with_interceptor(channel, sb.admin());
    let replaced = fleet
        .replace_device(pb::ReplaceDeviceRequest {
            device_id: DEV.into(),
            reason: "pump housing cracked".into(),
            expires_in_seconds: 600,
        })
        .await?
        .into_inner();
    assert_eq!(replaced.device.as_ref().map(|d| d.status), Some(pb::DeviceStatus::Replacing as i32));
    assert!(replaced.secret_token.starts_with("nfe1."));

    // The old unit is cut off at once and cannot come back.
    eventually("the old unit disconnected", Duration::from_secs(10), || async {
        let s = old.status.lock().map(|s| s.connected).unwrap_or(true);
        (!s).then_some(())
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!old.status.lock().map(|s| s.connected).unwrap_or(true), "the old unit reconnected");
    old.cancel.cancel();
    let _ = old.task.await;

    // A normal token cannot name the id; the replacement token enrolls the new unit
    // under it, once.
    let taken =
        sb.server.trust.create_token(&Actor::system(), SITE, Duration::from_secs(600), 1, DEV, "x").await;
    assert!(matches!(taken, Err(nanofleet_api::Error::Conflict(_))), "{taken:?}");
    let second =
        nanofleet_agent::enroll::enroll(&sb.grpc_url(), &replaced.secret_token, "NF-200", "SER-NEW").await?;
    assert_eq!((second.device_id.as_str(), second.site_id.as_str()), (DEV, SITE));
    let again =
        nanofleet_agent::enroll::enroll(&sb.grpc_url(), &replaced.secret_token, "NF-200", "SER-X").await;
    assert!(again.is_err(), "a replacement token works once");

    let new = run(&sb, &second)?;
    eventually("the new unit online and adding telemetry", Duration::from_secs(20), || async {
        let d = store.get_device(DEV).await.ok()??;
        let n = store.telemetry_seqs(DEV).await.ok()?.len();
        (d.online && d.status == "active" && d.hardware_serial == "SER-NEW" && n > history_before + 2)
            .then_some(())
    })
    .await?;
    new.cancel.cancel();
    let _ = new.task.await;

    // History kept, and the whole story is in the audit trail.
    let d = store.get_device(DEV).await?.expect("device");
    assert_eq!(d.site_id, SITE);
    let actions: Vec<String> = store
        .list_audit(&AuditFilter { subject: Some(DEV.into()), ..Default::default() })
        .await?
        .into_iter()
        .map(|r| r.entry.action)
        .collect();
    for want in ["device.enroll", "device.replace", "device.replace.enroll"] {
        assert!(actions.iter().any(|a| a == want), "{want} missing from {actions:?}");
    }
    let certs = store.device_certs(DEV).await?;
    assert_eq!(certs.len(), 2);
    assert_eq!(
        certs.iter().filter(|c| c.revoked_ms != 0).count(),
        1,
        "the old unit's certificate is revoked"
    );
    sb.stop().await;
    Ok(())
}
