//! The Envoy clusters a policy set needs, derived from its origins: one per
//! way of reaching an origin (shared by every domain that reaches it the same
//! way, and so is its health), and one aggregate per failover chain. With
//! `direct_origins`, an origin without a chain is reached through the
//! forward-proxy shards of [`crate::envoy::direct`], and a chain is one cluster with
//! its origins at successive priorities.

use crate::compile::compiled::{CompiledPolicy, OriginEndpoint, TlsName};
use crate::compile::index::PolicySet;
pub use crate::envoy::cluster_parts::CLUSTER_TYPE_URL;
use crate::envoy::cluster_parts::{
    dns_resolver_config, duration_ms, outlier_detection, upstream_tls,
};
use crate::envoy::direct::{shard_clusters, DirectClass, DirectOrigins};
use crate::policy::host::is_ip_literal;
use crate::policy::settings::Settings;
use crate::policy::Scheme;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};

/// Endpoint metadata namespace naming the origin cluster an answer came from.
pub const METADATA_NAMESPACE: &str = "origin_policy";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DerivedClusters {
    /// Origin cluster name -> how it reaches its origin. With `direct`, only
    /// chain members, rendered as endpoints of their chain's cluster.
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
        let Some((direct, classes)) = &self.direct else {
            return self.clusters_and_aggregates(settings);
        };
        let shards = classes
            .iter()
            .flat_map(|c| shard_clusters(*c, *direct, settings));
        let chains = self
            .chains
            .iter()
            .map(|(name, members)| priority_chain(name, members, &self.origins, settings));
        shards.chain(chains).collect()
    }

    /// A cluster per origin, and an aggregate of them per chain.
    fn clusters_and_aggregates(&self, settings: &Settings) -> Vec<Value> {
        let origins = self
            .origins
            .iter()
            .map(|(name, e)| origin_cluster(name, e, settings));
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
            if any_name_from_host(members.iter().filter_map(|m| self.origins.get(m))) {
                chain["typed_extension_protocol_options"] = tls_name_from_host();
            }
            chain
        });
        origins.chain(chains).collect()
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

/// One origin as a load-balancing endpoint of `cluster`: its address, the
/// Host it is sent, and the metadata naming its origin cluster (the answer
/// says which origin answered). `by_address`: no DNS lookup needed.
/// `in_chain`: the endpoint picks its own TLS settings in a chain cluster.
fn origin_endpoint(
    cluster: &str,
    e: &OriginEndpoint,
    in_chain: bool,
    settings: &Settings,
) -> (Value, bool) {
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
    let mut metadata = json!({METADATA_NAMESPACE: {"cluster": cluster}});
    if in_chain {
        metadata["envoy.transport_socket_match"] = json!({"origin": cluster});
    }
    let lb_endpoint = json!({"endpoint": endpoint, "metadata": {"filter_metadata": metadata}});
    (lb_endpoint, by_address)
}

/// Over HTTPS, the TLS the origin is reached with (a name taken from the
/// Host is Envoy's `auto_sni`, set on the cluster the route picks).
fn origin_tls(e: &OriginEndpoint, settings: &Settings) -> Option<Value> {
    let name = match &e.tls_name {
        TlsName::Fixed(sni) => Some(sni.as_str()),
        _ => None,
    };
    (e.scheme == Scheme::Https).then(|| upstream_tls(settings, name))
}

/// Whether any of `origins` takes its TLS name from the request's Host.
fn any_name_from_host<'e>(origins: impl IntoIterator<Item = &'e OriginEndpoint>) -> bool {
    origins.into_iter().any(|e| e.tls_name == TlsName::FromHost)
}

/// A cluster of `endpoints` (priority by priority), with origin health and,
/// when an origin is named by DNS, the edge's DNS settings.
fn cluster_of(
    name: &str,
    connect_timeout_ms: u32,
    endpoints: Vec<Value>,
    by_address: bool,
    settings: &Settings,
) -> Value {
    let mut cluster = json!({
        "@type": CLUSTER_TYPE_URL,
        "name": name,
        "type": if by_address { "STATIC" } else { "STRICT_DNS" },
        "connect_timeout": duration_ms(connect_timeout_ms),
        "load_assignment": {"cluster_name": name, "endpoints": endpoints},
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
    cluster
}

fn origin_cluster(name: &str, e: &OriginEndpoint, settings: &Settings) -> Value {
    let (endpoint, by_address) = origin_endpoint(name, e, false, settings);
    let endpoints = vec![json!({"lb_endpoints": [endpoint]})];
    let mut cluster = cluster_of(name, e.connect_timeout_ms, endpoints, by_address, settings);
    if let Some(tls) = origin_tls(e, settings) {
        cluster["transport_socket"] = tls;
    }
    if any_name_from_host([e]) {
        cluster["typed_extension_protocol_options"] = tls_name_from_host();
    }
    cluster
}

/// With `direct_origins`: a failover chain as one cluster, its origins at
/// priorities 0, 1, ... in the order they are tried, each endpoint with its
/// own Host and TLS (`transport_socket_matches`), instead of an aggregate of
/// one cluster per origin: a third of the clusters. Envoy's retry
/// (`previous_priorities`) and outlier detection move from one priority to the
/// next as they do between an aggregate's clusters. The chain takes the
/// longest connect timeout of its origins.
fn priority_chain(
    name: &str,
    members: &[String],
    origins: &BTreeMap<String, OriginEndpoint>,
    settings: &Settings,
) -> Value {
    let members: Vec<(&String, &OriginEndpoint)> = members
        .iter()
        .filter_map(|m| origins.get(m).map(|e| (m, e)))
        .collect();
    let mut all_by_address = true;
    let mut endpoints = Vec::new();
    let mut matches = Vec::new();
    for (priority, (member, e)) in members.iter().enumerate() {
        let (endpoint, by_address) = origin_endpoint(member, e, true, settings);
        all_by_address &= by_address;
        endpoints.push(json!({"priority": priority, "lb_endpoints": [endpoint]}));
        if let Some(tls) = origin_tls(e, settings) {
            matches.push(
                json!({"name": member, "match": {"origin": member}, "transport_socket": tls}),
            );
        }
    }
    let connect_timeout_ms = members
        .iter()
        .map(|(_, e)| e.connect_timeout_ms)
        .max()
        .unwrap_or(crate::policy::DEFAULT_CONNECT_TIMEOUT_MS);
    let mut cluster = cluster_of(
        name,
        connect_timeout_ms,
        endpoints,
        all_by_address,
        settings,
    );
    if !matches.is_empty() {
        cluster["transport_socket_matches"] = json!(matches);
    }
    if any_name_from_host(members.iter().map(|(_, e)| *e)) {
        cluster["typed_extension_protocol_options"] = tls_name_from_host();
    }
    cluster
}

impl PolicySet {
    /// The Envoy clusters the policies need, derived from their origins.
    pub fn derived_clusters(&self) -> DerivedClusters {
        DerivedClusters::of(
            self.index.policies().map(|p| p.as_ref()),
            self.settings.direct_origins,
        )
    }
}
