"""Live progress of the unit pipeline while `factory.run` runs it: one line per stage, refreshed.

A driver-side thread reads the run's unit footers every few seconds (only the new ones: a whole
unit file does not change during a run) and counts them the way `versions status` does
(`factory.status.run_status`, its pace measured since the watch started): per stage, units done /
planned, candidates per second, pass rate so far (and each filter rule's), ETA, and GPU-hours so far
against the dry run's estimate for this plan (`factory.estimate.unit_stage_hours`). In a terminal
the lines are tqdm bars beside Ray Data's own; otherwise (Ray job logs) one log line per stage every
`log_every` seconds, and a last set at the end when any was logged (a short run adds nothing).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, TextIO

from tqdm import tqdm

from factory.estimate import unit_stage_hours
from factory.framework import layout
from factory.framework.stage import RunContext
from factory.framework.units import plan_unit_rows
from factory.status import HOUR, RunCounters, run_counters, run_status

log = logging.getLogger("factory.progress")

REFRESH_SECONDS = 5.0  # a terminal's bars
LOG_EVERY_SECONDS = 60.0  # a log's lines (`--progress-every`)


@dataclass(frozen=True)
class StageProgress:
    """One stage's line: what its unit files say so far."""

    stage: str
    done: int
    planned: int
    candidates_per_second: float
    pass_rate: float | None  # candidates the stage let through / alive when they reached it
    rule_pass_rates: dict[str, float | None]  # the filter's rules (each with those before it); empty elsewhere
    eta_seconds: float | None
    gpu_hours: float
    estimated_gpu_hours: float | None  # the dry run's figure for this plan

    def line(self) -> str:
        return f"{self.stage}: {self.done}/{self.planned} units, {self.details()}"

    def details(self) -> str:
        rules = "".join(f" {rule} {share(rate)}" for rule, rate in self.rule_pass_rates.items())
        eta = "?" if self.eta_seconds is None else f"{self.eta_seconds / HOUR:.2f} h"
        estimate = "?" if self.estimated_gpu_hours is None else f"{self.estimated_gpu_hours:.3f}"
        return (f"{self.candidates_per_second:.2f} candidates/s, pass {share(self.pass_rate)}{rules}, ETA {eta}, "
                f"GPU-h {self.gpu_hours:.3f} of {estimate} estimated")


def share(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.0%}"


def progress_of(status: dict[str, Any], stages: list[str], estimate: dict[str, float] | None) -> list[StageProgress]:
    """The lines of `stages` from a `run_status` dict."""
    lines = []
    for stage in stages:
        part = status["stages"][stage]
        lines.append(StageProgress(
            stage=stage, done=part["done"], planned=part["planned"],
            candidates_per_second=part["candidates_per_second"], pass_rate=part["pass_rate"],
            rule_pass_rates=status["rule_pass_rates"] if stage == "filter" else {},
            eta_seconds=part["eta_seconds"], gpu_hours=part["gpu_hours"],
            estimated_gpu_hours=None if estimate is None else estimate.get(stage)))
    return lines


class Display(Protocol):
    def show(self, lines: list[StageProgress]) -> None: ...

    def close(self, lines: list[StageProgress] | None) -> None:
        """The block ended: `lines` are the last (None when they could not be read)."""


class ProgressWatch:
    """A context manager: while its block runs, a thread shows the stages' lines every `every` seconds."""

    def __init__(self, ctx: RunContext, stages: list[str], display: Display, every: float,
                 estimate: dict[str, float] | None):
        self.ctx, self.stages, self.display, self.every, self.estimate = ctx, stages, display, every, estimate
        self.known: RunCounters = {}
        self.started = time.time()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, name="factory-progress", daemon=True)

    def snapshot(self) -> list[StageProgress]:
        """The lines now, from the footers of the unit files written since the last snapshot."""
        config = self.ctx.config
        self.known = run_counters(self.ctx.storage, config.run_id, self.known)
        status = run_status(self.ctx.storage, config, config.run_id, since=self.started, counters=self.known)
        return progress_of(status, self.stages, self.estimate)

    def loop(self) -> None:
        while not self.stop.wait(self.every):
            lines = self.safe_snapshot()
            if lines is not None:
                self.display.show(lines)

    def safe_snapshot(self) -> list[StageProgress] | None:
        try:
            return self.snapshot()
        except Exception as err:  # a display must never stop the run it watches
            log.warning("progress not refreshed: %s: %s", type(err).__name__, err)
            return None

    def __enter__(self) -> ProgressWatch:
        self.started = time.time()
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        self.thread.join()
        self.display.close(self.safe_snapshot())


