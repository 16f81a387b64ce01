"""Envoy cost per request: origin-policy, with its policies inline and delivered
by the feed (the shipped edge), against Envoy without a filter, Envoy doing the
same rewrite natively, a proxy-wasm filter that does nothing, and what an Envoy
user would pick instead: the same per-domain choice in Envoy's Lua filter and
through ext_proc (a gRPC processor, bench/ext_proc_processor.py).

One Envoy (bench/envoy/bench.yaml, --concurrency 1) pinned to one core, nginx
(the HTTPS origin) and wrk pinned to the other. Each round runs every variant
once, in a rotated order, twice: flat out (throughput and CPU per request) and
paced by a per-request delay (latency at about the same offered load). Envoy's
CPU comes from /proc/PID/stat, so a busy machine skews it far less than wall
time. Prints Markdown tables of the medians over the rounds.

With --calibrate, the same run also measures what one host call costs Envoy:
the no-op filter made to do exactly one kind of call per request (read the
whole request header map, one header, set one, remove one, read a property,
increment a counter, set filter state, get 200 B of shared data), one listener
per kind, each against the plain no-op (flat out).

Every variant does the same job for bench.example.com: the origin's cluster
(the one `bundle` derives), the Host origin.example.net, and SNI from that
Host; the script checks at the origin that each got there so.

Run: .venv/bin/python bench/envoy_bench.py [--rounds N] [--seconds S] [--calibrate]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "deploy"))
import yaml  # noqa: E402

from edge import CLI, WASM, Envoy, bundle, cpu_model, envoy_version, with_feed  # noqa: E402
from origins import Certificates  # noqa: E402

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
NOOP_WASM = REPO / "target" / "wasm32-wasip1" / "release" / "noop_filter.wasm"
ORIGIN_PORT = 18500
ADMIN = "http://127.0.0.1:9911"
VARIANTS = {
    "no_filter": 10101,
    "native": 10102,
    "noop_wasm": 10103,
    "origin_policy": 10104,
    "origin_networks": 10110,
    "feed": 10105,
    "lua": 10106,
    "ext_proc": 10107,
}
LABELS = {
    "no_filter": "(a) no filter",
    "native": "(b) native rewrite",
    "noop_wasm": "(c) no-op wasm",
    "origin_policy": "(d) origin-policy",
    "origin_networks": "(d) with the origin networks' upstream RBAC",
    "feed": "(e) origin-policy, feed delivery (the shipped edge)",
    "lua": "(f) Lua filter",
    "ext_proc": "(g) ext_proc, Python processor",
}
# The peers and their processes: `origin-policy serve` (the policy source of
# (e)) and the ext_proc processor of (g), both on the load generator's core.
FEED_PORT = 18510
EXT_PROC_PORT = 18520
LEVER_PORT = 10120
# (d) and the levers in a VM of their own: the feed singleton shares the
# filter's `vm_id` with (e), and (d) must not see (e)'s entries.
INLINE_VM_ID = "origin-policy-inline"
LUA_SCRIPT = """\
-- The domains and what each is sent to: the cluster (which takes SNI from
-- the Host, auto_sni) and the Host.
local routes = {
%s
}

function envoy_on_request(handle)
  local headers = handle:headers()
  local authority = headers:get(":authority") or ""
  local host = string.lower(string.match(authority, "^[^:]*"))
  local route = routes[host]
  if route == nil then
    handle:respond({[":status"] = "404"}, "no origin policy for host " .. host .. "\\n")
    return
  end
  headers:replace("x-origin-cluster", route[1])
  headers:replace(":authority", route[2])
  handle:clearRouteCache()
end
"""
# The calibration variants: the no-op filter's plugin configuration names the
# one host call it makes per request (bench/noop-filter/src/lib.rs).
CALIBRATION_CALLS = {
    "request_header_map": "read the whole request header map",
    "request_header": "read one request header (`:authority`)",
    "set_request_header": "set one request header",
    "remove_request_header": "remove one request header",
    "property_tls_version": "property `connection.tls_version` (plaintext: not found)",
    "property_attempt_count": "property `upstream.request_attempt_count` (response)",
    "property_host_metadata": "property `xds.upstream_host_metadata` (response)",
    "property_code_details": "property `response.code_details` (response)",
    "increment_metric": "increment a counter",
    "set_filter_state": "set filter state (`set_envoy_filter_state`)",
    "shared_data_get_200b": "shared data: get 200 B",
}
CALIBRATION_PORT = 10150
CALIBRATION: dict[str, int] = {}
VIEWER_HOST = "bench.example.com"
ORIGIN_HOST = "origin.example.net"
ENVOY_CPU = 0
LOAD_CPU = 1
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {run}/nginx.pid;
error_log {run}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {run}/certs/origin.pem;
        ssl_certificate_key {run}/certs/origin-key.pem;
        location / {{
            add_header x-origin-host $host always;
            add_header x-origin-sni $ssl_server_name always;
            return 200 "ok\\n";
        }}
    }}
}}
"""

