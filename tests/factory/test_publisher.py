"""Publishing a run: the Ray passes and the local passes give the same shards as the same passes over
the accepted samples in memory; partial runs refused, runs made with other settings refused,
rethreshold through the same passes."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from factory.dataset import manifest, publisher
from factory.dataset.manifest import VersionError, VersionSpec, load_manifest, verify_version, version_exists
from factory.dataset.publisher import PartialRun, publish_run, publish_samples, sample_from_row
from factory.dataset.shards import cut_points
from factory.framework import layout
from factory.framework.config import StorageConfig, load_config
from factory.framework.executor import Step, run_steps_inline
from factory.framework.stage import RunContext, Stage, fingerprint
from factory.framework.storage import DamagedFile, open_storage
from factory.framework.units import read_unit, unit_meta, write_plan, write_unit
from stages.dialogue import Dialogue
from tests.factory.conftest import jpeg, make_samples

UNITS, PER_UNIT = 24, 6
SHAPED = ("references", "plan", "generate", "filter", "dialogue")


def context(storage_config, *overrides: str) -> RunContext:
    root = [f"storage.root={storage_config.root}"]
    if storage_config.endpoint_url:
        root.append(f"storage.endpoint_url={storage_config.endpoint_url}")
    return RunContext(load_config(None, [*root, "run_id=grown", "publish.shard_max_bytes=20000",
                                         "filter.thresholds.clip_t=0.3", "filter.thresholds.dino=0.6", *overrides]))


def grow_run(ctx: RunContext) -> pd.DataFrame:
    """A finished run of UNITS units written straight to storage (no model runs): a reference
    set, the plan, and generate/filter/dialogue unit files; every third candidate rejected."""
    storage, run_id = ctx.storage, ctx.config.run_id
    part = layout.reference_part("grown", 0)
    references = pd.DataFrame({"reference_id": [f"ref{n}" for n in range(5)], "subject": "dog", "domain": "object",
                               "image": [jpeg(n, size=16 + 4 * n) for n in range(5)]})
    storage.write_parquet(part, pa.Table.from_pandas(references, preserve_index=False))
    count = UNITS * PER_UNIT
    rng = np.random.default_rng(7)
    plan = pd.DataFrame({
        "key": [f"{n * 7919 % 100003:08x}k{n}" for n in range(count)], "unit": np.arange(count) // PER_UNIT,
        "reference_set": "grown", "reference_part": part, "reference_id": [f"ref{n % 5}" for n in range(count)],
        "subject": "dog", "domain": "object", "instruction_id": [f"i{n % 11}" for n in range(count)],
        "category": "scene", "template": "a {subject} on a beach", "instruction": "a dog on a beach",
        "seed": np.arange(count), "generator": "profusion", "round": 0, "alpha": np.nan, "w_id": None})
    write_plan(storage, run_id, pa.Table.from_pandas(plan, preserve_index=False), PER_UNIT)
    rows = plan.copy()
    rows["target_image"] = [jpeg(1000 + n, size=int(rng.integers(16, 48))) for n in range(count)]
    rows["input_bytes"] = [len(references.loc[n % 5, "image"]) for n in range(count)]
    rows["target_bytes"] = rows["target_image"].map(len)
    rows["generator_info"] = json.dumps({"name": "profusion", "kind": "profusion", "checkpoint": "tiny", "steps": 3})
    rows["clip_t"], rows["dino"] = rng.uniform(0.3, 0.5, count), rng.uniform(0.6, 0.9, count)
    rows["user"] = [f"Put my dog on a beach ({n}) ✓" for n in range(count)]
    rows["assistant"] = [f"Here is your dog on a beach, take {n}." for n in range(count)]
    rows["style"] = "command"
    rejected = np.arange(count) % 3 == 0
    rows["reject_stage"] = np.where(rejected, "filter", None)
    rows["reject_reason"] = np.where(rejected, "clip_t_below_threshold", None)
    for unit, group in rows.groupby("unit"):
        alive = int((~rejected[group.index]).sum())
        for stage, drop in (("generate", []), ("filter", ["target_image"]), ("dialogue", ["target_image"])):
            counters = {"rows": len(group), "live_out": alive if stage != "generate" else len(group),
                        "passed_clip": alive, "passed_dino": alive, "seconds": 0.5}
            if stage == "filter":
                counters["rejected:clip_t_below_threshold"] = len(group) - alive
            meta = {"stage": stage, "unit": int(unit), "counters": counters,
                    "shaped_by": fingerprint(ctx.config, SHAPED[: SHAPED.index(stage) + 1])}
            write_unit(storage, run_id, stage, int(unit), group.drop(columns=drop), meta)
    return rows.assign(input_image=[references.loc[n % 5, "image"] for n in range(count)])


def expected_shards(ctx: RunContext, rows: pd.DataFrame, folder) -> list[str]:
    """The sha256s `publish_samples` (the local passes over samples in memory, shuffled) gives the
    run's accepted samples in a storage of their own under `folder`."""
    alive = rows[rows["reject_reason"].isna()].sample(frac=1.0, random_state=3)
    samples = [sample_from_row(row, ctx.config.dataset, "grown") for row in alive.to_dict("records")]
    manifest = publish_samples(open_storage(StorageConfig(root=str(folder))), VersionSpec("demo", "grown", "bootstrap"),
                               samples, ctx.config.publish.shard_max_bytes, ctx.config.publish.shard_max_samples)
    return [shard["sha256"] for shard in manifest["shards"]]


