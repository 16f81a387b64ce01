"""mTLS on the control plane's channels, with real Envoys: `origin-policy serve
--tls-*` on 127.0.0.41 (ADS and the HTTP listener: feed, API, status), its CA
and certificates made by `origin-policy certs`, and Envoys on addresses of
their own (127.0.0.51..), each with an UpstreamTlsContext on its ADS and
feed clusters (deploy/fleet/node.py).

1. A node with a valid, admitted certificate gets the filter and every
   policy, and serves; its certificate does not open the API.
2. A node without a client certificate, one with a certificate of another
   CA, one whose certificate is revoked (CRL), one valid but not in
   --tls-nodes, and one claiming another node's id get nothing: no xDS (their
   listeners never open, no ECDS filter in their config dump), no policy;
   the server's status says why, for each.
3. A man in the middle on a node's feed (its feed cluster points at a relay
   that turns into an impostor), serving a forged page that sends a domain
   to the attacker's origin: with a certificate of another CA, and with a
   stolen node certificate of the right CA, and with a certificate of the
   right CA usable by a server but naming a node, the Envoy refuses the
   handshake (its counters and its TLS alert say which check: unknown CA, a
   client's certificate, the SAN URI not a server's), keeps serving the
   real origin, and the attacker's origin gets no request. A stolen *server* certificate then
   does get the page through: the forgery works, only the certificate
   check stops it.
4. A node revoked while connected loses its connections (the ADS stream's
   and the feed's), and its new ones are refused in the handshake.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import shutil
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "fleet"))

from conftest import policies_for_tests  # noqa: E402
from edge import edge_config, http_get, wait_for  # noqa: E402
from feed_mitm import FeedMitm  # noqa: E402
from fleet import ControlPlane, Pki, ServerTls  # noqa: E402
from node import FleetEnvoy, NodePorts, NodeTls, node_config  # noqa: E402

SERVER = "127.0.0.41"
HTTP_PORT, ADS_PORT = 18700, 18701
PORTS = NodePorts(12500, 12501, 12502)  # on every node's own address
ADDRESSES = {
    "edge-ok": "127.0.0.51",
    "edge-nocert": "127.0.0.52",
    "edge-foreign": "127.0.0.53",
    "edge-revoked": "127.0.0.54",
    "edge-unlisted": "127.0.0.55",
    "edge-mitm": "127.0.0.56",
    "edge-impostor": "127.0.0.57",
}
# Every node but edge-unlisted is in --tls-nodes, so that each refusal has
# one reason only. edge-impostor presents edge-twin's certificate and says
# it is edge-ok.
ADMITTED = ["edge-ok", "edge-nocert", "edge-foreign", "edge-revoked", "edge-mitm", "edge-twin"]
MITM = ("127.0.0.61", HTTP_PORT)  # the man in the middle on edge-mitm's feed
ATTACKER_ORIGIN = ("127.0.0.62", 18099)
VICTIM = "plain.example.com"  # the demo origin `plain` answers it
# A tenant of the same edge whose origin is the attacker's: its cluster is
# in every Envoy, so a forged policy naming that origin would be routed.
TENANT = "tenant.tls.test"
WIDE = 60  # seconds: a correctness limit, not a timing claim


class AttackerOrigin:
    """Records every request; answers as the attacker."""

    def __init__(self):
        self.requests: list[str] = []
        origin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                origin.requests.append(self.path)
                body = json.dumps({"origin": "attacker"}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(ATTACKER_ORIGIN, Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def server_usable_node_certificate(pki: Pki, node_id: str, directory: Path) -> tuple[Path, Path]:
    """What `certs` never issues: a certificate of the CA good for a TLS
    server (extended key usage serverAuth) whose identity is a node's. Only
    Envoy's SAN URI match stops it."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    ca_key = serialization.load_pem_private_key((pki.directory / "ca-key.pem").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.UniformResourceIdentifier(f"spiffe://origin-policy/node/{node_id}"),
            x509.IPAddress(ipaddress.ip_address(SERVER))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{node_id}-server.pem", directory / f"{node_id}-server-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def origin_policy(domain: str) -> dict:
    host, port = ATTACKER_ORIGIN
    return {"domain": domain, "primary": {"address": host, "port": port},
            "protocol": {"policy": "http", "http_port": port}}