# wrk prints this JSON line at the end; latencies are in microseconds.
WRK_REPORT = """\
wrk.headers["Host"] = "%s"
%s
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %%d, "duration_us": %%d, "errors": %%d, "non_2xx": %%d,' ..
    ' "p50": %%d, "p90": %%d, "p99": %%d, "max": %%d}\\n',
    summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def pinned(cpu: int):
    return lambda: os.sched_setaffinity(0, {cpu})


def get(port: int) -> tuple[int, dict[str, str]]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Host": VIEWER_HOST})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status, {k.lower(): v for k, v in r.headers.items()}


def check_variants() -> None:
    """Every variant must reach the origin; (b), (d) and the levers with the
    rewritten Host (a lever may name the origin's port in it) and SNI. A
    benchmark of a misrouted request would measure nothing."""
    for name, port in VARIANTS.items():
        status, headers = get(port)
        host, sni = headers.get("x-origin-host"), headers.get("x-origin-sni")
        want_host = VIEWER_HOST if name in ("no_filter", "noop_wasm") else ORIGIN_HOST
        if name.startswith("lever_") and host == f"{want_host}:{ORIGIN_PORT}":
            host = want_host
        if status != 200 or host != want_host or sni != "origin.example.net":
            raise SystemExit(f"{name}: status {status}, origin saw Host {host!r} SNI {sni!r}")


def wrk(port: int, seconds: int, connections: int, script: Path) -> dict:
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}/",
        ],
        capture_output=True,
        text=True,
        preexec_fn=pinned(LOAD_CPU),
    )
    if out.returncode != 0:
        raise SystemExit(f"wrk on :{port} failed:\n{out.stdout}{out.stderr}")
    report = json.loads(out.stdout.strip().splitlines()[-1])
    if report["errors"] or report["non_2xx"]:
        raise SystemExit(f"wrk on :{port} saw failures: {report}\n{out.stdout}")
    return report


def measure(envoy_pid: int, port: int, seconds: int, connections: int, script: Path) -> dict:
    before = cpu_seconds(envoy_pid)
    report = wrk(port, seconds, connections, script)
    cpu = cpu_seconds(envoy_pid) - before
    return {
        "rps": report["requests"] / (report["duration_us"] / 1e6),
        "cpu_us": cpu * 1e6 / report["requests"],
        "p50": report["p50"],
        "p99": report["p99"],
    }


def profile(envoy_pid: int, port: int, args, script: Path, run: Path) -> int:
    """`perf record` of Envoy under load, then its report of the hottest symbols."""
    data = run / "perf.data"
    recorder = subprocess.Popen(
        ["perf", "record", "-g", "-o", str(data), "-p", str(envoy_pid), "--", "sleep", str(args.seconds)],
        preexec_fn=pinned(LOAD_CPU),
    )
    wrk(port, args.seconds, args.connections, script)
    recorder.wait()
    # By binary first: Envoy's own code, the kernel, and V8's generated code
    # (the wasm, and the host-call trampolines), which perf sees as anonymous.
    for sort in (["--sort", "dso"], ["--percent-limit", "0.7"]):
        report = subprocess.run(
            ["perf", "report", "-i", str(data), "--no-children", "--stdio", *sort],
            capture_output=True,
            text=True,
        )
        print("\n".join(l for l in report.stdout.splitlines() if "%" in l and not l.lstrip().startswith("-")))
        print()
    return 0


def add_lever(run: Path, config: dict, lever: str, port: int, wasm: Path) -> None:
    """A copy of (d)'s listener on `port`, its filter bundled from another
    policy directory into a directory of its own; its clusters join (d)'s."""
    name, _, directory = lever.partition("=")
    directory, _, other_wasm = directory.partition("@")
    out = run / f"lever-{name}"
    bundle(out, [Path(directory)], Path(other_wasm) if other_wasm else wasm)
    cds = json.loads((run / "origin-policy.cds.json").read_text())
    known = {c["name"] for c in cds["resources"]}
    lever_cds = json.loads((out / "origin-policy.cds.json").read_text())
    cds["resources"] += [c for c in lever_cds["resources"] if c["name"] not in known]
    (run / "origin-policy.cds.json").write_text(json.dumps(cds))
    listener = copy.deepcopy(
        next(l for l in config["static_resources"]["listeners"] if l["name"] == "origin_policy")
    )
    listener["name"] = f"lever_{name}"
    listener["address"]["socket_address"]["port_value"] = port
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["stat_prefix"] = f"lever_{name}"
    source = hcm["http_filters"][0]["config_discovery"]["config_source"]["path_config_source"]
    source["path"] = str(out / "origin-policy.ecds.json")
    source["watched_directory"] = {"path": str(out)}
    config["static_resources"]["listeners"].append(listener)
    VARIANTS[f"lever_{name}"] = port
    use_vm(out / "origin-policy.ecds.json", INLINE_VM_ID)
    LABELS[f"lever_{name}"] = f"(d) with `{name}`"


def use_vm(ecds: Path, vm_id: str) -> None:
    """Puts the filter of an ECDS file in a VM of its own."""
    resource = json.loads(ecds.read_text())
    for r in resource["resources"]:
        r["typed_config"]["config"]["vm_config"]["vm_id"] = vm_id
    ecds.write_text(json.dumps(resource))


def routes(run: Path) -> dict[str, tuple[str, str]]:
    """What the peers (f) and (g) send each domain to: the cluster origin-policy
    derived for it (`bundle`'s clusters file) and the Host its policy names."""
    cds = json.loads((run / "origin-policy.cds.json").read_text())
    names = [c["name"] for c in cds["resources"]]
    if len(names) != 1:
        raise SystemExit(f"expected one derived cluster for {VIEWER_HOST}, found {names}")
    return {VIEWER_HOST: (names[0], ORIGIN_HOST)}


def add_peers(config: dict, run: Path, wasm: Path, policies: Path) -> list[subprocess.Popen]:
    """(e)'s feed singleton and policy source, (f)'s script and (g)'s
    processor. The source and the processor run on the load generator's core."""
    table = routes(run)
    lua = next(l for l in config["static_resources"]["listeners"] if l["name"] == "lua")
    lua_filter = lua["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0]
    lines = ",\n".join(f'  ["{d}"] = {{"{c}", "{h}"}}' for d, (c, h) in table.items())
    lua_filter["typed_config"]["default_source_code"] = {"inline_string": LUA_SCRIPT % lines}
    config.update(with_feed(config, FEED_PORT, wasm))
    feed_dir = run / "feed"
    feed_dir.mkdir()
    started = [
        subprocess.Popen(
            [str(CLI), "serve", "--wasm", str(wasm), "--out", str(feed_dir),
             "--listen", f"127.0.0.1:{FEED_PORT}", "--store", str(run / "store"),
             "--watch", str(policies)],
            stdout=subprocess.DEVNULL,
            stderr=open(run / "feed.log", "ab"),
            preexec_fn=pinned(LOAD_CPU),
        ),
        subprocess.Popen(
            [sys.executable, str(BENCH / "ext_proc_processor.py"), "--port", str(EXT_PROC_PORT),
             *(f"--route={d}={c},{h}" for d, (c, h) in table.items())],
            preexec_fn=pinned(LOAD_CPU),
        ),
    ]  # fmt: skip
    deadline = time.monotonic() + 60
    while not (feed_dir / "origin-policy.ecds.json").exists():
        if started[0].poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"origin-policy serve did not start:\n{(run / 'feed.log').read_text()}")
        time.sleep(0.1)
    return started


def wait_for_variants(timeout: float = 60) -> None:
    """The feed's first sync and the processor's start take a moment."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            check_variants()
            return
        except (SystemExit, OSError) as e:
            if time.monotonic() > deadline:
                raise SystemExit(f"not every variant is ready: {e}") from None
            time.sleep(0.2)


def add_feed_lever(run: Path, config: dict, lever: str, port: int) -> None:
    """A copy of (e) with another build of the filter: its own singleton and
    filter in a VM of their own (`vm_id` NAME), following the same source."""
    name, _, wasm = lever.partition("=")
    vm_id = f"feed-lever-{name}"
    singleton = copy.deepcopy(
        next(e for e in config["bootstrap_extensions"] if e["name"] == "envoy.bootstrap.wasm")
    )
    vm = singleton["typed_config"]["config"]["vm_config"]
    vm["vm_id"], vm["code"]["local"]["filename"] = vm_id, str(Path(wasm).resolve())
    config["bootstrap_extensions"].append(singleton)
    out = run / f"feed-lever-{name}"
    out.mkdir()
    ecds = json.loads((run / "feed" / "origin-policy.ecds.json").read_text())
    for r in ecds["resources"]:
        vm = r["typed_config"]["config"]["vm_config"]
        vm["vm_id"], vm["code"]["local"]["filename"] = vm_id, str(Path(wasm).resolve())
    (out / "origin-policy.ecds.json").write_text(json.dumps(ecds))
    listener = copy.deepcopy(
        next(l for l in config["static_resources"]["listeners"] if l["name"] == "feed")
    )
    listener["name"] = f"feed_lever_{name}"
    listener["address"]["socket_address"]["port_value"] = port
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["stat_prefix"] = f"feed_lever_{name}"
    source = hcm["http_filters"][0]["config_discovery"]["config_source"]["path_config_source"]
    source["path"] = str(out / "origin-policy.ecds.json")
    source["watched_directory"] = {"path": str(out)}
    config["static_resources"]["listeners"].append(listener)
    VARIANTS[f"feed_lever_{name}"] = port
    LABELS[f"feed_lever_{name}"] = f"(e) with `{name}`"


def add_calibration(config: dict) -> None:
    """One copy of (c)'s listener per host call, its no-op filter told to make
    that call once per request."""
    noop = next(l for l in config["static_resources"]["listeners"] if l["name"] == "noop_wasm")
    for i, call in enumerate(CALIBRATION_CALLS):
        listener = copy.deepcopy(noop)
        listener["name"] = f"calibrate_{call}"
        listener["address"]["socket_address"]["port_value"] = CALIBRATION_PORT + i
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["stat_prefix"] = f"calibrate_{call}"
        wasm = hcm["http_filters"][0]["typed_config"]["config"]
        wasm["name"] = f"calibrate_{call}"
        wasm["configuration"] = {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": call}
        config["static_resources"]["listeners"].append(listener)
        CALIBRATION[call] = CALIBRATION_PORT + i


def calibration_table(results: dict[str, list[dict]], noop: list[dict]) -> str:
    noop_cpu = median(noop, "cpu_us")
    lines = [
        "**One host call per request, flat out: Envoy CPU over the plain no-op (c)**",
        "",
        "| host call | Envoy CPU µs/req | µs per call (− (c)) | req/s |",
        "|---|---:|---:|---:|",
        f"| none: (c) no-op wasm | {noop_cpu:.1f} | +0.0 | {median(noop, 'rps'):,.0f} |",
    ]
    for call, label in CALIBRATION_CALLS.items():
        rows = results[call]
        cpu = median(rows, "cpu_us")
        lines.append(f"| {label} | {cpu:.1f} | {cpu - noop_cpu:+.1f} | {median(rows, 'rps'):,.0f} |")
    return "\n".join(lines)


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def table(results: dict[str, list[dict]], title: str) -> str:
    base = {k: median(results["native"], k) for k in ("cpu_us", "p50", "p99", "rps")}
    noop_cpu = median(results["noop_wasm"], "cpu_us")
    lines = [
        f"**{title}**",
        "",
        "| variant | req/s | Envoy CPU µs/req | CPU vs (b) | CPU − (c) µs | p50 µs | p99 µs | p99 vs (b) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in VARIANTS:
        rows = results[name]
        cpu, p99 = median(rows, "cpu_us"), median(rows, "p99")
        lines.append(
            f"| {LABELS[name]} | {median(rows, 'rps'):,.0f} | {cpu:.1f} | {cpu / base['cpu_us']:.2f}x"
            f" | {cpu - noop_cpu:+.1f} | {median(rows, 'p50'):,.0f} | {p99:,.0f} | {p99 / base['p99']:.2f}x |"
        )
    return "\n".join(lines)


def machine() -> str:
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr
    return (
        f"{os.cpu_count()} × {cpu_model()}, Linux {platform.release()}, "
        f"Envoy {envoy_version()} (v8), nginx {nginx.strip().split('/')[-1]}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument(
        "--paced-delay-ms", type=float, default=2.0, help="per-request pause in the paced runs"
    )
    parser.add_argument(
        "--policies",
        type=Path,
        default=BENCH / "policies",
        help="policy directory for (d); it must send bench.example.com to the HTTPS origin",
    )
    parser.add_argument("--wasm", type=Path, default=WASM, help="the origin-policy build for (d)")
    parser.add_argument(
        "--lever",
        action="append",
        default=[],
        metavar="NAME=POLICY_DIR[@WASM]",
        help="one more origin-policy variant in the same run, with another policy directory "
        "(same origin) and optionally another build of the filter: an A/B of one lever "
        "against (d)",
    )
    parser.add_argument(
        "--feed-lever",
        action="append",
        default=[],
        metavar="NAME=WASM",
        help="one more feed-delivery variant in the same run with another build of the filter "
        "(its own singleton and VM, the same policy source): an A/B against (e)",
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="also measure one kind of host call per request against the no-op filter",
    )
    parser.add_argument(
        "--profile",
        choices=list(VARIANTS),
        help="instead of the tables: load one variant for --seconds under `perf record` of Envoy",
    )
    args = parser.parse_args()
    if os.cpu_count() < 2:
        raise SystemExit("needs two cores: one for Envoy, one for the origin and wrk")
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: run scripts/setup with WITH_BENCH=1")

    run = Path(tempfile.mkdtemp(prefix="origin-policy-bench-"))
    processes: list[subprocess.Popen] = []
    envoy = None
    try:
        certs = Certificates(run / "certs")
        origin = certs.ca.issue_cert("origin.example.net")
        origin.cert_chain_pems[0].write_to_path(str(run / "certs" / "origin.pem"))
        origin.private_key_pem.write_to_path(str(run / "certs" / "origin-key.pem"))
        (run / "nginx.conf").write_text(NGINX_CONF.format(run=run, port=ORIGIN_PORT))
        processes.append(
            subprocess.Popen(
                ["nginx", "-c", str(run / "nginx.conf"), "-p", str(run)],
                preexec_fn=pinned(LOAD_CPU),
            )
        )
        shutil.copy(NOOP_WASM, run / "noop_filter.wasm")
        bundle(run, [args.policies], args.wasm)
        use_vm(run / "origin-policy.ecds.json", INLINE_VM_ID)
        config = yaml.safe_load((BENCH / "envoy" / "bench.yaml").read_text())
        # The peers first: they route by (d)'s one derived cluster, before a
        # lever's clusters join the file.
        processes += add_peers(config, run, args.wasm, args.policies)
        for i, lever in enumerate(args.lever):
            add_lever(run, config, lever, LEVER_PORT + i, args.wasm)
        if args.calibrate:
            add_calibration(config)
        for i, lever in enumerate(args.feed_lever):
            add_feed_lever(run, config, lever, LEVER_PORT + len(args.lever) + i)
        envoy = Envoy(run, config, concurrency=1, cpus={ENVOY_CPU}, admin=ADMIN)
        envoy.start()
        wait_for_variants()

        flat_out = run / "flat-out.lua"
        flat_out.write_text(WRK_REPORT % (VIEWER_HOST, ""))
        paced = run / "paced.lua"
        paced.write_text(
            WRK_REPORT % (VIEWER_HOST, f"function delay() return {args.paced_delay_ms} end")
        )
        # Warm-up: connection pools, TLS sessions, the wasm VMs' first requests.
        for port in [*VARIANTS.values(), *CALIBRATION.values()]:
            wrk(port, 1, args.connections, flat_out)

        if args.profile:
            return profile(envoy.process.pid, VARIANTS[args.profile], args, flat_out, run)

        names = list(VARIANTS) + list(CALIBRATION)
        results = {"flat": {n: [] for n in names}, "paced": {n: [] for n in VARIANTS}}
        for round_no in range(args.rounds):
            order = names[round_no % len(names) :] + names[: round_no % len(names)]
            for name in order:
                port = VARIANTS.get(name) or CALIBRATION[name]
                results["flat"][name].append(
                    measure(envoy.process.pid, port, args.seconds, args.connections, flat_out)
                )
                if name in VARIANTS:
                    results["paced"][name].append(
                        measure(envoy.process.pid, port, args.seconds, args.connections, paced)
                    )
            print(f"round {round_no + 1}/{args.rounds} done", file=sys.stderr)
        check_variants()

        print(f"Machine: {machine()}.")
        print(
            f"Envoy --concurrency 1 pinned to CPU {ENVOY_CPU}; nginx (1 worker, HTTPS origin) and "
            f"wrk (1 thread, {args.connections} keep-alive connections) pinned to CPU {LOAD_CPU}; "
            f"all on 127.0.0.1, plain HTTP viewer side, TLS to the origin. {args.rounds} rounds of "
            f"{args.seconds:g} s per variant and mode, variants rotated each round; medians."
        )
        print()
        print(table(results["flat"], "Flat out (no pause between requests)"))
        print()
        print(
            table(
                results["paced"],
                f"Paced ({args.paced_delay_ms:g} ms pause per request per connection: about the same offered load for every variant)",
            )
        )
        if CALIBRATION:
            print()
            print(calibration_table(results["flat"], results["flat"]["noop_wasm"]))
        return 0
    finally:
        if envoy is not None:
            envoy.stop()
        for p in processes:
            p.terminate()
            p.wait(timeout=10)
        shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
