"""The control plane's targets, measured: `origin-policy serve` (release
build) with N domains imported through its API, in front of three real
Envoys that follow its feed, and a demo origin on loopback.

Prints one table:

- import: N policies through `POST /v1/import` (20,000 a request);
- sync: the three Envoys started on the full store, until each serves the
  last domain;
- server RSS with N domains, and its cold start (stopped, started again on
  the same store: until `/status` answers with every domain);
- one PUT, visible on every Envoy: sequential writes to random domains, each
  timed from the PUT sent until a request to each Envoy is decided with the
  new Host (`x-origin-decision`);
- sustained PUTs at `--rate` for `--seconds` on keep-alive connections:
  each write's visibility, from its PUT sent until `/status` shows every
  Envoy acknowledged its version, the generator's lag behind its schedule,
  the failed writes, and a steady client's request latency on each Envoy
  (a process each) against its baseline before the load;
- a watched directory of `--watch-files` files: one file edited, until an
  Envoy serves it.

Run: .venv/bin/python bench/control_plane_bench.py [--domains 1000000]
     [--envoys 3] [--puts 200] [--rate 500] [--seconds 60] [--watch-files 100000]
(scripts/bench builds what it needs.)
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "deploy"))
from edge import WASM, Envoy, cpu_model, envoy_version, feed_edge_config  # noqa: E402

CLI = REPO / "target" / "release" / "origin-policy"
API_PORT = 18490
ORIGIN_PORT = 18491
FIRST_VIEWER_PORT = 10580
FIRST_ADMIN_PORT = 9960


class _Origin(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        # One write: headers and body in separate small writes meet Nagle's
        # algorithm and a delayed ACK (40 ms a request).
        self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")


def domain(i: int) -> str:
    return f"d{i}.cp.test"


def policy(i: int, host: str | None = None) -> dict:
    doc = {"domain": domain(i), "primary": {"address": "127.0.0.1", "port": ORIGIN_PORT}}
    if host:
        doc["origin_host"] = {"mode": "custom", "value": host}
    return doc


def settings() -> dict:
    return {
        "decision_header": True,
        "unknown_domain": {"action": "local_reply", "status": 404},
        "origin_networks": {"allow": [{"network": "127.0.0.1/32", "ports": [ORIGIN_PORT]}]},
        # One forward-proxy shard set, whatever the number of domains.
        "direct_origins": {},
    }


def call(method: str, path: str, body: bytes | None = None, port: int = API_PORT, timeout=600):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body)
        r = conn.getresponse()
        data = r.read()
        return r.status, data
    finally:
        conn.close()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


class Server:
    def __init__(self, run: Path, store: Path, watch: Path | None = None):
        self.run, self.store, self.watch = run, store, watch
        self.process: subprocess.Popen | None = None

    def start(self, expect_domains: int, timeout: float = 600) -> float:
        args = [str(CLI), "serve", "--wasm", str(WASM), "--out", str(self.run),
                "--listen", f"127.0.0.1:{API_PORT}", "--store", str(self.store)]  # fmt: skip
        args += ["--watch", str(self.watch)] if self.watch else ["--settings", str(self.run / "settings.json")]
        started = time.monotonic()
        self.process = subprocess.Popen(args, stderr=open(self.run / "serve.log", "ab"))
        while time.monotonic() - started < timeout:
            try:
                status, body = call("GET", "/status", timeout=2)
                if status == 200 and json.loads(body)["domains"] >= expect_domains:
                    return time.monotonic() - started
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        raise RuntimeError("serve did not start (see serve.log)")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


def start_envoys(run: Path, count: int) -> list[Envoy]:
    envoys = []
    for k in range(count):
        config = feed_edge_config(API_PORT, FIRST_ADMIN_PORT + k, FIRST_VIEWER_PORT + k)
        # The singleton names its node by the cluster's node id: one each.
        config["node"] = {"id": f"bench-{k}", "cluster": "bench"}
        envoy = Envoy(run, config, admin=f"http://127.0.0.1:{FIRST_ADMIN_PORT + k}")
        envoy.config_path.rename(run / f"envoy-{k}.yaml")
        envoy.config_path = run / f"envoy-{k}.yaml"
        envoy.log_path = run / f"envoy-{k}.log"
        envoy.start(timeout=120)
        envoys.append(envoy)
    return envoys


def decided_host(port: int, host: str) -> str | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", f"/{uuid.uuid4().hex}", headers={"host": host})
        r = conn.getresponse()
        r.read()
        found = re.search(r"host=([^;]+)", r.getheader("x-origin-decision") or "")
        return found.group(1) if found else None
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def wait_served(ports: list[int], d: str, host: str, timeout: float = 600) -> float:
    started = time.monotonic()
    pending = set(ports)
    while pending:
        pending = {p for p in pending if decided_host(p, d) != host}
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{d} not served with {host} by {pending}")
    return time.monotonic() - started


def import_domains(n: int) -> float:
    started = time.monotonic()
    chunk = 20_000
    for first in range(0, n, chunk):
        lines = "\n".join(json.dumps(policy(i)) for i in range(first, min(n, first + chunk)))
        status, body = call("POST", "/v1/import", lines.encode())
        if status != 200:
            raise RuntimeError(f"import: {status} {body[:300]!r}")
    return time.monotonic() - started


def single_puts(n: int, domains: int, ports: list[int]) -> list[float]:
    times = []
    for k in range(n):
        i = random.randrange(domains)
        host = f"p{k}-{uuid.uuid4().hex[:6]}.cp.test"
        started = time.monotonic()
        status, body = call("PUT", f"/v1/domains/{domain(i)}", json.dumps(policy(i, host)).encode())
        if status != 200:
            raise RuntimeError(f"PUT: {status} {body!r}")
        wait_served(ports, domain(i), host, timeout=60)
        times.append((time.monotonic() - started) * 1000)
    return times


def steady_client(port: int, host: str, stop, out) -> None:
    """One request at a time on a keep-alive connection, every 10 ms, until
    `stop`; puts (time, latency ms, ok) for each on `out`. A process of its
    own, so that the load's threads never delay it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    samples = []
    while not stop.is_set():
        started = time.monotonic()
        ok = True
        try:
            conn.request("GET", "/steady", headers={"host": host})
            r = conn.getresponse()
            r.read()
            ok = r.status == 200
        except (OSError, http.client.HTTPException):
            ok = False
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        samples.append((started, (time.monotonic() - started) * 1000, ok))
        time.sleep(0.01)
    out.put((port, samples))


