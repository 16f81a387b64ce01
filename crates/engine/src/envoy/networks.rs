//! `settings.origin_networks` as Envoy applies it: an upstream RBAC filter
//! on the origin-fetch router, checking the address Envoy is about to
//! connect to, whatever the cluster type or how the name resolved.

#[cfg(test)]
use crate::policy::networks::v4;
use crate::policy::networks::{IpNetwork, NetworkRule, OriginNetworks, SPECIAL_PURPOSE};
use serde_json::{json, Value};
use std::net::Ipv4Addr;

/// The name of the edge's upstream RBAC filter (an ECDS resource) that
/// applies `settings.origin_networks` to the address Envoy connects to.
pub const NETWORKS_FILTER_NAME: &str = "origin-networks";
const RBAC_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
const UPSTREAM_IP_PORT_TYPE: &str =
    "type.googleapis.com/envoy.extensions.rbac.matchers.upstream_ip_port.v3.UpstreamIpPortMatcher";

/// The upstream RBAC's policies, one per reason an address is refused; the
/// name Envoy reports (`rbac_access_denied_matched_policy[NAME]`) says which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkPolicy {
    Edge,
    Denied,
    SpecialPurpose,
}

impl NetworkPolicy {
    const ALL: [NetworkPolicy; 3] = [
        NetworkPolicy::Edge,
        NetworkPolicy::Denied,
        NetworkPolicy::SpecialPurpose,
    ];

    pub fn name(self) -> &'static str {
        match self {
            NetworkPolicy::Edge => "origin-networks-edge",
            NetworkPolicy::Denied => "origin-networks-denied",
            NetworkPolicy::SpecialPurpose => "origin-networks-special-purpose",
        }
    }

    pub fn from_name(name: &str) -> Option<NetworkPolicy> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// What the viewer's `x-origin-error` says.
    pub fn describe(self) -> &'static str {
        match self {
            NetworkPolicy::Edge => "the edge itself",
            NetworkPolicy::Denied => "a denied network",
            NetworkPolicy::SpecialPurpose => "a special-purpose network",
        }
    }
}

/// Envoy's `upstream_ip_port` matchers for one rule: one per port range,
/// and for an IPv4 network also its IPv4-mapped IPv6 form, the address a
/// dual-stack resolver may give for the same host.
fn rule_matchers(rule: &NetworkRule) -> Vec<Value> {
    let mut networks = vec![rule.network];
    if let IpNetwork::V4 { base, prefix } = rule.network {
        networks.push(IpNetwork::V6 {
            base: Ipv4Addr::from_bits(base).to_ipv6_mapped().to_bits(),
            prefix: prefix + 96,
        });
    }
    let ports: Vec<Option<(u16, u16)>> = if rule.ports.is_empty() {
        vec![None]
    } else {
        rule.ports.iter().copied().map(Some).collect()
    };
    let mut out = Vec::new();
    for network in networks {
        let (address, prefix) = match network {
            IpNetwork::V4 { prefix, .. } | IpNetwork::V6 { prefix, .. } => {
                (network.base_address().to_string(), prefix)
            }
        };
        for range in &ports {
            let mut matcher = json!({
                "@type": UPSTREAM_IP_PORT_TYPE,
                "upstream_ip": {"address_prefix": address, "prefix_len": prefix},
            });
            // Envoy's matcher takes both ends as inclusive.
            if let Some((start, end)) = range {
                matcher["upstream_port_range"] = json!({"start": start, "end": end});
            }
            out.push(json!({"matcher": {
                "name": "envoy.rbac.matchers.upstream_ip_port",
                "typed_config": matcher,
            }}));
        }
    }
    out
}

fn any_of(rules: &[NetworkRule]) -> Option<Value> {
    let matchers: Vec<Value> = rules.iter().flat_map(rule_matchers).collect();
    (!matchers.is_empty()).then(|| json!({"or_rules": {"rules": matchers}}))
}

impl OriginNetworks {
    /// The edge's upstream RBAC filter configuration (Envoy's
    /// `envoy.extensions.filters.http.rbac.v3.RBAC`): the same verdict as
    /// [`OriginNetworks::check`], on the address Envoy is about to connect
    /// to, whatever the cluster type or how the name resolved.
    pub fn upstream_rbac(&self) -> Value {
        let special: Vec<NetworkRule> = SPECIAL_PURPOSE
            .iter()
            .map(|(network, _)| NetworkRule {
                network: *network,
                ports: Vec::new(),
            })
            .collect();
        let mut policies = serde_json::Map::new();
        for policy in NetworkPolicy::ALL {
            let permission = match policy {
                NetworkPolicy::Edge => any_of(&self.edge),
                NetworkPolicy::Denied => any_of(&self.deny),
                NetworkPolicy::SpecialPurpose => {
                    let special = any_of(&special);
                    match (special, any_of(&self.allow)) {
                        (Some(s), Some(allowed)) => {
                            Some(json!({"and_rules": {"rules": [s, {"not_rule": allowed}]}}))
                        }
                        (s, None) => s,
                        (None, Some(_)) => None,
                    }
                }
            };
            if let Some(permission) = permission {
                policies.insert(
                    policy.name().to_owned(),
                    json!({"permissions": [permission], "principals": [{"any": true}]}),
                );
            }
        }
        json!({
            "@type": RBAC_TYPE,
            "rules": {"action": "DENY", "policies": policies},
            "rules_stat_prefix": "origin_networks.",
        })
    }

    /// The ECDS file of the upstream RBAC filter.
    pub fn ecds_resource(&self) -> Value {
        json!({
            "resources": [{
                "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
                "name": NETWORKS_FILTER_NAME,
                "typed_config": self.upstream_rbac(),
            }]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upstream_rbac_denies_in_the_order_check_does() {
        let networks = OriginNetworks {
            allow: vec![NetworkRule {
                network: v4(127, 0, 0, 1, 32),
                ports: vec![(18080, 18089)],
            }],
            deny: Vec::new(),
            edge: vec![NetworkRule {
                network: v4(127, 0, 0, 0, 8),
                ports: vec![(9901, 9901)],
            }],
        };
        let rbac = networks.upstream_rbac();
        let policies = &rbac["rules"]["policies"];
        assert_eq!(rbac["rules"]["action"], "DENY");
        // No deny list: no policy for it (Envoy refuses an empty rule set).
        assert!(policies.get("origin-networks-denied").is_none());
        let edge = &policies["origin-networks-edge"]["permissions"][0]["or_rules"]["rules"];
        // The IPv4 network and its IPv4-mapped form.
        assert_eq!(edge.as_array().map(Vec::len), Some(2));
        assert_eq!(
            edge[1]["matcher"]["typed_config"]["upstream_ip"],
            json!({"address_prefix": "::ffff:127.0.0.0", "prefix_len": 104})
        );
        assert_eq!(
            edge[0]["matcher"]["typed_config"]["upstream_port_range"],
            json!({"start": 9901, "end": 9901})
        );
        let special =
            &policies["origin-networks-special-purpose"]["permissions"][0]["and_rules"]["rules"];
        let listed = special[0]["or_rules"]["rules"].as_array().map(Vec::len);
        let v4_count = SPECIAL_PURPOSE
            .iter()
            .filter(|(n, _)| matches!(n, IpNetwork::V4 { .. }))
            .count();
        assert_eq!(listed, Some(SPECIAL_PURPOSE.len() + v4_count));
        assert!(special[1]["not_rule"]["or_rules"].is_object());
    }
}
