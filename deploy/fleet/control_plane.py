"""The fleet's control plane: serves the bundle of a policy directory to every
Envoy: the clusters and the filter (with the settings) over one ADS stream
each (xDS state of the world, gRPC, 127.0.0.1), the policies per domain over
the policy feed that each Envoy's feed singleton polls (HTTP, GET /changes on
the status port; deploy/fleet/feed.py).

- Each push is the directory bundled by `origin-policy bundle --delivery feed`
  (the engine of `check`): a set with errors is refused, with the findings
  recorded, and the Envoys keep what they have.
- Every push is versioned by content; a push that changes one domain's policy
  sends that domain only, to each Envoy, and no xDS at all. Per Envoy the
  control plane records the version it runs (its xDS ACKs and the feed
  version it polls from), the xDS version it NACKed with Envoy's error
  message, and the domains its singleton refused.
- Make before break, per Envoy: the clusters first; once Envoy has ACKed them,
  the policies (the feed); once it polls from the new feed version, the
  filter. A new Envoy warms its listeners until then, so its first answer
  already has every policy.
- Staged rollout: with canaries, a new version goes to the canary nodes first,
  and to the others only once every canary has ACKed it and their 5xx and
  failover rates (from each canary's admin /stats) stayed within the limits
  for the bake time. Otherwise it is held, the canaries go back to the stable
  version, and the reason is reported.
- Status: GET /status (JSON) and GET / (text) on the HTTP port; POST /push
  bundles the directory at once (the watcher also does, on any change).

Run: python deploy/fleet/control_plane.py --policies policies --wasm FILE
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from feed import (  # noqa: E402
    EPOCH_HEADER,
    LONG_POLL_SECONDS,
    NODE_HEADER,
    REJECTED_HEADER,
    VERSION_HEADER,
    FeedPage,
    PolicyFeed,
    parse_rejected,
)
from resources import BundleError, Snapshot, load_snapshot, read_bundle, save_snapshot  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CLI = REPO / "target" / "debug" / "origin-policy"
DEFAULT_WASM = REPO / "target" / "wasm32-wasip1" / "release" / "origin_policy.wasm"
HISTORY = 50  # pushes and events kept for the status page
KNOWN_VERSIONS = 16  # snapshots kept for nodes still moving off them


def feed_epoch(state_dir: Path) -> int:
    """The feed's epoch, kept with the stable snapshot: a restarted control
    plane continues every Envoy's feed where it was."""
    path = state_dir / "feed-epoch"
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        epoch = int.from_bytes(os.urandom(7), "big") or 1
        path.write_text(str(epoch))
        return epoch


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} control-plane: {message}", flush=True)


# --- the fleet's state ----------------------------------------------------------------

CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


def short_type(url: str) -> str:
    return url.rsplit(".", 1)[-1]




@dataclass
class TypeState:
    """One resource type on one ADS stream."""

    names: list[str] = field(default_factory=list)  # [] is a wildcard subscription
    sent: str | None = None  # version of the last response on this stream
    nonce: str | None = None
    acked: str | None = None
    nacked: str | None = None
    error: str | None = None


@dataclass
class Node:
    id: str
    canary: bool
    admin: str | None = None  # its admin URL, from the node metadata
    module_dir: str | None = None  # where it reads Wasm modules, if not from the store
    connected: bool = False
    connections: int = 0
    stream: object | None = None
    types: dict[str, TypeState] = field(default_factory=dict)
    bytes_sent: int = 0  # xDS responses and feed pages
    responses_sent: int = 0
    last_response_bytes: int = 0
    # The feed: the version its singleton polls from, and what it refused.
    feed_since: int | None = None
    feed_polls: int = 0
    feed_pages: int = 0
    feed_rejected: list[str] = field(default_factory=list)
    feed_refusing: list[str] = field(default_factory=list)  # within a paged move

    def xds_acked(self) -> str | None:
        """The xDS version every subscribed type ACKed, if they agree (each type
        is ACKed on its own: after a NACK of the filter, the clusters of the
        same version may well be in place)."""
        versions = {t.acked for t in self.types.values()}
        return versions.pop() if len(versions) == 1 else None

    def clusters_acked(self) -> str | None:
        """The xDS version whose clusters Envoy has (with older ones or not)."""
        state = self.types.get(CLUSTER_TYPE)
        return (state.acked or "").split("+")[0] or None if state else None

    def acked_by_type(self) -> dict[str, str | None]:
        return {short_type(url): t.acked for url, t in self.types.items()}

    def nack(self) -> tuple[str, str] | None:
        for t in self.types.values():
            if t.nacked and t.nacked == t.sent:
                return t.nacked, t.error or ""
        return None


