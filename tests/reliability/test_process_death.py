"""Process death: SIGKILL at chosen and at random points, restart, and get the same version.

The full pipeline (`--stage all`, Ray included) is killed as a whole process group a few
times; `--stage publish` (no Ray, cheap) is killed at every one of its storage writes in
each window (before, half-written, written but not committed, committed) and at seeded
random times. Every trial is compared with the uninterrupted reference run.
"""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from factory.dataset.manifest import VersionError, load_manifest, version_exists
from factory.framework.config import StorageConfig, load_config
from factory.framework.stage import RunContext
from factory.framework.storage import LocalStorage, open_storage
from tests.conftest import S3_TEST_KEYS
from tests.reliability.harness import (
    accepted_keys,
    base_env,
    busy_actors,
    copy_tree,
    demo_args,
    hidden_temp_files,
    run_demo,
    version_facts,
    visible_strays,
)

WHEN = ("before", "torn", "commit", "after")
SEED = 8
S3_ENV = {**S3_TEST_KEYS, "AWS_DEFAULT_REGION": "us-east-1"}


def publish_writes(fork_server, publish_inputs, tmp_path) -> list[str]:
    """The keys an uninterrupted publish writes, in order (the kill points)."""
    root = copy_tree(publish_inputs, tmp_path / "count")
    log = tmp_path / "writes.log"
    result = fork_server.run_one(tmp_path / "logs" / "count", demo_args("publish", str(root)),
                                 {"log_file": str(log)})
    assert result.rc == 0, result.output()
    return [line.split("\t")[1] for line in log.read_text().splitlines()]


def assert_sound_or_absent(root: Path) -> bool:
    """Right after a kill: either no version at all, or a whole one. Returns whether it exists."""
    storage = LocalStorage(root)
    if not version_exists(storage, "demo", "demo"):
        with pytest.raises(VersionError):
            load_manifest(storage, "demo", "demo")
        return False
    assert version_facts(storage)["problems"] == []
    return True


def assert_same_as_reference(root: Path, reference, storage=None) -> None:
    storage = storage or LocalStorage(root)
    facts = version_facts(storage)
    assert facts["problems"] == []
    assert facts["shards"] == reference.facts["shards"], "shard bytes differ from the uninterrupted run"
    assert facts["keys"] == sorted(reference.accepted), "a sample is missing or repeated"
    # A kill between the manifest write and the lock release leaves the lock behind: that
    # one is checked by its own test below; any other stray object is a failure here.
    strays = [key for key in visible_strays(storage) if not key.endswith("/_publishing.json")]
    assert strays == [], "objects under the version that the manifest does not list"


@pytest.mark.slow
@pytest.mark.parametrize("when", WHEN)
def test_publish_killed_at_each_storage_write_resumes_to_the_same_version(
        when, fork_server, publish_inputs, reference_run, tmp_path):
    writes = publish_writes(fork_server, publish_inputs, tmp_path)
    assert writes[0].endswith("_publishing.json") and writes[-1].endswith("manifest.json")
    assert any("/shards/" in key for key in writes)
    roots = {n: copy_tree(publish_inputs, tmp_path / f"trial-{n}") for n in range(1, len(writes) + 1)}
    killed = fork_server.run([
        {"id": str(n), "argv": demo_args("publish", str(root)),
         "faults": {"die_at_write": n, "die_when": when},
         "out": str(tmp_path / f"kill-{n}.out"), "err": str(tmp_path / f"kill-{n}.err")}
        for n, root in roots.items()])
    for n, root in roots.items():
        assert killed[str(n)]["rc"] == -9, f"write {n} ({writes[n - 1]}): the process was not killed"
        exists = assert_sound_or_absent(root)
        assert exists == (n == len(writes) and when == "after"), f"write {n}: version visible too early"
    resumed = fork_server.run([
        {"id": str(n), "argv": demo_args("publish", str(root)),
         "out": str(tmp_path / f"resume-{n}.out"), "err": str(tmp_path / f"resume-{n}.err")}
        for n, root in roots.items()])
    for n, root in roots.items():
        assert resumed[str(n)]["rc"] == 0, (tmp_path / f"resume-{n}.err").read_text()[-2000:]
        assert_same_as_reference(root, reference_run)
        if when in ("before", "after"):
            assert hidden_temp_files(root) == []


