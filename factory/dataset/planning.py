"""What a plan is made of, shared by the plan stage and SID's rounds: the plan's columns,
the reference catalog, the instruction table, and the cut into work units."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from factory.dataset.instructions import load_bank
from factory.dataset.reference_sets import list_parts, set_complete
from factory.framework import layout
from factory.framework.context import RunContext

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
    set_name = ctx.config.references.set
    parts = list_parts(ctx.storage, set_name)
    if not parts or not set_complete(ctx.storage, set_name):
        state = "an unfinished reference set" if parts else "no references"
        where = ctx.storage.url(layout.reference_set(set_name))
        raise PlanError(f"{state} under {where}: run --stage references first")
    frames = []
    for part in parts:
        table = ctx.storage.read_parquet(part, columns=["reference_id", "subject", "domain"])
        frames.append(table.to_pandas().assign(reference_part=part))
    return pd.concat(frames, ignore_index=True).sort_values("reference_id", kind="stable").reset_index(drop=True)


def instruction_table(path: str | None) -> pd.DataFrame:
    bank = load_bank(path)
    return pd.DataFrame(
        {"instruction_id": [i.id for i in bank], "domain": [i.domain for i in bank],
         "category": [i.category for i in bank], "template": [i.template for i in bank]}
    ).sort_values("instruction_id", kind="stable").reset_index(drop=True)


def cut_units(jobs: pd.DataFrame, unit_size: int) -> pd.DataFrame:
    """Order jobs so each reference's jobs sit together, then cut consecutive units."""
    jobs = jobs.drop_duplicates("key").sort_values(["reference_part", "reference_id", "key"], kind="stable")
    jobs = jobs.reset_index(drop=True)
    jobs.insert(1, "unit", np.arange(len(jobs)) // unit_size)
    return jobs