@dataclass
class RolloutSettings:
    canaries: set[str]
    bake_seconds: float
    ack_timeout: float
    max_5xx_rate: float
    max_failover_rate: float
    min_requests: int
    stat_prefix: str
    failover_counter: str


class Fleet:
    """Snapshots, the rollout stage and every node's record, under one lock.
    Streams are woken whenever what a node should run may have changed."""

    def __init__(self, rollout: RolloutSettings, state_dir: Path):
        self.lock = threading.RLock()
        self.rollout = rollout
        self.state_dir = state_dir
        self.stable: Snapshot | None = load_snapshot(state_dir / "stable.json")
        self.candidate: Snapshot | None = None
        self.stage = "promoted" if self.stable else "empty"
        self.reason = ""
        self.stage_since = time.time()
        self.pushes: list[dict] = []
        self.events: list[dict] = []
        self.nodes: dict[str, Node] = {}
        self.streams: set = set()
        self.seq = 0
        # Recent versions by name: a node moving off one still needs its clusters.
        self.known: dict[str, Snapshot] = {self.stable.version: self.stable} if self.stable else {}
        self.feed = PolicyFeed(feed_epoch(state_dir))
        # Feed polls wait on it for something new to send.
        self.feed_changed = threading.Condition(self.lock)

    # what each node should run

    def target(self, node: Node) -> Snapshot | None:
        if self.candidate and node.canary and self.stage in ("canary", "baking"):
            return self.candidate
        return self.stable

    def latest(self) -> Snapshot | None:
        return self.candidate or self.stable

    def running(self, node: Node) -> str | None:
        """The version a node runs: its xDS ACKs and its feed agree on it."""
        xds = node.xds_acked()
        for snapshot in [self.target(node), *reversed(self.known.values())]:
            if snapshot and snapshot.xds_version == xds and snapshot.feed_version == node.feed_since:
                return snapshot.version
        return None

    def by_feed_version(self, feed_version: int | None) -> Snapshot | None:
        return next((s for s in reversed(self.known.values()) if s.feed_version == feed_version), None)

    def wake_streams(self) -> None:
        for stream in list(self.streams):
            stream.wake()
        self.feed_changed.notify_all()

    # the feed

    def feed_target(self, node: Node) -> Snapshot | None:
        """Where the node's policies should go now: its target, once Envoy
        has that target's clusters."""
        target = self.target(node)
        if target is None or (CLUSTER_TYPE in node.types and node.clusters_acked() != target.xds_version):
            return None
        return target

    def heard_feed(self, node_id: str, since: int, epoch: int | None, rejected: str | None) -> Node:
        """A poll: the node has the policies of `since` (a version of this
        epoch), but for the domains it names as refused in the pages that
        brought it there."""
        with self.lock:
            node = self.node(node_id)
            node.feed_polls += 1
            report = parse_rejected(rejected) if rejected else []
            if report:
                self.event(f"{node_id} refused the policies of {rejected}")
            if self.feed.is_cursor(since, epoch):
                node.feed_refusing += report
                return node
            # Another epoch: nothing of ours (a new Envoy, or another source's).
            has = since if epoch == self.feed.epoch else None
            if report or has != node.feed_since:
                node.feed_rejected, node.feed_refusing = node.feed_refusing + report, []
            if has != node.feed_since:
                node.feed_since = has
                if node.stream is not None:
                    node.stream.wake()  # the filter may follow the policies now
            return node

    def feed_page(self, node: Node, since: int, epoch: int | None, timeout: float) -> FeedPage | None:
        """The node's next page, waiting up to `timeout` for one."""
        deadline = time.monotonic() + timeout
        with self.feed_changed:
            while True:
                page = self.feed.next_page(since, epoch, self.known.values(), self.feed_target(node))
                if page is not None:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.feed_changed.wait(left)
            node.feed_pages += 1
            node.responses_sent += 1
            node.bytes_sent += len(page.body)
            node.last_response_bytes = len(page.body)
            return page

    # pushes

    def record_push(self, source: str, outcome: str, version: str | None, detail: str = "") -> dict:
        with self.lock:
            self.seq += 1
            push = {"push": self.seq, "at": time.time(), "source": source, "outcome": outcome,
                    "version": version, "detail": detail}
            self.pushes = (self.pushes + [push])[-HISTORY:]
        log(f"push #{push['push']} ({source}): {outcome} {version or ''} {detail[:300]}")
        return push

    def offer(self, snapshot: Snapshot, source: str) -> dict:
        """A validated snapshot: unchanged, promoted at once (no stable version
        yet, or no canaries), or handed to the canaries."""
        with self.lock:
            latest = self.latest()
            if latest and latest.version == snapshot.version:
                return self.record_push(source, "unchanged", snapshot.version)
            self.remember(snapshot)
            if self.stable and snapshot.version == self.stable.version:
                self.candidate = None
                self.set_stage("promoted", "back to the stable version")
            elif self.stable is None or not self.rollout.canaries:
                self.candidate = None
                self.promote(snapshot)
            else:
                self.candidate = snapshot
                self.set_stage("canary", f"sent to {', '.join(sorted(self.rollout.canaries))}")
            self.wake_streams()
            return self.record_push(source, "accepted", snapshot.version, self.stage)

    def remember(self, snapshot: Snapshot) -> None:
        self.known.pop(snapshot.version, None)
        self.known[snapshot.version] = snapshot
        while len(self.known) > KNOWN_VERSIONS:
            self.known.pop(next(iter(self.known)))

    def set_stage(self, stage: str, reason: str) -> None:
        self.stage, self.reason, self.stage_since = stage, reason, time.time()
        self.event(f"rollout {stage}: {reason}")

    def promote(self, snapshot: Snapshot) -> None:
        self.stable = snapshot
        self.candidate = None
        save_snapshot(snapshot, self.state_dir / "stable.json")
        self.set_stage("promoted", f"{snapshot.version} to every node")
        self.wake_streams()

    def hold(self, reason: str) -> None:
        """The candidate stays recorded; canaries go back to the stable version."""
        self.set_stage("held", f"{self.candidate.version}: {reason}")
        self.wake_streams()

    def event(self, text: str) -> None:
        self.events = (self.events + [{"at": time.time(), "event": text}])[-HISTORY:]
        log(text)

    # nodes

    def node(self, node_id: str) -> Node:
        if node_id not in self.nodes:
            self.nodes[node_id] = Node(node_id, canary=node_id in self.rollout.canaries)
        return self.nodes[node_id]

    def status(self) -> dict:
        with self.lock:
            return {
                "stable": self.stable.summary() if self.stable else None,
                "rollout": {
                    "stage": self.stage,
                    "reason": self.reason,
                    "since": self.stage_since,
                    "candidate": self.candidate.summary() if self.candidate else None,
                    "canaries": sorted(self.rollout.canaries),
                },
                "nodes": {i: self.node_status(self.nodes[i]) for i in sorted(self.nodes)},
                "pushes": self.pushes,
                "events": self.events,
            }

    def node_status(self, node: Node) -> dict:
        target = self.target(node)
        nack = node.nack()
        nacked = nack[0] if nack else None
        if target and nacked == target.xds_version:
            nacked = target.version
        feed = self.by_feed_version(node.feed_since)
        return {
            "connected": node.connected,
            "connections": node.connections,
            "canary": node.canary,
            "admin": node.admin,
            "target": target.version if target else None,
            "acked": self.running(node),
            "acked_by_type": node.acked_by_type(),
            "nacked": nacked,
            "nack_error": nack[1] if nack else None,
            "types": {short_type(url): vars(t).copy() for url, t in node.types.items()},
            "feed": {
                "since": node.feed_since,
                "policies_of": feed.version if feed else None,
                "polls": node.feed_polls,
                "pages": node.feed_pages,
                "refused": node.feed_rejected,
            },
            "bytes_sent": node.bytes_sent,
            "responses_sent": node.responses_sent,
            "last_response_bytes": node.last_response_bytes,
        }


