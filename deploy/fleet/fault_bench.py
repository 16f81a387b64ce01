"""Each fault of deploy/e2e/test_replicas.py once, on the same fleet (three
etcd members, two replicas, Envoys on addresses of their own, a steady
client on every Envoy, three concurrent writers; every replica's HTTP and
ADS listeners mTLS and etcd TLS with client-cert-auth, `--plaintext` for
none), and a markdown table: per
fault, the viewer requests served and failed, the time from the push to the
change on every Envoy (and until the write was acknowledged), the time
from the fault until every Envoy moved off the faulty
replica (its health checks failed it in the ADS and the feed cluster, its
ADS stream is on the other replica), the writes acknowledged and lost.

Run (root, for iptables; under the end-to-end lock, as it uses the same
addresses): flock /tmp/e2e.lock .venv/bin/python deploy/fleet/fault_bench.py
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from cluster import ETCD, FaultRun, Faults, ReplicatedFleet, require_fault_tools, run_scenario, scenarios  # noqa: E402
from edge import EdgeError, cpu_model, envoy_version  # noqa: E402
from origins import DEMO_ORIGINS, Certificates, DemoOrigins  # noqa: E402


def table(runs: list[FaultRun]) -> str:
    lines = [
        "| fault | viewer requests served / failed | push acknowledged | push → visible on every Envoy | "
        "every Envoy off the faulty replica | writes acknowledged / lost |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        moved = "–" if r.moved_off_s is None else f"{r.moved_off_s:.2f} s"
        lines.append(f"| {r.name} | {r.served:,} / {len(r.failed)} | {r.push_acked_s:.2f} s | {r.push_visible_s:.2f} s "
                     f"| {moved} "
                     f"| {r.acked:,} / {len(r.lost)} |")
    return "\n".join(lines)


def etcd_version() -> str:
    out = subprocess.run([str(ETCD), "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0].split(":", 1)[1].strip() if out else "?"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--envoys", type=int, default=3)
    p.add_argument("--only", help="comma-separated fault names (default: every fault)")
    p.add_argument("--plaintext", action="store_true",
                   help="the replicas' listeners and etcd in the clear (default: mTLS, as test_replicas.py runs)")
    args = p.parse_args()
    tls = not args.plaintext
    try:
        require_fault_tools()
    except EdgeError as e:
        print(e, file=sys.stderr)
        return 1
    Faults.remove_leftovers()
    runs: list[FaultRun] = []
    with tempfile.TemporaryDirectory(prefix="fault-bench-") as tmp:
        run = Path(tmp)
        certs = Certificates(run / "certs")
        with DemoOrigins(DEMO_ORIGINS, certs):
            fleet = ReplicatedFleet(run, certs, envoys=args.envoys, tls=tls)
            try:
                started = time.monotonic()
                fleet.start()
                print(f"fleet up in {time.monotonic() - started:.1f} s", file=sys.stderr)
                chosen = scenarios(fleet)
                names = args.only.split(",") if args.only else list(chosen)
                for name in names:
                    print(f"{name} ...", file=sys.stderr)
                    runs.append(run_scenario(fleet, chosen[name]))
                rows = fleet.load.records()
                span = rows[-1][0] - rows[0][0] if len(rows) > 1 else 0.0
                rate = len(rows) / span / args.envoys if span else 0.0
            finally:
                fleet.stop()
                Faults.remove_leftovers()
    print(f"{platform.node()}: {cpu_model()}, {os.cpu_count()} cores, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end; "
          f"Envoy {envoy_version()}, etcd {etcd_version()}, the CLI's debug build; "
          f"{args.envoys} Envoys, a steady client at {rate:.0f} requests/s on each, 2 replicas, "
          f"3 etcd members, 3 writers; the replicas' listeners "
          f"{'mTLS, etcd TLS with client-cert-auth' if tls else 'and etcd in the clear'}\n")
    print(table(runs))
    bad = [r.name for r in runs if r.failed or r.lost]
    if bad:
        print(f"\nfailed requests or lost writes in: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
