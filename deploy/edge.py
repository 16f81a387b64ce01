"""Brings up the edge: Envoy with the origin-policy filter, the policies bundled
by the CLI, and the demo origins. Also the library the end-to-end tests use.

Run through `scripts/edge`, which installs and builds what this needs first.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from origins import DEMO_ORIGINS, MIRROR_SERVE_PORT, Certificates, DemoOrigins  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EDGE_CONFIG = REPO / "deploy" / "envoy" / "edge.yaml"
POLICIES = REPO / "policies"
# ORIGIN_POLICY_WASM runs the edge (and the end-to-end tests) with another build.
WASM = Path(
    os.environ.get(
        "ORIGIN_POLICY_WASM", REPO / "target" / "wasm32-wasip1" / "release" / "origin_policy.wasm"
    )
)
CLI = REPO / "target" / "debug" / "origin-policy"
ENVOY = Path(os.environ.get("ENVOY_BIN", REPO / ".venv" / "bin" / "envoy"))

ADMIN = "http://127.0.0.1:9901"
VIEWER_HTTP_PORT = 10080
VIEWER_HTTPS_PORT = 10443
ECDS_FILE = "origin-policy.ecds.json"


class EdgeError(Exception):
    pass


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), *args], capture_output=True, text=True, cwd=REPO)


def bundle(
    run_dir: Path, policy_paths: list[Path], wasm: Path = WASM, admin: str | None = None
) -> None:
    """With `admin` (a running Envoy's admin URL), the filter configuration
    is written once that Envoy has taken the clusters."""
    waits = ["--admin", admin] if admin else []
    out = cli(
        "bundle", "--wasm", str(wasm), "--out", str(run_dir), *waits, *map(str, policy_paths)
    )
    if out.returncode != 0:
        raise EdgeError(f"bundle failed:\n{out.stdout}{out.stderr}")


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_for(predicate, timeout: float = 60.0, step: float = 0.05, what: str = "condition"):
    """`predicate()`'s first true value; AssertionError after `timeout` (a
    correctness limit, not a timing claim)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(step)


class Envoy:
    """One Envoy process with its working directory in `run_dir`."""

    def __init__(
        self,
        run_dir: Path,
        config: dict,
        concurrency: int = 2,
        cpus: set[int] | None = None,
        admin: str = ADMIN,
    ):
        self.run_dir = run_dir
        self.concurrency = concurrency
        self.cpus = cpus
        self.admin = admin
        self.config_path = run_dir / "envoy.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = run_dir / "envoy.log"
        self.process: subprocess.Popen | None = None

    def validate(self) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(ENVOY), "--mode", "validate", "-c", str(self.config_path)],
            capture_output=True,
            text=True,
            cwd=self.run_dir,
        )

    def start(self, timeout: float = 30.0) -> None:
        if not ENVOY.exists():
            raise EdgeError(f"{ENVOY} not found: run scripts/setup with WITH_ENVOY=1")
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [
                str(ENVOY),
                "-c",
                str(self.config_path),
                "--disable-hot-restart",
                "--concurrency",
                str(self.concurrency),
                "--log-level",
                "info",
                # Access log lines reach the file within 100 ms.
                "--file-flush-interval-msec",
                "100",
            ],
            cwd=self.run_dir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, self.cpus)) if self.cpus else None,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EdgeError(f"Envoy exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if http_get(f"{self.admin}/ready", timeout=0.5)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise EdgeError(f"Envoy not ready after {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stats(self) -> dict[str, int]:
        """Counters and gauges from the admin endpoint, by name."""
        _, text = http_get(f"{self.admin}/stats")
        return parse_stats(text)


def parse_stats(text: str) -> dict[str, int]:
    """Envoy's admin `/stats` text (`name: value` lines): the numeric ones, by name."""
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.strip().lstrip("-").isdigit():
            out[name] = int(value)
    return out


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def envoy_version(envoy: Path = ENVOY) -> str:
    """`1.40.0` from `envoy --version`."""
    out = subprocess.run([str(envoy), "--version"], capture_output=True, text=True).stdout
    return out.strip().split("version:")[-1].strip().split("/")[1]


def edge_config() -> dict:
    return yaml.safe_load(EDGE_CONFIG.read_text())


FEED_CLUSTER = "origin_policy_feed"
# `origin-policy serve`'s default address.
FEED_PORT = 18090
FEED_ROOT_ID = "origin-policy-feed"


# What Envoy checks the control plane's certificate names (a SAN URI
# starting with it), besides its CA.
SERVER_IDENTITY_PREFIX = "spiffe://origin-policy/server/"


def with_feed(config: dict, feed_port: int, wasm: Path = WASM, feed_address: str = "127.0.0.1",
              transport_socket: dict | None = None, source_address: str | None = None) -> dict:
    """`config` for `"delivery": "feed"`: the feed singleton (a bootstrap wasm
    service on the main thread, the filter's `vm_id`, so its entries are the
    filter's shared data) and the cluster of the policy source it follows.
    `transport_socket`: the feed over TLS (`node.NodeCertificates`); `source_address`:
    the address the feed's connections come from."""
    config = json.loads(json.dumps(config))
    config.setdefault("bootstrap_extensions", []).append({
        "name": "envoy.bootstrap.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.wasm.v3.WasmService",
            "singleton": True,
            "config": {
                "name": FEED_ROOT_ID,
                "root_id": FEED_ROOT_ID,
                "vm_config": {
                    "vm_id": "origin-policy",
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": str(wasm)}},
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": json.dumps({"feed_cluster": FEED_CLUSTER}),
                },
            },
        },
    })
    cluster = {
        "name": FEED_CLUSTER,
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": FEED_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": feed_address, "port_value": feed_port}
            }}}]}],
        },
    }  # fmt: skip
    if transport_socket is not None:
        cluster["transport_socket"] = transport_socket
    if source_address is not None:
        cluster["upstream_bind_config"] = {"source_address": {"address": source_address, "port_value": 0}}
    config["static_resources"]["clusters"].append(cluster)
    return config


