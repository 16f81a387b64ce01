//! Hostile and malformed input through the real `.wasm`: each case states what
//! the viewer gets. None may trap the VM; every case ends with a request that
//! still works, which would fail if an earlier one had killed it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use host_test::{Action, Filter, Vm};

const PLAIN: &str = "plain.example.com";

/// What the viewer got: a local reply (status, `x-origin-error`), or the
/// request went upstream (cluster header, `:authority` sent).
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Local(u32, String),
    Upstream {
        cluster: Option<String>,
        authority: Option<String>,
    },
}

fn send(vm: &mut Vm, headers: &[(&str, &str)]) -> Seen {
    send_over(vm, false, headers)
}

/// [`send`] over a plaintext or a TLS connection to the edge.
fn send_over(vm: &mut Vm, tls: bool, headers: &[(&str, &str)]) -> Seen {
    let id = if tls {
        vm.open_tls_stream().unwrap()
    } else {
        vm.open_stream().unwrap()
    };
    vm.request_headers(id, headers, true).unwrap();
    let seen = match vm.local_response(id) {
        Some(r) => Seen::Local(
            r.status,
            r.header("x-origin-error").unwrap_or_default().to_owned(),
        ),
        None => Seen::Upstream {
            cluster: vm.upstream_header(id, "x-origin-cluster"),
            authority: vm.upstream_header(id, ":authority"),
        },
    };
    vm.close_stream(id).unwrap();
    seen
}

fn with_host(host: &str) -> Vec<(&str, &str)> {
    vec![
        (":authority", host),
        (":scheme", "http"),
        (":method", "GET"),
        (":path", "/"),
    ]
}

/// The cluster the native engine names for `host` (the viewer on TLS or
/// not), from the example policies.
fn origin(host: &str, tls: bool) -> String {
    let scheme = if tls {
        origin_policy_engine::Scheme::Https
    } else {
        origin_policy_engine::Scheme::Http
    };
    common::example_clusters(host, scheme).swap_remove(0)
}

fn routed_to(cluster: &str, authority: &str) -> Seen {
    Seen::Upstream {
        cluster: Some(cluster.to_owned()),
        authority: Some(authority.to_owned()),
    }
}

fn still_serves(vm: &mut Vm) {
    assert_eq!(
        send(vm, &with_host(PLAIN)),
        routed_to(&origin(PLAIN, false), PLAIN),
        "the VM must survive every case before"
    );
}

#[test]
fn viewer_hosts() {
    let mut vm = common::example_vm();
    let long = "a".repeat(10 * 1024);
    let bad = |why: &str| Seen::Local(400, format!("bad host: {why}"));
    let cases: Vec<(&str, Seen)> = vec![
        ("", bad("host is empty")),
        ("plain.example.com:8080", routed_to(&origin(PLAIN, false), PLAIN)),
        ("PLAIN.Example.COM", routed_to(&origin(PLAIN, false), PLAIN)),
        ("plain.example.com.", routed_to(&origin(PLAIN, false), PLAIN)),
        ("plain.example.com.:80", routed_to(&origin(PLAIN, false), PLAIN)),
        (
            "[::1]:8080",
            Seen::Local(404, "no origin policy for host [::1]".to_owned()),
        ),
        (
            "127.0.0.1",
            Seen::Local(404, "no origin policy for host 127.0.0.1".to_owned()),
        ),
        (
            "plain%2eexample.com",
            bad("host is not a valid name: percent-encoding is not allowed in a host"),
        ),
        // Raw UTF-8 never reaches the filter in Envoy 1.40 (HTTP/1: Envoy's own
        // 400; HTTP/2: the connection is closed). The filter has no IDNA tables,
        // so if one ever did, it is a bad host, not a guess at its punycode.
        (
            "Bücher.example",
            bad("host is not ASCII and this build has no IDNA tables: write the name in punycode (xn--...) or let `origin-policy bundle` convert it"),
        ),
        // What viewers send: punycode, in any case, with port and trailing dot.
        (
            "xn--bcher-kva.example",
            routed_to(&origin("xn--bcher-kva.example", true), "xn--bcher-kva.example"),
        ),
        (
            "XN--BCHER-KVA.example.:443",
            routed_to(&origin("xn--bcher-kva.example", true), "xn--bcher-kva.example"),
        ),
        // Punycode is taken as written (only the tables could validate it):
        // invalid punycode names no policy, since `check` validates every
        // policy's names with IDNA.
        (
            "xn--a.example",
            Seen::Local(404, "no origin policy for host xn--a.example".to_owned()),
        ),
        (&long, bad("host is longer than 253 bytes")),
    ];
    for (host, want) in cases {
        let shown: String = host.chars().take(40).collect();
        assert_eq!(send(&mut vm, &with_host(host)), want, "Host {shown:?}");
    }
    for control in [
        "plain.example.com\r\nx-evil: 1",
        "plain\0.example.com",
        "a b.example.com",
    ] {
        match send(&mut vm, &with_host(control)) {
            Seen::Local(400, why) => assert!(why.starts_with("bad host: "), "{control:?}: {why}"),
            other => panic!("{control:?}: {other:?}"),
        }
    }
    vm.tick().unwrap();
    assert_eq!(vm.metric("origin_policy.bad_host"), Some(7));
    still_serves(&mut vm);
}

