//! Fleet queries: what the gRPC API and the dashboard both show. Plain async functions
//! over the store; no transport here.

use nanofleet_proto::Message as _;
use nanofleet_proto::device::v1::{Sample, TelemetryBatch};
use nanofleet_proto::topics::validate_device_id;
use nanofleet_proto::v1 as pb;
use nanofleet_store::{DeviceRecord, Store};

use crate::Error;

/// Samples returned when the caller sets no limit.
pub const DEFAULT_SAMPLE_LIMIT: u32 = 10_000;
/// Most samples one query returns.
pub const MAX_SAMPLE_LIMIT: u32 = 100_000;

/// Read access to the fleet; cheap to clone.
#[derive(Debug, Clone)]
pub struct Fleet {
    pub(crate) store: Store,
    ingest: nanofleet_ingest::Ingest,
}

/// A telemetry window.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryWindow {
    pub samples: Vec<Sample>,
    pub truncated: bool,
}

impl Fleet {
    pub fn new(store: Store, ingest: nanofleet_ingest::Ingest) -> Fleet {
        Fleet { store, ingest }
    }

    pub fn ingest_stats(&self) -> nanofleet_ingest::StatsSnapshot {
        self.ingest.stats()
    }

    pub async fn sites(&self) -> Result<Vec<pb::Site>, Error> {
        Ok(self
            .store
            .list_sites()
            .await?
            .into_iter()
            .map(|s| pb::Site {
                id: s.id,
                name: s.name,
                devices_total: s.devices_total.try_into().unwrap_or(u32::MAX),
                devices_online: s.devices_online.try_into().unwrap_or(u32::MAX),
                time_zone: s.time_zone,
                maintenance_window: s.maintenance_window,
            })
            .collect())
    }

    /// Sets a site's maintenance window (checked: days, times, the site's time zone).
    pub async fn set_window(
        &self,
        caller: &crate::Caller,
        site_id: &str,
        window: &str,
        reason: &str,
    ) -> Result<pb::Site, Error> {
        caller.check_site(site_id)?;
        if reason.trim().is_empty() {
            return Err(Error::invalid("reason", "", "why, in words (for the audit chain)"));
        }
        let window = window.trim();
        let old = self.sites().await?.into_iter().find(|s| s.id == site_id);
        let Some(old) = old else { return Err(Error::NotFound { what: "site", id: site_id.into() }) };
        if !window.is_empty() {
            let parsed: nanofleet_rollout::window::Windows =
                window.parse().map_err(|e: String| Error::invalid("window", window, e))?;
            parsed.is_open(crate::now_ms(), &old.time_zone).map_err(|e| {
                Error::invalid("window", window, format!("a window in the site's time zone: {e}"))
            })?;
        }
        let audit = nanofleet_store::AuditEntry {
            at_ms: crate::now_ms(),
            actor: caller.actor().0,
            action: "site.maintenance-window".into(),
            subject: site_id.into(),
            site_id: Some(site_id.into()),
            reason: reason.into(),
            old_value: Some(serde_json::json!({"window": old.maintenance_window}).to_string()),
            new_value: Some(serde_json::json!({"window": window, "time_zone": old.time_zone}).to_string()),
        };
        self.store.set_site_window(site_id, window, &audit).await?;
        Ok(pb::Site { maintenance_window: window.into(), ..old })
    }

    /// Adds and removes a device's tags, audited as `device.tags`.
    pub async fn set_tags(
        &self,
        caller: &crate::Caller,
        device_id: &str,
        add: &[String],
        remove: &[String],
        reason: &str,
    ) -> Result<pb::Device, Error> {
        check_device_id(device_id)?;
        if reason.trim().is_empty() {
            return Err(Error::invalid("reason", "", "why, in words (for the audit chain)"));
        }
        for (field, tags) in [("add", add), ("remove", remove)] {
            if let Some(bad) = tags.iter().find(|t| !valid_tag(t)) {
                return Err(Error::invalid(
                    field,
                    bad,
                    "lowercase letters, digits, '-', '_' and '.', starting with a letter or digit, at most 32 characters",
                ));
            }
        }
        let Some(old) = self.store.get_device(device_id).await? else {
            return Err(Error::NotFound { what: "device", id: device_id.into() });
        };
        caller.check_site(&old.site_id)?;
        let mut tags: std::collections::BTreeSet<String> = old.tags.iter().cloned().collect();
        tags.extend(add.iter().cloned());
        for t in remove {
            tags.remove(t);
        }
        if tags.len() > MAX_TAGS {
            return Err(Error::invalid("add", add.join(","), format!("at most {MAX_TAGS} tags a device")));
        }
        let tags: Vec<String> = tags.into_iter().collect();
        let audit = nanofleet_store::AuditEntry {
            at_ms: crate::now_ms(),
            actor: caller.actor().0,
            action: "device.tags".into(),
            subject: device_id.into(),
            site_id: Some(old.site_id.clone()),
            reason: reason.into(),
            old_value: Some(serde_json::json!({"tags": old.tags}).to_string()),
            new_value: Some(serde_json::json!({"tags": tags}).to_string()),
        };
        if !self.store.set_device_tags(device_id, &tags, &audit).await? {
            return Err(Error::NotFound { what: "device", id: device_id.into() });
        }
        Ok(device(DeviceRecord { tags, ..old }))
    }

