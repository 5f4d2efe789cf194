"""The one Stable Diffusion drawer: references drawn from class names (`stages.references`) and SID's
`w` drawn from instructions (`stages.sid`), one image per (prompt, seed) row.

Both draw with `references.sd_model` at its steps, size and guidance, in half precision on CUDA
and float32 on the CPU (`models.base.resolve_dtype`), with a CPU generator seeded by the row's
seed (the same image on any device up to float rounding), and encode PNG (lossless: the reader
decides what to keep). A batch the pipeline fails on, or an image its safety checker flags, comes
back as no image with its reason, for the caller to count; a model that cannot be loaded raises.
"""

from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING

import pandas as pd
import torch
from diffusers import StableDiffusionPipeline

from factory.framework.models_cache import local_model
from models.base import DIFFUSERS_LOADING, lost_device, resolve_dtype

if TYPE_CHECKING:
    from factory.framework.config import ReferencesConfig, StorageConfig

log = logging.getLogger(__name__)

FAILED, FLAGGED = "generation_failed", "nsfw_flagged"


class StableDiffusionDrawer:
    """`(rows: DataFrame[prompt, seed]) -> rows + image (PNG bytes, or None) + error (None, or why not)`.
    Built once per actor, or once in the process that draws."""

    def __init__(self, settings: ReferencesConfig, storage: StorageConfig | None = None):
        self.settings = settings
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = local_model(settings.sd_model, storage, "references.sd_model")
        self.pipe = StableDiffusionPipeline.from_pretrained(
            model, torch_dtype=resolve_dtype("auto", self.device), **DIFFUSERS_LOADING).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)

    def ready(self) -> bool:
        return True

    def draw_batch(self, rows: pd.DataFrame) -> pd.DataFrame:
        return self(rows)

    def __call__(self, rows: pd.DataFrame) -> pd.DataFrame:
        out = rows.reset_index(drop=True)
        try:
            result = self.pipe(
                prompt=list(out["prompt"]),
                num_inference_steps=self.settings.sd_steps,
                height=self.settings.sd_size,
                width=self.settings.sd_size,
                guidance_scale=self.settings.sd_guidance_scale,
                generator=[torch.Generator("cpu").manual_seed(int(seed)) for seed in out["seed"]],
            )
        except Exception as err:  # a failed batch is counted by the caller, the work goes on
            if lost_device(err):
                raise
            log.warning("Stable Diffusion failed for %d prompts: %s", len(out), type(err).__name__)
            return out.assign(image=None, error=FAILED)
        flagged = result.nsfw_content_detected or [False] * len(out)
        out["image"] = [None if flag else png_bytes(image) for image, flag in zip(result.images, flagged)]
        out["error"] = [FLAGGED if flag else None for flag in flagged]
        return out


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
