//! One HTTP context per stream: reads what the engine needs from Envoy, asks
//! the stream's [`Exchange`], and writes back what it decided. Envoy does the
//! fetching, the failover and the streaming; this context names the origin
//! and reads what came back.

use crate::foreign;
use crate::metrics::{Counter, Metrics};
use log::{debug, error};
use origin_policy_engine::feed::{DomainEntries, EntryError, EntryRead, CHANGES_KEY};
use origin_policy_engine::host::{normalize_authority, HostError};
use origin_policy_engine::{
    scheme_from_text, CompiledPolicy, Delivery, DomainMatch, Exchange, FailoverOutcome,
    FetchFailure, MatchKind, OriginError, PolicySet, PrimaryFailure, Refusal, ResponseVerdict,
    Scheme, SecondaryFailure, UnknownDomain, UpstreamReport, ViewerRequest, DECISION_HEADER,
    ORIGIN_ERROR_HEADER, ROUTER_CONTROL_HEADERS,
};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, MapType};
use std::borrow::Cow;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

thread_local! {
    /// This worker's compiled policies of `"delivery": "feed"`, kept across
    /// configurations: an entry compiles the same under any settings.
    static ENTRIES: RefCell<DomainEntries> = RefCell::default();
}

/// Forgets this worker's compiled entries: they were admitted under
/// settings that changed.
pub(crate) fn forget_entries() {
    ENTRIES.with(|entries| entries.borrow_mut().clear());
}

/// Reads the feed singleton's change count (when the singleton wakes this
/// worker, and on the root's tick): until it moves, a host looked up once is
/// answered without a shared-data read.
pub(crate) fn note_feed_changes() {
    let changes = shared_data(CHANGES_KEY);
    ENTRIES.with(|entries| {
        entries
            .borrow_mut()
            .note_changes(changes.as_ref().map(|(v, _)| v.as_slice()))
    });
}

/// The policy a request's host found, owned: from the configuration's index,
/// or compiled from the domain's feed entry.
struct FoundPolicy<'a> {
    policy: Arc<CompiledPolicy>,
    matched: MatchKind,
    viewer_host: Cow<'a, str>,
}

impl<'a> FoundPolicy<'a> {
    fn domain_match(&self) -> DomainMatch<'_> {
        DomainMatch {
            policy: &self.policy,
            matched: self.matched,
            viewer_host: Cow::Borrowed(&self.viewer_host),
        }
    }
}

/// Why a request found no policy.
enum NotFound<'a> {
    Refused(Refusal<'a>),
    /// Feed delivery only: no entry yet, or one that cannot be used.
    Unavailable(EntryError),
}

/// One shared-data key's value and CAS, if it has one.
pub(crate) fn shared_data(key: &str) -> EntryRead {
    match hostcalls::get_shared_data(key) {
        Ok((Some(value), Some(cas))) => Some((value, cas)),
        _ => None,
    }
}

/// The policy covering `authority`, as the configuration delivers policies.
fn find_policy<'a>(
    policies: &'a PolicySet,
    authority: &'a str,
) -> Result<FoundPolicy<'a>, NotFound<'a>> {
    if policies.delivery == Delivery::Inline {
        let found = policies.lookup(authority).map_err(NotFound::Refused)?;
        return Ok(FoundPolicy {
            policy: Arc::clone(found.policy),
            matched: found.matched,
            viewer_host: found.viewer_host,
        });
    }
    let host =
        normalize_authority(authority).map_err(|e| NotFound::Refused(Refusal::BadHost(e)))?;
    let found = ENTRIES
        .with(|entries| {
            entries
                .borrow_mut()
                .find(&host, &policies.settings, shared_data)
        })
        .map_err(NotFound::Unavailable)?;
    match found {
        Some((policy, matched)) => Ok(FoundPolicy {
            policy,
            matched,
            viewer_host: host,
        }),
        None => Err(NotFound::Refused(Refusal::UnknownDomain {
            viewer_host: host,
        })),
    }
}

/// The request headers the decision reads, borrowed from the header map.
#[derive(Default)]
struct ViewerHeaders<'h> {
    authority: Option<&'h str>,
    conflicting_host: bool,
    /// A Host that is not even UTF-8 (Envoy passes obs-text bytes through).
    unreadable_host: bool,
    method: &'h str,
    x_forwarded_proto: Option<&'h str>,
    content_length: Option<u64>,
    forged_diagnostics: bool,
    cluster_header: bool,
    /// The viewer sent a header that steers Envoy's router.
    router_control: bool,
}

