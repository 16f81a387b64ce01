"""What one-domain policy pushes cost at scale, in real Envoy.

`--delivery feed` (the default) measures per-domain delivery, the shipped
path: it runs bench/delivery_bench.py with the same sizes, pushes, baseline,
gap, settle time, probes and `.wasm` (its docstring says what it measures:
initial sync, RSS after it and after the pushes, push-to-visible on every
worker, the longest request against the baseline, feed bytes per push, a full
re-sync, per-request CPU). `--delivery inline` measures the whole policy set
as one plugin configuration, as below.

For the inline path: for each size N (1,000 / 100,000 / 1,000,000 domains by default) the script
writes a synthetic plugin configuration of N policies, every one routed to one
static cluster (an HTTP origin this script starts on 127.0.0.1, answering 200
at once), and starts Envoy (--concurrency 2) with the filter served through ECDS
from a watched file, as the edge's origin-fetch tier is. It measures:

- load time: from Envoy's start until a request for the last domain is routed
  by the filter (its response carries `x-origin-decision`);
- Envoy's RSS after the load (VmRSS);
- K pushes (--pushes), each changing ONE domain's `origin_host` value, written
  by write-then-rename while a steady keep-alive client runs on other domains:
  push-to-visible time (rename until probes on connections held open on every
  Envoy worker see the new value), RSS after the K pushes, the longest client
  request during the pushes against the longest before them, and failed
  requests (client and probes).

A size the filter (or Envoy) refuses is reported as refused with the reason
from Envoy's log. Prints a Markdown table and, per size, what Envoy's log says
about where the time went.

Run: .venv/bin/python bench/scale_bench.py [--domains 1000,100000] [--pushes 8]
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import http.client
import json
import multiprocessing
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "deploy"))
from edge import (  # noqa: E402
    ECDS_FILE,
    ENVOY,
    REPO,
    WASM,
    cpu_model,
    envoy_version,
    parse_stats,
)

DECISION = "x-origin-decision"
WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
MIB = 1024 * 1024
# The log lines that say a configuration was not taken, by the filter or by Envoy.
REFUSAL = re.compile(
    r"plugin configuration rejected|policy rejected|Unable to create|failed to load|"
    r"update rejected|Missing config",
    re.I,
)


# --- the synthetic configuration -------------------------------------------------


def domain(i: int) -> str:
    """Policy i's name, as bench/synthetic's `domain(i, FirstDomain::Exact)`:
    exact names and leading wildcards alternate."""
    return f"*.img{i}.example.com" if i % 2 else f"site{i}.example.com"


def host_for(i: int) -> str:
    """A viewer Host that policy i covers (bench/synthetic's `host_for`)."""
    d = domain(i)
    return f"a.{d[2:]}" if d.startswith("*.") else d


def origin_host(i: int, version: int) -> str:
    return f"v{version}.o{i}.example.net"


def policy(i: int, origin_port: int, version: int = 0) -> str:
    """Policy i: plain HTTP to the one origin, the Host sent to it a custom
    value (what a push changes: `host=` in `x-origin-decision`). Every domain
    reaches the origin the same way, so they share its one derived cluster."""
    return (
        f'{{"domain":"{domain(i)}","primary":{{"address":"127.0.0.1","port":{origin_port}}},'
        f'"origin_host":{{"mode":"custom","value":"{origin_host(i, version)}"}}}}'
    )


def origin_cluster(origin_port: int) -> dict:
    """The cluster `origin-policy bundle` derives for the policies' origin."""
    with tempfile.TemporaryDirectory() as tmp:
        policies = Path(tmp) / "policies"
        policies.mkdir()
        (policies / "sample.json").write_text(policy(0, origin_port))
        # The same settings as the filter's: the origin is on loopback.
        (policies / "settings.json").write_text(SETTINGS)
        out = subprocess.run(
            [str(REPO / "target" / "debug" / "origin-policy"), "bundle", "--wasm", str(WASM),
             "--out", tmp, str(policies)],
            capture_output=True, text=True,
        )
        if out.returncode != 0:
            raise SystemExit(f"bundle failed: {out.stderr}")
        (cluster,) = json.loads((Path(tmp) / "origin-policy.cds.json").read_text())["resources"]
    del cluster["@type"]
    return cluster


# The benchmark's origin is on loopback, which the edge refuses by default.
SETTINGS = (
    '{"decision_header":true,"unknown_domain":{"action":"local_reply","status":404},'
    '"origin_networks":{"allow":["127.0.0.0/8"]}}'
)


def plugin_config(policies: list[str]) -> str:
    return '{"settings":' + SETTINGS + ',"policies":[' + ",".join(policies) + "]}"


def ecds_resource(config: str, wasm: Path) -> str:
    """The resource `origin-policy bundle` writes (crates/cli/src/main.rs)."""
    return json.dumps(
        {
            "resources": [
                {
                    "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
                    "name": "origin-policy",
                    "typed_config": {
                        "@type": WASM_TYPE,
                        "config": {
                            "name": "origin-policy",
                            "root_id": "origin-policy",
                            "vm_config": {
                                "vm_id": "origin-policy",
                                "runtime": "envoy.wasm.runtime.v8",
                                "code": {"local": {"filename": str(wasm)}},
                            },
                            "configuration": {
                                "@type": "type.googleapis.com/google.protobuf.StringValue",
                                "value": config,
                            },
                        },
                    },
                }
            ]
        }
    )


def write_then_rename(run: Path, text: str) -> tuple[float, float]:
    """Writes the ECDS resource next to the watched directory, then renames it
    into place (as crates/cli/src/files.rs does); the rename is what Envoy's
    watch sees. Returns the wall and monotonic times of the rename."""
    tmp = run / f".{ECDS_FILE}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    wall, mono = time.time(), time.monotonic()
    os.rename(tmp, run / "ecds" / ECDS_FILE)
    return wall, mono


def bootstrap(run: Path, admin_port: int, viewer_port: int, origin_port: int) -> dict:
    return {
        "node": {"id": "scale-bench", "cluster": "origin-policy-scale-bench"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "viewer",
                    "address": {
                        "socket_address": {"address": "127.0.0.1", "port_value": viewer_port}
                    },
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "scale",
                                        "route_config": {
                                            "name": "origins",
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "route": {
                                                                "cluster_header": "x-origin-cluster",
                                                                "timeout": "60s",
                                                            },
                                                            "request_headers_to_remove": [
                                                                "x-origin-cluster"
                                                            ],
                                                            "response_headers_to_remove": [
                                                                "x-origin-error",
                                                                "x-origin-decision",
                                                            ],
                                                        }
                                                    ],
                                                }
                                            ],
                                        },
                                        "http_filters": [
                                            {
                                                "name": "origin-policy",
                                                "config_discovery": {
                                                    "config_source": {
                                                        "path_config_source": {
                                                            "path": str(run / "ecds" / ECDS_FILE),
                                                            # Only the ECDS file lives there: a
                                                            # write elsewhere (Envoy's own log)
                                                            # must not wake the watch.
                                                            "watched_directory": {
                                                                "path": str(run / "ecds")
                                                            },
                                                        }
                                                    },
                                                    "type_urls": [WASM_TYPE],
                                                },
                                            },
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                                                    "suppress_envoy_headers": True,
                                                },
                                            },
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [origin_cluster(origin_port)],
        },
    }


