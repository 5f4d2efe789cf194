"""Re-threshold a published version from its stored scores, running no model.

Only stricter thresholds are possible: a candidate under the parent's thresholds was
never given a dialogue, so a looser rule has nothing to admit. The child version is a
subset of the parent's samples, written as new shards with the new thresholds by the
same Ray job that publishes a run (one parent shard or one new shard per worker at a time).
"""

from __future__ import annotations

import copy
import math
from typing import Any

from factory.dataset.manifest import VersionError, VersionSpec, load_manifest, read_index
from factory.dataset.publisher import VersionSamples, passes_for, write_version
from factory.framework.config import FactoryConfig, config_sha256
from factory.framework.storage import Storage
from filters.rules import RULES, SCORE_COLUMNS, apply_thresholds


class ThresholdError(ValueError):
    """A `--threshold RULE=VALUE` that is not a known rule with a finite value in [-1, 1]."""


def parse_thresholds(items: list[str]) -> dict[str, float]:
    """`["clip_t=0.32", ...]` as {rule: value}: each rule known and given once, each value a
    finite number in [-1, 1] (the scores are cosine similarities)."""
    thresholds: dict[str, float] = {}
    for item in items:
        rule, value = parse_threshold(item)
        if rule in thresholds:
            raise ThresholdError(f"--threshold {rule} is given twice")
        thresholds[rule] = value
    return thresholds


def parse_threshold(item: str) -> tuple[str, float]:
    if not isinstance(item, str):  # argparse turns `--threshold=--` into an empty list
        raise ThresholdError(f"--threshold expects RULE=VALUE, got {item!r}")
    shown = repr(item if len(item) <= 60 else item[:60] + "...")
    rule, equals, text = item.partition("=")
    rule = rule.strip()
    if not equals:
        raise ThresholdError(f"--threshold expects RULE=VALUE, got {shown}")
    if rule not in RULES:
        raise ThresholdError(f"--threshold {shown}: unknown rule; rules are {', '.join(RULES)}")
    try:
        value = float(text)
    except ValueError:
        raise ThresholdError(f"--threshold {shown}: {rule}'s value is not a number") from None
    if not math.isfinite(value) or not -1.0 <= value <= 1.0:
        raise ThresholdError(f"--threshold {shown}: {rule} must be a finite number in [-1, 1]")
    return rule, value


def rethreshold_version(storage: Storage, config: FactoryConfig, parent: str, child: str,
                        thresholds: dict[str, float]) -> dict[str, Any]:
    manifest = load_manifest(storage, config.dataset, parent)
    new_thresholds = {**manifest["thresholds"], **thresholds}
    looser = [rule for rule, value in new_thresholds.items() if value < manifest["thresholds"].get(rule, value)]
    if looser:
        raise VersionError(f"thresholds for {looser} are looser than {parent}'s {manifest['thresholds']}: "
                           "candidates below the old thresholds have no dialogue; re-run the dialogue stage instead")
    index = read_index(storage, config.dataset, parent, columns=["key", *SCORE_COLUMNS]).to_pandas()
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
    return write_version(storage, spec, source, config.publish.shard_max_bytes, config.publish.shard_max_samples,
                         passes_for(config))