def test_local_publish_of_a_grown_run_matches_the_samples_in_memory(storage_config, tmp_path):
    ctx = context(storage_config, "publish.executor=local")
    rows = grow_run(ctx)
    manifest = publish_run(ctx)
    assert len(manifest["shards"]) > 3, "the run must span several shards for the test to mean anything"
    assert [shard["sha256"] for shard in manifest["shards"]] == expected_shards(ctx, rows, tmp_path / "memory")
    assert manifest["samples"] == int(rows["reject_reason"].isna().sum()) == manifest["funnel"]["written"]
    assert manifest["funnel"]["planned"] == UNITS * PER_UNIT
    rejected = int(rows["reject_reason"].notna().sum())
    assert manifest["funnel"]["rejections"] == {"filter:clip_t_below_threshold": rejected}
    assert verify_version(ctx.storage, ctx.config.dataset, "grown") == []
    assert publish_run(ctx)["created"] == manifest["created"]  # a re-run is a no-op


def test_a_publisher_stopped_halfway_writes_only_the_missing_shards_when_run_again(storage_config, tmp_path,
                                                                                 monkeypatch):
    ctx = context(storage_config, "publish.executor=local")
    rows = grow_run(ctx)
    written, write_shard = [], publisher.write_shard

    def lost_at_the_third_shard(storage, target, number, samples):
        written.append(number)
        if written == [0, 1, 2]:
            raise OSError("the publisher's node was lost")
        return write_shard(storage, target, number, samples)

    monkeypatch.setattr(publisher, "write_shard", lost_at_the_third_shard)
    with pytest.raises(OSError, match="node was lost"):
        publish_run(ctx)
    assert not version_exists(ctx.storage, ctx.config.dataset, "grown")
    written.clear()
    manifest = publish_run(ctx)
    assert written == list(range(2, len(manifest["shards"]))), "only the shards not finished are written again"
    assert [shard["sha256"] for shard in manifest["shards"]] == expected_shards(ctx, rows, tmp_path / "memory")
    assert verify_version(ctx.storage, ctx.config.dataset, "grown") == []
    assert ctx.storage.list(layout.publish_written(ctx.config.dataset, "grown")) == []


def same_config_spec() -> VersionSpec:
    return VersionSpec(dataset="demo", version="v1", kind="bootstrap", config_sha256="same-config")


def lock_of(holder: manifest.Holder, renewed: float) -> bytes:
    """A publish lock of `same_config_spec`'s config, as `PublishLease` writes it."""
    return json.dumps({"config_sha256": "same-config", "kind": "bootstrap", "holder": asdict(holder),
                       "renewed": renewed}).encode()


def test_a_second_live_publisher_of_the_same_config_is_refused_and_the_first_publishes_whole(tmp_path):
    """A job submitted twice: the lock names the config and the live process holding it, so the second
    stops at once and the first writes the whole version."""
    storage = open_storage(StorageConfig(root=str(tmp_path)))
    first, second = make_samples(6), make_samples(4)
    refused = []

    class SecondStartsMeanwhile(publisher.LocalPasses):
        def shards(self, *args):
            with pytest.raises(VersionError, match="being published by a live run of this config") as raised:
                publish_samples(storage, same_config_spec(), second, shard_max_samples=2)
            refused.append(raised.value)
            return super().shards(*args)

    publisher.write_version(storage, same_config_spec(), publisher.SampleList(first), 2**20, 2, SecondStartsMeanwhile())
    assert refused and load_manifest(storage, "demo", "v1")["samples"] == 6
    assert verify_version(storage, "demo", "v1") == []
    assert not storage.exists(layout.publish_lock("demo", "v1"))


