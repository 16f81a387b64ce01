//! What happened to this server that an operator should see on `/status`:
//! its store going away and coming back, replicas joining and leaving,
//! writes refused. The last [`KEPT`], oldest first.

use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Events kept.
pub const KEPT: usize = 200;

/// The kinds of event `/status` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    StoreUnreachable,
    StoreReachable,
    CaughtUp,
    ReplicaJoined,
    ReplicaLeft,
    WriteRefused,
    /// An ADS connection or stream refused: no or a bad client certificate,
    /// an identity that may not have xDS, a `node.id` that is not the
    /// certificate's.
    AdsRefused,
    /// A connection or request to the HTTP listener refused (the feed, the
    /// API, the status) for the same reasons.
    FeedRefused,
}

impl EventKind {
    pub fn name(self) -> &'static str {
        match self {
            EventKind::StoreUnreachable => "store_unreachable",
            EventKind::StoreReachable => "store_reachable",
            EventKind::CaughtUp => "caught_up",
            EventKind::ReplicaJoined => "replica_joined",
            EventKind::ReplicaLeft => "replica_left",
            EventKind::WriteRefused => "write_refused",
            EventKind::AdsRefused => "ads_refused",
            EventKind::FeedRefused => "feed_refused",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub at_ms: u64,
    pub kind: EventKind,
    pub message: String,
    /// Times it happened: a refused Envoy retries every second, and one
    /// entry with a count keeps the other events in the list.
    pub count: u64,
}

#[derive(Debug, Default)]
pub struct Events(Mutex<VecDeque<Event>>);

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Events {
    /// Records an event, and logs it. The same kind and message again moves
    /// the earlier entry to the end with its count raised (logged once).
    pub fn record(&self, kind: EventKind, message: impl Into<String>) {
        let message = message.into();
        let mut events = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let earlier = events
            .iter()
            .position(|e| e.kind == kind && e.message == message);
        let count = match earlier.and_then(|i| events.remove(i)) {
            Some(e) => e.count + 1,
            None => {
                eprintln!("serve: {}: {message}", kind.name());
                1
            }
        };
        if events.len() == KEPT {
            events.pop_front();
        }
        events.push_back(Event {
            at_ms: now_ms(),
            kind,
            message,
            count,
        });
    }

    pub fn list(&self) -> Vec<Event> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// As `/status` lists them: `[{"at_ms", "event", "message", "count"}]`.
    pub fn status(&self) -> Value {
        Value::Array(
            self.list()
                .into_iter()
                .map(|e| json!({"at_ms": e.at_ms, "event": e.kind.name(), "message": e.message, "count": e.count}))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_200_are_kept_oldest_first() {
        let events = Events::default();
        for i in 0..250 {
            events.record(EventKind::WriteRefused, format!("{i}"));
        }
        let list = events.list();
        assert_eq!(list.len(), KEPT);
        assert_eq!(list[0].message, "50");
        assert_eq!(events.status()[199]["event"], "write_refused");
    }

    #[test]
    fn a_repeated_event_is_one_entry_with_a_count() {
        let events = Events::default();
        events.record(EventKind::AdsRefused, "a");
        events.record(EventKind::FeedRefused, "b");
        events.record(EventKind::AdsRefused, "a");
        let list = events.status();
        assert_eq!(list.as_array().map(Vec::len), Some(2));
        assert_eq!(
            (&list[0]["message"], &list[0]["count"]),
            (&json!("b"), &json!(1))
        );
        assert_eq!(
            (&list[1]["message"], &list[1]["count"]),
            (&json!("a"), &json!(2))
        );
        assert_eq!(list[1]["event"], "ads_refused");
    }
}
