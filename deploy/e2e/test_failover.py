"""Failover in real Envoy: the filter names the chain of origins, Envoy retries
once on the next origin and streams its answer, and an origin that keeps
failing is marked down and skipped.

Each test that looks at one origin's health uses a domain of its own
(`edge.fresh_domain`): its origins get clusters, and so health, of their own.
"""

import json
import threading
import time
import uuid

import pytest
from conftest import COOLDOWN_MS, PRIMARY_TIMEOUT_S

from origins import DemoOrigins, OriginSpec

FLAKY_PORT = 18092
DOWN_PORTS = (18099, 18098)  # nothing listens there


def origins_reached(edge, path):
    return [s.origin for s in edge.seen(path)]


WWW_PRIMARY = {"address": "primary.example.net", "port": 18084}
WWW_SECONDARY = {"address": "backup.example.net", "port": 18085}


@pytest.fixture(scope="module")
def tls_backup(demo_origins):
    """An HTTPS secondary on the multi-tenant origin's port, on 127.0.0.2,
    whose certificate names only backup-tls.example.org."""
    spec = OriginSpec("tls-backup", 18443, ("backup-tls.example.org",), address="127.0.0.2")
    with DemoOrigins([spec], demo_origins.certs) as origins:
        yield origins


@pytest.fixture(scope="module")
def flaky(demo_origins):
    """An origin of this module's own, to make hang and recover."""
    with DemoOrigins([OriginSpec("flaky", FLAKY_PORT)], demo_origins.certs) as origins:
        yield origins


def test_a_503_is_answered_by_the_secondary(edge, path):
    domain = edge.fresh_domain(WWW_PRIMARY, WWW_SECONDARY)
    r = edge.request(domain, path)
    assert r.status == 200
    assert r.json()["origin"] == "www-secondary"
    assert r.header("x-origin-error") == "orig failed; failover=secondary"
    assert "origin=secondary" in r.header("x-origin-decision")
    assert origins_reached(edge, path) == ["www-primary", "www-secondary"]
    # The secondary got the Host the policy sends it, set by Envoy per attempt.
    assert edge.seen(path, "www-secondary")[0].host == f"{domain}.origin"


def test_a_refused_connection_is_answered_by_the_secondary(edge, path):
    domain = edge.fresh_domain({"address": "127.0.0.1", "port": DOWN_PORTS[0]}, WWW_SECONDARY)
    r = edge.request(domain, path)
    assert r.status == 200
    assert r.json()["origin"] == "www-secondary"
    assert r.header("x-origin-error") == "orig failed; failover=secondary"


def test_a_primary_timeout_is_answered_by_the_secondary(edge, path):
    domain = edge.fresh_domain({**WWW_PRIMARY, "response_timeout_ms": 1000}, WWW_SECONDARY)
    started = time.monotonic()
    r = edge.request(domain, f"/delay/www-primary/4000{path}")
    waited = time.monotonic() - started
    assert r.status == 200
    assert r.json()["origin"] == "www-secondary"
    assert r.header("x-origin-error") == "orig failed; failover=secondary"
    # The primary's own response timeout, not the route's 30 s.
    assert 0.9 < waited < 3.5, waited


def test_post_is_not_failed_over_by_default(edge, path):
    domain = edge.fresh_domain(WWW_PRIMARY, WWW_SECONDARY)
    r = edge.request(domain, path, method="POST", body=b"order=1")
    assert r.status == 503
    assert r.header("x-origin-error") == "orig response 503 error; failover=skipped (method POST)"
    assert origins_reached(edge, path) == ["www-primary"]


def test_a_non_idempotent_method_is_re_sent_only_when_nothing_reached_the_primary(edge, path):
    methods = {"methods": ["GET", "POST"]}
    answering = edge.fresh_domain(WWW_PRIMARY, WWW_SECONDARY, failover=methods)
    r = edge.request(answering, path, method="POST", body=b"order=1")
    # The primary got the POST and answered 503: never sent twice.
    assert r.status == 503
    assert origins_reached(edge, path) == ["www-primary"]
    refusing = edge.fresh_domain(
        {"address": "127.0.0.1", "port": DOWN_PORTS[0]}, WWW_SECONDARY, failover=methods
    )
    r = edge.request(refusing, f"{path}/refused", method="POST", body=b"order=1")
    assert r.status == 200
    assert r.json()["origin"] == "www-secondary"


def test_both_failing_names_both(edge, path):
    domain = edge.fresh_domain(WWW_PRIMARY, WWW_SECONDARY)
    r = edge.request(domain, f"/status/all/503{path}")
    assert r.status == 503
    assert r.header("x-origin-error") == (
        "orig failed; failover=secondary; secondary response 503 error"
    )