# --- ADS: one stream per Envoy ------------------------------------------------------------

WAKE = object()
END = object()


class Stream:
    """One Envoy's ADS stream. A reader thread queues its requests; the
    handler answers them and pushes whatever the node's target says."""

    def __init__(self, fleet: Fleet):
        self.fleet = fleet
        self.inbox: queue.Queue = queue.Queue()
        self.node: Node | None = None
        self.types: dict[str, TypeState] = {}
        self.nonce = 0

    def wake(self) -> None:
        self.inbox.put(WAKE)

    def read(self, requests) -> None:
        try:
            for request in requests:
                self.inbox.put(request)
        except grpc.RpcError:
            pass
        finally:
            self.inbox.put(END)

    def responses(self):
        while True:
            item = self.inbox.get()
            if item is END:
                return
            if item is not WAKE:
                self.on_request(item)
            if self.node is not None:
                yield from self.pending()

    def on_request(self, request: discovery_pb2.DiscoveryRequest) -> None:
        with self.fleet.lock:
            if self.node is None:
                self.attach(request.node)
                if not request.version_info:
                    # A new Envoy process: its entries are empty, whatever the
                    # node's last one had polled from.
                    self.node.feed_since = None
            state = self.types.setdefault(request.type_url, TypeState())
            names = list(request.resource_names)
            if names != state.names:
                state.names, state.sent = names, None  # a new subscription: answer it
            if not request.response_nonce:
                # First request of this type on this stream: Envoy says what it runs.
                state.acked = request.version_info or state.acked
                state.sent = None
            elif request.response_nonce == state.nonce:
                self.on_reply(request, state)

    def on_reply(self, request: discovery_pb2.DiscoveryRequest, state: TypeState) -> None:
        kind = short_type(request.type_url)
        if request.HasField("error_detail"):
            state.nacked, state.error = state.sent, request.error_detail.message
            self.fleet.event(f"{self.node.id} NACKed {kind} {state.sent}: {state.error}")
        else:
            state.acked = request.version_info
            self.fleet.event(f"{self.node.id} ACKed {kind} {request.version_info}")
            self.fleet.feed_changed.notify_all()  # the policies may follow the clusters now

    def attach(self, node_pb) -> None:
        metadata = node_pb.metadata.fields
        node = self.fleet.node(node_pb.id or "unnamed")
        node.admin = metadata["admin"].string_value if "admin" in metadata else None
        node.module_dir = metadata["module_dir"].string_value if "module_dir" in metadata else None
        node.connected = True
        node.connections += 1
        node.stream = self
        node.types = self.types
        self.node = node
        self.fleet.event(f"{node.id} connected (stream {node.connections})")

    def pending(self):
        """A response for every subscribed type whose target this stream has
        not sent yet (a NACKed one is not sent again), make before break:
        the clusters first, holding on to any that the filter or the
        policies Envoy runs still name; the rest once Envoy has ACKed those
        clusters and its feed has the target's policies (Fleet.feed_target);
        and the clusters alone last, once nothing names the dropped ones any
        more."""
        with self.fleet.lock:
            target = self.fleet.target(self.node)
            if target is None:
                return
            states = {url: (s.sent, s.acked, list(s.names)) for url, s in self.types.items()}
            by_xds = {s.xds_version: s for s in self.fleet.known.values()}
            policies_at = self.node.feed_since
            feed = self.fleet.by_feed_version(policies_at)
        todo = []
        if CLUSTER_TYPE in states:
            sent, acked, names = states.pop(CLUSTER_TYPE)
            older = {v for was_sent, was_acked, _ in states.values() for v in (was_sent, was_acked)}
            if feed is not None:
                older.add(feed.xds_version)
            label, clusters = self.cluster_set(target, older, by_xds)
            if sent != label:
                todo.append((CLUSTER_TYPE, label, clusters, names))
            clusters_in = (acked or "").split("+")[0] == target.xds_version
            if not clusters_in or policies_at != target.feed_version:
                states = {}  # the rest waits for these clusters and the policies
        for url, (sent, _, names) in states.items():
            if sent != target.xds_version:
                todo.append((url, target.xds_version, self.resources(target, url), names))
        for url, version, resources, names in todo:
            response = self.response(url, version, resources, names)
            with self.fleet.lock:
                self.record_sent(self.types[url], response)
            yield response

    def resources(self, snapshot: Snapshot, url: str) -> list:
        return snapshot.encoded(self.node.module_dir).get(url, [])

    def cluster_set(self, target: Snapshot, versions: set, by_xds: dict[str, Snapshot]):
        """The target's clusters plus those of the xDS versions the node's
        other types and its policies run or were sent, labelled
        `TARGET+OLDER...` while there are any."""
        clusters = list(self.resources(target, CLUSTER_TYPE))
        names = {name for name, _ in clusters}
        label = [target.xds_version]
        for version in sorted(versions - {None, target.xds_version}):
            older = [(n, c) for n, c in self.resources(by_xds[version], CLUSTER_TYPE) if n not in names] \
                if version in by_xds else []
            if older:
                clusters += older
                names |= {n for n, _ in older}
                label.append(version)
        return "+".join(label), clusters

    def response(self, url: str, version: str, resources: list, names: list[str]):
        self.nonce += 1
        return discovery_pb2.DiscoveryResponse(
            version_info=version,
            type_url=url,
            nonce=str(self.nonce),
            resources=[packed for name, packed in resources if not names or name in names],
        )

    def record_sent(self, state: TypeState, response) -> None:
        size = response.ByteSize()
        state.sent, state.nonce = response.version_info, response.nonce
        self.node.bytes_sent += size
        self.node.responses_sent += 1
        self.node.last_response_bytes = size

    def close(self) -> None:
        with self.fleet.lock:
            self.fleet.streams.discard(self)
            if self.node is not None and self.node.stream is self:
                self.node.connected = False
                self.fleet.event(f"{self.node.id} disconnected")


