"""Per-domain delivery (`"delivery": "feed"`), measured in real Envoy with the
shipped filter:

- a policy source (this script, over HTTP on 127.0.0.1) speaking the feed
  protocol (README, "Per-domain delivery"): `GET /changes?since=V&epoch=E`
  answers the entries after version V, a page of --page entries at a time,
  and holds the request (long poll) while there is nothing new; `POST /push`
  adds one domain's change, `POST /reset` starts a new epoch;
- Envoy (--concurrency 2) with the filter's feed singleton as a bootstrap
  wasm service (`singleton: true`, main thread) that validates the feed's
  policies into shared data, one entry per domain, and the filter on the
  viewer listener in feed delivery, compiling a domain's entry on first use
  per worker; a second listener carries the same filter with the first
  1,000 policies in its plugin configuration, the per-request CPU baseline.

For each size N it measures: the initial sync (Envoy start until the last
domain's entry is served), Envoy's RSS after it, K one-domain pushes under a
steady keep-alive client (push accepted until probes on every worker see the
new value; the client's longest request during the pushes against before
them), RSS after the pushes, the feed bytes per push, a full re-sync while
serving (`POST /reset`: a new epoch; its duration and the longest request
during it), and the per-request CPU of the read (wrk on the reader listener
and on the inline listener, in the same Envoy). Prints a Markdown table.

Run: .venv/bin/python bench/delivery_bench.py [--domains 1000,100000,1000000] [--pushes 20]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from scale_bench import (
    ENVOY,
    REPO,
    Admin,
    die_with_parent,
    domain,
    free_ports,
    get,
    host_for,
    machine,
    WASM,
    ms,
    open_probes,
    origin_cluster,
    origin_host,
    SETTINGS,
    plugin_config,
    policy,
    rss_mib,
    cpu_seconds,
    serve_origin,
    spread,
    steady_client,
    stop_process,
    wait_for_port,
    watch_push,
)

DECISION = "x-origin-decision"
# The inline listener's policies: per-request cost does not depend on their number.
INLINE_POLICIES = 1000
WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
    ".HttpConnectionManager"
)


# --- the policy source ------------------------------------------------------------


class Feed:
    """Versions 1..N are the initial policies (made on demand), then one
    version per push. Counts what each kind of answer cost in body bytes."""

    def __init__(self, n: int, origin_port: int, page: int):
        self.n = n
        self.origin_port = origin_port
        self.page = page
        self.pushed: list[tuple[str, str]] = []
        self.changed = threading.Condition()
        self.push_bytes: list[int] = []
        # A new epoch (POST /reset) tells every client to page through it all again.
        self.epoch = 1
        # Versions a later push replaced: a snapshot lists each domain once.
        self.superseded: set[int] = set()
        self.version_of: dict[str, int] = {}

    @property
    def latest(self) -> int:
        return self.n + len(self.pushed)

    def entry(self, version: int) -> tuple[str, str]:
        if version <= self.n:
            i = version - 1
            return domain(i), policy(i, self.origin_port)
        return self.pushed[version - self.n - 1]

    def changes(self, since: int, epoch: int, hold: float) -> tuple[int, bytes, bool, bool] | None:
        """(version, page, more, reset) after `since`: from the start, a
        snapshot, when the client counts in another epoch; None when nothing
        came within `hold` s."""
        with self.changed:
            if epoch == self.epoch and since >= self.latest:
                self.changed.wait_for(lambda: since < self.latest or epoch != self.epoch, timeout=hold)
            reset = epoch != self.epoch
            if reset:
                since = 0
            latest = self.latest
            if since >= latest and not reset:
                return None
            upto = min(latest, since + self.page)
            lines = [
                "%s\t%s\n" % self.entry(v)
                for v in range(since + 1, upto + 1)
                if v not in self.superseded
            ]
        body = "".join(lines).encode()
        if since >= self.n and self.epoch == 1:  # a push, not a page of the re-sync
            self.push_bytes.append(len(body))
        return upto, body, upto < latest, reset

    def reset(self) -> None:
        with self.changed:
            self.epoch += 1
            self.changed.notify_all()

    def push(self, i: int, policy_text: str) -> None:
        with self.changed:
            self.superseded.add(self.version_of.get(domain(i), i + 1))
            self.pushed.append((domain(i), policy_text))
            self.version_of[domain(i)] = self.latest
            self.changed.notify_all()


def serve_feed(port: int, n: int, origin_port: int, page: int, hold: float, ready) -> None:
    feed = Feed(n, origin_port, page)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def answer(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            url = urlparse(self.path)
            if url.path == "/stats":
                return self.answer(200, json.dumps({"push_bytes": feed.push_bytes}).encode())
            query = parse_qs(url.query)
            since = int(query.get("since", ["0"])[0])
            epoch = int(query.get("epoch", ["0"])[0] or 0)
            got = feed.changes(since, epoch, hold)
            if got is None:
                return self.answer(204, headers={"x-feed-version": str(since), "x-feed-epoch": str(feed.epoch)})
            version, body, more, reset = got
            headers = {"x-feed-version": str(version), "x-feed-epoch": str(feed.epoch)}
            if more:
                headers["x-feed-more"] = "1"
            if reset:
                headers["x-feed-reset"] = "1"
            self.answer(200, body, headers)

        def do_POST(self):
            if self.path == "/reset":
                feed.reset()
                return self.answer(200)
            body = self.rfile.read(int(self.headers["content-length"])).decode()
            i, p = body.split("\t", 1)
            feed.push(int(i), p)
            self.answer(200)

    class Server(ThreadingHTTPServer):
        daemon_threads = True

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    server = Server(("127.0.0.1", port), Handler)
    ready.set()
    server.serve_forever()


# --- Envoy ----------------------------------------------------------------------------


def wasm_config(root_id: str, configuration: str, wasm: Path) -> dict:
    return {
        "name": root_id,
        "root_id": root_id,
        "vm_config": {
            # One vm_id for the singleton and the filter: one shared-data store.
            "vm_id": "origin-policy",
            "runtime": "envoy.wasm.runtime.v8",
            "code": {"local": {"filename": str(wasm)}},
        },
        "configuration": {
            "@type": "type.googleapis.com/google.protobuf.StringValue",
            "value": configuration,
        },
    }


def listener(name: str, port: int, configuration: str, wasm: Path) -> dict:
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": HCM_TYPE,
                "stat_prefix": name,
                "route_config": {"virtual_hosts": [{
                    "name": "all", "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {
                        "cluster_header": "x-origin-cluster", "timeout": "60s",
                    }}],
                }]},
                "http_filters": [
                    {"name": "origin-policy", "typed_config": {
                        "@type": WASM_TYPE, "config": wasm_config("origin-policy", configuration, wasm)}},
                    {"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                        "suppress_envoy_headers": True,
                    }},
                ],
            },
        }]}],
    }  # fmt: skip


def static_cluster(name: str, port: int) -> dict:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
        ]}]},
    }  # fmt: skip


def bootstrap(admin: int, feed_port: int, inline: int, origin: int, source: int, wasm: Path) -> dict:
    feed_config = '{"settings":' + SETTINGS + ',"delivery":"feed"}'
    inline_config = plugin_config([policy(i, origin) for i in range(INLINE_POLICIES)])
    return {
        "node": {"id": "delivery-bench", "cluster": "origin-policy-delivery-bench"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "bootstrap_extensions": [{
            "name": "envoy.bootstrap.wasm",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.wasm.v3.WasmService",
                "singleton": True,
                "config": wasm_config("origin-policy-feed", '{"feed_cluster":"policy_source"}', wasm),
            },
        }],
        "static_resources": {
            "listeners": [
                listener("feed", feed_port, feed_config, wasm),
                listener("inline", inline, inline_config, wasm),
            ],
            "clusters": [origin_cluster(origin), static_cluster("policy_source", source)],
        },
    }  # fmt: skip


WRK_TOTAL = re.compile(r"(\d+) requests in ([\d.]+)s")


def wrk_cpu(envoy_pid: int, port: int, host: str, seconds: int) -> tuple[float, float]:
    """(Envoy CPU µs per request, requests/s) under wrk, one thread, 16 connections."""
    before = cpu_seconds(envoy_pid)
    out = subprocess.run(
        ["wrk", "-t1", "-c16", f"-d{seconds}s", "-H", f"Host: {host}", f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True,
    )  # fmt: skip
    cpu = cpu_seconds(envoy_pid) - before
    m = WRK_TOTAL.search(out.stdout)
    if out.returncode != 0 or not m or "Non-2xx" in out.stdout:
        raise SystemExit(f"wrk on :{port} failed:\n{out.stdout}{out.stderr}")
    requests, took = int(m.group(1)), float(m.group(2))
    return cpu * 1e6 / requests, requests / took


# --- one size -------------------------------------------------------------------------


@dataclass
class SizeResult:
    domains: int
    sync_s: float = 0.0
    sync_log: str = ""
    rss_load: float = 0.0
    rss_pushes: float = 0.0
    visible: list[float] = field(default_factory=list)
    never_visible: int = 0
    push_max: float = 0.0
    resync_s: float = 0.0
    resync_max: float = 0.0
    baseline_max: float = 0.0
    failed: int = 0
    total: int = 0
    push_bytes: list[int] = field(default_factory=list)
    cpu: dict[str, tuple[float, float]] = field(default_factory=dict)
    idle_cpu_ms_per_s: float = 0.0
    error: str = ""


def run_size(n: int, args, wasm: Path) -> SizeResult:
    res = SizeResult(n)
    run = Path(tempfile.mkdtemp(prefix=f"origin-policy-delivery-{n}-"))
    envoy = origin = feed = client = None
    stop = None
    try:
        admin_port, reader_port, inline_port, origin_port, source_port = free_ports(5)
        origin = subprocess.Popen(
            [sys.executable, __file__, "--serve-origin", str(origin_port)], preexec_fn=die_with_parent
        )
        ready = multiprocessing.Event()
        feed = multiprocessing.Process(
            target=serve_feed, args=(source_port, n, origin_port, args.page, 20.0, ready), daemon=True
        )
        feed.start()
        ready.wait(10)
        wait_for_port(origin_port)
        config = bootstrap(admin_port, reader_port, inline_port, origin_port, source_port, wasm)
        (run / "envoy.json").write_text(json.dumps(config))
        log_path = run / "envoy.log"
        print(f"[{n:,}] starting Envoy", file=sys.stderr)
        start = time.monotonic()
        envoy = subprocess.Popen(
            [str(ENVOY), "-c", str(run / "envoy.json"), "--disable-hot-restart", "--concurrency", "2",
             "--log-level", "info"],
            cwd=run, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
        )  # fmt: skip
        last = host_for(n - 1)
        while True:
            if envoy.poll() is not None:
                res.error = f"Envoy exited with {envoy.returncode}"
                return res
            if time.monotonic() - start > args.load_timeout:
                res.error = f"not in sync after {args.load_timeout:.0f} s"
                return res
            conn = http.client.HTTPConnection("127.0.0.1", reader_port, timeout=10)
            try:
                status, found = get(conn, last, "/load", DECISION)
                if status == 200 and found and found.startswith("domain="):
                    res.sync_s = time.monotonic() - start
                    break
            except (OSError, http.client.HTTPException):
                pass
            finally:
                conn.close()
            time.sleep(0.02)
        log = log_path.read_text(errors="replace")
        res.sync_log = next((line for line in log.splitlines() if "in sync at version" in line), "")
        time.sleep(args.settle)
        res.rss_load = rss_mib(envoy.pid)
        print(f"[{n:,}] in sync after {res.sync_s:.2f} s, RSS {res.rss_load:.0f} MiB", file=sys.stderr)
        # What Envoy spends with no request at all: the VMs' ticks and the
        # singleton's long poll.
        before, idle_started = cpu_seconds(envoy.pid), time.monotonic()
        time.sleep(args.idle_seconds)
        res.idle_cpu_ms_per_s = (cpu_seconds(envoy.pid) - before) * 1e3 / (time.monotonic() - idle_started)

        admin = Admin(admin_port)
        pushed, steady = spread(n, args.pushes)
        probes = open_probes(reader_port, admin, host_for(pushed[0]), args.probes_per_worker, 2)
        stop = multiprocessing.Event()
        out = multiprocessing.Queue()
        client = multiprocessing.Process(
            target=steady_client,
            args=(reader_port, [host_for(i) for i in steady], 4, 0.005, stop, out, DECISION),
        )
        client.start()
        time.sleep(args.baseline)
        pushes_started = time.monotonic()
        for version, i in enumerate(pushed, start=1):
            # Every worker has looked the domain up: it answers from memory
            # until the singleton's wake says it changed.
            for p in probes:
                get(p.conn, host_for(i), "/probe/before", DECISION)
            body = f"{i}\t{policy(i, origin_port, version)}".encode()
            req = urllib.request.Request(f"http://127.0.0.1:{source_port}/push", data=body, method="POST")
            with urllib.request.urlopen(req, timeout=10):
                pass
            t0 = time.monotonic()
            got = watch_push(probes, host_for(i), f"host={origin_host(i, version)}", t0, 30.0, 0.002, DECISION)
            if got.visible_s is None:
                res.never_visible += 1
            else:
                res.visible.append(got.visible_s)
            time.sleep(args.push_gap)
        pushes_ended = time.monotonic()
        # A full re-sync while serving: the source lost its versions.
        synced = log_path.read_text(errors="replace").count("in sync")
        req = urllib.request.Request(f"http://127.0.0.1:{source_port}/reset", data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=10):
            pass
        resync_started = time.monotonic()
        while log_path.read_text(errors="replace").count("in sync") == synced:
            if time.monotonic() - resync_started > args.load_timeout:
                res.error = "no re-sync"
                return res
            time.sleep(0.05)
        resync_ended = time.monotonic()
        res.resync_s = resync_ended - resync_started
        time.sleep(1.0)
        stop.set()
        records = out.get(timeout=60)
        client.join(timeout=10)
        before = [lat for s, lat, _ in records if s < pushes_started]
        during = [lat for s, lat, _ in records if pushes_started <= s < pushes_ended]
        res.baseline_max = max(before, default=0.0)
        res.push_max = max(during, default=0.0)
        res.resync_max = max(
            (lat for s, lat, _ in records if resync_started <= s < resync_ended), default=0.0
        )
        res.failed = sum(o != "ok" for _, _, o in records)
        res.total = len(records)
        time.sleep(args.settle)
        res.rss_pushes = rss_mib(envoy.pid)
        with urllib.request.urlopen(f"http://127.0.0.1:{source_port}/stats", timeout=10) as r:
            res.push_bytes = json.loads(r.read())["push_bytes"]
        for p in probes:
            p.conn.close()
        for variant, port, host in [
            (f"inline ({INLINE_POLICIES:,} policies in the configuration), exact name", inline_port, host_for(0)),
            ("feed, exact name", reader_port, host_for(0)),
            ("feed, wildcard", reader_port, host_for(1)),
        ]:
            res.cpu[variant] = wrk_cpu(envoy.pid, port, host, args.wrk_seconds)
        return res
    finally:
        if stop is not None:
            stop.set()
        if client is not None and client.is_alive():
            client.terminate()
        stop_process(envoy, "Envoy")
        stop_process(origin, "origin")
        if feed is not None:
            feed.terminate()


def percentile(values: list[float], p: float) -> float:
    """The nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(-(-len(ordered) * p // 100)) - 1))]


def row(r: SizeResult) -> str:
    if r.error:
        return f"| {r.domains:,} | {r.error} | | | | | | | |"
    vis = (
        f"p50 {ms(percentile(r.visible, 50))}, p99 {ms(percentile(r.visible, 99))} "
        f"({ms(min(r.visible))} - {ms(max(r.visible))})"
        if r.visible
        else "—"
    )
    if r.never_visible:
        vis += f" ({r.never_visible} never)"
    per_push = f"{min(r.push_bytes):,} - {max(r.push_bytes):,} B" if r.push_bytes else "—"
    return (
        f"| {r.domains:,} | {ms(r.sync_s)} | {r.rss_load:,.0f} MiB | {r.rss_pushes:,.0f} MiB | {vis} "
        f"| {ms(r.push_max)} ({ms(r.baseline_max)}) | {per_push} | {ms(r.resync_s)}, longest request "
        f"{ms(r.resync_max)} | {r.failed:,} of {r.total:,} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", default="1000,100000,1000000")
    parser.add_argument("--pushes", type=int, default=20)
    parser.add_argument("--page", type=int, default=10_000, help="entries per feed answer")
    parser.add_argument("--baseline", type=float, default=5.0)
    parser.add_argument("--push-gap", type=float, default=0.2)
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--probes-per-worker", type=int, default=2)
    parser.add_argument("--wrk-seconds", type=int, default=10)
    parser.add_argument("--idle-seconds", type=float, default=10.0,
                        help="Envoy's CPU measured with no request, after the sync")
    parser.add_argument("--load-timeout", type=float, default=600.0)
    parser.add_argument("--wasm", type=Path, default=WASM)
    parser.add_argument("--serve-origin", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_origin:
        serve_origin(args.serve_origin)
        return 0
    if not args.wasm.exists():
        raise SystemExit(f"{args.wasm} not found: cargo build --release --target wasm32-wasip1 -p origin-policy-filter")
    sizes = [int(s.replace("_", "")) for s in args.domains.split(",") if s]
    results = [run_size(n, args, args.wasm) for n in sizes]
    print(f"\n{datetime.now():%Y-%m-%d %H:%M}, {machine()}; Envoy --concurrency 2; "
          f"{args.pushes} pushes per size, feed pages of {args.page:,} entries\n")  # fmt: skip
    print("| domains | initial sync | RSS after sync | RSS after pushes | push accepted → visible on every worker "
          "| longest request during pushes (before) | feed body per push | full re-sync while serving "
          "| failed requests |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(row(r))
    print("\nEnvoy's CPU with no request, after the sync (the VMs' ticks, the singleton's long poll): "
          + ", ".join(f"{r.domains:,}: {r.idle_cpu_ms_per_s:.2f} ms/s" for r in results if not r.error))
    print("\nPer-request Envoy CPU (wrk -t1 -c16, same Envoy):\n")
    print("| domains | variant | CPU µs/request | requests/s |")
    print("|---|---|---|---|")
    for r in results:
        for variant, (cpu, rps) in r.cpu.items():
            print(f"| {r.domains:,} | {variant} | {cpu:.1f} | {rps:,.0f} |")
    for r in results:
        if r.sync_log:
            print(f"\n[{r.domains:,}] {r.sync_log.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
