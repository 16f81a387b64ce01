//! Table-driven validation: every rule, its JSON path, and agreement with the JSON Schema.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![cfg(not(target_arch = "wasm32"))]

use origin_policy_engine::{parse_policy, PolicySet, PolicySource, Settings, Severity};
use serde_json::{json, Value};
mod common;

fn base() -> Value {
    json!({
        "domain": "www.example.com",
        "primary": {"address": "origin.example.net", "port": 80}
    })
}

fn with(patch: Value) -> Value {
    let mut doc = base();
    for (k, v) in patch.as_object().unwrap() {
        if v.is_null() {
            doc.as_object_mut().unwrap().remove(k);
        } else {
            doc[k] = v.clone();
        }
    }
    doc
}

/// (name, document, expected findings as (severity, JSON path, message fragment),
/// whether the JSON Schema can see the problem).
type Finding = (Severity, &'static str, &'static str);
type Case = (&'static str, Value, Vec<Finding>, bool);

fn cases() -> Vec<Case> {
    use Severity::{Error as E, Warning as W};
    vec![
        ("minimal policy is valid", base(), vec![], true),
        (
            "unknown top-level field",
            with(json!({"orign": 1})),
            vec![(E, "/orign", "unknown field")],
            true,
        ),
        (
            "unknown nested field",
            with(json!({"primary": {"address": "o.example.net", "prot": 80}})),
            vec![(E, "/primary/prot", "unknown field")],
            true,
        ),
        (
            "port 0",
            with(json!({"primary": {"address": "o.example.net", "port": 0}})),
            vec![(E, "/primary/port", "outside 1-65535")],
            true,
        ),
        (
            "port 70000",
            with(json!({"protocol": {"policy": "http", "http_port": 70000}})),
            vec![(E, "/protocol/http_port", "outside 1-65535")],
            true,
        ),
        (
            "port as string",
            with(json!({"protocol": {"https_port": "443"}})),
            vec![(E, "/protocol/https_port", "expected an integer")],
            true,
        ),
        (
            "empty domain",
            with(json!({"domain": ""})),
            vec![(E, "/domain", "empty")],
            true,
        ),
        (
            "domain with port",
            with(json!({"domain": "www.example.com:8080"})),
            vec![(E, "/domain", "must not carry a port")],
            true,
        ),
        (
            "inner wildcard",
            with(json!({"domain": "a.*.example.com"})),
            vec![(E, "/domain", "only a leading")],
            true,
        ),
        (
            "missing primary",
            with(json!({"primary": null})),
            vec![(E, "", "missing field `primary`")],
            true,
        ),
        (
            "address with space",
            with(json!({"primary": {"address": "bad name.example"}})),
            vec![(E, "/primary/address", "not allowed")],
            true,
        ),
        (
            "shortened IPv4 address",
            with(json!({"primary": {"address": "127.1"}})),
            vec![(E, "/primary/address", "not a dotted-quad IPv4 address, and Envoy would look it up as a DNS name that never resolves: write `127.0.0.1`")],
            false,
        ),
        (
            "zero-padded IPv4 address",
            with(json!({"secondary": {"address": "010.000.000.001"}})),
            vec![(E, "/secondary/address", "write `8.0.0.1`")],
            false,
        ),
        (
            "hex IPv4 address",
            with(json!({"origins": [{"address": "0x7f.0.0.1"}], "primary": null})),
            vec![(E, "/origins/0/address", "write `127.0.0.1`")],
            false,
        ),
        (
            "a name ending in a number that is no address",
            with(json!({"primary": {"address": "origin.example.256"}})),
            vec![(E, "/primary/address", "ends in a number but is not an IPv4 address")],
            false,
        ),
        (
            "half-bracketed IPv6 address",
            with(json!({"primary": {"address": "[2001:db8::1"}})),
            vec![(E, "/primary/address", "is not an IPv6 address")],
            false,
        ),
        (
            "address with a port",
            with(json!({"primary": {"address": "origin.example.net:8080"}})),
            vec![(E, "/primary/address", "must not carry a port: use `port`")],
            false,
        ),
        (
            "address label with a leading hyphen",
            with(json!({"primary": {"address": "-origin.example.net"}})),
            vec![(E, "/primary/address", "starts or ends with `-`")],
            false,
        ),
        (
            "address with an empty label",
            with(json!({"primary": {"address": "origin..example.net"}})),
            vec![(E, "/primary/address", "empty label")],
            false,
        ),
        (
            "custom host with CRLF",
            with(json!({"origin_host": {"mode": "custom", "value": "a.example\r\nx: y"}})),
            vec![(E, "/origin_host/value", "not allowed")],
            true,
        ),
        (
            "custom host without value",
            with(json!({"origin_host": {"mode": "custom"}})),
            vec![(E, "/origin_host", "needs a `value`")],
            true,
        ),
        (
            "unknown host mode",
            with(json!({"origin_host": {"mode": "viewer"}})),
            vec![(E, "/origin_host/mode", "unknown mode")],
            true,
        ),
        (
            "SNI with space",
            with(json!({"origin_sni": {"mode": "custom", "value": "a b"}})),
            vec![(E, "/origin_sni/value", "not allowed")],
            true,
        ),
        (
            "IP literal SNI",
            with(json!({"origin_sni": {"mode": "custom", "value": "10.0.0.1"}})),
            vec![(E, "/origin_sni/value", "IP address")],
            true,
        ),
        (
            "IPv6 literal SNI",
            with(json!({"origin_sni": {"mode": "custom", "value": "[2001:db8::1]"}})),
            vec![(E, "/origin_sni/value", "")],
            true,
        ),
        (
            "failover without secondary",
            with(json!({"failover": {"statuses": [503]}})),
            vec![(E, "/failover", "no `secondary`")],
            true,
        ),
        (
            "failover status out of range",
            with(json!({
            "secondary": {"address": "b.example.net"},
            "failover": {"statuses": [200]}})),
            vec![(E, "/failover/statuses/0", "outside 400-599")],
            true,
        ),
        (
            "unknown failover method",
            with(json!({
            "secondary": {"address": "b.example.net"},
            "failover": {"methods": ["FETCH"]}})),
            vec![(E, "/failover/methods/0", "unknown method")],
            true,
        ),
        (
            // The secondary's TLS is checked by its own derived cluster.
            "secondary over HTTPS with its own SNI",
            with(json!({
                "secondary": {"address": "b.example.net", "port": 443},
                "origin_sni": {"mode": "custom", "value": "wrong-name.example.org"}})),
            vec![(W, "/origin_sni/value", "differs from the Host")],
            true,
        ),
        (
            "clusters are derived, not named",
            with(json!({"primary": {"address": "o.example.net", "clusters": {"http": "c"}}})),
            vec![(E, "/primary/clusters", "no longer read")],
            true,
        ),
        (
            "the failover timeout is the origin's",
            with(
                json!({"secondary": {"address": "b.example.net"}, "failover": {"timeout_ms": 100}}),
            ),
            vec![(E, "/failover/timeout_ms", "no longer read")],
            true,
        ),
        (
            "origins list with tiers and weights",
            with(json!({"primary": null, "origins": [
                {"address": "a.example.net", "weight": 3},
                {"address": "b.example.net", "weight": 1, "connect_timeout_ms": 3000},
                {"address": "c.example.net", "priority": "secondary", "response_timeout_ms": 60000}]})),
            vec![],
            true,
        ),
        (
            "origins list without a primary",
            with(
                json!({"primary": null, "origins": [{"address": "c.example.net", "priority": "secondary"}]}),
            ),
            vec![(E, "/origins", "no origin has priority `primary`")],
            true,
        ),
        (
            "origins and primary both",
            with(json!({"origins": [{"address": "c.example.net"}]})),
            vec![(E, "/origins", "not both")],
            true,
        ),
        (
            "weight and timeouts out of bounds",
            with(
                json!({"primary": {"address": "o.example.net", "weight": 0, "connect_timeout_ms": 60001, "response_timeout_ms": 99}}),
            ),
            vec![
                (E, "/primary/weight", "outside 1-100"),
                (E, "/primary/connect_timeout_ms", "outside 100-60000"),
                (E, "/primary/response_timeout_ms", "outside 100-300000"),
            ],
            true,
        ),
        (
            "priority outside an origins list",
            with(json!({"primary": {"address": "o.example.net", "priority": "secondary"}})),
            vec![(E, "/primary/priority", "belongs in an `origins` list")],
            true,
        ),
        (
            "cache key not a status",
            with(json!({"cache_status_ttl": {"abc": 0}})),
            vec![(E, "/cache_status_ttl/abc", "not an HTTP status")],
            true,
        ),
        (
            "negative TTL",
            with(json!({"cache_status_ttl": {"301": -1}})),
            vec![(E, "/cache_status_ttl/301", "outside 0-31536000")],
            true,
        ),
        (
            "every error at once",
            json!({"domain": "", "primary": {"address": "", "port": 0}, "bogus": true}),
            vec![
                (E, "/domain", "empty"),
                (E, "/primary/address", "empty"),
                (E, "/primary/port", "outside"),
                (E, "/bogus", "unknown field"),
            ],
            true,
        ),
        (
            "warning: HTTPS on port 80",
            with(
                json!({"primary": {"address": "o.example.net"}, "protocol": {"policy": "https", "https_port": 80}}),
            ),
            vec![(W, "/protocol/https_port", "HTTPS to port 80")],
            true,
        ),
        (
            "warning: HTTP on port 443",
            with(json!({"protocol": {"policy": "http", "http_port": 443}})),
            vec![(W, "/protocol/http_port", "plain HTTP to port 443")],
            true,
        ),
        (
            "warning: follow with no HTTPS port",
            with(
                json!({"primary": {"address": "o.example.net", "port": 8080}, "protocol": {"policy": "follow"}}),
            ),
            vec![(W, "/protocol/https_port", "may have no HTTPS port")],
            true,
        ),
        (
            "warning: SNI differs from Host",
            with(json!({
            "primary": {"address": "o.example.net", "port": 443},
            "origin_host": {"mode": "origin_domain"}, "origin_sni": {"mode": "custom", "value": "other.example.net"}})),
            vec![(W, "/origin_sni/value", "differs from the Host")],
            true,
        ),
    ]
}

fn schema() -> jsonschema::Validator {
    let path = common::repo_root().join("policies/policy.schema.json");
    let schema: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    jsonschema::validator_for(&schema).unwrap()
}

#[test]
fn each_rule_reports_its_path() {
    for (name, doc, expected, _) in cases() {
        let (policy, found) = parse_policy("test.json", &doc);
        for (severity, path, fragment) in &expected {
            assert!(
                found.iter().any(|d| d.severity == *severity
                    && d.path == *path
                    && d.message.contains(fragment)),
                "{name}: expected {severity} at {path} containing {fragment:?}, got {found:#?}"
            );
        }
        let errors = found
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .count();
        let expected_errors = expected.iter().filter(|e| e.0 == Severity::Error).count();
        assert_eq!(
            errors, expected_errors,
            "{name}: unexpected findings {found:#?}"
        );
        assert_eq!(policy.is_some(), expected_errors == 0, "{name}");
        for d in &found {
            assert_eq!(d.source, "test.json");
            let shown = d.to_string();
            assert!(
                shown.contains("test.json") && shown.contains(&d.path),
                "{name}: {shown}"
            );
        }
    }
}

#[test]
fn findings_name_the_domain() {
    let (_, found) = parse_policy(
        "a.json",
        &with(json!({"primary": {"address": "o.example.net", "port": 0}})),
    );
    assert_eq!(found[0].domain.as_deref(), Some("www.example.com"));
    assert!(found[0]
        .to_string()
        .starts_with("error: a.json: www.example.com: /primary/port: port 0"));
}

#[test]
fn schema_agrees_with_the_engine() {
    let validator = schema();
    for (name, doc, expected, schema_sees_it) in cases() {
        let engine_ok = !expected.iter().any(|e| e.0 == Severity::Error);
        let schema_ok = validator.is_valid(&doc);
        if schema_sees_it {
            assert_eq!(
                schema_ok, engine_ok,
                "{name}: schema and engine disagree on {doc}"
            );
        } else {
            assert!(
                schema_ok && !engine_ok,
                "{name}: expected a semantic-only error"
            );
        }
    }
}

#[test]
fn example_policies_satisfy_the_schema() {
    let validator = schema();
    let dir = common::repo_root().join("policies");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.extension().is_some_and(|e| e == "json")
            && name != "settings.json"
            && name != "policy.schema.json"
        {
            let doc: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            let errors: Vec<String> = validator
                .iter_errors(&doc)
                .map(|e| format!("{} {e}", e.instance_path))
                .collect();
            assert!(errors.is_empty(), "{name}: {errors:?}");
            seen += 1;
        }
    }
    assert!(seen >= 5);
}

