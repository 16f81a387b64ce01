//! Turning a viewer request into an origin decision: the per-request half of
//! a compiled policy.

use crate::compiled::{CacheControl, CompiledPolicy, HostSource, OriginRoute, SniSource};
use crate::fetch::FetchFailure;
use crate::host::{is_ip_literal, HostError};
use crate::policy::{FailoverRule, ProtocolPolicy, Scheme};
use crate::settings::Settings;
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
}

/// A [`ViewerRequest`] that owns its strings, for callers that keep the
/// request facts beyond the headers they came from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnedViewerRequest {
    pub authority: String,
    pub connection: Option<Scheme>,
    pub x_forwarded_proto: Option<String>,
    pub method: String,
}

impl OwnedViewerRequest {
    pub fn as_request(&self) -> ViewerRequest<'_> {
        ViewerRequest {
            authority: &self.authority,
            connection: self.connection,
            x_forwarded_proto: self.x_forwarded_proto.as_deref(),
            method: &self.method,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginRole {
    Primary,
    Secondary,
}

impl OriginRole {
    pub fn as_str(self) -> &'static str {
        match self {
            OriginRole::Primary => "primary",
            OriginRole::Secondary => "secondary",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchKind {
    Exact,
    Wildcard,
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

/// Where one fetch goes: everything the filter writes into the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginTarget<'a> {
    pub role: OriginRole,
    pub cluster: &'a str,
    pub scheme: Scheme,
    pub port: u16,
    /// Sent as `:authority` (and so as `Host`).
    pub authority: Cow<'a, str>,
    /// Sent in the TLS handshake and checked against the certificate's names.
    pub sni: Option<Cow<'a, str>>,
    /// For the dynamic forward proxy: the host to connect to.
    pub dynamic_host: Option<&'a str>,
}

impl OriginTarget<'_> {
    /// `domain=…; origin=…; cluster=…; scheme=…; port=…; host=…[; sni=…]`, the
    /// `x-origin-decision` header for a fetch to this target.
    pub fn header_value(&self, domain: &str) -> String {
        let mut out = String::with_capacity(96);
        let _ = write!(
            out,
            "domain={domain}; origin={}; cluster={}; scheme={}; port={}; host={}",
            self.role.as_str(),
            self.cluster,
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
    fn from_route(route: &'a OriginRoute, viewer_host: &Cow<'a, str>) -> Self {
        let authority = match &route.host {
            HostSource::Viewer => viewer_host.clone(),
            HostSource::Fixed(h) => Cow::Borrowed(h.as_str()),
        };
        let sni = match &route.sni {
            SniSource::Viewer if is_ip_literal(viewer_host) => None,
            SniSource::Viewer => Some(viewer_host.clone()),
            SniSource::Fixed(name) => Some(Cow::Borrowed(name.as_str())),
            SniSource::Absent => None,
        };
        OriginTarget {
            role: route.role,
            cluster: &route.cluster,
            scheme: route.scheme,
            port: route.port,
            authority,
            sni,
            dynamic_host: route.dynamic_host.as_deref(),
        }
    }
}

/// What happens if the primary answers with a failover status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failover<'a> {
    /// The policy has no secondary origin.
    NotConfigured,
    /// The request's method is not one the policy retries.
    MethodNotEligible(&'a FailoverRule),
    Plan(FailoverPlan<'a>),
}

impl Failover<'_> {
    /// The policy's failover rule, whether or not this request may use it.
    pub fn rule(&self) -> Option<&FailoverRule> {
        match self {
            Failover::NotConfigured => None,
            Failover::MethodNotEligible(rule) => Some(rule),
            Failover::Plan(plan) => Some(plan.rule),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverPlan<'a> {
    pub target: OriginTarget<'a>,
    pub rule: &'a FailoverRule,
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
    pub target: OriginTarget<'a>,
    pub failover: Failover<'a>,
}

/// Why a request gets no origin decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal<'a> {
    /// No policy covers this host.
    UnknownDomain { viewer_host: Cow<'a, str> },
    /// The Host cannot name any domain.
    BadHost(HostError),
    /// The policy has no route for the scheme picked; validation prevents this.
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

    /// What the decision takes from the request besides the host.
    pub(crate) fn choose(&self, request: &ViewerRequest<'_>, settings: &Settings) -> Choice {
        let (viewer_scheme, source) = viewer_scheme(request, settings);
        Choice {
            matched: self.matched,
            viewer_scheme,
            viewer_scheme_source: source,
            method_eligible: self
                .policy
                .policy
                .failover
                .as_ref()
                .is_some_and(|rule| rule.methods.iter().any(|m| m == request.method)),
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
            .decision(self.viewer_host, choice)
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
    pub(crate) method_eligible: bool,
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
    /// route for the scheme picked, which validation rules out.
    pub(crate) fn decision<'a>(
        &'a self,
        viewer_host: Cow<'a, str>,
        choice: Choice,
    ) -> Option<OriginDecision<'a>> {
        let scheme = |routes: &crate::compiled::OriginRoutes| match self.policy.protocol {
            ProtocolPolicy::Follow => choice.viewer_scheme,
            // Every other policy compiled exactly one route per origin.
            _ if routes.http.is_some() => Scheme::Http,
            _ => Scheme::Https,
        };
        let target =
            OriginTarget::from_route(self.primary.get(scheme(&self.primary))?, &viewer_host);
        let failover = match (&self.secondary, &self.policy.failover) {
            (Some(routes), Some(rule)) if choice.method_eligible => {
                match routes.get(scheme(routes)) {
                    Some(r) => Failover::Plan(FailoverPlan {
                        target: OriginTarget::from_route(r, &viewer_host),
                        rule,
                    }),
                    None => Failover::NotConfigured,
                }
            }
            (Some(_), Some(rule)) => Failover::MethodNotEligible(rule),
            _ => Failover::NotConfigured,
        };
        Some(OriginDecision {
            policy: self,
            matched: choice.matched,
            viewer_host,
            viewer_scheme: choice.viewer_scheme,
            viewer_scheme_source: choice.viewer_scheme_source,
            target,
            failover,
        })
    }
}

/// What failover does about one primary response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverAction {
    /// Not a failover status, or no secondary origin.
    None,
    /// Re-send the request to the secondary origin.
    Retry,
    /// A failover status, but the request's method is not one the policy retries.
    SkippedForMethod,
}

/// What the filter does with the primary origin's response headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponsePlan {
    /// Replaces the response status: the proxy's own 503 for an origin that
    /// never answered becomes 502 (connect, TLS) or 504 (timeout).
    pub status: Option<u16>,
    /// Replaces the origin's `cache-control`.
    pub cache_control: Option<CacheControl>,
    pub failover: FailoverAction,
    /// What went wrong with the primary, for a 5xx or a failed fetch.
    pub primary_failure: Option<crate::origin_error::PrimaryFailure>,
}

impl OriginDecision<'_> {
    /// `failure` is set when the response was made by the proxy because the
    /// origin could not be fetched; rules then apply to the status the viewer gets.
    pub fn on_primary_response(
        &self,
        status: u16,
        failure: Option<FetchFailure<'_>>,
    ) -> ResponsePlan {
        use crate::origin_error::PrimaryFailure;
        let effective = failure.map_or(status, |f| f.status());
        let triggers = self
            .failover
            .rule()
            .is_some_and(|r| r.triggers_on(effective));
        ResponsePlan {
            status: failure.map(|f| f.status()).filter(|s| *s != status),
            cache_control: self
                .policy
                .cache_override(effective)
                .map(|c| c.cache_control),
            failover: match &self.failover {
                Failover::Plan(_) if triggers => FailoverAction::Retry,
                Failover::MethodNotEligible(_) if triggers => FailoverAction::SkippedForMethod,
                _ => FailoverAction::None,
            },
            primary_failure: match failure {
                Some(f) => Some(PrimaryFailure::Unreachable(f.to_string())),
                None => (500..=599)
                    .contains(&status)
                    .then_some(PrimaryFailure::Answered(status)),
            },
        }
    }

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

    /// The compact `x-origin-decision` header value.
    pub fn header_value(&self) -> String {
        self.target.header_value(&self.policy.name)
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
