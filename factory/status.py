"""`python -m factory.versions status RUN`: how far a run is, from its storage root alone.

Reads the plan's index and each finished unit file's footer (counters, the time it was
written), never a row of data, and starts no Ray: it answers from any machine that can read the
storage root, while the run goes on or after it stopped. Per stage: units done of planned, pass
rate so far, throughput over the last hour, an ETA at that rate and accelerator hours so far; the
funnel so far with every rejection reason and each filter rule's pass rate; and whether a publish
holds the version's lock. `factory.progress` shows the same numbers live during a run.
"""

from __future__ import annotations

import time
from typing import Any

import pandas as pd

from factory.dataset.manifest import version_exists
from factory.dataset.publisher import MODEL_STAGES, cost, counter_total, funnel
from factory.framework import layout
from factory.framework.config import FactoryConfig
from factory.framework.storage import Storage
from factory.framework.units import plan_exists, plan_unit_rows, unit_counters
from filters.rules import RULES

HOUR = 3600.0


RunCounters = dict[str, pd.DataFrame]  # stage -> its whole units' counters (`unit_counters`)


def run_status(storage: Storage, config: FactoryConfig, run_id: str, now: float | None = None,
               since: float | None = None, counters: RunCounters | None = None) -> dict[str, Any]:
    """Everything `status` prints, as one JSON-ready dict. Throughput and ETA count the units
    finished in the last hour, or since `since` when that is later (a watch that started then);
    `counters`: what `run_counters` read (default: read now)."""
    now = time.time() if now is None else now
    planned = len(plan_unit_rows(storage, run_id)) if plan_exists(storage, run_id) else 0  # the plan index
    counters = run_counters(storage, run_id) if counters is None else counters
    window_start = now - HOUR if since is None else max(now - HOUR, since)
    costs = cost(counters, config)
    stages = {stage: stage_status(counters[stage], planned, now, window_start, costs[stage]["gpu_seconds"])
              for stage in MODEL_STAGES}
    funnel_now = funnel(counters)
    version = config.publish.version or run_id
    return {
        "run": run_id,
        "units": planned,
        "stages": stages,
        "funnel": {**funnel_now, "planned_units": planned},
        "rule_pass_rates": {rule.name: ratio(funnel_now[rule.funnel], stages["filter"]["live_in"])
                            for rule in RULES.values()},
        "gpu_hours": round(sum(part["gpu_seconds"] for part in costs.values()) / HOUR, 4),
        "eta_seconds": stages[MODEL_STAGES[-1]]["eta_seconds"],
        "publish": {"version": version, "lock_held": storage.exists(layout.publish_lock(config.dataset, version)),
                    "published": version_exists(storage, config.dataset, version)},
    }


def run_counters(storage: Storage, run_id: str, known: RunCounters | None = None) -> RunCounters:
    """The counters of every whole unit file of each model stage (one footer read each; `known` ones
    not again)."""
    known = known or {}
    return {stage: unit_counters(storage, run_id, stage, known.get(stage)) for stage in MODEL_STAGES}


def stage_status(counters: pd.DataFrame, planned: int, now: float, window_start: float,
                 gpu_seconds: float) -> dict[str, Any]:
    """One stage's units done, candidates and pass rate so far, and its pace since `window_start`."""
    recent = counters[counters["finished_at"] >= window_start]  # a unit with no time is never recent
    window = max(now - window_start, 1.0)
    live_in, live_out = (int(counter_total(counters, name)) for name in ("live_in", "live_out"))
    return {"done": len(counters), "planned": planned, "units_last_hour": len(recent),
            "candidates_per_second": round(counter_total(recent, "rows") / window, 4),
            "candidates": int(counter_total(counters, "rows")),
            "live_in": live_in, "accepted": live_out, "pass_rate": ratio(live_out, live_in),
            "gpu_hours": round(gpu_seconds / HOUR, 4),
            "eta_seconds": eta(planned - len(counters), len(recent), window)}


def ratio(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole else None


def eta(remaining: int, recent_units: int, window: float = HOUR) -> float | None:
    """Seconds until `remaining` units are done at the pace of the `recent_units` finished in the last
    `window` seconds; None when none finished in it."""
    if remaining <= 0:
        return 0.0
    return round(remaining * window / recent_units, 1) if recent_units else None


def status_lines(status: dict[str, Any]) -> list[str]:
    """The human form of `run_status`."""
    lines = [f"run {status['run']}: {status['units']} units planned"]
    for stage, part in status["stages"].items():
        lines.append(f"  {stage:<9} {part['done']:>7}/{part['planned']} units  "
                     f"{part['units_last_hour']:>5} in the last hour  {part['candidates_per_second']:.3f} candidates/s")
    gates = ("generated", *(rule.funnel for rule in RULES.values()), "dialogue_accepted")
    funnel_now = status["funnel"]
    lines.append("funnel so far: planned " + str(funnel_now["planned"]) + "".join(
        f" -> {gate} {funnel_now[gate]}" for gate in gates if gate in funnel_now))
    for reason, count in funnel_now["rejections"].items():
        lines.append(f"  rejected {count:>7}  {reason}")
    eta_text = "unknown (no unit finished in the last hour)" if status["eta_seconds"] is None \
        else f"{status['eta_seconds'] / HOUR:.2f} h"
    publish = status["publish"]
    lines += [f"accelerator hours so far: {status['gpu_hours']:.3f}", f"ETA: {eta_text}",
              f"publish {publish['version']}: " + ("published" if publish["published"] else
                                                   "lock held (a publish is running or died)" if publish["lock_held"]
                                                   else "not published")]
    return lines
