"""The fleet: three Envoys (`--concurrency 1` each) fed by `origin-policy
serve --ads` (the clusters and the filter over ADS, the policies over the
feed), under steady load whose every request is recorded
(deploy/fleet/load.py). In order:

1. a one-domain change (a watched file edited) reaches the canary, then
   after the bake every Envoy (time to each printed), with no xDS sent;
2. an invalid policy is refused by the server with its finding, and nothing
   is sent;
3. a new module that fleet-3 cannot load (it reads modules from a directory
   of its own, which lacks it): fleet-3's NACK is reported with Envoy's
   error, fleet-3 keeps serving its version, the others run the new one;
4. a canary write that makes the canary answer 5xx is held and the canary is
   sent back to the stable version; no other Envoy ever gets it;
5. a fourth Envoy joining serves the current version from its first answer;
6. the server killed: every Envoy keeps serving; an Envoy started meanwhile
   does not serve at all (no 500s) until the server is back; on its return
   every Envoy reconnects;
and no request failed, apart from the canary's 5xx in step 4. Then, with a
server of its own, the origin clusters the policies derive are served over
CDS (a new origin, then a move to a STRICT_DNS one) with no failed request.

Ports: servers 127.0.0.1:18610/18612 (ADS) and :18611/18613 (API, feed,
status); node i on 12100+10i (HTTP), +1 (HTTPS), +2 (admin).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "fleet"))

from edge import POLICIES, WASM, wait_for  # noqa: E402
from fleet import ControlPlane, make_node, start_nodes, status_text  # noqa: E402
from load import LoadProcess, decision_host  # noqa: E402
from node import FleetEnvoy  # noqa: E402

XDS_PORT = 18610
STATUS_PORT = 18611
PORT_BASE = 12100
CANARY = "fleet-1"
BAKE_SECONDS = 2
DOMAINS = ["plain.example.com", "legacy.example.com", "media.example.com"]
CHANGED = "plain.example.com"
NEW_HOST = "fleet-change-1.example.net"  # what the one-domain change sends as its Host
FAILING_ORIGIN_PORT = 18084  # deploy/origins.py's www-primary: 503 to everything


@dataclass
class Fleet:
    run: Path
    policies: Path
    wasm: Path
    control: ControlPlane
    nodes: list[FleetEnvoy]
    load: Load
    certs: object
    canary_window: tuple[float, float] = (0.0, 0.0)
    extra: list[FleetEnvoy] = field(default_factory=list)

    def node(self, node_id: str) -> FleetEnvoy:
        return next(n for n in self.nodes + self.extra if n.node_id == node_id)

    def status(self) -> dict:
        return self.control.status()

    def nodes_status(self) -> dict:
        return self.status()["nodes"]

    def stable(self) -> int:
        return self.status()["stable"]

    def write_policy(self, domain: str, change) -> None:
        path = self.policies / f"{domain}.json"
        policy = json.loads(path.read_text())
        change(policy)
        write_atomically(path, json.dumps(policy, indent=2))

    def restore_policy(self, domain: str) -> None:
        shutil.copyfile(POLICIES / f"{domain}.json", self.policies / f"{domain}.json")


def write_atomically(path: Path, text: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(text if isinstance(text, bytes) else text.encode())
    os.rename(tmp, path)


def ask(node: FleetEnvoy, host: str, path: str = "/probe") -> tuple[int, str | None]:
    conn = http.client.HTTPConnection("127.0.0.1", node.ports.http, timeout=10)
    try:
        conn.request("GET", f"{path}/{time.monotonic_ns()}", headers={"host": host})
        r = conn.getresponse()
        r.read()
        return r.status, decision_host(r.getheader("x-origin-decision"))
    finally:
        conn.close()


def copy_module_to(module: Path, directory: Path) -> Path:
    """The module under its sha256, as the server's module store names it."""
    data = module.read_bytes()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{hashlib.sha256(data).hexdigest()}.wasm"
    target.write_bytes(data)
    return target


