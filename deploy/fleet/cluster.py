"""The replicated fleet, each process on a loopback address of its own, and
the faults it is tested under. A library (deploy/e2e/test_replicas.py and
deploy/fleet/fault_bench.py use it):

- `EtcdCluster`: three etcd members (`/usr/bin/etcd`) on 127.0.0.11-13, client
  port 2379 (replica 1's) and 2479 (replica 2's), peers on 2380, /health and
  /metrics on 2381 (this harness's own look, plain HTTP), data in a
  directory of the run; one member can be killed (SIGKILL) and restarted on
  its data. With `EtcdTls`, the client and peer ports are TLS with
  client-cert-auth, of a CA of the store's own.
- `Replica`: `origin-policy serve --etcd ... --replica rN` on 127.0.0.2N
  (HTTP 18700: the API, the feed, /status, /healthz; ADS 18701). Replica N
  reaches the store on its own client port, so a fault can cut one
  replica's store traffic by port.
- `FleetTls`: the fleet's certificates, made with `origin-policy certs`: a
  CA, a server certificate per replica naming its address, a node
  certificate per Envoy (all listed in the replicas' `--tls-nodes`) and an
  operator's, which the harness calls `/v1/*`, `/status` and `/healthz`
  with. Every replica's HTTP and ADS listeners are then mTLS. `EtcdTls`:
  the store's CA (another one: an edge's certificate must not open etcd),
  a certificate per member naming its address, one per replica for
  `serve --etcd-ca/--etcd-cert/--etcd-key`.
- `fleet_node`: an Envoy on 127.0.0.3N (its listeners and admin on that
  address) whose ADS and feed clusters list every replica, health-checked
  on /healthz (deploy/fleet/node.py), over mTLS with the node's
  certificate.
- `Faults`: iptables rules in OUTPUT (all loopback traffic passes it), each
  tagged with the comment `origin-policy-fault` and removed when its fault
  ends; `Faults.remove_leftovers()` removes any a killed run left.
- `ReplicatedFleet`: all of it together, the demo policies imported, and
  `SteadyLoad` (deploy/fleet/load.py) on every Envoy; `Writers`, concurrent
  writers that record every acknowledged write; `run_fault`, one fault with
  a push during it, measured.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from edge import CLI, FEED_CLUSTER, POLICIES, WASM, EdgeError, edge_config, wait_for  # noqa: E402
from load import LoadProcess, decision_host  # noqa: E402
from fleet import OPERATOR, Pki  # noqa: E402
from node import CONTROL_PLANE_CLUSTER, FleetEnvoy, NodePorts, NodeTls, node_config  # noqa: E402
from node import Replica as ReplicaEndpoint  # noqa: E402

ETCD = Path(os.environ.get("ETCD_BIN", "/usr/bin/etcd"))
IPTABLES = os.environ.get("IPTABLES_BIN", "/usr/sbin/iptables")
SETUP = "run `WITH_ENVOY=1 scripts/setup`"

MEMBER_ADDRESSES = ("127.0.0.11", "127.0.0.12", "127.0.0.13")
CLIENT_PORTS = (2379, 2479)  # replica 1's, replica 2's
PEER_PORT = 2380
METRICS_PORT = 2381  # /health and /metrics, for this harness only
REPLICA_HTTP_PORT = 18700
REPLICA_ADS_PORT = 18701
# Every Envoy on its own address, so the same ports for each.
ENVOY_PORTS = NodePorts(10080, 10443, 9901)
FAULT_COMMENT = "origin-policy-fault"


def replica_address(index: int) -> str:
    return f"127.0.0.{20 + index}"


def envoy_address(index: int) -> str:
    return f"127.0.0.{30 + index}"


def request(url: str, method: str = "GET", body: bytes | None = None, timeout: float = 10.0,
            headers: dict | None = None, context: ssl.SSLContext | None = None) -> tuple[int, dict]:
    """The answer's status and JSON ({} if none); OSError if no answer.
    `context`: the client's TLS (an https URL)."""
    req = urllib.request.Request(url, method=method, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as r:
            data = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        data, status = e.read(), e.code
    try:
        return status, json.loads(data) if data else {}
    except ValueError:
        return status, {"raw": data.decode(errors="replace")}


def require_fault_tools() -> None:
    """etcd and iptables, or a clear error saying how to get them."""
    if not ETCD.exists():
        raise EdgeError(f"{ETCD} not found: {SETUP} (it installs Debian's etcd-server)")
    if not Path(IPTABLES).exists():
        raise EdgeError(f"{IPTABLES} not found: {SETUP} (it installs Debian's iptables)")
    out = subprocess.run([IPTABLES, "-w", "-S", "OUTPUT"], capture_output=True, text=True)
    if out.returncode != 0:
        raise EdgeError(f"iptables cannot list OUTPUT (the fault tests need root or CAP_NET_ADMIN): "
                        f"{out.stderr.strip()}")


class Process:
    """A child in a process group of its own, logged to a file."""

    def __init__(self, name: str, log_path: Path):
        self.name = name
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def spawn(self, command: list[str], cwd: Path | None = None) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                        start_new_session=True)
        log.close()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no goodbye to anyone."""
        if self.running:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.running:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise EdgeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")


# --- etcd --------------------------------------------------------------------------------------

class EtcdTls:
    """The store's certificates in `directory`, of a CA of their own (etcd
    admits any client certificate of its `--trusted-ca-file`, so not the
    fleet's CA, whose node certificates the edges hold): a certificate per
    member naming its address (a server's: etcd uses it as a client too,
    for its own gateway and its peers), one per replica (a client's)."""

    def __init__(self, directory: Path, cli: Path = CLI):
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        self.pki = Pki(directory, cli)
        self.clients: dict[str, tuple[Path, Path]] = {}

    @property
    def ca(self) -> Path:
        return self.pki.ca

    def member(self, name: str, address: str) -> tuple[Path, Path]:
        """Its address, and 127.0.0.1: with --peer-client-cert-auth a member
        admits a peer only from an address its certificate names, and the
        kernel makes every connection between loopback addresses from
        127.0.0.1 (on a machine of its own, a member's own address)."""
        return self.pki.issue("server", name, "--ip", address, "--ip", "127.0.0.1")

    def replica(self, name: str) -> list[str]:
        """`serve --etcd-*` for replica `name`."""
        cert, key = self.clients[name] = self.pki.issue("operator", f"etcd-client-{name}")
        return ["--etcd-ca", str(self.pki.ca), "--etcd-cert", str(cert), "--etcd-key", str(key)]

    def client(self, certificate: tuple[Path, Path] | None = None) -> ssl.SSLContext:
        """A client of the members: their certificates checked against the
        store's CA (and their address), `certificate` presented."""
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        if certificate is not None:
            context.load_cert_chain(*map(str, certificate))
        return context


class EtcdMember(Process):
    def __init__(self, index: int, run_dir: Path, initial_cluster: str, tls: EtcdTls | None = None):
        self.index = index
        self.member = f"etcd-{index}"
        self.address = MEMBER_ADDRESSES[index - 1]
        self.data_dir = run_dir / self.member
        self.initial_cluster = initial_cluster
        self.scheme = "https" if tls else "http"
        self.tls_flags: list[str] = []
        if tls:
            cert, key = tls.member(self.member, self.address)
            self.tls_flags = [
                "--cert-file", str(cert), "--key-file", str(key),
                "--client-cert-auth", "--trusted-ca-file", str(tls.ca),
                "--peer-cert-file", str(cert), "--peer-key-file", str(key),
                "--peer-client-cert-auth", "--peer-trusted-ca-file", str(tls.ca),
            ]
        super().__init__(self.member, run_dir / f"{self.member}.log")

    def client_url(self, port: int = CLIENT_PORTS[0]) -> str:
        return f"{self.scheme}://{self.address}:{port}"

    def command(self, state: str) -> list[str]:
        a, scheme = self.address, self.scheme
        return [
            str(ETCD), "--name", self.member, "--data-dir", str(self.data_dir),
            "--listen-client-urls", ",".join(f"{scheme}://{a}:{p}" for p in CLIENT_PORTS),
            "--advertise-client-urls", ",".join(f"{scheme}://{a}:{p}" for p in CLIENT_PORTS),
            "--listen-peer-urls", f"{scheme}://{a}:{PEER_PORT}",
            "--initial-advertise-peer-urls", f"{scheme}://{a}:{PEER_PORT}",
            "--listen-metrics-urls", f"http://{a}:{METRICS_PORT}",
            "--initial-cluster", self.initial_cluster, "--initial-cluster-token", "origin-policy-faults",
            "--initial-cluster-state", state, "--logger", "zap", "--log-outputs", "stderr",
            *self.tls_flags,
        ]

    def start(self, state: str = "new") -> None:
        self.spawn(self.command(state))

    def healthy(self) -> bool:
        """Has a leader and serves a quorum read (etcd's /health)."""
        try:
            return request(f"http://{self.address}:{METRICS_PORT}/health", timeout=2)[1].get("health") == "true"
        except OSError:
            return False

    @contextlib.contextmanager
    def killed(self) -> Iterator[None]:
        """SIGKILL; restarted on its data when the context ends."""
        self.kill()
        try:
            yield
        finally:
            self.start("existing")

    def is_leader(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.address}:{METRICS_PORT}/metrics", timeout=2) as r:
                return "\netcd_server_is_leader 1" in r.read().decode()
        except OSError:
            return False


class EtcdCluster:
    """Three members, started together; `kill(i)` / `restart(i)` one of them.
    With `tls`, their client and peer ports are TLS with client-cert-auth."""

    def __init__(self, run_dir: Path, size: int = 3, tls: EtcdTls | None = None):
        self.run_dir = run_dir
        self.tls = tls
        scheme = "https" if tls else "http"
        initial = ",".join(f"etcd-{i}={scheme}://{MEMBER_ADDRESSES[i - 1]}:{PEER_PORT}"
                           for i in range(1, size + 1))
        self.members = [EtcdMember(i, run_dir, initial, tls) for i in range(1, size + 1)]

    def endpoints(self, port: int = CLIENT_PORTS[0]) -> list[str]:
        return [m.client_url(port) for m in self.members]

    def member(self, index: int) -> EtcdMember:
        return self.members[index - 1]

    def start(self, timeout: float = 60.0) -> None:
        if not ETCD.exists():
            raise EdgeError(f"{ETCD} not found: {SETUP}")
        for m in self.members:
            if m.data_dir.exists():
                shutil.rmtree(m.data_dir)
            m.start("new")
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 60.0) -> None:
        def all_healthy():
            for m in self.members:
                m.check_alive()
            return all(m.healthy() for m in self.members)
        try:
            wait_for(all_healthy, timeout, 0.1, "every etcd member healthy")
        except AssertionError as e:
            raise EdgeError(f"{e}\n" + "\n".join(f"{m.member}:\n{m.log_tail(10)}" for m in self.members)) from e

    def leader(self) -> EtcdMember:
        return wait_for(lambda: next((m for m in self.members if m.running and m.is_leader()), None),
                        30, 0.1, "an etcd leader")

    def kill(self, index: int) -> None:
        self.member(index).kill()

    def restart(self, index: int, timeout: float = 60.0) -> None:
        """On its data: it rejoins as the member it was."""
        self.member(index).start("existing")
        self.wait_healthy(timeout)

    def stop(self) -> None:
        for m in self.members:
            m.stop()


