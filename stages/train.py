"""train: G or the assistant heads on a published version, on Ray Train (`TorchTrainer`).

Each worker reads its share of the version's shards straight from storage: whole shards
dealt round-robin by rank (in a per-epoch shuffled order) when there are at least as many
shards as workers, otherwise samples dealt round-robin from one per-epoch permutation.
Every sample is trained on once per epoch. Workers with fewer samples in a step pad with a
zero-weight sample, and each worker scales its loss so that DDP's gradient average is the
mean over the real samples of the global batch; all workers take the same number of steps.

Features come from the images on the fly: E(x) (DINOv2), F(x~) (CLIP) and, for G, the VAE
latents of x~. Checkpoints go to `checkpoints/<model>/<run-id>/step-<n>/` in storage
(model folder, optimizer state as safetensors + JSON, `meta.json` written last), with
`latest.json` beside them; a run resumes from `latest.json` at the same step, with the
same weights, optimizer state and data order. Randomness (noise, timesteps, condition
dropout) is drawn per (seed, step, rank), so a resumed run continues as if never stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from factory.config import FactoryConfig, StorageConfig, TrainConfig
from factory.context import RunContext
from factory.manifest import latest_version, load_manifest, shard_key
from factory.shards import Sample, read_shard_bytes
from factory.storage import Storage, StorageError, open_storage

log = logging.getLogger(__name__)

MODELS = ("generator", "assistant")


# --- the job -------------------------------------------------------------------------


@dataclass
class TrainJob:
    """Everything a worker needs, as plain data (it travels to Ray workers)."""

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
    def prefix(self) -> str:
        return checkpoint_prefix(self.model, self.run_id)


def checkpoint_prefix(model: str, run_id: str) -> str:
    return f"checkpoints/{model}/{run_id}"


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


def train_on_ray(
    config: FactoryConfig,
    version: str,
    model: str | None = None,
    run_id: str | None = None,
    ray_storage_path: str | None = None,
) -> dict[str, Any]:
    """Fit on the current Ray cluster with `train.num_workers` workers; returns the summary."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    job = make_job(config, version, model, run_id)
    settings = job.settings
    trainer = TorchTrainer(
        _ray_worker_loop,
        train_loop_config={"job": asdict(job)},
        scaling_config=ScalingConfig(num_workers=settings.num_workers, use_gpu=settings.use_gpu),
        run_config=RunConfig(
            name=f"train-{job.model}-{job.run_id}",
            storage_path=ray_storage_path,
            failure_config=FailureConfig(max_failures=settings.max_failures),
        ),
    )
    trainer.fit()
    return summary(open_storage(config.storage), job)


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


def train_generator_on(ctx: RunContext, version: str, init_from: str | None = None, run_id: str | None = None) -> str:
    """Train (or, from `init_from`, fine-tune) G on `version`: on Ray Train when Ray is up,
    in this process otherwise. Returns the new G folder (a local path or an s3:// URL)."""
    import ray

    config = ctx.config.model_copy(deep=True)
    if init_from:
        config.train.init_from = init_from
    run_id = run_id or f"{ctx.config.run_id}-g-{version}"
    if ray.is_initialized():
        result = train_on_ray(config, version, "generator", run_id)
    else:
        result = train_generator(config, ctx.storage, version, run_id)
    return generator_folder(ctx.storage, result["checkpoint"])


def latest_generator_checkpoint(ctx: RunContext) -> str | None:
    """The newest G folder over all runs (a local path or an s3:// URL), or None."""
    key = newest_checkpoint(ctx.storage, "generator")
    return generator_folder(ctx.storage, key) if key else None


def generator_folder(storage: Storage, checkpoint: str) -> str:
    """Where a checkpoint's G folder opens (`CafeGenerator` / `models.cafe.local_folder`)."""
    return storage.url(f"{checkpoint}/model")


def train_in_process(job: TrainJob, storage: Storage, device: str | None = None) -> dict[str, Any]:
    import torch

    chosen = device or ("cuda" if job.settings.use_gpu and torch.cuda.is_available() else "cpu")
    train_loop(job, storage, Worker(rank=0, world=1, device=torch.device(chosen)))
    return summary(storage, job)


