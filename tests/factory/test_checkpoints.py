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
