//! `nanofleet rollouts ...`: start, follow and steer firmware rollouts.

use std::time::Duration;

use anyhow::Context as _;
use nanofleet_proto::device::v1::UpdateAction;
use nanofleet_proto::v1 as pb;
use nanofleet_proto::v1::rollout_service_client::RolloutServiceClient;

use super::{Authed, Client, Output, status_error, table, utc};
use crate::outln;

/// The order statuses are shown in.
const STATUSES: [&str; 14] = [
    "pending",
    "offered",
    "downloading",
    "downloaded",
    "deferred",
    "installing",
    "rebooting",
    "verifying",
    "committed",
    "rolled-back",
    "failed",
    "refused",
    "timed-out",
    "cancelled",
];

/// `--waves 10,50,100` or `--exponential 2x2` (first wave, factor).
pub fn wave_plan(
    canary: u32,
    waves: Option<&str>,
    exponential: Option<&str>,
) -> anyhow::Result<pb::WavePlan> {
    let mut plan = pb::WavePlan { canary, ..Default::default() };
    match (waves, exponential) {
        (Some(_), Some(_)) => anyhow::bail!("--waves and --exponential: give one of them"),
        (Some(w), None) => {
            plan.percent_steps = w
                .split(',')
                .map(|p| p.trim().trim_end_matches('%').parse::<u32>())
                .collect::<Result<_, _>>()
                .map_err(|_| anyhow::anyhow!("--waves {w:?}: cumulative percentages like 10,50,100"))?;
        }
        (None, Some(e)) => {
            let (first, factor) = e
                .split_once('x')
                .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)))
                .ok_or_else(|| {
                    anyhow::anyhow!("--exponential {e:?}: FIRSTxFACTOR, e.g. 5x2 (5, 10, 20, ... devices)")
                })?;
            plan.exponential_first = first;
            plan.exponential_factor = factor;
        }
        (None, None) => plan.percent_steps = vec![100],
    }
    Ok(plan)
}

pub fn action_arg(s: &str) -> anyhow::Result<UpdateAction> {
    Ok(match s {
        "soft" => UpdateAction::Soft,
        "forced" => UpdateAction::Forced,
        "download-only" => UpdateAction::DownloadOnly,
        other => anyhow::bail!("--action {other:?}: soft, forced or download-only"),
    })
}

fn count(r: &pb::Rollout, status: &str) -> u32 {
    r.counts.iter().find(|c| c.status == status).map_or(0, |c| c.devices)
}

fn total(r: &pb::Rollout) -> u32 {
    r.counts.iter().map(|c| c.devices).sum()
}

/// `committed 3 · failed 1 · pending 40`, in the order of a device's path.
fn counts_line(counts: &[pb::StatusCount]) -> String {
    STATUSES
        .iter()
        .filter_map(|s| {
            counts.iter().find(|c| c.status == *s && c.devices > 0).map(|c| format!("{s} {}", c.devices))
        })
        .collect::<Vec<_>>()
        .join(" · ")
}

impl Client {
    fn rollouts(&self) -> RolloutServiceClient<Authed> {
        RolloutServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
            .max_decoding_message_size(64 * 1024 * 1024)
    }

    fn print_rollout(&self, r: &pb::Rollout, with_devices: bool) {
        if self.output == Output::Json {
            self.print_json(nanofleet_api::json::rollout(r));
            return;
        }
        outln!(
            "{}  {} (model {}, version {})  {}{}",
            r.rollout_id,
            r.target,
            r.model,
            r.version,
            r.state,
            if r.reason.is_empty() { String::new() } else { format!(": {}", r.reason) }
        );
        outln!(
            "  wave {} of {} · {} · advance at {}% committed · pause at {}% failed · created {}",
            r.wave + 1,
            r.waves,
            r.action,
            r.success_threshold_pct,
            r.error_threshold_pct,
            utc(r.created_unix_ms)
        );
        outln!("  {} devices: {}", total(r), counts_line(&r.counts));
        if r.health_watch_seconds > 0 {
            outln!(
                "  health gate: each wave watched {} s{}",
                r.health_watch_seconds,
                if r.rollback_on_regression { ", a regression rolls back" } else { "" }
            );
        }
        for h in &r.health_checks {
            outln!("    wave {} {} at {}: {}", h.wave + 1, h.outcome, utc(h.at_unix_ms), h.evidence);
        }
        for w in &r.wave_summaries {
            let marker = if w.wave == r.wave && r.state == "running" { "▶" } else { " " };
            outln!("  {marker} wave {}: {}", w.wave + 1, counts_line(&w.counts));
        }
        if with_devices {
            let mut t = table(["DEVICE", "SITE", "WAVE", "STATUS", "ATTEMPTS", "CODE", "DETAIL", "UPDATED"]);
            for d in &r.devices {
                t.add_row([
                    d.device_id.clone(),
                    d.site_id.clone(),
                    (d.wave + 1).to_string(),
                    d.status.clone(),
                    d.attempts.to_string(),
                    d.code.clone(),
                    d.detail.chars().take(60).collect(),
                    utc(d.updated_unix_ms),
                ]);
            }
            outln!("{t}");
        }
    }

