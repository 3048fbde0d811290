//! Alerts: the evaluator that raises them (control-chart rules on each device's batches,
//! devices gone silent, sites whose results differ from the fleet), their storage with
//! deduplication, acknowledgement, the live stream and the webhook.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use nanofleet_monitoring::chart::{self, SpecLimits};
use nanofleet_monitoring::compare::{self, Factor};
use nanofleet_monitoring::index::{Metric, Selection};
use nanofleet_monitoring::spc::Rule;
use nanofleet_proto::prost::Message as _;
use nanofleet_proto::v1 as pb;
use nanofleet_store::{AlertFilter, AlertRow, AuditEntry};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::monitoring::{Monitoring, chart_pb};
use crate::{Caller, Error, now_ms};

/// How alerts are evaluated and where they go.
#[derive(Debug, Clone)]
pub struct AlertOptions {
    /// Time between evaluations.
    pub evaluate_every: Duration,
    /// A device with no message for this long is silent.
    pub silent_after: Duration,
    /// Rules that raise an alert on a device's chart (the others only mark the chart).
    pub rules: Vec<Rule>,
    /// Metrics charted per device for alerts.
    pub metrics: Vec<Metric>,
    /// Points of a device's own history its limits come from.
    pub baseline_points: usize,
    /// Window of batches the site comparison looks at.
    pub site_window: Duration,
    /// Significance level of the site comparison.
    pub site_alpha: f64,
    /// Time between site comparisons (they read every batch of the window).
    pub site_every: Duration,
    /// A device raising at least this many alarms within `storm_window` is in an alarm
    /// storm.
    pub storm_alarms: usize,
    pub storm_window: Duration,
    /// Where every new alert and change of state is POSTed as JSON (http or https).
    pub webhook: Option<crate::webhook::WebhookUrl>,
}

impl Default for AlertOptions {
    fn default() -> Self {
        AlertOptions {
            evaluate_every: Duration::from_secs(10),
            silent_after: Duration::from_secs(120),
            // Sustained shifts and single wild points; the other pattern rules fire
            // often enough by chance on a large fleet that they stay on the charts.
            rules: vec![Rule::Beyond3Sigma, Rule::EwmaBeyondLimit, Rule::CusumUpper, Rule::CusumLower],
            metrics: vec![
                Metric::SizeNm,
                Metric::Pdi,
                Metric::EncapsulationPct,
                Metric::Ph,
                Metric::YieldPct,
                Metric::FlowCv,
            ],
            baseline_points: 20,
            site_window: Duration::from_secs(7 * 86_400),
            site_alpha: 0.001,
            site_every: Duration::from_secs(300),
            storm_alarms: 10,
            storm_window: Duration::from_secs(300),
            webhook: None,
        }
    }
}

const SPC_CURSOR: &str = "alerts.spc";
/// Points of a chart kept as an alert's evidence.
const EVIDENCE_POINTS: usize = 30;

fn kind_str(k: pb::AlertKind) -> &'static str {
    match k {
        pb::AlertKind::SpcRule => "spc_rule",
        pb::AlertKind::DeviceSilent => "device_silent",
        pb::AlertKind::AlarmStorm => "alarm_storm",
        pb::AlertKind::SiteDiffers => "site_differs",
        pb::AlertKind::Unspecified => "",
    }
}

fn kind_of(s: &str) -> pb::AlertKind {
    match s {
        "spc_rule" => pb::AlertKind::SpcRule,
        "device_silent" => pb::AlertKind::DeviceSilent,
        "alarm_storm" => pb::AlertKind::AlarmStorm,
        "site_differs" => pb::AlertKind::SiteDiffers,
        _ => pb::AlertKind::Unspecified,
    }
}

fn state_str(s: pb::AlertState) -> &'static str {
    match s {
        pb::AlertState::Open => "open",
        pb::AlertState::Acknowledged => "acknowledged",
        pb::AlertState::Resolved => "resolved",
        pb::AlertState::Unspecified => "",
    }
}