# --- processes --------------------------------------------------------------------


def killed_with_parent() -> None:
    """This process gets SIGKILL if its parent dies without cleaning up."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def die_with_parent() -> None:
    """For Envoy and the origin: a session of their own (a terminal's Ctrl-C
    reaches this script, which stops them) and SIGKILL if it dies."""
    os.setsid()
    killed_with_parent()


def stop_process(p: subprocess.Popen | None, name: str) -> None:
    if p is None or p.poll() is not None:
        return
    try:
        os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        print(f"{name} did not stop on SIGTERM: killing it", file=sys.stderr)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def serve_origin(port: int) -> None:
    """The origin (run in its own process): 200 `ok` to anything, keep-alive."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("content-type", "text/plain")
            self.send_header("content-length", "3")
            self.end_headers()
            self.wfile.write(b"ok\n")

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024

        def handle_error(self, request, client_address):
            pass

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    Server(("127.0.0.1", port), Handler).serve_forever()


def wait_for_port(port: int) -> None:
    """Until something listens on 127.0.0.1:`port` (at most about 5 s): an
    origin answers before Envoy starts."""
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)


def spread(n: int, pushes: int) -> tuple[list[int], list[int]]:
    """Which of n domains are pushed (evenly spread), and which 64 the steady
    client asks for: never a pushed one, nor the last (the load probe's)."""
    pushed = [(n * (2 * p + 1)) // (2 * pushes) for p in range(pushes)]
    pushed = [i if i != n - 1 else n - 2 for i in pushed]
    steady = sorted({(n * k) // 64 for k in range(64)} - set(pushed) - {n - 1}) or [0]
    return pushed, steady


def rss_mib(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- requests -----------------------------------------------------------------------


def get(
    conn: http.client.HTTPConnection, host: str, path: str, header: str = DECISION
) -> tuple[int, str | None]:
    """The status and the filter's answer header (`header`)."""
    conn.request("GET", path, headers={"Host": host})
    r = conn.getresponse()
    r.read()
    return r.status, r.getheader(header)


def steady_client(
    port: int, hosts: list[str], threads: int, interval: float, stop, out, header: str = DECISION
) -> None:
    """The steady load (its own process, so that its timing does not share a
    GIL with the probes): `threads` keep-alive connections, each sending a
    request, then pausing `interval` s. Every request's start, latency and
    outcome go to `out` at the end."""
    # Ctrl-C is the parent's to handle: it stops this process through `stop`.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    killed_with_parent()
    records: list[tuple[float, float, str]] = []
    lock = threading.Lock()

    def run(k: int) -> None:
        mine = []
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        n = k
        while not stop.is_set():
            host = hosts[n % len(hosts)]
            n += threads
            start = time.monotonic()
            try:
                status, decision = get(conn, host, f"/steady/{k}/{n}", header)
                outcome = "ok" if status == 200 and decision else f"status {status}"
            except (OSError, http.client.HTTPException) as e:
                outcome = type(e).__name__
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            mine.append((start, time.monotonic() - start, outcome))
            time.sleep(interval)
        conn.close()
        with lock:
            records.extend(mine)

    workers = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.put(records)


class Admin:
    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}"

    def stats(self, filter_: str) -> dict[str, int]:
        with urllib.request.urlopen(f"{self.url}/stats?filter={filter_}", timeout=10) as r:
            return parse_stats(r.read().decode())


@dataclass
class Probe:
    """A keep-alive connection known to be served by one Envoy worker."""

    conn: http.client.HTTPConnection
    worker: str


def open_probes(port: int, admin: Admin, host: str, per_worker: int, workers: int) -> list[Probe]:
    """Connections spread over every worker: each new one is attributed to the
    worker whose accepted-connection counter went up (nothing else connects
    meanwhile); kept until every worker has `per_worker` of them."""
    pattern = rf"listener\.127\.0\.0\.1_{port}\.worker_\d+\.downstream_cx_total"
    kept: list[Probe] = []
    before = admin.stats(pattern)
    for _ in range(per_worker * workers * 10):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        get(conn, host, "/probe/open")
        after = admin.stats(pattern)
        grown = [k for k in after if after[k] > before.get(k, 0)]
        before = after
        worker = re.search(r"worker_\d+", grown[0]).group(0) if len(grown) == 1 else None
        if worker and sum(p.worker == worker for p in kept) < per_worker:
            kept.append(Probe(conn, worker))
        else:
            conn.close()
        if len(kept) == per_worker * workers:
            return kept
    raise RuntimeError(f"could not open {per_worker} connection(s) on each of {workers} workers")


@dataclass
class PushResult:
    domain_index: int
    renamed_wall: float
    visible_s: float | None  # on every worker
    per_worker_s: dict[str, float]
    probe_failures: int
    flapped: bool  # a worker went back to the old value after showing the new one
    # From Envoy's log: the main thread starts a VM for the new configuration
    # (file read and parsed), then the first VM has applied it.
    main_vm_s: float | None = None
    main_loaded_s: float | None = None
    rss_after: float = 0.0  # MiB, --push-gap after it was visible


def watch_push(
    probes: list[Probe], host: str, want: str, t0: float, timeout: float, step: float,
    header: str = DECISION,
) -> PushResult:
    """One thread per probe connection asks for `host` every `step` s until it
    has seen `want` in `x-origin-decision` `confirm` times in a row; a worker's
    time is the first response carrying the new value."""
    confirm = 3
    seen: dict[int, float] = {}
    failures = [0]
    flapped = [False]
    lock = threading.Lock()

    def run(k: int, probe: Probe) -> None:
        streak, n = 0, 0
        while time.monotonic() - t0 < timeout and streak < confirm:
            n += 1
            try:
                status, decision = get(probe.conn, host, f"/probe/{k}/{n}", header)
            except (OSError, http.client.HTTPException):
                with lock:
                    failures[0] += 1
                probe.conn.close()
                probe.conn = http.client.HTTPConnection("127.0.0.1", probe.conn.port, timeout=300)
                continue
            now = time.monotonic()
            if status != 200:
                with lock:
                    failures[0] += 1
            if decision and want in decision:
                with lock:
                    seen.setdefault(k, now - t0)
                streak += 1
            else:
                if k in seen:
                    flapped[0] = True
                streak = 0
            time.sleep(step)

    threads = [threading.Thread(target=run, args=(k, p)) for k, p in enumerate(probes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    per_worker: dict[str, float] = {}
    for k, p in enumerate(probes):
        if k in seen:
            per_worker[p.worker] = max(per_worker.get(p.worker, 0.0), seen[k])
    visible = max(seen.values()) if len(seen) == len(probes) else None
    return PushResult(-1, 0.0, visible, per_worker, failures[0], flapped[0])


# --- Envoy's log ----------------------------------------------------------------------

LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})\]\[(\d+)\]\[(\w+)\]\[([\w.]+)\] (.*)$")


@dataclass
class LogEvent:
    at: float  # wall time, ms resolution
    thread: str
    level: str
    logger: str
    message: str  # without Envoy's [source:line] prefix


def log_events(text: str) -> list[LogEvent]:
    out = []
    for line in text.splitlines():
        m = LOG_LINE.match(line)
        if m:
            at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
            message = re.sub(r"^\[[^\]]*\] ", "", m.group(5))
            message = message.replace("wasm log origin-policy origin-policy: ", "the filter: ")
            out.append(LogEvent(at, m.group(2), m.group(3), m.group(4), message))
    return out


def refusal_reason(text: str) -> str | None:
    for e in log_events(text):
        if e.level in ("error", "critical", "warning") and REFUSAL.search(e.message):
            return e.message
    return None


def filter_lines(events: list[LogEvent], since_wall: float, main_thread: str | None) -> list[str]:
    """Envoy's lines about the wasm VMs and the filter, and any warning or
    error, as offsets from `since_wall`."""
    lines = []
    for e in events:
        if e.at < since_wall - 0.001:
            continue
        if "no configured limit" in e.message:  # Envoy's advice about connection limits
            continue
        if e.logger == "wasm" or e.level in ("warning", "error", "critical"):
            who = "main" if e.thread == main_thread else f"worker thread {e.thread}"
            lines.append(f"+{(e.at - since_wall) * 1000:6.0f} ms [{who}] {e.message[:200]}")
    return lines


def main_thread_marks(events: list[LogEvent], since_wall: float, main_thread: str | None):
    """After a rename: when the main thread started a VM for the new
    configuration (the file is read and parsed by then) and when the first VM
    had applied it (the filter's `origin policies loaded`), in s from the rename."""
    clone = loaded = None
    for e in events:
        if e.at < since_wall - 0.001:
            continue
        if clone is None and e.thread == main_thread and "Wasm created" in e.message:
            clone = e.at - since_wall
        if loaded is None and "origin policies loaded" in e.message:
            loaded = e.at - since_wall
    return clone, loaded


# --- one size -------------------------------------------------------------------------


@dataclass
class SizeResult:
    domains: int
    config_bytes: int = 0
    load_s: float | None = None
    refused: str | None = None
    rss_load: float = 0.0
    rss_pushes: float = 0.0
    hwm: float = 0.0
    pushes: list[PushResult] = field(default_factory=list)
    baseline_max: float = 0.0
    baseline_requests: int = 0
    push_max: float = 0.0
    push_requests: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    total_requests: int = 0
    probe_failures: int = 0
    notes: list[str] = field(default_factory=list)
    load_log: list[str] = field(default_factory=list)
    push_logs: list[list[str]] = field(default_factory=list)
    envoy_cpu_load: float = 0.0
    envoy_cpu_pushes: float = 0.0
    client_spread: str = ""


def after_refusal(res: SizeResult, envoy, log_path: Path, port: int, host: str) -> None:
    """What Envoy does once it has refused the configuration: its own verdict
    on the update, its RSS, and what a viewer then gets."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and envoy.poll() is None:
        if "starting main dispatch loop" in log_path.read_text(errors="replace"):
            break
        time.sleep(0.2)
    for e in log_events(log_path.read_text(errors="replace")):
        if e.logger == "config" and e.level in ("warning", "error") and "rejected" in e.message:
            res.notes.append(f"Envoy: {e.message}")
    if envoy.poll() is not None:
        res.notes.append(f"Envoy exited with {envoy.returncode}")
        return
    res.rss_load = rss_mib(envoy.pid)
    res.hwm = rss_mib(envoy.pid, "VmHWM")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/after-refusal", headers={"Host": host})
        r = conn.getresponse()
        body = r.read()[:80].decode(errors="replace").strip()
        conn.close()
        res.notes.append(
            f"then a request for {host} gets {r.status} {r.reason} ({body!r}), "
            f"{DECISION} {'present' if r.getheader(DECISION) else 'absent'}"
        )
    except (OSError, http.client.HTTPException) as e:
        res.notes.append(f"then a request for {host} fails: {type(e).__name__}: {e}")


def run_size(n: int, args, wasm: Path) -> SizeResult:
    res = SizeResult(n)
    run = Path(tempfile.mkdtemp(prefix=f"origin-policy-scale-{n}-"))
    envoy = origin = client = None
    stop = None
    try:
        admin_port, viewer_port, origin_port = free_ports(3)
        origin = subprocess.Popen(
            [sys.executable, __file__, "--serve-origin", str(origin_port)], preexec_fn=die_with_parent
        )
        print(f"[{n:,}] generating the configuration", file=sys.stderr)
        policies = [policy(i, origin_port) for i in range(n)]
        config = plugin_config(policies)
        res.config_bytes = len(config)
        (run / "ecds").mkdir()
        write_then_rename(run, ecds_resource(config, wasm))
        del config
        (run / "envoy.json").write_text(json.dumps(bootstrap(run, admin_port, viewer_port, origin_port)))
        log_path = run / "envoy.log"
        wait_for_port(origin_port)

        print(f"[{n:,}] starting Envoy ({res.config_bytes / MIB:.1f} MiB of configuration)", file=sys.stderr)
        start_wall, start = time.time(), time.monotonic()
        envoy = subprocess.Popen(
            [
                str(ENVOY), "-c", str(run / "envoy.json"), "--disable-hot-restart",
                "--concurrency", "2", "--log-level", "info",
                "--component-log-level", args.component_log_level,
            ],
            cwd=run,
            stdout=open(log_path, "wb"),
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        admin = Admin(admin_port)
        last = host_for(n - 1)
        while True:
            if envoy.poll() is not None:
                res.refused = f"Envoy exited with {envoy.returncode}: " + (
                    refusal_reason(log_path.read_text(errors="replace")) or "see its log"
                )
                break
            reason = refusal_reason(log_path.read_text(errors="replace"))
            if reason:
                res.refused = reason
                break
            if time.monotonic() - start > args.load_timeout:
                res.refused = f"not loaded after {args.load_timeout:.0f} s"
                break
            try:
                conn = http.client.HTTPConnection("127.0.0.1", viewer_port, timeout=args.load_timeout)
                status, decision = get(conn, last, "/load")
                conn.close()
                if status == 200 and decision:
                    res.load_s = time.monotonic() - start
                    break
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.05)
        events = log_events(log_path.read_text(errors="replace"))
        main_thread = events[0].thread if events else None
        res.load_log = filter_lines(events, start_wall, main_thread)
        if res.refused:
            res.refused = f"refused after {time.monotonic() - start:.1f} s: {res.refused}"
            print(f"[{n:,}] {res.refused}", file=sys.stderr)
            after_refusal(res, envoy, log_path, viewer_port, host_for(n - 1))
            return res
        res.envoy_cpu_load = cpu_seconds(envoy.pid)
        # Every worker has configured its VM by the time it routes a request,
        # but let deferred work (the main thread's, freed memory) finish.
        time.sleep(args.settle)
        res.rss_load = rss_mib(envoy.pid)
        print(f"[{n:,}] loaded in {res.load_s:.2f} s, RSS {res.rss_load:.0f} MiB", file=sys.stderr)

        # Which domains: the client's spread over the set, the pushed ones apart.
        pushed, steady = spread(n, args.pushes)
        probes = open_probes(viewer_port, admin, host_for(pushed[0]), args.probes_per_worker, 2)

        ctx = multiprocessing.get_context("spawn")
        stop, out = ctx.Event(), ctx.Queue()
        client = ctx.Process(
            target=steady_client,
            args=(viewer_port, [host_for(i) for i in steady], args.client_threads,
                  args.client_interval_ms / 1000, stop, out),
            daemon=True,
        )
        client.start()
        time.sleep(1.0)  # the client's connections are open and warm
        active = admin.stats(rf"listener\.127\.0\.0\.1_{viewer_port}\.worker_\d+\.downstream_cx_active")
        res.client_spread = ", ".join(
            f"{w} {v - args.probes_per_worker}"
            for w, v in sorted((re.search(r"worker_\d+", k).group(0), v) for k, v in active.items())
        )
        baseline_start = time.monotonic()
        time.sleep(args.baseline)
        pushes_start = time.monotonic()
        cpu_before = cpu_seconds(envoy.pid)
        for p, i in enumerate(pushed):
            version = p + 1
            policies[i] = policy(i, origin_port, version)
            text = ecds_resource(plugin_config(policies), wasm)
            log_offset = log_path.stat().st_size
            renamed_wall, t0 = write_then_rename(run, text)
            del text
            r = watch_push(probes, host_for(i), f"host={origin_host(i, version)}", t0,
                           args.push_timeout, args.probe_interval_ms / 1000)
            r.domain_index, r.renamed_wall = i, renamed_wall
            res.pushes.append(r)
            res.probe_failures += r.probe_failures
            time.sleep(args.push_gap)
            r.rss_after = rss_mib(envoy.pid)
            with open(log_path, "rb") as f:
                f.seek(log_offset)
                push_text = f.read().decode(errors="replace")
            events = log_events(push_text)
            res.push_logs.append(filter_lines(events, renamed_wall, main_thread))
            r.main_vm_s, r.main_loaded_s = main_thread_marks(events, renamed_wall, main_thread)
            shown = f"{r.visible_s * 1000:.0f} ms" if r.visible_s is not None else "not visible"
            print(f"[{n:,}] push {p + 1}/{args.pushes} ({domain(i)}): visible after {shown} "
                  f"({', '.join(f'{w} {s * 1000:.0f} ms' for w, s in sorted(r.per_worker_s.items()))})",
                  file=sys.stderr)
            reason = refusal_reason(push_text)
            if reason:
                res.notes.append(f"push {p + 1}: {reason}")
        pushes_end = time.monotonic()
        res.envoy_cpu_pushes = cpu_seconds(envoy.pid) - cpu_before
        stop.set()
        records = out.get(timeout=120)
        client.join(timeout=30)
        time.sleep(max(0.0, args.settle - args.push_gap))
        res.rss_pushes = rss_mib(envoy.pid)
        res.hwm = rss_mib(envoy.pid, "VmHWM")
        for start_t, latency, outcome in records:
            if start_t >= baseline_start:
                res.total_requests += 1
                if outcome != "ok":
                    res.failed[outcome] = res.failed.get(outcome, 0) + 1
            if baseline_start <= start_t and start_t + latency < pushes_start:
                res.baseline_max = max(res.baseline_max, latency)
                res.baseline_requests += 1
            elif start_t < pushes_end and start_t + latency >= pushes_start:
                res.push_max = max(res.push_max, latency)
                res.push_requests += 1
        return res
    finally:
        if stop is not None:
            stop.set()
        if client is not None and client.is_alive():
            # Interrupted: the client cannot exit before its records are read
            # off the queue; it is not worth waiting for.
            client.terminate()
            client.join(timeout=5)
        stop_process(envoy, "Envoy")
        stop_process(origin, "the origin")
        if args.keep:
            print(f"[{n:,}] kept {run}", file=sys.stderr)
        else:
            shutil.rmtree(run, ignore_errors=True)


# --- report ---------------------------------------------------------------------------


def ms(s: float) -> str:
    return f"{s * 1000:,.0f} ms" if s < 10 else f"{s:,.1f} s"


def row(r: SizeResult, pushes: int) -> str:
    if r.refused:
        rss = f"{r.rss_load:,.0f} MiB, peak {r.hwm:,.0f} (not loaded)" if r.rss_load else "—"
        return f"| {r.domains:,} | {r.refused} | {rss} | — | — | — | — |"
    visible = [p.visible_s for p in r.pushes if p.visible_s is not None]
    missing = len(r.pushes) - len(visible)
    vis = f"{ms(min(visible))} - {ms(max(visible))}" if visible else "—"
    if missing:
        vis += f" ({missing} never visible)"
    failed = sum(r.failed.values())
    failed_text = f"{failed:,} of {r.total_requests:,}"
    if r.failed:
        failed_text += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(r.failed.items())) + ")"
    if r.probe_failures:
        failed_text += f"; {r.probe_failures} probe failures"
    return (
        f"| {r.domains:,} | {ms(r.load_s)} | {r.rss_load:,.0f} MiB | {r.rss_pushes:,.0f} MiB "
        f"(peak {r.hwm:,.0f}) | {vis} | {ms(r.push_max)} ({ms(r.baseline_max)}) | {failed_text} |"
    )


def machine() -> str:
    mem = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) / MIB
    return (
        f"{os.cpu_count()} × {cpu_model()}, {mem:.0f} GiB, Linux {platform.release()}, "
        f"Envoy {envoy_version(ENVOY)} (v8), Python {platform.python_version()}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", default="1000,100000,1000000",
                        help="comma-separated sizes (default: 1000,100000,1000000)")
    parser.add_argument("--pushes", type=int, default=8, help="one-domain pushes per size")
    parser.add_argument("--baseline", type=float, default=5.0,
                        help="seconds of steady load before the first push")
    parser.add_argument("--push-gap", type=float, default=1.0,
                        help="seconds between a push being visible and the next one")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds before RSS is read after the load and after the pushes")
    parser.add_argument("--client-threads", type=int, default=4)
    parser.add_argument("--client-interval-ms", type=float, default=5.0,
                        help="pause between a client connection's requests")
    parser.add_argument("--probes-per-worker", type=int, default=2)
    parser.add_argument("--probe-interval-ms", type=float, default=2.0)
    parser.add_argument("--load-timeout", type=float, default=600.0)
    parser.add_argument("--push-timeout", type=float, default=120.0)
    parser.add_argument("--component-log-level", default="wasm:debug",
                        help="Envoy --component-log-level (the log timeline comes from it)")
    parser.add_argument("--wasm", type=Path, default=WASM)
    parser.add_argument("--keep", action="store_true", help="keep each size's run directory")
    parser.add_argument("--delivery", choices=("feed", "inline"), default="feed",
                        help="feed: per-domain delivery (bench/delivery_bench.py); inline: one document")
    parser.add_argument("--serve-origin", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_origin:
        serve_origin(args.serve_origin)
        return 0
    if args.delivery == "feed":
        delivery = Path(__file__).resolve().parent / "delivery_bench.py"
        # The options given on the command line; the rest keep that benchmark's defaults.
        shared = ["domains", "pushes", "baseline", "push_gap", "settle", "probes_per_worker",
                  "load_timeout", "wasm"]
        given = [(name, getattr(args, name)) for name in shared
                 if getattr(args, name) != parser.get_default(name)]
        forwarded = [x for name, value in given for x in (f"--{name.replace('_', '-')}", str(value))]
        os.execv(sys.executable, [sys.executable, str(delivery), *forwarded])
    sizes = [int(s.replace("_", "").replace(",", "")) for s in args.domains.split(",") if s]
    if not ENVOY.exists():
        raise SystemExit(f"{ENVOY} not found: run WITH_ENVOY=1 scripts/setup")
    if not args.wasm.exists():
        raise SystemExit(f"{args.wasm} not found: cargo build --release --target wasm32-wasip1 -p origin-policy-filter")
    def on_sigterm(*_):
        raise KeyboardInterrupt

    # Ctrl-C and SIGTERM unwind through every `finally` (even when started
    # from a shell that ignores SIGINT in background jobs).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, on_sigterm)

    # A private copy: the build in target/ may be replaced during the run.
    keep_wasm = Path(tempfile.mkdtemp(prefix="origin-policy-scale-wasm-"))
    wasm = keep_wasm / "origin_policy.wasm"
    shutil.copy(args.wasm, wasm)
    wasm_bytes = wasm.stat().st_size
    load_avg = os.getloadavg()
    digest = hashlib.sha256(wasm.read_bytes()).hexdigest()[:12]
    results: list[SizeResult] = []
    try:
        for n in sizes:
            try:
                results.append(run_size(n, args, wasm))
            except Exception as e:  # one size's failure is reported, the rest still run
                print(f"[{n:,}] failed: {type(e).__name__}: {e}", file=sys.stderr)
                results.append(SizeResult(n, refused=f"benchmark error: {type(e).__name__}: {e}"))
    except KeyboardInterrupt:
        print("interrupted: Envoy and the origin are stopped", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(keep_wasm, ignore_errors=True)

    k = args.pushes
    end_avg = os.getloadavg()
    print(
        f"Machine: {machine()}. Load average (1 min) {load_avg[0]:.2f} at the start, "
        f"{end_avg[0]:.2f} at the end (other work shares the machine)."
    )
    print(
        f"Envoy --concurrency 2, not pinned, the filter ({args.wasm}, {wasm_bytes:,} bytes, "
        f"sha256 {digest}…) "
        f"through ECDS from a watched file, written by write-then-rename; one static cluster, an "
        f"HTTP origin (Python, threaded, keep-alive) answering 200 at once; all on 127.0.0.1. "
        f"Policies as bench/synthetic's names (exact and wildcard alternate), each plain HTTP "
        f"to that cluster with a custom origin Host; one push rewrites the whole configuration "
        f"with ONE domain's `origin_host` changed. Steady client: {args.client_threads} keep-alive "
        f"connections, a request then a {args.client_interval_ms:g} ms pause each, on 64 other "
        f"domains, in its own process; {args.baseline:g} s baseline before the pushes, "
        f"{args.push_gap:g} s between a push being visible and the next. Visible = every probe "
        f"connection ({args.probes_per_worker} held open on each worker, one request every "
        f"{args.probe_interval_ms:g} ms) has the new value, 3 responses in a row."
    )
    print()
    print(
        f"| domains | load time | RSS after load | RSS after {k} pushes | push visible after (min-max) "
        f"| longest request during pushes (baseline) | failed requests |"
    )
    print("|---:|---|---:|---:|---|---|---|")
    for r in results:
        print(row(r, k))
    print()
    for r in results:
        print(f"**{r.domains:,} domains** ({r.config_bytes / MIB:,.1f} MiB plugin configuration)")
        print()
        if r.refused:
            print(f"- refused: {r.refused}")
        else:
            print(
                f"- Envoy CPU: {r.envoy_cpu_load:.1f} s to load, {r.envoy_cpu_pushes:.1f} s for "
                f"{len(r.pushes)} pushes ({r.envoy_cpu_pushes / max(1, len(r.pushes)):.2f} s each); "
                f"client requests: {r.baseline_requests:,} in the baseline, "
                f"{r.push_requests:,} during the pushes; client connections per worker: "
                f"{r.client_spread}"
            )
            print(
                "- Envoy's RSS after each push (MiB): "
                + ", ".join(f"{p.rss_after:,.0f}" for p in r.pushes)
            )
            print()
            print(
                "  | push | domain | main thread starts a VM for it | first VM (main) applied it "
                "| worker_0 routes with it | worker_1 routes with it |"
            )
            print("  |---:|---|---:|---:|---:|---:|")
            opt = lambda v: ms(v) if v is not None else "—"  # noqa: E731
            for k, p in enumerate(r.pushes, 1):
                w = p.per_worker_s
                print(
                    f"  | {k} | {domain(p.domain_index)} | {opt(p.main_vm_s)} | "
                    f"{opt(p.main_loaded_s)} | {opt(w.get('worker_0'))} | {opt(w.get('worker_1'))}"
                    f"{' (flapped)' if p.flapped else ''} |"
                )
            print()
        for note in r.notes:
            print(f"- {note}")
        if r.load_log:
            print("- Envoy's log from its start (filter lines):")
            print()
            print("```")
            print("\n".join(r.load_log[:40]))
            print("```")
        if r.push_logs:
            print(f"- Envoy's log for push {len(r.push_logs)} (from the rename):")
            print()
            print("```")
            print("\n".join(r.push_logs[-1][:40]))
            print("```")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