def test_both_timing_out_gives_504_naming_both(edge, path):
    domain = edge.fresh_domain(
        {**WWW_PRIMARY, "response_timeout_ms": 1000},
        {**WWW_SECONDARY, "response_timeout_ms": 1000},
    )
    r = edge.request(domain, f"/delay/all/4000{path}")
    assert r.status == 504
    assert r.header("x-origin-error") == (
        "orig failed; failover=secondary; secondary response timeout"
    )


def test_both_refusing_gives_502_naming_both(edge, path):
    r = edge.request("both-refused.test", path)
    assert r.status == 502
    error = r.header("x-origin-error")
    # The first request pays both failures; once both are marked down Envoy
    # does not try them at all.
    assert error.startswith(("orig failed; failover=secondary; secondary connect failed",
                             "orig marked down")), error


def test_failover_happens_once(edge, path):
    domain = edge.fresh_domain(WWW_PRIMARY, WWW_SECONDARY)
    edge.request(domain, f"/status/all/503{path}")
    assert origins_reached(edge, f"/status/all/503{path}") == ["www-primary", "www-secondary"]


def test_a_503_with_a_huge_body_is_still_failed_over(edge, path):
    # 20 MB of primary body: Envoy drops the failed attempt's answer unread.
    domain = edge.fresh_domain(WWW_PRIMARY, WWW_SECONDARY)
    r = edge.request(domain, f"/pad/www-primary/20000000{path}")
    assert r.status == 200
    assert r.json()["origin"] == "www-secondary"
    assert len(r.body) < 10_000


def test_a_50_mb_secondary_answer_streams_to_the_viewer(edge, path):
    domain = edge.fresh_domain(WWW_PRIMARY, WWW_SECONDARY)
    before = edge.stats()["server.memory_allocated"]
    # Not for the edge's cache to keep (that would hold the object by design).
    r = edge.request(
        domain, f"/pad/www-secondary/50000000{path}", headers={"cache-control": "no-store"}
    )
    after = edge.stats()["server.memory_allocated"]
    assert r.status == 200
    assert r.header("x-origin-error") == "orig failed; failover=secondary"
    assert len(r.body) > 50_000_000
    # The padding follows the origin's JSON line.
    assert json.loads(r.body.split(b"\n", 1)[0])["origin"] == "www-secondary"
    # Streamed, not held: Envoy's heap did not grow by the object's size.
    assert after - before < 20_000_000, (before, after)


def timed(edge, domain, path):
    started = time.monotonic()
    r = edge.request(domain, path)
    return r, time.monotonic() - started


def test_a_hanging_primary_is_marked_down_then_let_back_in(edge, flaky, path):
    domain = edge.fresh_domain(
        {"address": "127.0.0.1", "port": FLAKY_PORT, "response_timeout_ms": 1000},
        WWW_SECONDARY,
    )
    hang = f"/delay/flaky/5000{path}"
    waits = []
    for i in range(5):
        r, waited = timed(edge, domain, f"{hang}/{i}")
        assert r.status == 200 and r.json()["origin"] == "www-secondary"
        waits.append((waited, r.header("x-origin-error")))
    print("viewer waits with a hanging primary:", [f"{w:.2f}s {e}" for w, e in waits])
    # The first three pay the primary's response timeout (3 failures mark it down) ...
    assert all(w > 0.9 for w, _ in waits[:3]), waits
    assert all(e == "orig failed; failover=secondary" for _, e in waits[:3]), waits
    # ... then viewers get the secondary without waiting.
    assert all(w < 0.5 for w, _ in waits[3:]), waits
    assert all(e == "orig marked down; failover=secondary" for _, e in waits[3:]), waits
    # The primary answers again: after the cool-down a request reaches it.
    started = time.monotonic()
    while True:
        r = edge.request(domain, f"{path}/back/{uuid.uuid4().hex}")
        if r.json()["origin"] == "flaky":
            break
        assert time.monotonic() - started < COOLDOWN_MS / 1000 + 5
        time.sleep(0.1)
    back_after = time.monotonic() - started
    print(f"traffic back on the primary {back_after:.2f}s after it recovered")
    assert r.header("x-origin-error") is None
    assert "health" not in r.header("x-origin-decision")