#[test]
fn missing_duplicate_and_disagreeing_hosts() {
    let mut vm = common::example_vm();
    let no_host = [(":scheme", "http"), (":method", "GET"), (":path", "/")];
    assert_eq!(
        send(&mut vm, &no_host),
        Seen::Local(400, "bad host: host is empty".to_owned())
    );
    // `host` alone (no `:authority`) is used.
    let host_only = [(":scheme", "http"), (":method", "GET"), ("host", PLAIN)];
    // Nothing to rewrite: the viewer's Host is the origin Host.
    assert_eq!(
        send(&mut vm, &host_only),
        Seen::Upstream {
            cluster: Some(origin(PLAIN, false)),
            authority: None
        }
    );
    let conflict = Seen::Local(400, "bad host: conflicting Host values".to_owned());
    // Envoy hands a filter one Host: repeated ones joined with a comma. A
    // policy that decides on the host alone reads only `:authority`.
    let joined = with_host("plain.example.com,www.example.com");
    assert_eq!(send(&mut vm, &joined), conflict);
    // Maps Envoy does not make, read whole for a `follow` policy: still refused.
    let two_hosts = [
        (":authority", "media.example.com"),
        (":authority", "www.example.com"),
        (":scheme", "http"),
        (":method", "GET"),
    ];
    assert_eq!(send(&mut vm, &two_hosts), conflict);
    let disagree = [
        (":authority", "media.example.com"),
        ("host", "secure.example.com"),
        (":scheme", "http"),
        (":method", "GET"),
    ];
    assert_eq!(send(&mut vm, &disagree), conflict);
    // The same name twice (any case) is not a conflict.
    let agree = [
        (":authority", PLAIN),
        ("host", "Plain.Example.com"),
        (":scheme", "http"),
        (":method", "GET"),
    ];
    assert_eq!(
        send(&mut vm, &agree),
        routed_to(&origin(PLAIN, false), PLAIN)
    );
    still_serves(&mut vm);
}

#[test]
fn schemes_the_filter_does_not_know_count_as_http() {
    let mut vm = common::example_vm();
    // media.example.com follows the viewer's scheme; the example settings trust
    // x-forwarded-proto (the shipped edge's cache tier sets it), and without a
    // usable one the viewer's connection decides, whatever `:scheme` says.
    for (scheme, tls, xfp, tls_origin) in [
        ("ftp", false, None, false),
        ("https", true, Some("gopher"), true),
        ("https", false, Some("gopher"), false),
        ("http", false, Some("https, http"), true),
        ("", false, None, false),
    ] {
        let cluster = origin("media.example.com", tls_origin);
        let mut headers = vec![
            (":authority", "media.example.com"),
            (":scheme", scheme),
            (":method", "GET"),
        ];
        if let Some(x) = xfp {
            headers.push(("x-forwarded-proto", x));
        }
        match send_over(&mut vm, tls, &headers) {
            Seen::Upstream { cluster: got, .. } => {
                assert_eq!(got, Some(cluster), "{scheme:?} / {xfp:?}")
            }
            other => panic!("{scheme:?}: {other:?}"),
        }
    }
    still_serves(&mut vm);
}

#[test]
fn without_trusted_x_forwarded_proto_only_the_connection_decides() {
    let config = common::example_config().replace(
        "\"trust_x_forwarded_proto\":true",
        "\"trust_x_forwarded_proto\":false",
    );
    assert!(config.contains("\"trust_x_forwarded_proto\":false"));
    let mut vm = Filter::shared().unwrap().start(&config).unwrap();
    let forged = |scheme, xfp| {
        vec![
            (":authority", "media.example.com"),
            (":scheme", scheme),
            (":method", "GET"),
            ("x-forwarded-proto", xfp),
        ]
    };
    // A plaintext viewer cannot make the edge fetch over TLS, and a TLS viewer
    // cannot make it fetch in cleartext, with either header.
    for (headers, tls) in [
        (forged("https", "https"), false),
        (forged("http", "http"), true),
    ] {
        let cluster = origin("media.example.com", tls);
        match send_over(&mut vm, tls, &headers) {
            Seen::Upstream { cluster: got, .. } => {
                assert_eq!(got, Some(cluster), "tls={tls}")
            }
            other => panic!("tls={tls}: {other:?}"),
        }
    }
}