def sustained_in_process(rate: int, seconds: int, domains: int, nodes: int, out) -> None:
    out.put(sustained(rate, seconds, domains, nodes))


class Client:
    """One keep-alive connection to the API."""

    def __init__(self):
        self.conn = http.client.HTTPConnection("127.0.0.1", API_PORT, timeout=30)

    def call(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        try:
            self.conn.request(method, path, body=body)
            r = self.conn.getresponse()
            return r.status, r.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", API_PORT, timeout=30)
            raise


def sustained(rate: int, seconds: int, domains: int, nodes: int) -> dict:
    """PUTs at `rate` a second from 8 threads on keep-alive connections; for
    each write, the time from its PUT sent until every node's acknowledged
    version covers it, and how late the generator sent it."""
    sent: list[tuple[float, int]] = []  # (PUT sent at, version)
    late: list[float] = []
    failed = [0]
    lock = threading.Lock()
    start = time.monotonic() + 0.5
    total = rate * seconds
    acked_at: dict[int, float] = {}
    done = threading.Event()

    def writer(w: int) -> None:
        client = Client()
        for k in range(w, total, 8):
            at = start + k / rate
            time.sleep(max(0.0, at - time.monotonic()))
            i = random.randrange(domains)
            body = json.dumps(policy(i, f"s{k}.cp.test")).encode()
            sent_at = time.monotonic()
            try:
                status, data = client.call("PUT", f"/v1/domains/{domain(i)}", body)
                ok = status == 200
            except (OSError, http.client.HTTPException):
                ok = False
            with lock:
                late.append((sent_at - at) * 1000)
                if ok:
                    sent.append((sent_at, json.loads(data)["version"]))
                else:
                    failed[0] += 1

    def watcher() -> None:
        # The lowest version every node acknowledged, and when it was first seen.
        client = Client()
        while not done.is_set():
            try:
                status = json.loads(client.call("GET", "/status")[1])
                versions = [n["version"] for n in status["nodes"].values() if n["version"] < 1 << 62]
                if len(versions) >= nodes:
                    acked_at.setdefault(min(versions), time.monotonic())
            except (OSError, ValueError, http.client.HTTPException):
                pass
            time.sleep(0.005)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    observer = threading.Thread(target=watcher)
    observer.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(3)
    done.set()
    observer.join()
    covered = sorted(acked_at.items())
    visible = []
    for at, version in sent:
        seen = next((when for v, when in covered if v >= version), None)
        if seen is not None:
            visible.append((seen - at) * 1000)
    return {"sent": len(sent), "failed": failed[0], "visible": visible, "late": late,
            "not_visible": len(sent) - len(visible)}  # fmt: skip


def watch_phase(files: int, tmp: Path) -> tuple[float, float]:
    run = tmp / "watch-run"
    run.mkdir()
    policies = run / "policies"
    policies.mkdir()
    (policies / "settings.json").write_text(json.dumps(settings()))
    for i in range(files):
        (policies / f"{domain(i)}.json").write_text(json.dumps(policy(i)))
    server = Server(run, run / "store", watch=policies)
    synced = server.start(files)
    envoy = start_envoys(run, 1)[0]
    try:
        wait_served([FIRST_VIEWER_PORT], domain(files - 1), domain(files - 1))
        times = []
        for k in range(20):
            i = random.randrange(files)
            host = f"w{k}.cp.test"
            path = policies / f"{domain(i)}.json"
            tmp_file = path.with_suffix(".tmp")
            started = time.monotonic()
            tmp_file.write_text(json.dumps(policy(i, host)))
            tmp_file.rename(path)
            wait_served([FIRST_VIEWER_PORT], domain(i), host, timeout=60)
            times.append((time.monotonic() - started) * 1000)
        return synced, times
    finally:
        envoy.stop()
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--domains", type=int, default=1_000_000)
    parser.add_argument("--envoys", type=int, default=3)
    parser.add_argument("--puts", type=int, default=200)
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--watch-files", type=int, default=100_000)
    args = parser.parse_args()
    if not CLI.exists():
        print(f"{CLI} missing: cargo build --release -p origin-policy-cli", file=sys.stderr)
        return 2
    origin = ThreadingHTTPServer(("127.0.0.1", ORIGIN_PORT), _Origin)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    rows: list[tuple[str, str, str]] = []
    tmp = Path(tempfile.mkdtemp(prefix="cp-bench-"))
    try:
        run = tmp / "run"
        run.mkdir()
        (run / "settings.json").write_text(json.dumps(settings()))
        server = Server(run, run / "store")
        server.start(0)
        imported = import_domains(args.domains)
        rows.append((f"import {args.domains:,} domains (POST /v1/import)", f"{imported:.1f} s",
                     f"{args.domains / imported:,.0f} domains/s"))  # fmt: skip
        rows.append(("server RSS after the import", f"{server.rss_mib():.0f} MiB", "target < 1024 MiB"))
        server.stop()
        cold = server.start(args.domains)
        rows.append((f"server cold start with {args.domains:,} domains", f"{cold:.1f} s", "target < 10 s"))
        rows.append(("server RSS after the start", f"{server.rss_mib():.0f} MiB", "target < 1024 MiB"))
        started = time.monotonic()
        envoys = start_envoys(run, args.envoys)
        ports = [FIRST_VIEWER_PORT + k for k in range(args.envoys)]
        try:
            wait_served(ports, domain(args.domains - 1), domain(args.domains - 1), timeout=1800)
            rows.append((f"{args.envoys} Envoys started, until each serves every domain",
                         f"{time.monotonic() - started:.1f} s", ""))  # fmt: skip
            puts = single_puts(args.puts, args.domains, ports)
            rows.append((f"one PUT visible on {args.envoys} Envoys ({args.puts} in a row)",
                         f"p50 {percentile(puts, 50):.1f} ms, p99 {percentile(puts, 99):.1f} ms",
                         "target p50 < 50 ms, p99 < 100 ms"))  # fmt: skip
            stop, samples = multiprocessing.Event(), multiprocessing.Queue()
            clients = [multiprocessing.Process(target=steady_client, args=(p, domain(0), stop, samples))
                       for p in ports]  # fmt: skip
            for c in clients:
                c.start()
            time.sleep(6)
            load_started = time.monotonic()
            results = multiprocessing.Queue()
            loader = multiprocessing.Process(target=sustained_in_process,
                                             args=(args.rate, args.seconds, args.domains, args.envoys, results))  # fmt: skip
            loader.start()
            load_result = results.get()
            loader.join()
            load_ended = load_started + 0.5 + args.seconds
            stop.set()
            measured = dict(samples.get() for _ in clients)
            for c in clients:
                c.join()
            visible = load_result["visible"]
            rows.append((f"{args.rate} PUT/s for {args.seconds} s: visible on every Envoy",
                         f"p50 {percentile(visible, 50):.0f} ms, p99 {percentile(visible, 99):.0f} ms" if visible else "none",
                         f"{load_result['sent']} written, {load_result['failed']} failed, "
                         f"{load_result['not_visible']} not seen; target p99 < 1 s, 0 failed"))  # fmt: skip
            late = load_result["late"]
            rows.append(("  the load generator's lag (PUT sent after its schedule)",
                         f"p50 {percentile(late, 50):.1f} ms, p99 {percentile(late, 99):.1f} ms", ""))  # fmt: skip
            for p in ports:
                base = [ms for at, ms, _ in measured[p] if at < load_started and at > load_started - 5]
                load = [ms for at, ms, _ in measured[p] if load_started + 0.5 <= at <= load_ended]
                failed = sum(1 for _, _, ok in measured[p] if not ok)
                rows.append((f"steady client on :{p}, request latency",
                             f"baseline p50 {percentile(base, 50):.2f} / p99 {percentile(base, 99):.2f} / max {max(base):.2f} ms; "
                             f"under PUTs p50 {percentile(load, 50):.2f} / p99 {percentile(load, 99):.2f} / max {max(load):.2f} ms",
                             f"{failed} failed; target: none delayed > 10 ms beyond baseline"))  # fmt: skip
        finally:
            for envoy in envoys:
                envoy.stop()
            server.stop()
        shutil.rmtree(run, ignore_errors=True)
        if args.watch_files:
            synced, edits = watch_phase(args.watch_files, tmp)
            rows.append((f"serve --watch of {args.watch_files:,} files: first sync", f"{synced:.1f} s", ""))
            rows.append(("one file edited, until an Envoy serves it (20 edits)",
                         f"p50 {percentile(edits, 50):.0f} ms, max {max(edits):.0f} ms", "target < 200 ms"))  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        origin.shutdown()
    print(f"\nMachine: {cpu_model()}, {platform.machine()}, {envoy_version()}, serve release build\n")
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:<48}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