# --- certificates -------------------------------------------------------------------------------

class FleetTls:
    """The replicated fleet's certificates in `directory` (`origin-policy
    certs`, fleet.py's `Pki`): the CA and its CRL, a server certificate per
    replica naming its address (`server(name, address)`), a node
    certificate per Envoy (`node(id)`), every node listed in `nodes`, the
    replicas' `--tls-nodes`; and an operator's, for the harness."""

    def __init__(self, directory: Path, node_ids: list[str], cli: Path = CLI):
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        self.pki = Pki(directory, cli)
        self.nodes_file = directory / "nodes"
        self.nodes_file.write_text("".join(f"{n}\n" for n in node_ids))
        self.operator = self.pki.issue("operator", OPERATOR)
        self.node_tls = {n: self.pki.node(n) for n in node_ids}

    @property
    def ca(self) -> Path:
        return self.pki.ca

    def server(self, name: str, address: str) -> list[str]:
        """`serve --tls-*` for replica `name` on `address`."""
        cert, key = self.pki.issue("server", name, "--ip", address)
        return ["--tls-ca", str(self.pki.ca), "--tls-cert", str(cert), "--tls-key", str(key),
                "--tls-crl", str(self.pki.crl), "--tls-nodes", str(self.nodes_file)]

    def node(self, node_id: str) -> NodeTls:
        return self.node_tls[node_id]

    def client(self, as_node: str | None = None) -> ssl.SSLContext:
        """A client's TLS: the server's certificate checked against the CA
        (and its address), the operator's certificate presented (or node
        `as_node`'s)."""
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        if as_node is None:
            context.load_cert_chain(*map(str, self.operator))
        else:
            tls = self.node(as_node)
            context.load_cert_chain(str(tls.cert), str(tls.key))
        return context


