"""The secondary-origin mirror (`origin-policy mirror`, `mirror-serve`) with the
real edge: static.example.com's secondary is its own mirror.

The mirror fetches from the site origin (127.0.0.1:18087) as the edge would,
stores into a directory, and `mirror-serve` (127.0.0.1:18089) serves that
directory; when the primary is stopped, Envoy fails over to it. The same site
is also mirrored into an S3 bucket (SeaweedFS's S3 gateway, seaweedfs.py:
signed writes, anonymous reads of the public bucket only), the secondary of a
domain of its own, as the README sets a bucket up.
"""

from __future__ import annotations

import gzip
import http.client
import json
import random
import re
import shutil
import signal
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import Edge
from edge import CLI
from origins import MIRROR_SERVE_PORT, DemoOrigins, demo_site
from seaweedfs import DOMAIN as BUCKET_HOST_DOMAIN
from seaweedfs import S3_PORT, SeaweedFS

DOMAIN = "static.example.com"
SITE = demo_site()
SITE_PORT = 18087

# The bucket the edge reads (anonymous reads allowed) and the one holding the
# run's bookkeeping (signed requests only).
PUBLIC_BUCKET = "static-mirror"
STATE_BUCKET = "static-mirror-state"
# Domains whose primary is the site origin: one's secondary is mirror-serve,
# the other's the public bucket.
LOCAL_MIRROR_DOMAIN = "local.mirror.example.com"
BUCKET_MIRROR_DOMAIN = "bucket.mirror.example.com"
BUCKET_STORE = f"s3://{PUBLIC_BUCKET}"
BUCKET_STATE = f"s3://{STATE_BUCKET}/{BUCKET_MIRROR_DOMAIN}"

# The headers that describe a body (README): a bucket serves the first six as
# its own, and the origin's validators as metadata.
BODY_HEADERS = (
    "content-type", "content-encoding", "content-language", "content-disposition",
    "cache-control", "expires",
)  # fmt: skip
VALIDATORS = ("etag", "last-modified")
MIRROR_USER_AGENT = re.compile(r"^origin-policy-mirror/\d+\.\d+\.\d+$")


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


def mirror_args(edge: Edge, store: Path | str, *args: str, policies: Path | None = None, domain: str = DOMAIN):
    return [
        str(CLI), "mirror", domain, "--json",
        "--policies", str(policies or edge.policies),
        "--origin-ca-file", str(edge.certs.ca_file),
        "--store", str(store),
        *args,
    ]  # fmt: skip


def mirror(
    edge: Edge,
    store: Path | str,
    *args: str,
    policies: Path | None = None,
    domain: str = DOMAIN,
    env: dict[str, str] | None = None,
):
    """Runs one mirror of `domain`; returns (exit code, summary, stderr)."""
    out = subprocess.run(
        mirror_args(edge, store, *args, policies=policies, domain=domain),
        capture_output=True, text=True, timeout=180, env=env,
    )  # fmt: skip
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


# --- The same site into a directory and into a bucket, served through the edge ---


@pytest.fixture(scope="module")
def seaweedfs(tmp_path_factory):
    """SeaweedFS's S3 gateway on 127.0.0.1, fresh for the module."""
    with SeaweedFS(tmp_path_factory.mktemp("seaweedfs"), PUBLIC_BUCKET, STATE_BUCKET) as store:
        yield store


def site_origin_policy(domain: str, secondary: dict, origin_host: str) -> dict:
    return {
        "domain": domain,
        "primary": {"address": "127.0.0.1", "port": SITE_PORT,
                    "connect_timeout_ms": 1000, "response_timeout_ms": 5000},
        "secondary": {**secondary, "response_timeout_ms": 5000},
        "origin_host": {"mode": origin_host},
        "failover": {"statuses": [500, 502, 503, 504], "methods": ["GET", "HEAD"]},
    }  # fmt: skip


