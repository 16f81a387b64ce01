"""A domain's whole origin setup changes live, with nothing written in Envoy's
configuration: a new domain on a brand-new origin, the origin moved to
another port, then switched from HTTP to HTTPS, all under load on the other
domains, which never see a failed request. A policy Envoy could not serve is
refused by `check` and `bundle`, and nothing is pushed.
"""

import hashlib
import json
import threading
import uuid

import pytest

from edge import EdgeError, cli
from origins import DemoOrigins, OriginSpec

NEW_DOMAIN = "brand-new.example.org"
FIRST, SECOND, SECURE = 18095, 18096, 18097
SECURE_NAME = "brand-new-origin.example.org"
OTHERS = ["plain.example.com", "media.example.com", "secure.example.com", "a.img.example.com"]


@pytest.fixture(scope="module")
def new_origins(demo_origins):
    specs = [
        OriginSpec("new-first", FIRST),
        OriginSpec("new-second", SECOND),
        OriginSpec("new-secure", SECURE, (SECURE_NAME,)),
    ]
    with DemoOrigins(specs, demo_origins.certs) as origins:
        yield origins


class Load(threading.Thread):
    """Requests the other domains until stopped, counting what is not a 200."""

    def __init__(self, edge):
        super().__init__(daemon=True)
        self.edge = edge
        self.stopped = threading.Event()
        self.sent = 0
        self.failed: list[tuple[str, int]] = []

    def run(self):
        while not self.stopped.is_set():
            for host in OTHERS:
                self.sent += 1
                r = self.edge.request(host, f"/load/{self.sent}")
                if r.status != 200:
                    self.failed.append((host, r.status))

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self.join()


def origin_of(edge, path: str) -> str:
    """Which origin answers the new domain now (a path of its own each time,
    so that the edge's cache cannot answer)."""
    return edge.request(NEW_DOMAIN, f"{path}/{uuid.uuid4().hex}").json().get("origin", "")


def bundle_files(edge) -> str:
    digest = hashlib.sha256()
    for name in ("origin-policy.cds.json", "origin-policy.ecds.json"):
        digest.update((edge.run_dir / name).read_bytes())
    return digest.hexdigest()


def test_an_origin_setup_changes_live_and_the_others_never_fail(edge, new_origins, path):
    with Load(edge) as load:
        # A new domain with an origin Envoy has never heard of.
        edge.push_policy({
            "domain": NEW_DOMAIN,
            "primary": {"address": "127.0.0.1", "port": FIRST},
            "origin_host": {"mode": "custom", "value": "brand-new-origin.example.org"},
        })
        r = edge.request(NEW_DOMAIN, f"{path}/first")
        assert r.status == 200 and r.json()["origin"] == "new-first"
        assert r.json()["host"] == "brand-new-origin.example.org"

        # The origin moves to another port: traffic follows.
        edge.policies.joinpath(f"{NEW_DOMAIN}.json").write_text(json.dumps({
            "domain": NEW_DOMAIN,
            "primary": {"address": "127.0.0.1", "port": SECOND},
            "origin_host": {"mode": "custom", "value": "brand-new-origin.example.org"},
        }))
        edge.rebundle()
        edge.wait_for(lambda: origin_of(edge, f"{path}/moved") == "new-second")

        # From HTTP to HTTPS, with the SNI sent and checked against the certificate.
        edge.policies.joinpath(f"{NEW_DOMAIN}.json").write_text(json.dumps({
            "domain": NEW_DOMAIN,
            "primary": {"address": "127.0.0.1", "port": 443},
            "protocol": {"policy": "https", "https_port": SECURE},
            "origin_host": {"mode": "custom", "value": SECURE_NAME},
        }))
        edge.rebundle()
        edge.wait_for(lambda: origin_of(edge, f"{path}/tls") == "new-secure")
        seen = edge.request(NEW_DOMAIN, f"{path}/tls-again").json()
        assert (seen["scheme"], seen["sni"], seen["host"]) == ("https", SECURE_NAME, SECURE_NAME)
        assert load.sent > 0
    assert load.failed == [], load.failed[:10]


def test_a_policy_envoy_could_not_serve_is_refused_and_never_pushed(edge, path):
    # What a user tried: naming a cluster by hand, as the edge once required.
    broken = edge.policies / "hand-named.example.org.json"
    broken.write_text(json.dumps({
        "domain": "hand-named.example.org",
        "primary": {"address": "127.0.0.1", "port": 8081, "clusters": {"http": "brand_new_origin"}},
    }))
    before = bundle_files(edge)
    try:
        checked = cli("check", str(broken))
        assert checked.returncode == 1
        assert "hand-named.example.org: /primary/clusters" in checked.stdout
        with pytest.raises(EdgeError, match="/primary/clusters"):
            edge.rebundle()
        assert bundle_files(edge) == before, "nothing was pushed"
        assert edge.request("hand-named.example.org", path).status == 404
    finally:
        broken.unlink()
        edge.rebundle()
