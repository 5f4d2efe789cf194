"""The gallery: a deterministic sample of accepted quadruplets and the rejected candidates nearest the thresholds."""

from __future__ import annotations

import base64
import heapq
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from factory.dataset.manifest import read_checked_shard, shard_checksums, version_keys
from factory.framework import layout
from factory.framework.images import ImageRejected, decode_image, encode_jpeg, fit_within
from factory.framework.storage import Storage
from factory.framework.units import IMAGE_HOMES, ImageJoin
from factory.report.data import VersionData, read_columns, text
from factory.report.summary import SCORES, rank
from filters.rules import SCORE_COLUMNS

JOIN_COLUMNS = ("unit", "reference_part", "reference_id")  # where a candidate's images are stored
CARD_COLUMNS = ("key", "input_image", "target_image", "instruction", "user", "assistant", *SCORE_COLUMNS,
                "reject_stage", "reject_reason")
GALLERY_SIZE = 8
GALLERY_MAX_SHARDS = 2  # shards read for the gallery, however large the version
THUMB_SIDE = 256


@dataclass
class Card:
    """One gallery entry: a quadruplet (or a rejected candidate) with its scores."""

    key: str
    status: str  # "accepted" | "rejected"
    instruction: str
    user: str
    assistant: str
    scores: dict[str, float]
    reason: str = ""
    input_uri: str = ""
    target_uri: str = ""
    image_problems: list[str] = field(default_factory=list)
    votes: list[str] = field(default_factory=list)  # a reviewed sample's votes, "reviewer: verdict (reason)"


def thumbnail(data: bytes | None) -> tuple[str, str]:
    """(data URI, problem): a small JPEG of an untrusted image, or the reason it could not be shown."""
    try:
        image = fit_within(decode_image(data), THUMB_SIDE)
    except ImageRejected as err:
        return "", err.reason
    encoded = base64.b64encode(encode_jpeg(image, quality=85)).decode("ascii")
    return f"data:image/jpeg;base64,{encoded}", ""


def with_images(card: Card, input_image: bytes | None, target_image: bytes | None) -> Card:
    for attribute, data, label in (("input_uri", input_image, "x"), ("target_uri", target_image, "x~")):
        uri, problem = thumbnail(data)
        setattr(card, attribute, uri)
        if problem:
            card.image_problems.append(f"{label}: {problem}")
    return card


def scores_of(values: dict[str, Any]) -> dict[str, float]:
    scores = {}
    for name in SCORES:
        value = values.get(name)
        scores[name] = float("nan") if value is None or pd.isna(value) else float(value)
    return scores


def accepted_cards(storage: Storage, data: VersionData) -> list[Card]:
    """A deterministic sample: the first keys, by rank, of the GALLERY_MAX_SHARDS shards that hold the first ranks."""
    manifest = data.manifest
    keep = version_keys(storage, manifest)  # a reviewed version's shards also hold the samples people dropped
    sums = shard_checksums(manifest)
    keys = (layout.shard(manifest["dataset"], manifest["version"], shard)
            for shard in data.index.gallery_shards(GALLERY_MAX_SHARDS))
    samples = (sample for key in keys for sample in read_checked_shard(storage, key, sums.get(key))
               if keep is None or sample.key in keep)
    cards = []
    for sample in heapq.nsmallest(GALLERY_SIZE, samples, key=lambda sample: rank(manifest["version"], sample.key)):
        card = Card(sample.key, "accepted", str(sample.meta.get("instruction") or ""), sample.user, sample.assistant,
                    scores_of(sample.meta.get("scores") or {}))
        cards.append(with_images(card, sample.input_image, sample.target_image))
    return cards


def near_threshold_cards(storage: Storage, data: VersionData) -> list[Card]:
    """The rejected candidates nearest the thresholds (kept while the unit files were read), with their images."""
    if data.candidates is None or not data.candidates.nearest:
        return []
    nearest = data.candidates.nearest
    wanted: dict[str, list[str]] = {}
    for _, key, unit_file in nearest:
        wanted.setdefault(unit_file, []).append(key)
    rows = {}
    images = ImageJoin(storage, data.manifest.get("run_id"))
    for unit_file, keys in sorted(wanted.items()):
        frame = read_columns(storage, unit_file, (*CARD_COLUMNS, *JOIN_COLUMNS), keys)
        frame = images.add(frame, tuple(name for name in IMAGE_HOMES if name not in frame))
        for record in frame.to_dict("records"):
            rows[record["key"]] = record
    cards = []
    for _, key, _ in nearest:
        record = rows.get(key)
        if record is None:
            continue
        card = Card(key, "rejected", text(record.get("instruction")), text(record.get("user")),
                    text(record.get("assistant")), scores_of(record),
                    reason=f"{text(record.get('reject_stage'))}:{text(record.get('reject_reason'))}")
        cards.append(with_images(card, record.get("input_image"), record.get("target_image")))
    return cards
