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
    AdsRefused,
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
}

#[derive(Debug, Default)]
pub struct Events(Mutex<VecDeque<Event>>);

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Events {
    /// Records an event, and logs it.
    pub fn record(&self, kind: EventKind, message: impl Into<String>) {
        let message = message.into();
        eprintln!("serve: {}: {message}", kind.name());
        let mut events = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if events.len() == KEPT {
            events.pop_front();
        }
        events.push_back(Event {
            at_ms: now_ms(),
            kind,
            message,
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

    /// As `/status` lists them: `[{"at_ms", "event", "message"}]`.
    pub fn status(&self) -> Value {
        Value::Array(
            self.list()
                .into_iter()
                .map(|e| json!({"at_ms": e.at_ms, "event": e.kind.name(), "message": e.message}))
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
}
