"""Work units on Ray Data: each model stage is an actor pool, units stream between them.

A unit's output is one Parquet file per stage (`runs/<run>/<stage>/unit-<n>.parquet`),
written atomically when the unit is done. A unit whose file exists is skipped, so a
stopped run, started again, does only the units still missing, and never writes a
sample twice. Rows carry everything (rejections included), so the funnel and the cost
are counted from the files, not from logs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from factory.config import ActorPool, FactoryConfig
from factory.context import RunContext

log = logging.getLogger(__name__)

REJECT_COLUMNS = ("reject_stage", "reject_reason")


@dataclass(frozen=True)
class Step:
    """One model stage in the unit pipeline."""

    name: str  # the stage name, also the output folder
    target: str  # "module:Class" of the stage callable
    source: str  # where its input rows come from: "plan" or a previous stage name

    def pool(self, config: FactoryConfig) -> ActorPool:
        return getattr(config, self.name)


STEPS = {
    "generate": Step("generate", "stages.generate:Generate", "plan"),
    "filter": Step("filter", "stages.filter:Filter", "generate"),
    "dialogue": Step("dialogue", "stages.dialogue:Dialogue", "filter"),
}


def load_target(target: str) -> Callable[..., Any]:
    module_name, attribute = target.split(":")
    return getattr(import_module(module_name), attribute)


def read_plan(ctx: RunContext) -> pd.DataFrame:
    return ctx.storage.read_parquet(f"{ctx.run_dir}/plan.parquet").to_pandas()


def plan_units(ctx: RunContext) -> list[int]:
    table = ctx.storage.read_parquet(f"{ctx.run_dir}/plan.parquet")
    return sorted(set(table.column("unit").to_pylist()))


def finished_units(ctx: RunContext, stage: str) -> set[int]:
    done = set()
    for key in ctx.storage.list(f"{ctx.run_dir}/{stage}"):
        name = key.rsplit("/", 1)[-1]
        if name.startswith("unit-") and name.endswith(".parquet"):
            done.add(int(name[len("unit-") : -len(".parquet")]))
    return done


def read_unit(ctx: RunContext, stage: str, unit: int) -> pd.DataFrame:
    return ctx.storage.read_parquet(ctx.unit_key(stage, unit)).to_pandas()


def read_stage(ctx: RunContext, stage: str) -> pd.DataFrame:
    """All unit outputs of a stage, in unit order."""
    frames = [read_unit(ctx, stage, unit) for unit in sorted(finished_units(ctx, stage))]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def write_unit(ctx: RunContext, stage: str, unit: int, rows: pd.DataFrame) -> None:
    table = pa.Table.from_pandas(rows.reset_index(drop=True), preserve_index=False)
    ctx.storage.write_parquet(ctx.unit_key(stage, unit), table)


def ensure_reject_columns(rows: pd.DataFrame) -> pd.DataFrame:
    for column in REJECT_COLUMNS:
        if column not in rows:
            rows[column] = pd.Series([None] * len(rows), dtype=object)
    return rows


class UnitWorker:
    """Runs one stage on whole units inside a Ray actor (or inline, for tests and loops)."""

    def __init__(self, step: Step, config_snapshot: dict[str, Any], plan: pd.DataFrame | None = None):
        from factory.config import validate_config

        self.step = step
        self.ctx = RunContext(validate_config(config_snapshot))
        self.stage = load_target(step.target)(self.ctx.config)
        self._plan = plan

    def input_rows(self, unit: int) -> pd.DataFrame:
        if self.step.source != "plan":
            return read_unit(self.ctx, self.step.source, unit)
        if self._plan is None:
            self._plan = read_plan(self.ctx)
        return self._plan[self._plan["unit"] == unit].reset_index(drop=True)

    def run_unit(self, unit: int) -> tuple[float, int]:
        """Process one unit unless its output exists; return (seconds spent, rows processed)."""
        if self.ctx.storage.exists(self.ctx.unit_key(self.step.name, unit)):
            return 0.0, 0
        started = time.perf_counter()
        rows = ensure_reject_columns(self.input_rows(unit))
        out = self.stage(rows.copy())
        if len(out) != len(rows) or list(out["key"]) != list(rows["key"]):
            raise RuntimeError(f"stage {self.step.name} changed the rows of unit {unit}; stages must keep every row")
        seconds = time.perf_counter() - started
        out[f"seconds_{self.step.name}"] = seconds / max(len(out), 1)
        write_unit(self.ctx, self.step.name, unit, out)
        return seconds, len(out)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        done = [self.run_unit(int(unit)) for unit in batch["unit"]]
        return {
            **batch,
            f"seconds_{self.step.name}": np.asarray([seconds for seconds, _ in done], dtype=float),
            f"rows_{self.step.name}": np.asarray([rows for _, rows in done], dtype=np.int64),
        }


class UnitChain:
    """Consecutive steps that ask for the same resources, run in one actor: one process
    start and one set of imports instead of several, and no hand-off between them."""

    def __init__(self, steps: list[Step], config_snapshot: dict[str, Any]):
        self.workers = [UnitWorker(step, config_snapshot) for step in steps]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for worker in self.workers:
            batch = worker(batch)
        return batch


def pool_groups(steps: list[Step], config: FactoryConfig) -> list[list[Step]]:
    """Split `steps` into runs of neighbours with identical actor-pool resources."""
    groups: list[list[Step]] = []
    for step in steps:
        if groups and resources(groups[-1][-1], config) == resources(step, config):
            groups[-1].append(step)
        else:
            groups.append([step])
    return groups


def resources(step: Step, config: FactoryConfig) -> tuple[int, float, float]:
    pool = step.pool(config)
    return pool.concurrency, pool.num_gpus, pool.num_cpus


def run_steps(ctx: RunContext, steps: list[Step]) -> dict[str, Any]:
    """Stream every unfinished unit through `steps` on Ray Data; return counts and timing."""
    import ray

    units = plan_units(ctx)
    last = steps[-1].name
    pending = sorted(set(units) - finished_units(ctx, last))
    summary = {"units": len(units), "skipped": len(units) - len(pending), "ran": len(pending)}
    if not pending:
        return summary
    snapshot = ctx.config.snapshot()
    dataset = ray.data.from_items([{"unit": unit} for unit in pending], override_num_blocks=len(pending))
    for group in pool_groups(steps, ctx.config):
        concurrency, num_gpus, num_cpus = resources(group[0], ctx.config)
        dataset = dataset.map_batches(
            UnitChain,
            fn_constructor_args=(group, snapshot),
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=concurrency),
            num_gpus=num_gpus,
            num_cpus=num_cpus,
        )  # Ray Data restarts dead actors and retries their units (max_restarts=-1 by default)
    started = time.perf_counter()
    results = dataset.take_all()
    summary["wall_seconds"] = round(time.perf_counter() - started, 3)
    for step in steps:
        summary[step.name] = stage_summary(step, ctx.config, results, summary["wall_seconds"])
    return summary


def stage_summary(step: Step, config: FactoryConfig, results: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """Counts, rate and accelerator time of one step, for the per-stage summary line."""
    rows = int(sum(row[f"rows_{step.name}"] for row in results))
    actor_seconds = float(sum(row[f"seconds_{step.name}"] for row in results))
    return {
        "candidates": rows,
        "per_second": round(rows / wall, 3) if wall else None,
        "actor_seconds": round(actor_seconds, 3),
        "gpu_seconds": round(actor_seconds * step.pool(config).num_gpus, 3),
    }


def run_steps_inline(ctx: RunContext, steps: list[Step]) -> dict[str, Any]:
    """The same work as `run_steps` in one process with no Ray: a plain loop over units."""
    units = plan_units(ctx)
    workers = [UnitWorker(step, ctx.config.snapshot()) for step in steps]
    started = time.perf_counter()
    ran = 0
    for unit in units:
        if ctx.storage.exists(ctx.unit_key(steps[-1].name, unit)):
            continue
        for worker in workers:
            worker.run_unit(unit)
        ran += 1
        log.info("unit %d done (%d of %d)", unit, ran, len(units))
    return {"units": len(units), "ran": ran, "wall_seconds": round(time.perf_counter() - started, 3)}