def _ray_worker_loop(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    job = TrainJob(**loop_config["job"])
    worker = Worker(
        rank=context.get_world_rank(),
        world=context.get_world_size(),
        device=ray.train.torch.get_device(),
        distributed=True,
    )
    train_loop(job, open_storage(StorageConfig.model_validate(job.storage)), worker)


# --- the worker ----------------------------------------------------------------------


@dataclass
class Worker:
    rank: int
    world: int
    device: Any
    distributed: bool = False

    def wrap(self, model, fsdp: bool = False):
        """DDP (or FSDP) through Ray Train on a distributed run; the model itself otherwise."""
        if not self.distributed:
            return model.to(self.device)
        import ray.train.torch

        if fsdp:
            return ray.train.torch.prepare_model(
                model, parallel_strategy="fsdp", parallel_strategy_kwargs={"use_orig_params": True}
            )
        return ray.train.torch.prepare_model(model, parallel_strategy="ddp")

    def report(self, metrics: dict[str, Any]) -> None:
        if self.distributed:
            import ray.train

            ray.train.report(metrics)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

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
    import torch

    settings = job.settings
    manifest = load_manifest(storage, job.dataset, job.version)
    if manifest["samples"] < worker.world:
        raise ValueError(f"version {job.version} has {manifest['samples']} samples, fewer than {worker.world} workers")
    folder = latest_checkpoint(storage, job.model, job.run_id) if settings.resume else None
    meta = checkpoint_meta(storage, job, folder) if folder else None
    torch.manual_seed(settings.seed)
    task = build_task(job, worker.device)
    state = TrainState()
    if meta is not None:
        optimizer_state = load_checkpoint(storage, folder, task)
        state = resumed_state(meta, worker.world)
        log.info("resuming %s/%s at step %d (epoch %d)", job.model, job.run_id, state.step, state.epoch)
    model = worker.wrap(task.model, fsdp=settings.fsdp and job.model == "assistant")
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=task.lr, weight_decay=settings.weight_decay
    )
    if meta is not None:
        set_optimizer_state(model, optimizer, optimizer_state)
    per_worker = math.ceil(task.batch_size / worker.world)
    for epoch in range(state.epoch, settings.epochs):
        if reached_max_steps(settings, state):
            break
        plan = EpochPlan.build(manifest, worker.world, epoch, settings.seed)
        if state.epoch != epoch:
            state.epoch, state.batch_in_epoch = epoch, 0
        if state.batch_in_epoch >= plan.steps(per_worker):
            continue  # the checkpoint was taken at this epoch's last step
        run_epoch(job, storage, task, model, optimizer, worker, plan, per_worker, state)
    return state


def resumed_state(meta: dict[str, Any], world: int) -> TrainState:
    """Where a checkpoint left off. The data split depends on the number of workers, so on
    another number the interrupted epoch is cut short rather than partly repeated."""
    state = TrainState(step=meta["step"], epoch=meta["epoch"], batch_in_epoch=meta["batch_in_epoch"])
    if meta["world_size"] != world and state.batch_in_epoch > 0:
        log.warning(
            "checkpoint was taken with %d workers, now %d: epoch %d ends here, training goes on with epoch %d",
            meta["world_size"], world, state.epoch, state.epoch + 1,
        )
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    return state


def reached_max_steps(settings: TrainConfig, state: TrainState) -> bool:
    return settings.max_steps is not None and state.step >= settings.max_steps


def run_epoch(job, storage, task, model, optimizer, worker, plan: "EpochPlan", per_worker: int, state: TrainState) -> None:
    """Train one epoch from `state.batch_in_epoch`, or until `max_steps`."""
    settings = job.settings
    steps = state.epoch_steps = plan.steps(per_worker)
    seen: list[str] = []
    trained = 0
    first = state.batch_in_epoch
    for index, batch in enumerate(plan.batches(storage, worker.rank, per_worker, steps)):
        if index < first:
            continue
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


def train_step(task, model, optimizer, batch: "Batch", global_count: int, worker: Worker, seed: int) -> float:
    """One optimizer step; returns this worker's mean loss over its real samples.

    The loss is scaled by world / global_count, so DDP's average of the workers' gradients
    is the gradient of the mean loss over the real samples of the whole global batch.
    """
    import torch

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
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def log_keys(storage: Storage, job: TrainJob, epoch: int, rank: int, first_batch: int, keys: list[str]) -> None:
    record = {"epoch": epoch, "rank": rank, "first_batch": first_batch, "keys": keys}
    name = f"{job.prefix}/data/epoch-{epoch:04d}-rank-{rank:04d}-from-{first_batch:06d}.json"
    storage.write_bytes(name, json.dumps(record).encode())


# --- the data ------------------------------------------------------------------------


@dataclass
class Batch:
    samples: list[Sample]
    weights: list[float]  # 1 for a real sample, 0 for padding

    @property
    def keys(self) -> list[str]:
        return [s.key for s, w in zip(self.samples, self.weights) if w > 0]


