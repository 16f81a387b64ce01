"""What reaching the origins costs Envoy, by policy-set size, shape and the
way origins are reached.

For each size N, shape and way, the script writes N synthetic policies,
serves them to the shipped edge (deploy/envoy/edge.yaml, --concurrency 2)
per domain with `origin-policy serve --watch` (or, with `--delivery inline`, as one
`origin-policy bundle` document) and measures:

- the clusters derived and the size of the CDS file; the time the feed (or
  the bundle) takes to validate the set and write the files;
- load time: Envoy's start until every cluster is active and the last
  domain's policy is in use;
- Envoy's RSS after the load (VmRSS);
- with `--warm`, Envoy's RSS once one request per domain has gone through
  (a direct origin is learnt by its shard on its first request; the
  synthetic origins refuse connections, so every answer is a quick 502);
- a one-domain push (its origin moved to another port): the time from the
  file written until the feed publishes it (inline: `bundle --admin`), then
  until a request for that domain names the new port in `x-origin-decision`,
  and the clusters Envoy added, modified and removed;
- a new domain with a new origin (a real origin on 127.0.0.1): the time
  until it is accepted, as above, then until its first request is answered
  by that origin. With clusters, the feed publishes a domain only once Envoy
  has taken its new clusters, so that work is in "accepted".

Shapes: `distinct` gives every domain an origin of its own (the worst case:
one cluster per domain); `secondary` is `distinct` with a secondary origin
(another address) for every tenth domain, so those fail over along a chain;
`shared` spreads the domains over 100 origins (many customer domains on one
storage or origin service), so the clusters are few.

Ways (`--reach`): `clusters`, one cluster per origin; `direct`,
`settings.direct_origins` (64 forward-proxy shards per scheme and connect
timeout; only chain members get clusters).

Run: .venv/bin/python bench/cluster_bench.py [--domains 1000,100000]
     [--shapes distinct,secondary,shared] [--reach clusters,direct] [--warm]
     [--delivery feed|inline] [--deferred-stats off,on]
"""

from __future__ import annotations

import argparse
import http.client
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "deploy"))
from edge import (  # noqa: E402
    ADMIN,
    ECDS_FILE,
    FEED_PORT,
    VIEWER_HTTP_PORT,
    Envoy,
    EdgeError,
    bundle,
    cpu_model,
    edge_config,
    envoy_version,
    http_get,
    parse_stats,
    start_feed,
    with_feed,
)
from origins import Certificates  # noqa: E402

MIB = 1024 * 1024
SHARED_ORIGINS = 100


# The new domain's origin: a real one, on an address and port no other uses.
NEW_ORIGIN_PORT = 18690


def address_of(j: int) -> str:
    return f"127.{1 + j // 62500}.{(j // 250) % 250}.{1 + j % 250}"


def origin_of(i: int, shape: str) -> tuple[str, int]:
    """Policy i's origin: an address of its own on 127.0.0.0/8, or one of 100."""
    j = i % SHARED_ORIGINS if shape == "shared" else i
    return address_of(j), 80


def document(i: int, shape: str) -> dict:
    address, port = origin_of(i, shape)
    doc = {"domain": f"d{i}.example.com", "primary": {"address": address, "port": port}}
    if shape == "secondary" and i % 10 == 0:
        # Addresses above the primaries' (at most 1,000,000 of them).
        doc["secondary"] = {"address": address_of(1_000_000 + i), "port": 80}
    return doc


def write_policies(directory: Path, n: int, shape: str, reach: str) -> None:
    directory.mkdir(parents=True)
    # The benchmark's origins are on loopback, which the edge refuses by default.
    settings = {"decision_header": True, "origin_networks": {"allow": ["127.0.0.0/8"]}}
    if reach == "direct":
        settings["direct_origins"] = {}
    (directory / "settings.json").write_text(json.dumps(settings))
    for i in range(n):
        (directory / f"d{i}.json").write_text(json.dumps(document(i, shape)))


