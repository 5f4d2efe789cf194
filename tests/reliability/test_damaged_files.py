"""Damaged run files: a unit is finished only when it reads back whole; every other damaged file
is named by its storage key, and no failure aborts the process or leaves a publish lock.

The unit-level cases run the pipeline inline on a stand-in stage (no Ray, no model); the run
files of the real demo (plan, reference part, each stage's unit) are damaged in a local copy of
the reference run's inputs and published through the fork server (`--stage publish`, local
executor), as the other reliability tests do.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from factory.dataset.manifest import load_manifest, verify_version
from factory.framework import layout
from factory.framework.executor import run_steps_inline
from factory.framework.storage import DamagedFile, LocalStorage
from factory.framework.units import UNIT_META, read_unit, unit_meta, write_unit
from tests.factory.test_pipeline import STAMP, make_ctx, read_stage
from tests.reliability.harness import copy_tree, demo_args, hidden_temp_files


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def not_parquet(path: Path) -> None:
    path.write_bytes(b"this is not a parquet file at all")


def damage_inside(path: Path, column: str) -> None:
    """Garbage over the first page header of `column`'s first chunk: the footer still reads, so the
    file passes every check made from footers, and reading that column fails."""
    first_group = pq.ParquetFile(path).metadata.row_group(0)
    chunk = next(first_group.column(number) for number in range(first_group.num_columns)
                 if first_group.column(number).path_in_schema == column)
    offset = chunk.dictionary_page_offset or chunk.data_page_offset
    data = bytearray(path.read_bytes())
    data[offset : offset + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))


def short(ctx, unit: int) -> None:
    """A whole Parquet file for the unit that holds one row fewer than the plan gives it."""
    rows = read_unit(ctx.storage, ctx.config.run_id, "filter", unit)
    write_unit(ctx.storage, ctx.config.run_id, "filter", unit, rows.iloc[1:], {"stage": "filter"})


def footer_not_json(path: Path) -> None:
    """The same rows, their footer's unit metadata replaced by bytes that are not JSON."""
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, UNIT_META: b'{"stage": '}), path)


@pytest.mark.parametrize("damage", ["truncated", "not_parquet", "one_row_short", "footer_not_json"])
def test_a_damaged_unit_file_is_named_and_redone_and_the_run_goes_on(tmp_path, caplog, damage):
    ctx = make_ctx(tmp_path)
    run_steps_inline(ctx, [STAMP])
    whole = read_stage(ctx, "filter")
    path = Path(ctx.storage.url(layout.unit_file(ctx.config.run_id, "filter", 2)))
    {"truncated": lambda: truncate(path), "not_parquet": lambda: not_parquet(path),
     "one_row_short": lambda: short(ctx, 2), "footer_not_json": lambda: footer_not_json(path)}[damage]()
    with caplog.at_level(logging.WARNING):
        assert run_steps_inline(ctx, [STAMP])["ran"] == 1
    assert str(path) in caplog.text and "redone" in caplog.text and "<Buffer>" not in caplog.text
    redone = read_stage(ctx, "filter")
    pd.testing.assert_frame_equal(redone.drop(columns="seconds_filter"), whole.drop(columns="seconds_filter"))
    assert run_steps_inline(ctx, [STAMP])["ran"] == 0


def test_a_damaged_plan_is_an_error_naming_it(tmp_path):
    ctx = make_ctx(tmp_path)
    plan = Path(ctx.storage.url(layout.plan(ctx.config.run_id)))
    truncate(plan)
    with pytest.raises(DamagedFile, match=str(plan)) as raised:
        run_steps_inline(ctx, [STAMP])
    assert "<Buffer>" not in str(raised.value)


def test_reading_any_damaged_parquet_names_its_key(tmp_path):
    storage = LocalStorage(tmp_path)
    storage.write_parquet("runs/r/filter/unit-000000.parquet", pa.table({"key": ["a", "b"]}))
    truncate(tmp_path / "runs/r/filter/unit-000000.parquet")
    for read in (storage.read_parquet, storage.parquet_metadata, storage.parquet_footer,
                 lambda key: storage.read_present_columns(key, ["key"])):
        with pytest.raises(DamagedFile, match="runs/r/filter/unit-000000.parquet") as raised:
            read("runs/r/filter/unit-000000.parquet")
        assert "<Buffer>" not in str(raised.value)


# --- the demo's run files, published ------------------------------------------------------------

