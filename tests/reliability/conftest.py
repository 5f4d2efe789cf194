"""Shared fixtures of the reliability suite.

`reference_run` is the one uninterrupted `--stage all` of the tiny demo (on an S3 root
through the moto server, with canary credentials in its environment); the process-death
trials compare against it and the secrets scan reads everything it wrote.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.harness import DemoRun, ForkServer, accepted_keys, base_env, demo_args, run_demo, version_facts

# Recognisable values that must never show up in anything a run writes or prints.
CANARIES = {
    "AWS_ACCESS_KEY_ID": "AKIACANARY7Q2X9PLMZK",
    "AWS_SECRET_ACCESS_KEY": "canarySecretWf3kLq9ZtR8vNm2Yc7HdPx0Ae",
    "AWS_SESSION_TOKEN": "canarySessionJx5pT1gBv6Ke0Ua4Qs3WrYz8",
    "RAY_AUTH_TOKEN": "canaryraytoken3f9a1c7e5b2d8f0a4c6e9b1d3f5a7c",
}
REFERENCE_BUCKET = "rel-reference"


@pytest.fixture(scope="session")
def workdir():
    """The demo's working directory (its tiny models are built under ./factory-data/models).

    Short, under /tmp: Ray's socket paths inside it must stay under the 107-byte limit."""
    path = Path(tempfile.mkdtemp(prefix="rel", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def fork_server(workdir):
    server = ForkServer(workdir, base_env())
    yield server
    server.close()


@dataclass
class ReferenceRun:
    run: DemoRun
    root: str
    storage: Any
    facts: dict[str, Any]
    accepted: set[str]
    ray_dir: Path
    env: dict[str, str]


@pytest.fixture(scope="session")
def reference_run(workdir, s3_server):
    """One uninterrupted `--stage all` of the demo on s3://rel-reference through moto."""
    import boto3

    from factory.framework.config import StorageConfig
    from factory.framework.storage import open_storage

    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=REFERENCE_BUCKET)
    root = f"s3://{REFERENCE_BUCKET}/factory"
    ray_dir = workdir / "ray-ref"
    env = base_env(**CANARIES, RAY_TMPDIR=str(ray_dir), AWS_DEFAULT_REGION="us-east-1")
    run = run_demo(workdir, demo_args("all", root, f"storage.endpoint_url={s3_server}"), env,
                   workdir / "logs" / "reference")
    assert run.rc == 0, f"the uninterrupted reference run failed:\n{run.output()[-4000:]}"
    storage = open_storage(StorageConfig(root=root, endpoint_url=s3_server))
    accepted = accepted_keys(storage)
    facts = version_facts(storage)
    assert len(accepted) >= 2 and facts["samples"] == len(accepted), "the demo should accept a few candidates"
    return ReferenceRun(run, root, storage, facts, accepted, ray_dir, env)


@pytest.fixture(scope="session")
def publish_inputs(reference_run, workdir):
    """A local root holding the reference run's references and unit files, not its version."""
    from factory.framework.storage import LocalStorage

    target = workdir / "publish-inputs"
    local = LocalStorage(target)
    for prefix in ("references", "runs"):
        for key in reference_run.storage.list(prefix):
            local.write_bytes(key, reference_run.storage.read_bytes(key))
    return target
