"""Credentials never appear in what a run writes or prints.

The reference run had canary values in AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN and RAY_AUTH_TOKEN; every object it stored (parquet decoded, shards and
manifests as bytes), its stdout and stderr and every file of its Ray session are scanned.
Failing runs are scanned too, including one where the object store echoes the request's
Authorization and security-token headers back in its error body (as S3 does for
SignatureDoesNotMatch).
"""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from factory.framework.config import StorageConfig
from factory.framework.storage import LocalStorage, open_storage
from tests.reliability.conftest import CANARIES
from tests.reliability.harness import demo_args
from tests.reliability.s3proxy import Fault, FaultProxy

NEEDLES = tuple(value.encode() for value in CANARIES.values())


def leaks(data: bytes) -> list[str]:
    return [needle.decode()[:8] + "..." for needle in NEEDLES if needle in data]


def object_text(key: str, data: bytes) -> bytes:
    """Parquet is compressed: scan its decoded values (and its raw bytes)."""
    if key.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(data))
        return data + repr(table.to_pylist()).encode() + str(table.schema.metadata).encode()
    return data


def scan_storage(storage) -> tuple[int, list[str]]:
    found = []
    keys = storage.list("")
    for key in keys:
        found += [f"{key}: {leak}" for leak in leaks(object_text(key, storage.read_bytes(key)))]
    return len(keys), found


def scan_files(folder: Path) -> tuple[int, list[str]]:
    found, count = [], 0
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink() and not path.is_socket():
            count += 1
            found += [f"{path}: {leak}" for leak in leaks(path.read_bytes())]
    return count, found


@pytest.mark.slow
def test_nothing_the_reference_run_stored_holds_a_secret(reference_run):
    count, found = scan_storage(reference_run.storage)
    assert count >= 20 and any(key.endswith("manifest.json") for key in reference_run.storage.list("datasets"))
    assert found == []


@pytest.mark.slow
def test_the_reference_runs_output_and_ray_logs_hold_no_secret(reference_run):
    output = reference_run.run.stdout.read_bytes() + reference_run.run.stderr.read_bytes()
    assert b"funnel:" in output and leaks(output) == []
    sessions = list(reference_run.ray_dir.glob("ray/session_*/logs"))
    assert sessions, f"no Ray session logs under {reference_run.ray_dir}"
    count, found = scan_files(reference_run.ray_dir)
    assert count >= 10 and found == []


@pytest.fixture
def canary_bucket(reference_run, publish_inputs, s3_server):
    """A bucket holding the reference run's unit files (not its version), to publish from."""
    import uuid

    import boto3

    bucket = f"canary-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    storage = open_storage(StorageConfig(root=f"s3://{bucket}/f", endpoint_url=s3_server))
    source = LocalStorage(publish_inputs)
    for key in source.list(""):
        storage.write_bytes(key, source.read_bytes(key))
    return bucket, storage


@pytest.mark.slow
def test_failing_runs_print_no_secret(canary_bucket, s3_server, fork_server, tmp_path):
    bucket, storage = canary_bucket
    env = {**CANARIES, "AWS_DEFAULT_REGION": "us-east-1"}
    proxy = FaultProxy(s3_server).start()
    try:
        proxy.add(Fault("deny", "PUT", times=100))
        denied = fork_server.run_one(tmp_path / "denied", demo_args(
            "publish", f"s3://{bucket}/f", f"storage.endpoint_url={proxy.url}", "storage.max_attempts=1"), env=env)
        echoed = [entry for entry in proxy.injected() if entry[2] == "deny"]
    finally:
        proxy.stop()
    assert denied.rc == 1 and "SignatureDoesNotMatch" in denied.output(), denied.output()[-2000:]
    assert echoed, "the store was never asked, so nothing was echoed"
    assert leaks(denied.output().encode()) == []

    missing = fork_server.run_one(tmp_path / "missing", demo_args(
        "publish", "s3://no-such-canary-bucket/f", f"storage.endpoint_url={s3_server}"), env=env)
    assert missing.rc == 2 and "bucket does not exist" in missing.output()
    assert leaks(missing.output().encode()) == []

    published = fork_server.run_one(tmp_path / "ok", demo_args(
        "publish", f"s3://{bucket}/f", f"storage.endpoint_url={s3_server}"), env=env)
    assert published.rc == 0, published.output()[-2000:]
    assert leaks(published.output().encode()) == []
    assert scan_storage(storage)[1] == []
