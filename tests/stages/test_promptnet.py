"""`--stage promptnet`: PromptNet pre-training on a reference set writes a checkpoint ProFusion loads;
a production-shaped bootstrap without a trained PromptNet refuses before any work, saying how to train one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import factory.run
from factory.framework import layout
from factory.framework.config import FactoryConfig, GeneratorSpec, StorageConfig, load_config
from factory.framework.storage import open_storage
from tests.factory.conftest import jpeg

PRODUCTION = Path(__file__).resolve().parents[2] / "configs" / "production.yaml"



@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    from factory.tiny.sd import build_tiny_promptnet, build_tiny_sd

    root = tmp_path_factory.mktemp("promptnet-models")
    sd = build_tiny_sd(root / "sd")
    return {"sd": sd, "promptnet": build_tiny_promptnet(root / "promptnet", sd)}


def store_references(storage, name: str, count: int, part_size: int) -> None:
    from factory.dataset.reference_sets import write_parts

    rows = [{"reference_id": f"r{n}", "image": jpeg(n, size=40), "width": 40, "height": 40, "subject": "dog",
             "domain": "object", "source": "folder", "origin": f"r{n}", "prompt": None, "seed": None}
            for n in range(count)]
    written = write_parts(storage, name, rows, part_size)
    summary = {"set": name, "references": written.count, "parts": written.files}  # as the references stage writes it
    storage.write_bytes(layout.reference_complete(name), json.dumps(summary).encode())


def make_config(root: Path, tiny: dict, run_id: str = "pn", **promptnet) -> FactoryConfig:
    return FactoryConfig.model_validate({
        "run_id": run_id, "storage": {"root": str(root)}, "references": {"set": "refs"},
        "generate": {"generators": {"profusion": {"kind": "profusion", "model": tiny["sd"], "image_size": 32}}},
        "promptnet": {"init_from": tiny["promptnet"], "steps": 2, "batch_size": 2, "num_workers": 1,
                      "use_gpu": False, **promptnet},
    })


def test_promptnet_training_writes_a_checkpoint_profusion_loads(tmp_path, tiny, one_torch_thread):
    from models.profusion import ProFusionGenerator
    from models.promptnet import PromptNet
    from models.training.promptnet import make_promptnet_job, refuse_trained_output, train_promptnet_in_process

    config = make_config(tmp_path / "root", tiny)
    storage = open_storage(config.storage)
    store_references(storage, "refs", 3, part_size=2)
    job = make_promptnet_job(config, storage)
    assert job.output == storage.url("checkpoints/promptnet/pn") and job.image_size == 32

    record = train_promptnet_in_process(job)
    assert record["references"] == 3 and record["steps"] == 2 and record["reference_set"] == "refs"
    assert json.loads(storage.read_bytes("checkpoints/promptnet/pn/training.json")) == record
    start = PromptNet.from_pretrained(tiny["promptnet"], low_cpu_mem_usage=False).state_dict()
    trained = PromptNet.from_pretrained(job.output, low_cpu_mem_usage=False).state_dict()
    assert any(not torch.equal(trained[name], start[name]) for name in start)
    spec = GeneratorSpec(kind="profusion", model=tiny["sd"], checkpoint=job.output, image_size=32, steps=2,
                         options={"finetune_steps": 0})
    generator = ProFusionGenerator("trained", spec)
    assert generator.image_encoder is not None  # saved beside it, from the PromptNet it started from
    with pytest.raises(ValueError, match="already holds a trained PromptNet"):
        refuse_trained_output(job)


def test_a_stopped_training_resumes_from_its_progress_save_as_if_never_stopped(tmp_path, tiny, one_torch_thread,
                                                                             monkeypatch):
    from models.profusion import PromptNetTraining
    from models.promptnet import PromptNet
    from models.training.promptnet import latest_progress, make_promptnet_job, train_promptnet_in_process

    root = tmp_path / "root"
    storage = open_storage(StorageConfig(root=str(root)))
    store_references(storage, "refs", 3, part_size=2)
    stopped = make_promptnet_job(make_config(root, tiny, "stopped", steps=3, checkpoint_every=2), storage)
    losses = []
    real_loss = PromptNetTraining.loss

    def loss_until_the_node_is_lost(self, *args, **kwargs):
        losses.append(1)
        if len(losses) == 3:
            raise RuntimeError("node lost")
        return real_loss(self, *args, **kwargs)

    monkeypatch.setattr(PromptNetTraining, "loss", loss_until_the_node_is_lost)
    with pytest.raises(RuntimeError, match="node lost"):
        train_promptnet_in_process(stopped)
    assert latest_progress(storage, stopped)["step"] == 2 and not storage.exists("checkpoints/promptnet/stopped")

    losses.clear()
    resumed = train_promptnet_in_process(stopped)
    assert len(losses) == 1 and resumed["steps"] == 3  # only step 3 was left
    monkeypatch.undo()
    straight = make_promptnet_job(make_config(root, tiny, "straight", steps=3, checkpoint_every=2), storage)
    train_promptnet_in_process(straight)
    after_stop = PromptNet.from_pretrained(stopped.output, low_cpu_mem_usage=False).state_dict()
    unbroken = PromptNet.from_pretrained(straight.output, low_cpu_mem_usage=False).state_dict()
    assert all(torch.equal(after_stop[name], unbroken[name]) for name in unbroken)

    other = make_promptnet_job(make_config(root, tiny, "stopped", steps=3, lr=1e-3), storage)
    with pytest.raises(ValueError, match="progress made with other settings"):
        latest_progress(storage, other)
    store_references(storage, "refs", 5, part_size=2)  # the set rebuilt larger while the training was down
    grown = make_promptnet_job(make_config(root, tiny, "stopped", steps=3, checkpoint_every=2), storage)
    with pytest.raises(ValueError, match="progress made with other settings"):
        latest_progress(storage, grown)


def test_promptnet_refuses_a_reference_set_that_is_not_complete(tmp_path, tiny):
    """A set being rebuilt has some of its parts: training on it would train on a part of the set."""
    from factory.framework.config import ConfigError
    from factory.framework.stage import RunContext
    from stages.promptnet import run

    config = make_config(tmp_path / "root", tiny)
    storage = open_storage(config.storage)
    store_references(storage, "refs", 3, part_size=2)
    storage.delete(layout.reference_complete("refs"))  # what the references stage does first
    with pytest.raises(ConfigError, match="reference set 'refs' is not complete"):
        run(RunContext(config, storage))


def test_each_worker_reads_its_share_of_the_references(tmp_path):
    from models.training.promptnet import worker_images

    storage = open_storage(StorageConfig(root=str(tmp_path)))
    store_references(storage, "refs", 5, part_size=2)  # parts of 2, 2, 1
    assert [len(worker_images(storage, "refs", rank, 2)) for rank in (0, 1)] == [3, 2]  # parts 0+2, part 1
    assert [len(worker_images(storage, "refs", rank, 4)) for rank in range(4)] == [2, 1, 1, 1]  # dealt
    with pytest.raises(ValueError, match="fewer promptnet.num_workers"):
        worker_images(storage, "refs", 5, 6)


# --- the production bootstrap without a trained PromptNet ----------------------------


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    code = factory.run.main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_production_bootstrap_without_a_promptnet_checkpoint_refuses_saying_how_to_train_one(
        tmp_path, capsys, no_work):
    code, output = run_main(["--stage", "all", "--config", str(PRODUCTION), "--set", f"storage.root={tmp_path}",
                             "--set", "generate.generators.profusion.checkpoint=null"], capsys)
    assert code == factory.run.EXIT_CONFIG == 2, output
    assert "generate.generators.profusion names no PromptNet checkpoint" in output
    assert "python -m factory.run --stage promptnet --config" in output
    assert not any(tmp_path.iterdir())


def test_production_bootstrap_with_its_promptnet_not_yet_on_s3_refuses_saying_how_to_train_one(
        tmp_path, s3_bucket, capsys, no_work):
    endpoint, bucket = s3_bucket
    code, output = run_main(["--stage", "generate", "--config", str(PRODUCTION), "--set", f"storage.root={tmp_path}",
                             "--set", f"storage.endpoint_url={endpoint}", "--set",
                             f"generate.generators.profusion.checkpoint=s3://{bucket}/checkpoints/promptnet/x"],
                            capsys)
    assert code == 2, output
    assert f"generate.generators.profusion.checkpoint='s3://{bucket}/checkpoints/promptnet/x'" in output
    assert "--stage promptnet" in output


def test_the_refusal_can_be_turned_off_and_the_demo_passes(tmp_path):
    from factory.framework.config import untrained_promptnet

    production = load_config(PRODUCTION, ["generate.generators.profusion.checkpoint=null"])
    assert untrained_promptnet(production)
    assert untrained_promptnet(production.model_copy(update={"promptnet": production.promptnet.model_copy(
        update={"require_trained": False})})) is None
    assert untrained_promptnet(load_config(None)) is None  # its tiny PromptNet is named


def test_progress_fingerprint_is_the_same_from_another_working_folder(tmp_path, tiny, monkeypatch):
    """`ray job submit --working-dir` unpacks every submission into a new folder: a resubmitted
    training must still recognise its own progress."""
    from models.training.promptnet import make_promptnet_job

    fingerprints = []
    for folder in ("a", "b"):
        work = tmp_path / folder
        (work / "models").mkdir(parents=True)
        (work / "models" / "tiny-promptnet").symlink_to(tiny["promptnet"])
        monkeypatch.chdir(work)
        config = load_config(None, [f"storage.root={tmp_path / 'root'}",
                                    "promptnet.init_from=./models/tiny-promptnet"])
        job = make_promptnet_job(config, open_storage(config.storage))
        assert job.init_from == str(work / "models" / "tiny-promptnet")
        fingerprints.append(job.fingerprint())
    assert fingerprints[0] == fingerprints[1]
    other = load_config(None, [f"storage.root={tmp_path / 'root'}", "promptnet.lr=0.001"])
    assert make_promptnet_job(other, open_storage(other.storage)).fingerprint() != fingerprints[0]
    # more memory per worker, the usual answer to an out-of-memory kill, resumes the same training
    roomier = load_config(None, [f"storage.root={tmp_path / 'root'}", "promptnet.init_from=./models/tiny-promptnet",
                                 "promptnet.memory_per_worker=64000000000"])
    assert make_promptnet_job(roomier, open_storage(roomier.storage)).fingerprint() == fingerprints[1]
