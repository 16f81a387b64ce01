"""A local fleet in one command: the demo origins, the control plane
(`origin-policy serve --ads`) watching a policy directory, and N Envoys (the
edge's configuration, `--concurrency 1` each) fed over ADS and the policy
feed. Also the library the fleet's end-to-end test and benchmark use.

  fleet.py up [--envoys 3] [--canary fleet-1] [--bake-seconds 10]   (scripts/fleet)
  fleet.py status [--json]    the control plane's view of every Envoy
  fleet.py promote            make the latest version stable now (releases a hold)

A change is a file edited in the watched directory (the server sees it at
once) or a write through the API (docs/api.md).

Every channel is mTLS: `up` makes a CA and the certificates under
run/fleet/pki (`origin-policy certs`): the server's, one per Envoy (listed in
the server's --tls-nodes), and an operator's, which `status` and `promote`
use.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from edge import CLI, REPO, WASM, EdgeError, edge_config  # noqa: E402
from node import FleetEnvoy, NodePorts, NodeTls, node_config  # noqa: E402
from origins import DEMO_ORIGINS, Certificates, DemoOrigins  # noqa: E402

XDS_PORT = 18600
STATUS_PORT = 18601  # the API, the feed and /status: always the ADS port + 1 here
NODE_PORT_BASE = 12000  # node i listens on 12000+10i (HTTP), +1 (HTTPS), +2 (admin)
PKI = REPO / "run" / "fleet" / "pki"
OPERATOR = "operator"


class CertsError(Exception):
    pass


class Pki:
    """A CA and its certificates in `directory`, made by `origin-policy certs`."""

    def __init__(self, directory: Path, cli: Path = CLI):
        self.directory = directory
        self.cli = cli
        if not (directory / "ca.pem").exists():
            self.certs("init", str(directory))

    def certs(self, *args: str) -> str:
        out = subprocess.run([str(self.cli), "certs", *args], capture_output=True, text=True)
        if out.returncode != 0:
            raise CertsError(f"certs {' '.join(args)}: {out.stdout}{out.stderr}")
        return out.stdout

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def crl(self) -> Path:
        return self.directory / "crl.pem"

    def files(self, name: str) -> tuple[Path, Path]:
        return self.directory / f"{name}.pem", self.directory / f"{name}-key.pem"

    def issue(self, kind: str, name: str, *extra: str) -> tuple[Path, Path]:
        """`kind`: node, server or operator; the certificate and key."""
        self.certs("issue", str(self.directory), f"--{kind}", name, *extra)
        return self.files(name)

    def reissue(self, kind: str, name: str, *extra: str) -> str:
        """`certs issue` again for a certificate that exists: the files
        replaced in place; the serial of the one replaced, as `certs` says it."""
        out = subprocess.run([str(self.cli), "certs", "issue", str(self.directory), f"--{kind}", name, *extra],
                             capture_output=True, text=True)
        replaced = re.search(r"\(serial ([0-9a-f]+)\)", out.stderr)
        if out.returncode != 0 or replaced is None:
            raise CertsError(f"certs issue --{kind} {name}: {out.stdout}{out.stderr}")
        return replaced.group(1)

    def revoke_serial(self, serial: str) -> None:
        self.certs("revoke", str(self.directory), "--serial", serial)

    def node(self, node_id: str) -> NodeTls:
        cert, key = self.issue("node", node_id)
        return NodeTls(self.ca, cert, key)

    def revoke(self, kind: str, name: str) -> None:
        self.certs("revoke", str(self.directory), f"--{kind}", name)


@dataclass(frozen=True)
class ServerTls:
    """`serve --tls-*`'s files, and the operator certificate the harness
    calls the API and /status with."""
    ca: Path
    cert: Path
    key: Path
    crl: Path
    nodes: Path
    operator: tuple[Path, Path]

    @classmethod
    def make(cls, pki: Pki, name: str, address: str, nodes: list[str], nodes_file: Path) -> "ServerTls":
        """A server certificate for `address`, an operator's, and the nodes file."""
        cert, key = pki.issue("server", name, "--ip", address)
        nodes_file.write_text("".join(f"{n}\n" for n in nodes))
        return cls(pki.ca, cert, key, pki.crl, nodes_file, pki.issue("operator", OPERATOR))

    def flags(self) -> list[str]:
        return ["--tls-ca", str(self.ca), "--tls-cert", str(self.cert), "--tls-key", str(self.key),
                "--tls-crl", str(self.crl), "--tls-nodes", str(self.nodes)]

    def client(self) -> ssl.SSLContext:
        """An operator's: the server's certificate checked against the CA."""
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(*map(str, self.operator))
        return context


