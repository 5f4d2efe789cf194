"""The loop every worker runs (also the in-process path, with world size 1), and its checkpoints."""

from __future__ import annotations

import functools
import json
import logging
import math
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from factory.dataset.checkpoints import checkpoint_meta, fetch_checkpoint, finished_training, latest_checkpoint
from factory.dataset.manifest import load_manifest, version_keys
from factory.framework import layout
from factory.framework.config import TrainConfig
from factory.framework.storage import Storage
from filters.precision import native_bfloat16
from models.base import autocast_to, half_dtype
from models.training.data import Batch, EpochPlan
from models.training.job import TrainJob
from models.training.optimizer_state import (
    get_optimizer_state,
    read_optimizer_state,
    set_optimizer_state,
    write_optimizer_state,
)
from models.training.tasks import build_task

log = logging.getLogger(__name__)


@dataclass
class Worker:
    rank: int
    world: int
    device: Any
    distributed: bool = False

    def wrap(self, model):
        """DDP through Ray Train on a distributed run (the assistant's frozen LLM is replicated, and
        only its heads' gradients are synchronised); the model itself otherwise."""
        if not self.distributed:
            return model.to(self.device)
        import ray.train.torch  # ray: only on a distributed run (the in-process path runs without it)

        return ray.train.torch.prepare_model(model, parallel_strategy="ddp")

    def report(self, metrics: dict[str, Any]) -> None:
        if self.distributed:
            import ray.train  # ray: only on a distributed run

            ray.train.report(metrics)

    def barrier(self) -> None:
        if self.distributed:
            if dist.is_initialized():
                dist.barrier()


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken in all
    epoch: int = 0  # the epoch in progress
    batch_in_epoch: int = 0  # batches of that epoch already trained on
    epoch_steps: int = 0  # batches in that epoch
    losses: list[float] = field(default_factory=list)


def train_loop(job: TrainJob, storage: Storage, worker: Worker) -> TrainState:
    """The loop every worker runs (also the in-process path, with world size 1)."""
    settings = job.settings
    manifest = load_manifest(storage, job.dataset, job.version)
    if manifest["samples"] < worker.world:
        raise ValueError(f"version {job.version} has {manifest['samples']} samples, fewer than {worker.world} workers")
    folder = latest_checkpoint(storage, job.model, job.run_id) if settings.resume else None
    meta = checkpoint_meta(storage, folder, job.version, job.run_id) if folder else None
    torch.manual_seed(settings.seed)
    task = build_task(job, worker.device)
    state = TrainState()
    if meta is not None:
        refuse_other_epoch_plan(meta, job, task)
        optimizer_state = load_checkpoint(storage, folder, task)
        state = resumed_state(meta, worker.world)
        log.info("resuming %s/%s at step %d (epoch %d)", job.model, job.run_id, state.step, state.epoch)
    model = worker.wrap(task.model)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=task.lr, weight_decay=settings.weight_decay
    )
    if meta is not None:
        set_optimizer_state(model, optimizer, optimizer_state)
        for group in optimizer.param_groups:  # the saved groups bring the old run's; these are the ones recorded
            group["lr"], group["weight_decay"] = task.lr, settings.weight_decay
    per_worker = math.ceil(task.batch_size / worker.world)
    keep = version_keys(storage, manifest)  # a reviewed version's shards hold the samples people dropped too
    for epoch in range(state.epoch, settings.epochs):
        if reached_max_steps(settings, state):
            break
        plan = EpochPlan.build(manifest, worker.world, epoch, settings.seed, keep)
        if state.epoch != epoch:
            state.epoch, state.batch_in_epoch = epoch, 0
        if state.batch_in_epoch >= plan.steps(per_worker):
            continue  # the checkpoint was taken at this epoch's last step
        run_epoch(job, storage, task, model, optimizer, worker, plan, per_worker, state)
    return state


def refuse_other_epoch_plan(meta: dict[str, Any], job: TrainJob, task) -> None:
    """A run resumed inside an epoch goes on from its saved batch index: with another batch size or
    seed, the rest of the epoch would repeat some samples and skip others. (At an epoch's end the
    next epoch is planned afresh.)"""
    if at_epoch_end(meta) or meta["batch_in_epoch"] == 0:
        return
    saved = meta.get("train") or {}
    now = {f"{job.model}_batch_size": task.batch_size, "seed": job.settings.seed}
    changed = [f"{key} {saved[key]} -> {value}" for key, value in now.items() if key in saved and saved[key] != value]
    if changed:
        raise ValueError(f"run {job.run_id!r} was trained with other settings ({', '.join(changed)}): resumed, its "
                         "epoch would repeat some samples and skip others; use another run id "
                         "(or set train.resume: false)")