class _NewOrigin(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


def warm(n: int, threads: int = 8) -> None:
    """One request per domain, `threads` at a time, on kept-alive connections."""
    local = threading.local()

    def one(i: int) -> None:
        for _ in range(2):
            conn = getattr(local, "conn", None) or http.client.HTTPConnection(
                "127.0.0.1", VIEWER_HTTP_PORT, timeout=60)
            local.conn = conn
            try:
                conn.request("GET", "/warm", headers={"host": f"d{i}.example.com"})
                conn.getresponse().read()
                return
            except OSError:
                conn.close()
                local.conn = None

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(n), chunksize=256))


def feed_version() -> int:
    return json.loads(http_get(f"http://127.0.0.1:{FEED_PORT}/status")[1])["version"]


def write_then(policies: Path, name: str, doc: dict, feed: bool) -> tuple[float, float]:
    """Writes one policy and has it accepted: bundled (inline), or published
    by `origin-policy serve` (its version moves). Returns (accepted after,
    accepted at)."""
    started = time.monotonic()
    if feed:
        before = feed_version()
    (policies / name).write_text(json.dumps(doc))
    if feed:
        while feed_version() == before:
            if time.monotonic() - started > 300:
                raise EdgeError("the feed did not publish the change within 300 s")
            time.sleep(0.005)
    else:
        bundle(policies.parent, [policies], admin=ADMIN)
    accepted = time.monotonic()
    return accepted - started, accepted