impl<'h> ViewerHeaders<'h> {
    /// Values arrive as bytes: Envoy lets obs-text (RFC 9110 5.5) through,
    /// and a value that is not UTF-8 must not stop the filter. Only the
    /// values read here need to be text; the others are never looked at.
    fn read(headers: &'h [(String, Vec<u8>)], cluster_header: &str) -> Self {
        let mut v = ViewerHeaders::default();
        for (name, bytes) in headers {
            let Ok(value) = std::str::from_utf8(bytes) else {
                if matches!(name.as_str(), ":authority" | "host") {
                    v.unreadable_host = true;
                }
                continue;
            };
            match name.as_str() {
                ":authority" | "host" => match v.authority {
                    // RFC 9112 3.2: more than one Host, or one that disagrees
                    // with the request target, is a 400; picking one would let
                    // a viewer steer the edge and the origin differently.
                    Some(seen) if !seen.eq_ignore_ascii_case(value) => v.conflicting_host = true,
                    Some(_) => {}
                    None => v.authority = Some(value),
                },
                ":method" => v.method = value,
                "x-forwarded-proto" => v.x_forwarded_proto = Some(value),
                "content-length" => v.content_length = value.parse().ok(),
                ORIGIN_ERROR_HEADER | DECISION_HEADER => v.forged_diagnostics = true,
                n if n.starts_with("x-envoy-") && ROUTER_CONTROL_HEADERS.contains(&n) => {
                    v.router_control = true
                }
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

fn property(path: Vec<&str>) -> Option<Vec<u8>> {
    hostcalls::get_property(path).ok().flatten()
}

/// Envoy's attempt count arrives as a little-endian 64-bit integer.
fn attempt_count() -> u32 {
    property(vec!["upstream", "request_attempt_count"])
        .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
        .map_or(1, |b| {
            u32::try_from(u64::from_le_bytes(b)).unwrap_or(u32::MAX)
        })
}

/// Spreads requests over weighted primaries; quality does not matter, cost does.
fn spread() -> u32 {
    thread_local!(static STATE: std::cell::Cell<u32> = const { std::cell::Cell::new(0x9e37_79b9) });
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        s.set(x);
        x
    })
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

pub(crate) struct OriginFetch {
    /// The policy set this request started with: a swap mid-flight does not change it.
    policies: Rc<PolicySet>,
    metrics: Rc<Metrics>,
    exchange: Option<Exchange>,
}

impl OriginFetch {
    pub(crate) fn new(policies: Rc<PolicySet>, metrics: Rc<Metrics>) -> Self {
        OriginFetch {
            policies,
            metrics,
            exchange: None,
        }
    }

    fn answer(&mut self, status: u32, error: &str) -> Action {
        self.exchange = None;
        let body = format!("{error}\n");
        local_reply(
            status,
            vec![(ORIGIN_ERROR_HEADER, error), ("content-type", "text/plain")],
            body.as_bytes(),
        );
        Action::Pause
    }

    /// Feed delivery without a usable entry: 503, with why, and asked to
    /// come back (the first sync takes seconds).
    fn unavailable(&mut self, error: &EntryError) -> Action {
        self.metrics.bump(Counter::EntryUnavailable);
        let error = error.to_string();
        self.exchange = None;
        local_reply(
            503,
            vec![
                (ORIGIN_ERROR_HEADER, &error),
                ("retry-after", "1"),
                ("content-type", "text/plain"),
            ],
            format!("{error}\n").as_bytes(),
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
                &format!("{domain}: policy has no origin for this request"),
            ),
        }
    }

    /// Decides the request and writes the decision into it: the cluster
    /// header, and the retry and timeout headers Envoy's router reads.
    fn apply_request(&mut self, headers: Vec<(String, Vec<u8>)>) -> Result<Action, String> {
        let policies = Rc::clone(&self.policies);
        let settings = &policies.settings;
        let viewer = ViewerHeaders::read(&headers, &settings.cluster_header);
        if viewer.forged_diagnostics {
            // The diagnostic headers are the edge's word; a viewer's copy is
            // dropped before it can reach the origin or a log.
            set_request_header(ORIGIN_ERROR_HEADER, None)?;
            set_request_header(DECISION_HEADER, None)?;
        }
        if viewer.conflicting_host {
            return Ok(self.refuse(Refusal::BadHost(HostError::Conflicting), &viewer));
        }
        if viewer.unreadable_host {
            return Ok(self.refuse(Refusal::BadHost(HostError::NotAscii), &viewer));
        }
        let authority = viewer.authority.unwrap_or_default();
        let found = match find_policy(&policies, authority) {
            Ok(found) => found,
            Err(NotFound::Refused(refusal)) => return Ok(self.refuse(refusal, &viewer)),
            Err(NotFound::Unavailable(e)) => return Ok(self.unavailable(&e)),
        };
        let found = found.domain_match();
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
            body_bytes: viewer.content_length,
            spread: spread(),
        };
        self.route(found, &request, viewer.router_control)
    }

    /// Most policies decide on the host alone
    /// ([`DomainMatch::needs_only_the_host`]): then `:authority` is the only
    /// request header read, one host call that costs Envoy about half of
    /// reading the whole map (BENCHMARKS.md, "Host calls"). `None` when the
    /// request needs the full read: another kind of policy, or a host that is
    /// not readable or cannot name a domain (the full read says why).
    fn apply_by_host(&mut self) -> Option<Result<Action, String>> {
        let bytes = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, ":authority")
            .ok()
            .flatten()?;
        let authority = String::from_utf8(bytes).ok()?;
        let policies = Rc::clone(&self.policies);
        let found = find_policy(&policies, &authority);
        match found.as_ref().map(FoundPolicy::domain_match) {
            Ok(found) if found.needs_only_the_host() => {
                let request = ViewerRequest {
                    authority: &authority,
                    spread: spread(),
                    ..ViewerRequest::default()
                };
                // The route drops a viewer's diagnostic headers; the cluster
                // header is written over.
                Some(self.route(found, &request, false))
            }
            Err(NotFound::Refused(refusal @ Refusal::UnknownDomain { .. })) => {
                // Unread: a viewer's cluster header, if any, is removed blind.
                let viewer = ViewerHeaders {
                    cluster_header: true,
                    ..ViewerHeaders::default()
                };
                Some(Ok(self.refuse(refusal.clone(), &viewer)))
            }
            Err(NotFound::Unavailable(e)) => Some(Ok(self.unavailable(e))),
            _ => None,
        }
    }