def xds_types(node: dict) -> dict:
    return node.get("xds", {}).get("types", {})


def runs(node: dict, version: int) -> bool:
    """Its feed polls from `version` and it runs every xDS target."""
    types = xds_types(node)
    return (node.get("version") == version and bool(types)
            and all(t["target"] is not None and t["acked"] == t["target"] for t in types.values()))


def all_on(fleet: Fleet, version: int, node_ids) -> bool:
    nodes = fleet.nodes_status()
    return all(runs(nodes.get(i, {}), version) for i in node_ids)


def xds_sent(fleet: Fleet) -> dict:
    return {k: {t: v["sent"] for t, v in xds_types(n).items()} for k, n in fleet.nodes_status().items()}


def new_module_build(source: Path, tag: bytes) -> bytes:
    """The module with an extra custom section: another build, same behaviour."""
    name = b"origin-policy.build"
    payload = bytes([len(name)]) + name + tag
    return source.read_bytes() + bytes([0, len(payload)]) + payload


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, demo_origins):
    run = tmp_path_factory.mktemp("fleet")
    policies = run / "policies"
    shutil.copytree(POLICIES, policies)
    wasm = run / "origin_policy.wasm"  # the module source the test replaces
    shutil.copyfile(WASM, wasm)
    node3_modules = run / "fleet-3-modules"  # fleet-3 only gets the modules placed here
    copy_module_to(wasm, node3_modules)
    control = ControlPlane(
        run, policies, wasm=wasm, xds_port=XDS_PORT, status_port=STATUS_PORT, canaries=[CANARY],
        extra=["--bake-seconds", str(BAKE_SECONDS), "--ack-timeout", "20", "--min-requests", "10"],
    )
    control.start()
    nodes = [make_node(run, i, demo_origins.certs, XDS_PORT, PORT_BASE,
                       module_dir=node3_modules if i == 3 else None) for i in (1, 2, 3)]
    load = None
    try:
        start_nodes(nodes)
        load = LoadProcess(run / "load.jsonl", [str(n.ports.http) for n in nodes], DOMAINS, seconds=300, interval=0.005)
        wait_for(lambda: len(load.records()) > 30, what="load running")
        yield Fleet(run, policies, wasm, control, nodes, load, demo_origins.certs)
    finally:
        if load:
            load.stop()
        for n in nodes:
            n.stop()
        control.stop()


@pytest.fixture(scope="module")
def extra_nodes(fleet):
    yield fleet.extra
    for n in fleet.extra:
        n.stop()


def test_one_domain_change_reaches_every_envoy(fleet):
    before = fleet.stable()
    assert fleet.status()["version"] == before
    wait_for(lambda: all_on(fleet, before, ["fleet-1", "fleet-2", "fleet-3"]), what="every Envoy on the stable version")
    sent_before = xds_sent(fleet)
    started = time.monotonic()
    fleet.write_policy(CHANGED, lambda p: p.update(origin_host={"mode": "custom", "value": NEW_HOST}))
    reached: dict[str, float] = {}

    def everywhere():
        for node in fleet.nodes:
            if node.node_id not in reached and ask(node, CHANGED)[1] == NEW_HOST:
                reached[node.node_id] = time.monotonic() - started
        return len(reached) == len(fleet.nodes)

    wait_for(everywhere, timeout=30, step=0.02, what="the change on every Envoy")
    print(f"\none-domain change (file written -> seen in x-origin-decision), bake {BAKE_SECONDS} s: "
          + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(reached.items()))
          + f"; last Envoy {max(reached.values()):.2f} s")
    # The canary first; the others only after its bake.
    assert reached[CANARY] < min(v for k, v in reached.items() if k != CANARY)
    assert min(v for k, v in reached.items() if k != CANARY) >= BAKE_SECONDS
    status = fleet.status()
    version = status["version"]
    assert version > before and status["stable"] == version and status["rollout"]["stage"] == "stable"
    assert status["rollout"]["promoted"] >= 1
    wait_for(lambda: all_on(fleet, version, ["fleet-1", "fleet-2", "fleet-3"]), what="every feed at the version")
    # The change went over the feed only: no xDS response was sent.
    assert xds_sent(fleet) == sent_before
    # The other domains did not change.
    for node in fleet.nodes:
        assert ask(node, "legacy.example.com") == (200, "legacy-origin.example.net:8150")


