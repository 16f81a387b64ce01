"""The replicated control plane under faults, with real Envoys, a real etcd
cluster and real replicas, each on a loopback address of its own
(deploy/fleet/cluster.py): etcd members 127.0.0.11-13, replicas r1 and r2
(`origin-policy serve --etcd`) on 127.0.0.21-22, three Envoys on
127.0.0.31-33 whose ADS and feed clusters list both replicas, health-checked
on /healthz. Every replica's HTTP and ADS listeners are mTLS: a CA made with
`origin-policy certs`, a server certificate per replica naming its address,
a node certificate per Envoy (listed in `--tls-nodes`) on its ADS and feed
clusters and their health checks, an operator's for this test's requests.
etcd's client and peer ports are TLS with client-cert-auth, of a CA of the
store's own (`serve --etcd-ca/--etcd-cert/--etcd-key`).
A steady client on every Envoy records each request (deploy/fleet/load.py).

1. a write through either replica is visible through both and on every Envoy;
2. every channel is mTLS: a replica answers a request in the clear, on its
   HTTP and on its ADS port, with a TLS alert and says so in its events; a
   client without a certificate is refused in the handshake, a node's
   certificate gets /healthz but not the API, nor a poll as another node;
   every Envoy is on an ADS stream and polls the feed as its certificate's
   identity, and counts TLS handshakes in both clusters;
3. the store is mTLS: each etcd member's client ports answer nothing in the
   clear and refuse a client without a certificate or with an edge's (of
   the fleet's CA: the store's is another), and answer a replica's; its
   peer port refuses a client without a certificate; the replicas' store
   endpoints are https;
then, one at a time, each fault with concurrent writers through both
replicas and a push made as soon as the fault is in place:
4. a replica killed (SIGKILL), the push through the other;
5. a replica's store connection cut (its etcd port reset by iptables), the
   push through the other;
6. a store member killed (the etcd leader, of three), the push through either;
7. a replica partitioned (every packet to it and from it to the store
   dropped), the push through the other.
For each: the push reaches every Envoy, every Envoy moves off the faulty
replica (its health checks fail it, its ADS stream is on the other), every
acknowledged write is in the store through both replicas afterwards, and the
status pages say what happened. The fault is then undone and everything is
back before the next. Last, not one viewer request failed in the module.

Needs etcd and iptables (`WITH_ENVOY=1 scripts/setup`) and root for iptables.
Run under `flock /tmp/e2e.lock`.
"""

from __future__ import annotations

import socket
import ssl
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "fleet"))

from cluster import (  # noqa: E402
    CLIENT_PORTS,
    PEER_PORT,
    PUSH_DOMAIN,
    FaultRun,
    Faults,
    Replica,
    ReplicatedFleet,
    ask,
    back_on,
    push_policy,
    request,
    run_scenario,
    scenarios,
    wait_for,
)
from edge import FEED_CLUSTER  # noqa: E402
from node import CONTROL_PLANE_CLUSTER  # noqa: E402

# The limits are wide: what they bound is correctness (it happens), not speed.
LIMIT = 30.0
# The source of this test's connections in the clear or without a
# certificate, so that a replica's events name them.
PROBE_SOURCE = "127.0.0.81"
# A TLS record of the alert type, TLS 1.2 framing (TLS 1.3 sends its alerts
# so too).
TLS_ALERT = b"\x15\x03\x03"
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # and SETTINGS


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, demo_origins, fault_rules):
    fleet = ReplicatedFleet(tmp_path_factory.mktemp("replicas"), demo_origins.certs)
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.stop()


def events(replica: Replica, since: float, kinds: set[str] | None = None) -> list[dict]:
    """Its /status events from wall time `since` on (of `kinds`)."""
    return [e for e in replica.status()["events"]
            if e["at_ms"] >= since * 1000 - 5 and (kinds is None or e["event"] in kinds)]


def in_order(found: list[dict], expected: list[str]) -> bool:
    """`expected` kinds appear in `found` in this order (others may come between)."""
    kinds = iter(e["event"] for e in found)
    return all(any(k == want for k in kinds) for want in expected)


def names(replica: Replica) -> set[str]:
    return set(replica.status()["replicas"])


def applied(replica: Replica) -> int:
    return replica.status()["store"]["applied"]


def in_the_clear(address: str, port: int, payload: bytes) -> bytes:
    """What a listener answers `payload` sent without TLS from
    PROBE_SOURCE, until it closes the connection."""
    with socket.create_connection((address, port), timeout=10, source_address=(PROBE_SOURCE, 0)) as s:
        s.sendall(payload)
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
        return answer


