"""Certificates rotated with no restart, with real Envoys: `origin-policy
serve --tls-*` on 127.0.0.71, two Envoys on 127.0.0.72 (edge-rot) and
127.0.0.73 (edge-stale), each reading its certificate and the CA through
file-based SDS from a watched directory (deploy/fleet/node.py
`NodeCertificates`), each asked for two domains without a pause by a client
that records every answer.

1. The server's certificate is issued again (`certs issue --server`, the
   files replaced in place): the server presents the new one to new
   connections, and the nodes keep taking pushes.
2. edge-rot's certificate is issued again (a new serial) and put in place
   the usual way (a new directory, a symlink renamed over `current`):
   Envoy takes it with no restart (its `/certs` shows the new serial).
   edge-stale's is issued again too, but not put in place.
3. Both old serials are revoked (`certs revoke --serial`): the server closes
   the connections made with them; edge-rot connects again with its new
   certificate (to the server's new one) and a policy written after the
   revocation is served by it; edge-stale, still presenting its revoked
   certificate, is refused every handshake, gets nothing more, and keeps
   serving what it had. Once its new certificate is put in place, it
   connects and catches up, with no restart.
4. No viewer request failed on either node, throughout.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "fleet"))

from conftest import policies_for_tests  # noqa: E402
from edge import edge_config, http_get, wait_for  # noqa: E402
from fleet import ControlPlane, Pki, ServerTls  # noqa: E402
from load import decision_host  # noqa: E402
from node import FleetEnvoy, NodeCertificates, NodePorts, NodeTls, node_config  # noqa: E402

SERVER = "127.0.0.71"
HTTP_PORT, ADS_PORT = 18700, 18701
SERVER_NAME = "rot-1"
PORTS = NodePorts(12500, 12501, 12502)  # on every node's own address
ADDRESSES = {"edge-rot": "127.0.0.72", "edge-stale": "127.0.0.73"}
PUSHED = "plain.example.com"  # its origin host is what each push changes
STEADY = ["plain.example.com", "legacy.example.com"]
CONTROL_PLANE = "cluster.fleet_control_plane."
FEED = "cluster.origin_policy_feed."
WIDE = 60  # seconds: a correctness limit, not a timing claim


def serial(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


class Viewer:
    """Asks one node for the STEADY domains one after the other on a
    keep-alive connection, each on a new path; records every answer
    (status, or -1 and the error)."""

    def __init__(self, node: FleetEnvoy):
        self.node = node
        self.answers: list[tuple[str, int, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        conn = http.client.HTTPConnection(self.node.address, self.node.ports.http, timeout=10)
        n = 0
        while not self.stop.is_set():
            host = STEADY[n % len(STEADY)]
            n += 1
            try:
                conn.request("GET", f"/rotation/{n}", headers={"host": host})
                r = conn.getresponse()
                r.read()
                self.answers.append((host, r.status, ""))
            except (OSError, http.client.HTTPException) as e:
                self.answers.append((host, -1, repr(e)))
                conn.close()
                conn = http.client.HTTPConnection(self.node.address, self.node.ports.http, timeout=10)
            self.stop.wait(0.01)
        conn.close()

    def failed(self) -> list[tuple[str, int, str]]:
        return [a for a in self.answers if a[1] != 200]


class Rotation:
    def __init__(self, run: Path, certs_dir: Path, control: ControlPlane, pki: Pki, tls: ServerTls):
        self.run, self.certs_dir, self.control, self.pki, self.tls = run, certs_dir, control, pki, tls
        self.nodes: dict[str, FleetEnvoy] = {}
        self.viewers: dict[str, Viewer] = {}
        self.origin_host = 0

    def node(self, node_id: str) -> FleetEnvoy:
        run_dir = self.run / node_id
        run_dir.mkdir(parents=True)
        shutil.copytree(self.certs_dir, run_dir / "certs")
        cert, key = self.pki.files(node_id)
        config = node_config(edge_config(), node_id, PORTS, ADS_PORT, HTTP_PORT, address=ADDRESSES[node_id],
                             server_address=SERVER, tls=NodeTls(self.pki.ca, cert, key), tls_dir=self.tls_dir(node_id))
        node = FleetEnvoy(run_dir, config, node_id, PORTS, address=ADDRESSES[node_id])
        self.nodes[node_id] = node
        node.spawn()
        return node

    def tls_dir(self, node_id: str) -> Path:
        return self.run / node_id / "tls"

    def put_in_place(self, node_id: str) -> None:
        """The node's certificate as `certs` last issued it, into its watched directory."""
        cert, key = self.pki.files(node_id)
        NodeCertificates(self.tls_dir(node_id)).install(NodeTls(self.pki.ca, cert, key))

    def push(self) -> tuple[str, int]:
        """A write of PUSHED with a new origin host: the host and its feed version."""
        self.origin_host += 1
        host = f"push-{self.origin_host}.rotation.test"
        document = json.loads((Path(__file__).resolve().parents[2] / "policies" / f"{PUSHED}.json").read_text())
        document.pop("$schema", None)
        document["origin_host"] = {"mode": "custom", "value": host}
        code, answer = self.control.put(PUSHED, json.dumps(document))
        assert code in (200, 201), answer
        return host, answer["version"]

    def status(self) -> dict:
        return self.control.status()

    def event(self, kind: str, *texts: str) -> dict | None:
        return next((e for e in self.status()["events"] if e["event"] == kind and all(t in e["message"] for t in texts)),
                    None)


