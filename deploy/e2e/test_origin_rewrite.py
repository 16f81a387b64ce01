"""Scheme, port, Host and SNI as the origin saw them (seed scenarios 1-5)."""

import pytest


def only(seen):
    assert len(seen) == 1, seen
    return seen[0]


def test_https_policy_sends_the_configured_sni_and_validates_it(edge, path):
    r = edge.request("secure.example.com", path)
    assert r.status == 200
    got = only(edge.seen(path))
    assert (got.origin, got.scheme) == ("multi-tenant", "https")
    assert got.sni == "origin-secure.example.net"
    # The origin's own name, with its port: it is not the HTTPS default.
    assert got.host == "origin-secure.example.net:18443"


def test_one_origin_serves_two_certificates_by_sni(edge, path):
    assert edge.request("shop.example.com", path).status == 200
    got = only(edge.seen(path))
    assert (got.origin, got.sni, got.host) == (
        "multi-tenant",
        "shop-origin.example.net",
        "shop-origin.example.net",
    )


def test_a_certificate_that_does_not_match_the_sni_fails_with_502(edge, path):
    r = edge.request("sni-mismatch.test", path)
    assert r.status == 502
    assert r.header("x-origin-error") == "orig TLS handshake failed (CERTIFICATE_VERIFY_FAILED)"
    assert edge.seen(path) == [], "no request may reach an origin whose certificate failed"


def test_https_policy_against_an_http_only_origin_fails_with_502(edge, path):
    r = edge.request("https-to-plain.test", path)
    assert r.status == 502
    assert r.header("x-origin-error").startswith("orig TLS handshake failed (")
    assert edge.seen(path) == []


@pytest.mark.parametrize(
    "viewer, origin, scheme, port",
    [("http", "media", "http", 18082), ("https", "media-tls", "https", 18444)],
)
def test_follow_fetches_with_the_viewer_protocol(edge, path, viewer, origin, scheme, port):
    r = edge.request("media.example.com", path, scheme=viewer)
    assert r.status == 200
    got = only(edge.seen(path))
    assert (got.origin, got.scheme, got.port) == (origin, scheme, port)
    assert got.host == "media.example.com"
    assert got.sni == ("media.example.com" if scheme == "https" else None)
    assert f"scheme={scheme}" in r.header("x-origin-decision")


def test_custom_http_port_8150(edge, path):
    assert edge.request("legacy.example.com", path).status == 200
    got = only(edge.seen(path))
    assert (got.origin, got.scheme, got.port) == ("legacy", "http", 8150)
    assert got.host == "legacy-origin.example.net:8150"


def test_custom_https_port_60080_for_a_wildcard_domain(edge, path):
    assert edge.request("a.b.img.example.com", path).status == 200
    got = only(edge.seen(path))
    assert (got.origin, got.scheme, got.port) == ("img", "https", 60080)
    assert got.host == "img-origin.example.net:60080"
    assert got.sni == "img-origin.example.net"


@pytest.mark.parametrize(
    "domain, host",
    [
        ("plain.example.com", "plain.example.com"),  # acceleration domain
        ("secure.example.com", "origin-secure.example.net:18443"),  # origin domain
        ("shop.example.com", "shop-origin.example.net"),  # custom
    ],
)
def test_origin_host_modes(edge, path, domain, host):
    assert edge.request(domain, path).status == 200
    assert only(edge.seen(path)).host == host


def test_an_origin_reached_by_ip_address_gets_the_policy_port_and_host(edge, path):
    assert edge.request("dynamic.example.com", path).status == 200
    got = only(edge.seen(path))
    assert (got.origin, got.port, got.host) == ("dynamic", 18086, "dynamic-origin.example.net")


def test_an_origins_own_diagnostic_headers_never_reach_the_viewer(edge, path):
    r = edge.request("plain.example.com", f"/forge{path}")
    assert r.status == 200
    assert r.header("x-origin-error") is None
    assert r.header("x-origin-decision").startswith("domain=plain.example.com")
    # And on an answer the edge does speak about, only the edge's word.
    r = edge.request("plain.example.com", f"/forge/status/plain/503{path}")
    assert r.header("x-origin-error") == "orig response 503 error"


def test_a_viewer_cannot_choose_the_cluster(edge, path):
    r = edge.request("plain.example.com", path, headers={"x-origin-cluster": "www_secondary"})
    assert r.status == 200
    assert only(edge.seen(path)).origin == "plain"


def test_an_unknown_host_gets_the_configured_local_reply(edge, path):
    r = edge.request("unknown.example.org", path)
    assert r.status == 404
    assert r.header("x-origin-error") == "no origin policy for host unknown.example.org"
    assert edge.seen(path) == []


def test_a_viewers_diagnostic_headers_never_reach_the_origin(edge, path):
    # The filter reads no header but the host for this policy: the route's
    # request_headers_to_remove drops them.
    forged = {"x-origin-error": "forged", "x-origin-decision": "forged", "x-origin-cluster": "x"}
    r = edge.request("plain.example.com", path, headers=forged)
    assert r.status == 200
    got = only(edge.seen(path))
    assert not got.header_names() & set(forged), got.headers
