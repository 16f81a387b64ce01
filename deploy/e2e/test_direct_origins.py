"""Origins reached through forward-proxy shards (`settings.direct_origins`):
a domain without a failover chain gets no cluster of its own; Envoy learns
its origin's address, port, SNI and the name to check from the request. A
chain is one cluster, its origins at successive priorities.

Its own Envoy (edge.yaml on ports 10580/10543, admin :9941) with 4 shards,
and its own origins on 127.0.0.5: an HTTPS origin whose certificate names
only the `*-ok` names below, a plain one, and one that answers 503.
"""

import json
import shutil
import socket
import time
import uuid

import pytest
from conftest import COOLDOWN_MS, Edge, allow_test_origins, copy_certs
from edge import Envoy, bundle, cli, edge_config, http_get
from origins import DemoOrigins, OriginSpec

ADDRESS = "127.0.0.5"
TLS_PORT, PLAIN_PORT, FAILING_PORT, SECOND_PLAIN_PORT = 18543, 18581, 18582, 18583
# A listener whose accept queue is full: the kernel drops new SYNs, so a
# connection to it never completes (a connect timeout on loopback).
STALLED_PORT = 18584
HTTP_PORT, HTTPS_PORT, ADMIN = 10580, 10543, "http://127.0.0.1:9941"
SHARDS = 4
CERT_NAMES = (
    "default.origin.test",
    "direct-ok.origin.test",
    "custom-ok.sni.test",
    "host-ok.sni.test",
    "accel-ok.direct.test",
)
# Origin names the edge knows fixed addresses for; any other is looked up on
# the tests' DNS server, which knows none.
RESOLVE = {
    "direct-ok.origin.test": ADDRESS,
    "direct-bad.origin.test": ADDRESS,
    "plain.origin.test": ADDRESS,
}


def direct_config() -> dict:
    config = edge_config()
    ports = {"viewer_http": HTTP_PORT, "viewer_https": HTTPS_PORT}
    for listener in config["static_resources"]["listeners"]:
        if listener["name"] in ports:
            listener["address"]["socket_address"]["port_value"] = ports[listener["name"]]
    config["admin"]["address"]["socket_address"]["port_value"] = int(ADMIN.rsplit(":", 1)[1])
    return config


@pytest.fixture(scope="module")
def origins(demo_origins):
    specs = [
        OriginSpec("direct-tls", TLS_PORT, CERT_NAMES, address=ADDRESS),
        OriginSpec("direct-plain", PLAIN_PORT, address=ADDRESS),
        OriginSpec("direct-failing", FAILING_PORT, kind="failing", address=ADDRESS),
        OriginSpec("direct-plain-2", SECOND_PLAIN_PORT, address=ADDRESS),
    ]
    with DemoOrigins(specs, demo_origins.certs) as origins:
        yield origins


@pytest.fixture(scope="module")
def edge(tmp_path_factory, demo_origins, name_server, origins):
    run_dir = tmp_path_factory.mktemp("direct")
    copy_certs(demo_origins.certs, run_dir)
    policies = run_dir / "policies"
    policies.mkdir()
    settings = {
        "unknown_domain": {"action": "local_reply", "status": 404},
        "decision_header": True,
        "origin_ca_file": "certs/ca.pem",
        "resolve": RESOLVE,
        "dns_resolvers": [name_server.address],
        "origin_health": {"cooldown_ms": COOLDOWN_MS},
        "direct_origins": {"shards": SHARDS},
        # This edge's own sockets: never an origin.
        "origin_networks": {
            "edge": [{"network": "127.0.0.0/8", "ports": [HTTP_PORT, HTTPS_PORT, 9941]}]
        },
    }
    (policies / "settings.json").write_text(json.dumps(allow_test_origins(settings)))
    # A domain is needed to start with: the plain origin, on its own port.
    (policies / "start.direct.test.json").write_text(json.dumps({
        "domain": "start.direct.test",
        "primary": {"address": ADDRESS, "port": PLAIN_PORT},
    }))  # fmt: skip
    bundle(run_dir, [policies])
    envoy = Envoy(run_dir, direct_config(), admin=ADMIN)
    envoy.start()
    try:
        edge = Edge(run_dir, envoy, origins.log, demo_origins.certs, (HTTP_PORT, HTTPS_PORT))
        edge.policies = policies
        yield edge
    finally:
        envoy.stop()


