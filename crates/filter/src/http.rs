//! One HTTP context per stream: reads what the engine needs from Envoy, asks
//! the stream's [`Exchange`], and writes back what it decided.

use crate::filter_state::{
    set_filter_state, DYNAMIC_HOST, DYNAMIC_PORT, UPSTREAM_SERVER_NAME, UPSTREAM_SUBJECT_ALT_NAMES,
};
use crate::metrics::{Counter, Metrics};
use log::{debug, error, info, warn};
use origin_policy_engine::host::HostError;
use origin_policy_engine::{
    relayed_headers, scheme_from_text, Exchange, FailoverOutcome, FetchFailure, OriginError,
    OriginTarget, PolicySet, PrimaryFailure, PrimaryVerdict, Refusal, Scheme, SecondaryFailure,
    SecondaryResponse, SecondaryVerdict, UnknownDomain, ViewerRequest, DECISION_HEADER,
    ORIGIN_ERROR_HEADER,
};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, MapType};
use std::rc::Rc;
use std::time::SystemTime;

/// How much of the proxy's own reply is read to learn why it could not reach
/// the secondary: the reason sits in its first line.
const PROXY_REPLY_BYTES: usize = 512;

enum Phase {
    /// Headers not seen yet, or the request is not ours to touch.
    Idle,
    /// Sent to the primary origin with a policy decision.
    ToPrimary,
    /// The primary failed; the request was re-sent to the secondary.
    ToSecondary { token: u32, started: SystemTime },
    /// A local reply is on its way; it passes through this filter again untouched.
    Answered,
}

/// The request headers the decision reads, borrowed from the header map.
#[derive(Default)]
struct ViewerHeaders<'h> {
    authority: Option<&'h str>,
    conflicting_host: bool,
    scheme: Option<&'h str>,
    method: &'h str,
    x_forwarded_proto: Option<&'h str>,
    forged_diagnostics: bool,
    cluster_header: bool,
}

impl<'h> ViewerHeaders<'h> {
    fn read(headers: &'h [(String, String)], cluster_header: &str) -> Self {
        let mut v = ViewerHeaders::default();
        for (name, value) in headers {
            match name.as_str() {
                ":authority" | "host" => match v.authority {
                    // RFC 9112 3.2: more than one Host, or one that disagrees
                    // with the request target, is a 400; picking one would let
                    // a viewer steer the edge and the origin differently.
                    Some(seen) if !seen.eq_ignore_ascii_case(value) => v.conflicting_host = true,
                    Some(_) => {}
                    None => v.authority = Some(value),
                },
                ":scheme" => v.scheme = Some(value),
                ":method" => v.method = value,
                "x-forwarded-proto" => v.x_forwarded_proto = Some(value),
                ORIGIN_ERROR_HEADER | DECISION_HEADER => v.forged_diagnostics = true,
                n if n == cluster_header => v.cluster_header = true,
                _ => {}
            }
        }
        v
    }
}

/// The viewer's connection to this listener: TLS or not. Envoy answers the
/// property only for a TLS connection; nothing a viewer sends can change it.
fn viewer_connection() -> Scheme {
    match hostcalls::get_property(vec!["connection", "tls_version"]) {
        Ok(Some(v)) if !v.is_empty() => Scheme::Https,
        _ => Scheme::Http,
    }
}

fn local_reply(status: u32, headers: Vec<(&str, &str)>, body: &[u8]) {
    if let Err(e) = hostcalls::send_http_response(status, headers, Some(body)) {
        error!("could not send a local reply: {e:?}");
    }
}

fn set_request_header(name: &str, value: Option<&str>) -> Result<(), String> {
    hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value)
        .map_err(|e| format!("could not set {name}: {e:?}"))
}

