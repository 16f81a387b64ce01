"""Demo origin servers on 127.0.0.1 for the edge and its end-to-end tests.

Each origin answers with a JSON body saying what it saw (scheme, local port,
Host, TLS SNI, method, path, body size) and records every request, so tests can
tell what reached the origin and what the edge served from its cache.

Paths that change an answer, where WHO is an origin's name or `all`:
  /status/WHO/NNN/...   origin WHO answers with status NNN
  /delay/WHO/MS/...     origin WHO waits MS milliseconds before answering
  /pad/WHO/BYTES/...    origin WHO adds BYTES of padding to its body
Every echo answer under /forge/ also carries the edge's diagnostic headers
(`x-origin-error`, `x-origin-decision`), as an origin that tries to speak for
the edge would. The redirect origin answers 301 to the HTTPS URL (cacheable for an hour), 302
under /found/, and a cacheable 200 under /page/. The failing primary answers
503 unless told otherwise.

The site origin (static.example.com's primary) serves a small static site
with validators (ETag, Last-Modified; 304 to a matching If-None-Match, or to
an If-Modified-Since as recent when it sends no ETag) and a sitemap, for the
mirror; it counts the full answers it gave per path. A file can carry headers
of its own (or go without the default ETag, Last-Modified or Cache-Control),
and be gzip-encoded when the request accepts gzip, as origins that compress
on request do. Its
hostile paths: /huge (announces 10 GB), /endless (no length, never ends),
/drip (a byte a second), /loop/a <-> /loop/b (redirect loop), /moved (301 to
/style.css).

An origin can also be stopped (it hangs up, and its port then refuses
connections), started again, and told to answer every request with one status
(`DemoOrigins.stop`, `start`, `force_status`): how the soak makes a primary flap.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import trustme

# Certificate names an origin serves, chosen by the SNI the edge sends. The first
# is the default, served when the SNI matches none of them.
MULTI_TENANT_NAMES = [
    "default.origin.test",
    "origin-secure.example.net",
    "shop-origin.example.net",
    "buecher-origin.example.net",
]


@dataclass(frozen=True)
class OriginSpec:
    name: str
    port: int
    cert_names: tuple[str, ...] = ()
    kind: str = "echo"  # echo | redirect | failing | site
    # What an echo answer says about caching (the soak's unique paths must not
    # fill the edge's cache: it measures memory).
    cache_control: str = "max-age=60"
    # Any loopback address: two origins may share a port on two addresses.
    address: str = "127.0.0.1"

    @property
    def tls(self) -> bool:
        return bool(self.cert_names)


# Ports match the example policies (policies/), which name them.
DEMO_ORIGINS = [
    OriginSpec("plain", 18081),
    OriginSpec("media", 18082),
    OriginSpec("media-tls", 18444, ("media.example.com",)),
    OriginSpec("multi-tenant", 18443, tuple(MULTI_TENANT_NAMES)),
    OriginSpec("legacy", 8150),
    OriginSpec("img", 60080, ("img-origin.example.net",)),
    OriginSpec("redirect", 18083, kind="redirect"),
    OriginSpec("www-primary", 18084, kind="failing"),
    OriginSpec("www-secondary", 18085),
    OriginSpec("dynamic", 18086),
    OriginSpec("site", 18087, kind="site"),
]

# static.example.com's secondary: `origin-policy mirror-serve` (not a demo origin).
MIRROR_SERVE_PORT = 18089


def demo_site() -> dict[str, tuple[str, bytes]]:
    """The site origin's files: path -> (content type, body)."""
    return {
        "/": ("text/html", b"<!doctype html><title>static</title><link rel=stylesheet href=/style.css>\n"),
        "/style.css": ("text/css", b"body { font-family: sans-serif }\n"),
        "/app.js": ("application/javascript", b"console.log('static');\n"),
        "/img/logo.svg": ("image/svg+xml", b"<svg xmlns='http://www.w3.org/2000/svg'/>\n"),
    }