/// An alert kind by its name (`spc_rule`, `device_silent`, `alarm_storm`,
/// `site_differs`), as stored and as the CLI and dashboard take it.
pub fn alert_kind_named(name: &str) -> Option<pb::AlertKind> {
    Some(kind_of(name)).filter(|k| *k != pb::AlertKind::Unspecified)
}

/// Alert states by name for a listing: `open`, `acknowledged`, `resolved`, `all`, or
/// `active` (open and acknowledged, also what an empty list means).
pub fn alert_states_named(name: &str) -> Option<Vec<pb::AlertState>> {
    use pb::AlertState::{Acknowledged, Open, Resolved};
    match name {
        "active" => Some(vec![Open, Acknowledged]),
        "all" => Some(vec![Open, Acknowledged, Resolved]),
        s => Some(vec![state_of(s)]).filter(|v| v[0] != pb::AlertState::Unspecified),
    }
}

fn state_of(s: &str) -> pb::AlertState {
    match s {
        "open" => pb::AlertState::Open,
        "acknowledged" => pb::AlertState::Acknowledged,
        "resolved" => pb::AlertState::Resolved,
        _ => pb::AlertState::Unspecified,
    }
}

/// The API form of a stored alert.
pub fn alert_pb(a: &AlertRow) -> pb::Alert {
    pb::Alert {
        alert_id: a.alert_id.clone(),
        kind: kind_of(&a.kind) as i32,
        state: state_of(&a.state) as i32,
        subject: a.subject.clone(),
        site_id: a.site_id.clone(),
        title: a.title.clone(),
        evidence: pb::AlertEvidence::decode(a.evidence.as_slice()).ok(),
        raised_unix_ms: a.raised_ms,
        last_seen_unix_ms: a.last_seen_ms,
        occurrences: a.occurrences.try_into().unwrap_or(u32::MAX),
        acknowledged_by: a.acknowledged_by.clone(),
        acknowledged_unix_ms: a.acknowledged_ms,
        note: a.note.clone(),
        resolved_unix_ms: a.resolved_ms,
    }
}

fn new_alert(
    kind: pb::AlertKind,
    key: String,
    subject: &str,
    site: &str,
    title: String,
    evidence: &pb::AlertEvidence,
    now: i64,
) -> AlertRow {
    AlertRow {
        alert_id: format!("AL-{}", hex::encode(rand::random::<[u8; 6]>())),
        dedup_key: key,
        kind: kind_str(kind).into(),
        state: "open".into(),
        subject: subject.into(),
        site_id: site.into(),
        title,
        evidence: evidence.encode_to_vec(),
        raised_ms: now,
        last_seen_ms: now,
        occurrences: 1,
        acknowledged_by: String::new(),
        acknowledged_ms: 0,
        note: String::new(),
        resolved_ms: 0,
    }
}

/// What one evaluation changed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Evaluation {
    /// Alerts raised for the first time.
    pub raised: Vec<pb::Alert>,
    /// Active alerts that fired again.
    pub repeated: Vec<pb::Alert>,
    /// Alerts whose condition cleared.
    pub resolved: Vec<pb::Alert>,
}

impl Monitoring {
    /// One evaluation of every alert condition at `now`. Safe to run again: active
    /// alerts are counted on, not repeated.
    pub async fn evaluate_alerts(&self, opts: &AlertOptions, now: i64) -> Result<Evaluation, Error> {
        self.refresh().await?;
        let mut out = Evaluation::default();
        self.evaluate_spc(opts, now, &mut out).await?;
        self.evaluate_silent(opts, now, &mut out).await?;
        self.evaluate_storms(opts, now, &mut out).await?;
        let due = {
            let mut last = self.inner().sites_compared_ms.lock().unwrap_or_else(|e| e.into_inner());
            let due = now.saturating_sub(*last) >= opts.site_every.as_millis() as i64;
            if due {
                *last = now;
            }
            due
        };
        if due {
            self.evaluate_sites(opts, now, &mut out).await?;
        }
        for a in &out.repeated {
            let _ = self.inner().alerts.send(a.clone());
        }
        for a in out.raised.iter().chain(&out.resolved) {
            self.publish(a);
        }
        Ok(out)
    }

