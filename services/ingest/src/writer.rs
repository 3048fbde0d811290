//! The single writer: group commit of telemetry and events.

use std::collections::HashMap;
use std::sync::Weak;
use std::time::{Duration, Instant};

use nanofleet_proto::Message as _;
use nanofleet_proto::device::v1::Sample;
use nanofleet_store::{
    AlarmChange, EventRecord, LandedKey, LastValues, PresenceChange, SettleStep, Store, TelemetryRecord,
    WriteBatch,
};
use tokio::sync::{mpsc, oneshot};

use crate::{Error, Inner};

pub(crate) enum Payload {
    /// Births and deaths share the group commit: a reconnect storm of thousands of
    /// devices costs a few transactions, not one each.
    Presence(PresenceChange),
    Telemetry(TelemetryRecord, Newest),
    Events(EventRecord, Vec<AlarmChange>),
    /// Completes once everything queued before it is committed.
    Barrier,
}

/// The newest sample of a telemetry batch; only the newest per device and write batch
/// is encoded and stored as the device's last values.
pub(crate) struct Newest {
    pub seen_ms: i64,
    pub sample: Sample,
}

pub(crate) struct Item {
    pub payload: Payload,
    pub done: oneshot::Sender<Result<(), Error>>,
}

/// How often the devices' last values are written. Last values are derived data (the
/// newest sample of stored telemetry), so they are written once a second per device,
/// not once per message: an update per device per commit touches as many pages as the
/// telemetry itself.
const LAST_VALUES_EVERY: Duration = Duration::from_secs(1);

/// How much landed telemetry one step moves (and folds). Commits queued meanwhile
/// wait for one step, not for a whole sweep: with 10,000 devices a sweep folds
/// thousands of rollup rows. The fold's cost follows the devices in a step, the
/// move's the rows; each step is a transaction of its own.
const SETTLE_STEP: SettleStep = SettleStep { rows: 8_192, devices: 256 };

pub(crate) async fn run(
    store: Store,
    mut rx: mpsc::Receiver<Item>,
    max_batch: usize,
    settle_every: Duration,
    inner: Weak<Inner>,
) {
    let mut items = Vec::with_capacity(max_batch);
    // device → (highest seq, newest sample), not yet written
    let mut last: HashMap<String, (i64, Newest)> = HashMap::new();
    let mut last_written = Instant::now();
    let mut fold = crate::rollup::TelemetryFold;
    // Landed telemetry is moved to the main table (and folded into the rollups) by a
    // sweep every `settle_every`: one pass over the landing table in key order, a step
    // after each commit. A device's rows of several seconds then share one fold. While
    // a sweep runs, `sweep` holds where its next step starts.
    let mut sweep: Option<Option<LandedKey>> = None;
    let mut last_sweep = Instant::now();
    // Rows may have landed since the last sweep began (or before a restart).
    let mut landed = true;
    loop {
        let received = if sweep.is_some() {
            // Between steps: take what is queued, without waiting for more.
            while items.len() < max_batch {
                match rx.try_recv() {
                    Ok(item) => items.push(item),
                    Err(_) => break,
                }
            }
            usize::MAX
        } else {
            let values_due =
                (!last.is_empty()).then(|| LAST_VALUES_EVERY.saturating_sub(last_written.elapsed()));
            let sweep_due = landed.then(|| settle_every.saturating_sub(last_sweep.elapsed()));
            match values_due.into_iter().chain(sweep_due).min() {
                None => rx.recv_many(&mut items, max_batch).await,
                Some(due) => match tokio::time::timeout(due, rx.recv_many(&mut items, max_batch)).await {
                    Ok(n) => n,
                    Err(_) => usize::MAX, // only the periodic work is due
                },
            }
        };
        let closed = received == 0;
        let mut batch = WriteBatch::default();
        let mut messages = 0u64;
        let mut barrier = closed;
        for item in items.iter_mut() {
            match std::mem::replace(&mut item.payload, Payload::Barrier) {
                Payload::Telemetry(t, newest) => {
                    messages += 1;
                    match last.get_mut(&t.device_id) {
                        Some((seq, prev)) => {
                            *seq = (*seq).max(t.seq);
                            if newest.sample.time_unix_ms >= prev.sample.time_unix_ms {
                                *prev = newest;
                            }
                        }
                        None => {
                            last.insert(t.device_id.clone(), (t.seq, newest));
                        }
                    }
                    batch.telemetry.push(t);
                }
                Payload::Events(e, alarms) => {
                    messages += 1;
                    batch.events.push(e);
                    batch.alarms.extend(alarms);
                }
                Payload::Presence(change) => batch.presence.push(change),
                Payload::Barrier => barrier = true,
            }
        }
        let periodic = barrier || last_written.elapsed() >= LAST_VALUES_EVERY;
        if periodic {
            last_written = Instant::now();
            // Kept until the commit succeeds: a failed commit must not lose them.
            batch.last_values = last
                .iter()
                .map(|(device_id, (seq, n))| LastValues {
                    device_id: device_id.clone(),
                    seen_ms: n.seen_ms,
                    telemetry_seq: *seq,
                    sample_ms: n.sample.time_unix_ms,
                    sample: n.sample.encode_to_vec(),
                })
                .collect();
        }
        let started = Instant::now();
        let result = if batch.is_empty() { Ok(Default::default()) } else { store.write_batch(&batch).await };
        match result {
            Ok(outcome) => {
                if !batch.last_values.is_empty() {
                    last.clear();
                }
                landed |= outcome.telemetry_inserted > 0;
                let inserted = outcome.telemetry_inserted + outcome.events_inserted;
                let duplicates = messages.saturating_sub(inserted);
                if let Some(inner) = inner.upgrade()
                    && messages > 0
                {
                    inner.stats.committed(inserted, duplicates);
                }
                if duplicates > 0 {
                    tracing::info!(duplicates, "re-sent messages already stored, dropped");
                }
                tracing::trace!(
                    messages,
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "batch committed"
                );
                for item in items.drain(..) {
                    let _ = item.done.send(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, messages, "batch not committed; publishers will re-send");
                let msg = e.to_string();
                for item in items.drain(..) {
                    let _ = item.done.send(Err(Error::Commit(msg.clone())));
                }
            }
        }
        // Move landed telemetry into the main table in key order (see the store), and
        // fold it into the rollups, one step between commits.
        if sweep.is_none() && landed && (barrier || last_sweep.elapsed() >= settle_every) {
            sweep = Some(None);
            last_sweep = Instant::now();
            landed = false;
        }
        if let Some(after) = sweep.take() {
            let started = Instant::now();
            match store.settle_telemetry(Some(&mut fold), SETTLE_STEP, after.as_ref()).await {
                Ok(step) => {
                    tracing::trace!(
                        taken = step.taken,
                        elapsed_us = started.elapsed().as_micros() as u64,
                        "landed telemetry moved"
                    );
                    if step.more {
                        sweep = Some(step.last);
                    }
                }
                Err(e) => {
                    // Retried by the next sweep; at shutdown, by the next start.
                    landed = !closed;
                    tracing::warn!(error = %e, "telemetry not moved to the main table; will retry");
                }
            }
        }
        // At shutdown, landed rows are moved before the writer ends.
        if closed && sweep.is_none() && !landed {
            break;
        }
    }
}
