"""What a stage is written against: the `RunContext` every stage's entry `run(ctx)` receives, and
the base every model stage is built on, where a stage declares itself and writes one method.

    class Filter(Stage):
        name = "filter"; source = "generate"; needs_images = ("target_image", "input_image")
        adds = ("clip_t", "dino", "pass_clip_t", "pass_dino")
        def setup(self): ...           # load the models: once per actor, before the first rows
        def process(self, rows): ...   # only live rows; set rows["reject"] to refuse one

The base keeps the rows a stage must not see (already rejected upstream) and puts them back
untouched, turns a `reject` value into `reject_stage` / `reject_reason`, times the call and
keeps counters (`self.count(name, n)`), from which a unit's funnel is read. A stage declares the
columns it adds (`adds`): adding another is an error, and a declared one it did not set is null,
so every unit file of a stage has the same columns. So a stage never drops a row, every
rejection has one format (`stage:reason` when printed), and a stage is tested as a plain
callable on a DataFrame, without Ray.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd

from factory.framework import layout
from factory.framework.config import FactoryConfig
from factory.framework.storage import Storage, open_storage

if TYPE_CHECKING:
    from factory.framework.executor import Step  # the executor builds on this module

REJECT_COLUMNS = ("reject_stage", "reject_reason")
# where a stage runs, not what it makes
# where and how fast a stage runs, and how it reaches its server: not what it makes, so a run may change them
RUNTIME_SETTINGS = ("concurrency", "num_cpus", "num_gpus", "memory", "resources", "executor", "io_threads",
                    "api_key_env", "request_timeout_s", "max_concurrency", "max_retries", "retry_backoff_s")


@dataclass
class RunContext:
    """What every stage's `run(ctx)` receives: the validated config, the opened storage, and what the
    application assembling the stages (`factory.run`) hands down: the unit steps (generate -> filter ->
    dialogue) for a stage that runs them itself (SID, once per round), and the live progress display
    the executor opens while units run (`factory.progress`)."""

    config: FactoryConfig
    storage: Storage = field(default=None)  # opened from config.storage when not given
    unit_steps: tuple[Step, ...] = ()
    # opens the live progress of a run's unit stages (by name) while they run; None: no display
    progress: Callable[[RunContext, list[str]], AbstractContextManager] | None = None

    def __post_init__(self) -> None:
        if self.storage is None:
            self.storage = open_storage(self.config.storage)

    @cached_property
    def run_dir(self) -> str:
        return layout.run_dir(self.config.run_id)

    def watch(self, stages: list[str]) -> AbstractContextManager:
        """The live progress of `stages` while the `with` block runs (nothing without a `progress`)."""
        return self.progress(self, stages) if self.progress else nullcontext()

    def unit_key(self, stage: str, unit: int) -> str:
        return layout.unit_file(self.config.run_id, stage, unit)

    @property
    def version(self) -> str:
        return self.config.publish.version or self.config.run_id


# --- the model stages' base ----------------------------------------------------------------


class Stage:
    """One model stage over the candidate rows of a work unit."""

    name: ClassVar[str]
    source: ClassVar[str] = "plan"  # the stage whose unit files are this stage's input
    needs_images: ClassVar[tuple[str, ...]] = ()  # image columns joined into its input rows
    draws_images: ClassVar[tuple[str, ...]] = ()  # image columns it makes; stored once, in its own files
    keeps_images: ClassVar[tuple[str, ...]] = ()  # image columns stored with the rows it accepts (publish's read)
    adds: ClassVar[tuple[str, ...]] = ()  # every column it adds to the rows (its drawn images included)
    shaped_by: ClassVar[tuple[str, ...]] = ()  # config sections its output depends on (upstream ones too)

    def __init__(self, config: FactoryConfig):
        self.config = config
        self.counters: Counter[str] = Counter()
        self.is_set_up = False

    def setup(self) -> None:
        """Load what `process` needs (models, engines). Constructing a stage loads nothing, so
        the driver can read its declarations; the executor calls this once per actor."""

    def ensure_setup(self) -> None:
        if not self.is_set_up:
            self.setup()
            self.is_set_up = True

    def process(self, rows: pd.DataFrame) -> pd.DataFrame:
        """The live rows (same index) with this stage's columns, and `reject` (None or a reason)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Facts about what this stage runs with (prompt hashes, ...), kept with each unit file."""
        return {}

    def unit_facts(self, out: pd.DataFrame) -> dict[str, Any]:
        """Facts about a unit's output rows kept in its file's footer, for readers that need them
        without reading the rows (publish's shard cut reads the samples' sizes there)."""
        return {}

    def count(self, name: str, value: float = 1) -> None:
        self.counters[name] += value

    def __call__(self, rows: pd.DataFrame) -> pd.DataFrame:
        self.ensure_setup()
        started = time.perf_counter()
        self.counters = Counter()
        rows = with_reject_columns(rows.reset_index(drop=True))
        live = rows["reject_reason"].isna().to_numpy()
        done = self.process(rows[live].copy())
        if len(done) != int(live.sum()) or not done.index.equals(rows.index[live]):
            raise RuntimeError(f"stage {self.name} changed its rows; a stage keeps every live row it is given")
        done = self.with_declared_columns(rows, done)
        out = merge_live(rows, done, live)
        reasons = done["reject"] if "reject" in done else pd.Series(dtype=object)
        rejected = reasons[reasons.notna()]
        out.loc[rejected.index, "reject_stage"] = self.name
        out.loc[rejected.index, "reject_reason"] = rejected.astype(str)
        for column in REJECT_COLUMNS:
            out[column] = out[column].astype(object).where(out[column].notna(), None)
        self.count("rows", len(rows))
        self.count("live_in", int(live.sum()))
        self.count("live_out", int(live.sum()) - len(rejected))
        for reason, number in rejected.value_counts().items():
            self.count(f"rejected:{reason}", int(number))
        self.count("seconds", time.perf_counter() - started)
        return out


    def with_declared_columns(self, rows: pd.DataFrame, done: pd.DataFrame) -> pd.DataFrame:
        undeclared = sorted(set(done.columns) - set(rows.columns) - set(self.adds) - {"reject"})
        if undeclared:
            raise RuntimeError(f"stage {self.name} added columns it does not declare in `adds`: {undeclared}")
        for column in self.adds:
            if column not in done:
                done[column] = pd.Series([None] * len(done), index=done.index, dtype=object)
        return done


