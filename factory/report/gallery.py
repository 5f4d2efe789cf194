"""The gallery: a deterministic sample of accepted quadruplets and the rejected candidates nearest the thresholds."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from factory import layout
from factory.images import ImageRejected, decode_image, encode_jpeg, fit_within
from factory.report.data import SCORES, VersionData, read_columns, text
from factory.shards import read_shard
from factory.storage import Storage
from factory.units import IMAGE_HOMES, ImageJoin
from filters.rules import RULES

FILTER_REASONS = tuple(RULES.values())
JOIN_COLUMNS = ("unit", "reference_part", "reference_id")  # where a candidate's images are stored
CARD_COLUMNS = ("key", "input_image", "target_image", "instruction", "user", "assistant", "clip_t", "dino",
                "reject_stage", "reject_reason")
GALLERY_SIZE = 8
NEAR_SIZE = 8
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


def rank(version: str, key: str) -> str:
    return hashlib.sha256(f"{version}:{key}".encode()).hexdigest()


def gallery_keys(index: pd.DataFrame, version: str) -> list[str]:
    """A deterministic sample of keys, drawn from at most GALLERY_MAX_SHARDS shards."""
    shard_of = dict(zip(index["key"], index["shard"]))
    ranked = sorted(shard_of, key=lambda key: rank(version, key))
    shards: list[str] = []
    for key in ranked:
        if len(shards) == GALLERY_MAX_SHARDS:
            break
        if shard_of[key] not in shards:
            shards.append(shard_of[key])
    return [key for key in ranked if shard_of[key] in shards][:GALLERY_SIZE]


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
    manifest, index = data.manifest, data.index
    if index.empty:
        return []
    wanted = gallery_keys(index, manifest["version"])
    shards = index.loc[index["key"].isin(wanted), "shard"].unique()
    found, wanted_set = {}, set(wanted)
    for shard in sorted(shards):
        for sample in read_shard(storage, layout.shard(manifest["dataset"], manifest["version"], shard)):
            if sample.key in wanted_set:
                found[sample.key] = sample
    cards = []
    for key in wanted:
        if key not in found:
            continue
        sample = found[key]
        card = Card(key, "accepted", str(sample.meta.get("instruction") or ""), sample.user, sample.assistant,
                    scores_of(sample.meta.get("scores") or {}))
        cards.append(with_images(card, sample.input_image, sample.target_image))
    return cards


def threshold_miss(candidates: pd.DataFrame, thresholds: dict[str, float]) -> pd.Series:
    """How far each candidate fell short of its worst-failed threshold (NaN when no score)."""
    misses = [thresholds[name] - pd.to_numeric(candidates[name], errors="coerce")
              for name in SCORES if name in thresholds and name in candidates]
    if not misses:
        return pd.Series(np.nan, index=candidates.index)
    return pd.concat(misses, axis=1).max(axis=1, skipna=False)


def near_threshold_cards(storage: Storage, data: VersionData) -> list[Card]:
    candidates = data.candidates
    if candidates is None or candidates.empty:
        return []
    thresholds = {name: float(value) for name, value in (data.manifest.get("thresholds") or {}).items()}
    rejected = candidates[candidates["reject_reason"].isin(FILTER_REASONS)].copy()
    rejected["miss"] = threshold_miss(rejected, thresholds)
    nearest = rejected[rejected["miss"].notna()].sort_values(["miss", "key"]).head(NEAR_SIZE)
    rows = {}
    images = ImageJoin(storage, data.manifest.get("run_id"))
    for unit_file, group in nearest.groupby("unit_file"):
        frame = read_columns(storage, unit_file, (*CARD_COLUMNS, *JOIN_COLUMNS), list(group["key"]))
        frame = images.add(frame, tuple(name for name in IMAGE_HOMES if name not in frame))
        for record in frame.to_dict("records"):
            rows[record["key"]] = record
    cards = []
    for key in nearest["key"]:
        record = rows.get(key)
        if record is None:
            continue
        card = Card(key, "rejected", text(record.get("instruction")), text(record.get("user")),
                    text(record.get("assistant")), scores_of(record),
                    reason=f"{text(record.get('reject_stage'))}:{text(record.get('reject_reason'))}")
        cards.append(with_images(card, record.get("input_image"), record.get("target_image")))
    return cards
