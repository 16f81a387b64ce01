//! `settings.direct_origins` in the filter: a request without a failover
//! chain names a forward-proxy shard and hands Envoy its origin as filter
//! state; a request with a chain is untouched by it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use origin_policy_engine::direct::{
    shard_of, DYNAMIC_HOST_STATE, SERVER_NAME_STATE, SUBJECT_ALT_NAMES_STATE,
};

#[test]
fn a_request_without_a_chain_names_its_shard_and_its_origin() {
    let mut vm = common::direct_vm();
    let id = vm.open_stream().unwrap();
    vm.request_headers(id, &common::get("secure.example.com", "http"), true)
        .unwrap();
    // origin-secure.example.net is resolved to 127.0.0.1 by the example settings.
    let shard = shard_of("127.0.0.1", 18443, 64);
    assert_eq!(
        vm.upstream_header(id, "x-origin-cluster").as_deref(),
        Some(format!("origin-policy.direct.https.10000.{shard}").as_str())
    );
    assert_eq!(
        vm.filter_state(id, DYNAMIC_HOST_STATE).as_deref(),
        Some("127.0.0.1:18443")
    );
    // SNI and the name checked: the origin's own name (origin_host rule).
    for key in [SERVER_NAME_STATE, SUBJECT_ALT_NAMES_STATE] {
        assert_eq!(
            vm.filter_state(id, key).as_deref(),
            Some("origin-secure.example.net"),
            "{key}"
        );
    }
    // No cluster writes the origin's Host: the filter does.
    assert_eq!(
        vm.upstream_header(id, ":authority").as_deref(),
        Some("origin-secure.example.net:18443")
    );
    assert_eq!(vm.stream(id).unwrap().route_cache_cleared, 1);
}

#[test]
fn plain_http_sends_no_name_and_a_chain_keeps_its_cluster() {
    let mut vm = common::direct_vm();
    let id = vm.open_stream().unwrap();
    vm.request_headers(id, &common::get("plain.example.com", "http"), true)
        .unwrap();
    assert_eq!(
        vm.filter_state(id, DYNAMIC_HOST_STATE).as_deref(),
        Some("127.0.0.1:18081")
    );
    assert_eq!(vm.filter_state(id, SERVER_NAME_STATE), None);
    assert_eq!(
        vm.upstream_header(id, ":authority").as_deref(),
        Some("plain.example.com")
    );

    let id = vm.open_stream().unwrap();
    vm.request_headers(id, &common::get("www.example.com", "http"), true)
        .unwrap();
    let cluster = vm.upstream_header(id, "x-origin-cluster").unwrap();
    assert!(cluster.starts_with("chain:"), "{cluster}");
    assert_eq!(vm.filter_state(id, DYNAMIC_HOST_STATE), None);
    assert_eq!(vm.stream(id).unwrap().route_cache_cleared, 0);
}