# --- replicas ----------------------------------------------------------------------------------

class Replica(Process):
    """`origin-policy serve` on 127.0.0.2N. With `endpoints` (etcd's client
    URLs) one replica of several; without, a single server on its own store.
    With `tls`, both its listeners are mTLS (its own server certificate) and
    the harness's requests carry the operator's certificate."""

    def __init__(self, index: int, run_dir: Path, endpoints: list[str] | None, settings: Path,
                 wasm: Path = WASM, extra: list[str] = (), cli: Path = CLI, tls: FleetTls | None = None):
        self.index = index
        self.replica = f"r{index}"
        self.address = replica_address(index)
        self.http_port, self.ads_port = REPLICA_HTTP_PORT, REPLICA_ADS_PORT
        self.tls = tls
        self.context = tls.client() if tls else None
        self.url = f"{'https' if tls else 'http'}://{self.address}:{self.http_port}"
        self.endpoints = endpoints
        self.store_port = CLIENT_PORTS[index - 1]
        self.store_dir = run_dir / self.replica / "store"
        super().__init__(self.replica, run_dir / self.replica / "serve.log")
        self.command = [
            str(cli), "serve", "--ads", f"{self.address}:{self.ads_port}",
            "--listen", f"{self.address}:{self.http_port}", "--store", str(self.store_dir),
            "--wasm", str(wasm), "--settings", str(settings),
            *(["--etcd", ",".join(endpoints), "--replica", self.replica] if endpoints else []),
            *(tls.server(self.replica, self.address) if tls else []),
            *extra,
        ]

    @property
    def endpoint(self) -> ReplicaEndpoint:
        return ReplicaEndpoint(self.address, self.ads_port, self.http_port)

    def launch(self) -> None:
        """Started, not waited for."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.spawn(self.command)

    def start(self, timeout: float = 60.0) -> None:
        self.launch()
        self.wait_ready(timeout)

    @contextlib.contextmanager
    def killed(self) -> Iterator[None]:
        """SIGKILL; started again (and waited for) when the context ends."""
        self.kill()
        try:
            yield
        finally:
            self.start()

    def healthz(self, timeout: float = 2.0) -> tuple[int, dict]:
        return request(f"{self.url}/healthz", timeout=timeout, context=self.context)

    def serving(self) -> bool:
        """/healthz says 200 (a single server without one: /status answers)."""
        try:
            code, _ = self.healthz()
            if code == 404 and not self.endpoints:
                self.status()
                return True
            return code == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready():
            self.check_alive()
            return self.serving()
        try:
            wait_for(ready, timeout, 0.05, f"{self.replica} serving")
        except AssertionError as e:
            raise EdgeError(f"{e}:\n{self.log_tail()}") from e

    def status(self, timeout: float = 5.0) -> dict:
        code, body = request(f"{self.url}/status", timeout=timeout, context=self.context)
        if code != 200:
            raise OSError(f"{self.replica} /status: {code} {body}")
        return body

    def put(self, domain: str, document: dict, timeout: float = 10.0) -> tuple[int, dict]:
        return request(f"{self.url}/v1/domains/{domain}", "PUT", json.dumps(document).encode(), timeout,
                       context=self.context)

    def get(self, domain: str, timeout: float = 10.0) -> tuple[int, dict]:
        return request(f"{self.url}/v1/domains/{domain}", timeout=timeout, context=self.context)

    def import_policies(self, documents: list[dict], timeout: float = 60.0) -> tuple[int, dict]:
        body = "".join(json.dumps(d) + "\n" for d in documents).encode()
        return request(f"{self.url}/v1/import", "POST", body, timeout, context=self.context)


# --- Envoys --------------------------------------------------------------------------------------

def module_dir(run_root: Path, wasm: Path = WASM) -> Path:
    """run_root/modules with the module under its sha256, as a replica's
    module store names it: every replica then sends a node the same filter
    configuration (the path a node reads is its `module_dir`'s, not the
    sending replica's store), so a node moving replica keeps its filter."""
    data = wasm.read_bytes()
    directory = run_root / "modules"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{hashlib.sha256(data).hexdigest()}.wasm").write_bytes(data)
    return directory


def node_id(index: int) -> str:
    return f"fleet-{index}"


def fleet_node(run_root: Path, index: int, certs, replicas: list[Replica],
               modules: Path | None = None, tls: NodeTls | None = None) -> FleetEnvoy:
    """fleet-INDEX on 127.0.0.(30+INDEX), its ADS and feed clusters listing
    every replica (with `tls`, over mTLS with its node certificate: the
    health checks too); its working directory run_root/fleet-INDEX; it reads
    the module from `modules` (see `module_dir`)."""
    node = node_id(index)
    run_dir = run_root / node
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    shutil.copytree(certs.directory, run_dir / "certs")
    address = envoy_address(index)
    config = node_config(edge_config(), node, ENVOY_PORTS, REPLICA_ADS_PORT, REPLICA_HTTP_PORT,
                         module_dir=modules, address=address, tls=tls, tls_dir=run_dir / "tls",
                         replicas=[r.endpoint for r in replicas])
    return FleetEnvoy(run_dir, config, node, ENVOY_PORTS, address=address)


def ask(node: FleetEnvoy, host: str, path: str = "/probe", timeout: float = 10.0) -> tuple[int, str | None]:
    """One request to the node's HTTP listener: status and the decision's host."""
    conn = http.client.HTTPConnection(node.address, node.ports.http, timeout=timeout)
    try:
        conn.request("GET", f"{path}/{time.monotonic_ns()}", headers={"host": host})
        r = conn.getresponse()
        r.read()
        return r.status, decision_host(r.getheader("x-origin-decision"))
    finally:
        conn.close()


def upstream_hosts(node: FleetEnvoy) -> dict[str, dict[str, dict]]:
    """Per cluster (the ADS and the feed cluster), per replica address: its
    health flags and active connections, from the node's admin /clusters."""
    out: dict[str, dict[str, dict]] = {CONTROL_PLANE_CLUSTER: {}, FEED_CLUSTER: {}}
    code, body = request(f"{node.admin}/clusters?format=json", timeout=5)
    for cluster in body.get("cluster_statuses", []):
        if cluster["name"] not in out:
            continue
        for host in cluster.get("host_statuses", []):
            address = host["address"]["socket_address"]["address"]
            stats = {s["name"]: int(s.get("value", 0)) for s in host.get("stats", [])}
            health = host.get("health_status", {})
            out[cluster["name"]][address] = {
                "healthy": not any(v for k, v in health.items() if k.startswith("failed")),
                "cx_active": stats.get("cx_active", 0),
            }
    return out


def moved_off(node: FleetEnvoy, faulty: Replica) -> bool:
    """The node's health checks failed `faulty` in both clusters, and its ADS
    stream is on another replica."""
    try:
        hosts = upstream_hosts(node)
    except OSError:
        return False
    ads = hosts[CONTROL_PLANE_CLUSTER]
    return (not ads.get(faulty.address, {}).get("healthy", True)
            and not hosts[FEED_CLUSTER].get(faulty.address, {}).get("healthy", True)
            and ads.get(faulty.address, {}).get("cx_active", 0) == 0
            and any(h["cx_active"] > 0 for a, h in ads.items() if a != faulty.address))


def back_on(node: FleetEnvoy, replica: Replica) -> bool:
    """The node's health checks pass `replica` again in both clusters."""
    try:
        hosts = upstream_hosts(node)
    except OSError:
        return False
    return all(hosts[c].get(replica.address, {}).get("healthy") for c in hosts)


# --- faults -----------------------------------------------------------------------------------

class Faults:
    """iptables rules in OUTPUT (loopback traffic passes it once, from the
    sender), each tagged `origin-policy-fault`; every fault is a context
    manager that removes its rules whatever happens."""

    def __init__(self, members: list[EtcdMember]):
        self.members = members
        self.rules: list[list[str]] = []

    @staticmethod
    def _iptables(*args: str) -> None:
        out = subprocess.run([IPTABLES, "-w", *args], capture_output=True, text=True)
        if out.returncode != 0:
            raise EdgeError(f"iptables {' '.join(args)}: {out.stderr.strip()}")

    def add(self, *rule: str) -> None:
        spec = ["OUTPUT", *rule, "-m", "comment", "--comment", FAULT_COMMENT]
        self._iptables("-I", *spec)
        self.rules.append(spec)

    def clear(self) -> None:
        while self.rules:
            self._iptables("-D", *self.rules.pop())

    def store_rules(self, replica: Replica, target: list[str]) -> None:
        for m in self.members:
            self.add("-p", "tcp", "-d", f"{m.address}/32", "--dport", str(replica.store_port), "-j", *target)

    @contextlib.contextmanager
    def cut_store(self, replica: Replica) -> Iterator[None]:
        """Its store connections reset, new ones refused (the client port
        only it uses, towards every member)."""
        try:
            self.store_rules(replica, ["REJECT", "--reject-with", "tcp-reset"])
            yield
        finally:
            self.clear()

    @contextlib.contextmanager
    def partition(self, replica: Replica) -> Iterator[None]:
        """Nothing reaches its address (Envoys, the other replica, operators),
        nothing leaves it (its answers), and nothing it sends reaches the
        store (its connections to etcd are from 127.0.0.1, so by port):
        silence, no reset."""
        try:
            self.add("-d", f"{replica.address}/32", "-j", "DROP")
            self.add("-s", f"{replica.address}/32", "-j", "DROP")
            self.store_rules(replica, ["DROP"])
            yield
        finally:
            self.clear()

    @classmethod
    def leftovers(cls) -> list[str]:
        out = subprocess.run([IPTABLES, "-w", "-S", "OUTPUT"], capture_output=True, text=True)
        return [line for line in out.stdout.splitlines() if FAULT_COMMENT in line]

    @classmethod
    def remove_leftovers(cls) -> int:
        """Every rule tagged `origin-policy-fault` (a run killed mid-fault)."""
        lines = cls.leftovers()
        for line in lines:
            # `-A OUTPUT ...` as listed; delete it as written.
            args = line.split()
            args[0] = "-D"
            args = [a.strip('"') for a in args]
            cls._iptables(*args)
        return len(lines)


# --- load and writers ---------------------------------------------------------------------------

class SteadyLoad(LoadProcess):
    """deploy/fleet/load.py on every node's HTTP listener, each request recorded."""

    def __init__(self, out: Path, nodes: list[FleetEnvoy], hosts: list[str], interval: float = 0.01):
        super().__init__(out, [f"{n.address}:{n.ports.http}" for n in nodes], hosts, seconds=3600, interval=interval)


def writer_policy(domain: str, n: int) -> dict:
    """A valid policy whose origin Host carries the write's number."""
    return {"domain": domain, "primary": {"address": "plain-origin.example.net", "port": 80},
            "protocol": {"policy": "http", "http_port": 18081},
            "origin_host": {"mode": "custom", "value": f"v{n}.{domain}"}}


def written_number(document: dict) -> int:
    return int(document["origin_host"]["value"].split(".", 1)[0][1:])


@dataclass
class Attempt:
    n: int
    replica: str
    status: int  # -1: no answer (connection refused or reset, timeout)
    error: str = ""
    version: int = 0  # the feed version an acknowledged write was published at
    revision: int = 0  # the domain's revision it was written as


@dataclass
class Writer:
    domain: str
    replicas: list[Replica]
    attempts: list[Attempt] = field(default_factory=list)

    def acked(self) -> list[Attempt]:
        return [a for a in self.attempts if 200 <= a.status < 300]


class Writers:
    """Concurrent writers, one domain each, writing 1, 2, 3, ... in turn;
    writer i goes through replica i mod N, or all in turn. Every answer is
    recorded, so that afterwards each acknowledged write can be looked for."""

    def __init__(self, replicas: list[Replica], count: int = 3, prefix: str = "writer",
                 pause: float = 0.02):
        self.replicas = replicas
        self.pause = pause
        self.writers = []
        for i in range(count):
            via = [replicas[i]] if i < len(replicas) else list(replicas)
            self.writers.append(Writer(f"{prefix}-{i + 1}.writes.example.com", via))
        self.stopped = threading.Event()
        self.threads: list[threading.Thread] = []
        self.next_n = {w.domain: 1 for w in self.writers}

    def _run(self, writer: Writer) -> None:
        k = 0
        while not self.stopped.is_set():
            replica = writer.replicas[k % len(writer.replicas)]
            k += 1
            n = self.next_n[writer.domain]
            self.next_n[writer.domain] = n + 1
            try:
                # Longer than a replica takes to give up on its store (5 s):
                # the replica's own answer, not the client's timeout.
                status, body = replica.put(writer.domain, writer_policy(writer.domain, n), timeout=10)
                writer.attempts.append(Attempt(n, replica.replica, status, "" if status < 300 else
                                               str(body.get("error", body)), body.get("version") or 0,
                                               body.get("revision") or 0))
                if status >= 300:
                    self.stopped.wait(0.2)
            except OSError as e:
                writer.attempts.append(Attempt(n, replica.replica, -1, type(e).__name__))
                self.stopped.wait(0.1)
            self.stopped.wait(self.pause)

    def start(self) -> "Writers":
        self.stopped.clear()
        self.threads = [threading.Thread(target=self._run, args=(w,), daemon=True) for w in self.writers]
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        for t in self.threads:
            t.join(timeout=30)

    def acked(self) -> int:
        return sum(len(w.acked()) for w in self.writers)

    def lost(self, replicas: list[Replica]) -> list[str]:
        """Acknowledged writes the store does not have, read through each
        replica: a writer's domain must hold its last acknowledged number or
        a later one (whose answer may have been cut off), never an earlier."""
        lost = []
        # A replica applies another's writes from its watch: read once it has
        # applied the last acknowledged one (read-your-writes holds only on
        # the replica that answered).
        latest = max((a.version for w in self.writers for a in w.acked()), default=0)
        for r in replicas:
            try:
                wait_for(lambda: r.status().get("store", {}).get("applied", latest) >= latest, 30, 0.05,
                         f"{r.replica} applied version {latest}")
            except AssertionError as e:
                lost.append(str(e))
        for w in self.writers:
            acked = w.acked()
            if not acked:
                continue
            last = max(a.n for a in acked)
            attempted = max(a.n for a in w.attempts)
            for r in replicas:
                code, body = r.get(w.domain)
                if code != 200:
                    lost.append(f"{w.domain} through {r.replica}: {code} {body}")
                    continue
                n = written_number(body)
                if not last <= n <= attempted:
                    lost.append(f"{w.domain} through {r.replica}: holds v{n}, v{last} was acknowledged")
                # Every acknowledged write is a revision of the domain, in the
                # history of the replica that acknowledged it.
                for a in acked:
                    if a.replica != r.replica:
                        continue
                    code, body = r.get(f"{w.domain}?revision={a.revision}")
                    if code != 200 or written_number(body) != a.n:
                        lost.append(f"{w.domain} revision {a.revision} through {r.replica}: {code}, "
                                    f"v{a.n} was acknowledged as it")
        return lost


# --- the fleet ------------------------------------------------------------------------------

LOAD_HOSTS = ["plain.example.com", "legacy.example.com", "media.example.com"]
PUSH_DOMAIN = "plain.example.com"


def demo_policies() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(POLICIES.glob("*.json"))
            if p.name != "settings.json" and "domain" in json.loads(p.read_text())]


