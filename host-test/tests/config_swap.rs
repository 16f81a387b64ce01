//! Configuration updates: atomic swap, in-flight requests keep their policy,
//! invalid updates rejected (whole envelope) or kept per domain.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use serde_json::json;

/// a.example.com's origin on `port`, b.example.com's on 9000.
fn config(port: u16) -> String {
    json!({"policies": [
        {"domain": "a.example.com", "primary": {"address": "o.example.net", "port": port}},
        {"domain": "b.example.com", "primary": {"address": "o.example.net", "port": 9000}}
    ]})
    .to_string()
}

/// An update whose a.example.com policy is invalid (port 0) and whose
/// b.example.com origin moves to port 9001.
fn invalid_a_new_b() -> String {
    json!({"policies": [
        {"domain": "a.example.com", "primary": {"address": "o.example.net", "port": 0}},
        {"domain": "b.example.com", "primary": {"address": "o.example.net", "port": 9001}}
    ]})
    .to_string()
}

/// The origin port in the cluster the filter named for a request
/// (`origin:http:o.example.net:PORT:hash`).
fn port_named(vm: &host_test::Vm, stream: u32) -> Option<u16> {
    vm.upstream_header(stream, "x-origin-cluster")?
        .split(':')
        .nth(3)?
        .parse()
        .ok()
}

const A: [(&str, &str); 4] = common::get("a.example.com", "http");

#[test]
fn an_update_mid_flight_leaves_the_in_flight_request_on_the_old_policy() {
    let mut vm = host_test::Filter::shared()
        .unwrap()
        .start(&config(8000))
        .unwrap();
    let in_flight = vm.open_stream().unwrap();
    vm.request_headers(in_flight, &A, true).unwrap();
    assert!(vm.configure(&config(8001)).unwrap());
    // The in-flight request's response phase still sees its own policy snapshot.
    vm.response_headers(in_flight, &[(":status", "301")], true)
        .unwrap();
    assert_eq!(
        vm.response_header(in_flight, "cache-control").as_deref(),
        Some("no-store")
    );
    assert_eq!(port_named(&vm, in_flight), Some(8000));
    let next = vm.open_stream().unwrap();
    vm.request_headers(next, &A, true).unwrap();
    assert_eq!(port_named(&vm, next), Some(8001));
    assert_eq!(vm.metric("origin_policy.config.applied"), Some(2));
}

#[test]
fn an_unusable_configuration_is_rejected_and_the_old_one_keeps_serving() {
    let mut vm = host_test::Filter::shared()
        .unwrap()
        .start(&config(8000))
        .unwrap();
    assert!(!vm.configure("{not json").unwrap());
    assert!(vm.log_text().contains("plugin configuration rejected"));
    assert_eq!(vm.metric("origin_policy.config.rejected"), Some(1));
    let id = vm.open_stream().unwrap();
    vm.request_headers(id, &A, true).unwrap();
    assert_eq!(port_named(&vm, id), Some(8000));
}

#[test]
fn an_invalid_policy_keeps_its_domain_on_the_last_good_one_and_others_update() {
    let mut vm = host_test::Filter::shared()
        .unwrap()
        .start(&config(8000))
        .unwrap();
    assert!(vm.configure(&invalid_a_new_b()).unwrap());
    let logs = vm.log_text();
    assert!(
        logs.contains("a.example.com: /primary/port: port 0 is outside 1-65535"),
        "{logs}"
    );
    assert!(
        logs.contains("a.example.com: keeping the last good policy"),
        "{logs}"
    );
    assert_eq!(vm.metric("origin_policy.policy.rejected"), Some(1));
    let a = vm.open_stream().unwrap();
    vm.request_headers(a, &A, true).unwrap();
    assert_eq!(port_named(&vm, a), Some(8000));
    let b = vm.open_stream().unwrap();
    vm.request_headers(b, &common::get("b.example.com", "http"), true)
        .unwrap();
    assert_eq!(port_named(&vm, b), Some(9001));
}

