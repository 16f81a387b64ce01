//! One domain's policy checked in-process by the engine, under the edge's
//! settings, as `check` and the filter would: what the store keeps and the
//! clusters it needs, or the findings (domain, JSON pointer, fix).

use origin_policy_engine::clusters::DerivedClusters;
use origin_policy_engine::direct::{DirectClass, DIRECT_CLUSTER_PREFIX};
use origin_policy_engine::documents::{feed_policy, SETTINGS_FILE};
use origin_policy_engine::report::diagnostic_json;
use origin_policy_engine::{
    parse_json, parse_settings, Diagnostics, PolicyDiagnostic, Settings, Severity,
};
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

/// A cluster unit: its name and Envoy JSON (see [`ValidPolicy`]).
pub type ClusterUnit = (String, Arc<str>);

/// The settings every policy is checked under.
#[derive(Debug, Clone)]
pub struct EdgeSettings {
    /// As written (`{}` when there is none): the filter configuration carries it.
    pub document: Value,
    pub settings: Settings,
    /// Each forward-proxy class's shards, rendered once: every domain of a
    /// class shares them.
    direct_units: Arc<Mutex<HashMap<DirectClass, ClusterUnit>>>,
}

/// A policy that passed: its domain, its document as the feed sends it
/// (compact, host names in ASCII) and the cluster units it needs: (name,
/// Envoy JSON), where a unit is one cluster, or with `direct_origins` one
/// forward-proxy class's shards as a JSON array (every domain of that class
/// needs all of them: counted once, not 64 times a domain).
#[derive(Debug, Clone, PartialEq)]
pub struct ValidPolicy {
    pub domain: String,
    pub document: String,
    pub clusters: Vec<ClusterUnit>,
}

/// Why a policy was refused: every finding.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub domain: Option<String>,
    pub diagnostics: Vec<PolicyDiagnostic>,
}

impl Refusal {
    fn one(source: &str, domain: Option<&str>, path: &str, message: String, fix: &str) -> Self {
        let finding = PolicyDiagnostic {
            severity: Severity::Error,
            source: source.to_owned(),
            domain: domain.map(str::to_owned),
            path: path.to_owned(),
            message,
            fix: Some(fix.to_owned()),
        };
        Refusal {
            domain: domain.map(str::to_owned),
            diagnostics: vec![finding],
        }
    }

    /// The findings as the API answers them: severity, source, domain, JSON
    /// pointer, message, fix.
    pub fn findings(&self) -> Vec<Value> {
        self.diagnostics.iter().map(diagnostic_json).collect()
    }

    /// The findings as `check` prints them, one a line.
    pub fn text(&self) -> String {
        let lines: Vec<String> = self.diagnostics.iter().map(|d| d.to_string()).collect();
        lines.join("\n")
    }
}

impl EdgeSettings {
    /// `None`: no settings document (the defaults).
    pub fn parse(document: Option<&Value>) -> Result<EdgeSettings, Diagnostics> {
        let settings = parse_settings(SETTINGS_FILE, document).map_err(Diagnostics)?;
        Ok(EdgeSettings {
            document: document
                .cloned()
                .unwrap_or_else(|| Value::Object(Default::default())),
            settings,
            direct_units: Arc::default(),
        })
    }

    /// Checks one policy document. `domain`: the domain it is written to
    /// (the API's path), which the document's `domain` must name.
    pub fn validate(
        &self,
        source: &str,
        domain: Option<&str>,
        bytes: &[u8],
    ) -> Result<ValidPolicy, Refusal> {
        let value = parse_json(bytes).map_err(|e| {
            Refusal::one(
                source,
                domain,
                "",
                format!("not valid JSON: {e}"),
                "send one JSON object, the policy",
            )
        })?;
        let found = feed_policy(&self.settings, source, &value).map_err(|diagnostics| Refusal {
            domain: domain
                .map(str::to_owned)
                .or_else(|| diagnostics.iter().find_map(|d| d.domain.clone())),
            diagnostics,
        })?;
        let named = found.domain;
        if let Some(domain) = domain {
            if !named.eq_ignore_ascii_case(domain) {
                return Err(Refusal::one(
                    source,
                    Some(domain),
                    "/domain",
                    format!("the policy is for {named}, written to {domain}"),
                    "write a policy to the path of its own domain",
                ));
            }
        }
        let clusters = self.cluster_units(found.clusters);
        Ok(ValidPolicy {
            domain: named,
            document: found.document,
            clusters,
        })
    }
}

