//! The agent binary stops in order on SIGTERM as on Ctrl-C: it drains, announces its
//! death (a clean DISCONNECT discards the last will) and exits 0. Runs against the
//! Mosquitto on 127.0.0.1:1883 as a stock broker; skips with the reason where there is
//! none (CI provides one and sets NANOFLEET_REQUIRE_SERVICES).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nanofleet_proto::Message as _;
use nanofleet_proto::device::v1::{DeviceState, Presence};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

const BROKER: (&str, u16) = ("127.0.0.1", 1883);

fn broker_reachable() -> bool {
    std::net::TcpStream::connect_timeout(&"127.0.0.1:1883".parse().expect("addr"), Duration::from_secs(1))
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_agent_in_order() -> anyhow::Result<()> {
    if !broker_reachable() {
        let required = std::env::var_os("NANOFLEET_REQUIRE_SERVICES").is_some_and(|v| v != "0");
        assert!(!required, "required service missing: no MQTT broker on 127.0.0.1:1883");
        eprintln!("SKIPPED: no MQTT broker on 127.0.0.1:1883 (Debian package mosquitto)");
        return Ok(());
    }
    let device = format!("NF-SIG-{}", std::process::id());
    let mut opts = MqttOptions::new(format!("watch-{device}"), BROKER.0, BROKER.1);
    opts.set_outgoing_inflight_upper_limit(16);
    let (client, mut events) = AsyncClient::new(opts, 16);
    client.subscribe(format!("nf/v1/{device}/state"), QoS::AtLeastOnce).await?;
    let (tx, mut states) = tokio::sync::mpsc::unbounded_channel();
    let watcher = tokio::spawn(async move {
        while let Ok(ev) = events.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = ev
                && let Ok(s) = DeviceState::decode(p.payload.as_ref())
            {
                let _ = tx.send(s);
            }
        }
    });
    // Let the subscription settle before the device appears.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let state_dir = std::env::temp_dir().join(format!("nf-agent-sig-{}", std::process::id()));
    let mut agent = Command::new(env!("CARGO_BIN_EXE_nanofleet-agent"))
        .args([
            "run",
            "--device-id",
            &device,
            "--site",
            "test-site",
            "--broker",
            "127.0.0.1:1883",
            "--batch",
            "200ms",
        ])
        .arg("--state-dir")
        .arg(&state_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;

    let birth = next(&mut states).await.expect("a birth");
    assert_eq!(birth.presence, Presence::Online as i32);
    tokio::time::sleep(Duration::from_millis(500)).await;

    Command::new("kill").args(["-TERM", &agent.id().to_string()]).status()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = agent.try_wait()? {
            break s;
        }
        assert!(Instant::now() < deadline, "agent still running 10 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
    let death = next(&mut states).await.expect("a death message");
    assert_eq!(death.presence, Presence::Offline as i32);
    assert_eq!(death.session_id, birth.session_id, "the death names the session of the birth");

    // The birth was retained by the broker: clear it.
    client.publish(format!("nf/v1/{device}/state"), QoS::AtLeastOnce, true, Vec::<u8>::new()).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = client.disconnect().await;
    watcher.abort();
    let _ = std::fs::remove_dir_all(&state_dir);
    Ok(())
}

async fn next(states: &mut tokio::sync::mpsc::UnboundedReceiver<DeviceState>) -> Option<DeviceState> {
    tokio::time::timeout(Duration::from_secs(10), states.recv()).await.ok().flatten()
}