def at_epoch_end(meta: dict[str, Any]) -> bool:
    """Whether a checkpoint was taken at its epoch's last batch."""
    return meta.get("epochs_completed", 0) > meta["epoch"]


def resumed_state(meta: dict[str, Any], world: int) -> TrainState:
    """Where a checkpoint left off. The data split depends on the number of workers, so on
    another number the interrupted epoch is cut short rather than partly repeated."""
    state = TrainState(step=meta["step"], epoch=meta["epoch"], batch_in_epoch=meta["batch_in_epoch"])
    if at_epoch_end(meta):  # the next epoch is planned afresh
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    elif meta["world_size"] != world and state.batch_in_epoch > 0:
        log.warning(
            "checkpoint was taken with %d workers, now %d: epoch %d ends here, training goes on with epoch %d",
            meta["world_size"], world, state.epoch, state.epoch + 1,
        )
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    return state


def finished_run(storage: Storage, job: TrainJob, world: int) -> bool:
    """Whether `train_loop` would train no step more: the run's last checkpoint was taken with the
    same settings and number of workers (so on the same epoch plan: a version never changes) after
    its last epoch or at `max_steps`. A resubmitted SID night then skips starting Ray Train and
    loading the model only to find that (half a minute on 2 CPU cores, per fine-tune)."""
    settings = job.settings
    folder = latest_checkpoint(storage, job.model, job.run_id) if settings.resume else None
    if folder is None:
        return False
    meta = json.loads(storage.read_bytes(layout.checkpoint_meta(folder)))
    if (meta.get("version"), meta.get("train"), meta.get("world_size")) != (job.version, job.recorded_train, world):
        return False  # the loop decides (and refuses a run trained on another version)
    return finished_training(meta)


def reached_max_steps(settings: TrainConfig, state: TrainState) -> bool:
    return settings.max_steps is not None and state.step >= settings.max_steps


def run_epoch(
    job, storage, task, model, optimizer, worker, plan: EpochPlan, per_worker: int, state: TrainState
) -> None:
    """Train one epoch from `state.batch_in_epoch`, or until `max_steps`."""
    settings = job.settings
    steps = state.epoch_steps = plan.steps(per_worker)
    seen: list[str] = []
    trained = 0
    first = state.batch_in_epoch
    for index, batch in enumerate(plan.batches(storage, worker.rank, per_worker, steps, start=first), start=first):
        if reached_max_steps(settings, state):
            break
        batch_loss = train_step(task, model, optimizer, batch, plan.global_count(index, per_worker), worker,
                                step_seed(settings.seed, state.step, worker.rank))
        state.step += 1
        state.batch_in_epoch = index + 1
        state.losses = [*state.losses[-99:], batch_loss]
        seen.extend(batch.keys)
        trained += 1
        if state.step % settings.checkpoint_every == 0:
            save_checkpoint(storage, job, task, model, optimizer, state, worker)
    finished = state.batch_in_epoch >= steps
    last = reached_max_steps(settings, state) or (finished and state.epoch + 1 >= settings.epochs)
    if trained and last and state.step % settings.checkpoint_every != 0:
        save_checkpoint(storage, job, task, model, optimizer, state, worker)
    if settings.log_sample_keys and seen:
        log_keys(storage, job, state.epoch, worker.rank, first, seen)
    if finished:
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0


def train_step(task, model, optimizer, batch: Batch, global_count: int, worker: Worker, seed: int) -> float:
    """One optimizer step; returns this worker's mean loss over its real samples.

    The loss is scaled by world / global_count, so DDP's average of the workers' gradients
    is the gradient of the mean loss over the real samples of the whole global batch.
    """
    model.train()
    weights = torch.tensor(batch.weights, dtype=torch.float32, device=worker.device)
    with autocast(worker.device):
        per_sample = task.loss(model, batch.samples, torch.Generator().manual_seed(seed)).float()
    loss = (per_sample * weights).sum() * (worker.world / global_count)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float((per_sample.detach() * weights).sum() / weights.sum().clamp(min=1))


def step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def autocast(device):
    """Training's autocast: bfloat16 on CUDA, and on the CPU when half precision is rehearsed."""
    device = torch.device(device)
    return autocast_to(device, training_dtype(device))


