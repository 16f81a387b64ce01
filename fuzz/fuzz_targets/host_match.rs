//! Any string as a viewer Host: normalisation never panics, its output is a
//! fixed point, holds only host-name characters, and matches the same policy
//! as the input did.
#![no_main]

use libfuzzer_sys::fuzz_target;
use origin_policy_engine::host::{normalize_authority, normalize_host, MAX_HOST_LEN};
use origin_policy_engine::{Outcome, PolicySet, Scheme, ViewerRequest};
use origin_policy_fuzz::example_policies;

fn matched(set: &PolicySet, authority: &str) -> Option<String> {
    let request = ViewerRequest {
        authority,
        connection: Some(Scheme::Https),
        method: "GET",
        ..ViewerRequest::default()
    };
    match set.decide(&request) {
        Outcome::Origin(d) => Some(d.policy.name.clone()),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(host) = normalize_authority(text) else {
        return;
    };
    assert!(host.len() <= MAX_HOST_LEN, "{host}");
    assert!(
        host.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._[]:".contains(&b)),
        "{text:?} -> {host:?}"
    );
    let again = normalize_host(&host).expect("a normalised host normalises");
    assert_eq!(again, host, "not a fixed point: {text:?}");
    let set = example_policies();
    assert_eq!(
        matched(set, text),
        matched(set, &host),
        "{text:?} vs {host:?}"
    );
});
