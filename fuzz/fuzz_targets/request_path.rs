//! The request path through the engine with arbitrary request facts and
//! origin answers: decide, then the primary's status and Envoy's response
//! details, as the filter does. Every value is used as a header would be.
#![no_main]

use libfuzzer_sys::fuzz_target;
use origin_policy_engine::{Failover, FetchFailure, Outcome, ViewerRequest};
use origin_policy_fuzz::example_policies;

fn header_safe(value: &str) -> bool {
    !value.bytes().any(|b| b.is_ascii_control())
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // authority | scheme | x-forwarded-proto | method | status | code details
    let mut fields = text.split('|');
    let mut next = || fields.next().unwrap_or("");
    let (authority, scheme, xfp, method) = (next(), next(), next(), next());
    let status = next().parse::<u16>().unwrap_or(200);
    let details = next();
    let request = ViewerRequest {
        authority,
        scheme: Some(scheme),
        x_forwarded_proto: (!xfp.is_empty()).then_some(xfp),
        method,
    };
    let Outcome::Origin(decision) = example_policies().decide(&request) else {
        return;
    };
    let target = &decision.target;
    assert!(header_safe(&target.authority) && header_safe(target.cluster));
    if let Some(sni) = &target.sni {
        assert!(header_safe(sni) && !sni.is_empty());
    }
    let header = target.header_value(&decision.policy.name);
    assert!(header_safe(&header), "{header:?}");
    let failure = FetchFailure::from_code_details(details);
    let plan = decision.on_primary_response(status, failure);
    if let Some(error) = &plan.origin_error {
        assert!(header_safe(error), "{error:?}");
    }
    if let Some(replaced) = plan.status {
        assert!((500..=599).contains(&replaced), "{replaced}");
    }
    if let Failover::Plan(p) = &decision.failover {
        assert!(header_safe(&p.target.authority));
    }
});
