//! Bad input from devices: each is refused with a reason, counted, logged, and never
//! disturbs the valid messages around it.

use nanofleet_proto::Message as _;
use nanofleet_proto::device::v1::{DeviceState, EventBatch, Presence, TelemetryBatch};
use nanofleet_tests::{RawDevice, Sandbox, init_tracing, now_ms, sample, telemetry};
use rumqttc::v5::mqttbytes::v5::PubAckReason;

const DEV: &str = "NF-BAD-01";
const TOPIC: &str = "nf/v1/NF-BAD-01/telemetry";

async fn sandbox_with_device() -> anyhow::Result<(Sandbox, RawDevice)> {
    init_tracing();
    let sb = Sandbox::start().await?;
    let mut dev = RawDevice::connect(sb.mqtt_addr(), DEV).await?;
    assert_eq!(dev.birth(DEV, "site-a").await?, PubAckReason::Success);
    Ok((sb, dev))
}

fn rejected(sb: &Sandbox, reason: &str) -> u64 {
    sb.server.ingest.stats().rejected.get(reason).copied().unwrap_or(0)
}

/// Publishes a valid batch `seq` and checks it is stored.
async fn valid_beside(sb: &Sandbox, dev: &mut RawDevice, seq: u64) -> anyhow::Result<()> {
    assert_eq!(dev.publish(TOPIC, telemetry(DEV, seq, 2)).await?, PubAckReason::Success);
    let seqs = sb.server.store.telemetry_seqs(DEV).await?;
    assert!(seqs.contains(&(seq as i64)), "valid batch {seq} stored beside the bad one: {seqs:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_protobuf_is_refused_and_counted() -> anyhow::Result<()> {
    let (sb, mut dev) = sandbox_with_device().await?;
    valid_beside(&sb, &mut dev, 1).await?;
    let reason = dev.publish(TOPIC, vec![0xff, 0xff, 0xff, 0x01, 0x02]).await?;
    assert_eq!(reason, PubAckReason::PayloadFormatInvalid);
    assert_eq!(rejected(&sb, "malformed_payload"), 1);
    valid_beside(&sb, &mut dev, 2).await?;
    // Random bytes on every channel: refused, never a crash.
    for (i, topic) in ["telemetry", "events", "state"].iter().enumerate() {
        let garbage: Vec<u8> = (0..64u32).map(|b| (b.wrapping_mul(2_654_435_761) >> (i + 3)) as u8).collect();
        let _ = dev.publish(&format!("nf/v1/{DEV}/{topic}"), garbage).await?;
    }
    valid_beside(&sb, &mut dev, 3).await?;
    assert_eq!(sb.server.store.telemetry_seqs(DEV).await?, vec![1, 2, 3]);
    dev.close().await;
    sb.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_identity_must_match_the_topic_and_the_client() -> anyhow::Result<()> {
    let (sb, mut dev) = sandbox_with_device().await?;
    // The payload speaks for another device.
    let reason = dev.publish(TOPIC, telemetry("NF-OTHER", 1, 1)).await?;
    assert_eq!(reason, PubAckReason::NotAuthorized);
    assert_eq!(rejected(&sb, "identity_mismatch"), 1);
    // The client publishes on another device's topic.
    let mut other = RawDevice::connect(sb.mqtt_addr(), "NF-BAD-02").await?;
    let reason = other.publish(TOPIC, telemetry(DEV, 1, 1)).await?;
    assert_eq!(reason, PubAckReason::NotAuthorized);
    assert_eq!(rejected(&sb, "identity_mismatch"), 2);
    assert!(sb.server.store.telemetry_seqs(DEV).await?.is_empty());
    valid_beside(&sb, &mut dev, 1).await?;
    other.close().await;
    dev.close().await;
    sb.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_values_are_refused_with_the_field_named() -> anyhow::Result<()> {
    let (sb, mut dev) = sandbox_with_device().await?;
    let mut s = sample(now_ms());
    s.lines[0].pressure_mbar = 1e12;
    let absurd = TelemetryBatch { device_id: DEV.into(), seq: 1, samples: vec![s], boot_id: "b".into() };
    assert_eq!(dev.publish(TOPIC, absurd.encode_to_vec()).await?, PubAckReason::PayloadFormatInvalid);
    let mut s = sample(now_ms() + 10 * 24 * 3600 * 1000);
    s.chamber_temperature_c = 22.0;
    let future = TelemetryBatch { device_id: DEV.into(), seq: 2, samples: vec![s], boot_id: "b".into() };
    assert_eq!(dev.publish(TOPIC, future.encode_to_vec()).await?, PubAckReason::PayloadFormatInvalid);
    let empty = TelemetryBatch { device_id: DEV.into(), seq: 3, samples: vec![], boot_id: "b".into() };
    assert_eq!(dev.publish(TOPIC, empty.encode_to_vec()).await?, PubAckReason::PayloadFormatInvalid);
    let no_kind =
        EventBatch { device_id: DEV.into(), seq: 1, events: vec![Default::default()], boot_id: "b".into() };
    let events_topic = format!("nf/v1/{DEV}/events");
    assert_eq!(
        dev.publish(&events_topic, no_kind.encode_to_vec()).await?,
        PubAckReason::PayloadFormatInvalid
    );
    assert_eq!(rejected(&sb, "out_of_range"), 4);
    valid_beside(&sb, &mut dev, 4).await?;
    assert_eq!(sb.server.store.telemetry_seqs(DEV).await?, vec![4]);
    dev.close().await;
    sb.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_device_is_refused_until_it_announces_itself() -> anyhow::Result<()> {
    init_tracing();
    let sb = Sandbox::start().await?;
    let mut dev = RawDevice::connect(sb.mqtt_addr(), DEV).await?;
    assert_eq!(dev.publish(TOPIC, telemetry(DEV, 1, 1)).await?, PubAckReason::NotAuthorized);
    assert_eq!(rejected(&sb, "unknown_device"), 1);
    assert_eq!(dev.birth(DEV, "site-a").await?, PubAckReason::Success);
    valid_beside(&sb, &mut dev, 1).await?;
    dev.close().await;
    sb.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_sequence_is_acknowledged_and_stored_once() -> anyhow::Result<()> {
    let (sb, mut dev) = sandbox_with_device().await?;
    for _ in 0..3 {
        assert_eq!(dev.publish(TOPIC, telemetry(DEV, 7, 2)).await?, PubAckReason::Success);
    }
    valid_beside(&sb, &mut dev, 8).await?;
    assert_eq!(sb.server.store.telemetry_seqs(DEV).await?, vec![7, 8]);
    let stats = sb.server.ingest.stats();
    assert_eq!(stats.duplicates, 2);
    assert_eq!(stats.accepted, 2);
    dev.close().await;
    sb.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_topics_and_stale_deaths_change_nothing() -> anyhow::Result<()> {
    let (sb, mut dev) = sandbox_with_device().await?;
    assert_eq!(dev.publish("nf/v1/NF-BAD-01/whatever", vec![1]).await?, PubAckReason::TopicNameInvalid);
    assert_eq!(rejected(&sb, "bad_topic"), 1);
    assert_eq!(dev.publish("hospital/records", vec![1]).await?, PubAckReason::NotAuthorized);
    assert_eq!(rejected(&sb, "bad_topic"), 2);
    // An answer to a command that is not one, or that speaks for another device.
    assert_eq!(dev.publish("nf/v1/NF-BAD-01/ack", vec![1]).await?, PubAckReason::PayloadFormatInvalid);
    assert_eq!(rejected(&sb, "malformed_payload"), 1);
    let foreign = nanofleet_proto::device::v1::Ack { device_id: "NF-OTHER-01".into(), ..Default::default() };
    assert_eq!(
        dev.publish("nf/v1/NF-BAD-01/ack", foreign.encode_to_vec()).await?,
        PubAckReason::NotAuthorized
    );
    assert_eq!(rejected(&sb, "identity_mismatch"), 1);
    // A death naming an older session (a late last will) leaves the device online.
    let stale = DeviceState {
        device_id: DEV.into(),
        presence: Presence::Offline as i32,
        session_id: "an-old-session".into(),
        time_unix_ms: now_ms(),
        ..Default::default()
    };
    assert_eq!(dev.publish("nf/v1/NF-BAD-01/state", stale.encode_to_vec()).await?, PubAckReason::Success);
    assert!(sb.server.store.get_device(DEV).await?.is_some_and(|d| d.online));
    valid_beside(&sb, &mut dev, 1).await?;
    dev.close().await;
    sb.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_in_a_burst_do_not_cost_a_valid_one() -> anyhow::Result<()> {
    let (sb, dev) = sandbox_with_device().await?;
    // Fire without waiting: valid and bad messages share storage batches.
    for seq in 1..=200u64 {
        let payload = if seq % 5 == 0 { vec![0xde, 0xad] } else { telemetry(DEV, seq, 1) };
        dev.client.publish(TOPIC, rumqttc::v5::mqttbytes::QoS::AtLeastOnce, false, payload).await?;
    }
    let want: Vec<i64> = (1..=200).filter(|s| s % 5 != 0).collect();
    nanofleet_tests::eventually("160 valid batches stored", std::time::Duration::from_secs(20), || async {
        let got = sb.server.store.telemetry_seqs(DEV).await.ok()?;
        (got == want).then_some(())
    })
    .await?;
    assert_eq!(rejected(&sb, "malformed_payload"), 40);
    dev.close().await;
    sb.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_subscribes_only_under_its_own_prefix() -> anyhow::Result<()> {
    use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode;
    let (sb, mut dev) = sandbox_with_device().await?;
    assert!(matches!(dev.subscribe("nf/v1/NF-BAD-01/cmd/#").await?, SubscribeReasonCode::Success(_)));
    for filter in
        ["nf/v1/#", "nf/v1/+/telemetry", "nf/v1/NF-OTHER/cmd/#", "#", "$share/g/nf/v1/NF-BAD-01/cmd/x"]
    {
        let code = dev.subscribe(filter).await?;
        assert_eq!(code, SubscribeReasonCode::NotAuthorized, "{filter}");
    }
    dev.close().await;
    sb.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_leaves_without_a_death_message_is_offline() -> anyhow::Result<()> {
    let (sb, dev) = sandbox_with_device().await?;
    assert!(sb.server.store.get_device(DEV).await?.is_some_and(|d| d.online));
    // A clean DISCONNECT: the broker discards the last will, and no death was sent.
    dev.close().await;
    nanofleet_tests::eventually("the device offline", std::time::Duration::from_secs(10), || async {
        sb.server.store.get_device(DEV).await.ok().flatten().filter(|d| !d.online).map(|_| ())
    })
    .await?;
    sb.stop().await;
    Ok(())
}
