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

from factory.config import FactoryConfig, StorageConfig
from factory.context import RunContext
from factory.storage import open_storage


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


def test_eval_scores_the_latest_checkpoint_with_the_assistant(tmp_path, tiny, ray_local):
    from stages.eval import run

    root = tmp_path / "root"
    storage = open_storage(StorageConfig(root=str(root)))
    storage.write_bytes("references/eval/dog.jpg", reference_jpeg())
    for model, folder in (("generator", tiny["generator"]), ("assistant", tiny["assistant"])):
        step = f"checkpoints/{model}/evalrun/step-00000003"
        upload_folder(storage, folder, f"{step}/model")
        storage.write_bytes(f"checkpoints/{model}/evalrun/latest.json", json.dumps({"step": 3, "path": step}).encode())

    result = run(RunContext(make_config(root, tiny), storage))
    assert result["images"] == 4  # 1 reference x 2 prompts x 2 images
    report = json.loads(storage.read_bytes("checkpoints/generator/evalrun/step-00000003.eval.json"))
    check_metrics(report, 4)
    assert report["metrics"] == result["metrics"]
    assert report["semantic"] == "assistant"
    assert report["assistant_checkpoint"] == "checkpoints/assistant/evalrun/step-00000003"
    assert [row["prompt"] for row in report["per_prompt"]] == ["a dog on the beach", "a dog in the snow"]


def test_eval_with_clip_text_and_a_local_checkpoint(tmp_path, tiny, ray_local):
    from stages.eval import EvalWorker, Located, eval_pairs, eval_rows, report_from_scored, run

    root = tmp_path / "root"
    storage = open_storage(StorageConfig(root=str(root)))
    reference = tmp_path / "dog.jpg"
    reference.write_bytes(reference_jpeg())
    local = shutil.copytree(tiny["generator"], tmp_path / "g")
    pairs = [{"reference": str(reference), "subject": "dog", "prompts": ["a {subject} as a knight"]}]
    config = make_config(root, tiny, semantic="clip_text", checkpoint=str(local), pairs=pairs, images_per_pair=2)

    result = run(RunContext(config, storage))
    report = json.loads(Path(f"{local}.eval.json").read_text())
    assert result["report"] == f"{local}.eval.json"
    check_metrics(report, 2)
    assert report["semantic"] == "clip_text" and report["assistant_checkpoint"] is None

    # the worker called on a DataFrame, no Ray: the same per-image scores, so the same report
    rows = eval_rows(config, storage, eval_pairs(config.eval))
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


def test_eval_needs_pairs(tmp_path, tiny):
    from stages.eval import run

    config = make_config(tmp_path, tiny, pairs=[])
    with pytest.raises(ValueError, match="pairs"):
        run(RunContext(config))
