"""`review import`: read a project's votes and publish a `reviewed` version of the samples people kept.

The reviewed version copies no shard: its manifest lists the parent's shards by root-relative path
(only those holding a kept sample) and says `"shards_superset": true`; its index lists exactly the
kept samples, so readers take a reviewed version's samples from its index. Beside it,
`review.parquet` holds every reviewed key's votes, verdict and reasons.

Its default name carries a digest of the votes (`<parent>-reviewed-<8 hex>`): importing the same
votes again finds that version and publishes nothing; new votes publish a new version.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from factory.dataset.manifest import (
    VersionError,
    VersionSpec,
    commit_version,
    index_schema,
    load_manifest,
    publishing,
    read_index,
    shard_key,
    version_exists,
)
from factory.framework import layout
from factory.framework.storage import Storage
from factory.review import studio
from factory.review.export import latest_record
from factory.review.verdicts import PUBLISHED, KeyVerdict, Tally, Vote, figures, gather, tally

VERDICTS_SCHEMA = pa.schema([("key", pa.string()), ("origin", pa.string()), ("verdict", pa.string()),
                             ("keeps", pa.int64()), ("drops", pa.int64()), ("votes", pa.string())])


def votes_digest(record: dict[str, Any], votes: list[Vote]) -> str:
    rows = sorted((vote.key, vote.reviewer, vote.verdict, vote.reason) for vote in votes)
    body = json.dumps([record["version"], record["project_id"], record["url"], rows], ensure_ascii=False)
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def import_review(storage: Storage, dataset: str, version: str, url: str | None = None,
                  project_id: int | None = None, name: str | None = None) -> tuple[dict[str, Any], bool]:
    """Publish the reviewed version of the project's votes: (its manifest, whether it is new)."""
    record = latest_record(storage, dataset, version, project_id)
    client = studio.connect(url or record["url"])
    counted = tally(record["origins"], studio.read_ballots(client, record["project_id"]))
    if not counted.votes:
        raise studio.ReviewError(no_vote_message(record, counted))
    votes = counted.votes
    digest = votes_digest(record, votes)
    name = name or f"{version}-reviewed-{digest[:8]}"
    if version_exists(storage, dataset, name):
        existing = load_manifest(storage, dataset, name)
        if (existing.get("review") or {}).get("votes_sha256") == digest:
            return existing, False
        raise VersionError(f"version {dataset}/{name} exists with other votes; publishing never overwrites "
                           "(choose another --name)")
    return publish_reviewed(storage, record, counted, name, digest), True


def no_vote_message(record: dict[str, Any], counted: Tally) -> str:
    where = f"project {record['project_id']} on {record['url']}"
    if not counted.ignored:
        return (f"{where} has no submitted keep/drop annotation yet: nothing to import "
                f"({record['tasks']} tasks wait for reviewers)")
    return (f"{where} has no valid keep/drop vote: {sum(counted.ignored.values())} annotation(s) ignored "
            f"({ignored_text(counted.summary())}); nothing published")


def ignored_text(summary: dict[str, Any]) -> str:
    """`unknown_key 2, duplicate 1` or `none`."""
    return ", ".join(f"{reason} {count}" for reason, count in summary.get("ignored", {}).items()) or "none"


def publish_reviewed(storage: Storage, record: dict[str, Any], counted: Tally, name: str,
                     digest: str) -> dict[str, Any]:
    dataset, parent = record["dataset"], load_manifest(storage, record["dataset"], record["version"])
    verdicts = gather(record["origins"], counted.votes)
    kept = sorted(item.key for item in verdicts if item.origin == PUBLISHED and item.verdict == "keep")
    review = {"project_id": record["project_id"], "url": record["url"], "exported": record["created"],
              "imported": datetime.now(timezone.utc).isoformat(timespec="seconds"), "votes_sha256": digest,
              "table": "review.parquet", **counted.summary(),
              **figures(verdicts, int(parent["samples"]), record["frame"])}
    spec = VersionSpec(dataset=dataset, version=name, kind="reviewed", parents=[parent["version"]],
                       config=parent.get("config", {}), config_sha256=parent.get("config_sha256", ""),
                       models=parent.get("models", {}), thresholds=parent.get("thresholds", {}),
                       funnel=review_funnel(parent, review, len(kept)),
                       extra={"shards_superset": True, "review": review})
    with publishing(storage, spec):
        index = kept_index(storage, parent, kept)
        kept_per_shard = Counter(index.column("shard").to_pylist())
        shards = [{**shard, "path": shard_key(parent, shard["path"]),
                   "version_samples": kept_per_shard[shard_key(parent, shard["path"])]}
                  for shard in parent["shards"] if shard_key(parent, shard["path"]) in kept_per_shard]
        storage.write_parquet(layout.review_verdicts(dataset, name), verdicts_table(verdicts))
        return commit_version(storage, spec, shards, index)


def review_funnel(parent: dict[str, Any], review: dict[str, Any], kept: int) -> dict[str, Any]:
    counts = review["published"]
    rejections = {f"review:{name}": counts[name] for name in ("drop", "tie", "unreviewed") if counts[name]}
    return {"parent_samples": int(parent["samples"]), "written": kept, "rejections": rejections}


def kept_index(storage: Storage, parent: dict[str, Any], kept: list[str]) -> pa.Table:
    """The parent's index rows of the kept keys, shard paths made root-relative (the version lists them so)."""
    index = read_index(storage, parent["dataset"], parent["version"]).cast(index_schema())
    index = index.filter(pc.is_in(index.column("key"), value_set=pa.array(kept, pa.string())))
    paths = pa.array([shard_key(parent, path) for path in index.column("shard").to_pylist()], pa.string())
    return index.set_column(index.schema.get_field_index("shard"), "shard", paths).sort_by("key")


def verdicts_table(verdicts: list[KeyVerdict]) -> pa.Table:
    rows = [{"key": item.key, "origin": item.origin, "verdict": item.verdict, "keeps": item.keeps,
             "drops": item.drops,
             "votes": json.dumps([{"reviewer": v.reviewer, "verdict": v.verdict, "reason": v.reason}
                                  for v in item.votes], ensure_ascii=False)}
            for item in verdicts]
    return pa.Table.from_pylist(rows, schema=VERDICTS_SCHEMA)
