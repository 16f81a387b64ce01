//! The proxy-wasm glue: parse and swap policies in the root context, apply
//! decisions in the HTTP context. All policy logic lives in `origin_policy_engine`.
// Host calls exist only in the proxy-wasm build; natively this crate is empty.
#![cfg(all(target_arch = "wasm32", target_os = "wasi"))]

mod host_state;
mod metrics;

use host_state::{
    set_filter_state, DYNAMIC_HOST, DYNAMIC_PORT, UPSTREAM_SERVER_NAME, UPSTREAM_SUBJECT_ALT_NAMES,
};
use log::{debug, error, info, warn};
use metrics::{Counter, Metrics};
use origin_policy_engine::{
    Failover, FailoverAction, FailoverPlan, FetchFailure, JsonError, Outcome, OwnedViewerRequest,
    PolicySet, Scheme, UnknownDomain, MAX_JSON_BYTES,
};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

/// Response header naming why an origin fetch failed or failed over.
pub const ORIGIN_ERROR_HEADER: &str = "x-origin-error";
/// Response header naming the origin, scheme, port, Host and SNI used.
pub const DECISION_HEADER: &str = "x-origin-decision";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(OriginPolicyRoot::default()) });
}}

thread_local! {
    /// The policies last applied per plugin in this VM. Envoy configures a
    /// changed plugin in a fresh root context, which must still be able to keep
    /// a rejected domain on its last good policy.
    static LAST_GOOD: RefCell<HashMap<String, Rc<PolicySet>>> = RefCell::default();
}

fn last_good(plugin: &str) -> Option<Rc<PolicySet>> {
    LAST_GOOD.with(|m| m.borrow().get(plugin).cloned())
}

fn plugin_root_id() -> String {
    hostcalls::get_property(vec!["plugin_root_id"])
        .ok()
        .flatten()
        .and_then(|b| String::from_utf8(b).ok())
        .unwrap_or_default()
}

#[derive(Default)]
struct OriginPolicyRoot {
    policies: Option<Rc<PolicySet>>,
    metrics: Option<Rc<Metrics>>,
}

impl Context for OriginPolicyRoot {}

