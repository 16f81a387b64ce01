"""One real Envoy (deploy/envoy/edge.yaml, origins from the bundled policies)
in front of the demo origins, shared by every end-to-end test in this directory.

Tests use unique paths, so the edge's cache never answers for another test.
"""

from __future__ import annotations

import http.client
import json
import shutil
import ssl
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from edge import (  # noqa: E402
    POLICIES,
    EdgeError,
    VIEWER_HTTP_PORT,
    VIEWER_HTTPS_PORT,
    Envoy,
    bundle,
    edge_config,
)
from origins import DEMO_ORIGINS, Certificates, DemoOrigins, NameServer, RequestLog  # noqa: E402

E2E_POLICIES = HERE / "policies"
# www.example.com's primary response_timeout_ms (policies/www.example.com.json).
PRIMARY_TIMEOUT_S = 3
# How long an origin marked down is skipped, the first time.
COOLDOWN_MS = 2000
# Names the tests' own origins are reached by.
TEST_ORIGIN_NAMES = {
    "backup-tls.example.org": "127.0.0.2",
    "wrong-name.example.org": "127.0.0.2",
    # test_chain_tls.py: an origin whose certificate names only some names.
    "sni-ok.origin.test": "127.0.0.3",
    "sni-bad.origin.test": "127.0.0.3",
    # test_mirror.py: the mirror's bucket, by its virtual-host name
    # (SeaweedFS's S3 gateway, seaweedfs.py).
    "static-mirror.s3.mirror.test": "127.0.0.1",
}


# The tests' origins listen on loopback addresses (127.0.0.1-3) on ports of
# their own; the edge's own ports stay refused (the demo settings' `edge`).
TEST_ORIGIN_NETWORK = {"network": "127.0.0.0/8", "ports": ["1024-65535"]}
# A loopback address the tests' settings deny: what a name is re-bound to.
DENIED_TEST_ADDRESS = "127.0.0.9"


def allow_test_origins(settings: dict) -> dict:
    """`settings` with the tests' origins allowed besides the demo's."""
    networks = settings.setdefault("origin_networks", {})
    allow = networks.setdefault("allow", [])
    if TEST_ORIGIN_NETWORK not in allow:
        allow.append(TEST_ORIGIN_NETWORK)
    networks["deny"] = [DENIED_TEST_ADDRESS]
    return settings


def policies_for_tests(directory: Path) -> Path:
    """The example policies in `directory`/policies, under settings that also
    allow the tests' origins (deploy/e2e/policies)."""
    policies = directory / "policies"
    shutil.copytree(POLICIES, policies)
    settings = json.loads((policies / "settings.json").read_text())
    (policies / "settings.json").write_text(json.dumps(allow_test_origins(settings)))
    return policies


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def json(self) -> dict:
        return json.loads(self.body)


