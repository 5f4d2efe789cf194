"""The one executor of distributed work: every Ray Data job of the factory is built here.

`run_map` runs `MapStep`s (a function as Ray tasks, or a class on an actor pool: its constructor
is the step's setup, where models load once per actor) over a table of rows, on Ray Data or, for
tests and small runs, inline in this process with the same callables. Reference drawing, pool embedding,
SID's `w` drawing, eval scoring and publish's passes are written as such steps. `run_resumable`
keeps each finished chunk of a job's output (`Resume`), so a killed job does only the rest.

The unit pipeline (`run_steps`) is its main user: each model stage is an actor pool, units
stream between them.

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

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from factory.framework import layout
from factory.framework.config import ActorPool, ConfigError, FactoryConfig, validate_config
from factory.framework.metrics import UnitMetrics
from factory.framework.stage import RunContext, Stage, changed_keys, fingerprint
from factory.framework.storage import DamagedFile, Storage, open_storage
from factory.framework.units import (
    ImageJoin,
    PlanIndex,
    finished_units,
    metadata_json,
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

CHUNK_META = b"factory.chunk"  # a resumable job's chunk footer: the settings that made it, its inputs' digest
RAY_DATA_RETRY_ADVICE = "\nFailed to apply UDF transform after"  # what Ray Data adds to a map step's error
# Ray Data keeps a statistics record per output block in the driver until its dataset ends (ray #66016):
# a job over more input rows than this gets this many blocks of several rows, so the driver stays flat.
MAX_BLOCKS = 1024


@dataclass(frozen=True)
class Step:
    """One model stage in the unit pipeline: its name (also its output folder) and class."""

    name: str
    stage_class: type[Stage]

    def pool(self, config: FactoryConfig) -> ActorPool:
        return getattr(config, self.name)

    def request(self, config: FactoryConfig) -> tuple[int, dict[str, Any]]:
        """What its actor pool asks of the cluster."""
        pool = self.pool(config)
        return pool.concurrency, pool.ray_options()


@dataclass(frozen=True)
class MapStep:
    """A map over batches of rows: `fn(batch, *args)` as Ray tasks, or, when `fn` is a class,
    `fn(*args)` built once per actor of a pool of `actors` (its setup) and called on each batch."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    batch_size: int | None = 1  # rows per call; None: a whole block
    actors: int = 0  # the pool's size, for a class
    options: dict[str, Any] = field(default_factory=dict)  # what each task or actor asks Ray for

    @classmethod
    def on_pool(cls, fn: type, args: tuple[Any, ...], pool: ActorPool, batch_size: int | None = 1) -> MapStep:
        return cls(fn, args, batch_size, pool.concurrency, pool.ray_options())


def run_map(rows: pd.DataFrame, steps: Sequence[MapStep], *, blocks: int | None = None, ordered: bool = False,
            on_ray: bool = True) -> Iterator[pd.DataFrame]:
    """The steps' output, a frame at a time: on Ray Data over `blocks` input blocks (default: one
    per first batch; at most `MAX_BLOCKS`), in input order when `ordered`; or inline, lazily, in this process."""
    if rows.empty:
        return iter(())
    if not on_ray:
        return map_inline(rows, steps)
    return map_on_ray(rows, steps, blocks or default_blocks(rows, steps), ordered)


@dataclass(frozen=True)
class Resume:
    """Where a job keeps each finished chunk of its output (`folder`/chunk-<n>.parquet, its footer
    holding the settings that shaped it and a digest of its input rows), so a job run again after a
    kill does only the chunks still missing, and never mixes in a chunk made with other settings
    (`RunChanged`)."""

    storage: Storage
    folder: str
    made_with: dict[str, Any]
    inputs: tuple[str, ...]  # the columns that say what an input row is (a chunk of other rows is done again)
    chunk_rows: int = 64

    def chunk_meta(self, rows: pd.DataFrame) -> dict[str, Any]:
        return chunk_meta(self.made_with, rows[list(self.inputs)].to_dict("list"))


