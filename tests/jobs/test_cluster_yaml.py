"""cluster.yaml: valid for Ray's own launcher schema and checks, GPU types bounded, no inline keys."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_validates_against_rays_schema(cluster, ray_schema):
    jsonschema.validate(cluster, ray_schema)


def test_passes_rays_own_config_preparation_and_checks(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(json.loads(json.dumps(cluster)))  # what `ray up` does before launching
    validate_config(prepared)
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


def test_the_schema_check_is_not_vacuous(cluster, ray_schema):
    broken = json.loads(json.dumps(cluster))
    broken["available_node_types"]["gpu_a100"]["resources"]["GPU"] = 0.5  # resources are integers
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, ray_schema)


def gpu_types(cluster: dict) -> dict[str, dict]:
    return {name: node for name, node in cluster["available_node_types"].items() if node["resources"].get("GPU")}


def test_cpu_head_and_two_bounded_gpu_worker_types(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert not head["resources"].get("GPU")
    gpus = gpu_types(cluster)
    assert set(gpus) == {"gpu_a100", "gpu_llm"}
    for node in gpus.values():
        assert 0 <= node["min_workers"] <= node["max_workers"]
    assert sum(node["max_workers"] for node in gpus.values()) <= cluster["max_workers"]


GPU_MEMORY_GB = {"p4d.24xlarge": 40, "p4de.24xlarge": 80, "p5.48xlarge": 80, "g5.12xlarge": 24}


def test_the_llm_type_fits_llama_2_70b_with_tensor_parallelism_4(cluster):
    llm = gpu_types(cluster)["gpu_llm"]
    card_gb = GPU_MEMORY_GB[llm["node_config"]["InstanceType"]]
    weights_gb = 70 * 2  # bf16
    assert card_gb >= 80 and llm["resources"]["GPU"] >= 4
    assert 4 * card_gb >= 1.5 * weights_gb  # the weights plus room for the KV cache
    gen = gpu_types(cluster)["gpu_a100"]
    assert GPU_MEMORY_GB[gen["node_config"]["InstanceType"]] * 4 < 1.5 * weights_gb  # why a second type exists


def test_every_node_takes_credentials_from_an_instance_role(cluster):
    for name, node in cluster["available_node_types"].items():
        assert node["node_config"].get("IamInstanceProfile"), name


def test_no_inline_credentials():
    text = CLUSTER_YAML.read_text()
    assert not re.search(r"aws_access_key_id|aws_secret_access_key|aws_session_token", text, re.I)
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text)
    assert not re.search(r"AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY)\s*[=:]", text)


def test_setup_installs_this_project_and_start_uses_token_auth(cluster):
    setup = " ".join(cluster["head_setup_commands"] + cluster["worker_setup_commands"])
    assert "pip install" in setup and "/home/ray/cafe-factory" in setup and "[vllm]" in setup
    assert cluster["file_mounts"]["/home/ray/cafe-factory"] == "."
    for commands in (cluster["head_start_ray_commands"], cluster["worker_start_ray_commands"]):
        start = " ".join(commands)
        assert "python -m jobs token" in start and "RAY_AUTH_MODE=token ray start" in start
