//! One request's exchange with the origins, from its headers to its answer:
//! the compiled policy it started with, what was decided, the request kept for
//! a failover replay and what went wrong so far. Every phase of the filter asks
//! it; nothing is looked up or decided twice.

use crate::compiled::{CacheControl, CompiledPolicy};
use crate::decision::{Choice, DomainMatch, Failover, FailoverAction, OriginDecision, Refusal};
use crate::decision::{OriginTarget, ViewerRequest};
use crate::fetch::FetchFailure;
use crate::origin_error::{
    header_text, FailoverOutcome, OriginError, PrimaryFailure, SecondaryFailure,
};
use crate::settings::Settings;
use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

/// Response header naming why an origin fetch failed or failed over.
pub const ORIGIN_ERROR_HEADER: &str = "x-origin-error";
/// Response header naming the origin, scheme, port, Host and SNI used.
pub const DECISION_HEADER: &str = "x-origin-decision";
/// Set by Envoy on answers that came from an upstream; absent on its own replies.
const UPSTREAM_SERVICE_TIME: &str = "x-envoy-upstream-service-time";
/// How Envoy's own reply for an upstream it could not reach begins; the
/// reason follows `reset reason: `.
const PROXY_CONNECT_ERROR: &str = "upstream connect error or disconnect/reset before headers.";

/// Connection-scoped headers that must not be copied between hops (RFC 9110 7.6.1),
/// plus `content-length`, which the host recomputes.
fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "content-length"
    )
}

/// The request as received, kept while a failover is still possible.
#[derive(Debug, Default)]
struct Replay {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    over_limit: bool,
}

/// What the filter does with the primary's response headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrimaryVerdict {
    /// Replaces the status (an unreachable origin's 503 becomes 502 or 504).
    pub status: Option<u16>,
    pub cache_control: Option<CacheControl>,
    /// Re-send the request to the secondary: [`Exchange::replay`] says how.
    pub fail_over: bool,
    /// The `x-origin-error` value, when something went wrong.
    pub origin_error: Option<OriginError>,
}

/// The request re-sent to the secondary origin.
#[derive(Debug)]
pub struct ReplayRequest<'a> {
    pub target: OriginTarget<'a>,
    saved: &'a [(String, String)],
    pub body: Option<&'a [u8]>,
    pub timeout: Duration,
}

impl ReplayRequest<'_> {
    /// The viewer's headers as kept, minus what is per hop or the edge's own
    /// routing (`cluster_header`), with the secondary's Host and scheme.
    pub fn headers(&self, cluster_header: &str) -> Vec<(&str, &str)> {
        let mut headers: Vec<(&str, &str)> = self
            .saved
            .iter()
            .filter(|(n, _)| {
                !is_hop_by_hop(n)
                    && !matches!(n.as_str(), ":authority" | "host" | ":scheme")
                    && n != cluster_header
            })
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        headers.push((":authority", &self.target.authority));
        headers.push((":scheme", self.target.scheme.as_str()));
        headers
    }
}

/// The secondary's answer, as far as the proxy reports it.
#[derive(Debug, Clone, Copy, Default)]
pub struct SecondaryResponse<'a> {
    pub status: Option<u16>,
    /// The answer's headers; `None` when there were none at all.
    pub headers: Option<&'a [(String, String)]>,
    /// The body, read only when the proxy itself made the answer (see
    /// [`SecondaryResponse::made_by_proxy`]): it names why the origin was not reached.
    pub proxy_reply: Option<&'a [u8]>,
    pub body_bytes: usize,
    /// Since the secondary was asked.
    pub elapsed: Duration,
}

impl SecondaryResponse<'_> {
    /// An error status with none of the headers an upstream's answer carries:
    /// the proxy answered because it could not get one.
    pub fn made_by_proxy(status: Option<u16>, headers: &[(String, String)]) -> bool {
        status.is_some_and(|s| s >= 500) && !headers.iter().any(|(n, _)| n == UPSTREAM_SERVICE_TIME)
    }
}

/// What the filter answers after the secondary responded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecondaryVerdict {
    /// Relay the secondary's answer with these edits.
    Relay {
        status: u16,
        cache_control: Option<CacheControl>,
        origin_error: OriginError,
        /// `x-origin-decision` for the secondary, when the settings ask for it.
        decision_header: Option<String>,
    },
    /// Answer locally: the secondary failed too.
    Fail {
        status: u16,
        origin_error: OriginError,
    },
}

/// Per-request limits, copied from the settings the request started with.
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_replay_body_bytes: u32,
    max_secondary_response_bytes: u32,
    decision_header: bool,
}

