"""Re-threshold a published version from its stored scores, running no model.

Only stricter thresholds are possible: a candidate under the parent's thresholds was
never given a dialogue, so a looser rule has nothing to admit. The child version is a
subset of the parent's samples, written as new shards with the new thresholds.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

from factory.config import FactoryConfig, config_sha256
from factory.manifest import VersionError, VersionSpec, load_manifest, publish_version, shard_key, version_dir
from factory.shards import read_shard
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
    index = storage.read_parquet(f"{version_dir(config.dataset, parent)}/index.parquet").to_pandas()
    verdict = apply_thresholds(index, new_thresholds)
    keep = set(index.loc[verdict["threshold_reason"].isna(), "key"])
    samples = [
        replace(sample, meta={**sample.meta, "version": child})
        for shard in manifest["shards"]
        for sample in read_shard(storage, shard_key(manifest, shard["path"]))
        if sample.key in keep
    ]
    snapshot = copy.deepcopy(manifest["config"])
    snapshot.setdefault("filter", {})["thresholds"] = new_thresholds
    reasons = verdict["threshold_reason"].dropna().value_counts()
    spec = VersionSpec(
        dataset=config.dataset, version=child, kind="rethreshold", parents=[parent],
        config=snapshot, config_sha256=config_sha256(snapshot), models=manifest.get("models", {}),
        thresholds=new_thresholds,
        funnel={"parent_samples": manifest["samples"], "written": len(samples),
                "rejections": {f"rethreshold:{reason}": int(n) for reason, n in reasons.items()}},
    )
    return publish_version(storage, spec, samples, config.publish.shard_max_bytes, config.publish.shard_max_samples)