def with_reject_columns(rows: pd.DataFrame) -> pd.DataFrame:
    for column in REJECT_COLUMNS:
        rows[column] = rows[column].astype(object) if column in rows else pd.Series([None] * len(rows), dtype=object)
    return rows


def merge_live(rows: pd.DataFrame, done: pd.DataFrame, live: np.ndarray) -> pd.DataFrame:
    """The processed live rows and the untouched others, back in their order; the others get
    nulls in the columns this stage added (so every unit file has every column)."""
    done = done.drop(columns="reject", errors="ignore")
    parts = [frame for frame in (done, rows[~live]) if len(frame)]
    out = pd.concat(parts).loc[rows.index] if parts else done
    for column in done.columns:
        if column not in out:
            out[column] = pd.Series([None] * len(out), index=out.index, dtype=object)
    return out


# --- what shaped a unit ----------------------------------------------------------------


def fingerprint(config: FactoryConfig, sections: tuple[str, ...]) -> dict[str, Any]:
    """The config settings that shape a stage's output, flattened to `section.key` -> value.

    `RUNTIME_SETTINGS` are left out (where and how fast a stage runs does not change what it makes), and local
    model paths are written as `factory.framework.layout.portable_ref` writes them.
    """
    snapshot = config.snapshot()
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for key in sorted(node):
                walk(f"{prefix}.{key}", node[key])
        else:
            flat[prefix] = layout.portable_ref(node) if isinstance(node, str) else node

    for section in sections:
        for key, value in sorted(snapshot[section].items()):
            if key not in RUNTIME_SETTINGS:
                walk(f"{section}.{key}", value)
    return flat


def settings_named(config: FactoryConfig, prefix: str) -> dict[str, Any]:
    """The `fingerprint` settings whose `section.key` starts with `prefix` (e.g. "references.sd_")."""
    return {key: value for key, value in fingerprint(config, (prefix.split(".", 1)[0],)).items()
            if key.startswith(prefix)}


def changed_keys(made_with: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every setting that differs."""
    return [f"{key}: {made_with.get(key)!r} -> {now.get(key)!r}"
            for key in sorted(set(made_with) | set(now)) if made_with.get(key) != now.get(key)]