/// One request's exchange with the origins.
#[derive(Debug)]
pub struct Exchange {
    policy: Arc<CompiledPolicy>,
    viewer_host: String,
    choice: Choice,
    method: String,
    limits: Limits,
    /// Known when the request is decided; asked again when its headers are kept.
    may_fail_over: bool,
    replay: Option<Replay>,
    error: Option<OriginError>,
}

impl Exchange {
    /// Decides the request. `Err` when the policy has no route for it.
    pub fn begin<'a>(
        found: DomainMatch<'a>,
        request: &ViewerRequest<'_>,
        settings: &Settings,
    ) -> Result<Exchange, Refusal<'a>> {
        let choice = found.choose(request, settings);
        let policy: &'a Arc<CompiledPolicy> = found.policy;
        let may_fail_over = match policy.decision(Cow::Borrowed(&found.viewer_host), choice) {
            Some(d) => matches!(d.failover, Failover::Plan(_)),
            None => {
                return Err(Refusal::NoRoute {
                    domain: &policy.name,
                })
            }
        };
        Ok(Exchange {
            policy: Arc::clone(policy),
            viewer_host: found.viewer_host.into_owned(),
            choice,
            method: request.method.to_owned(),
            limits: Limits {
                max_replay_body_bytes: settings.max_replay_body_bytes,
                max_secondary_response_bytes: settings.max_secondary_response_bytes,
                decision_header: settings.decision_header,
            },
            may_fail_over,
            replay: None,
            error: None,
        })
    }

    /// What was decided. `begin` made sure there is a decision, so `None`
    /// cannot happen; callers treat it as "nothing to do".
    pub fn decision(&self) -> Option<OriginDecision<'_>> {
        self.policy
            .decision(Cow::Borrowed(&self.viewer_host), self.choice)
    }

    pub fn domain(&self) -> &str {
        &self.policy.name
    }

    /// Whether the request must be kept for a replay: only when a failover is possible.
    pub fn may_fail_over(&self) -> bool {
        self.may_fail_over
    }

    /// Keeps the request headers for a replay.
    pub fn keep_for_replay(&mut self, headers: Vec<(String, String)>) {
        self.replay = Some(Replay {
            headers,
            ..Replay::default()
        });
    }

    /// Whether a request body chunk of `len` bytes should be read and kept. A
    /// body over the limit is dropped whole and the request will not fail over.
    pub fn wants_body_chunk(&mut self, len: usize) -> bool {
        let limit = self.limits.max_replay_body_bytes as usize;
        match &mut self.replay {
            Some(r) if !r.over_limit && len > 0 => {
                if r.body.len() + len > limit {
                    r.over_limit = true;
                    r.body = Vec::new();
                    false
                } else {
                    true
                }
            }
            _ => false,
        }
    }

    pub fn keep_body_chunk(&mut self, chunk: &[u8]) {
        if let Some(r) = &mut self.replay {
            r.body.extend_from_slice(chunk);
        }
    }

    /// The primary answered `status`; `failure` when the proxy made that
    /// answer because the origin could not be fetched.
    pub fn on_primary_response(
        &mut self,
        status: u16,
        failure: Option<FetchFailure<'_>>,
    ) -> PrimaryVerdict {
        let Some(decision) = self.decision() else {
            return PrimaryVerdict {
                status: None,
                cache_control: None,
                fail_over: false,
                origin_error: None,
            };
        };
        let plan = decision.on_primary_response(status, failure);
        let mut fail_over = false;
        // A rule may fail over on a 4xx too: that answer is then a failure.
        let primary = plan.primary_failure.or_else(|| {
            (plan.failover != FailoverAction::None).then_some(PrimaryFailure::Answered(status))
        });
        let error = primary.map(|primary| {
            let mut error = OriginError::new(primary);
            error.failover = match (plan.failover, &self.replay) {
                (FailoverAction::Retry, Some(r)) if r.over_limit => {
                    FailoverOutcome::SkippedForBodySize {
                        limit: self.limits.max_replay_body_bytes,
                    }
                }
                (FailoverAction::Retry, Some(_)) => {
                    fail_over = true;
                    FailoverOutcome::None
                }
                (FailoverAction::Retry, None) => FailoverOutcome::SkippedNotKept,
                (FailoverAction::SkippedForMethod, _) => {
                    FailoverOutcome::SkippedForMethod(header_text(&self.method))
                }
                (FailoverAction::None, _) => FailoverOutcome::None,
            };
            error
        });
        self.error.clone_from(&error);
        PrimaryVerdict {
            status: plan.status,
            cache_control: plan.cache_control,
            fail_over,
            origin_error: error,
        }
    }

    /// The request to re-send to the secondary, after a verdict that says to.
    pub fn replay(&self) -> Option<ReplayRequest<'_>> {
        let Some(Failover::Plan(plan)) = self.decision().map(|d| d.failover) else {
            return None;
        };
        let replay = self.replay.as_ref()?;
        Some(ReplayRequest {
            timeout: Duration::from_millis(u64::from(plan.rule.timeout_ms)),
            target: plan.target,
            saved: &replay.headers,
            body: (!replay.body.is_empty()).then_some(replay.body.as_slice()),
        })
    }

    /// The replayed request left for the secondary: the request body is no longer needed.
    pub fn failover_started(&mut self) {
        self.replay = None;
        if let Some(e) = &mut self.error {
            e.failover = FailoverOutcome::Secondary(None);
        }
    }

    /// The secondary could not be asked at all. Returns the header value to send.
    pub fn failover_not_sent(&mut self, cluster: &str, why: String) -> Option<&OriginError> {
        let e = self.error.as_mut()?;
        e.failover = FailoverOutcome::DispatchFailed {
            cluster: cluster.to_owned(),
            why,
        };
        Some(e)
    }

    /// Classifies the secondary's answer; `None` when no failover was started.
    pub fn on_secondary_response(
        &mut self,
        answer: SecondaryResponse<'_>,
    ) -> Option<SecondaryVerdict> {
        let mut error = self.error.take()?;
        let timeout_ms = match self.decision().map(|d| d.failover) {
            Some(Failover::Plan(p)) => p.rule.timeout_ms,
            _ => 0,
        };
        // The host answers a call it timed out with a 504 or nothing; its timer
        // can fire a little before the clock shows the full timeout.
        let timeout = Duration::from_millis(u64::from(timeout_ms));
        let timed_out = answer.elapsed >= timeout - timeout / 20;
        let by_proxy = answer
            .headers
            .is_some_and(|h| SecondaryResponse::made_by_proxy(answer.status, h));
        let limit = self.limits.max_secondary_response_bytes;
        let failure = match answer.status {
            None if timed_out => Some(SecondaryFailure::Timeout),
            None => Some(SecondaryFailure::Connect(None)),
            Some(504) if timed_out || by_proxy => Some(SecondaryFailure::Timeout),
            Some(_) if by_proxy => match answer.proxy_reply.and_then(connect_reason) {
                Some(reason) => Some(SecondaryFailure::Connect(Some(reason))),
                None => answer.status.map(SecondaryFailure::Answered),
            },
            Some(s) if s >= 500 => Some(SecondaryFailure::Answered(s)),
            Some(_) if answer.body_bytes > limit as usize => Some(SecondaryFailure::BodyTooLarge {
                bytes: answer.body_bytes,
                limit,
            }),
            Some(_) => None,
        };
        error.failover = FailoverOutcome::Secondary(failure.clone());
        if let Some(failure) = failure {
            return Some(SecondaryVerdict::Fail {
                status: failure.status(),
                origin_error: error,
            });
        }
        let status = answer.status.unwrap_or(502);
        let decision = self.decision();
        let cache_control = decision
            .as_ref()
            .and_then(|d| d.policy.cache_override(status))
            .map(|c| c.cache_control);
        let decision_header = match decision.map(|d| d.failover) {
            Some(Failover::Plan(p)) if self.limits.decision_header => {
                Some(p.target.header_value(&self.policy.name))
            }
            _ => None,
        };
        Some(SecondaryVerdict::Relay {
            status,
            cache_control,
            origin_error: error,
            decision_header,
        })
    }
}

/// The secondary's answer headers that the viewer gets: no pseudo-headers,
/// nothing hop-by-hop, no diagnostic header of the origin's own, and not the
/// origin's `cache-control` when a rule replaces it.
pub fn relayed_headers(
    headers: &[(String, String)],
    replaced_cache_control: bool,
) -> impl Iterator<Item = (&str, &str)> {
    headers
        .iter()
        .filter(move |(n, _)| {
            !n.starts_with(':')
                && !is_hop_by_hop(n)
                && n != ORIGIN_ERROR_HEADER
                && n != DECISION_HEADER
                && !(replaced_cache_control && n == "cache-control")
        })
        .map(|(n, v)| (n.as_str(), v.as_str()))
}

/// The reason in Envoy's reply for an upstream it could not reach, as
/// printable ASCII (it ends up in a header).
fn connect_reason(body: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let rest = text.strip_prefix(PROXY_CONNECT_ERROR)?;
    let reason = rest
        .split("reset reason: ")
        .nth(1)
        .unwrap_or("")
        .split(',')
        .next()
        .unwrap_or("")
        .trim();
    (!reason.is_empty()).then(|| header_text(reason))
}
