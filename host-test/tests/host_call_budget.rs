//! The host-call budget: how many calls the filter makes into Envoy (and
//! Envoy back into it to hand over a value) per request, by callback and by
//! kind of request. Each call costs Envoy microseconds (BENCHMARKS.md, "Host
//! calls"); a change that adds one fails here until the budget is raised on
//! purpose, in `BUDGET` below. Per-request counters are not host calls: they
//! are kept in the VM and handed to Envoy on the root context's tick (once a
//! second, one call per counter that moved).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use host_test::{Phase, Vm, GUEST_ALLOCATION};
use std::collections::BTreeMap;

/// Calls per callback: request headers, response headers, the rest of the
/// stream (context create, done, log, delete).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Calls {
    request: usize,
    response: usize,
    other: usize,
}

impl Calls {
    fn total(&self) -> usize {
        self.request + self.response + self.other
    }
}

struct Kind {
    name: &'static str,
    host: &'static str,
    tls: bool,
    status: &'static str,
    /// Envoy's `response.code_details` for a 5xx it made up.
    details: Option<&'static str>,
    /// `upstream.request_attempt_count` and the answering origin's cluster
    /// (by its place in the chain), for a domain with a chain.
    attempts: u64,
    answered_by: usize,
}

const KINDS: [Kind; 7] = [
    Kind { name: "plain hit", host: "plain.example.com", tls: false, status: "200", details: None, attempts: 1, answered_by: 0 },
    Kind { name: "hit with a chain", host: "www.example.com", tls: false, status: "200", details: None, attempts: 1, answered_by: 1 },
    Kind { name: "miss (no policy: local 404)", host: "nobody.example.org", tls: false, status: "200", details: None, attempts: 1, answered_by: 0 },
    Kind { name: "follow, TLS viewer", host: "media.example.com", tls: true, status: "200", details: None, attempts: 1, answered_by: 0 },
    Kind { name: "301 made uncacheable", host: "redirect.example.com", tls: false, status: "301", details: None, attempts: 1, answered_by: 0 },
    Kind { name: "failover (answered by the secondary)", host: "www.example.com", tls: false, status: "200", details: None, attempts: 2, answered_by: 2 },
    Kind {
        name: "origin refused (502)",
        host: "plain.example.com",
        tls: false,
        status: "503",
        details: Some("upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}"),
        attempts: 1,
        answered_by: 0,
    },
];

/// With `direct_origins`: the origin is reached through a forward-proxy
/// shard, so its host and port (and, over HTTPS, SNI and the name to check)
/// go to Envoy as filter state, and the route is matched again.
const DIRECT_KINDS: [Kind; 2] = [
    Kind {
        name: "direct hit",
        host: "plain.example.com",
        tls: false,
        status: "200",
        details: None,
        attempts: 1,
        answered_by: 0,
    },
    Kind {
        name: "direct hit over HTTPS",
        host: "secure.example.com",
        tls: false,
        status: "200",
        details: None,
        attempts: 1,
        answered_by: 0,
    },
];

/// With feed delivery (`"delivery": "feed"`): the worker reads a host's
/// entry from shared data the first time, then answers it from memory until
/// the feed singleton counts a change (read on the root's tick).
const FEED_KINDS: [Kind; 4] = [
    Kind {
        name: "feed: first request for the host on this worker",
        ..KINDS[0]
    },
    Kind {
        name: "feed: plain hit",
        ..KINDS[0]
    },
    Kind {
        name: "feed: miss (no policy: local 404)",
        ..KINDS[2]
    },
    Kind {
        name: "feed: plain hit after a change is counted",
        ..KINDS[0]
    },
];

/// Calls in the request-headers callback, the response-headers callback,
/// and the rest of the stream.
const fn calls(request: usize, response: usize, other: usize) -> Calls {
    Calls {
        request,
        response,
        other,
    }
}

/// The budget: raise it only on purpose, with the cost in BENCHMARKS.md.
const BUDGET: [(&str, Calls); 13] = [
    ("plain hit", calls(3, 3, 0)),
    ("hit with a chain", calls(9, 7, 0)),
    ("miss (no policy: local 404)", calls(3, 0, 0)),
    ("follow, TLS viewer", calls(5, 3, 0)),
    ("301 made uncacheable", calls(3, 4, 0)),
    ("failover (answered by the secondary)", calls(9, 8, 0)),
    ("origin refused (502)", calls(3, 7, 0)),
    ("direct hit", calls(5, 3, 0)),
    ("direct hit over HTTPS", calls(8, 3, 0)),
    // One shared-data get, and the host's call back to hand over its value.
    (
        "feed: first request for the host on this worker",
        calls(5, 3, 0),
    ),
    ("feed: plain hit", calls(3, 3, 0)),
    ("feed: miss (no policy: local 404)", calls(3, 0, 0)),
    ("feed: plain hit after a change is counted", calls(5, 3, 0)),
];