class TerminalBars:
    """One tqdm bar per stage (units done of planned, the rest of the line after it)."""

    def __init__(self, stages: list[str], stream: TextIO):
        self.bars = {stage: tqdm(total=0, desc=f"factory {stage}", unit="unit", file=stream, leave=True,
                                 dynamic_ncols=True, bar_format="{desc}: |{bar:10}| {n}/{total} units{postfix}")
                     for stage in stages}

    def show(self, lines: list[StageProgress]) -> None:
        for line in lines:
            bar = self.bars[line.stage]
            bar.total, bar.n = line.planned, line.done
            bar.set_postfix_str(line.details(), refresh=False)
            bar.refresh()

    def close(self, lines: list[StageProgress] | None) -> None:
        if lines is not None:
            self.show(lines)
        for bar in self.bars.values():
            bar.close()


class LogLines:
    """One log line per stage each time it is called; at the end, a last set if any was logged."""

    def __init__(self) -> None:
        self.logged = False

    def show(self, lines: list[StageProgress]) -> None:
        for line in lines:
            log.info("progress %s", line.line())
        self.logged = True

    def close(self, lines: list[StageProgress] | None) -> None:
        if self.logged and lines is not None:
            self.show(lines)


def planned_gpu_hours(ctx: RunContext, device_kind: str | None, figures: str | None) -> dict[str, float] | None:
    """The dry run's GPU-hours per stage for the plan as written (None when it cannot be priced)."""
    storage, run_id = ctx.storage, ctx.config.run_id
    try:
        candidates = sum(plan_unit_rows(storage, run_id).values())
        generator = plan_generator(ctx) or ctx.config.plan.generator
        return unit_stage_hours(ctx.config, storage, candidates, generator, device_kind, figures)
    except Exception as err:  # an estimate is a comparison, not a reason to stop a run
        log.warning("no GPU-hour estimate for the progress lines: %s: %s", type(err).__name__, err)
        return None


def plan_generator(ctx: RunContext) -> str | None:
    """The generator the plan's first unit draws with (a SID round's plan names G), from the plan's footer."""
    footer = ctx.storage.parquet_footer(layout.plan(ctx.config.run_id))
    column = footer.schema.to_arrow_schema().get_field_index("generator")
    stats = footer.row_group(0).column(column).statistics if column >= 0 and footer.num_row_groups else None
    return stats.min if stats is not None and stats.has_min_max else None


def watch_progress(ctx: RunContext, stages: list[str], terminal: bool, log_every: float,
                   device_kind: str | None = None, figures: str | None = None,
                   stream: TextIO | None = None) -> AbstractContextManager:
    """Bars in a terminal, a log line every `log_every` seconds elsewhere (0: none)."""
    if not terminal and log_every <= 0:
        return nullcontext()
    estimate = planned_gpu_hours(ctx, device_kind, figures)
    if terminal:
        display, every = TerminalBars(stages, stream or sys.stderr), REFRESH_SECONDS
    else:
        display, every = LogLines(), log_every
    return ProgressWatch(ctx, stages, display, every, estimate)


def progress_display(terminal: bool, log_every: float, device_kind: str | None,
                     figures: str | None) -> Callable[[RunContext, list[str]], AbstractContextManager]:
    """What `RunContext.progress` holds for a run of the command line."""
    return partial(watch_progress, terminal=terminal, log_every=log_every, device_kind=device_kind, figures=figures)