    pub async fn rollout_create(&self, server: &str, req: pb::CreateRolloutRequest) -> anyhow::Result<()> {
        let r = self
            .rollouts()
            .create_rollout(req)
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner()
            .rollout
            .context("server answered without the rollout")?;
        self.print_rollout(&r, false);
        if self.output == Output::Table {
            outln!("follow it: nanofleet rollouts watch {}", r.rollout_id);
        }
        Ok(())
    }

    pub async fn rollout_show(&self, server: &str, id: String) -> anyhow::Result<()> {
        let r = self
            .rollouts()
            .get_rollout(pb::GetRolloutRequest { rollout_id: id })
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner()
            .rollout
            .context("server answered without the rollout")?;
        self.print_rollout(&r, true);
        Ok(())
    }

    pub async fn rollout_list(&self, server: &str, state: String) -> anyhow::Result<()> {
        let list = self
            .rollouts()
            .list_rollouts(pb::ListRolloutsRequest { state })
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner()
            .rollouts;
        if self.output == Output::Json {
            self.print_json(serde_json::Value::Array(
                list.iter().map(nanofleet_api::json::rollout).collect(),
            ));
            return Ok(());
        }
        if list.is_empty() {
            outln!("no rollouts (nanofleet rollouts create --target TARGET --reason ...)");
            return Ok(());
        }
        let mut t =
            table(["ROLLOUT", "TARGET", "STATE", "WAVE", "DEVICES", "COMMITTED", "FAILED", "CREATED"]);
        for r in &list {
            let failed =
                ["failed", "rolled-back", "refused", "timed-out"].iter().map(|s| count(r, s)).sum::<u32>();
            t.add_row([
                r.rollout_id.clone(),
                r.target.clone(),
                r.state.clone(),
                format!("{}/{}", r.wave + 1, r.waves),
                total(r).to_string(),
                count(r, "committed").to_string(),
                failed.to_string(),
                utc(r.created_unix_ms),
            ]);
        }
        outln!("{t}");
        Ok(())
    }

    /// Pause, resume, cancel or roll back, then show the result.
    pub async fn rollout_control(
        &self,
        server: &str,
        what: &str,
        id: String,
        reason: String,
        to: String,
    ) -> anyhow::Result<()> {
        let mut api = self.rollouts();
        let r = match what {
            "pause" => api
                .pause_rollout(pb::PauseRolloutRequest { rollout_id: id, reason })
                .await
                .map(|r| r.into_inner().rollout),
            "resume" => api
                .resume_rollout(pb::ResumeRolloutRequest { rollout_id: id, reason })
                .await
                .map(|r| r.into_inner().rollout),
            "cancel" => api
                .cancel_rollout(pb::CancelRolloutRequest { rollout_id: id, reason })
                .await
                .map(|r| r.into_inner().rollout),
            _ => api
                .rollback_rollout(pb::RollbackRolloutRequest { rollout_id: id, target: to, reason })
                .await
                .map(|r| r.into_inner().rollout),
        }
        .map_err(|s| status_error(server, s))?
        .context("server answered without the rollout")?;
        self.print_rollout(&r, false);
        Ok(())
    }

    /// Follows a rollout until it ends: a progress bar of final answers and the
    /// counts per status (JSON: one object per change).
    pub async fn rollout_watch(&self, server: &str, id: String) -> anyhow::Result<()> {
        let mut stream = self
            .rollouts()
            .watch_rollout(pb::WatchRolloutRequest { rollout_id: id })
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner();
        let bar = indicatif::ProgressBar::new(0);
        if self.output == Output::Table {
            bar.set_style(
                indicatif::ProgressStyle::with_template("{prefix} {bar:30} {pos}/{len} done  {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
        } else {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let mut last = None;
        loop {
            let next = tokio::time::timeout(Duration::from_secs(30), stream.message()).await;
            let r = match next {
                Ok(Ok(Some(m))) => m.rollout.unwrap_or_default(),
                Ok(Ok(None)) => break,
                Ok(Err(s)) => return Err(status_error(server, s)),
                Err(_) => continue,
            };
            if self.output == Output::Json {
                let mut v = nanofleet_api::json::rollout(&r);
                if let Some(o) = v.as_object_mut() {
                    o.remove("devices");
                }
                self.print_json(v);
            } else {
                let done = ["committed", "rolled-back", "failed", "refused", "timed-out", "cancelled"]
                    .iter()
                    .map(|s| count(&r, s))
                    .sum::<u32>();
                bar.set_length(u64::from(total(&r)));
                bar.set_position(u64::from(done));
                bar.set_prefix(format!("{} wave {}/{} {}", r.rollout_id, r.wave + 1, r.waves, r.state));
                bar.set_message(counts_line(&r.counts));
            }
            let ended = matches!(r.state.as_str(), "completed" | "cancelled");
            last = Some(r);
            if ended {
                break;
            }
        }
        bar.finish_and_clear();
        if let (Some(r), Output::Table) = (&last, self.output) {
            self.print_rollout(r, false);
        }
        Ok(())
    }
}
