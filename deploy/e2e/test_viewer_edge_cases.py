"""The filter straight on the viewer's listeners, with no cache tier in front:
what a viewer can forge, and what Envoy itself makes of malformed requests.

Its own Envoy (admin :19901), generated here from the shipped edge.yaml: each
viewer listener runs the origin-fetch tier's filters and route as shipped
(origin-policy through ECDS, the router; origins from the bundle's CDS), with
`trust_x_forwarded_proto: false`, as a plaintext listener and a TLS listener
(h2 and HTTP/1.1 by ALPN), each once with `use_remote_address: false` and once
with `true`. Two more listeners run the same filter with
`trust_x_forwarded_proto: true` (an inline plugin in a VM of its own). The demo
origins are the suite's own (conftest.py), and their request log says what
reached them: scheme, port, Host, SNI, headers.

- `follow`: the viewer's protocol is its connection's (TLS or not), whatever
  `:scheme` or `x-forwarded-proto` it sends, over HTTP/1.1 and HTTP/2; with
  `trust_x_forwarded_proto` a valid `x-forwarded-proto` wins, a bogus one
  falls back to the connection.
- A raw UTF-8 Host: Envoy's own 400 over HTTP/1.1 (the filter never runs);
  over HTTP/2, no response at all.
- Two Host headers: Envoy joins them into one value; the filter answers 400
  `bad host: conflicting Host values`.
- The origin never receives the cluster header nor Envoy's
  `x-envoy-expected-rq-timeout-ms` (also checked through the shipped two-tier
  edge); a failed-over request reaches the secondary without the cluster
  header, but with Envoy's timeout header (a known limit: Envoy's own HTTP
  client adds it to every `dispatch_http_call`).
- Both origins refusing connections: 502 naming the secondary's connect failure.
- One invalid policy pushed to an Envoy with two workers (its first push):
  counted once in `policy.rejected`, logged once, and the log says once that
  the domain keeps its last good policy, which it does.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import ssl
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
from conftest import E2E_POLICIES, Response, allow_test_origins, copy_certs

from edge import ECDS_FILE, POLICIES, Envoy, bundle, edge_config

ADMIN = "http://127.0.0.1:19901"
# (viewer scheme, use_remote_address) -> port; the filter does not trust
# x-forwarded-proto on these.
VIEWER_PORTS = {
    ("http", False): 10180,
    ("http", True): 10181,
    ("https", False): 10543,
    ("https", True): 10544,
}
# The filter trusts x-forwarded-proto here (use_remote_address: false).
TRUSTING_PORTS = {"http": 10182, "https": 10545}
# An edge that counts loopback viewers as internal (`internal_address_config`):
# Envoy keeps their x-envoy-* headers.
INTERNAL_VIEWER_PORT = 10183

FOLLOW = "media.example.com"  # policies/media.example.com.json: follow
# What the origin saw, by the protocol the edge fetched with.
FETCHED = {
    "http": ("media", "http", 18082, None),
    "https": ("media-tls", "https", 18444, "media.example.com"),
}
OTHER = {"http": "https", "https": "http"}

# Headers the edge keeps to itself.
EDGE_ONLY_HEADERS = {
    "x-origin-cluster",
    "x-envoy-expected-rq-timeout-ms",
    "x-envoy-retry-on",
    "x-envoy-retriable-status-codes",
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-rq-per-try-timeout-ms",
}


# --- the Envoy under test --------------------------------------------------------


def write_policies(directory: Path) -> None:
    directory.mkdir()
    settings = json.loads((POLICIES / "settings.json").read_text())
    # Never mark an origin down here: these tests count on www.example.com's
    # primary being tried (test_failover.py covers origin health).
    settings.update(
        trust_x_forwarded_proto=False,
        decision_header=True,
        origin_health={"consecutive_failures": 100},
    )
    (directory / "settings.json").write_text(json.dumps(allow_test_origins(settings), indent=2))
    for name in ("media.example.com.json", "www.example.com.json"):
        shutil.copy(POLICIES / name, directory / name)
    shutil.copy(E2E_POLICIES / "both-refused.test.json", directory)


def trusting_filter(run_dir: Path) -> dict:
    """The bundled filter, inline, trusting x-forwarded-proto. Its own VM and
    root id, so it shares no state (last good policies, counted pushes) with
    the ECDS-served plugin."""
    ecds = json.loads((run_dir / ECDS_FILE).read_text())
    typed = copy.deepcopy(ecds["resources"][0]["typed_config"])
    config = json.loads(typed["config"]["configuration"]["value"])
    config["settings"]["trust_x_forwarded_proto"] = True
    typed["config"]["configuration"]["value"] = json.dumps(config)
    typed["config"]["name"] = typed["config"]["root_id"] = "origin-policy-trusting"
    typed["config"]["vm_config"]["vm_id"] = "origin-policy-trusting"
    return {"name": "origin-policy", "typed_config": typed}


def viewer_config(run_dir: Path) -> dict:
    """Envoy with the origin-fetch tier of edge.yaml on the viewer listeners."""
    shipped = edge_config()
    listeners = {lst["name"]: lst for lst in shipped["static_resources"]["listeners"]}
    fetch_hcm = listeners["origin_fetch"]["filter_chains"][0]["filters"][0]["typed_config"]
    tls = copy.deepcopy(listeners["viewer_https"]["filter_chains"][0]["transport_socket"])
    tls["typed_config"]["common_tls_context"]["alpn_protocols"] = ["h2", "http/1.1"]

    def listener(name, port, scheme, use_remote_address, filters=None, internal=None):
        hcm = copy.deepcopy(fetch_hcm)
        hcm["stat_prefix"] = name
        hcm["use_remote_address"] = use_remote_address
        if internal:
            hcm["internal_address_config"] = {
                "cidr_ranges": [{"address_prefix": internal, "prefix_len": 8}]
            }
        if filters is not None:
            hcm["http_filters"] = filters
        chain = {
            "filters": [
                {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
            ]
        }
        if scheme == "https":
            chain["transport_socket"] = copy.deepcopy(tls)
        return {
            "name": name,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [chain],
        }

    out = [
        listener(f"viewer_{scheme}_{'remote' if remote else 'forwarded'}", port, scheme, remote)
        for (scheme, remote), port in VIEWER_PORTS.items()
    ]
    trusting = [trusting_filter(run_dir)] + copy.deepcopy(fetch_hcm["http_filters"][1:])
    out += [
        listener(f"trusting_{scheme}", port, scheme, False, trusting)
        for scheme, port in TRUSTING_PORTS.items()
    ]
    out.append(listener("viewer_internal", INTERNAL_VIEWER_PORT, "http", True, internal="127.0.0.0"))
    host, port = ADMIN.removeprefix("http://").split(":")
    return {
        "node": shipped["node"],
        "admin": {"address": {"socket_address": {"address": host, "port_value": int(port)}}},
        "dynamic_resources": shipped["dynamic_resources"],
        "static_resources": {"listeners": out},
    }


@dataclass
class ViewerEdge:
    run_dir: Path
    envoy: Envoy
    demo: object  # origins.DemoOrigins

    def seen(self, path: str):
        return self.demo.log.matching(path)

    def counter(self, name: str) -> int:
        """A filter counter once every worker's tick (once a second) has
        handed over the counts of the requests made before."""
        time.sleep(1.3)
        return self.envoy.stats().get(f"wasmcustom.origin_policy.{name}", 0)


@pytest.fixture(scope="module")
def viewer_edge(tmp_path_factory, demo_origins):
    run_dir = tmp_path_factory.mktemp("viewer-edge")
    copy_certs(demo_origins.certs, run_dir)
    write_policies(run_dir / "policies")
    bundle(run_dir, [run_dir / "policies"])
    config = viewer_config(run_dir)
    envoy = Envoy(run_dir, config, concurrency=2, admin=ADMIN)
    envoy.start()
    try:
        yield ViewerEdge(run_dir, envoy, demo_origins)
    finally:
        envoy.stop()


# --- clients -----------------------------------------------------------------------


def client_tls(demo, alpn: list[str]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(demo.certs.ca_file))
    ctx.set_alpn_protocols(alpn)
    return ctx


def connect(demo, port: int, tls: bool, alpn: list[str]) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if tls:
        sock = client_tls(demo, alpn).wrap_socket(sock, server_hostname="localhost")
    return sock


def http1(demo, port: int, tls: bool, request: bytes) -> Response:
    """Sends raw HTTP/1.1 bytes (one request, `connection: close`) and parses
    the answer."""
    with connect(demo, port, tls, ["http/1.1"]) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Response(status, headers, body)


def get1(demo, port, tls, host: bytes | str, path, headers=()) -> Response:
    if isinstance(host, str):
        host = host.encode()
    lines = [b"GET " + path.encode() + b" HTTP/1.1", b"host: " + host]
    lines += [f"{k}: {v}".encode() for k, v in headers]
    lines += [b"connection: close", b"", b""]
    return http1(demo, port, tls, b"\r\n".join(lines))


@dataclass
class H2Outcome:
    response: Response | None
    ended_by: str  # "response", "reset", "goaway", "eof"


def http2(demo, port: int, tls: bool, headers: list[tuple[bytes, bytes]]) -> H2Outcome:
    """One HTTP/2 request (h2 over TLS by ALPN, or h2c with prior knowledge),
    with the headers exactly as given: no validation, no normalisation."""
    config = h2.config.H2Configuration(
        client_side=True,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        validate_inbound_headers=False,
    )
    conn = h2.connection.H2Connection(config)
    with connect(demo, port, tls, ["h2"]) as sock:
        if tls:
            assert sock.selected_alpn_protocol() == "h2"
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        conn.send_headers(stream, headers, end_stream=True)
        sock.sendall(conn.data_to_send())
        status, got, body = None, {}, b""
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                return H2Outcome(None, "eof")
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream:
                    for name, value in event.headers:
                        if name == b":status":
                            status = int(value)
                        else:
                            got[name.decode().lower()] = value.decode("latin-1")
                elif isinstance(event, h2.events.DataReceived) and event.stream_id == stream:
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream:
                    return H2Outcome(Response(status, got, body), "response")
                elif isinstance(event, h2.events.StreamReset) and event.stream_id == stream:
                    return H2Outcome(None, "reset")
                elif isinstance(event, h2.events.ConnectionTerminated):
                    return H2Outcome(None, "goaway")
            sock.sendall(conn.data_to_send())


def get2(demo, port, tls, scheme: str, host: bytes | str, path, headers=()) -> H2Outcome:
    if isinstance(host, str):
        host = host.encode()
    fields = [
        (b":method", b"GET"),
        (b":scheme", scheme.encode()),
        (b":authority", host),
        (b":path", path.encode()),
    ]
    fields += [(k.encode(), v.encode()) for k, v in headers]
    return http2(demo, port, tls, fields)


def only(seen):
    assert len(seen) == 1, seen
    return seen[0]


# --- follow: the viewer's connection decides --------------------------------------


@pytest.mark.parametrize("protocol", ["HTTP/1.1", "HTTP/2"])
@pytest.mark.parametrize("use_remote_address", [False, True])
@pytest.mark.parametrize("viewer", ["http", "https"])
def test_follow_uses_the_viewer_connection_not_what_the_viewer_claims(
    viewer_edge, path, viewer, use_remote_address, protocol
):
    """An HTTP viewer forging `x-forwarded-proto: https` (and, over HTTP/2,
    `:scheme: https`) is fetched over HTTP; an HTTPS viewer claiming HTTP is
    fetched over HTTPS."""
    port = VIEWER_PORTS[(viewer, use_remote_address)]
    tls = viewer == "https"
    claimed = OTHER[viewer]
    forged = [("x-forwarded-proto", claimed)]
    if protocol == "HTTP/1.1":
        r = get1(viewer_edge.demo, port, tls, FOLLOW, path, forged)
    else:
        outcome = get2(viewer_edge.demo, port, tls, claimed, FOLLOW, path, forged)
        assert outcome.ended_by == "response", outcome
        r = outcome.response
    assert r.status == 200, (r.status, r.headers, r.body[:300])
    got = only(viewer_edge.seen(path))
    assert (got.origin, got.scheme, got.port, got.sni) == FETCHED[viewer]
    assert got.host == FOLLOW
    assert f"scheme={viewer}" in r.header("x-origin-decision")


@pytest.mark.parametrize(
    "viewer, forwarded_proto, fetched",
    [
        ("http", "https", "https"),  # trusted: the header wins
        ("https", "http", "http"),
        ("http", "gopher", "http"),  # not a protocol: the connection decides
        ("https", "gopher", "https"),
        ("https", None, "https"),
    ],
)
def test_a_trusted_x_forwarded_proto_wins_when_valid(
    viewer_edge, path, viewer, forwarded_proto, fetched
):
    headers = [("x-forwarded-proto", forwarded_proto)] if forwarded_proto else []
    r = get1(viewer_edge.demo, TRUSTING_PORTS[viewer], viewer == "https", FOLLOW, path, headers)
    assert r.status == 200, (r.status, r.headers, r.body[:300])
    got = only(viewer_edge.seen(path))
    assert (got.origin, got.scheme, got.port, got.sni) == FETCHED[fetched]
    assert f"scheme={fetched}" in r.header("x-origin-decision")


# --- malformed Host ----------------------------------------------------------------

RAW_UTF8_HOST = "Bücher.example".encode()


@pytest.mark.parametrize("viewer", ["http", "https"])
def test_a_raw_utf8_host_over_http1_is_envoys_own_400(viewer_edge, path, viewer):
    bad_host_before = viewer_edge.counter("bad_host")
    r = get1(viewer_edge.demo, VIEWER_PORTS[(viewer, False)], viewer == "https", RAW_UTF8_HOST, path)
    assert r.status == 400
    assert r.body == b"Bad Request"
    assert r.header("x-origin-error") is None, "Envoy answers before the filter runs"
    assert viewer_edge.seen(path) == []
    assert viewer_edge.counter("bad_host") == bad_host_before


@pytest.mark.parametrize("viewer", ["http", "https"])
def test_a_raw_utf8_host_over_http2_gets_no_response(viewer_edge, path, viewer):
    outcome = get2(
        viewer_edge.demo, VIEWER_PORTS[(viewer, False)], viewer == "https", viewer, RAW_UTF8_HOST, path
    )
    assert outcome.response is None
    assert outcome.ended_by in ("reset", "goaway", "eof")
    assert viewer_edge.seen(path) == []


@pytest.mark.parametrize(
    "first, second",
    [("media.example.com", "www.example.com"), ("media.example.com", "media.example.com")],
)
@pytest.mark.parametrize("viewer", ["http", "https"])
def test_two_host_headers_are_conflicting_host_values(viewer_edge, path, viewer, first, second):
    request = (
        f"GET {path} HTTP/1.1\r\nhost: {first}\r\nhost: {second}\r\nconnection: close\r\n\r\n"
    ).encode()
    r = http1(viewer_edge.demo, VIEWER_PORTS[(viewer, False)], viewer == "https", request)
    assert r.status == 400
    assert r.header("x-origin-error") == "bad host: conflicting Host values"
    assert viewer_edge.seen(path) == []


@pytest.mark.parametrize("viewer", ["http", "https"])
def test_header_bytes_that_are_not_utf8_do_not_stop_the_filter(viewer_edge, path, viewer):
    """Envoy passes obs-text (RFC 9110 5.5) in header values; the filter reads
    values as bytes, so such a request is served and the worker's VM lives on."""
    port = VIEWER_PORTS[(viewer, False)]
    for i in range(3):
        request = (
            f"GET {path}/{i} HTTP/1.1\r\nhost: media.example.com\r\n".encode()
            + b"x-note: caf\xe9 \xff\xfe\r\nconnection: close\r\n\r\n"
        )
        r = http1(viewer_edge.demo, port, viewer == "https", request)
        assert r.status == 200, r
        assert r.header("x-origin-decision").startswith("domain=media.example.com")
        assert len(viewer_edge.seen(f"{path}/{i}")) == 1