def training_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on every CUDA card (float16 would need loss scaling; an older card emulates bfloat16,
    slowly, which is logged once); on the CPU as `half_dtype`."""
    if device.type != "cuda":
        return half_dtype(device, torch.bfloat16)
    if not native_bfloat16():
        warn_emulated_bfloat16(torch.cuda.get_device_name(device))
    return torch.bfloat16


@functools.cache
def warn_emulated_bfloat16(card: str) -> None:
    log.warning("%s has no native bfloat16 (Ampere or newer has): training's bfloat16 autocast is emulated, "
                   "several times slower", card)


def log_keys(storage: Storage, job: TrainJob, epoch: int, rank: int, first_batch: int, keys: list[str]) -> None:
    record = {"epoch": epoch, "rank": rank, "first_batch": first_batch, "keys": keys}
    name = layout.checkpoint_data_log(job.model, job.run_id, epoch, rank, first_batch)
    storage.write_bytes(name, json.dumps(record).encode())


# --- checkpoints ---------------------------------------------------------------------


def save_checkpoint(storage: Storage, job: TrainJob, task, model, optimizer, state: TrainState, worker: Worker) -> None:
    """Write `step-<n>/` (model, optimizer, meta.json last) and then `latest.json` (rank 0)."""
    model_state = task.gather_state(model)  # every rank calls it: it may run collectives
    optimizer_state = get_optimizer_state(model, optimizer)
    loss = float(np.mean(state.losses[-10:])) if state.losses else None
    if worker.rank == 0:
        folder = layout.checkpoint_step(job.model, job.run_id, state.step)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp)
            task.save(model, model_state, local / "model")
            write_optimizer_state(optimizer_state, local)
            for path in sorted(p for p in local.rglob("*") if p.is_file()):
                storage.upload_file(path, layout.checkpoint_file(folder, path.relative_to(local).as_posix()))
        meta = {
            "model": job.model,
            "dataset": job.dataset,
            "version": job.version,
            "run_id": job.run_id,
            "step": state.step,
            "epoch": state.epoch,
            "batch_in_epoch": state.batch_in_epoch,
            "epochs_completed": state.epoch + int(state.batch_in_epoch >= state.epoch_steps),
            "world_size": worker.world,
            "loss": loss,
            "created": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "train": job.recorded_train,
        }
        storage.write_bytes(layout.checkpoint_meta(folder), json.dumps(meta, indent=2, sort_keys=True).encode())
        pointer = {"step": state.step, "path": folder, "version": job.version}
        storage.write_bytes(layout.checkpoint_latest(job.model, job.run_id), json.dumps(pointer, indent=2).encode())
        log.info("checkpoint %s (loss %.4f)", storage.url(folder), loss or float("nan"))
        drop_older_steps(storage, job, state.step)
    worker.barrier()
    checkpoint = layout.checkpoint_step(job.model, job.run_id, state.step)
    worker.report({"step": state.step, "epoch": state.epoch, "loss": loss, "checkpoint": checkpoint})


def drop_older_steps(storage: Storage, job: TrainJob, newest: int) -> None:
    """Delete the run's step folders older than its `keep_steps` newest complete ones (step `newest`,
    just written, is one). A step's `meta.json` goes first: a deletion cut short leaves a step that
    reads as incomplete, which nothing loads."""
    keep = job.settings.keep_steps
    if not keep:
        return
    older: dict[int, list[str]] = {}
    for key in storage.list(layout.checkpoint_run(job.model, job.run_id)):
        step = layout.checkpoint_step_number(key)
        if step is not None and step < newest:
            older.setdefault(step, []).append(key)
    metas = {step: layout.checkpoint_meta(layout.checkpoint_step(job.model, job.run_id, step)) for step in older}
    complete = sorted((step for step, keys in older.items() if metas[step] in keys), reverse=True)
    for step in sorted(set(older) - set(complete[: keep - 1])):
        for key in sorted(older[step], key=lambda key, meta=metas[step]: key != meta):
            storage.delete(key)


def load_checkpoint(storage: Storage, folder: str, task) -> dict[str, Any]:
    """Load a checkpoint's weights into `task.model`; returns its optimizer state."""
    with tempfile.TemporaryDirectory() as tmp:
        task.load(Path(fetch_checkpoint(storage, folder, tmp)))
    return read_optimizer_state(storage, folder)


def summary(storage: Storage, job: TrainJob) -> dict[str, Any]:
    folder = latest_checkpoint(storage, job.model, job.run_id)
    meta = json.loads(storage.read_bytes(layout.checkpoint_meta(folder))) if folder else {}
    return {
        "model": job.model,
        "dataset": job.dataset,
        "version": job.version,
        "run_id": job.run_id,
        "checkpoint": folder,
        "step": meta.get("step", 0),
        "epochs_completed": meta.get("epochs_completed", 0),
        "loss": meta.get("loss"),
    }