def chunk_meta(made_with: dict[str, Any], inputs: Any) -> dict[str, Any]:
    """A chunk's footer: the settings that made it and a digest of the inputs (JSON) it was made from."""
    identity = json.dumps(inputs, sort_keys=True, default=str)
    return {"made_with": made_with, "inputs": hashlib.sha256(identity.encode()).hexdigest()}


def run_resumable(rows: pd.DataFrame, steps: Sequence[MapStep], resume: Resume, *,
                  on_ray: bool = True) -> Iterator[pd.DataFrame]:
    """`run_map` of steps that keep their rows, a chunk of `resume.chunk_rows` input rows at a time:
    each finished chunk is written before it is yielded, and the chunks a stopped run finished are
    read back instead of done again. Yields the chunks in order."""
    chunk_of = np.arange(len(rows)) // resume.chunk_rows
    wanted = {chunk: resume.chunk_meta(part) for chunk, part in rows.groupby(chunk_of, sort=True)}
    finished = finished_chunks(resume, wanted)
    todo_rows = ~np.isin(chunk_of, sorted(finished))
    sizes = pd.Series(chunk_of[todo_rows]).value_counts(sort=False)
    fresh = even_batches(run_map(rows[todo_rows], steps, blocks=len(sizes), ordered=True, on_ray=on_ray),
                         resume.chunk_rows)
    for chunk, meta in wanted.items():
        key = layout.chunk_file(resume.folder, chunk)
        if chunk in finished:
            yield resume.storage.read_parquet(key).to_pandas()
            continue
        out = next(fresh)
        if len(out) != sizes[chunk]:
            raise RuntimeError(f"a resumable job's steps must keep their rows: chunk {chunk} has {len(out)} "
                               f"of {sizes[chunk]}")
        write_chunk(resume.storage, key, pa.Table.from_pandas(out, preserve_index=False), meta)
        yield out


def finished_chunks(resume: Resume, wanted: dict[int, dict[str, Any]]) -> set[int]:
    """The chunks whose file is whole and made from the same input rows (a chunk cut otherwise is
    done again); refuses any made with other settings."""
    return {number for number in map(layout.chunk_number, resume.storage.list(resume.folder))
            if number in wanted and chunk_is_finished(resume.storage, layout.chunk_file(resume.folder, number),
                                                      wanted[number])}


def write_chunk(storage: Storage, key: str, table: pa.Table, meta: dict[str, Any]) -> None:
    """A finished chunk of a job's output, with `chunk_meta`'s footer."""
    footer = json.dumps(meta, sort_keys=True, default=str).encode()
    storage.write_parquet(key, table.replace_schema_metadata({CHUNK_META: footer}))


def chunk_is_finished(storage: Storage, key: str, wanted: dict[str, Any]) -> bool:
    """Whether the stored chunk at `key` is whole and made from the inputs `wanted` names (else it is
    done again: damaged, or cut from other rows); refuses one made with other settings."""
    try:
        stored = metadata_json((storage.parquet_footer(key).metadata or {}).get(CHUNK_META), storage.url(key), {})
    except DamagedFile as err:
        log.warning("%s: the chunk is done again", err)
        return False
    changes = changed_keys(stored.get("made_with") or {}, wanted["made_with"])
    if changes:
        raise RunChanged(f"{storage.url(key)} was made with other settings:\n  " + "\n  ".join(changes)
                         + "\ndelete that folder or restore those settings")
    return stored.get("inputs") == wanted["inputs"]


def map_on_ray(rows: pd.DataFrame, steps: Sequence[MapStep], blocks: int, ordered: bool) -> Iterator[pd.DataFrame]:
    import ray  # ray: only here (the inline executor runs without it)

    context = ray.data.DataContext.get_current()  # a dataset copies the context when it is created
    saved = context.execution_options.preserve_order, context.raise_original_map_exception
    context.execution_options.preserve_order = ordered
    context.raise_original_map_exception = True  # a step's own error, not Ray Data's UserCodeException
    try:
        dataset = ray.data.from_items(rows.to_dict("records"), override_num_blocks=min(blocks, len(rows), MAX_BLOCKS))
        for step in steps:
            dataset = dataset.map_batches(step.fn, batch_size=step.batch_size, batch_format="pandas",
                                          **ray_step_arguments(ray, step))
        yield from dataset.iter_batches(batch_format="pandas", batch_size=None)
    finally:
        context.execution_options.preserve_order, context.raise_original_map_exception = saved