class TlsFleet:
    def __init__(self, run: Path, certs_dir: Path, control: ControlPlane, pki: Pki, other: Pki):
        self.run, self.certs_dir, self.control, self.pki, self.other = run, certs_dir, control, pki, other
        self.nodes: dict[str, FleetEnvoy] = {}

    def node(self, name: str, tls: NodeTls, node_id: str | None = None,
             feed_address: str | None = None) -> FleetEnvoy:
        """An Envoy named `name` on its own address; `node_id` is what it says it is."""
        address = ADDRESSES[name]
        run_dir = self.run / name
        run_dir.mkdir(parents=True)
        shutil.copytree(self.certs_dir, run_dir / "certs")
        config = node_config(edge_config(), node_id or name, PORTS, ADS_PORT, HTTP_PORT, address=address,
                             server_address=SERVER, feed_address=feed_address, tls=tls, tls_dir=run_dir / "tls")
        node = FleetEnvoy(run_dir, config, node_id or name, PORTS, address=address)
        self.nodes[name] = node
        node.spawn()
        return node

    def events(self) -> list[dict]:
        return self.control.status()["events"]

    def refused(self, kind: str, *texts: str) -> dict | None:
        return next((e for e in self.events() if e["event"] == kind and all(t in e["message"] for t in texts)),
                    None)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, demo_origins):
    run = tmp_path_factory.mktemp("fleet-tls")
    policies = policies_for_tests(run)
    (policies / f"{TENANT}.json").write_text(json.dumps(origin_policy(TENANT)))
    pki = Pki(run / "pki")
    other = Pki(run / "other-ca")
    for node_id in ADMITTED + ["edge-unlisted"]:
        pki.issue("node", node_id)
    tls = ServerTls.make(pki, "tls-1", SERVER, ADMITTED, run / "nodes")
    pki.revoke("node", "edge-revoked")
    control = ControlPlane(run, policies, xds_port=ADS_PORT, status_port=HTTP_PORT, address=SERVER, tls=tls)
    control.start()
    fleet = TlsFleet(run, demo_origins.certs.directory, control, pki, other)
    try:
        with AttackerOrigin() as attacker:
            fleet.attacker = attacker
            yield fleet
    finally:
        for node in fleet.nodes.values():
            node.kill()
        control.stop()


def node_tls(pki: Pki, node_id: str) -> NodeTls:
    cert, key = pki.files(node_id)
    return NodeTls(pki.ca, cert, key)


def served_by(node: FleetEnvoy, host: str) -> str | None:
    """The origin that answered (the demo origins and the attacker's say so)."""
    conn = http.client.HTTPConnection(node.address, node.ports.http, timeout=10)
    try:
        conn.request("GET", f"/tls/{time.monotonic_ns()}", headers={"host": host})
        r = conn.getresponse()
        body = r.read()
        return json.loads(body).get("origin") if r.status == 200 else f"status {r.status}"
    finally:
        conn.close()


def listening(node: FleetEnvoy) -> bool:
    try:
        socket.create_connection((node.address, node.ports.http), timeout=2).close()
        return True
    except OSError:
        return False


def ecds_filters(node: FleetEnvoy) -> set[str]:
    """The names of the ECDS filter configurations Envoy has."""
    status, text = http_get(f"{node.admin}/config_dump", timeout=5)
    assert status == 200, text
    names = set()
    for config in json.loads(text)["configs"]:
        if config["@type"].endswith("EcdsConfigDump"):
            names |= {f["ecds_filter"]["name"] for f in config.get("ecds_filters", [])}
    return names


def feed_tls_stats(node: FleetEnvoy) -> dict[str, int]:
    """The feed cluster's counters of handshakes Envoy refused, by name."""
    prefix = "cluster.origin_policy_feed.ssl.fail_"
    return {k.removeprefix("cluster.origin_policy_feed."): v for k, v in node.stats().items() if k.startswith(prefix)}


def feed_entries(node: FleetEnvoy) -> int:
    return node.stats().get("wasmcustom.origin_policy.feed.entries_written", 0)