def push(edge: Edge, primary: dict, secondary: dict | None = None, **policy) -> str:
    domain = policy.pop("name", None) or f"d{uuid.uuid4().hex[:12]}.direct.test"
    document = {"domain": domain, "primary": primary, **policy}
    if secondary:
        document["secondary"] = secondary
    (edge.policies / f"{domain}.json").write_text(json.dumps(document))
    bundle(edge.run_dir, [edge.policies], admin=edge.envoy.admin)
    edge.wait_for(lambda: edge.request(domain, f"/probe/{uuid.uuid4().hex}").status != 404)
    return domain


def clusters_file(edge: Edge) -> list[dict]:
    return json.loads((edge.run_dir / "origin-policy.cds.json").read_text())["resources"]


def shard_hosts(edge: Edge) -> dict[str, set[str]]:
    """Direct cluster -> the origin hosts (address:port) it has learnt."""
    out: dict[str, set[str]] = {}
    for line in http_get(f"{ADMIN}/clusters")[1].splitlines():
        parts = line.split("::")
        if parts[0].startswith("origin-policy.direct.") and parts[2] == "hostname":
            out.setdefault(parts[0], set()).add(parts[3])
    return out


TLS_RULES = {
    # rule -> (policy fields, origin address, the domain or None, SNI sent)
    "origin_domain": lambda ok: (
        {"origin_host": {"mode": "origin_domain"}},
        f"direct-{ok}.origin.test",
        None,
        f"direct-{ok}.origin.test",
    ),
    "custom_sni": lambda ok: (
        {"origin_sni": {"mode": "custom", "value": f"custom-{ok}.sni.test"}},
        ADDRESS,
        None,
        f"custom-{ok}.sni.test",
    ),
    "custom_host": lambda ok: (
        {"origin_host": {"mode": "custom", "value": f"host-{ok}.sni.test"}},
        ADDRESS,
        None,
        f"host-{ok}.sni.test",
    ),
    "acceleration_domain": lambda ok: (
        {"origin_host": {"mode": "acceleration_domain"}},
        ADDRESS,
        f"accel-{ok}.direct.test",
        f"accel-{ok}.direct.test",
    ),
}


@pytest.mark.parametrize("matches", [True, False], ids=["name-matches", "name-differs"])
@pytest.mark.parametrize("rule", list(TLS_RULES))
def test_an_https_origin_gets_its_sni_and_its_certificate_checked(
    edge, origins, path, rule, matches
):
    fields, address, name, sni = TLS_RULES[rule]("ok" if matches else "bad")
    domain = push(
        edge,
        {"address": address, "port": TLS_PORT},
        name=name,
        protocol={"policy": "https", "https_port": TLS_PORT},
        **fields,
    )
    r = edge.request(domain, path)
    reached = origins.log.matching(path)
    decision = r.header("x-origin-decision") or ""
    assert f"sni={sni}" in decision, decision
    if matches:
        assert r.status == 200, (r.status, r.header("x-origin-error"))
        assert [(s.sni, s.scheme) for s in reached] == [(sni, "https")]
        assert r.header("x-origin-error") is None
    else:
        # The handshake fails on the certificate's name: nothing is sent.
        assert reached == []
        assert r.status == 502
        assert r.header("x-origin-error") == (
            "orig TLS handshake failed (CERTIFICATE_VERIFY_FAILED)"
        )
    # No cluster of its own: the origin is a host of an HTTPS shard.
    assert not any(c["name"].startswith("origin:") for c in clusters_file(edge))
    learnt = {h for c, hosts in shard_hosts(edge).items() if ".https." in c for h in hosts}
    assert f"{RESOLVE.get(address, address)}:{TLS_PORT}" in learnt


@pytest.mark.parametrize(
    "origin_host, expected",
    [
        ({"mode": "acceleration_domain"}, "{domain}"),
        ({"mode": "custom", "value": "custom-host.example"}, "custom-host.example"),
        # The origin's own name, with its port when not the default (RFC 9110 7.2).
        ({"mode": "origin_domain"}, f"plain.origin.test:{SECOND_PLAIN_PORT}"),
    ],
    ids=["acceleration_domain", "custom", "origin_domain"],
)
def test_the_host_rule_and_a_custom_port_are_kept(edge, origins, path, origin_host, expected):
    domain = push(
        edge,
        {"address": "plain.origin.test", "port": SECOND_PLAIN_PORT},
        origin_host=origin_host,
    )
    r = edge.request(domain, path)
    assert r.status == 200, (r.status, r.header("x-origin-error"))
    [seen] = origins.log.matching(path)
    assert (seen.origin, seen.port) == ("direct-plain-2", SECOND_PLAIN_PORT)
    assert seen.host == expected.format(domain=domain)
    assert f"port={SECOND_PLAIN_PORT}" in r.header("x-origin-decision")


