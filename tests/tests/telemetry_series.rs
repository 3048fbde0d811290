//! Telemetry series end to end: a device publishes over MQTT, the server stores the
//! raw batches and folds them into per-minute and per-hour rollups, and the gRPC API
//! answers with counts, extremes and means that are exact and percentiles within 1 %.
//! A re-sent batch counts once; rollups survive a restart; bad queries name the field.

use std::time::Duration;

use nanofleet_proto::Message as _;
use nanofleet_proto::device::v1::TelemetryBatch;
use nanofleet_proto::v1::telemetry_service_client::TelemetryServiceClient;
use nanofleet_proto::v1::{self as pb, Resolution};
use nanofleet_tests::{RawDevice, Sandbox, eventually, init_tracing, now_ms, sample};
use rumqttc::v5::mqttbytes::v5::PubAckReason;

const DEV: &str = "NF-SER-01";
const TOPIC: &str = "nf/v1/NF-SER-01/telemetry";

/// Aqueous flow of sample `i`: a spread wide enough for the percentiles to mean
/// something (a sawtooth between 8,500 and 9,490 µL/min).
fn flow(i: i64) -> f64 {
    8_500.0 + ((i * 37) % 100) as f64 * 10.0
}

/// Batch `seq` (1-based): 60 samples a second apart from `t0 + (seq-1) min`.
fn batch(t0: i64, seq: u64) -> Vec<u8> {
    let samples = (0..60)
        .map(|k| {
            let i = (seq as i64 - 1) * 60 + k;
            let mut s = sample(t0 + i * 1_000);
            s.lines[0].flow_ul_min = flow(i);
            s
        })
        .collect();
    TelemetryBatch { device_id: DEV.into(), seq, samples, boot_id: "b".into() }.encode_to_vec()
}

/// The exact lower-rank quantile of `values`.
fn exact(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[(q * (v.len() - 1) as f64).floor() as usize]
}

fn close(got: f64, want: f64, what: &str) {
    assert!((got - want).abs() <= 0.01 * want.abs() + 1e-9, "{what}: {got} vs exact {want}");
}

