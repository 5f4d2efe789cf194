"""Scorers of the automatic filter (CLIP image-text and image-image, DINO image-image)
and its threshold rules. `rules` is pure (numpy/pandas); `clip` and `dino` import torch."""

from __future__ import annotations

from contextlib import contextmanager

import torch


def autocast_dtype(device: str, dtype: str | None):
    """The torch dtype to autocast to, or None for full float32.

    "auto" means bfloat16 on a CUDA card that has it, float16 on an older card, and
    float32 on the CPU.
    """
    if dtype in (None, "float32"):
        return None
    if dtype == "auto":
        if torch.device(device).type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


@contextmanager
def inference_context(device: str, dtype: str | None):
    """`torch.inference_mode`, plus autocast where a reduced precision applies."""
    target = autocast_dtype(device, dtype)
    with torch.inference_mode():
        if target is None:
            yield
        else:
            with torch.autocast(device_type=torch.device(device).type, dtype=target):
                yield
