//! `GET /changes`: the policy feed the filter's singleton long-polls (the
//! contract: docs/feed.md), and what each Envoy's polls say about it: the
//! version it has, the domains it refused, a snapshot it kept out.

use crate::table::{FeedPage, CURSOR_BIT};
use crate::writer::Shared;
use origin_policy_engine::feed::{
    parse_report, EPOCH_HEADER, MORE_HEADER, NODE_HEADER, REJECTED_HEADER, RESET_HEADER,
    SNAPSHOT_REFUSED_HEADER, VERSION_HEADER,
};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

/// Domains per feed page: a page is one `set_shared_data` burst on Envoy's
/// main thread, and 10,000 keeps a re-sync's longest request in check.
pub const PAGE_ENTRIES: usize = 10_000;
/// How long a poll with nothing new is held open.
pub const LONG_POLL: Duration = Duration::from_secs(20);

/// An Envoy's acknowledgements: a poll from version V says it applied
/// everything up to V, except the domains it names as refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeReport {
    pub version: u64,
    pub epoch: Option<u64>,
    /// Domains it refused, with the version it said so at; a later revision
    /// of the domain clears it.
    pub refused: BTreeMap<String, u64>,
    /// `REMOVED/DOMAINS` when it kept every domain rather than apply a
    /// snapshot's removals (`max_snapshot_removal_percent`), until its next
    /// snapshot.
    pub snapshot_refused: Option<String>,
}

/// What one poll says, from its query and headers.
#[derive(Debug, Clone, Default)]
pub struct Poll {
    pub since: u64,
    pub epoch: Option<u64>,
    pub node: Option<String>,
    pub refused: Option<String>,
    pub snapshot_refused: Option<String>,
}

#[derive(Debug, Default)]
pub struct Nodes(Mutex<BTreeMap<String, NodeReport>>);

impl Nodes {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, NodeReport>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records what a poll says about its Envoy.
    pub fn heard(&self, shared: &Shared, poll: &Poll) {
        let Some(node) = &poll.node else {
            return;
        };
        let mut nodes = self.lock();
        let report = nodes.entry(node.clone()).or_default();
        if report.epoch != poll.epoch {
            report.refused.clear();
            report.snapshot_refused = None;
        }
        if let Some(removals) = &poll.snapshot_refused {
            eprintln!("serve: {node} kept every domain rather than remove {removals} of them (max_snapshot_removal_percent)");
            report.snapshot_refused = Some(removals.clone());
        }
        {
            let table = shared.table();
            // A refusal stands until the domain gets a newer revision.
            report
                .refused
                .retain(|domain, at| table.get(domain).is_some_and(|c| c.seq <= *at));
        }
        for domain in poll.refused.as_deref().into_iter().flat_map(parse_report) {
            if report.refused.insert(domain.clone(), poll.since).is_none() {
                eprintln!("serve: {node} refused the policy of {domain} (its log says why); it keeps its last good one");
            }
        }
        report.version = poll.since;
        report.epoch = poll.epoch;
    }

    /// Every node's report, by node id.
    pub fn reports(&self) -> BTreeMap<String, NodeReport> {
        self.lock().clone()
    }

    pub fn status(&self) -> Value {
        let nodes: serde_json::Map<String, Value> = self
            .lock()
            .iter()
            .map(|(node, r)| {
                let report = json!({"version": r.version, "epoch": r.epoch, "refused": r.refused, "snapshot_refused": r.snapshot_refused});
                (node.clone(), report)
            })
            .collect();
        Value::Object(nodes)
    }
}

/// Answers a poll: at once when there is something new, else once there is
/// or after [`LONG_POLL`] (`None`: nothing new, a 204). `target`: the
/// version this node is to be at, given the latest published one (a canary
/// and the others may differ; below `since` the page goes backwards).
pub async fn answer(
    shared: &Shared,
    poll: &Poll,
    target: impl Fn(u64) -> u64,
) -> Result<Option<FeedPage>, String> {
    let mut published = shared.published.subscribe();
    let deadline = tokio::time::Instant::now() + LONG_POLL;
    let mut not_serving = shared.replica.get().map(|r| r.serving_changes());
    if let Some(replica) = shared.replica.get() {
        // A version another replica gave that this one has not applied yet
        // (it is moments behind): held until it has, so that the node keeps
        // its version; never given, it becomes a snapshot after the hold.
        let epoch = shared.table().epoch;
        if poll.epoch == Some(epoch) && poll.since & CURSOR_BIT == 0 {
            let mut stops = replica.serving_changes();
            tokio::select! {
                _ = replica.wait_applied(poll.since, deadline) => {}
                Ok(_) = stops.wait_for(Option::is_some) => {
                    return Err(replica.not_serving().unwrap_or_default());
                }
            }
        }
    }
    loop {
        // Marked seen before the look, so a write in between is not missed.
        let target = target(*published.borrow_and_update());
        let plan = shared
            .table()
            .plan(&shared.store, poll.since, poll.epoch, target, PAGE_ENTRIES)
            .map_err(|e| e.to_string())?;
        let page = &plan.page;
        if page.entries > 0 || page.reset || page.version != poll.since {
            return plan
                .render(&shared.store)
                .map(Some)
                .map_err(|e| e.to_string());
        }
        let stopped = async {
            match not_serving.as_mut() {
                Some(changes) => changes.wait_for(Option::is_some).await.map(|_| ()),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = tokio::time::timeout_at(deadline, published.changed()) => match changed {
                Ok(Ok(())) => continue,
                _ => return Ok(None),
            },
            Ok(()) = stopped => {
                return Err(shared.not_serving().unwrap_or_else(|| "not serving".to_owned()));
            }
        }
    }
}

/// The response headers of a page.
pub fn page_headers(page: &FeedPage) -> Vec<(&'static str, String)> {
    let mut headers = vec![
        (VERSION_HEADER, page.version.to_string()),
        (EPOCH_HEADER, page.epoch.to_string()),
    ];
    if page.more {
        headers.push((MORE_HEADER, "1".to_owned()));
    }
    if page.reset {
        headers.push((RESET_HEADER, "1".to_owned()));
    }
    headers
}

/// The poll's query and headers.
pub fn read_poll(query: &str, header: impl Fn(&str) -> Option<String>) -> Poll {
    let value = |name: &str| {
        query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| v.parse().ok())
    };
    Poll {
        since: value("since").unwrap_or(0),
        epoch: value("epoch"),
        node: header(NODE_HEADER),
        refused: header(REJECTED_HEADER),
        snapshot_refused: header(SNAPSHOT_REFUSED_HEADER),
    }
}
