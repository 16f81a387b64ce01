//! The host's per-stream properties and process-wide shared data: Envoy's
//! semantics checked directly on the host API, and what the real `.wasm`
//! does with them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use host_test::{Filter, SharedData, Status, Vm, TLS_VERSION, TLS_VERSION_PROPERTY};

const APPLIED: &str = "origin_policy.config.applied";

/// media.example.com follows the viewer's protocol; no `x-forwarded-proto`,
/// so only the connection can tell.
const MEDIA: [(&str, &str); 3] = [
    (":authority", "media.example.com"),
    (":method", "GET"),
    (":path", "/"),
];

fn cluster_for(vm: &mut Vm, id: u32) -> Option<String> {
    vm.request_headers(id, &MEDIA, true).unwrap();
    let cluster = vm.upstream_header(id, "x-origin-cluster");
    vm.close_stream(id).unwrap();
    cluster
}

// Per-stream properties.

#[test]
fn a_tls_stream_has_a_tls_version_and_a_plaintext_one_has_none() {
    let mut vm = common::example_vm();
    let tls = vm.open_tls_stream().unwrap();
    let plain = vm.open_stream().unwrap();
    assert_eq!(TLS_VERSION_PROPERTY, "connection.tls_version");
    assert_eq!(
        vm.property(tls, TLS_VERSION_PROPERTY),
        Some(TLS_VERSION.as_bytes())
    );
    assert_eq!(TLS_VERSION, "TLSv1.3");
    assert_eq!(vm.property(plain, TLS_VERSION_PROPERTY), None, "NotFound");
    assert_eq!(
        vm.property(0, TLS_VERSION_PROPERTY),
        None,
        "the root context has no connection"
    );
    assert_ne!(tls, plain);
}

/// media.example.com follows the viewer: its origin over TLS or not.
const MEDIA_OVER_TLS: &str = "origin:https:media-origin.example.net:18444:";
const MEDIA_OVER_HTTP: &str = "origin:http:media-origin.example.net:18082:";

#[test]
fn the_filter_reads_the_connection_of_its_own_stream() {
    let mut vm = common::example_vm();
    let plain = vm.open_stream().unwrap();
    let tls = vm.open_tls_stream().unwrap();
    // Both open at once: each callback sees its own stream's connection.
    assert!(cluster_for(&mut vm, tls)
        .unwrap()
        .starts_with(MEDIA_OVER_TLS));
    assert!(cluster_for(&mut vm, plain)
        .unwrap()
        .starts_with(MEDIA_OVER_HTTP));
}

#[test]
fn a_stream_property_is_set_on_an_open_stream_only() {
    let mut vm = common::example_vm();
    let id = vm.open_stream().unwrap();
    vm.set_stream_property(id, TLS_VERSION_PROPERTY, "TLSv1.2")
        .unwrap();
    assert_eq!(vm.property(id, TLS_VERSION_PROPERTY), Some(&b"TLSv1.2"[..]));
    assert!(cluster_for(&mut vm, id)
        .unwrap()
        .starts_with(MEDIA_OVER_TLS));
    assert!(
        vm.set_stream_property(id, TLS_VERSION_PROPERTY, "TLSv1.3")
            .is_err(),
        "the stream is closed"
    );
}

#[test]
fn a_stream_property_comes_before_the_vm_wide_one_for_that_stream_only() {
    let mut vm = common::example_vm();
    vm.state_mut()
        .properties
        .insert("x.y".into(), b"vm".to_vec());
    let own = vm.open_stream().unwrap();
    let other = vm.open_stream().unwrap();
    vm.set_stream_property(own, "x.y", b"stream").unwrap();
    assert_eq!(vm.property(own, "x.y"), Some(&b"stream"[..]));
    assert_eq!(vm.property(other, "x.y"), Some(&b"vm"[..]));
    assert_eq!(vm.property(0, "x.y"), Some(&b"vm"[..]));
}

