"""Object-store faults between boto3 and the S3 server: a publish still makes the same version.

The fault proxy (s3proxy.py) sits between `S3Storage` and moto's server on 127.0.0.1 and
answers chosen requests with 500, 503, 503 SlowDown, a connection reset, a slow answer (past
the client's read timeout), or a lost answer (the write happened, the client never heard).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from factory.dataset.manifest import (
    VersionSpec,
    release_stale_lock,
    verify_version,
    version_dir,
    version_exists,
)
from factory.dataset.publisher import publish_samples
from factory.dataset.shards import Sample
from factory.framework.config import StorageConfig
from factory.framework.layout import sample_key
from factory.framework.storage import StorageError, open_storage
from tests.conftest import S3_TEST_KEYS
from tests.reliability.s3proxy import Fault, FaultProxy

SHARD_SAMPLES = 3
READ_TIMEOUT_S = 0.5
SLOW_S = 1.2  # past the read timeout: the client gives up on the answer and retries


def noise_jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def samples(count: int = 8) -> list[Sample]:
    out = []
    for n in range(count):
        key = sample_key(reference_id=f"r{n % 3}", instruction_id=f"i{n}", instruction=f"a dog {n}", seed=n,
                         generator="profusion", checkpoint="tiny", round=0)
        meta = {"key": key, "reference_id": f"r{n % 3}", "subject": "dog", "domain": "object",
                "instruction": f"a dog {n}", "round": 0, "generator": {"name": "profusion", "seed": n},
                "scores": {"clip_t": 0.31, "dino": 0.61}}
        out.append(Sample(key, noise_jpeg(n), noise_jpeg(n + 100), f"draw dog {n}", f"dog {n} drawn", meta))
    return out


def spec() -> VersionSpec:
    return VersionSpec(dataset="demo", version="v1", kind="bootstrap", config_sha256="c0ffee")


@pytest.fixture
def proxy(s3_server):
    proxy = FaultProxy(s3_server).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def buckets(s3_server):
    import uuid

    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    names = [f"faults-{uuid.uuid4().hex[:10]}-{side}" for side in ("clean", "faulty")]
    for name in names:
        client.create_bucket(Bucket=name)
    return names


def storage_for(bucket: str, endpoint: str, max_attempts: int = 8):
    return open_storage(StorageConfig(root=f"s3://{bucket}/f", endpoint_url=endpoint, max_attempts=max_attempts,
                                      read_timeout_s=READ_TIMEOUT_S, connect_timeout_s=2))


def settled_facts(storage, manifest, proxy) -> dict:
    """The facts once the proxy has let go of every held request. A lock PUT held past the
    client's timeout can land after the publish released the lock (S3 can do the same); the
    next publish of the version clears such a lock (`release_stale_lock`), so the check does too."""
    proxy.wait_idle()
    release_stale_lock(storage, "demo", "v1")
    return facts(storage, manifest)


def facts(storage, manifest) -> dict:
    folder = version_dir("demo", "v1")
    return {
        "shards": [(s["path"], s["sha256"], s["samples"]) for s in manifest["shards"]],
        "index": storage.read_parquet(f"{folder}/index.parquet").column("key").to_pylist(),
        "listing": storage.list(folder),
        "problems": verify_version(storage, "demo", "v1"),
    }


@pytest.fixture
def reference(buckets, s3_server):
    storage = storage_for(buckets[0], s3_server)
    return facts(storage, publish_samples(storage, spec(), samples(), shard_max_samples=SHARD_SAMPLES))


def test_every_fault_kind_once_and_the_version_is_the_same(proxy, buckets, reference):
    storage = storage_for(buckets[1], proxy.url)
    proxy.add(
        Fault("500", "HEAD", "manifest.json"),  # version_exists
        Fault("slow", "PUT", "_publishing.json", delay_s=SLOW_S),  # the lock: create-only
        Fault("503", "PUT", "-000000.tar"),
        Fault("slowdown", "PUT", "-000001.tar"),
        Fault("lost", "PUT", "-000002.tar"),
        Fault("reset", "PUT", "index.parquet"),
        Fault("lost", "PUT", "manifest.json"),  # create-only: the retry meets our own manifest
        Fault("reset", "DELETE", "_publishing.json"),
        Fault("slowdown", "GET", "-000000.tar"),  # verify's reads
        Fault("reset", "GET", "index.parquet"),
    )
    manifest = publish_samples(storage, spec(), samples(), shard_max_samples=SHARD_SAMPLES)
    assert settled_facts(storage, manifest, proxy) == reference
    assert len(proxy.injected()) == 10 and all(rule.times == 0 for rule in proxy.rules)


def test_a_seeded_storm_of_faults_gives_the_same_version(proxy, buckets, reference):
    storage = storage_for(buckets[1], proxy.url, max_attempts=10)
    proxy.start_storm(seed=8, rate=0.3, kinds=("500", "503", "slowdown", "reset", "slow", "lost"), delay_s=SLOW_S)
    manifest = publish_samples(storage, spec(), samples(), shard_max_samples=SHARD_SAMPLES)
    assert settled_facts(storage, manifest, proxy) == reference
    assert len({kind for _, _, kind in proxy.injected()}) >= 4, proxy.injected()


def test_a_manifest_write_whose_answer_was_lost_still_publishes(proxy, buckets, reference):
    storage = storage_for(buckets[1], proxy.url)
    proxy.add(Fault("lost", "PUT", "manifest.json"))
    manifest = publish_samples(storage, spec(), samples(), shard_max_samples=SHARD_SAMPLES)
    assert facts(storage, manifest) == reference


@pytest.mark.parametrize("kind", ["503", "slowdown", "reset", "slow"])
def test_past_the_retry_budget_a_clear_error_then_a_clean_resume(kind, proxy, buckets, reference):
    storage = storage_for(buckets[1], proxy.url, max_attempts=2)
    proxy.add(Fault(kind, "PUT", "-000001.tar", times=100, delay_s=SLOW_S))
    with pytest.raises(StorageError) as caught:
        publish_samples(storage, spec(), samples(), shard_max_samples=SHARD_SAMPLES)
    message = str(caught.value)
    assert message.startswith("S3 put failed for s3://") and "shards/v1-000001.tar" in message, message
    assert not any(secret in message for secret in S3_TEST_KEYS.values())
    assert len([entry for entry in proxy.injected() if "-000001.tar" in entry[1]]) == 3  # 1 try + 2 retries
    assert not version_exists(storage, "demo", "v1")

    proxy.clear()
    manifest = publish_samples(storage, spec(), samples(), shard_max_samples=SHARD_SAMPLES)
    assert facts(storage, manifest) == reference
