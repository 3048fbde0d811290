//! The single writer: group commit of telemetry and events.

use std::collections::HashMap;
use std::sync::Weak;
use std::time::Instant;

use nanofleet_store::{AlarmChange, EventRecord, LastValues, Store, TelemetryRecord, WriteBatch};
use tokio::sync::{mpsc, oneshot};

use crate::{Error, Inner};

pub(crate) enum Payload {
    Telemetry(TelemetryRecord, LastValues),
    Events(EventRecord, Vec<AlarmChange>),
    /// Completes once everything queued before it is committed.
    Barrier,
}

pub(crate) struct Item {
    pub payload: Payload,
    pub done: oneshot::Sender<Result<(), Error>>,
}

pub(crate) async fn run(store: Store, mut rx: mpsc::Receiver<Item>, max_batch: usize, inner: Weak<Inner>) {
    let mut items = Vec::with_capacity(max_batch);
    while rx.recv_many(&mut items, max_batch).await > 0 {
        let mut batch = WriteBatch::default();
        let mut last: HashMap<String, LastValues> = HashMap::new();
        let mut messages = 0u64;
        for item in &items {
            match &item.payload {
                Payload::Telemetry(t, l) => {
                    messages += 1;
                    batch.telemetry.push(t.clone());
                    match last.get_mut(&l.device_id) {
                        Some(prev) if prev.sample_ms > l.sample_ms => {
                            prev.telemetry_seq = prev.telemetry_seq.max(l.telemetry_seq);
                        }
                        Some(prev) => {
                            let seq = prev.telemetry_seq.max(l.telemetry_seq);
                            *prev = l.clone();
                            prev.telemetry_seq = seq;
                        }
                        None => {
                            last.insert(l.device_id.clone(), l.clone());
                        }
                    }
                }
                Payload::Events(e, alarms) => {
                    messages += 1;
                    batch.events.push(e.clone());
                    batch.alarms.extend(alarms.iter().cloned());
                }
                Payload::Barrier => {}
            }
        }
        batch.last_values = last.into_values().collect();
        let started = Instant::now();
        let result = if batch.is_empty() { Ok(Default::default()) } else { store.write_batch(&batch).await };
        match result {
            Ok(outcome) => {
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
    }
}
