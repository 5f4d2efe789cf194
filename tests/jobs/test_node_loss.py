"""Node loss on the staging cluster: the worker node is SIGKILLed mid-step and a fresh one joins.

One cluster, one undisturbed run (bootstrap, then promptnet) and one disturbed run of the same
jobs under another storage root: the worker is lost while dialogue units are being written, again
while the version is being published, and once more after PromptNet's first progress save. The
moments are found by watching storage keys appear, not by sleeping. Every job must finish on its
first submission, and leave the same bytes as the undisturbed run.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from factory.dataset.card import FILES as CARD_FILES
from factory.dataset.manifest import verify_version
from factory.framework import layout
from factory.framework.config import StorageConfig
from factory.framework.storage import Storage, open_storage
from tests.jobs.conftest import BUCKET, StagingCluster, staging_cluster, start_submit, submit

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

DATASET = "cafe-staging"
RUN = "bootstrap-0001"  # configs/staging.yaml's run_id: the bootstrap's version, PromptNet's run
PROMPTNET_OUTPUT = f"checkpoints/promptnet/{RUN}"  # promptnet.output's default under the storage root
ROOTS = {"undisturbed": f"s3://{BUCKET}/nodeloss-undisturbed", "disturbed": f"s3://{BUCKET}/nodeloss-disturbed"}
WATCH_TIMEOUT_S = 600


@dataclass
class JobEnd:
    code: int
    output: str
    lost_at: list[str] = field(default_factory=list)  # the moments the worker node was lost

    def succeeded(self) -> bool:
        return self.code == 0 and "ended SUCCEEDED" in self.output


def in_dialogue(storage: Storage) -> bool:
    """A dialogue unit is written (the others are still being drawn, filtered or drafted)."""
    return any(layout.is_unit_file(key) for key in storage.list(layout.stage_dir(RUN, "dialogue")))


def in_publish(storage: Storage) -> bool:
    """The publish lock or a first shard is there, the manifest not yet."""
    keys = storage.list(layout.version_dir(DATASET, RUN))
    started = any(key.endswith("_publishing.json") or key.endswith(".tar") for key in keys)
    return started and not storage.exists(layout.manifest(DATASET, RUN))


def in_training(storage: Storage) -> bool:
    """PromptNet's first progress save is complete (latest.json points at it)."""
    return storage.exists(layout.promptnet_progress_latest(RUN))


def submit_losing_worker(cluster: StagingCluster, job: str, storage: Storage,
                         moments: list[Callable[[Storage], bool]]) -> JobEnd:
    """Submit JOB; at each moment, SIGKILL the worker node and start a fresh one; wait for the end."""
    process, log = start_submit(cluster.head, job, f"{job}-disturbed", f"storage.root={ROOTS['disturbed']}")
    lost_at = []
    for moment in moments:
        wait_for(moment, storage, process, log.read_text)
        cluster.kill_worker()
        cluster.start_worker()
        lost_at.append(moment.__name__)
    return JobEnd(process.wait(timeout=WATCH_TIMEOUT_S), log.read_text(), lost_at)


def wait_for(moment: Callable[[Storage], bool], storage: Storage, process: subprocess.Popen,
             output: Callable[[], str]) -> None:
    deadline = time.monotonic() + WATCH_TIMEOUT_S
    while not moment(storage):
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the job ended (or ran too long) before {moment.__name__}:\n{output()[-4000:]}")
        time.sleep(0.3)


def storage_at(root: str, endpoint: str) -> Storage:
    return open_storage(StorageConfig(root=root, endpoint_url=endpoint))


@pytest.fixture(scope="module")
def cluster(staging_bucket):
    with staging_cluster(staging_bucket, "nl") as staging:
        yield staging


@pytest.fixture(scope="module")
def undisturbed(cluster, staging_bucket) -> Storage:
    """bootstrap, then promptnet, with no node lost: what every disturbed run must match."""
    for job in ("bootstrap", "promptnet"):
        code, output = submit(cluster.head, job, f"{job}-undisturbed", f"storage.root={ROOTS['undisturbed']}")
        assert code == 0 and "ended SUCCEEDED" in output, f"{job}:\n{output[-5000:]}"
    return storage_at(ROOTS["undisturbed"], staging_bucket)