fn run(vm: &mut Vm, kind: &Kind) -> (Calls, BTreeMap<&'static str, usize>) {
    vm.state_mut().host_calls.clear();
    let id = if kind.tls {
        vm.open_tls_stream()
    } else {
        vm.open_stream()
    }
    .unwrap();
    let request = [
        (":authority", kind.host),
        (":scheme", if kind.tls { "https" } else { "http" }),
        (":method", "GET"),
        (":path", "/a.png"),
        ("user-agent", "curl/8.5.0"),
        ("accept", "*/*"),
        ("x-forwarded-proto", if kind.tls { "https" } else { "http" }),
        ("x-request-id", "9b1d7c0e-0000-4000-8000-000000000000"),
    ];
    vm.request_headers(id, &request, true).unwrap();
    if vm.local_response(id).is_none() {
        if kind.host == "www.example.com" {
            let clusters = common::example_clusters(kind.host, origin_policy_engine::Scheme::Http);
            let mut metadata = b"\n\x0dorigin_policy\x12\x2a".to_vec();
            metadata.extend_from_slice(clusters[kind.answered_by].as_bytes());
            vm.set_stream_property(id, "xds.upstream_host_metadata", metadata)
                .unwrap();
            vm.set_stream_property(
                id,
                "upstream.request_attempt_count",
                kind.attempts.to_le_bytes(),
            )
            .unwrap();
        }
        if let Some(details) = kind.details {
            vm.set_stream_property(id, "response.code_details", details)
                .unwrap();
        }
        let response = [
            (":status", kind.status),
            ("content-type", "image/png"),
            ("content-length", "5"),
            ("cache-control", "max-age=3600"),
        ];
        vm.response_headers(id, &response, false).unwrap();
    }
    vm.close_stream(id).unwrap();
    let mut calls = Calls::default();
    let mut by_name = BTreeMap::new();
    for (phase, name) in &vm.state().host_calls {
        match phase {
            Some(Phase::RequestHeaders) => calls.request += 1,
            Some(Phase::ResponseHeaders) => calls.response += 1,
            _ => calls.other += 1,
        }
        *by_name.entry(*name).or_default() += 1;
    }
    (calls, by_name)
}

#[test]
fn every_kind_of_request_stays_within_its_host_call_budget() {
    let mut vm = common::example_vm();
    // A first request warms what the VM builds once.
    run(&mut vm, &KINDS[0]);
    let mut table = String::from(
        "| request | request headers | response headers | create/close | total | calls |\n|---|---:|---:|---:|---:|---|\n",
    );
    let mut direct_vm = common::direct_vm();
    run(&mut direct_vm, &KINDS[0]);
    let mut measured = Vec::new();
    let mut row = |kind: &Kind, (calls, by_name): (Calls, BTreeMap<&str, usize>)| {
        let names: Vec<String> = by_name.iter().map(|(n, c)| format!("{n} ×{c}")).collect();
        table += &format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            kind.name,
            calls.request,
            calls.response,
            calls.other,
            calls.total(),
            names.join(", ")
        );
        measured.push((kind.name, calls));
    };
    for kind in &KINDS {
        row(kind, run(&mut vm, kind));
    }
    for kind in &DIRECT_KINDS {
        row(kind, run(&mut direct_vm, kind));
    }
    let feed = common::FeedProcess::new();
    let mut worker = feed.worker();
    let [first, plain, miss, changed] = &FEED_KINDS;
    row(first, run(&mut worker, first));
    row(plain, run(&mut worker, plain));
    // The first miss looks for the host's entry and each parent's wildcard.
    run(&mut worker, miss);
    row(miss, run(&mut worker, miss));
    feed.write(origin_policy_engine::feed::CHANGES_KEY, b"2");
    worker.tick().unwrap();
    row(changed, run(&mut worker, changed));
    println!("{table}");
    assert_eq!(GUEST_ALLOCATION, "(proxy_on_memory_allocate)");
    assert_eq!(
        measured,
        BUDGET.to_vec(),
        "host calls per request changed:\n{table}"
    );
}
