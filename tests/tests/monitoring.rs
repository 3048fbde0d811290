//! Cross-site monitoring against a real server: devices over mutual TLS publish signed
//! batch records; the server charts them, says which stratum differs (adjusted for the
//! others), answers the cohort gate, and raises alerts — once per condition, to the
//! dashboard's list, a live watch and a webhook — that survive a restart.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nanofleet_proto::Message as _;
use nanofleet_proto::device::v1::{BatchRecord, Cartridge, QcResult, QualityAttribute, RunOutcome};
use nanofleet_proto::v1 as pb;
use nanofleet_proto::v1::monitoring_service_client::MonitoringServiceClient;
use nanofleet_tests::{RawDevice, Sandbox, eventually, now_ms};
use rand::{Rng as _, SeedableRng as _};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Monitor = MonitoringServiceClient<InterceptedService<Channel, nanofleet::cli::Bearer>>;

/// An enrolled device that signs its own batch records with its enrollment key.
struct SigningDevice {
    id: String,
    site: String,
    firmware: String,
    mqtt: RawDevice,
    key: aws_lc_rs::signature::EcdsaKeyPair,
    cert: Vec<u8>,
    n: u32,
}

impl SigningDevice {
    async fn enroll(sb: &Sandbox, site: &str, id: &str, firmware: &str) -> anyhow::Result<SigningDevice> {
        let creds = sb.enroll_device(site, id).await?;
        let tls = nanofleet_agent::enroll::Credentials::client_config(&creds)?;
        let mut mqtt =
            RawDevice::connect_with(nanofleet_tests::mqtt_options(sb.mqtts_addr(), id, Some(tls))).await?;
        mqtt.birth(id, site).await?;
        let cert = nanofleet_pki::tls::certs_from_pem("chain", &creds.chain_pem)?[0].to_vec();
        let key = nanofleet_pki::tls::key_from_pem("key", &creds.key_pem)?;
        let key = nanofleet_recipe::batch::device_key(key.secret_der()).map_err(anyhow::Error::msg)?;
        Ok(SigningDevice {
            id: id.into(),
            site: site.into(),
            firmware: firmware.into(),
            mqtt,
            key,
            cert,
            n: 0,
        })
    }

    /// Publishes a completed batch with these QC values (size nm, PDI, encapsulation %),
    /// made from `lot`, ending at `ended_ms`.
    async fn batch(&mut self, lot: &str, size: f64, pdi: f64, ee: f64, ended_ms: i64) -> anyhow::Result<()> {
        self.n += 1;
        let qc = |attribute: QualityAttribute, value: f64, min: Option<f64>, max: Option<f64>| QcResult {
            attribute: attribute as i32,
            value,
            unit: String::new(),
            min,
            max,
            passed: min.is_none_or(|m| value >= m) && max.is_none_or(|m| value <= m),
        };
        let qc = vec![
            qc(QualityAttribute::SizeNm, size, Some(60.0), Some(100.0)),
            qc(QualityAttribute::Pdi, pdi, None, Some(0.2)),
            qc(QualityAttribute::EncapsulationPct, ee, Some(85.0), None),
        ];
        let record = BatchRecord {
            batch_id: format!("{}-B{:04}", self.id, self.n),
            request_id: format!("{}-R{:04}", self.id, self.n),
            device_id: self.id.clone(),
            site_id: self.site.clone(),
            model: "NF-200".into(),
            firmware_version: self.firmware.clone(),
            recipe_id: "flu-h5-mrna".into(),
            recipe_version: 1,
            cartridge: Some(Cartridge {
                gtin: "10614141000019".into(),
                lot: lot.into(),
                serial: format!("C{}", self.n),
                expires_unix_ms: ended_ms + 86_400_000,
            }),
            started_unix_ms: ended_ms - 60_000,
            ended_unix_ms: ended_ms,
            outcome: RunOutcome::Complete as i32,
            qc_passed: qc.iter().all(|q| q.passed),
            qc,
            ..Default::default()
        };
        let signed =
            nanofleet_recipe::batch::sign(&record, &self.key, &self.cert).map_err(anyhow::Error::msg)?;
        let topic = format!("nf/v1/{}/batch", self.id);
        let reason = self.mqtt.publish(&topic, signed.encode_to_vec()).await?;
        anyhow::ensure!(
            reason == rumqttc::v5::mqttbytes::v5::PubAckReason::Success,
            "record refused: {reason:?}"
        );
        Ok(())
    }
}

