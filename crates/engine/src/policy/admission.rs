//! Admitting a policy under the edge's settings: each origin address it
//! names (or `settings.resolve` gives its name) against the origin networks,
//! on every port the policy can use.

use crate::policy::checks::port_for;
use crate::policy::diagnostic::PolicyDiagnostic;
use crate::policy::networks::RefusalReason;
use crate::policy::reader::Findings;
use crate::policy::settings::Settings;
use crate::policy::Policy;
use std::net::IpAddr;

/// Refuses every origin of `policy` the edge may not connect to on a port
/// the policy uses: an IP address as written, or the address
/// `settings.resolve` gives its name. Names looked up by DNS are checked
/// when Envoy resolves them (see docs/policies.md, "Origin networks").
pub fn check_policy_origins(
    policy: &Policy,
    settings: &Settings,
    source: &str,
) -> Vec<PolicyDiagnostic> {
    let mut f = Findings::new(source);
    f.set_domain(&policy.domain.display_name());
    for origin in &policy.origins {
        let resolved = settings.resolve.get(&origin.address);
        let Some(ip) = literal_ip(resolved.unwrap_or(&origin.address)) else {
            continue;
        };
        let refusal = policy.schemes_for(origin).into_iter().find_map(|scheme| {
            let port = port_for(policy, origin, scheme);
            settings
                .origin_networks
                .check(ip, port)
                .err()
                .map(|why| (scheme, port, why))
        });
        if let Some((scheme, port, why)) = refusal {
            let by = match resolved {
                Some(ip) => format!(" (`{ip}` by `settings.resolve`)"),
                None => String::new(),
            };
            let fix = match why.reason {
                RefusalReason::Edge(_) => "an origin is never the edge itself: name the origin server's own address",
                _ => "name the origin's public address; an edge that must fetch from this network lists it in `settings.origin_networks.allow`",
            };
            f.error_with_fix(
                &format!("{}/address", origin.path),
                format!(
                    "origin `{}`{by} on port {port} ({}) is not an address the edge fetches from: {why}",
                    origin.address,
                    scheme.as_str()
                ),
                fix,
            );
        }
    }
    f.into_list()
}

/// An origin address or `resolve` target as an IP address (IPv6 may be bracketed).
fn literal_ip(text: &str) -> Option<IpAddr> {
    text.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse::parse_policy;
    use crate::policy::settings::parse_settings;
    use serde_json::json;
    use serde_json::Value;

    fn findings(settings: Value, policy: Value) -> Vec<String> {
        let settings = parse_settings("settings.json", Some(&settings));
        assert!(settings.is_ok(), "{settings:?}");
        let settings = settings.unwrap_or_default();
        let (policy, _) = parse_policy("a.json", &policy);
        let Some(policy) = policy else {
            return vec!["the policy did not parse".to_owned()];
        };
        check_policy_origins(&policy, &settings, "a.json")
            .iter()
            .map(|d| format!("{} {}", d.path, d.message))
            .collect()
    }

    #[test]
    fn a_policy_naming_the_edge_a_private_network_or_metadata_is_refused_where_it_names_them() {
        let settings = json!({
            "resolve": {"inside.example.net": "10.0.0.5"},
            "origin_networks": {
                "allow": [
                    {"network": "127.0.0.1", "ports": ["18080-18099"]},
                    {"network": "10.0.0.0/8", "ports": [8443]}
                ],
                "edge": [{"network": "127.0.0.0/8", "ports": [9901, 18090]}]
            }
        });
        let policy = json!({
            "domain": "evil.example.com",
            "origins": [
                {"address": "127.0.0.1", "port": 9901},
                {"address": "169.254.169.254"},
                {"address": "inside.example.net", "priority": "secondary"},
                {"address": "::ffff:127.0.0.1", "port": 18085},
                {"address": "127.0.0.1", "port": 18090},
                {"address": "127.0.0.1", "port": 18085},
                {"address": "origin.example.net"}
            ]
        });
        let found = findings(settings, policy);
        assert_eq!(found.len(), 5, "{found:#?}");
        assert!(found[0].starts_with("/origins/0/address origin `127.0.0.1` on port 9901 (http)"));
        assert!(found[0].ends_with("127.0.0.1 is the edge itself (`settings.origin_networks.edge`: 127.0.0.0/8 port 9901,18090)"));
        assert!(found[1].contains("169.254.0.0/16 (link-local, cloud metadata services)"));
        assert!(found[2].starts_with(
            "/origins/2/address origin `inside.example.net` (`10.0.0.5` by `settings.resolve`)"
        ));
        assert!(found[3].contains("::ffff:0.0.0.0/96 (IPv4-mapped)"));
        assert!(found[4].contains("the edge itself"));
    }

    #[test]
    fn every_port_a_policy_may_use_is_checked() {
        let settings =
            json!({"origin_networks": {"allow": [{"network": "127.0.0.1", "ports": [18080]}]}});
        let follow = json!({
            "domain": "a.example.com",
            "primary": {"address": "127.0.0.1"},
            "protocol": {"policy": "follow", "http_port": 18080, "https_port": 18443}
        });
        let found = findings(settings, follow);
        assert_eq!(found.len(), 1);
        assert!(found[0].contains("on port 18443 (https)"), "{found:?}");
    }

    #[test]
    fn a_resolve_target_no_port_may_reach_is_a_settings_error() {
        let bad = json!({"resolve": {"origin.example.net": "169.254.169.254"}});
        let errors = parse_settings("settings.json", Some(&bad))
            .err()
            .unwrap_or_default();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].path, "/settings/resolve/origin.example.net");
        let allowed = json!({
            "resolve": {"origin.example.net": "10.1.2.3"},
            "origin_networks": {"allow": [{"network": "10.1.0.0/16", "ports": [8080]}]}
        });
        assert!(parse_settings("settings.json", Some(&allowed)).is_ok());
    }

    #[test]
    fn bad_networks_are_reported_with_their_pointer() {
        let bad = json!({"origin_networks": {
            "allow": ["10.0.0.1/8", {"network": "::1", "ports": ["9-1", 70000]}, 7],
            "edge": "127.0.0.1",
            "other": []
        }});
        let errors = parse_settings("settings.json", Some(&bad))
            .err()
            .unwrap_or_default();
        let paths: Vec<&str> = errors.iter().map(|d| d.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/settings/origin_networks/allow/0",
                "/settings/origin_networks/allow/1/ports/0",
                "/settings/origin_networks/allow/1/ports/1",
                "/settings/origin_networks/allow/2",
                "/settings/origin_networks/edge",
                "/settings/origin_networks/other",
            ]
        );
    }
}
