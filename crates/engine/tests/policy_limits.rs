//! Hostile and extreme policy input: each gets a clear error (or works, at a
//! documented limit), never a panic, and a rejected push never half-applies.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![cfg(not(target_arch = "wasm32"))]

use origin_policy_engine::documents::parse_document;
use origin_policy_engine::{PolicySet, ViewerRequest, MAX_JSON_BYTES, MAX_POLICIES};
use serde_json::json;

fn config(policies: serde_json::Value) -> Vec<u8> {
    json!({ "policies": policies }).to_string().into_bytes()
}

fn load_error(bytes: &[u8]) -> String {
    match PolicySet::from_plugin_config(bytes, None) {
        Err(e) => e.to_string(),
        Ok(c) if c.diagnostics.has_errors() => c.diagnostics.to_string(),
        Ok(_) => panic!(
            "accepted: {}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        ),
    }
}

fn minimal(i: usize) -> String {
    format!(r#"{{"domain":"d{i}.example","primary":{{"address":"o.example"}}}}"#)
}

#[test]
fn empty_and_blank_files() {
    for text in ["", "  \n\t"] {
        let d = parse_document("empty.json", text.as_bytes()).unwrap_err();
        assert_eq!(d.source, "empty.json");
        assert!(d.message.contains("the document is empty"), "{}", d.message);
        assert!(load_error(text.as_bytes()).contains("the document is empty"));
    }
}

#[test]
fn a_document_over_the_size_limit_is_refused_before_parsing() {
    let mut big = Vec::with_capacity(100 * 1024 * 1024);
    big.extend_from_slice(b"{\"policies\": [");
    let one = minimal(0);
    while big.len() < 100 * 1024 * 1024 {
        big.extend_from_slice(one.as_bytes());
        big.push(b',');
    }
    big.extend_from_slice(one.as_bytes());
    big.extend_from_slice(b"]}");
    let err = load_error(&big);
    assert!(
        err.contains(&format!("{MAX_JSON_BYTES}-byte limit")),
        "{err}"
    );
    let d = parse_document("big.json", &big).unwrap_err();
    assert!(d.message.contains("byte limit"), "{}", d.message);
}

#[test]
fn a_million_domains_is_over_the_count_limit() {
    let policies: Vec<String> = (0..1_000_000).map(minimal).collect();
    let text = format!(r#"{{"policies":[{}]}}"#, policies.join(","));
    assert!(
        text.len() < MAX_JSON_BYTES,
        "the count limit, not the size limit"
    );
    let err = load_error(text.as_bytes());
    assert!(
        err.contains(&format!(
            "1000000 policies is over the limit of {MAX_POLICIES}"
        )),
        "{err}"
    );
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    let deep = format!(
        r#"{{"policies": [{{"domain": "a.example", "primary": {}}}]}}"#,
        "[".repeat(100_000) + &"]".repeat(100_000)
    );
    assert!(load_error(deep.as_bytes()).contains("recursion limit"));
}

#[test]
fn duplicate_keys_are_errors_with_their_path() {
    let text = br#"{"policies": [{"domain": "a.example", "primary": {"address": "o.example", "port": 80, "port": 443}}]}"#;
    let err = load_error(text);
    assert!(
        err.contains("duplicate key `port` in the object at `/policies/0/primary`"),
        "{err}"
    );
    let file =
        br#"{"domain": "a.example", "domain": "b.example", "primary": {"address": "o.example"}}"#;
    let d = parse_document("a.example.json", file).unwrap_err();
    assert!(
        d.message
            .contains("duplicate key `domain` in the object at `/`"),
        "{}",
        d.message
    );
}

#[test]
fn wrong_types_everywhere_are_each_reported() {
    let doc = json!([{
        "domain": 7,
        "primary": {"address": ["o"], "port": "80", "weight": "1"},
        "protocol": "https",
        "origin_host": {"mode": true},
        "cache_status_ttl": [],
        "failover": {"statuses": "5xx"}
    }]);
    let err = load_error(&config(doc));
    for path in [
        "/domain",
        "/primary/address",
        "/primary/port",
        "/primary/weight",
        "/protocol",
        "/origin_host/mode",
        "/cache_status_ttl",
    ] {
        assert!(err.contains(path), "{path} missing from:\n{err}");
    }
}

#[test]
fn every_field_at_its_limits() {
    let label = "a".repeat(63);
    let longest = format!("{label}.{label}.{label}.{}", "a".repeat(61));
    assert_eq!(longest.len(), 253);
    let at_limits = json!([{
        "domain": longest,
        "primary": {"address": "o.example", "port": 65535, "weight": 100,
                    "connect_timeout_ms": 60000, "response_timeout_ms": 300000},
        "secondary": {"address": "s.example", "port": 1, "weight": 1,
                      "connect_timeout_ms": 100, "response_timeout_ms": 100},
        "protocol": {"policy": "http", "http_port": 65535},
        "cache_status_ttl": {"100": 31536000, "599": 0},
        "failover": {"statuses": [400, 599]}
    }]);
    let set = PolicySet::from_plugin_config(&config(at_limits), None).unwrap();
    assert!(!set.diagnostics.has_errors(), "{}", set.diagnostics);
    let request = ViewerRequest {
        authority: &longest,
        connection: Some(origin_policy_engine::Scheme::Http),
        method: "GET",
        ..ViewerRequest::default()
    };
    assert!(matches!(
        set.set.decide(&request),
        origin_policy_engine::Outcome::Origin(_)
    ));

    for (patch, path) in [
        (json!({"domain": format!("a{longest}")}), "/domain"),
        (
            json!({"primary": {"address": "o.example", "port": 65536}}),
            "/primary/port",
        ),
        (
            json!({"failover": {"timeout_ms": 300001}}),
            "/failover/timeout_ms",
        ),
        (
            json!({"cache_status_ttl": {"200": 31536001}}),
            "/cache_status_ttl/200",
        ),
        (
            json!({"cache_status_ttl": {"99": 1}}),
            "/cache_status_ttl/99",
        ),
        (
            json!({"failover": {"statuses": [399]}}),
            "/failover/statuses/0",
        ),
    ] {
        let mut doc = json!({
            "domain": "x.example",
            "primary": {"address": "o.example", "clusters": {"http": "c"}},
            "secondary": {"address": "s.example", "clusters": {"http": "s"}}
        });
        for (k, v) in patch.as_object().unwrap() {
            doc[k] = v.clone();
        }
        let err = load_error(&config(json!([doc])));
        assert!(err.contains(path), "{patch}: {path} missing from:\n{err}");
    }
}

#[test]
fn a_rejected_envelope_changes_nothing() {
    let good = config(json!([{"domain": "a.example", "primary": {"address": "o.example"}}]));
    let previous = PolicySet::from_plugin_config(&good, None).unwrap().set;
    // Valid policies before a duplicate key: the whole push is refused, not the
    // part before the bad byte.
    let bad = br#"{"policies": [{"domain": "b.example", "primary": {"address": "o.example"}}, {"domain": "c.example", "domain": "d.example"}]}"#;
    assert!(PolicySet::from_plugin_config(bad, Some(&previous)).is_err());
    assert_eq!(previous.index.len(), 1);
}