#[test]
fn each_stream_gets_the_cause_of_its_own_failed_origin() {
    let mut vm = common::example_vm();
    // The VM-wide answer, for a stream that has none of its own.
    vm.state_mut().properties.insert(
        "response.code_details".into(),
        b"upstream_reset_before_response_started{connection_failure,TLS_error:_268435581:SSL_routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:TLS_error_end}".to_vec(),
    );
    let cases = [
        (Some("response_timeout"), "504", "orig response timeout"),
        (Some("via_upstream"), "503", "orig response 503 error"),
        (
            None,
            "502",
            "orig TLS handshake failed (CERTIFICATE_VERIFY_FAILED)",
        ),
    ];
    let request = common::get("secure.example.com", "https");
    let ids: Vec<u32> = cases
        .iter()
        .map(|(details, ..)| {
            let id = vm.open_tls_stream().unwrap();
            if let Some(d) = details {
                vm.set_stream_property(id, "response.code_details", d)
                    .unwrap();
            }
            vm.request_headers(id, &request, true).unwrap();
            id
        })
        .collect();
    for (id, (details, status, error)) in ids.into_iter().zip(cases) {
        vm.response_headers(id, &[(":status", "503")], false)
            .unwrap();
        assert_eq!(
            vm.response_header(id, ":status").as_deref(),
            Some(status),
            "{details:?}"
        );
        assert_eq!(
            vm.response_header(id, "x-origin-error").as_deref(),
            Some(error)
        );
    }
}

// Shared data: Envoy 1.40's semantics on the host API (what
// proxy_get_shared_data and proxy_set_shared_data answer).

#[test]
fn a_missing_key_is_not_found() {
    let data = SharedData::new();
    assert_eq!(data.get("", "nothing"), Err(Status::NotFound));
}

#[test]
fn a_set_on_a_missing_key_succeeds_whatever_the_cas() {
    let data = SharedData::new();
    assert_eq!(data.set("", "a", b"1", 0), Ok(()));
    assert_eq!(data.set("", "b", b"2", 12_345), Ok(()));
    assert_eq!(data.set("", "c", b"3", u32::MAX), Ok(()));
    assert_eq!(data.get("", "b").unwrap().0, b"2");
    assert_eq!(data.get("", "c").unwrap().0, b"3");
}

#[test]
fn cas_zero_always_succeeds_and_every_set_bumps_the_cas() {
    let data = SharedData::new();
    data.set("", "k", b"one", 0).unwrap();
    let (value, first) = data.get("", "k").unwrap();
    assert_eq!(value, b"one");
    assert_ne!(first, 0, "0 means no cas");
    data.set("", "k", b"two", 0).unwrap();
    let (value, second) = data.get("", "k").unwrap();
    assert_eq!(value, b"two");
    assert_ne!(second, first);
    assert_ne!(second, 0);
}

#[test]
fn a_stale_cas_is_a_mismatch_and_the_current_one_succeeds() {
    let data = SharedData::new();
    data.set("", "k", b"one", 0).unwrap();
    let (_, stale) = data.get("", "k").unwrap();
    data.set("", "k", b"two", stale).unwrap();
    let (_, current) = data.get("", "k").unwrap();
    assert_ne!(current, stale);
    assert_eq!(data.set("", "k", b"three", stale), Err(Status::CasMismatch));
    assert_eq!(
        data.get("", "k").unwrap(),
        (b"two".to_vec(), current),
        "a refused set changes nothing"
    );
    assert_eq!(data.set("", "k", b"three", current), Ok(()));
    assert_eq!(data.get("", "k").unwrap().0, b"three");
}

#[test]
fn cas_values_come_from_one_counter_for_the_process() {
    let data = SharedData::new();
    data.set("", "a", b"", 0).unwrap();
    data.set("other-vm", "b", b"", 0).unwrap();
    data.set("", "a", b"", 0).unwrap();
    let cas = |vm_id: &str, key: &str| data.get(vm_id, key).unwrap().1;
    assert_eq!(cas("other-vm", "b"), 2);
    assert_eq!(cas("", "a"), 3);
}