@pytest.mark.slow
def test_publish_killed_at_seeded_random_times_resumes_to_the_same_version(
        fork_server, publish_inputs, reference_run, tmp_path):
    clean = copy_tree(publish_inputs, tmp_path / "clean")
    duration = fork_server.run_one(tmp_path / "logs" / "clean", demo_args("publish", str(clean))).seconds
    rng = random.Random(SEED)
    delays = [round(rng.uniform(0.05, duration), 3) for _ in range(8)]
    outcomes = []
    for trial, delay in enumerate(delays):
        root = copy_tree(publish_inputs, tmp_path / f"trial-{trial}")
        killed = fork_server.run_one(tmp_path / "logs" / f"kill-{trial}", demo_args("publish", str(root)),
                                     kill_after_s=delay)
        assert killed.rc in (0, -9), killed.output()[-2000:]
        outcomes.append((delay, killed.rc, assert_sound_or_absent(root)))
        resumed = fork_server.run_one(tmp_path / "logs" / f"resume-{trial}", demo_args("publish", str(root)))
        assert resumed.rc == 0, resumed.output()[-2000:]
        assert_same_as_reference(root, reference_run)
    assert any(rc == -9 for _, rc, _ in outcomes), f"no trial was killed: {outcomes}"


@pytest.mark.slow
def test_s3_publish_killed_at_shard_and_manifest_writes_resumes_to_the_same_version(
        fork_server, publish_inputs, reference_run, s3_server, tmp_path):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    writes = publish_writes(fork_server, publish_inputs, tmp_path)
    shard = [n for n, key in enumerate(writes, 1) if "/shards/" in key][1]
    manifest = len(writes)
    for trial, (n, when) in enumerate([(shard, "before"), (shard, "after"), (manifest, "before"), (manifest, "after")]):
        bucket = f"rel-kill-{trial}"
        client.create_bucket(Bucket=bucket)
        storage = open_storage(StorageConfig(root=f"s3://{bucket}/f", endpoint_url=s3_server))
        source = LocalStorage(publish_inputs)
        for key in source.list(""):
            storage.write_bytes(key, source.read_bytes(key))
        argv = demo_args("publish", f"s3://{bucket}/f", f"storage.endpoint_url={s3_server}")
        killed = fork_server.run_one(tmp_path / f"kill-{trial}", argv, {"die_at_write": n, "die_when": when},
                                     env=S3_ENV)
        assert killed.rc == -9
        assert version_exists(storage, "demo", "demo") == (n == manifest and when == "after")
        resumed = fork_server.run_one(tmp_path / f"resume-{trial}", argv, env=S3_ENV)
        assert resumed.rc == 0, resumed.output()[-2000:]
        assert_same_as_reference(None, reference_run, storage)


@pytest.mark.slow
def test_a_kill_between_manifest_and_lock_release_leaves_no_lock_after_the_rerun(
        fork_server, publish_inputs, reference_run, tmp_path):
    """The version is complete once its manifest exists; the re-run must still tidy the
    publish lock away (today it returns early on the existing version and leaves it)."""
    root = copy_tree(publish_inputs, tmp_path / "root")
    writes = len(publish_writes(fork_server, publish_inputs, tmp_path))
    killed = fork_server.run_one(tmp_path / "kill", demo_args("publish", str(root)),
                                 {"die_at_write": writes, "die_when": "after"})
    assert killed.rc == -9 and assert_sound_or_absent(root)
    resumed = fork_server.run_one(tmp_path / "resume", demo_args("publish", str(root)))
    assert resumed.rc == 0
    assert visible_strays(LocalStorage(root)) == []


MULTIPART_KILL = textwrap.dedent("""
    import os, signal, sys
    from factory.framework.config import StorageConfig
    from factory.framework.storage import open_storage
    storage = open_storage(StorageConfig(root=sys.argv[1], endpoint_url=sys.argv[2],
                                         multipart_threshold_mb=5, multipart_chunk_mb=5))
    parts = []
    def die_on_second_part(**kwargs):
        parts.append(1)
        if len(parts) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    storage.client.meta.events.register("before-send.s3.UploadPart", die_on_second_part)
    storage.write_bytes("datasets/demo/v/shards/v-000000.tar", os.urandom(12 * 2**20))
""")


