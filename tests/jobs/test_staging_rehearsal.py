"""The production jobs, rehearsed: configs/staging.yaml on a two-node Ray with token auth.

Every model is a tiny one uploaded to an S3-protocol server on 127.0.0.1 and nothing is read from
a local model path. The second node carries the custom resources of cluster.yaml's GPU worker
types, which the staging pools ask for, so the model actors can only run there. The jobs are
submitted the way an operator submits them: `python -m jobs submit NAME --config configs/staging.yaml`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.jobs.conftest import (
    REPO,
    RayHead,
    head_command,
    short_root,
    start_node,
    stop_node,
    token_env,
    wait_until_serving,
    worker_command,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # the first test sets up the whole rehearsal

BUCKET = "cafe-staging"
GPU_TYPES = {"a100_40g": 2, "a100_80g": 2}  # stand-ins for cluster.yaml's gpu_a100 and gpu_llm nodes
MODEL_FOLDERS = {  # demo model -> where staging.yaml names it
    "tiny-sd": "models/tiny-sd", "tiny-clip": "models/tiny-clip", "tiny-dino": "models/tiny-dino",
    "tiny-llama": "models/tiny-llama", "tiny-cafe-clip": "models/tiny-cafe-clip",
    "tiny-dinov2": "models/tiny-dinov2", "tiny-promptnet": "checkpoints/promptnet/tiny",
    "tiny-ip-adapter": "models/tiny-ip-adapter",
}


def upload_folder(client, folder: Path, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(folder).as_posix()}")


@pytest.fixture(scope="module")
def staging_bucket(s3_server, tmp_path_factory):
    """The staging bucket: the tiny models, a trained-PromptNet stand-in and a few face photos."""
    import io
    import os

    import boto3
    import numpy as np
    from PIL import Image

    from factory.demo import prepare_demo
    from factory.framework.config import load_config

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    build = tmp_path_factory.mktemp("staging-models")
    here = Path.cwd()
    os.chdir(build)
    try:
        prepare_demo(load_config(str(REPO / "configs" / "staging.yaml")))  # the tiny models staging names
    finally:
        os.chdir(here)
    for name, prefix in MODEL_FOLDERS.items():
        upload_folder(client, build / "factory-data" / "models" / name, prefix)
    rng = np.random.default_rng(3)
    for n in range(3):
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (72, 60, 3), dtype=np.uint8)).save(out, format="PNG")
        client.put_object(Bucket=BUCKET, Key=f"inputs/faces/face-{n}.png", Body=out.getvalue())
    shutil.rmtree(build)
    return s3_server


@pytest.fixture(scope="module")
def cluster(staging_bucket):
    """A token-auth head (job drivers, light stages) and one 'GPU' worker node, each with its own
    model cache as two machines would have; S3 settings come from the nodes' environment."""
    from tests.conftest import S3_TEST_KEYS

    root = short_root("rs")
    env, token = token_env(root)
    env.update(S3_TEST_KEYS, AWS_ENDPOINT_URL=staging_bucket, AWS_DEFAULT_REGION="us-east-1", OMP_NUM_THREADS="1")
    command, url, gcs = head_command(root)
    caches = {"head": root / "cache-head", "worker": root / "cache-worker"}
    head = start_node(command, {**env, "FACTORY_MODEL_CACHE": str(caches["head"])}, root / "head.log")
    nodes = [head]
    try:
        ray_head = RayHead(url=url, env=env, token=token, root=root)
        wait_until_serving(ray_head, head, root / "head.log")
        nodes.append(start_node(worker_command(root, gcs, GPU_TYPES),
                                {**env, "FACTORY_MODEL_CACHE": str(caches["worker"])}, root / "worker.log"))
        yield ray_head, caches
    finally:
        for node in reversed(nodes):
            stop_node(node)
        shutil.rmtree(root, ignore_errors=True)


def submit(head: RayHead, job: str, night: int) -> tuple[int, str]:
    """`python -m jobs submit JOB --config configs/staging.yaml --follow`: (exit code, its output).
    The output also goes to a file under the cluster's folder, to `tail -f` while it runs."""
    command = [sys.executable, "-m", "jobs", "submit", job, "--config", "configs/staging.yaml",
               "--address", head.url, "--poll-s", "1", "--follow"]
    log = head.root / f"{job}-{night}.log"
    with open(log, "w") as out:
        code = subprocess.run(command, cwd=REPO, env=head.client_env(), stdout=out, stderr=subprocess.STDOUT,
                              timeout=600).returncode
    return code, log.read_text()


@pytest.fixture(scope="module")
def rehearsal(cluster):
    """bootstrap, nightly-sid on two nights, weekly-eval: each job must end SUCCEEDED."""
    head, caches = cluster
    for night, job in enumerate(("bootstrap", "nightly-sid", "nightly-sid", "weekly-eval")):
        code, output = submit(head, job, night)
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
