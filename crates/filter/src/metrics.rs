//! Envoy counters the filter maintains (shown under `wasmcustom.` in `/stats`).

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

#[derive(Debug, Clone, Copy)]
pub enum Counter {
    Decided,
    UnknownDomain,
    BadHost,
    Origin5xx,
    OriginUnreachable,
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
}

const NAMES: [&str; 15] = [
    "origin_policy.decisions",
    "origin_policy.unknown_domain",
    "origin_policy.bad_host",
    "origin_policy.origin_5xx",
    "origin_policy.origin_unreachable",
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
];

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

    pub fn add(&self, counter: Counter, n: u64) {
        if let Some(id) = self.ids[counter as usize] {
            let _ = hostcalls::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    pub fn bump(&self, counter: Counter) {
        self.add(counter, 1);
    }
}
