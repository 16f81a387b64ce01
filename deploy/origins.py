"""Demo origin servers on 127.0.0.1 for the edge and its end-to-end tests.

Each origin answers with a JSON body saying what it saw (scheme, local port,
Host, TLS SNI, method, path, body size) and records every request, so tests can
tell what reached the origin and what the edge served from its cache.

Paths that change an answer, where WHO is an origin's name or `all`:
  /status/WHO/NNN/...   origin WHO answers with status NNN
  /delay/WHO/MS/...     origin WHO waits MS milliseconds before answering
  /pad/WHO/BYTES/...    origin WHO adds BYTES of padding to its body
The redirect origin answers 301 to the HTTPS URL (cacheable for an hour), 302
under /found/, and a cacheable 200 under /page/. The failing primary answers
503 unless told otherwise.
"""

from __future__ import annotations

import json
import re
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
    kind: str = "echo"  # echo | redirect | failing

    @property
    def tls(self) -> bool:
        return bool(self.cert_names)


# Ports match the clusters in deploy/envoy/edge.yaml.
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
]


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

    def as_dict(self) -> dict:
        return self.__dict__.copy()


@dataclass
class RequestLog:
    """Every request any demo origin received, in order."""

    entries: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, seen: Seen) -> None:
        with self.lock:
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
    server: "_OriginServer"

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass

    def setup(self):
        super().setup()
        self.sni = getattr(self.request, "origin_sni", None)

    def _answer(self):
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
        )
        self.server.log.add(seen)
        status, headers = 200, {"cache-control": "max-age=60"}
        padding = 0
        told = re.match(r"^/(status|delay|pad)/([\w-]+)/(\d+)/", self.path)
        if told and told.group(2) in (spec.name, "all"):
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

    def __init__(self, spec: OriginSpec, log: RequestLog, certs: Certificates | None):
        self.spec = spec
        self.log = log
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
        super().__init__(("127.0.0.1", spec.port), _Handler)

    def handle_error(self, request, client_address):
        # The edge hanging up on a slow answer (its timeout) is expected here.
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)

    def finish_request(self, request, client_address):
        # The handshake runs on the connection's own thread, so a slow or failed
        # one never blocks the accept loop.
        if self.tls is not None:
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                return
        super().finish_request(request, client_address)


class DemoOrigins:
    """Runs a set of origins in background threads of this process."""

    def __init__(self, specs: list[OriginSpec], certs: Certificates | None):
        self.log = RequestLog()
        self.servers = [_OriginServer(s, self.log, certs) for s in specs]
        self.threads = [
            threading.Thread(target=s.serve_forever, name=s.spec.name, daemon=True)
            for s in self.servers
        ]

    def __enter__(self) -> "DemoOrigins":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        for s in self.servers:
            s.shutdown()
            s.server_close()
