//! Envoy counters the filter maintains (shown under `wasmcustom.` in `/stats`).

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;
use std::cell::Cell;

#[derive(Debug, Clone, Copy)]
pub enum Counter {
    Decided,
    UnknownDomain,
    BadHost,
    Origin5xx,
    OriginUnreachable,
    /// An origin's resolved address was refused by `settings.origin_networks`.
    OriginAddressRefused,
    RedirectUncacheable,
    CacheOverridden,
    /// The first origin failed and Envoy retried on the next.
    FailoverRetried,
    /// The first origin was marked down; Envoy went straight to the next.
    FailoverMarkedDown,
    FailoverSucceeded,
    FailoverNextFailed,
    FailoverSkipped,
    ConfigApplied,
    ConfigRejected,
    PolicyRejected,
    /// Entries the feed singleton wrote into shared data.
    FeedEntriesWritten,
    /// Policies from the feed refused; their domains keep their entry.
    FeedPolicyRejected,
    /// Feed lines that are not `DOMAIN<TAB>DOCUMENT`, skipped.
    FeedLineMalformed,
    /// Snapshots whose removals passed `max_snapshot_removal_percent`.
    FeedSnapshotRefused,
    /// Requests answered 503 because the first sync is not complete, or
    /// whose domain's entry could not be used.
    EntryUnavailable,
}

const NAMES: [&str; 21] = [
    "origin_policy.decisions",
    "origin_policy.unknown_domain",
    "origin_policy.bad_host",
    "origin_policy.origin_5xx",
    "origin_policy.origin_unreachable",
    "origin_policy.origin_address_refused",
    "origin_policy.redirects_uncacheable",
    "origin_policy.cache_overridden",
    "origin_policy.failover.retried",
    "origin_policy.failover.marked_down",
    "origin_policy.failover.succeeded",
    "origin_policy.failover.next_failed",
    "origin_policy.failover.skipped",
    "origin_policy.config.applied",
    "origin_policy.config.rejected",
    "origin_policy.policy.rejected",
    "origin_policy.feed.entries_written",
    "origin_policy.feed.policy_rejected",
    "origin_policy.feed.line_malformed",
    "origin_policy.feed.snapshot_refused",
    "origin_policy.feed.entry_unavailable",
];

thread_local! {
    /// Per-request counts not yet handed to Envoy, per VM: every root context
    /// of the VM adds to them and any of them sends them on its tick.
    static PENDING: [Cell<u64>; NAMES.len()] = const { [const { Cell::new(0) }; NAMES.len()] };
}

/// Metric ids, defined once per VM; a counter the host refused is skipped.
#[derive(Debug, Default)]
pub struct Metrics {
    ids: [Option<u32>; NAMES.len()],
}

impl Metrics {
    pub fn define() -> Self {
        let mut ids = [None; NAMES.len()];
        for (slot, name) in ids.iter_mut().zip(NAMES) {
            *slot = hostcalls::define_metric(MetricType::Counter, name).ok();
        }
        Metrics { ids }
    }

    /// Adds to a counter in Envoy now: for the rare events of a push.
    pub fn add(&self, counter: Counter, n: u64) {
        if let Some(id) = self.ids[counter as usize] {
            let _ = hostcalls::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Counts one request's event. A host call costs Envoy about a microsecond
    /// (BENCHMARKS.md, "Host calls"), so per-request counts are kept in the VM
    /// and handed over by [`Metrics::flush`] on the root context's tick.
    pub fn bump(&self, counter: Counter) {
        PENDING.with(|p| {
            let slot = &p[counter as usize];
            slot.set(slot.get().saturating_add(1));
        });
    }

    /// Hands the pending counts to Envoy: one call per counter that moved.
    pub fn flush(&self) {
        let pending: [u64; NAMES.len()] = PENDING.with(|p| p.each_ref().map(|c| c.replace(0)));
        for (id, n) in self.ids.iter().zip(pending) {
            if let (Some(id), 1..) = (id, n) {
                let _ = hostcalls::increment_metric(*id, i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
    }
}
