"""A fleet node: the edge's Envoy (deploy/envoy/edge.yaml) with its own ports,
a node identity, and every late-bound resource from the control plane over ADS
instead of from files.

- Every `config_discovery` filter (the origin-policy filter, and the origin
  networks' upstream RBAC filter of the router) reads its
  configuration over ADS with no initial fetch timeout: a new Envoy warms its
  listeners until it has the filter, so it never answers a request without it
  (Envoy's default after a timeout would be the filter disabled and every
  request refused with a 500).
- Clusters come over ADS too (CDS), for the origin clusters a bundle may carry;
  the static clusters of edge.yaml stay.
- The policies come per domain from the control plane's feed (its HTTP
  port): the feed singleton, as on a single edge (`with_feed`).
- The ADS stream reconnects with a short backoff: when the control plane
  stops, Envoy keeps serving what it has, and resubscribes when it returns.
- With `tls` (a `NodeTls`), both clusters to the control plane (ADS and the
  feed) carry an `UpstreamTlsContext`: the node's certificate, and the
  server's checked against the CA and its SAN URI
  (`spiffe://origin-policy/server/...`). Envoy reads the certificate, its key
  and the CA through file-based SDS (`NodeCertificates`): a new certificate
  put in place (`NodeCertificates.install`) is taken for new connections,
  with no restart.
- With several control-plane replicas (`replicas=`), the ADS and the feed
  cluster list each, health-checked on its /healthz, so that a node moves to
  another replica when one stops serving (`list_replicas`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edge import (  # noqa: E402
    ENVOY,
    FEED_CLUSTER,
    SERVER_IDENTITY_PREFIX,
    VIEWER_HTTP_PORT,
    VIEWER_HTTPS_PORT,
    EdgeError,
    Envoy,
    http_get,
    with_feed,
)

CONTROL_PLANE_CLUSTER = "fleet_control_plane"
FLEET_CLUSTER = "origin-policy-fleet"
# Each replica's /healthz: 200 while it can serve, 503 while its store is
# unreachable or it is catching up.
HEALTH_PATH = "/healthz"


@dataclass(frozen=True)
class Replica:
    """How an Envoy reaches one control-plane replica: its address, its ADS
    port and its HTTP port (the feed, the API, /status and /healthz)."""
    address: str
    ads_port: int
    http_port: int


@dataclass(frozen=True)
class NodeTls:
    """A node's files for the control plane's mTLS: the CA the server's
    certificate must chain to, the node's certificate and key (`certs issue
    DIR --node ID`; without them the node presents none)."""
    ca: Path
    cert: Path | None = None
    key: Path | None = None


# The two SDS resources (Secret) every node reads from its files.
CERT_SECRET = "origin-policy-node"
CA_SECRET = "origin-policy-ca"


class NodeCertificates:
    """A node's TLS files as its Envoy reads them, through file-based SDS,
    in `directory`:

        node-sds.json   the Secret CERT_SECRET: current/node.pem, current/node-key.pem
        ca-sds.json     the Secret CA_SECRET: current/ca.pem, the server's SAN URI
        current -> 2/   a symlink to the files in force (2/ca.pem, 2/node.pem, 2/node-key.pem)

    Both Secrets and both SDS sources watch `directory` (`watched_directory`):
    Envoy reads them again when an entry is moved into it. `install` writes
    the files into a new numbered directory, then renames a new symlink over
    `current` (the atomic swap): Envoy then uses the new certificate and CA
    for its new connections, with no restart; open connections keep the one
    they were made with."""

    def __init__(self, directory: Path):
        self.directory = directory

    @property
    def current(self) -> Path:
        return self.directory / "current"

    def generations(self) -> list[int]:
        if not self.directory.exists():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())

    def install(self, tls: NodeTls) -> Path:
        """`tls`'s files as the ones in force; the first call also writes the
        SDS resources. The new generation's directory."""
        self.directory.mkdir(parents=True, exist_ok=True)
        generation = self.directory / str(max(self.generations(), default=0) + 1)
        generation.mkdir()
        shutil.copyfile(tls.ca, generation / "ca.pem")
        if tls.cert is not None and tls.key is not None:
            shutil.copyfile(tls.cert, generation / "node.pem")
            key = generation / "node-key.pem"
            key.touch(mode=0o600)
            shutil.copyfile(tls.key, key)
        self.write_secrets()
        link = self.directory / ".current.new"
        link.unlink(missing_ok=True)
        link.symlink_to(generation.name)
        os.replace(link, self.current)
        return generation

    def write_secrets(self) -> None:
        watched = {"path": str(self.directory)}
        secrets = {
            "node-sds.json": {"name": CERT_SECRET, "tls_certificate": {
                "certificate_chain": {"filename": str(self.current / "node.pem")},
                "private_key": {"filename": str(self.current / "node-key.pem")},
                "watched_directory": watched}},
            "ca-sds.json": {"name": CA_SECRET, "validation_context": {
                "trusted_ca": {"filename": str(self.current / "ca.pem")},
                "match_typed_subject_alt_names": [
                    {"san_type": "URI", "matcher": {"prefix": SERVER_IDENTITY_PREFIX}}],
                "watched_directory": watched}},
        }  # fmt: skip
        for name, secret in secrets.items():
            path = self.directory / name
            if not path.exists():
                resource = {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
                            **secret}
                path.write_text(json.dumps({"resources": [resource]}, indent=2))

    def sds(self, name: str, file: str) -> dict:
        return {"name": name, "sds_config": {"path_config_source": {
            "path": str(self.directory / file), "watched_directory": {"path": str(self.directory)}}}}

    def transport_socket(self, with_certificate: bool = True) -> dict:
        """The `UpstreamTlsContext` of a cluster to `origin-policy serve --tls-*`:
        the node's certificate (none without `with_certificate`: a node the
        server refuses) and the server's checked against the CA and its SAN
        URI, both from the SDS files. No ALPN: the ADS cluster speaks HTTP/2
        by prior knowledge, the feed's HTTP/1.1."""
        common: dict = {"validation_context_sds_secret_config": self.sds(CA_SECRET, "ca-sds.json")}
        if with_certificate:
            common["tls_certificate_sds_secret_configs"] = [self.sds(CERT_SECRET, "node-sds.json")]
        return {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": common,
        }}  # fmt: skip


@dataclass(frozen=True)
class NodePorts:
    http: int
    https: int
    admin: int

    @classmethod
    def numbered(cls, base: int, index: int) -> "NodePorts":
        """Node `index` (from 1) gets base+10*index, +1, +2."""
        first = base + 10 * index
        return cls(first, first + 1, first + 2)


def ads_source() -> dict:
    return {"ads": {}, "resource_api_version": "V3", "initial_fetch_timeout": "0s"}


def control_plane_cluster(xds_port: int, address: str = "127.0.0.1") -> dict:
    return {
        "name": CONTROL_PLANE_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": CONTROL_PLANE_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": address, "port_value": xds_port}}}}]}],
        },
    }


def dynamic_resources() -> dict:
    return {
        "ads_config": {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "set_node_on_first_message_only": True,
            "grpc_services": [{"envoy_grpc": {
                "cluster_name": CONTROL_PLANE_CLUSTER,
                # Back within a second of the control plane's return.
                "retry_policy": {"retry_back_off": {"base_interval": "0.2s", "max_interval": "1s"}},
            }}],
        },
        "cds_config": ads_source(),
    }


def health_checks() -> list[dict]:
    """GET /healthz once a second; two failures mark a replica unhealthy, one
    success brings it back. `no_traffic_interval` too: Envoy would otherwise
    check a cluster it has not used yet only once a minute."""
    return [{
        "timeout": "1s",
        "interval": "1s",
        "no_traffic_interval": "1s",
        "unhealthy_threshold": 2,
        "healthy_threshold": 1,
        "http_health_check": {"path": HEALTH_PATH},
    }]


# Linux's TCP_USER_TIMEOUT (level IPPROTO_TCP): how long sent data (or a
# keepalive probe) may go unacknowledged before the connection is dropped.
TCP_USER_TIMEOUT = {"level": 6, "name": 18}


def list_replicas(cluster: dict, replicas: list[Replica], port: str, source: str) -> None:
    """`cluster` (the ADS cluster with port "ads_port", the feed's with
    "http_port") pointed at every replica, each health-checked on its HTTP
    port, its connections made from the node's own address `source`.

    A replica cut off the network answers nothing, not even a reset: a long
    poll or the ADS stream to it would hang until its own timeout (the
    feed's is 60 s), and a failed health check only drains connections, it
    does not end the requests on them. So each connection is probed when
    idle (TCP keepalive after 1 s, every 1 s) and dropped once anything it
    sent, data or probe, is 3 s without an answer (TCP_USER_TIMEOUT): the
    request fails and is made again, to a replica that answers."""
    lb_endpoints = []
    for r in replicas:
        endpoint = {"address": {"socket_address": {"address": r.address, "port_value": getattr(r, port)}}}
        if getattr(r, port) != r.http_port:
            endpoint["health_check_config"] = {"port_value": r.http_port}
        lb_endpoints.append({"endpoint": endpoint})
    cluster["load_assignment"] = {"cluster_name": cluster["name"], "endpoints": [{"lb_endpoints": lb_endpoints}]}
    cluster["health_checks"] = health_checks()
    cluster["close_connections_on_host_health_failure"] = True
    cluster["upstream_connection_options"] = {
        "tcp_keepalive": {"keepalive_probes": 3, "keepalive_time": 1, "keepalive_interval": 1}}
    cluster["upstream_bind_config"] = {
        "source_address": {"address": source, "port_value": 0},
        "socket_options": [{**TCP_USER_TIMEOUT, "int_value": 3000, "state": "STATE_PREBIND",
                            "description": "TCP_USER_TIMEOUT 3 s"}],
    }


def hcm_configs(config: dict):
    for listener in config["static_resources"]["listeners"]:
        for chain in listener.get("filter_chains", []):
            for f in chain.get("filters", []):
                if f.get("name") == "envoy.filters.network.http_connection_manager":
                    yield f["typed_config"]


def node_config(edge: dict, node_id: str, ports: NodePorts, xds_port: int, feed_port: int,
                module_dir: Path | None = None, address: str = "127.0.0.1",
                server_address: str = "127.0.0.1", feed_address: str | None = None,
                tls: NodeTls | None = None, tls_dir: Path | None = None,
                replicas: list[Replica] | None = None) -> dict:
    """`address`: the node's listeners, admin, and the source of its
    connections to the control plane; `server_address`: the control plane's
    (`feed_address`: the feed's, when it differs); `tls`: mTLS to it, its
    files installed in `tls_dir` (`NodeCertificates`).
    `replicas`: every control-plane replica, in both the ADS and the feed
    cluster, each health-checked (`xds_port`, `feed_port`, `server_address`
    and `feed_address` are then unused)."""
    transport_socket = None
    if tls is not None:
        if tls_dir is None:
            raise ValueError("tls needs tls_dir: the directory Envoy reads the node's certificates from")
        certificates = NodeCertificates(tls_dir)
        certificates.install(tls)
        transport_socket = certificates.transport_socket(with_certificate=tls.cert is not None)
    source = address if address != "127.0.0.1" else None
    config = with_feed(edge, feed_port, feed_address=feed_address or server_address,
                       transport_socket=transport_socket, source_address=source)
    metadata = {"admin": f"http://{address}:{ports.admin}"}
    if module_dir is not None:
        metadata["module_dir"] = str(module_dir)
    config["node"] = {"id": node_id, "cluster": FLEET_CLUSTER, "metadata": metadata}
    config["admin"] = {"address": {"socket_address": {"address": address, "port_value": ports.admin}}}
    listen_on = {VIEWER_HTTP_PORT: ports.http, VIEWER_HTTPS_PORT: ports.https}
    for listener in config["static_resources"]["listeners"]:
        socket = listener.get("address", {}).get("socket_address")
        if socket and socket.get("port_value") in listen_on:
            socket["port_value"] = listen_on[socket["port_value"]]
            socket["address"] = address
    # The anchors in edge.yaml make the two viewer listeners share one HCM
    # dict; deepcopy keeps that, which is harmless here.
    for hcm in hcm_configs(config):
        for f in hcm.get("http_filters", []):
            # The router's upstream filters too: the origin networks' RBAC.
            upstream = f.get("typed_config", {}).get("upstream_http_filters", [])
            for g in [f, *upstream]:
                if "config_discovery" in g:
                    g["config_discovery"]["config_source"] = ads_source()
    control_plane = control_plane_cluster(xds_port, server_address)
    if transport_socket is not None:
        control_plane["transport_socket"] = transport_socket
    if source is not None:
        control_plane["upstream_bind_config"] = {"source_address": {"address": source, "port_value": 0}}
    config["static_resources"]["clusters"].append(control_plane)
    config["dynamic_resources"] = dynamic_resources()
    if replicas:
        for cluster in config["static_resources"]["clusters"]:
            if cluster["name"] == CONTROL_PLANE_CLUSTER:
                list_replicas(cluster, replicas, "ads_port", address)
            elif cluster["name"] == FEED_CLUSTER:
                list_replicas(cluster, replicas, "http_port", address)
    return config


class FleetEnvoy(Envoy):
    """An Envoy of the fleet, `--concurrency 1`; it can be started without
    waiting for it to be ready (it warms until the control plane answers)."""

    def __init__(self, run_dir: Path, config: dict, node_id: str, ports: NodePorts,
                 address: str = "127.0.0.1"):
        super().__init__(run_dir, config, concurrency=1, admin=f"http://{address}:{ports.admin}")
        self.node_id = node_id
        self.ports = ports
        self.address = address

    def spawn(self) -> None:
        if not ENVOY.exists():
            raise EdgeError(f"{ENVOY} not found: run scripts/setup with WITH_ENVOY=1")
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [str(ENVOY), "-c", str(self.config_path), "--disable-hot-restart",
             "--concurrency", "1", "--log-level", "info"],
            cwd=self.run_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def ready(self) -> bool:
        try:
            return http_get(f"{self.admin}/ready", timeout=0.5)[0] == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EdgeError(f"{self.node_id} exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.ready():
                return
            time.sleep(0.05)
        raise EdgeError(f"{self.node_id} not ready after {timeout} s:\n{self.log_tail()}")

    def start(self, timeout: float = 30.0) -> None:
        self.spawn()
        self.wait_ready(timeout)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
