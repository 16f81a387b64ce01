//! What the filter does with facts Envoy 1.40 was seen to produce: every
//! worker's VM configured with the same push, repeated Host headers joined
//! with a comma, and what Envoy reports after a retry to a secondary it could
//! not reach.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use host_test::Filter;

#[test]
fn a_push_is_counted_and_logged_once_per_process() {
    let invalid = common::example_config().replace("\"port\":80", "\"port\":0");
    assert_ne!(invalid, common::example_config());
    let process = Filter::shared().unwrap().process();
    // Envoy configures a VM on the main thread and one per worker.
    let mut vms: Vec<_> = (0..3)
        .map(|_| process.start(&common::example_config()).unwrap())
        .collect();
    let total = |vms: &[host_test::Vm], name: &str| -> u64 {
        vms.iter().map(|vm| vm.metric(name).unwrap_or(0)).sum()
    };
    assert_eq!(total(&vms, "origin_policy.config.applied"), 1);
    for vm in &mut vms {
        assert!(vm.configure(&invalid).unwrap());
    }
    assert_eq!(total(&vms, "origin_policy.config.applied"), 2);
    let rejected = total(&vms, "origin_policy.policy.rejected");
    assert!(rejected >= 1, "the invalid policies are counted");
    let logging = vms
        .iter()
        .filter(|vm| vm.log_text().contains("policy rejected"))
        .count();
    assert_eq!(logging, 1, "the rejection is logged by one VM only");
    // A VM of another process counts the same push again.
    let other = Filter::shared().unwrap().process().start(&invalid).unwrap();
    assert_eq!(
        other.metric("origin_policy.policy.rejected"),
        Some(rejected)
    );
}

#[test]
fn host_values_joined_by_envoy_are_conflicting() {
    let mut vm = common::example_vm();
    let id = vm.open_stream().unwrap();
    vm.request_headers(
        id,
        &[
            (":authority", "plain.example.com,www.example.com"),
            (":scheme", "http"),
            (":method", "GET"),
        ],
        true,
    )
    .unwrap();
    let reply = vm.local_response(id).unwrap();
    assert_eq!(reply.status, 400);
    assert_eq!(
        reply.header("x-origin-error"),
        Some("bad host: conflicting Host values")
    );
}

#[test]
fn a_secondary_envoy_could_not_reach_after_a_retry_is_a_connect_failure() {
    let mut vm = common::example_vm();
    let id = vm.open_stream().unwrap();
    vm.request_headers(id, &common::get("www.example.com", "http"), true)
        .unwrap();
    // As Envoy reports a retry whose second attempt found nothing listening:
    // the attempt count as a 64-bit little-endian integer, the answering
    // endpoint's metadata (which names its cluster), and the reset details.
    vm.set_stream_property(id, "upstream.request_attempt_count", 2u64.to_le_bytes())
        .unwrap();
    let name = common::example_clusters("www.example.com", origin_policy_engine::Scheme::Http)
        .pop()
        .unwrap();
    assert!(
        name.starts_with("origin:http:backup.example.net:18085:"),
        "{name}"
    );
    vm.set_stream_property(id, "xds.upstream_host_metadata", name.as_bytes())
        .unwrap();
    vm.set_stream_property(
        id,
        "response.code_details",
        "upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}",
    )
    .unwrap();
    vm.response_headers(id, &[(":status", "503")], false)
        .unwrap();
    assert_eq!(vm.response_header(id, ":status").as_deref(), Some("502"));
    assert_eq!(
        vm.response_header(id, "x-origin-error").as_deref(),
        Some("orig failed; failover=secondary; secondary connect failed (Connection refused)")
    );
    vm.tick().unwrap();
    assert_eq!(vm.metric("origin_policy.failover.next_failed"), Some(1));
}

#[test]
fn a_post_skipped_for_its_method_is_counted() {
    let mut vm = common::example_vm();
    let id = vm.open_stream().unwrap();
    vm.request_headers(
        id,
        &[
            (":authority", "www.example.com"),
            (":scheme", "http"),
            (":method", "POST"),
        ],
        true,
    )
    .unwrap();
    vm.response_headers(id, &[(":status", "503")], false)
        .unwrap();
    assert_eq!(
        vm.response_header(id, "x-origin-error").as_deref(),
        Some("orig response 503 error; failover=skipped (method POST)")
    );
    vm.tick().unwrap();
    assert_eq!(vm.metric("origin_policy.failover.skipped"), Some(1));
}
