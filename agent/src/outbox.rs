//! What the agent has to send and what the cloud has acknowledged. Pure state: the
//! MQTT edge reports what happened on the wire, the outbox decides what to (re)send.
//!
//! rumqttc assigns packet ids itself and, with a clean session, forgets unacknowledged
//! QoS 1 publishes when it reconnects. So the outbox, not the client, is the source
//! of truth: every message keeps its sequence number until its PUBACK arrives, and
//! after a reconnect everything unacknowledged is sent again (the cloud drops the
//! duplicates by sequence number).
//!
//! Packet ids are learnt from the order of the client's `Outgoing::Publish` events,
//! which follow the order the publishes were handed over. Each hand-over and each event
//! carries the connection generation (bumped at every CONNACK), because rumqttc can
//! drop queued requests at a disconnect and report stale events after it: an event of
//! a newer generation proves that everything handed before it under an older one was
//! lost, and an event of an older generation than the oldest waiting hand-over is
//! stale. A PUBACK is therefore never credited to the wrong message; at worst a message
//! is sent twice, and the cloud keeps it once.

use std::collections::{BTreeMap, HashMap, VecDeque};

use bytes::Bytes;

/// The numbered streams a device publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stream {
    Telemetry,
    Events,
    /// Signed batch records, numbered by run; never dropped for room.
    Batch,
}

/// A message waiting for its acknowledgement.
#[derive(Debug, Clone)]
struct Entry {
    topic: String,
    payload: Bytes,
    /// Handed to the client on the current connection.
    handed: bool,
    /// Milliseconds the message has waited, for the oldest-age gauge.
    created_ms: i64,
}

type Key = (Stream, u64);

/// A publish the edge must hand to the MQTT client.
#[derive(Debug, Clone, PartialEq)]
pub struct Send {
    pub topic: String,
    pub payload: Bytes,
}

/// Counters for the agent's status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct OutboxStats {
    pub queued: usize,
    pub acked: u64,
    pub refused: u64,
    pub resent: u64,
    /// Messages dropped because the outbox was full (oldest first).
    pub overflowed: u64,
}

#[derive(Debug)]
pub struct Outbox {
    entries: BTreeMap<Key, Entry>,
    /// Handed to the client under a connection generation, waiting for their packet id
    /// (None: not tracked, e.g. birth).
    awaiting_pkid: VecDeque<(Option<Key>, u64)>,
    inflight: HashMap<u16, Option<Key>>,
    capacity: usize,
    window: usize,
    stats: OutboxStats,
}

impl Outbox {
    /// `capacity`: messages kept while offline; `window`: unacknowledged publishes on
    /// the wire at once.
    pub fn new(capacity: usize, window: usize) -> Outbox {
        Outbox {
            entries: BTreeMap::new(),
            awaiting_pkid: VecDeque::new(),
            inflight: HashMap::new(),
            capacity: capacity.max(1),
            window: window.max(1),
            stats: OutboxStats::default(),
        }
    }

