//! A long run through one instance: linear memory must not grow after warm-up,
//! and every stream's context is released.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

#[test]
fn linear_memory_is_flat_over_many_requests() {
    let mut vm = common::example_vm();
    let hosts = [
        "www.example.com",
        "a.img.example.com",
        "nope.example.org",
        "redirect.example.com",
        "media.example.com",
    ];
    let statuses = ["200", "301", "200", "503", "404"];
    let run = |vm: &mut host_test::Vm, n: usize| {
        for i in 0..n {
            let host = hosts[i % hosts.len()];
            let status = statuses[(i / hosts.len()) % statuses.len()];
            let id = vm.open_tls_stream().unwrap();
            vm.request_headers(id, &common::get(host, "https"), true)
                .unwrap();
            if host == "www.example.com" {
                // Envoy retried: the answer is the secondary's.
                vm.set_stream_property(id, "upstream.request_attempt_count", 2u64.to_le_bytes())
                    .unwrap();
            }
            if vm.local_response(id).is_none() {
                vm.response_headers(id, &[(":status", status), ("content-length", "0")], true)
                    .unwrap();
            }
            vm.close_stream(id).unwrap();
        }
    };
    run(&mut vm, 5_000);
    let warm = vm.memory_bytes();
    let requests = std::env::var("LONG_RUN_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    run(&mut vm, requests);
    assert_eq!(
        vm.memory_bytes(),
        warm,
        "linear memory grew over {requests} requests"
    );
    assert!(vm.state().streams.is_empty(), "every stream was closed");
    vm.tick().unwrap();
    assert!(vm.metric("origin_policy.failover.retried").unwrap() >= (requests / 5) as u64);
}