def raised_error(err: BaseException) -> tuple[str, str]:
    """(type name, message) of the error a step raised. Raised in a Ray task or actor, it arrives
    wrapped in a RayTaskError whose text is the remote traceback: the error is its cause, less the
    retry advice Ray Data appends to a map step's message. Raised in a Ray Train worker, it arrives in
    a WorkerGroupError: the error is the first failed rank's."""
    import ray.exceptions  # ray: only here (the inline executor runs without it)

    if isinstance(err, ray.exceptions.RayTaskError) and err.cause is not None:
        return type(err.cause).__name__, str(err.cause).split(RAY_DATA_RETRY_ADVICE)[0]
    failures = getattr(err, "worker_failures", None)  # Ray Train's WorkerGroupError: each rank's own error
    if isinstance(failures, dict) and failures:
        return raised_error(failures[min(failures)])
    return type(err).__name__, str(err)


def ray_step_arguments(ray: Any, step: MapStep) -> dict[str, Any]:
    if not isinstance(step.fn, type):
        return {"fn_args": step.args, **step.options}
    # Ray Data restarts dead actors and retries their batches (max_restarts=-1 by default)
    return {"fn_constructor_args": step.args, "compute": ray.data.ActorPoolStrategy(size=max(1, step.actors)),
            **step.options}


