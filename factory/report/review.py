"""The review of a `reviewed` version: its figures from the manifest and a gallery of the samples its
reviewers disagreed on (from `review.parquet`, images from the parent's shards or its run's files)."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from factory.dataset.manifest import VersionError, load_manifest, read_checked_shard, read_index, shard_checksums
from factory.framework import layout
from factory.framework.storage import Storage
from factory.framework.units import IMAGE_HOMES, ImageJoin
from factory.report.data import candidate_files, read_columns, text
from factory.report.gallery import CARD_COLUMNS, GALLERY_SIZE, JOIN_COLUMNS, Card, scores_of, with_images


def disagreements(storage: Storage, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The first GALLERY_SIZE reviewed keys (in key order) that got both keep and drop votes."""
    table = storage.read_parquet(layout.review_verdicts(manifest["dataset"], manifest["version"]))
    split = table.filter(pc.and_(pc.greater(table.column("keeps"), 0), pc.greater(table.column("drops"), 0)))
    return split.sort_by("key").slice(0, GALLERY_SIZE).to_pylist()


def votes_text(row: dict[str, Any]) -> list[str]:
    return [f"{vote['reviewer']}: {vote['verdict']}" + (f" ({vote['reason']})" if vote["reason"] else "")
            for vote in json.loads(row["votes"])]


def published_cards(storage: Storage, parent: dict[str, Any], rows: dict[str, dict[str, Any]]) -> list[Card]:
    index = read_index(storage, parent["dataset"], parent["version"], columns=["key", "shard"])
    wanted = pc.is_in(index.column("key"), value_set=pa.array(list(rows), pa.string()))
    shards = set(index.filter(wanted).column("shard").to_pylist())
    cards, sums = [], shard_checksums(parent)
    for shard in sorted(shards):
        key = layout.shard(parent["dataset"], parent["version"], shard)
        for sample in read_checked_shard(storage, key, sums.get(key)):
            if sample.key in rows:
                card = Card(sample.key, "disagreement", text(sample.meta.get("instruction")), sample.user,
                            sample.assistant, scores_of(sample.meta.get("scores") or {}))
                card.votes = votes_text(rows[sample.key])
                cards.append(with_images(card, sample.input_image, sample.target_image))
    return cards


def rejected_cards(storage: Storage, run_id: str | None, rows: dict[str, dict[str, Any]]) -> list[Card]:
    if not rows or not run_id:
        return []
    images, cards = ImageJoin(storage, run_id), []
    for unit_file in candidate_files(storage, run_id):
        frame = read_columns(storage, unit_file, (*CARD_COLUMNS, *JOIN_COLUMNS), list(rows))
        if frame.empty:
            continue
        frame = images.add(frame, tuple(name for name in IMAGE_HOMES if name not in frame and name != "w_image"))
        for record in frame.to_dict("records"):
            card = Card(record["key"], "disagreement", text(record.get("instruction")), text(record.get("user")),
                        text(record.get("assistant")), scores_of(record),
                        reason=f"filter said {text(record.get('reject_stage'))}:{text(record.get('reject_reason'))}")
            card.votes = votes_text(rows[record["key"]])
            cards.append(with_images(card, record.get("input_image"), record.get("target_image")))
    return cards


def disagreement_cards(storage: Storage, manifest: dict[str, Any]) -> list[Card]:
    """Cards of the samples the reviewers split on, in key order; [] for a version that was not reviewed."""
    if "review" not in manifest or not manifest.get("parents"):
        return []
    rows = {row["key"]: row for row in disagreements(storage, manifest)}
    try:
        parent = load_manifest(storage, manifest["dataset"], manifest["parents"][0])
    except VersionError:
        return []
    published = {key: row for key, row in rows.items() if row["origin"] == "published"}
    rejected = {key: row for key, row in rows.items() if row["origin"] == "rejected"}
    cards = published_cards(storage, parent, published) + rejected_cards(storage, parent.get("run_id"), rejected)
    return sorted(cards, key=lambda card: card.key)


def ratio(value: Any, interval: list[float] | None = None) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" + (f" (95%: {interval[0]:.3f}–{interval[1]:.3f})" if interval else "")


def figure_rows(review: dict[str, Any]) -> list[list[Any]]:
    precision, recall = review["precision"], review["recall_estimate"]
    published, sample = review["published"], review["rejected_sample"]
    verdicts = ", ".join(f"{name} {count}" for name, count in published.items())
    return [["reviewers", str(review["reviewers"])], ["votes", str(review["votes"])],
            ["precision", ratio(precision["value"], precision.get("interval_95"))],
            ["recall estimate", ratio(recall["value"]) + f" (of {recall['frame_size']} rejections within "
             f"{recall.get('margin')}, {recall['rejected_reviewed']} reviewed, {recall['rejected_kept']} kept)"],
            ["agreement (pairwise)", ratio(review["agreement"]["pairwise"])],
            ["Krippendorff's alpha", ratio(review["agreement"]["krippendorff_alpha"])],
            ["published samples", verdicts],
            ["rejected sample", ", ".join(f"{name} {count}" for name, count in sample.items())],
            ["disagreements", str(review["disagreements"])],
            ["Label Studio project", f"{review['project_id']} at {review['url']}"]]