    /// Tells watchers and the webhook that an alert was raised or changed state.
    fn publish(&self, a: &pb::Alert) {
        let _ = self.inner().alerts.send(a.clone());
        if let Some(w) = self.inner().webhook.get() {
            w.send(a);
        }
    }

    async fn record(&self, row: AlertRow, out: &mut Evaluation) -> Result<(), Error> {
        let (stored, new) = self.inner().store.raise_alert(&row).await?;
        if new {
            tracing::info!(alert_id = %stored.alert_id, kind = %stored.kind, subject = %stored.subject, "alert raised");
            out.raised.push(alert_pb(&stored));
        } else {
            out.repeated.push(alert_pb(&stored));
        }
        Ok(())
    }

    async fn evaluate_spc(&self, opts: &AlertOptions, now: i64, out: &mut Evaluation) -> Result<(), Error> {
        let store = &self.inner().store;
        let cursor = store.cursor(SPC_CURSOR).await?;
        let inner = self.inner().clone();
        let o = opts.clone();
        let (findings, last_seq) = tokio::task::spawn_blocking(move || {
            let ix = inner.index.read().unwrap_or_else(|e| e.into_inner());
            let new_from = ix.seqs.partition_point(|&s| s <= cursor) as u32;
            let limits: HashMap<Metric, SpecLimits> =
                o.metrics.iter().map(|&m| (m, ix.spec_limits(m))).collect();
            let findings = chart::spc_findings(
                &ix.index,
                new_from,
                &o.metrics,
                &o.rules,
                o.baseline_points,
                EVIDENCE_POINTS,
                &limits,
            );
            let evidence: Vec<_> = findings
                .iter()
                .map(|f| {
                    let mut c = chart_pb(&ix.index, &f.chart);
                    let points = std::mem::take(&mut c.points);
                    (f.clone(), c, points)
                })
                .collect();
            (evidence, ix.seqs.last().copied().unwrap_or(cursor))
        })
        .await
        .map_err(|e| Error::Unavailable(format!("alert evaluation failed: {e}")))?;
        for (f, c, points) in findings {
            let evidence = pb::AlertEvidence {
                rule: f.rule.code().into(),
                description: f.rule.description().into(),
                metric: f.metric.name().into(),
                center: c.center,
                ucl: c.ucl,
                lcl: c.lcl,
                sigma: c.sigma,
                points,
                detail: format!(
                    "{} of {} on {} (recipe {}): {} new point(s); limits from the device's first {} batches",
                    f.rule.description(),
                    f.metric.name(),
                    f.device,
                    f.recipe,
                    f.count,
                    c.baseline_points
                ),
            };
            let title = format!("{} {}: {}", f.device, f.metric.name(), f.rule.description());
            let key = format!("spc_rule/{}/{}/{}/{}", f.device, f.recipe, f.metric.name(), f.rule.code());
            let mut row = new_alert(pb::AlertKind::SpcRule, key, &f.device, &f.site, title, &evidence, now);
            row.occurrences = f.count.max(1) as i64;
            self.record(row, out).await?;
        }
        if last_seq > cursor {
            store.set_cursor(SPC_CURSOR, last_seq).await?;
        }
        Ok(())
    }

    async fn active_keys(&self, kind: pb::AlertKind) -> Result<HashSet<String>, Error> {
        let rows = self
            .inner()
            .store
            .alerts(&AlertFilter {
                states: vec!["open".into(), "acknowledged".into()],
                kind: Some(kind_str(kind).into()),
                site_id: None,
                limit: 1_000,
            })
            .await?;
        Ok(rows.into_iter().map(|a| a.dedup_key).collect())
    }