/// Writes only what changes: the cluster header always (a viewer never picks
/// the cluster), `:scheme` and `:authority` when they differ, and the filter
/// state the dynamic forward proxy and the TLS handshake read.
fn route_to(
    t: &OriginTarget<'_>,
    cluster_header: &str,
    viewer: &ViewerHeaders<'_>,
) -> Result<(), String> {
    set_request_header(cluster_header, Some(t.cluster))?;
    if viewer.scheme != Some(t.scheme.as_str()) {
        set_request_header(":scheme", Some(t.scheme.as_str()))?;
    }
    if viewer.authority != Some(t.authority.as_ref()) {
        set_request_header(":authority", Some(&t.authority))?;
    }
    if let Some(host) = t.dynamic_host {
        set_filter_state(DYNAMIC_HOST, host)?;
        set_filter_state(DYNAMIC_PORT, &t.port.to_string())?;
    }
    if let (Scheme::Https, Some(sni)) = (t.scheme, &t.sni) {
        set_filter_state(UPSTREAM_SERVER_NAME, sni)?;
        set_filter_state(UPSTREAM_SUBJECT_ALT_NAMES, sni)?;
    }
    Ok(())
}

pub(crate) struct OriginFetch {
    /// The policy set this request started with: a swap mid-flight does not change it.
    policies: Rc<PolicySet>,
    metrics: Rc<Metrics>,
    exchange: Option<Exchange>,
    phase: Phase,
}

impl OriginFetch {
    pub(crate) fn new(policies: Rc<PolicySet>, metrics: Rc<Metrics>) -> Self {
        OriginFetch {
            policies,
            metrics,
            exchange: None,
            phase: Phase::Idle,
        }
    }

    fn answer(&mut self, status: u32, error: &str) -> Action {
        self.phase = Phase::Answered;
        let body = format!("{error}\n");
        local_reply(
            status,
            vec![(ORIGIN_ERROR_HEADER, error), ("content-type", "text/plain")],
            body.as_bytes(),
        );
        Action::Pause
    }

    fn refuse(&mut self, refusal: Refusal<'_>, viewer: &ViewerHeaders<'_>) -> Action {
        match refusal {
            Refusal::UnknownDomain { viewer_host } => {
                self.metrics.bump(Counter::UnknownDomain);
                match self.policies.settings.unknown_domain {
                    UnknownDomain::PassThrough => {
                        // Never let a viewer pick the cluster.
                        if viewer.cluster_header {
                            let _ =
                                set_request_header(&self.policies.settings.cluster_header, None);
                        }
                        debug!("{viewer_host}: no policy, passing through");
                        Action::Continue
                    }
                    UnknownDomain::LocalReply { status } => self.answer(
                        u32::from(status),
                        &format!("no origin policy for host {viewer_host}"),
                    ),
                }
            }
            Refusal::BadHost(e) => {
                self.metrics.bump(Counter::BadHost);
                self.answer(400, &format!("bad host: {e}"))
            }
            Refusal::NoRoute { domain } => self.answer(
                502,
                &format!("{domain}: policy has no route for this request"),
            ),
        }
    }

    /// Decides the request and writes the decision into it.
    fn apply_request(&mut self, headers: Vec<(String, String)>) -> Result<Action, String> {
        let policies = Rc::clone(&self.policies);
        let settings = &policies.settings;
        let viewer = ViewerHeaders::read(&headers, &settings.cluster_header);
        if viewer.forged_diagnostics {
            // The diagnostic headers are the edge's word; a viewer's copy is
            // dropped before it can reach the origin, a log or a replay.
            set_request_header(ORIGIN_ERROR_HEADER, None)?;
            set_request_header(DECISION_HEADER, None)?;
        }
        if viewer.conflicting_host {
            return Ok(self.refuse(Refusal::BadHost(HostError::Conflicting), &viewer));
        }
        let authority = viewer.authority.unwrap_or_default();
        let found = match policies.lookup(authority) {
            Ok(found) => found,
            Err(refusal) => return Ok(self.refuse(refusal, &viewer)),
        };
        // The connection is asked only when the decision depends on it.
        let trusted_header = settings.trust_x_forwarded_proto
            && viewer
                .x_forwarded_proto
                .and_then(scheme_from_text)
                .is_some();
        let request = ViewerRequest {
            authority,
            connection: (found.follows_viewer() && !trusted_header).then(viewer_connection),
            x_forwarded_proto: viewer.x_forwarded_proto,
            method: viewer.method,
        };
        let mut exchange = match Exchange::begin(found, &request, settings) {
            Ok(e) => e,
            Err(refusal) => return Ok(self.refuse(refusal, &viewer)),
        };
        let Some(decision) = exchange.decision() else {
            return Ok(Action::Continue);
        };
        self.metrics.bump(Counter::Decided);
        route_to(&decision.target, &settings.cluster_header, &viewer)?;
        debug!("{}: {}", decision.policy.name, decision.header_value());
        if exchange.may_fail_over() {
            exchange.keep_for_replay(headers);
        }
        self.exchange = Some(exchange);
        self.phase = Phase::ToPrimary;
        Ok(Action::Continue)
    }

