"""The one executor: the same steps give the same rows inline and on Ray Data, a class step is
set up once per actor, and no product module builds a Ray Data job of its own."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pandas as pd
import pytest

from factory.framework.executor import GroupStep, MapStep, run_map

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


def group_sum(group: pd.DataFrame, scale: int) -> pd.DataFrame:
    return pd.DataFrame({"bucket": [int(group["bucket"].iloc[0])], "total": [int(group["value"].sum()) * scale]})


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


def test_inline_group_step_sees_each_group_whole():
    out = pd.concat(run_map(rows(), [MapStep(doubled, (1,), batch_size=4)], on_ray=False,
                            group=GroupStep("bucket", 3, group_sum, (2,))))
    assert dict(zip(out["bucket"], out["total"])) == {0: 2 * (0 + 3 + 6 + 9), 1: 2 * (1 + 4 + 7 + 10),
                                                      2: 2 * (2 + 5 + 8 + 11)}


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
    grouped = pd.concat(run_map(rows(), [MapStep(doubled, (1,), batch_size=4)], blocks=3,
                                group=GroupStep("bucket", 3, group_sum, (2,))))
    assert dict(zip(grouped["bucket"], grouped["total"])) == {0: 36, 1: 44, 2: 52}


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