#[test]
fn a_viewer_cannot_choose_the_cluster_or_forge_diagnostics() {
    let mut vm = common::example_vm();
    // A policy that decides on the host alone reads no other header: the
    // route drops a viewer's diagnostic headers (`request_headers_to_remove`,
    // deploy/e2e test_a_viewers_diagnostic_headers_never_reach_the_origin).
    let mut headers = with_host(PLAIN);
    headers.extend([
        ("x-origin-cluster", "www_secondary"),
        ("x-origin-error", "forged"),
    ]);
    let id = vm.open_stream().unwrap();
    vm.request_headers(id, &headers, true).unwrap();
    assert_eq!(
        vm.upstream_header(id, "x-origin-cluster"),
        Some(origin(PLAIN, false))
    );
    vm.close_stream(id).unwrap();
    // A policy read whole drops them itself.
    let mut headers = with_host("www.example.com");
    headers.extend([
        ("x-origin-cluster", "www_secondary"),
        ("x-origin-error", "forged"),
        ("x-origin-decision", "forged"),
    ]);
    let id = vm.open_stream().unwrap();
    vm.request_headers(id, &headers, true).unwrap();
    assert_eq!(
        vm.upstream_header(id, "x-origin-cluster").as_deref(),
        Some(
            common::example_clusters("www.example.com", origin_policy_engine::Scheme::Http)[0]
                .as_str()
        )
    );
    assert_eq!(vm.upstream_header(id, "x-origin-error"), None);
    assert_eq!(vm.upstream_header(id, "x-origin-decision"), None);
    vm.close_stream(id).unwrap();

    // Unknown host answered locally: the viewer's cluster header never routes.
    let mut unknown = with_host("nobody.example.org");
    unknown.push(("x-origin-cluster", "www_secondary"));
    assert!(matches!(send(&mut vm, &unknown), Seen::Local(404, _)));
    still_serves(&mut vm);
}

#[test]
fn odd_origin_responses() {
    let mut vm = common::example_vm();
    // No `:status` at all: passed on untouched, nothing decided about it.
    let id = vm.open_stream().unwrap();
    vm.request_headers(id, &with_host("www.example.com"), true)
        .unwrap();
    let action = vm
        .response_headers(id, &[("content-type", "text/plain")], false)
        .unwrap();
    assert_eq!(action, Action::Continue);
    assert!(vm.state().dispatched.is_empty());
    vm.close_stream(id).unwrap();

    // A 301 without `location` still gets the redirect rule.
    let id = vm.open_stream().unwrap();
    vm.request_headers(id, &with_host("redirect.example.com"), true)
        .unwrap();
    vm.response_headers(
        id,
        &[(":status", "301"), ("cache-control", "max-age=60")],
        true,
    )
    .unwrap();
    assert_eq!(
        vm.response_header(id, "cache-control").as_deref(),
        Some("no-store")
    );
    vm.close_stream(id).unwrap();

    // A 5xx with a huge body: Envoy retried or not, the answer streams
    // through and the filter only says what happened.
    let id = vm.open_stream().unwrap();
    vm.request_headers(id, &with_host("www.example.com"), true)
        .unwrap();
    let action = vm
        .response_headers(
            id,
            &[(":status", "503"), ("content-length", "104857600")],
            false,
        )
        .unwrap();
    assert_eq!(action, Action::Continue);
    let chunk = vec![b'x'; 1024 * 1024];
    for _ in 0..8 {
        assert_eq!(
            vm.response_body(id, &chunk, false).unwrap(),
            Action::Continue
        );
    }
    assert_eq!(
        vm.response_header(id, "x-origin-error").as_deref(),
        Some("orig response 503 error")
    );
    assert!(vm.state().dispatched.is_empty());
    vm.close_stream(id).unwrap();
    still_serves(&mut vm);
}

#[test]
fn retired_settings_are_refused_with_their_path_and_the_served_set_stays() {
    let mut vm = common::example_vm();
    for retired in [
        r#""max_secondary_response_bytes":1024"#,
        r#""dynamic_forward_proxy":{"http":"origin_dfp_http"}"#,
    ] {
        let config = common::example_config().replace(
            r#""max_replay_body_bytes":1048576"#,
            &format!(r#""max_replay_body_bytes":1048576,{retired}"#),
        );
        assert!(!vm.configure(&config).unwrap(), "{retired}");
        let name = retired.split('"').nth(1).unwrap();
        assert!(
            vm.log_text()
                .contains(&format!("/settings/{name}: `{name}` is no longer read")),
            "{}",
            vm.log_text()
        );
    }
    still_serves(&mut vm);
}

#[test]
fn oversized_or_duplicate_key_configurations_leave_the_served_set_alone() {
    let mut vm = common::example_vm();
    let huge = format!(
        r#"{{"policies": [], "settings": {{"cluster_header": "x-{}"}}}}"#,
        "a".repeat(origin_policy_engine::MAX_JSON_BYTES)
    );
    assert!(!vm.configure(&huge).unwrap());
    assert!(
        vm.log_text().contains("-byte limit for one JSON document"),
        "{}",
        vm.log_text()
    );
    let duplicate = r#"{"policies": [{"domain": "plain.example.com", "primary": {"address": "x.example", "address": "y.example"}}]}"#;
    assert!(!vm.configure(duplicate).unwrap());
    assert!(vm
        .log_text()
        .contains("duplicate key `address` in the object at `/policies/0/primary`"));
    assert_eq!(vm.metric("origin_policy.config.rejected"), Some(2));
    still_serves(&mut vm);
}
