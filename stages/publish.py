"""publish: a run's accepted candidates -> a dataset version (shards in key order, index, manifest).

The work is `factory.dataset.publisher.publish_run`, a Ray job (SID publishes its rounds with it
too); the funnel and the cost are summed from the counters each unit file keeps, so the
manifest states what happened to every planned job.
"""

from __future__ import annotations

from typing import Any

from factory.dataset.publisher import publish_run
from factory.framework import layout
from factory.framework.stage import RunContext


def run(ctx: RunContext) -> dict[str, Any]:
    manifest = publish_run(ctx)
    return {"version": manifest["version"], "samples": manifest["samples"], "funnel": manifest["funnel"],
            "partial": manifest.get("partial"),
            "manifest": ctx.storage.url(layout.manifest(manifest["dataset"], manifest["version"]))}
