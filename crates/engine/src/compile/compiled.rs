//! A policy compiled for lookups: every way to each origin, worked out once
//! when the policy is loaded, so that a request only picks among them.

use crate::policy::checks::port_for;
use crate::policy::host::{is_ip_literal, strip_port};
use crate::policy::{Origin, OriginHost, OriginSni, Policy, ProtocolPolicy, Scheme, Tier};
use std::fmt;

/// The name the origin's certificate is checked against, also sent as SNI.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TlsName {
    /// Plain HTTP, or a Host that is an IP literal: TLS carries no name.
    None,
    Fixed(String),
    /// The Host the request carries (the viewer's, or the policy's custom
    /// one the filter wrote): Envoy takes SNI and the name to check from it
    /// (`auto_sni`, `auto_san_validation`).
    FromHost,
}

/// Everything Envoy needs to reach one origin over one scheme: what one
/// derived cluster carries. Domains that reach an origin the same way share it,
/// and with it the origin's health.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OriginEndpoint {
    pub scheme: Scheme,
    /// Domain name or IP literal (IPv6 in brackets).
    pub address: String,
    pub port: u16,
    /// The Host Envoy writes for this origin (its own name); `None` keeps
    /// the request's, which the filter set.
    pub host: Option<String>,
    pub tls_name: TlsName,
    pub connect_timeout_ms: u32,
}

/// FNV-1a: cluster names must not change between releases, or a push would
/// replace every cluster and forget every origin's health.
pub(crate) fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl OriginEndpoint {
    /// `origin:<scheme>:<address>:<port>:<hash>`: readable in Envoy's stats and
    /// admin pages, unique for everything else the cluster carries.
    pub fn cluster_name(&self) -> String {
        let tls = match &self.tls_name {
            TlsName::None => "-".to_owned(),
            TlsName::Fixed(name) => name.clone(),
            TlsName::FromHost => "*".to_owned(),
        };
        let identity = format!(
            "{}|{}|{}|{}|{}|{}",
            self.scheme.as_str(),
            self.address,
            self.port,
            self.host.as_deref().unwrap_or("*"),
            tls,
            self.connect_timeout_ms
        );
        format!(
            "origin:{}:{}:{}:{:08x}",
            self.scheme.as_str(),
            self.address,
            self.port,
            stable_hash(&identity) as u32
        )
    }
}

/// Origins tried in order for one request: the aggregate cluster Envoy
/// derives from them moves to the next one when an origin is marked down,
/// and a retry moves to the next one after a failure.
pub fn chain_cluster_name(members: &[String]) -> String {
    format!("chain:{:016x}", stable_hash(&members.join("\n")))
}

/// One origin of a compiled policy, reached over one scheme.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OriginRoute {
    pub(crate) tier: Tier,
    pub(crate) endpoint: OriginEndpoint,
    pub(crate) cluster: String,
    pub(crate) weight: u32,
    pub(crate) response_timeout_ms: u32,
}

/// A primary origin a request may start with, and what it names in the
/// cluster header: the origin's own cluster, or its chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Start {
    /// Index into [`SchemeRoutes::origins`].
    pub(crate) origin: usize,
    /// Requests whose spread falls below this start here.
    pub(crate) weight_until: u32,
    pub(crate) route_cluster: String,
    /// The origins after this one, in the order failover tries them.
    pub(crate) chain: Vec<usize>,
}

/// Everything a policy can do over one scheme.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SchemeRoutes {
    pub(crate) origins: Vec<OriginRoute>,
    pub(crate) starts: Vec<Start>,
    pub(crate) total_weight: u32,
}

