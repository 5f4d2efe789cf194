"""What a plan is made of, shared by the plan stage and SID's rounds: the plan's columns, the
reference parts and their partitions, the instruction table, the vectorised draws, the cut into
work units, and the loop that writes a plan partition by partition.

A plan is drawn per partition: a run of consecutive reference parts holding about
`PARTITION_JOBS` jobs (at least one part). Each partition draws its jobs with a generator seeded
from the run's seed and its own number, and its unit numbers start where the previous partition's
planned count ends, so the plan does not depend on how many partitions are drawn at once, and no
process ever holds more than the partitions it is drawing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from factory.dataset.instructions import load_bank, render
from factory.dataset.reference_sets import list_parts, set_complete
from factory.framework import layout
from factory.framework.config import StorageConfig
from factory.framework.executor import MapStep, run_map
from factory.framework.stage import RunContext
from factory.framework.storage import Storage, opened
from factory.framework.units import PLAN_FORMAT, plan_part_meta, plan_part_rows, write_plan_index, write_plan_part

PARTITION_JOBS = 65_536  # jobs a partition holds, about (at least one reference part); part of the plan's format
FOOTER_THREADS = 16  # reference parts' footers read at once

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


@dataclass(frozen=True)
class Partition:
    """Consecutive reference parts drawn together: `jobs` is what is planned for them (rows dropped
    later, such as a repeated key, leave unit numbers unused), its units numbered from `first_unit`."""

    index: int
    parts: tuple[str, ...]
    jobs: int
    first_unit: int

    @classmethod
    def from_row(cls, fields: dict[str, Any]) -> Partition:
        """The partition a row of `partition_rows` holds (its fields, as Ray Data gives them back)."""
        return cls(int(fields["index"]), tuple(str(part) for part in fields["parts"]), int(fields["jobs"]),
                   int(fields["first_unit"]))


def partition_rows(partitions: list[Partition]) -> pd.DataFrame:
    """One row per partition: the input of a job that maps over partitions."""
    return pd.DataFrame({"partition": [asdict(partition) for partition in partitions]})


def reference_parts(ctx: RunContext) -> list[tuple[str, int]]:
    """(part key, references in it) of the complete reference set, in id order, from the footers."""
    set_name = ctx.config.references.set
    parts = list_parts(ctx.storage, set_name)
    if not parts or not set_complete(ctx.storage, set_name):
        state = "an unfinished reference set" if parts else "no references"
        where = ctx.storage.url(layout.reference_set(set_name))
        raise PlanError(f"{state} under {where}: run --stage references first")
    with ThreadPoolExecutor(min(FOOTER_THREADS, len(parts))) as pool:
        rows = list(pool.map(lambda key: ctx.storage.parquet_footer(key).num_rows, parts))
    return list(zip(parts, rows))


def partitions_of(parts: list[tuple[str, int]], jobs_per_part: list[int], unit_size: int) -> list[Partition]:
    """Consecutive parts grouped into partitions of at most `PARTITION_JOBS` jobs (or one part),
    each with its planned jobs and first unit."""
    groups: list[list[int]] = []
    held = 0  # jobs in the last group
    for number, jobs in enumerate(jobs_per_part):
        if groups and held + jobs <= PARTITION_JOBS:
            groups[-1].append(number)
            held += jobs
        else:
            groups.append([number])
            held = jobs
    partitions, first_unit = [], 0
    for index, group in enumerate(groups):
        jobs = sum(jobs_per_part[n] for n in group)
        partitions.append(Partition(index, tuple(parts[n][0] for n in group), jobs, first_unit))
        first_unit += -(-jobs // unit_size)
    return [partition for partition in partitions if partition.jobs]


def partition_catalog(storage: Storage, partition: Partition) -> pd.DataFrame:
    """The partition's references (id, subject, domain, part), in part and id order."""
    frames = [storage.read_parquet(part, columns=["reference_id", "subject", "domain"]).to_pandas()
              .assign(reference_part=part) for part in partition.parts]
    catalog = pd.concat(frames, ignore_index=True)
    return catalog.sort_values(["reference_part", "reference_id"], kind="stable").reset_index(drop=True)


def choose_instructions(rng: np.random.Generator, domains: np.ndarray, instructions: pd.DataFrame,
                        weights: np.ndarray | None = None) -> np.ndarray:
    """Per job, the row of `instructions` drawn for it among its domain's (by `weights` when given);
    -1 where the bank has none for the domain. Domains are drawn in sorted order."""
    chosen = np.full(len(domains), -1, dtype=np.int64)
    bank_domains = instructions["domain"].to_numpy()
    for domain in sorted(set(domains.tolist())):
        jobs = np.flatnonzero(domains == domain)
        in_domain = np.flatnonzero(bank_domains == domain)
        if len(in_domain) == 0:
            continue
        if weights is None:
            chosen[jobs] = in_domain[rng.integers(0, len(in_domain), size=len(jobs))]
        else:
            p = weights[in_domain] / weights[in_domain].sum()
            chosen[jobs] = rng.choice(in_domain, size=len(jobs), p=p)
    return chosen