    /// Re-sends the kept request to the secondary. `Err` carries the header
    /// value when it could not be sent.
    fn fail_over(&mut self) -> Result<(), Option<OriginError>> {
        let Some(exchange) = self.exchange.as_mut() else {
            return Err(None);
        };
        let sent = match exchange.replay() {
            Some(r) => {
                let headers = r.headers(&self.policies.settings.cluster_header);
                hostcalls::dispatch_http_call(r.target.cluster, headers, r.body, vec![], r.timeout)
                    .map_err(|e| (r.target.cluster.to_owned(), format!("{e:?}")))
            }
            None => return Err(None),
        };
        match sent {
            Ok(token) => {
                info!("{}: primary failed, failing over", exchange.domain());
                exchange.failover_started();
                self.metrics.bump(Counter::FailoverStarted);
                self.phase = Phase::ToSecondary {
                    token,
                    started: hostcalls::get_current_time().unwrap_or(SystemTime::UNIX_EPOCH),
                };
                Ok(())
            }
            Err((cluster, why)) => Err(exchange.failover_not_sent(&cluster, why).cloned()),
        }
    }

    fn deliver_secondary(&mut self, num_headers: usize, body_size: usize) {
        let Phase::ToSecondary { started, .. } =
            std::mem::replace(&mut self.phase, Phase::Answered)
        else {
            return;
        };
        let Some(exchange) = self.exchange.as_mut() else {
            return;
        };
        let headers = if num_headers > 0 {
            hostcalls::get_map(MapType::HttpCallResponseHeaders).unwrap_or_default()
        } else {
            Vec::new()
        };
        let status = headers
            .iter()
            .find(|(n, _)| n == ":status")
            .and_then(|(_, v)| v.parse::<u16>().ok());
        let proxy_reply = if SecondaryResponse::made_by_proxy(status, &headers) {
            let len = body_size.min(PROXY_REPLY_BYTES);
            hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, len)
                .ok()
                .flatten()
        } else {
            None
        };
        let elapsed = hostcalls::get_current_time()
            .ok()
            .and_then(|now| now.duration_since(started).ok())
            .unwrap_or_default();
        let verdict = exchange.on_secondary_response(SecondaryResponse {
            status,
            headers: (num_headers > 0).then_some(headers.as_slice()),
            proxy_reply: proxy_reply.as_deref(),
            body_bytes: body_size,
            elapsed,
        });
        match verdict {
            None => {}
            Some(SecondaryVerdict::Fail {
                status,
                origin_error,
            }) => {
                let counter = match origin_error.failover {
                    FailoverOutcome::Secondary(Some(SecondaryFailure::Timeout)) => {
                        Counter::FailoverSecondaryTimeout
                    }
                    _ => Counter::FailoverSecondaryFailed,
                };
                self.metrics.bump(counter);
                let header = origin_error.to_string();
                warn!("{}: {header}", exchange.domain());
                self.answer(u32::from(status), &header);
            }
            Some(SecondaryVerdict::Relay {
                status,
                cache_control,
                origin_error,
                decision_header,
            }) => {
                self.metrics.bump(Counter::FailoverSucceeded);
                let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
                    .ok()
                    .flatten()
                    .unwrap_or_default();
                let error = origin_error.to_string();
                let cache_control = cache_control.map(|c| c.to_string());
                let mut out: Vec<(&str, &str)> =
                    relayed_headers(&headers, cache_control.is_some()).collect();
                out.push((ORIGIN_ERROR_HEADER, &error));
                if let Some(cc) = &cache_control {
                    out.push(("cache-control", cc));
                }
                if let Some(d) = &decision_header {
                    out.push((DECISION_HEADER, d));
                }
                local_reply(u32::from(status), out, &body);
            }
        }
    }

    /// Writes the verdict on the primary's answer into its response headers.
    fn rewrite_primary_response(
        &self,
        status: u16,
        verdict: &PrimaryVerdict,
        origin_error: Option<&OriginError>,
    ) {
        let set = |name: &str, value: Option<&str>| {
            let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, value);
        };
        if let Some(replaced) = verdict.status {
            set(":status", Some(&replaced.to_string()));
        }
        if let Some(cc) = verdict.cache_control {
            set("cache-control", Some(&cc.to_string()));
            let effective = verdict.status.unwrap_or(status);
            self.metrics.bump(if effective == 301 || effective == 302 {
                Counter::RedirectUncacheable
            } else {
                Counter::CacheOverridden
            });
        }
        // Set or removed, never read: the origin's own copy is never passed on.
        set(
            ORIGIN_ERROR_HEADER,
            origin_error.map(ToString::to_string).as_deref(),
        );
        if self.policies.settings.decision_header {
            if let Some(d) = self.exchange.as_ref().and_then(Exchange::decision) {
                set(DECISION_HEADER, Some(&d.header_value()));
            }
        }
    }

    fn count_primary(&self, error: Option<&OriginError>) {
        let Some(error) = error else { return };
        match error.primary {
            PrimaryFailure::Unreachable(_) => self.metrics.bump(Counter::OriginUnreachable),
            PrimaryFailure::Answered(status) if status >= 500 => {
                self.metrics.bump(Counter::Origin5xx)
            }
            // A 4xx that a failover rule names.
            PrimaryFailure::Answered(_) => {}
        }
        if matches!(
            error.failover,
            FailoverOutcome::SkippedForMethod(_)
                | FailoverOutcome::SkippedForBodySize { .. }
                | FailoverOutcome::SkippedNotKept
                | FailoverOutcome::DispatchFailed { .. }
        ) {
            self.metrics.bump(Counter::FailoverSkipped);
        }
    }
}

