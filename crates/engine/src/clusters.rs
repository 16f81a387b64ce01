//! The Envoy clusters a policy set needs, derived from its origins: one per
//! way of reaching an origin (shared by every domain that reaches it the same
//! way, and so is its health), and one aggregate per failover chain. With
//! `direct_origins`, only chains keep origin clusters; every other origin is
//! reached through the forward-proxy shards of [`crate::direct`].

use crate::compiled::{CompiledPolicy, OriginEndpoint, TlsName};
use crate::direct::{shard_clusters, DirectClass, DirectOrigins};
use crate::host::is_ip_literal;
use crate::policy::Scheme;
use crate::settings::Settings;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};

pub const CLUSTER_TYPE_URL: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// Endpoint metadata namespace naming the origin cluster an answer came from.
pub const METADATA_NAMESPACE: &str = "origin_policy";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DerivedClusters {
    /// Origin cluster name -> how it reaches its origin.
    pub origins: BTreeMap<String, OriginEndpoint>,
    /// Chain cluster name -> its origin clusters, in the order they are tried.
    pub chains: BTreeMap<String, Vec<String>>,
    /// With `direct_origins`: the forward-proxy clusters that the origins of
    /// requests without a chain go through, and how many shards each has.
    pub direct: Option<(DirectOrigins, BTreeSet<DirectClass>)>,
}

impl DerivedClusters {
    /// `direct`: the `direct_origins` setting. With it, an origin gets a
    /// cluster of its own only as a member of a failover chain.
    pub fn of<'a>(
        policies: impl IntoIterator<Item = &'a CompiledPolicy>,
        direct: Option<DirectOrigins>,
    ) -> Self {
        let mut out = DerivedClusters {
            direct: direct.map(|d| (d, BTreeSet::new())),
            ..DerivedClusters::default()
        };
        for policy in policies {
            for routes in policy.all_routes() {
                for start in &routes.starts {
                    let members = std::iter::once(start.origin)
                        .chain(start.chain.iter().copied())
                        .filter_map(|i| routes.origins.get(i));
                    if start.chain.is_empty() {
                        if let (Some((_, classes)), Some(origin)) =
                            (out.direct.as_mut(), routes.origins.get(start.origin))
                        {
                            classes.insert(DirectClass {
                                scheme: origin.endpoint.scheme,
                                connect_timeout_ms: origin.endpoint.connect_timeout_ms,
                            });
                            continue;
                        }
                    }
                    for origin in members.clone() {
                        out.origins
                            .entry(origin.cluster.clone())
                            .or_insert_with(|| origin.endpoint.clone());
                    }
                    if !start.chain.is_empty() {
                        out.chains
                            .entry(start.route_cluster.clone())
                            .or_insert_with(|| members.map(|o| o.cluster.clone()).collect());
                    }
                }
            }
        }
        out
    }

    /// Adds the clusters `older` has and these do not: requests still running
    /// on an older configuration keep theirs until a later push drops them.
    pub fn keep(&mut self, older: DerivedClusters) {
        for (name, endpoint) in older.origins {
            self.origins.entry(name).or_insert(endpoint);
        }
        for (name, members) in older.chains {
            self.chains.entry(name).or_insert(members);
        }
        match (&mut self.direct, older.direct) {
            (Some((d, classes)), Some((od, older))) if *d == od => classes.extend(older),
            (None, Some(older)) => self.direct = Some(older),
            _ => {}
        }
    }

    /// The clusters as Envoy CDS resources (`envoy.config.cluster.v3.Cluster`).
    pub fn envoy_resources(&self, settings: &Settings) -> Vec<Value> {
        let origins = self
            .origins
            .iter()
            .map(|(name, e)| origin_cluster(name, e, settings));
        let direct = self.direct.iter().flat_map(|(d, classes)| {
            classes
                .iter()
                .flat_map(move |c| shard_clusters(*c, *d, settings))
        });
        let chains = self.chains.iter().map(|(name, members)| {
            let mut chain = json!({
                "@type": CLUSTER_TYPE_URL,
                "name": name,
                "connect_timeout": "10s",
                "lb_policy": "CLUSTER_PROVIDED",
                "cluster_type": {
                    "name": "envoy.clusters.aggregate",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig",
                        "clusters": members,
                    },
                },
            });
            // Envoy's router reads auto_sni / auto_san_validation from the
            // cluster the route picked, which for a chain is this aggregate,
            // never from the origin cluster the attempt then goes to. The
            // origin/SNI rules are per policy, so the HTTPS origins of one
            // chain either all take their name from the Host or none does.
            let from_host = members.iter().any(|m| {
                self.origins
                    .get(m)
                    .is_some_and(|e| e.tls_name == TlsName::FromHost)
            });
            if from_host {
                chain["typed_extension_protocol_options"] = tls_name_from_host();
            }
            chain
        });
        origins.chain(direct).chain(chains).collect()
    }
}

