//! Turning a viewer request into an origin decision: the per-request half of
//! a compiled policy.

use crate::compile::compiled::{CompiledPolicy, OriginRoute, Start, TlsName};
use crate::compile::index::{MatchKind, PolicySet};
use crate::policy::host::{is_ip_literal, normalize_authority, strip_port, HostError};
use crate::policy::settings::Settings;
use crate::policy::{FailoverRule, OriginHost, ProtocolPolicy, Scheme, Tier};
use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::Arc;

/// The request facts a decision depends on.
#[derive(Debug, Clone, Copy, Default)]
pub struct ViewerRequest<'a> {
    /// `:authority` (or `host`), as the viewer sent it.
    pub authority: &'a str,
    /// The viewer's connection to the edge: `Https` when it is TLS. Taken from
    /// the connection itself, never from a header a viewer can forge; `None`
    /// when the caller did not ask (only `follow` needs it).
    pub connection: Option<Scheme>,
    pub x_forwarded_proto: Option<&'a str>,
    pub method: &'a str,
    /// Declared request body size (`content-length`), when known.
    pub body_bytes: Option<u64>,
    /// Any number, e.g. random: spreads requests over the primary tier by weight.
    pub spread: u32,
}

/// A [`ViewerRequest`] that owns its strings, for callers that keep the
/// request facts beyond the headers they came from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnedViewerRequest {
    pub authority: String,
    pub connection: Option<Scheme>,
    pub x_forwarded_proto: Option<String>,
    pub method: String,
    pub body_bytes: Option<u64>,
    pub spread: u32,
}

impl OwnedViewerRequest {
    pub fn as_request(&self) -> ViewerRequest<'_> {
        ViewerRequest {
            authority: &self.authority,
            connection: self.connection,
            x_forwarded_proto: self.x_forwarded_proto.as_deref(),
            method: &self.method,
            body_bytes: self.body_bytes,
            spread: self.spread,
        }
    }
}

/// Where the viewer scheme came from, for `follow`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewerSchemeSource {
    /// A trusted proxy in front of the edge said so.
    XForwardedProto,
    /// The viewer's connection to the edge: TLS or not.
    Connection,
    /// Nobody said; HTTP is assumed.
    Assumed,
}

/// One origin a request may be sent to, as this viewer's request reaches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginTarget<'a> {
    pub tier: Tier,
    /// The origin's derived Envoy cluster.
    pub cluster: &'a str,
    pub scheme: Scheme,
    pub address: &'a str,
    pub port: u16,
    /// Sent as `:authority` (and so as `Host`).
    pub authority: Cow<'a, str>,
    /// Sent in the TLS handshake and checked against the certificate's names.
    pub sni: Option<Cow<'a, str>>,
    pub connect_timeout_ms: u32,
    pub response_timeout_ms: u32,
}

impl OriginTarget<'_> {
    /// `domain=…; origin=…; address=…; scheme=…; port=…; host=…[; sni=…]`, the
    /// `x-origin-decision` header for a fetch to this target.
    pub fn header_value(&self, domain: &str) -> String {
        let mut out = String::with_capacity(96);
        let _ = write!(
            out,
            "domain={domain}; origin={}; address={}; scheme={}; port={}; host={}",
            self.tier.as_str(),
            self.address,
            self.scheme.as_str(),
            self.port,
            self.authority
        );
        if let Some(sni) = &self.sni {
            let _ = write!(out, "; sni={sni}");
        }
        out
    }
}

impl<'a> OriginTarget<'a> {
    /// `custom_host`: the policy's own Host, when it has one.
    pub(crate) fn new(
        route: &'a OriginRoute,
        viewer_host: &Cow<'a, str>,
        custom_host: Option<&'a str>,
    ) -> Self {
        let e = &route.endpoint;
        let authority = match (e.host.as_deref(), custom_host) {
            (Some(h), _) | (None, Some(h)) => Cow::Borrowed(h),
            (None, None) => viewer_host.clone(),
        };
        let sni = match &e.tls_name {
            TlsName::FromHost => {
                let name = strip_port(&authority);
                (!is_ip_literal(name)).then(|| Cow::Owned(name.to_owned()))
            }
            TlsName::Fixed(name) => Some(Cow::Borrowed(name.as_str())),
            TlsName::None => None,
        };
        OriginTarget {
            tier: route.tier,
            cluster: &route.cluster,
            scheme: e.scheme,
            address: &e.address,
            port: e.port,
            authority,
            sni,
            connect_timeout_ms: e.connect_timeout_ms,
            response_timeout_ms: route.response_timeout_ms,
        }
    }
}