class AggregatedDiscovery(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, fleet: Fleet):
        self.fleet = fleet

    def StreamAggregatedResources(self, request_iterator, context):
        stream = Stream(self.fleet)
        with self.fleet.lock:
            self.fleet.streams.add(stream)
        threading.Thread(target=stream.read, args=(request_iterator,), daemon=True).start()
        try:
            yield from stream.responses()
        finally:
            stream.close()

    def DeltaAggregatedResources(self, request_iterator, context):
        # The filter's configuration is one resource, so delta xDS would send
        # the same bytes; see deploy/fleet/README.md.
        context.abort(grpc.StatusCode.UNIMPLEMENTED,
                      "delta xDS is not served: use api_type GRPC (state of the world)")


# --- staged rollout ---------------------------------------------------------------------


def read_counters(admin: str, names: list[str]) -> dict[str, int]:
    with urllib.request.urlopen(f"{admin}/stats", timeout=2) as r:
        text = r.read().decode()
    values = dict.fromkeys(names, 0)
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if name in values and value.strip().isdigit():
            values[name] = int(value)
    return values


class Rollout(threading.Thread):
    """Moves a candidate from the canaries to every node, or holds it."""

    def __init__(self, fleet: Fleet, stop: threading.Event):
        super().__init__(daemon=True)
        self.fleet = fleet
        self.stop = stop
        settings = fleet.rollout
        self.requests = f"http.{settings.stat_prefix}.downstream_rq_completed"
        self.errors = f"http.{settings.stat_prefix}.downstream_rq_5xx"
        self.failovers = settings.failover_counter
        self.baseline: dict[str, dict[str, int]] = {}
        self.bake_start = 0.0

    def run(self) -> None:
        while not self.stop.wait(0.2):
            try:
                self.step()
            except Exception as e:  # a canary's admin may be gone: keep judging
                log(f"rollout check failed: {e!r}")

    def canaries(self) -> list[Node]:
        return [n for n in self.fleet.nodes.values() if n.canary and n.connected]

    def step(self) -> None:
        fleet = self.fleet
        with fleet.lock:
            stage, candidate = fleet.stage, fleet.candidate
            canaries = self.canaries()
        if stage == "canary":
            self.await_acks(candidate, canaries)
        elif stage == "baking":
            self.bake(candidate, canaries)

    def await_acks(self, candidate: Snapshot, canaries: list[Node]) -> None:
        """Holds on a canary NACK or a missing ACK; starts the bake once every
        connected canary ACKed (their counters read outside the lock)."""
        fleet = self.fleet
        with fleet.lock:
            if fleet.candidate is not candidate or fleet.stage != "canary":
                return
            for node in canaries:
                nack = node.nack()
                if nack and nack[0] == candidate.xds_version:
                    return fleet.hold(f"{node.id} NACKed it: {nack[1]}")
                if node.feed_rejected and node.feed_since == candidate.feed_version:
                    return fleet.hold(f"{node.id} refused the policies of {', '.join(node.feed_rejected)}")
            acked = {n.id for n in canaries if fleet.running(n) == candidate.version}
            if not canaries or len(acked) < len(canaries):
                if time.time() - fleet.stage_since > fleet.rollout.ack_timeout:
                    missing = ", ".join(sorted(fleet.rollout.canaries - acked))
                    fleet.hold(f"no ACK within {fleet.rollout.ack_timeout:g} s from {missing}")
                return
        baseline = {n.id: read_counters(n.admin, self.counter_names()) for n in canaries if n.admin}
        with fleet.lock:
            if fleet.candidate is candidate and fleet.stage == "canary":
                self.baseline, self.bake_start = baseline, time.time()
                fleet.set_stage("baking", f"canaries ACKed; watching their 5xx and failovers for "
                                          f"{fleet.rollout.bake_seconds:g} s")

    def counter_names(self) -> list[str]:
        return [self.requests, self.errors, self.failovers]

    def bake(self, candidate: Snapshot, canaries: list[Node]) -> None:
        settings = self.fleet.rollout
        over = time.time() - self.bake_start >= settings.bake_seconds
        for node in canaries:
            if node.id not in self.baseline:
                continue
            now = read_counters(node.admin, self.counter_names())
            verdict = self.judge(node.id, now, final=over)
            if verdict:
                with self.fleet.lock:
                    if self.fleet.candidate is candidate and self.fleet.stage == "baking":
                        self.fleet.hold(verdict)
                return
        if over:
            with self.fleet.lock:
                if self.fleet.candidate is candidate and self.fleet.stage == "baking":
                    self.fleet.promote(candidate)

    def judge(self, node_id: str, now: dict[str, int], final: bool) -> str | None:
        """Why the canary's counters since the bake began are over a limit, if
        they are (judged early once enough requests came in)."""
        settings = self.fleet.rollout
        before = self.baseline[node_id]
        requests = now[self.requests] - before[self.requests]
        if requests == 0 or (requests < settings.min_requests and not final):
            return None
        for counter, limit, what in ((self.errors, settings.max_5xx_rate, "5xx"),
                                     (self.failovers, settings.max_failover_rate, "failover")):
            count = now[counter] - before[counter]
            if count / requests > limit:
                return (f"{node_id}: {what} rate {count / requests:.1%} ({count} of {requests} "
                        f"requests) over the {limit:.1%} limit")
        return None


