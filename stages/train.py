"""train: G or the assistant heads on a published version, on Ray Train (`TorchTrainer`).

`run` is the stage. How training runs is `models.training.runner` (`train_on_ray`, the in-process
`train_generator` / `train_assistant`, and `train_generator_on` / `train_assistant_on`, which SID
and eval call too); the per-worker loop, its data and the two tasks are the rest of
`models.training`; checkpoints are read back through `factory.dataset.checkpoints`.
"""

from __future__ import annotations

from typing import Any

from factory.dataset.manifest import latest_version
from factory.framework.config import FactoryConfig
from factory.framework.stage import RunContext
from factory.framework.storage import Storage
from models.training.runner import train_on_ray


def resolve_version(config: FactoryConfig, storage: Storage) -> str:
    version = config.train.version or latest_version(storage, config.dataset)
    if version is None:
        raise ValueError(f"no published version of dataset {config.dataset!r} to train on (set train.version)")
    return version


# --- entry points --------------------------------------------------------------------


def run(ctx: RunContext) -> dict[str, Any]:
    """The `train` stage: fit `train.model` on `train.version` (default: latest) with Ray Train."""
    version = resolve_version(ctx.config, ctx.storage)
    return train_on_ray(ctx.config, version)
