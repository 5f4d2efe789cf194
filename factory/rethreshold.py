"""Re-threshold a published version from its stored scores, running no model.

Only stricter thresholds are possible: a candidate under the parent's thresholds was
never given a dialogue, so a looser rule has nothing to admit. The child version is a
subset of the parent's samples, written as new shards with the new thresholds by the
same Ray job that publishes a run (one parent shard or one new shard per worker at a time).
"""

from __future__ import annotations

import copy
from typing import Any

from factory.config import FactoryConfig, config_sha256
from factory.manifest import VersionError, VersionSpec, load_manifest, read_index
from factory.publisher import VersionSamples, write_version
from factory.storage import Storage
from filters.rules import apply_thresholds


def rethreshold_version(storage: Storage, config: FactoryConfig, parent: str, child: str,
                        thresholds: dict[str, float]) -> dict[str, Any]:
    manifest = load_manifest(storage, config.dataset, parent)
    new_thresholds = {**manifest["thresholds"], **thresholds}
    looser = [rule for rule, value in new_thresholds.items() if value < manifest["thresholds"].get(rule, value)]
    if looser:
        raise VersionError(f"thresholds for {looser} are looser than {parent}'s {manifest['thresholds']}: "
                           "candidates below the old thresholds have no dialogue; re-run the dialogue stage instead")
    index = read_index(storage, config.dataset, parent, columns=["key", "clip_t", "dino"]).to_pandas()
    verdict = apply_thresholds(index, new_thresholds)
    keep = frozenset(index.loc[verdict["threshold_reason"].isna(), "key"])
    snapshot = copy.deepcopy(manifest["config"])
    snapshot.setdefault("filter", {})["thresholds"] = new_thresholds
    reasons = verdict["threshold_reason"].dropna().value_counts()
    spec = VersionSpec(
        dataset=config.dataset, version=child, kind="rethreshold", parents=[parent],
        config=snapshot, config_sha256=config_sha256(snapshot), models=manifest.get("models", {}),
        thresholds=new_thresholds,
        funnel={"parent_samples": manifest["samples"], "written": len(keep),
                "rejections": {f"rethreshold:{reason}": int(n) for reason, n in reasons.items()}},
    )
    source = VersionSamples(config.storage, manifest, keep, child)
    return write_version(storage, config.storage, spec, source, config.publish.shard_max_bytes,
                         config.publish.shard_max_samples, config.publish.executor, config.publish.task_memory)
