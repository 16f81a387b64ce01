//! The per-request exchange, natively: failover eligibility, the replayed
//! request, the secondary's answer and the typed `x-origin-error`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use origin_policy_engine::host::HostError;
use origin_policy_engine::{
    relayed_headers, CacheControl, Exchange, FetchFailure, PolicySet, Refusal, Scheme,
    SecondaryResponse, SecondaryVerdict, ViewerRequest,
};
use serde_json::json;
use std::time::Duration;

fn policies(max_replay_body_bytes: u32) -> PolicySet {
    let config = json!({
        "settings": {"max_replay_body_bytes": max_replay_body_bytes, "decision_header": true},
        "policies": [{
            "domain": "www.example.com",
            "primary": {"address": "primary.example.net", "port": 80, "clusters": {"http": "www_primary"}},
            "secondary": {"address": "backup.example.net", "port": 80, "clusters": {"http": "www_secondary"}},
            "origin_host": {"mode": "origin_domain"},
            "cache_status_ttl": {"200": 60},
            "failover": {"timeout_ms": 2000}
        }]
    });
    let compiled = PolicySet::from_plugin_value(&config, None).unwrap();
    assert!(
        compiled.diagnostics.0.is_empty(),
        "{}",
        compiled.diagnostics
    );
    compiled.set
}

fn begin<'s>(set: &'s PolicySet, method: &'s str) -> Exchange {
    let request = ViewerRequest {
        authority: "www.example.com",
        connection: Some(Scheme::Http),
        x_forwarded_proto: None,
        method,
    };
    let found = set.lookup(request.authority).unwrap();
    let mut exchange = Exchange::begin(found, &request, &set.settings).unwrap();
    if exchange.may_fail_over() {
        exchange.keep_for_replay(vec![
            (":authority".into(), "www.example.com".into()),
            (":scheme".into(), "http".into()),
            (":method".into(), method.into()),
            (":path".into(), "/a".into()),
            ("x-origin-cluster".into(), "www_primary".into()),
            ("connection".into(), "keep-alive".into()),
            ("accept".into(), "*/*".into()),
        ]);
    }
    exchange
}

fn answer<'a>(
    status: Option<u16>,
    headers: &'a [(String, String)],
    body: &'a [u8],
    elapsed_ms: u64,
) -> SecondaryResponse<'a> {
    SecondaryResponse {
        status,
        headers: (!headers.is_empty()).then_some(headers),
        proxy_reply: SecondaryResponse::made_by_proxy(status, headers).then_some(body),
        body_bytes: body.len(),
        elapsed: Duration::from_millis(elapsed_ms),
    }
}

fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn a_5xx_replays_the_request_to_the_secondary_with_its_own_host() {
    let set = policies(1024);
    let mut exchange = begin(&set, "GET");
    let verdict = exchange.on_primary_response(503, None);
    assert!(verdict.fail_over);
    let replay = exchange.replay().unwrap();
    assert_eq!(replay.target.cluster, "www_secondary");
    assert_eq!(replay.timeout, Duration::from_millis(2000));
    assert_eq!(
        replay.headers("x-origin-cluster"),
        vec![
            (":method", "GET"),
            (":path", "/a"),
            ("accept", "*/*"),
            (":authority", "backup.example.net"),
            (":scheme", "http"),
        ]
    );
    exchange.failover_started();
    let headers = h(&[
        (":status", "200"),
        ("x-envoy-upstream-service-time", "3"),
        ("cache-control", "private"),
        ("x-origin-error", "forged by the origin"),
        ("transfer-encoding", "chunked"),
        ("etag", "\"1\""),
    ]);
    let Some(SecondaryVerdict::Relay {
        status,
        cache_control,
        origin_error,
        decision_header,
    }) = exchange.on_secondary_response(answer(Some(200), &headers, b"ok", 10))
    else {
        panic!("the secondary's 200 is relayed");
    };
    assert_eq!(status, 200);
    assert_eq!(cache_control, Some(CacheControl::MaxAge(60)));
    assert_eq!(
        origin_error.to_string(),
        "orig response 503 error; failover=secondary"
    );
    assert!(decision_header.unwrap().contains("origin=secondary"));
    let relayed: Vec<_> = relayed_headers(&headers, true).collect();
    assert_eq!(
        relayed,
        vec![("x-envoy-upstream-service-time", "3"), ("etag", "\"1\"")]
    );
}

