//! Any bytes as a plugin configuration: an error or a set, never a panic; a
//! set that loads answers requests for every domain it holds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use origin_policy_engine::{scheme_from_text, Outcome, PolicySet, ViewerRequest};

fuzz_target!(|data: &[u8]| {
    let Ok(compiled) = PolicySet::from_plugin_config(data, None) else {
        return;
    };
    // Reloading the same bytes on top of the result must give the same domains.
    let again = PolicySet::from_plugin_config(data, Some(&compiled.set));
    assert_eq!(
        again.map(|c| c.set.index.len()).ok(),
        Some(compiled.set.index.len())
    );
    for policy in compiled.set.index.policies() {
        let host = policy
            .name
            .strip_prefix("*.")
            .map_or_else(|| policy.name.clone(), |suffix| format!("x.{suffix}"));
        for scheme in ["http", "https"] {
            let request = ViewerRequest {
                authority: &host,
                connection: scheme_from_text(scheme),
                method: "GET",
                ..ViewerRequest::default()
            };
            match compiled.set.decide(&request) {
                Outcome::Origin(d) => {
                    assert_eq!(d.policy.name, policy.name);
                    // Every origin a request can reach has a derived cluster.
                    let derived = compiled.set.derived_clusters();
                    assert!(
                        derived.origins.contains_key(d.target.cluster)
                            && (derived.origins.contains_key(d.route_cluster)
                                || derived.chains.contains_key(d.route_cluster))
                    );
                }
                other => panic!("{host} over {scheme}: {other:?}"),
            }
        }
    }
});
