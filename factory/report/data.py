"""What the report reads: the manifest, the index, the run's candidates (when kept) and the ancestry."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from factory import layout
from factory.manifest import VersionError, load_manifest
from factory.storage import Storage

log = logging.getLogger(__name__)

SCORES = {"clip_t": "CLIP-T (x~ vs instruction)", "dino": "DINO (x~ vs x)"}
CANDIDATE_COLUMNS = ("key", "unit", "alpha", "clip_t", "dino", "reject_stage", "reject_reason")
ANCESTRY_DEPTH = 8


@dataclass
class VersionData:
    """What the report reads: the manifest, the index, and (when kept) the run's candidates."""

    manifest: dict[str, Any]
    index: pd.DataFrame
    candidates: pd.DataFrame | None  # scores and verdicts of every candidate; None when unavailable
    candidates_note: str
    ancestry: list[tuple[int, dict[str, Any]]] = field(default_factory=list)


def default_out_dir(dataset: str, version: str) -> Path:
    for name in (dataset, version):
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise ValueError(f"cannot make a report folder from the name {name!r}")
    return Path("reports") / dataset / version


def load_version_data(storage: Storage, dataset: str, version: str) -> VersionData:
    manifest = load_manifest(storage, dataset, version)
    index = storage.read_parquet(layout.index(dataset, version)).to_pandas()
    candidates, note = load_candidates(storage, manifest)
    return VersionData(manifest, index, candidates, note, ancestry(storage, manifest))


def candidate_files(storage: Storage, run_id: str) -> list[str]:
    return [key for key in storage.list(layout.stage_dir(run_id, "dialogue")) if layout.is_unit_file(key)]


def read_columns(storage: Storage, key: str, columns: tuple[str, ...], keys: list[str] | None = None) -> pd.DataFrame:
    """The named columns of one Parquet file, optionally only the rows of `keys`."""
    data = storage.read_bytes(key)
    names = pq.read_schema(pa.BufferReader(data)).names
    present = [name for name in columns if name in names]
    filters = [("key", "in", list(keys))] if keys is not None else None
    return pq.read_table(pa.BufferReader(data), columns=present, filters=filters).to_pandas()


def load_candidates(storage: Storage, manifest: dict[str, Any]) -> tuple[pd.DataFrame | None, str]:
    run_id = manifest.get("run_id")
    if not run_id:
        return None, f"a {manifest['kind']} version names no run, so its rejected candidates are not at hand"
    files = candidate_files(storage, run_id)
    if not files:
        where = layout.stage_dir(run_id, "dialogue")
        return None, f"no candidate rows under {where} (the run's files were deleted or moved)"
    frames = []
    for number, key in enumerate(files, 1):
        frame = read_columns(storage, key, CANDIDATE_COLUMNS)
        frames.append(frame.assign(unit_file=key))
        if number % 100 == 0:
            log.info("report: read %d of %d unit files of run %s", number, len(files), run_id)
    candidates = pd.concat(frames, ignore_index=True)
    for name in ("reject_stage", "reject_reason"):
        if name not in candidates:
            candidates[name] = None
    return candidates, f"{len(candidates)} candidates from {len(files)} unit files of run {run_id}"


def ancestry(storage: Storage, manifest: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """The version's ancestors, depth first: (depth, summary), a missing parent marked as such."""
    found: list[tuple[int, dict[str, Any]]] = []
    seen: set[str] = set()

    def visit(parents: list[str], depth: int) -> None:
        for parent in parents:
            if depth > ANCESTRY_DEPTH or parent in seen:
                continue
            seen.add(parent)
            try:
                parent_manifest = load_manifest(storage, manifest["dataset"], parent)
            except VersionError:
                found.append((depth, {"version": parent, "missing": True}))
                continue
            found.append((depth, version_summary(parent_manifest)))
            visit(parent_manifest.get("parents", []), depth + 1)

    visit(manifest.get("parents", []), 1)
    return found


def version_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    return {name: manifest.get(name) for name in ("version", "kind", "samples", "created", "round")}


def text(value: Any) -> str:
    return "" if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)) else str(value)