def without_certificate(address: str, port: int, ca: Path) -> None:
    """A TLS client from PROBE_SOURCE that checks the server's certificate
    and presents none: the first read raises the server's alert (TLS 1.3
    refuses a client's certificate after the client's handshake ended).
    Nothing is sent, so the server closes cleanly, alert first."""
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection((address, port), timeout=10, source_address=(PROBE_SOURCE, 0)) as raw:
        with context.wrap_socket(raw, server_hostname=address) as s:
            s.recv(1)


def check_run(fleet: ReplicatedFleet, run: FaultRun) -> None:
    """What every fault must keep: no viewer request failed, the push is
    everywhere, no acknowledged write lost (through each replica)."""
    print(f"\n{run.name}: push acknowledged {run.push_acked_s:.2f} s, "
          f"visible on every Envoy {run.push_visible_s:.2f} s after it was made ("
          + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(run.visible.items())) + ")"
          + (f", every Envoy off the faulty replica {run.moved_off_s:.2f} s after the fault"
             if run.moved_off_s is not None else "")
          + f"; {run.served} viewer requests, {len(run.failed)} failed; "
            f"{run.acked} writes acknowledged, {len(run.lost)} lost")
    assert run.failed == [], run.failed[:10]
    assert run.lost == [], run.lost
    assert run.acked > 0
    for replica in fleet.replicas:
        wait_for(lambda: applied(replica) >= run.push_answer["version"], LIMIT,
                 what=f"{replica.replica} applied the push")
        code, body = replica.get(PUSH_DOMAIN)
        assert code == 200 and body["origin_host"]["value"] == run.push_value, (replica.replica, body)
    for node in fleet.nodes:
        assert ask(node, PUSH_DOMAIN) == (200, run.push_value)


def run_fault_named(fleet: ReplicatedFleet, name: str, during) -> FaultRun:
    return run_scenario(fleet, scenarios(fleet)[name], during)


def test_write_through_either_replica_is_visible_everywhere(fleet):
    for replica in fleet.replicas:
        status = replica.status()
        assert status["replica"] == replica.replica
        assert status["store"]["kind"] == "etcd" and status["store"]["state"] == "connected", status["store"]
        assert status["replicas"].keys() == {"r1", "r2"}, status["replicas"]
        code, body = replica.healthz()
        assert code == 200 and body["serving"] is True, body
    for node in fleet.nodes:
        for replica in fleet.replicas:
            assert back_on(node, replica), (node.node_id, replica.replica)
    for writer, reader in [(fleet.replicas[0], fleet.replicas[1]), (fleet.replicas[1], fleet.replicas[0])]:
        value, answer, _ = fleet.push([writer], timeout=10)
        # Read your writes on the writer; the other has it too, at once or nearly.
        assert writer.get(PUSH_DOMAIN)[1]["origin_host"]["value"] == value
        wait_for(lambda: reader.get(PUSH_DOMAIN)[1]["origin_host"].get("value") == value,
                 LIMIT, what=f"{writer.replica}'s write through {reader.replica}")
        # Its status says it applied the write (the version the answer gave).
        wait_for(lambda: applied(reader) >= answer["version"], LIMIT, what=f"{reader.replica} applied it")
        fleet.visible_everywhere(value, LIMIT)
        print(f"\nwritten through {writer.replica} ({answer['version']}): read through {reader.replica}, "
              f"on every Envoy")


