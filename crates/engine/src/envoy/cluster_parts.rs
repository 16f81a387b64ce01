//! The parts every origin cluster is built from, plain or forward proxy:
//! the TLS origins are checked with, origin health, the DNS resolvers and
//! Envoy's durations.

use crate::policy::settings::Settings;
use serde_json::{json, Value};

pub const CLUSTER_TYPE_URL: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

pub(crate) fn duration_ms(ms: u32) -> String {
    format!("{}.{:03}s", ms / 1000, ms % 1000)
}

/// Envoy's upstream TLS: the certificate checked against the CA bundle and,
/// with `name`, that name sent as SNI and required in the certificate.
pub(crate) fn upstream_tls(settings: &Settings, name: Option<&str>) -> Value {
    let mut validation = json!({"trusted_ca": {"filename": settings.origin_ca_file}});
    let mut tls = json!({
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
    });
    if let Some(sni) = name {
        tls["sni"] = json!(sni);
        validation["match_typed_subject_alt_names"] =
            json!([{"san_type": "DNS", "matcher": {"exact": sni}}]);
    }
    tls["common_tls_context"] = json!({"validation_context": validation});
    json!({"name": "envoy.transport_sockets.tls", "typed_config": tls})
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
