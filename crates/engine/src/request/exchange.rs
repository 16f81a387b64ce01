//! One request's exchange with the origins, from its headers to its answer:
//! the compiled policy it started with, what was decided, and what the
//! answer says about the origins. Every phase of the filter asks it; nothing
//! is looked up or decided twice.
//!
//! Envoy does the fetching: the cluster header names the origin (or the chain
//! of origins Envoy fails over along), the retry headers allow one failover,
//! and the answer streams through. The exchange only reads what came back.

use crate::compile::compiled::{CacheControl, CompiledPolicy};
use crate::policy::host::is_ip_literal;
use crate::policy::settings::DirectOrigins;
use crate::policy::settings::Settings;
use crate::policy::{OriginHost, DEFAULT_RESPONSE_TIMEOUT_MS};
use crate::request::decision::ViewerRequest;
use crate::request::decision::{
    Choice, DomainMatch, Failover, OriginDecision, OriginTarget, Refusal,
};
use crate::request::direct_route::DirectRoute;
use crate::request::fetch::FetchFailure;
use crate::request::origin_error::{
    FailoverOutcome, OriginError, PrimaryFailure, SecondaryFailure,
};
use std::borrow::Cow;
use std::sync::Arc;

/// Response header naming why an origin fetch failed or failed over.
pub const ORIGIN_ERROR_HEADER: &str = "x-origin-error";
/// Response header naming the origin, scheme, port, Host and SNI used.
pub const DECISION_HEADER: &str = "x-origin-decision";

/// The request headers Envoy's router reads to retry and time out; it
/// removes them before the request leaves for the origin.
pub const RETRY_ON_HEADER: &str = "x-envoy-retry-on";
pub const RETRIABLE_STATUSES_HEADER: &str = "x-envoy-retriable-status-codes";
pub const TIMEOUT_HEADER: &str = "x-envoy-upstream-rq-timeout-ms";
pub const PER_TRY_TIMEOUT_HEADER: &str = "x-envoy-upstream-rq-per-try-timeout-ms";
/// Every request header by which a client can steer Envoy's router (retries,
/// timeouts). Envoy drops them from external clients only; a viewer it counts
/// as internal (no `use_remote_address`, or a trusted range) keeps them, so the
/// filter removes a viewer's copy before writing its own.
pub const ROUTER_CONTROL_HEADERS: [&str; 9] = [
    RETRY_ON_HEADER,
    RETRIABLE_STATUSES_HEADER,
    TIMEOUT_HEADER,
    PER_TRY_TIMEOUT_HEADER,
    "x-envoy-max-retries",
    "x-envoy-retry-grpc-on",
    "x-envoy-retriable-header-names",
    "x-envoy-hedge-on-per-try-timeout",
    "x-envoy-upstream-rq-per-try-idle-timeout-ms",
];

/// A failed attempt Envoy may retry: an answer with one of the rule's
/// statuses, no connection, a reset, or no answer within the per-try timeout.
const RETRY_ON_FAILURE: &str = "retriable-status-codes,connect-failure,refused-stream,reset";
/// For a method that is not idempotent: only when nothing reached the origin.
const RETRY_ON_CONNECT_FAILURE: &str = "connect-failure,refused-stream";

/// What came back from Envoy's fetch, as the response phase sees it.
#[derive(Debug, Clone, Copy, Default)]
pub struct UpstreamReport<'a> {
    pub status: u16,
    /// Set when the proxy made the answer because no origin answered.
    pub failure: Option<FetchFailure<'a>>,
    /// Envoy's attempts for this request (`upstream.request_attempt_count`):
    /// 2 means the first origin failed and the next one was asked.
    pub attempts: u32,
    /// The answering endpoint's metadata (`xds.upstream_host_metadata`), which
    /// names its origin cluster.
    pub host_metadata: Option<&'a [u8]>,
}