impl Context for OriginFetch {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _: usize,
    ) {
        if matches!(self.phase, Phase::ToSecondary { token, .. } if token == token_id) {
            self.deliver_secondary(num_headers, body_size);
        }
    }
}

impl HttpContext for OriginFetch {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let applied = hostcalls::get_map(MapType::HttpRequestHeaders)
            .map_err(|e| format!("could not read request headers: {e:?}"))
            .and_then(|headers| self.apply_request(headers));
        match applied {
            Ok(action) => action,
            Err(why) => self.answer(500, &why),
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        if let Some(exchange) = self.exchange.as_mut() {
            if exchange.wants_body_chunk(body_size) {
                if let Ok(Some(chunk)) =
                    hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size)
                {
                    exchange.keep_body_chunk(&chunk);
                }
            }
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if !matches!(self.phase, Phase::ToPrimary) {
            return Action::Continue;
        }
        // Only `:status` is read: every value fetched costs the host a call back
        // into the VM to allocate it, the largest share of this callback.
        let Some(status) = hostcalls::get_map_value(MapType::HttpResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|v| v.parse::<u16>().ok())
        else {
            return Action::Continue;
        };
        // Only a 5xx can be the proxy's stand-in for an origin that never
        // answered; asking costs a host call, so only then.
        let details = (status >= 500)
            .then(|| {
                hostcalls::get_property(vec!["response", "code_details"])
                    .ok()
                    .flatten()
            })
            .flatten()
            .and_then(|b| String::from_utf8(b).ok());
        let failure = details.as_deref().and_then(FetchFailure::from_code_details);
        let Some(exchange) = self.exchange.as_mut() else {
            return Action::Continue;
        };
        let verdict = exchange.on_primary_response(status, failure);
        let mut origin_error = verdict.origin_error.clone();
        if verdict.fail_over {
            match self.fail_over() {
                Ok(()) => {
                    self.count_primary(origin_error.as_ref());
                    return Action::Pause;
                }
                Err(not_sent) => origin_error = not_sent.or(origin_error),
            }
        }
        self.count_primary(origin_error.as_ref());
        self.rewrite_primary_response(status, &verdict, origin_error.as_ref());
        Action::Continue
    }

    fn on_http_response_body(&mut self, _body_size: usize, _end_of_stream: bool) -> Action {
        // The primary's body is dropped once the secondary has been asked.
        if matches!(self.phase, Phase::ToSecondary { .. }) {
            Action::Pause
        } else {
            Action::Continue
        }
    }
}