    pub fn stats(&self) -> OutboxStats {
        OutboxStats { queued: self.entries.len(), ..self.stats }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Age of the oldest unacknowledged message.
    pub fn oldest_ms(&self, now_ms: i64) -> i64 {
        self.entries.values().map(|e| now_ms - e.created_ms).max().unwrap_or(0)
    }

    /// Queues message `seq` of `stream`.
    pub fn push(&mut self, stream: Stream, seq: u64, topic: String, payload: Bytes, now_ms: i64) {
        while self.entries.len() >= self.capacity {
            // Drop the oldest message nobody is waiting on the wire for.
            let Some(oldest) =
                self.entries.iter().find(|(k, e)| !e.handed && k.0 != Stream::Batch).map(|(k, _)| *k)
            else {
                break;
            };
            self.entries.remove(&oldest);
            self.stats.overflowed += 1;
        }
        self.entries.insert((stream, seq), Entry { topic, payload, handed: false, created_ms: now_ms });
    }

    /// Publishes handed to the client and not yet acknowledged.
    pub fn on_wire(&self) -> usize {
        self.awaiting_pkid.len() + self.inflight.len()
    }

    /// Next message to hand to the client, oldest first, within the window, on
    /// connection generation `generation`.
    pub fn next_send(&mut self, generation: u64) -> Option<Send> {
        if self.on_wire() >= self.window {
            return None;
        }
        let (key, e) = self.entries.iter_mut().find(|(_, e)| !e.handed)?;
        e.handed = true;
        self.awaiting_pkid.push_back((Some(*key), generation));
        Some(Send { topic: e.topic.clone(), payload: e.payload.clone() })
    }

    /// A QoS 1 publish outside the numbered streams (birth, death) was handed over.
    pub fn handed_untracked(&mut self, generation: u64) {
        self.awaiting_pkid.push_back((None, generation));
    }

    fn unhand(&mut self, key: Option<Key>) {
        if let Some(e) = key.and_then(|k| self.entries.get_mut(&k)) {
            e.handed = false;
            self.stats.resent += 1;
        }
    }

    /// The client wrote a publish with packet id `pkid` on connection `generation`.
    pub fn on_sent(&mut self, pkid: u16, generation: u64) {
        while let Some(&(key, g)) = self.awaiting_pkid.front() {
            if g < generation {
                // Handed to an older connection and never written: lost.
                self.awaiting_pkid.pop_front();
                self.unhand(key);
            } else if g == generation {
                self.awaiting_pkid.pop_front();
                self.inflight.insert(pkid, key);
                return;
            } else {
                return; // a stale event of an older connection
            }
        }
    }

    /// PUBACK for `pkid`; `accepted` is false when the cloud refused the message (it
    /// will not be sent again: re-sending cannot help). Returns the message's stream
    /// and number.
    pub fn on_acked(&mut self, pkid: u16, accepted: bool) -> Option<(Stream, u64)> {
        let Some(Some(key)) = self.inflight.remove(&pkid) else { return None };
        self.entries.remove(&key)?;
        if accepted {
            self.stats.acked += 1;
        } else {
            self.stats.refused += 1;
        }
        Some(key)
    }

    /// Connection `generation` dropped: nothing handed to it will be acknowledged.
    pub fn on_disconnected(&mut self, generation: u64) {
        let inflight: Vec<_> = self.inflight.drain().map(|(_, k)| k).collect();
        for key in inflight {
            self.unhand(key);
        }
        while let Some(&(key, g)) = self.awaiting_pkid.front() {
            if g > generation {
                break;
            }
            self.awaiting_pkid.pop_front();
            self.unhand(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox_with(n: u64) -> Outbox {
        let mut o = Outbox::new(100, 8);
        for seq in 1..=n {
            o.push(Stream::Telemetry, seq, "t".into(), Bytes::from(vec![seq as u8]), 0);
        }
        o
    }

    #[test]
    fn acked_messages_leave_and_unacked_are_resent_after_a_disconnect() {
        let mut o = outbox_with(3);
        let sends: Vec<_> = std::iter::from_fn(|| o.next_send(1)).collect();
        assert_eq!(sends.len(), 3);
        o.on_sent(10, 1);
        o.on_sent(11, 1);
        o.on_sent(12, 1);
        o.on_acked(11, true);
        o.on_disconnected(1);
        // 1 and 3 were on the wire unacknowledged: both go again, in order.
        let again: Vec<_> = std::iter::from_fn(|| o.next_send(2)).map(|s| s.payload[0]).collect();
        assert_eq!(again, vec![1, 3]);
        assert_eq!(o.stats().acked, 1);
        assert_eq!(o.stats().resent, 2);
    }

    #[test]
    fn the_window_bounds_publishes_on_the_wire() {
        let mut o = outbox_with(20);
        assert_eq!(std::iter::from_fn(|| o.next_send(1)).count(), 8);
        o.on_sent(1, 1);
        o.on_acked(1, true);
        assert!(o.next_send(1).is_some());
        assert!(o.next_send(1).is_none());
    }

    #[test]
    fn packet_ids_map_in_hand_over_order_with_untracked_births_between() {
        let mut o = outbox_with(1);
        o.handed_untracked(1);
        let _ = o.next_send(1);
        o.on_sent(1, 1); // birth
        o.on_sent(2, 1); // seq 1
        o.on_acked(1, true);
        assert_eq!(o.stats().queued, 1);
        o.on_acked(2, true);
        assert!(o.is_empty());
    }

    #[test]
    fn hand_overs_lost_in_a_reconnect_are_never_credited_with_a_newer_ack() {
        let mut o = outbox_with(3);
        // 1 is written on connection 1; 2 is handed but dropped by the client at the
        // disconnect; 3 is handed while the device still believes connection 1 is up,
        // and is written on connection 2.
        let _ = o.next_send(1);
        let _ = o.next_send(1);
        o.on_sent(7, 1);
        let _ = o.next_send(1);
        o.on_sent(9, 0); // a stale event from before: ignored
        o.on_sent(1, 2); // seq 3 written on connection 2: 2 and 3 were handed on 1
        o.on_acked(1, true); // nothing is credited for it
        assert_eq!(o.stats().acked, 0);
        o.on_disconnected(1);
        o.on_acked(7, true); // connection 1 is gone; its packet ids mean nothing now
        assert_eq!(o.stats().acked, 0);
        let again: Vec<_> = std::iter::from_fn(|| o.next_send(2)).map(|s| s.payload[0]).collect();
        assert_eq!(again, vec![1, 2, 3]);
    }

    #[test]
    fn a_full_outbox_drops_the_oldest_unsent_message() {
        let mut o = Outbox::new(2, 8);
        for seq in 1..=3 {
            o.push(Stream::Telemetry, seq, "t".into(), Bytes::from(vec![seq as u8]), 0);
        }
        let left: Vec<_> = std::iter::from_fn(|| o.next_send(1)).map(|s| s.payload[0]).collect();
        assert_eq!(left, vec![2, 3]);
        assert_eq!(o.stats().overflowed, 1);
    }

    #[test]
    fn a_refused_message_is_not_sent_again() {
        let mut o = outbox_with(1);
        let _ = o.next_send(1);
        o.on_sent(5, 1);
        o.on_acked(5, false);
        o.on_disconnected(1);
        assert!(o.next_send(2).is_none());
        assert_eq!(o.stats().refused, 1);
    }
}
