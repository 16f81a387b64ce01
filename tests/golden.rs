//! Replays `policies/golden/cases.json` through the native engine.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![cfg(not(target_arch = "wasm32"))]

use origin_policy::bundle::read_dir;
use origin_policy::engine::Outcome;
use origin_policy::report::{outcome_json, request_from_json, response_json, subset_mismatches};
use serde_json::Value;
use std::path::Path;

#[test]
fn golden_cases_match_the_engine() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let dir = read_dir(&root).unwrap();
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
            let Outcome::Origin(decision) = &outcome else {
                found.push(format!("response {status}: no origin decision"));
                continue;
            };
            let at = format!("/responses/{status}");
            subset_mismatches(
                &response["expect"],
                &response_json(decision, status),
                &at,
                &mut found,
            );
        }
        failures.extend(found.into_iter().map(|f| format!("{name}: {f}")));
    }
    assert!(
        failures.is_empty(),
        "golden mismatches:\n{}",
        failures.join("\n")
    );
}
