//! The per-request exchange, natively: the headers that turn on one failover,
//! weighted primaries, what an answer says about the origins, and the typed
//! `x-origin-error`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use origin_policy_engine::clusters::DerivedClusters;
use origin_policy_engine::direct::DirectOrigins;
use origin_policy_engine::{
    CacheControl, Exchange, FetchFailure, PolicySet, Scheme, UpstreamReport, ViewerRequest,
    PER_TRY_TIMEOUT_HEADER, RETRIABLE_STATUSES_HEADER, RETRY_ON_HEADER, TIMEOUT_HEADER,
};
use serde_json::{json, Value};

fn compile(policies: Value) -> PolicySet {
    let config = json!({
        "settings": {
            "max_replay_body_bytes": 1000,
            "decision_header": true,
            "origin_networks": {"allow": ["192.0.2.0/24"]}
        },
        "policies": policies,
    });
    let compiled = PolicySet::from_plugin_value(&config, None).unwrap();
    assert!(
        compiled.diagnostics.0.is_empty(),
        "{}",
        compiled.diagnostics
    );
    compiled.set
}

fn www() -> PolicySet {
    compile(json!([{
        "domain": "www.example.com",
        "primary": {"address": "primary.example.net", "port": 80, "response_timeout_ms": 2000},
        "secondary": {"address": "backup.example.net", "port": 8080, "response_timeout_ms": 5000},
        "origin_host": {"mode": "origin_domain"},
        "cache_status_ttl": {"200": 60}
    }]))
}

fn begin(set: &PolicySet, method: &str, body_bytes: Option<u64>) -> Exchange {
    let request = ViewerRequest {
        authority: "www.example.com",
        connection: Some(Scheme::Http),
        method,
        body_bytes,
        ..ViewerRequest::default()
    };
    let found = set.lookup(request.authority).unwrap();
    Exchange::begin(found, &request, &set.settings).unwrap()
}