def push_policy(value: str) -> dict:
    """plain.example.com with a custom origin Host: a change every Envoy shows
    in its x-origin-decision."""
    document = json.loads((POLICIES / f"{PUSH_DOMAIN}.json").read_text())
    document.pop("$schema", None)
    document["origin_host"] = {"mode": "custom", "value": value}
    return document


class ReplicatedFleet:
    """The etcd cluster, the replicas and the Envoys, with the steady load.
    `etcd=False`: one replica on its own store (the single server).
    `tls` (the default): every replica's HTTP and ADS listeners mTLS, with
    the certificates of a `FleetTls` in run/pki (`self.tls`), and the store
    too: etcd's client and peer ports TLS with client-cert-auth, of an
    `EtcdTls` in run/etcd-pki; `tls=False`: all in the clear (loopback
    only)."""

    def __init__(self, run: Path, certs, envoys: int = 3, replicas: int = 2, etcd: bool = True,
                 wasm: Path = WASM, replica_extra: list[str] = (), tls: bool = True):
        require_fault_tools()
        self.run = run
        self.certs = certs
        self.etcd_tls = EtcdTls(run / "etcd-pki") if etcd and tls else None
        self.etcd = EtcdCluster(run / "etcd", tls=self.etcd_tls) if etcd else None
        settings = run / "settings.json"
        settings.write_text((POLICIES / "settings.json").read_text())
        ids = [node_id(i) for i in range(1, envoys + 1)]
        self.tls = FleetTls(run / "pki", ids) if tls else None
        self.replicas = [
            Replica(i, run, self.etcd.endpoints(CLIENT_PORTS[i - 1]) if etcd else None, settings, wasm,
                    [*(self.etcd_tls.replica(f"r{i}") if self.etcd_tls else []), *replica_extra], tls=self.tls)
            for i in range(1, replicas + 1)
        ]
        modules = module_dir(run, wasm)
        self.nodes = [fleet_node(run, i, certs, self.replicas, modules, self.tls.node(ids[i - 1]) if tls else None)
                      for i in range(1, envoys + 1)]
        self.faults = Faults(self.etcd.members if etcd else [])
        self.load: SteadyLoad | None = None
        self.pushes = 0

    def replica(self, name: str) -> Replica:
        return next(r for r in self.replicas if r.replica == name)

    def start(self) -> None:
        Faults.remove_leftovers()
        if self.etcd:
            self.etcd.start()
        for r in self.replicas:
            r.launch()
        for r in self.replicas:
            r.wait_ready()
        code, answer = self.replicas[0].import_policies(demo_policies())
        if code != 200:
            raise EdgeError(f"import of the demo policies: {code} {answer}")
        for n in self.nodes:
            n.spawn()
        for n in self.nodes:
            n.wait_ready(60)
        self.wait_all_back()
        self.load = SteadyLoad(self.run / "load.jsonl", self.nodes, LOAD_HOSTS)
        wait_for(lambda: len(self.load.records()) > 30, 30, what="the steady load running")

    def stop(self) -> None:
        try:
            self.faults.clear()
        finally:
            if self.load:
                self.load.stop()
            for n in self.nodes:
                n.stop()
            for r in self.replicas:
                r.stop()
            if self.etcd:
                self.etcd.stop()

    def wait_all_back(self, timeout: float = 60.0) -> None:
        """Every replica serving, every Envoy's health checks passing each."""
        for r in self.replicas:
            wait_for(r.serving, timeout, 0.1, f"{r.replica} serving")
        if all(r.endpoints for r in self.replicas):
            for n in self.nodes:
                for r in self.replicas:
                    wait_for(lambda: back_on(n, r), timeout, 0.1, f"{n.node_id} checking {r.replica} healthy")

    def push(self, through: list[Replica], timeout: float = 30.0) -> tuple[str, dict, float]:
        """A new origin Host for plain.example.com, written through the first
        of `through` that acknowledges it (each tried in turn until one does):
        the value, the answer, and when the first attempt was made."""
        self.pushes += 1
        value = f"push-{self.pushes}-{int(time.time())}.example.net"
        document = push_policy(value)
        started = time.monotonic()
        deadline = started + timeout
        k = 0
        while True:
            replica = through[k % len(through)]
            k += 1
            try:
                code, answer = replica.put(PUSH_DOMAIN, document, timeout=10)
                if code in (200, 201):
                    return value, answer, started
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"push not acknowledged within {timeout} s")
            time.sleep(0.1)

    def visible_everywhere(self, value: str, timeout: float = 30.0, since: float | None = None) -> dict[str, float]:
        """Waits until every node answers with `value`; per node, the seconds
        from `since` (monotonic; default now) until it did."""
        since = time.monotonic() if since is None else since
        seen: dict[str, float] = {}

        def everywhere():
            for n in self.nodes:
                if n.node_id not in seen and ask(n, PUSH_DOMAIN)[1] == value:
                    seen[n.node_id] = time.monotonic() - since
            return len(seen) == len(self.nodes)
        try:
            wait_for(everywhere, timeout, 0.02, f"{value} on every Envoy")
        except AssertionError as e:
            raise AssertionError(f"{e} (seen on {sorted(seen) or 'none'})") from e
        return seen


