"""Failover to the secondary origin in real Envoy (scenario 7).

www.example.com: the primary answers 503, the secondary is healthy, the
failover timeout is 3 s. refused.test: nothing listens on the primary's port;
both-refused.test: nor on the secondary's.
"""

from conftest import PRIMARY_TIMEOUT_S


def origins_reached(edge, path):
    return [s.origin for s in edge.seen(path)]


def test_a_503_is_answered_by_the_secondary(edge, path):
    r = edge.request("www.example.com", path)
    assert r.status == 200
    assert r.json()["origin"] == "www-secondary"
    assert r.header("x-origin-error") == "orig response 503 error; failover=secondary"
    assert "origin=secondary" in r.header("x-origin-decision")
    assert origins_reached(edge, path) == ["www-primary", "www-secondary"]


def test_a_refused_connection_is_answered_by_the_secondary(edge, path):
    r = edge.request("refused.test", path)
    assert r.status == 200
    assert r.json()["origin"] == "www-secondary"
    assert r.header("x-origin-error") == (
        "orig connect failed (Connection refused); failover=secondary"
    )


def test_a_primary_timeout_is_answered_by_the_secondary(edge, path):
    slow = f"/delay/www-primary/{PRIMARY_TIMEOUT_S * 1000 + 2000}{path}"
    r = edge.request("www.example.com", slow)
    assert r.status == 200
    assert r.json()["origin"] == "www-secondary"
    assert r.header("x-origin-error") == "orig response timeout; failover=secondary"


def test_post_is_not_failed_over_by_default(edge, path):
    r = edge.request("www.example.com", path, method="POST", body=b"order=1")
    assert r.status == 503
    assert r.header("x-origin-error") == "orig response 503 error; failover=skipped (method POST)"
    assert origins_reached(edge, path) == ["www-primary"]


def test_both_failing_gives_502_naming_both(edge, path):
    r = edge.request("www.example.com", f"/status/all/503{path}")
    assert r.status == 502
    assert r.header("x-origin-error") == (
        "orig response 503 error; failover=secondary; secondary response 503 error"
    )


def test_both_timing_out_gives_504_naming_both(edge, path):
    r = edge.request("www.example.com", f"/delay/all/{PRIMARY_TIMEOUT_S * 1000 + 3500}{path}")
    assert r.status == 504
    assert r.header("x-origin-error") == (
        "orig response timeout; failover=secondary; secondary timeout"
    )


def test_both_refusing_gives_502_naming_both_connect_failures(edge, path):
    r = edge.request("both-refused.test", path)
    assert r.status == 502
    # Envoy's own 503 for the secondary's refused connection is a connect
    # failure with Envoy's reason, not an answer from the secondary.
    assert r.header("x-origin-error") == (
        "orig connect failed (Connection refused); failover=secondary; "
        "secondary connect failure (remote connection failure)"
    )


def test_failover_happens_once(edge, path):
    edge.request("www.example.com", f"/status/all/503{path}")
    assert origins_reached(edge, f"/status/all/503{path}") == ["www-primary", "www-secondary"]


def test_a_503_with_a_huge_body_is_still_failed_over(edge, path):
    # 20 MB of primary body, far over Envoy's buffer limits: the filter holds
    # it back without buffering it, and the viewer gets only the secondary.
    r = edge.request("www.example.com", f"/pad/www-primary/20000000{path}")
    assert r.status == 200
    assert r.json()["origin"] == "www-secondary"
    assert len(r.body) < 10_000
    assert r.header("x-origin-error") == "orig response 503 error; failover=secondary"


def test_a_secondary_answer_over_the_size_limit_is_a_502(edge, path):
    # settings.json keeps the default max_secondary_response_bytes, 8 MiB.
    r = edge.request("www.example.com", f"/pad/www-secondary/9000000{path}")
    assert r.status == 502
    assert r.header("x-origin-error").startswith(
        "orig response 503 error; failover=secondary; secondary response body of "
    )
    assert r.header("x-origin-error").endswith("bytes is over the 8388608-byte limit")
