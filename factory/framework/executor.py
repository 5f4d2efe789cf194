"""Work units on Ray Data: each model stage is an actor pool, units stream between them.

A unit's output is one Parquet file per stage (`runs/<run>/<stage>/unit-<n>.parquet`),
written atomically when the unit is done. A unit whose file is whole (its footer reads and
holds the plan's rows for the unit) is skipped, so a stopped run, started again, does only
the units still missing or damaged, and never writes a sample twice. Rows carry scores,
texts and reasons (rejections included) but no copy of an
image drawn or stored elsewhere (`factory.framework.units.ImageJoin` joins the bytes a stage needs),
and each file's footer says what made it, so the funnel and the cost are counted from the
files, not from logs, and a changed config is refused instead of mixed in (`check_made_with`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from factory.framework import layout
from factory.framework.config import ActorPool, ConfigError, FactoryConfig, validate_config
from factory.framework.context import RunContext
from factory.framework.stage import Stage, changed_keys, fingerprint
from factory.framework.storage import open_storage
from factory.framework.units import (
    ImageJoin,
    PlanIndex,
    finished_units,
    plan_index,
    plan_units,
    read_plan_unit,
    read_unit,
    unit_is_whole,
    unit_meta,
    without_images,
    write_unit,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    """One model stage in the unit pipeline: its name (also its output folder) and class."""

    name: str
    stage_class: type[Stage]

    def pool(self, config: FactoryConfig) -> ActorPool:
        return getattr(config, self.name)


class RunChanged(ConfigError):
    """A run's unit files were made with other settings than the config now says."""


def changed_settings(config: FactoryConfig, made_with: dict[str, Any] | None) -> list[str]:
    """`key: old -> new` for each setting a unit file's footer (`made_with`) records and `config`
    now sets otherwise (the footer's sections are those that shaped its stage); empty when they
    agree or the file records none."""
    if made_with is None:
        return []
    sections = tuple(sorted({key.split(".", 1)[0] for key in made_with}))
    return changed_keys(made_with, fingerprint(config, sections))


def check_made_with(ctx: RunContext, steps: list[Step]) -> None:
    """Refuse to add units made with one config to units made with another: a version must
    never state settings its samples were not made with. Names the keys that changed."""
    for step in steps:
        done = sorted(finished_units(ctx.storage, ctx.config.run_id, step.name))
        if not done:
            continue
        made_with = unit_meta(ctx.storage, ctx.config.run_id, step.name, done[0]).get("shaped_by")
        changes = changed_settings(ctx.config, made_with)
        if changes:
            raise RunChanged(
                f"run {ctx.config.run_id!r} already has {len(done)} {step.name} units made with other settings:\n  "
                + "\n  ".join(changes) + "\nstart a new run (--set run_id=NEW) or restore those settings")


class UnitWorker:
    """Runs one stage on whole units inside a Ray actor (or inline, for tests and loops)."""

    def __init__(self, step: Step, config_snapshot: dict[str, Any]):
        config = validate_config(config_snapshot)
        self.step = step
        self.run_id = config.run_id
        self.storage = open_storage(config.storage)
        self.stage = step.stage_class(config)
        self.images = ImageJoin(self.storage, self.run_id)
        self.shaped_by = fingerprint(config, self.stage.shaped_by)
        self.plan: PlanIndex | None = None  # the plan's index (rows and partition per unit), read once

    def input_rows(self, unit: int):
        source = self.stage.source
        if source == "plan":
            rows = read_plan_unit(self.storage, self.run_id, unit, self.plan_index())
        else:
            rows = read_unit(self.storage, self.run_id, source, unit)
        needed = tuple(column for column in self.stage.needs_images if column not in rows)
        return self.images.add(rows, needed)

    def run_unit(self, unit: int) -> tuple[float, int]:
        """Process one unit unless its output is whole; return (seconds spent, rows processed)."""
        if self.finished(unit):
            return 0.0, 0
        started = time.perf_counter()
        rows = self.input_rows(unit)
        out = self.stage(rows)
        if list(out["key"]) != list(rows["key"]):
            raise RuntimeError(f"stage {self.step.name} changed the rows of unit {unit}; stages must keep every row")
        seconds = time.perf_counter() - started
        out[f"seconds_{self.step.name}"] = seconds / max(len(out), 1)
        meta = {"stage": self.step.name, "unit": unit, "shaped_by": self.shaped_by,
                "counters": dict(self.stage.counters), "describe": self.stage.describe(), "finished_at": time.time()}
        write_unit(self.storage, self.run_id, self.step.name, unit, without_images(out, self.stage.draws_images), meta)
        return seconds, len(out)

    def unit_key(self, unit: int) -> str:
        return layout.unit_file(self.run_id, self.step.name, unit)

    def finished(self, unit: int) -> bool:
        key = self.unit_key(unit)
        if not self.storage.exists(key):
            return False
        return unit_is_whole(self.storage, key, self.plan_index().rows.get(unit))

    def plan_index(self) -> PlanIndex:
        if self.plan is None:
            self.plan = plan_index(self.storage, self.run_id)
        return self.plan

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


def resources(step: Step, config: FactoryConfig) -> tuple[int, dict[str, Any]]:
    pool = step.pool(config)
    return pool.concurrency, pool.ray_options()


def run_steps(ctx: RunContext, steps: list[Step]) -> dict[str, Any]:
    """Stream every unfinished unit through `steps` on Ray Data; return counts and timing."""
    import ray  # ray: only here (the inline loop runs without it)

    check_made_with(ctx, steps)
    units = plan_units(ctx.storage, ctx.config.run_id)
    pending = unfinished(ctx, steps, units)
    summary = {"units": len(units), "skipped": len(units) - len(pending), "ran": len(pending)}
    if not pending:
        return summary
    snapshot = ctx.config.snapshot()
    dataset = ray.data.from_items([{"unit": unit} for unit in pending], override_num_blocks=len(pending))
    for group in pool_groups(steps, ctx.config):
        concurrency, ray_options = resources(group[0], ctx.config)
        dataset = dataset.map_batches(
            UnitChain,
            fn_constructor_args=(group, snapshot),
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=concurrency),
            **ray_options,
        )  # Ray Data restarts dead actors and retries their units (max_restarts=-1 by default)
    started = time.perf_counter()
    results = dataset.take_all()
    summary["wall_seconds"] = round(time.perf_counter() - started, 3)
    for step in steps:
        summary[step.name] = stage_summary(step, ctx.config, results, summary["wall_seconds"])
    return summary


def unfinished(ctx: RunContext, steps: list[Step], units: list[int]) -> list[int]:
    """The units some step has no whole file for (missing or damaged: a later stage's whole file
    does not make up for an earlier stage's damaged one, which publish reads too)."""
    pending: set[int] = set()
    for step in steps:
        pending |= set(units) - finished_units(ctx.storage, ctx.config.run_id, step.name)
    return sorted(pending)


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
    check_made_with(ctx, steps)
    units = plan_units(ctx.storage, ctx.config.run_id)
    workers = [UnitWorker(step, ctx.config.snapshot()) for step in steps]
    started = time.perf_counter()
    ran = 0
    for unit in unfinished(ctx, steps, units):
        for worker in workers:
            worker.run_unit(unit)
        ran += 1
        log.info("unit %d done (%d of %d)", unit, ran, len(units))
    return {"units": len(units), "ran": ran, "wall_seconds": round(time.perf_counter() - started, 3)}
