"""The filter's counters on Envoy's admin /stats (scenario 9)."""

import time

import pytest


# The filter hands its per-request counts to Envoy on each worker's tick,
# once a second: a reading waits that long, so that it holds every count of
# the requests made before it.
FLUSH_S = 1.3


def counters(edge, names):
    time.sleep(FLUSH_S)
    stats = edge.stats()
    return {n: stats.get(f"wasmcustom.origin_policy.{n}", 0) for n in names}


def counter(edge, name):
    return counters(edge, [name])[name]


WWW_PRIMARY = {"address": "primary.example.net", "port": 18084}
WWW_SECONDARY = {"address": "backup.example.net", "port": 18085}


def test_decisions_redirects_and_failovers_are_counted(edge, path):
    names = ["decisions", "redirects_uncacheable", "failover.retried", "failover.succeeded",
             "unknown_domain", "origin_unreachable"]
    failing = edge.fresh_domain(WWW_PRIMARY, WWW_SECONDARY)
    before = counters(edge, names)
    edge.request("plain.example.com", path)
    edge.request("redirect.example.com", path)
    edge.request(failing, path)
    edge.request("nobody.example.org", path)
    edge.request("sni-mismatch.test", path)
    after = counters(edge, names)
    assert {n: after[n] - before[n] for n in names} == {
        "decisions": 4,
        "redirects_uncacheable": 1,
        "failover.retried": 1,
        "failover.succeeded": 1,
        "unknown_domain": 1,
        "origin_unreachable": 1,
    }


def test_a_primary_marked_down_is_counted(edge, path):
    failing = edge.fresh_domain(WWW_PRIMARY, WWW_SECONDARY)
    for i in range(3):  # the default: 3 failures in a row mark an origin down
        edge.request(failing, f"{path}/{i}")
    before = counter(edge, "failover.marked_down")
    r = edge.request(failing, path)
    assert r.header("x-origin-error") == "orig marked down; failover=secondary"
    assert counter(edge, "failover.marked_down") - before == 1


def test_a_failover_skipped_for_its_method_is_counted(edge, path):
    failing = edge.fresh_domain(WWW_PRIMARY, WWW_SECONDARY)
    before = counter(edge, "failover.skipped")
    r = edge.request(failing, path, method="POST", body=b"order=1")
    assert r.status == 503
    assert r.header("x-origin-error") == "orig response 503 error; failover=skipped (method POST)"
    assert counter(edge, "failover.skipped") - before == 1


DOWN = {"address": "127.0.0.1", "port": 18099}  # nothing listens there


@pytest.mark.parametrize(
    ("primary", "secondary", "path_prefix", "counted"),
    [
        # The viewer got the secondary's 200: no origin error to count.
        (DOWN, WWW_SECONDARY, "", {"failover.retried": 1, "failover.succeeded": 1}),
        # The viewer got Envoy's 502: the last origin tried never answered.
        (DOWN, DOWN, "", {"failover.retried": 1, "failover.next_failed": 1,
                          "origin_unreachable": 1}),
        # The viewer got the secondary's own 503.
        (WWW_PRIMARY, WWW_SECONDARY, "/status/all/503", {
            "failover.retried": 1, "failover.next_failed": 1, "origin_5xx": 1}),
        # No secondary: the viewer got the primary's 503, or Envoy's 502.
        (WWW_PRIMARY, None, "", {"origin_5xx": 1}),
        (DOWN, None, "", {"origin_unreachable": 1}),
    ],
    ids=["refused-then-answered", "both-refused", "both-503", "one-503", "one-refused"],
)
def test_origin_counters_count_what_the_viewer_got(edge, path, primary, secondary,
                                                    path_prefix, counted):
    names = ["origin_5xx", "origin_unreachable", "failover.retried", "failover.succeeded",
             "failover.next_failed", "failover.marked_down"]
    domain = edge.fresh_domain(primary, secondary)
    before = counters(edge, names)
    edge.request(domain, f"{path_prefix}{path}")
    after = counters(edge, names)
    assert {n: after[n] - before[n] for n in names} == {n: counted.get(n, 0) for n in names}
