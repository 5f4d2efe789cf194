"""What the report reads: the manifest, summaries of the index and of the run's candidates (when kept), the ancestry."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from factory.dataset.manifest import VersionError, load_manifest
from factory.framework import layout
from factory.framework.storage import Storage
from factory.report.evals import evals_of_version
from factory.report.summary import INDEX_COLUMNS, CandidateSummary, IndexSummary
from filters.rules import SCORE_COLUMNS

log = logging.getLogger(__name__)

CANDIDATE_COLUMNS = ("key", "unit", "alpha", *SCORE_COLUMNS, "reject_stage", "reject_reason")
ANCESTRY_DEPTH = 8
INDEX_BATCH_ROWS = 65536


@dataclass
class VersionData:
    """What the report reads: the manifest, index and (when kept) candidate summaries, and the ancestry."""

    manifest: dict[str, Any]
    index: IndexSummary
    candidates: CandidateSummary | None  # every candidate's scores and verdicts, summarised; None when unavailable
    candidates_note: str
    ancestry: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)  # eval reports of generators trained on it


def default_out_dir(dataset: str, version: str) -> Path:
    for name in (dataset, version):
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise ValueError(f"cannot make a report folder from the name {name!r}")
    return Path("reports") / dataset / version


def load_version_data(storage: Storage, dataset: str, version: str) -> VersionData:
    manifest = load_manifest(storage, dataset, version)
    index = summarise_index(storage, dataset, version)
    candidates, note = summarise_candidates(storage, manifest)
    return VersionData(manifest, index, candidates, note, ancestry(storage, manifest),
                       evals_of_version(storage, dataset, version))


def summarise_index(storage: Storage, dataset: str, version: str) -> IndexSummary:
    """Running counts over the index, read in batches of INDEX_BATCH_ROWS (pyarrow reads row group by row group)
    and only the columns the report uses."""
    summary = IndexSummary(version)
    with storage.parquet(layout.index(dataset, version)) as parquet:
        columns = [name for name in INDEX_COLUMNS if name in parquet.schema_arrow.names]
        for batch in parquet.iter_batches(batch_size=INDEX_BATCH_ROWS, columns=columns,
                                          use_threads=storage.parquet_threads):
            summary.add_batch(batch)
    return summary


def candidate_files(storage: Storage, run_id: str) -> list[str]:
    return [key for key in storage.list(layout.stage_dir(run_id, "dialogue")) if layout.is_unit_file(key)]


def read_columns(storage: Storage, key: str, columns: tuple[str, ...], keys: list[str] | None = None) -> pd.DataFrame:
    """The named columns of one Parquet file, optionally only the rows of `keys`."""
    filters = [("key", "in", list(keys))] if keys is not None else None
    return storage.read_present_columns(key, list(columns), filters).to_pandas()


def summarise_candidates(storage: Storage, manifest: dict[str, Any]) -> tuple[CandidateSummary | None, str]:
    """The run's candidates summarised one unit file at a time: memory is one unit file's rows."""
    run_id = manifest.get("run_id")
    if not run_id:
        return None, f"a {manifest['kind']} version names no run, so its rejected candidates are not at hand"
    files = candidate_files(storage, run_id)
    if not files:
        where = layout.stage_dir(run_id, "dialogue")
        return None, f"no candidate rows under {where} (the run's files were deleted or moved)"
    thresholds = {name: float(value) for name, value in (manifest.get("thresholds") or {}).items()}
    summary = CandidateSummary()
    for number, key in enumerate(files, 1):
        summary.add(CandidateSummary.of_rows(read_columns(storage, key, CANDIDATE_COLUMNS), thresholds, key))
        if number % 100 == 0:
            log.info("report: read %d of %d unit files of run %s", number, len(files), run_id)
    return summary, f"{summary.rows} candidates from {len(files)} unit files of run {run_id}"


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