class Edge:
    def __init__(
        self,
        run_dir: Path,
        envoy: Envoy,
        log: RequestLog,
        certs: Certificates,
        ports: tuple[int, int] = (VIEWER_HTTP_PORT, VIEWER_HTTPS_PORT),
    ):
        self.run_dir = run_dir
        self.http_port, self.https_port = ports
        self.envoy = envoy
        self.origin_log = log
        self.certs = certs
        self.policies = run_dir / "policies"
        self._tls = ssl.create_default_context(cafile=str(certs.ca_file))
        self._fresh = 0

    @property
    def policy_paths(self) -> list[Path]:
        return [self.policies, E2E_POLICIES]

    def rebundle(self) -> None:
        bundle(self.run_dir, self.policy_paths, admin=self.envoy.admin)

    def push_policy(self, document: dict) -> str:
        """Adds (or replaces) one domain's policy live; returns once the edge
        decides that domain's requests."""
        domain = document["domain"]
        (self.policies / f"{domain}.json").write_text(json.dumps(document))
        self.rebundle()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.request(domain, f"/pushed/{uuid.uuid4().hex}").header("x-origin-decision"):
                return domain
            time.sleep(0.05)
        raise AssertionError(f"{domain}: policy not applied within 10 s")

    def request(
        self,
        host: str,
        path: str,
        scheme: str = "http",
        method: str = "GET",
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        if scheme == "https":
            conn = http.client.HTTPSConnection(
                "127.0.0.1", self.https_port, timeout=20, context=self._tls
            )
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=20)
        try:
            conn.request(method, path, body=body, headers={"host": host, **(headers or {})})
            r = conn.getresponse()
            return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        finally:
            conn.close()

    def wait_for(self, predicate, timeout: float = 10.0) -> float:
        """Seconds until `predicate()` holds; fails the test after `timeout`."""
        started = time.monotonic()
        while not predicate():
            if time.monotonic() - started > timeout:
                raise AssertionError(f"condition not met within {timeout} s")
            time.sleep(0.02)
        return time.monotonic() - started

    def fresh_domain(
        self, primary: dict, secondary: dict | None = None, name: str | None = None, **policy
    ) -> str:
        """A new domain (or `name`, replaced) whose origins get clusters of
        their own, and so a health state of their own: a connect timeout no
        other domain uses makes them reached another way. Its Host is
        `<domain>.origin` unless `origin_host` says otherwise."""
        name = name or f"f{uuid.uuid4().hex[:12]}.failover.test"
        self._fresh += 1
        own = {"connect_timeout_ms": 20_000 + self._fresh}
        document = {
            "domain": name,
            "primary": {**own, **primary},
            "origin_host": {"mode": "custom", "value": f"{name}.origin"},
            **policy,
        }
        if secondary:
            document["secondary"] = {**own, **secondary}
        return self.push_policy(document)

    def seen(self, path: str, origin: str | None = None):
        return self.origin_log.matching(path, origin)

    def stats(self) -> dict[str, int]:
        return self.envoy.stats()


@pytest.fixture(scope="session")
def demo_origins(tmp_path_factory):
    """The demo origins, on their fixed ports, for every Envoy the tests start;
    their certificates (and the edge's) are in `demo_origins.certs`."""
    certs = Certificates(tmp_path_factory.mktemp("origins") / "certs")
    with DemoOrigins(DEMO_ORIGINS, certs) as origins:
        yield origins


def copy_certs(certs: Certificates, run_dir: Path) -> None:
    """Envoy reads certs/ relative to its working directory."""
    shutil.copytree(certs.directory, run_dir / "certs")


# The tests' DNS server (knows no name).
NAME_SERVER_PORT = 18053


@pytest.fixture(scope="session")
def name_server():
    with NameServer(NAME_SERVER_PORT) as server:
        yield server


@pytest.fixture(scope="session")
def edge(tmp_path_factory, demo_origins, name_server):
    run_dir = tmp_path_factory.mktemp("edge")
    copy_certs(demo_origins.certs, run_dir)
    shutil.copytree(POLICIES, run_dir / "policies")
    # A short cool-down, so that a test sees a marked-down origin come back.
    settings_path = run_dir / "policies" / "settings.json"
    settings = json.loads(settings_path.read_text())
    settings["origin_health"] = {"cooldown_ms": COOLDOWN_MS}
    # Origins of the failover tests on another loopback address.
    settings["resolve"].update(TEST_ORIGIN_NAMES)
    # Origins named by DNS are looked up on this machine only.
    settings["dns_resolvers"] = [name_server.address]
    allow_test_origins(settings)
    settings_path.write_text(json.dumps(settings))
    bundle(run_dir, [run_dir / "policies", E2E_POLICIES])
    envoy = Envoy(run_dir, edge_config())
    envoy.start()
    try:
        yield Edge(run_dir, envoy, demo_origins.log, demo_origins.certs)
    finally:
        envoy.stop()


@pytest.fixture
def path():
    """A path no other request used, so the edge's cache cannot answer it."""
    return f"/t/{uuid.uuid4().hex}"


@pytest.fixture(scope="session")
def fault_rules():
    """The fault tests' iptables rules (tagged `origin-policy-fault`,
    deploy/fleet/cluster.py): any a killed run left are removed before the
    tests, and any left then after them."""
    sys.path.insert(0, str(HERE.parent / "fleet"))
    from cluster import Faults, require_fault_tools

    try:
        require_fault_tools()
    except EdgeError as e:
        pytest.fail(str(e))
    Faults.remove_leftovers()
    try:
        yield Faults
    finally:
        Faults.remove_leftovers()