# --- what the origin receives ----------------------------------------------------


@pytest.mark.parametrize("protocol", ["HTTP/1.1", "HTTP/2"])
@pytest.mark.parametrize("viewer", ["http", "https"])
def test_the_origin_receives_neither_the_cluster_header_nor_envoys_timeout(
    viewer_edge, path, viewer, protocol
):
    port, tls = VIEWER_PORTS[(viewer, False)], viewer == "https"
    # A viewer's own copy of the cluster header goes too.
    own = [("x-origin-cluster", "www_secondary")]
    if protocol == "HTTP/1.1":
        r = get1(viewer_edge.demo, port, tls, FOLLOW, path, own)
    else:
        r = get2(viewer_edge.demo, port, tls, viewer, FOLLOW, path, own).response
    assert r.status == 200
    got = only(viewer_edge.seen(path))
    assert got.origin == FETCHED[viewer][0]
    assert not got.header_names() & EDGE_ONLY_HEADERS, got.headers


@pytest.mark.parametrize("viewer", ["http", "https"])
def test_through_the_shipped_edge_the_origin_receives_no_edge_header(edge, path, viewer):
    r = edge.request(FOLLOW, path, scheme=viewer, headers={"x-origin-cluster": "www_secondary"})
    assert r.status == 200
    got = only(edge.seen(path))
    assert got.origin == FETCHED[viewer][0]
    assert not got.header_names() & EDGE_ONLY_HEADERS, got.headers