@pytest.fixture(scope="module")
def disturbed(cluster, staging_bucket, undisturbed) -> tuple[Storage, dict[str, JobEnd]]:
    """The same jobs, the worker node lost in dialogue and in publish (bootstrap) and in training (promptnet)."""
    storage = storage_at(ROOTS["disturbed"], staging_bucket)
    ends = {"bootstrap": submit_losing_worker(cluster, "bootstrap", storage, [in_dialogue, in_publish]),
            "promptnet": submit_losing_worker(cluster, "promptnet", storage, [in_training])}
    return storage, ends


def file_digests(storage: Storage, prefix: str, *leave_out: str) -> dict[str, str]:
    """sha256 of every object under `prefix` but those named in `leave_out`, by key relative to `prefix`."""
    keys = (key for key in sorted(storage.list(prefix)) if key.rsplit("/", 1)[-1] not in leave_out)
    return {key[len(prefix):].lstrip("/"): hashlib.sha256(storage.read_bytes(key)).hexdigest() for key in keys}


def steady_record(storage: Storage, key: str) -> dict:
    """A manifest or training record without what differs between any two runs: when it was made,
    what it cost (measured times) and the storage root the run wrote to (part of the config, and so
    of its hash)."""
    record = json.loads(storage.read_bytes(key))
    for volatile in ("created", "cost", "config_sha256"):
        record.pop(volatile, None)
    record.get("config", {}).pop("storage", None)
    return record


def test_a_worker_lost_in_dialogue_and_in_publish_leaves_the_same_version(undisturbed, disturbed):
    storage, ends = disturbed
    bootstrap = ends["bootstrap"]
    assert bootstrap.succeeded(), bootstrap.output[-5000:]
    assert bootstrap.lost_at == ["in_dialogue", "in_publish"]
    version = layout.version_dir(DATASET, RUN)
    # the manifest (compared below without its run-specific fields) and the card rendered from it
    rendered = ("manifest.json", *CARD_FILES)
    expected = file_digests(undisturbed, version, *rendered)
    assert len([key for key in expected if key.endswith(".tar")]) > 1, expected  # several shards to compare
    assert file_digests(storage, version, *rendered) == expected
    manifest = layout.manifest(DATASET, RUN)
    assert steady_record(storage, manifest) == steady_record(undisturbed, manifest)
    assert verify_version(storage, DATASET, RUN) == []


def test_a_worker_lost_in_training_resumes_from_its_last_progress_save(undisturbed, disturbed):
    storage, ends = disturbed
    promptnet = ends["promptnet"]
    assert promptnet.succeeded(), promptnet.output[-5000:]
    assert f"promptnet {RUN}: resuming after step" in promptnet.output  # Ray Train restarted the worker group
    expected = file_digests(undisturbed, PROMPTNET_OUTPUT, layout.PROMPTNET_TRAINING)
    assert any(key.endswith(".safetensors") for key in expected), expected
    assert file_digests(storage, PROMPTNET_OUTPUT, layout.PROMPTNET_TRAINING) == expected
    record = f"{PROMPTNET_OUTPUT}/{layout.PROMPTNET_TRAINING}"
    assert steady_record(storage, record) == steady_record(undisturbed, record)


def test_losing_the_worker_never_fails_the_job(cluster, disturbed):
    """The drivers run on the head (entrypoint resource job_driver): three worker losses, no failed
    job and no second submission."""
    _, ends = disturbed
    assert sum(len(end.lost_at) for end in ends.values()) == 3
    assert all(end.succeeded() for end in ends.values())
    jobs = cluster.head.client().list_jobs()
    drivers = {job.driver_node_id for job in jobs}
    assert len(jobs) == 4 and len(drivers) == 1, [(job.submission_id, job.driver_node_id) for job in jobs]
