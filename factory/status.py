"""`python -m factory.versions status RUN`: how far a run is, from its storage root alone.

Reads the plan's index and each finished unit file's footer (counters, the time it was
written), never a row of data, and starts no Ray: it answers from any machine that can read the
storage root, while the run goes on or after it stopped. Per stage: units done of planned; the
funnel so far with every rejection reason; throughput over the last hour; an ETA at that rate;
accelerator hours so far; and whether a publish holds the version's lock.
"""

from __future__ import annotations

import time
from typing import Any

from factory.dataset.manifest import version_exists
from factory.dataset.publisher import MODEL_STAGES, cost, funnel
from factory.framework import layout
from factory.framework.config import FactoryConfig
from factory.framework.storage import Storage
from factory.framework.units import plan_exists, plan_units, whole_unit_metas
from filters.rules import RULES

HOUR = 3600.0


def run_status(storage: Storage, config: FactoryConfig, run_id: str, now: float | None = None) -> dict[str, Any]:
    """Everything `status` prints, as one JSON-ready dict."""
    now = time.time() if now is None else now
    planned = plan_units(storage, run_id) if plan_exists(storage, run_id) else []
    metas = {stage: footers(storage, run_id, stage) for stage in MODEL_STAGES}
    last = MODEL_STAGES[-1]
    stages = {stage: stage_status(metas[stage], len(planned), now) for stage in MODEL_STAGES}
    version = config.publish.version or run_id
    return {
        "run": run_id,
        "units": len(planned),
        "stages": stages,
        "funnel": {**funnel(metas), "planned_units": len(planned)},
        "gpu_hours": round(sum(part["gpu_seconds"] for part in cost(metas, config).values()) / HOUR, 4),
        "eta_seconds": eta(len(planned) - stages[last]["done"], stages[last]["units_last_hour"]),
        "publish": {"version": version, "lock_held": storage.exists(layout.publish_lock(config.dataset, version)),
                    "published": version_exists(storage, config.dataset, version)},
    }


def footers(storage: Storage, run_id: str, stage: str) -> list[dict[str, Any]]:
    """What the footer of every whole unit file of `stage` says, in unit order (one read each)."""
    metas = whole_unit_metas(storage, run_id, stage)
    return [metas[unit] for unit in sorted(metas)]


def stage_status(metas: list[dict[str, Any]], planned: int, now: float) -> dict[str, Any]:
    recent = [meta for meta in metas if now - meta.get("finished_at", float("-inf")) <= HOUR]
    rows = sum(meta.get("counters", {}).get("rows", 0) for meta in recent)
    return {"done": len(metas), "planned": planned, "units_last_hour": len(recent),
            "candidates_per_second": round(rows / HOUR, 4)}


def eta(remaining: int, units_last_hour: int) -> float | None:
    """Seconds until the last stage is done at the last hour's pace; None when nothing finished in it."""
    if remaining <= 0:
        return 0.0
    return round(remaining * HOUR / units_last_hour, 1) if units_last_hour else None


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
