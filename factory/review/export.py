"""`review export`: one Label Studio task per sample of a version, plus (optionally) a seeded sample of
the candidates the filter rejected near its thresholds, so people judge both sides of the filter.

Images travel inside the tasks as JPEG data URIs (longest side IMAGE_SIDE): this works the same for a
local or an S3 storage root, hands Label Studio no storage credential, needs no route from the
reviewer's browser to the bucket and never expires (a presigned URL lasts 7 days at most, longer than
few reviews take but not all). The cost is Label Studio's database: about 2 x 40 KB per task, so a
10,000-task review is a few hundred MB there.

Reviewers are not told which side of the filter a task came from (its origin and scores stay in the
review record, in storage), and the project deals tasks in random order (uniform sampling).
"""

from __future__ import annotations

import base64
import heapq
import json
import logging
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from factory.dataset.manifest import load_manifest, read_checked_shard, shard_key, version_keys
from factory.framework import layout
from factory.framework.images import ImageRejected, decode_image, encode_jpeg, fit_within
from factory.framework.storage import Storage
from factory.framework.units import IMAGE_HOMES, ImageJoin
from factory.report.data import candidate_files, read_columns, text
from factory.report.gallery import CARD_COLUMNS, JOIN_COLUMNS
from factory.report.summary import FILTER_REASONS, rank, threshold_miss
from factory.review import studio
from factory.review.verdicts import PUBLISHED, REJECTED

log = logging.getLogger(__name__)
EXPORTING = "exporting"  # a review record's status while its tasks are sent: the export did not finish

IMAGE_SIDE = 512
FRAME_COLUMNS = ("key", "clip_t", "dino", "reject_reason")


def data_uri(data: bytes | None) -> str:
    """A JPEG data URI of an untrusted image, or "" when it cannot be decoded."""
    try:
        image = fit_within(decode_image(data), IMAGE_SIDE)
    except ImageRejected:
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(encode_jpeg(image, quality=90)).decode("ascii")


def task(key: str, input_image, target_image, instruction, user, assistant) -> dict[str, Any]:
    return {"key": key, "x": data_uri(input_image), "x_new": data_uri(target_image),
            "instruction": text(instruction), "user": text(user) or "(none: the filter stopped it before dialogue)",
            "assistant": text(assistant) or "(none)"}