def feed_edge_config(feed_port: int, admin_port: int, viewer_port: int) -> dict:
    """The shipped edge with feed delivery from the source on `feed_port`,
    on admin and plain-HTTP ports of its own (no HTTPS listener): what a
    test or a benchmark runs beside the main edge."""
    config = with_feed(edge_config(), feed_port)
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    listeners = config["static_resources"]["listeners"]
    listeners[:] = [l for l in listeners if l["name"] != "viewer_https"]  # noqa: E741
    listeners[0]["address"]["socket_address"]["port_value"] = viewer_port
    return config


def prepare_run_dir(run_dir: Path) -> Certificates:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    return Certificates(run_dir / "certs")


CURL_LINES = """\
  # HTTP-only origin; the response's x-origin-decision says what the edge chose
  curl -si -H 'host: plain.example.com' http://127.0.0.1:{http}/hello
  # follow: an HTTPS viewer is fetched over HTTPS, an HTTP viewer over HTTP
  curl -si --cacert {ca} --resolve media.example.com:{https}:127.0.0.1 https://media.example.com:{https}/a.png
  curl -si -H 'host: media.example.com' http://127.0.0.1:{http}/a.png
  # one HTTPS origin, two certificates chosen by SNI
  curl -si -H 'host: secure.example.com' http://127.0.0.1:{http}/
  curl -si -H 'host: shop.example.com' http://127.0.0.1:{http}/
  # custom origin ports 8150 (HTTP) and 60080 (HTTPS)
  curl -si -H 'host: legacy.example.com' http://127.0.0.1:{http}/
  curl -si -H 'host: a.img.example.com' http://127.0.0.1:{http}/
  # a 301 that the origin marks cacheable for an hour goes out as no-store
  curl -si -H 'host: redirect.example.com' http://127.0.0.1:{http}/
  # the primary answers 503: Envoy retries on the secondary, x-origin-error says so
  # (after 3 such failures the primary is marked down: see run/origin-health.log)
  curl -si -H 'host: www.example.com' http://127.0.0.1:{http}/
  # static.example.com's secondary is its own mirror, filled from the primary at start
  # (run the mirror again, or with --every 1h, to keep it in sync)
  curl -si -H 'host: static.example.com' http://127.0.0.1:{http}/style.css
  curl -si -H 'host: static.example.com' http://127.0.0.1:{mirror}/style.css
  {mirror_command}
  # metrics
  curl -s {admin}/stats | grep origin_policy"""

MIRROR_DOMAIN = "static.example.com"


