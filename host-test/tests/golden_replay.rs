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
use origin_policy_engine::{OriginHost, Scheme};
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
                // What Envoy's router reads: the cluster (or chain) to use. A
                // Host of the policy's own and the SNI travel with the derived
                // cluster; the viewer's Host is passed on as matched.
                assert_eq!(
                    vm.upstream_header(id, "x-origin-cluster").as_deref(),
                    engine["route_cluster"].as_str(),
                    "{name}: route cluster"
                );
                // The filter writes the Host unless it is the origin's own
                // name, which Envoy writes from the origin's cluster.
                let policy = &set.lookup(&spec.authority).unwrap().policy.policy;
                let expected_authority = if policy.origin_host == OriginHost::OriginDomain {
                    spec.authority.as_str()
                } else {
                    engine["origin"]["authority"].as_str().unwrap()
                };
                assert_eq!(
                    vm.upstream_header(id, ":authority").as_deref(),
                    Some(expected_authority),
                    "{name}: :authority"
                );
                let eligible = engine["failover"]["eligible"] == Value::Bool(true);
                assert_eq!(
                    vm.upstream_header(id, "x-envoy-retry-on").is_some(),
                    eligible,
                    "{name}: one failover turned on exactly when the policy allows it"
                );
                for response in case["responses"].as_array().into_iter().flatten() {
                    let status = response["status"].as_u64().unwrap().to_string();
                    let rid = vm.open_stream().unwrap();
                    vm.request_headers(rid, &headers, true).unwrap();
                    let expect = &response["expect"];
                    if let Some(f) = expect.get("failover").and_then(Value::as_bool) {
                        // Envoy retries on the statuses this header lists.
                        let listed = vm
                            .upstream_header(rid, "x-envoy-retriable-status-codes")
                            .unwrap_or_default();
                        assert_eq!(
                            listed.split(',').any(|s| s == status),
                            f,
                            "{name} {status}: failover"
                        );
                    }
                    let origin = [
                        (":status", status.as_str()),
                        ("cache-control", "max-age=3600"),
                    ];
                    let action = vm.response_headers(rid, &origin, false).unwrap();
                    assert_eq!(action, Action::Continue, "{name} {status}");
                    if let Some(cc) = expect.get("cache_control") {
                        let want = cc.as_str().unwrap_or("max-age=3600");
                        assert_eq!(
                            vm.response_header(rid, "cache-control").as_deref(),
                            Some(want),
                            "{name} {status}"
                        );
                    }
                    if let Some(err) = expect.get("origin_error") {
                        assert_eq!(
                            vm.response_header(rid, "x-origin-error").as_deref(),
                            err.as_str(),
                            "{name} {status}"
                        );
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
    vm.tick().unwrap();
    assert!(vm.metric("origin_policy.decisions").unwrap() > 0);
}
