"""PromptNet pre-training (ProFusion's encoder) on a reference set: the job, and the loop every worker runs.

`--stage promptnet` builds a `PromptNetJob` from the config and fits it on Ray Train
(`train_promptnet_on_ray`, through `runner.fit_on_ray`); `train_promptnet_in_process` runs the
same loop as one worker without Ray. Each worker reads its share of the reference set (whole
parts dealt round-robin by rank, or references dealt when there are fewer parts than workers),
draws batches of `ceil(batch_size / workers)` references with a seed per (step, rank), and DDP
averages the gradients. Every `checkpoint_every` steps rank 0 saves the progress (weights,
optimizer state, `progress.json` last) under `runs/<run-id>/promptnet/`; a restarted training
(Ray Train's `max_failures`, or the job submitted again) resumes from the latest save as if never
stopped. At the end rank 0 saves the PromptNet (config, weights, and the CLIP image encoder it
reads in `image_encoder/`) to the output, a local folder or an `s3://` prefix written through
`factory.framework.storage`, with `training.json` last: a PromptNet folder is complete iff that exists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from factory.dataset.reference_sets import list_parts, load_references, read_part, set_summary
from factory.framework import layout
from factory.framework.config import FactoryConfig, PromptNetConfig, StorageConfig
from factory.framework.images import decode_image
from factory.framework.models_cache import model_ref
from factory.framework.storage import Storage, open_storage
from models.profusion import PromptNetTraining
from models.training.loop import Worker, step_seed
from models.training.optimizer_state import (
    get_optimizer_state,
    read_optimizer_state,
    set_optimizer_state,
    write_optimizer_state,
)
from models.training.runner import fit_on_ray, ray_worker, scaling

log = logging.getLogger(__name__)


@dataclass
class PromptNetJob:
    """Everything a worker needs, as plain data (it travels to Ray workers)."""

    run_id: str
    model: str  # the Stable Diffusion folder PromptNet is trained for
    init_from: str | None
    image_encoder: str | None
    image_size: int
    reference_set: str
    output: str  # a local folder or an s3:// prefix
    settings: dict[str, Any]
    storage: dict[str, Any]
    reference_summary: dict[str, Any] | None = None  # the set's completion record: what it held when the job began

    @property
    def config(self) -> PromptNetConfig:
        return PromptNetConfig.model_validate(self.settings)

    @property
    def storage_config(self) -> StorageConfig:
        return StorageConfig.model_validate(self.storage)

    def reference_count(self) -> int | None:
        return (self.reference_summary or {}).get("references")

    def fingerprint(self) -> str:
        """What the progress saves depend on: a resumed training must be the same training."""
        not_defining = ("steps", "log_every", "checkpoint_every", "resume", "num_workers", "use_gpu", "max_failures",
                        "resources_per_worker", "memory_per_worker", "output", "require_trained",
                        "generator", "init_from", "image_encoder", "image_size", "reference_set")  # in `made_of`
        settings = {key: value for key, value in self.settings.items() if key not in not_defining}
        made_of = {"model": model_ref(self.model), "init_from": model_ref(self.init_from),
                   "image_encoder": model_ref(self.image_encoder), "image_size": self.image_size,
                   "reference_set": self.reference_set, "references": self.reference_count(), "settings": settings}
        return hashlib.sha256(json.dumps(made_of, sort_keys=True).encode()).hexdigest()


def make_promptnet_job(config: FactoryConfig, storage: Storage) -> PromptNetJob:
    settings = config.promptnet
    spec = config.generate.generators.get(settings.generator)
    if spec is None or spec.kind != "profusion":
        raise ValueError(f"promptnet.generator {settings.generator!r} is not a profusion generator "
                         f"under generate.generators (have: {sorted(config.generate.generators)})")
    return PromptNetJob(
        run_id=config.run_id,
        model=spec.model,
        init_from=settings.init_from,
        image_encoder=settings.image_encoder or spec.options.get("image_encoder"),
        image_size=settings.image_size or spec.image_size,
        reference_set=settings.reference_set or config.references.set,
        output=settings.output or storage.url(layout.promptnet_checkpoint(config.run_id)),
        settings=settings.model_dump(mode="json"),
        storage=config.storage.model_dump(mode="json"),
        reference_summary=set_summary(storage, settings.reference_set or config.references.set),
    )


def output_storage(job: PromptNetJob) -> Storage:
    """The output folder as a storage root (local or S3, with the run's S3 settings)."""
    return open_storage(StorageConfig.model_validate({**job.storage, "root": job.output}))


def refuse_trained_output(job: PromptNetJob) -> None:
    """A finished PromptNet is never overwritten: a config may be drawing with it."""
    if output_storage(job).exists(layout.PROMPTNET_TRAINING):
        raise ValueError(f"{job.output} already holds a trained PromptNet ({layout.PROMPTNET_TRAINING}): "
                         "set promptnet.output or another run_id")


def worker_images(storage: Storage, set_name: str, rank: int, world: int) -> list:
    """This rank's references, decoded: whole parts round-robin, or references round-robin when
    there are fewer parts than workers."""
    parts = list_parts(storage, set_name)
    if len(parts) >= world:
        blobs = [blob for index in range(rank, len(parts), world)
                 for blob in read_part(storage, set_name, index, ["image"])["image"]]
    else:
        blobs = list(load_references(storage, set_name, ["image"])["image"])[rank::world]
    if not blobs:
        raise ValueError(f"reference set {set_name!r} has no references for worker {rank} of {world} "
                         "(build it with --stage references, or use fewer promptnet.num_workers)")
    return [decode_image(blob) for blob in blobs]


def promptnet_loop(job: PromptNetJob, worker: Worker) -> dict[str, Any] | None:
    """Train (from the latest progress save, when there is one), then (rank 0) save and upload;
    returns the training record on rank 0."""
    settings = job.config
    storage = open_storage(job.storage_config)
    images = worker_images(storage, job.reference_set, worker.rank, worker.world)
    torch.manual_seed(settings.seed)
    training = PromptNetTraining(job.model, checkpoint=job.init_from, image_encoder=job.image_encoder,
                                 device=str(worker.device), image_size=job.image_size, prompt=settings.prompt,
                                 storage=job.storage_config)
    progress = latest_progress(storage, job) if settings.resume else None
    if progress is not None:
        load_progress_weights(storage, progress["folder"], training.promptnet)
    model = worker.wrap(training.promptnet)
    step = training.optimizer_step(model.parameters(), settings.lr, settings.weight_decay, settings.max_grad_norm)
    if progress is not None:
        set_optimizer_state(model, step.optimizer, read_optimizer_state(storage, progress["folder"]))
        log.info("promptnet %s: resuming after step %d", job.run_id, progress["step"])
    recent = list(progress["recent"]) if progress else []
    per_worker = math.ceil(settings.batch_size / worker.world)
    for number in range((progress["step"] if progress else 0) + 1, settings.steps + 1):
        rng = torch.Generator().manual_seed(step_seed(settings.seed, number, worker.rank))
        picks = torch.randint(len(images), (per_worker,), generator=rng).tolist()
        loss = training.loss(model, [images[i] for i in picks], settings.min_crop, rng)
        step(loss)
        recent = [*recent[-99:], float(loss.item())]
        if number % settings.log_every == 0 or number == settings.steps:
            log.info("promptnet step %d/%d loss %.4f", number, settings.steps, sum(recent) / len(recent))
            worker.report({"step": number, "loss": sum(recent) / len(recent)})
        if number % settings.checkpoint_every == 0 and number < settings.steps:
            save_progress(storage, job, worker, model, step.optimizer, training.promptnet, number, recent)
    worker.barrier()
    if worker.rank != 0:
        return None
    return publish_promptnet(job, training, training_record(job, storage, worker.world, recent))


# --- progress saves --------------------------------------------------------------------


def latest_progress(storage: Storage, job: PromptNetJob) -> dict[str, Any] | None:
    """The newest complete progress save of the run (step, folder, recent losses), or None;
    refused when it was made by another training."""
    pointer = layout.promptnet_progress_latest(job.run_id)
    if not storage.exists(pointer):
        return None
    folder = json.loads(storage.read_bytes(pointer))["path"]
    progress = json.loads(storage.read_bytes(f"{folder}/progress.json"))
    if progress["fingerprint"] != job.fingerprint():
        raise ValueError(f"run {job.run_id!r} has PromptNet progress made with other settings ({folder}): "
                         "use another run_id (or set promptnet.resume: false)")
    return {**progress, "folder": folder}


def save_progress(storage: Storage, job: PromptNetJob, worker: Worker, model, optimizer, promptnet,
                  number: int, recent: list[float]) -> None:
    """Rank 0 writes weights, optimizer state and progress.json (last), then points latest.json at them."""
    state = get_optimizer_state(model, optimizer)  # a collective under FSDP; plain under DDP
    if worker.rank == 0:
        folder = layout.promptnet_progress_step(job.run_id, number)
        with tempfile.TemporaryDirectory(prefix="promptnet-progress-") as scratch:
            local = Path(scratch)
            save_file({k: v.detach().cpu().contiguous() for k, v in promptnet.state_dict().items()},
                      str(local / "promptnet.safetensors"))
            write_optimizer_state(state, local)
            for path in sorted(local.iterdir()):
                storage.upload_file(path, f"{folder}/{path.name}")
        record = {"step": number, "recent": recent, "fingerprint": job.fingerprint()}
        storage.write_bytes(f"{folder}/progress.json", json.dumps(record).encode())
        storage.write_bytes(layout.promptnet_progress_latest(job.run_id), json.dumps({"path": folder}).encode())
        log.info("promptnet %s: progress saved at step %d", job.run_id, number)
    worker.barrier()


def load_progress_weights(storage: Storage, folder: str, promptnet) -> None:
    promptnet.load_state_dict(load_safetensors(storage.read_bytes(f"{folder}/promptnet.safetensors")), strict=True)


def training_record(job: PromptNetJob, storage: Storage, world: int, recent: list[float]) -> dict[str, Any]:
    settings = job.config
    references = job.reference_count()
    if references is None:  # a set completed before the completion record said how many it held
        references = len(load_references(storage, job.reference_set, ["reference_id"]))
    return {
        "kind": "promptnet", "run_id": job.run_id, "model": model_ref(job.model),
        "init_from": model_ref(job.init_from), "image_encoder": model_ref(job.image_encoder),
        "reference_set": job.reference_set, "references": references, "image_size": job.image_size,
        "steps": settings.steps, "batch_size": settings.batch_size, "lr": settings.lr, "workers": world,
        "loss": round(sum(recent) / len(recent), 6) if recent else None,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def publish_promptnet(job: PromptNetJob, training, record: dict[str, Any]) -> dict[str, Any]:
    """Save the PromptNet and upload it to the output, `training.json` last."""
    target = output_storage(job)
    with tempfile.TemporaryDirectory(prefix="promptnet-") as scratch:
        folder = Path(training.save(Path(scratch) / "promptnet"))
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            target.upload_file(path, path.relative_to(folder).as_posix())
    target.write_bytes(layout.PROMPTNET_TRAINING, json.dumps(record, indent=2, sort_keys=True).encode())
    log.info("PromptNet written to %s", job.output)
    return record


def read_training_record(job: PromptNetJob) -> dict[str, Any]:
    return json.loads(output_storage(job).read_bytes(layout.PROMPTNET_TRAINING))


def train_promptnet_in_process(job: PromptNetJob, device: str | None = None) -> dict[str, Any]:
    """The same loop as one worker, without Ray."""
    chosen = device or ("cuda" if job.config.use_gpu and torch.cuda.is_available() else "cpu")
    promptnet_loop(job, Worker(rank=0, world=1, device=torch.device(chosen)))
    return read_training_record(job)


def train_promptnet_on_ray(job: PromptNetJob) -> dict[str, Any]:
    """Fit on the current Ray cluster with `promptnet.num_workers` workers; returns the training record."""
    settings = job.config
    fit_on_ray(_ray_promptnet_loop, {"job": asdict(job)}, f"promptnet-{job.run_id}", scaling(settings),
               settings.max_failures)
    return read_training_record(job)


def _ray_promptnet_loop(loop_config: dict[str, Any]) -> None:
    promptnet_loop(PromptNetJob(**loop_config["job"]), ray_worker())
