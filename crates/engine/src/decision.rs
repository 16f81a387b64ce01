//! Turning a viewer request into an origin decision.

use super::fetch::FetchFailure;
use super::host::{is_ip_literal, strip_port, HostError};
use super::policy::{Origin, OriginHost, OriginSni, Policy, ProtocolPolicy, Reach, Scheme};
use super::settings::Settings;
use std::borrow::Cow;
use std::fmt::Write as _;

/// The request facts a decision depends on, straight from the headers.
#[derive(Debug, Clone, Copy, Default)]
pub struct ViewerRequest<'a> {
    /// `:authority` (or `host`), as the viewer sent it.
    pub authority: &'a str,
    /// `:scheme` as Envoy set it for the downstream connection.
    pub scheme: Option<&'a str>,
    pub x_forwarded_proto: Option<&'a str>,
    pub method: &'a str,
}

/// A [`ViewerRequest`] that owns its strings, for callers that keep the
/// request facts beyond the headers they came from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnedViewerRequest {
    pub authority: String,
    pub scheme: Option<String>,
    pub x_forwarded_proto: Option<String>,
    pub method: String,
}

impl OwnedViewerRequest {
    pub fn as_request(&self) -> ViewerRequest<'_> {
        ViewerRequest {
            authority: &self.authority,
            scheme: self.scheme.as_deref(),
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
    XForwardedProto,
    Scheme,
    /// Neither header named http or https; HTTP is assumed.
    Assumed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostSource {
    Viewer,
    Fixed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum SniSource {
    /// The viewer's host (when the origin Host is the acceleration domain).
    Viewer,
    Fixed(String),
    /// The Host is an IP literal: TLS carries no name.
    Absent,
}

/// A precomputed way to one origin over one scheme.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OriginRoute {
    role: OriginRole,
    cluster: String,
    scheme: Scheme,
    port: u16,
    host: HostSource,
    sni: SniSource,
    /// `Some(address)` when the dynamic forward proxy must be told where to go.
    dynamic_host: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct OriginRoutes {
    http: Option<OriginRoute>,
    https: Option<OriginRoute>,
}

impl OriginRoutes {
    fn get(&self, scheme: Scheme) -> Option<&OriginRoute> {
        match scheme {
            Scheme::Http => self.http.as_ref(),
            Scheme::Https => self.https.as_ref(),
        }
    }
}

/// What to do with the origin's caching headers for one status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheOverride {
    pub status: u16,
    /// The `cache-control` value that replaces the origin's.
    pub cache_control: String,
}

/// A policy ready for lookups: everything that does not depend on the request
/// is computed once here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub policy: Policy,
    pub name: String,
    primary: OriginRoutes,
    secondary: Option<OriginRoutes>,
    cache: Vec<CacheOverride>,
}

fn route(
    policy: &Policy,
    origin: &Origin,
    role: OriginRole,
    scheme: Scheme,
    settings: &Settings,
) -> Option<OriginRoute> {
    let port = match policy.protocol {
        ProtocolPolicy::Off => origin.port,
        _ => match scheme {
            Scheme::Http => policy.http_port,
            Scheme::Https => policy.https_port,
        },
    };
    let (cluster, dynamic_host) = match &origin.reach {
        Reach::Clusters { http, https } => {
            let named = match scheme {
                Scheme::Http => http,
                Scheme::Https => https,
            };
            (named.clone()?, None)
        }
        Reach::DynamicForwardProxy => {
            let cluster = match scheme {
                Scheme::Http => &settings.dfp_http_cluster,
                Scheme::Https => &settings.dfp_https_cluster,
            };
            (cluster.clone(), Some(origin.address.clone()))
        }
    };
    // A CDN names the origin's port in Host only when it addresses the origin
    // itself; the accelerated and custom names are virtual hosts, sent as given.
    let host = match &policy.origin_host {
        OriginHost::AccelerationDomain => HostSource::Viewer,
        OriginHost::OriginDomain if port != scheme.default_port() => {
            HostSource::Fixed(format!("{}:{port}", origin.address))
        }
        OriginHost::OriginDomain => HostSource::Fixed(origin.address.clone()),
        OriginHost::Custom(h) => HostSource::Fixed(h.clone()),
    };
    let sni = match (scheme, &policy.origin_sni, &host) {
        (Scheme::Http, _, _) => SniSource::Absent,
        (Scheme::Https, OriginSni::Custom(name), _) => SniSource::Fixed(name.clone()),
        (Scheme::Https, OriginSni::OriginHost, HostSource::Viewer) => SniSource::Viewer,
        (Scheme::Https, OriginSni::OriginHost, HostSource::Fixed(h)) => {
            let name = strip_port(h);
            if is_ip_literal(name) {
                SniSource::Absent
            } else {
                SniSource::Fixed(name.to_owned())
            }
        }
    };
    Some(OriginRoute {
        role,
        cluster,
        scheme,
        port,
        host,
        sni,
        dynamic_host,
    })
}

fn routes(policy: &Policy, origin: &Origin, role: OriginRole, settings: &Settings) -> OriginRoutes {
    let schemes = policy.schemes_for(origin);
    let make = |s: Scheme| {
        schemes
            .contains(&s)
            .then(|| route(policy, origin, role, s, settings))
            .flatten()
    };
    OriginRoutes {
        http: make(Scheme::Http),
        https: make(Scheme::Https),
    }
}

impl CompiledPolicy {
    /// Every Envoy cluster this policy can send a request to.
    pub fn clusters(&self) -> impl Iterator<Item = &str> {
        [Some(&self.primary), self.secondary.as_ref()]
            .into_iter()
            .flatten()
            .flat_map(|r| [r.http.as_ref(), r.https.as_ref()])
            .flatten()
            .map(|r| r.cluster.as_str())
    }

