"""The filter stage: scores of the real tiny models, rejections as data, re-thresholding."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from factory.framework.config import FactoryConfig
from factory.framework.images import decode_image
from filters.clip import ClipScorer
from filters.dino import DinoScorer
from filters.rules import apply_thresholds
from stages.filter import Filter
from tests.filters.helpers import bad_images, good_images, image_bytes, jpeg, noise_image


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from factory.tiny.clip import build_tiny_clip
    from factory.tiny.dino import build_tiny_dino

    root = tmp_path_factory.mktemp("filter-models")
    return build_tiny_clip(root / "clip"), build_tiny_dino(root / "dino")


def make_config(tiny_models, **settings) -> FactoryConfig:
    clip, dino = tiny_models
    section = {
        "clip_model": clip.model_name,
        "clip_pretrained": clip.pretrained,
        "clip_model_config": clip.model_config,
        "dino_model": dino,
        "batch_size": 3,
        **settings,
    }
    return FactoryConfig.model_validate({"filter": section})


@pytest.fixture(scope="module")
def stage(tiny_models):
    return Filter(make_config(tiny_models), device="cpu")


def candidates(targets: list, inputs: list | None = None, instructions: list | None = None) -> pd.DataFrame:
    count = len(targets)
    return pd.DataFrame(
        {
            "key": [f"k{number}" for number in range(count)],
            "instruction": instructions or [f"a photo of a dog number {number}" for number in range(count)],
            "input_image": inputs or [jpeg(100 + number) for number in range(count)],
            "target_image": targets,
            "reject_stage": [None] * count,
            "reject_reason": [None] * count,
        }
    )


def test_scores_are_the_scorers_cosines(stage, tiny_models):
    rows = candidates([jpeg(number) for number in range(4)])
    out = stage(rows)
    clip, dino = tiny_models
    targets = [decode_image(data) for data in rows["target_image"]]
    inputs = [decode_image(data) for data in rows["input_image"]]
    clip_scorer = ClipScorer(clip.model_name, clip.pretrained, model_config=clip.model_config)
    expected_clip = clip_scorer.image_text(targets, list(rows["instruction"]))
    expected_dino = DinoScorer(dino).image_image(targets, inputs)
    np.testing.assert_allclose(out["clip_t"], expected_clip, atol=1e-4)
    np.testing.assert_allclose(out["dino"], expected_dino, atol=1e-4)
    assert len(out) == len(rows) and list(out["key"]) == list(rows["key"])


def test_models_load_in_setup_once_not_when_the_stage_is_built(tiny_models, tmp_path):
    clip, _ = tiny_models
    missing = Filter(make_config(tiny_models, dino_model=str(tmp_path / "no-dino")), device="cpu")  # loads nothing
    with pytest.raises(Exception, match="no-dino"):
        missing(candidates([jpeg(0)]))
    fresh = Filter(make_config(tiny_models), device="cpu")
    assert not hasattr(fresh, "clip")
    fresh(candidates([jpeg(0)]))
    loaded = fresh.clip
    fresh(candidates([jpeg(1)]))
    assert fresh.clip is loaded


def test_mixed_batch_rejects_bad_ones_by_reason_and_scores_the_rest(stage):
    good, bad = good_images(), bad_images()
    targets = [*good.values(), *(data for data, _ in bad.values())]
    rows = candidates(targets)
    out = stage(rows)
    scored = out.iloc[: len(good)]
    assert np.isfinite(scored["clip_t"]).all() and np.isfinite(scored["dino"]).all()
    thresholds = stage.settings.thresholds
    assert (scored["pass_clip_t"] == (scored["clip_t"] >= thresholds["clip_t"])).all()
    assert (scored["pass_dino"] == (scored["dino"] >= thresholds["dino"])).all()
    rejected = out.iloc[len(good) :]
    assert rejected["reject_reason"].tolist() == [reason for _, reason in bad.values()]
    assert (rejected["reject_stage"] == "filter").all()
    assert rejected["clip_t"].isna().all() and rejected["dino"].isna().all()
    assert not rejected["pass_clip_t"].any() and not rejected["pass_dino"].any()


def test_a_score_that_is_not_finite_is_its_own_rejection_not_a_threshold_miss(tiny_models, monkeypatch):
    stage = Filter(make_config(tiny_models), device="cpu")
    stage.ensure_setup()
    embed_pixels = stage.clip.embed_pixels

    def overflowing_first_image(pixels):  # what float16 gives past its range
        features = embed_pixels(pixels)
        features[0] = float("inf")
        return features

    monkeypatch.setattr(stage.clip, "embed_pixels", overflowing_first_image)
    out = stage(candidates([jpeg(number) for number in range(3)]))
    assert out["reject_reason"].tolist()[0] == "non_finite_score" and np.isnan(out["clip_t"][0])
    assert np.isfinite(out["clip_t"][1:]).all() and stage.counters["scored"] == 2


def test_bad_input_image_and_bad_instruction_are_rejected(stage):
    rows = candidates(
        [jpeg(number) for number in range(6)],
        inputs=[b"", b"junk", jpeg(1), jpeg(2), jpeg(3), jpeg(4)],
        instructions=["a dog", "a dog", None, "   ", b"\xff\xfe not utf-8", "a dog in the snow"],
    )
    out = stage(rows)
    assert out["reject_reason"].tolist()[:5] == ["empty_image", "corrupt_image", *["bad_instruction"] * 3]
    assert np.isfinite(out["clip_t"].iloc[5])


def test_large_image_refused_before_decoding(tiny_models):
    small_limit = Filter(make_config(tiny_models, max_pixels=64 * 64), device="cpu")
    large = image_bytes(noise_image(1, size=(300, 200)))
    rows = candidates([large, jpeg(2, size=(60, 60))], inputs=[jpeg(3, size=(60, 60))] * 2)
    out = small_limit(rows)
    assert out["reject_reason"].iloc[0] == "image_too_large"
    assert np.isfinite(out["clip_t"].iloc[1])


def test_extreme_aspect_ratio_is_refused(stage):
    sliver = image_bytes(noise_image(1, size=(2000, 8)))
    out = stage(candidates([sliver, jpeg(2)], inputs=[jpeg(3), sliver]))
    assert out["reject_reason"].tolist() == ["extreme_aspect_ratio"] * 2


def test_rows_rejected_earlier_pass_through_untouched(stage):
    rows = candidates([jpeg(1), None, jpeg(3)])
    rows.loc[1, ["reject_stage", "reject_reason"]] = ["generate", "generation_failed"]
    out = stage(rows)
    assert out.loc[1, "reject_stage"] == "generate" and out.loc[1, "reject_reason"] == "generation_failed"
    assert np.isnan(out.loc[1, "clip_t"])
    assert np.isfinite(out.loc[[0, 2], "clip_t"]).all()


def test_rethresholding_stored_scores_equals_rerunning_the_filter(stage, tiny_models, tmp_path):
    rows = candidates([jpeg(number, size=(80 + number, 72)) for number in range(12)])
    first = stage(rows)
    first.drop(columns=["input_image", "target_image"]).to_parquet(tmp_path / "unit.parquet")
    stored = pd.read_parquet(tmp_path / "unit.parquet")

    new_thresholds = {"clip_t": float(stored["clip_t"].median()), "dino": float(stored["dino"].median())}
    rerun = Filter(make_config(tiny_models, thresholds=new_thresholds), device="cpu")(rows)
    rethresholded = apply_thresholds(stored, new_thresholds)

    for column in ("pass_clip_t", "pass_dino"):
        assert rethresholded[column].tolist() == rerun[column].tolist()
    assert rethresholded["threshold_reason"].tolist() == rerun["reject_reason"].tolist()
    survivors = rerun["reject_reason"].isna()
    assert 0 < survivors.sum() < len(rows), "the new thresholds should split the rows"


def test_micro_batches_do_not_change_scores(tiny_models, stage):
    rows = candidates([jpeg(number) for number in range(5)])
    one_by_one = Filter(make_config(tiny_models, batch_size=1), device="cpu")(rows)
    np.testing.assert_allclose(one_by_one["clip_t"], stage(rows)["clip_t"], atol=1e-5)


def test_the_filter_scores_the_same_with_its_models_on_s3(stage, tiny_models, s3_bucket, model_cache):
    from pathlib import Path

    from factory.framework.config import StorageConfig
    from factory.framework.storage import S3Storage

    clip, dino = tiny_models
    endpoint, bucket = s3_bucket
    models = f"s3://{bucket}/models"
    storage = S3Storage(models, StorageConfig(root=models, endpoint_url=endpoint))
    for folder, name in ((Path(clip.pretrained).parent, "clip"), (Path(dino), "dino")):
        for path in folder.iterdir():
            storage.upload_file(path, f"{name}/{path.name}")
    config = FactoryConfig.model_validate({
        "storage": {"root": f"s3://{bucket}/root", "endpoint_url": endpoint},
        "filter": {"clip_model": clip.model_name, "batch_size": 3,
                   "clip_pretrained": f"{models}/clip/{Path(clip.pretrained).name}",
                   "clip_model_config": f"{models}/clip/{Path(clip.model_config).name}",
                   "dino_model": f"{models}/dino"},
    })
    on_s3 = Filter(config, device="cpu")
    on_s3.ensure_setup()
    assert len([p for p in model_cache.iterdir() if not p.name.startswith(".")]) == 3  # loaded from the cache
    rows = candidates([jpeg(number) for number in range(4)])
    local, remote = stage(rows.copy()), on_s3(rows.copy())
    np.testing.assert_allclose(remote["clip_t"], local["clip_t"], rtol=1e-6)
    np.testing.assert_allclose(remote["dino"], local["dino"], rtol=1e-6)