@dataclass
class EpochPlan:
    """Which samples each rank reads in one epoch, in which order."""

    shard_keys: list[str]  # storage keys, in the manifest's order
    shard_sizes: list[int]
    world: int
    seed: int
    epoch: int
    shard_mode: bool
    counts: list[int]  # samples per rank
    rank_shards: list[list[int]]  # shard mode: shard indices per rank, in read order

    @classmethod
    def build(cls, manifest: dict[str, Any], world: int, epoch: int, seed: int) -> "EpochPlan":
        keys = [shard_key(manifest, shard["path"]) for shard in manifest["shards"]]
        sizes = [int(shard["samples"]) for shard in manifest["shards"]]
        total = sum(sizes)
        shard_mode = len(keys) >= world
        order = np.random.default_rng([seed, epoch]).permutation(len(keys)).tolist()
        rank_shards = [order[rank::world] for rank in range(world)] if shard_mode else []
        if shard_mode:
            counts = [sum(sizes[i] for i in shards) for shards in rank_shards]
        else:
            counts = [len(range(rank, total, world)) for rank in range(world)]
        return cls(keys, sizes, world, seed, epoch, shard_mode, counts, rank_shards)

    def steps(self, per_worker: int) -> int:
        return math.ceil(max(self.counts) / per_worker)

    def global_count(self, index: int, per_worker: int) -> int:
        """Real samples over all ranks in batch `index`."""
        return sum(min(per_worker, max(0, count - index * per_worker)) for count in self.counts)

    def samples(self, storage: Storage, rank: int) -> Iterator[Sample]:
        if self.shard_mode:
            yield from self._shard_samples(storage, rank)
        else:
            yield from self._dealt_samples(storage, rank)

    def _shard_samples(self, storage: Storage, rank: int) -> Iterator[Sample]:
        shards = self.rank_shards[rank]
        for shard_index, data in zip(shards, prefetched(storage, [self.shard_keys[i] for i in shards])):
            samples = list(read_shard_bytes(data))
            order = np.random.default_rng([self.seed, self.epoch, shard_index]).permutation(len(samples))
            yield from (samples[i] for i in order)

    def _dealt_samples(self, storage: Storage, rank: int) -> Iterator[Sample]:
        total = sum(self.shard_sizes)
        permutation = np.random.default_rng([self.seed, self.epoch]).permutation(total)
        mine = {int(global_index): slot for slot, global_index in enumerate(permutation[rank :: self.world])}
        kept: dict[int, Sample] = {}
        position = 0
        for data in prefetched(storage, self.shard_keys):
            for sample in read_shard_bytes(data):
                if position in mine:
                    kept[mine[position]] = sample
                position += 1
        yield from (kept[slot] for slot in sorted(kept))

    def batches(self, storage: Storage, rank: int, per_worker: int, steps: int) -> Iterator[Batch]:
        """Exactly `steps` batches; once this rank's share runs out, one zero-weight sample each."""
        stream = self.samples(storage, rank)
        last: Sample | None = None
        for _ in range(steps):
            samples = [s for _, s in zip(range(per_worker), stream)]
            if samples:
                last = samples[-1]
                yield Batch(samples, [1.0] * len(samples))
            else:
                yield Batch([last], [0.0])


def prefetched(storage: Storage, keys: list[str]) -> Iterator[bytes]:
    """Shard bytes in order, reading the next shard while the current one is used."""
    if not keys:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(storage.read_bytes, keys[0])
        for following in [*keys[1:], None]:
            data = pending.result()
            if following is not None:
                pending = pool.submit(storage.read_bytes, following)
            yield data


def decode_images(blobs: list[bytes]):
    from factory.images import decode_image

    return [decode_image(blob) for blob in blobs]


# --- the two models ------------------------------------------------------------------