class MoveWatch(threading.Thread):
    """From its start, the time until every node moved off `faulty`."""

    def __init__(self, nodes: list[FleetEnvoy], faulty: Replica):
        super().__init__(daemon=True)
        self.nodes, self.faulty = nodes, faulty
        self.started = time.monotonic()
        self.took: float | None = None
        self.stopped = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.stopped.is_set():
            if all(moved_off(n, self.faulty) for n in self.nodes):
                self.took = time.monotonic() - self.started
                return
            self.stopped.wait(0.05)

    def wait(self, timeout: float) -> float:
        self.join(timeout)
        self.stopped.set()
        if self.took is None:
            raise AssertionError(f"not every Envoy moved off {self.faulty.replica} within {timeout} s")
        return self.took


@dataclass
class FaultRun:
    """What one fault did: the figures of the table and what the test checks."""
    name: str
    started: float = 0.0  # wall clock, for the load's records
    ended: float = 0.0
    push_value: str = ""
    push_answer: dict = field(default_factory=dict)
    push_acked_s: float = 0.0  # from the first attempt to the 2xx
    push_visible_s: float = 0.0
    visible: dict = field(default_factory=dict)  # per node, s from the push
    moved_off_s: float | None = None
    served: int = 0
    failed: list = field(default_factory=list)
    writers: Writers | None = None
    lost: list = field(default_factory=list)

    @property
    def acked(self) -> int:
        return self.writers.acked() if self.writers else 0