    async fn evaluate_silent(
        &self,
        opts: &AlertOptions,
        now: i64,
        out: &mut Evaluation,
    ) -> Result<(), Error> {
        let active = self.active_keys(pb::AlertKind::DeviceSilent).await?;
        let limit = opts.silent_after.as_millis() as i64;
        for d in self.inner().fleet.devices(None).await? {
            let key = format!("device_silent/{}", d.id);
            let in_service = d.status == pb::DeviceStatus::Active as i32;
            let silent = in_service && d.last_seen_unix_ms > 0 && now - d.last_seen_unix_ms > limit;
            if silent && !active.contains(&key) {
                let evidence = pb::AlertEvidence {
                    rule: "silent".into(),
                    description: format!("no message for more than {} s", limit / 1000),
                    detail: format!(
                        "last message {} s ago (at {} ms); {}",
                        (now - d.last_seen_unix_ms) / 1000,
                        d.last_seen_unix_ms,
                        if d.online { "the connection is still open" } else { "the device is disconnected" }
                    ),
                    ..Default::default()
                };
                let title = format!("{} is silent", d.id);
                let row =
                    new_alert(pb::AlertKind::DeviceSilent, key, &d.id, &d.site_id, title, &evidence, now);
                self.record(row, out).await?;
            } else if !silent
                && active.contains(&key)
                && let Some(r) = self.inner().store.resolve_alert(&key, now).await?
            {
                tracing::info!(alert_id = %r.alert_id, device_id = %d.id, "silent device is back");
                out.resolved.push(alert_pb(&r));
            }
        }
        Ok(())
    }

    async fn evaluate_storms(
        &self,
        opts: &AlertOptions,
        now: i64,
        out: &mut Evaluation,
    ) -> Result<(), Error> {
        use nanofleet_proto::device::v1::{EventBatch, event};
        let window = opts.storm_window.as_millis() as i64;
        let mut raised: HashMap<String, Vec<String>> = HashMap::new();
        for (device, payload) in self.inner().store.events_since(now - window, 200_000).await? {
            let Ok(batch) = EventBatch::decode(payload.as_slice()) else { continue };
            for e in batch.events.iter().filter(|e| e.time_unix_ms >= now - window && e.time_unix_ms <= now) {
                if let Some(event::Kind::Alarm(a)) = &e.kind
                    && a.active
                {
                    let code = nanofleet_proto::device::v1::AlarmCode::try_from(a.code).unwrap_or_default();
                    raised
                        .entry(device.clone())
                        .or_default()
                        .push(code.as_str_name().trim_start_matches("ALARM_CODE_").to_lowercase());
                }
            }
        }
        let active = self.active_keys(pb::AlertKind::AlarmStorm).await?;
        let mut storming = HashSet::new();
        for (device, codes) in raised.into_iter().filter(|(_, c)| c.len() >= opts.storm_alarms) {
            let key = format!("alarm_storm/{device}");
            storming.insert(key.clone());
            if active.contains(&key) {
                continue;
            }
            let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
            for c in &codes {
                *counts.entry(c).or_default() += 1;
            }
            let site = self.inner().fleet.device(&device).await.map(|d| d.site_id).unwrap_or_default();
            let evidence = pb::AlertEvidence {
                rule: "alarm-storm".into(),
                description: format!(
                    "at least {} alarms within {} s",
                    opts.storm_alarms,
                    opts.storm_window.as_secs()
                ),
                detail: format!(
                    "{} alarms raised in the last {} s: {}",
                    codes.len(),
                    opts.storm_window.as_secs(),
                    counts.iter().map(|(c, n)| format!("{c} ×{n}")).collect::<Vec<_>>().join(", ")
                ),
                ..Default::default()
            };
            let title = format!(
                "{device}: alarm storm ({} alarms in {} s)",
                codes.len(),
                opts.storm_window.as_secs()
            );
            let row = new_alert(pb::AlertKind::AlarmStorm, key, &device, &site, title, &evidence, now);
            self.record(row, out).await?;
        }
        for key in active.difference(&storming) {
            if let Some(r) = self.inner().store.resolve_alert(key, now).await? {
                out.resolved.push(alert_pb(&r));
            }
        }
        Ok(())
    }