def test_an_admitted_node_gets_the_filter_and_the_policies(fleet):
    node = fleet.node("edge-ok", node_tls(fleet.pki, "edge-ok"))
    node.wait_ready(WIDE)
    assert served_by(node, VICTIM) == "plain"
    assert "origin-policy" in ecds_filters(node)
    assert feed_entries(node) > 0
    status = fleet.control.status()
    ok = status["nodes"]["edge-ok"]
    assert ok["xds"]["connected"] and ok["version"] == status["version"]
    assert all(t["acked"] == t["target"] for t in ok["xds"]["types"].values())
    # Its certificate is a node's: the feed and /healthz only, not the API.
    context = fleet.control.tls.client()
    context.load_cert_chain(*map(str, fleet.pki.files("edge-ok")))
    conn = http.client.HTTPSConnection(SERVER, HTTP_PORT, context=context, timeout=10)
    conn.request("PUT", f"/v1/domains/{VICTIM}", body=json.dumps(origin_policy(VICTIM)))
    answer = conn.getresponse()
    assert answer.status == 403 and json.loads(answer.read())["error"] == "forbidden"
    conn.close()
    conn = http.client.HTTPSConnection(SERVER, HTTP_PORT, context=context, timeout=10)
    conn.request("GET", "/healthz")
    answer = conn.getresponse()
    assert (answer.status, json.loads(answer.read())) == (200, {"serving": True})
    conn.close()
    assert served_by(node, VICTIM) == "plain"


def test_nodes_without_a_valid_admitted_certificate_get_nothing(fleet):
    pki, other = fleet.pki, fleet.other
    other_cert, other_key = other.issue("node", "edge-foreign")
    nodes = [
        fleet.node("edge-nocert", NodeTls(pki.ca)),
        fleet.node("edge-foreign", NodeTls(pki.ca, other_cert, other_key)),
        fleet.node("edge-revoked", node_tls(pki, "edge-revoked")),
        fleet.node("edge-unlisted", node_tls(pki, "edge-unlisted")),
        fleet.node("edge-impostor", node_tls(pki, "edge-twin"), node_id="edge-ok"),
    ]
    why = {
        "edge-nocert": [("ads_refused", "127.0.0.52: TLS refused: no client certificate"),
                        ("feed_refused", "127.0.0.52: TLS refused: no client certificate")],
        "edge-foreign": [("ads_refused", "127.0.0.53: TLS refused: a client certificate not issued by the CA"),
                         ("feed_refused", "127.0.0.53: TLS refused: a client certificate not issued by the CA")],
        "edge-revoked": [("ads_refused", "127.0.0.54: TLS refused: a client certificate revoked by the CRL"),
                         ("feed_refused", "127.0.0.54: TLS refused: a client certificate revoked by the CRL")],
        "edge-unlisted": [
            ("ads_refused", "node.id edge-unlisted: spiffe://origin-policy/node/edge-unlisted is not an admitted node"),
            ("feed_refused", "127.0.0.55: spiffe://origin-policy/node/edge-unlisted is not an admitted node")],
        "edge-impostor": [
            ("ads_refused", 'node.id edge-ok: node.id "edge-ok" is not the certificate\'s identity '
                            "spiffe://origin-policy/node/edge-twin"),
            ("feed_refused", 'the poll says it is node "edge-ok", its certificate node "edge-twin"')],
    }
    for name, reasons in why.items():
        for kind, text in reasons:
            wait_for(lambda: fleet.refused(kind, text), what=f"{name}: {kind} {text!r}")
    # Refused many times over (every retry): still nothing.
    wait_for(lambda: all(fleet.refused(kind, text)["count"] >= 3 for reasons in why.values()
                         for kind, text in reasons), what="three refusals each")
    for node in nodes:
        assert node.process.poll() is None, node.log_tail()
        assert not node.ready(), node.node_id
        assert not listening(node), node.node_id
        assert ecds_filters(node) == set(), node.node_id
        assert feed_entries(node) == 0, node.node_id
    status = fleet.control.status()
    assert set(status["nodes"]) == {"edge-ok"}, status["nodes"].keys()
    # The impostor's claim did not touch the real edge-ok.
    assert status["nodes"]["edge-ok"]["xds"]["connections"] == 1
    assert served_by(fleet.nodes["edge-ok"], VICTIM) == "plain"
    for node in nodes:
        node.kill()


