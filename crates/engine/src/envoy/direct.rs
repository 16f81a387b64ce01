//! Origins reached without a cluster of their own: a domain whose request
//! has no failover chain goes through one of a few forward-proxy clusters
//! (Envoy's dynamic forward proxy), which learns the origin's address from
//! the request. 100,000 distinct origins then cost Envoy 100,000 forward-proxy
//! hosts (about 3 KiB each) instead of 100,000 clusters (about 55 KiB each).
//!
//! Envoy rebuilds a forward-proxy cluster's host set each time it learns a
//! host, so the origins are spread over `shards` clusters by a stable hash of
//! address and port: a new origin costs in proportion to its shard. Envoy takes
//! one connect timeout and one TLS setting per cluster, so each scheme and
//! connect timeout the policies use gets its own set of shards.

use crate::compile::compiled::stable_hash;
use crate::envoy::cluster_parts::{
    dns_resolver_config, duration_ms, outlier_detection, upstream_tls, CLUSTER_TYPE_URL,
};
use crate::policy::settings::Settings;
pub use crate::policy::settings::{DirectOrigins, DEFAULT_SHARDS, MAX_SHARDS};
use crate::policy::Scheme;
use serde_json::{json, Value};

/// Every direct cluster's name starts with this (the edge's direct route
/// matches on the filter state instead, which no viewer can set).
pub const DIRECT_CLUSTER_PREFIX: &str = "origin-policy.direct.";
/// The filter-state objects Envoy's forward proxy and TLS read, by name.
pub const DYNAMIC_HOST_STATE: &str = "envoy.upstream.dynamic_host";
pub const SERVER_NAME_STATE: &str = "envoy.network.upstream_server_name";
pub const SUBJECT_ALT_NAMES_STATE: &str = "envoy.network.upstream_subject_alt_names";

/// Hosts one shard's DNS cache may hold: far above what a shard gets at
/// 1,000,000 origins over the default shards, so no origin is ever refused.
const MAX_HOSTS_PER_SHARD: u32 = 1_000_000;

/// The kind of forward-proxy cluster an origin needs: what Envoy cannot vary
/// per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DirectClass {
    pub scheme: Scheme,
    pub connect_timeout_ms: u32,
}

impl DirectClass {
    /// `origin-policy.direct.<scheme>.<connect timeout ms>.<shard>`
    pub fn cluster_name(&self, shard: u16) -> String {
        format!(
            "{DIRECT_CLUSTER_PREFIX}{}.{}.{shard}",
            self.scheme.as_str(),
            self.connect_timeout_ms
        )
    }
}

/// The shard an origin's host and port belong to. The hash must not change
/// between releases: a host moved to another shard is learnt again and its
/// health is forgotten.
pub fn shard_of(host: &str, port: u16, shards: u16) -> u16 {
    let h = stable_hash(host) ^ u64::from(port).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    u16::try_from(h % u64::from(shards.max(1))).unwrap_or(0)
}

/// The forward-proxy clusters of one class, as Envoy CDS resources.
pub fn shard_clusters(
    class: DirectClass,
    direct: DirectOrigins,
    settings: &Settings,
) -> Vec<Value> {
    (0..direct.shards)
        .map(|shard| shard_cluster(&class.cluster_name(shard), class, settings))
        .collect()
}

fn shard_cluster(name: &str, class: DirectClass, settings: &Settings) -> Value {
    let mut cache = json!({
        // One cache per shard: a cache shared by clusters would give every
        // one of them every host.
        "name": name,
        "dns_lookup_family": "V4_PREFERRED",
        "dns_refresh_rate": "60s",
        "max_hosts": MAX_HOSTS_PER_SHARD,
    });
    if let Some(resolver) = dns_resolver_config(settings) {
        cache["typed_dns_resolver_config"] = resolver;
    }
    let mut cluster = json!({
        "@type": CLUSTER_TYPE_URL,
        "name": name,
        "connect_timeout": duration_ms(class.connect_timeout_ms),
        "lb_policy": "CLUSTER_PROVIDED",
        "cluster_type": {
            "name": "envoy.clusters.dynamic_forward_proxy",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.clusters.dynamic_forward_proxy.v3.ClusterConfig",
                "dns_cache_config": cache,
                // The filter sets SNI and the name to check per request from
                // the policy (which need not be the Host); Envoy's auto_sni
                // would take the Host instead.
                "allow_insecure_cluster_options": true,
            },
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "upstream_http_protocol_options": {},
                "explicit_http_config": {"http_protocol_options": {}},
            },
        },
        "outlier_detection": outlier_detection(settings),
    });
    if class.scheme == Scheme::Https {
        // The name to check comes with each request (filter state).
        cluster["transport_socket"] = upstream_tls(settings, None);
    }
    cluster
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_stable_and_spread() {
        // A changed hash moves every origin to another shard: pinned.
        assert_eq!(shard_of("origin.example.net", 443, 64), 13);
        assert_eq!(shard_of("origin.example.net", 443, 1024), 845);
        let mut counts = vec![0u32; 64];
        for i in 0..64_000 {
            counts[usize::from(shard_of(&format!("o{i}.origins.test"), 443, 64))] += 1;
        }
        let (low, high) = (counts.iter().min(), counts.iter().max());
        assert!(low >= Some(&800) && high <= Some(&1200), "{counts:?}");
    }

    #[test]
    fn a_shard_is_a_forward_proxy_with_its_own_cache_and_health() {
        let settings = Settings::default();
        let class = DirectClass {
            scheme: Scheme::Https,
            connect_timeout_ms: 2500,
        };
        let clusters = shard_clusters(class, DirectOrigins { shards: 4 }, &settings);
        assert_eq!(clusters.len(), 4);
        let c = &clusters[3];
        assert_eq!(c["name"], "origin-policy.direct.https.2500.3");
        assert_eq!(c["connect_timeout"], "2.500s");
        let config = &c["cluster_type"]["typed_config"];
        assert_eq!(config["dns_cache_config"]["name"], c["name"]);
        assert_eq!(
            c["transport_socket"]["typed_config"]["common_tls_context"]["validation_context"]
                ["trusted_ca"]["filename"],
            settings.origin_ca_file
        );
        assert_eq!(
            c["outlier_detection"]["consecutive_5xx"],
            settings.origin_health.consecutive_failures
        );
    }
}
