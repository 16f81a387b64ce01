"""`origin-policy serve` in front of a real Envoy: a policy written through
the per-domain API is what Envoy serves; a stale write, a removal and a
rollback too; and `kill -9` of the server under a write load loses no
write it acknowledged.

Its own Envoy (admin :9941, viewer :10380) and server (:18095), in front of
the demo origin `plain` (127.0.0.1:18081), which answers with the Host it saw.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import Response, allow_test_origins
from edge import CLI, WASM, Envoy, feed_edge_config

API_PORT = 18095
ADMIN_PORT = 9941
VIEWER_PORT = 10380
ORIGIN_PORT = 18081  # the demo origin `plain`
LIMIT_S = 30


def policy(domain: str, host: str) -> dict:
    return {
        "domain": domain,
        "primary": {"address": "127.0.0.1", "port": ORIGIN_PORT},
        "origin_host": {"mode": "custom", "value": host},
    }


def api(method: str, path: str, body: dict | None = None, headers: dict | None = None):
    """One API call: (status, headers, JSON body or None)."""
    conn = http.client.HTTPConnection("127.0.0.1", API_PORT, timeout=30)
    try:
        data = json.dumps(body) if body is not None else None
        conn.request(method, path, body=data, headers=headers or {})
        r = conn.getresponse()
        text = r.read()
        try:
            parsed = json.loads(text) if text else None
        except ValueError:
            parsed = None
        return r.status, {k.lower(): v for k, v in r.getheaders()}, parsed
    finally:
        conn.close()


def wait_for(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.05)


class ServedEdge:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.log = run_dir / "serve.log"
        self.server: subprocess.Popen | None = None
        settings = allow_test_origins({
            "decision_header": True,
            "unknown_domain": {"action": "local_reply", "status": 404},
            "origin_networks": {
                "edge": [{"network": "127.0.0.0/8", "ports": [ADMIN_PORT, VIEWER_PORT, API_PORT]}]
            },
        })  # fmt: skip
        self.settings = run_dir / "settings.json"
        self.settings.write_text(json.dumps(settings))
        config = feed_edge_config(API_PORT, ADMIN_PORT, VIEWER_PORT)
        self.envoy = Envoy(run_dir, config, admin=f"http://127.0.0.1:{ADMIN_PORT}")

    def start_server(self) -> None:
        self.server = subprocess.Popen(
            [str(CLI), "serve", "--wasm", str(WASM), "--out", str(self.run_dir),
             "--admin", f"127.0.0.1:{ADMIN_PORT}", "--listen", f"127.0.0.1:{API_PORT}",
             "--store", str(self.run_dir / "store"), "--settings", str(self.settings)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "ab"),
        )  # fmt: skip
        wait_for(self.answers, LIMIT_S)

    def answers(self) -> bool:
        try:
            return api("GET", "/status")[0] == 200
        except OSError:
            return False

    def stop_server(self, sig: int = signal.SIGTERM) -> None:
        if self.server and self.server.poll() is None:
            self.server.send_signal(sig)
            self.server.wait(timeout=10)

    def get(self, host: str) -> Response:
        conn = http.client.HTTPConnection("127.0.0.1", VIEWER_PORT, timeout=20)
        try:
            conn.request("GET", f"/{uuid.uuid4().hex}", headers={"host": host})
            r = conn.getresponse()
            return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        finally:
            conn.close()

    def host_served(self, domain: str) -> str | None:
        """The Host the edge's decision names for `domain`, None if not served."""
        r = self.get(domain)
        found = re.search(r"host=([^;]+)", r.header("x-origin-decision") or "")
        return found.group(1) if r.status == 200 and found else None


@pytest.fixture(scope="module")
def served(tmp_path_factory, demo_origins):
    edge = ServedEdge(tmp_path_factory.mktemp("served-edge"))
    edge.start_server()
    try:
        edge.envoy.start()
        yield edge
    finally:
        edge.envoy.stop()
        edge.stop_server()