def test_every_channel_is_mtls(fleet):
    since = time.time()
    ids = {n.node_id for n in fleet.nodes}
    as_node = fleet.tls.client(as_node="fleet-1")
    for replica in fleet.replicas:
        assert replica.url.startswith("https://")
        # The HTTP listener (API, feed, /status, /healthz) and the ADS one
        # answer a client in the clear with a TLS alert, nothing else.
        answer = in_the_clear(replica.address, replica.http_port,
                              f"GET /status HTTP/1.1\r\nhost: {replica.address}\r\n\r\n".encode())
        assert answer.startswith(TLS_ALERT) and b"HTTP/" not in answer, answer
        answer = in_the_clear(replica.address, replica.ads_port, HTTP2_PREFACE)
        assert answer.startswith(TLS_ALERT), answer
        # TLS without a client certificate: refused in the handshake, on
        # either listener.
        for port in (replica.http_port, replica.ads_port):
            with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED"):
                without_certificate(replica.address, port, fleet.tls.ca)
        # A node's certificate: /healthz (what its health checks ask), not
        # the API or /status, and a poll only as the node it names.
        assert request(f"{replica.url}/healthz", context=as_node) == (200, {"serving": True})
        assert request(f"{replica.url}/v1/domains/{PUSH_DOMAIN}", context=as_node)[0] == 403
        assert request(f"{replica.url}/status", context=as_node)[0] == 403
        code, body = request(f"{replica.url}/changes", headers={"x-feed-node": "fleet-2"}, context=as_node)
        assert code == 403 and 'its certificate node "fleet-1"' in body["message"], body
        # Each refusal is an event, by the client's address: on each
        # listener the one without a certificate, and the one in the clear.
        def refusals_listed() -> bool:
            refused = [(e["event"], e["message"]) for e in events(replica, since, {"feed_refused", "ads_refused"})]
            return all(
                (kind, f"{PROBE_SOURCE}: TLS refused: no client certificate") in refused
                and any(k == kind and m.startswith(f"{PROBE_SOURCE}: TLS refused: ")
                        and not m.endswith("no client certificate") for k, m in refused)
                for kind in ("feed_refused", "ads_refused"))
        wait_for(refusals_listed, LIMIT, 0.1, f"{replica.replica}'s events listing the refusals")

    # Every Envoy is on the ADS stream of one replica, and polls the feed,
    # as the node of its certificate (a node.id or a poll that is not its
    # certificate's is refused): the replicas list the Envoys by it.
    def on_ads() -> dict[str, list[str]]:
        connected: dict[str, list[str]] = {}
        for r in fleet.replicas:
            for node, entry in r.status()["nodes"].items():
                if entry.get("xds", {}).get("connected"):
                    connected.setdefault(node, []).append(r.replica)
        return connected
    connected = wait_for(lambda: (c := on_ads()).keys() == ids and all(len(v) == 1 for v in c.values()) and c,
                         LIMIT, 0.1, "every Envoy on one replica's ADS stream")
    polled = set()
    for r in fleet.replicas:
        nodes = r.status()["nodes"]
        assert nodes.keys() <= ids, (r.replica, nodes.keys())
        polled |= {n for n, entry in nodes.items() if entry.get("version") is not None}
    assert polled == ids, polled
    # Envoy's side: both clusters made their connections with TLS, and
    # their health checks pass (they are over TLS too).
    for node in fleet.nodes:
        stats = node.stats()
        for cluster in (CONTROL_PLANE_CLUSTER, FEED_CLUSTER):
            assert stats.get(f"cluster.{cluster}.ssl.handshake", 0) > 0, (node.node_id, cluster)
            assert stats.get(f"cluster.{cluster}.health_check.success", 0) > 0, (node.node_id, cluster)
    print("\nmTLS: Envoys on ADS " + ", ".join(f"{n} on {v[0]}" for n, v in sorted(connected.items())))


def test_store_is_mtls(fleet):
    """etcd's client and peer ports are TLS with client-cert-auth, of a CA of
    the store's own: only the replicas' certificates open it."""
    etcd_tls = fleet.etcd_tls
    for replica in fleet.replicas:
        store = replica.status()["store"]
        assert store["state"] == "connected" and store["endpoints"], store
        assert all(e.startswith("https://") for e in store["endpoints"]), store
    a_node = (fleet.tls.node("fleet-1").cert, fleet.tls.node("fleet-1").key)
    for member in fleet.etcd.members:
        for port in CLIENT_PORTS:
            url = f"https://{member.address}:{port}/version"
            # In the clear: no answer.
            answer = in_the_clear(member.address, port,
                                  f"GET /version HTTP/1.1\r\nhost: {member.address}\r\n\r\n".encode())
            assert b"etcdserver" not in answer, answer
            # A replica's certificate: etcd answers.
            code, body = request(url, context=etcd_tls.client(etcd_tls.clients["r1"]))
            assert code == 200 and "etcdserver" in body, body
            # None, or an edge's (of the fleet's CA, not the store's): refused.
            for certificate in (None, a_node):
                with pytest.raises(OSError):
                    request(url, context=etcd_tls.client(certificate))
        # The peer port too: no member's certificate, no Raft.
        with pytest.raises(OSError):
            request(f"https://{member.address}:{PEER_PORT}/members", context=etcd_tls.client())


def test_replica_killed(fleet):
    r1, r2 = fleet.replicas

    def during(run: FaultRun):
        # The survivor sees r2's lease go.
        wait_for(lambda: "r2" not in names(r1), LIMIT, 0.2, "r2 gone from r1's replicas")
        assert any("r2" in e["message"] for e in events(r1, run.started, {"replica_left"}))

    run = run_fault_named(fleet, "replica killed", during)
    check_run(fleet, run)
    wait_for(lambda: names(r1) == {"r1", "r2"}, LIMIT, 0.2, "r2 back in r1's replicas")
    assert in_order(events(r1, run.started, {"replica_left", "replica_joined"}), ["replica_left", "replica_joined"])
    # The restarted replica is on the store and has every write.
    status = r2.status()
    assert status["store"]["state"] == "connected" and status["replicas"].keys() == {"r1", "r2"}
    assert applied(r2) >= run.push_answer["version"]