def test_through_the_shipped_edge_an_uncached_answer_has_no_envoy_timing_header(edge, path):
    # A POST goes through the cache tier's router (suppress_envoy_headers). A
    # cacheable GET does not: cache_v2 fetches a miss with its own upstream
    # client, whose x-envoy-upstream-service-time the viewer does get.
    r = edge.request("plain.example.com", path, method="POST", body=b"x")
    assert r.status == 200
    assert r.header("x-envoy-upstream-service-time") is None
    assert not only(edge.seen(path)).header_names() & EDGE_ONLY_HEADERS


def failed_over(viewer_edge, path):
    r = get1(viewer_edge.demo, VIEWER_PORTS[("http", False)], False, "www.example.com", path)
    assert r.status == 200
    assert [s.origin for s in viewer_edge.seen(path)] == ["www-primary", "www-secondary"]
    return viewer_edge.seen(path)


def test_a_failed_over_request_reaches_the_secondary_without_the_cluster_header(
    viewer_edge, path
):
    primary, secondary = failed_over(viewer_edge, path)
    assert not primary.header_names() & EDGE_ONLY_HEADERS, primary.headers
    assert "x-origin-cluster" not in secondary.header_names(), secondary.headers


def test_the_secondary_gets_no_header_of_the_edge(viewer_edge, path):
    """Envoy's router re-sends the request itself: the listener's route and
    router settings apply to the secondary as to the primary."""
    _, secondary = failed_over(viewer_edge, path)
    leaked = secondary.header_names() & (EDGE_ONLY_HEADERS | {"x-envoy-internal"})
    assert not leaked, secondary.headers


