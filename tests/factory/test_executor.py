"""The one executor: the same steps give the same rows inline and on Ray Data, a class step is
set up once per actor, and no product module builds a Ray Data job of its own."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pandas as pd
import pytest

from factory.framework import executor, layout
from factory.framework.executor import MapStep, Resume, RunChanged, raised_error, run_map, run_resumable

REPO = Path(__file__).resolve().parents[2]
PRODUCT = ("factory", "stages", "models", "filters", "jobs")
EXECUTOR = REPO / "factory" / "framework" / "executor.py"


def doubled(batch: pd.DataFrame, factor: int) -> pd.DataFrame:
    return batch.assign(value=batch["value"] * factor)


class Tagger:
    """A class step: its setup runs once per actor, and each batch records which setup served it."""

    def __init__(self, label: str):
        self.label = f"{label}-{os.getpid()}-{id(self)}"
        self.calls = 0

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        self.calls += 1
        return batch.assign(setup=self.label, call=self.calls)


def rows(n: int = 12) -> pd.DataFrame:
    return pd.DataFrame({"order": range(n), "value": range(n), "bucket": [i % 3 for i in range(n)]})


STEPS = [MapStep(doubled, (10,), batch_size=5), MapStep(Tagger, ("t",), batch_size=2, actors=2)]


def collected(**kwargs) -> pd.DataFrame:
    return pd.concat(run_map(rows(), STEPS, **kwargs), ignore_index=True).sort_values("order").reset_index(drop=True)


def test_inline_steps_run_in_order_with_their_arguments_and_one_setup():
    out = collected(on_ray=False)
    assert out["value"].tolist() == [10 * i for i in range(12)]
    assert out["setup"].nunique() == 1  # one Tagger for every batch
    assert out.groupby("call").size().max() == 2  # batches of at most 2 rows


def test_no_rows_runs_nothing():
    assert list(run_map(rows(0), STEPS, on_ray=False)) == []


@pytest.mark.usefixtures("ray_local")
def test_ray_gives_the_inline_rows_with_a_setup_per_actor_and_ordered_output():
    here, there = collected(on_ray=False), collected(blocks=6)
    columns = ["order", "value", "bucket"]
    assert there[columns].values.tolist() == here[columns].values.tolist()
    assert 1 <= there["setup"].nunique() <= 2  # an actor pool of 2: never a setup per batch
    ordered = pd.concat(run_map(rows(), STEPS, blocks=6, ordered=True), ignore_index=True)
    assert ordered["order"].tolist() == list(range(12))


@pytest.mark.usefixtures("ray_local")
def test_a_job_over_more_rows_than_max_blocks_gets_max_blocks_blocks_of_several_rows(monkeypatch):
    # Ray Data keeps a record per block and per call in the driver: the unit pipeline's driver stays flat
    monkeypatch.setattr(executor, "MAX_BLOCKS", 4)
    whole_blocks = [MapStep(Tagger, ("t",), batch_size=None, actors=1)]
    out = pd.concat(run_map(rows(40), whole_blocks, blocks=40, ordered=True), ignore_index=True)
    assert out["order"].tolist() == list(range(40))
    assert out.groupby(["setup", "call"]).ngroups == 4  # one call per block, four blocks of ten rows


def ray_data_calls(path: Path) -> list[str]:
    """Where one module builds Ray Data jobs or actor pools itself: `ray.data`, `map_batches`,
    `map_groups`, `ray.util.ActorPool`, or an import from `ray.data`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            owner = getattr(node.value, "id", getattr(node.value, "attr", ""))
            hit = node.attr in ("map_batches", "map_groups") or (owner, node.attr) in (("ray", "data"),
                                                                                       ("util", "ActorPool"))
        elif isinstance(node, ast.ImportFrom):
            hit = (node.module or "").startswith("ray.data") or (
                node.module == "ray.util" and any(alias.name == "ActorPool" for alias in node.names))
        elif isinstance(node, ast.Import):
            hit = any(alias.name.startswith("ray.data") for alias in node.names)
        else:
            hit = False
        if hit:
            found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_only_the_executor_builds_ray_data_jobs():
    modules = [path for package in PRODUCT for path in (REPO / package).rglob("*.py") if path != EXECUTOR]
    assert [call for path in modules for call in ray_data_calls(path)] == []
    assert ray_data_calls(EXECUTOR)  # the check sees the calls where they are