impl RootContext for OriginPolicyRoot {
    fn on_configure(&mut self, size: usize) -> bool {
        let metrics = Rc::clone(
            self.metrics
                .get_or_insert_with(|| Rc::new(Metrics::define())),
        );
        if size > MAX_JSON_BYTES {
            // Refused before it is copied into the VM.
            error!(
                "plugin configuration rejected: {}",
                JsonError::TooLarge { bytes: size }
            );
            metrics.bump(Counter::ConfigRejected);
            return false;
        }
        let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size) {
            Ok(Some(b)) => b,
            Ok(None) | Err(_) => {
                error!("plugin configuration rejected: no configuration was given");
                metrics.bump(Counter::ConfigRejected);
                return false;
            }
        };
        let plugin = plugin_root_id();
        // The plugin's newest applied set, whichever root context applied it.
        let previous = last_good(&plugin);
        let compiled = match PolicySet::from_plugin_config(&bytes, previous.as_deref()) {
            Ok(c) => c,
            Err(e) => {
                // Returning false makes Envoy keep serving the previous configuration.
                error!("{e}");
                metrics.bump(Counter::ConfigRejected);
                return false;
            }
        };
        for d in compiled.diagnostics.errors() {
            error!("policy rejected: {d}");
        }
        for d in compiled.diagnostics.warnings() {
            warn!("{d}");
        }
        for domain in &compiled.kept_previous {
            warn!("{domain}: keeping the last good policy");
        }
        metrics.add(Counter::PolicyRejected, compiled.rejected as u64);
        metrics.bump(Counter::ConfigApplied);
        info!(
            "origin policies loaded: {} domains ({} rejected)",
            compiled.set.index.len(),
            compiled.rejected
        );
        let set = Rc::new(compiled.set);
        LAST_GOOD.with(|m| m.borrow_mut().insert(plugin, Rc::clone(&set)));
        self.policies = Some(set);
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let policies = Rc::clone(self.policies.as_ref()?);
        let metrics = Rc::clone(self.metrics.as_ref()?);
        Some(Box::new(OriginFetch::new(policies, metrics)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

enum Phase {
    /// Headers not seen yet, or the request is not ours to touch.
    Idle,
    /// Sent to the primary origin with a policy decision.
    ToPrimary,
    /// The primary failed; the request was re-sent to the secondary.
    ToSecondary {
        token: u32,
        started: SystemTime,
        timeout_ms: u32,
        primary_error: String,
    },
    /// A local reply is on its way; it passes through this filter again untouched.
    Answered,
}

struct OriginFetch {
    /// The policy snapshot this request started with: a swap mid-flight does not change it.
    policies: Rc<PolicySet>,
    metrics: Rc<Metrics>,
    /// The request facts, kept so that later phases re-derive the same decision
    /// from the same policy snapshot.
    viewer: Rc<OwnedViewerRequest>,
    phase: Phase,
    /// Request headers and body kept for a failover replay, only when one is possible.
    replay_headers: Option<Vec<(String, String)>>,
    replay_body: Vec<u8>,
    replay_body_too_large: bool,
}

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

fn local_reply(status: u32, headers: Vec<(&str, &str)>, body: &[u8]) {
    if let Err(e) = hostcalls::send_http_response(status, headers, Some(body)) {
        error!("could not send a local reply: {e:?}");
    }
}

impl OriginFetch {
    fn new(policies: Rc<PolicySet>, metrics: Rc<Metrics>) -> Self {
        OriginFetch {
            policies,
            metrics,
            viewer: Rc::new(OwnedViewerRequest::default()),
            phase: Phase::Idle,
            replay_headers: None,
            replay_body: Vec::new(),
            replay_body_too_large: false,
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

    fn apply_request(&mut self, mut headers: Vec<(String, String)>) -> Action {
        let mut authority: Option<String> = None;
        let mut conflicting_host = false;
        let mut forged_diagnostics = false;
        let mut facts = OwnedViewerRequest::default();
        // `:authority`, `host` and `:scheme` are never replayed (a failover sets
        // its own), so their values are moved out rather than copied.
        for (name, value) in headers.iter_mut() {
            match name.as_str() {
                ":authority" | "host" => match &authority {
                    // RFC 9112 3.2: more than one Host, or one that disagrees
                    // with the request target, is a 400; picking one would let
                    // a viewer steer the edge and the origin differently.
                    Some(seen) if !seen.eq_ignore_ascii_case(value) => conflicting_host = true,
                    Some(_) => {}
                    None => authority = Some(std::mem::take(value)),
                },
                ":scheme" => facts.scheme = Some(std::mem::take(value)),
                ":method" => facts.method = value.clone(),
                "x-forwarded-proto" => facts.x_forwarded_proto = Some(value.clone()),
                ORIGIN_ERROR_HEADER | DECISION_HEADER => forged_diagnostics = true,
                _ => {}
            }
        }
        if forged_diagnostics {
            // The diagnostic headers are the edge's word; a viewer's copy is
            // dropped before it can reach the origin, a log or a replay.
            headers.retain(|(n, _)| n != ORIGIN_ERROR_HEADER && n != DECISION_HEADER);
            for name in [ORIGIN_ERROR_HEADER, DECISION_HEADER] {
                let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name);
            }
        }
        if conflicting_host {
            self.metrics.bump(Counter::BadHost);
            return self.answer(400, "bad host: conflicting Host values");
        }
        facts.authority = authority.unwrap_or_default();
        self.viewer = Rc::new(facts);
        let viewer = Rc::clone(&self.viewer);
        let policies = Rc::clone(&self.policies);
        let settings = &policies.settings;
        let cluster_header = settings.cluster_header.as_str();
        let outcome = policies.decide(&viewer.as_request());
        let decision = match outcome {
            Outcome::Origin(d) => d,
            Outcome::UnknownDomain { viewer_host } => {
                self.metrics.bump(Counter::UnknownDomain);
                return match settings.unknown_domain {
                    UnknownDomain::PassThrough => {
                        // Never let a viewer pick the cluster.
                        if headers.iter().any(|(n, _)| n == cluster_header) {
                            let _ = hostcalls::remove_map_value(
                                MapType::HttpRequestHeaders,
                                cluster_header,
                            );
                        }
                        debug!("{viewer_host}: no policy, passing through");
                        Action::Continue
                    }
                    UnknownDomain::LocalReply { status } => self.answer(
                        u32::from(status),
                        &format!("no origin policy for host {viewer_host}"),
                    ),
                };
            }
            Outcome::BadHost(e) => {
                self.metrics.bump(Counter::BadHost);
                return self.answer(400, &format!("bad host: {e}"));
            }
            Outcome::NoRoute { domain } => {
                return self.answer(
                    502,
                    &format!("{domain}: policy has no route for this request"),
                );
            }
        };
        self.metrics.bump(Counter::Decided);
        let t = &decision.target;
        let edits = [
            (cluster_header, Some(t.cluster)),
            (
                ":scheme",
                (viewer.scheme.as_deref() != Some(t.scheme.as_str())).then_some(t.scheme.as_str()),
            ),
            (
                ":authority",
                (viewer.authority != t.authority).then_some(t.authority.as_ref()),
            ),
        ];
        for (name, value) in edits {
            if let Some(value) = value {
                if let Err(e) =
                    hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value))
                {
                    return self.answer(500, &format!("could not set {name}: {e:?}"));
                }
            }
        }
        let port;
        let mut state: [Option<(&str, &str)>; 4] = [None; 4];
        if let Some(host) = t.dynamic_host {
            port = t.port.to_string();
            state[0] = Some((DYNAMIC_HOST, host));
            state[1] = Some((DYNAMIC_PORT, &port));
        }
        if let (Scheme::Https, Some(sni)) = (t.scheme, &t.sni) {
            state[2] = Some((UPSTREAM_SERVER_NAME, sni));
            state[3] = Some((UPSTREAM_SUBJECT_ALT_NAMES, sni));
        }
        for (key, value) in state.into_iter().flatten() {
            if let Err(e) = set_filter_state(key, value) {
                return self.answer(500, &format!("could not set filter state {key}: {e:?}"));
            }
        }
        debug!("{}: {}", decision.policy.name, decision.header_value());
        self.phase = Phase::ToPrimary;
        if matches!(decision.failover, Failover::Plan(_)) {
            self.replay_headers = Some(headers);
        }
        Action::Continue
    }

    fn fail_over(
        &mut self,
        domain: &str,
        plan: &FailoverPlan<'_>,
        status: u16,
        primary_error: String,
    ) -> Result<(), String> {
        if self.replay_body_too_large {
            return Err(format!(
                "failover=skipped (request body over {} bytes)",
                self.policies.settings.max_replay_body_bytes
            ));
        }
        let Some(saved) = self.replay_headers.take() else {
            return Err("failover=skipped (request not kept)".to_owned());
        };
        let t = &plan.target;
        let cluster_header = self.policies.settings.cluster_header.as_str();
        let mut headers: Vec<(&str, &str)> = saved
            .iter()
            .filter(|(n, _)| {
                !is_hop_by_hop(n)
                    && !matches!(n.as_str(), ":authority" | "host" | ":scheme")
                    && n != cluster_header
            })
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        headers.push((":authority", &t.authority));
        headers.push((":scheme", t.scheme.as_str()));
        let body = (!self.replay_body.is_empty()).then_some(self.replay_body.as_slice());
        let timeout = Duration::from_millis(u64::from(plan.timeout_ms));
        let token = hostcalls::dispatch_http_call(t.cluster, headers, body, vec![], timeout)
            .map_err(|e| {
                format!(
                    "failover=failed (could not reach cluster {}: {e:?})",
                    t.cluster
                )
            })?;
        info!(
            "{domain}: primary answered {status}, failing over to {}",
            t.cluster
        );
        self.metrics.bump(Counter::FailoverStarted);
        self.phase = Phase::ToSecondary {
            token,
            started: hostcalls::get_current_time().unwrap_or(SystemTime::UNIX_EPOCH),
            timeout_ms: plan.timeout_ms,
            primary_error,
        };
        Ok(())
    }

    fn deliver_secondary(&mut self, num_headers: usize, body_size: usize) {
        let Phase::ToSecondary {
            started,
            timeout_ms,
            primary_error,
            ..
        } = std::mem::replace(&mut self.phase, Phase::Answered)
        else {
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
        let elapsed = hostcalls::get_current_time()
            .ok()
            .and_then(|now| now.duration_since(started).ok())
            .unwrap_or_default();
        // The host answers a call it timed out with a 504 or nothing; its timer
        // can fire a little before the clock shows the full timeout.
        let timeout = Duration::from_millis(u64::from(timeout_ms));
        let timed_out = elapsed >= timeout - timeout / 20;
        let limit = self.policies.settings.max_secondary_response_bytes as usize;
        let failure = match status {
            None if timed_out => Some((504, "secondary timeout".to_owned())),
            None => Some((502, "secondary connect failure".to_owned())),
            Some(504) if timed_out => Some((504, "secondary timeout".to_owned())),
            Some(s) if s >= 500 => Some((502, format!("secondary response {s} error"))),
            Some(_) if body_size > limit => Some((
                502,
                format!(
                    "secondary response body of {body_size} bytes is over the {limit}-byte limit"
                ),
            )),
            Some(_) => None,
        };
        if let Some((code, cause)) = failure {
            let counter = if code == 504 {
                Counter::FailoverSecondaryTimeout
            } else {
                Counter::FailoverSecondaryFailed
            };
            self.metrics.bump(counter);
            warn!("{}: {primary_error}; {cause}", self.viewer.authority);
            self.answer(
                code,
                &format!("{primary_error}; failover=secondary; {cause}"),
            );
            return;
        }
        let status = status.unwrap_or(502);
        self.metrics.bump(Counter::FailoverSucceeded);
        let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        let policies = Rc::clone(&self.policies);
        let viewer = Rc::clone(&self.viewer);
        let Outcome::Origin(decision) = policies.decide(&viewer.as_request()) else {
            return;
        };
        let error = format!("{primary_error}; failover=secondary");
        let plan = decision.on_primary_response(status, None);
        let mut out: Vec<(&str, &str)> = headers
            .iter()
            .filter(|(n, _)| {
                !n.starts_with(':')
                    && !is_hop_by_hop(n)
                    && n != ORIGIN_ERROR_HEADER
                    && n != DECISION_HEADER
                    && !(plan.cache_control.is_some() && n == "cache-control")
            })
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        out.push((ORIGIN_ERROR_HEADER, &error));
        if let Some(cc) = plan.cache_control {
            out.push(("cache-control", cc));
        }
        let explained;
        if let (true, Failover::Plan(p)) = (policies.settings.decision_header, &decision.failover) {
            explained = p.target.header_value(&decision.policy.name);
            out.push((DECISION_HEADER, &explained));
        }
        local_reply(u32::from(status), out, &body);
    }
}

impl Context for OriginFetch {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        if matches!(self.phase, Phase::ToSecondary { token, .. } if token == token_id) {
            self.deliver_secondary(num_headers, body_size);
        }
    }
}

impl HttpContext for OriginFetch {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        match hostcalls::get_map(MapType::HttpRequestHeaders) {
            Ok(headers) => self.apply_request(headers),
            Err(e) => self.answer(500, &format!("could not read request headers: {e:?}")),
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        if self.replay_headers.is_none() || self.replay_body_too_large || body_size == 0 {
            return Action::Continue;
        }
        let limit = self.policies.settings.max_replay_body_bytes as usize;
        if self.replay_body.len() + body_size > limit {
            self.replay_body_too_large = true;
            self.replay_body = Vec::new();
            return Action::Continue;
        }
        if let Ok(Some(chunk)) = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size) {
            self.replay_body.extend_from_slice(&chunk);
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if !matches!(self.phase, Phase::ToPrimary) {
            return Action::Continue;
        }
        // Only `:status` is read: every value fetched costs the host a call back
        // into the VM to allocate it, the largest share of this callback.
        let status = hostcalls::get_map_value(MapType::HttpResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|v| v.parse::<u16>().ok());
        let Some(status) = status else {
            return Action::Continue;
        };
        let policies = Rc::clone(&self.policies);
        let viewer = Rc::clone(&self.viewer);
        let Outcome::Origin(decision) = policies.decide(&viewer.as_request()) else {
            return Action::Continue;
        };
        // Only a 5xx can be the proxy's stand-in for an origin that never
        // answered; asking costs a host call, so only then.
        let details = if status >= 500 {
            hostcalls::get_property(vec!["response", "code_details"])
                .ok()
                .flatten()
                .and_then(|b| String::from_utf8(b).ok())
        } else {
            None
        };
        let failure = details.as_deref().and_then(FetchFailure::from_code_details);
        let plan = decision.on_primary_response(status, failure);
        let status = plan.status.unwrap_or(status);
        let mut origin_error = plan.origin_error.clone();
        if let Some(primary_error) = &plan.origin_error {
            self.metrics.bump(if failure.is_some() {
                Counter::OriginUnreachable
            } else {
                Counter::Origin5xx
            });
            match (plan.failover, &decision.failover) {
                (FailoverAction::Retry, Failover::Plan(failover)) => {
                    let domain = decision.policy.name.as_str();
                    match self.fail_over(domain, failover, status, primary_error.clone()) {
                        Ok(()) => return Action::Pause,
                        Err(why) => {
                            self.metrics.bump(Counter::FailoverSkipped);
                            origin_error = Some(format!("{primary_error}; {why}"));
                        }
                    }
                }
                (FailoverAction::SkippedForMethod, _) => {
                    origin_error = Some(format!(
                        "{primary_error}; failover=skipped (method {})",
                        viewer.method
                    ));
                }
                _ => {}
            }
        }
        if let Some(replaced) = plan.status {
            let _ = hostcalls::set_map_value(
                MapType::HttpResponseHeaders,
                ":status",
                Some(&replaced.to_string()),
            );
        }
        if let Some(cc) = plan.cache_control {
            let _ =
                hostcalls::set_map_value(MapType::HttpResponseHeaders, "cache-control", Some(cc));
            self.metrics.bump(if status == 301 || status == 302 {
                Counter::RedirectUncacheable
            } else {
                Counter::CacheOverridden
            });
        }
        // Set or removed, never read: the origin's own copy is never passed on.
        let _ = hostcalls::set_map_value(
            MapType::HttpResponseHeaders,
            ORIGIN_ERROR_HEADER,
            origin_error.as_deref(),
        );
        if policies.settings.decision_header {
            let _ = hostcalls::set_map_value(
                MapType::HttpResponseHeaders,
                DECISION_HEADER,
                Some(&decision.header_value()),
            );
        }
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