def test_each_origin_keeps_its_response_and_connect_timeouts(edge, origins, path):
    slow = push(edge, {"address": ADDRESS, "port": PLAIN_PORT, "response_timeout_ms": 500})
    patient = push(
        edge,
        {"address": ADDRESS, "port": PLAIN_PORT, "response_timeout_ms": 5000, "connect_timeout_ms": 1700},
    )  # fmt: skip
    r = edge.request(slow, f"/delay/direct-plain/1500{path}")
    assert r.status == 504, r.status
    assert r.header("x-origin-error") == "orig response timeout"
    r = edge.request(patient, f"/delay/direct-plain/1500{path}")
    assert r.status == 200, (r.status, r.header("x-origin-error"))
    # The connect timeout is the shard's: each timeout has its own shards.
    timeouts = {
        c["name"]: c["connect_timeout"]
        for c in clusters_file(edge)
        if c["name"].startswith("origin-policy.direct.http.1700.")
    }
    assert len(timeouts) == SHARDS and set(timeouts.values()) == {"1.700s"}
    assert any(c.startswith("origin-policy.direct.http.1700.") for c in shard_hosts(edge))


@pytest.fixture
def stalled_origin():
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((ADDRESS, STALLED_PORT))
    listener.listen(0)
    # The queue's one place, taken and never accepted.
    queued = socket.create_connection((ADDRESS, STALLED_PORT), timeout=5)
    try:
        yield
    finally:
        queued.close()
        listener.close()


def test_a_connect_timeout_says_so_and_explain_names_the_shard_envoy_used(
    edge, stalled_origin, path
):
    domain = push(edge, {"address": ADDRESS, "port": STALLED_PORT, "connect_timeout_ms": 400})
    r = edge.request(domain, path)
    assert r.status == 504, (r.status, r.header("x-origin-error"))
    assert r.header("x-origin-error") == "orig connect timeout"
    explained = cli("explain", "--json", "--policies", str(edge.policies), f"http://{domain}{path}")
    assert explained.returncode == 0, explained.stderr
    view = json.loads(explained.stdout)
    cluster = view["route_cluster"]
    assert cluster.startswith("origin-policy.direct.http.400."), cluster
    assert view["origin"]["cluster"] == cluster and view["origin"]["direct"] is True
    # The shard explain names is the one Envoy sent the request to.
    assert f"{ADDRESS}:{STALLED_PORT}" in shard_hosts(edge).get(cluster, set()), shard_hosts(edge)
    text = cli("explain", "--policies", str(edge.policies), f"http://{domain}{path}").stdout
    assert cluster in text, text


def chain_clusters(edge: Edge) -> list[dict]:
    return [c for c in clusters_file(edge) if c["name"].startswith("chain:")]


def test_a_domain_with_a_secondary_fails_over_through_one_chain_cluster(edge, origins, path):
    domain = push(
        edge,
        {"address": ADDRESS, "port": FAILING_PORT},
        {"address": ADDRESS, "port": PLAIN_PORT},
        failover={"statuses": [503]},
    )
    r = edge.request(domain, path)
    assert r.status == 200, (r.status, r.header("x-origin-error"))
    assert [s.origin for s in origins.log.matching(path)] == ["direct-failing", "direct-plain"]
    assert r.header("x-origin-error") == "orig failed; failover=secondary"
    assert "origin=secondary" in r.header("x-origin-decision")
    # One cluster per chain, its origins at priorities 0 and 1; none of their own.
    assert not any(c["name"].startswith("origin:") for c in clusters_file(edge))
    ports = [
        [e["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"], e["priority"]]
        for c in chain_clusters(edge)
        for e in c["load_assignment"]["endpoints"]
    ]
    assert [FAILING_PORT, 0] in ports and [PLAIN_PORT, 1] in ports


REFUSING = "127.0.0.6"


