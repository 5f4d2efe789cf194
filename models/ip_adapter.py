"""IP-Adapter (arXiv 2308.06721) as a tuning-free bootstrap generator, on diffusers' own support.

The base pipeline (`spec.model`, a Stable Diffusion 1.5 folder in production: the public
h94/IP-Adapter weights exist for SD 1.5 and SDXL, not SD2) gets the adapter of `spec.checkpoint`
through `load_ip_adapter`: a CLIP vision tower embeds the reference, a small projection turns that
embedding into a few context tokens, and extra key/value projections in every cross-attention
layer attend to them beside the text (decoupled cross-attention), weighted by `scale`.

Nothing is fine-tuned: per reference the CLIP embedding is computed once, then every job's
instruction is sampled with plain classifier-free guidance.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Literal

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from factory.framework.images import to_rgb
from factory.framework.models_cache import local_model, model_ref
from models.base import (
    DIFFUSERS_LOADING,
    EvaluationCounter,
    GenJob,
    GenResult,
    parse_options,
    resolve_dtype,
    synchronize,
)

if TYPE_CHECKING:
    from factory.framework.config import GeneratorSpec



class IPAdapterOptions(BaseModel):
    """`GeneratorSpec.options` for kind "ip_adapter"; the file layout defaults are h94/IP-Adapter's."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN passes no bound and is not JSON

    subfolder: str = Field("models", description="folder of the weights inside the checkpoint")
    weight_name: str = Field("ip-adapter_sd15.bin", description="the adapter's weight file (.bin or .safetensors)")
    image_encoder_folder: str = Field(
        "image_encoder", description="diffusers' meaning: a bare name is inside `subfolder`, a path with '/' is "
                                     "relative to the checkpoint"
    )
    # diffusers' IP-Adapter guide: 1.0 conditions on the image prompt only, 0.5 typically balances text and image
    scale: float = Field(0.5, ge=0)
    negative_prompt: str = ""
    scheduler: Literal["ddim", "pipeline"] = Field("ddim", description="DDIM from the pipeline's config, or its own")
    batch_size: int = Field(4, ge=1, description="jobs sampled together (the generate stage sets generate.batch_size "
                                                 "when unset)")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="auto: float16 on CUDA")


