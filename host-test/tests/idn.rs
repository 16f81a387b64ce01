//! Internationalised domain names. The filter has no IDNA tables (Envoy only
//! hands it ASCII hosts); `origin-policy bundle` writes every host name of a
//! policy in punycode, so a bundled IDN policy loads and decides exactly as
//! `check` and `explain` (which have IDNA) said. A non-ASCII name given to
//! the filter without bundling is rejected like any invalid policy: logged
//! with its domain and JSON path, the other domains unaffected.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use host_test::{Filter, Vm};
use origin_policy_engine::documents::{DocumentKind, PolicyDocuments};
use origin_policy_engine::report::outcome_json;
use origin_policy_engine::{PolicySet, ViewerRequest};
use serde_json::{json, Value};

/// Every field that names a host, each in Unicode and mixed case.
fn idn_documents() -> PolicyDocuments {
    let mut docs = PolicyDocuments::default();
    docs.add(
        DocumentKind::Settings,
        "settings.json".to_owned(),
        json!({"unknown_domain": {"action": "local_reply", "status": 404}, "decision_header": true}),
    );
    docs.add(
        DocumentKind::Policy,
        "buecher.json".to_owned(),
        json!({
            "domain": "Bücher.example",
            "primary": {"address": "Ursprung.bücher.example", "port": 443},
            "secondary": {"address": "reserve.BÜCHER.example", "port": 80},
            "origin_host": {"mode": "custom", "value": "Laden.bücher.example:8443"},
            "origin_sni": {"mode": "custom", "value": "zertifikat.bücher.example"}
        }),
    );
    docs.add(
        DocumentKind::Policy,
        "strasse.json".to_owned(),
        json!({
            "domain": "*.straße.example",
            "primary": {"address": "origin.straße.example"},
            "origin_host": {"mode": "origin_domain"}
        }),
    );
    docs.add(
        DocumentKind::Policy,
        "plain.json".to_owned(),
        json!({"domain": "plain.example.com",
               "primary": {"address": "plain-origin.example.net"}}),
    );
    docs
}

const HOST_FIELDS: [&str; 5] = [
    "/domain",
    "/primary/address",
    "/secondary/address",
    "/origin_host/value",
    "/origin_sni/value",
];

/// The cluster the filter named for a request, and the `x-origin-decision`
/// it wrote on the answer.
fn seen(vm: &mut Vm, host: &str) -> [Option<String>; 2] {
    let id = vm.open_tls_stream().unwrap();
    vm.request_headers(id, &common::get(host, "https"), true)
        .unwrap();
    vm.response_headers(id, &[(":status", "200")], false)
        .unwrap();
    let seen = [
        vm.upstream_header(id, "x-origin-cluster"),
        vm.response_header(id, "x-origin-decision"),
    ];
    vm.close_stream(id).unwrap();
    seen
}

/// The same from the native engine, which has IDNA.
fn decided(set: &PolicySet, host: &str) -> Option<String> {
    let request = ViewerRequest {
        authority: host,
        connection: Some(origin_policy_engine::Scheme::Https),
        method: "GET",
        ..ViewerRequest::default()
    };
    outcome_json(set, &set.decide(&request))["route_cluster"]
        .as_str()
        .map(str::to_owned)
}

#[test]
fn a_bundled_idn_policy_loads_in_the_filter_and_decides_as_check_did() {
    let docs = idn_documents();
    let (compiled, diagnostics) = docs.compile();
    assert!(!diagnostics.has_errors(), "{diagnostics}");
    let set = compiled.unwrap().set;

    let bundle = docs.plugin_config();
    for policy in bundle["policies"].as_array().unwrap() {
        for field in HOST_FIELDS {
            if let Some(name) = policy.pointer(field) {
                let name = name.as_str().unwrap();
                assert!(name.is_ascii(), "{field} bundled as {name}");
            }
        }
    }
    assert_eq!(bundle["policies"][0]["domain"], "xn--bcher-kva.example");
    assert_eq!(
        bundle["policies"][0]["origin_host"]["value"],
        "laden.xn--bcher-kva.example:8443"
    );

    let mut vm = Filter::shared()
        .unwrap()
        .start(&bundle.to_string())
        .unwrap();
    assert!(
        !vm.log_text().contains("policy rejected"),
        "{}",
        vm.log_text()
    );
    assert_eq!(vm.metric("origin_policy.policy.rejected").unwrap_or(0), 0);
    for host in [
        "xn--bcher-kva.example",
        "XN--BCHER-KVA.example.:443",
        "a.xn--strae-oqa.example",
        "plain.example.com",
    ] {
        let want = decided(&set, host);
        assert!(want.is_some(), "{host}: the engine routes it");
        assert_eq!(seen(&mut vm, host)[0], want, "{host}");
    }
    let decision = seen(&mut vm, "xn--bcher-kva.example")[1].clone().unwrap();
    assert!(
        decision.ends_with(
            "address=ursprung.xn--bcher-kva.example; scheme=https; port=443; \
             host=laden.xn--bcher-kva.example:8443; sni=zertifikat.xn--bcher-kva.example"
        ),
        "{decision}"
    );
    // The secondary is named in punycode too: its cluster is in the chain.
    let derived = set.derived_clusters();
    assert!(derived
        .origins
        .keys()
        .any(|name| name.starts_with("origin:http:reserve.xn--bcher-kva.example:80:")));
}