/// Why a request that could fail over will not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailoverSkip {
    /// The request's method is not one the policy retries.
    Method(String),
    /// The body is larger than Envoy keeps for a retry.
    BodySize { limit: u32 },
}

/// What happens if the first origin fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failover<'a> {
    /// The policy has no secondary origin.
    NotConfigured,
    /// The policy fails over, but not this request.
    Skipped(&'a FailoverRule, FailoverSkip),
    Plan(FailoverPlan<'a>),
}

impl Failover<'_> {
    /// The policy's failover rule, whether or not this request may use it.
    pub fn rule(&self) -> Option<&FailoverRule> {
        match self {
            Failover::NotConfigured => None,
            Failover::Skipped(rule, _) => Some(rule),
            Failover::Plan(plan) => Some(plan.rule),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverPlan<'a> {
    /// The origin a retry goes to (the next in the chain).
    pub target: OriginTarget<'a>,
    pub rule: &'a FailoverRule,
    /// Only a connection that failed before anything was sent is retried:
    /// the method is not idempotent (RFC 9110 9.2.2).
    pub connect_failures_only: bool,
}

/// The full answer for one request that a policy covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginDecision<'a> {
    pub policy: &'a CompiledPolicy,
    pub matched: MatchKind,
    /// The viewer's host, normalised.
    pub viewer_host: Cow<'a, str>,
    pub viewer_scheme: Scheme,
    pub viewer_scheme_source: ViewerSchemeSource,
    /// The cluster header's value: the first origin's cluster, or the chain
    /// that also holds the origins failover and health checks move to.
    pub route_cluster: &'a str,
    pub target: OriginTarget<'a>,
    /// Every origin after the first, in the order Envoy tries them.
    pub chain: Vec<OriginTarget<'a>>,
    pub failover: Failover<'a>,
}

/// Why a request gets no origin decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal<'a> {
    /// No policy covers this host.
    UnknownDomain { viewer_host: Cow<'a, str> },
    /// The Host cannot name any domain.
    BadHost(HostError),
    /// The policy has no origin for the scheme picked; validation prevents this.
    NoRoute { domain: &'a str },
}

/// The result of looking a request up.
#[derive(Debug, Clone, PartialEq, Eq)]
// Returned by value on every request: a box would cost an allocation each time.
#[allow(clippy::large_enum_variant)]
pub enum Outcome<'a> {
    Origin(OriginDecision<'a>),
    Refused(Refusal<'a>),
}

/// The policy that covers a viewer's host, before anything else about the
/// request is asked: a caller reads the connection's protocol only when
/// [`DomainMatch::follows_viewer`] says the decision depends on it.
#[derive(Debug, Clone)]
pub struct DomainMatch<'a> {
    pub policy: &'a Arc<CompiledPolicy>,
    pub matched: MatchKind,
    pub viewer_host: Cow<'a, str>,
}

impl<'a> DomainMatch<'a> {
    pub fn follows_viewer(&self) -> bool {
        self.policy.policy.protocol == ProtocolPolicy::Follow
    }

    /// The decision takes nothing from the request but its host: the scheme
    /// is not the viewer's and there is no failover rule to weigh the method
    /// and body against. A caller may then skip reading the other headers.
    pub fn needs_only_the_host(&self) -> bool {
        !self.follows_viewer() && self.policy.policy.failover.is_none()
    }

    /// What the decision takes from the request besides the host.
    pub(crate) fn choose(&self, request: &ViewerRequest<'_>, settings: &Settings) -> Choice {
        let (viewer_scheme, source) = viewer_scheme(request, settings);
        let skip = self.policy.policy.failover.as_ref().and_then(|rule| {
            if !rule.methods.iter().any(|m| m == request.method) {
                Some(SkipReason::Method)
            } else if request
                .body_bytes
                .is_some_and(|b| b > u64::from(settings.max_replay_body_bytes))
            {
                Some(SkipReason::BodySize)
            } else {
                None
            }
        });
        Choice {
            matched: self.matched,
            viewer_scheme,
            viewer_scheme_source: source,
            skip,
            spread: request.spread,
            replay_limit: settings.max_replay_body_bytes,
        }
    }

    pub fn decide(
        self,
        request: &ViewerRequest<'_>,
        settings: &Settings,
    ) -> Result<OriginDecision<'a>, Refusal<'a>> {
        let choice = self.choose(request, settings);
        let policy: &'a CompiledPolicy = self.policy;
        policy
            .decision(self.viewer_host, choice, request.method)
            .ok_or(Refusal::NoRoute {
                domain: &policy.name,
            })
    }
}

/// Everything a decision takes from the request besides the host: small and
/// owned, so that a request can keep it and ask its policy again for free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Choice {
    pub(crate) matched: MatchKind,
    pub(crate) viewer_scheme: Scheme,
    pub(crate) viewer_scheme_source: ViewerSchemeSource,
    pub(crate) skip: Option<SkipReason>,
    pub(crate) spread: u32,
    pub(crate) replay_limit: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SkipReason {
    Method,
    BodySize,
}

/// Methods whose request may have changed something at the origin even when
/// the answer was an error (RFC 9110 9.2.2).
fn idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
}

/// A scheme as written in a URL, a header or a test case (`https`, `HTTP`,
/// the first of a list); anything else is `None`.
pub fn scheme_from_text(value: &str) -> Option<Scheme> {
    let first = value.split(',').next().unwrap_or("").trim();
    if first.eq_ignore_ascii_case("https") {
        Some(Scheme::Https)
    } else if first.eq_ignore_ascii_case("http") {
        Some(Scheme::Http)
    } else {
        None
    }
}

/// The viewer's scheme. The connection decides by default: `:scheme` and
/// `x-forwarded-proto` are headers, and Envoy fills `:scheme` from a viewer's
/// `x-forwarded-proto` unless the listener uses the remote address. Only a
/// proxy in front of the edge that overwrites `x-forwarded-proto` makes that
/// header trustworthy (`settings.trust_x_forwarded_proto`).
pub fn viewer_scheme(
    request: &ViewerRequest<'_>,
    settings: &Settings,
) -> (Scheme, ViewerSchemeSource) {
    if settings.trust_x_forwarded_proto {
        if let Some(s) = request.x_forwarded_proto.and_then(scheme_from_text) {
            return (s, ViewerSchemeSource::XForwardedProto);
        }
    }
    match request.connection {
        Some(s) => (s, ViewerSchemeSource::Connection),
        None => (Scheme::Http, ViewerSchemeSource::Assumed),
    }
}

impl CompiledPolicy {
    /// The decision for a request's choice. `None` only when the policy has no
    /// origin for the scheme picked, which validation rules out.
    pub(crate) fn decision<'a>(
        &'a self,
        viewer_host: Cow<'a, str>,
        choice: Choice,
        method: &str,
    ) -> Option<OriginDecision<'a>> {
        let routes = self.routes(choice.viewer_scheme)?;
        let start: &Start = routes.start(choice.spread)?;
        let custom = match &self.policy.origin_host {
            OriginHost::Custom(h) => Some(h.as_str()),
            _ => None,
        };
        let target = OriginTarget::new(routes.origins.get(start.origin)?, &viewer_host, custom);
        let chain: Vec<OriginTarget<'a>> = start
            .chain
            .iter()
            .filter_map(|i| routes.origins.get(*i))
            .map(|r| OriginTarget::new(r, &viewer_host, custom))
            .collect();
        let failover = match (&self.policy.failover, choice.skip, chain.first()) {
            (Some(rule), None, Some(next)) => Failover::Plan(FailoverPlan {
                target: next.clone(),
                rule,
                connect_failures_only: !idempotent(method),
            }),
            (Some(rule), Some(SkipReason::Method), _) => {
                Failover::Skipped(rule, FailoverSkip::Method(method.to_owned()))
            }
            (Some(rule), Some(SkipReason::BodySize), _) => Failover::Skipped(
                rule,
                FailoverSkip::BodySize {
                    limit: choice.replay_limit,
                },
            ),
            _ => Failover::NotConfigured,
        };
        Some(OriginDecision {
            policy: self,
            matched: choice.matched,
            viewer_host,
            viewer_scheme: choice.viewer_scheme,
            viewer_scheme_source: choice.viewer_scheme_source,
            route_cluster: &start.route_cluster,
            target,
            chain,
            failover,
        })
    }
}