def test_a_man_in_the_middle_on_the_feed_cannot_change_a_policy(fleet):
    pki, other = fleet.pki, fleet.other
    forged = f"{VICTIM}\t{json.dumps(origin_policy(VICTIM))}\n"
    with FeedMitm(MITM, (SERVER, HTTP_PORT)) as mitm:
        node = fleet.node("edge-mitm", node_tls(pki, "edge-mitm"), feed_address=MITM[0])
        node.wait_ready(WIDE)
        # Through the relay, the real feed: end-to-end mTLS with the server.
        assert served_by(node, VICTIM) == "plain"
        assert served_by(node, TENANT) == "attacker"  # the tenant's own domain, as it should
        before = len(fleet.attacker.requests)
        other_cert, other_key = other.issue("server", "tls-1", "--ip", SERVER)
        stolen_cert, stolen_key = pki.files("edge-ok")
        # Envoy's alert says which check refused it: the CA, or the
        # certificate's purpose (a node's is a client's only; its SAN URI,
        # a node's, would fail the server-identity match next).
        naming_cert, naming_key = server_usable_node_certificate(pki, "edge-ok", fleet.run)
        cases = [("a server certificate of another CA", other_cert, other_key, "UNKNOWN_CA",
                  "ssl.fail_verify_error"),
                 ("a stolen node certificate of the CA", stolen_cert, stolen_key, "UNSUPPORTED_CERTIFICATE",
                  "ssl.fail_verify_error"),
                 ("a server-usable certificate of the CA naming a node", naming_cert, naming_key,
                  "CERTIFICATE_UNKNOWN", "ssl.fail_verify_san")]
        for what, cert, key, alert, counter in cases:
            stat = counter
            before_stats = feed_tls_stats(node)
            mitm.impersonate(str(cert), str(key), forged)
            wait_for(lambda: sum(feed_tls_stats(node).values()) >= sum(before_stats.values()) + 3,
                     what=f"{what}: handshakes refused")
            after = feed_tls_stats(node)
            assert after.get(stat, 0) >= before_stats.get(stat, 0) + 3, (what, before_stats, after)
            assert mitm.handshakes_failed and all(alert in e for e in mitm.handshakes_failed), \
                (what, mitm.handshakes_failed)
            assert mitm.pages_served == 0, what
            assert served_by(node, VICTIM) == "plain", what
            assert len(fleet.attacker.requests) == before + 0, what
        print(f"\nman in the middle refused: {', '.join(f'{c[0]} ({c[3]})' for c in cases)}; "
              f"{sum(feed_tls_stats(node).values())} handshakes refused by the Envoy, "
              f"the attacker's origin got no request")
        # The control: a stolen server certificate passes both checks, and
        # the same page sends the domain to the attacker.
        rogue_cert, rogue_key = pki.issue("server", "rogue")
        mitm.impersonate(str(rogue_cert), str(rogue_key), forged)
        wait_for(lambda: served_by(node, VICTIM) == "attacker", what="the forged page taken")
        assert mitm.pages_served > 0
        assert len(fleet.attacker.requests) > before
    node.kill()


def test_a_node_revoked_while_connected_loses_its_stream(fleet):
    node = fleet.nodes["edge-ok"]
    assert fleet.control.status()["nodes"]["edge-ok"]["xds"]["connected"]
    fleet.pki.revoke("node", "edge-ok")
    wait_for(lambda: not fleet.control.status()["nodes"]["edge-ok"]["xds"]["connected"],
             what="edge-ok's stream closed")
    # Its connections are closed, the ADS one and the feed's: a new stream
    # needs a new connection, and a new handshake.
    address = ADDRESSES["edge-ok"]
    wait_for(lambda: fleet.refused("ads_refused", f"{address}: connection closed", "revoked by the CRL"),
             what="edge-ok's ADS connection closed")
    # Envoy connects again at once, and again: each handshake is refused.
    for kind in ("ads_refused", "feed_refused"):
        wait_for(lambda: (e := fleet.refused(kind, f"{address}: TLS refused", "revoked by the CRL")) and e["count"] >= 3,
                 what=f"edge-ok's new connections refused ({kind})")
    assert not fleet.control.status()["nodes"]["edge-ok"]["xds"]["connected"]
    # It keeps serving what it has; the server sends it nothing more.
    assert served_by(node, VICTIM) == "plain"
