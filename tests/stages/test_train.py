"""The train stage on a tiny published version: the data split, loss going down, checkpoints,
resume at the same step with the same weights, and Ray Train with two CPU workers."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from factory.dataset.manifest import VersionSpec, load_manifest, shard_key
from factory.dataset.publisher import publish_samples
from factory.dataset.shards import Sample, read_shard
from factory.framework.config import FactoryConfig, StorageConfig, load_config
from factory.framework.storage import open_storage

SAMPLES = 10
SHARD_SAMPLES = 3  # 4 shards: shard-wise split for 2-4 workers, sample-wise beyond


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from factory.tiny.cafe import build_tiny_cafe_parts
    from factory.tiny.llama import build_tiny_llama

    root = tmp_path_factory.mktemp("cafe-train-models")
    return {**build_tiny_cafe_parts(root), "llm_model": build_tiny_llama(root / "llama")}


def jpeg(seed: int, size: int = 32) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def make_samples(count: int = SAMPLES, start: int = 0) -> list[Sample]:
    return [
        Sample(f"key{n:03d}", jpeg(n), jpeg(500 + n), f"Can you draw dog {n} on the beach?",
               f"Here is dog {n} on a sunny beach.", {"key": f"key{n:03d}", "subject": "dog"})
        for n in range(start, start + count)
    ]


def publish(storage, version: str = "v1", count: int = SAMPLES, start: int = 0) -> dict:
    return publish_samples(storage, VersionSpec("tiny", version, "bootstrap"), make_samples(count, start),
                           shard_max_samples=SHARD_SAMPLES)


def make_config(storage_config: StorageConfig, tiny: dict, run_id: str = "run", **train) -> FactoryConfig:
    settings = {
        **tiny,
        "generator_lr": 1e-3,
        "assistant_lr": 1e-2,
        "generator_batch_size": 4,
        "assistant_batch_size": 4,
        "checkpoint_every": 2,
        "use_gpu": False,
        "num_workers": 1,
        **train,
    }
    return FactoryConfig.model_validate(
        {"dataset": "tiny", "run_id": run_id, "storage": storage_config.model_dump(), "train": settings}
    )


# --- the split ------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_each_epoch_deals_every_sample_to_exactly_one_worker(tmp_path, world):
    from models.training.data import EpochPlan

    storage = open_storage(StorageConfig(root=str(tmp_path)))
    manifest = publish(storage)
    per_worker = 2
    for epoch in range(2):
        plans = [EpochPlan.build(manifest, world, epoch, seed=0) for _ in range(world)]
        assert plans[0].shard_mode == (world <= 4)
        steps = plans[0].steps(per_worker)
        per_rank = [list(plan.batches(storage, rank, per_worker, steps)) for rank, plan in enumerate(plans)]
        assert {len(batches) for batches in per_rank} == {steps}  # same number of steps everywhere
        keys = [key for batches in per_rank for batch in batches for key in batch.keys]
        assert sorted(keys) == [f"key{n:03d}" for n in range(SAMPLES)]  # all, none twice
        for index in range(steps):
            real = sum(len(batches[index].keys) for batches in per_rank)
            assert real == plans[0].global_count(index, per_worker)
            assert all(batches[index].samples for batches in per_rank)  # padding keeps every rank busy
    orders = [[k for b in EpochPlan.build(manifest, 1, e, 0).batches(storage, 0, 4, 3) for k in b.keys] for e in (0, 1)]
    assert orders[0] != orders[1]  # reshuffled per epoch


@pytest.mark.parametrize("world", [1, 2, 5])
def test_a_resumed_epoch_gives_the_same_batches_and_skips_the_shards_before_them(tmp_path, world):
    from models.training.data import EpochPlan

    storage = open_storage(StorageConfig(root=str(tmp_path)))
    manifest = publish(storage)
    reads: list[str] = []
    read_bytes = storage.read_bytes
    storage.read_bytes = lambda key: reads.append(key) or read_bytes(key)
    per_worker = 2
    plan = EpochPlan.build(manifest, world, epoch=1, seed=0)
    steps = plan.steps(per_worker)
    for rank in range(world):
        whole = [(b.samples, b.weights) for b in plan.batches(storage, rank, per_worker, steps)]
        for start in range(steps):
            reads.clear()
            resumed = [(b.samples, b.weights) for b in plan.batches(storage, rank, per_worker, steps, start=start)]
            assert resumed == whole[start:]  # padding included: the same last sample, weight 0
            if plan.shard_mode and start * per_worker >= plan.shard_sizes[plan.rank_shards[rank][0]]:
                assert plan.shard_keys[plan.rank_shards[rank][0]] not in reads
        assert plan.shard_mode == (world <= 4)


def test_a_shard_holding_other_than_its_listed_count_stops_the_epoch_naming_it(tmp_path):
    from models.training.data import EpochPlan

    storage = open_storage(StorageConfig(root=str(tmp_path)))
    manifest = publish(storage)
    manifest["shards"][0]["samples"] += 1  # the batches and the loss scale are planned from these counts
    plan = EpochPlan.build(manifest, 1, epoch=0, seed=0)
    listed = manifest["shards"][0]["path"]
    with pytest.raises(ValueError, match=f"{listed} holds 3 samples of the version, its manifest says 4"):
        list(plan.batches(storage, 0, 2, plan.steps(2)))


def test_a_union_is_read_through_its_parents_shards(tmp_path):
    from factory.dataset.manifest import union_versions
    from models.training.data import EpochPlan

    storage = open_storage(StorageConfig(root=str(tmp_path)))
    publish(storage, "v1", count=4)
    publish(storage, "sid1", count=3, start=100)
    union = union_versions(storage, VersionSpec("tiny", "union1", "union", parents=["v1", "sid1"]))
    plans = [EpochPlan.build(union, 2, 0, seed=0) for _ in range(2)]
    keys = [k for rank, plan in enumerate(plans) for b in plan.batches(storage, rank, 2, plan.steps(2)) for k in b.keys]
    assert sorted(keys) == [f"key{n:03d}" for n in [0, 1, 2, 3, 100, 101, 102]]


# --- training, checkpoints, resume ----------------------------------------------------


def fixed_batch_loss(job, folder=None) -> float:
    """Equation 3 / 2 on the first four samples with fixed noise, timesteps and drops."""
    from factory.dataset.checkpoints import fetch_checkpoint
    from models.training.tasks import build_task

    storage = open_storage(StorageConfig.model_validate(job.storage))
    torch.manual_seed(job.settings.seed)
    task = build_task(job, torch.device("cpu"))
    if folder is not None:
        with tempfile.TemporaryDirectory() as tmp:
            task.load(Path(fetch_checkpoint(storage, folder, tmp)))
    manifest = load_manifest(storage, job.dataset, job.version)
    shards = [shard_key(manifest, shard["path"]) for shard in manifest["shards"]]
    samples = [sample for key in shards for sample in read_shard(storage, key)][:4]
    task.model.eval()
    with torch.no_grad():
        return float(task.loss(task.model, samples, torch.Generator().manual_seed(1234)).mean())


def trainable_weights(job, folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    storage = open_storage(StorageConfig.model_validate(job.storage))
    name = "diffusion_pytorch_model.safetensors" if job.model == "generator" else "assistant.safetensors"
    return load(storage.read_bytes(f"{folder}/model/{name}"))


def train_resume_and_compare(storage_config, tiny, model: str, steps: int):
    from factory.framework import layout
    from models.training.job import make_job
    from models.training.runner import train_in_process

    storage = open_storage(storage_config)
    publish(storage)
    straight_config = make_config(storage_config, tiny, "straight", max_steps=steps, condition_dropout=0.0)
    straight = train_in_process(make_job(straight_config, "v1", model), storage)
    assert straight["step"] == steps and straight["checkpoint"].endswith(f"step-{steps:08d}")
    listed = storage.list(layout.checkpoint_run(model, "straight"))
    assert {f"checkpoints/{model}/straight/step-{n:08d}/meta.json" for n in range(2, steps + 1, 2)} <= set(listed)
    meta = json.loads(storage.read_bytes(f"{straight['checkpoint']}/meta.json"))
    assert meta["version"] == "v1" and meta["step"] == steps and meta["dataset"] == "tiny"

    job = make_job(straight_config, "v1", model)
    assert fixed_batch_loss(job, straight["checkpoint"]) < fixed_batch_loss(job)

    half = make_config(storage_config, tiny, "resumed", max_steps=steps // 2, condition_dropout=0.0)
    assert train_in_process(make_job(half, "v1", model), storage)["step"] == steps // 2
    whole = make_config(storage_config, tiny, "resumed", max_steps=steps, condition_dropout=0.0)
    resumed = train_in_process(make_job(whole, "v1", model), storage)
    assert resumed["step"] == steps
    expected = trainable_weights(job, straight["checkpoint"])
    got = trainable_weights(job, resumed["checkpoint"])
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    return storage


@pytest.mark.parametrize("keep", [2, 0])
def test_a_run_keeps_its_newest_complete_steps_and_resumes_from_them(tmp_path, tiny, keep):
    """keep_steps 2: each checkpoint deletes the steps older than the two newest (meta.json first);
    a step folder left incomplete by a kill goes with them. 0 keeps every step."""
    from factory.framework import layout
    from models.training.job import make_job
    from models.training.runner import train_in_process

    storage = open_storage(StorageConfig(root=str(tmp_path / "root")))
    publish(storage)
    torn = layout.checkpoint_file(layout.checkpoint_step("assistant", "kept", 1), "model/torn.bin")
    storage.write_bytes(torn, b"a save killed before its meta.json")
    config = make_config(StorageConfig(root=str(tmp_path / "root")), tiny, "kept", checkpoint_every=2, max_steps=3,
                         keep_steps=keep)
    assert train_in_process(make_job(config, "v1", "assistant"), storage)["step"] == 3

    def steps() -> dict[int, bool]:  # step -> complete
        listed = storage.list(layout.checkpoint_run("assistant", "kept"))
        found = {layout.checkpoint_step_number(key) for key in listed} - {None}
        return {step: layout.checkpoint_meta(layout.checkpoint_step("assistant", "kept", step)) in listed
                for step in found}

    assert steps() == ({2: True, 3: True} if keep else {1: False, 2: True, 3: True})
    longer = make_config(StorageConfig(root=str(tmp_path / "root")), tiny, "kept", checkpoint_every=2, max_steps=4,
                         keep_steps=keep)
    resumed = train_in_process(make_job(longer, "v1", "assistant"), storage)
    assert resumed["step"] == 4 and resumed["checkpoint"].endswith("step-00000004")
    assert steps() == ({3: True, 4: True} if keep else {1: False, 2: True, 3: True, 4: True})


def test_a_resume_refuses_another_batch_size_or_seed_and_takes_the_new_learning_rate(tmp_path, tiny):
    """The saved batch index means another batch size or shuffle would repeat some samples and skip
    others; a new learning rate or weight decay is what the operator asked for, and what meta.json says."""
    from factory.framework import layout
    from models.training.job import make_job
    from models.training.runner import train_in_process

    root = StorageConfig(root=str(tmp_path / "root"))
    storage = open_storage(root)
    publish(storage)
    assert train_in_process(make_job(make_config(root, tiny, "r", max_steps=1, checkpoint_every=1), "v1",
                                     "assistant"), storage)["step"] == 1
    for changed, said in (({"assistant_batch_size": 2}, "assistant_batch_size 4 -> 2"), ({"seed": 9}, "seed 0 -> 9")):
        config = make_config(root, tiny, "r", max_steps=2, checkpoint_every=1, **changed)
        with pytest.raises(ValueError, match=f"other settings \\({said}\\)"):
            train_in_process(make_job(config, "v1", "assistant"), storage)
    config = make_config(root, tiny, "r", max_steps=2, checkpoint_every=1, assistant_lr=5e-4, weight_decay=0.0)
    resumed = train_in_process(make_job(config, "v1", "assistant"), storage)
    groups = json.loads(storage.read_bytes(layout.checkpoint_file(resumed["checkpoint"], layout.OPTIMIZER_GROUPS)))
    assert {(group["lr"], group["weight_decay"]) for group in groups["param_groups"]} == {(5e-4, 0.0)}
    # at an epoch's end (10 samples, batch 4: 3 steps) the next epoch is planned with the new batch size
    config = make_config(root, tiny, "r", max_steps=3, checkpoint_every=1)
    assert train_in_process(make_job(config, "v1", "assistant"), storage)["step"] == 3
    config = make_config(root, tiny, "r", max_steps=5, checkpoint_every=1, assistant_batch_size=2)
    after = train_in_process(make_job(config, "v1", "assistant"), storage)
    meta = json.loads(storage.read_bytes(layout.checkpoint_meta(after["checkpoint"])))
    assert (meta["step"], meta["epoch"], meta["batch_in_epoch"]) == (5, 1, 2)


def test_a_sample_whose_image_does_not_decode_stops_training_naming_it(tmp_path, tiny):
    from dataclasses import replace

    from models.training.job import make_job
    from models.training.runner import train_in_process

    root = StorageConfig(root=str(tmp_path / "root"))
    storage = open_storage(root)
    samples = make_samples()
    samples[1] = replace(samples[1], target_image=samples[1].target_image[:200])  # a truncated JPEG
    publish_samples(storage, VersionSpec("tiny", "v1", "bootstrap"), samples, shard_max_samples=SHARD_SAMPLES)
    with pytest.raises(ValueError, match=f"sample {samples[1].key} of the version: its target_image does not decode"):
        train_in_process(make_job(make_config(root, tiny, "bad", max_steps=2), "v1", "assistant"), storage)


def test_generator_trains_checkpoints_and_resumes(tmp_path, tiny):
    train_resume_and_compare(StorageConfig(root=str(tmp_path / "root")), tiny, "generator", steps=4)


def test_assistant_trains_checkpoints_and_resumes_on_s3(s3_bucket, tiny):
    endpoint, bucket = s3_bucket
    config = StorageConfig(root=f"s3://{bucket}/factory", endpoint_url=endpoint, max_attempts=2)
    storage = train_resume_and_compare(config, tiny, "assistant", steps=4)
    from models.training.job import make_job
    from models.training.runner import train_in_process

    publish(storage, "v2", count=4)
    other = make_config(config, tiny, "resumed", max_steps=6)
    with pytest.raises(ValueError, match="trained on version 'v1'"):
        train_in_process(make_job(other, "v2", "assistant"), storage)


def test_sid_trains_and_fine_tunes_g_through_the_helpers(tmp_path, tiny, monkeypatch):
    from factory.dataset.checkpoints import latest_generator_checkpoint
    from factory.framework.stage import RunContext
    from models.cafe import CafeUNet
    from models.training.runner import train_generator_on

    monkeypatch.chdir(tmp_path)  # the storage root lies in the working folder, as the demo's does
    storage_config = StorageConfig(root=str(tmp_path / "root"))
    storage = open_storage(storage_config)
    publish(storage)
    ctx = RunContext(make_config(storage_config, tiny, "sid", max_steps=1), storage)
    assert latest_generator_checkpoint(ctx) is None
    first = train_generator_on(ctx, "v1")
    assert Path(first).is_dir() and latest_generator_checkpoint(ctx) == first
    tuned = train_generator_on(ctx, "v1", init_from=first, run_id="sid-round1")
    assert tuned != first and latest_generator_checkpoint(ctx) == tuned
    meta = json.loads((Path(tuned).parent / "meta.json").read_text())
    assert meta["train"]["init_from"] == str(Path(first).relative_to(tmp_path)) and meta["step"] == 1
    assert CafeUNet.from_pretrained(tuned).config.base_model == tiny["base_model"]


def test_an_assistant_fine_tune_takes_the_configured_text_limit_and_refuses_encoders_of_other_widths(tmp_path, tiny):
    import shutil

    from factory.framework.stage import RunContext
    from models.assistant import CONFIG_FILE
    from models.training.runner import train_assistant_on

    storage_config = StorageConfig(root=str(tmp_path / "root"))
    storage = open_storage(storage_config)
    publish(storage)
    first = train_assistant_on(RunContext(make_config(storage_config, tiny, "sid", max_steps=1), storage), "v1")
    ctx = RunContext(make_config(storage_config, tiny, "sid", max_steps=1, max_text_tokens=12), storage)
    tuned = train_assistant_on(ctx, "v1", init_from=first, run_id="sid-a-round1")
    assert json.loads((Path(first) / CONFIG_FILE).read_text())["max_text_tokens"] == 256
    assert json.loads((Path(tuned) / CONFIG_FILE).read_text())["max_text_tokens"] == 12
    wider = tmp_path / "wider-dino"
    shutil.copytree(tiny["dino_model"], wider)
    dino_config = json.loads((wider / "config.json").read_text())
    (wider / "config.json").write_text(json.dumps({**dino_config, "hidden_size": dino_config["hidden_size"] * 2}))
    ctx = RunContext(make_config(storage_config, tiny, "sid", max_steps=1, dino_model=str(wider)), storage)
    with pytest.raises(ValueError, match=f"DINO {dino_config['hidden_size']} wide features"):
        train_assistant_on(ctx, "v1", init_from=first, run_id="sid-a-round2")


def test_resolve_version_takes_the_latest(tmp_path, tiny):
    from stages.train import resolve_version

    storage_config = StorageConfig(root=str(tmp_path))
    storage = open_storage(storage_config)
    config = make_config(storage_config, tiny)
    with pytest.raises(ValueError, match="no published version"):
        resolve_version(config, storage)
    publish(storage, "v1", 3)
    assert resolve_version(config, storage) == "v1"
    # a SID round's version holds only its new samples: between it and its union, v1 is still the newest dataset
    publish_samples(storage, VersionSpec("tiny", "night-sid1", "sid", parents=["v1"]), make_samples(2, 10))
    assert resolve_version(config, storage) == "v1"
    pinned = make_config(storage_config, tiny, version="v0")
    assert resolve_version(pinned, storage) == "v0"


# --- Ray Train --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(include_dashboard=False, **load_config().ray.local_cluster())  # the demo's CPUs and memory
    yield
    ray.shutdown()


@pytest.mark.slow
def test_train_on_ray_reads_every_sample_once_per_epoch(ray_cluster, tmp_path, tiny):
    from models.training.runner import train_on_ray

    storage_config = StorageConfig(root=str(tmp_path / "root"))
    storage = open_storage(storage_config)
    publish(storage)  # 4 shards (3, 3, 3, 1 samples): two whole shards per worker and epoch
    epochs = 2
    config = make_config(storage_config, tiny, "ray", model="assistant", num_workers=2, epochs=epochs,
                         log_sample_keys=True, checkpoint_every=100)
    result = train_on_ray(config, "v1", ray_storage_path=str(tmp_path / "ray"))
    assert result["model"] == "assistant" and result["version"] == "v1"
    logs = [json.loads(storage.read_bytes(k)) for k in storage.list("checkpoints/assistant/ray/data")]
    every_key = [f"key{n:03d}" for n in range(SAMPLES)]
    for epoch in range(epochs):
        by_rank = {log["rank"]: log["keys"] for log in logs if log["epoch"] == epoch}
        assert set(by_rank) == {0, 1} and all(by_rank.values())
        assert sorted(by_rank[0] + by_rank[1]) == every_key
    from models.training.data import EpochPlan

    manifest = load_manifest(storage, "tiny", "v1")
    per_worker = 2  # global batch 4 over 2 workers
    assert result["step"] == sum(EpochPlan.build(manifest, 2, e, 0).steps(per_worker) for e in range(epochs))


def test_a_finished_run_returns_its_checkpoint_without_training_again(tmp_path, tiny, monkeypatch):
    """A resubmitted night finds its finished fine-tune and starts no training for it (no Ray Train
    run, no model loaded); with other settings (more steps) the loop resumes it as before."""
    import ray

    import models.training.runner as runner
    from factory.framework.stage import RunContext
    from models.training.runner import train_generator_on

    storage_config = StorageConfig(root=str(tmp_path / "root"))
    storage = open_storage(storage_config)
    publish(storage)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # in this process, even after a Ray test
    trained, train_in_process = [], runner.train_in_process
    monkeypatch.setattr(runner, "train_in_process",
                        lambda job, storage: trained.append(job.train["max_steps"]) or train_in_process(job, storage))
    ctx = RunContext(make_config(storage_config, tiny, "night", max_steps=1), storage)
    first = train_generator_on(ctx, "v1")
    assert train_generator_on(ctx, "v1") == first and trained == [1]
    longer = RunContext(make_config(storage_config, tiny, "night", max_steps=2), storage)
    resumed = train_generator_on(longer, "v1")
    assert trained == [1, 2] and resumed != first
    assert json.loads((Path(resumed).parent / "meta.json").read_text())["step"] == 2


def test_a_checkpoint_records_local_paths_under_the_working_folder_relative_to_it(tmp_path, monkeypatch):
    """`ray job submit` unpacks each submission into a new folder: meta.json must read the same from each."""
    from models.training.job import make_job

    recorded = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        job = make_job(load_config(None, ["train.init_from=./factory-data/checkpoints/g/step-1/model"]), "v1")
        assert job.train["init_from"] == str(tmp_path / folder / "factory-data/checkpoints/g/step-1/model")
        recorded.append(job.recorded_train)
    assert recorded[0] == recorded[1] and recorded[0]["init_from"] == "factory-data/checkpoints/g/step-1/model"
    assert make_job(load_config(None, ["train.init_from=/elsewhere/model"]), "v1").recorded_train["init_from"] == \
        "/elsewhere/model"
