"""Drawing generated references with Stable Diffusion (`references.sd_model`, `references.sd_prompt`).

It runs on the driver, or on `concurrency` Ray actors with `num_gpus` each when either is set
above its default. A failed batch is counted ("generation_failed"), never a stop; a model that
cannot be loaded stops the stage before any image is read.
"""

from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING

import pandas as pd

from factory.reference_sources import Candidate, ReferencesError, Rejected

if TYPE_CHECKING:
    from factory.config import FactoryConfig

log = logging.getLogger(__name__)


class ReferenceDrawer:
    """Draws references with a diffusers StableDiffusionPipeline; built once per actor.

    `(rows: DataFrame[prompt, seed]) -> rows + image (PNG bytes, or None) + error`.
    """

    def __init__(self, config: FactoryConfig):
        import torch
        from diffusers import StableDiffusionPipeline

        self.cfg = config.references
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        half = {"torch_dtype": torch.float16} if self.device == "cuda" else {}
        from factory.models_cache import local_model

        model = local_model(self.cfg.sd_model, config.storage, "references.sd_model")
        self.pipe = StableDiffusionPipeline.from_pretrained(model, low_cpu_mem_usage=False, **half)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)

    def ready(self) -> bool:
        return True

    def draw_batch(self, rows: pd.DataFrame) -> pd.DataFrame:
        return self(rows)

    def __call__(self, rows: pd.DataFrame) -> pd.DataFrame:
        import torch

        out = rows.copy()
        try:
            result = self.pipe(
                prompt=list(rows["prompt"]),
                num_inference_steps=self.cfg.sd_steps,
                height=self.cfg.sd_size,
                width=self.cfg.sd_size,
                guidance_scale=self.cfg.sd_guidance_scale,
                generator=[torch.Generator("cpu").manual_seed(int(seed)) for seed in rows["seed"]],
            )
            out["image"] = [png_bytes(image) for image in result.images]
            out["error"] = None
        except Exception as err:  # a failed batch is counted, the stage goes on
            log.warning("reference drawing failed for %d prompts: %s", len(rows), type(err).__name__)
            out["image"] = None
            out["error"] = type(err).__name__
        return out


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class Drawer:
    """Runs ReferenceDrawer in batches of `batch_size`, here or on a pool of Ray actors."""

    def __init__(self, config: FactoryConfig):
        cfg = config.references
        self.batch_size = cfg.batch_size
        self.pool = None
        try:
            if cfg.num_gpus > 0 or cfg.concurrency > 1 or cfg.resources:
                self.pool = ray_pool(config)
            else:
                self.local = ReferenceDrawer(config)
        except Exception as err:
            raise ReferencesError(
                f"cannot load the Stable Diffusion pipeline references.sd_model={cfg.sd_model!r}: "
                f"{type(err).__name__}: {err}"
            ) from None

    def draw(self, candidates: list[Candidate]) -> dict[str, bytes | Rejected]:
        batches = [
            pd.DataFrame({"reference_id": [c.reference_id for c in batch], "prompt": [c.prompt for c in batch],
                          "seed": [c.seed for c in batch]})
            for batch in (candidates[i : i + self.batch_size] for i in range(0, len(candidates), self.batch_size))
        ]
        if self.pool is not None:
            results = self.pool.map(lambda actor, batch: actor.draw_batch.remote(batch), batches)
        else:
            results = map(self.local, batches)
        drawn: dict[str, bytes | Rejected] = {}
        for frame in results:
            for ident, image in zip(frame["reference_id"], frame["image"]):
                drawn[ident] = image if image is not None else Rejected("generation_failed")
        return drawn


def ray_pool(config: FactoryConfig):
    import ray
    from ray.util import ActorPool

    cfg = config.references
    if not ray.is_initialized():
        local = config.ray.local_cluster() if config.ray.address is None else {}
        ray.init(address=config.ray.address, ignore_reinit_error=True, **local)
    remote = ray.remote(**cfg.ray_options())(ReferenceDrawer)
    actors = [remote.remote(config) for _ in range(cfg.concurrency)]
    ray.get([actor.ready.remote() for actor in actors])  # surface a bad model path now
    return ActorPool(actors)