class GeneratorTask:
    """G with frozen E, F and VAE; loss is equation 3 per sample."""

    def __init__(self, job: TrainJob, device):
        import torch
        from diffusers import AutoencoderKL, DDPMScheduler

        from models.cafe import CafeUNet, ImageEncoders, local_folder

        s = job.settings
        self.settings = s
        self.lr, self.batch_size = s.generator_lr, s.generator_batch_size
        if s.init_from:
            self.model = CafeUNet.from_pretrained(local_folder(s.init_from, job.storage.get("endpoint_url")))
            self.model.register_to_config(base_model=s.base_model, clip_model=s.clip_model, dino_model=s.dino_model)
        else:
            self.model = CafeUNet.from_base(s.base_model, s.clip_model, s.dino_model)
        self.model.set_trainable(s.generator_trainable)
        frozen_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.encoders = ImageEncoders(s.clip_model, s.dino_model, device, frozen_dtype)
        self.vae = AutoencoderKL.from_pretrained(s.base_model, subfolder="vae").to(device).eval().requires_grad_(False)
        self.scheduler = DDPMScheduler.from_pretrained(s.base_model, subfolder="scheduler")
        vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_size = s.image_size or self.model.unet.config.sample_size * vae_factor

    def loss(self, model, samples: list[Sample], generator):
        from models.cafe import diffusion_loss, encode_latents, images_to_pixels

        inputs = decode_images([s.input_image for s in samples])
        targets = decode_images([s.target_image for s in samples])
        dino = self.encoders.dino_features(inputs)
        clip = self.encoders.clip_embeds(targets)
        latents = encode_latents(self.vae, images_to_pixels(targets, self.image_size), generator)
        return diffusion_loss(
            model, self.scheduler, latents, clip, dino, self.settings.condition_dropout, generator
        )

    def gather_state(self, model) -> None:
        return None  # DDP keeps whole weights on every rank

    def save(self, model, state: None, folder: Path) -> None:
        unwrap(model).save_pretrained(folder)

    def load(self, folder: Path) -> None:
        from models.cafe import CafeUNet

        self.model.load_state_dict(CafeUNet.from_pretrained(folder).state_dict(), strict=True)


class AssistantTask:
    """The assistant heads over the frozen LLM, with frozen E and F; loss is equation 2."""

    def __init__(self, job: TrainJob, device):
        import torch

        from models.assistant import CafeAssistant
        from models.cafe import ImageEncoders, local_folder

        s = job.settings
        self.settings = s
        self.lr, self.batch_size = s.assistant_lr, s.assistant_batch_size
        llm_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if s.init_from:
            folder = local_folder(s.init_from, job.storage.get("endpoint_url"))
            self.model = CafeAssistant.from_pretrained(folder, llm_model=s.llm_model, dtype=llm_dtype)
        else:
            self.model = CafeAssistant.from_parts(s.llm_model, s.clip_model, s.dino_model, s.max_text_tokens, llm_dtype)
        self.encoders = ImageEncoders(s.clip_model, s.dino_model, device, llm_dtype)

    def loss(self, model, samples: list[Sample], generator):
        from models.assistant import assistant_loss

        inputs = decode_images([s.input_image for s in samples])
        targets = decode_images([s.target_image for s in samples])
        dino = self.encoders.dino_features(inputs)
        clip = self.encoders.clip_embeds(targets)
        output = model(dino, [s.user for s in samples], [s.assistant for s in samples])
        return assistant_loss(output, clip, self.settings.clip_loss_weight)

    def gather_state(self, model) -> dict[str, Any]:
        """The trainable layers, whole (gathered from the shards under FSDP)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(model, options=_state_options(ignore_frozen_params=True))
        new_layers = set(unwrap(model).new_layers())
        return {name: value for name, value in state.items() if name in new_layers}  # tied frozen weights slip in

    def save(self, model, state: dict[str, Any], folder: Path) -> None:
        unwrap(model).save_pretrained(folder, new_layers=state)

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_file

        from models.assistant import WEIGHTS_FILE

        self.model.load_new_layers(load_file(str(folder / WEIGHTS_FILE)))


def build_task(job: TrainJob, device):
    return GeneratorTask(job, device) if job.model == "generator" else AssistantTask(job, device)


def unwrap(model):
    return model.module if hasattr(model, "module") else model


# --- checkpoints ---------------------------------------------------------------------


def step_folder(job: TrainJob, step: int) -> str:
    return f"{job.prefix}/step-{step:08d}"


def save_checkpoint(storage: Storage, job: TrainJob, task, model, optimizer, state: TrainState, worker: Worker) -> None:
    """Write `step-<n>/` (model, optimizer, meta.json last) and then `latest.json` (rank 0)."""
    model_state = task.gather_state(model)  # collectives under FSDP: every rank calls them
    optimizer_state = get_optimizer_state(model, optimizer)
    loss = float(np.mean(state.losses[-10:])) if state.losses else None
    if worker.rank == 0:
        folder = step_folder(job, state.step)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp)
            task.save(model, model_state, local / "model")
            write_optimizer_state(optimizer_state, local)
            for path in sorted(p for p in local.rglob("*") if p.is_file()):
                storage.upload_file(path, f"{folder}/{path.relative_to(local).as_posix()}")
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
            "train": job.train,
        }
        storage.write_bytes(f"{folder}/meta.json", json.dumps(meta, indent=2, sort_keys=True).encode())
        pointer = {"step": state.step, "path": folder, "version": job.version}
        storage.write_bytes(f"{job.prefix}/latest.json", json.dumps(pointer, indent=2).encode())
        log.info("checkpoint %s (loss %.4f)", storage.url(folder), loss or float("nan"))
    worker.barrier()
    worker.report({"step": state.step, "epoch": state.epoch, "loss": loss, "checkpoint": step_folder(job, state.step)})


def latest_checkpoint(storage: Storage, model: str, run_id: str) -> str | None:
    """Storage key of the newest checkpoint folder of a run, or None."""
    try:
        pointer = json.loads(storage.read_bytes(f"{checkpoint_prefix(model, run_id)}/latest.json"))
    except StorageError:
        return None
    return pointer["path"]


def newest_checkpoint(storage: Storage, model: str) -> str | None:
    """The most recently written checkpoint folder of `model` over all runs, or None."""
    newest: tuple[str, int, str] | None = None
    for key in storage.list(f"checkpoints/{model}"):
        parts = key.split("/")
        if len(parts) != 4 or parts[3] != "latest.json":
            continue
        folder = json.loads(storage.read_bytes(key))["path"]
        meta = json.loads(storage.read_bytes(f"{folder}/meta.json"))
        candidate = (meta["created"], meta["step"], folder)
        newest = max(newest, candidate) if newest else candidate
    return newest[2] if newest else None


def fetch_checkpoint(storage: Storage, folder: str, destination: str | Path) -> str:
    """Copy a checkpoint's `model/` folder to local disk; returns the local model folder."""
    destination = Path(destination)
    keys = storage.list(f"{folder}/model")
    if not keys:
        raise FileNotFoundError(f"no model files under {storage.url(folder)}/model")
    for key in keys:
        target = destination / key[len(folder) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.read_bytes(key))
    return str(destination / "model")