@pytest.mark.parametrize("matches", [True, False], ids=["name-matches", "name-differs"])
@pytest.mark.parametrize("position", ["primary", "secondary"])
@pytest.mark.parametrize("rule", ["origin_domain", "custom_sni"])
def test_an_https_origin_in_a_chain_cluster_sends_its_sni_and_checks_it(
    edge, origins, path, rule, position, matches
):
    fields, address, _, sni = TLS_RULES[rule]("ok" if matches else "bad")
    tls = {"address": address, "port": TLS_PORT}
    down = {"address": REFUSING, "port": TLS_PORT}
    primary, secondary = (tls, down) if position == "primary" else (down, tls)
    domain = push(
        edge, primary, secondary, protocol={"policy": "https", "https_port": TLS_PORT}, **fields
    )
    r = edge.request(domain, path)
    reached = origins.log.matching(path)
    if matches:
        assert r.status == 200, (r.status, r.header("x-origin-error"))
        assert [s.sni for s in reached] == [sni]
        assert f"origin={position}" in r.header("x-origin-decision")
    else:
        assert reached == []
        assert r.status == 502, r.status
        error = r.header("x-origin-error")
        if position == "secondary":
            assert error == (
                "orig failed; failover=secondary; "
                "secondary TLS handshake failed (CERTIFICATE_VERIFY_FAILED)"
            ), error
        else:
            assert error.startswith("orig failed; failover=secondary; secondary connect failed"), error


def test_an_origin_marked_down_is_skipped_for_every_domain_that_uses_it(edge, origins, path):
    # Its own connect timeout: a shard set that no other test's origins use.
    primary = {"address": ADDRESS, "port": FAILING_PORT, "connect_timeout_ms": 1900}
    # Healthy while the pushes are probed.
    origins.force_status("direct-failing", 200)
    first, second = push(edge, primary), push(edge, primary)
    origins.force_status("direct-failing", None)
    for i in range(3):
        r = edge.request(first, f"{path}/{i}")
        assert r.status == 503 and r.header("x-origin-error") == "orig response 503 error"
    # Three failures through one domain mark the origin down for both.
    started = time.monotonic()
    r = edge.request(second, f"{path}/after")
    assert r.status == 502, r.status
    assert r.header("x-origin-error") == "orig marked down, no origin left"
    assert origins.log.matching(f"{path}/after") == []
    # After the cool-down the next request is tried again.
    origins.force_status("direct-failing", 200)
    try:
        edge.wait_for(lambda: edge.request(second, f"{path}/back").status == 200, timeout=10)
        assert time.monotonic() - started >= COOLDOWN_MS / 1000 * 0.9
    finally:
        origins.force_status("direct-failing", None)


def test_an_origin_name_that_does_not_resolve_says_so(edge, path):
    domain = push(edge, {"address": "nowhere.direct.test", "port": PLAIN_PORT})
    r = edge.request(domain, path)
    assert r.status == 502, r.status
    assert r.header("x-origin-error") == "orig dns failed (the origin's name has no address)"


def test_a_name_resolving_to_a_refused_address_is_never_reached_through_a_shard(
    edge, name_server, path
):
    # The edge's admin port, and plain loopback on a port the tests do not allow.
    name_server.names["edge.direct.test"] = "127.0.0.1"
    for port, why in ((int(ADMIN.rsplit(":", 1)[1]), "the edge itself"), (999, "a special-purpose network")):
        domain = push(edge, {"address": "edge.direct.test", "port": port})
        r = edge.request(domain, path)
        assert r.status == 502, (r.status, r.body[:200])
        assert r.header("x-origin-error") == f"origin address not allowed ({why})"
        assert b"command_line" not in r.body


def test_a_new_origin_serves_without_a_cluster_push(edge, origins, path):
    before = clusters_file(edge)
    # Same scheme and timeouts as an origin the edge has: its shards exist.
    domain = push(edge, {"address": "127.0.0.5", "port": SECOND_PLAIN_PORT})
    assert clusters_file(edge) == before
    assert edge.request(domain, path).status == 200
    assert [s.origin for s in origins.log.matching(path)] == ["direct-plain-2"]


def test_a_viewer_cannot_pick_a_shard_or_its_host(edge, origins, path):
    shard = "origin-policy.direct.http.5000.0"
    r = edge.request(
        "start.direct.test",
        path,
        headers={"x-origin-cluster": shard, "x-envoy-upstream-rq-timeout-ms": "1"},
    )
    assert r.status == 200, (r.status, r.header("x-origin-error"))
    [seen] = origins.log.matching(path)
    assert (seen.origin, seen.host) == ("direct-plain", "start.direct.test")
    assert "x-origin-cluster" not in dict(seen.headers)
    # An unknown domain with a shard named gets the edge's 404, not an origin.
    r = edge.request("unknown.direct.test", path, headers={"x-origin-cluster": shard})
    assert r.status == 404