#[test]
fn duplicate_domains_across_files_are_errors() {
    let a = base();
    let b = with(json!({"domain": "WWW.example.com."}));
    let sources = [
        PolicySource {
            source: "a.json".into(),
            document: &a,
        },
        PolicySource {
            source: "b.json".into(),
            document: &b,
        },
    ];
    let compiled = PolicySet::compile(Settings::default(), &sources, None);
    let dups: Vec<_> = compiled
        .diagnostics
        .errors()
        .filter(|d| d.message.contains("more than once"))
        .collect();
    assert_eq!(dups.len(), 2, "{}", compiled.diagnostics);
    assert!(dups[0].message.contains("a.json") && dups[0].message.contains("b.json"));
    assert_eq!(compiled.set.index.len(), 0);
}

#[test]
fn a_rejected_update_keeps_the_last_good_policy_of_that_domain_only() {
    let good_www = base();
    let good_img = with(json!({"domain": "img.example.com"}));
    let first = PolicySet::compile(
        Settings::default(),
        &[
            PolicySource {
                source: "www.json".into(),
                document: &good_www,
            },
            PolicySource {
                source: "img.json".into(),
                document: &good_img,
            },
        ],
        None,
    );
    assert_eq!(first.set.index.len(), 2);
    let bad_www = with(json!({"primary": {"address": "o.example.net", "port": 0}}));
    let new_img =
        with(json!({"domain": "img.example.com", "primary": {"address": "new.example.net"}}));
    let second = PolicySet::compile(
        Settings::default(),
        &[
            PolicySource {
                source: "www.json".into(),
                document: &bad_www,
            },
            PolicySource {
                source: "img.json".into(),
                document: &new_img,
            },
        ],
        Some(&first.set),
    );
    assert_eq!(second.kept_previous, vec!["www.example.com".to_owned()]);
    assert_eq!(second.rejected, 1);
    let www = second.set.index.lookup("www.example.com").unwrap().0;
    assert_eq!(www.policy.origins[0].port, 80, "last good www policy kept");
    let img = second.set.index.lookup("img.example.com").unwrap().0;
    assert_eq!(
        img.policy.origins[0].address, "new.example.net",
        "img updated"
    );
}

