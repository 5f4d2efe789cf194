"""plan: draw (reference, instruction, seed) jobs from the config seed and cut them into units.

The same config gives the same plan, byte for byte: every random draw comes from one
seeded generator over inputs in a fixed order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from factory.context import RunContext
from factory.keys import portable_ref, sample_key

PLAN_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("unit", pa.int64()),
        ("reference_set", pa.string()),
        ("reference_part", pa.string()),
        ("reference_id", pa.string()),
        ("subject", pa.string()),
        ("domain", pa.string()),
        ("instruction_id", pa.string()),
        ("category", pa.string()),
        ("template", pa.string()),
        ("instruction", pa.string()),
        ("seed", pa.int64()),
        ("generator", pa.string()),
        ("round", pa.int64()),
        ("alpha", pa.float64()),
        ("w_id", pa.string()),
    ]
)


class PlanError(ValueError):
    """The plan cannot be drawn from what is configured and stored."""


def reference_catalog(ctx: RunContext) -> pd.DataFrame:
    """Reference ids with their subject, domain and part file, sorted by id."""
    from factory.reference_sets import list_parts, set_complete

    set_name = ctx.config.references.set
    parts = list_parts(ctx.storage, set_name)
    if not parts or not set_complete(ctx.storage, set_name):
        state = "an unfinished reference set" if parts else "no references"
        raise PlanError(f"{state} under {ctx.storage.url(f'references/{set_name}')}: run --stage references first")
    frames = []
    for part in parts:
        table = ctx.storage.read_parquet(part).select(["reference_id", "subject", "domain"])
        frames.append(table.to_pandas().assign(reference_part=part))
    return pd.concat(frames, ignore_index=True).sort_values("reference_id", kind="stable").reset_index(drop=True)


def instruction_table(path: str | None) -> pd.DataFrame:
    from factory.instructions import load_bank

    bank = load_bank(path)
    return pd.DataFrame(
        {"instruction_id": [i.id for i in bank], "domain": [i.domain for i in bank],
         "category": [i.category for i in bank], "template": [i.template for i in bank]}
    ).sort_values("instruction_id", kind="stable").reset_index(drop=True)


def draw_jobs(references: pd.DataFrame, instructions: pd.DataFrame, ctx: RunContext) -> pd.DataFrame:
    from factory.instructions import render

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


def cut_units(jobs: pd.DataFrame, unit_size: int) -> pd.DataFrame:
    """Order jobs so each reference's jobs sit together, then cut consecutive units."""
    jobs = jobs.drop_duplicates("key").sort_values(["reference_part", "reference_id", "key"], kind="stable")
    jobs = jobs.reset_index(drop=True)
    jobs.insert(1, "unit", np.arange(len(jobs)) // unit_size)
    return jobs


def build_plan(ctx: RunContext) -> pa.Table:
    references = reference_catalog(ctx)
    instructions = instruction_table(ctx.config.plan.instructions)
    jobs = cut_units(draw_jobs(references, instructions, ctx), ctx.config.plan.unit_size)
    return pa.Table.from_pandas(jobs, schema=PLAN_SCHEMA, preserve_index=False)


def run(ctx: RunContext) -> dict[str, Any]:
    table = build_plan(ctx)
    key = f"{ctx.run_dir}/plan.parquet"
    if ctx.storage.exists(key):
        existing = ctx.storage.read_parquet(key)
        if not existing.equals(table):
            raise PlanError(
                f"{ctx.storage.url(key)} exists and differs from the plan this config draws; "
                "use a new run_id for a new plan"
            )
    else:
        ctx.storage.write_parquet(key, table)
    units = len(set(table.column("unit").to_pylist()))
    return {"jobs": table.num_rows, "units": units}