def test_invalid_push_is_refused(fleet):
    status = fleet.status()
    version, sent_before = status["version"], xds_sent(fleet)
    document = json.loads((fleet.policies / f"{CHANGED}.json").read_text())
    document["primary"]["port"] = 70000
    code, answer = fleet.control.put(CHANGED, json.dumps(document))
    assert code == 422 and answer["error"] == "invalid_policy", answer
    assert any(f["path"] == "/primary/port" for f in answer["findings"]), answer
    # The same in the watched file: refused, logged with the finding, the domain keeps its policy.
    fleet.write_policy(CHANGED, lambda p: p["primary"].update(port=70000))
    wait_for(lambda: "/primary/port" in fleet.control.log(), what="the refusal logged")
    status = fleet.status()
    assert status["version"] == version and status["rollout"]["candidate"] is None
    assert xds_sent(fleet) == sent_before
    assert all(status["nodes"][k]["version"] == version for k in ("fleet-1", "fleet-2", "fleet-3"))
    for node in fleet.nodes:
        assert ask(node, CHANGED) == (200, NEW_HOST)
    # Back to the served content: nothing new to send.
    fleet.write_policy(CHANGED, lambda p: p["primary"].update(port=80))
    time.sleep(0.5)
    assert fleet.status()["version"] == version


def test_nack_is_reported_and_the_others_keep_their_version(fleet):
    ecds = "TypedExtensionConfig"
    before = {k: xds_types(n)[ecds]["acked"] for k, n in fleet.nodes_status().items()}
    original = fleet.wasm.read_bytes()
    write_atomically(fleet.wasm, new_module_build(fleet.wasm, b"next"))

    def fleet3_nacked():
        n = xds_types(fleet.nodes_status()["fleet-3"])[ecds]
        return n["nack"] and n["nack"]["version"] == n["target"] and n

    fleet3 = wait_for(fleet3_nacked, timeout=30, what="fleet-3's NACK")
    print(f"\nfleet-3 NACKed {fleet3['nack']['version']}: {fleet3['nack']['message']}")
    assert "Invalid path" in fleet3["nack"]["message"] and "fleet-3-modules" in fleet3["nack"]["message"]
    # The filter stays on the earlier version.
    assert fleet3["acked"] == before["fleet-3"]

    def others_moved():
        nodes = fleet.nodes_status()
        return all((t := xds_types(nodes[k])[ecds])["acked"] == t["target"] != before[k] for k in ("fleet-1", "fleet-2"))

    wait_for(others_moved, what="fleet-1 and fleet-2 on the new module")
    text = status_text(fleet.status())
    assert "fleet-3" in text and "Invalid path" in text
    assert ask(fleet.node("fleet-3"), CHANGED) == (200, NEW_HOST)

    # The module rolled back: every Envoy on the earlier filter again.
    write_atomically(fleet.wasm, original)
    wait_for(lambda: {k: xds_types(n)[ecds]["acked"] for k, n in fleet.nodes_status().items()} == before,
             timeout=30, what="everyone back on the earlier module")


