"""Soak: the edge (deploy/envoy/edge.yaml, real Envoy) under a steady request
rate for a long time, with a primary origin that flaps (healthy, answering 503,
refusing connections) and policies swapped live every few seconds, including
invalid pushes. A correct CDN serves every request (a failing primary is
failed over to the secondary), so the pass mark is zero failed requests; it
also samples Envoy's resident memory and prints the figures.

Run: scripts/soak [--minutes 10] [--rate 200]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from edge import (  # noqa: E402
    ECDS_FILE,
    POLICIES,
    VIEWER_HTTP_PORT,
    Envoy,
    bundle,
    edge_config,
    prepare_run_dir,
)
from origins import DemoOrigins, OriginSpec  # noqa: E402

PRIMARY_PORT = 18093
SECONDARY_PORT = 18094
PHASES = ("healthy", "503", "refusing")
# The demo origins' echo server; unique paths must not fill the edge's cache,
# as memory is measured.
PRIMARY = OriginSpec("primary", PRIMARY_PORT, cache_control="no-store")
SECONDARY = OriginSpec("secondary", SECONDARY_PORT, cache_control="no-store")

WRK_SCRIPT = """\
local hosts = {"soak.example.com", "steady.example.com"}
local n = 0
request = function()
  n = n + 1
  -- unique paths: every request goes through the filter, none is a cache hit
  return wrk.format("GET", "/soak/" .. n, {["Host"] = hosts[n %% 2 + 1]})
end
function delay() return %f end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %%d, "connect": %%d, "read": %%d, "write": %%d, "timeout": %%d, "non_2xx": %%d, "p50_us": %%d, "p99_us": %%d, "max_us": %%d}\\n',
    summary.requests, e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


class FlappingPrimary:
    """Cycles the primary healthy -> 503 -> refusing connections, `period`
    seconds each."""

    def __init__(self, origins: DemoOrigins, period: float):
        self.origins = origins
        self.period = period
        self.phase = "healthy"
        self.flips = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.wait(self.period):
            i += 1
            self.phase = PHASES[i % len(PHASES)]
            self.flips += 1
            name = PRIMARY.name
            self.origins.force_status(name, 503 if self.phase == "503" else None)
            if self.phase == "refusing":
                self.origins.stop(name)
            elif not self.origins.running(name):
                self.origins.start(name)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def write_policies(directory: Path, version: int) -> None:
    """Two domains: one failing over from the flapping primary, one steady
    whose cache rule changes with every push."""
    directory.mkdir(exist_ok=True)
    settings = json.loads((POLICIES / "settings.json").read_text())
    # The soak's own origins, on loopback beside the demo's.
    settings["origin_networks"]["allow"].append(
        {"network": "127.0.0.1/32", "ports": [PRIMARY_PORT, SECONDARY_PORT]}
    )
    (directory / "settings.json").write_text(json.dumps(settings))
    soak = {
        "domain": "soak.example.com",
        "primary": {"address": "127.0.0.1", "port": PRIMARY_PORT, "response_timeout_ms": 3000},
        "secondary": {"address": "127.0.0.1", "port": SECONDARY_PORT},
        "origin_host": {"mode": "custom", "value": "primary.soak.test"},
        "failover": {"statuses": [500, 502, 503, 504]},
    }
    steady = {
        "domain": "steady.example.com",
        "primary": {"address": "127.0.0.1", "port": SECONDARY_PORT},
        "cache_status_ttl": {"404": version % 600},
    }
    (directory / "soak.example.com.json").write_text(json.dumps(soak))
    (directory / "steady.example.com.json").write_text(json.dumps(steady))