/// What the filter writes into the response headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseVerdict {
    /// Replaces the status: the proxy's own 503 for an origin that never
    /// answered becomes 502 (connect, TLS) or 504 (timeout).
    pub status: Option<u16>,
    pub cache_control: Option<CacheControl>,
    /// The `x-origin-error` value, when something went wrong.
    pub origin_error: Option<OriginError>,
    /// `x-origin-decision` for the origin that answered, when asked for.
    pub decision_header: Option<String>,
}

/// One request's exchange with the origins.
#[derive(Debug)]
pub struct Exchange {
    policy: Arc<CompiledPolicy>,
    viewer_host: String,
    choice: Choice,
    method: String,
    decision_header: bool,
    /// Known when the request is decided: the answer may come from another
    /// origin than the first.
    has_chain: bool,
    /// Every origin of the decision is looked up by DNS: with no host at
    /// all, the cause is a name that never resolved, not a marked-down origin
    /// (an origin with an address is tried even when marked down, in panic).
    all_by_dns: bool,
    /// Set when the request goes through a forward-proxy shard: no chain,
    /// and the edge reaches such origins directly (`direct_origins`).
    direct: Option<DirectOrigins>,
}

impl Exchange {
    /// Decides the request. `Err` when the policy has no origin for it.
    pub fn begin<'a>(
        found: DomainMatch<'a>,
        request: &ViewerRequest<'_>,
        settings: &Settings,
    ) -> Result<Exchange, Refusal<'a>> {
        let choice = found.choose(request, settings);
        let policy: &'a Arc<CompiledPolicy> = found.policy;
        let Some(decision) =
            policy.decision(Cow::Borrowed(&found.viewer_host), choice, request.method)
        else {
            return Err(Refusal::NoRoute {
                domain: &policy.name,
            });
        };
        let has_chain = !decision.chain.is_empty();
        let by_dns = |a: &str| !is_ip_literal(a) && !settings.resolve.contains_key(a);
        let all_by_dns =
            by_dns(decision.target.address) && decision.chain.iter().all(|t| by_dns(t.address));
        Ok(Exchange {
            policy: Arc::clone(policy),
            viewer_host: found.viewer_host.into_owned(),
            choice,
            method: request.method.to_owned(),
            decision_header: settings.decision_header,
            has_chain,
            all_by_dns,
            direct: settings.direct_origins.filter(|_| !has_chain),
        })
    }

    /// What was decided. `begin` made sure there is a decision, so `None`
    /// cannot happen; callers treat it as "nothing to do".
    pub fn decision(&self) -> Option<OriginDecision<'_>> {
        self.policy
            .decision(Cow::Borrowed(&self.viewer_host), self.choice, &self.method)
    }

    pub fn domain(&self) -> &str {
        &self.policy.name
    }

    /// The `:authority` to write, when it differs from what the viewer
    /// `sent`: the policy's custom Host, or the viewer's host as matched (case,
    /// trailing dot and port normalised). An origin's own name (`origin_domain`)
    /// travels with its cluster, and Envoy writes it attempt by attempt; a
    /// direct origin has no cluster of its own, so the filter writes it.
    pub fn authority_rewrite<'d>(
        &self,
        decision: &'d OriginDecision<'_>,
        sent: &str,
    ) -> Option<&'d str> {
        if self.direct.is_none() && self.policy.policy.origin_host == OriginHost::OriginDomain {
            return None;
        }
        let host: &'d str = &decision.target.authority;
        (sent != host).then_some(host)
    }

    /// How the request reaches its origin when it goes through a
    /// forward-proxy shard rather than a cluster of the origin's own.
    pub fn direct_route<'d>(
        &self,
        decision: &'d OriginDecision<'_>,
        settings: &'d Settings,
    ) -> Option<DirectRoute<'d>> {
        self.direct
            .map(|d| DirectRoute::of(&decision.target, d, settings))
    }

    /// Whether the answer may have come from another origin than the first,
    /// so that the response phase must ask Envoy which one answered.
    pub fn has_chain(&self) -> bool {
        self.has_chain
    }

    /// Classifies the answer and says what to write into it.
    pub fn on_response(&self, mut report: UpstreamReport<'_>) -> ResponseVerdict {
        // A forward-proxy shard tells a name that never resolved apart itself.
        if self.all_by_dns
            && self.direct.is_none()
            && report.failure == Some(FetchFailure::NoHealthyOrigin)
        {
            report.failure = Some(FetchFailure::Unresolved);
        }
        let Some(decision) = self.decision() else {
            return ResponseVerdict {
                status: None,
                cache_control: None,
                origin_error: None,
                decision_header: None,
            };
        };
        let status = report.failure.map_or(report.status, |f| f.status());
        let served = report
            .host_metadata
            .and_then(|m| served_by(&decision, m))
            .unwrap_or(&decision.target);
        let first_answered = served.cluster == decision.target.cluster;
        let failed =
            |s: u16| s >= 500 || decision.failover.rule().is_some_and(|r| r.triggers_on(s));
        let own_failure = || report.failure.map(|f| f.to_string());
        let origin_error = if !first_answered || report.attempts > 1 {
            // Envoy moved on: the first origin failed (a retry) or is marked down.
            let primary = if report.attempts > 1 {
                PrimaryFailure::Failed
            } else {
                PrimaryFailure::MarkedDown
            };
            let next = if failed(status) {
                Some(match own_failure() {
                    Some(why) => SecondaryFailure::Unreachable(why),
                    None => SecondaryFailure::Answered(status),
                })
            } else {
                None
            };
            Some(OriginError {
                primary,
                failover: FailoverOutcome::Next(served.tier, next),
            })
        } else if failed(status) {
            let primary = match own_failure() {
                Some(why) => PrimaryFailure::Unreachable(why),
                None => PrimaryFailure::Answered(status),
            };
            Some(OriginError {
                primary,
                failover: match &decision.failover {
                    Failover::Skipped(_, why) => FailoverOutcome::Skipped(why.clone()),
                    _ => FailoverOutcome::None,
                },
            })
        } else {
            None
        };
        ResponseVerdict {
            status: report
                .failure
                .map(|f| f.status())
                .filter(|s| *s != report.status),
            cache_control: self.policy.cache_override(status).map(|c| c.cache_control),
            origin_error,
            decision_header: self
                .decision_header
                .then(|| served.header_value(&self.policy.name)),
        }
    }
}

