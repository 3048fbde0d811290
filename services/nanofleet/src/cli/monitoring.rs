//! `nanofleet quality ...` and `nanofleet alerts ...`: control charts, comparisons,
//! the cohort gate, fleet health and alerts.

use nanofleet_proto::v1 as pb;
use nanofleet_proto::v1::monitoring_service_client::MonitoringServiceClient;
use nanofleet_recipe::json::to_json;

use super::{Authed, Client, Output, status_error, table, utc};
use crate::outln;

/// A factor name as the API's enum.
pub fn factor_arg(flag: &str, s: &str) -> anyhow::Result<pb::Factor> {
    nanofleet_api::factor_named(s)
        .ok_or_else(|| anyhow::anyhow!("{flag} {s:?}: allowed device, site, firmware, recipe, lot"))
}

/// `KEY=VALUE` selectors (`firmware=1.3.0`, `site=st-marys`) as a batch selection.
pub fn selectors(flag: &str, items: &[String], since_ms: i64) -> anyhow::Result<pb::BatchSelection> {
    let mut s = pb::BatchSelection { since_unix_ms: since_ms, ..Default::default() };
    for item in items {
        let Some((k, v)) = item.split_once('=') else {
            anyhow::bail!(
                "{flag} {item:?}: expected KEY=VALUE, KEY one of device, site, firmware, recipe, lot"
            );
        };
        let list = match k {
            "device" => &mut s.device_ids,
            "site" => &mut s.site_ids,
            "firmware" => &mut s.firmware_versions,
            "recipe" => &mut s.recipe_ids,
            "lot" => &mut s.cartridge_lots,
            other => anyhow::bail!(
                "{flag} {item:?}: key {other:?} is not one of device, site, firmware, recipe, lot"
            ),
        };
        list.push(v.to_owned());
    }
    Ok(s)
}

const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// The newest points as a one-line chart scaled from LCL to UCL, with a second line
/// marking the points where a rule fired.
fn sparkline(c: &pb::ControlChart, width: usize) -> (String, String) {
    let points = &c.points[c.points.len().saturating_sub(width)..];
    let (lo, hi) = (c.lcl, c.ucl);
    let span = if hi > lo { hi - lo } else { 1.0 };
    let line = points
        .iter()
        .map(|p| {
            if p.value > hi || p.value < lo {
                '●'
            } else {
                BARS[(((p.value - lo) / span) * 7.0).round().clamp(0.0, 7.0) as usize]
            }
        })
        .collect();
    let marks = points.iter().map(|p| if p.rules.is_empty() { ' ' } else { '^' }).collect();
    (line, marks)
}

fn num(v: f64) -> String {
    if v == 0.0 || (v.abs() >= 0.01 && v.abs() < 100_000.0) { format!("{v:.3}") } else { format!("{v:.3e}") }
}