#[test]
fn shared_data_is_kept_per_vm_id_and_per_process() {
    let data = SharedData::new();
    data.set("a", "k", b"in a", 0).unwrap();
    assert_eq!(data.get("b", "k"), Err(Status::NotFound));
    assert_eq!(data.keys("a"), ["k"]);
    assert!(data.keys("b").is_empty());
    let handle = data.clone();
    assert_eq!(
        handle.get("a", "k").unwrap().0,
        b"in a",
        "a clone is the same store"
    );
    assert_eq!(SharedData::new().get("a", "k"), Err(Status::NotFound));
}

// Shared data through the real `.wasm`: VMs of one process.

#[test]
fn vms_of_one_process_see_one_shared_data() {
    let process = Filter::shared().unwrap().process();
    let config = common::example_config();
    let first = process.start(&config).unwrap();
    let second = process.start(&config).unwrap();
    assert_eq!(first.vm_id(), "");
    process
        .shared_data()
        .set("", "test.key", b"from the test", 0)
        .unwrap();
    for vm in [&first, &second] {
        assert_eq!(
            vm.shared_data().get(vm.vm_id(), "test.key").unwrap().0,
            b"from the test"
        );
    }
    // What the guest stored while configuring is there for both.
    let keys = process.shared_data().keys("");
    assert!(keys.len() > 1, "the filter stored nothing: {keys:?}");
    assert_eq!(second.shared_data().keys(""), keys);
}

#[test]
fn a_push_is_counted_once_per_process_and_metrics_stay_per_vm() {
    let filter = Filter::shared().unwrap();
    let process = filter.process();
    let config = common::example_config();
    // Envoy configures the main thread's VM first, then each worker's.
    let mut main = process.start(&config).unwrap();
    let mut worker = process.start(&config).unwrap();
    assert_eq!(main.metric(APPLIED), Some(1));
    assert_eq!(worker.metric(APPLIED), Some(0));
    assert!(main.log_text().contains("origin policies loaded"));
    assert!(!worker.log_text().contains("origin policies loaded"));

    // A new configuration is one more push: the compare-and-swap on the
    // existing key lets exactly one VM count it.
    let changed = common::example_config().replace("\"https_port\":18444", "\"https_port\":18445");
    assert_ne!(changed, config);
    assert!(main.configure(&changed).unwrap());
    assert!(worker.configure(&changed).unwrap());
    assert_eq!(main.metric(APPLIED), Some(2));
    assert_eq!(worker.metric(APPLIED), Some(0));

    // Another process, or a VM started alone, counts its own.
    assert_eq!(
        filter.process().start(&config).unwrap().metric(APPLIED),
        Some(1)
    );
    assert_eq!(filter.start(&config).unwrap().metric(APPLIED), Some(1));
}

#[test]
fn another_vm_id_in_the_same_process_has_its_own_shared_data() {
    let process = Filter::shared().unwrap().process();
    let config = common::example_config();
    let first = process.start(&config).unwrap();
    let other = process.with_vm_id("other").start(&config).unwrap();
    assert_eq!(other.vm_id(), "other");
    assert_eq!(first.metric(APPLIED), Some(1));
    assert_eq!(other.metric(APPLIED), Some(1), "not the same vm_id");
    assert_eq!(
        process.shared_data().keys("other"),
        process.shared_data().keys(""),
    );
}

#[test]
fn workers_on_their_own_threads_share_the_process() {
    let process = Filter::shared().unwrap().process();
    let config = common::example_config();
    let main = process.start(&config).unwrap();
    assert_eq!(main.metric(APPLIED), Some(1));
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (process, config) = (process.clone(), config.clone());
            std::thread::spawn(move || {
                let mut vm = process.start(&config).unwrap();
                let id = vm
                    .exchange(&common::get("www.example.com", "https"), "200")
                    .unwrap();
                assert!(vm.local_response(id).is_none(), "{}", vm.log_text());
                vm.metric(APPLIED)
            })
        })
        .collect();
    for worker in workers {
        assert_eq!(worker.join().unwrap(), Some(0));
    }
}
