//! Failover through the `.wasm`: the request headers that let Envoy retry
//! once on the next origin of the chain, and what the filter makes of the
//! answer from the properties Envoy reports (attempts, the answering endpoint).
//! Envoy itself retries, streams and marks origins down (deploy/e2e).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use host_test::{Action, Vm};

const GET: [(&str, &str); 4] = [
    (":authority", "www.example.com"),
    (":scheme", "http"),
    (":method", "GET"),
    (":path", "/page?q=1"),
];

/// The cluster header, primary and secondary clusters of www.example.com as
/// the engine derives them.
fn chain() -> (String, String, String) {
    match common::example_clusters("www.example.com", origin_policy_engine::Scheme::Http).as_slice()
    {
        [route, primary, secondary] => (route.clone(), primary.clone(), secondary.clone()),
        other => panic!("www.example.com: expected a two-origin chain, got {other:?}"),
    }
}

/// A request answered with `status`, after Envoy made `attempts` attempts and
/// the endpoint of `cluster` answered.
fn answered(
    vm: &mut Vm,
    request: &[(&str, &str)],
    status: &str,
    attempts: u64,
    cluster: &str,
) -> u32 {
    let id = vm.open_stream().unwrap();
    assert_eq!(
        vm.request_headers(id, request, true).unwrap(),
        Action::Continue
    );
    vm.set_stream_property(id, "upstream.request_attempt_count", attempts.to_le_bytes())
        .unwrap();
    let mut metadata = b"\n\x0dorigin_policy\x12\x2a".to_vec();
    metadata.extend_from_slice(cluster.as_bytes());
    vm.set_stream_property(id, "xds.upstream_host_metadata", metadata)
        .unwrap();
    let action = vm
        .response_headers(id, &[(":status", status), ("content-length", "5")], false)
        .unwrap();
    assert_eq!(action, Action::Continue, "the answer streams through");
    id
}

#[test]
fn a_get_names_the_chain_and_turns_on_one_retry() {
    let (route, _, _) = chain();
    let mut vm = common::example_vm();
    let id = vm.open_stream().unwrap();
    vm.request_headers(id, &GET, true).unwrap();
    assert_eq!(vm.upstream_header(id, "x-origin-cluster"), Some(route));
    assert_eq!(
        vm.upstream_header(id, "x-envoy-retry-on").as_deref(),
        Some("retriable-status-codes,connect-failure,refused-stream,reset")
    );
    assert_eq!(
        vm.upstream_header(id, "x-envoy-retriable-status-codes")
            .as_deref(),
        Some("500,502,503,504")
    );
    // policies/www.example.com.json: the primary's 3 s, then the secondary's 5 s.
    assert_eq!(
        vm.upstream_header(id, "x-envoy-upstream-rq-per-try-timeout-ms")
            .as_deref(),
        Some("3000")
    );
    assert_eq!(
        vm.upstream_header(id, "x-envoy-upstream-rq-timeout-ms")
            .as_deref(),
        Some("8000")
    );
    assert!(
        vm.state().dispatched.is_empty(),
        "Envoy re-sends, not the filter"
    );
}

#[test]
fn an_answer_from_the_secondary_names_both_origins() {
    let (_, _, secondary) = chain();
    let mut vm = common::example_vm();
    let id = answered(&mut vm, &GET, "200", 2, &secondary);
    assert_eq!(
        vm.response_header(id, "x-origin-error").as_deref(),
        Some("orig failed; failover=secondary")
    );
    let decision = vm.response_header(id, "x-origin-decision").unwrap();
    assert!(
        decision.contains("origin=secondary; address=backup.example.net; scheme=http; port=18085"),
        "{decision}"
    );
    vm.tick().unwrap();
    assert_eq!(vm.metric("origin_policy.failover.retried"), Some(1));
    assert_eq!(vm.metric("origin_policy.failover.succeeded"), Some(1));
}

#[test]
fn a_primary_marked_down_is_said_so() {
    let (_, _, secondary) = chain();
    let mut vm = common::example_vm();
    let id = answered(&mut vm, &GET, "200", 1, &secondary);
    assert_eq!(
        vm.response_header(id, "x-origin-error").as_deref(),
        Some("orig marked down; failover=secondary")
    );
    vm.tick().unwrap();
    assert_eq!(vm.metric("origin_policy.failover.marked_down"), Some(1));
}

#[test]
fn both_failing_names_both() {
    let (_, _, secondary) = chain();
    let mut vm = common::example_vm();
    let id = answered(&mut vm, &GET, "503", 2, &secondary);
    assert_eq!(
        vm.response_header(id, "x-origin-error").as_deref(),
        Some("orig failed; failover=secondary; secondary response 503 error")
    );
    vm.tick().unwrap();
    assert_eq!(vm.metric("origin_policy.failover.next_failed"), Some(1));
}