#[test]
fn the_secondary_answer_is_classified() {
    let set = policies(1024);
    let upstream = |status: &str| h(&[(":status", status), ("x-envoy-upstream-service-time", "1")]);
    let proxy = |status: &str| h(&[(":status", status), ("content-type", "text/plain")]);
    let refused = b"upstream connect error or disconnect/reset before headers. reset reason: remote connection failure, transport failure reason: delayed connect error: Connection refused";
    // (answer headers, status, body, elapsed ms, status to the viewer, cause)
    type Case<'a> = (
        Vec<(String, String)>,
        Option<u16>,
        &'a [u8],
        u64,
        u16,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            upstream("503"),
            Some(503),
            b"",
            10,
            502,
            "secondary response 503 error",
        ),
        (
            proxy("503"),
            Some(503),
            refused,
            10,
            502,
            "secondary connect failure (remote connection failure)",
        ),
        (
            proxy("503"),
            Some(503),
            b"",
            10,
            502,
            "secondary response 503 error",
        ),
        (
            proxy("504"),
            Some(504),
            b"upstream request timeout",
            10,
            504,
            "secondary timeout",
        ),
        (
            upstream("504"),
            Some(504),
            b"",
            1990,
            504,
            "secondary timeout",
        ),
        (vec![], None, b"", 2000, 504, "secondary timeout"),
        (vec![], None, b"", 10, 502, "secondary connect failure"),
    ];
    for (headers, status, body, elapsed, expected_status, cause) in cases {
        let mut exchange = begin(&set, "GET");
        assert!(exchange.on_primary_response(503, None).fail_over);
        exchange.failover_started();
        match exchange.on_secondary_response(answer(status, &headers, body, elapsed)) {
            Some(SecondaryVerdict::Fail {
                status,
                origin_error,
            }) => {
                assert_eq!(status, expected_status, "{cause}");
                assert_eq!(
                    origin_error.to_string(),
                    format!("orig response 503 error; failover=secondary; {cause}")
                );
            }
            other => panic!("{cause}: {other:?}"),
        }
    }
}

#[test]
fn an_oversized_secondary_answer_is_a_502() {
    let set = policies(1024);
    let mut exchange = begin(&set, "GET");
    exchange.on_primary_response(500, None);
    exchange.failover_started();
    let headers = h(&[(":status", "200"), ("x-envoy-upstream-service-time", "1")]);
    let big = SecondaryResponse {
        body_bytes: 9 * 1024 * 1024,
        ..answer(Some(200), &headers, b"", 5)
    };
    let Some(SecondaryVerdict::Fail {
        status,
        origin_error,
    }) = exchange.on_secondary_response(big)
    else {
        panic!("over the limit");
    };
    assert_eq!(status, 502);
    assert!(origin_error
        .to_string()
        .ends_with("secondary response body of 9437184 bytes is over the 8388608-byte limit"));
}

#[test]
fn failover_is_skipped_for_methods_and_large_bodies() {
    let set = policies(4);
    let mut post = begin(&set, "POST");
    assert!(!post.may_fail_over());
    let verdict = post.on_primary_response(503, None);
    assert!(!verdict.fail_over);
    assert_eq!(
        verdict.origin_error.unwrap().to_string(),
        "orig response 503 error; failover=skipped (method POST)"
    );

    // Found by fuzzing: the method is quoted in a response header.
    let mut odd = begin(&set, "M\u{0}\r\nX\u{fc}");
    let verdict = odd.on_primary_response(503, None);
    assert_eq!(
        verdict.origin_error.unwrap().to_string(),
        "orig response 503 error; failover=skipped (method M???X?)"
    );

    let mut large = begin(&set, "OPTIONS");
    assert!(large.wants_body_chunk(3));
    large.keep_body_chunk(b"abc");
    assert!(!large.wants_body_chunk(2), "over the 4-byte limit");
    let verdict = large.on_primary_response(502, None);
    assert!(!verdict.fail_over);
    assert_eq!(
        verdict.origin_error.unwrap().to_string(),
        "orig response 502 error; failover=skipped (request body over 4 bytes)"
    );

    // A 404 is not a failover status: nothing to say.
    let mut fine = begin(&set, "GET");
    let verdict = fine.on_primary_response(404, None);
    assert!(!verdict.fail_over && verdict.origin_error.is_none());
}

#[test]
fn an_unreachable_primary_fails_over_with_its_cause() {
    let set = policies(1024);
    let mut exchange = begin(&set, "GET");
    let failure = FetchFailure::from_code_details(
        "upstream_reset_before_response_started{connection_failure,delayed_connect_error:_Connection_refused}",
    );
    let verdict = exchange.on_primary_response(503, failure);
    assert_eq!(verdict.status, Some(502));
    assert!(verdict.fail_over);
    exchange.failover_started();
    let headers = h(&[(":status", "200"), ("x-envoy-upstream-service-time", "1")]);
    let Some(SecondaryVerdict::Relay { origin_error, .. }) =
        exchange.on_secondary_response(answer(Some(200), &headers, b"", 5))
    else {
        panic!("relayed");
    };
    assert_eq!(
        origin_error.to_string(),
        "orig connect failed (Connection refused); failover=secondary"
    );
}

#[test]
fn a_host_joined_from_two_values_is_conflicting() {
    let set = policies(1024);
    // Envoy joins repeated Host headers with a comma before a filter sees them.
    assert_eq!(
        set.lookup("www.example.com,other.example").unwrap_err(),
        Refusal::BadHost(HostError::Conflicting)
    );
    assert_eq!(
        HostError::Conflicting.to_string(),
        "conflicting Host values"
    );
}

#[test]
fn a_4xx_in_the_rule_fails_over_too() {
    let config = json!({"policies": [{
        "domain": "www.example.com",
        "primary": {"address": "p.example.net", "clusters": {"http": "p"}},
        "secondary": {"address": "s.example.net", "clusters": {"http": "s"}},
        "failover": {"statuses": [404, 503]}
    }]});
    let set = PolicySet::from_plugin_value(&config, None).unwrap().set;
    let mut exchange = begin(&set, "GET");
    let verdict = exchange.on_primary_response(404, None);
    assert!(verdict.fail_over);
    assert_eq!(
        verdict.origin_error.unwrap().to_string(),
        "orig response 404 error"
    );
    assert_eq!(exchange.replay().unwrap().target.cluster, "s");
}