async fn monitor(sb: &Sandbox, bearer: nanofleet::cli::Bearer) -> anyhow::Result<Monitor> {
    Ok(MonitoringServiceClient::with_interceptor(sb.grpc_channel().await?, bearer))
}

fn normal(rng: &mut rand::rngs::StdRng) -> f64 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

fn select(f: impl FnOnce(&mut pb::BatchSelection)) -> Option<pb::BatchSelection> {
    let mut s = pb::BatchSelection::default();
    f(&mut s);
    Some(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_feed_charts_lot_comparison_and_the_cohort_gate() -> anyhow::Result<()> {
    nanofleet_tests::init_tracing();
    let sb = Sandbox::start().await?;
    // Two sites; site-a's devices also use a bad lot (larger particles, less
    // encapsulation); the devices on firmware 1.3.0 make wider distributions (PDI).
    let mut devices = vec![
        SigningDevice::enroll(&sb, "site-a", "NF-A-01", "1.2.0").await?,
        SigningDevice::enroll(&sb, "site-a", "NF-A-02", "1.3.0").await?,
        SigningDevice::enroll(&sb, "site-b", "NF-B-01", "1.2.0").await?,
        SigningDevice::enroll(&sb, "site-b", "NF-B-02", "1.3.0").await?,
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // Records must end inside their device certificate's validity.
    let t0 = now_ms() - 200_000;
    for i in 0..30 {
        for d in devices.iter_mut() {
            let bad = d.site == "site-a" && i % 3 == 0;
            let lot = if bad {
                "L-BAD"
            } else if i % 2 == 0 {
                "L-A"
            } else {
                "L-B"
            };
            let newer = d.firmware == "1.3.0";
            let size = 80.0 + 3.0 * normal(&mut rng) + if bad { 8.0 } else { 0.0 };
            let pdi = 0.12 + 0.015 * normal(&mut rng) + if newer { 0.03 } else { 0.0 };
            let ee = 92.0 + 1.5 * normal(&mut rng) - if bad { 6.0 } else { 0.0 };
            d.batch(lot, size, pdi, ee, t0 + i64::from(i) * 1_000).await?;
        }
    }
    let mut ops = monitor(&sb, sb.admin()).await?;
    let n = eventually("all 120 records charted", Duration::from_secs(10), || {
        let mut ops = ops.clone();
        async move {
            let r = ops
                .get_control_chart(pb::GetControlChartRequest {
                    metric: "size_nm".into(),
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner();
            (r.charts[0].n == 120).then_some(r.charts[0].n)
        }
    })
    .await?;
    assert_eq!(n, 120);

    // One chart: limits from the baseline, capability against the recipe's limits.
    let chart = ops
        .get_control_chart(pb::GetControlChartRequest {
            metric: "pdi".into(),
            selection: select(|s| s.device_ids = vec!["NF-A-01".into()]),
            baseline_points: 10,
            max_points: 5,
            ..Default::default()
        })
        .await?
        .into_inner()
        .charts
        .remove(0);
    assert_eq!((chart.n, chart.baseline_points, chart.points.len()), (30, 10, 5));
    assert!(chart.ucl > chart.center && chart.center > chart.lcl, "{chart:?}");
    assert_eq!((chart.lsl, chart.usl), (None, Some(0.2)));
    assert!(chart.cpk.is_some_and(|k| k > 1.0), "an in-control device is capable: {:?}", chart.cpk);
    assert_eq!(chart.points[4].index, 29, "the newest points, with their place in the series");
    assert_eq!(chart.points[4].device_id, "NF-A-01");
    // One chart per device.
    let by_device = ops
        .get_control_chart(pb::GetControlChartRequest {
            metric: "pdi".into(),
            by: pb::Factor::Device as i32,
            ..Default::default()
        })
        .await?
        .into_inner();
    let strata: Vec<&str> = by_device.charts.iter().map(|c| c.stratum.as_str()).collect();
    assert_eq!(strata, ["device=NF-A-01", "device=NF-A-02", "device=NF-B-01", "device=NF-B-02"]);

    // The bad lot is singled out by the lot comparison, and its site is not.
    let by_lot = ops
        .compare_strata(pb::CompareStrataRequest {
            metric: "size_nm".into(),
            by: pb::Factor::Lot as i32,
            ..Default::default()
        })
        .await?
        .into_inner();
    let flagged: Vec<&str> =
        by_lot.strata.iter().filter(|s| s.significant).map(|s| s.level.as_str()).collect();
    assert_eq!(flagged, ["L-BAD"], "{}", by_lot.summary);
    let bad = &by_lot.strata[0];
    assert!((bad.effect - 8.0).abs() < 3.0 && bad.ci_low > 0.0, "{bad:?}");
    let by_site = ops
        .compare_strata(pb::CompareStrataRequest {
            metric: "size_nm".into(),
            by: pb::Factor::Site as i32,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(by_site.strata.iter().all(|s| !s.significant), "{}", by_site.summary);
    assert!(by_site.adjusted_for.contains(&(pb::Factor::Lot as i32)));

    // The cohort gate: firmware 1.3.0 regressed (PDI), with the evidence; the two
    // sites' devices on the same firmware do not differ.
    let gate = ops
        .compare_cohorts(pb::CompareCohortsRequest {
            cohort_a: select(|s| s.firmware_versions = vec!["1.3.0".into()]),
            cohort_b: select(|s| s.firmware_versions = vec!["1.2.0".into()]),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(gate.verdict, pb::Verdict::Regressed as i32, "{}", gate.summary);
    let pdi = gate.metrics.iter().find(|m| m.metric == "pdi").expect("pdi compared");
    assert!(pdi.regressed && pdi.p_value < 0.01 && pdi.worse_by > 0.02, "{pdi:?}");
    assert_eq!((gate.batches_a, gate.batches_b), (60, 60));
    let neutral = ops
        .compare_cohorts(pb::CompareCohortsRequest {
            cohort_a: select(|s| {
                s.firmware_versions = vec!["1.2.0".into()];
                s.cartridge_lots = vec!["L-A".into(), "L-B".into()];
                s.site_ids = vec!["site-b".into()];
            }),
            cohort_b: select(|s| {
                s.firmware_versions = vec!["1.2.0".into()];
                s.cartridge_lots = vec!["L-A".into(), "L-B".into()];
                s.site_ids = vec!["site-a".into()];
            }),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(neutral.verdict, pb::Verdict::NoRegression as i32, "{}", neutral.summary);

    // Bad input names the field, the value and what is allowed.
    let e = ops
        .get_control_chart(pb::GetControlChartRequest { metric: "colour".into(), ..Default::default() })
        .await
        .expect_err("unknown metric");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("metric") && e.message().contains("colour") && e.message().contains("pdi"));
    let e = ops
        .get_control_chart(pb::GetControlChartRequest {
            metric: "pdi".into(),
            baseline_points: 1,
            ..Default::default()
        })
        .await
        .expect_err("one point is no baseline");
    assert!(e.message().contains("baseline_points"), "{e}");
    let e = ops
        .compare_strata(pb::CompareStrataRequest { metric: "pdi".into(), ..Default::default() })
        .await
        .expect_err("no factor");
    assert!(e.message().contains("by"), "{e}");
    let e = ops
        .get_control_chart(pb::GetControlChartRequest {
            metric: "pdi".into(),
            selection: select(|s| {
                s.since_unix_ms = 2_000;
                s.until_unix_ms = 1_000;
            }),
            ..Default::default()
        })
        .await
        .expect_err("an empty window");
    assert!(e.message().contains("until_unix_ms"), "{e}");

    // A pharmacist sees their own site only, and cannot ask for another's.
    let mut pharmacist = monitor(&sb, sb.person("phil", pb::Role::Pharmacist, "site-b").await?).await?;
    let own = pharmacist
        .get_control_chart(pb::GetControlChartRequest { metric: "pdi".into(), ..Default::default() })
        .await?
        .into_inner();
    assert_eq!(own.charts[0].n, 60);
    assert!(own.charts[0].points.iter().all(|p| p.site_id == "site-b"));
    let e = pharmacist
        .get_control_chart(pb::GetControlChartRequest {
            metric: "pdi".into(),
            selection: select(|s| s.site_ids = vec!["site-a".into()]),
            ..Default::default()
        })
        .await
        .expect_err("another site");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);

    // After a restart the index is rebuilt from the database.
    for d in devices {
        d.mqtt.close().await;
    }
    let admin = sb.admin();
    let sb = Sandbox::restart_in(sb.stop().await).await?;
    let mut ops = monitor(&sb, admin).await?;
    let again = ops
        .get_control_chart(pb::GetControlChartRequest { metric: "size_nm".into(), ..Default::default() })
        .await?
        .into_inner();
    assert_eq!(again.charts[0].n, 120);
    sb.stop().await;
    Ok(())
}

/// A webhook receiver: every POSTed body, parsed.
async fn webhook_receiver() -> anyhow::Result<(String, Arc<Mutex<Vec<serde_json::Value>>>)> {
    let got: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let sink = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                if let Ok(v) = serde_json::from_slice(&body) {
                    sink.lock().unwrap().push(v);
                }
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((url, got))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_device_raises_one_alert_until_it_returns() -> anyhow::Result<()> {
    let (url, hooked) = webhook_receiver().await?;
    let sb = Sandbox::start_with(|o| {
        o.alerts.webhook = Some(url.parse().expect("url"));
        // Evaluations are driven by the test, with its own clock.
        o.alerts.evaluate_every = Duration::from_secs(3_600);
    })
    .await?;
    let mut device = SigningDevice::enroll(&sb, "site-a", "NF-A-07", "1.2.0").await?;
    let seen = eventually("device seen", Duration::from_secs(10), || async {
        let d = sb.server.fleet.device("NF-A-07").await.ok()?;
        (d.last_seen_unix_ms > 0).then_some(d.last_seen_unix_ms)
    })
    .await?;
    let monitoring = sb.server.monitoring.clone();
    let opts = nanofleet_api::AlertOptions { site_every: Duration::from_secs(1 << 30), ..Default::default() };
    let mut watch =
        monitor(&sb, sb.admin()).await?.watch_alerts(pb::WatchAlertsRequest::default()).await?.into_inner();

    let e = monitoring.evaluate_alerts(&opts, seen + 60_000).await?;
    assert!(e.raised.is_empty(), "a minute is not silence: {e:?}");
    let e = monitoring.evaluate_alerts(&opts, seen + 121_000).await?;
    assert_eq!(e.raised.len(), 1, "{e:?}");
    let alert = e.raised[0].clone();
    assert_eq!((alert.kind, alert.subject.as_str()), (pb::AlertKind::DeviceSilent as i32, "NF-A-07"));
    // Every further evaluation while it stays silent raises nothing new.
    for s in 1..=30 {
        let e = monitoring.evaluate_alerts(&opts, seen + 121_000 + s * 1_000).await?;
        assert!(e.raised.is_empty(), "{e:?}");
    }
    let mut ops = monitor(&sb, sb.admin()).await?;
    let listed = ops
        .list_alerts(pb::ListAlertsRequest { kind: pb::AlertKind::DeviceSilent as i32, ..Default::default() })
        .await?
        .into_inner()
        .alerts;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let watched = tokio::time::timeout(Duration::from_secs(5), watch.message()).await??.and_then(|m| m.alert);
    assert_eq!(watched.map(|a| a.alert_id), Some(alert.alert_id.clone()));

    // It speaks again: the alert resolves.
    let telemetry = nanofleet_tests::telemetry("NF-A-07", 1, 1);
    device.mqtt.publish("nf/v1/NF-A-07/telemetry", telemetry).await?;
    let back = eventually("seen again", Duration::from_secs(10), || async {
        let d = sb.server.fleet.device("NF-A-07").await.ok()?;
        (d.last_seen_unix_ms > seen).then_some(d.last_seen_unix_ms)
    })
    .await?;
    let e = monitoring.evaluate_alerts(&opts, back + 1_000).await?;
    assert_eq!(e.resolved.iter().map(|a| a.alert_id.as_str()).collect::<Vec<_>>(), [alert.alert_id.as_str()]);

    // Silent again: a new alert, which QA or ops acknowledge with a note.
    let e = monitoring.evaluate_alerts(&opts, back + 200_000).await?;
    assert_eq!(e.raised.len(), 1);
    let second = e.raised[0].alert_id.clone();
    let mut pharmacist = monitor(&sb, sb.person("phil", pb::Role::Pharmacist, "site-a").await?).await?;
    let refused = pharmacist
        .acknowledge_alert(pb::AcknowledgeAlertRequest { alert_id: second.clone(), note: "seen".into() })
        .await
        .expect_err("pharmacists do not acknowledge");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    let refused = ops
        .acknowledge_alert(pb::AcknowledgeAlertRequest { alert_id: second.clone(), note: " ".into() })
        .await
        .expect_err("a note is required");
    assert!(refused.message().contains("note"), "{refused}");
    let acked = ops
        .acknowledge_alert(pb::AcknowledgeAlertRequest {
            alert_id: second.clone(),
            note: "device unplugged for cleaning".into(),
        })
        .await?
        .into_inner()
        .alert
        .expect("alert");
    assert_eq!((acked.state, acked.acknowledged_by.as_str()), (pb::AlertState::Acknowledged as i32, "admin"));
    let again = ops
        .acknowledge_alert(pb::AcknowledgeAlertRequest { alert_id: second.clone(), note: "again".into() })
        .await
        .expect_err("acknowledged once");
    assert_eq!(again.code(), tonic::Code::FailedPrecondition);
    let unknown = ops
        .acknowledge_alert(pb::AcknowledgeAlertRequest { alert_id: "AL-nope".into(), note: "x".into() })
        .await
        .expect_err("unknown");
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    let audited = sb
        .server
        .store
        .list_audit(&nanofleet_store::AuditFilter {
            action: Some("alert.acknowledge".into()),
            ..Default::default()
        })
        .await?;
    assert_eq!(audited.len(), 1);
    assert_eq!(audited[0].entry.reason, "device unplugged for cleaning");

    // The webhook got each new alert and each change of state: raised, resolved,
    // raised, acknowledged.
    let states = eventually("webhook deliveries", Duration::from_secs(10), || async {
        let got = hooked.lock().unwrap().clone();
        (got.len() >= 4).then_some(got)
    })
    .await?;
    let summary: Vec<(String, String)> = states
        .iter()
        .map(|v| {
            (v["state"].as_str().unwrap_or("").to_owned(), v["subject"].as_str().unwrap_or("").to_owned())
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("ALERT_STATE_OPEN".into(), "NF-A-07".into()),
            ("ALERT_STATE_RESOLVED".into(), "NF-A-07".into()),
            ("ALERT_STATE_OPEN".into(), "NF-A-07".into()),
            ("ALERT_STATE_ACKNOWLEDGED".into(), "NF-A-07".into()),
        ]
    );
    device.mqtt.close().await;
    sb.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drifting_device_raises_one_alert_per_rule_that_survives_a_restart() -> anyhow::Result<()> {
    let sb = Sandbox::start_with(|o| o.alerts.evaluate_every = Duration::from_secs(3_600)).await?;
    let mut steady = SigningDevice::enroll(&sb, "site-a", "NF-A-01", "1.2.0").await?;
    let mut drifting = SigningDevice::enroll(&sb, "site-a", "NF-A-02", "1.2.0").await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let t0 = now_ms() - 200_000;
    // 25 runs in control, then the PDI of one device creeps up 0.004 a run (pump wear).
    for i in 0..45 {
        let t = t0 + i * 1_000;
        steady.batch("L-A", 80.0 + 2.0 * normal(&mut rng), 0.12 + 0.01 * normal(&mut rng), 92.0, t).await?;
        let creep = if i >= 25 { 0.004 * (i - 24) as f64 } else { 0.0 };
        let pdi = 0.12 + 0.01 * normal(&mut rng) + creep;
        drifting.batch("L-A", 80.0 + 2.0 * normal(&mut rng), pdi, 92.0, t).await?;
    }
    let monitoring = sb.server.monitoring.clone();
    let opts =
        nanofleet_api::AlertOptions { silent_after: Duration::from_secs(1 << 30), ..Default::default() };
    eventually("90 records stored", Duration::from_secs(10), || async {
        let n = sb.server.store.batch_metrics_after(0, 1_000).await.ok()?.len();
        (n == 90).then_some(())
    })
    .await?;
    let e = monitoring.evaluate_alerts(&opts, now_ms()).await?;
    let raised: Vec<(String, String)> = e
        .raised
        .iter()
        .map(|a| {
            (
                a.subject.clone(),
                a.evidence.as_ref().map(|v| format!("{}/{}", v.metric, v.rule)).unwrap_or_default(),
            )
        })
        .collect();
    assert!(raised.contains(&("NF-A-02".into(), "pdi/ewma".into())), "{raised:?}");
    assert!(raised.iter().all(|(d, _)| d == "NF-A-02"), "only the drifting device: {raised:?}");
    let ewma = e.raised.iter().find(|a| a.evidence.as_ref().is_some_and(|v| v.rule == "ewma")).expect("ewma");
    let evidence = ewma.evidence.as_ref().expect("evidence");
    assert!(!evidence.points.is_empty() && evidence.ucl > evidence.center, "{evidence:?}");
    assert!(evidence.points.iter().any(|p| p.rules.iter().any(|r| r == "ewma")));
    // Evaluated batches are not evaluated again, also after a restart.
    assert!(monitoring.evaluate_alerts(&opts, now_ms()).await?.raised.is_empty());
    steady.mqtt.close().await;
    drifting.mqtt.close().await;
    let admin = sb.admin();
    let sb = Sandbox::restart_in(sb.stop().await).await?;
    let e = sb.server.monitoring.evaluate_alerts(&opts, now_ms()).await?;
    assert!(e.raised.is_empty(), "{e:?}");
    let mut ops = monitor(&sb, admin).await?;
    let listed = ops.list_alerts(pb::ListAlertsRequest::default()).await?.into_inner().alerts;
    assert_eq!(listed.len(), raised.len(), "the alerts are still there: {listed:?}");
    sb.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alarm_storm_is_one_alert_that_clears_when_the_alarms_stop() -> anyhow::Result<()> {
    use nanofleet_proto::device::v1::{Alarm, AlarmCode, AlarmPriority, Event, EventBatch, event};
    let sb = Sandbox::start_with(|o| o.alerts.evaluate_every = Duration::from_secs(3_600)).await?;
    let mut device = SigningDevice::enroll(&sb, "site-a", "NF-A-09", "1.2.0").await?;
    let now = now_ms();
    let alarm = |i: i64| Event {
        time_unix_ms: now - 60_000 + i * 1_000,
        kind: Some(event::Kind::Alarm(Alarm {
            code: if i % 2 == 0 { AlarmCode::AirInLine } else { AlarmCode::Occlusion } as i32,
            priority: AlarmPriority::High as i32,
            active: true,
            detail: String::new(),
            line: 0,
        })),
    };
    // Nine alarms are not a storm; twelve are.
    let calm = EventBatch {
        device_id: "NF-A-09".into(),
        seq: 1,
        events: (0..9).map(alarm).collect(),
        boot_id: "b".into(),
    };
    device.mqtt.publish("nf/v1/NF-A-09/events", calm.encode_to_vec()).await?;
    let opts = nanofleet_api::AlertOptions {
        silent_after: Duration::from_secs(1 << 30),
        site_every: Duration::from_secs(1 << 30),
        ..Default::default()
    };
    let monitoring = sb.server.monitoring.clone();
    eventually("events stored", Duration::from_secs(10), || async {
        let n = sb.server.store.events_since(now - 120_000, 100).await.ok()?.len();
        (n == 1).then_some(())
    })
    .await?;
    assert!(monitoring.evaluate_alerts(&opts, now).await?.raised.is_empty());
    let storm = EventBatch {
        device_id: "NF-A-09".into(),
        seq: 2,
        events: (9..12).map(alarm).collect(),
        boot_id: "b".into(),
    };
    device.mqtt.publish("nf/v1/NF-A-09/events", storm.encode_to_vec()).await?;
    eventually("events stored", Duration::from_secs(10), || async {
        let n = sb.server.store.events_since(now - 120_000, 100).await.ok()?.len();
        (n == 2).then_some(())
    })
    .await?;
    let e = monitoring.evaluate_alerts(&opts, now).await?;
    assert_eq!(e.raised.len(), 1, "{e:?}");
    let a = &e.raised[0];
    assert_eq!(
        (a.kind, a.subject.as_str(), a.site_id.as_str()),
        (pb::AlertKind::AlarmStorm as i32, "NF-A-09", "site-a")
    );
    let detail = a.evidence.as_ref().map(|e| e.detail.clone()).unwrap_or_default();
    assert!(detail.contains("12 alarms") && detail.contains("air_in_line ×6"), "{detail}");
    assert!(monitoring.evaluate_alerts(&opts, now + 1_000).await?.raised.is_empty(), "one alert per storm");
    // Ten minutes later the alarms are out of the window: the storm is over.
    let e = monitoring.evaluate_alerts(&opts, now + 600_000).await?;
    assert_eq!(e.resolved.len(), 1, "{e:?}");
    device.mqtt.close().await;
    sb.stop().await;
    Ok(())
}
