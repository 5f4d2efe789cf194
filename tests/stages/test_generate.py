"""The generate stage as a plain callable on plan rows, without Ray: tiny ProFusion draws the
live rows, rows rejected upstream pass through untouched, bad inputs are rejected by reason."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest
import torch
from PIL import Image

from factory.framework.config import FactoryConfig
from stages.generate import Generate
from tests.factory.conftest import jpeg

pytestmark = pytest.mark.usefixtures("one_torch_thread")



@pytest.fixture(scope="module")
def stage(tmp_path_factory) -> Generate:
    from factory.tiny.sd import build_tiny_promptnet, build_tiny_sd

    root = tmp_path_factory.mktemp("generate-models")
    sd = build_tiny_sd(root / "sd")
    promptnet = build_tiny_promptnet(root / "promptnet", sd)
    config = FactoryConfig.model_validate({"generate": {"generators": {"profusion": {
        "kind": "profusion", "model": sd, "checkpoint": promptnet, "image_size": 32, "steps": 2,
        "options": {"finetune_steps": 1, "finetune_views": 2, "finetune_batch_size": 1, "batch_size": 2}}}}})
    return Generate(config)


def plan_rows() -> pd.DataFrame:
    """Plan rows of one unit (as `factory.framework.units.ImageJoin` hands them over): two live jobs on
    reference r0, one on r1, a job whose reference bytes are corrupt, a bootstrap job whose
    w_id names an image that was not found, and two rows that arrive already rejected."""
    good, other = jpeg(1, size=40), jpeg(2, size=40)
    corrupt = good[: len(good) // 3]  # a truncated JPEG
    specs = [  # key, reference_id, input bytes, w_id, reject_stage, reject_reason
        ("k0", "r0", good, None, None, None),
        ("k1", "r0", good, None, None, None),
        ("k2", "r1", other, None, None, None),
        ("k3", "r2", corrupt, None, None, None),
        ("k4", "r1", other, "sd:5-0123456789ab", None, None),
        ("k5", "r0", good, None, "plan", "upstream_reason"),
        ("k6", "r3", b"", None, "plan", "other_reason"),
    ]
    return pd.DataFrame({
        "key": [spec[0] for spec in specs], "unit": 0, "reference_set": "s",
        "reference_part": "references/s/part-00000.parquet", "reference_id": [spec[1] for spec in specs],
        "subject": "dog", "domain": "object", "instruction_id": "i0", "category": "style",
        "template": "a photo of {subject} on the beach", "instruction": "a photo of dog on the beach",
        "seed": list(range(len(specs))), "generator": "profusion", "round": 0, "alpha": None,
        "w_id": [spec[3] for spec in specs], "input_image": [spec[2] for spec in specs],
        "w_image": None, "reject_stage": [spec[4] for spec in specs], "reject_reason": [spec[5] for spec in specs],
    })


@pytest.fixture(scope="module")
def generated(stage):
    rows = plan_rows()
    return rows, stage(rows.copy())


def test_live_rows_get_jpeg_targets_and_their_byte_sizes(generated):
    rows, out = generated
    assert list(out["key"]) == list(rows["key"])
    live = out[out["key"].isin(["k0", "k1", "k2"])]
    assert live["reject_reason"].isna().all()
    for data in live["target_image"]:
        image = Image.open(io.BytesIO(data))
        assert image.format == "JPEG" and image.size == (32, 32)
    assert list(live["target_bytes"]) == [len(data) for data in live["target_image"]]
    assert list(live["input_bytes"]) == [len(data) for data in rows.loc[live.index, "input_image"]]
    assert all(info and '"seed"' in info for info in live["generator_info"])


def test_a_sid_row_gives_g_its_alpha_and_its_w_image():
    """The alpha a sample records is the one G mixes F(w) and F(x) with (equation 4)."""

    row = plan_rows().iloc[0].copy()
    row["alpha"], row["w_id"], row["w_image"] = 0.3, "sd:5-0123456789ab", jpeg(9, size=36)
    job = Generate._job(row)
    assert job.alpha == 0.3 and job.w_image.size == (36, 36)
    row["alpha"], row["w_id"], row["w_image"] = float("nan"), None, None
    assert Generate._job(row).alpha is None and Generate._job(row).w_image is None


def test_rows_rejected_upstream_come_back_untouched(generated):
    rows, out = generated
    for key in ("k5", "k6"):
        before, after = rows[rows["key"] == key].iloc[0], out[out["key"] == key].iloc[0]
        for column in rows.columns:  # reject_stage and reject_reason included
            assert after[column] == before[column] or (pd.isna(after[column]) and pd.isna(before[column])), column
        assert pd.isna(after["target_image"]) and pd.isna(after["generator_info"])


def test_bad_reference_and_missing_w_are_rejected_by_reason(generated):
    _, out = generated
    by_key = out.set_index("key")
    assert (by_key.loc["k3", "reject_stage"], by_key.loc["k3", "reject_reason"]) == ("generate",
                                                                                     "reference_corrupt_image")
    assert (by_key.loc["k4", "reject_stage"], by_key.loc["k4", "reject_reason"]) == ("generate", "w_missing")
    assert by_key.loc["k3", "target_image"] is None and by_key.loc["k4", "target_image"] is None
    assert by_key.loc["k3", "target_bytes"] == 0


def test_counters_make_the_funnel(generated, stage):
    counters = stage.counters
    assert (counters["rows"], counters["live_in"], counters["live_out"]) == (7, 5, 3)
    assert {name: n for name, n in counters.items() if name.startswith("rejected:")} == {
        "rejected:reference_corrupt_image": 1, "rejected:w_missing": 1}


def test_unet_evaluations_are_counted_per_unit(generated, stage):
    _, out = generated
    infos = [json.loads(info) for info in out["generator_info"].dropna()]
    assert stage.counters["unet_evals"] == sum(info["unet_evals"] for info in infos) > 0
    # one fine-tuning per live reference (r0 and r1): steps x batch rows each
    assert stage.counters["finetune_unet_evals"] == pytest.approx(2 * 1 * 1)


def test_generate_batch_size_reaches_the_generator_unless_it_sets_its_own():
    from stages.generate import with_batch_size

    config = FactoryConfig.model_validate({"generate": {"batch_size": 5, "generators": {
        "own": {"kind": "cafe", "model": "g", "options": {"batch_size": 2}},
        "default": {"kind": "cafe", "model": "g"}}}})
    generators = config.generate.generators
    assert with_batch_size(generators["own"], 5).options["batch_size"] == 2
    assert with_batch_size(generators["default"], 5).options["batch_size"] == 5
    assert "batch_size" not in generators["default"].options  # the config itself is left alone


@pytest.mark.parametrize("error, rejected", [
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), True),  # this reference's: counted, work goes on
    (torch.AcceleratorError("CUDA error: device-side assert triggered"), False),  # the device is lost: raised
])
def test_a_generator_error_rejects_its_reference_unless_the_device_is_lost(stage, error, rejected):
    def fails(module, args):
        raise error

    hook = stage.generator("profusion").unet.register_forward_pre_hook(fails)
    try:
        if rejected:
            out = stage(plan_rows())
            live = out[out["key"].isin(["k0", "k1", "k2"])]
            reasons = set(zip(live["reject_stage"], live["reject_reason"]))
            assert reasons == {("generate", "generator_error(RuntimeError)")}
        else:
            with pytest.raises(type(error), match="device-side assert"):
                stage(plan_rows())
    finally:
        hook.remove()
