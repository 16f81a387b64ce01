//! Every golden request -> decision case replayed through the release `.wasm`,
//! compared with the native engine on everything Envoy can observe.
//!
//! The one place they may differ is a raw UTF-8 Host: the engine here has IDNA
//! (as `explain` and the JavaScript package do), the filter has no IDNA tables.
//! Envoy never hands the filter such a Host; a case says what the filter
//! would answer in `filter_expect`, and has a punycode twin that every layer
//! replays identically.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;

use host_test::Action;
use origin_policy_engine::report::{outcome_json, request_from_json};
use origin_policy_engine::Scheme;
use serde_json::Value;

#[test]
fn golden_cases_through_the_wasm_match_the_engine() {
    let (compiled, _) = origin_policy_cli::files::read_dir(&common::policies_dir())
        .unwrap()
        .compile();
    let set = compiled.unwrap().set;
    let cases: Value = serde_json::from_slice(
        &std::fs::read(common::policies_dir().join("golden/cases.json")).unwrap(),
    )
    .unwrap();
    let mut vm = common::example_vm();
    let mut checked = 0;
    let mut filter_only = 0;
    let cases = cases["cases"].as_array().unwrap();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let spec = request_from_json(&case["request"]).unwrap();
        let mut engine = outcome_json(&set, &set.decide(&spec.as_request()));
        if let Some(filter) = case.get("filter_expect") {
            assert!(
                !spec.authority.is_ascii(),
                "{name}: only a raw UTF-8 Host may get another answer from the filter"
            );
            let twin = engine["viewer_host"].as_str().unwrap();
            assert!(
                cases
                    .iter()
                    .any(|c| c["request"]["authority"] == twin && c.get("filter_expect").is_none()),
                "{name}: no case replays the punycode twin `{twin}` in every layer"
            );
            engine = filter.clone();
            filter_only += 1;
        }
        let mut headers = vec![
            (":authority", spec.authority.as_str()),
            (":method", spec.method.as_str()),
            (":path", "/"),
        ];
        // The case's scheme is the viewer's connection: `:scheme` as the codec
        // sets it, and a TLS connection when it is https.
        if let Some(s) = spec.connection {
            headers.push((":scheme", s.as_str()));
        }
        if let Some(x) = &spec.x_forwarded_proto {
            headers.push(("x-forwarded-proto", x));
        }
        let id = if spec.connection == Some(Scheme::Https) {
            vm.open_tls_stream().unwrap()
        } else {
            vm.open_stream().unwrap()
        };
        let action = vm.request_headers(id, &headers, true).unwrap();
        match engine["outcome"].as_str().unwrap() {
            "origin" => {
                assert_eq!(action, Action::Continue, "{name}");
                let o = &engine["origin"];
                // What Envoy would see, next to the engine field it must equal.
                let observed = [
                    ("cluster", vm.upstream_header(id, "x-origin-cluster")),
                    ("authority", vm.upstream_header(id, ":authority")),
                    ("scheme", vm.upstream_header(id, ":scheme")),
                    (
                        "sni",
                        vm.filter_state(id, "envoy.network.upstream_server_name"),
                    ),
                    (
                        "sni",
                        vm.filter_state(id, "envoy.network.upstream_subject_alt_names"),
                    ),
                    (
                        "dynamic_host",
                        vm.filter_state(id, "envoy.upstream.dynamic_host"),
                    ),
                ];
                for (field, got) in observed {
                    assert_eq!(got.as_deref(), o[field].as_str(), "{name}: {field}");
                }
                if o["dynamic_host"].is_string() {
                    assert_eq!(
                        vm.filter_state(id, "envoy.upstream.dynamic_port"),
                        Some(o["port"].to_string()),
                        "{name}: dfp port"
                    );
                }
                for response in case["responses"].as_array().into_iter().flatten() {
                    let status = response["status"].as_u64().unwrap().to_string();
                    let rid = vm.open_stream().unwrap();
                    vm.request_headers(rid, &headers, true).unwrap();
                    let origin = [
                        (":status", status.as_str()),
                        ("cache-control", "max-age=3600"),
                    ];
                    let action = vm.response_headers(rid, &origin, false).unwrap();
                    let expect = &response["expect"];
                    if let Some(cc) = expect.get("cache_control") {
                        let want = cc.as_str().unwrap_or("max-age=3600");
                        assert_eq!(
                            vm.response_header(rid, "cache-control").as_deref(),
                            Some(want),
                            "{name} {status}"
                        );
                    }
                    if let Some(f) = expect.get("failover").and_then(Value::as_bool) {
                        assert_eq!(action == Action::Pause, f, "{name} {status}: failover");
                        assert_eq!(
                            vm.state().dispatched.iter().any(|c| c.context_id == rid),
                            f,
                            "{name} {status}"
                        );
                    }
                    if let Some(Value::String(err)) = expect.get("origin_error") {
                        if expect["failover"] != Value::Bool(true) {
                            let got = vm
                                .response_header(rid, "x-origin-error")
                                .unwrap_or_default();
                            assert!(got.starts_with(err.as_str()), "{name} {status}: {got}");
                        }
                    }
                    vm.close_stream(rid).unwrap();
                }
            }
            "unknown_domain" => {
                let reply = vm
                    .local_response(id)
                    .unwrap_or_else(|| panic!("{name}: expected a local reply"));
                assert_eq!(reply.status, 404, "{name}");
                assert!(
                    reply
                        .header("x-origin-error")
                        .unwrap()
                        .contains("no origin policy"),
                    "{name}"
                );
            }
            "bad_host" => {
                let reply = vm
                    .local_response(id)
                    .unwrap_or_else(|| panic!("{name}: expected a local reply"));
                assert_eq!(reply.status, 400, "{name}");
                let error = engine["error"].as_str().unwrap();
                assert_eq!(
                    reply.header("x-origin-error"),
                    Some(format!("bad host: {error}").as_str()),
                    "{name}"
                );
            }
            other => panic!("{name}: unexpected outcome {other}"),
        }
        vm.close_stream(id).unwrap();
        checked += 1;
    }
    assert!(checked >= 20);
    assert_eq!(filter_only, 1, "cases with `filter_expect`");
    assert!(vm.metric("origin_policy.decisions").unwrap() > 0);
}
