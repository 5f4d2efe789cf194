"""The one Stable Diffusion drawer (references and SID's w): seeded rows, PNG out, failures and flags as reasons."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from factory.framework.config import ReferencesConfig
from models.sd_drawer import FAILED, FLAGGED, StableDiffusionDrawer
from tests.models.test_ip_adapter import with_safety_checker


def settings(sd: str) -> ReferencesConfig:
    return ReferencesConfig(sd_model=sd, sd_steps=2, sd_size=32)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)), dtype=int)


def test_each_row_is_drawn_from_its_own_prompt_and_seed(tiny_sd):
    drawer = StableDiffusionDrawer(settings(tiny_sd))
    rows = pd.DataFrame({"prompt": ["a dog", "a dog", "a red car"], "seed": [3, 3, 4]}, index=[7, 8, 9])
    out = drawer(rows)
    assert out["error"].isna().all() and list(out["prompt"]) == list(rows["prompt"])
    assert all(Image.open(io.BytesIO(data)).format == "PNG" for data in out["image"])
    first, again, other = (pixels(data) for data in out["image"])
    assert first.shape == (32, 32, 3) and np.abs(first - again).max() <= 1
    assert np.abs(first - other).mean() > 1
    alone = drawer(rows.iloc[[2]])["image"][0]  # a row's image does not depend on its batch
    assert np.abs(pixels(alone) - other).max() <= 1


def test_a_failed_batch_and_flagged_images_come_back_as_reasons(tiny_sd, tmp_path):
    rows = pd.DataFrame({"prompt": [None, None], "seed": [0, 1]})  # the pipeline refuses a batch without prompts
    failed = StableDiffusionDrawer(settings(tiny_sd))(rows)
    assert failed["image"].isna().all() and list(failed["error"]) == [FAILED] * 2

    flagging = StableDiffusionDrawer(settings(with_safety_checker(tiny_sd, tmp_path / "flags")))
    flagged = flagging(pd.DataFrame({"prompt": ["a dog"], "seed": [0]}))
    assert flagged["image"].isna().all() and list(flagged["error"]) == [FLAGGED]  # no blacked-out image


def test_a_lost_device_is_raised_where_a_failed_batch_is_counted(tiny_sd):
    """A CUDA error after which the device is unusable must stop the stage, naming it, not turn every
    later batch into a counted failure."""
    drawer = StableDiffusionDrawer(settings(tiny_sd))

    def device_side_assert(module, args):
        raise torch.AcceleratorError("CUDA error: device-side assert triggered")

    drawer.pipe.unet.register_forward_pre_hook(device_side_assert)
    with pytest.raises(torch.AcceleratorError):
        drawer(pd.DataFrame({"prompt": ["a dog"], "seed": [0]}))
