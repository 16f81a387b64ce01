//! Status-code cache rules: 301/302 become uncacheable, a 200 is untouched,
//! and the diagnostic header is written only when there is something to say.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

const REDIRECT: &str = "redirect.example.com";

#[test]
fn redirects_are_marked_uncacheable_and_200_is_untouched() {
    let mut vm = common::example_vm();
    for (status, want) in [
        ("301", "no-store"),
        ("302", "no-store"),
        ("200", "max-age=3600"),
    ] {
        let id = vm.open_stream().unwrap();
        vm.request_headers(id, &common::get(REDIRECT, "http"), true)
            .unwrap();
        let origin = [
            (":status", status),
            ("location", "https://redirect.example.com/"),
            ("cache-control", "max-age=3600"),
        ];
        vm.response_headers(id, &origin, false).unwrap();
        let cc: Vec<_> = vm
            .stream(id)
            .unwrap()
            .response_headers
            .iter()
            .filter(|(n, _)| n == "cache-control")
            .collect();
        assert_eq!(cc.len(), 1, "{status}: one cache-control line");
        assert_eq!(cc[0].1, want, "{status}");
    }
    vm.tick().unwrap();
    assert_eq!(vm.metric("origin_policy.redirects_uncacheable"), Some(2));
}

#[test]
fn a_diagnostic_header_is_written_only_when_there_is_something_to_say() {
    // An origin's own copy is removed by the route (deploy/envoy/edge.yaml,
    // response_headers_to_remove; deploy/e2e/test_origin_rewrite.py), so the
    // filter spends no host call on answers that need no header.
    let mut vm = common::example_vm();
    let id = vm.open_stream().unwrap();
    vm.request_headers(id, &common::get(REDIRECT, "http"), true)
        .unwrap();
    vm.response_headers(id, &[(":status", "200")], false)
        .unwrap();
    assert_eq!(vm.response_header(id, "x-origin-error"), None);
    let id = vm.open_stream().unwrap();
    vm.request_headers(id, &common::get(REDIRECT, "http"), true)
        .unwrap();
    vm.response_headers(id, &[(":status", "502")], false)
        .unwrap();
    assert_eq!(
        vm.response_header(id, "x-origin-error").as_deref(),
        Some("orig response 502 error")
    );
}