def test_a_publisher_that_lost_its_lock_to_a_run_of_its_config_stops_before_its_next_shard(tmp_path):
    """A publisher silent past its lease (a stalled node) has lost the lock to another run of the same
    config: it writes no shard more, and leaves the new holder's lock."""
    storage = open_storage(StorageConfig(root=str(tmp_path)))
    lock = layout.publish_lock("demo", "v1")
    taker = manifest.Holder("taker", "another-node", 1, 0.0)

    class LockTakenOver(publisher.LocalPasses):
        def shards(self, *args):
            storage.write_bytes(lock, lock_of(taker, time.time()))
            return super().shards(*args)

    with pytest.raises(VersionError, match="taken over by another run of this config"):
        publisher.write_version(storage, same_config_spec(), publisher.SampleList(make_samples(4)), 2**20, 2,
                                LockTakenOver())
    assert not storage.list(layout.version_dir("demo", "v1") + "/shards")
    assert manifest.lock_holder_id(storage, lock) == "taker"


@pytest.mark.parametrize("holder", ["a process gone from this host", "another host, silent past the lease",
                                    "a lock naming no process"])
def test_the_lock_of_a_dead_publisher_of_the_same_config_is_taken_over(tmp_path, holder):
    storage = open_storage(StorageConfig(root=str(tmp_path)))
    if holder == "a process gone from this host":  # this pid, but not this process's start time: reused
        body = lock_of(manifest.Holder("dead", socket.gethostname(), os.getpid(), 0.0), time.time())
    elif holder == "another host, silent past the lease":
        body = lock_of(manifest.Holder("dead", "another-node", 1, 0.0), time.time() - manifest.LEASE_S - 1)
    else:
        body = json.dumps({"config_sha256": "same-config", "kind": "bootstrap"}).encode()
    storage.write_bytes(layout.publish_lock("demo", "v1"), body)
    started = time.monotonic()
    publish_samples(storage, same_config_spec(), make_samples(4), shard_max_samples=2)
    assert verify_version(storage, "demo", "v1") == [] and time.monotonic() - started < 30


@pytest.mark.parametrize("renews", [True, False])
def test_a_lock_renewed_lately_on_another_host_is_waited_on_until_it_renews_or_its_lease_ends(
        tmp_path, monkeypatch, renews):
    monkeypatch.setattr(manifest, "LEASE_S", 1.5)
    storage = open_storage(StorageConfig(root=str(tmp_path)))
    lock = layout.publish_lock("demo", "v1")
    elsewhere = manifest.Holder("elsewhere", "another-node", 1, 0.0)
    storage.write_bytes(lock, lock_of(elsewhere, time.time()))
    if renews:
        renewal = threading.Timer(0.3, lambda: storage.write_bytes(lock, lock_of(elsewhere, time.time())))
        renewal.start()
        with pytest.raises(VersionError, match="live run of this config on host another-node"):
            publish_samples(storage, same_config_spec(), make_samples(4), shard_max_samples=2)
        assert manifest.lock_holder_id(storage, lock) == "elsewhere" and not version_exists(storage, "demo", "v1")
    else:
        started = time.monotonic()
        publish_samples(storage, same_config_spec(), make_samples(4), shard_max_samples=2)
        assert time.monotonic() - started >= 1.0 and verify_version(storage, "demo", "v1") == []


def test_a_publisher_renews_its_lock_while_it_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "LEASE_S", 0.6)
    storage = open_storage(StorageConfig(root=str(tmp_path)))
    lock = layout.publish_lock("demo", "v1")
    seen = []

    class SlowShards(publisher.LocalPasses):
        def shards(self, *args):
            for _ in range(4):
                seen.append(json.loads(storage.read_bytes(lock))["renewed"])
                time.sleep(0.3)
            return super().shards(*args)

    publish_samples_with = publisher.SampleList(make_samples(4))
    publisher.write_version(storage, same_config_spec(), publish_samples_with, 2**20, 2, SlowShards())
    assert len(set(seen)) >= 2 and not storage.exists(lock)


