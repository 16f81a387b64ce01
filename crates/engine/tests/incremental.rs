//! A push recompiles only the documents that changed, and its result is the
//! one a full compile gives; the last good store rebuilds what a new VM needs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use origin_policy_engine::last_good::{no_kept_documents, LastGood};
use origin_policy_engine::{CompiledSet, DomainPattern, PolicySet};
use serde_json::{json, Value};

const DOMAINS: usize = 2_000;

fn policy(i: usize, host: &str) -> Value {
    json!({
        "domain": format!("d{i}.example"),
        "primary": {"address": "o.example"},
        "origin_host": {"mode": "custom", "value": host}
    })
}

fn config(settings: Option<Value>, policies: &[Value]) -> Vec<u8> {
    let mut envelope = json!({ "policies": policies });
    if let Some(s) = settings {
        envelope["settings"] = s;
    }
    serde_json::to_vec(&envelope).unwrap()
}

fn many() -> Vec<Value> {
    (0..DOMAINS).map(|i| policy(i, "v1.example")).collect()
}

fn load(bytes: &[u8], previous: Option<&PolicySet>) -> CompiledSet {
    PolicySet::from_plugin_config(bytes, previous).unwrap()
}

/// What a full compile gives: every document parsed and compiled, the same
/// previous set for the domains whose new policy is rejected.
fn full(bytes: &[u8], previous: Option<&PolicySet>) -> CompiledSet {
    let value: Value = serde_json::from_slice(bytes).unwrap();
    let compiled = PolicySet::from_plugin_value(&value, previous).unwrap();
    assert_eq!(
        compiled.compiled,
        value["policies"].as_array().unwrap().len()
    );
    compiled
}

/// Same domains, each with an equal compiled policy.
fn assert_same_set(a: &PolicySet, b: &PolicySet) {
    assert_eq!(a.index.len(), b.index.len());
    assert_eq!(a.settings, b.settings);
    for p in a.index.policies() {
        let (q, _) = b.index.lookup(&p.name.replace("*.", "x.")).unwrap();
        assert_eq!(p, q, "{}", p.name);
    }
}

fn assert_same_result(incremental: &CompiledSet, full: &CompiledSet) {
    assert_same_set(&incremental.set, &full.set);
    assert_eq!(incremental.diagnostics, full.diagnostics);
    assert_eq!(incremental.kept_previous, full.kept_previous);
    assert_eq!(incremental.unresolved, full.unresolved);
    assert_eq!(incremental.rejected, full.rejected);
}

fn host_of(set: &PolicySet, domain: &str) -> String {
    let (p, _) = set.index.lookup(domain).unwrap();
    format!("{:?}", p.policy.origin_host)
}

#[test]
fn a_one_domain_change_recompiles_only_that_domain() {
    let mut policies = many();
    let first = load(&config(None, &policies), None);
    assert_eq!(first.compiled, DOMAINS);
    assert_eq!(first.set.index.len(), DOMAINS);

    policies[7] = policy(7, "v2.example");
    let bytes = config(None, &policies);
    let second = load(&bytes, Some(&first.set));
    assert_eq!(second.compiled, 1);
    assert!(host_of(&second.set, "d7.example").contains("v2.example"));
    assert!(host_of(&second.set, "d8.example").contains("v1.example"));
    assert_same_result(&second, &full(&bytes, Some(&first.set)));

    // The same configuration again: nothing to compile.
    let third = load(&bytes, Some(&second.set));
    assert_eq!(third.compiled, 0);
    assert_same_result(&third, &second);
}

#[test]
fn reordered_added_and_removed_documents_match_a_full_compile() {
    let mut policies = many();
    let first = load(&config(None, &policies), None);
    policies.swap(0, DOMAINS - 1);
    policies.remove(10);
    policies.push(policy(DOMAINS, "new.example"));
    let bytes = config(None, &policies);
    let next = load(&bytes, Some(&first.set));
    assert_eq!(next.compiled, 1, "only the added domain");
    assert!(next.set.index.lookup("d10.example").is_none());
    assert_same_result(&next, &full(&bytes, Some(&first.set)));
}

#[test]
fn warnings_of_unchanged_documents_are_reported_again_under_their_place() {
    let mut policies = many();
    // Plain HTTP to port 443 is legal, with a warning.
    let warned = json!({
        "domain": "warned.example",
        "primary": {"address": "o.example"},
        "protocol": {"policy": "http", "http_port": 443}
    });
    policies.push(warned.clone());
    let first = load(&config(None, &policies), None);
    let warnings: Vec<_> = first.diagnostics.warnings().collect();
    assert!(!warnings.is_empty(), "the fixture must warn");
    // Move it to another slot and change another domain.
    policies.pop();
    policies.insert(0, warned);
    policies[6] = policy(4, "v2.example"); // d5 gone, d4 twice: two errors
    let bytes = config(None, &policies);
    let next = load(&bytes, Some(&first.set));
    assert_eq!(next.compiled, 1);
    assert_same_result(&next, &full(&bytes, Some(&first.set)));
    assert!(next
        .diagnostics
        .warnings()
        .all(|d| d.source == "policies[0]"));
    assert_eq!(next.diagnostics.errors().count(), 2, "{}", next.diagnostics);
}

