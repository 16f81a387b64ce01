//! The request path through the engine with arbitrary request facts and
//! origin answers, as the filter drives it: decide, the primary's status and
//! Envoy's response details, then a secondary answer (status, body). Every
//! value bound for a header must be header-safe.
#![no_main]

use libfuzzer_sys::fuzz_target;
use origin_policy_engine::{
    scheme_from_text, Exchange, FetchFailure, SecondaryResponse, SecondaryVerdict, ViewerRequest,
};
use origin_policy_fuzz::example_policies;
use std::time::Duration;

fn header_safe(value: &str) -> bool {
    !value.bytes().any(|b| b.is_ascii_control())
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // authority | scheme | x-forwarded-proto | method | status | code details | secondary status | secondary body
    let mut fields = text.split('|');
    let mut next = || fields.next().unwrap_or("");
    let (authority, scheme, xfp, method) = (next(), next(), next(), next());
    let status = next().parse::<u16>().unwrap_or(200);
    let details = next();
    let secondary_status = next().parse::<u16>().ok();
    let secondary_body = next();
    let set = example_policies();
    let request = ViewerRequest {
        authority,
        connection: scheme_from_text(scheme),
        x_forwarded_proto: (!xfp.is_empty()).then_some(xfp),
        method,
    };
    let Ok(found) = set.lookup(authority) else {
        return;
    };
    let Ok(mut exchange) = Exchange::begin(found, &request, &set.settings) else {
        return;
    };
    let Some(decision) = exchange.decision() else {
        panic!("an exchange always has a decision");
    };
    let target = &decision.target;
    assert!(header_safe(&target.authority) && header_safe(target.cluster));
    if let Some(sni) = &target.sni {
        assert!(header_safe(sni) && !sni.is_empty());
    }
    let header = target.header_value(&decision.policy.name);
    assert!(header_safe(&header), "{header:?}");
    if exchange.may_fail_over() {
        exchange.keep_for_replay(vec![(":method".into(), method.into())]);
    }
    let failure = FetchFailure::from_code_details(details);
    let verdict = exchange.on_primary_response(status, failure);
    if let Some(error) = &verdict.origin_error {
        assert!(header_safe(&error.to_string()), "{error:?}");
    }
    if let Some(replaced) = verdict.status {
        assert!((500..=599).contains(&replaced), "{replaced}");
    }
    if !verdict.fail_over {
        return;
    }
    let replay = exchange.replay().expect("a failover verdict has a replay");
    for (_, v) in replay.headers("x-origin-cluster") {
        assert!(header_safe(v));
    }
    exchange.failover_started();
    let headers: Vec<(String, String)> = secondary_status
        .map(|s| vec![(":status".to_owned(), s.to_string())])
        .unwrap_or_default();
    let answer = SecondaryResponse {
        status: secondary_status,
        headers: (!headers.is_empty()).then_some(headers.as_slice()),
        proxy_reply: Some(secondary_body.as_bytes()),
        body_bytes: secondary_body.len(),
        elapsed: Duration::from_millis(1),
    };
    match exchange.on_secondary_response(answer) {
        Some(SecondaryVerdict::Fail { status, origin_error }) => {
            assert!(status == 502 || status == 504);
            assert!(header_safe(&origin_error.to_string()), "{origin_error:?}");
        }
        Some(SecondaryVerdict::Relay { origin_error, .. }) => {
            assert!(header_safe(&origin_error.to_string()), "{origin_error:?}");
        }
        None => panic!("a started failover always gets a verdict"),
    }
});