# --- failover when nothing answers -------------------------------------------------


def test_both_origins_refusing_is_a_502_naming_the_secondary_connect_failure(
    viewer_edge, path
):
    r = get1(viewer_edge.demo, VIEWER_PORTS[("http", False)], False, "both-refused.test", path)
    assert r.status == 502
    error = r.header("x-origin-error")
    assert error == (
        "orig failed; failover=secondary; secondary connect failed (Connection refused)"
    )
    assert "secondary response 503" not in error


# --- a push is one event per Envoy process ----------------------------------------


@contextmanager
def invalid_push(viewer_edge):
    """Pushes the bundle with the follow domain's port out of range, straight
    into the ECDS file (as `bundle` would refuse to write it); yields the log
    lines it caused once every VM has had time to configure it; then puts the
    valid bundle back."""
    ecds_path = viewer_edge.run_dir / ECDS_FILE
    valid = ecds_path.read_text()
    ecds = json.loads(valid)
    typed = ecds["resources"][0]["typed_config"]["config"]
    config = json.loads(typed["configuration"]["value"])
    for p in config["policies"]:
        if p["domain"] == FOLLOW:
            p["primary"]["port"] = 0
    typed["configuration"]["value"] = json.dumps(config)
    try:
        yield push(viewer_edge.envoy, ecds_path, json.dumps(ecds))
    finally:
        push(viewer_edge.envoy, ecds_path, valid)


