"""What the derived origin clusters cost Envoy, by policy-set size and shape.

For each size N and shape, the script writes N synthetic policies, runs
`origin-policy bundle` (clusters + filter), starts the shipped edge
(deploy/envoy/edge.yaml, --concurrency 2) on them and measures:

- the clusters the bundle derived and the size of the CDS file;
- load time: Envoy's start until it is ready with every cluster active;
- Envoy's RSS after the load (VmRSS);
- a one-domain push (its origin moved to another port): bundle time, then the
  time until a request for that domain names the new port in
  `x-origin-decision`, and the clusters Envoy added, modified and removed.

Shapes: `distinct` gives every domain an origin of its own (the worst case:
one cluster per domain); `shared` spreads the domains over 100 origins (many
customer domains on one storage or origin service), so the clusters are few.

Run: .venv/bin/python bench/cluster_bench.py [--domains 1000,100000] [--shapes distinct,shared]
"""

from __future__ import annotations

import argparse
import http.client
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "deploy"))
from edge import (  # noqa: E402
    ADMIN,
    VIEWER_HTTP_PORT,
    Envoy,
    EdgeError,
    bundle,
    cpu_model,
    edge_config,
    envoy_version,
    http_get,
    parse_stats,
)
from origins import Certificates  # noqa: E402

MIB = 1024 * 1024
SHARED_ORIGINS = 100


def origin_of(i: int, shape: str) -> tuple[str, int]:
    """Policy i's origin: an address of its own on 127.0.0.0/8, or one of 100."""
    j = i if shape == "distinct" else i % SHARED_ORIGINS
    return f"127.{1 + j // 62500}.{(j // 250) % 250}.{1 + j % 250}", 80


def write_policies(directory: Path, n: int, shape: str) -> None:
    directory.mkdir(parents=True)
    (directory / "settings.json").write_text(json.dumps({"decision_header": True}))
    for i in range(n):
        address, port = origin_of(i, shape)
        (directory / f"d{i}.json").write_text(json.dumps({
            "domain": f"d{i}.example.com",
            "primary": {"address": address, "port": port},
        }))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def stat(envoy: Envoy, name: str) -> int:
    """One of the cluster manager's stats: asking for all of them would list
    every cluster's, hundreds of MiB at 100,000 clusters."""
    _, text = http_get(f"{ADMIN}/stats?filter=^cluster_manager%5C.", timeout=120)
    return parse_stats(text).get(name, 0)


def decision_of(host: str) -> str:
    """The `x-origin-decision` for a request to `host`; "" when Envoy did not
    answer in time (it can be busy applying the clusters)."""
    conn = http.client.HTTPConnection("127.0.0.1", VIEWER_HTTP_PORT, timeout=30)
    try:
        conn.request("GET", f"/probe/{time.monotonic_ns()}", headers={"host": host})
        r = conn.getresponse()
        r.read()
        return r.getheader("x-origin-decision") or ""
    except OSError:
        return ""
    finally:
        conn.close()


def measure(n: int, shape: str) -> dict:
    run = Path(tempfile.mkdtemp(prefix=f"origin-policy-clusters-{shape}-{n}-"))
    try:
        Certificates(run / "certs")
        policies = run / "policies"
        write_policies(policies, n, shape)
        started = time.monotonic()
        bundle(run, [policies])
        bundle_s = time.monotonic() - started
        cds = json.loads((run / "origin-policy.cds.json").read_text())
        clusters = len(cds["resources"])
        cds_mib = (run / "origin-policy.cds.json").stat().st_size / MIB
        envoy = Envoy(run, edge_config(), concurrency=2)
        started = time.monotonic()
        envoy.start(timeout=900)
        while stat(envoy, "cluster_manager.active_clusters") < clusters + 1:
            time.sleep(0.2)
        load_s = time.monotonic() - started
        rss = rss_mib(envoy.process.pid)
        # One domain's origin moves to another port.
        last = n - 1
        address, _ = origin_of(last, shape)
        (policies / f"d{last}.json").write_text(json.dumps({
            "domain": f"d{last}.example.com",
            "primary": {"address": address, "port": 81},
        }))
        before = {k: stat(envoy, f"cluster_manager.cluster_{k}") for k in ("added", "modified", "removed")}
        started = time.monotonic()
        bundle(run, [policies])
        bundled = time.monotonic()
        while "port=81" not in decision_of(f"d{last}.example.com"):
            if time.monotonic() - bundled > 300:
                raise EdgeError("the push was not visible within 300 s")
            time.sleep(0.01)
        visible_s = time.monotonic() - bundled
        after = {k: stat(envoy, f"cluster_manager.cluster_{k}") for k in before}
        rss_after = rss_mib(envoy.process.pid)
        envoy.stop()
        return {
            "domains": n, "shape": shape, "clusters": clusters, "cds_mib": cds_mib,
            "bundle_s": bundle_s, "load_s": load_s, "rss": rss,
            "push_bundle_s": bundled - started, "push_visible_s": visible_s,
            "changed": {k: after[k] - before[k] for k in after}, "rss_after": rss_after,
        }
    finally:
        shutil.rmtree(run, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", default="1000,100000")
    parser.add_argument("--shapes", default="distinct,shared")
    args = parser.parse_args()
    print(f"Envoy {envoy_version()}, --concurrency 2; {cpu_model()}, {platform.machine()}; "
          f"admin {ADMIN}")
    print()
    print("| domains | origins | clusters derived | CDS file | bundle | Envoy load | Envoy RSS | "
          "one-domain push: bundle / visible | clusters added / modified / removed | RSS after |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for n in (int(x) for x in args.domains.split(",")):
        for shape in args.shapes.split(","):
            print(f"measuring {n} domains, {shape} origins ...", file=sys.stderr, flush=True)
            print_row(measure(n, shape))
    return 0


def print_row(r: dict) -> None:
    c = r["changed"]
    print(f"| {r['domains']:,} | {r['shape']} | {r['clusters']:,} | {r['cds_mib']:.1f} MiB | "
          f"{r['bundle_s']:.1f} s | {r['load_s']:.1f} s | {r['rss']:,.0f} MiB | "
          f"{r['push_bundle_s']:.2f} s / {r['push_visible_s']:.2f} s | "
          f"{c['added']} / {c['modified']} / {c['removed']} | {r['rss_after']:,.0f} MiB |",
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