impl OriginDecision<'_> {
    /// The request headers to write, besides the cluster header: one failover
    /// when the policy allows it for this request, and the origin's timeouts.
    pub fn route_headers(&self) -> Vec<(&'static str, String)> {
        let first = self.target.response_timeout_ms;
        let mut out = Vec::new();
        match &self.failover {
            Failover::Plan(plan) => {
                let retry_on = if plan.connect_failures_only {
                    RETRY_ON_CONNECT_FAILURE
                } else {
                    RETRY_ON_FAILURE
                };
                out.push((RETRY_ON_HEADER, retry_on.to_owned()));
                if !plan.connect_failures_only {
                    out.push((RETRIABLE_STATUSES_HEADER, plan.rule.status_list()));
                }
                out.push((PER_TRY_TIMEOUT_HEADER, first.to_string()));
                let total = first.saturating_add(plan.target.response_timeout_ms);
                out.push((TIMEOUT_HEADER, total.to_string()));
            }
            // The route's own timeout is the default: write only a different one.
            _ if first != DEFAULT_RESPONSE_TIMEOUT_MS => {
                out.push((TIMEOUT_HEADER, first.to_string()));
            }
            _ => {}
        }
        out
    }
}

/// The origin whose cluster the answering endpoint's metadata names. The
/// metadata arrives as Envoy serialised it; every derived endpoint carries its
/// cluster's name, which is unique, so finding the name finds the origin.
fn served_by<'d, 'a>(
    decision: &'d OriginDecision<'a>,
    metadata: &[u8],
) -> Option<&'d OriginTarget<'a>> {
    std::iter::once(&decision.target)
        .chain(decision.chain.iter())
        .find(|t| {
            let name = t.cluster.as_bytes();
            metadata.windows(name.len()).any(|w| w == name)
        })
}