def published_tasks(storage: Storage, manifest: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One task per sample of the version, shard by shard (a reviewed version's shards hold more)."""
    wanted = version_keys(storage, manifest)
    for shard in manifest["shards"]:
        for sample in read_checked_shard(storage, shard_key(manifest, shard["path"]), shard["sha256"]):
            if wanted is None or sample.key in wanted:
                yield task(sample.key, sample.input_image, sample.target_image, sample.meta.get("instruction"),
                           sample.user, sample.assistant)


def rejected_frame(storage: Storage, manifest: dict[str, Any], count: int, margin: float, seed: int
                   ) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """A seeded sample of `count` filter-rejected candidates that missed a threshold by at most `margin`:
    (key, unit file) pairs, and the frame they were drawn from (its size, for the recall estimate)."""
    thresholds = {name: float(value) for name, value in (manifest.get("thresholds") or {}).items()}
    frame = {"margin": margin, "seed": seed, "size": 0, "sampled": 0, "thresholds": thresholds}
    run_id = manifest.get("run_id")
    if count <= 0 or not run_id:
        return [], frame
    drawn: list[tuple[str, str, str]] = []  # (rank, key, unit file): the `count` smallest ranks so far
    pending: list[tuple[str, str, str]] = []  # ranks that beat drawn's largest, merged `count` at a time
    for unit_file in candidate_files(storage, run_id):
        rows = read_columns(storage, unit_file, FRAME_COLUMNS)
        rows = rows[rows["reject_reason"].isin(FILTER_REASONS)]
        near = rows[threshold_miss(rows, thresholds) <= margin]
        frame["size"] += len(near)
        ranked = ((rank(f"review-{seed}", key), key, unit_file) for key in near["key"])
        pending += ranked if len(drawn) < count else (item for item in ranked if item < drawn[-1])
        if len(pending) >= count:  # a merge per `count` new ranks, not one per unit file
            drawn, pending = heapq.nsmallest(count, drawn + pending), []
    drawn = heapq.nsmallest(count, drawn + pending)
    frame["sampled"] = len(drawn)
    return [(key, unit_file) for _, key, unit_file in drawn], frame


def rejected_tasks(storage: Storage, run_id: str, picked: list[tuple[str, str]]) -> Iterator[dict[str, Any]]:
    by_file: dict[str, list[str]] = {}
    for key, unit_file in picked:
        by_file.setdefault(unit_file, []).append(key)
    images = ImageJoin(storage, run_id)
    for unit_file, keys in sorted(by_file.items()):
        rows = read_columns(storage, unit_file, (*CARD_COLUMNS, *JOIN_COLUMNS), keys)
        rows = images.add(rows, tuple(name for name in IMAGE_HOMES if name not in rows and name != "w_image"))
        for record in rows.to_dict("records"):
            yield task(record["key"], record.get("input_image"), record.get("target_image"),
                       record.get("instruction"), record.get("user"), record.get("assistant"))


def export_review(storage: Storage, dataset: str, version: str, url: str | None, rejected: int = 0,
                  margin: float = 0.05, seed: int = 0) -> dict[str, Any]:
    """Create a Label Studio project for the version, send its tasks, and store the review record."""
    manifest = load_manifest(storage, dataset, version)
    picked, frame = rejected_frame(storage, manifest, rejected, margin, seed)
    client = studio.connect(url)
    project_id = studio.create_project(client, f"{dataset}/{version} review", review_description(manifest, frame))
    key = layout.review_record(dataset, version, project_id)
    made = {"dataset": dataset, "version": version, "project_id": project_id, "url": studio.server_url(url),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    storage.write_bytes(key, json.dumps({**made, "status": EXPORTING}, sort_keys=True).encode())  # a kill names it
    try:
        sent, origins = send_tasks(client, project_id, storage, manifest, picked)
    except Exception as err:
        raise studio.ReviewError(f"the export to Label Studio project {project_id} stopped after the project was "
                                 f"made ({studio.one_line(f'{type(err).__name__}: {err}')}): delete that project "
                                 "and export again") from None
    record = {**made, "tasks": sent, "published_samples": int(manifest["samples"]), "frame": frame, "origins": origins}
    storage.write_bytes(key, json.dumps(record, indent=1, sort_keys=True).encode("utf-8"))
    return record


def send_tasks(client, project_id: int, storage: Storage, manifest: dict[str, Any],
               picked: list[tuple[str, str]]) -> tuple[int, dict[str, str]]:
    """The version's samples, then the picked rejected candidates, as tasks of the project; returns how
    many were sent and each key's origin."""
    origins: dict[str, str] = {}

    def tagged(tasks: Iterator[dict[str, Any]], origin: str) -> Iterator[dict[str, Any]]:
        for item in tasks:
            origins[item["key"]] = origin
            yield item

    sent = studio.import_tasks(client, project_id, tagged(published_tasks(storage, manifest), PUBLISHED))
    if picked:
        sent += studio.import_tasks(client, project_id,
                                    tagged(rejected_tasks(storage, manifest["run_id"], picked), REJECTED))
    return sent, origins


def review_description(manifest: dict[str, Any], frame: dict[str, Any]) -> str:
    return (f"Keep a sample when x~ follows the instruction, keeps the subject of x, and y / y~ read as a real "
            f"exchange; otherwise drop it and say why. {manifest['samples']} samples of version "
            f"{manifest['dataset']}/{manifest['version']} (and {frame['sampled']} other candidates), in random order.")


def latest_record(storage: Storage, dataset: str, version: str, project_id: int | None) -> dict[str, Any]:
    """The review record of `project_id`, or the newest export of the version."""
    if project_id is not None:
        keys = [layout.review_record(dataset, version, project_id)]
    else:
        keys = sorted(key for key in storage.list(layout.review_records(dataset, version)) if key.endswith(".json"))
    for key in reversed(keys):
        if not storage.exists(key):
            break
        record = json.loads(storage.read_bytes(key))
        if record.get("status") != EXPORTING:
            return record
        if project_id is not None:
            raise studio.ReviewError(f"the export of {dataset}/{version} to project {project_id} did not finish: "
                                     "delete that project in Label Studio and export again")
        log.warning("passing over Label Studio project %s: its export did not finish", record["project_id"])
    which = f"project {project_id}" if project_id is not None else "any project"
    raise studio.ReviewError(f"version {dataset}/{version} has no review exported to {which}: "
                             "run `review export` first")