fn header<'a>(headers: &'a [(&str, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn a_get_may_fail_over_once_with_the_origins_own_timeouts() {
    let set = www();
    let exchange = begin(&set, "GET", None);
    let d = exchange.decision().unwrap();
    assert!(d.route_cluster.starts_with("chain:"));
    assert_eq!(d.chain.len(), 1);
    assert_eq!(d.chain[0].authority, "backup.example.net:8080");
    let headers = exchange.decision().unwrap().route_headers();
    assert_eq!(
        header(&headers, RETRY_ON_HEADER),
        Some("retriable-status-codes,connect-failure,refused-stream,reset")
    );
    assert_eq!(
        header(&headers, RETRIABLE_STATUSES_HEADER),
        Some("500,502,503,504")
    );
    assert_eq!(header(&headers, PER_TRY_TIMEOUT_HEADER), Some("2000"));
    // The primary's response timeout, then the secondary's.
    assert_eq!(header(&headers, TIMEOUT_HEADER), Some("7000"));
}

#[test]
fn post_is_not_failed_over_and_says_so() {
    let set = www();
    let exchange = begin(&set, "POST", None);
    let headers = exchange.decision().unwrap().route_headers();
    assert_eq!(header(&headers, RETRY_ON_HEADER), None);
    assert_eq!(header(&headers, TIMEOUT_HEADER), Some("2000"));
    let verdict = exchange.on_response(UpstreamReport {
        status: 503,
        attempts: 1,
        ..UpstreamReport::default()
    });
    assert_eq!(
        verdict.origin_error.unwrap().to_string(),
        "orig response 503 error; failover=skipped (method POST)"
    );
}

#[test]
fn a_post_the_policy_allows_is_re_sent_only_on_a_connect_failure() {
    let set = compile(json!([{
        "domain": "www.example.com",
        "primary": {"address": "primary.example.net"},
        "secondary": {"address": "backup.example.net"},
        "failover": {"methods": ["GET", "POST"]}
    }]));
    let headers = begin(&set, "POST", None)
        .decision()
        .unwrap()
        .route_headers();
    assert_eq!(
        header(&headers, RETRY_ON_HEADER),
        Some("connect-failure,refused-stream")
    );
    assert_eq!(header(&headers, RETRIABLE_STATUSES_HEADER), None);
}

#[test]
fn a_body_over_the_replay_limit_is_not_failed_over() {
    let set = www();
    let exchange = begin(&set, "GET", Some(1001));
    assert_eq!(
        header(
            &exchange.decision().unwrap().route_headers(),
            RETRY_ON_HEADER
        ),
        None
    );
    let verdict = exchange.on_response(UpstreamReport {
        status: 502,
        attempts: 1,
        ..UpstreamReport::default()
    });
    assert_eq!(
        verdict.origin_error.unwrap().to_string(),
        "orig response 502 error; failover=skipped (request body over 1000 bytes)"
    );
    assert!(begin(&set, "GET", Some(1000))
        .decision()
        .unwrap()
        .route_headers()
        .iter()
        .any(|(n, _)| *n == RETRY_ON_HEADER));
}

/// Endpoint metadata as Envoy serialises it: the cluster name is in there.
fn metadata_naming(cluster: &str) -> Vec<u8> {
    let mut bytes = b"\n\x0corigin_policy\x12".to_vec();
    bytes.extend_from_slice(cluster.as_bytes());
    bytes
}

#[test]
fn an_answer_from_the_secondary_says_what_happened_to_the_primary() {
    let set = www();
    let exchange = begin(&set, "GET", None);
    let secondary = exchange.decision().unwrap().chain[0].cluster.to_owned();
    let meta = metadata_naming(&secondary);
    let retried = exchange.on_response(UpstreamReport {
        status: 200,
        attempts: 2,
        host_metadata: Some(&meta),
        failure: None,
    });
    assert_eq!(
        retried.origin_error.unwrap().to_string(),
        "orig failed; failover=secondary"
    );
    assert_eq!(retried.cache_control, Some(CacheControl::MaxAge(60)));
    assert!(retried
        .decision_header
        .unwrap()
        .contains("origin=secondary; address=backup.example.net"));
    let skipped = exchange.on_response(UpstreamReport {
        status: 200,
        attempts: 1,
        host_metadata: Some(&meta),
        failure: None,
    });
    assert_eq!(
        skipped.origin_error.unwrap().to_string(),
        "orig marked down; failover=secondary"
    );
}

#[test]
fn both_failing_names_both_and_the_proxys_503_becomes_502_or_504() {
    let set = www();
    let exchange = begin(&set, "GET", None);
    let meta = metadata_naming(exchange.decision().unwrap().chain[0].cluster);
    let refused = FetchFailure::from_code_details(
        "upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}",
    );
    let verdict = exchange.on_response(UpstreamReport {
        status: 503,
        attempts: 2,
        host_metadata: Some(&meta),
        failure: refused,
    });
    assert_eq!(verdict.status, Some(502));
    assert_eq!(
        verdict.origin_error.unwrap().to_string(),
        "orig failed; failover=secondary; secondary connect failed (Connection refused)"
    );
    let timeout = exchange.on_response(UpstreamReport {
        status: 504,
        attempts: 2,
        host_metadata: Some(&meta),
        failure: FetchFailure::from_code_details("upstream_per_try_timeout"),
    });
    assert_eq!(timeout.status, None, "already a 504");
    assert_eq!(
        timeout.origin_error.unwrap().to_string(),
        "orig failed; failover=secondary; secondary response timeout"
    );
}

#[test]
fn no_host_at_all_is_a_name_never_resolved_when_every_origin_is_looked_up_by_dns() {
    let no_host = || UpstreamReport {
        status: 503,
        attempts: 1,
        host_metadata: None,
        failure: FetchFailure::from_code_details("no_healthy_upstream"),
    };
    let by_dns = www();
    let verdict = begin(&by_dns, "GET", None).on_response(no_host());
    assert_eq!(verdict.status, Some(502));
    assert_eq!(
        verdict.origin_error.unwrap().to_string(),
        "orig dns failed (the origin's name has no address)"
    );
    // An origin with a fixed address always has its host: then every origin
    // of the request was marked down.
    let config = json!({
        "settings": {
            "resolve": {"primary.example.net": "192.0.2.1"},
            "origin_networks": {"allow": ["192.0.2.0/24"]}
        },
        "policies": [{
            "domain": "www.example.com",
            "primary": {"address": "primary.example.net"},
            "secondary": {"address": "192.0.2.2"}
        }],
    });
    let fixed = PolicySet::from_plugin_value(&config, None).unwrap().set;
    let verdict = begin(&fixed, "GET", None).on_response(no_host());
    assert_eq!(
        verdict.origin_error.unwrap().to_string(),
        "orig marked down, no origin left"
    );
}

#[test]
fn an_answer_from_the_primary_needs_no_header() {
    let set = www();
    let exchange = begin(&set, "GET", None);
    let meta = metadata_naming(exchange.decision().unwrap().target.cluster);
    let ok = exchange.on_response(UpstreamReport {
        status: 200,
        attempts: 1,
        host_metadata: Some(&meta),
        failure: None,
    });
    assert_eq!(ok.origin_error, None);
    assert!(ok.decision_header.unwrap().contains("origin=primary"));
}

#[test]
fn weighted_primaries_share_requests_and_each_starts_its_own_chain() {
    let set = compile(json!([{
        "domain": "www.example.com",
        "origins": [
            {"address": "a.example.net", "weight": 30},
            {"address": "b.example.net", "weight": 10},
            {"address": "c.example.net", "priority": "secondary"}
        ]
    }]));
    let pick = |spread: u32| {
        let request = ViewerRequest {
            authority: "www.example.com",
            method: "GET",
            spread,
            ..ViewerRequest::default()
        };
        let found = set.lookup(request.authority).unwrap();
        let exchange = Exchange::begin(found, &request, &set.settings).unwrap();
        let d = exchange.decision().unwrap();
        let chain: Vec<String> = d.chain.iter().map(|t| t.address.to_owned()).collect();
        (d.target.address.to_owned(), chain)
    };
    let mut from_a = 0;
    for spread in 0..400 {
        let (first, chain) = pick(spread);
        match first.as_str() {
            "a.example.net" => {
                from_a += 1;
                assert_eq!(chain, ["b.example.net", "c.example.net"]);
            }
            "b.example.net" => assert_eq!(chain, ["a.example.net", "c.example.net"]),
            other => panic!("a secondary started a request: {other}"),
        }
    }
    assert_eq!(from_a, 300, "30:10 by weight");
    let derived = DerivedClusters::of(set.index.policies().map(|p| p.as_ref()), None);
    assert_eq!(derived.origins.len(), 3);
    assert_eq!(derived.chains.len(), 2, "one chain per primary");
}

#[test]
fn domains_reaching_an_origin_the_same_way_share_its_cluster() {
    let set = compile(json!([
        {"domain": "a.example.com", "primary": {"address": "shared.example.net"},
         "origin_host": {"mode": "origin_domain"}},
        {"domain": "b.example.com", "primary": {"address": "shared.example.net"},
         "origin_host": {"mode": "origin_domain"}},
        // Another Host: another cluster, with its own endpoint hostname.
        {"domain": "c.example.com", "primary": {"address": "shared.example.net"}}
    ]));
    let derived = set.derived_clusters();
    assert_eq!(derived.origins.len(), 2);
    assert!(derived.chains.is_empty());
}

#[test]
fn with_direct_origins_a_chain_is_one_cluster_and_a_lone_origin_a_shard() {
    let mut set = compile(json!([
        {"domain": "lone.example.com", "primary": {"address": "lone.example.net"}},
        {"domain": "www.example.com",
         "primary": {"address": "a.example.net", "connect_timeout_ms": 2000},
         "secondary": {"address": "192.0.2.9", "connect_timeout_ms": 3000},
         "protocol": {"policy": "https"},
         "origin_host": {"mode": "custom", "value": "cdn.example.net"},
         "origin_sni": {"mode": "custom", "value": "cdn.example.net"}}
    ]));
    set.settings.direct_origins = Some(DirectOrigins { shards: 2 });
    let resources = set.derived_clusters().envoy_resources(&set.settings);
    let names: Vec<&str> = resources
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        names
            .iter()
            .filter(|n| n.starts_with("origin-policy.direct.http.10000."))
            .count(),
        2,
        "{names:?}"
    );
    assert!(!names.iter().any(|n| n.starts_with("origin:")), "{names:?}");
    let chain = resources
        .iter()
        .find(|c| c["name"].as_str().is_some_and(|n| n.starts_with("chain:")))
        .unwrap();
    // A name to look up: DNS; the longest connect timeout of the two.
    assert_eq!(chain["type"], "STRICT_DNS");
    assert_eq!(chain["connect_timeout"], "3.000s");
    let endpoints = chain["load_assignment"]["endpoints"].as_array().unwrap();
    let at = |i: usize| &endpoints[i]["lb_endpoints"][0];
    assert_eq!(endpoints[0]["priority"], 0);
    assert_eq!(
        at(0)["endpoint"]["address"]["socket_address"]["address"],
        "a.example.net"
    );
    assert_eq!(endpoints[1]["priority"], 1);
    assert_eq!(
        at(1)["endpoint"]["address"]["socket_address"]["address"],
        "192.0.2.9"
    );
    // Each origin's TLS, picked by its endpoint's metadata.
    let matches = chain["transport_socket_matches"].as_array().unwrap();
    assert_eq!(matches.len(), 2);
    for (i, m) in matches.iter().enumerate() {
        let origin =
            &at(i)["metadata"]["filter_metadata"]["envoy.transport_socket_match"]["origin"];
        assert_eq!(&m["match"]["origin"], origin);
        assert_eq!(
            m["transport_socket"]["typed_config"]["sni"],
            "cdn.example.net"
        );
    }
}
