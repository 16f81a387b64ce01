"""What a one-domain change costs a fleet: for each size (1,000 and 100,000
synthetic domains by default) `origin-policy serve --ads` watching a
directory of one file per domain, three Envoys (`--concurrency 1`, the
edge's configuration) and a light steady load; then one domain's file is
changed, a few times. Prints a table:

- file → accepted: from the file written until the server publishes it
  (the watch, the engine's check, the durable commit);
- file → all fed: until every Envoy's feed polls from that version;
- file → visible on all: until every Envoy's answer for that domain shows
  the change;
- failed requests of the steady load (must be 0).

Run: .venv/bin/python deploy/fleet/fleet_bench.py [--domains 1000,100000] [--pushes 3] [--cli PATH]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent / "bench"))
from edge import CLI as DEFAULT_CLI, cpu_model, envoy_version  # noqa: E402
from fleet import ControlPlane, make_node, start_nodes  # noqa: E402
from load import decision_host  # noqa: E402
from origins import DEMO_ORIGINS, Certificates, DemoOrigins  # noqa: E402
# The synthetic domains of the scale benchmark, so both measure the same names.
from scale_bench import domain, host_for, origin_host  # noqa: E402

XDS_PORT = 18620
STATUS_PORT = 18621
PORT_BASE = 12200
ORIGIN_PORT = 18081  # the plain demo origin (deploy/origins.py)
SETTINGS = {
    "decision_header": True,
    "unknown_domain": {"action": "local_reply", "status": 404},
    # The benchmark's origin is on loopback, which the edge refuses by default.
    "origin_networks": {"allow": ["127.0.0.1/32"]},
}


def write_policy(directory: Path, i: int, version: int = 0) -> None:
    """Every domain on the one plain demo origin (one derived cluster), each
    with a Host of its own (what a push changes)."""
    policy = {
        "domain": domain(i),
        "primary": {"address": "127.0.0.1"},
        "protocol": {"policy": "http", "http_port": ORIGIN_PORT},
        "origin_host": {"mode": "custom", "value": origin_host(i, version)},
    }
    path = directory / f"{domain(i).replace('*', '_')}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(policy))
    tmp.rename(path)


def write_policies(directory: Path, n: int) -> None:
    directory.mkdir(parents=True)
    (directory / "settings.json").write_text(json.dumps(SETTINGS))
    for i in range(n):
        write_policy(directory, i)


def seen_host(port: int, host: str) -> str | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", f"/bench/{time.monotonic_ns()}", headers={"host": host})
        r = conn.getresponse()
        r.read()
        return decision_host(r.getheader("x-origin-decision"))
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


@dataclass
class Push:
    accepted_s: float
    fed_s: float
    visible_s: float


@dataclass
class SizeResult:
    domains: int
    start_s: float = 0.0
    pushes: list[Push] = field(default_factory=list)
    requests: int = 0
    failed: int = 0


def one_push(control: ControlPlane, nodes, directory: Path, i: int, version: int) -> Push:
    before = control.status()["version"]
    started = time.monotonic()
    write_policy(directory, i, version)
    want = origin_host(i, version)
    accepted = fed = None
    pending = {n.node_id for n in nodes}
    while fed is None or pending:
        now = time.monotonic() - started
        if now > 300:
            raise RuntimeError(f"change not everywhere after 300 s: {pending}")
        status = control.status()
        if accepted is None and status["version"] > before:
            accepted, target = now, status["version"]
        if accepted is not None and fed is None and all(
                status["nodes"].get(n.node_id, {}).get("version") == target for n in nodes):
            fed = now
        for node in [n for n in nodes if n.node_id in pending]:
            if seen_host(node.ports.http, host_for(i)) == want:
                pending.discard(node.node_id)
        time.sleep(0.02)
    return Push(accepted, fed, time.monotonic() - started)


def run_size(n: int, envoys: int, pushes: int, certs: Certificates, work: Path, cli: Path) -> SizeResult:
    run = work / f"fleet-{n}"
    policies = run / "policies"
    write_policies(policies, n)
    control = ControlPlane(run, policies, xds_port=XDS_PORT, status_port=STATUS_PORT, cli=cli)
    nodes = [make_node(run, k, certs, XDS_PORT, PORT_BASE) for k in range(1, envoys + 1)]
    res = SizeResult(n)
    load = None
    load_out = run / "load.jsonl"
    try:
        control.start(timeout=600)
        started = time.monotonic()
        start_nodes(nodes, timeout=600)
        res.start_s = time.monotonic() - started
        load = start_load_process(nodes, load_out, [host_for(k) for k in range(3)])
        for k in range(1, pushes + 1):
            res.pushes.append(one_push(control, nodes, policies, (k * 7919) % n, k))
            time.sleep(1)
    finally:
        if load:
            load.terminate()
            load.wait(timeout=20)
            rows = [json.loads(line) for line in load_out.read_text().splitlines() if line]
            res.requests = len(rows)
            res.failed = sum(1 for r in rows if not 200 <= r[3] < 300)
        for node in nodes:
            node.stop()
        control.stop()
        shutil.rmtree(run, ignore_errors=True)
    return res


def start_load_process(nodes, out: Path, hosts: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE / "load.py"),
                             "--ports", ",".join(str(n.ports.http) for n in nodes),
                             "--hosts", ",".join(hosts), "--out", str(out), "--interval", "0.05"])


def median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def table(results: list[SizeResult], envoys: int, cli: Path) -> str:
    lines = [
        f"{envoys} Envoys (--concurrency 1) on {cpu_model()} ({platform.machine()}, "
        f"{os.cpu_count()} cores), Envoy {envoy_version()}; server {cli}; "
        f"median of {len(results[0].pushes)} one-domain changes",
        "",
        "| domains | start (all ready) | file → accepted | file → all fed | file → visible on all | failed requests |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        p = r.pushes
        lines.append(
            f"| {r.domains:,} | {r.start_s:.2f} s | {median([x.accepted_s for x in p]):.2f} s "
            f"| {median([x.fed_s for x in p]):.2f} s | {median([x.visible_s for x in p]):.2f} s "
            f"| {r.failed} of {r.requests:,} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domains", default="1000,100000")
    p.add_argument("--envoys", type=int, default=3)
    p.add_argument("--pushes", type=int, default=3)
    p.add_argument("--cli", type=Path, default=DEFAULT_CLI, help="the origin-policy build that bundles")
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        work = Path(tmp)
        certs = Certificates(work / "certs")
        with DemoOrigins(DEMO_ORIGINS, certs):
            for n in (int(x) for x in args.domains.split(",")):
                print(f"{n:,} domains ...", flush=True)
                results.append(run_size(n, args.envoys, args.pushes, certs, work, args.cli))
                for k, push in enumerate(results[-1].pushes, 1):
                    print(f"  push {k}: {push}", flush=True)
    print(table(results, args.envoys, args.cli))
    return 0


if __name__ == "__main__":
    sys.exit(main())
