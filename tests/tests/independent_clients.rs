//! Stock MQTT clients (Mosquitto's `mosquitto_pub`, MQTT 3.1.1 and 5) talk to the
//! embedded broker like a device would. Skips (with the reason) where the Mosquitto
//! clients are not installed; CI installs them.

use std::process::Command;

use nanofleet_tests::{Sandbox, birth, init_tracing, skip_or_fail, telemetry};

fn mosquitto_pub(
    sb: &Sandbox,
    client_id: &str,
    topic: &str,
    payload: &[u8],
    version: &str,
) -> anyhow::Result<()> {
    let file = sb.dir.path().join(format!("{client_id}-{}.bin", nanofleet_tests::now_ms()));
    std::fs::write(&file, payload)?;
    // The broker refuses a client id whose previous connection is still closing
    // (CONNACK "server unavailable"); a device retries, and so does this test.
    let mut last = String::new();
    for _ in 0..20 {
        let out = Command::new("mosquitto_pub")
            .args(["-h", &sb.mqtt_addr().ip().to_string(), "-p", &sb.mqtt_addr().port().to_string()])
            .args(["-i", client_id, "-q", "1", "-V", version, "-t", topic, "-f"])
            .arg(&file)
            .output()?;
        if out.status.success() {
            return Ok(());
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        anyhow::ensure!(last.contains("unavailable"), "mosquitto_pub failed: {last}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    anyhow::bail!("mosquitto_pub failed 20 times: {last}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_pub_can_act_as_a_device() -> anyhow::Result<()> {
    init_tracing();
    if Command::new("mosquitto_pub").arg("--help").output().is_err() {
        skip_or_fail("mosquitto_pub is not installed (Debian package mosquitto-clients)");
        return Ok(());
    }
    let sb = Sandbox::start().await?;
    for (device, version) in [("NF-MQ-311", "mqttv311"), ("NF-MQ-5", "mqttv5")] {
        let (d, v) = (device.to_owned(), version.to_owned());
        let run = |topic: String, payload: Vec<u8>, client: String| {
            let sb = &sb;
            let v = v.clone();
            async move { tokio::task::block_in_place(|| mosquitto_pub(sb, &client, &topic, &payload, &v)) }
        };
        run(format!("nf/v1/{d}/state"), birth(&d, "site-q", "s1"), d.clone()).await?;
        run(format!("nf/v1/{d}/telemetry"), telemetry(&d, 1, 5), d.clone()).await?;
        run(format!("nf/v1/{d}/telemetry"), telemetry(&d, 1, 5), d.clone()).await?; // re-sent
        // Another client may not speak for this device.
        run(format!("nf/v1/{d}/telemetry"), telemetry(&d, 2, 5), "NF-MQ-INTRUDER".into()).await?;
        let seqs = sb.server.store.telemetry_seqs(&d).await?;
        assert_eq!(seqs, vec![1], "{version}: stored once, the intruder's batch refused");
    }
    let stats = sb.server.ingest.stats();
    assert_eq!(stats.duplicates, 2);
    assert_eq!(stats.rejected.get("identity_mismatch").copied(), Some(2));
    sb.stop().await;
    Ok(())
}