def mirror_command(run_dir: Path, certs: Certificates) -> list[str]:
    """The demo's mirror run: static.example.com's site into run/mirror."""
    return [
        str(CLI), "mirror", MIRROR_DOMAIN, "--sitemap", "/sitemap.xml",
        "--origin-ca-file", str(certs.ca_file),
        "--store", str(run_dir / "mirror" / MIRROR_DOMAIN),
    ]  # fmt: skip


def start_mirror(run_dir: Path, certs: Certificates) -> subprocess.Popen:
    """`mirror-serve` over run/mirror, after one mirror run of the demo domain
    (its primary, the site origin, must be up)."""
    root = run_dir / "mirror"
    root.mkdir(exist_ok=True)
    run = subprocess.run(mirror_command(run_dir, certs), capture_output=True, text=True, cwd=REPO)
    if run.returncode != 0:
        raise EdgeError(f"mirror of {MIRROR_DOMAIN} failed:\n{run.stdout}{run.stderr}")
    print(f"mirror: {run.stdout.strip()}")
    return subprocess.Popen(
        [str(CLI), "mirror-serve", "--root", str(root), "--listen", f"127.0.0.1:{MIRROR_SERVE_PORT}"],
        cwd=REPO,
        start_new_session=True,
    )  # fmt: skip


def start_feed(
    run_dir: Path, policies: Path = POLICIES, timeout: float = 60, output=None
) -> subprocess.Popen:
    """`origin-policy serve` watching `policies`, its store in run/store: it
    writes the clusters and the filter's settings into run/, then serves the
    policies per domain and the API; an edit reaches Envoy as that domain's
    change."""
    feed = subprocess.Popen(
        [str(CLI), "serve", "--wasm", str(WASM), "--out", str(run_dir), "--admin", ADMIN,
         "--listen", f"127.0.0.1:{FEED_PORT}", "--store", str(run_dir / "store"),
         "--watch", str(policies)],
        cwd=REPO,
        stdout=output,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    while not (run_dir / ECDS_FILE).exists():
        if feed.poll() is not None or time.monotonic() > deadline:
            feed.kill()
            raise EdgeError("origin-policy serve did not publish policies/ (see its errors above)")
        time.sleep(0.1)
    return feed


def main() -> int:
    run_dir = REPO / "run"
    certs = prepare_run_dir(run_dir)
    config = with_feed(edge_config(), FEED_PORT)
    envoy = Envoy(run_dir, config)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    mirror_serve = None
    feed = None
    with DemoOrigins(DEMO_ORIGINS, certs):
        try:
            feed = start_feed(run_dir)
            mirror_serve = start_mirror(run_dir, certs)
            envoy.start()
            print(f"edge up: http://127.0.0.1:{VIEWER_HTTP_PORT}  https://127.0.0.1:{VIEWER_HTTPS_PORT}")
            print(f"admin: {ADMIN}   log: {envoy.log_path}")
            print("demo origins: " + ", ".join(f"{o.name}:{o.port}" for o in DEMO_ORIGINS))
            print(
                f"policies: {POLICIES} (edit a file, or PUT http://127.0.0.1:{FEED_PORT}/v1/domains/DOMAIN:"
                " `origin-policy serve` sends Envoy that domain's change)"
            )
            print("try:")
            print(
                CURL_LINES.format(
                    http=VIEWER_HTTP_PORT,
                    https=VIEWER_HTTPS_PORT,
                    ca=certs.ca_file,
                    admin=ADMIN,
                    mirror=MIRROR_SERVE_PORT,
                    mirror_command=" ".join(mirror_command(run_dir, certs)),
                )
            )
            print("Ctrl-C stops the edge.")
            while not stop and envoy.process.poll() is None:
                time.sleep(0.2)
            if envoy.process.poll() is not None:
                print(f"Envoy exited:\n{envoy.log_tail()}", file=sys.stderr)
                return 1
        except KeyboardInterrupt:
            pass
        except EdgeError as e:
            print(e, file=sys.stderr)
            return 1
        finally:
            envoy.stop()
            if feed is not None:
                feed.terminate()
                feed.wait(timeout=10)
            if mirror_serve is not None:
                mirror_serve.terminate()
                mirror_serve.wait(timeout=10)
    print("edge stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