def test_store_connection_cut(fleet):
    r1, r2 = fleet.replicas

    def during(run: FaultRun):
        # r2 answers, and says its store is unreachable.
        store = wait_for(lambda: (s := r2.status()["store"])["state"] == "unreachable" and s, LIMIT, 0.1,
                         "r2's store unreachable")
        assert store["error"], store
        code, body = r2.healthz()
        assert code == 503 and body["serving"] is False and body["reason"], body
        assert events(r2, run.started, {"store_unreachable"})
        code, body = r2.put(PUSH_DOMAIN, push_policy("refused.example.net"))
        assert code == 503 and body["error"] == "store_unavailable", body
        assert r1.status()["store"]["state"] == "connected"

    run = run_fault_named(fleet, "store connection cut", during)
    check_run(fleet, run)
    status = r2.status()
    assert status["store"]["state"] == "connected" and applied(r2) >= run.push_answer["version"]
    # Back in the list of live replicas, for both.
    for r in fleet.replicas:
        wait_for(lambda: names(r) == {"r1", "r2"}, LIMIT, 0.2, f"both replicas in {r.replica}'s replicas")
    found = events(r2, run.started, {"store_unreachable", "store_reachable", "caught_up", "write_refused"})
    assert in_order(found, ["store_unreachable", "store_reachable", "caught_up"]), found
    # The write it refused while cut (and any of the writers').
    assert any(e["event"] == "write_refused" for e in found), found


def test_store_member_killed(fleet):
    def during(run: FaultRun):
        # Two members of three (the leader killed): a quorum; both replicas on the store.
        assert [m.running for m in fleet.etcd.members].count(False) == 1
        for r in fleet.replicas:
            wait_for(lambda: r.status()["store"]["state"] == "connected", LIMIT, 0.1, f"{r.replica} connected")

    run = run_fault_named(fleet, "store member killed", during)
    check_run(fleet, run)
    for r in fleet.replicas:
        status = r.status()
        assert status["store"]["state"] == "connected" and status["store"]["applied"] >= run.push_answer["version"]
        found = events(r, run.started)
        print(f"{r.replica}'s events: " + "; ".join(f"{e['event']}: {e['message']}" for e in found
                                                     if e["event"] != "write_refused"))
        # A lease that expired during the election is taken again.
        wait_for(lambda: names(r) == {"r1", "r2"}, LIMIT, 0.2, f"both replicas in {r.replica}'s replicas")
        # What the status says happened ends with the store reachable and
        # every replica there.
        found = events(r, run.started)
        store = [e for e in found if e["event"] in ("store_unreachable", "store_reachable")]
        assert not store or store[-1]["event"] == "store_reachable", (r.replica, found)
        left = [e for e in found if e["event"] in ("replica_left", "replica_joined")]
        assert not left or left[-1]["event"] == "replica_joined", (r.replica, found)


def test_partition(fleet):
    r1, r2 = fleet.replicas

    def during(run: FaultRun):
        # r2 is unreachable; r1 sees its lease expire.
        with pytest.raises(OSError):
            r2.status(timeout=1)
        wait_for(lambda: "r2" not in names(r1), LIMIT, 0.2, "r2 gone from r1's replicas")
        assert any("r2" in e["message"] for e in events(r1, run.started, {"replica_left"}))

    run = run_fault_named(fleet, "partition", during)
    check_run(fleet, run)
    # Healed: r2 says it lost the store and caught up, and has every write.
    status = r2.status()
    assert status["store"]["state"] == "connected" and applied(r2) >= run.push_answer["version"]
    found = events(r2, run.started, {"store_unreachable", "store_reachable", "caught_up"})
    assert in_order(found, ["store_unreachable", "store_reachable", "caught_up"]), found
    for r in fleet.replicas:
        wait_for(lambda: names(r) == {"r1", "r2"}, LIMIT, 0.2, f"both replicas in {r.replica}'s replicas")
    assert not Faults.leftovers()


def test_no_viewer_request_failed(fleet):
    rows = fleet.load.records()
    failed = fleet.load.failed(rows)
    per_node = {}
    for r in rows:
        per_node[r[1]] = per_node.get(r[1], 0) + 1
    print(f"\nsteady load: {len(rows)} requests over {rows[-1][0] - rows[0][0]:.0f} s "
          f"({', '.join(f'{k} {v}' for k, v in sorted(per_node.items()))}), {len(failed)} failed")
    assert len(per_node) == len(fleet.nodes)
    assert failed == [], failed[:10]