    /// Sends the request to the origin the policy names: the cluster header,
    /// the Host, and the retry and timeout headers Envoy's router reads.
    fn route(
        &mut self,
        found: DomainMatch<'_>,
        request: &ViewerRequest<'_>,
        router_control: bool,
    ) -> Result<Action, String> {
        let policies = Rc::clone(&self.policies);
        let settings = &policies.settings;
        let exchange = match Exchange::begin(found, request, settings) {
            Ok(e) => e,
            Err(refusal) => return Ok(self.refuse(refusal, &ViewerHeaders::default())),
        };
        let Some(decision) = exchange.decision() else {
            return Ok(Action::Continue);
        };
        self.metrics.bump(Counter::Decided);
        if router_control {
            // Only the policy decides retries and timeouts.
            for name in ROUTER_CONTROL_HEADERS {
                set_request_header(name, None)?;
            }
        }
        let direct = exchange.direct_route(&decision, settings);
        let cluster = direct
            .as_ref()
            .map_or(decision.route_cluster, |d| &d.cluster);
        set_request_header(&settings.cluster_header, Some(cluster))?;
        if let Some(host) = exchange.authority_rewrite(&decision, request.authority) {
            set_request_header(":authority", Some(host))?;
        }
        for (name, value) in decision.route_headers() {
            set_request_header(name, Some(&value))?;
        }
        if let Some(direct) = &direct {
            for (name, value) in direct.filter_state() {
                foreign::set_filter_state(name, &value)?;
            }
            foreign::clear_route_cache()?;
        }
        debug!("{}: {}", decision.policy.name, decision.header_value());
        self.exchange = Some(exchange);
        Ok(Action::Continue)
    }