impl OriginDecision<'_> {
    /// Why this scheme and port were chosen, in one line.
    pub fn scheme_rule(&self) -> String {
        let p = &self.policy.policy;
        let t = &self.target;
        match p.protocol {
            ProtocolPolicy::Off => format!(
                "protocol policy off: origin port {} means {}",
                t.port,
                t.scheme.as_str()
            ),
            ProtocolPolicy::Http => format!("protocol policy http: http_port {}", t.port),
            ProtocolPolicy::Https => format!("protocol policy https: https_port {}", t.port),
            ProtocolPolicy::Follow => format!(
                "protocol policy follow: viewer used {} ({}), so {} port {}",
                self.viewer_scheme.as_str(),
                match self.viewer_scheme_source {
                    ViewerSchemeSource::XForwardedProto => "from x-forwarded-proto",
                    ViewerSchemeSource::Connection => "from the viewer's connection",
                    ViewerSchemeSource::Assumed => "assumed, connection not known",
                },
                t.scheme.as_str(),
                t.port
            ),
        }
    }

    /// The compact `x-origin-decision` header value for the first origin.
    pub fn header_value(&self) -> String {
        self.target.header_value(&self.policy.name)
    }
}

impl PolicySet {
    /// The policy that covers a viewer's Host.
    pub fn lookup<'a>(&'a self, authority: &'a str) -> Result<DomainMatch<'a>, Refusal<'a>> {
        let host = normalize_authority(authority).map_err(Refusal::BadHost)?;
        match self.index.lookup(&host) {
            Some((policy, matched)) => Ok(DomainMatch {
                policy,
                matched,
                viewer_host: host,
            }),
            None => Err(Refusal::UnknownDomain { viewer_host: host }),
        }
    }

    /// Decides where a request goes.
    pub fn decide<'a>(&'a self, request: &ViewerRequest<'a>) -> Outcome<'a> {
        match self
            .lookup(request.authority)
            .and_then(|found| found.decide(request, &self.settings))
        {
            Ok(d) => Outcome::Origin(d),
            Err(r) => Outcome::Refused(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(connection: Scheme, xfp: &str) -> ViewerRequest<'_> {
        ViewerRequest {
            authority: "media.example.com",
            connection: Some(connection),
            x_forwarded_proto: Some(xfp),
            method: "GET",
            ..ViewerRequest::default()
        }
    }

    #[test]
    fn x_forwarded_proto_counts_only_when_trusted() {
        let mut settings = Settings::default();
        let r = request(Scheme::Http, "https");
        assert_eq!(
            viewer_scheme(&r, &settings),
            (Scheme::Http, ViewerSchemeSource::Connection)
        );
        // A TLS viewer cannot downgrade its own fetch with the header either.
        assert_eq!(
            viewer_scheme(&request(Scheme::Https, "http"), &settings),
            (Scheme::Https, ViewerSchemeSource::Connection)
        );
        settings.trust_x_forwarded_proto = true;
        assert_eq!(
            viewer_scheme(&r, &settings),
            (Scheme::Https, ViewerSchemeSource::XForwardedProto)
        );
        // A value that names neither scheme falls back to the connection.
        assert_eq!(
            viewer_scheme(&request(Scheme::Https, "gopher"), &settings),
            (Scheme::Https, ViewerSchemeSource::Connection)
        );
    }
}