@pytest.mark.slow
def test_ray_publish_on_s3_gives_the_same_shards_as_the_local_passes(s3_bucket, ray_local, tmp_path):
    endpoint, bucket = s3_bucket
    ctx = context(StorageConfig(root=f"s3://{bucket}/f", endpoint_url=endpoint), "publish.executor=ray")
    rows = grow_run(ctx)
    manifest = publish_run(ctx)
    assert len(manifest["shards"]) > 3
    assert [shard["sha256"] for shard in manifest["shards"]] == expected_shards(ctx, rows, tmp_path / "memory")
    assert verify_version(ctx.storage, ctx.config.dataset, "grown") == []


def test_a_partial_run_is_refused_unless_allowed_and_then_says_so(tmp_path):
    storage_config = StorageConfig(root=str(tmp_path / "root"))
    ctx = context(storage_config, "publish.executor=local")
    grow_run(ctx)
    for unit in (3, 17):
        ctx.storage.delete(layout.unit_file("grown", "dialogue", unit))
    with pytest.raises(PartialRun, match=r"2 planned units without a whole unit file .*first: 3, 17\)"):
        publish_run(ctx)
    allowed = context(storage_config, "publish.executor=local", "publish.allow_partial=true")
    manifest = publish_run(allowed)
    assert manifest["partial"] == {"missing_units": 2, "first_missing": [3, 17]}
    assert manifest["funnel"]["planned"] == (UNITS - 2) * PER_UNIT


def test_a_run_made_with_other_thresholds_is_not_published_under_these(tmp_path):
    storage_config = StorageConfig(root=str(tmp_path / "root"))
    grow_run(context(storage_config, "publish.executor=local"))
    stricter = context(storage_config, "publish.executor=local", "filter.thresholds.dino=0.7")
    with pytest.raises(VersionError, match=r"filter.thresholds.dino: .* -> 0.7"):
        publish_run(stricter)
    assert not stricter.storage.exists(layout.manifest("demo", "grown"))


def test_a_run_whose_units_two_drivers_made_with_other_thresholds_is_not_published(tmp_path):
    """Two drivers of one run id started together both pass the check at their start, then each skips the
    units the other finished: the run holds units of both configs, whichever unit comes first."""
    storage_config = StorageConfig(root=str(tmp_path / "root"))
    ctx = context(storage_config, "publish.executor=local")
    grow_run(ctx)
    other = context(storage_config, "publish.executor=local", "filter.thresholds.dino=0.7").config
    for unit in (4, 9):
        for stage in ("filter", "dialogue"):
            rows = read_unit(ctx.storage, "grown", stage, unit)
            meta = {**unit_meta(ctx.storage, "grown", stage, unit),
                    "shaped_by": fingerprint(other, SHAPED[: SHAPED.index(stage) + 1])}
            write_unit(ctx.storage, "grown", stage, unit, rows, meta)
    with pytest.raises(VersionError, match=r"2 filter unit\(s\) \(4, 9\) were made with other settings than this "
                                           r"config:\n  filter.thresholds.dino: 0.7 -> 0.6"):
        publish_run(ctx)
    assert not ctx.storage.exists(layout.manifest("demo", "grown"))


def test_rethreshold_through_the_local_passes_keeps_a_stricter_subset(tmp_path):
    from factory.rethreshold import rethreshold_version

    storage_config = StorageConfig(root=str(tmp_path / "root"))
    ctx = context(storage_config, "publish.executor=local")
    rows = grow_run(ctx)
    publish_run(ctx)
    child = rethreshold_version(ctx.storage, ctx.config, "grown", "strict", {"dino": 0.75})
    alive = rows[rows["reject_reason"].isna()]
    assert child["samples"] == int((alive["dino"] >= 0.75).sum()) > 0
    assert verify_version(ctx.storage, "demo", "strict") == []
    assert load_manifest(ctx.storage, "demo", "strict")["thresholds"]["dino"] == 0.75



def test_generator_work_sums_unet_evaluations_per_accepted_sample():
    from factory.dataset.publisher import generator_work

    units = pd.DataFrame([{"unet_evals": 30.0, "finetune_unet_evals": 4.0}, {"unet_evals": 15.0}, {}]).fillna(0)
    work = generator_work(units, accepted=5)
    assert work == {"unet_evals": 45.0, "finetune_unet_evals": 4.0, "unet_evals_per_accepted_sample": (45 + 4) / 5}
    assert generator_work(units, accepted=0)["unet_evals_per_accepted_sample"] is None
    assert generator_work(units.drop(columns="finetune_unet_evals"), accepted=5)["finetune_unet_evals"] == 0