#[test]
fn plugin_config_envelope_errors() {
    for (bytes, fragment) in [
        (&b"not json"[..], "not valid JSON"),
        (b"[]", "expected a JSON object"),
        (b"{\"policies\": {}}", "must be an array"),
        (b"{\"settings\": {}}", "missing `policies`"),
        (
            b"{\"policies\": [], \"extra\": 1}",
            "unknown top-level field",
        ),
        (
            b"{\"policies\": [], \"settings\": {\"unknown_domain\": {\"action\": \"drop\"}}}",
            "pass_through",
        ),
    ] {
        let err = PolicySet::from_plugin_config(bytes, None).err().unwrap();
        assert!(err.to_string().contains(fragment), "{err}");
    }
}

/// The bundle names every host in ASCII (a filter without IDNA must load it)
/// and means exactly what was validated: each policy parses to the same model.
#[test]
fn bundling_writes_host_names_in_punycode_and_keeps_every_policy() {
    let root = common::repo_root();
    let mut docs = common::read_policies(&root.join("policies"));
    docs.extend(common::read_policies(&root.join("deploy/e2e/policies")));
    docs.add(
        origin_policy_engine::documents::DocumentKind::Policy,
        "idn.json".to_owned(),
        json!({
            "domain": "*.Straße.example.",
            "primary": {"address": "Ursprung.bücher.example", "port": 443},
            "secondary": {"address": "[2001:DB8::1]"},
            "origin_host": {"mode": "custom", "value": "Laden.bücher.example:8443"},
            "origin_sni": {"mode": "custom", "value": "zertifikat.bücher.example"}
        }),
    );
    let bundle = docs.plugin_config();
    let bundled = bundle["policies"].as_array().unwrap();
    assert_eq!(bundled.len(), docs.policies.len());
    let mut idn = 0;
    for ((source, written), bundled) in docs.policies.iter().zip(bundled) {
        let (Some(want), _) = parse_policy(source, written) else {
            panic!("{source} is invalid");
        };
        assert_eq!(
            parse_policy(source, bundled).0.as_ref(),
            Some(&want),
            "{source}"
        );
        for field in [
            "/domain",
            "/primary/address",
            "/secondary/address",
            "/origin_host/value",
            "/origin_sni/value",
        ] {
            if let Some(name) = bundled.pointer(field) {
                assert!(name.as_str().unwrap().is_ascii(), "{source}{field}: {name}");
                idn += usize::from(written.pointer(field) != Some(name));
            }
        }
    }
    assert!(idn >= 5, "only {idn} names rewritten");
    assert_eq!(bundled.last().unwrap()["domain"], "*.xn--strae-oqa.example");
}
