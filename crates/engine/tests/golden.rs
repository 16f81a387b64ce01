//! Replays `policies/golden/cases.json` through the native engine.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![cfg(not(target_arch = "wasm32"))]

mod common;

use origin_policy_engine::report::{outcome_json, request_from_json};
use origin_policy_engine::{Exchange, Failover, PolicySet, UpstreamReport};
use serde_json::{json, Value};

#[test]
fn golden_cases_match_the_engine() {
    let root = common::repo_root().join("policies");
    let dir = common::read_policies(&root);
    let (compiled, diagnostics) = dir.compile();
    assert!(
        !diagnostics.has_errors(),
        "example policies must be valid:\n{diagnostics}"
    );
    let set = compiled.unwrap().set;
    let cases: Value =
        serde_json::from_slice(&std::fs::read(root.join("golden/cases.json")).unwrap()).unwrap();
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let request = request_from_json(&case["request"]).unwrap();
        let outcome = set.decide(&request.as_request());
        let mut found = Vec::new();
        subset_mismatches(
            &case["expect"],
            &outcome_json(&set, &outcome),
            "",
            &mut found,
        );
        for response in case["responses"].as_array().into_iter().flatten() {
            let status = u16::try_from(response["status"].as_u64().unwrap()).unwrap();
            let Some(answer) = response_json(&set, &request.as_request(), status) else {
                found.push(format!("response {status}: no origin decision"));
                continue;
            };
            let at = format!("/responses/{status}");
            subset_mismatches(&response["expect"], &answer, &at, &mut found);
        }
        failures.extend(found.into_iter().map(|f| format!("{name}: {f}")));
    }
    assert!(
        failures.is_empty(),
        "golden mismatches:\n{}",
        failures.join("\n")
    );
}

/// Lists where `actual` differs from `expected`, looking only at keys `expected` names.
fn subset_mismatches(expected: &Value, actual: &Value, path: &str, out: &mut Vec<String>) {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            for (k, ev) in e {
                let p = format!("{path}/{k}");
                match a.get(k) {
                    Some(av) => subset_mismatches(ev, av, &p, out),
                    None => out.push(format!("{p}: expected {ev}, missing")),
                }
            }
        }
        (e, a) if e != a => out.push(format!("{path}: expected {e}, got {a}")),
        _ => {}
    }
}

/// What the first origin's answer `status` leads to, as JSON: whether Envoy
/// is told to fail over on it, and what the filter writes into it.
fn response_json(
    set: &PolicySet,
    request: &origin_policy_engine::ViewerRequest<'_>,
    status: u16,
) -> Option<Value> {
    let found = set.lookup(request.authority).ok()?;
    let exchange = Exchange::begin(found, request, &set.settings).ok()?;
    let retried = matches!(
        exchange.decision()?.failover,
        Failover::Plan(plan) if plan.rule.triggers_on(status)
    );
    let verdict = exchange.on_response(UpstreamReport {
        status,
        attempts: 1,
        ..UpstreamReport::default()
    });
    Some(json!({
        "cache_control": verdict.cache_control.map(|c| c.to_string()),
        "failover": retried,
        "origin_error": verdict.origin_error.map(|e| e.to_string()),
    }))
}
