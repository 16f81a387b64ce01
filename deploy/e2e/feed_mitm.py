"""A man in the middle on an Envoy's policy feed, for test_fleet_tls.py.

It listens where the Envoy's feed cluster points. At first it relays every
connection, byte for byte, to the real server (the Envoy and the server do
their mTLS end to end through it). `impersonate(cert, key, page)` cuts the
relayed connections and from then on ends TLS itself with the certificate
given, answering every poll with a forged page; what the Envoy's handshakes
and polls did is recorded.
"""

from __future__ import annotations

import socket
import ssl
import threading
from urllib.parse import parse_qs, urlparse


class FeedMitm:
    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int]):
        self.listen = listen
        self.upstream = upstream
        self.forged: tuple[ssl.SSLContext, str] | None = None
        self.relayed: list[socket.socket] = []
        self.handshakes_failed: list[str] = []
        self.pages_served = 0
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.server = socket.create_server(listen)
        self.server.settimeout(0.2)
        self.thread = threading.Thread(target=self.accept, daemon=True)

    def __enter__(self) -> "FeedMitm":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join()
        self.server.close()
        self.cut()

    def impersonate(self, cert: str, key: str, page: str) -> None:
        """From now on: TLS with `cert` and `page` (feed lines) to every poll."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        with self.lock:
            self.forged = (context, page)
            self.handshakes_failed.clear()
            self.pages_served = 0
        self.cut()

    def cut(self) -> None:
        with self.lock:
            relayed, self.relayed = self.relayed, []
        for s in relayed:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                forged = self.forged
            target = self.forge if forged else self.relay
            threading.Thread(target=target, args=(conn, *([forged] if forged else [])), daemon=True).start()

    def relay(self, conn: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            conn.close()
            return
        upstream.settimeout(None)
        with self.lock:
            self.relayed += [conn, upstream]

        def pump(source: socket.socket, sink: socket.socket) -> None:
            try:
                while data := source.recv(65536):
                    sink.sendall(data)
            except OSError:
                pass
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        threading.Thread(target=pump, args=(upstream, conn), daemon=True).start()
        pump(conn, upstream)

    def forge(self, conn: socket.socket, forged: tuple[ssl.SSLContext, str]) -> None:
        context, page = forged
        conn.settimeout(10)
        try:
            tls = context.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError) as e:
            with self.lock:
                self.handshakes_failed.append(str(e))
            conn.close()
            return
        try:
            buffered = b""
            while True:
                while b"\r\n\r\n" not in buffered:
                    data = tls.recv(65536)
                    if not data:
                        return
                    buffered += data
                head, _, buffered = buffered.partition(b"\r\n\r\n")
                target = head.split(b"\r\n")[0].split(b" ")[1].decode()
                query = parse_qs(urlparse(target).query)
                since = int(query.get("since", ["0"])[0])
                epoch = query.get("epoch", [""])[0] or "1"
                body = page.encode()
                tls.sendall(
                    b"HTTP/1.1 200 OK\r\n"
                    + f"x-feed-version: {since + 1000}\r\nx-feed-epoch: {epoch}\r\n".encode()
                    + f"content-length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                with self.lock:
                    self.pages_served += 1
        except (OSError, IndexError, ValueError):
            pass
        finally:
            tls.close()
