"""The version report's eval section: DreamBench-style scores of the generators trained on this version.

`--stage eval` stores one JSON report per (checkpoint, eval set) under `evals/generator/`
(`factory.framework.layout.eval_result`), naming the version the checkpoint was trained on; the report of
that version lists them, newest first.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from factory.framework import layout
from factory.framework.storage import Storage, StorageError

log = logging.getLogger(__name__)

EVAL_METRICS = ("dino", "clip_i", "clip_t")


def evals_of_version(storage: Storage, dataset: str, version: str) -> list[dict[str, Any]]:
    """The stored eval reports of generators trained on `dataset`/`version`, newest first."""
    found = []
    for key in storage.list(layout.eval_results("generator")):
        if not key.endswith(".json"):
            continue
        try:
            report = json.loads(storage.read_bytes(key))
        except (StorageError, ValueError, RecursionError) as err:
            log.warning("report: skipping unreadable eval report %s: %s", key, err)
            continue
        if not has_eval_shape(report):
            log.warning("report: skipping eval report %s: not an eval report's shape", key)
            continue
        trained_on = report.get("trained_on") or {}
        if trained_on.get("version") == version and trained_on.get("dataset") in (dataset, None):
            found.append({**report, "key": key})
    return sorted(found, key=lambda r: str(r.get("created")), reverse=True)


def has_eval_shape(report: Any) -> bool:
    """An object whose `trained_on` is an object (or absent) and whose `metrics` holds each metric as a number."""
    if not isinstance(report, dict) or not isinstance(report.get("trained_on") or {}, dict):
        return False
    metrics = report.get("metrics")
    return isinstance(metrics, dict) and all(
        isinstance(metrics.get(m), (int, float)) and not isinstance(metrics.get(m), bool) for m in EVAL_METRICS)


def eval_rows(reports: list[dict[str, Any]]) -> list[list[Any]]:
    """One table row per report: checkpoint, eval set, how G was conditioned, images, the three means, when."""
    return [[r.get("checkpoint"), r.get("eval_set"), r.get("semantic"), int(r.get("images", 0)),
             *(float(r["metrics"][m]) for m in EVAL_METRICS), r.get("created")] for r in reports]