#[test]
fn post_is_not_failed_over_by_default() {
    let (_, primary, _) = chain();
    let mut vm = common::example_vm();
    let post = [
        (":authority", "www.example.com"),
        (":scheme", "http"),
        (":method", "POST"),
        (":path", "/order"),
        ("content-length", "7"),
    ];
    let id = answered(&mut vm, &post, "503", 1, &primary);
    assert_eq!(vm.upstream_header(id, "x-envoy-retry-on"), None);
    assert_eq!(
        vm.response_header(id, "x-origin-error").as_deref(),
        Some("orig response 503 error; failover=skipped (method POST)")
    );
    vm.tick().unwrap();
    assert_eq!(vm.metric("origin_policy.failover.skipped"), Some(1));
}

#[test]
fn a_body_over_the_replay_limit_is_not_failed_over() {
    let mut vm = common::example_vm();
    let id = vm.open_stream().unwrap();
    let big = [
        (":authority", "www.example.com"),
        (":scheme", "http"),
        (":method", "GET"),
        (":path", "/"),
        // settings.json: max_replay_body_bytes 1048576.
        ("content-length", "1048577"),
    ];
    vm.request_headers(id, &big, false).unwrap();
    assert_eq!(vm.upstream_header(id, "x-envoy-retry-on"), None);
}

#[test]
fn a_domain_without_a_secondary_names_its_origin_and_no_retry() {
    let mut vm = common::example_vm();
    let id = vm.open_stream().unwrap();
    vm.request_headers(id, &common::get("plain.example.com", "http"), true)
        .unwrap();
    let cluster = vm.upstream_header(id, "x-origin-cluster").unwrap();
    assert!(
        cluster.starts_with("origin:http:plain-origin.example.net:18081:"),
        "{cluster}"
    );
    assert_eq!(vm.upstream_header(id, "x-envoy-retry-on"), None);
    // The route's own timeout is the default response timeout: nothing to write.
    assert_eq!(
        vm.upstream_header(id, "x-envoy-upstream-rq-timeout-ms"),
        None
    );
}

fn envoy_reply_for(vm: &mut Vm, request: &[(&str, &str)], details: &str) -> u32 {
    let id = vm.open_stream().unwrap();
    vm.request_headers(id, request, true).unwrap();
    vm.set_stream_property(id, "response.code_details", details)
        .unwrap();
    vm.response_headers(id, &[(":status", "503")], false)
        .unwrap();
    id
}

#[test]
fn an_origin_that_never_answered_gets_502_or_504_with_the_cause() {
    let mut vm = common::example_vm();
    let plain = common::get("plain.example.com", "http");
    let refused = envoy_reply_for(
        &mut vm,
        &plain,
        "upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}",
    );
    assert_eq!(
        vm.response_header(refused, ":status").as_deref(),
        Some("502")
    );
    assert_eq!(
        vm.response_header(refused, "x-origin-error").as_deref(),
        Some("orig connect failed (Connection refused)")
    );
    let timeout = envoy_reply_for(&mut vm, &plain, "response_timeout");
    assert_eq!(
        vm.response_header(timeout, ":status").as_deref(),
        Some("504")
    );
    assert_eq!(
        vm.response_header(timeout, "x-origin-error").as_deref(),
        Some("orig response timeout")
    );
    vm.tick().unwrap();
    assert_eq!(vm.metric("origin_policy.origin_unreachable"), Some(2));
}

/// The edge's upstream RBAC (`settings.origin_networks`) refused the address
/// an origin's name resolved to: Envoy's 403 becomes 502 with the reason,
/// and only that RBAC's denials count; an origin's own 403 is its answer.
#[test]
fn an_origin_address_the_networks_refuse_gets_502_and_is_counted() {
    let mut vm = common::example_vm();
    let plain = common::get("plain.example.com", "http");
    let id = vm.open_stream().unwrap();
    vm.request_headers(id, &plain, true).unwrap();
    vm.set_stream_property(
        id,
        "response.code_details",
        "rbac_access_denied_matched_policy[origin-networks-edge]",
    )
    .unwrap();
    vm.response_headers(id, &[(":status", "403")], false)
        .unwrap();
    assert_eq!(vm.response_header(id, ":status").as_deref(), Some("502"));
    assert_eq!(
        vm.response_header(id, "x-origin-error").as_deref(),
        Some("origin address not allowed (the edge itself)")
    );
    let own = vm.open_stream().unwrap();
    vm.request_headers(own, &plain, true).unwrap();
    vm.set_stream_property(own, "response.code_details", "via_upstream")
        .unwrap();
    vm.response_headers(own, &[(":status", "403")], false)
        .unwrap();
    assert_eq!(vm.response_header(own, ":status").as_deref(), Some("403"));
    assert_eq!(vm.response_header(own, "x-origin-error"), None);
    vm.tick().unwrap();
    assert_eq!(vm.metric("origin_policy.origin_address_refused"), Some(1));
}