#[test]
fn the_example_policies_bundled_load_without_a_rejection() {
    let vm = common::example_vm();
    assert!(
        !vm.log_text().contains("policy rejected"),
        "{}",
        vm.log_text()
    );
    assert!(common::example_config().contains(r#""domain":"xn--bcher-kva.example""#));
}

/// `policies/` as written, without `origin-policy bundle`.
fn unbundled_examples() -> String {
    let docs = origin_policy_cli::files::read_dir(&common::policies_dir()).unwrap();
    let policies: Vec<&Value> = docs.policies.iter().map(|(_, v)| v).collect();
    json!({"settings": docs.settings, "policies": policies}).to_string()
}

#[test]
fn an_unbundled_non_ascii_domain_is_rejected_with_its_path_and_the_others_keep_serving() {
    let config = unbundled_examples();
    assert!(config.contains("bücher.example"));
    let mut vm = Filter::shared().unwrap().start(&config).unwrap();
    let log = vm.log_text();
    let rejection = log
        .lines()
        .find(|l| l.contains("policy rejected") && l.contains("bücher.example"))
        .unwrap_or_else(|| panic!("no rejection of bücher.example in:\n{log}"));
    for part in [
        ": /domain: ",
        "not ASCII",
        "punycode",
        "origin-policy bundle",
    ] {
        assert!(rejection.contains(part), "{part:?} in {rejection}");
    }
    assert_eq!(vm.metric("origin_policy.policy.rejected"), Some(1));
    assert_eq!(vm.metric("origin_policy.config.applied"), Some(1));
    // Its domain is not served...
    let id = vm.open_tls_stream().unwrap();
    vm.request_headers(id, &common::get("xn--bcher-kva.example", "https"), true)
        .unwrap();
    let reply = vm.local_response(id).unwrap();
    assert_eq!(reply.status, 404);
    vm.close_stream(id).unwrap();
    // ...and every other example domain is.
    for (host, cluster) in [
        (
            "plain.example.com",
            "origin:http:plain-origin.example.net:18081:",
        ),
        ("www.example.com", "chain:"),
        (
            "secure.example.com",
            "origin:https:origin-secure.example.net:18443:",
        ),
        (
            "cdn.img.example.com",
            "origin:https:img-origin.example.net:60080:",
        ),
    ] {
        let named = seen(&mut vm, host)[0].clone().unwrap_or_default();
        assert!(named.starts_with(cluster), "{host}: {named}");
    }
}

#[test]
fn a_non_ascii_name_in_any_host_field_is_rejected_at_its_path() {
    let config = json!({"policies": [
        {"domain": "xn--bcher-kva.example",
         "primary": {"address": "ursprung.bücher.example", "port": 443},
         "secondary": {"address": "reserve.bücher.example"},
         "origin_host": {"mode": "custom", "value": "laden.bücher.example:8443"},
         "origin_sni": {"mode": "custom", "value": "zertifikat.bücher.example"}},
        {"domain": "plain.example.com",
         "primary": {"address": "plain-origin.example.net"}}
    ]});
    let mut vm = Filter::shared()
        .unwrap()
        .start(&config.to_string())
        .unwrap();
    let log = vm.log_text();
    for path in &HOST_FIELDS[1..] {
        assert!(
            log.lines().any(|l| l.contains("policy rejected")
                && l.contains(": xn--bcher-kva.example: ")
                && l.contains(&format!(": {path}: "))
                && l.contains("not ASCII")),
            "no rejection at {path} in:\n{log}"
        );
    }
    assert_eq!(vm.metric("origin_policy.policy.rejected"), Some(1));
    let named = seen(&mut vm, "plain.example.com")[0].clone().unwrap();
    assert!(
        named.starts_with("origin:http:plain-origin.example.net:80:"),
        "{named}"
    );
}
