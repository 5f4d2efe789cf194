"""SID's fine-tuning (paper 4.1): after each round, G and the assistant heads are fine-tuned on the
union from the checkpoints the round started with, each switchable, both named in the next round's
manifest; a resubmitted night trains neither again. Real tiny G and assistant; the round's drawing,
filtering and drafting are replaced by publishing a few fixed samples (tests/e2e/test_sid.py runs
them for real)."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from factory.dataset.manifest import VersionSpec, load_manifest
from factory.dataset.publisher import publish_samples
from factory.framework import layout
from factory.framework.config import FactoryConfig, StorageConfig
from factory.framework.stage import RunContext
from factory.framework.storage import open_storage
from factory.framework.units import write_plan
from factory.run import UNIT_STEPS
from tests.stages.test_train import make_config, make_samples, publish, tiny  # noqa: F401  (tiny: fixture)


@pytest.fixture
def rounds_without_drawing(monkeypatch):
    """`run_round` as it is, with its plan, its generate/filter/dialogue steps and its publishing
    replaced by four fixed samples per round."""
    import stages.sid

    def plan_exists(storage, run_id):
        write_plan(storage, run_id, pa.table({"unit": [0], "instruction_id": ["i0"], "w_id": ["pool:x"]}), 16)
        return True

    def publish_run(rctx, kind, parents, extra):
        round_ = extra["round"]
        spec = VersionSpec(rctx.config.dataset, rctx.version, kind, parents=parents, extra=extra)
        return publish_samples(rctx.storage, spec, make_samples(4, start=100 * round_))

    monkeypatch.setattr(stages.sid, "plan_exists", plan_exists)
    # what the real `run_steps` returns when every unit of the plan is already done
    monkeypatch.setattr(stages.sid, "run_steps", lambda rctx, steps: {"units": 1, "skipped": 1, "ran": 0})
    monkeypatch.setattr(stages.sid, "publish_run", publish_run)


def sid_context(tmp_path, tiny, **sid) -> RunContext:  # noqa: F811
    storage_config = StorageConfig(root=str(tmp_path / "root"))
    storage = open_storage(storage_config)
    publish(storage, "v1", count=4)
    snapshot = make_config(storage_config, tiny, "night", max_steps=1).snapshot()
    snapshot["sid"] = {"parent": "v1", **sid}
    return RunContext(FactoryConfig.model_validate(snapshot), storage, unit_steps=UNIT_STEPS)


def checkpoint_meta(folder: str) -> dict:
    """meta.json of a model folder `.../step-<n>/model`."""
    with open(folder.removesuffix("/model") + "/meta.json") as handle:
        return json.load(handle)


def trained_runs(ctx: RunContext, model: str) -> set[str]:
    return {key.split("/")[2] for key in ctx.storage.list(layout.checkpoints(model))}


def test_a_round_fine_tunes_g_and_the_assistant_on_the_union(tmp_path, tiny, rounds_without_drawing):  # noqa: F811
    from stages import sid

    ctx = sid_context(tmp_path, tiny, finetune=True, finetune_assistant=True)
    night1 = sid.run(ctx)
    round1 = load_manifest(ctx.storage, "tiny", "night-sid1")
    first = {"generator": round1["generator_checkpoint"], "assistant": round1["assistant_checkpoint"]}
    tuned = {"generator": night1["checkpoint"], "assistant": night1["assistant_checkpoint"]}
    for model in ("generator", "assistant"):
        assert checkpoint_meta(first[model])["version"] == "v1"  # the first night trains each on the parent
        meta = checkpoint_meta(tuned[model])
        assert meta["version"] == "night-union1" and meta["train"]["init_from"] == first[model]
        assert trained_runs(ctx, model) == {f"night-{model[0]}-v1", f"night-{model[0]}-night-union1"}

    night2 = sid.run(ctx)  # resubmitted after round 1: fine-tunes on union 1 are found, not redone
    round2 = load_manifest(ctx.storage, "tiny", "night-sid2")
    assert round2["parents"] == ["night-union1"]
    assert {"generator": round2["generator_checkpoint"], "assistant": round2["assistant_checkpoint"]} == tuned
    for model, tuned_again in (("generator", night2["checkpoint"]), ("assistant", night2["assistant_checkpoint"])):
        meta = checkpoint_meta(tuned_again)
        assert meta["version"] == "night-union2" and meta["train"]["init_from"] == tuned[model]
        assert checkpoint_meta(tuned[model])["step"] == 1  # not trained again
        assert len(trained_runs(ctx, model)) == 3


def test_a_night_stopped_in_its_fine_tune_ends_it_when_submitted_again_and_starts_no_round(
        tmp_path, tiny, rounds_without_drawing, monkeypatch):  # noqa: F811
    from factory.dataset.manifest import version_exists
    from stages import sid

    ctx = sid_context(tmp_path, tiny, finetune=True)
    train = sid.train_generator_on

    def node_lost_in_the_fine_tune(ctx, version, init_from=None, run_id=None):
        if version == "night-union1":
            raise KeyboardInterrupt("node lost while G is fine-tuned on union 1")
        return train(ctx, version, init_from=init_from, run_id=run_id)

    monkeypatch.setattr(sid, "train_generator_on", node_lost_in_the_fine_tune)
    with pytest.raises(KeyboardInterrupt):
        sid.run(ctx)
    assert version_exists(ctx.storage, "tiny", "night-union1")
    monkeypatch.setattr(sid, "train_generator_on", train)
    resumed = sid.run(ctx)  # the same night, submitted again
    assert resumed["rounds"] == [] and resumed["resumed_round"] == 1
    assert resumed["publish"]["version"] == "night-sid1" and not version_exists(ctx.storage, "tiny", "night-sid2")
    assert checkpoint_meta(resumed["checkpoint"])["version"] == "night-union1"
    following = sid.run(ctx)  # the next night
    assert [night["round"] for night in following["rounds"]] == [2]


def test_with_the_assistant_switched_off_only_g_is_trained(tmp_path, tiny, rounds_without_drawing):  # noqa: F811
    from stages import sid

    ctx = sid_context(tmp_path, tiny, finetune=True)
    night = sid.run(ctx)
    assert night["assistant_checkpoint"] is None
    assert load_manifest(ctx.storage, "tiny", "night-sid1")["assistant_checkpoint"] is None
    assert trained_runs(ctx, "assistant") == set()
    assert checkpoint_meta(night["checkpoint"])["version"] == "night-union1"


def test_the_llm_is_checked_before_a_sid_night_only_when_the_assistant_is_fine_tuned():
    from factory.run import model_settings

    def settings(**sid) -> dict:
        return model_settings(FactoryConfig.model_validate({"dataset": "d", "sid": sid}), "sid")

    assert "train.llm_model" not in settings()
    assert settings(finetune_assistant=True, assistant_checkpoint="/a")["sid.assistant_checkpoint"] == "/a"
    assert "train.llm_model" in settings(finetune_assistant=True)


@pytest.mark.parametrize(("run_id", "dataset", "refused"), [
    ("r" * 85, "demo", None),         # r...-union1 (92) and demo-r...-union1 (97) fit
    ("r" * 93, "demo", "pool"),       # the round and union names fit, the pool of union 1 does not
    ("r" * 95, "d", "union"),         # r...-union2 is 102 characters
])
def test_a_run_id_too_long_for_sids_derived_names_is_refused_before_any_work(tmp_path, run_id, dataset, refused):
    import stages.sid
    from factory.framework.config import ConfigError

    config = FactoryConfig.model_validate({"storage": {"root": str(tmp_path)}, "run_id": run_id, "dataset": dataset,
                                           "sid": {"rounds": 2}})
    ctx = RunContext(config, unit_steps=UNIT_STEPS)
    if refused is None:
        stages.sid.check_derived_names(ctx, "boot", range(1, 3))
        return
    with pytest.raises(ConfigError, match=f"SID's {refused} name.*shorten"):
        stages.sid.check_derived_names(ctx, "boot", range(1, 3))
    assert not any(tmp_path.iterdir())