    async fn evaluate_sites(&self, opts: &AlertOptions, now: i64, out: &mut Evaluation) -> Result<(), Error> {
        let active = self.active_keys(pb::AlertKind::SiteDiffers).await?;
        let inner = self.inner().clone();
        let o = opts.clone();
        let since = now - o.site_window.as_millis() as i64;
        let flagged = tokio::task::spawn_blocking(move || {
            let ix = inner.index.read().unwrap_or_else(|e| e.into_inner());
            let rows = ix.index.select(&Selection { since_ms: Some(since), ..Default::default() });
            let mut flagged = Vec::new();
            for &metric in Metric::QUALITY.iter() {
                let samples = ix.index.samples(metric, &rows);
                let Ok(c) = compare::compare_by(&samples, Factor::Site, o.site_alpha) else { continue };
                if !c.significant {
                    continue;
                }
                for s in c.strata.iter().filter(|s| s.significant) {
                    let site = ix.index.level_name(Factor::Site, s.level).to_owned();
                    let detail = format!(
                        "{} at {site} differs from the fleet by {:+.3} {} (95 % CI {:.3} to {:.3}, p={:.2e}, n={}); \
                         F={:.2} on {}/{} df, adjusted for {}",
                        metric.name(),
                        s.effect,
                        metric.unit(),
                        s.ci_low,
                        s.ci_high,
                        s.p_value,
                        s.n,
                        c.f_statistic,
                        c.df_num,
                        c.df_den,
                        c.adjusted_for.iter().map(|f| f.name()).collect::<Vec<_>>().join(", ")
                    );
                    flagged.push((site, metric, detail));
                }
            }
            flagged
        })
        .await
        .map_err(|e| Error::Unavailable(format!("alert evaluation failed: {e}")))?;
        let mut still = HashSet::new();
        for (site, metric, detail) in flagged {
            let key = format!("site_differs/{site}/{}", metric.name());
            still.insert(key.clone());
            if active.contains(&key) {
                continue;
            }
            let evidence = pb::AlertEvidence {
                rule: "site-comparison".into(),
                description: "the site's batches differ from the rest of the fleet".into(),
                metric: metric.name().into(),
                detail,
                ..Default::default()
            };
            let title = format!("{site}: {} differs from the fleet", metric.name());
            let row = new_alert(pb::AlertKind::SiteDiffers, key, &site, &site, title, &evidence, now);
            self.record(row, out).await?;
        }
        for key in active.difference(&still) {
            if let Some(r) = self.inner().store.resolve_alert(key, now).await? {
                out.resolved.push(alert_pb(&r));
            }
        }
        Ok(())
    }

