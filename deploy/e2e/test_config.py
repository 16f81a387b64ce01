"""The shipped Envoy configuration is valid, and the bundle derives a cluster
for everything the policies can name: nothing is written by hand per origin."""

import json
import subprocess

import yaml
from conftest import E2E_POLICIES, policies_for_tests

from edge import ENVOY, bundle, cli, edge_config
from origins import Certificates


def validate(config: dict, tmp_path) -> subprocess.CompletedProcess:
    Certificates(tmp_path / "certs")  # validate mode loads them
    bundle(tmp_path, [policies_for_tests(tmp_path), E2E_POLICIES])  # and needs the CDS and ECDS files
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [str(ENVOY), "--mode", "validate", "-c", str(path)],
        capture_output=True, text=True, cwd=tmp_path,
    )


def test_the_edge_configuration_validates(tmp_path):
    out = validate(edge_config(), tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"configuration '{tmp_path / 'envoy.yaml'}' OK" in out.stdout


def test_a_broken_configuration_does_not_validate(tmp_path):
    config = edge_config()
    config["static_resources"]["clusters"][0]["lb_policy"] = "NO_SUCH_POLICY"
    assert validate(config, tmp_path).returncode != 0


def test_the_edge_configuration_names_no_origin():
    clusters = edge_config()["static_resources"]["clusters"]
    assert [c["name"] for c in clusters] == ["origin_fetch"]


def test_the_bundle_defines_every_cluster_a_policy_can_name(tmp_path):
    policies = policies_for_tests(tmp_path)
    bundle(tmp_path, [policies, E2E_POLICIES])
    report = json.loads(cli("check", "--json", str(policies), str(E2E_POLICIES)).stdout)
    cds = json.loads((tmp_path / "origin-policy.cds.json").read_text())
    defined = {c["name"] for c in cds["resources"]}
    assert report["clusters"] and set(report["clusters"]) <= defined
    # A chain's members are clusters too.
    for c in cds["resources"]:
        if c.get("cluster_type", {}).get("name") == "envoy.clusters.aggregate":
            assert set(c["cluster_type"]["typed_config"]["clusters"]) <= defined


def test_domains_that_reach_an_origin_the_same_way_share_its_cluster(tmp_path):
    bundle(tmp_path, [policies_for_tests(tmp_path), E2E_POLICIES])
    cds = json.loads((tmp_path / "origin-policy.cds.json").read_text())
    backup = [
        c["name"] for c in cds["resources"]
        if c["name"].startswith("origin:http:backup.example.net:18085:")
    ]
    # www.example.com and refused.test both fail over to it, keeping the Host.
    assert len(backup) == 1


def test_a_policy_naming_clusters_is_refused_with_its_path(tmp_path):
    policy = tmp_path / "old.test.json"
    policy.write_text(json.dumps({
        "domain": "old.test",
        "primary": {"address": "origin.example.net", "clusters": {"http": "brand_new_origin"}},
    }))
    out = cli("bundle", "--out", str(tmp_path / "run"), str(policy))
    assert out.returncode == 1
    assert "old.test: /primary/clusters" in out.stdout + out.stderr
    assert not (tmp_path / "run" / "origin-policy.ecds.json").exists()
