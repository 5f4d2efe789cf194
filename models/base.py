"""The generator interface every customization model implements.

`generate` (the stage) builds one generator per actor from its named spec in the config
and calls it once per reference with all that reference's jobs, so per-reference work
(ProFusion's fine-tuning, SID's feature extraction) is paid once.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from PIL import Image
from pydantic import BaseModel, ValidationError

from filters.precision import cpu_half_precision, native_bfloat16  # the one switch lives in the lowest layer

# without accelerate, diffusers falls back to full-memory loading anyway (and warns each time)
DIFFUSERS_LOADING = {} if importlib.util.find_spec("accelerate") else {"low_cpu_mem_usage": False}
Options = TypeVar("Options", bound=BaseModel)


@dataclass
class GenJob:
    """One candidate to draw for a reference."""

    template: str  # instruction template with "{subject}", e.g. "a photo of {subject} on the beach"
    subject: str  # the subject class word, e.g. "dog"
    instruction: str  # the template rendered with the subject word (what CLIP-T scores against)
    seed: int
    alpha: float | None = None  # SID only: weight of F(w) against F(x)
    w_image: Image.Image | None = None  # SID only: the reference image for the instruction


@dataclass
class GenResult:
    image: Image.Image
    info: dict[str, Any] = field(default_factory=dict)  # per-candidate facts (steps, seed, ...)


class Generator(Protocol):
    name: str

    def describe(self) -> dict[str, Any]:
        """Name, kind, checkpoint and settings: goes into each sample's metadata and the manifest."""

    def generate(self, reference: Image.Image, jobs: list[GenJob]) -> list[GenResult]:
        """Draw one image per job, in order, all for the same reference."""


class EvaluationCounter:
    """Counts the rows a module (a UNet) is run on: one per image per forward call, so a
    guidance batch of [uncond, cond] counts two. `rows` only grows; read it before and after."""

    def __init__(self, module: Any):
        self.rows = 0
        self.handle = module.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: Any, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        self.rows += int(sample.shape[0])


def parse_options(name: str, options_model: type[Options], options: dict[str, Any]) -> Options:
    """A generator's `options`, validated; a ValueError naming the generator when they are not."""
    try:
        return options_model.model_validate(options)
    except ValidationError as err:
        raise ValueError(f"generator {name!r}: invalid options: {err}") from None


def lost_device(err: BaseException) -> bool:
    """A CUDA error after which this process's device is unusable (a device-side assert, an illegal
    address): every later batch would fail too, so it must stop the stage, naming the error (finished
    units are kept: a run again resumes), rather than count a rejection per row."""
    return isinstance(err, RuntimeError) and (type(err).__name__ == "AcceleratorError"  # torch >= 2.8
                                              or str(err).startswith("CUDA error"))


def half_dtype(device: Any, cuda: torch.dtype) -> torch.dtype:
    """The reduced precision a model runs in on `device`: `cuda` on CUDA, but float16 for bfloat16 on a
    card without it (before Ampere torch emulates it, several times slower); on the CPU bfloat16 when
    half precision is rehearsed (CPUs have no fast float16), else float32."""
    if device.type == "cuda":
        return torch.float16 if cuda == torch.bfloat16 and not native_bfloat16() else cuda
    return torch.bfloat16 if cpu_half_precision() else torch.float32


def resolve_dtype(name: str, device: Any):
    """An options `dtype` on `device`: on CUDA as named ("auto": float16); on the CPU float32, or
    bfloat16 for every choice but float32 when half precision is rehearsed (`cpu_half_precision`)."""
    if device.type == "cuda":
        return torch.float16 if name == "auto" else getattr(torch, name)
    return half_dtype(device, torch.float16) if name != "float32" else torch.float32


def autocast_to(device: Any, dtype: torch.dtype):
    """Autocast to `dtype` on `device`'s type (CUDA, or the CPU's bfloat16 rehearsal); none in float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def synchronize(device: Any) -> None:
    """Wait for `device`'s queued work (CUDA runs asynchronously), so a timer reads the work's end."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pick_device(num_gpus: float) -> str:
    """CUDA when the actor was given GPUs and one is visible, else the CPU."""
    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"