    pub async fn devices(&self, site_id: Option<&str>) -> Result<Vec<pb::Device>, Error> {
        let site = site_id.filter(|s| !s.is_empty());
        Ok(self.store.list_devices(site).await?.into_iter().map(device).collect())
    }

    pub async fn device(&self, device_id: &str) -> Result<pb::Device, Error> {
        check_device_id(device_id)?;
        match self.store.get_device(device_id).await? {
            Some(d) => Ok(device(d)),
            None => Err(Error::NotFound { what: "device", id: device_id.to_owned() }),
        }
    }

    /// Samples of `device_id` in `[since_ms, until_ms)`, oldest first; the newest
    /// `limit` are kept.
    pub async fn telemetry(
        &self,
        device_id: &str,
        since_ms: i64,
        until_ms: i64,
        limit: u32,
    ) -> Result<TelemetryWindow, Error> {
        check_device_id(device_id)?;
        if until_ms <= since_ms {
            return Err(Error::InvalidArgument {
                field: "until_unix_ms",
                value: until_ms.to_string(),
                allowed: format!("after since_unix_ms ({since_ms})"),
            });
        }
        let limit = count_arg("limit", limit, DEFAULT_SAMPLE_LIMIT, MAX_SAMPLE_LIMIT)?;
        if self.store.get_device(device_id).await?.is_none() {
            return Err(Error::NotFound { what: "device", id: device_id.to_owned() });
        }
        let rows = self.store.query_telemetry(device_id, since_ms, until_ms, limit).await?;
        let mut samples: Vec<Sample> = Vec::new();
        for row in rows {
            match TelemetryBatch::decode(row.payload.as_slice()) {
                Ok(b) => samples
                    .extend(b.samples.into_iter().filter(|s| (since_ms..until_ms).contains(&s.time_unix_ms))),
                Err(e) => {
                    tracing::error!(device_id, seq = row.seq, error = %e, "stored telemetry does not decode")
                }
            }
        }
        samples.sort_by_key(|s| s.time_unix_ms);
        let truncated = samples.len() > limit as usize;
        if truncated {
            samples.drain(..samples.len() - limit as usize);
        }
        Ok(TelemetryWindow { samples, truncated })
    }
}

/// A count argument where 0 means `default`: at most `max`.
pub(crate) fn count_arg(field: &'static str, n: u32, default: u32, max: u32) -> Result<u32, Error> {
    match n {
        0 => Ok(default),
        n if n > max => Err(Error::InvalidArgument {
            field,
            value: n.to_string(),
            allowed: format!("0 (default {default}) to {max}"),
        }),
        n => Ok(n),
    }
}

/// Tags a device may carry.
const MAX_TAGS: usize = 16;

fn valid_tag(t: &str) -> bool {
    (1..=32).contains(&t.len())
        && t.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && t.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'))
}

pub(crate) fn check_device_id(id: &str) -> Result<(), Error> {
    validate_device_id(id).map_err(|reason| Error::InvalidArgument {
        field: "device_id",
        value: id.to_owned(),
        allowed: format!("a device id ({reason})"),
    })
}

pub(crate) fn device(d: DeviceRecord) -> pb::Device {
    let DeviceRecord {
        id,
        site_id,
        model,
        firmware_version,
        online,
        session_id: _,
        connected_ms,
        last_seen_ms,
        telemetry_seq,
        last_sample_ms: _,
        last_sample,
        active_alarms,
        status,
        enrolled_ms,
        hardware_serial,
        cert_not_after_ms,
        tags,
    } = d;
    pb::Device {
        id,
        site_id,
        model,
        firmware_version,
        online,
        last_seen_unix_ms: last_seen_ms,
        connected_since_unix_ms: connected_ms,
        last_sample: last_sample.and_then(|b| Sample::decode(b.as_slice()).ok()),
        telemetry_seq: telemetry_seq.try_into().unwrap_or(0),
        active_alarms: active_alarms
            .into_iter()
            .map(|a| pb::ActiveAlarm {
                code: a.code as i32,
                priority: a.priority as i32,
                line: a.line as i32,
                detail: a.detail,
                since_unix_ms: a.changed_ms,
            })
            .collect(),
        status: match status.as_str() {
            "active" => pb::DeviceStatus::Active,
            "decommissioned" => pb::DeviceStatus::Decommissioned,
            "replacing" => pb::DeviceStatus::Replacing,
            _ => pb::DeviceStatus::Unspecified,
        } as i32,
        enrolled_unix_ms: enrolled_ms,
        certificate_not_after_unix_ms: cert_not_after_ms,
        hardware_serial,
        tags,
    }
}
