//! Failover on a primary 5xx: replay on the secondary, its reply delivered,
//! the secondary failing or timing out, ineligible methods, never twice.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use host_test::{Action, Vm};

const GET: [(&str, &str); 5] = [
    (":authority", "www.example.com"),
    (":scheme", "http"),
    (":method", "GET"),
    (":path", "/page?q=1"),
    ("x-viewer", "kept"),
];

fn primary_fails(vm: &mut Vm, request: &[(&str, &str)], body: Option<&[u8]>) -> (u32, Action) {
    let id = vm.open_stream().unwrap();
    vm.request_headers(id, request, body.is_none()).unwrap();
    if let Some(b) = body {
        vm.request_body(id, b, true).unwrap();
    }
    let action = vm
        .response_headers(id, &[(":status", "503"), ("content-length", "5")], false)
        .unwrap();
    (id, action)
}

#[test]
fn a_503_is_replayed_on_the_secondary_and_its_reply_delivered() {
    let mut vm = common::example_vm();
    let (id, action) = primary_fails(&mut vm, &GET, None);
    assert_eq!(action, Action::Pause);
    assert_eq!(
        vm.response_body(id, b"oops!", true).unwrap(),
        Action::Pause,
        "primary body is held back"
    );
    let call = vm.state().dispatched.last().unwrap().clone();
    assert_eq!(call.cluster, "www_secondary");
    assert_eq!(call.timeout_ms, 3000);
    assert_eq!(call.header(":path"), Some("/page?q=1"));
    assert_eq!(call.header(":authority"), Some("www.example.com"));
    assert_eq!(call.header("x-viewer"), Some("kept"));
    assert_eq!(
        call.header("x-origin-cluster"),
        None,
        "the cluster header is not replayed"
    );
    vm.http_call_response(
        call.token,
        Some(&[
            (":status", "200"),
            ("content-type", "text/html"),
            ("connection", "close"),
        ]),
        b"from secondary",
    )
    .unwrap();
    let reply = vm.local_response(id).unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, b"from secondary");
    assert_eq!(reply.header("content-type"), Some("text/html"));
    assert_eq!(
        reply.header("connection"),
        None,
        "hop-by-hop headers are dropped"
    );
    assert_eq!(
        reply.header("x-origin-error"),
        Some("orig response 503 error; failover=secondary")
    );
    assert_eq!(vm.metric("origin_policy.failover.started"), Some(1));
    assert_eq!(vm.metric("origin_policy.failover.succeeded"), Some(1));

    // The local reply passes through the filter again: it must not fail over twice.
    assert_eq!(
        vm.response_headers(id, &[(":status", "503")], true)
            .unwrap(),
        Action::Continue
    );
    assert_eq!(vm.state().dispatched.len(), 1);
}

#[test]
fn a_failing_secondary_gives_502_with_both_causes() {
    let mut vm = common::example_vm();
    let (id, _) = primary_fails(&mut vm, &GET, None);
    let token = vm.state().dispatched[0].token;
    vm.http_call_response(token, Some(&[(":status", "500")]), b"")
        .unwrap();
    let reply = vm.local_response(id).unwrap();
    assert_eq!(reply.status, 502);
    assert_eq!(
        reply.header("x-origin-error"),
        Some("orig response 503 error; failover=secondary; secondary response 500 error")
    );
    assert_eq!(
        vm.metric("origin_policy.failover.secondary_failed"),
        Some(1)
    );
}

#[test]
fn an_unreachable_secondary_gives_502() {
    let mut vm = common::example_vm();
    let (id, _) = primary_fails(&mut vm, &GET, None);
    let token = vm.state().dispatched[0].token;
    vm.http_call_response(token, None, b"").unwrap();
    let reply = vm.local_response(id).unwrap();
    assert_eq!(reply.status, 502);
    assert!(reply
        .header("x-origin-error")
        .unwrap()
        .ends_with("secondary connect failure"));
}

#[test]
fn a_secondary_timeout_gives_504() {
    let mut vm = common::example_vm();
    let (id, _) = primary_fails(&mut vm, &GET, None);
    let token = vm.state().dispatched[0].token;
    vm.advance_clock_ms(3_000);
    vm.http_call_response(token, None, b"").unwrap();
    let reply = vm.local_response(id).unwrap();
    assert_eq!(reply.status, 504);
    assert_eq!(
        reply.header("x-origin-error"),
        Some("orig response 503 error; failover=secondary; secondary timeout")
    );
    assert_eq!(
        vm.metric("origin_policy.failover.secondary_timeout"),
        Some(1)
    );
}