def push_invalid(run: Path) -> None:
    """What `bundle` refuses to write: the last bundle with the steady domain's
    port out of range, straight into the ECDS file Envoy watches."""
    config = json.loads((run / "plugin-config.json").read_text())
    for policy in config["policies"]:
        if policy["domain"] == "steady.example.com":
            policy["primary"]["port"] = 0
    ecds = json.loads((run / ECDS_FILE).read_text())
    ecds["resources"][0]["typed_config"]["config"]["configuration"]["value"] = json.dumps(config)
    tmp = run / f".{ECDS_FILE}.tmp"
    tmp.write_text(json.dumps(ecds))
    os.rename(tmp, run / ECDS_FILE)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second, about")
    parser.add_argument("--flap-seconds", type=float, default=15.0)
    parser.add_argument("--swap-seconds", type=float, default=20.0)
    parser.add_argument(
        "--without-cache-tier",
        action="store_true",
        help="drop the cache filter from the viewer listener, to see the memory of the rest alone",
    )
    args = parser.parse_args()
    seconds = int(args.minutes * 60)
    connections = 4
    delay_ms = connections / args.rate * 1000

    run = Path(tempfile.mkdtemp(prefix="origin-policy-soak-"))
    prepare_run_dir(run)
    policies = run / "policies"
    write_policies(policies, 0)
    bundle(run, [policies])
    config = edge_config()
    if args.without_cache_tier:
        for listener in config["static_resources"]["listeners"]:
            if listener["name"] == "viewer_http":
                hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
                hcm["http_filters"] = [f for f in hcm["http_filters"] if "cache" not in f["name"]]
    envoy = Envoy(run, config)
    # Not kept: the soak's requests would only fill this process's memory.
    origins = DemoOrigins([PRIMARY, SECONDARY], None, keep_log=False).__enter__()
    primary = FlappingPrimary(origins, args.flap_seconds)
    script = run / "soak.lua"
    script.write_text(WRK_SCRIPT % delay_ms)
    swaps = invalid_pushes = 0
    memory: list[tuple[float, int]] = []
    try:
        envoy.start()
        load = subprocess.Popen(
            ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), f"http://127.0.0.1:{VIEWER_HTTP_PORT}/"],
            stdout=subprocess.PIPE,
            text=True,
        )
        started = time.monotonic()
        next_swap = started + args.swap_seconds
        next_sample = started
        while load.poll() is None:
            time.sleep(0.5)
            now = time.monotonic()
            if now >= next_sample:
                memory.append((now - started, rss_kib(envoy.process.pid)))
                next_sample += 10
            if now >= next_swap:
                swaps += 1
                # Every fourth push is invalid: the domain must keep its last good policy.
                if swaps % 4 == 0:
                    invalid_pushes += 1
                    push_invalid(run)
                else:
                    write_policies(policies, swaps)
                    bundle(run, [policies], admin=envoy.admin)
                next_swap = now + args.swap_seconds
            if envoy.process.poll() is not None:
                raise SystemExit(f"Envoy exited during the soak:\n{envoy.log_tail()}")
        report = json.loads(load.stdout.read().strip().splitlines()[-1])
        stats = envoy.stats()
    finally:
        envoy.stop()
        primary.stop()
        origins.stop()

    failed = sum(report[k] for k in ("connect", "read", "write", "timeout", "non_2xx"))
    warm = [kib for t, kib in memory if t >= 60] or [kib for _, kib in memory]
    first, last, peak = warm[0], warm[-1], max(warm)
    stat = lambda name: stats.get(f"wasmcustom.origin_policy.{name}", 0)  # noqa: E731
    tier = "without the cache tier" if args.without_cache_tier else "edge.yaml as shipped (cache tier included)"
    print(f"soak: {seconds} s at about {args.rate:g} req/s, {tier}, primary flapping every {args.flap_seconds:g} s "
          f"({primary.flips} flips), {swaps} policy pushes ({invalid_pushes} invalid)")
    print()
    print("| figure | value |")
    print("|---|---:|")
    print(f"| requests | {report['requests']:,} |")
    print(f"| failed (socket errors + non-2xx) | {failed} |")
    print(f"| latency p50 / p99 / max | {report['p50_us'] / 1000:.1f} / {report['p99_us'] / 1000:.1f} / {report['max_us'] / 1000:.1f} ms |")
    print(f"| failovers started / succeeded | {stat('failover.started'):,} / {stat('failover.succeeded'):,} |")
    print(f"| origin unreachable (refused) | {stat('origin_unreachable'):,} |")
    print(f"| configurations applied / policies rejected | {stat('config.applied')} / {stat('policy.rejected')} |")
    print(f"| Envoy RSS after 1 min / at end / peak | {first / 1024:.1f} / {last / 1024:.1f} / {peak / 1024:.1f} MiB |")
    print(f"| Envoy RSS median after 1 min | {statistics.median(warm) / 1024:.1f} MiB |")
    by_minute = " ".join(f"{kib / 1024:.0f}" for t, kib in memory if int(t) % 60 < 10)
    print(f"\nEnvoy RSS each minute (MiB): {by_minute}")
    shutil.rmtree(run, ignore_errors=True)
    if failed:
        print(f"FAILED: {failed} requests were not served", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