def run_fault(fleet: ReplicatedFleet, name: str, fault: Callable[[], contextlib.AbstractContextManager],
              push_through: list[Replica], faulty: Replica | None = None,
              during: Callable[[FaultRun], None] | None = None, heal_wait: Callable[[], None] | None = None,
              hold: float = 1.0) -> FaultRun:
    """Writers running, the fault made (`fault()` is entered), a push through
    `push_through` at once, measured until every Envoy shows it; with
    `faulty`, also until every Envoy moved off it. `during(run)` runs while
    the fault holds (checks of the status pages); `hold` s more of writes;
    then the fault is undone (the context exits), `heal_wait()`, and every
    replica and Envoy back; then the writers stop and every acknowledged
    write is looked for through every replica."""
    result = FaultRun(name)
    writers = Writers(fleet.replicas, prefix=name.replace(" ", "-"))
    result.writers = writers
    result.started = time.time()
    writers.start()
    try:
        time.sleep(0.5)  # a few writes before the fault
        with fault():
            watch = MoveWatch(fleet.nodes, faulty) if faulty is not None else None
            value, answer, pushed = fleet.push(push_through)
            result.push_acked_s = time.monotonic() - pushed
            result.visible = fleet.visible_everywhere(value, since=pushed)
            result.push_value, result.push_answer = value, answer
            result.push_visible_s = max(result.visible.values())
            if watch is not None:
                result.moved_off_s = watch.wait(30)
            if during:
                during(result)
            time.sleep(hold)
        if heal_wait:
            heal_wait()
        fleet.wait_all_back()
        time.sleep(0.5)  # a few writes after
    finally:
        writers.stop()
    result.ended = time.time()
    result.lost = writers.lost(fleet.replicas)
    rows = fleet.load.records(result.started, result.ended)
    result.served = len(rows)
    result.failed = SteadyLoad.failed(rows)
    return result