def test_canary_push_raising_5xx_is_held(fleet):
    stable = fleet.stable()
    start = time.time()
    # plain.example.com sent to the demo origin that answers 503, with no secondary.
    fleet.write_policy(CHANGED, lambda p: p["protocol"].update(http_port=FAILING_ORIGIN_PORT))
    held = wait_for(lambda: (r := fleet.status()["rollout"])["stage"] == "held" and r, timeout=30,
                    what="the rollout held")
    print(f"\nheld: {held['reason']}")
    assert "5xx rate" in held["reason"] and CANARY in held["reason"]
    candidate = held["candidate"]
    assert candidate > stable and fleet.stable() == stable
    # The canary is back on the stable version; the others never left it.
    wait_for(lambda: all_on(fleet, stable, ["fleet-1", "fleet-2", "fleet-3"]), what="canary back on stable")
    wait_for(lambda: ask(fleet.node(CANARY), CHANGED)[0] == 200, what="canary serving again")
    fleet.canary_window = (start, time.time())
    for node in fleet.nodes[1:]:
        assert node.stats()["http.viewer.downstream_rq_5xx"] == 0
    # A hold is released by a new write: the fix goes through the canary again.
    fleet.restore_policy(CHANGED)
    fleet.write_policy(CHANGED, lambda p: p.update(origin_host={"mode": "custom", "value": NEW_HOST}))
    wait_for(lambda: (s := fleet.status())["rollout"]["stage"] == "stable" and s["stable"] > candidate,
             what="the fix promoted")
    for node in fleet.nodes:
        wait_for(lambda: ask(node, CHANGED) == (200, NEW_HOST), what=f"{node.node_id} on the fix")


class Prober(threading.Thread):
    """Asks one Envoy for a domain until stopped, from before it listens."""

    def __init__(self, node: FleetEnvoy, host: str):
        super().__init__(daemon=True)
        self.node, self.host = node, host
        self.answers: list[tuple[float, int, str | None]] = []
        self.refused = 0
        self.errors: list[str] = []
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.is_set():
            try:
                status, decision = ask(self.node, self.host)
                self.answers.append((time.monotonic(), status, decision))
            except ConnectionRefusedError:
                self.refused += 1
            except (OSError, http.client.HTTPException) as e:
                self.errors.append(repr(e))
            self.stopped.wait(0.01)


def test_new_envoy_serves_current_version_from_its_first_answer(fleet, extra_nodes):
    stable = fleet.stable()
    node = make_node(fleet.run, 4, fleet.certs, XDS_PORT, PORT_BASE)
    extra_nodes.append(node)
    prober = Prober(node, CHANGED)
    prober.start()
    node.spawn()
    node.wait_ready()
    time.sleep(1)
    prober.stopped.set()
    prober.join()
    assert prober.answers and not prober.errors, prober.errors
    assert {(s, d) for _, s, d in prober.answers} == {(200, NEW_HOST)}
    assert runs(fleet.nodes_status()["fleet-4"], stable)
    print(f"\nfleet-4: {prober.refused} connections refused while warming, then "
          f"{len(prober.answers)} answers, all 200 with the current policy")


def test_control_plane_killed_and_restarted_loses_no_request(fleet, extra_nodes):
    stable = fleet.stable()
    start = time.time()
    fleet.control.kill()
    time.sleep(1.5)
    for node in fleet.nodes + extra_nodes:
        assert ask(node, CHANGED) == (200, NEW_HOST)

    # An Envoy started while there is no control plane waits: it does not listen.
    late = make_node(fleet.run, 5, fleet.certs, XDS_PORT, PORT_BASE)
    extra_nodes.append(late)
    prober = Prober(late, CHANGED)
    prober.start()
    late.spawn()
    time.sleep(2)
    assert not late.ready() and not prober.answers and prober.refused > 0

    fleet.control.start()
    everyone = [n.node_id for n in fleet.nodes + extra_nodes]
    wait_for(lambda: all(n.get("xds", {}).get("connected") for n in fleet.nodes_status().values())
             and all_on(fleet, stable, everyone), timeout=30, what="every Envoy reconnected")
    late.wait_ready()
    time.sleep(0.5)
    prober.stopped.set()
    prober.join()
    assert not prober.errors, prober.errors
    assert {(s, d) for _, s, d in prober.answers} == {(200, NEW_HOST)}
    # One stream each since the restart: every Envoy came back by itself.
    assert {n["xds"]["connections"] for n in fleet.nodes_status().values()} == {1}
    failed = LoadProcess.failed(fleet.load.records(start, time.time()))
    assert failed == [], failed[:10]