@pytest.fixture(scope="module")
def rotation(tmp_path_factory, demo_origins):
    run = tmp_path_factory.mktemp("fleet-rotation")
    policies = policies_for_tests(run)
    pki = Pki(run / "pki")
    for node_id in ADDRESSES:
        pki.issue("node", node_id)
    tls = ServerTls.make(pki, SERVER_NAME, SERVER, list(ADDRESSES), run / "nodes")
    control = ControlPlane(run, policies, xds_port=ADS_PORT, status_port=HTTP_PORT, address=SERVER, tls=tls)
    control.start()
    rotation = Rotation(run, demo_origins.certs.directory, control, pki, tls)
    try:
        yield rotation
    finally:
        for viewer in rotation.viewers.values():
            viewer.stop.set()
        for node in rotation.nodes.values():
            node.kill()
        control.stop()


def origin_host(node: FleetEnvoy, host: str = PUSHED) -> str | None:
    """The origin host the node's decision names for `host`."""
    conn = http.client.HTTPConnection(node.address, node.ports.http, timeout=10)
    try:
        conn.request("GET", f"/probe/{time.monotonic_ns()}", headers={"host": host})
        r = conn.getresponse()
        r.read()
        return decision_host(r.getheader("x-origin-decision")) if r.status == 200 else f"status {r.status}"
    finally:
        conn.close()


def presented_serial(node: FleetEnvoy) -> set[int]:
    """The serials of the node certificates the Envoy holds in its TLS
    contexts (`/certs`: the ADS and the feed clusters')."""
    status, text = http_get(f"{node.admin}/certs", timeout=5)
    assert status == 200, text
    return {int(c["serial_number"], 16) for context in json.loads(text)["certificates"]
            for c in context.get("cert_chain", [])
            if any(san.get("uri", "").startswith("spiffe://origin-policy/node/") for san in c["subject_alt_names"])}


def server_serial(rotation: Rotation) -> int:
    """The serial of the certificate the server presents to a new connection."""
    with socket.create_connection((SERVER, HTTP_PORT), timeout=10) as raw:
        with rotation.tls.client().wrap_socket(raw, server_hostname=SERVER) as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


def handshakes(node: FleetEnvoy) -> int:
    """TLS connections the node made to the control plane (ADS and the feed)."""
    stats = node.stats()
    return stats.get(f"{CONTROL_PLANE}ssl.handshake", 0) + stats.get(f"{FEED}ssl.handshake", 0)


def test_the_nodes_are_served_under_steady_load(rotation):
    for node_id in ADDRESSES:
        rotation.node(node_id)
    for node in rotation.nodes.values():
        node.wait_ready(WIDE)
        assert origin_host(node) == "plain.example.com"
        viewer = rotation.viewers[node.node_id] = Viewer(node)
        viewer.thread.start()
    wait_for(lambda: all(len(v.answers) >= 20 for v in rotation.viewers.values()), what="viewers answered")
    status = rotation.status()
    for node_id in ADDRESSES:
        assert status["nodes"][node_id]["xds"]["connected"], status["nodes"]
    for node_id, node in rotation.nodes.items():
        assert presented_serial(node) == {serial(rotation.pki.files(node_id)[0].read_bytes())}


def test_the_servers_certificate_rotated_in_place(rotation):
    before = server_serial(rotation)
    old = rotation.pki.reissue("server", SERVER_NAME, "--ip", SERVER)
    assert int(old, 16) == before
    new = serial(rotation.tls.cert.read_bytes())
    assert new != before
    # serve reads its --tls-cert and --tls-key again: new connections get the new one.
    wait_for(lambda: server_serial(rotation) == new, what="the server presenting its new certificate")
    host, _ = rotation.push()
    for node in rotation.nodes.values():
        wait_for(lambda: origin_host(node) == host, what=f"{node.node_id} serving the push")