# --- the faults, as the test and the benchmark run them ---------------------------------------

@dataclass
class Scenario:
    name: str
    fault: Callable[[], contextlib.AbstractContextManager]
    push_through: list[Replica]
    faulty: Replica | None = None
    heal_wait: Callable[[], None] | None = None


def scenarios(fleet: ReplicatedFleet) -> dict[str, Scenario]:
    """Each fault on r2 (or the etcd leader), the push through r1 (or either)."""
    r1, r2 = fleet.replicas[:2]
    leader: list[EtcdMember] = []

    def member_killed():
        leader[:] = [fleet.etcd.leader()]
        return leader[0].killed()

    return {s.name: s for s in [
        Scenario("replica killed", r2.killed, [r1], faulty=r2),
        Scenario("store connection cut", lambda: fleet.faults.cut_store(r2), [r1], faulty=r2),
        Scenario("store member killed", member_killed, [r1, r2], heal_wait=fleet.etcd.wait_healthy),
        Scenario("partition", lambda: fleet.faults.partition(r2), [r1], faulty=r2),
    ]}


def run_scenario(fleet: ReplicatedFleet, scenario: Scenario,
                 during: Callable[[FaultRun], None] | None = None) -> FaultRun:
    return run_fault(fleet, scenario.name, scenario.fault, scenario.push_through, scenario.faulty,
                     during=during, heal_wait=scenario.heal_wait)
