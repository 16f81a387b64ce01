"""The secondary-origin mirror (`origin-policy mirror`, `mirror-serve`) with the
real edge: static.example.com's secondary is its own mirror.

The mirror fetches from the site origin (127.0.0.1:18087) as the edge would,
stores into a directory, and `mirror-serve` (127.0.0.1:18089) serves that
directory; when the primary is stopped, Envoy fails over to it.
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import Edge
from edge import CLI
from origins import MIRROR_SERVE_PORT, DemoOrigins, demo_site

DOMAIN = "static.example.com"
SITE = demo_site()


@pytest.fixture(scope="module")
def mirror_root(tmp_path_factory, edge: Edge):
    """`mirror-serve` over a fresh root, for the module's tests."""
    root = tmp_path_factory.mktemp("mirror")
    server = subprocess.Popen(
        [str(CLI), "mirror-serve", "--root", str(root), "--listen", f"127.0.0.1:{MIRROR_SERVE_PORT}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        edge.wait_for(lambda: _port_open(MIRROR_SERVE_PORT), timeout=10)
        yield root
    finally:
        server.terminate()
        server.wait(timeout=10)


def _port_open(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("HEAD", "/", headers={"host": "probe.invalid"})
        conn.getresponse().read()
        return True
    except OSError:
        return False


def mirror(edge: Edge, store: Path, *args: str, policies: Path | None = None, domain: str = DOMAIN):
    """Runs one mirror of `domain`; returns (exit code, summary, stderr)."""
    out = subprocess.run(
        [
            str(CLI), "mirror", domain, "--json",
            "--policies", str(policies or edge.policies),
            "--origin-ca-file", str(edge.certs.ca_file),
            "--store", str(store),
            *args,
        ],
        capture_output=True, text=True, timeout=120,
    )
    summary = json.loads(out.stdout) if out.stdout.strip() else {}
    return out.returncode, summary, out.stderr


def from_mirror(path: str, host: str = DOMAIN) -> tuple[int, dict[str, str], bytes]:
    """Asks mirror-serve directly, as the edge's secondary fetch would."""
    conn = http.client.HTTPConnection("127.0.0.1", MIRROR_SERVE_PORT, timeout=5)
    try:
        conn.request("GET", path, headers={"host": host})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def stored_files(store: Path) -> set[str]:
    return {str(p.relative_to(store)) for p in store.rglob("*") if p.is_file()}


def test_a_mirrored_site_is_served_by_its_secondary_when_the_primary_is_down(
    edge: Edge, demo_origins: DemoOrigins, mirror_root: Path
):
    store = mirror_root / DOMAIN
    code, summary, err = mirror(edge, store, "--sitemap", "/sitemap.xml")
    assert code == 0, err
    assert summary["fetched"] == len(SITE) and summary["failed"] == 0, summary
    demo_origins.stop("site")
    try:
        for path, (content_type, body) in SITE.items():
            r = edge.request(DOMAIN, path)
            assert r.status == 200, (path, r.status, r.headers)
            assert r.body == body, path
            assert r.header("content-type") == content_type, path
            # Served by the secondary: the mirror, not a cache of the primary.
            assert r.header("x-origin-policy-mirror") == "stored copy", path
        # With the primary down, a run cannot list the site: it fails and
        # forgets nothing.
        before = stored_files(store)
        manifest = (store / ".origin-policy" / "mirror.json").read_text()
        code, _, err = mirror(edge, store, "--sitemap", "/sitemap.xml", "--grace", "0")
        assert code == 1
        assert "sitemap /sitemap.xml: origin unreachable" in err, err
        assert "nothing was marked gone" in err
        assert stored_files(store) == before
        assert (store / ".origin-policy" / "mirror.json").read_text() == manifest
    finally:
        demo_origins.start("site")


def test_a_second_run_fetches_only_what_changed_and_drops_what_is_gone(
    edge: Edge, demo_origins: DemoOrigins, mirror_root: Path
):
    site = demo_origins.site
    store = mirror_root / DOMAIN
    code, _, err = mirror(edge, store, "--sitemap", "/sitemap.xml")
    assert code == 0, err
    served = {p: site.served(p) for p in SITE}
    site.put("/style.css", "text/css", b"body { color: teal }\n")
    site.put("/new.txt", "text/plain", b"new\n")
    site.remove("/app.js")
    try:
        code, summary, err = mirror(edge, store, "--sitemap", "/sitemap.xml", "--grace", "0")
        assert code == 0, err
        assert (summary["fetched"], summary["unchanged"], summary["removed"]) == (2, 2, 1), summary
        # Counted at the origin: unchanged resources were answered 304, not sent again.
        assert site.served("/") == served["/"]
        assert site.served("/img/logo.svg") == served["/img/logo.svg"]
        assert site.served("/style.css") == served["/style.css"] + 1
        status, headers, body = from_mirror("/style.css")
        assert (status, body, headers["content-type"]) == (200, b"body { color: teal }\n", "text/css")
        assert from_mirror("/new.txt")[2] == b"new\n"
        assert from_mirror("/app.js")[0] == 404
        assert "app.js" not in stored_files(store)
    finally:
        site.put("/style.css", "text/css", SITE["/style.css"][1])
        site.put("/app.js", *SITE["/app.js"])
        site.remove("/new.txt")


def test_a_path_gone_is_kept_through_the_grace_period(
    edge: Edge, demo_origins: DemoOrigins, tmp_path: Path
):
    store = tmp_path / "store"
    listed = tmp_path / "paths.txt"
    listed.write_text("/\n/app.js\n")
    assert mirror(edge, store, "--paths", str(listed))[0] == 0
    listed.write_text("/\n")
    code, summary, _ = mirror(edge, store, "--paths", str(listed), "--grace", "1h")
    assert code == 0 and summary["missing"] == 1 and summary["removed"] == 0, summary
    assert "app.js" in stored_files(store)


def test_hostile_answers_are_refused_and_leave_nothing_torn(edge: Edge, tmp_path: Path):
    store = tmp_path / "store"
    listed = tmp_path / "paths.txt"
    listed.write_text("/huge\n/endless\n/drip\n/loop/a\n/moved\n/style.css\n")
    code, summary, err = mirror(
        edge, store, "--paths", str(listed), "--max-object-bytes", "1M", "--object-timeout", "3s"
    )
    assert code == 1
    assert summary["fetched"] == 2 and summary["failed"] == 4, summary
    limit = "body larger than the object limit of 1048576 bytes (--max-object-bytes)"
    assert f"{DOMAIN} /huge: {limit}" in err, err
    assert f"{DOMAIN} /endless: {limit}" in err, err
    assert f"{DOMAIN} /drip: timed out: body not complete within 3 s" in err, err
    assert f"{DOMAIN} /loop/a: redirect loop: /loop/a -> /loop/b -> /loop/a" in err, err
    # Whole objects only: no staging file, nothing of the refused bodies.
    assert stored_files(store) == {"moved", "style.css", ".origin-policy/mirror.json"}
    assert (store / "moved").read_bytes().endswith(SITE["/style.css"][1])


def test_a_run_stopped_mid_body_exits_1_and_leaves_no_staging_file(edge: Edge, tmp_path: Path):
    store = tmp_path / "store"
    listed = tmp_path / "paths.txt"
    listed.write_text("/style.css\n/endless\n")
    run = subprocess.Popen(
        [
            str(CLI), "mirror", DOMAIN, "--paths", str(listed), "--store", str(store),
            "--policies", str(edge.policies), "--origin-ca-file", str(edge.certs.ca_file),
            "--max-object-bytes", "100G", "--rate", "4M",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # /endless is being written (past the in-memory buffer, into a staging file).
        edge.wait_for(lambda: any(p.name.startswith("endless") for p in store.glob("*")), timeout=20)
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=20)
    finally:
        run.kill()
    assert run.returncode == 1, err
    assert f"{DOMAIN}: stopped after 1 of 2 resources" in err, err
    # Whole objects only: the staging file of the cut body is gone.
    assert stored_files(store) == {"style.css", ".origin-policy/mirror.json"}
    # What was done is recorded: the next run only asks whether it changed.
    listed.write_text("/style.css\n")
    code, summary, _ = mirror(edge, store, "--paths", str(listed))
    assert code == 0 and summary["unchanged"] == 1 and summary["fetched"] == 0, summary


def test_paths_naming_one_object_are_fetched_once_and_never_delete_each_other(
    edge: Edge, tmp_path: Path
):
    store = tmp_path / "store"
    listed = tmp_path / "paths.txt"
    listed.write_text("/\n/index.html\n")
    code, summary, _ = mirror(edge, store, "--paths", str(listed))
    assert code == 0 and summary["listed"] == 1 and summary["fetched"] == 1, summary
    listed.write_text("/index.html\n")
    code, summary, _ = mirror(edge, store, "--paths", str(listed), "--grace", "0")
    assert code == 0 and summary["removed"] == 0 and summary["unchanged"] == 1, summary
    assert from_mirror_store(store, "index.html").endswith(SITE["/"][1])


def from_mirror_store(store: Path, key: str) -> bytes:
    return (store / key).read_bytes()


def test_a_full_store_refuses_new_bodies_and_keeps_the_old_ones(
    edge: Edge, demo_origins: DemoOrigins, tmp_path: Path
):
    site = demo_origins.site
    store = tmp_path / "store"
    listed = tmp_path / "paths.txt"
    listed.write_text("/\n/app.js\n")
    assert mirror(edge, store, "--paths", str(listed), "--max-store-bytes", "1K")[0] == 0
    old = (store / "app.js").read_bytes()
    site.put("/app.js", "application/javascript", b"x" * 4096)
    try:
        code, summary, err = mirror(edge, store, "--paths", str(listed), "--max-store-bytes", "1K")
        assert code == 1 and summary["failed"] == 1, summary
        assert "the store would exceed its limit of 1024 bytes (--max-store-bytes)" in err, err
        assert (store / "app.js").read_bytes() == old
    finally:
        site.put("/app.js", *SITE["/app.js"])


def test_an_https_origin_is_fetched_with_the_policy_sni_and_its_certificate_checked(
    edge: Edge, tmp_path: Path
):
    listed = tmp_path / "paths.txt"
    listed.write_text("/mirror-tls\n")
    # secure.example.com: HTTPS on 18443, SNI origin-secure.example.net, and
    # the Host the edge sends too (test_origin_rewrite.py).
    code, _, err = mirror(edge, tmp_path / "ok", "--paths", str(listed), domain="secure.example.com")
    assert code == 0, err
    seen = json.loads((tmp_path / "ok" / "mirror-tls").read_bytes().split(b"\n", 1)[1])
    assert (seen["scheme"], seen["port"]) == ("https", 18443)
    assert seen["sni"] == "origin-secure.example.net"
    assert seen["host"] == "origin-secure.example.net:18443"

    # The same origin asked for a name its certificate does not carry.
    policies = tmp_path / "policies"
    policies.mkdir()
    shutil.copy(edge.policies / "settings.json", policies)
    (policies / "mismatch.json").write_text(json.dumps({
        "domain": "mismatch.mirror.test",
        "primary": {"address": "multi-tenant.example.net", "port": 443},
        "protocol": {"policy": "https", "https_port": 18443},
        "origin_sni": {"mode": "custom", "value": "not-served.example.net"},
    }))
    code, summary, err = mirror(
        edge, tmp_path / "bad", "--paths", str(listed), policies=policies, domain="mismatch.mirror.test"
    )
    assert code == 1 and summary["failed"] == 1, summary
    assert "mismatch.mirror.test /mirror-tls: TLS handshake failed" in err, err
    assert "not valid for name" in err, err
    assert stored_files(tmp_path / "bad") == {".origin-policy/mirror.json"}


def test_an_unreachable_origin_is_an_error_naming_it(edge: Edge, tmp_path: Path):
    policies = tmp_path / "policies"
    policies.mkdir()
    shutil.copy(edge.policies / "settings.json", policies)
    (policies / "down.json").write_text(json.dumps({
        "domain": "down.mirror.test",
        # Nothing listens there (and the tests' settings allow it).
        "primary": {"address": "127.0.0.1", "port": 18099, "connect_timeout_ms": 500},
    }))
    listed = tmp_path / "paths.txt"
    listed.write_text("/a\n")
    metrics = tmp_path / "mirror.prom"
    code, summary, err = mirror(
        edge, tmp_path / "store", "--paths", str(listed), "--metrics", str(metrics),
        policies=policies, domain="down.mirror.test",
    )
    assert code == 1 and summary["failed"] == 1, summary
    assert "down.mirror.test /a: origin unreachable" in err, err
    text = metrics.read_text()
    assert 'origin_policy_mirror_last_run_failed{domain="down.mirror.test"} 1' in text
    assert 'origin_policy_mirror_resources{domain="down.mirror.test",result="failed"} 1' in text
    assert "last_success_timestamp" not in text


def test_bad_lists_are_refused_with_the_line(edge: Edge, tmp_path: Path):
    listed = tmp_path / "paths.txt"
    listed.write_text("/ok\n/../etc/passwd\n")
    code, _, err = mirror(edge, tmp_path / "store", "--paths", str(listed))
    assert code == 1
    assert f"{DOMAIN}: {listed}:2: `/../etc/passwd`: dot segments" in err, err
    assert not (tmp_path / "store" / "ok").exists()
