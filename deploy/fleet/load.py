"""Steady load on several Envoys, every request recorded (a process of its own,
so that its timing shares no GIL with whoever watches the fleet).

One keep-alive connection per Envoy port, cycling through the hosts, each
request on a unique path (the edge's cache never answers it), then a pause.
Every request is appended to OUT as a JSON line
`[wall time, port, host, status, decision host]`, where status is -1 for a
connection or protocol error (then reconnected) and the decision host is the
`host=` of `x-origin-decision`. Runs until SIGTERM or --seconds.

A port may be given as ADDRESS:PORT (an Envoy on an address of its own);
its records then name it so. A bare port is on 127.0.0.1.

Run: python deploy/fleet/load.py --ports 12110,12120 --hosts a.example,b.example --out FILE
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


def decision_host(decision: str | None) -> str | None:
    for part in (decision or "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == "host":
            return value
    return None


class Records:
    def __init__(self, out: Path):
        self.out = out
        self.pending: list[list] = []
        self.lock = threading.Lock()

    def add(self, record: list) -> None:
        with self.lock:
            self.pending.append(record)

    def flush(self) -> None:
        with self.lock:
            batch, self.pending = self.pending, []
        if batch:
            with open(self.out, "a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in batch))


def target(entry: str) -> tuple[str, int, int | str]:
    """`PORT` or `ADDRESS:PORT`: the address, the port, and how records name it."""
    address, _, port = entry.rpartition(":")
    return (address or "127.0.0.1"), int(port), (entry if address else int(port))


def drive(entry: str, hosts: list[str], interval: float, records: Records, stop: threading.Event) -> None:
    address, port, name = target(entry)
    conn = http.client.HTTPConnection(address, port, timeout=10)
    n = 0
    while not stop.is_set():
        host = hosts[n % len(hosts)]
        n += 1
        try:
            conn.request("GET", f"/load/{port}/{n}", headers={"host": host})
            r = conn.getresponse()
            r.read()
            records.add([time.time(), name, host, r.status, decision_host(r.getheader("x-origin-decision"))])
        except (OSError, http.client.HTTPException) as e:
            records.add([time.time(), name, host, -1, type(e).__name__])
            conn.close()
            conn = http.client.HTTPConnection(address, port, timeout=10)
        stop.wait(interval)
    conn.close()


class LoadProcess:
    """This script run as a process against `targets` (`PORT` or
    `ADDRESS:PORT`); its records read back at any time."""

    def __init__(self, out: Path, targets: list[str], hosts: list[str], seconds: float, interval: float):
        self.out = out
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--ports", ",".join(targets), "--hosts", ",".join(hosts),
             "--out", str(out), "--seconds", str(seconds), "--interval", str(interval)]
        )

    def records(self, start: float = 0.0, end: float = float("inf")) -> list[list]:
        if not self.out.exists():
            return []
        complete = self.out.read_text().split("\n")[:-1]  # the last line may be partial
        rows = [json.loads(line) for line in complete if line]
        return [r for r in rows if start <= r[0] < end]

    @staticmethod
    def failed(rows: list[list]) -> list[list]:
        return [r for r in rows if not 200 <= r[3] < 300]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ports", required=True)
    p.add_argument("--hosts", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--interval", type=float, default=0.02, help="pause after each request, s")
    p.add_argument("--seconds", type=float, default=600, help="stop by itself after this")
    args = p.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    records = Records(args.out)
    hosts = args.hosts.split(",")
    threads = [threading.Thread(target=drive, args=(entry, hosts, args.interval, records, stop))
               for entry in args.ports.split(",")]
    for t in threads:
        t.start()
    deadline = time.monotonic() + args.seconds
    while not stop.wait(0.2) and time.monotonic() < deadline:
        records.flush()
    stop.set()
    for t in threads:
        t.join()
    records.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