# --- pushes: bundle, validate, offer ----------------------------------------------------


class Pusher:
    """Bundles the policy paths with the CLI (the engine `check` uses) and
    offers the result; one push at a time."""

    def __init__(self, fleet: Fleet, cli: Path, wasm: Path, policies: list[Path]):
        self.fleet = fleet
        self.cli = cli
        self.wasm = wasm
        self.policies = policies
        self.lock = threading.Lock()

    def push(self, source: str) -> dict:
        with self.lock, tempfile.TemporaryDirectory(prefix="origin-policy-bundle-") as out:
            started = time.monotonic()
            result = subprocess.run(
                [str(self.cli), "bundle", "--delivery", "feed", "--wasm", str(self.wasm), "--out", out, *map(str, self.policies)],
                capture_output=True, text=True,
            )
            bundled = time.monotonic()
            if result.returncode != 0:
                return self.fleet.record_push(source, "refused", None, (result.stderr + result.stdout).strip())
            try:
                snapshot = read_bundle(Path(out), self.fleet.state_dir / "modules")
            except BundleError as e:
                return self.fleet.record_push(source, "refused", None, str(e))
            push = self.fleet.offer(snapshot, source)
            # Kept with the push in the status page's history too.
            push["bundle_seconds"] = round(bundled - started, 3)
            push["encode_seconds"] = round(time.monotonic() - bundled, 3)
            return push

    def fingerprint(self) -> tuple:
        """Names, sizes and mtimes of every input file (polled: no inotify needed)."""
        entries = []
        for root in [*self.policies, self.wasm]:
            paths = [root] if root.is_file() else sorted(root.rglob("*.json"))
            for p in paths:
                try:
                    st = p.stat()
                except OSError:
                    continue
                entries.append((str(p), st.st_mtime_ns, st.st_size))
        return tuple(entries)


