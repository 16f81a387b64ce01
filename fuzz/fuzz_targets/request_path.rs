//! The request path through the engine with arbitrary request facts and what
//! Envoy reports back, as the filter drives it: decide, write the route
//! headers, then the answer's status, Envoy's response details, its attempt
//! count and the answering endpoint's metadata. Every value bound for a header
//! must be header-safe.
#![no_main]

use libfuzzer_sys::fuzz_target;
use origin_policy_engine::{scheme_from_text, Exchange, FetchFailure, UpstreamReport, ViewerRequest};
use origin_policy_fuzz::example_policies;

fn header_safe(value: &str) -> bool {
    !value.is_empty() && !value.bytes().any(|b| b.is_ascii_control())
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // authority | scheme | x-forwarded-proto | method | content-length | spread
    //   | status | code details | attempts | endpoint metadata
    let mut fields = text.split('|');
    let mut next = || fields.next().unwrap_or("");
    let (authority, scheme, xfp, method) = (next(), next(), next(), next());
    let body_bytes = next().parse::<u64>().ok();
    let spread = next().parse::<u32>().unwrap_or(0);
    let status = next().parse::<u16>().unwrap_or(200);
    let details = next();
    let attempts = next().parse::<u32>().unwrap_or(1);
    let metadata = next();
    let set = example_policies();
    let request = ViewerRequest {
        authority,
        connection: scheme_from_text(scheme),
        x_forwarded_proto: (!xfp.is_empty()).then_some(xfp),
        method,
        body_bytes,
        spread,
    };
    let Ok(found) = set.lookup(authority) else {
        return;
    };
    let Ok(exchange) = Exchange::begin(found, &request, &set.settings) else {
        return;
    };
    let Some(decision) = exchange.decision() else {
        panic!("an exchange always has a decision");
    };
    assert!(header_safe(decision.route_cluster));
    if let Some(host) = exchange.authority_rewrite(&decision, authority) {
        assert!(header_safe(host));
    }
    for (name, value) in decision.route_headers() {
        assert!(header_safe(name) && header_safe(&value), "{name}: {value:?}");
    }
    let header = decision.header_value();
    assert!(header_safe(&header), "{header:?}");
    let verdict = exchange.on_response(UpstreamReport {
        status,
        failure: FetchFailure::from_code_details(details),
        attempts,
        host_metadata: Some(metadata.as_bytes()),
    });
    if let Some(error) = &verdict.origin_error {
        assert!(header_safe(&error.to_string()), "{error:?}");
    }
    if let Some(d) = &verdict.decision_header {
        assert!(header_safe(d), "{d:?}");
    }
    if let Some(replaced) = verdict.status {
        assert!(replaced == 502 || replaced == 504, "{replaced}");
    }
});