def status_of(host: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", VIEWER_HTTP_PORT, timeout=30)
    try:
        conn.request("GET", f"/new/{time.monotonic_ns()}", headers={"host": host})
        r = conn.getresponse()
        r.read()
        return r.status
    except OSError:
        return 0
    finally:
        conn.close()


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


def measure(n: int, shape: str, reach: str, warm_up: bool, delivery: str, deferred: bool) -> dict:
    run = Path(tempfile.mkdtemp(prefix=f"origin-policy-clusters-{shape}-{reach}-{n}-"))
    new_origin = ThreadingHTTPServer(("127.0.0.1", NEW_ORIGIN_PORT), _NewOrigin)
    threading.Thread(target=new_origin.serve_forever, daemon=True).start()
    feed = None
    envoy = None
    try:
        Certificates(run / "certs")
        policies = run / "policies"
        write_policies(policies, n, shape, reach)
        started = time.monotonic()
        if delivery == "feed":
            # Validates the set, writes the clusters and the filter's settings.
            feed = start_feed(run, policies, timeout=900, output=subprocess.DEVNULL)
            config = with_feed(edge_config(), FEED_PORT)
        else:
            bundle(run, [policies])
            config = edge_config()
        bundle_s = time.monotonic() - started
        cds = json.loads((run / "origin-policy.cds.json").read_text())
        clusters = len(cds["resources"])
        cds_mib = (run / "origin-policy.cds.json").stat().st_size / MIB
        if deferred:
            config["deferred_stat_options"] = {"enable_deferred_creation_stats": True}
        envoy = Envoy(run, config, concurrency=2)
        started = time.monotonic()
        envoy.start(timeout=900)
        while stat(envoy, "cluster_manager.active_clusters") < clusters + 1 + (feed is not None):
            time.sleep(0.2)
        # Every policy in: the last domain is decided.
        while not decision_of(f"d{n - 1}.example.com"):
            time.sleep(0.05)
        load_s = time.monotonic() - started
        rss = rss_mib(envoy.process.pid)
        warm_s, rss_warm = None, None
        if warm_up:
            started = time.monotonic()
            warm(n)
            warm_s, rss_warm = time.monotonic() - started, rss_mib(envoy.process.pid)
        # One domain's origin moves to another port.
        last = n - 1
        moved = document(last, shape)
        moved["primary"]["port"] = 81
        before = {k: stat(envoy, f"cluster_manager.cluster_{k}") for k in ("added", "modified", "removed")}
        push_accept_s, accepted = write_then(policies, f"d{last}.json", moved, feed is not None)
        while "port=81" not in decision_of(f"d{last}.example.com"):
            if time.monotonic() - accepted > 300:
                raise EdgeError("the push was not visible within 300 s")
            time.sleep(0.005)
        visible_s = time.monotonic() - accepted
        after = {k: stat(envoy, f"cluster_manager.cluster_{k}") for k in before}
        # A new domain with a new origin.
        new = {"domain": "new.example.com", "primary": {"address": "127.0.0.1", "port": NEW_ORIGIN_PORT}}
        new_accept_s, accepted = write_then(policies, "new.json", new, feed is not None)
        while status_of("new.example.com") != 200:
            if time.monotonic() - accepted > 300:
                raise EdgeError("the new domain was not served within 300 s")
            time.sleep(0.005)
        new_served_s = time.monotonic() - accepted
        rss_after = rss_mib(envoy.process.pid)
        return {
            "domains": n, "shape": shape, "reach": reach, "clusters": clusters,
            "cds_mib": cds_mib, "bundle_s": bundle_s, "load_s": load_s, "rss": rss,
            "warm_s": warm_s, "rss_warm": rss_warm,
            "push_bundle_s": push_accept_s, "push_visible_s": visible_s,
            "changed": {k: after[k] - before[k] for k in after},
            "new_bundle_s": new_accept_s, "new_served_s": new_served_s,
            "rss_after": rss_after,
        }
    finally:
        if envoy is not None:
            envoy.stop()
        if feed is not None:
            feed.terminate()
            feed.wait(timeout=30)
        new_origin.shutdown()
        new_origin.server_close()
        shutil.rmtree(run, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", default="1000,100000")
    parser.add_argument("--shapes", default="distinct,secondary,shared")
    parser.add_argument("--reach", default="clusters,direct")
    parser.add_argument("--delivery", default="feed", choices=["feed", "inline"],
                        help="policies per domain from `origin-policy serve`, or the one-document bundle")
    parser.add_argument("--deferred-stats", default="off",
                        help="off, on or off,on: deferred_stat_options.enable_deferred_creation_stats "
                             "(a cluster's traffic stats made on its first use)")
    parser.add_argument("--warm", action="store_true",
                        help="one request per domain before the pushes (RSS with every origin in use)")
    args = parser.parse_args()
    print(f"Envoy {envoy_version()}, --concurrency 2; {cpu_model()}, {platform.machine()}; "
          f"admin {ADMIN}; {args.delivery} delivery")
    print()
    print("| domains | origins | reached by | deferred stats | clusters derived | CDS file | bundle | Envoy load | "
          "Envoy RSS | every domain requested: time / RSS | one-domain push: accepted / visible | "
          "clusters added / modified / removed | new domain, new origin: accepted / served | RSS after |")
    print("|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for n in (int(x) for x in args.domains.split(",")):
        for shape in args.shapes.split(","):
            for reach in args.reach.split(","):
                for deferred in args.deferred_stats.split(","):
                    print(f"measuring {n} domains, {shape} origins, {reach}, deferred stats "
                          f"{deferred} ...", file=sys.stderr, flush=True)
                    r = measure(n, shape, reach, args.warm, args.delivery, deferred == "on")
                    r["deferred"] = deferred
                    print_row(r)
    return 0


def print_row(r: dict) -> None:
    c = r["changed"]
    warmed = (f"{r['warm_s']:.1f} s / {r['rss_warm']:,.0f} MiB" if r["warm_s"] is not None
              else "not measured")
    print(f"| {r['domains']:,} | {r['shape']} | {r['reach']} | {r['deferred']} | {r['clusters']:,} | "
          f"{r['cds_mib']:.1f} MiB | {r['bundle_s']:.1f} s | {r['load_s']:.1f} s | "
          f"{r['rss']:,.0f} MiB | {warmed} | "
          f"{r['push_bundle_s']:.2f} s / {r['push_visible_s'] * 1000:.0f} ms | "
          f"{c['added']} / {c['modified']} / {c['removed']} | "
          f"{r['new_bundle_s']:.2f} s / {r['new_served_s'] * 1000:.0f} ms | {r['rss_after']:,.0f} MiB |",
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
