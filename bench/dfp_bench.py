"""What Envoy's dynamic forward proxy (DFP) costs per origin host, against one
cluster per origin (bench/cluster_bench.py): the candidate for 100,000
distinct origins on one edge.

One Envoy 1.40 (--concurrency 2): a listener whose DFP HTTP filter and DFP
cluster take the origin from each request's Host (`o<i>.origins.test:18600`);
its DNS cache (max_hosts 1,000,000) looks names up on a local DNS server that
answers every name with 127.0.0.1, where one origin listens. For each N, a
fresh Envoy gets one request for each of N new origin names (8 at a time),
then the script measures (the origin closes each connection after its answer,
as 100,000 rarely used origins would time theirs out):

- Envoy's RSS before and after, and per origin host;
- how long the N new hosts took (or how many were added within --limit-s),
  and the latency of a request to a new host (the last 1,000 added: DNS, the
  host added to the cache and the cluster, a new connection) and to a known
  one, at that N.

With --shards K (K > 1) the hosts are spread over K DFP clusters, each with
a DNS cache of its own and its own DFP filter, disabled on the listener and
enabled by the one route of its shard (a request's `x-origin-shard` header,
which the client sets here and the origin-policy filter would set from the
origin's name): Envoy rebuilds a DFP cluster's host set on every host added,
so a shard only pays for its own hosts.

Run: .venv/bin/python bench/dfp_bench.py [--hosts 1000,10000,100000] [--shards 1,64]
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "deploy"))
from edge import Envoy, cpu_model, envoy_version  # noqa: E402
from origins import NameServer  # noqa: E402

LISTEN_PORT = 10190
ORIGIN_PORT = 18600
DNS_PORT = 18653
ADMIN = "http://127.0.0.1:9912"
MIB = 1024 * 1024


SHARD_HEADER = "x-origin-shard"


def config(shards: int) -> dict:
    def cache(k: int) -> dict:
        return {
            "name": f"origins-{k}",
            "dns_lookup_family": "V4_ONLY",
            "max_hosts": 1_000_000,
            "typed_dns_resolver_config": {
                "name": "envoy.network.dns_resolver.cares",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig",
                    "resolvers": [{"socket_address": {"address": "127.0.0.1", "port_value": DNS_PORT}}],
                    "dns_resolver_options": {"no_default_search_domain": True},
                },
            },
        }

    def dfp_filter(k: int) -> dict:
        return {
            "name": f"dfp-{k}",
            # One shard: always on; more: on only in the shard's route.
            "disabled": shards > 1,
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_forward_proxy.v3.FilterConfig",
                "dns_cache_config": cache(k),
            },
        }

    def route(k: int) -> dict:
        r = {"match": {"prefix": "/"}, "route": {"cluster": f"origins-{k}"}}
        if shards > 1:
            r["match"]["headers"] = [{"name": SHARD_HEADER, "string_match": {"exact": str(k)}}]
            r["typed_per_filter_config"] = {
                f"dfp-{k}": {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_forward_proxy.v3.PerRouteConfig"}}
            }
        return r

    def cluster(k: int) -> dict:
        return {
            "name": f"origins-{k}",
            "connect_timeout": "2s",
            "lb_policy": "CLUSTER_PROVIDED",
            "cluster_type": {
                "name": "envoy.clusters.dynamic_forward_proxy",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.clusters.dynamic_forward_proxy.v3.ClusterConfig",
                    "dns_cache_config": cache(k),
                },
            },
        }

    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "dfp",
        "route_config": {
            "virtual_hosts": [
                {"name": "all", "domains": ["*"], "routes": [route(k) for k in range(shards)]}
            ]
        },
        "http_filters": [
            *(dfp_filter(k) for k in range(shards)),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    host, port = ADMIN.removeprefix("http://").split(":")
    return {
        "admin": {"address": {"socket_address": {"address": host, "port_value": int(port)}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "viewer",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": LISTEN_PORT}},
                    "filter_chains": [
                        {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
                    ],
                }
            ],
            "clusters": [cluster(k) for k in range(shards)],
        },
    }


class _Origin(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        # One connection per answer: 100,000 origin hosts each used once
        # must not leave 100,000 idle connections (and threads) behind.
        self.close_connection = True
        self.send_response(200)
        self.send_header("connection", "close")
        self.send_header("content-length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def fetch(host: str, shards: int) -> float:
    """One GET through Envoy for `host` (in its shard), on a connection of
    its own; its latency in ms."""
    conn = http.client.HTTPConnection("127.0.0.1", LISTEN_PORT, timeout=30)
    headers = {"host": host, SHARD_HEADER: str(zlib.crc32(host.encode()) % shards)}
    try:
        started = time.perf_counter()
        conn.request("GET", "/", headers=headers)
        r = conn.getresponse()
        r.read()
        if r.status != 200:
            raise SystemExit(f"{host}: {r.status}")
        return (time.perf_counter() - started) * 1000
    finally:
        conn.close()


def name(i: int) -> str:
    return f"o{i}.origins.test:{ORIGIN_PORT}"


def run(n: int, shards: int, limit_s: float) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="dfp-bench-"))
    envoy = Envoy(run_dir, config(shards), concurrency=2, admin=ADMIN)
    envoy.start()

    def get(host: str) -> float:
        return fetch(host, shards)

    try:
        get(name(0))
        before = rss_mib(envoy.process.pid)
        started = time.monotonic()
        added, new = 0, []
        # In batches of 1,000, so that a run that slows down stops at the
        # time limit with what it reached.
        with ThreadPoolExecutor(8) as pool:
            while added < n and time.monotonic() - started < limit_s:
                batch = range(added + 1, min(n, added + 1000) + 1)
                new = list(pool.map(get, (name(i) for i in batch)))
                added = batch[-1]
        took = time.monotonic() - started
        after = rss_mib(envoy.process.pid)
        known = [get(name(1 + i % added)) for i in range(1000)]
        stats = envoy.stats()
        members = [stats.get(f"cluster.origins-{k}.membership_total", 0) for k in range(shards)]
        return {
            "n": n,
            "shards": shards,
            # Each shard's cluster holds only its own hosts.
            "largest_shard": max(members),
            "added": added,
            "took": took,
            "before": before,
            "after": after,
            "per_host_kib": (after - before) * 1024 / added,
            "new_p50": statistics.median(new),
            "new_p99": sorted(new)[int(len(new) * 0.99) - 1],
            "known_p50": statistics.median(known),
        }
    finally:
        envoy.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default="1000,10000,100000")
    parser.add_argument("--shards", default="1", help="comma-separated DFP shard counts to compare")
    parser.add_argument(
        "--limit-s", type=float, default=600, help="stop adding hosts after this long"
    )
    args = parser.parse_args()
    origin = ThreadingHTTPServer(("127.0.0.1", ORIGIN_PORT), _Origin)
    origin.daemon_threads = True
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    rows = []
    with NameServer(DNS_PORT, every_name_is="127.0.0.1"):
        for n in (int(x) for x in args.hosts.split(",")):
            for shards in (int(x) for x in args.shards.split(",")):
                rows.append(run(n, shards, args.limit_s))
                print(f"{n} hosts, {shards} shards done", file=sys.stderr)
    origin.shutdown()
    print(f"Machine: 2-core {cpu_model()}, Envoy {envoy_version()}, --concurrency 2; one origin on 127.0.0.1, names from a local DNS server; 8 requests at a time.")
    print()
    print("| origin hosts asked | DFP shards | added (time limit {:g} s) | time to add them | Envoy RSS before → after | per host | new host p50 / p99 (last 1,000) | known host p50 | hosts in the largest shard |".format(args.limit_s))
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['n']:,} | {r['shards']} | {r['added']:,} | {r['took']:.1f} s | {r['before']:.0f} → {r['after']:.0f} MiB | {r['per_host_kib']:.1f} KiB"
            f" | {r['new_p50']:.1f} / {r['new_p99']:.1f} ms | {r['known_p50']:.1f} ms | {r['largest_shard']:,} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