/// Envoy sends the request's Host as SNI and checks the certificate against it.
fn tls_name_from_host() -> Value {
    json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "upstream_http_protocol_options": {"auto_sni": true, "auto_san_validation": true},
            "explicit_http_config": {"http_protocol_options": {}},
        },
    })
}

pub(crate) fn duration_ms(ms: u32) -> String {
    format!("{}.{:03}s", ms / 1000, ms % 1000)
}

fn origin_cluster(name: &str, e: &OriginEndpoint, settings: &Settings) -> Value {
    let bare = e.address.trim_start_matches('[').trim_end_matches(']');
    let fixed = settings.resolve.get(&e.address).map(String::as_str);
    let by_address = fixed.is_some() || is_ip_literal(&e.address);
    let mut endpoint = json!({
        "address": {"socket_address": {"address": fixed.unwrap_or(bare), "port_value": e.port}},
    });
    if let Some(host) = &e.host {
        // The route's auto_host_rewrite sends this as Host, attempt by attempt.
        endpoint["hostname"] = json!(host);
    }
    let mut cluster = json!({
        "@type": CLUSTER_TYPE_URL,
        "name": name,
        "type": if by_address { "STATIC" } else { "STRICT_DNS" },
        "connect_timeout": duration_ms(e.connect_timeout_ms),
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{
                "endpoint": endpoint,
                "metadata": {"filter_metadata": {METADATA_NAMESPACE: {"cluster": name}}},
            }]}],
        },
        "outlier_detection": outlier_detection(settings),
    });
    if !by_address {
        // One DNS query per origin per minute, not Envoy's default of every 5 s:
        // there can be 100,000 of them.
        cluster["dns_lookup_family"] = json!("V4_PREFERRED");
        cluster["dns_refresh_rate"] = json!("60s");
        cluster["respect_dns_ttl"] = json!(true);
        if let Some(resolver) = dns_resolver_config(settings) {
            cluster["typed_dns_resolver_config"] = resolver;
        }
    }
    if e.scheme == Scheme::Https {
        let mut validation = json!({"trusted_ca": {"filename": settings.origin_ca_file}});
        let mut tls = json!({});
        match &e.tls_name {
            TlsName::Fixed(sni) => {
                tls["sni"] = json!(sni);
                validation["match_typed_subject_alt_names"] =
                    json!([{"san_type": "DNS", "matcher": {"exact": sni}}]);
            }
            TlsName::FromHost => {
                cluster["typed_extension_protocol_options"] = tls_name_from_host();
            }
            TlsName::None => {}
        }
        tls["common_tls_context"] = json!({"validation_context": validation});
        tls["@type"] = json!(
            "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
        );
        cluster["transport_socket"] =
            json!({"name": "envoy.transport_sockets.tls", "typed_config": tls});
    }
    cluster
}

/// Sticky origin health: an origin that keeps failing is skipped for a
/// cool-down that grows each time, and a chain moves to its next origin.
/// Connect failures and timeouts count with the 5xx answers: kept apart
/// (split_external_local_origin_errors), a hanging origin is never marked down.
pub(crate) fn outlier_detection(settings: &Settings) -> Value {
    let h = &settings.origin_health;
    json!({
        "consecutive_5xx": h.consecutive_failures,
        "consecutive_gateway_failure": h.consecutive_failures,
        "enforcing_consecutive_5xx": 100,
        "enforcing_consecutive_gateway_failure": 100,
        "enforcing_success_rate": 0,
        "enforcing_local_origin_success_rate": 0,
        "interval": "1s",
        "base_ejection_time": duration_ms(h.cooldown_ms),
        "max_ejection_time": duration_ms(h.max_cooldown_ms),
        "max_ejection_percent": 100,
    })
}

/// The DNS servers of `settings.dns_resolvers`; `None`: the system's.
pub(crate) fn dns_resolver_config(settings: &Settings) -> Option<Value> {
    if settings.dns_resolvers.is_empty() {
        return None;
    }
    let resolvers: Vec<Value> = settings
        .dns_resolvers
        .iter()
        .map(|a| json!({"socket_address": {"address": a.ip().to_string(), "port_value": a.port()}}))
        .collect();
    Some(json!({
        "name": "envoy.network.dns_resolver.cares",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig",
            "resolvers": resolvers,
            "dns_resolver_options": {"no_default_search_domain": true},
        },
    }))
}
