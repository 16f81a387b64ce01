"""The shipped Envoy configuration is valid and defines every cluster the
example policies can send requests to."""

import subprocess

import yaml
from conftest import E2E_POLICIES, e2e_envoy_config

from edge import ENVOY, POLICIES, bundle, edge_config, missing_clusters
from origins import Certificates


def validate(config: dict, tmp_path) -> subprocess.CompletedProcess:
    Certificates(tmp_path / "certs")  # validate mode loads them
    bundle(tmp_path, [POLICIES, E2E_POLICIES])  # and needs the ECDS file
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


def test_the_test_configuration_validates(tmp_path):
    out = validate(e2e_envoy_config(), tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_broken_configuration_does_not_validate(tmp_path):
    config = edge_config()
    config["static_resources"]["clusters"][0]["lb_policy"] = "NO_SUCH_POLICY"
    assert validate(config, tmp_path).returncode != 0


def test_every_cluster_a_policy_names_exists():
    assert missing_clusters(edge_config(), [POLICIES]) == set()
    assert missing_clusters(e2e_envoy_config(), [POLICIES, E2E_POLICIES]) == set()


def test_a_missing_cluster_is_reported_by_name():
    config = edge_config()
    config["static_resources"]["clusters"] = [
        c for c in config["static_resources"]["clusters"] if c["name"] != "legacy_origin_8150"
    ]
    assert missing_clusters(config, [POLICIES]) == {"legacy_origin_8150"}