def watch(pusher: Pusher, interval: float, stop: threading.Event) -> None:
    seen = pusher.fingerprint()
    while not stop.wait(interval):
        now = pusher.fingerprint()
        if now != seen:
            seen = now
            pusher.push("watch")


# --- status and push over HTTP --------------------------------------------------------------


def status_text(status: dict) -> str:
    lines = []
    stable = status["stable"]
    rollout = status["rollout"]
    lines.append(f"stable version: {stable['version'] if stable else '-'}")
    candidate = rollout["candidate"]
    lines.append(f"rollout: {rollout['stage']}" + (f" {candidate['version']}" if candidate else "")
                 + f" — {rollout['reason']}")
    lines.append("")
    lines.append(f"{'node':<14}{'canary':<8}{'conn':<6}{'target':<14}{'acked':<14}{'bytes sent':>12}  nack")
    for node_id, n in status["nodes"].items():
        nack = f"{n['nacked']}: {n['nack_error']}" if n["nacked"] else ""
        acked = n["acked"] or " ".join(f"{k}={v or '-'}" for k, v in n["acked_by_type"].items()) or "-"
        lines.append(f"{node_id:<14}{'yes' if n['canary'] else '':<8}{'up' if n['connected'] else 'down':<6}"
                     f"{n['target'] or '-':<14}{acked:<14}{n['bytes_sent']:>12}  {nack}")
    lines.append("")
    lines.append("recent pushes:")
    for p in status["pushes"][-8:]:
        detail = p["detail"].splitlines()[0] if p["detail"] else ""
        lines.append(f"  #{p['push']} {time.strftime('%H:%M:%S', time.localtime(p['at']))} "
                     f"{p['source']}: {p['outcome']} {p['version'] or ''} {detail}")
    return "\n".join(lines) + "\n"


