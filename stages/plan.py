"""plan: draw (reference, instruction, seed) jobs from the config seed and cut them into units.

The same config gives the same plan, byte for byte: every random draw comes from one
seeded generator over inputs in a fixed order.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from factory.dataset.instructions import render
from factory.dataset.planning import PLAN_SCHEMA, PlanError, cut_units, instruction_table, reference_catalog  # noqa: F401
from factory.framework import layout
from factory.framework.context import RunContext
from factory.framework.keys import portable_ref, sample_key
from factory.framework.storage import DamagedFile
from factory.framework.units import write_plan

log = logging.getLogger(__name__)


def draw_jobs(references: pd.DataFrame, instructions: pd.DataFrame, ctx: RunContext) -> pd.DataFrame:
    plan_config = ctx.config.plan
    rng = np.random.default_rng(plan_config.seed)
    if plan_config.total_jobs is not None:
        picks = rng.integers(0, len(references), size=plan_config.total_jobs)
    else:
        picks = np.repeat(np.arange(len(references)), plan_config.jobs_per_reference)
    spec = ctx.config.generate.generators.get(plan_config.generator)
    if spec is None:
        raise PlanError(f"plan.generator {plan_config.generator!r} is not configured under generate.generators")
    by_domain = {domain: group for domain, group in instructions.groupby("domain")}
    rows = []
    for pick in picks:
        reference = references.iloc[int(pick)]
        choices = by_domain.get(reference["domain"])
        if choices is None:
            raise PlanError(f"the instruction bank has no templates for domain {reference['domain']!r}")
        instruction = choices.iloc[int(rng.integers(0, len(choices)))]
        seed = int(rng.integers(0, 2**31 - 1))
        text = render(instruction["template"], reference["subject"])
        key = sample_key(reference_id=reference["reference_id"], instruction_id=instruction["instruction_id"],
                         instruction=text, seed=seed, generator=plan_config.generator,
                         checkpoint=portable_ref(spec.checkpoint or spec.model), round=0)
        rows.append({
            "key": key, "reference_set": ctx.config.references.set, "reference_part": reference["reference_part"],
            "reference_id": reference["reference_id"], "subject": reference["subject"], "domain": reference["domain"],
            "instruction_id": instruction["instruction_id"], "category": instruction["category"],
            "template": instruction["template"], "instruction": text, "seed": seed,
            "generator": plan_config.generator, "round": 0, "alpha": None, "w_id": None,
        })
    return pd.DataFrame(rows)


def build_plan(ctx: RunContext) -> pa.Table:
    references = reference_catalog(ctx)
    instructions = instruction_table(ctx.config.plan.instructions)
    jobs = cut_units(draw_jobs(references, instructions, ctx), ctx.config.plan.unit_size)
    return pa.Table.from_pandas(jobs, schema=PLAN_SCHEMA, preserve_index=False)


def run(ctx: RunContext) -> dict[str, Any]:
    table = build_plan(ctx)
    key = layout.plan(ctx.config.run_id)
    existing = stored_plan(ctx, key)
    if existing is None:
        write_plan(ctx.storage, ctx.config.run_id, table, ctx.config.plan.unit_size)
    elif not existing.equals(table):
        raise PlanError(
            f"{ctx.storage.url(key)} exists and differs from the plan this config draws; "
            "use a new run_id for a new plan"
        )
    units = len(set(table.column("unit").to_pylist()))
    return {"jobs": table.num_rows, "units": units}


def stored_plan(ctx: RunContext, key: str) -> pa.Table | None:
    """The run's stored plan; None when there is none, or when it is damaged (named in a warning):
    the plan is drawn again from the config, so writing it again gives the same plan."""
    if not ctx.storage.exists(key):
        return None
    try:
        return ctx.storage.read_parquet(key)
    except DamagedFile as err:
        log.warning("%s: the plan is drawn again", err)
        return None
