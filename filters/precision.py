"""The dtype the scorers and models run in: one switch (`FACTORY_CPU_DTYPE`) for the whole factory,
and the inference context that applies it. Imports torch."""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

CPU_DTYPE_VARIABLE = "FACTORY_CPU_DTYPE"  # float32 (default) | bfloat16: half precision rehearsed on the CPU


def cpu_half_precision() -> bool:
    """Whether models on the CPU run in bfloat16 where CUDA runs half precision
    (`FACTORY_CPU_DTYPE=bfloat16`; Ray workers on this machine inherit it). Off by default.
    Every dtype choice reads it (`models.base.half_dtype`, `resolve_dtype`, `autocast_dtype` here),
    so the code that picks and converts dtypes is the one CUDA runs; only the device differs."""
    name = os.environ.get(CPU_DTYPE_VARIABLE, "float32")
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"{CPU_DTYPE_VARIABLE} must be float32 or bfloat16, got {name!r}")
    return name == "bfloat16"


def native_bfloat16() -> bool:
    """Whether this process's CUDA card computes in bfloat16 natively (Ampere, compute capability 8.0, or
    newer); torch's default answer also counts an older card's slow emulation."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def autocast_dtype(device: str, dtype: str | None):
    """The torch dtype to autocast to, or None for full float32.

    "auto" means bfloat16 on a CUDA card that has it, float16 on an older card, and
    float32 on the CPU (bfloat16 when half precision is rehearsed there: `cpu_half_precision`).
    """
    if dtype in (None, "float32"):
        return None
    if dtype == "auto":
        if torch.device(device).type != "cuda":
            return torch.bfloat16 if cpu_half_precision() else None
        return torch.bfloat16 if native_bfloat16() else torch.float16
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