@dataclass
class Site:
    """The site origin's files, changeable while it runs, and what it served."""

    files: dict[str, tuple[str, bytes]] = field(default_factory=demo_site)
    # path -> when its body last changed (Last-Modified).
    changed: dict[str, float] = field(default_factory=dict)
    # path -> full (200) answers given.
    full_answers: dict[str, int] = field(default_factory=dict)
    # path -> headers of its own; None drops a default (etag, last-modified,
    # cache-control).
    headers: dict[str, dict[str, str | None]] = field(default_factory=dict)
    # Paths sent gzip-encoded to a request that accepts gzip.
    gzip_on_request: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def put(
        self,
        path: str,
        content_type: str,
        body: bytes,
        headers: dict[str, str | None] | None = None,
        gzip_on_request: bool = False,
    ) -> None:
        with self.lock:
            self.files[path] = (content_type, body)
            self.changed[path] = time.time()
            self.headers[path] = {k.lower(): v for k, v in (headers or {}).items()}
            if gzip_on_request:
                self.gzip_on_request.add(path)
            else:
                self.gzip_on_request.discard(path)

    def remove(self, path: str) -> None:
        with self.lock:
            self.files.pop(path, None)
            self.headers.pop(path, None)
            self.gzip_on_request.discard(path)

    def served(self, path: str) -> int:
        with self.lock:
            return self.full_answers.get(path, 0)

    def sitemap(self, host: str) -> bytes:
        with self.lock:
            paths = sorted(self.files)
        urls = "".join(f"<url><loc>https://{host}{p}</loc></url>" for p in paths)
        return (
            '<?xml version="1.0" encoding="UTF-8"?>'
            f'<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">{urls}</urlset>'
        ).encode()

    def lookup(self, path: str) -> tuple[str, bytes, float] | None:
        with self.lock:
            if path not in self.files:
                return None
            content_type, body = self.files[path]
            self.full_answers.setdefault(path, 0)
            return content_type, body, self.changed.get(path, 1_700_000_000.0)

    def own_headers(self, path: str) -> tuple[dict[str, str | None], bool]:
        """The path's headers of its own, and whether it is gzipped on request."""
        with self.lock:
            return dict(self.headers.get(path, {})), path in self.gzip_on_request

    def count(self, path: str) -> None:
        with self.lock:
            self.full_answers[path] = self.full_answers.get(path, 0) + 1