impl Client {
    fn monitoring(&self) -> MonitoringServiceClient<Authed> {
        MonitoringServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    pub async fn quality_chart(&self, server: &str, req: pb::GetControlChartRequest) -> anyhow::Result<()> {
        let r =
            self.monitoring().get_control_chart(req).await.map_err(|s| status_error(server, s))?.into_inner();
        if self.output == Output::Json {
            self.print_json(to_json("nanofleet.v1.GetControlChartResponse", &r));
            return Ok(());
        }
        if r.charts.len() == 1 && r.charts[0].stratum.is_empty() {
            let c = &r.charts[0];
            if !c.problem.is_empty() {
                anyhow::bail!("{}: {}", c.metric, c.problem);
            }
            outln!(
                "{} ({}), {} batches; limits from the first {}: center {}  UCL {}  LCL {}  σ {}",
                c.metric,
                if c.unit.is_empty() { "no unit" } else { &c.unit },
                c.n,
                c.baseline_points,
                num(c.center),
                num(c.ucl),
                num(c.lcl),
                num(c.sigma)
            );
            if let Some(cpk) = c.cpk {
                outln!(
                    "capability against {}..{}: Cpk {:.2}{}",
                    c.lsl.map(num).unwrap_or_else(|| "-".into()),
                    c.usl.map(num).unwrap_or_else(|| "-".into()),
                    cpk,
                    if cpk >= 1.33 { "" } else { "  (below the 1.33 target)" }
                );
            }
            let (line, marks) = sparkline(c, 72);
            outln!(
                "newest {} points, LCL..UCL (● outside, ^ a rule fired):\n  {line}\n  {marks}",
                line.chars().count()
            );
            match (c.first_ewma_signal, c.first_cusum_signal) {
                (None, None) => outln!("EWMA and CUSUM: no signal"),
                (e, s) => outln!(
                    "first signal: EWMA at point {}, CUSUM at point {}",
                    e.map_or("-".into(), |i| i.to_string()),
                    s.map_or("-".into(), |i| i.to_string())
                ),
            }
            if !c.rule_counts.is_empty() {
                let mut t = table(["RULE", "COUNT", "MEANING"]);
                for rc in &c.rule_counts {
                    t.add_row([rc.rule.clone(), rc.count.to_string(), rc.description.clone()]);
                }
                outln!("{t}");
                let mut t = table(["POINT", "RULE", "BATCH", "DEVICE", "ENDED (UTC)", "VALUE"]);
                for v in c.violations.iter().rev().take(10) {
                    t.add_row([
                        v.index.to_string(),
                        v.rule.clone(),
                        v.batch_id.clone(),
                        v.device_id.clone(),
                        utc(v.ended_unix_ms),
                        num(v.value),
                    ]);
                }
                outln!("newest violations:\n{t}");
            }
            return Ok(());
        }
        let mut t = table(["STRATUM", "N", "MEAN", "CENTER", "LCL", "UCL", "CPK", "EWMA", "RULES", "NEWEST"]);
        for c in &r.charts {
            let rules = c
                .rule_counts
                .iter()
                .map(|r| format!("{} {}", r.rule, r.count))
                .collect::<Vec<_>>()
                .join(", ");
            let (line, _) =
                if c.problem.is_empty() { sparkline(c, 24) } else { (c.problem.clone(), String::new()) };
            t.add_row([
                c.stratum.clone(),
                c.n.to_string(),
                num(c.mean),
                num(c.center),
                num(c.lcl),
                num(c.ucl),
                c.cpk.map_or("-".into(), |k| format!("{k:.2}")),
                c.first_ewma_signal.map_or("-".into(), |i| format!("at {i}")),
                if rules.is_empty() { "-".into() } else { rules },
                line,
            ]);
        }
        outln!("{t}\n{} charts", r.charts.len());
        Ok(())
    }

    pub async fn quality_compare(&self, server: &str, req: pb::CompareStrataRequest) -> anyhow::Result<()> {
        let r =
            self.monitoring().compare_strata(req).await.map_err(|s| status_error(server, s))?.into_inner();
        if self.output == Output::Json {
            self.print_json(to_json("nanofleet.v1.CompareStrataResponse", &r));
            return Ok(());
        }
        let mut t = table(["STRATUM", "N", "MEAN", "EFFECT", "95 % CI", "P", "DIFFERS"]);
        for s in &r.strata {
            t.add_row([
                s.level.clone(),
                s.n.to_string(),
                num(s.mean),
                format!("{:+.3}", s.effect),
                format!("{} .. {}", num(s.ci_low), num(s.ci_high)),
                format!("{:.2e}", s.p_value),
                if s.significant { "YES".into() } else { "no".into() },
            ]);
        }
        outln!(
            "{t}\n{}\nF = {:.2} on {}/{} df, p = {:.2e}; residual σ {}",
            r.summary,
            r.f_statistic,
            r.df_num,
            r.df_den,
            r.p_value,
            num(r.residual_sigma)
        );
        Ok(())
    }

    pub async fn quality_gate(&self, server: &str, req: pb::CompareCohortsRequest) -> anyhow::Result<bool> {
        let r =
            self.monitoring().compare_cohorts(req).await.map_err(|s| status_error(server, s))?.into_inner();
        let regressed = r.verdict == pb::Verdict::Regressed as i32;
        if self.output == Output::Json {
            self.print_json(to_json("nanofleet.v1.CompareCohortsResponse", &r));
            return Ok(regressed);
        }
        let mut t = table(["METRIC", "N A/B", "MEAN A", "MEAN B", "WORSE BY", "σ", "P", "REGRESSED"]);
        for m in &r.metrics {
            t.add_row([
                m.metric.clone(),
                format!("{}/{}", m.n_a, m.n_b),
                num(m.mean_a),
                num(m.mean_b),
                format!("{:+.4}", m.worse_by),
                format!("{:+.2}", m.effect_sigma),
                if m.enough_data { format!("{:.2e}", m.p_value) } else { "too few".into() },
                if m.regressed { "YES".into() } else { "no".into() },
            ]);
        }
        for c in &r.counts {
            t.add_row([
                c.name.clone(),
                format!("{}/{}", c.trials_a, c.trials_b),
                format!("{:.1} %", c.rate_a * 100.0),
                format!("{:.1} %", c.rate_b * 100.0),
                format!("×{:.2}", c.rate_ratio),
                "-".into(),
                if c.enough_data { format!("{:.2e}", c.p_value) } else { "too few".into() },
                if c.regressed { "YES".into() } else { "no".into() },
            ]);
        }
        let verdict =
            pb::Verdict::try_from(r.verdict).unwrap_or_default().as_str_name().trim_start_matches("VERDICT_");
        outln!("{t}\ncohort A: {} batches, cohort B: {}\n{verdict}: {}", r.batches_a, r.batches_b, r.summary);
        Ok(regressed)
    }

    pub async fn quality_health(&self, server: &str, since_ms: i64) -> anyhow::Result<()> {
        let r = self
            .monitoring()
            .get_fleet_health(pb::GetFleetHealthRequest { since_unix_ms: since_ms })
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner();
        if self.output == Output::Json {
            self.print_json(to_json("nanofleet.v1.GetFleetHealthResponse", &r));
            return Ok(());
        }
        let mut t = table(["SITE", "NAME", "BATCHES", "QC PASS", "DEVICES ONLINE", "OPEN ALERTS"]);
        for s in &r.sites {
            t.add_row([
                s.site_id.clone(),
                s.site_name.clone(),
                s.batches.to_string(),
                format!("{:.1} %", s.pass_rate * 100.0),
                format!("{}/{}", s.devices_online, s.devices),
                s.open_alerts.to_string(),
            ]);
        }
        outln!("{t}\nworst first");
        Ok(())
    }

    pub async fn alerts_list(&self, server: &str, req: pb::ListAlertsRequest) -> anyhow::Result<()> {
        let alerts = self
            .monitoring()
            .list_alerts(req)
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner()
            .alerts;
        if self.output == Output::Json {
            self.print_json(serde_json::json!({
                "alerts": alerts.iter().map(|a| to_json("nanofleet.v1.Alert", a)).collect::<Vec<_>>()
            }));
            return Ok(());
        }
        let mut t = table(["ALERT", "STATE", "KIND", "SITE", "TITLE", "RAISED (UTC)", "SEEN"]);
        for a in &alerts {
            t.add_row(alert_row(a));
        }
        outln!("{t}\n{} alert{}", alerts.len(), if alerts.len() == 1 { "" } else { "s" });
        Ok(())
    }

    pub async fn alerts_ack(&self, server: &str, alert_id: String, note: String) -> anyhow::Result<()> {
        let a = self
            .monitoring()
            .acknowledge_alert(pb::AcknowledgeAlertRequest { alert_id, note })
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner()
            .alert
            .unwrap_or_default();
        if self.output == Output::Json {
            self.print_json(to_json("nanofleet.v1.Alert", &a));
        } else {
            outln!("{} acknowledged by {}: {}", a.alert_id, a.acknowledged_by, a.title);
        }
        Ok(())
    }

    pub async fn alerts_watch(&self, server: &str, site_id: String) -> anyhow::Result<()> {
        let mut stream = self
            .monitoring()
            .watch_alerts(pb::WatchAlertsRequest { site_id })
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner();
        if self.output == Output::Table {
            eprintln!("watching alerts (Ctrl-C to stop)");
        }
        while let Some(msg) = stream.message().await.map_err(|s| status_error(server, s))? {
            let Some(a) = msg.alert else { continue };
            if self.output == Output::Json {
                outln!("{}", to_json("nanofleet.v1.Alert", &a));
            } else {
                outln!("{}", alert_row(&a).join("  "));
            }
        }
        Ok(())
    }
}

fn alert_row(a: &pb::Alert) -> [String; 7] {
    let state = pb::AlertState::try_from(a.state)
        .unwrap_or_default()
        .as_str_name()
        .trim_start_matches("ALERT_STATE_");
    let kind =
        pb::AlertKind::try_from(a.kind).unwrap_or_default().as_str_name().trim_start_matches("ALERT_KIND_");
    [
        a.alert_id.clone(),
        state.to_lowercase(),
        kind.to_lowercase(),
        a.site_id.clone(),
        a.title.clone(),
        utc(a.raised_unix_ms),
        if a.occurrences > 1 { format!("{}×", a.occurrences) } else { "once".into() },
    ]
}

impl Client {
    /// `nanofleet telemetry ID --metric M`: one metric as a series of points.
    pub async fn series(&self, server: &str, req: pb::QuerySeriesRequest) -> anyhow::Result<()> {
        let r = self
            .telemetry_client()
            .query_series(req)
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner();
        if self.output == Output::Json {
            self.print_json(to_json("nanofleet.v1.QuerySeriesResponse", &r));
            return Ok(());
        }
        let resolution = match pb::Resolution::try_from(r.resolution).unwrap_or_default() {
            pb::Resolution::Raw => "raw samples".to_owned(),
            _ => format!(
                "{} buckets",
                humantime::format_duration(std::time::Duration::from_millis(r.bucket_ms as u64))
            ),
        };
        if r.points.is_empty() {
            outln!("{} {}: no samples in the window", r.device_id, r.metric);
            return Ok(());
        }
        let lo = r.points.iter().map(|p| p.min).fold(f64::INFINITY, f64::min);
        let hi = r.points.iter().map(|p| p.max).fold(f64::NEG_INFINITY, f64::max);
        let span = if hi > lo { hi - lo } else { 1.0 };
        let newest = &r.points[r.points.len().saturating_sub(72)..];
        let line: String = newest
            .iter()
            .map(|p| BARS[(((p.p50 - lo) / span) * 7.0).round().clamp(0.0, 7.0) as usize])
            .collect();
        outln!(
            "{} {} ({}), {} points of {resolution}; median per point, scaled {}..{}:\n  {line}",
            r.device_id,
            r.metric,
            r.unit,
            r.points.len(),
            num(lo),
            num(hi)
        );
        let mut t = table(["START (UTC)", "SAMPLES", "MIN", "P50", "MEAN", "P90", "P99", "MAX"]);
        for p in &r.points {
            t.add_row([
                utc(p.start_unix_ms),
                p.count.to_string(),
                num(p.min),
                num(p.p50),
                num(p.mean),
                num(p.p90),
                num(p.p99),
                num(p.max),
            ]);
        }
        outln!("{t}");
        if r.truncated {
            outln!("(truncated to the newest points: raise --points or use a coarser --resolution)");
        }
        Ok(())
    }
}
