"""The eval stage: DINO, CLIP-I and CLIP-T of a tiny generator checkpoint, with the filter's
scorers, written as a JSON report next to the checkpoint."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import stages.eval
from factory.framework.config import ConfigError, FactoryConfig, StorageConfig
from factory.framework.stage import RunContext
from factory.framework.storage import open_storage


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from factory.tiny.cafe import build_tiny_cafe_assistant, build_tiny_cafe_generator, build_tiny_cafe_parts
    from factory.tiny.clip import build_tiny_clip
    from factory.tiny.dino import build_tiny_dino

    root = tmp_path_factory.mktemp("cafe-eval-models")
    parts = build_tiny_cafe_parts(root)
    scorer_clip = build_tiny_clip(root / "scorer-clip")
    return {
        "generator": build_tiny_cafe_generator(root, parts),
        "assistant": build_tiny_cafe_assistant(root, parts),
        "filter": {
            "clip_model": scorer_clip.model_name,
            "clip_pretrained": scorer_clip.pretrained,
            "clip_model_config": scorer_clip.model_config,
            "dino_model": build_tiny_dino(root / "scorer-dino"),
        },
    }


def reference_jpeg() -> bytes:
    pixels = np.random.default_rng(3).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def make_config(root: Path, tiny: dict, **evaluation) -> FactoryConfig:
    settings = {
        "images_per_pair": 2,
        "image_size": 16,
        "steps": 2,
        "max_new_tokens": 3,
        "use_gpu": False,
        "pairs": [{"reference": "references/eval/dog.jpg", "subject": "dog",
                   "prompts": ["a {subject} on the beach", "a {subject} in the snow"]}],
        **evaluation,
    }
    return FactoryConfig.model_validate(
        {"run_id": "evalrun", "storage": {"root": str(root)}, "filter": tiny["filter"], "eval": settings}
    )


def upload_folder(storage, folder: str, key: str) -> None:
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            storage.upload_file(path, f"{key}/{path.relative_to(folder).as_posix()}")


def check_metrics(report: dict, images: int) -> None:
    assert report["images"] == images
    assert set(report["metrics"]) == {"dino", "clip_i", "clip_t"}
    for value in report["metrics"].values():
        assert -1.0 <= value <= 1.0
    for row in report["per_prompt"]:
        assert len(row["dino"]) == len(row["clip_i"]) == len(row["clip_t"]) == 2


def test_eval_scores_the_latest_checkpoint_with_the_assistant(tmp_path, tiny, ray_local, monkeypatch):
    from stages.eval import run

    root = tmp_path / "root"
    storage = open_storage(StorageConfig(root=str(root)))
    storage.write_bytes("references/eval/dog.jpg", reference_jpeg())
    for model, folder in (("generator", tiny["generator"]), ("assistant", tiny["assistant"])):
        step = f"checkpoints/{model}/evalrun/step-00000003"
        upload_folder(storage, folder, f"{step}/model")
        meta = {"step": 3, "version": "v1", "dataset": "demo", "created": "2026-12-01T00:00:00.000+00:00"}
        storage.write_bytes(f"{step}/meta.json", json.dumps(meta).encode())
        storage.write_bytes(f"checkpoints/{model}/evalrun/latest.json", json.dumps({"step": 3, "path": step}).encode())

    scoring = stages.eval.evaluate

    def training_drops_the_step_meanwhile(*args, **kwargs):  # train.keep_steps deletes meta.json first
        storage.delete("checkpoints/generator/evalrun/step-00000003/meta.json")
        return scoring(*args, **kwargs)

    monkeypatch.setattr(stages.eval, "evaluate", training_drops_the_step_meanwhile)
    result = run(RunContext(make_config(root, tiny), storage))
    assert result["images"] == 4  # 1 reference x 2 prompts x 2 images
    key = "evals/generator/evalrun/step-00000003/pairs.json"
    assert result["report"] == storage.url(key)
    report = json.loads(storage.read_bytes(key))
    check_metrics(report, 4)
    assert report["metrics"] == result["metrics"]
    assert report["semantic"] == "assistant" and report["eval_set"] == "pairs"
    assert report["trained_on"] == {"dataset": "demo", "version": "v1", "step": 3}  # read when the step was chosen
    assert report["assistant_checkpoint"] == "checkpoints/assistant/evalrun/step-00000003"
    assert [row["prompt"] for row in report["per_prompt"]] == ["a dog on the beach", "a dog in the snow"]


def test_eval_with_clip_text_and_a_local_checkpoint(tmp_path, tiny, ray_local, monkeypatch):
    from stages.eval import EvalWorker, Located, eval_inputs, eval_rows, report_from_scored, run

    root = tmp_path / "root"
    storage = open_storage(StorageConfig(root=str(root)))
    reference = tmp_path / "dog.jpg"
    reference.write_bytes(reference_jpeg())
    local = shutil.copytree(tiny["generator"], tmp_path / "g")
    pairs = [{"reference": str(reference), "subject": "dog", "prompts": ["a {subject} as a knight"]}]
    config = make_config(root, tiny, semantic="clip_text", checkpoint=str(local), pairs=pairs, images_per_pair=2)

    result = run(RunContext(config, storage))
    [key] = [key for key in storage.list("evals/generator/external") if key.endswith(".json")]
    assert result["report"] == storage.url(key) and key.endswith("/pairs.json")
    report = json.loads(storage.read_bytes(key))
    check_metrics(report, 2)

    # run again: the scored chunks it kept are read back, none is drawn again
    chunks = {key: (root / key).stat().st_mtime_ns for key in storage.list("evals/generator/external")
              if key.endswith(".parquet")}
    assert chunks and run(RunContext(config, storage))["metrics"] == result["metrics"]
    assert {key: (root / key).stat().st_mtime_ns for key in chunks} == chunks
    # other settings on the same checkpoint and set: refused before scoring, the report kept
    other = make_config(root, tiny, semantic="clip_text", checkpoint=str(local), pairs=pairs, images_per_pair=1)
    kept = storage.read_bytes(key)
    with pytest.raises(ConfigError, match=r"made with other settings \(eval.images_per_pair: 2 -> 1\): set eval.name"):
        run(RunContext(other, storage))
    assert storage.read_bytes(key) == kept
    # two evals of this checkpoint and set at once: the other one, with other settings, ends while this one scores
    scoring = stages.eval.evaluate
    theirs = json.dumps({"settings": {**report["settings"], "eval.steps": 99}}).encode()

    def the_other_eval_ends_first(*args, **kwargs):
        scored = scoring(*args, **kwargs)
        storage.write_bytes(key, theirs)
        return scored

    monkeypatch.setattr(stages.eval, "evaluate", the_other_eval_ends_first)
    with pytest.raises(ConfigError, match=r"made with other settings \(eval.steps: 99 -> 2\)"):
        run(RunContext(config, storage))
    assert storage.read_bytes(key) == theirs
    monkeypatch.undo()
    assert report["semantic"] == "clip_text" and report["assistant_checkpoint"] is None
    assert report["trained_on"] is None

    # the worker called on a DataFrame, no Ray: the same per-image scores, so the same report
    rows = eval_rows(config, eval_inputs(storage, config.eval))
    direct = report_from_scored(EvalWorker(config.snapshot(), Located(str(local), False))(rows), config.eval, 0.0)
    assert direct["metrics"] == pytest.approx(report["metrics"], abs=1e-4)  # thread counts differ: float noise
    for ours, theirs in zip(direct["per_prompt"], report["per_prompt"], strict=True):
        assert ours["prompt"] == theirs["prompt"]
        for metric in ("dino", "clip_i", "clip_t"):
            assert np.allclose(ours[metric], theirs[metric], atol=1e-4)


def test_eval_report_keeps_pair_and_prompt_order_and_means_every_image(tmp_path, tiny):
    from stages.eval import report_from_scored

    config = make_config(tmp_path, tiny)
    scored = pd.DataFrame({
        "order": [1, 0], "reference": ["b.jpg", "a.jpg"], "subject": ["cat", "dog"], "prompt": ["p1", "p0"],
        "dino": [[0.5, 0.7], [0.1]], "clip_i": [[0.0, 0.0], [0.3]], "clip_t": [[0.2, 0.2], [0.2]],
        "generator": ['{"kind": "cafe"}'] * 2,
    })
    report = report_from_scored(scored, config.eval, 1.0)
    assert [row["prompt"] for row in report["per_prompt"]] == ["p0", "p1"]
    assert report["metrics"]["dino"] == pytest.approx((0.1 + 0.5 + 0.7) / 3)  # a mean over images, not rows
    assert report["per_subject"][1] == {"reference": "b.jpg", "subject": "cat", "dino": 0.6, "clip_i": 0.0,
                                        "clip_t": 0.2}
    assert report["images"] == 3 and report["pairs"] == 2 and report["generator"] == {"kind": "cafe"}


def test_a_non_finite_score_is_counted_and_left_out_of_the_means_so_the_report_is_strict_json():
    """A black or overflowed image can score NaN; the report must still read in any JSON parser."""
    from factory.framework.config import EvalConfig
    from stages.eval import report_from_scored

    scored = pd.DataFrame({
        "order": [0, 1], "reference": ["a.jpg", "b.jpg"], "subject": ["dog", "cat"], "prompt": ["p0", "p1"],
        "dino": [[0.2, float("nan")], [0.4]], "clip_i": [[0.5, 0.5], [float("inf")]], "clip_t": [[0.3, 0.3], [0.1]],
        "generator": ["{}"] * 2,
    })
    report = report_from_scored(scored, EvalConfig(), 1.0)
    assert report["metrics"]["dino"] == pytest.approx(0.3) and report["metrics"]["clip_i"] == pytest.approx(0.5)
    assert report["non_finite"] == {"dino": 1, "clip_i": 1, "clip_t": 0}
    assert report["per_prompt"][0]["dino"] == [0.2, None] and report["per_subject"][1]["clip_i"] is None
    json.loads(json.dumps(report, allow_nan=False))


def test_one_reference_listed_under_two_subjects_is_scored_apart_per_subject():
    from factory.framework.config import EvalConfig
    from stages.eval import report_from_scored

    scored = pd.DataFrame({
        "order": [0, 1], "reference": ["pet.jpg", "pet.jpg"], "subject": ["dog", "cat"], "prompt": ["p0", "p1"],
        "dino": [[0.9], [0.1]], "clip_i": [[0.8], [0.2]], "clip_t": [[0.3], [0.1]], "generator": ["{}"] * 2,
    })
    per_subject = {row["subject"]: row["dino"] for row in report_from_scored(scored, EvalConfig(), 1.0)["per_subject"]}
    assert per_subject == {"dog": 0.9, "cat": 0.1}


def test_no_two_eval_images_share_a_seed_and_settings_that_would_repeat_one_are_refused():
    from factory.framework.config import EvalPair, load_config
    from stages.eval import eval_rows

    config = load_config(None, ["eval.images_per_pair=1000"])
    pairs = [(EvalPair(reference=f"{n}.jpg", subject="dog", prompts=[f"{{subject}} {p}" for p in range(100)]),
              reference_jpeg()) for n in range(2)]
    seeds = [seed for row in eval_rows(config, pairs)["seeds"] for seed in row]
    assert len(seeds) == 2 * 100 * 1000 == len(set(seeds))
    with pytest.raises(ConfigError, match="images_per_pair"):
        load_config(None, ["eval.images_per_pair=1001"])
    with pytest.raises(ValueError, match="at most 100 items"):
        EvalPair(reference="0.jpg", subject="dog", prompts=["{subject}"] * 101)


def test_eval_needs_pairs(tmp_path, tiny):
    from stages.eval import run

    config = make_config(tmp_path, tiny, pairs=[])
    with pytest.raises(ValueError, match="pairs"):
        run(RunContext(config))


# --- eval sets from a stored reference set ------------------------------------------------


def store_reference_set(storage, name: str, subjects: list[tuple[str, str, str]]) -> None:
    """A complete reference set of (reference_id, subject, domain) rows with real JPEG bytes."""
    from factory.dataset.reference_sets import write_parts
    from factory.framework import layout

    rows = [{"reference_id": rid, "image": reference_jpeg(), "width": 40, "height": 40, "subject": subject,
             "domain": domain, "source": "folder", "origin": rid, "prompt": None, "seed": None}
            for rid, subject, domain in sorted(subjects)]
    write_parts(storage, name, rows, part_size=2)
    storage.write_bytes(layout.reference_complete(name), b"{}")


def test_dreambench_ships_25_object_and_25_live_prompts():
    from factory.dataset.eval_sets import load_prompt_lists

    lists = load_prompt_lists("dreambench")
    assert len(lists.object) == len(set(lists.object)) == 25 and len(lists.live) == len(set(lists.live)) == 25
    assert "a {subject} wearing a santa hat" in lists.live and "a {subject} wearing a santa hat" not in lists.object
    assert "a {subject} floating in an ocean of milk" in lists.object
    assert len(lists.subjects) == 30 and lists.class_word("backpack_dog") == "backpack"
    assert lists.class_word("backpack dog") == "backpack" and lists.class_word("robot") == "robot"


def test_reference_set_pairs_take_each_class_its_prompt_list(tmp_path):
    from factory.dataset.eval_sets import eval_set_name, load_prompt_lists, reference_set_pairs
    from factory.framework.config import EvalConfig

    storage = open_storage(StorageConfig(root=str(tmp_path / "root")))
    store_reference_set(storage, "bench", [("r3", "dog2", "object"), ("r1", "dog2", "object"),
                                           ("r2", "backpack dog", "object"), ("r4", "person", "human")])
    settings = EvalConfig(reference_set="bench", references_per_subject=1, prompts_per_subject=3)
    pairs = {pair.reference: pair for pair, image in reference_set_pairs(storage, settings)}
    lists = load_prompt_lists("dreambench")
    assert set(pairs) == {"bench:r1", "bench:r2", "bench:r4"}  # the first dog2 by id, not r3
    assert pairs["bench:r1"].subject == "dog" and pairs["bench:r2"].subject == "backpack"
    assert pairs["bench:r1"].prompts == [lists.live[0], lists.live[12], lists.live[24]]
    assert pairs["bench:r2"].prompts == [lists.object[0], lists.object[12], lists.object[24]]
    assert pairs["bench:r4"].prompts[1] == lists.live[12]  # a human reference is live
    assert eval_set_name(settings) == "dreambench-bench"
    all_prompts = reference_set_pairs(storage, EvalConfig(reference_set="bench"))
    assert len(all_prompts) == 4 and all(len(pair.prompts) == 25 for pair, _ in all_prompts)


def test_an_unbuilt_reference_set_is_refused_saying_how_to_build_it(tmp_path):
    from factory.dataset.eval_sets import reference_set_pairs
    from factory.framework.config import EvalConfig

    storage = open_storage(StorageConfig(root=str(tmp_path / "root")))
    with pytest.raises(ValueError, match="--stage references --set references.set=absent"):
        reference_set_pairs(storage, EvalConfig(reference_set="absent"))


def test_the_assistant_answers_in_the_precision_it_was_trained_in(tiny, monkeypatch):
    """bfloat16 on CUDA, as training loads its LLM (rehearsed on the CPU): float32 would take twice the
    memory (a 13B LLM: 52 GB)."""
    import torch

    from factory.framework.config import EvalConfig
    from filters.precision import CPU_DTYPE_VARIABLE
    from models.assistant import CafeAssistant

    monkeypatch.setenv(CPU_DTYPE_VARIABLE, "bfloat16")
    loaded = []
    from_pretrained = CafeAssistant.from_pretrained

    def recorded(*args, **kwargs):
        loaded.append(from_pretrained(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(CafeAssistant, "from_pretrained", recorded)
    stages.eval.semantic_source(EvalConfig(semantic="assistant"), None, tiny["assistant"], "cpu")
    assert [assistant.llm.dtype for assistant in loaded] == [torch.bfloat16]
