"""train: G or the assistant heads on a published version, on Ray Train (`TorchTrainer`).

`run` is the stage. How training runs is `models.training.runner` (`train_on_ray`, the in-process
`train_generator` / `train_assistant`, and `train_generator_on` / `train_assistant_on`, which SID
and eval call too); the per-worker loop, its data and the two tasks are the rest of
`models.training`; checkpoints are read back through `factory.dataset.checkpoints`.
"""

from __future__ import annotations

from typing import Any

from factory.dataset.manifest import KINDS, latest_version
from factory.framework.config import FactoryConfig
from factory.framework.stage import RunContext
from factory.framework.storage import Storage
from models.training.runner import train_on_ray

# every kind but a SID round's, which holds only that round's new samples (its union holds the dataset)
TRAINABLE_KINDS = tuple(kind for kind in KINDS if kind != "sid")


def resolve_version(config: FactoryConfig, storage: Storage) -> str:
    if config.train.version:
        return config.train.version
    version = latest_version(storage, config.dataset, kinds=TRAINABLE_KINDS)
    if version is None:
        raise ValueError(f"no published version of dataset {config.dataset!r} to train on (set train.version)")
    print(f"[train] train.version unset: training on {version}, the newest {'/'.join(TRAINABLE_KINDS)} version "
          f"of {config.dataset}", flush=True)
    return version


# --- entry points --------------------------------------------------------------------


def run(ctx: RunContext) -> dict[str, Any]:
    """The `train` stage: fit `train.model` on `train.version` (default: the newest trainable) with Ray Train."""
    version = resolve_version(ctx.config, ctx.storage)
    return train_on_ray(ctx.config, version)
