"""Shared fixtures: storage roots (local and a real S3-protocol server on 127.0.0.1)."""

from __future__ import annotations

import os
import uuid

import pytest

from factory.framework.config import load_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")



def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run only where a GPU is (bench/device_check.py runs them on a lent one)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: bench/device_check.py runs these on a lent one")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


S3_TEST_KEYS = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-key"}


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    saved = {name: os.environ.get(name) for name in [*S3_TEST_KEYS, "AWS_DEFAULT_REGION"]}
    os.environ.update(S3_TEST_KEYS)
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server._server.server_address
    yield f"http://{host}:{port}"
    server.stop()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the test S3 server; yields (endpoint_url, bucket name)."""
    import boto3

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    return s3_server, bucket


@pytest.fixture(params=["local", "s3"])
def storage_config(request, tmp_path):
    """A StorageConfig for each backend, so a test runs on both."""
    from factory.framework.config import StorageConfig

    if request.param == "local":
        return StorageConfig(root=str(tmp_path / "root"))
    endpoint, bucket = request.getfixturevalue("s3_bucket")
    return StorageConfig(root=f"s3://{bucket}/factory", endpoint_url=endpoint, max_attempts=2)


@pytest.fixture
def storage(storage_config):
    from factory.framework.storage import open_storage

    return open_storage(storage_config)


@pytest.fixture(autouse=True)
def model_cache(tmp_path, monkeypatch):
    """Each test fetches S3 models into its own cache folder (`factory.framework.models_cache`)."""
    folder = tmp_path / "model-cache"
    monkeypatch.setenv("FACTORY_MODEL_CACHE", str(folder))
    return folder


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray sized as the demo's (2 CPUs, its memory resource) for one test module; its workers
    import this checkout."""
    from pathlib import Path

    import ray

    repo = Path(__file__).resolve().parents[1]
    ray.init(include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(repo)}},
             **load_config().ray.local_cluster())
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: two intra-op threads made token-by-token decoding
    ~25x slower than one (Ray actors get OMP_NUM_THREADS=num_cpus anyway); restored afterwards."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture
def no_work(monkeypatch):
    """`factory.run` must refuse before Ray starts or a stage runs: either one fails the test."""
    import factory.run

    def tripwire(*args, **kwargs):
        raise AssertionError("work started before the input was refused")

    monkeypatch.setattr(factory.run, "init_ray", tripwire)
    monkeypatch.setattr(factory.run, "timed", tripwire)