def test_a_put_is_what_envoy_serves_and_a_stale_write_changes_nothing(served: ServedEdge):
    d = "api-one.served.test"
    status, headers, body = api("PUT", f"/v1/domains/{d}", policy(d, "v1.served.test"))
    assert status == 201, body
    assert headers["etag"] == '"1"'
    wait_for(lambda: served.host_served(d) == "v1.served.test", LIMIT_S)

    status, headers, _ = api("PUT", f"/v1/domains/{d}", policy(d, "v2.served.test"), {"If-Match": '"1"'})
    assert (status, headers["etag"]) == (200, '"2"')
    wait_for(lambda: served.host_served(d) == "v2.served.test", LIMIT_S)

    # A writer still holding revision 1: refused, and the edge keeps revision 2.
    status, _, body = api("PUT", f"/v1/domains/{d}", policy(d, "lost.served.test"), {"If-Match": '"1"'})
    assert (status, body["current_revision"]) == (412, 2)
    # A policy aimed at the edge's own admin port: refused with the pointer.
    bad = {"domain": d, "primary": {"address": "127.0.0.1", "port": ADMIN_PORT}}
    status, _, body = api("PUT", f"/v1/domains/{d}", bad)
    assert status == 422 and body["findings"][0]["path"] == "/primary/address", body
    time.sleep(0.5)
    assert served.host_served(d) == "v2.served.test"

    status, _, body = api("POST", f"/v1/domains/{d}/rollback", {"revision": 1})
    assert (status, body["revision"]) == (200, 3), body
    wait_for(lambda: served.host_served(d) == "v1.served.test", LIMIT_S)

    status, _, _ = api("DELETE", f"/v1/domains/{d}")
    assert status == 200
    wait_for(lambda: served.get(d).status == 404, LIMIT_S)
    _, _, history = api("GET", f"/v1/domains/{d}/history")
    assert [r["revision"] for r in history["revisions"]] == [4, 3, 2, 1]
    assert history["revisions"][0]["removed"] is True


class Writers:
    """Threads writing policies as fast as the server answers, each to its
    own domains, recording the last value each domain was acknowledged with."""

    def __init__(self, threads: int = 4, domains_each: int = 25):
        self.acked: dict[str, int] = {}
        self.sent: dict[str, int] = {}
        self.errors = 0
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self.run, args=([f"w{t}-{i}.served.test" for i in range(domains_each)],))
            for t in range(threads)
        ]  # fmt: skip

    def run(self, domains: list[str]) -> None:
        n = 0
        while not self.stopping.is_set():
            n += 1
            for d in domains:
                if self.stopping.is_set():
                    return
                with self.lock:
                    self.sent[d] = n
                try:
                    status, _, _ = api("PUT", f"/v1/domains/{d}", policy(d, f"v{n}.served.test"))
                except (OSError, http.client.HTTPException):
                    status = 0
                with self.lock:
                    if status in (200, 201):
                        self.acked[d] = n
                    else:
                        self.errors += 1
                        time.sleep(0.05)

    def __enter__(self) -> "Writers":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join()


def stored_value(d: str) -> int | None:
    status, _, body = api("GET", f"/v1/domains/{d}")
    if status != 200:
        return None
    return int(body["origin_host"]["value"].split(".")[0][1:])


def test_kill_9_under_a_write_load_loses_no_acknowledged_write(served: ServedEdge):
    with Writers() as writers:
        wait_for(lambda: len(writers.acked) >= 100 and min(writers.acked.values()) >= 3, 60)
        # Killed while every writer has a write in flight.
        served.stop_server(signal.SIGKILL)
        time.sleep(0.3)
    assert writers.errors > 0, "the kill interrupted no write: the test proves nothing"
    served.start_server()
    # Every acknowledged write is in the store: the value acknowledged last,
    # or a later one whose answer the kill cut off.
    lost = {}
    for d, acked in writers.acked.items():
        stored = stored_value(d)
        if stored is None or not acked <= stored <= writers.sent[d]:
            lost[d] = (acked, stored)
    assert lost == {}, lost
    # And Envoy serves what the store holds, for every domain.
    for d in writers.acked:
        want = f"v{stored_value(d)}.served.test"
        wait_for(lambda d=d, want=want: served.host_served(d) == want, LIMIT_S)