    /// Writes the verdict on the answer into its response headers.
    fn rewrite_response(&self, status: u16, verdict: &ResponseVerdict) {
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
        // Written only when there is something to say: the origin's own copy
        // is removed by the route (`response_headers_to_remove`), before this
        // filter sees the answer, at no host call.
        if let Some(error) = &verdict.origin_error {
            set(ORIGIN_ERROR_HEADER, Some(&error.to_string()));
        }
        if let Some(d) = &verdict.decision_header {
            set(DECISION_HEADER, Some(d));
        }
    }

    /// `origin_5xx` and `origin_unreachable` count what the viewer got (an
    /// origin's 5xx; the proxy's 502/504 for an origin that never answered),
    /// whichever origin that came from; the `failover.*` counters say how
    /// the request got there. After a retry Envoy keeps only the last
    /// attempt, so the first origin's own cause is not known here.
    fn count(&self, error: Option<&OriginError>) {
        let Some(error) = error else { return };
        match error.primary {
            PrimaryFailure::Unreachable(_) => self.metrics.bump(Counter::OriginUnreachable),
            PrimaryFailure::Answered(status) if status >= 500 => {
                self.metrics.bump(Counter::Origin5xx)
            }
            PrimaryFailure::Answered(_) => {}
            PrimaryFailure::Failed => self.metrics.bump(Counter::FailoverRetried),
            PrimaryFailure::MarkedDown => self.metrics.bump(Counter::FailoverMarkedDown),
        }
        match &error.failover {
            FailoverOutcome::Skipped(_) => self.metrics.bump(Counter::FailoverSkipped),
            FailoverOutcome::Next(_, Some(last)) => {
                self.metrics.bump(Counter::FailoverNextFailed);
                match last {
                    SecondaryFailure::Unreachable(_) => {
                        self.metrics.bump(Counter::OriginUnreachable)
                    }
                    SecondaryFailure::Answered(status) if *status >= 500 => {
                        self.metrics.bump(Counter::Origin5xx)
                    }
                    SecondaryFailure::Answered(_) => {}
                }
            }
            FailoverOutcome::Next(_, None) => self.metrics.bump(Counter::FailoverSucceeded),
            FailoverOutcome::None => {}
        }
    }
}

impl Context for OriginFetch {}

impl HttpContext for OriginFetch {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(applied) = self.apply_by_host() {
            return applied.unwrap_or_else(|why| self.answer(500, &why));
        }
        let applied = hostcalls::get_map_bytes(MapType::HttpRequestHeaders)
            .map_err(|e| format!("could not read request headers: {e:?}"))
            .and_then(|headers| self.apply_request(headers));
        match applied {
            Ok(action) => action,
            Err(why) => self.answer(500, &why),
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(exchange) = self.exchange.as_ref() else {
            return Action::Continue;
        };
        // Only `:status` is read: every value fetched costs the host a call back
        // into the VM to allocate it, the largest share of this callback.
        let Some(status) = hostcalls::get_map_value(MapType::HttpResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|v| v.parse::<u16>().ok())
        else {
            return Action::Continue;
        };
        // Only a 5xx (or the 403 of the edge's upstream RBAC on origin
        // networks) can be the proxy's stand-in for an origin that never
        // answered; asking costs a host call, so only then.
        let details = (status >= 500 || status == 403)
            .then(|| property(vec!["response", "code_details"]))
            .flatten()
            .and_then(|b| String::from_utf8(b).ok());
        // Which origin answered matters only when Envoy could have moved on.
        let chain = exchange.has_chain();
        let metadata = chain
            .then(|| property(vec!["xds", "upstream_host_metadata"]))
            .flatten();
        let failure = details.as_deref().and_then(FetchFailure::from_code_details);
        if matches!(failure, Some(FetchFailure::AddressNotAllowed(_))) {
            self.metrics.bump(Counter::OriginAddressRefused);
        }
        let verdict = exchange.on_response(UpstreamReport {
            status,
            failure,
            attempts: if chain { attempt_count() } else { 1 },
            host_metadata: metadata.as_deref(),
        });
        if let Some(e) = &verdict.origin_error {
            // Per request, so not above debug: an origin's change of health is
            // logged once by Envoy's outlier detection.
            debug!("{}: {e}", exchange.domain());
        }
        self.count(verdict.origin_error.as_ref());
        self.rewrite_response(status, &verdict);
        Action::Continue
    }
}
