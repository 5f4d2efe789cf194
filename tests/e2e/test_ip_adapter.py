"""The demo drawn with the tuning-free IP-Adapter generator instead of ProFusion:
references -> plan -> generate -> filter -> dialogue -> publish, on 4 jobs."""

import pytest

from factory.dataset.manifest import load_manifest, shard_key, verify_version
from factory.dataset.shards import read_shard
from factory.framework.config import StorageConfig
from factory.framework.storage import open_storage
from tests.e2e.conftest import run_cli

pytestmark = pytest.mark.slow  # about a minute on 2 CPU cores, most of it Ray's start and SmolLM2's dialogues

EVERYTHING_PASSES = ("--set", "filter.thresholds.clip_t=-1", "--set", "filter.thresholds.dino=-1")


def test_the_demo_publishes_samples_drawn_by_the_ip_adapter(tmp_path, machine_cache):
    result = run_cli(tmp_path, "--stage", "all", "--set", "plan.generator=ip_adapter", "--set", "plan.total_jobs=4",
                     *EVERYTHING_PASSES, env=machine_cache)  # SmolLM2 copied from the session's conversion
    assert result.returncode == 0, result.stderr[-3000:]

    storage = open_storage(StorageConfig(root=str(tmp_path / "factory-data")))
    assert verify_version(storage, "demo", "demo") == []
    manifest = load_manifest(storage, "demo", "demo")
    samples = [s for shard in manifest["shards"] for s in read_shard(storage, shard_key(manifest, shard["path"]))]
    assert manifest["funnel"]["planned"] == 4 and len(samples) == manifest["samples"] > 0
    for sample in samples:
        generator = sample.meta["generator"]
        assert (generator["name"], generator["kind"]) == ("ip_adapter", "ip_adapter")
        assert generator["checkpoint"] == "factory-data/models/tiny-ip-adapter"  # what it drew with
        assert generator["model"] == "factory-data/models/tiny-sd" and generator["scale"] == 0.5
    cost = manifest["cost"]["generate"]
    assert cost["finetune_unet_evals"] == 0 and cost["unet_evals"] == 4 * 2 * 3  # 4 images x CFG x 3 steps
    assert manifest["models"]["generator:ip_adapter"]["kind"] == "ip_adapter"