def test_s3_multipart_upload_killed_midway_leaves_no_object(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    root = f"s3://{bucket}/f"
    env = base_env(AWS_DEFAULT_REGION="us-east-1")
    proc = subprocess.run([sys.executable, "-c", MULTIPART_KILL, root, endpoint], env=env, capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == -9, proc.stderr[-2000:]
    storage = open_storage(StorageConfig(root=root, endpoint_url=endpoint))
    assert storage.list("") == []
    assert not storage.exists("datasets/demo/v/shards/v-000000.tar")
    # The orphaned upload is invisible to readers; a bucket lifecycle rule aborts such uploads.
    uploads = storage.client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert len(uploads) == 1


# --- the reference set -------------------------------------------------------------------------


def write_folder(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(SEED)
    for n in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(buffer, format="PNG")
        (folder / f"img{n}.png").write_bytes(buffer.getvalue())
    return folder


def references_config(tmp_path: Path) -> Path:
    config = {
        "dataset": "rel", "run_id": "refs", "storage": {"root": str(tmp_path / "root")},
        "references": {"set": "folder", "part_size": 2, "min_side": 8,
                       "sources": [{"kind": "folder", "path": str(write_folder(tmp_path / "images", 5)),
                                    "subject": "dog"}]},
        "plan": {"jobs_per_reference": 1, "unit_size": 2},
        "generate": {"generators": {"profusion": {"kind": "profusion", "model": "unused"}}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_reference_set_left_half_written_by_a_kill_is_never_planned_from(fork_server, tmp_path):
    config = references_config(tmp_path)
    argv = ["--stage", "references", "--config", str(config)]
    killed = fork_server.run_one(tmp_path / "kill", argv, {"die_at_write": 2, "die_when": "before"})
    assert killed.rc == -9
    ctx = RunContext(load_config(config))
    assert ctx.storage.list("references/folder") == ["references/folder/part-00000.parquet"]
    from factory.run import references_exist

    assert not references_exist(ctx), "`--stage all` would skip the references stage and plan from 2 of 5 images"
    planned = fork_server.run_one(tmp_path / "plan", ["--stage", "plan", "--config", str(config)])
    assert planned.rc != 0 and not ctx.storage.exists("runs/refs/plan.parquet"), \
        "the plan was drawn from a half-written reference set"


# --- the whole pipeline ------------------------------------------------------------------------


@pytest.mark.slow
def test_full_pipeline_killed_twice_and_an_actor_killed_resumes_to_the_same_version(
        reference_run, workdir, tmp_path):
    """Run 1 dies (SIGKILL to the driver's process group; Ray's workers die with their raylet)
    just after generate has finished unit 0. In run 2 the model actor is SIGKILLed inside its
    first unit; once Ray has restarted it and that unit has come out of dialogue, the whole
    run is SIGKILLed. Run 3 completes. Delays are seeded fractions of a unit. References are
    copied from the reference run (drawing them is not what is under test)."""
    rng = random.Random(SEED)
    root = workdir / "roots" / "killed"
    target = LocalStorage(root)
    for key in reference_run.storage.list("references"):
        target.write_bytes(key, reference_run.storage.read_bytes(key))
    env = base_env(RAY_TMPDIR=str(workdir / "ray-killed"))
    args = demo_args("all", str(root))
    units = lambda stage: {p.name for p in (root / "runs" / "demo" / stage).glob("unit-*.parquet")}  # noqa: E731

    first = run_demo(workdir, args, env, tmp_path / "run1", kill_when=lambda: bool(units("generate")),
                     kill_delay_s=rng.uniform(0, 0.5))
    assert first.killed and first.notes == [], first.output()[-3000:]
    assert len(units("dialogue")) < 5 and not version_exists(target, "demo", "demo")

    kill_after = rng.uniform(0, 0.5)
    busy_since: list[float] = []
    actor_killed_with: list[set[str]] = []  # the dialogue units done when the actor died

    def kill_the_busy_actor(token, run):
        busy = [] if actor_killed_with else busy_actors(token)
        if busy:
            busy_since.append(busy_since[0] if busy_since else time.monotonic())
            if time.monotonic() - busy_since[0] >= kill_after:
                actor_killed_with.append(units("dialogue"))
                os.kill(rng.choice(sorted(busy)), signal.SIGKILL)

    def a_unit_done_since_the_actor_died() -> bool:
        return bool(actor_killed_with) and bool(units("dialogue") - actor_killed_with[0])

    second = run_demo(workdir, args, env, tmp_path / "run2", kill_when=a_unit_done_since_the_actor_died,
                      on_tick=kill_the_busy_actor)
    assert actor_killed_with, "no model actor was caught mid-unit:\n" + second.output()[-3000:]
    assert second.killed and second.notes == [], second.output()[-3000:]
    assert len(units("dialogue")) < 6, "run 2 finished every unit: the last run had nothing left to resume"

    third = run_demo(workdir, args, env, tmp_path / "run3")
    assert third.rc == 0 and third.notes == [], third.output()[-3000:]
    assert accepted_keys(target) == reference_run.accepted
    assert_same_as_reference(root, reference_run)
