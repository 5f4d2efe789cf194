"""How training runs: on Ray Train (`TorchTrainer`, one `train_loop` per worker) or in this
process (one worker, no Ray). The train stage and SID's fine-tuning call these."""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch

from factory.dataset.checkpoints import model_folder
from factory.framework.config import FactoryConfig, PromptNetConfig, StorageConfig, TrainConfig
from factory.framework.stage import RunContext
from factory.framework.storage import Storage, open_storage
from models.training.job import TrainJob, make_job
from models.training.loop import Worker, finished_run, summary, train_loop

if TYPE_CHECKING:
    from ray.train import ScalingConfig


def train_on_ray(
    config: FactoryConfig,
    version: str,
    model: str | None = None,
    run_id: str | None = None,
    ray_storage_path: str | None = None,
) -> dict[str, Any]:
    """Fit on the current Ray cluster with `train.num_workers` workers; returns the summary."""
    job = make_job(config, version, model, run_id)
    settings = job.settings
    fit_on_ray(_ray_worker_loop, {"job": asdict(job)}, f"train-{job.model}-{job.run_id}", scaling(settings),
               settings.max_failures, ray_storage_path)
    return summary(open_storage(config.storage), job)


def fit_on_ray(loop, loop_config: dict[str, Any], name: str, scaling_config: ScalingConfig, max_failures: int,
               ray_storage_path: str | None = None):
    """Run `loop(loop_config)` on Ray Train workers (`TorchTrainer`); returns Ray's result."""
    from ray.train import FailureConfig, RunConfig  # ray: only on Ray Train (in-process training runs without it)
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=scaling_config,
        run_config=RunConfig(name=name, storage_path=ray_storage_path,
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    return trainer.fit()


def scaling(settings: TrainConfig | PromptNetConfig) -> ScalingConfig:
    """Ray Train's workers: one GPU each with use_gpu, plus the custom resources that pin them to a node type
    and the memory each one uses."""
    from ray.train import ScalingConfig  # ray: only on Ray Train

    extra = dict(settings.resources_per_worker)
    if settings.memory_per_worker:
        extra["memory"] = settings.memory_per_worker
    if not extra:
        return ScalingConfig(num_workers=settings.num_workers, use_gpu=settings.use_gpu)
    per_worker = {"CPU": 1.0, **({"GPU": 1.0} if settings.use_gpu else {}), **extra}
    return ScalingConfig(num_workers=settings.num_workers, use_gpu=settings.use_gpu, resources_per_worker=per_worker)


def train_generator(
    config: FactoryConfig, storage: Storage, version: str, run_id: str | None = None, device: str | None = None
) -> dict[str, Any]:
    """Train G in this process (one worker, no Ray); SID calls this on its union version."""
    return train_in_process(make_job(config, version, "generator", run_id), storage, device)


def train_assistant(
    config: FactoryConfig, storage: Storage, version: str, run_id: str | None = None, device: str | None = None
) -> dict[str, Any]:
    """Train the assistant heads in this process (one worker, no Ray)."""
    return train_in_process(make_job(config, version, "assistant", run_id), storage, device)


RUN_LETTERS = {"generator": "g", "assistant": "a"}


def model_run_id(ctx: RunContext, model: str, version: str) -> str:
    """The run id of `model`'s training on `version`: `<run-id>-g-<version>` or `<run-id>-a-<version>`."""
    return f"{ctx.config.run_id}-{RUN_LETTERS[model]}-{version}"


def train_generator_on(ctx: RunContext, version: str, init_from: str | None = None, run_id: str | None = None) -> str:
    """Train (or, from `init_from`, fine-tune) G on `version` (run `<run-id>-g-<version>`)."""
    return train_model_on(ctx, "generator", version, init_from, run_id or model_run_id(ctx, "generator", version))


def train_assistant_on(ctx: RunContext, version: str, init_from: str | None = None, run_id: str | None = None) -> str:
    """Train (or, from `init_from`, fine-tune) the assistant heads on `version` (run `<run-id>-a-<version>`)."""
    return train_model_on(ctx, "assistant", version, init_from, run_id or model_run_id(ctx, "assistant", version))


def train_model_on(ctx: RunContext, model: str, version: str, init_from: str | None, run_id: str) -> str:
    """Train `model` on `version` with the `train` settings, from `init_from` when given: on Ray
    Train when Ray is up, in this process otherwise. Returns the new model folder (a local path or
    an s3:// URL); a run that had finished returns at once (training resumes from its last step)."""
    config = ctx.config.model_copy(deep=True)
    if init_from:
        config.train.init_from = init_from
    on_ray = ray_is_up()
    job = make_job(config, version, model, run_id)
    if finished_run(ctx.storage, job, config.train.num_workers if on_ray else 1):
        result = summary(ctx.storage, job)  # what the loop would return, without starting Ray Train
    elif on_ray:
        result = train_on_ray(config, version, model, run_id)
    else:
        result = train_in_process(job, ctx.storage)
    return model_folder(ctx.storage, result["checkpoint"])


def train_in_process(job: TrainJob, storage: Storage, device: str | None = None) -> dict[str, Any]:
    chosen = device or ("cuda" if job.settings.use_gpu and torch.cuda.is_available() else "cpu")
    train_loop(job, storage, Worker(rank=0, world=1, device=torch.device(chosen)))
    return summary(storage, job)


def ray_is_up() -> bool:
    """Whether this process has joined a Ray cluster (False where Ray is not even installed)."""
    ray = sys.modules.get("ray")  # never imported here: a process without Ray trains in process
    return ray is not None and ray.is_initialized()


def ray_worker():
    """This Ray Train worker's rank, world size and device."""
    import ray.train  # ray: only on a Ray Train worker
    import ray.train.torch

    context = ray.train.get_context()
    return Worker(rank=context.get_world_rank(), world=context.get_world_size(),
                  device=ray.train.torch.get_device(), distributed=True)


def _ray_worker_loop(loop_config: dict[str, Any]) -> None:
    job = TrainJob(**loop_config["job"])
    train_loop(job, open_storage(StorageConfig.model_validate(job.storage)), ray_worker())
