"""The training job: everything a worker needs, as plain data (it travels to Ray workers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from factory.framework import layout
from factory.framework.config import FactoryConfig, TrainConfig

MODELS = ("generator", "assistant")


@dataclass
class TrainJob:
    """Everything a worker needs, as plain data."""

    model: str
    dataset: str
    version: str
    run_id: str
    train: dict[str, Any]
    storage: dict[str, Any]

    @property
    def settings(self) -> TrainConfig:
        return TrainConfig.model_validate(self.train)

    @property
    def recorded_train(self) -> dict[str, Any]:
        """The `train` settings as a checkpoint's meta.json records them: a local path under the working
        folder relative to it (`layout.portable_ref`), so the same job from another folder reads the same."""
        return {key: layout.portable_ref(value) if isinstance(value, str) else value
                for key, value in self.train.items()}

    @property
    def prefix(self) -> str:
        return layout.checkpoint_run(self.model, self.run_id)


def make_job(config: FactoryConfig, version: str, model: str | None = None, run_id: str | None = None) -> TrainJob:
    model = model or config.train.model
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    return TrainJob(
        model=model,
        dataset=config.dataset,
        version=version,
        run_id=run_id or config.run_id,
        train=config.train.model_dump(mode="json"),
        storage=config.storage.model_dump(mode="json"),
    )
