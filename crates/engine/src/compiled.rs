//! A policy compiled for lookups: every way to each origin, worked out once
//! when the policy is loaded, so that a request only picks among them.

use crate::decision::OriginRole;
use crate::host::{is_ip_literal, strip_port};
use crate::policy::{Origin, OriginHost, OriginSni, Policy, ProtocolPolicy, Reach, Scheme};
use crate::settings::Settings;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostSource {
    Viewer,
    Fixed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SniSource {
    /// The viewer's host (when the origin Host is the acceleration domain).
    Viewer,
    Fixed(String),
    /// The Host is an IP literal: TLS carries no name.
    Absent,
}

/// A precomputed way to one origin over one scheme.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OriginRoute {
    pub(crate) role: OriginRole,
    pub(crate) cluster: String,
    pub(crate) scheme: Scheme,
    pub(crate) port: u16,
    pub(crate) host: HostSource,
    pub(crate) sni: SniSource,
    /// `Some(address)` when the dynamic forward proxy must be told where to go.
    pub(crate) dynamic_host: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OriginRoutes {
    pub(crate) http: Option<OriginRoute>,
    pub(crate) https: Option<OriginRoute>,
}

impl OriginRoutes {
    pub(crate) fn get(&self, scheme: Scheme) -> Option<&OriginRoute> {
        match scheme {
            Scheme::Http => self.http.as_ref(),
            Scheme::Https => self.https.as_ref(),
        }
    }
}

/// The `cache-control` a rule forces on the origin's response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheControl {
    /// A TTL of 0: never stored.
    NoStore,
    MaxAge(u32),
}

impl fmt::Display for CacheControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheControl::NoStore => f.write_str("no-store"),
            CacheControl::MaxAge(secs) => write!(f, "max-age={secs}"),
        }
    }
}

/// What to do with the origin's caching headers for one status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheOverride {
    pub status: u16,
    /// Replaces the origin's `cache-control`.
    pub cache_control: CacheControl,
}

/// A policy ready for lookups: everything that does not depend on the request
/// is computed once here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub policy: Policy,
    pub name: String,
    pub(crate) primary: OriginRoutes,
    pub(crate) secondary: Option<OriginRoutes>,
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
                    cache_control: match secs {
                        0 => CacheControl::NoStore,
                        n => CacheControl::MaxAge(n),
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
}