def test_no_request_failed_but_the_held_canarys(fleet):
    canary_port = fleet.node(CANARY).ports.http
    begin, end = fleet.canary_window
    rows = fleet.load.records()
    failed = LoadProcess.failed(rows)
    expected = [r for r in failed if r[1] == canary_port and r[2] == CHANGED and begin <= r[0] <= end]
    unexpected = [r for r in failed if r not in expected]
    print(f"\nload: {len(rows)} requests over {rows[-1][0] - rows[0][0]:.0f} s on three Envoys; "
          f"{len(expected)} 5xx from the held canary push; {len(unexpected)} other failures")
    assert unexpected == [], unexpected[:10]
    assert expected and all(r[3] == 503 for r in expected)


# --- origin clusters from the bundle (CDS) ------------------------------------------------

CDS_XDS_PORT = 18612
CDS_STATUS_PORT = 18613
CDS_DOMAIN = "cds.example.com"


def cds_policy(address: str, port: int) -> str:
    return json.dumps({"domain": CDS_DOMAIN, "protocol": {"policy": "http", "http_port": port},
                       "primary": {"address": address}})


def test_bundle_clusters_are_served_over_cds(tmp_path, demo_origins):
    """The origin clusters the policies derive reach Envoy over CDS: a write
    adding a domain on a new origin (a STATIC cluster), then one moving it to
    another origin by DNS name (a new STRICT_DNS cluster). A write is
    published only once Envoy has ACKed its clusters, so Envoy never routes
    to a cluster it lacks."""
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    control = ControlPlane(tmp_path, policies, xds_port=CDS_XDS_PORT, status_port=CDS_STATUS_PORT)
    node = make_node(tmp_path, 6, demo_origins.certs, CDS_XDS_PORT, PORT_BASE)
    prober = Prober(node, CDS_DOMAIN)
    try:
        control.start()
        node.start()
        prober.start()
        assert ask(node, CDS_DOMAIN)[0] == 404  # no policy for it yet
        clusters = set()
        for address, port, origin in [("127.0.0.1", 18081, "plain"), ("localhost", 18082, "media")]:
            code, answer = control.put(CDS_DOMAIN, cds_policy(address, port))
            assert code in (200, 201), answer
            wait_for(lambda: served_by(node, CDS_DOMAIN) == origin, what=f"{CDS_DOMAIN} on {origin}")
            wait_for(lambda: runs(control.status()["nodes"]["fleet-6"], answer["version"]),
                     what="every type ACKed")
            clusters.add(node_clusters(node))
        # The move added a cluster: Envoy had both when the policy moved.
        first, second = sorted(clusters, key=len)
        assert first < second, (first, second)
    finally:
        prober.stopped.set()
        if prober.is_alive():
            prober.join()
        node.stop()
        control.stop()
    statuses = {s for _, s, _ in prober.answers}
    assert statuses <= {404, 200} and not prober.errors, (statuses, prober.errors)


def node_clusters(node: FleetEnvoy) -> frozenset:
    """The dynamic clusters Envoy has, by name."""
    conn = http.client.HTTPConnection("127.0.0.1", node.ports.admin, timeout=10)
    try:
        conn.request("GET", "/config_dump?resource=dynamic_active_clusters")
        dump = json.loads(conn.getresponse().read())
        return frozenset(c["cluster"]["name"] for c in dump.get("configs", []))
    finally:
        conn.close()


def served_by(node: FleetEnvoy, host: str) -> str | None:
    """The demo origin that answered (it says so in its JSON body)."""
    conn = http.client.HTTPConnection("127.0.0.1", node.ports.http, timeout=10)
    try:
        conn.request("GET", f"/cds/{time.monotonic_ns()}", headers={"host": host})
        r = conn.getresponse()
        body = r.read()
        return json.loads(body).get("origin") if r.status == 200 else None
    finally:
        conn.close()