impl SchemeRoutes {
    /// The start a request's spread (any number, e.g. random) lands on,
    /// spreading requests over the primary tier by weight.
    pub(crate) fn start(&self, spread: u32) -> Option<&Start> {
        let at = spread % self.total_weight.max(1);
        self.starts
            .iter()
            .find(|s| at < s.weight_until)
            .or(self.starts.last())
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
    pub(crate) http: Option<SchemeRoutes>,
    pub(crate) https: Option<SchemeRoutes>,
    cache: Vec<CacheOverride>,
}

fn endpoint(policy: &Policy, origin: &Origin, scheme: Scheme) -> OriginEndpoint {
    let port = port_for(policy, origin, scheme);
    // Only an origin's own name travels with its cluster: the accelerated and
    // custom names are per domain, and the filter writes them, so that every
    // domain reaching an origin the same way shares its cluster and health.
    // A CDN names the origin's port in Host only when it addresses the origin
    // itself; the accelerated and custom names are virtual hosts, sent as given.
    let host = match &policy.origin_host {
        OriginHost::OriginDomain if port != scheme.default_port() => {
            Some(format!("{}:{port}", origin.address))
        }
        OriginHost::OriginDomain => Some(origin.address.clone()),
        OriginHost::AccelerationDomain | OriginHost::Custom(_) => None,
    };
    let tls_name = match (scheme, &policy.origin_sni, &policy.origin_host) {
        (Scheme::Http, _, _) => TlsName::None,
        (Scheme::Https, OriginSni::Custom(name), _) => TlsName::Fixed(name.clone()),
        (Scheme::Https, OriginSni::OriginHost, OriginHost::OriginDomain) => {
            if is_ip_literal(&origin.address) {
                TlsName::None
            } else {
                TlsName::Fixed(origin.address.clone())
            }
        }
        (Scheme::Https, OriginSni::OriginHost, OriginHost::Custom(h))
            if is_ip_literal(strip_port(h)) =>
        {
            TlsName::None
        }
        // The Host the filter wrote: Envoy sends it as SNI and checks it.
        (Scheme::Https, OriginSni::OriginHost, _) => TlsName::FromHost,
    };
    OriginEndpoint {
        scheme,
        address: origin.address.clone(),
        port,
        host,
        tls_name,
        connect_timeout_ms: origin.connect_timeout_ms,
    }
}

/// The scheme this policy uses towards `origin` when the viewer used `viewer`.
pub(crate) fn scheme_for(policy: &Policy, origin: &Origin, viewer: Scheme) -> Scheme {
    match policy.protocol {
        ProtocolPolicy::Off if origin.port == 443 => Scheme::Https,
        ProtocolPolicy::Off | ProtocolPolicy::Http => Scheme::Http,
        ProtocolPolicy::Https => Scheme::Https,
        ProtocolPolicy::Follow => viewer,
    }
}

fn scheme_routes(policy: &Policy, viewer: Scheme) -> Option<SchemeRoutes> {
    let origins: Vec<OriginRoute> = policy
        .origins
        .iter()
        .map(|o| {
            let endpoint = endpoint(policy, o, scheme_for(policy, o, viewer));
            OriginRoute {
                tier: o.tier,
                cluster: endpoint.cluster_name(),
                endpoint,
                weight: o.weight,
                response_timeout_ms: o.response_timeout_ms,
            }
        })
        .collect();
    let primaries: Vec<usize> = (0..origins.len())
        .filter(|i| origins[*i].tier == Tier::Primary)
        .collect();
    let mut total_weight = 0;
    let starts = primaries
        .iter()
        .map(|&first| {
            total_weight += origins[first].weight;
            // The other primaries first, then the secondary tier, each in the
            // order written.
            let (mut chain, secondaries): (Vec<usize>, Vec<usize>) = (0..origins.len())
                .filter(|i| *i != first)
                .partition(|i| origins[*i].tier == Tier::Primary);
            chain.extend(secondaries);
            let route_cluster = if chain.is_empty() {
                origins[first].cluster.clone()
            } else {
                let members: Vec<String> = std::iter::once(first)
                    .chain(chain.iter().copied())
                    .map(|i| origins[i].cluster.clone())
                    .collect();
                chain_cluster_name(&members)
            };
            Start {
                origin: first,
                weight_until: total_weight,
                route_cluster,
                chain,
            }
        })
        .collect::<Vec<_>>();
    (!starts.is_empty()).then_some(SchemeRoutes {
        origins,
        starts,
        total_weight,
    })
}

impl CompiledPolicy {
    pub fn compile(policy: Policy) -> Self {
        // Under `off` each origin's port decides its scheme, so both viewer
        // schemes give the same routes; only `follow` depends on the viewer.
        let (http, https) = match policy.protocol {
            ProtocolPolicy::Follow => (
                scheme_routes(&policy, Scheme::Http),
                scheme_routes(&policy, Scheme::Https),
            ),
            _ => (scheme_routes(&policy, Scheme::Http), None),
        };
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
            http,
            https,
            cache,
            policy,
        }
    }

    pub(crate) fn routes(&self, viewer: Scheme) -> Option<&SchemeRoutes> {
        match (viewer, &self.https) {
            (Scheme::Https, Some(r)) => Some(r),
            _ => self.http.as_ref(),
        }
    }

    /// Every way this policy reaches its origins, for any viewer.
    pub(crate) fn all_routes(&self) -> impl Iterator<Item = &SchemeRoutes> {
        self.http.iter().chain(self.https.iter())
    }

    /// The `cache-control` to force for an origin response status, if any.
    pub fn cache_override(&self, status: u16) -> Option<&CacheOverride> {
        self.cache.iter().find(|c| c.status == status)
    }

    pub fn cache_overrides(&self) -> &[CacheOverride] {
        &self.cache
    }
}
