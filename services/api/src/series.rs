//! Telemetry series: one metric of one device over a window, from raw samples or from
//! the per-minute and per-hour rollups.

use nanofleet_ingest::rollup::{Metric, Rollup};
use nanofleet_proto::v1::{self as pb, Resolution};
use nanofleet_store::Tier;

use crate::Error;
use crate::fleet::{Fleet, check_device_id, count_arg};

/// Points returned when the caller sets no maximum.
pub const DEFAULT_POINTS: u32 = 1_000;
/// Most points one query returns.
pub const MAX_POINTS: u32 = 10_000;
/// The sample interval the automatic choice assumes (devices report at 1 Hz).
const SAMPLE_MS: i64 = 1_000;

/// The resolutions by the names the CLI and the dashboard use; `auto` lets the server
/// choose.
pub const RESOLUTIONS: [(&str, Resolution); 4] = [
    ("auto", Resolution::Unspecified),
    ("raw", Resolution::Raw),
    ("minute", Resolution::Minute),
    ("hour", Resolution::Hour),
];

/// A resolution by its name; the error lists the names allowed.
pub fn resolution_named(name: &str) -> Result<Resolution, Error> {
    RESOLUTIONS.iter().find(|(n, _)| *n == name).map(|(_, r)| *r).ok_or_else(|| Error::InvalidArgument {
        field: "resolution",
        value: name.to_owned(),
        allowed: "auto, raw, minute or hour".into(),
    })
}

/// The name of a resolution (`auto` for one the server did not set).
pub fn resolution_name(r: i32) -> &'static str {
    RESOLUTIONS.iter().find(|(_, x)| *x as i32 == r).map_or("auto", |(n, _)| n)
}

/// A series query, checked.
#[derive(Debug, Clone, Copy)]
pub struct SeriesQuery<'a> {
    pub device_id: &'a str,
    pub metric: &'a str,
    pub since_ms: i64,
    pub until_ms: i64,
    pub resolution: Resolution,
    pub max_points: u32,
}

impl Fleet {
    /// The series of `q.metric` for `q.device_id` in `[since_ms, until_ms)`.
    pub async fn series(&self, q: SeriesQuery<'_>) -> Result<pb::QuerySeriesResponse, Error> {
        check_device_id(q.device_id)?;
        let metric = Metric::named(q.metric).map_err(|allowed| Error::InvalidArgument {
            field: "metric",
            value: q.metric.to_owned(),
            allowed,
        })?;
        if q.until_ms <= q.since_ms {
            return Err(Error::InvalidArgument {
                field: "until_unix_ms",
                value: q.until_ms.to_string(),
                allowed: format!("after since_unix_ms ({})", q.since_ms),
            });
        }
        let max_points = count_arg("max_points", q.max_points, DEFAULT_POINTS, MAX_POINTS)?;
        if self.store.get_device(q.device_id).await?.is_none() {
            return Err(Error::NotFound { what: "device", id: q.device_id.to_owned() });
        }
        let window = q.until_ms - q.since_ms;
        let fits = |width: i64| window / width <= i64::from(max_points);
        // The finest that fits first; coarser ones when it holds nothing (retention).
        let candidates: Vec<Resolution> = match q.resolution {
            Resolution::Unspecified => {
                let all = [Resolution::Raw, Resolution::Minute, Resolution::Hour];
                let widths = [SAMPLE_MS, Tier::Minute.width_ms(), Tier::Hour.width_ms()];
                let first = widths.iter().position(|&w| fits(w)).unwrap_or(2);
                all[first..].to_vec()
            }
            r => vec![r],
        };
        let mut out = pb::QuerySeriesResponse {
            device_id: q.device_id.to_owned(),
            metric: metric.name().to_owned(),
            unit: metric.unit().to_owned(),
            ..Default::default()
        };
        for r in candidates {
            out.resolution = r as i32;
            let (points, truncated, bucket_ms) = match r {
                Resolution::Raw => {
                    let (p, t) = self.raw_series(q, metric, max_points).await?;
                    (p, t, 0)
                }
                Resolution::Minute => self.rollup_series(q, metric, Tier::Minute, max_points).await?,
                Resolution::Hour | Resolution::Unspecified => {
                    self.rollup_series(q, metric, Tier::Hour, max_points).await?
                }
            };
            out.points = points;
            out.truncated = truncated;
            out.bucket_ms = bucket_ms;
            if !out.points.is_empty() {
                break;
            }
        }
        Ok(out)
    }

    async fn raw_series(
        &self,
        q: SeriesQuery<'_>,
        metric: Metric,
        max_points: u32,
    ) -> Result<(Vec<pb::SeriesPoint>, bool), Error> {
        // Samples without the metric (an idle pump) take no point, so read enough rows
        // for the window, not just `max_points` samples.
        let w = self.telemetry(q.device_id, q.since_ms, q.until_ms, super::fleet::MAX_SAMPLE_LIMIT).await?;
        let mut points: Vec<pb::SeriesPoint> = w
            .samples
            .iter()
            .filter_map(|s| {
                let v = metric.of(s)?;
                Some(pb::SeriesPoint {
                    start_unix_ms: s.time_unix_ms,
                    width_ms: 0,
                    count: 1,
                    min: v,
                    max: v,
                    mean: v,
                    p50: v,
                    p90: v,
                    p99: v,
                })
            })
            .collect();
        let truncated = w.truncated || points.len() > max_points as usize;
        if points.len() > max_points as usize {
            points.drain(..points.len() - max_points as usize);
        }
        Ok((points, truncated))
    }

    /// Rollups of `tier` in the window, merged `k` at a time (aligned buckets of k
    /// intervals) so that at most `max_points` remain.
    async fn rollup_series(
        &self,
        q: SeriesQuery<'_>,
        metric: Metric,
        tier: Tier,
        max_points: u32,
    ) -> Result<(Vec<pb::SeriesPoint>, bool, i64), Error> {
        let width = tier.width_ms();
        let first = tier.start_of(q.since_ms);
        let spans = (q.until_ms - first + width - 1) / width;
        // Buckets are aligned to the epoch, so k intervals each cover the window in at
        // most ceil(spans / k) + 1 buckets.
        let room = i64::from(max_points.saturating_sub(1).max(1));
        let k = ((spans + room - 1) / room).max(1);
        let bucket = width * k;
        let rows = self.store.rollups(q.device_id, tier, first, q.until_ms).await?;
        let mut buckets: Vec<(i64, Rollup)> = Vec::new();
        for row in rows {
            let r = match Rollup::decode(&row.data, row.samples) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(device = q.device_id, start_ms = row.start_ms, error = %e, "stored rollup unreadable; skipped");
                    continue;
                }
            };
            let start = row.start_ms.div_euclid(bucket) * bucket;
            match buckets.last_mut() {
                Some((s, acc)) if *s == start => acc.merge(&r),
                _ => buckets.push((start, r)),
            }
        }
        let points = buckets
            .into_iter()
            .filter_map(|(start, r)| {
                let s = r.summary(metric)?;
                Some(pb::SeriesPoint {
                    start_unix_ms: start,
                    width_ms: bucket,
                    count: s.count,
                    min: s.min,
                    max: s.max,
                    mean: s.mean()?,
                    p50: s.quantile(0.5)?,
                    p90: s.quantile(0.9)?,
                    p99: s.quantile(0.99)?,
                })
            })
            .collect();
        Ok((points, false, bucket))
    }
}