def checkpoint_meta(storage: Storage, job: TrainJob, folder: str) -> dict[str, Any]:
    """A checkpoint's meta.json, refused when it was trained on another version."""
    meta = json.loads(storage.read_bytes(f"{folder}/meta.json"))
    if meta["version"] != job.version:
        raise ValueError(
            f"run {job.run_id!r} has checkpoints trained on version {meta['version']!r}, not {job.version!r}: "
            "use another run id (or set train.resume: false)"
        )
    return meta


def load_checkpoint(storage: Storage, folder: str, task) -> dict[str, Any]:
    """Load a checkpoint's weights into `task.model`; returns its optimizer state."""
    with tempfile.TemporaryDirectory() as tmp:
        task.load(Path(fetch_checkpoint(storage, folder, tmp)))
    return read_optimizer_state(storage, folder)


# Optimizer state: the full, name-keyed form of torch.distributed.checkpoint (the same for a
# plain module, DDP and FSDP), stored as safetensors (tensors) plus JSON (param groups).


def _state_options(**extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **extra)


def get_optimizer_state(model, optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_state_options())


def set_optimizer_state(model, optimizer, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def write_optimizer_state(state: dict[str, Any], folder: Path) -> None:
    from safetensors.torch import save_file

    tensors = {
        f"{name}::{slot}": value.detach().cpu().contiguous()
        for name, slots in state["state"].items()
        for slot, value in slots.items()
    }
    save_file(tensors, str(folder / "optimizer.safetensors"))
    (folder / "optimizer.json").write_text(json.dumps({"param_groups": state["param_groups"]}, indent=2))


def read_optimizer_state(storage: Storage, folder: str) -> dict[str, Any]:
    from safetensors.torch import load as load_safetensors

    tensors = load_safetensors(storage.read_bytes(f"{folder}/optimizer.safetensors"))
    state: dict[str, dict[str, Any]] = {}
    for flat, value in tensors.items():
        name, slot = flat.rsplit("::", 1)
        state.setdefault(name, {})[slot] = value
    groups = json.loads(storage.read_bytes(f"{folder}/optimizer.json"))["param_groups"]
    return {"state": state, "param_groups": groups}


def summary(storage: Storage, job: TrainJob) -> dict[str, Any]:
    folder = latest_checkpoint(storage, job.model, job.run_id)
    meta = json.loads(storage.read_bytes(f"{folder}/meta.json")) if folder else {}
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