async fn series(
    api: &mut TelemetryServiceClient<
        tonic::service::interceptor::InterceptedService<tonic::transport::Channel, nanofleet::cli::Bearer>,
    >,
    since: i64,
    until: i64,
    resolution: Resolution,
    max_points: u32,
) -> Result<pb::QuerySeriesResponse, tonic::Status> {
    api.query_series(pb::QuerySeriesRequest {
        device_id: DEV.into(),
        metric: "aqueous_flow".into(),
        since_unix_ms: since,
        until_unix_ms: until,
        resolution: resolution as i32,
        max_points,
    })
    .await
    .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_from_rollups_are_exact_where_they_can_be_and_survive_a_restart() -> anyhow::Result<()> {
    init_tracing();
    let sb = Sandbox::start().await?;
    let mut dev = RawDevice::connect(sb.mqtt_addr(), DEV).await?;
    assert_eq!(dev.birth(DEV, "site-a").await?, PubAckReason::Success);
    // Two days ago, 30 minutes into an hour: three whole minutes of one hour.
    let t0 = (now_ms() - 2 * 86_400_000).div_euclid(3_600_000) * 3_600_000 + 1_800_000;
    for seq in 1..=3 {
        assert_eq!(dev.publish(TOPIC, batch(t0, seq)).await?, PubAckReason::Success);
    }
    // A re-send of batch 2 (its PUBACK lost, say): stored once, counted once.
    assert_eq!(dev.publish(TOPIC, batch(t0, 2)).await?, PubAckReason::Success);

    let channel = sb.grpc_channel().await?;
    let mut api = TelemetryServiceClient::with_interceptor(channel, sb.admin());
    let (since, until) = (t0 - 3_600_000, t0 + 3_600_000);
    let minutes = eventually("180 samples in the minute rollups", Duration::from_secs(20), || {
        let mut api = api.clone();
        async move {
            let r = series(&mut api, since, until, Resolution::Minute, 0).await.ok()?;
            (r.points.iter().map(|p| p.count).sum::<u64>() == 180).then_some(r)
        }
    })
    .await?;
    assert_eq!(minutes.resolution, Resolution::Minute as i32);
    assert_eq!((minutes.bucket_ms, minutes.unit.as_str()), (60_000, "µL/min"));
    assert_eq!(minutes.points.len(), 3);
    for (m, p) in minutes.points.iter().enumerate() {
        let values: Vec<f64> = (m as i64 * 60..m as i64 * 60 + 60).map(flow).collect();
        assert_eq!(p.start_unix_ms, t0 + m as i64 * 60_000);
        assert_eq!(p.count, 60, "minute {m}: the re-sent batch is not counted twice");
        assert_eq!((p.min, p.max), (exact(&values, 0.0), exact(&values, 1.0)));
        assert!((p.mean - values.iter().sum::<f64>() / 60.0).abs() < 1e-6, "minute {m} mean {}", p.mean);
        close(p.p50, exact(&values, 0.5), "p50");
        close(p.p90, exact(&values, 0.9), "p90");
        close(p.p99, exact(&values, 0.99), "p99");
    }

    // The hour: the same figures over all 180 samples, merged from the minutes.
    let all: Vec<f64> = (0..180).map(flow).collect();
    let hour = series(&mut api, since, until, Resolution::Hour, 0).await?;
    assert_eq!(hour.points.len(), 1);
    let p = &hour.points[0];
    assert_eq!((p.start_unix_ms, p.width_ms, p.count), (t0 - 1_800_000, 3_600_000, 180));
    assert_eq!((p.min, p.max), (exact(&all, 0.0), exact(&all, 1.0)));
    close(p.p50, exact(&all, 0.5), "hour p50");
    close(p.p99, exact(&all, 0.99), "hour p99");

    // Minutes merged into wider buckets to fit max_points.
    let merged = series(&mut api, since, until, Resolution::Minute, 2).await?;
    assert!(merged.points.len() <= 2 && merged.bucket_ms > 60_000, "{merged:?}");
    assert_eq!(merged.points.iter().map(|p| p.count).sum::<u64>(), 180);

    // Raw samples, and the automatic choice for a short window.
    let raw = series(&mut api, t0, t0 + 180_000, Resolution::Raw, 0).await?;
    assert_eq!(raw.points.len(), 180);
    assert_eq!(raw.points.iter().map(|p| p.p50).collect::<Vec<_>>(), all);
    let auto = series(&mut api, t0, t0 + 300_000, Resolution::Unspecified, 0).await?;
    assert_eq!((auto.resolution, auto.points.len()), (Resolution::Raw as i32, 180));
    let auto_12h = series(&mut api, t0 - 21_600_000, t0 + 21_600_000, Resolution::Unspecified, 0).await?;
    assert_eq!(auto_12h.resolution, Resolution::Minute as i32, "12 hours at 1,000 points are minutes");
    let auto_day = series(&mut api, t0 - 43_200_000, t0 + 43_200_000, Resolution::Unspecified, 0).await?;
    assert_eq!(auto_day.resolution, Resolution::Hour as i32, "a day at 1,000 points is hours");
    assert_eq!(auto_day.points.iter().map(|p| p.count).sum::<u64>(), 180);

    // Bad queries name the field, the value and what is allowed.
    let bad =
        |metric: &str, since: i64, until: i64, resolution: i32, max_points: u32| pb::QuerySeriesRequest {
            device_id: DEV.into(),
            metric: metric.into(),
            since_unix_ms: since,
            until_unix_ms: until,
            resolution,
            max_points,
        };
    for (req, field) in [
        (bad("flow", since, until, 0, 0), "metric"),
        (bad("aqueous_flow", until, since, 0, 0), "until_unix_ms"),
        (bad("aqueous_flow", since, until, 9, 0), "resolution"),
        (bad("aqueous_flow", since, until, 0, 20_000), "max_points"),
    ] {
        let e = api.query_series(req).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().contains(field), "{field}: {}", e.message());
    }
    let e = api
        .query_series(pb::QuerySeriesRequest {
            device_id: "NF-NOPE".into(),
            ..bad("aqueous_flow", since, until, 0, 0)
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);

    // Rollups are stored state: a restarted server answers the same.
    drop(api);
    dev.close().await;
    let admin = sb.admin();
    let dir = sb.stop().await;
    let sb = Sandbox::restart_in(dir).await?;
    let mut api = TelemetryServiceClient::with_interceptor(sb.grpc_channel().await?, admin);
    let again = series(&mut api, since, until, Resolution::Minute, 0).await?;
    assert_eq!(again.points, minutes.points);
    sb.stop().await;
    Ok(())
}