def http_handler(fleet: Fleet, pusher: Pusher):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # the feed singletons' polls keep their connection

        def log_message(self, *args):
            pass

        def reply(self, code: int, body: str | bytes, kind: str, headers=()) -> None:
            data = body.encode() if isinstance(body, str) else body
            self.send_response(code)
            for name, value in headers:
                self.send_header(name, value)
            if code != 204:
                self.send_header("content-type", kind)
                self.send_header("content-length", str(len(data)))
            self.end_headers()
            if code != 204:
                self.wfile.write(data)

        def feed(self):
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)

            def number(name: str) -> int | None:
                value = query.get(name, [""])[0]
                return int(value) if value.isdigit() else None

            since, epoch = number("since") or 0, number("epoch")
            node = fleet.heard_feed(self.headers.get(NODE_HEADER) or "unnamed", since, epoch,
                                    self.headers.get(REJECTED_HEADER))
            page = fleet.feed_page(node, since, epoch, LONG_POLL_SECONDS)
            if page is None:
                self.reply(204, b"", "", [(VERSION_HEADER, str(since)), (EPOCH_HEADER, str(fleet.feed.epoch))])
            else:
                self.reply(200, page.body, "text/plain", page.headers(fleet.feed.epoch))

        def do_GET(self):
            if self.path.startswith("/changes"):
                self.feed()
            elif self.path.startswith("/status"):
                self.reply(200, json.dumps(fleet.status(), indent=1), "application/json")
            elif self.path == "/":
                self.reply(200, status_text(fleet.status()), "text/plain")
            else:
                self.reply(404, "not found\n", "text/plain")

        def do_POST(self):
            if self.path == "/push":
                self.reply(200, json.dumps(pusher.push("push")), "application/json")
            else:
                self.reply(404, "not found\n", "text/plain")

    return Handler


