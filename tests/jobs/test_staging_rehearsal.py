"""The production jobs, rehearsed: configs/staging.yaml on a two-node Ray with token auth.

Every model is a tiny one uploaded to an S3-protocol server on 127.0.0.1 and nothing is read from
a local model path. The second node carries the custom resources of cluster.yaml's GPU worker
types, which the staging pools ask for, so the model actors can only run there. The jobs are
submitted the way an operator submits them: `python -m jobs submit NAME --config configs/staging.yaml`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.jobs.conftest import BUCKET, staging_cluster, submit

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # the first test sets up the whole rehearsal


@pytest.fixture(scope="module")
def cluster(staging_bucket):
    """The staging cluster: a head for the job drivers and light stages, one 'GPU' worker node."""
    with staging_cluster(staging_bucket, "rs") as staging:
        yield staging.head, staging.caches


@pytest.fixture(scope="module")
def rehearsal(cluster):
    """bootstrap, nightly-sid on two nights, weekly-eval: each job must end SUCCEEDED."""
    head, caches = cluster
    for night, job in enumerate(("bootstrap", "nightly-sid", "nightly-sid", "weekly-eval")):
        code, output = submit(head, job, f"{job}-{night}")
        assert code == 0 and "ended SUCCEEDED" in output, f"{job}:\n{output[-5000:]}"
    return caches


@pytest.fixture(scope="module")
def staging_storage(rehearsal, staging_bucket):
    from factory.framework.config import StorageConfig
    from factory.framework.storage import open_storage

    return open_storage(StorageConfig(root=f"s3://{BUCKET}/factory", endpoint_url=staging_bucket))


def test_two_nights_publish_two_rounds_with_their_lineage(staging_storage):
    from factory.dataset.manifest import load_manifest, verify_version

    manifest = {name: load_manifest(staging_storage, "cafe-staging", name) for name in
                ("bootstrap-0001", "bootstrap-0001-sid1", "bootstrap-0001-union1",
                 "bootstrap-0001-sid2", "bootstrap-0001-union2")}
    assert manifest["bootstrap-0001"]["samples"] > 0
    assert manifest["bootstrap-0001-sid1"]["parents"] == ["bootstrap-0001"]
    assert manifest["bootstrap-0001-union1"]["parents"] == ["bootstrap-0001", "bootstrap-0001-sid1"]
    assert manifest["bootstrap-0001-sid2"]["parents"] == ["bootstrap-0001-union1"]
    assert manifest["bootstrap-0001-union2"]["parents"] == ["bootstrap-0001-union1", "bootstrap-0001-sid2"]
    assert "bootstrap-0001-union1" in manifest["bootstrap-0001-sid2"]["generator_checkpoint"]
    assert verify_version(staging_storage, "cafe-staging", "bootstrap-0001-union2") == []


def test_every_model_was_read_from_s3(staging_storage):
    from factory.dataset.manifest import load_manifest

    for version in ("bootstrap-0001", "bootstrap-0001-sid2"):
        sources = model_sources(load_manifest(staging_storage, "cafe-staging", version)["models"])
        not_s3 = [source for source in sources if not source.startswith(f"s3://{BUCKET}/")]
        assert not_s3 == ["tiny-clip"], sources  # open_clip's architecture name; its weights are on S3
        assert len(sources) >= 6


def model_sources(models: object) -> list[str]:
    """Every `source`/`url` string anywhere in the manifest's models section."""
    if isinstance(models, dict):
        found = [value for key, value in models.items() if key in ("source", "url") and isinstance(value, str)]
        return found + [item for value in models.values() for item in model_sources(value)]
    if isinstance(models, list):
        return [item for value in models for item in model_sources(value)]
    return []


def test_model_actors_ran_on_the_gpu_node_with_one_download_each(rehearsal):
    worker = entries(rehearsal["worker"])
    for model in ("models_tiny_sd_", "models_tiny_dino_", "models_tiny_llama_", "promptnet_tiny_"):
        fetched = [name for name in worker if model in name]
        assert len(fetched) == 1, (model, worker)  # one download per node, however many actors loaded it
    assert not [name for name in entries(rehearsal["head"]) if "tiny_llama" in name]  # dialogue ran on the worker


def entries(cache: Path) -> list[str]:
    return sorted(path.name for path in cache.iterdir() if not path.name.startswith(".")) if cache.exists() else []


def test_the_weekly_eval_scored_the_newest_generator(staging_storage):
    import json

    keys = [key for key in staging_storage.list("evals/generator") if key.endswith("/dreambench.json")]
    assert len(keys) == 1, keys
    report = json.loads(staging_storage.read_bytes(keys[0]))
    assert set(report["metrics"]) == {"dino", "clip_i", "clip_t"}
    assert report["trained_on"]["version"] == "bootstrap-0001-union2"  # G fine-tuned after night 2