    pub fn compile(policy: Policy, settings: &Settings) -> Self {
        let primary = routes(&policy, &policy.primary, OriginRole::Primary, settings);
        let secondary = policy
            .secondary
            .as_ref()
            .map(|s| routes(&policy, s, OriginRole::Secondary, settings));
        let cache = policy
            .cache_status_ttl
            .iter()
            .filter_map(|(status, ttl)| {
                ttl.map(|secs| CacheOverride {
                    status: *status,
                    cache_control: if secs == 0 {
                        "no-store".to_owned()
                    } else {
                        format!("max-age={secs}")
                    },
                })
            })
            .collect();
        CompiledPolicy {
            name: policy.domain.display_name(),
            primary,
            secondary,
            cache,
            policy,
        }
    }

    /// The `cache-control` to force for an origin response status, if any.
    pub fn cache_override(&self, status: u16) -> Option<&CacheOverride> {
        self.cache.iter().find(|c| c.status == status)
    }

    pub fn cache_overrides(&self) -> &[CacheOverride] {
        &self.cache
    }

    pub fn has_secondary(&self) -> bool {
        self.secondary.is_some()
    }
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
    MethodNotEligible,
    Plan(FailoverPlan<'a>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverPlan<'a> {
    pub target: OriginTarget<'a>,
    pub statuses: &'a [u16],
    pub timeout_ms: u32,
}

impl FailoverPlan<'_> {
    pub fn triggers_on(&self, status: u16) -> bool {
        self.statuses.binary_search(&status).is_ok()
    }
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

/// The result of looking a request up.
#[derive(Debug, Clone, PartialEq, Eq)]
// Returned by value on every request: a box would cost an allocation each time.
#[allow(clippy::large_enum_variant)]
pub enum Outcome<'a> {
    Origin(OriginDecision<'a>),
    /// No policy covers this host.
    UnknownDomain {
        viewer_host: Cow<'a, str>,
    },
    /// The Host cannot name any domain.
    BadHost(HostError),
    /// The policy has no route for the scheme picked; validation prevents this.
    NoRoute {
        domain: &'a str,
    },
}

fn parse_scheme(value: &str) -> Option<Scheme> {
    let first = value.split(',').next().unwrap_or("").trim();
    if first.eq_ignore_ascii_case("https") {
        Some(Scheme::Https)
    } else if first.eq_ignore_ascii_case("http") {
        Some(Scheme::Http)
    } else {
        None
    }
}

/// The viewer's scheme. `:scheme` wins by default: Envoy derives it from the
/// downstream connection, whereas `x-forwarded-proto` can be sent by anyone
/// unless a trusted proxy in front of the edge overwrites it.
pub fn viewer_scheme(
    request: &ViewerRequest<'_>,
    settings: &Settings,
) -> (Scheme, ViewerSchemeSource) {
    if settings.trust_x_forwarded_proto {
        if let Some(s) = request.x_forwarded_proto.and_then(parse_scheme) {
            return (s, ViewerSchemeSource::XForwardedProto);
        }
    }
    match request.scheme.and_then(parse_scheme) {
        Some(s) => (s, ViewerSchemeSource::Scheme),
        None => (Scheme::Http, ViewerSchemeSource::Assumed),
    }
}

impl CompiledPolicy {
    pub(crate) fn decide<'a>(
        &'a self,
        matched: MatchKind,
        viewer_host: Cow<'a, str>,
        request: &ViewerRequest<'_>,
        settings: &Settings,
    ) -> Option<OriginDecision<'a>> {
        let (viewer_scheme, source) = viewer_scheme(request, settings);
        let scheme = |routes: &OriginRoutes| match self.policy.protocol {
            ProtocolPolicy::Follow => viewer_scheme,
            // Every other policy compiled exactly one route per origin.
            _ => {
                if routes.http.is_some() {
                    Scheme::Http
                } else {
                    Scheme::Https
                }
            }
        };
        let primary_scheme = scheme(&self.primary);
        // Validation guarantees a route for every scheme the policy can pick.
        let target = OriginTarget::from_route(self.primary.get(primary_scheme)?, &viewer_host);
        let failover = match (&self.secondary, &self.policy.failover) {
            (Some(routes), Some(rule)) => {
                if rule.methods.iter().any(|m| m == request.method) {
                    match routes.get(scheme(routes)) {
                        Some(r) => Failover::Plan(FailoverPlan {
                            target: OriginTarget::from_route(r, &viewer_host),
                            statuses: &rule.statuses,
                            timeout_ms: rule.timeout_ms,
                        }),
                        None => Failover::NotConfigured,
                    }
                } else {
                    Failover::MethodNotEligible
                }
            }
            _ => Failover::NotConfigured,
        };
        Some(OriginDecision {
            policy: self,
            matched,
            viewer_host,
            viewer_scheme,
            viewer_scheme_source: source,
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
pub struct ResponsePlan<'a> {
    /// Replaces the response status: the proxy's own 503 for an origin that
    /// never answered becomes 502 (connect, TLS) or 504 (timeout).
    pub status: Option<u16>,
    /// Replaces the origin's `cache-control`.
    pub cache_control: Option<&'a str>,
    pub failover: FailoverAction,
    /// The diagnostic header value for a 5xx or a failed fetch.
    pub origin_error: Option<String>,
}

impl<'a> OriginDecision<'a> {
    /// `failure` is set when the response was made by the proxy because the
    /// origin could not be fetched; rules then apply to the status the viewer gets.
    pub fn on_primary_response(
        &self,
        status: u16,
        failure: Option<FetchFailure<'_>>,
    ) -> ResponsePlan<'a> {
        let policy: &'a CompiledPolicy = self.policy;
        let effective = failure.map_or(status, |f| f.status());
        ResponsePlan {
            status: failure.map(|f| f.status()).filter(|s| *s != status),
            cache_control: policy
                .cache_override(effective)
                .map(|c| c.cache_control.as_str()),
            failover: match &self.failover {
                Failover::Plan(plan) if plan.triggers_on(effective) => FailoverAction::Retry,
                Failover::MethodNotEligible
                    if policy
                        .policy
                        .failover
                        .as_ref()
                        .is_some_and(|rule| rule.statuses.binary_search(&effective).is_ok()) =>
                {
                    FailoverAction::SkippedForMethod
                }
                _ => FailoverAction::None,
            },
            origin_error: match failure {
                Some(f) => Some(f.to_string()),
                None => (500..=599)
                    .contains(&status)
                    .then(|| format!("orig response {status} error")),
            },
        }
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
                    ViewerSchemeSource::Scheme => "from :scheme",
                    ViewerSchemeSource::Assumed => "assumed, no usable :scheme",
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

    fn request<'a>(scheme: &'a str, xfp: &'a str) -> ViewerRequest<'a> {
        ViewerRequest {
            authority: "media.example.com",
            scheme: Some(scheme),
            x_forwarded_proto: Some(xfp),
            method: "GET",
        }
    }

    #[test]
    fn x_forwarded_proto_counts_only_when_trusted() {
        let mut settings = Settings::default();
        let r = request("http", "https");
        assert_eq!(
            viewer_scheme(&r, &settings),
            (Scheme::Http, ViewerSchemeSource::Scheme)
        );
        settings.trust_x_forwarded_proto = true;
        assert_eq!(
            viewer_scheme(&r, &settings),
            (Scheme::Https, ViewerSchemeSource::XForwardedProto)
        );
        // A value that names neither scheme falls back to :scheme.
        assert_eq!(
            viewer_scheme(&request("https", "gopher"), &settings),
            (Scheme::Https, ViewerSchemeSource::Scheme)
        );
    }
}