@dataclass
class Seen:
    origin: str
    scheme: str
    port: int
    host: str
    sni: str | None
    method: str
    path: str
    body_bytes: int
    # Every request header as received (names in lower case), in order; not
    # part of the JSON answer.
    headers: list[tuple[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict:
        out = self.__dict__.copy()
        del out["headers"]
        return out

    def header_names(self) -> set[str]:
        return {name for name, _ in self.headers}


@dataclass
class RequestLog:
    """Every request any demo origin received, in order (only counted when
    `keep` is false, for long runs)."""

    keep: bool = True
    count: int = 0
    entries: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, seen: Seen) -> None:
        with self.lock:
            self.count += 1
            if self.keep:
                self.entries.append(seen)

    def matching(self, path: str, origin: str | None = None) -> list[Seen]:
        with self.lock:
            return [
                e
                for e in self.entries
                if e.path == path and (origin is None or e.origin == origin)
            ]


class Certificates:
    """A throwaway CA and the certificates the edge and the origins present."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA(organization_name="origin-policy demo CA")
        self.ca_file = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        edge = self.ca.issue_cert(
            "*.example.com",
            "example.com",
            "*.img.example.com",
            "xn--bcher-kva.example",
            "localhost",
            "127.0.0.1",
        )
        self.edge_cert = directory / "edge.pem"
        self.edge_key = directory / "edge-key.pem"
        edge.cert_chain_pems[0].write_to_path(str(self.edge_cert))
        edge.private_key_pem.write_to_path(str(self.edge_key))

    def server_context(self, name: str) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ca.issue_cert(name).configure_cert(ctx)
        return ctx


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out as two writes; without this, Nagle and delayed
    # ACKs add 40 ms to an answer on a kept-alive connection.
    disable_nagle_algorithm = True
    server: "_OriginServer"

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass

    def setup(self):
        super().setup()
        self.sni = getattr(self.request, "origin_sni", None)

    def _site(self) -> None:
        """The site origin's answer (see the module's docstring)."""
        site: Site = self.server.site
        path = self.path
        host = self.headers.get("host", "")
        self.server.log.add(
            Seen("site", "http", self.server.spec.port, host, None, self.command, path, 0,
                 [(k.lower(), v) for k, v in self.headers.items()])
        )
        if path in ("/huge", "/endless", "/drip"):
            self.send_response(200)
            self.send_header("content-type", "application/octet-stream")
            if path == "/huge":
                self.send_header("content-length", str(10 * 1000**3))
            else:
                self.send_header("connection", "close")
            self.end_headers()
            chunk = b"\0" * (1 if path == "/drip" else 65536)
            try:
                for _ in range(1_000_000):
                    self.wfile.write(chunk)
                    if path == "/drip":
                        self.wfile.flush()
                        time.sleep(1)
            except OSError:
                pass
            self.close_connection = True
            return
        redirects = {"/loop/a": "/loop/b", "/loop/b": "/loop/a", "/moved": "/style.css"}
        if path in redirects:
            self.send_response(302 if path.startswith("/loop/") else 301)
            self.send_header("location", redirects[path])
            self.send_header("content-length", "0")
            self.end_headers()
            return
        if path == "/sitemap.xml":
            found = ("application/xml", site.sitemap("static.example.com"), 0.0)
        else:
            # A directory's page is also its index.html, as static servers have it.
            found = site.lookup(path.removesuffix("index.html"))
        if found is None:
            self.send_response(404)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        content_type, body, changed = found
        own, gzip_on_request = site.own_headers(path.removesuffix("index.html"))
        if gzip_on_request and "gzip" in self.headers.get("accept-encoding", ""):
            body = gzip.compress(body, mtime=0)
            own = {**own, "content-encoding": "gzip"}
        if gzip_on_request:
            own = {**own, "vary": "accept-encoding"}
        headers = {
            "content-type": content_type,
            "cache-control": "max-age=300",
            "etag": '"' + hashlib.sha256(body).hexdigest()[:16] + '"',
            "last-modified": self.date_time_string(int(changed)),
            **own,
        }
        headers = {k: v for k, v in headers.items() if v is not None}
        etag, last_modified = headers.get("etag"), headers.get("last-modified")
        asked_since = self.headers.get("if-modified-since")
        if (etag and self.headers.get("if-none-match") == etag) or (
            not etag and last_modified and asked_since == last_modified
        ):
            self.send_response(304)
            for name in ("etag", "last-modified"):
                if name in headers:
                    self.send_header(name, headers[name])
            self.end_headers()
            return
        site.count(path)
        self.send_response(200)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _answer(self):
        if self.server.spec.kind == "site":
            return self._site()
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        spec = self.server.spec
        seen = Seen(
            origin=spec.name,
            scheme="https" if spec.tls else "http",
            port=spec.port,
            host=self.headers.get("host", ""),
            sni=self.sni,
            method=self.command,
            path=self.path,
            body_bytes=len(body),
            headers=[(k.lower(), v) for k, v in self.headers.items()],
        )
        self.server.log.add(seen)
        status, headers = 200, {"cache-control": spec.cache_control}
        padding = 0
        told = re.match(r"^(?:/forge)?/(status|delay|pad)/([\w-]+)/(\d+)/", self.path)
        forced = self.server.forced_status.get(spec.name)
        if forced is not None:
            status = forced
        elif told and told.group(2) in (spec.name, "all"):
            if told.group(1) == "pad":
                padding = int(told.group(3))
                if spec.kind == "failing":
                    status = 503
            elif told.group(1) == "delay":
                time.sleep(int(told.group(3)) / 1000)
            else:
                status = int(told.group(3))
        elif spec.kind == "failing":
            status = 503
        elif spec.kind == "redirect":
            headers = {"cache-control": "max-age=3600"}
            if not self.path.startswith("/page/"):
                status = 302 if self.path.startswith("/found/") else 301
                headers["location"] = f"https://{seen.host}{self.path}"
        if self.path.startswith("/forge/"):
            headers["x-origin-error"] = "forged by the origin"
            headers["x-origin-decision"] = "forged by the origin"
        payload = json.dumps(seen.as_dict()).encode() + b"\n" + b"x" * padding
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_HEAD = do_OPTIONS = do_DELETE = _answer


class _OriginServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

    def __init__(
        self,
        spec: OriginSpec,
        log: RequestLog,
        certs: Certificates | None,
        forced_status: dict[str, int],
        site: "Site",
    ):
        self.spec = spec
        self.site = site
        self.log = log
        self.forced_status = forced_status
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.tls: ssl.SSLContext | None = None
        if spec.tls:
            if certs is None:
                raise ValueError(f"origin {spec.name} needs certificates")
            by_name = {n: certs.server_context(n) for n in spec.cert_names}
            default = by_name[spec.cert_names[0]]

            def pick(sock, server_name, _ctx):
                sock.origin_sni = server_name
                sock.context = by_name.get(server_name or "", default)

            default.sni_callback = pick
            self.tls = default
        super().__init__((spec.address, spec.port), _Handler)

    def handle_error(self, request, client_address):
        # The edge hanging up on a slow answer (its timeout) is expected here.
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)

    def finish_request(self, request, client_address):
        accepted = request
        with self.connections_lock:
            self.connections.add(accepted)
        try:
            # The handshake runs on the connection's own thread, so a slow or
            # failed one never blocks the accept loop.
            if self.tls is not None:
                try:
                    request = self.tls.wrap_socket(request, server_side=True)
                except (ssl.SSLError, OSError):
                    return
            super().finish_request(request, client_address)
        finally:
            with self.connections_lock:
                self.connections.discard(accepted)

    def close_connections(self) -> None:
        """Hangs up every connection this server accepted (kept-alive ones
        would otherwise go on being answered after the port is closed)."""
        with self.connections_lock:
            connections = list(self.connections)
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class NameServer:
    """A DNS server on 127.0.0.1 (UDP). By default it knows no name: every
    query is answered NXDOMAIN. The edge's origins named by DNS are looked up
    here (`settings.dns_resolvers`), so no query leaves the machine and a name
    that never resolves fails at once. A name in `names` has that IPv4 address
    (a one-second TTL, so a test can re-bind it); given `every_name_is`, every
    other name has that one (a benchmark's many origin names)."""

    def __init__(self, port: int, every_name_is: str | None = None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", port))
        self.address = f"127.0.0.1:{port}"
        self.answer = socket.inet_aton(every_name_is) if every_name_is else None
        self.names: dict[str, str] = {}
        self.queries: list[str] = []
        self.thread = threading.Thread(target=self._serve, name="dns", daemon=True)

    @staticmethod
    def _question(query: bytes) -> tuple[str, bytes]:
        at, labels = 12, []
        while query[at]:
            labels.append(query[at + 1 : at + 1 + query[at]].decode("ascii", "replace"))
            at += 1 + query[at]
        return ".".join(labels), query[12 : at + 5]

    def _serve(self) -> None:
        while True:
            try:
                query, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            try:
                name, question = self._question(query)
            except IndexError:
                continue
            self.queries.append(name)
            qtype = question[-4:-2]
            known = self.names.get(name.lower())
            answer = socket.inet_aton(known) if known else self.answer
            if answer is not None and qtype == b"\x00\x01":
                # Same id; a response, recursion desired and available, no
                # error; one question, one answer: the question's name (a
                # pointer to it), A, IN, a TTL (a second or an hour), the address.
                ttl = b"\x00\x00\x00\x01" if known else b"\x00\x00\x0e\x10"
                header = query[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00"
                record = b"\xc0\x0c\x00\x01\x00\x01" + ttl + b"\x00\x04" + answer
                self.sock.sendto(header + question + record, peer)
                continue
            # Same id; a response, recursion desired and available, NXDOMAIN
            # (no error, no record, for another type of a known name); one
            # question, no records.
            rcode = b"\x81\x80" if answer is not None else b"\x81\x83"
            header = query[:2] + rcode + b"\x00\x01" + b"\x00\x00" * 3
            self.sock.sendto(header + question, peer)

    def __enter__(self) -> "NameServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()


class DemoOrigins:
    """Runs a set of origins in background threads of this process."""

    def __init__(
        self, specs: list[OriginSpec], certs: Certificates | None, keep_log: bool = True
    ):
        self.log = RequestLog(keep=keep_log)
        self.certs = certs
        self.specs = {s.name: s for s in specs}
        # Origin name -> the status it answers every request with, whatever
        # the path says; shared with the servers, kept across a restart.
        self.forced_status: dict[str, int] = {}
        self.site = Site()
        self.servers: dict[str, _OriginServer] = {}
        # Servers are bound here, so a port already taken fails at once.
        for name in self.specs:
            self._bind(name)

    def _bind(self, name: str) -> _OriginServer:
        server = _OriginServer(
            self.specs[name], self.log, self.certs, self.forced_status, self.site
        )
        self.servers[name] = server
        return server

    def start(self, name: str | None = None) -> None:
        """Serves one origin (bound again if it was stopped), or all of them."""
        for n in [name] if name else list(self.specs):
            server = self.servers.get(n) or self._bind(n)
            if server.thread is None:
                server.thread = threading.Thread(target=server.serve_forever, name=n, daemon=True)
                server.thread.start()

    def stop(self, name: str | None = None) -> None:
        """Closes one origin's port, so that connections to it are refused, and
        hangs up the connections it had accepted; or all origins'."""
        for n in [name] if name else list(self.servers):
            server = self.servers.pop(n, None)
            if server is None:
                continue
            if server.thread is not None:
                server.shutdown()
            server.server_close()
            server.close_connections()

    def running(self, name: str) -> bool:
        return name in self.servers

    def force_status(self, name: str, status: int | None) -> None:
        """Origin `name` answers every request with `status` (None: as usual)."""
        if status is None:
            self.forced_status.pop(name, None)
        else:
            self.forced_status[name] = status

    def __enter__(self) -> "DemoOrigins":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