    /// Evaluates alerts every `opts.evaluate_every` until cancelled, and sends every
    /// change to the webhook.
    pub fn spawn_alerts(
        &self,
        opts: AlertOptions,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        // Live watches end when the server stops.
        let stop = self.inner().stop.clone();
        let stopping = shutdown.clone();
        tokio::spawn(async move {
            stopping.cancelled().await;
            stop.cancel();
        });
        if let Some(url) = opts.webhook.clone() {
            let _ = self.inner().webhook.set(crate::webhook::Webhook::spawn(url, shutdown.clone()));
        }
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(opts.evaluate_every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if let Err(e) = me.evaluate_alerts(&opts, now_ms()).await {
                    tracing::warn!(error = %e, "alert evaluation failed");
                }
            }
        })
    }

    /// Alerts the caller may see, newest first.
    pub async fn list_alerts(
        &self,
        caller: &Caller,
        req: pb::ListAlertsRequest,
    ) -> Result<Vec<pb::Alert>, Error> {
        let pb::ListAlertsRequest { states, site_id, kind, limit } = req;
        let states: Vec<String> = if states.is_empty() {
            vec!["open".into(), "acknowledged".into()]
        } else {
            states
                .iter()
                .map(|&s| match pb::AlertState::try_from(s) {
                    Ok(st) if st != pb::AlertState::Unspecified => Ok(state_str(st).to_owned()),
                    _ => Err(Error::invalid("states", s.to_string(), "OPEN, ACKNOWLEDGED or RESOLVED")),
                })
                .collect::<Result<_, _>>()?
        };
        let site_id = match caller.site_limit() {
            Some(own) => {
                if !site_id.is_empty() {
                    caller.check_site(&site_id)?;
                }
                Some(own.to_owned())
            }
            None => (!site_id.is_empty()).then_some(site_id),
        };
        let kind = match pb::AlertKind::try_from(kind) {
            Ok(pb::AlertKind::Unspecified) => None,
            Ok(k) => Some(kind_str(k).to_owned()),
            Err(_) => {
                return Err(Error::invalid(
                    "kind",
                    kind.to_string(),
                    "SPC_RULE, DEVICE_SILENT, ALARM_STORM or SITE_DIFFERS",
                ));
            }
        };
        let limit = match limit {
            0 => 100,
            n @ 1..=1_000 => i64::from(n),
            n => return Err(Error::invalid("limit", n.to_string(), "0 (default 100) or 1 to 1000")),
        };
        let rows = self.inner().store.alerts(&AlertFilter { states, site_id, kind, limit }).await?;
        Ok(rows.iter().map(alert_pb).collect())
    }

    /// Acknowledges an open alert with the caller's note; audited.
    pub async fn acknowledge(&self, caller: &Caller, alert_id: &str, note: &str) -> Result<pb::Alert, Error> {
        let note = note.trim();
        if note.is_empty() || note.len() > 2_000 {
            return Err(Error::invalid("note", note, "what was found or done, 1 to 2000 characters"));
        }
        let Some(existing) = self.inner().store.alert(alert_id).await? else {
            return Err(Error::NotFound { what: "alert", id: alert_id.into() });
        };
        if caller.site_limit().is_some_and(|own| own != existing.site_id) {
            return Err(Error::NotFound { what: "alert", id: alert_id.into() });
        }
        let now = now_ms();
        let audit = AuditEntry {
            at_ms: now,
            actor: caller.actor().0,
            action: "alert.acknowledge".into(),
            subject: alert_id.into(),
            site_id: Some(existing.site_id.clone()),
            reason: note.into(),
            old_value: Some(serde_json::json!({ "state": existing.state }).to_string()),
            new_value: Some(
                serde_json::json!({ "state": "acknowledged", "title": existing.title }).to_string(),
            ),
        };
        let stored = match self
            .inner()
            .store
            .acknowledge_alert(alert_id, &caller.person_id, note, now, &audit)
            .await
        {
            Ok(Some(a)) => a,
            Ok(None) => return Err(Error::NotFound { what: "alert", id: alert_id.into() }),
            Err(nanofleet_store::Error::Conflict(e)) => return Err(Error::Conflict(e)),
            Err(e) => return Err(e.into()),
        };
        let alert = alert_pb(&stored);
        self.publish(&alert);
        Ok(alert)
    }

    /// Alerts as they change, from now on, and a token cancelled when the server stops
    /// (a watch must end then, or it would hold the server's shutdown).
    pub fn watch_alerts(&self) -> (broadcast::Receiver<pb::Alert>, CancellationToken) {
        (self.inner().alerts.subscribe(), self.inner().stop.clone())
    }
}