#[test]
fn unknown_domains_pass_through_without_a_viewer_chosen_cluster() {
    let cfg = json!({"settings": {"unknown_domain": {"action": "pass_through"}}, "policies": []});
    let mut vm = host_test::Filter::shared()
        .unwrap()
        .start(&cfg.to_string())
        .unwrap();
    let id = vm.open_stream().unwrap();
    let req = [
        (":authority", "x.example.org"),
        (":scheme", "http"),
        (":method", "GET"),
        (":path", "/"),
        ("x-origin-cluster", "internal_admin"),
    ];
    assert_eq!(
        vm.request_headers(id, &req, true).unwrap(),
        host_test::Action::Continue
    );
    assert!(vm.local_response(id).is_none());
    assert_eq!(vm.upstream_header(id, "x-origin-cluster"), None);
    assert_eq!(
        vm.upstream_header(id, ":authority").as_deref(),
        Some("x.example.org")
    );
}

#[test]
fn the_last_good_policy_survives_a_new_root_context() {
    // Envoy gives a changed plugin configuration a new root context in the
    // same VM; the old context's policies are not `self` there.
    let mut vm = host_test::Filter::shared()
        .unwrap()
        .start(&config(8000))
        .unwrap();
    assert!(vm.configure_new_root(&invalid_a_new_b()).unwrap());
    let a = vm.open_stream().unwrap();
    vm.request_headers(a, &A, true).unwrap();
    assert_eq!(port_named(&vm, a), Some(8000));
    assert!(vm
        .log_text()
        .contains("a.example.com: keeping the last good policy"));
}

#[test]
fn the_last_good_policy_survives_a_new_vm() {
    // A new `.wasm` starts new VMs, with no policies of their own; the last
    // good documents are kept in the process's shared data.
    let process = host_test::Filter::shared().unwrap().process();
    let old = process.start(&config(8000)).unwrap();
    drop(old);
    let serves_a_on_8000 = |vm: &mut host_test::Vm| {
        let a = vm.open_stream().unwrap();
        vm.request_headers(a, &A, true).unwrap();
        assert_eq!(port_named(vm, a), Some(8000), "{}", vm.log_text());
        let b = vm.open_stream().unwrap();
        vm.request_headers(b, &common::get("b.example.com", "http"), true)
            .unwrap();
        assert_eq!(port_named(vm, b), Some(9001));
    };
    // The new `.wasm` comes with a push whose a.example.com policy is invalid:
    // Envoy configures a VM on the main thread, then one per worker.
    let mut vms: Vec<_> = (0..3)
        .map(|_| process.start(&invalid_a_new_b()).unwrap())
        .collect();
    for vm in &mut vms {
        serves_a_on_8000(vm);
    }
    let logs: String = vms.iter().map(|vm| vm.log_text()).collect();
    assert_eq!(
        logs.matches("a.example.com: keeping the last good policy")
            .count(),
        1,
        "{logs}"
    );
    // Another swap with the same push: the store now holds the invalid
    // configuration and, apart, a.example.com's last good document.
    let key = "origin-policy.last-good.";
    let stored = process.shared_data().get("", key).unwrap().0;
    assert!(
        stored.len() < invalid_a_new_b().len() + config(8000).len(),
        "{} bytes",
        stored.len()
    );
    drop(vms);
    let mut again = process.start(&invalid_a_new_b()).unwrap();
    serves_a_on_8000(&mut again);
    // In another process nothing is known: the domain is dropped.
    let mut elsewhere = host_test::Filter::shared()
        .unwrap()
        .start(&invalid_a_new_b())
        .unwrap();
    let a = elsewhere.open_stream().unwrap();
    elsewhere.request_headers(a, &A, true).unwrap();
    assert_eq!(port_named(&elsewhere, a), None);
}

#[test]
fn a_new_vm_after_pushes_keeps_what_the_old_vms_kept() {
    let process = host_test::Filter::shared().unwrap().process();
    let mut old = process.start(&config(8000)).unwrap();
    // a.example.com is rejected, then b.example.com moves again: a stays on
    // its 8000 policy through both pushes.
    assert!(old.configure(&invalid_a_new_b()).unwrap());
    let third = invalid_a_new_b().replace("9001", "9002");
    assert!(old.configure(&third).unwrap());
    let mut new = process.start(&third).unwrap();
    for vm in [&mut old, &mut new] {
        let a = vm.open_stream().unwrap();
        vm.request_headers(a, &A, true).unwrap();
        assert_eq!(port_named(vm, a), Some(8000));
    }
    // The new VM's next push brings a valid a.example.com back.
    assert!(new.configure(&config(8100)).unwrap());
    let a = new.open_stream().unwrap();
    new.request_headers(a, &A, true).unwrap();
    assert_eq!(port_named(&new, a), Some(8100));
}
