//! How one request reaches its origin through a forward-proxy shard
//! (`settings.direct_origins`): the shard's cluster and the filter state
//! Envoy's forward proxy and TLS read.

use crate::envoy::direct::{
    shard_of, DirectClass, DYNAMIC_HOST_STATE, SERVER_NAME_STATE, SUBJECT_ALT_NAMES_STATE,
};
use crate::policy::settings::{DirectOrigins, Settings};
use crate::policy::Scheme;
use crate::request::decision::OriginTarget;

/// How one request reaches its origin without a cluster of its own: the
/// shard cluster the route goes to, and the filter-state values the forward
/// proxy and the TLS handshake read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectRoute<'a> {
    pub cluster: String,
    /// Looked up by the shard's DNS cache; the fixed address when `resolve`
    /// names one.
    pub host: &'a str,
    pub port: u16,
    /// Sent as SNI and checked against the certificate (HTTPS with a name).
    pub tls_name: Option<&'a str>,
}

impl<'a> DirectRoute<'a> {
    pub fn of(target: &'a OriginTarget<'_>, direct: DirectOrigins, settings: &'a Settings) -> Self {
        let host = settings
            .resolve
            .get(target.address)
            .map_or(target.address, String::as_str);
        let class = DirectClass {
            scheme: target.scheme,
            connect_timeout_ms: target.connect_timeout_ms,
        };
        DirectRoute {
            cluster: class.cluster_name(shard_of(host, target.port, direct.shards)),
            host,
            port: target.port,
            tls_name: match target.scheme {
                Scheme::Https => target.sni.as_deref(),
                Scheme::Http => None,
            },
        }
    }

    /// The filter-state objects to set, by name. The port travels with the
    /// host (`host:port`, as the forward proxy keys its hosts): one host call
    /// less than `envoy.upstream.dynamic_port`.
    pub fn filter_state(&self) -> Vec<(&'static str, String)> {
        let host = if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let mut out = vec![(DYNAMIC_HOST_STATE, host)];
        if let Some(name) = self.tls_name {
            out.push((SERVER_NAME_STATE, name.to_owned()));
            out.push((SUBJECT_ALT_NAMES_STATE, name.to_owned()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Tier;
    use std::borrow::Cow;

    fn target<'a>(scheme: Scheme, address: &'a str, sni: Option<&'a str>) -> OriginTarget<'a> {
        OriginTarget {
            tier: Tier::Primary,
            cluster: "origin:x",
            scheme,
            address,
            port: 8443,
            authority: Cow::Borrowed("www.example.com"),
            sni: sni.map(Cow::Borrowed),
            connect_timeout_ms: 2500,
            response_timeout_ms: 30_000,
        }
    }

    #[test]
    fn a_route_names_its_shard_and_what_envoy_reads() {
        let settings = Settings::default();
        let direct = DirectOrigins { shards: 64 };
        let t = target(Scheme::Https, "origin.example.net", Some("cdn.example.net"));
        let route = DirectRoute::of(&t, direct, &settings);
        let shard = shard_of("origin.example.net", 8443, 64);
        assert_eq!(
            route.cluster,
            format!("origin-policy.direct.https.2500.{shard}")
        );
        assert_eq!(
            route.filter_state(),
            vec![
                (DYNAMIC_HOST_STATE, "origin.example.net:8443".to_owned()),
                (SERVER_NAME_STATE, "cdn.example.net".to_owned()),
                (SUBJECT_ALT_NAMES_STATE, "cdn.example.net".to_owned()),
            ]
        );
        // Plain HTTP sends no name; a fixed address replaces the name looked up.
        let mut settings = Settings::default();
        settings
            .resolve
            .insert("origin.example.net".to_owned(), "192.0.2.7".to_owned());
        let t = target(Scheme::Http, "origin.example.net", None);
        let route = DirectRoute::of(&t, direct, &settings);
        assert_eq!(route.host, "192.0.2.7");
        assert_eq!(route.tls_name, None);
        assert_eq!(
            route.filter_state(),
            vec![(DYNAMIC_HOST_STATE, "192.0.2.7:8443".to_owned())]
        );
        // An IPv6 address is bracketed before its port.
        settings
            .resolve
            .insert("origin.example.net".to_owned(), "2001:db8::7".to_owned());
        let route = DirectRoute::of(&t, direct, &settings);
        assert_eq!(route.filter_state()[0].1, "[2001:db8::7]:8443");
    }
}