RUN_FILES = {  # what is damaged -> its key in the reference run's inputs
    "plan": "runs/demo/plan.parquet",
    "reference_part": "references/demo/part-00000.parquet",
    "generate_unit": "runs/demo/generate/unit-000001.parquet",
    "filter_unit": "runs/demo/filter/unit-000001.parquet",
    "dialogue_unit": "runs/demo/dialogue/unit-000001.parquet",
}


@pytest.mark.slow
@pytest.mark.parametrize("damaged", list(RUN_FILES))
def test_publish_over_a_damaged_run_file_refuses_naming_it_and_leaves_no_lock(fork_server, publish_inputs, tmp_path,
                                                                             damaged):
    root = copy_tree(publish_inputs, tmp_path / "root")
    assert (root / RUN_FILES[damaged]).exists(), sorted(str(p.relative_to(root)) for p in root.rglob("*.parquet"))
    truncate(root / RUN_FILES[damaged])
    result = fork_server.run_one(tmp_path / "logs" / "publish", demo_args("publish", str(root)))
    said = result.output()
    assert result.rc == 1, said[-3000:]  # refused as failed work: never an abort (134) or a signal
    assert str(root / RUN_FILES[damaged]) in said and "<Buffer>" not in said
    assert not list(root.glob("datasets/**/_publishing.json")) and not list(root.glob("datasets/**/manifest.json"))
    assert hidden_temp_files(root) == []


@pytest.mark.slow
def test_allow_partial_publishes_around_a_damaged_generate_unit(fork_server, publish_inputs, tmp_path):
    """The unit whose generate file is damaged is left out and counted missing; the others publish."""
    root = copy_tree(publish_inputs, tmp_path / "root")
    truncate(root / RUN_FILES["generate_unit"])
    result = fork_server.run_one(tmp_path / "logs" / "publish",
                                 demo_args("publish", str(root), "publish.allow_partial=true"))
    assert result.rc == 0, result.output()[-3000:]
    storage = LocalStorage(root)
    manifest = load_manifest(storage, "demo", "demo")
    assert manifest["partial"]["first_missing"] == [1] and verify_version(storage, "demo", "demo") == []
    assert not list(root.glob("datasets/**/_publishing.json"))


@pytest.mark.slow
def test_a_damaged_plan_is_named_and_drawn_again_then_the_run_publishes(fork_server, publish_inputs, tmp_path):
    root = copy_tree(publish_inputs, tmp_path / "root")
    plan = root / RUN_FILES["plan"]
    original = LocalStorage(root).read_parquet(RUN_FILES["plan"])
    truncate(plan)
    drawn = fork_server.run_one(tmp_path / "logs" / "plan", demo_args("plan", str(root)))
    assert drawn.rc == 0 and str(plan) in drawn.output() and "drawn again" in drawn.output(), drawn.output()[-3000:]
    assert LocalStorage(root).read_parquet(RUN_FILES["plan"]).equals(original)
    published = fork_server.run_one(tmp_path / "logs" / "publish", demo_args("publish", str(root)))
    assert published.rc == 0, published.output()[-3000:]
    assert verify_version(LocalStorage(root), "demo", "demo") == []


@pytest.mark.slow
def test_a_unit_damaged_inside_fails_publish_on_ray_with_one_line_naming_it(fork_server, publish_inputs, tmp_path):
    """Its footer reads, so the shard task that reads its rows is the first to find it: the command's
    error line is that task's error, not Ray's wrapper (the remote traceback stays in the log)."""
    root = copy_tree(publish_inputs, tmp_path / "root")
    unit = next(unit for unit in range(100)  # one that holds samples: publish reads no other's rows
                if unit_meta(LocalStorage(root), "demo", "dialogue", unit)["facts"]["sample_sizes"]["key"])
    damaged = root / layout.unit_file("demo", "dialogue", unit)
    damage_inside(damaged, "user")
    result = fork_server.run_one(tmp_path / "logs" / "publish",
                                 demo_args("publish", str(root), "publish.executor=ray"))
    said = result.output()
    assert result.rc == 1, said[-3000:]
    (error,) = [line for line in said.splitlines() if line.startswith("error:")]
    assert error.startswith(f"error: stage publish failed: DamagedFile: damaged Parquet file {damaged}: "), error
    assert "ray::" not in error and "Failed to apply UDF" not in error, error
    assert not list(root.glob("datasets/**/_publishing.json")) and not list(root.glob("datasets/**/manifest.json"))