#[test]
fn post_is_not_failed_over_by_default() {
    let mut vm = common::example_vm();
    let post = [
        (":authority", "www.example.com"),
        (":scheme", "http"),
        (":method", "POST"),
        (":path", "/form"),
    ];
    let (id, action) = primary_fails(&mut vm, &post, Some(b"a=1"));
    assert_eq!(action, Action::Continue);
    assert!(vm.state().dispatched.is_empty());
    assert_eq!(
        vm.response_header(id, "x-origin-error").as_deref(),
        Some("orig response 503 error; failover=skipped (method POST)")
    );
}

#[test]
fn a_configured_post_failover_replays_the_body() {
    let config = serde_json::json!({
        "settings": {"max_replay_body_bytes": 16},
        "policies": [{
            "domain": "api.example.com",
            "primary": {"address": "a.example.net", "clusters": {"http": "api_a"}},
            "secondary": {"address": "b.example.net", "clusters": {"http": "api_b"}},
            "failover": {"methods": ["POST"]}
        }]
    });
    let mut vm = host_test::Filter::shared()
        .unwrap()
        .start(&config.to_string())
        .unwrap();
    let post = [
        (":authority", "api.example.com"),
        (":scheme", "http"),
        (":method", "POST"),
        (":path", "/x"),
        ("content-length", "9"),
    ];
    let (_, action) = primary_fails(&mut vm, &post, Some(b"name=edge"));
    assert_eq!(action, Action::Pause);
    let call = vm.state().dispatched[0].clone();
    assert_eq!(call.body, b"name=edge");
    assert_eq!(
        call.header("content-length"),
        None,
        "the host recomputes content-length"
    );

    // Over the replay limit: no failover, and the header says why.
    let (id, action) = primary_fails(&mut vm, &post, Some(b"0123456789abcdefXYZ"));
    assert_eq!(action, Action::Continue);
    assert_eq!(
        vm.response_header(id, "x-origin-error").as_deref(),
        Some("orig response 503 error; failover=skipped (request body over 16 bytes)")
    );
}

#[test]
fn statuses_outside_the_rule_and_domains_without_secondary_do_not_fail_over() {
    let mut vm = common::example_vm();
    let id = vm.open_stream().unwrap();
    vm.request_headers(id, &GET, true).unwrap();
    assert_eq!(
        vm.response_headers(id, &[(":status", "501")], true)
            .unwrap(),
        Action::Continue
    );
    let id = vm.open_stream().unwrap();
    vm.request_headers(id, &common::get("plain.example.com", "http"), true)
        .unwrap();
    assert_eq!(
        vm.response_headers(id, &[(":status", "503")], true)
            .unwrap(),
        Action::Continue
    );
    assert_eq!(
        vm.response_header(id, "x-origin-error").as_deref(),
        Some("orig response 503 error")
    );
    assert!(vm.state().dispatched.is_empty());
}

/// Envoy's own 503 when the origin never answered, as `response.code_details` names it.
fn envoy_reply_for(vm: &mut Vm, details: &str) {
    vm.state_mut()
        .properties
        .insert("response.code_details".into(), details.as_bytes().to_vec());
}

#[test]
fn an_origin_that_never_answered_gets_502_or_504_with_the_cause() {
    let mut vm = common::example_vm();
    let cases = [
        (
            "upstream_reset_before_response_started{connection_failure,TLS_error:_268435581:SSL_routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:TLS_error_end}",
            "502",
            "orig TLS handshake failed (CERTIFICATE_VERIFY_FAILED)",
        ),
        ("response_timeout", "504", "orig response timeout"),
        ("via_upstream", "503", "orig response 503 error"),
    ];
    for (details, status, error) in cases {
        envoy_reply_for(&mut vm, details);
        let id = vm.open_stream().unwrap();
        vm.request_headers(id, &common::get("secure.example.com", "https"), true)
            .unwrap();
        vm.response_headers(id, &[(":status", "503")], false)
            .unwrap();
        assert_eq!(vm.response_header(id, ":status").as_deref(), Some(status));
        assert_eq!(
            vm.response_header(id, "x-origin-error").as_deref(),
            Some(error)
        );
    }
    assert_eq!(vm.metric("origin_policy.origin_unreachable"), Some(2));
}

#[test]
fn a_refused_primary_fails_over_naming_the_connect_failure() {
    let mut vm = common::example_vm();
    envoy_reply_for(
        &mut vm,
        "upstream_reset_before_response_started{connection_failure,delayed_connect_error:_Connection_refused}",
    );
    let (id, action) = primary_fails(&mut vm, &GET, None);
    assert_eq!(action, Action::Pause);
    let call = vm.state().dispatched.last().unwrap().clone();
    vm.http_call_response(call.token, Some(&[(":status", "200")]), b"ok")
        .unwrap();
    let reply = vm.local_response(id).unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("x-origin-error"),
        Some("orig connect failed (Connection refused); failover=secondary")
    );
}