#[test]
fn a_rejected_change_keeps_the_last_good_policy_and_is_parsed_each_time() {
    let mut policies = many();
    let first = load(&config(None, &policies), None);
    policies[3] = json!({"domain": "d3.example", "primary": {"address": "o.example", "port": 0}});
    let bytes = config(None, &policies);
    let second = load(&bytes, Some(&first.set));
    assert_eq!(second.compiled, 1);
    assert_eq!(second.kept_previous, vec!["d3.example".to_owned()]);
    assert_eq!(
        second.kept_patterns,
        vec![DomainPattern::Exact("d3.example".to_owned())]
    );
    assert!(host_of(&second.set, "d3.example").contains("v1.example"));
    // Without a previous set the domain is unresolved, as before.
    let full = load(&bytes, None);
    assert_eq!(
        full.unresolved,
        vec![DomainPattern::Exact("d3.example".to_owned())]
    );
    assert!(full.set.index.lookup("d3.example").is_none());
    // The rejected document is parsed again (it reports its error again) and
    // the domain stays on its last good policy.
    let third = load(&bytes, Some(&second.set));
    assert_eq!(third.compiled, 1);
    assert_eq!(third.diagnostics, second.diagnostics);
    assert!(host_of(&third.set, "d3.example").contains("v1.example"));
}

#[test]
fn a_settings_change_recompiles_everything() {
    let policies = many();
    let first = load(
        &config(Some(json!({"decision_header": true})), &policies),
        None,
    );
    let same = load(
        &config(Some(json!({"decision_header": true})), &policies),
        Some(&first.set),
    );
    assert_eq!(same.compiled, 0);
    let bytes = config(Some(json!({"decision_header": false})), &policies);
    let changed = load(&bytes, Some(&same.set));
    assert_eq!(changed.compiled, DOMAINS);
    assert_same_result(&changed, &full(&bytes, Some(&same.set)));
    // Settings removed: a change too.
    let none = load(&config(None, &policies), Some(&changed.set));
    assert_eq!(none.compiled, DOMAINS);
}

#[test]
fn json_errors_in_one_document_refuse_the_push_as_before() {
    let good = config(None, &many());
    let first = load(&good, None);
    // A duplicate key inside a changed document refuses the whole push, with
    // the pointer from the configuration's root.
    let text = String::from_utf8(good).unwrap().replacen(
        r#"{"domain":"d1.example","#,
        r#"{"domain":"d1.example","domain":"d1.example","#,
        1,
    );
    let err = PolicySet::from_plugin_config(text.as_bytes(), Some(&first.set))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("duplicate key `domain` in the object at `/policies/1`"),
        "{err}"
    );
}

#[test]
fn the_last_good_store_rebuilds_kept_domains_in_a_new_vm() {
    let mut policies = many();
    let applied = config(None, &policies);
    let first = load(&applied, None);
    let store = LastGood::encode(&applied, &no_kept_documents());
    let decoded = LastGood::decode(&store).unwrap();
    assert_eq!(decoded.len(), store.len());

    // A new VM given a push in which d3's document is invalid.
    policies[3] = json!({"domain": "d3.example", "primary": {"address": "o.example", "port": 0}});
    let pushed = config(None, &policies);
    let mut fresh = load(&pushed, None);
    assert_eq!(fresh.unresolved.len(), 1);
    let found = decoded.policies(&fresh.unresolved);
    assert_eq!(fresh.keep_last_good(found), 1);
    assert!(fresh.unresolved.is_empty());
    // The same as a VM that had the previous set.
    let with_history = load(&pushed, Some(&first.set));
    assert_same_result(&fresh, &with_history);

    // The next store: the new configuration, and d3's last good document
    // apart (the new configuration only holds its rejected one).
    let kept = decoded.documents(&fresh.kept_patterns);
    let next_store = LastGood::encode(&pushed, &kept);
    let next = LastGood::decode(&next_store).unwrap();
    let again = load(&pushed, None);
    let found = next.policies(&again.unresolved);
    assert_eq!(found.len(), 1);
    assert!(format!("{:?}", found[0].policy.origin_host).contains("v1.example"));
    assert!(LastGood::decode(b"short").is_none());
}
