"""plan: draw (reference, instruction, seed) jobs from the config seed and cut them into units.

The plan is drawn partition by partition (`factory.dataset.planning`): each partition (a run of
reference parts) draws its jobs with numpy from a generator seeded by `(plan.seed, partition)`
and is written as soon as it is drawn, so the same config gives the same plan, byte for byte,
however many partitions are drawn at once, and no process holds more than a partition.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from factory.dataset.planning import (
    PLAN_SCHEMA,
    Partition,
    PlanError,
    choose_instructions,
    cut_units,
    instruction_table,
    job_columns,
    partition_catalog,
    partitions_of,
    plan_fingerprint,
    reference_parts,
    write_partitions,
)
from factory.dataset.reference_sets import set_digest
from factory.framework import layout
from factory.framework.config import FactoryConfig
from factory.framework.layout import portable_ref, sample_key
from factory.framework.stage import RunContext
from factory.framework.storage import DamagedFile, Storage
from factory.framework.units import PlanIndex, plan_exists, plan_index

log = logging.getLogger(__name__)
__all__ = ["PlanError", "run"]


def partitions(ctx: RunContext, parts: list[tuple[str, int]]) -> list[Partition]:
    """The plan's partitions: `plan.jobs_per_reference` jobs per reference, or `plan.total_jobs`
    spread over the parts by a multinomial draw seeded by `plan.seed` (each part's share is its
    references')."""
    plan = ctx.config.plan
    sizes = np.array([rows for _, rows in parts], dtype=np.int64)
    if plan.total_jobs is not None:
        jobs = np.random.default_rng([plan.seed, 2**32 - 1]).multinomial(plan.total_jobs, sizes / sizes.sum())
    else:
        jobs = sizes * plan.jobs_per_reference
    return partitions_of(parts, jobs.tolist(), plan.unit_size)


@dataclass(frozen=True)
class PlanDraw:
    """Draws one partition's jobs (`draw_partition`); pickles, so a Ray task can draw it."""

    config: FactoryConfig
    instructions: pd.DataFrame

    def __call__(self, storage: Storage, partition: Partition) -> pd.DataFrame:
        return draw_partition(self.config, storage, partition, self.instructions)


def draw_partition(config: FactoryConfig, storage: Storage, partition: Partition,
                   instructions: pd.DataFrame) -> pd.DataFrame:
    """One partition's jobs, in unit order, vectorised: references (every one `jobs_per_reference`
    times, or drawn uniformly), an instruction of each reference's domain, a seed, then the keys."""
    plan = config.plan
    rng = np.random.default_rng([plan.seed, partition.index])
    catalog = partition_catalog(storage, partition)
    if plan.total_jobs is not None:
        picks = rng.integers(0, len(catalog), size=partition.jobs)
    else:
        picks = np.repeat(np.arange(len(catalog)), plan.jobs_per_reference)
    domains = catalog["domain"].to_numpy()[picks]
    chosen = choose_instructions(rng, domains, instructions)
    if (chosen < 0).any():
        raise PlanError(f"the instruction bank has no templates for domain {domains[chosen < 0][0]!r}")
    seeds = rng.integers(0, 2**31 - 1, size=len(picks)).tolist()
    jobs = pd.DataFrame({**job_columns(catalog, picks, instructions, chosen, config.references.set),
                         "seed": seeds, "generator": plan.generator, "round": 0, "alpha": None, "w_id": None})
    checkpoint = generator_checkpoint(config)
    jobs.insert(0, "key", [
        sample_key(reference_id=reference_id, instruction_id=instruction_id, instruction=text, seed=seed,
                   generator=plan.generator, checkpoint=checkpoint, round=0)
        for reference_id, instruction_id, text, seed in zip(jobs["reference_id"], jobs["instruction_id"],
                                                            jobs["instruction"], seeds)])
    return cut_units(jobs, plan.unit_size, partition.first_unit)


def generator_checkpoint(config: FactoryConfig) -> str | None:
    spec = config.generate.generators.get(config.plan.generator)
    if spec is None:
        raise PlanError(f"plan.generator {config.plan.generator!r} is not configured under generate.generators")
    return portable_ref(spec.checkpoint or spec.model)


def fingerprint(ctx: RunContext, instructions: pd.DataFrame, parts: list[tuple[str, int]]) -> str:
    settings = {"plan": ctx.config.plan.model_dump(exclude={"instructions", "executor"}),
                "checkpoint": generator_checkpoint(ctx.config),
                "references.set": ctx.config.references.set}
    return plan_fingerprint(settings, instructions, parts)


def run(ctx: RunContext) -> dict[str, Any]:
    """Write the run's plan, or check that the stored one is what this config draws (a plan of
    another format, or drawn from other settings or references, is refused: use a new run_id).
    Partitions already stored with the same settings (a plan stopped half-way) are kept. With
    `plan.executor: ray` each partition is drawn by a Ray task, else one after another here."""
    parts = reference_parts(ctx)
    instructions = instruction_table(ctx.config.plan.instructions)
    digest = fingerprint(ctx, instructions, parts)
    run_id = ctx.config.run_id
    index = stored_index(ctx)
    if index is not None:
        if index.meta.get("fingerprint") != digest:
            raise PlanError(f"{ctx.storage.url(layout.plan(run_id))} exists and differs from the plan this config "
                            "draws; use a new run_id for a new plan")
        return {"jobs": sum(index.rows.values()), "units": len(index.rows)}
    on_ray = ctx.config.storage if ctx.config.plan.executor == "ray" else None
    return write_partitions(ctx.storage, run_id, partitions(ctx, parts), PlanDraw(ctx.config, instructions),
                            PLAN_SCHEMA, ctx.config.plan.unit_size, digest, on_ray,
                            {"reference_digest": set_digest(ctx.storage, ctx.config.references.set)})


def stored_index(ctx: RunContext) -> PlanIndex | None:
    """The run's stored plan index; None when there is none, or when it is damaged (named in a
    warning): the plan is drawn again, and drawing gives the same plan. Another format is refused."""
    if not plan_exists(ctx.storage, ctx.config.run_id):
        return None
    try:
        return plan_index(ctx.storage, ctx.config.run_id)
    except DamagedFile as err:
        log.warning("%s: the plan is drawn again", err)
        return None