impl EdgeSettings {
    /// The clusters a policy needs, as units (see [`ValidPolicy`]).
    fn cluster_units(&self, derived: DerivedClusters) -> Vec<ClusterUnit> {
        let mut units = Vec::new();
        let direct = derived.direct.as_ref().map(|(d, _)| *d);
        for (d, classes) in derived.direct.iter() {
            for class in classes {
                let mut cache = self
                    .direct_units
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                let unit = cache.entry(*class).or_insert_with(|| {
                    let one = DerivedClusters {
                        direct: Some((*d, BTreeSet::from([*class]))),
                        ..DerivedClusters::default()
                    };
                    let shards = Value::Array(one.envoy_resources(&self.settings));
                    let name = format!(
                        "{DIRECT_CLUSTER_PREFIX}{}.{}",
                        class.scheme.as_str(),
                        class.connect_timeout_ms
                    );
                    (name, Arc::from(shards.to_string()))
                });
                units.push(unit.clone());
            }
        }
        let rest = DerivedClusters {
            direct: direct.map(|d| (d, BTreeSet::new())),
            ..derived
        };
        units.extend(
            rest.envoy_resources(&self.settings)
                .into_iter()
                .filter_map(|c| Some((c["name"].as_str()?.to_owned(), Arc::from(c.to_string())))),
        );
        units
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> EdgeSettings {
        EdgeSettings::parse(None).unwrap_or_else(|d| unreachable!("{d}"))
    }

    #[test]
    fn a_valid_policy_gives_its_document_and_clusters() {
        let doc = br#"{"domain": "Www.Example.com", "primary": {"address": "origin.example.net", "port": 80}}"#;
        let valid = settings().validate("api", Some("www.example.com"), doc);
        let valid = valid.unwrap_or_else(|r| unreachable!("{}", r.text()));
        assert_eq!(valid.domain, "www.example.com");
        assert!(!valid.clusters.is_empty());
        assert!(valid.document.starts_with('{'));
    }

    #[test]
    fn a_forward_proxy_class_is_one_unit_of_all_its_shards() {
        let direct = serde_json::json!({"direct_origins": {}});
        let settings = EdgeSettings::parse(Some(&direct)).unwrap_or_else(|d| unreachable!("{d}"));
        let doc = br#"{"domain": "a.example.com", "primary": {"address": "origin.example.net"}}"#;
        let valid = settings.validate("api", None, doc);
        let valid = valid.unwrap_or_else(|r| unreachable!("{}", r.text()));
        assert_eq!(
            valid.clusters.len(),
            1,
            "{:?}",
            valid.clusters.iter().map(|c| &c.0).collect::<Vec<_>>()
        );
        let (name, json) = &valid.clusters[0];
        assert!(name.starts_with("origin-policy.direct.http."), "{name}");
        let shards: Value = serde_json::from_str(json).unwrap_or_default();
        assert!(shards.as_array().is_some_and(|s| s.len() > 1), "{json}");
    }

    #[test]
    fn findings_name_the_domain_and_the_pointer() {
        let doc = br#"{"domain": "www.example.com", "primary": {"address": "origin.example.net", "port": 99999}}"#;
        let Err(refusal) = settings().validate("api", Some("www.example.com"), doc) else {
            unreachable!("port 99999 accepted")
        };
        assert!(refusal
            .findings()
            .iter()
            .any(|f| f["path"] == "/primary/port"));
        let Err(other) = settings().validate(
            "api",
            Some("img.example.com"),
            br#"{"domain": "www.example.com", "primary": {"address": "origin.example.net"}}"#,
        ) else {
            unreachable!("written to another domain's path")
        };
        assert_eq!(other.findings()[0]["path"], "/domain");
        let Err(bad) = settings().validate("api", Some("x.example"), b"{") else {
            unreachable!("not JSON accepted")
        };
        assert_eq!(bad.findings()[0]["domain"], "x.example");
    }
}