def rendered(instructions: pd.DataFrame, chosen: np.ndarray, subjects: np.ndarray) -> np.ndarray:
    """Each job's instruction text, rendering each distinct (template, subject) pair once."""
    names, subject_codes = np.unique(subjects.astype(str), return_inverse=True)
    pairs, inverse = np.unique(chosen * len(names) + subject_codes, return_inverse=True)
    templates = instructions["template"].to_numpy()
    texts = np.array([render(templates[pair // len(names)], names[pair % len(names)]) for pair in pairs], dtype=object)
    return texts[inverse.reshape(-1)]


def job_columns(catalog: pd.DataFrame, picks: np.ndarray, instructions: pd.DataFrame, chosen: np.ndarray,
                reference_set: str) -> dict[str, Any]:
    """The plan's reference and instruction columns for jobs drawn as (catalog row, instruction row)."""
    references = catalog.iloc[picks]
    bank = instructions.iloc[chosen]
    return {
        "reference_set": reference_set, "reference_part": references["reference_part"].to_numpy(),
        "reference_id": references["reference_id"].to_numpy(), "subject": references["subject"].to_numpy(),
        "domain": references["domain"].to_numpy(), "instruction_id": bank["instruction_id"].to_numpy(),
        "category": bank["category"].to_numpy(), "template": bank["template"].to_numpy(),
        "instruction": rendered(instructions, chosen, references["subject"].to_numpy()),
    }


def plan_fingerprint(settings: dict[str, Any], instructions: pd.DataFrame, parts: list[tuple[str, int]]) -> str:
    """A digest of what draws a plan: the settings (no absolute path: a job unpacked in another
    folder gets the same digest), the instruction bank's content, the reference parts (key and
    size) and the format."""
    bank = hashlib.sha256(instructions.to_json(orient="records").encode()).hexdigest()
    text = json.dumps({"format": PLAN_FORMAT, "partition_jobs": PARTITION_JOBS, "settings": settings,
                       "instructions": bank, "parts": parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


PartitionDraw = Callable[[Storage, Partition], pd.DataFrame]  # a partition's jobs, from the stored references


def write_partitions(storage: Storage, run_id: str, partitions: list[Partition], draw: PartitionDraw,
                     schema: pa.Schema, unit_size: int, fingerprint: str,
                     on_ray: StorageConfig | None = None, drawn_from: dict[str, Any] | None = None) -> dict[str, int]:
    """Draw and write every partition not yet stored with this fingerprint (each held only while it
    is drawn and written), then the plan's index; returns jobs and units. With `on_ray` (the storage
    config the tasks open) each partition is a Ray task (`draw` must then pickle); else this process
    draws them one after another. `drawn_from`: facts the plan's index keeps for whoever resumes it
    (SID's parent version)."""
    meta = {"fingerprint": fingerprint, **(drawn_from or {})}
    step = MapStep(write_partition, (draw, on_ray or storage, run_id, schema, unit_size, meta))
    for _ in run_map(partition_rows(partitions), [step], on_ray=on_ray is not None):
        pass
    if not any(plan_part_rows(storage, run_id, partition.index) for partition in partitions):
        raise PlanError("the plan drew no jobs: no reference has instructions in its domain")
    index = write_plan_index(storage, run_id, [partition.index for partition in partitions], meta)
    return {"jobs": sum(index.rows.values()), "units": len(index.rows)}


def write_partition(batch: pd.DataFrame, draw: PartitionDraw, where: Storage | StorageConfig, run_id: str,
                    schema: pa.Schema, unit_size: int, meta: dict[str, Any]) -> pd.DataFrame:
    """Each partition of `batch` drawn and written, unless already stored with `meta`'s fingerprint."""
    storage = opened(where)
    written = []
    for fields in batch["partition"]:
        partition = Partition.from_row(fields)
        stored = plan_part_meta(storage, run_id, partition.index)
        if stored is None or stored.get("fingerprint") != meta["fingerprint"]:
            jobs = draw(storage, partition)
            table = pa.Table.from_pandas(jobs[schema.names], schema=schema, preserve_index=False)
            write_plan_part(storage, run_id, partition.index, table, unit_size, meta)
            written.append(partition.index)
    return pd.DataFrame({"written": written}, dtype="int64")


def instruction_table(path: str | None) -> pd.DataFrame:
    bank = load_bank(path)
    return pd.DataFrame(
        {"instruction_id": [i.id for i in bank], "domain": [i.domain for i in bank],
         "category": [i.category for i in bank], "template": [i.template for i in bank]}
    ).sort_values("instruction_id", kind="stable").reset_index(drop=True)


def cut_units(jobs: pd.DataFrame, unit_size: int, first_unit: int = 0) -> pd.DataFrame:
    """Order jobs so each reference's jobs sit together, then cut consecutive units numbered from
    `first_unit`."""
    jobs = jobs.drop_duplicates("key").sort_values(["reference_part", "reference_id", "key"], kind="stable")
    jobs = jobs.reset_index(drop=True)
    jobs.insert(1, "unit", first_unit + np.arange(len(jobs)) // unit_size)
    return jobs
