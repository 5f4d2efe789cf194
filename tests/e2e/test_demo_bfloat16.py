"""The embedded demo with half precision rehearsed on the CPU (FACTORY_CPU_DTYPE=bfloat16): the
README's commands, every model in bfloat16 where CUDA runs half precision, on Ray as always."""

import json

import pytest

from factory.dataset.manifest import load_manifest, verify_version
from factory.framework.config import StorageConfig
from factory.framework.storage import open_storage
from filters.precision import CPU_DTYPE_VARIABLE
from tests.e2e.conftest import run_cli

pytestmark = pytest.mark.slow


def test_the_demo_publishes_and_trains_in_bfloat16(demo, machine_cache, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("demo-bf16")
    env = {**machine_cache, CPU_DTYPE_VARIABLE: "bfloat16"}
    result = run_cli(cwd, "--stage", "all", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    storage = open_storage(StorageConfig(root=str(cwd / "factory-data")))
    assert verify_version(storage, "demo", "demo") == []
    funnel = load_manifest(storage, "demo", "demo")["funnel"]
    assert funnel["planned"] == 18 and funnel["written"] > 0
    assert funnel["planned"] == funnel["written"] + sum(funnel["rejections"].values())

    float32_cwd, _ = demo
    shards = [json.loads((folder / "factory-data/datasets/demo/demo/manifest.json").read_text())["shards"]
              for folder in (float32_cwd, cwd)]
    assert [s["sha256"] for s in shards[0]] != [s["sha256"] for s in shards[1]]  # the Ray actors drew in bf16

    trained = run_cli(cwd, "--stage", "train", env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    line = next(line for line in trained.stdout.splitlines() if line.startswith("[train] done"))
    assert json.loads(line.split(": ", 1)[1])["step"] > 0
