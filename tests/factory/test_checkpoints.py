"""Finding the newest checkpoint over every run (factory/dataset/checkpoints.py), which eval and SID use."""

from __future__ import annotations

import json

import pytest

from factory.dataset.checkpoints import newest_checkpoint
from factory.framework import layout
from factory.framework.storage import LocalStorage


def write_run(storage: LocalStorage, run_id: str, step: int, created: str) -> str:
    folder = layout.checkpoint_step("generator", run_id, step)
    storage.write_bytes(layout.checkpoint_meta(folder), json.dumps({"created": created, "step": step}).encode())
    storage.write_bytes(layout.checkpoint_latest("generator", run_id), json.dumps({"path": folder}).encode())
    return folder


@pytest.mark.parametrize("damage", ["meta-deleted", "latest-not-json", "latest-without-path", "meta-nested-deep"])
def test_a_run_whose_checkpoint_cannot_be_read_is_skipped_naming_it(tmp_path, damage, caplog):
    storage = LocalStorage(tmp_path)
    older = write_run(storage, "night-1", 4, "2026-12-01T00:00:00")
    newer = write_run(storage, "night-2", 2, "2026-12-02T00:00:00")
    assert newest_checkpoint(storage, "generator") == newer
    latest = layout.checkpoint_latest("generator", "night-2")
    if damage == "meta-deleted":  # an operator removed the step folder to free space
        storage.delete(layout.checkpoint_meta(newer))
    elif damage == "latest-not-json":
        storage.write_bytes(latest, b"{")
    elif damage == "latest-without-path":
        storage.write_bytes(latest, b"{}")
    else:
        storage.write_bytes(layout.checkpoint_meta(newer), b"[" * 100_000 + b"]" * 100_000)
    assert newest_checkpoint(storage, "generator") == older
    assert "skipping the checkpoints of" in caplog.text and "night-2" in caplog.text


@pytest.mark.parametrize("train, meta, finished", [
    ({"epochs": 3, "max_steps": None}, {"epochs_completed": 1}, False),
    ({"epochs": 3, "max_steps": None}, {"epochs_completed": 3}, True),
    ({"epochs": 3, "max_steps": 2000}, {"epochs_completed": 1, "step": 2000}, True),
    ({"epochs": 3, "max_steps": 2000}, {"epochs_completed": 1, "step": 1000}, False),
])
def test_a_run_still_training_is_passed_over_for_the_newest_finished_one(tmp_path, train, meta, finished):
    """Tonight's fine-tune, still going, deletes its older steps as it saves: the weekly eval and
    SID take the newest run that finished."""
    storage = LocalStorage(tmp_path)
    done = write_run(storage, "night-1", 4, "2026-12-01T00:00:00")
    going = write_run(storage, "night-2", 1000, "2026-12-02T00:00:00")
    saved = json.loads(storage.read_bytes(layout.checkpoint_meta(going)))
    storage.write_bytes(layout.checkpoint_meta(going), json.dumps({**saved, "train": train, **meta}).encode())
    assert newest_checkpoint(storage, "generator") == (going if finished else done)