class FailsAt:
    """A class step that counts the rows it sees and fails on row `fail_at` (a killed job)."""

    seen: list[int] = []

    def __init__(self, fail_at: int | None):
        self.fail_at = fail_at

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        if self.fail_at is not None and self.fail_at in set(batch["order"]):
            raise RuntimeError("killed")
        FailsAt.seen.extend(batch["order"])
        return batch.assign(value=batch["value"] * 3)


def resumed(storage, fail_at=None, made_with=None, given=None) -> pd.DataFrame:
    resume = Resume(storage, "jobs/x", made_with or {"model.scale": 3}, inputs=("order", "value"), chunk_rows=4)
    frames = run_resumable(given if given is not None else rows(10), [MapStep(FailsAt, (fail_at,), batch_size=2)],
                           resume, on_ray=False)
    return pd.concat(frames, ignore_index=True)


def test_a_resumable_job_killed_midway_does_only_its_missing_chunks_when_run_again(storage):
    FailsAt.seen = []
    with pytest.raises(RuntimeError, match="killed"):
        resumed(storage, fail_at=9)  # chunks of 4 rows: 0-3 and 4-7 finish, 8-9 does not
    assert sorted(storage.list("jobs/x")) == [layout.chunk_file("jobs/x", 0), layout.chunk_file("jobs/x", 1)]
    FailsAt.seen = []
    out = resumed(storage)
    assert FailsAt.seen == [8, 9]
    assert out["order"].tolist() == list(range(10)) and out["value"].tolist() == [3 * n for n in range(10)]
    FailsAt.seen = []
    assert resumed(storage)["value"].tolist() == out["value"].tolist() and FailsAt.seen == []


def test_a_resumable_job_refuses_chunks_made_with_other_settings(storage):
    resumed(storage)
    with pytest.raises(RunChanged, match=r"model.scale: 3 -> 4"):
        resumed(storage, made_with={"model.scale": 4})


def test_a_resumable_chunk_of_other_input_rows_is_done_again(storage):
    resumed(storage)
    FailsAt.seen = []
    other = rows(10).assign(value=lambda frame: frame["value"].where(frame["order"] != 5, 50))
    assert resumed(storage, given=other)["value"].tolist() == [3 * n if n != 5 else 150 for n in range(10)]
    assert FailsAt.seen == [4, 5, 6, 7]  # the chunk holding the changed row, alone


def test_a_chunk_whose_footer_metadata_is_not_json_is_named_and_done_again(tmp_path, caplog):
    import pyarrow.parquet as pq

    from factory.framework.executor import CHUNK_META
    from factory.framework.storage import LocalStorage

    storage = LocalStorage(tmp_path)
    resumed(storage)
    path = storage.url(layout.chunk_file("jobs/x", 1))
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, CHUNK_META: b"{not json"}), path)
    FailsAt.seen = []
    assert resumed(storage)["value"].tolist() == [3 * n for n in range(10)]
    assert FailsAt.seen == [4, 5, 6, 7]
    assert f"damaged Parquet file {path}: its footer metadata is not JSON" in caplog.text


def test_an_error_raised_in_a_ray_train_worker_is_stated_as_that_error_not_as_ray_trains_wrapper():
    from ray.train import WorkerGroupError

    wrapped = WorkerGroupError("[Rank 0 Error Snippet]: Traceback (most recent call last): ...",
                               {1: KeyError("other rank"), 0: ValueError("version 'demo' has 2 samples, fewer than 4")})
    assert raised_error(wrapped) == ("ValueError", "version 'demo' has 2 samples, fewer than 4")
    assert raised_error(ValueError("plain")) == ("ValueError", "plain")
