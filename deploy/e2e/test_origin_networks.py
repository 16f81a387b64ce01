"""settings.origin_networks in real Envoy: no policy makes the edge fetch from
itself, a private network, a metadata service or loopback it did not allow.

An address written in a policy is refused where the policy enters (here
`bundle`, with the file, domain, JSON pointer and fix); a name is checked on
the address Envoy is about to connect to, by the upstream RBAC filter that
`bundle` derives from the same settings (`origin-policy.networks.ecds.json`).
"""

from __future__ import annotations

import json
import uuid

import pytest
from conftest import DENIED_TEST_ADDRESS

from edge import EdgeError

ADMIN_PORT = 9901
FEED_PORT = 18090
PLAIN_ORIGIN_PORT = 18081
# Not in the tests' allowed ports (1024-65535): plain loopback.
LOW_PORT = 999
REFUSED_COUNTER = "wasmcustom.origin_policy.origin_address_refused"


def domain_for(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}.networks.test"


def pushed_error(edge, document: dict) -> str:
    """Writes `document` into the edge's policies and bundles; the bundle must
    refuse it. The file is removed again, so that later pushes bundle."""
    path = edge.policies / f"{document['domain']}.json"
    path.write_text(json.dumps(document))
    try:
        with pytest.raises(EdgeError) as refused:
            edge.rebundle()
    finally:
        path.unlink()
    return str(refused.value)


@pytest.mark.parametrize(
    ("address", "port", "why"),
    [
        ("127.0.0.1", ADMIN_PORT, "127.0.0.1 is the edge itself"),
        ("127.0.0.1", FEED_PORT, "127.0.0.1 is the edge itself"),
        ("127.0.0.1", LOW_PORT, "127.0.0.1 is in 127.0.0.0/8 (loopback)"),
        ("10.20.30.40", 80, "10.20.30.40 is in 10.0.0.0/8 (private)"),
        ("169.254.169.254", 80, "169.254.0.0/16 (link-local, cloud metadata services)"),
        ("::ffff:127.0.0.1", PLAIN_ORIGIN_PORT, "::ffff:0.0.0.0/96 (IPv4-mapped)"),
    ],
)
def test_an_address_the_edge_may_not_fetch_from_is_refused_and_never_served(
    edge, path, address, port, why
):
    domain = domain_for("literal")
    error = pushed_error(edge, {"domain": domain, "primary": {"address": address, "port": port}})
    assert f"{domain}.json: {domain}: /primary/address: origin `" in error, error
    assert why in error, error
    assert "(fix: " in error
    # Nothing was bundled: the domain is unknown to the edge (404 locally).
    r = edge.request(domain, path)
    assert r.status == 404, (r.status, r.headers)


def test_a_refused_edit_keeps_the_domains_last_good_policy(edge, path):
    domain = edge.push_policy(
        {"domain": domain_for("kept"), "primary": {"address": "127.0.0.1", "port": PLAIN_ORIGIN_PORT}}
    )
    pushed_error(edge, {"domain": domain, "primary": {"address": "127.0.0.1", "port": ADMIN_PORT}})
    r = edge.request(domain, path)
    assert r.status == 200
    assert f"port={PLAIN_ORIGIN_PORT}" in r.header("x-origin-decision")


def refused_by_envoy(edge, domain: str, path: str, why: str) -> None:
    before = edge.stats()
    r = edge.request(domain, path)
    assert r.status == 502, (r.status, r.headers, r.body[:200])
    assert r.header("x-origin-error") == f"origin address not allowed ({why})"
    # Nothing of an origin's answer (or the admin interface's) reaches the viewer.
    assert b"command_line" not in r.body
    # The filter's counters reach Envoy's stats within a second.
    edge.wait_for(lambda: edge.stats().get(REFUSED_COUNTER, 0) > before.get(REFUSED_COUNTER, 0))
    after = edge.stats()
    denied = [k for k in after if k.endswith("rbac.origin_networks.denied")]
    assert denied and sum(after[k] for k in denied) > sum(before.get(k, 0) for k in denied)


def test_a_name_that_resolves_to_the_edge_or_to_loopback_is_never_connected_to(
    edge, name_server, path
):
    name_server.names["admin.networks.test"] = "127.0.0.1"
    name_server.names["loop.networks.test"] = "127.0.0.1"
    admin = edge.push_policy(
        {"domain": domain_for("dns-admin"), "primary": {"address": "admin.networks.test", "port": ADMIN_PORT}}
    )
    refused_by_envoy(edge, admin, path, "the edge itself")
    loop = edge.push_policy(
        {"domain": domain_for("dns-loop"), "primary": {"address": "loop.networks.test", "port": LOW_PORT}}
    )
    refused_by_envoy(edge, loop, path, "a special-purpose network")


def test_a_name_re_bound_to_a_denied_address_while_the_edge_runs_is_refused(
    edge, name_server, path
):
    name_server.names["rebind.networks.test"] = "127.0.0.1"
    domain = edge.push_policy(
        {"domain": domain_for("rebind"), "primary": {"address": "rebind.networks.test", "port": PLAIN_ORIGIN_PORT}}
    )
    assert edge.request(domain, path).status == 200
    name_server.names["rebind.networks.test"] = DENIED_TEST_ADDRESS

    def refused() -> bool:
        r = edge.request(domain, f"{path}/{uuid.uuid4().hex}")
        return r.header("x-origin-error") == "origin address not allowed (a denied network)"

    # Envoy re-resolves at the one-second TTL, at most every 5 s.
    edge.wait_for(refused, timeout=30)
    refused_by_envoy(edge, domain, f"{path}/after", "a denied network")


def test_the_demo_domains_are_still_served(edge, path):
    for domain in ("plain.example.com", "media.example.com", "legacy.example.com"):
        r = edge.request(domain, path)
        assert r.status == 200, (domain, r.status, r.headers)
        assert "x-origin-error" not in r.headers, (domain, r.headers)