class ControlPlane:
    """`origin-policy serve --ads` as a process of its own (it can be killed
    and restarted while the Envoys run); its store is run_dir/store."""

    def __init__(self, run_dir: Path, policies: Path, wasm: Path = WASM,
                 xds_port: int = XDS_PORT, status_port: int = STATUS_PORT,
                 canaries: list[str] = (), extra: list[str] = (), cli: Path = CLI,
                 address: str = "127.0.0.1", tls: ServerTls | None = None):
        self.run_dir = run_dir
        self.xds_port = xds_port
        self.address = address
        self.tls = tls
        self.context = tls.client() if tls else None
        self.url = f"{'https' if tls else 'http'}://{address}:{status_port}"
        self.log_path = run_dir / "control-plane.log"
        self.command = [
            str(cli), "serve", "--store", str(run_dir / "store"), "--watch", str(policies),
            "--wasm", str(wasm), "--ads", f"{address}:{xds_port}", "--listen", f"{address}:{status_port}",
            *(["--canary", ",".join(canaries)] if canaries else []), *(tls.flags() if tls else []), *extra,
        ]
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EdgeError(f"control plane exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.status()
                return
            except OSError:
                time.sleep(0.05)
        raise EdgeError(f"control plane not up after {timeout} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: no goodbye to the Envoys."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def status(self) -> dict:
        return fetch_json(f"{self.url}/status", context=self.context)

    def put(self, domain: str, document: str) -> tuple[int, dict]:
        """PUT /v1/domains/DOMAIN: the answer's status and JSON."""
        return request_json(f"{self.url}/v1/domains/{domain}", "PUT", document.encode(),
                            context=self.context)

    def promote(self) -> dict:
        return fetch_json(f"{self.url}/v1/rollout/promote", method="POST", context=self.context)


def request_json(url: str, method: str, body: bytes | None = None, timeout: float = 600,
                 context: ssl.SSLContext | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, method=method, data=body)
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def fetch_json(url: str, method: str = "GET", timeout: float = 600,
               context: ssl.SSLContext | None = None) -> dict:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(request, timeout=timeout, context=context) as r:
        return json.loads(r.read())


def make_node(run_root: Path, index: int, certs: Certificates, xds_port: int,
              port_base: int = NODE_PORT_BASE, module_dir: Path | None = None,
              edge: dict | None = None, tls: NodeTls | None = None) -> FleetEnvoy:
    """fleet-INDEX, its working directory run_root/fleet-INDEX with the
    certificates; its feed is the control plane's HTTP port, the ADS port + 1
    (as every control plane here is started)."""
    node_id = f"fleet-{index}"
    run_dir = run_root / node_id
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    shutil.copytree(certs.directory, run_dir / "certs")
    ports = NodePorts.numbered(port_base, index)
    config = node_config(edge or edge_config(), node_id, ports, xds_port, xds_port + 1, module_dir,
                         tls=tls, tls_dir=run_dir / "tls")
    return FleetEnvoy(run_dir, config, node_id, ports)


def start_nodes(nodes: list[FleetEnvoy], timeout: float = 60.0) -> None:
    """Started together (each warms until the control plane answers)."""
    for node in nodes:
        node.spawn()
    for node in nodes:
        node.wait_ready(timeout)


# --- commands --------------------------------------------------------------------------------

CURL_LINES = """\
  curl -si -H 'host: plain.example.com' http://127.0.0.1:{http}/hello
  curl -si -H 'host: www.example.com' http://127.0.0.1:{http}/      # failover to the secondary
  curl -s {admin}/stats | grep origin_policy"""


def up(args: argparse.Namespace) -> int:
    run_root = REPO / "run" / "fleet"
    if run_root.exists():
        shutil.rmtree(run_root)
    run_root.mkdir(parents=True)
    certs = Certificates(run_root / "certs")
    canaries = [c for c in args.canary.split(",") if c]
    pki = Pki(PKI)
    ids = [f"fleet-{i}" for i in range(1, args.envoys + 1)]
    tls = ServerTls.make(pki, "control-plane", "127.0.0.1", ids, run_root / "nodes")
    control = ControlPlane(run_root, args.policies, canaries=canaries,
                           extra=["--bake-seconds", str(args.bake_seconds)], tls=tls)
    nodes = [make_node(run_root, i, certs, XDS_PORT, tls=pki.node(f"fleet-{i}"))
             for i in range(1, args.envoys + 1)]
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    with DemoOrigins(DEMO_ORIGINS, certs):
        try:
            control.start()
            start_nodes(nodes)
            print_welcome(control, nodes, args)
            while not stop and control.process.poll() is None:
                time.sleep(0.3)
        except KeyboardInterrupt:
            pass
        except EdgeError as e:
            print(e, file=sys.stderr)
            return 1
        finally:
            for node in nodes:
                node.stop()
            control.stop()
    print("fleet stopped")
    return 0


def print_welcome(control: ControlPlane, nodes: list[FleetEnvoy], args: argparse.Namespace) -> None:
    print(f"control plane: ADS 127.0.0.1:{control.xds_port}, API, feed and status {control.url}/ "
          f"(log {control.log_path}); mTLS, certificates in {PKI}")
    for node in nodes:
        print(f"{node.node_id}: http://127.0.0.1:{node.ports.http}  https://127.0.0.1:{node.ports.https}"
              f"  admin {node.admin}")
    print(f"policies: {args.policies} (edit a file, or PUT {control.url}/v1/domains/DOMAIN: the change rolls out"
          + (f" to {args.canary} first" if args.canary else "") + ")")
    print("try:")
    print(CURL_LINES.format(http=nodes[0].ports.http, admin=nodes[0].admin))
    print("  scripts/fleet status")
    print(f"  curl --cacert {PKI}/ca.pem --cert {PKI}/{OPERATOR}.pem --key {PKI}/{OPERATOR}-key.pem "
          f"{control.url}/v1/domains")
    print("Ctrl-C stops the fleet.")


def status_text(status: dict) -> str:
    """The status JSON for people: the rollout, then one line per node."""
    rollout = status.get("rollout", {})
    lines = [f"version {status['version']} (stable {status.get('stable')}), {status['domains']} domains; "
             f"rollout {rollout.get('stage')}"
             + (f" of {rollout['candidate']}" if rollout.get("candidate") else "")
             + (f": {rollout['reason']}" if rollout.get("reason") else "")]
    for node_id, node in sorted(status.get("nodes", {}).items()):
        xds = node.get("xds", {})
        types = xds.get("types", {})
        acked = ", ".join(f"{t} {v.get('acked')}" for t, v in sorted(types.items()))
        line = (f"{node_id}: {'connected' if xds.get('connected') else 'not connected'}; "
                f"feed at {node.get('version')} (target {node.get('target')}); xDS {acked or '-'}")
        if node.get("refused"):
            line += f"; refused {', '.join(sorted(node['refused']))}"
        for t, v in sorted(types.items()):
            if v.get("nack"):
                line += f"; NACKed {t} {v['nack']['version']}: {v['nack']['message']}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def operator_url(args: argparse.Namespace) -> tuple[str, ssl.SSLContext | None]:
    """The server's URL and, when `up` made certificates, the operator's TLS."""
    if not (args.pki / f"{OPERATOR}.pem").exists():
        return f"http://127.0.0.1:{args.status_port}", None
    context = ssl.create_default_context(cafile=str(args.pki / "ca.pem"))
    context.load_cert_chain(str(args.pki / f"{OPERATOR}.pem"), str(args.pki / f"{OPERATOR}-key.pem"))
    return f"https://127.0.0.1:{args.status_port}", context


def show_status(args: argparse.Namespace) -> int:
    url, context = operator_url(args)
    try:
        status = fetch_json(f"{url}/status", timeout=10, context=context)
    except OSError as e:
        print(f"no control plane on 127.0.0.1:{args.status_port}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=1) if args.json else status_text(status), end="")
    return 0


def promote(args: argparse.Namespace) -> int:
    url, context = operator_url(args)
    try:
        result = fetch_json(f"{url}/v1/rollout/promote", method="POST", context=context)
    except OSError as e:
        print(f"no control plane on 127.0.0.1:{args.status_port}: {e}", file=sys.stderr)
        return 1
    print(f"version {result['stable']} is stable")
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    p_up = sub.add_parser("up", help="start the fleet (the default)")
    p_up.add_argument("--envoys", type=int, default=3)
    p_up.add_argument("--canary", default="fleet-1", help="comma-separated node ids; '' for none")
    p_up.add_argument("--bake-seconds", type=float, default=10.0)
    p_up.add_argument("--policies", type=Path, default=REPO / "policies")
    for name in ("status", "promote"):
        s = sub.add_parser(name)
        s.add_argument("--status-port", type=int, default=STATUS_PORT)
        s.add_argument("--pki", type=Path, default=PKI, help="the certificates `up` made")
        if name == "status":
            s.add_argument("--json", action="store_true")
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["up", *argv]
    args = p.parse_args(argv)
    return {"up": up, "status": show_status, "promote": promote}[args.command](args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