# --- main --------------------------------------------------------------------------------------


def host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", nargs="+", type=Path, default=[REPO / "policies"])
    p.add_argument("--wasm", type=Path, default=DEFAULT_WASM)
    p.add_argument("--cli", type=Path, default=DEFAULT_CLI)
    p.add_argument("--xds", default="127.0.0.1:18600", help="ADS gRPC address")
    p.add_argument("--http", default="127.0.0.1:18601", help="status page and push address")
    p.add_argument("--state-dir", type=Path, default=REPO / "run" / "fleet" / "control-plane")
    p.add_argument("--canary", default="", help="comma-separated node ids that get a push first")
    p.add_argument("--bake-seconds", type=float, default=30.0)
    p.add_argument("--ack-timeout", type=float, default=30.0)
    p.add_argument("--max-5xx-rate", type=float, default=0.01)
    p.add_argument("--max-failover-rate", type=float, default=0.05)
    p.add_argument("--min-requests", type=int, default=20,
                   help="requests a canary must see before it is judged before the bake ends")
    p.add_argument("--stat-prefix", default="viewer", help="the viewer listener's HCM stat_prefix")
    p.add_argument("--failover-counter", default="wasmcustom.origin_policy.failover.retried",
                   help="the filter's counter of requests sent on to a next origin")
    p.add_argument("--poll-seconds", type=float, default=0.5, help="0: no watch, pushes only")
    p.add_argument("--max-envoys", type=int, default=256, help="ADS streams served at once")
    return p.parse_args(argv)


def serve(args: argparse.Namespace) -> int:
    args.state_dir.mkdir(parents=True, exist_ok=True)
    settings = RolloutSettings(
        canaries={c for c in args.canary.split(",") if c},
        bake_seconds=args.bake_seconds,
        ack_timeout=args.ack_timeout,
        max_5xx_rate=args.max_5xx_rate,
        max_failover_rate=args.max_failover_rate,
        min_requests=args.min_requests,
        stat_prefix=args.stat_prefix,
        failover_counter=args.failover_counter,
    )
    fleet = Fleet(settings, args.state_dir)
    pusher = Pusher(fleet, args.cli, args.wasm, args.policies)
    stop = threading.Event()
    pusher.push("start")

    server = grpc.server(
        # A stream holds a worker thread for its life: one per Envoy.
        futures.ThreadPoolExecutor(max_workers=args.max_envoys + 4),
        options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", 16 << 20)],
    )
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(AggregatedDiscovery(fleet), server)
    server.add_insecure_port("%s:%d" % host_port(args.xds))
    server.start()
    web = http.server.ThreadingHTTPServer(host_port(args.http), http_handler(fleet, pusher))
    web.daemon_threads = True
    threading.Thread(target=web.serve_forever, daemon=True).start()
    Rollout(fleet, stop).start()
    if args.poll_seconds > 0:
        threading.Thread(target=watch, args=(pusher, args.poll_seconds, stop), daemon=True).start()
    log(f"ADS on {args.xds}, status on http://{args.http}/ (canaries: {args.canary or 'none'})")

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    web.shutdown()
    server.stop(grace=1).wait()
    log("stopped")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(serve(parse_args(sys.argv[1:])))