def push(envoy, ecds_path: Path, text: str) -> list[str]:
    """Writes an ECDS resource as `bundle` does; the filter's log lines it caused."""
    log_before = len(envoy.log_text())
    write_atomically(ecds_path, text)
    wait_for_log(envoy, log_before, "origin policies loaded")
    # Every worker's VM configures the push too, a little later.
    time.sleep(2)
    return [line for line in envoy.log_text()[log_before:].splitlines() if "wasm log" in line]


def wait_for_log(envoy, offset: int, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in envoy.log_text()[offset:]:
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{envoy.log_tail()}"
        time.sleep(0.05)


@dataclass
class Push:
    log: list[str]  # the filter's log lines the push caused
    rejected: int  # what it added to policy.rejected
    applied: int  # and to config.applied
    served_by: list[str]  # which origin a request for the domain reached meanwhile


@pytest.fixture(scope="module")
def first_invalid_push(viewer_edge, demo_origins):
    """One invalid push, the first push this Envoy sees (as an operator's first
    push after a restart). Every VM applies it: the main thread's, each of the
    two workers', and, on the main thread, a VM Envoy creates for the new
    configuration."""
    assert viewer_edge.envoy.concurrency == 2
    rejected = viewer_edge.counter("policy.rejected")
    applied = viewer_edge.counter("config.applied")
    with invalid_push(viewer_edge) as log:
        path = f"/t/{uuid.uuid4().hex}"
        r = get1(viewer_edge.demo, VIEWER_PORTS[("http", False)], False, FOLLOW, path)
        assert r.status == 200
        yield Push(
            log,
            viewer_edge.counter("policy.rejected") - rejected,
            viewer_edge.counter("config.applied") - applied,
            [s.origin for s in viewer_edge.seen(path)],
        )


def test_one_invalid_policy_is_counted_once_per_process(first_invalid_push):
    assert first_invalid_push.rejected == 1
    assert first_invalid_push.applied == 1


def test_one_invalid_policy_is_logged_once_per_process(first_invalid_push):
    log = first_invalid_push.log
    rejected = [line for line in log if "policy rejected:" in line]
    assert len(rejected) == 1, "\n".join(log)
    assert f"{FOLLOW}: /primary/port" in rejected[0]


def test_the_domain_keeps_its_last_good_policy_and_the_log_says_so_once(first_invalid_push):
    assert first_invalid_push.served_by == ["media"]
    log = first_invalid_push.log
    kept = [line for line in log if f"{FOLLOW}: keeping the last good policy" in line]
    assert len(kept) == 1, "\n".join(log)
    # What the log says is served is what is served: all three domains.
    loaded = [line for line in log if "origin policies loaded" in line]
    assert len(loaded) == 1, "\n".join(log)
    assert loaded[0].endswith("origin policies loaded: 3 domains (1 rejected)"), loaded


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.rename(tmp, path)


# --- a viewer's own x-envoy-* headers ------------------------------------------------


VIEWER_ROUTING = {
    "x-envoy-retry-on": "5xx,connect-failure",
    "x-envoy-retriable-status-codes": "503",
    "x-envoy-max-retries": "3",
    "x-envoy-upstream-rq-timeout-ms": "100",
    "x-envoy-upstream-rq-per-try-timeout-ms": "100",
}


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_loopback_viewer_cannot_ask_for_retries_or_timeouts(edge, path, method):
    """A viewer on a loopback or private address would count as internal to
    Envoy and keep its x-envoy-* headers: the viewer tier treats no address
    as internal, so they are dropped before any router reads them."""
    body = b"x" if method == "POST" else None
    # plain.example.com has no secondary: the filter writes no retry header.
    failing = f"/status/plain/503{path}"
    r = edge.request("plain.example.com", failing, method=method, body=body,
                     headers=VIEWER_ROUTING)
    assert r.status == 503
    assert len(edge.seen(failing)) == 1, "retried on the viewer's word"
    slow = f"/delay/plain/600{path}"
    r = edge.request("plain.example.com", slow, method=method, body=body, headers=VIEWER_ROUTING)
    assert r.status == 200, (r.status, r.header("x-origin-error"))
    got = only(edge.seen(slow))
    assert not got.header_names() & set(VIEWER_ROUTING), got.headers


def test_a_viewer_envoy_counts_as_internal_cannot_ask_for_retries_or_timeouts(viewer_edge, path):
    """A viewer in an `internal_address_config` range is internal to Envoy,
    which then keeps its x-envoy-* headers: the filter removes them, so only
    the policy decides (media.example.com has no secondary)."""
    port = INTERNAL_VIEWER_PORT
    headers = list(VIEWER_ROUTING.items())
    failing = f"/status/media/503{path}"
    r = get1(viewer_edge.demo, port, False, FOLLOW, failing, headers)
    assert r.status == 503
    assert len(viewer_edge.seen(failing)) == 1, "retried on the viewer's word"
    slow = f"/delay/media/600{path}"
    r = get1(viewer_edge.demo, port, False, FOLLOW, slow, headers)
    assert r.status == 200, r.status
    got = only(viewer_edge.seen(slow))
    assert not got.header_names() & set(VIEWER_ROUTING), got.headers
