"""Origin addresses: `check` refuses what Envoy would not reach as written,
and an origin whose name never resolves is reported as such in real Envoy."""

import json

import pytest

from edge import cli


@pytest.mark.parametrize(
    ("address", "fix"),
    [
        ("127.1", "write `127.0.0.1`"),
        ("127.000.000.001", "write `127.0.0.1`"),
        ("0x7f.0.0.1", "write `127.0.0.1`"),
        ("[127.0.0.1]", "is not an IPv6 address"),
        ("origin_.example..net", "empty label"),
        ("-origin.example.net", "starts or ends with `-`"),
    ],
)
def test_check_and_bundle_refuse_an_address_envoy_would_not_reach(tmp_path, address, fix):
    policy = tmp_path / "a.example.com.json"
    policy.write_text(json.dumps({"domain": "a.example.com", "primary": {"address": address}}))
    for command in (["check"], ["bundle", "--out", str(tmp_path / "out")]):
        out = cli(*command, str(tmp_path))
        assert out.returncode != 0, out.stdout
        assert f"{policy}: a.example.com: /primary/address: address `{address}`" in out.stdout + out.stderr
        assert fix in out.stdout + out.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_an_origin_whose_name_never_resolves_says_so(edge, name_server, path):
    domain = edge.fresh_domain({"address": "never-resolves.origin.test", "port": 18081})
    seen = {}

    def reported():
        r = edge.request(domain, f"{path}/{len(seen)}")
        seen[len(seen)] = (r.status, r.header("x-origin-error"))
        return r.status == 502 and r.header("x-origin-error") == (
            "orig dns failed (the origin's name has no address)"
        )

    # The cluster exists once Envoy's first lookup has answered.
    edge.wait_for(reported, timeout=20)
    assert "never-resolves.origin.test" in name_server.queries
    # Never worded as an origin marked down.
    assert not any("marked down" in (e or "") for _, e in seen.values()), seen