@dataclass
class CountedReads(publisher.RunSamples):
    """The run's samples, counting how often each part is read."""

    reads: Counter = field(default_factory=Counter)

    def samples(self, part, keys=None):
        self.reads[part] += 1
        return super().samples(part, keys)


def test_a_task_writing_several_shards_reads_each_part_once_and_writes_the_same_shards(storage_config, tmp_path):
    ctx = context(storage_config, "publish.executor=local")
    rows = grow_run(ctx)
    source = CountedReads(ctx.config.storage, ctx.config.run_id, ctx.config.dataset, "grown")
    parts = source.parts()
    won = publisher.first_of_each_key(publisher.accepted_keys(publisher.LocalPasses().sizes(source, parts), parts))
    plan = publisher.shard_plan(won, cut_points(won.column("bytes").to_numpy(), ctx.config.publish.shard_max_bytes,
                                                ctx.config.publish.shard_max_samples))
    feeds = plan.explode("parts").groupby("parts")["shard"].nunique()
    assert len(plan) > 3 and feeds.max() > 1, "a part must feed several shards for the test to mean anything"
    source.reads.clear()
    target = publisher.ShardTarget("demo", "grown", {"by": "test"})
    index = publisher.write_planned_shards(plan, source, target, ctx.storage)
    assert source.reads == Counter(dict.fromkeys(parts, 1))
    written = index.drop_duplicates("shard_number").sort_values("shard_number")
    assert written["shard_sha256"].tolist() == expected_shards(ctx, rows, tmp_path / "memory")
    assert index["key"].tolist() == won.column("key").to_pylist()


def test_shard_tasks_keep_every_cpu_busy_and_park_at_most_the_spool_on_disk():
    plan = pd.DataFrame({"shard": range(27), "bytes": 64 * 2**20})
    assert publisher.shards_per_task(plan, cpus=2) == 14
    assert publisher.shards_per_task(plan, cpus=64) == 1
    assert publisher.shards_per_task(plan, cpus=1, spool_bytes=2**30) == 16
    assert publisher.shards_per_task(plan.assign(bytes=2**31), cpus=1, spool_bytes=2**30) == 1


class GrownDialogue(Stage):
    """The grown run's dialogue as a stage on the base: the texts `grow_run` writes, every live row
    accepted, and the images kept with the accepted rows as the real dialogue stage keeps them."""

    name, source = "dialogue", "filter"
    adds = ("user", "assistant", "style")
    keeps_images = Dialogue.keeps_images
    unit_facts = Dialogue.unit_facts
    shaped_by = SHAPED

    def process(self, rows: pd.DataFrame) -> pd.DataFrame:
        number = rows["key"].str.split("k").str[-1]
        rows["user"] = "Put my dog on a beach (" + number + ") ✓"
        rows["assistant"] = "Here is your dog on a beach, take " + number + "."
        rows["style"], rows["reject"] = "command", None
        return rows


def test_dialogue_footers_list_their_samples_sizes_and_publish_cuts_shards_by_them(storage_config, tmp_path):
    ctx = context(storage_config, "publish.executor=local")
    rows = grow_run(ctx)
    run_id = ctx.config.run_id
    for unit in range(UNITS):
        ctx.storage.delete(layout.unit_file(run_id, "dialogue", unit))
    run_steps_inline(ctx, [Step("dialogue", GrownDialogue)])
    source = publisher.RunSamples(ctx.config.storage, run_id, ctx.config.dataset, "grown")
    from_footers = {}
    for unit in range(UNITS):
        samples = source.samples(str(unit))
        fact = unit_meta(ctx.storage, run_id, "dialogue", unit)["facts"]["sample_sizes"]
        assert fact == {"key": [sample.key for sample in samples],
                        "payload_bytes": [sample.payload_bytes() for sample in samples]}
        from_footers[unit] = source.sizes(str(unit))
    for unit in range(0, UNITS, 2):  # units written before dialogue kept the fact: sizes from their rows
        meta = unit_meta(ctx.storage, run_id, "dialogue", unit)
        del meta["facts"]
        write_unit(ctx.storage, run_id, "dialogue", unit, read_unit(ctx.storage, run_id, "dialogue", unit), meta)
        assert source.sizes(str(unit)).equals(from_footers[unit])
    manifest = publish_run(ctx)
    assert [shard["sha256"] for shard in manifest["shards"]] == expected_shards(ctx, rows, tmp_path / "memory")

    meta = unit_meta(ctx.storage, run_id, "dialogue", 1)  # a footer is what the shard cut reads
    meta["facts"]["sample_sizes"]["payload_bytes"] = [10**6] * len(meta["facts"]["sample_sizes"]["key"])
    write_unit(ctx.storage, run_id, "dialogue", 1, read_unit(ctx.storage, run_id, "dialogue", 1), meta)
    inflated = source.sizes("1").column("bytes").to_pylist()
    assert len(inflated) == from_footers[1].num_rows > 0 and min(inflated) > 10**6


