"""Per-domain delivery (`"delivery": "feed"`) in real Envoy: `origin-policy
feed` serves 100,000 policies from a directory as a change feed, the filter's
feed singleton keeps one shared-data entry per domain, and the filter reads a
request's entry.

Its own Envoy (admin :9931, viewer :10280) and feed (:18091), in front of the
demo origin `plain` (127.0.0.1:18081), which answers with the Host it saw.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from conftest import Response, allow_test_origins
from edge import CLI, WASM, Envoy, feed_edge_config

DOMAINS = 100_000
FEED_PORT = 18091
ADMIN_PORT = 9931
VIEWER_PORT = 10280
ORIGIN_PORT = 18081  # the demo origin `plain`
# The feed re-reads 100,000 files on a change; a debug build takes seconds.
PUSH_LIMIT_S = 60
# The first sync checks 100,000 files one by one (a debug build).
SYNC_LIMIT_S = 240


def domain(i: int) -> str:
    return f"d{i}.feed.test"


def policy(i: int, host: str | None = None, port=ORIGIN_PORT) -> dict:
    doc = {"domain": domain(i), "primary": {"address": "127.0.0.1", "port": port}}
    if host:
        doc["origin_host"] = {"mode": "custom", "value": host}
    return doc


def decided_host(r: Response) -> str | None:
    found = re.search(r"host=([^;]+)", r.header("x-origin-decision") or "")
    return found.group(1) if found else None


class FeedEdge:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.policies = run_dir / "policies"
        self.feed: subprocess.Popen | None = None
        self.feed_log = run_dir / "feed.log"
        config = feed_edge_config(FEED_PORT, ADMIN_PORT, VIEWER_PORT)
        self.envoy = Envoy(run_dir, config, admin=f"http://127.0.0.1:{ADMIN_PORT}")

    def start_feed(self) -> None:
        self.feed = subprocess.Popen(
            [str(CLI), "serve", "--wasm", str(WASM), "--out", str(self.run_dir),
             "--listen", f"127.0.0.1:{FEED_PORT}", "--store", str(self.run_dir / "store"),
             "--watch", str(self.policies)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.feed_log, "ab"),
        )  # fmt: skip

    def stop_feed(self, sig: int = signal.SIGTERM) -> None:
        if self.feed and self.feed.poll() is None:
            self.feed.send_signal(sig)
            self.feed.wait(timeout=10)

    def feed_log_text(self) -> str:
        return self.feed_log.read_text(errors="replace")

    def write(self, i: int, document: dict) -> None:
        path = self.policies / f"{domain(i)}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(document))
        tmp.rename(path)

    def get(self, host: str) -> Response:
        """One request on a new connection (Envoy spreads connections over
        its workers), on a path no cache has seen."""
        conn = http.client.HTTPConnection("127.0.0.1", VIEWER_PORT, timeout=20)
        try:
            conn.request("GET", f"/{uuid.uuid4().hex}", headers={"host": host})
            r = conn.getresponse()
            return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        finally:
            conn.close()

    def counter(self, name: str) -> int:
        return self.envoy.stats().get(f"wasmcustom.origin_policy.feed.{name}", 0)

    def in_sync(self) -> bool:
        """The snapshot is complete: its last domain is served and a domain
        it lacks is unknown (404) rather than not received yet (503), which
        the edge says only once the whole snapshot is in."""
        return (
            self.get(domain(DOMAINS - 1)).status == 200
            and self.get("nowhere.feed.test").status == 404
        )

    def serves(self, i: int, host: str, tries: int = 20) -> bool:
        """`tries` requests on new connections all decided with Host `host`."""
        return all(decided_host(self.get(domain(i))) == host for _ in range(tries))


def wait_for(predicate, timeout: float) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def feed_edge(tmp_path_factory, demo_origins):
    run_dir = tmp_path_factory.mktemp("feed-edge")
    policies = run_dir / "policies"
    policies.mkdir()
    settings = {
        "decision_header": True,
        "unknown_domain": {"action": "local_reply", "status": 404},
        # This edge's own sockets: never an origin.
        "origin_networks": {
            "edge": [{"network": "127.0.0.0/8", "ports": [ADMIN_PORT, VIEWER_PORT, FEED_PORT]}]
        },
    }
    (policies / "settings.json").write_text(json.dumps(allow_test_origins(settings)))
    for i in range(DOMAINS):
        (policies / f"{domain(i)}.json").write_text(json.dumps(policy(i)))
    edge = FeedEdge(run_dir)
    edge.start_feed()
    try:
        wait_for(lambda: (run_dir / "origin-policy.ecds.json").exists(), SYNC_LIMIT_S)
        edge.envoy.start()
        wait_for(edge.in_sync, PUSH_LIMIT_S)
        yield edge
    finally:
        edge.envoy.stop()
        edge.stop_feed()


def test_every_domain_is_served_from_its_entry(feed_edge: FeedEdge):
    for i in (0, 1, 4242, 54321, DOMAINS - 1):
        r = feed_edge.get(domain(i))
        assert r.status == 200, r.body
        assert decided_host(r) == domain(i)
        assert r.json()["host"] == domain(i)
    unknown = feed_edge.get("nowhere.feed.test")
    assert unknown.status == 404
    assert unknown.header("x-origin-error") == "no origin policy for host nowhere.feed.test"
    assert feed_edge.counter("entries_written") >= DOMAINS


def feed_status() -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{FEED_PORT}/status", timeout=5) as r:
        return json.loads(r.read())


def test_the_feed_knows_the_version_each_envoy_applied(feed_edge: FeedEdge):
    # The singleton's poll from version V acknowledges everything up to V.
    wait_for(lambda: feed_status()["nodes"].get("edge", {}).get("version") == feed_status()["version"], 10)
    assert feed_status()["nodes"]["edge"]["refused"] == {}


def test_one_domain_change_reaches_every_worker_and_nothing_else(feed_edge: FeedEdge):
    written = feed_edge.counter("entries_written")
    feed_edge.write(77777, policy(77777, host="v2.feed.test"))
    wait_for(lambda: feed_edge.serves(77777, "v2.feed.test"), PUSH_LIMIT_S)
    r = feed_edge.get(domain(77777))
    assert r.json()["host"] == "v2.feed.test", "the origin did not get the new Host"
    # One entry written for the one change: nothing else was touched.
    assert feed_edge.counter("entries_written") == written + 1
    for i in (0, 77776, 77778, DOMAINS - 1):
        assert feed_edge.serves(i, domain(i), tries=3)


def test_an_invalid_change_keeps_the_last_good_policy(feed_edge: FeedEdge):
    feed_edge.write(12345, policy(12345, host="good.feed.test"))
    wait_for(lambda: feed_edge.serves(12345, "good.feed.test", tries=3), PUSH_LIMIT_S)
    written = feed_edge.counter("entries_written")
    feed_edge.write(12345, policy(12345, host="bad.feed.test", port="x"))
    wait_for(lambda: f"{domain(12345)}: rejected" in feed_edge.feed_log_text(), PUSH_LIMIT_S)
    assert "/primary/port" in feed_edge.feed_log_text()
    assert feed_edge.serves(12345, "good.feed.test")
    assert feed_edge.counter("entries_written") == written


def test_an_origin_on_the_edge_itself_is_refused_by_the_feed(feed_edge: FeedEdge):
    feed_edge.write(12346, policy(12346, host="kept.feed.test"))
    wait_for(lambda: feed_edge.serves(12346, "kept.feed.test", tries=3), PUSH_LIMIT_S)
    feed_edge.write(12346, policy(12346, port=ADMIN_PORT))
    wait_for(lambda: f"{domain(12346)}: rejected" in feed_edge.feed_log_text(), PUSH_LIMIT_S)
    log = feed_edge.feed_log_text()
    assert f"{domain(12346)}: /primary/address: origin `127.0.0.1` on port {ADMIN_PORT}" in log
    assert "127.0.0.1 is the edge itself" in log
    assert feed_edge.serves(12346, "kept.feed.test")


def test_a_removed_domain_is_no_longer_served(feed_edge: FeedEdge):
    (feed_edge.policies / f"{domain(31337)}.json").unlink()
    wait_for(lambda: feed_edge.get(domain(31337)).status == 404, PUSH_LIMIT_S)
    assert feed_edge.serves(31338, domain(31338), tries=3)


class Load:
    """Requests on keep-alive connections until stopped; counts failures."""

    def __init__(self, hosts: list[str], clients: int = 4):
        self.hosts = hosts
        self.ok = 0
        self.failed: list[str] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.run) for _ in range(clients)]

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", VIEWER_PORT, timeout=20)
        n = 0
        while not self.stopping.is_set():
            host = self.hosts[n % len(self.hosts)]
            n += 1
            try:
                conn.request("GET", f"/{uuid.uuid4().hex}", headers={"host": host})
                r = conn.getresponse()
                r.read()
                if r.status == 200 and r.getheader("x-origin-decision"):
                    self.ok += 1
                else:
                    self.failed.append(f"{host}: {r.status} {r.getheader('x-origin-error')}")
            except (OSError, http.client.HTTPException) as e:
                self.failed.append(f"{host}: {e!r}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", VIEWER_PORT, timeout=20)

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join()


def test_source_killed_and_restarted_under_load_fails_nothing(feed_edge: FeedEdge):
    hosts = [domain(i) for i in range(0, DOMAINS, 997)]
    envoy_log = feed_edge.envoy.log_text
    snapshots = envoy_log().count("the source sends every domain")
    with Load(hosts) as load:
        time.sleep(1)
        feed_edge.stop_feed(signal.SIGKILL)
        time.sleep(3)
        feed_edge.start_feed()
        # The restarted source has the same epoch and versions (its store):
        # the edge continues where it was, without a snapshot.
        wait_for(source_heard_the_edge, PUSH_LIMIT_S)
        time.sleep(1)
    assert load.failed == [], load.failed[:5]
    assert load.ok > 100
    assert envoy_log().count("the source sends every domain") == snapshots
    feed_edge.write(424, policy(424, host="after-restart.feed.test"))
    wait_for(lambda: feed_edge.serves(424, "after-restart.feed.test"), PUSH_LIMIT_S)


def test_a_wasm_swap_keeps_every_domain(feed_edge: FeedEdge, tmp_path):
    # Another module: the same code with a custom section appended (id 0,
    # size, name), so Envoy starts new VMs for the filter.
    swapped = tmp_path / "origin_policy_swapped.wasm"
    section = bytes([5]) + b"swap1" + b"x"
    swapped.write_bytes(WASM.read_bytes() + bytes([0, len(section)]) + section)
    ecds_path = feed_edge.run_dir / "origin-policy.ecds.json"
    ecds = json.loads(ecds_path.read_text())
    vm = ecds["resources"][0]["typed_config"]["config"]["vm_config"]
    vm["code"]["local"]["filename"] = str(swapped)
    reloads = "extension_config_discovery.http_filter.origin-policy.config_reload"
    before = feed_edge.envoy.stats().get(reloads, 0)
    tmp = ecds_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(ecds))
    tmp.rename(ecds_path)
    wait_for(lambda: feed_edge.envoy.stats().get(reloads, 0) > before, 30)
    for i in (0, 777, 55555, DOMAINS - 1):
        assert feed_edge.serves(i, domain(i), tries=3)
    feed_edge.write(999, policy(999, host="after-swap.feed.test"))
    wait_for(lambda: feed_edge.serves(999, "after-swap.feed.test"), PUSH_LIMIT_S)


def test_envoy_restarted_while_the_source_is_down_says_why_then_serves(feed_edge: FeedEdge):
    feed_edge.stop_feed()
    feed_edge.envoy.stop()
    feed_edge.envoy.start()
    waiting = feed_edge.get(domain(5))
    assert waiting.status == 503
    why = waiting.header("x-origin-error") or ""
    assert why.startswith("origin policies not received yet: "), why
    wait_for(
        lambda: "the policy source on cluster `origin_policy_feed`"
        in (feed_edge.get(domain(5)).header("x-origin-error") or ""),
        10,
    )
    assert waiting.header("retry-after") == "1"
    feed_edge.start_feed()
    wait_for(lambda: feed_edge.get(domain(5)).status == 200, PUSH_LIMIT_S)
    assert feed_edge.serves(5, domain(5))
    wait_for(feed_edge.in_sync, PUSH_LIMIT_S)
    assert feed_edge.counter("entry_unavailable") >= 1


class RawFeed:
    """A policy source that is only a plain HTTP server speaking the feed, in
    the epoch the edge is in (the edge's own source stopped meanwhile). It
    answers each poll with the next of `pages`, each a dict: `body`, and
    optionally `more`, `reset`, `advance` (default true: the version after
    the one asked for) and `repeat` (answer with it for ever); then 204s. It
    records every poll's query and report headers, one JSON object a line."""

    def __init__(self, feed_edge: FeedEdge, tmp_path: Path, pages: list[dict]):
        self.feed_edge = feed_edge
        self.polls_file = tmp_path / "polls.jsonl"
        self.args = [sys.executable, str(Path(__file__).with_name("raw_feed.py")),
                     str(FEED_PORT), json.dumps(pages), str(self.polls_file)]  # fmt: skip
        self.process: subprocess.Popen | None = None

    def polls(self) -> list[dict]:
        if not self.polls_file.exists():
            return []
        return [json.loads(line) for line in self.polls_file.read_text().splitlines()]

    def __enter__(self) -> "RawFeed":
        self.feed_edge.stop_feed()
        self.process = subprocess.Popen(self.args)
        return self

    def __exit__(self, *_) -> None:
        if self.process:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.feed_edge.start_feed()
        # The edge has polled the real source again (its reports went there).
        wait_for(source_heard_the_edge, PUSH_LIMIT_S)
        wait_for(self.feed_edge.in_sync, PUSH_LIMIT_S)


def source_heard_the_edge() -> bool:
    try:
        status = feed_status()
    except OSError:
        return False
    heard = status["nodes"].get("edge", {})
    return (heard.get("version"), heard.get("epoch")) == (status["version"], status["epoch"])


def test_a_change_reaches_every_worker_that_answers_from_memory_within_a_second(
    feed_edge: FeedEdge, tmp_path
):
    """A worker answers a host it has looked up from memory until the feed
    singleton wakes it (through the worker's own shared queue) after writing
    a change. The limit is one of correctness, with a wide margin: a wake
    takes milliseconds, and a worker that missed one reads the change count
    on its next one-second tick."""
    i = 4242
    # Looked up on every worker (new connections spread over both).
    assert feed_edge.serves(i, domain(i))
    changed = json.dumps(policy(i, host="woken.feed.test"))
    with RawFeed(feed_edge, tmp_path, [{"body": f"{domain(i)}\t{changed}\n"}]) as raw:
        wait_for(lambda: any(p["page_at"] for p in raw.polls()), 30)
        sent = next(p["page_at"] for p in raw.polls() if p["page_at"])
        wait_for(lambda: feed_edge.serves(i, "woken.feed.test"), 10)
        served_after = time.time() - sent
        assert served_after < 1.0, f"served on every worker {served_after:.3f} s after the page"


def test_a_source_that_skips_validation_cannot_break_a_domain(feed_edge: FeedEdge, tmp_path):
    """The singleton validates each policy itself: a source that sends an
    invalid policy leaves the domain on its entry, and a document filed under
    another domain is refused too."""
    good = json.dumps(policy(7, host="raw-good.feed.test"))
    bad = json.dumps(policy(7, port="x"))
    misfiled = json.dumps(policy(8, host="stolen.feed.test"))
    # The edge's admin interface as an origin: refused under the filter's settings.
    admin = json.dumps(policy(10, port=ADMIN_PORT))
    pages = [
        {"body": f"{domain(7)}\t{good}\n"},
        {"body": f"{domain(7)}\t{bad}\n{domain(9)}\t{misfiled}\n{domain(10)}\t{admin}\n"},
    ]
    rejected = feed_edge.counter("policy_rejected")
    with RawFeed(feed_edge, tmp_path, pages) as raw:
        wait_for(lambda: feed_edge.counter("policy_rejected") >= rejected + 3, 30)
        assert feed_edge.serves(7, "raw-good.feed.test")
        assert feed_edge.serves(9, domain(9))
        assert feed_edge.serves(10, domain(10))
        log = feed_edge.envoy.log_text()
        assert "d7.feed.test: /primary/port" in log
        assert "files this policy under `d9.feed.test`, but it is for `d8.feed.test`" in log
        assert f"d10.feed.test: /primary/address: origin `127.0.0.1` on port {ADMIN_PORT}" in log
        # The next poll names the refused domains to the source (per-domain NACK).
        expected = "d7.feed.test,d9.feed.test,d10.feed.test"
        wait_for(lambda: any(p["rejected"] == expected for p in raw.polls()), 10)
        assert {p["node"] for p in raw.polls()} == {"edge"}


def test_a_non_ascii_domain_and_malformed_lines_are_named_back(feed_edge: FeedEdge, tmp_path):
    """Every line the singleton does not take is named to the source: a
    refused domain that is not ASCII (percent-encoded), and the numbers of
    the lines it could not read, which are counted too."""
    raw_utf8 = "bücher2.feed.test"
    document = json.dumps(
        {"domain": raw_utf8, "primary": {"address": "127.0.0.1", "port": ORIGIN_PORT}}
    )
    good = json.dumps(policy(11, host="raw-eleven.feed.test"))
    body = f"{raw_utf8}\t{document}\nno tab on this line\n\t{good}\n{domain(11)}\t{good}\n"
    rejected = feed_edge.counter("policy_rejected")
    malformed = feed_edge.counter("line_malformed")
    with RawFeed(feed_edge, tmp_path, [{"body": body}]) as raw:
        wait_for(lambda: feed_edge.counter("line_malformed") >= malformed + 2, 30)
        assert feed_edge.counter("policy_rejected") == rejected + 1
        assert feed_edge.serves(11, "raw-eleven.feed.test")
        named = "b%C3%BCcher2.feed.test"
        wait_for(lambda: any(p["rejected"] == named for p in raw.polls()), 10)
        report = next(p for p in raw.polls() if p["rejected"] == named)
        assert report["malformed"] == "2,3", report
        log = feed_edge.envoy.log_text()
        assert "feed page line 2: expected `DOMAIN<TAB>DOCUMENT`, found no tab" in log
        assert "line 3: expected `DOMAIN<TAB>DOCUMENT`, found no domain before the tab" in log


def test_a_source_paging_for_ever_is_asked_once_a_second(feed_edge: FeedEdge, tmp_path):
    """`x-feed-more` on a page that brings nothing new, again and again: the
    singleton waits a second between polls instead of spinning, and says why."""
    endless = {"body": f"{domain(12)}\t{json.dumps(policy(12))}\n", "more": True,
               "advance": False, "repeat": True}  # fmt: skip
    with RawFeed(feed_edge, tmp_path, [endless]) as raw:
        wait_for(lambda: len(raw.polls()) >= 2, 30)
        first = len(raw.polls())
        time.sleep(4)
        asked = len(raw.polls()) - first
        assert 1 <= asked <= 8, asked
        assert "on a page that brings nothing new" in feed_edge.envoy.log_text()
        assert feed_edge.serves(12, domain(12))


def test_a_snapshot_that_would_remove_most_domains_is_refused(feed_edge: FeedEdge, tmp_path):
    """A source that lost its data answers with a snapshot of one domain: the
    edge keeps all 100,000 (past `max_snapshot_removal_percent`, 50 by
    default), counts it, logs why and tells the source."""
    snapshot = {"body": f"{domain(13)}\t{json.dumps(policy(13))}\n", "reset": True}
    refused = feed_edge.counter("snapshot_refused")
    with RawFeed(feed_edge, tmp_path, [snapshot]) as raw:
        wait_for(lambda: feed_edge.counter("snapshot_refused") == refused + 1, 30)
        for i in (0, 13, 777, DOMAINS - 1):
            assert feed_edge.get(domain(i)).status == 200, i
        # Earlier tests may have removed a few of the 100,000.
        said = re.search(
            r"the source's snapshot would remove (\d+) of the (\d+) domains",
            feed_edge.envoy.log_text(),
        )
        assert said, "the refusal is not logged"
        removed, had = int(said.group(1)), int(said.group(2))
        assert removed == had - 1 and had > DOMAINS - 100, (removed, had)
        wait_for(lambda: any(p["snapshot_refused"] for p in raw.polls()), 10)
        report = next(p for p in raw.polls() if p["snapshot_refused"])
        assert report["snapshot_refused"] == f"{removed}/{had}"