def default_blocks(rows: pd.DataFrame, steps: Sequence[MapStep]) -> int:
    size = steps[0].batch_size if steps else None
    return max(1, min(MAX_BLOCKS, -(-len(rows) // size) if size else 1))


def map_inline(rows: pd.DataFrame, steps: Sequence[MapStep]) -> Iterator[pd.DataFrame]:
    frames: Iterator[pd.DataFrame] = iter([rows.reset_index(drop=True)])
    for step in steps:
        frames = mapped_inline(step, frames)
    return frames


def mapped_inline(step: MapStep, frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """`step` over `frames`, lazily; a class step is set up now (a model that cannot load fails here)."""
    if isinstance(step.fn, type):
        worker = step.fn(*step.args)
        return (worker(batch) for batch in batches_of(frames, step.batch_size))
    return (step.fn(batch, *step.args) for batch in batches_of(frames, step.batch_size))


def batches_of(frames: Iterator[pd.DataFrame], size: int | None) -> Iterator[pd.DataFrame]:
    for frame in frames:
        if size is None:
            yield frame
            continue
        for start in range(0, len(frame), size):
            yield frame.iloc[start : start + size].reset_index(drop=True)


def even_batches(frames: Iterator[pd.DataFrame], size: int) -> Iterator[pd.DataFrame]:
    """The rows of `frames`, in order, `size` at a time (the last may be shorter): so what is written
    from them does not depend on how the executor cut its output."""
    pending: list[pd.DataFrame] = []
    held = 0
    for frame in frames:
        pending.append(frame)
        held += len(frame)
        while held >= size:
            whole = pd.concat(pending, ignore_index=True)
            yield whole.iloc[:size].reset_index(drop=True)
            pending, held = [whole.iloc[size:]], held - size
    if held:
        yield pd.concat(pending, ignore_index=True)


def show_progress_bars(enabled: bool) -> None:
    """Ray Data's own progress bars, for the jobs this process starts."""
    import ray.data  # ray: only when connected to a cluster

    ray.data.DataContext.get_current().enable_progress_bars = enabled


def cluster_resources() -> dict[str, float]:
    """What the Ray cluster this process is connected to has in all (`CPU`, `GPU`, custom ones)."""
    import ray  # ray: only when connected to a cluster

    return ray.cluster_resources()


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
    """Runs one stage on whole units inside a Ray actor (or inline, for tests and loops); inside
    Ray (`in_ray`) each unit it writes is also recorded in Ray's metrics (`UnitMetrics`)."""

    def __init__(self, step: Step, config_snapshot: dict[str, Any], in_ray: bool = False):
        config = validate_config(config_snapshot)
        self.step = step
        self.run_id = config.run_id
        self.storage = open_storage(config.storage)
        self.stage = step.stage_class(config)
        self.stage.ensure_setup()  # a model that cannot load fails the actor now, before any unit
        self.images = ImageJoin(self.storage, self.run_id)
        self.shaped_by = fingerprint(config, self.stage.shaped_by)
        self.plan: PlanIndex | None = None  # the plan's index (rows and partition per unit), read once
        self.metrics = UnitMetrics(self.run_id, step.name, step.pool(config).num_gpus) if in_ray else None

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
                "counters": dict(self.stage.counters), "describe": self.stage.describe(),
                "facts": self.stage.unit_facts(out), "finished_at": time.time()}
        kept = (*self.stage.draws_images, *self.stage.keeps_images)
        write_unit(self.storage, self.run_id, self.step.name, unit, without_images(self.with_kept_images(out), kept),
                   meta)
        if self.metrics:
            self.metrics.record(meta["counters"], seconds)
        return seconds, len(out)

    def with_kept_images(self, out: pd.DataFrame) -> pd.DataFrame:
        """`out` with the images its stage keeps joined into the rows it accepted (None elsewhere):
        the last stage's unit file then holds whole samples, and a publisher reads one file a unit."""
        needed = [column for column in self.stage.keeps_images if column not in out]
        if not needed:
            return out
        accepted = out["reject_reason"].isna().to_numpy()
        joined = self.images.add(out[accepted].copy(), tuple(needed), np.flatnonzero(accepted).tolist())
        for column in needed:
            out[column] = pd.Series([None] * len(out), index=out.index, dtype=object)
            out.loc[accepted, column] = joined[column]
        return out

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

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        done = [self.run_unit(int(unit)) for unit in batch["unit"]]
        return batch.assign(**{f"seconds_{self.step.name}": np.asarray([seconds for seconds, _ in done], dtype=float),
                               f"rows_{self.step.name}": np.asarray([rows for _, rows in done], dtype=np.int64)})


class UnitChain:
    """Consecutive steps that ask for the same resources, run in one actor: one process
    start and one set of imports instead of several, and no hand-off between them."""

    def __init__(self, steps: list[Step], config_snapshot: dict[str, Any]):
        self.workers = [UnitWorker(step, config_snapshot, in_ray=True) for step in steps]

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        for worker in self.workers:
            batch = worker(batch)
        return batch


def pool_groups(steps: list[Step], config: FactoryConfig) -> list[list[Step]]:
    """Split `steps` into runs of neighbours with identical actor-pool resources."""
    groups: list[list[Step]] = []
    for step in steps:
        if groups and groups[-1][-1].request(config) == step.request(config):
            groups[-1].append(step)
        else:
            groups.append([step])
    return groups


def run_steps(ctx: RunContext, steps: list[Step]) -> dict[str, Any]:
    """Stream every unfinished unit through `steps` on Ray Data; return counts and timing."""
    check_made_with(ctx, steps)
    units = plan_units(ctx.storage, ctx.config.run_id)
    pending = unfinished(ctx, steps, units)
    summary = {"units": len(units), "skipped": len(units) - len(pending), "ran": len(pending)}
    if not pending:
        return summary
    snapshot = ctx.config.snapshot()
    # a chain takes a whole block of units per call: Ray Data keeps ~4 KB in the driver per call
    chains = [MapStep.on_pool(UnitChain, (group, snapshot), group[0].pool(ctx.config), batch_size=None)
              for group in pool_groups(steps, ctx.config)]
    started = time.perf_counter()
    with ctx.watch([step.name for step in steps]):
        results = pd.concat(list(run_map(pd.DataFrame({"unit": pending}), chains, blocks=len(pending))),
                            ignore_index=True)
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


def stage_summary(step: Step, config: FactoryConfig, results: pd.DataFrame, wall: float) -> dict[str, Any]:
    """Counts, rate and accelerator time of one step, for the per-stage summary line."""
    rows = int(results[f"rows_{step.name}"].sum())
    actor_seconds = float(results[f"seconds_{step.name}"].sum())
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