def test_health_is_shared_by_the_domains_of_an_origin_and_survives_a_push(edge, flaky, path):
    # Reached the same way (address, port, scheme, connect timeout), whatever
    # Host each domain sends: one cluster, one health state.
    primary = {"address": "127.0.0.1", "port": FLAKY_PORT, "response_timeout_ms": 1000,
               "connect_timeout_ms": 9_999}
    first = edge.push_policy({
        "domain": f"a-{uuid.uuid4().hex[:8]}.failover.test",
        "primary": primary, "secondary": WWW_SECONDARY,
        "origin_host": {"mode": "custom", "value": "one.origin"},
    })
    for i in range(3):
        edge.request(first, f"/delay/flaky/5000{path}/{i}")
    # A second domain on the same origin, pushed now: the origin is already down.
    second = edge.push_policy({
        "domain": f"b-{uuid.uuid4().hex[:8]}.failover.test",
        "primary": primary, "secondary": WWW_SECONDARY,
        "origin_host": {"mode": "custom", "value": "another.origin"},
    })
    r, waited = timed(edge, second, f"{path}/second")
    assert r.header("x-origin-error") == "orig marked down; failover=secondary"
    assert waited < 0.5


def test_health_survives_pushes_under_load_with_no_failed_request(edge, flaky, path):
    domain = edge.fresh_domain(
        {"address": "127.0.0.1", "port": FLAKY_PORT, "response_timeout_ms": 1000},
        WWW_SECONDARY,
    )
    for i in range(3):
        edge.request(domain, f"/delay/flaky/5000{path}/{i}")
    failures = []
    stop = threading.Event()

    def load():
        n = 0
        while not stop.is_set():
            n += 1
            r = edge.request(domain, f"/delay/flaky/5000{path}/load/{n}")
            if r.status != 200 or r.header("x-origin-error") != "orig marked down; failover=secondary":
                failures.append((r.status, r.header("x-origin-error")))

    worker = threading.Thread(target=load)
    worker.start()
    try:
        for _ in range(3):
            edge.fresh_domain(WWW_PRIMARY, WWW_SECONDARY)  # a push of another domain
    finally:
        stop.set()
        worker.join()
    assert failures == []


def test_the_access_log_has_the_decision_and_what_came_of_it(edge, path):
    domain = edge.fresh_domain(WWW_PRIMARY, WWW_SECONDARY)
    edge.request(domain, path)
    log = edge.run_dir / "origin-access.log"
    deadline = time.monotonic() + 5
    line = None
    while line is None and time.monotonic() < deadline:
        lines = log.read_text().splitlines() if log.exists() else []
        line = next((json.loads(x) for x in lines if path in x), None)
        time.sleep(0.1)
    assert line is not None, "no access log line within 5 s"
    assert line["status"] == 200
    assert line["decision"].startswith(f"domain={domain}; origin=secondary; address=backup.example.net")
    assert line["origin_error"] == "orig failed; failover=secondary"
    assert line["chain"].startswith("chain:")
    assert line["origin_cluster"].startswith("origin:http:backup.example.net:18085:")
    assert line["attempts"] == 2


def https_chain(edge, secondary_address: str) -> str:
    """Both origins over HTTPS on port 18443, each sent its own name as Host
    and SNI (`origin_domain`): the primary answers 503 on /status/multi-tenant/503/."""
    return edge.fresh_domain(
        {"address": "origin-secure.example.net", "port": 443},
        {"address": secondary_address, "port": 443},
        protocol={"policy": "https", "https_port": 18443},
        origin_host={"mode": "origin_domain"},
    )


def test_an_https_secondary_gets_its_own_sni_checked_against_its_certificate(
    edge, tls_backup, path
):
    domain = https_chain(edge, "backup-tls.example.org")
    r = edge.request(domain, f"/status/multi-tenant/503{path}")
    assert r.status == 200
    seen = r.json()
    assert (seen["origin"], seen["scheme"]) == ("tls-backup", "https")
    assert seen["sni"] == "backup-tls.example.org"
    assert seen["host"] == "backup-tls.example.org:18443"
    assert r.header("x-origin-error") == "orig failed; failover=secondary"
    assert "sni=backup-tls.example.org" in r.header("x-origin-decision")


def test_an_https_secondary_whose_certificate_does_not_name_its_sni_is_refused(
    edge, tls_backup, path
):
    # The defect this replaces: a replayed request sent no SNI and accepted
    # any certificate. Now the secondary's handshake is checked like any.
    domain = https_chain(edge, "wrong-name.example.org")
    r = edge.request(domain, f"/status/multi-tenant/503{path}")
    assert r.status == 502
    assert r.header("x-origin-error").startswith(
        "orig failed; failover=secondary; secondary TLS handshake failed"
    ), r.header("x-origin-error")
    assert tls_backup.log.matching(path) == []