@pytest.mark.parametrize("tamper", ["one left out", "one listed twice", "a size missing", "one not among its rows"])
def test_a_footer_whose_sizes_disagree_with_its_accepted_count_stops_publish_naming_the_unit(
        storage_config, tamper):
    ctx = context(storage_config, "publish.executor=local")
    grow_run(ctx)
    run_id = ctx.config.run_id
    for unit in range(UNITS):
        ctx.storage.delete(layout.unit_file(run_id, "dialogue", unit))
    run_steps_inline(ctx, [Step("dialogue", GrownDialogue)])
    unit = next(unit for unit in range(UNITS)
                if len(unit_meta(ctx.storage, run_id, "dialogue", unit)["facts"]["sample_sizes"]["key"]) >= 2)
    meta = unit_meta(ctx.storage, run_id, "dialogue", unit)
    fact = meta["facts"]["sample_sizes"]
    if tamper == "one not among its rows":
        fact["key"][0] = "0" * 24
    elif tamper == "one left out":
        fact["key"], fact["payload_bytes"] = fact["key"][1:], fact["payload_bytes"][1:]
    elif tamper == "one listed twice":
        fact["key"][1] = fact["key"][0]
    else:
        fact["payload_bytes"].pop()
    write_unit(ctx.storage, run_id, "dialogue", unit, read_unit(ctx.storage, run_id, "dialogue", unit), meta)
    refusal = DamagedFile, rf"dialogue/unit-{unit:06d}.parquet: .*sample_sizes.*accepted samples"
    if tamper == "one not among its rows":  # found where the shard's samples are read
        refusal = VersionError, rf"first: 0{{24}}, of .*dialogue/unit-{unit:06d}.parquet\).*sizes disagree"
    with pytest.raises(refusal[0], match=refusal[1]):
        publish_run(ctx)
    assert not ctx.storage.exists(layout.manifest(ctx.config.dataset, ctx.version))


def test_dialogue_units_keep_their_samples_images_and_publish_reads_them_there_alone(storage_config, tmp_path):
    ctx = context(storage_config, "publish.executor=local")
    rows = grow_run(ctx)
    for unit in range(UNITS):
        ctx.storage.delete(layout.unit_file(ctx.config.run_id, "dialogue", unit))
    run_steps_inline(ctx, [Step("dialogue", GrownDialogue)])
    kept = pd.concat([read_unit(ctx.storage, ctx.config.run_id, "dialogue", unit) for unit in range(UNITS)],
                     ignore_index=True)
    accepted = rows["reject_reason"].isna().to_numpy()
    assert kept.loc[accepted, "target_image"].tolist() == rows.loc[accepted, "target_image"].tolist()
    assert kept.loc[accepted, "input_image"].tolist() == rows.loc[accepted, "input_image"].tolist()
    assert kept.loc[~accepted, ["input_image", "target_image"]].isna().all().all(), "only accepted rows keep images"

    part = layout.reference_part("grown", 0)  # other pictures under the same ids, and other candidates
    references = ctx.storage.read_parquet(part).to_pandas().assign(image=[jpeg(90 + n) for n in range(5)])
    ctx.storage.write_parquet(part, pa.Table.from_pandas(references, preserve_index=False))
    for unit in range(UNITS):
        generated = read_unit(ctx.storage, ctx.config.run_id, "generate", unit)
        write_unit(ctx.storage, ctx.config.run_id, "generate", unit, generated.assign(target_image=jpeg(99)),
                   unit_meta(ctx.storage, ctx.config.run_id, "generate", unit))
    manifest = publish_run(ctx)
    assert [shard["sha256"] for shard in manifest["shards"]] == expected_shards(ctx, rows, tmp_path / "memory")