@pytest.fixture(scope="module")
def mirror_domains(edge: Edge):
    """A domain whose secondary is mirror-serve, and one whose secondary is
    the public bucket by its own name (README: `origin_host` `origin_domain`)."""
    edge.push_policy(site_origin_policy(
        LOCAL_MIRROR_DOMAIN, {"address": "127.0.0.1", "port": MIRROR_SERVE_PORT}, "acceleration_domain"
    ))  # fmt: skip
    edge.push_policy(site_origin_policy(
        BUCKET_MIRROR_DOMAIN, {"address": f"{PUBLIC_BUCKET}.{BUCKET_HOST_DOMAIN}", "port": S3_PORT},
        "origin_domain",
    ))  # fmt: skip


@dataclass
class Resource:
    """One file of the site, and how a viewer asks for it."""

    path: str
    content_type: str
    body: bytes
    headers: dict[str, str | None] = field(default_factory=dict)
    gzip_on_request: bool = False
    # What a bucket's REST endpoint serves a directory's page as.
    bucket_path: str | None = None


def noise(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def varied_site(prefix: str) -> list[Resource]:
    """Every header that describes a body, and every class of path."""
    page = b"<!doctype html><title>Preise</title><p>Gr\xc3\xbc\xc3\x9fe\n"
    return [
        Resource(f"{prefix}/page.html", "text/html; charset=utf-8", page,
                 {"content-language": "de-CH", "cache-control": "public, max-age=300"}),
        Resource(f"{prefix}/report.bin", "application/octet-stream", noise(65536, 1),
                 {"content-disposition": 'attachment; filename="report.bin"'}),
        # Compressed by the origin whatever the request asks: kept so.
        Resource(f"{prefix}/data.json", "application/json", gzip.compress(b'{"n": 1}\n' * 500, mtime=0),
                 {"content-encoding": "gzip", "cache-control": "max-age=600"}),
        # Compressed on request only: the mirror asks for the identity body.
        Resource(f"{prefix}/style.css", "text/css", b"body { margin: 0 }\n" * 200, gzip_on_request=True),
        Resource(f"{prefix}/etag-only.txt", "text/plain", b"etag only\n", {"last-modified": None}),
        Resource(f"{prefix}/modified-only.txt", "text/plain", b"last-modified only\n", {"etag": None}),
        Resource(f"{prefix}/expires.txt", "text/plain", b"expires\n",
                 {"cache-control": None, "expires": "Thu, 01 Dec 2033 16:00:00 GMT"}),
        Resource(f"{prefix}/img/noise.png", "image/png", noise(300_000, 2)),
        # Larger than the store's 8 MiB buffer: a multipart upload.
        Resource(f"{prefix}/video.bin", "application/octet-stream", noise(20 << 20, 3)),
        # Path classes: UTF-8, `%`, space, `+`, sub-delimiters, a directory.
        Resource(f"{prefix}/caf%C3%A9/men%C3%BC.html", "text/html; charset=utf-8", "menü\n".encode()),
        Resource(f"{prefix}/files/50%25off.html", "text/html", b"50% off\n"),
        Resource(f"{prefix}/a%20b.txt", "text/plain", b"a b\n"),
        Resource(f"{prefix}/x+y.txt", "text/plain", b"x+y\n"),
        Resource(f"{prefix}/sub/(1)!$&'*,;=:@~.txt", "text/plain", b"sub-delims\n"),
        Resource(f"{prefix}/docs/", "text/html", b"<title>docs</title>\n",
                 bucket_path=f"{prefix}/docs/index.html"),
    ]  # fmt: skip


def origin_answer(path: str) -> tuple[int, dict[str, str], bytes]:
    """The site origin's own answer, asked for the unencoded body."""
    conn = http.client.HTTPConnection("127.0.0.1", SITE_PORT, timeout=10)
    try:
        conn.request("GET", path, headers={"accept-encoding": "identity"})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


@pytest.fixture
def varied(demo_origins: DemoOrigins):
    """The varied site on the site origin (under a fresh prefix), with the
    origin's own answer to each path; removed afterwards."""
    site = demo_origins.site
    resources = varied_site(f"/v{uuid.uuid4().hex[:8]}")
    for r in resources:
        site.put(r.path, r.content_type, r.body, r.headers, r.gzip_on_request)
    try:
        yield [(r, origin_answer(r.path)) for r in resources]
    finally:
        for r in resources:
            site.remove(r.path)


@pytest.mark.parametrize("kind", ["directory", "bucket"])
def test_a_mirrored_site_is_served_by_the_edge_as_the_origin_sent_it(
    request, kind: str, edge: Edge, demo_origins: DemoOrigins, mirror_root: Path, mirror_domains, varied, tmp_path: Path
):
    if kind == "bucket":
        s3: SeaweedFS = request.getfixturevalue("seaweedfs")
        domain, store, extra, env = BUCKET_MIRROR_DOMAIN, BUCKET_STORE, ["--state", BUCKET_STATE], s3.env()
    else:
        domain, store, extra, env = LOCAL_MIRROR_DOMAIN, str(mirror_root / LOCAL_MIRROR_DOMAIN), [], None
    resources = [r for r, _ in varied]
    page = resources[0].path
    listed = tmp_path / "paths.txt"
    # A line with a query string is skipped, with why, and the run goes on.
    listed.write_text("\n".join([f"{page}?v=3", *(r.path for r in resources)]) + "\n")
    code, summary, err = mirror(edge, store, "--paths", str(listed), *extra, domain=domain, env=env)
    assert code == 0, err
    assert (summary["listed"], summary["fetched"], summary["failed"]) == (len(resources),) * 2 + (0,), summary
    assert summary["skipped"] == [
        f"{listed}:1: `{page}?v=3`: a query string is not mirrored (a bucket and mirror-serve "
        f"answer `{page}` whatever the query; list `{page}` to mirror it)"
    ], summary
    assert edge.seen(f"{page}?v=3", "site") == []
    # Again: each confirmed by the validators it has (ETag, Last-Modified or both).
    code, summary, err = mirror(edge, store, "--paths", str(listed), *extra, domain=domain, env=env)
    assert code == 0 and (summary["unchanged"], summary["fetched"]) == (len(resources), 0), summary

    # At the origin: the mirror names itself and asks for unencoded bodies.
    for r in resources:
        asked = [
            dict(seen.headers) for seen in edge.seen(r.path, "site")
            if MIRROR_USER_AGENT.match(dict(seen.headers).get("user-agent", ""))
        ]  # fmt: skip
        assert asked and all(h.get("accept-encoding") == "identity" for h in asked), (r.path, asked)

    demo_origins.stop("site")
    try:
        for r, (status, sent, body) in varied:
            assert status == 200, (r.path, status)
            viewer_path = r.bucket_path if kind == "bucket" and r.bucket_path else r.path
            got = edge.request(domain, viewer_path)
            assert got.status == 200, (viewer_path, got.status, got.headers)
            assert "origin=secondary" in (got.header("x-origin-decision") or ""), got.headers
            assert got.body == body, viewer_path
            if kind == "directory":
                for name in BODY_HEADERS + VALIDATORS:
                    assert got.header(name) == sent.get(name), (viewer_path, name, got.headers, sent)
            else:
                for name in BODY_HEADERS:
                    assert got.header(name) == sent.get(name), (viewer_path, name, got.headers, sent)
                # A bucket makes validators of its own; the origin's are metadata.
                for name in VALIDATORS:
                    assert got.header(f"x-amz-meta-origin-{name}") == sent.get(name), (viewer_path, name)
        # The compressed-on-request resource is the identity body, no Vary needed.
        css = next(r for r in resources if r.gzip_on_request)
        assert edge.request(domain, css.path, headers={"accept-encoding": "gzip"}).body == css.body
        # The bookkeeping (every mirrored path) is never served.
        for path in ("/.origin-policy/mirror.json", "/mirror.json", f"/{BUCKET_MIRROR_DOMAIN}/mirror.json"):
            got = edge.request(domain, path)
            assert got.status == 404, (path, got.status, got.body[:200])
            assert page.encode() not in got.body
    finally:
        demo_origins.start("site")
    if kind == "bucket":
        status, _, body = s3.anonymous_get(STATE_BUCKET, f"/{BUCKET_MIRROR_DOMAIN}/mirror.json")
        assert status == 403 and page.encode() not in body, (status, body[:200])
    else:
        assert (mirror_root / LOCAL_MIRROR_DOMAIN / ".origin-policy" / "mirror.json").is_file()


def test_a_run_on_a_store_that_stops_says_what_it_did_and_why_it_stopped(
    edge: Edge, demo_origins: DemoOrigins, mirror_domains, seaweedfs: SeaweedFS, tmp_path: Path
):
    site = demo_origins.site
    prefix = f"/s{uuid.uuid4().hex[:8]}"
    files = {
        f"{prefix}/a-first.txt": b"first\n",
        # Longer than the store's 8 MiB buffer, read at 1 MiB/s: its upload
        # starts several seconds after the first object is stored.
        f"{prefix}/m-large.bin": noise(12 << 20, 4),
        f"{prefix}/z-last.txt": b"last\n",
    }
    for path, body in files.items():
        site.put(path, "application/octet-stream", body)
    listed = tmp_path / "paths.txt"
    listed.write_text("".join(f"{p}\n" for p in files))
    metrics = tmp_path / "mirror.prom"
    args = ["--paths", str(listed), "--state", BUCKET_STATE, "--metrics", str(metrics)]
    d = BUCKET_MIRROR_DOMAIN
    try:
        # The store is down before the run: the list is read, nothing fetched.
        seaweedfs.stop()
        code, summary, err = mirror(edge, BUCKET_STORE, *args, domain=d, env=seaweedfs.env())
        assert code == 1, err
        assert (summary["listed"], summary["fetched"], summary["failed"], summary["not_done"]) == (3, 0, 0, 3), summary
        assert (summary["stopped"], summary["saved"], summary["stored_bytes"]) == ("store", False, None), summary
        assert f"error: store {BUCKET_STATE}/mirror.json: " in err, err
        assert "the run stopped early: nothing was marked gone" in err, err
        text = metrics.read_text()
        assert f'origin_policy_mirror_last_run_stopped{{domain="{d}",reason="store"}} 1' in text
        assert f'origin_policy_mirror_resources{{domain="{d}",result="not_done"}} 3' in text
        assert f'origin_policy_mirror_saved{{domain="{d}"}} 0' in text
        # Unknown, not 0.
        assert "origin_policy_mirror_stored_bytes{" not in text

        # The store stops during the run: it stops there and says so.
        seaweedfs.start()
        run = subprocess.Popen(
            mirror_args(edge, BUCKET_STORE, *args, "--concurrency", "1", "--rate", "1M", domain=d),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=seaweedfs.env(),
        )  # fmt: skip
        try:
            first = f"{prefix}/a-first.txt"
            edge.wait_for(lambda: seaweedfs.anonymous_get(PUBLIC_BUCKET, first)[0] == 200, timeout=60)
            seaweedfs.stop()
            out, err = run.communicate(timeout=180)
        finally:
            run.kill()
        summary = json.loads(out)
        assert run.returncode == 1, err
        assert (summary["listed"], summary["fetched"], summary["failed"], summary["not_done"]) == (3, 1, 1, 1), summary
        assert (summary["stopped"], summary["saved"]) == ("store", False), summary
        assert summary["stored_bytes"] >= len(files[first]), summary
        assert f"error: store {BUCKET_STORE} unavailable ({prefix}/m-large.bin: " in err, err
        assert "the run stopped after 2 of 3 resources" in err, err
        text = metrics.read_text()
        for result, n in (("fetched", 1), ("failed", 1), ("not_done", 1)):
            assert f'origin_policy_mirror_resources{{domain="{d}",result="{result}"}} {n}' in text, text
        assert f'origin_policy_mirror_last_run_stopped{{domain="{d}",reason="store"}} 1' in text

        # Back up: the next run finishes the job.
        seaweedfs.start()
        code, summary, err = mirror(edge, BUCKET_STORE, *args, domain=d, env=seaweedfs.env())
        assert code == 0, err
        assert summary["stopped"] is None and summary["saved"] is True and summary["not_done"] == 0, summary
        for path, body in files.items():
            assert seaweedfs.anonymous_get(PUBLIC_BUCKET, path)[2] == body, path
    finally:
        if seaweedfs.process is None:
            seaweedfs.start()
        for path in files:
            site.remove(path)


def test_an_http_endpoint_is_taken_as_given_unless_aws_allow_http_says_no(edge: Edge, tmp_path: Path):
    listed = tmp_path / "paths.txt"
    listed.write_text("/style.css\n")
    env = SeaweedFS(tmp_path, PUBLIC_BUCKET, STATE_BUCKET).env()
    # A store that cannot be used as given is a usage error, before any run.
    code, _, err = mirror(
        edge, BUCKET_STORE, "--paths", str(listed), "--state", BUCKET_STATE,
        env={**env, "AWS_ALLOW_HTTP": "false"},
    )  # fmt: skip
    assert code == 2, err
    assert (
        f"error: store {BUCKET_STORE}: the endpoint http://127.0.0.1:{S3_PORT} is http:// but "
        "AWS_ALLOW_HTTP forbids it: unset AWS_ALLOW_HTTP or use an https:// endpoint"
    ) in err, err
    # Without --state, a bucket is refused: what it holds, the edge serves.
    code, _, err = mirror(edge, BUCKET_STORE, "--paths", str(listed), env=env)
    assert code == 2 and "a bucket needs --state" in err, err


def test_bookkeeping_an_older_run_left_in_the_bucket_is_moved_out(
    edge: Edge, demo_origins: DemoOrigins, mirror_domains, seaweedfs: SeaweedFS, tmp_path: Path
):
    path = f"/o{uuid.uuid4().hex[:8]}/kept.txt"
    demo_origins.site.put(path, "text/plain", b"kept\n")
    try:
        _, sent, _ = origin_answer(path)
        # As an older version wrote it: inside the public bucket, readable by anyone.
        old = {
            "domain": BUCKET_MIRROR_DOMAIN,
            "resources": {path.lstrip("/"): {
                "head": {"status": 200, "etag": sent["etag"]}, "size": 5,
                "stored_at": 1, "checked_at": 1, "missing_since": None,
            }},
        }  # fmt: skip
        seaweedfs.filer_put(PUBLIC_BUCKET, "/.origin-policy/mirror.json", json.dumps(old).encode())
        assert seaweedfs.anonymous_get(PUBLIC_BUCKET, "/.origin-policy/mirror.json")[0] == 200
        listed = tmp_path / "paths.txt"
        listed.write_text(f"{path}\n")
        state = f"s3://{STATE_BUCKET}/moved-{uuid.uuid4().hex[:8]}"
        code, summary, err = mirror(
            edge, BUCKET_STORE, "--paths", str(listed), "--state", state,
            domain=BUCKET_MIRROR_DOMAIN, env=seaweedfs.env(),
        )  # fmt: skip
        assert code == 0, err
        # Read: the origin was asked with its validator, and answered 304.
        assert (summary["unchanged"], summary["fetched"]) == (1, 0), summary
        # Moved: gone from the bucket, kept in the state.
        assert seaweedfs.anonymous_get(PUBLIC_BUCKET, "/.origin-policy/mirror.json")[0] == 404
        code, summary, err = mirror(
            edge, BUCKET_STORE, "--paths", str(listed), "--state", state,
            domain=BUCKET_MIRROR_DOMAIN, env=seaweedfs.env(),
        )  # fmt: skip
        assert code == 0 and summary["unchanged"] == 1, (summary, err)
    finally:
        demo_origins.site.remove(path)
