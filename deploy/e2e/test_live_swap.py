"""Live per-domain swaps under load (scenario 8).

While wrk sends requests for several domains, one domain's policy file is
changed and re-bundled, then an invalid policy for it is pushed, then the
.wasm itself is replaced. A prober records every domain's decision header
over time; wrk counts every failed request.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from conftest import Response

from edge import ECDS_FILE, WASM, bundle

DOMAINS = ["plain.example.com", "legacy.example.com", "secure.example.com", "media.example.com"]
SWAPPED = "plain.example.com"
NEW_HOST = "swapped-origin.example.net"
LOAD_SECONDS = 14

WRK_SCRIPT = """
local hosts = {%s}
local n = 0
request = function()
  n = n + 1
  local host = hosts[n %% #hosts + 1]
  return wrk.format("GET", "/load/" .. math.random(1, 1e9) .. "/" .. n, {["Host"] = host})
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT {\\"requests\\": %%d, \\"connect\\": %%d, \\"read\\": %%d, \\"write\\": %%d, \\"status\\": %%d, \\"timeout\\": %%d}\\n",
    summary.requests, e.connect, e.read, e.write, e.status, e.timeout))
end
""" % ", ".join(f'"{d}"' for d in DOMAINS)


@dataclass
class Probe:
    at: float
    domain: str
    status: int
    decision: str | None


class Prober(threading.Thread):
    """Asks every domain in turn until stopped, recording what the edge decided."""

    def __init__(self, edge):
        super().__init__(daemon=True)
        self.edge = edge
        self.probes: list[Probe] = []
        self.stopped = threading.Event()

    def run(self):
        n = 0
        while not self.stopped.is_set():
            for domain in DOMAINS:
                n += 1
                r: Response = self.edge.request(domain, f"/probe/{n}")
                self.probes.append(
                    Probe(time.monotonic(), domain, r.status, r.header("x-origin-decision"))
                )
            time.sleep(0.01)

    def decisions(self, domain: str, start: float = 0.0, end: float = float("inf")):
        return [p for p in self.probes if p.domain == domain and start <= p.at < end]


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.rename(tmp, path)


def wait_for(predicate, timeout: float = 5.0, step: float = 0.02) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(step)
    raise AssertionError("condition not met in time")


def test_swaps_under_load_lose_no_request(edge):
    stats_before = edge.stats()
    log_before = len(edge.envoy.log_text())
    prober = Prober(edge)
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "load.lua"
        script.write_text(WRK_SCRIPT)
        wrk = subprocess.Popen(
            ["wrk", "-t2", "-c8", f"-d{LOAD_SECONDS}s", "-s", str(script),
             "http://127.0.0.1:10080/"],
            stdout=subprocess.PIPE,
            text=True,
        )
        prober.start()
        time.sleep(2)
        before = {d: prober.decisions(d)[-1].decision for d in DOMAINS}

        # 1. One domain's policy changes: that domain switches, no other does.
        policy_file = edge.policies / "plain.example.com.json"
        original = policy_file.read_text()
        policy = json.loads(original)
        policy["origin_host"] = {"mode": "custom", "value": NEW_HOST}
        policy_file.write_text(json.dumps(policy, indent=2))
        swap_at = time.monotonic()
        edge.rebundle()
        switch_seconds = wait_for(
            lambda: (p := prober.decisions(SWAPPED, start=swap_at))
            and f"host={NEW_HOST}" in (p[-1].decision or "")
        )
        time.sleep(2)
        swapped = prober.decisions(SWAPPED)[-1].decision

        # 2. An invalid policy for that domain: it keeps its last good policy.
        config_path = edge.run_dir / "plugin-config.json"
        config = json.loads(config_path.read_text())
        for p in config["policies"]:
            if p["domain"] == SWAPPED:
                p["primary"]["port"] = 70000
        ecds = json.loads((edge.run_dir / ECDS_FILE).read_text())
        typed = ecds["resources"][0]["typed_config"]["config"]
        typed["configuration"]["value"] = json.dumps(config)
        invalid_at = time.monotonic()
        write_atomically(edge.run_dir / ECDS_FILE, json.dumps(ecds))
        wait_for(lambda: "/primary/port" in edge.envoy.log_text()[log_before:])
        time.sleep(2)

        # 3. A new build of the .wasm: a copy with an extra custom section.
        new_wasm = Path(tmp) / "origin_policy-next.wasm"
        shutil.copy(WASM, new_wasm)
        with open(new_wasm, "ab") as f:
            name = b"origin-policy.build"
            payload = bytes([len(name)]) + name + b"next"
            f.write(bytes([0, len(payload)]) + payload)
        vms_before = edge.stats()["wasm.envoy.wasm.runtime.v8.created"]
        wasm_at = time.monotonic()
        bundle(edge.run_dir, edge.policy_paths, wasm=new_wasm, admin=edge.envoy.admin)
        wait_for(lambda: edge.stats()["wasm.envoy.wasm.runtime.v8.created"] > vms_before)

        out, _ = wrk.communicate(timeout=LOAD_SECONDS + 30)
        prober.stopped.set()
        prober.join()
        # Put the example policy back for the tests that run later.
        policy_file.write_text(original)
        edge.rebundle()

    result = json.loads(out.split("RESULT ", 1)[1])
    failed = sum(v for k, v in result.items() if k != "requests")
    stats = edge.stats()
    rejected = stats["wasmcustom.origin_policy.policy.rejected"] - stats_before.get(
        "wasmcustom.origin_policy.policy.rejected", 0
    )
    print(
        f"\nswap under load: {result['requests']} requests by wrk, {failed} failed; "
        f"{len(prober.probes)} probes; {SWAPPED} switched {switch_seconds * 1000:.0f} ms "
        f"after the bundle was started"
    )
    assert result["requests"] > 1000
    assert failed == 0, result
    assert all(p.status == 200 for p in prober.probes), [
        p for p in prober.probes if p.status != 200
    ]
    assert switch_seconds < 1.0
    assert f"host={NEW_HOST}" in swapped
    # The other domains never changed, through all three swaps.
    for d in DOMAINS:
        if d != SWAPPED:
            assert {p.decision for p in prober.decisions(d)} == {before[d]}, d
    # The invalid push: the domain kept serving its last good policy.
    assert {p.decision for p in prober.decisions(SWAPPED, start=invalid_at, end=wasm_at)} == {
        swapped
    }
    log = edge.envoy.log_text()[log_before:]
    # One push is one event, however many VMs (main thread, each worker) apply
    # it: one rejected policy is counted once and logged once.
    rejected_lines = [line for line in log.splitlines() if "policy rejected:" in line]
    assert len(rejected_lines) == 1, rejected_lines
    assert "plain.example.com: /primary/port" in rejected_lines[0]
    assert rejected == 1
    kept = [line for line in log.splitlines() if "plain.example.com: keeping the last good policy" in line]
    assert len(kept) == 1, kept
    # After the new module took over, the policy is the last bundled one.
    assert prober.decisions(SWAPPED)[-1].decision == swapped


def test_an_invalid_policy_pushed_with_a_new_wasm_keeps_the_last_good_one(edge, tmp_path):
    """A new .wasm starts new VMs, which have no policies of their own; the
    domain whose policy in the same push is invalid keeps its last good one
    (from the process's shared data), and the other domains are served."""
    log_before = len(edge.envoy.log_text())
    before = {d: edge.request(d, "/before").header("x-origin-decision") for d in DOMAINS}
    assert all(before.values()), before

    # The push: a new build of the module and, in the same ECDS resource, a
    # configuration whose plain.example.com policy is invalid.
    new_wasm = tmp_path / "origin_policy-invalid-push.wasm"
    shutil.copy(WASM, new_wasm)
    with open(new_wasm, "ab") as f:
        name = b"origin-policy.build"
        payload = bytes([len(name)]) + name + b"invalid-push"
        f.write(bytes([0, len(payload)]) + payload)
    staged = tmp_path / "staged"
    staged.mkdir()
    bundle(staged, edge.policy_paths, wasm=new_wasm)
    ecds = json.loads((staged / ECDS_FILE).read_text())
    typed = ecds["resources"][0]["typed_config"]["config"]
    config = json.loads(typed["configuration"]["value"])
    for p in config["policies"]:
        if p["domain"] == SWAPPED:
            p["primary"]["port"] = 70000
    typed["configuration"]["value"] = json.dumps(config)
    vms_before = edge.stats()["wasm.envoy.wasm.runtime.v8.created"]
    write_atomically(edge.run_dir / ECDS_FILE, json.dumps(ecds))
    wait_for(lambda: edge.stats()["wasm.envoy.wasm.runtime.v8.created"] > vms_before)
    wait_for(lambda: "/primary/port" in edge.envoy.log_text()[log_before:])
    time.sleep(0.5)
    try:
        for n in range(20):
            for d in DOMAINS:
                r = edge.request(d, f"/after/{n}")
                assert r.status == 200, (d, r.status)
                assert r.header("x-origin-decision") == before[d], d
        log = edge.envoy.log_text()[log_before:]
        assert "plain.example.com: keeping the last good policy" in log, log[-3000:]
    finally:
        # Back to the example policies and the module the other tests use.
        edge.rebundle()