def test_a_node_certificate_rotated_then_the_old_one_revoked(rotation):
    rot, stale = rotation.nodes["edge-rot"], rotation.nodes["edge-stale"]
    old_rot = rotation.pki.reissue("node", "edge-rot")
    old_stale = rotation.pki.reissue("node", "edge-stale")  # issued, but not put in place
    new_rot = serial(rotation.pki.files("edge-rot")[0].read_bytes())
    assert presented_serial(rot) == {int(old_rot, 16)}
    sds_updates = rot.stats().get(f"{CONTROL_PLANE}client_ssl_socket_factory.ssl_context_update_by_sds", 0)
    rotation.put_in_place("edge-rot")
    # Envoy read the watched directory again: its contexts hold the new
    # certificate, with no restart (the same process).
    wait_for(lambda: presented_serial(rot) == {new_rot}, what="edge-rot holding its new certificate")
    assert rot.stats()[f"{CONTROL_PLANE}client_ssl_socket_factory.ssl_context_update_by_sds"] > sds_updates
    assert rot.process.poll() is None
    connections = rotation.status()["nodes"]["edge-rot"]["xds"]["connections"]
    handshakes_before = handshakes(rot)

    for old in (old_rot, old_stale):
        rotation.pki.revoke_serial(old)
    # edge-stale presents its revoked certificate: its connections are
    # closed, and each new handshake is refused.
    stale_address = ADDRESSES["edge-stale"]
    wait_for(lambda: not rotation.status()["nodes"]["edge-stale"]["xds"]["connected"],
             what="edge-stale's ADS stream closed")
    for kind in ("ads_refused", "feed_refused"):
        wait_for(lambda: (e := rotation.event(kind, f"{stale_address}: TLS refused", "revoked by the CRL"))
                 and e["count"] >= 2, what=f"edge-stale refused ({kind})")
    # The connections edge-rot made with its old certificate (Envoy keeps
    # an open connection when its certificate changes) were closed too...
    for kind in ("ads_refused", "feed_refused"):
        wait_for(lambda: rotation.event(kind, f"{ADDRESSES['edge-rot']}: connection closed", "revoked by the CRL"),
                 what=f"edge-rot's old connection closed ({kind})")
    # ...and it is on new ones, made with its new certificate (its old
    # serial is revoked: nothing made with it is admitted) to the server's
    # new one.
    wait_for(lambda: (n := rotation.status()["nodes"]["edge-rot"]["xds"])["connected"]
             and n["connections"] > connections, what="edge-rot's new ADS stream")
    assert handshakes(rot) > handshakes_before
    assert not rotation.event("ads_refused", f"{ADDRESSES['edge-rot']}: TLS refused")
    assert not rotation.event("feed_refused", f"{ADDRESSES['edge-rot']}: TLS refused")

    # A write after the revocation reaches edge-rot (its feed polls with the
    # new certificate), and not edge-stale, which keeps what it had.
    previous = origin_host(stale)
    refused = rotation.event("feed_refused", f"{stale_address}: TLS refused")["count"]
    host, version = rotation.push()
    wait_for(lambda: origin_host(rot) == host, what="edge-rot serving the write made after the revocation")
    status = rotation.status()
    assert status["nodes"]["edge-rot"]["version"] >= version
    assert status["nodes"]["edge-rot"]["xds"]["connected"]
    # edge-stale polled again since the write (refused twice more), and has not got it.
    wait_for(lambda: rotation.event("feed_refused", f"{stale_address}: TLS refused")["count"] >= refused + 2,
             what="edge-stale's polls refused after the write")
    assert origin_host(stale) == previous != host
    status = rotation.status()
    assert status["nodes"]["edge-stale"]["version"] < version
    assert not status["nodes"]["edge-stale"]["xds"]["connected"]
    print(f"\nedge-rot: serial {old_rot} -> {new_rot:x}, {handshakes(rot) - handshakes_before} new handshakes; "
          f"edge-stale refused {rotation.event('feed_refused', f'{stale_address}: TLS refused')['count']} feed "
          f"and {rotation.event('ads_refused', f'{stale_address}: TLS refused')['count']} ADS handshakes")

    # Its new certificate put in place, edge-stale connects and catches up.
    rotation.put_in_place("edge-stale")
    wait_for(lambda: origin_host(stale) == host, what="edge-stale serving the write once rotated")
    assert rotation.status()["nodes"]["edge-stale"]["xds"]["connected"]
    assert stale.process.poll() is None


def test_no_viewer_request_failed(rotation):
    for viewer in rotation.viewers.values():
        viewer.stop.set()
    for node_id, viewer in rotation.viewers.items():
        viewer.thread.join(timeout=20)
        assert len(viewer.answers) >= 100, (node_id, len(viewer.answers))
        assert viewer.failed() == [], (node_id, viewer.failed()[:5])
        print(f"{node_id}: {len(viewer.answers)} viewer requests, 0 failed")