class IPAdapterGenerator:
    """The `models.base.Generator` for kind "ip_adapter"."""

    kind = "ip_adapter"

    def __init__(self, name: str, spec: GeneratorSpec, device: str = "cpu", storage: Any = None):
        self.name = name
        self.spec = spec
        self.storage = storage
        self.options = parse_options(name, IPAdapterOptions, spec.options)
        if not spec.checkpoint:
            raise ValueError(f"generator {name!r}: kind ip_adapter needs `checkpoint` (the IP-Adapter weights)")
        self.device = torch.device(device)
        self.dtype = resolve_dtype(self.options.dtype, self.device)
        self.stats: dict[str, float] = {"references": 0, "images": 0}
        self.pipeline = self._load(spec)
        self.unet_evals = EvaluationCounter(self.pipeline.unet)

    def _load(self, spec: GeneratorSpec):
        where = f"generate.generators.{self.name}"
        model = local_model(spec.model, self.storage, f"{where}.model")
        checkpoint = local_model(spec.checkpoint, self.storage, f"{where}.checkpoint")
        pipeline = StableDiffusionPipeline.from_pretrained(model, dtype=self.dtype, **DIFFUSERS_LOADING)
        options = self.options
        try:
            pipeline.load_ip_adapter(checkpoint, subfolder=options.subfolder, weight_name=options.weight_name,
                                     image_encoder_folder=options.image_encoder_folder, **DIFFUSERS_LOADING)
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(
                f"generator {self.name!r}: cannot load the IP-Adapter {options.subfolder}/{options.weight_name} "
                f"(image encoder {options.image_encoder_folder}) from {spec.checkpoint}: {err}"
            ) from err
        return self._prepare(pipeline)

    def _prepare(self, pipeline):
        """Scheduler, adapter scale, device and eval mode for a pipeline with its adapter loaded."""
        if self.options.scheduler == "ddim":
            pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
        pipeline.set_ip_adapter_scale(self.options.scale)
        pipeline.set_progress_bar_config(disable=True)
        pipeline.to(self.device)
        for module in pipeline.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False).eval()
        multiple = pipeline.vae_scale_factor * 2 ** (len(pipeline.unet.config.block_out_channels) - 1)
        if self.spec.image_size % multiple:
            raise ValueError(f"generator {self.name!r}: image_size must be a multiple of {multiple}")
        return pipeline

    # --- the Generator interface -------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "model": model_ref(self.spec.model),
            "checkpoint": model_ref(self.spec.checkpoint),
            "image_size": self.spec.image_size,
            "steps": self.spec.steps,
            "guidance_scale": self.spec.guidance_scale,
            "scheduler": type(self.pipeline.scheduler).__name__,
            "options": self.options.model_dump(mode="json"),
        }

    def generate(self, reference: Image.Image, jobs: list[GenJob]) -> list[GenResult]:
        """Embed `reference` once, then draw one image per job, in order."""
        if not jobs:
            return []

        started = time.perf_counter()
        results: list[GenResult] = []
        with torch.no_grad():
            embeds = self._image_embeds(to_rgb(reference))
            encode_seconds = (time.perf_counter() - started) / len(jobs)
            for start in range(0, len(jobs), self.options.batch_size):
                batch = jobs[start : start + self.options.batch_size]
                batch_started, batch_evals = time.perf_counter(), self.unet_evals.rows
                images, flagged = self._sample(batch, embeds)
                synchronize(self.device)
                seconds = (time.perf_counter() - batch_started) / len(batch)
                evals = (self.unet_evals.rows - batch_evals) / len(batch)
                for job, image, nsfw in zip(batch, images, flagged):
                    results.append(GenResult(image, self._info(job, encode_seconds + seconds, evals, nsfw)))
        self.stats["references"] += 1
        self.stats["images"] += len(results)
        return results

    def _image_embeds(self, reference: Image.Image) -> torch.Tensor:
        """The reference's CLIP embedding through the pipeline's own encoder, once per reference
        (with guidance, its zero negative first); the pipeline repeats it for every prompt of a batch."""
        (embeds,) = self.pipeline.prepare_ip_adapter_image_embeds(reference, None, self.device, 1, self._guided())
        return embeds

    def _sample(self, batch: list[GenJob], embeds: torch.Tensor):
        count = len(batch)
        generators = [torch.Generator().manual_seed(job.seed) for job in batch]
        output = self.pipeline(
            prompt=[job.instruction for job in batch],
            negative_prompt=[self.options.negative_prompt] * count,
            ip_adapter_image_embeds=[embeds],
            generator=generators,
            num_inference_steps=self.spec.steps,
            guidance_scale=self.spec.guidance_scale,
            height=self.spec.image_size,
            width=self.spec.image_size,
            output_type="pil",
        )
        flagged = output.nsfw_content_detected or [None] * count
        return output.images, flagged

    def _guided(self) -> bool:
        """diffusers runs the unconditional branch only when guidance_scale > 1."""
        return self.spec.guidance_scale > 1 and self.pipeline.unet.config.time_cond_proj_dim is None

    def _info(self, job: GenJob, seconds: float, unet_evals: float, nsfw: bool | None) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "model": model_ref(self.spec.model),
            "checkpoint": model_ref(self.spec.checkpoint),
            "weight_name": self.options.weight_name,
            "scale": self.options.scale,
            "seed": job.seed,
            "steps": self.spec.steps,
            "guidance_scale": self.spec.guidance_scale,
            "sample_seconds": seconds,
            "seconds": seconds,
            "unet_evals": unet_evals,
            "finetune_unet_evals": 0,  # tuning-free
            "nsfw_flagged": nsfw,
            "device": str(self.device),
        }


