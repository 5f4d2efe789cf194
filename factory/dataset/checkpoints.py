"""Checkpoints in storage: train writes them, eval and SID find and fetch them.

A run's checkpoints are `checkpoints/<model>/<run-id>/step-<n>/` (the model folder, the optimizer
state, `meta.json` written last) with `latest.json` beside them pointing at the newest complete
step; keys come from `factory.framework.layout`.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from factory.framework import layout
from factory.framework.storage import Storage, StorageError

if TYPE_CHECKING:
    from factory.framework.stage import RunContext

log = logging.getLogger(__name__)


def latest_checkpoint(storage: Storage, model: str, run_id: str) -> str | None:
    """Storage key of the newest checkpoint folder of a run, or None."""
    try:
        pointer = json.loads(storage.read_bytes(layout.checkpoint_latest(model, run_id)))
    except StorageError:
        return None
    return pointer["path"]


def newest_checkpoint(storage: Storage, model: str) -> str | None:
    """The most recently written checkpoint folder of `model` over the runs that finished training,
    or None. A run still training is passed over (its steps are deleted as it goes on: `train.keep_steps`),
    and so is one whose `latest.json` or newest `meta.json` cannot be read (a step folder deleted by
    hand), named in a warning."""
    runs = [key for key in storage.list(layout.checkpoints(model)) if layout.is_checkpoint_latest(key)]
    found = [newest for newest in map(partial(run_newest, storage), runs) if newest]
    return max(found)[2] if found else None


def run_newest(storage: Storage, latest_key: str) -> tuple[str, int, str] | None:
    """(created, step, folder) of the checkpoint a run's `latest.json` points at, or None (warned)."""
    try:
        folder = json.loads(storage.read_bytes(latest_key))["path"]
        meta = json.loads(storage.read_bytes(layout.checkpoint_meta(folder)))
        newest = str(meta["created"]), int(meta["step"]), folder
        finished = finished_training(meta)
    except (StorageError, ValueError, RecursionError, KeyError, TypeError) as err:
        log.warning("skipping the checkpoints of %s: %s: %s", storage.url(latest_key), type(err).__name__, err)
        return None
    if not finished:
        log.info("passing over %s: its run is still training", storage.url(folder))
        return None
    return newest


def finished_training(meta: dict[str, Any]) -> bool:
    """Whether a run's newest checkpoint is its last: taken after its last epoch or at `max_steps`. A
    checkpoint whose meta does not say (placed by hand) is taken as finished."""
    train = meta.get("train")
    if not isinstance(train, dict) or "epochs_completed" not in meta:
        return True
    max_steps = train.get("max_steps")
    return meta["epochs_completed"] >= train["epochs"] or (max_steps is not None and meta["step"] >= max_steps)


def fetch_checkpoint(storage: Storage, folder: str, destination: str | Path) -> str:
    """Copy a checkpoint's `model/` folder to local disk; returns the local model folder."""
    destination = Path(destination)
    keys = storage.list(layout.checkpoint_model(folder))
    if not keys:
        raise FileNotFoundError(f"no model files under {storage.url(layout.checkpoint_model(folder))}")
    for key in keys:
        target = destination / key[len(folder) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.read_bytes(key))
    return str(destination / "model")


def checkpoint_meta(storage: Storage, folder: str, version: str, run_id: str) -> dict[str, Any]:
    """A checkpoint's meta.json, refused when it was trained on another version."""
    meta = json.loads(storage.read_bytes(layout.checkpoint_meta(folder)))
    if meta["version"] != version:
        raise ValueError(
            f"run {run_id!r} has checkpoints trained on version {meta['version']!r}, not {version!r}: "
            "use another run id (or set train.resume: false)"
        )
    return meta


def latest_model_checkpoint(ctx: RunContext, model: str) -> str | None:
    """The newest `model` folder over all runs (a local path or an s3:// URL), or None."""
    key = newest_checkpoint(ctx.storage, model)
    return model_folder(ctx.storage, key) if key else None


def latest_generator_checkpoint(ctx: RunContext) -> str | None:
    """The newest G folder over all runs, or None."""
    return latest_model_checkpoint(ctx, "generator")


def latest_assistant_checkpoint(ctx: RunContext) -> str | None:
    """The newest assistant folder over all runs, or None."""
    return latest_model_checkpoint(ctx, "assistant")


def model_folder(storage: Storage, checkpoint: str) -> str:
    """Where a checkpoint's model folder opens (G: `CafeGenerator` / `models.cafe.local_folder`;
    the assistant: `CafeAssistant.from_pretrained`)."""
    return storage.url(layout.checkpoint_model(checkpoint))
