"""Reference sets in storage: the parts, the rejections, and the marker of a finished ingest.

The references stage writes a set; plan, SID and `python -m factory.run` read it. Keys come from
`factory.framework.layout` (`references/<set>/part-<00000>.parquet`, `rejections.parquet`, `_complete.json`).
Parts hold `part_size` references sorted by id, so the same inputs give byte-identical parts;
a set is usable once `_complete.json` exists (written last by a finished ingest).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa

from factory.framework import layout
from factory.framework.storage import Storage

PART_NAME = re.compile(r"^part-(\d{5})\.parquet$")

REFERENCE_SCHEMA = pa.schema(
    [
        ("reference_id", pa.string()),
        ("image", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("subject", pa.string()),
        ("domain", pa.string()),
        ("source", pa.string()),
        ("origin", pa.string()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
    ]
)


REJECTION_SCHEMA = pa.schema(
    [("reference_id", pa.string()), ("source", pa.string()), ("origin", pa.string()), ("reason", pa.string())]
)


def set_complete(storage: Storage, set_name: str) -> bool:
    return storage.exists(layout.reference_complete(set_name))


def set_summary(storage: Storage, set_name: str) -> dict[str, Any] | None:
    """What the references run that completed the set wrote (its reference and part counts); None while
    the set is not complete (never built, or being rebuilt)."""
    if not set_complete(storage, set_name):
        return None
    return json.loads(storage.read_bytes(layout.reference_complete(set_name)))


# --- writing -----------------------------------------------------------------------------


@dataclass
class PartsWritten:
    count: int
    files: int
    digest: str  # of every reference's id and image bytes, in order: the set's content


def write_parts(storage: Storage, set_name: str, rows: Iterable[dict], part_size: int) -> PartsWritten:
    """Write rows (already in id order) into parts of `part_size`, then drop parts left from a larger earlier run."""
    count = files = 0
    buffer: list[dict] = []
    content = hashlib.sha256()
    for row in rows:
        content.update(f"{row['reference_id']}:{len(row['image'])}:".encode())
        content.update(row["image"])
        buffer.append(row)
        if len(buffer) == part_size:
            write_table(storage, layout.reference_part(set_name, files), buffer, REFERENCE_SCHEMA)
            count, files, buffer = count + len(buffer), files + 1, []
    if buffer:
        write_table(storage, layout.reference_part(set_name, files), buffer, REFERENCE_SCHEMA)
        count, files = count + len(buffer), files + 1
    for key in list_parts(storage, set_name)[files:]:
        storage.delete(key)
    return PartsWritten(count, files, content.hexdigest())


def set_digest(storage: Storage, set_name: str) -> str | None:
    """The content digest the set's completion record holds; None while the set is not complete (or was
    completed before records held one)."""
    return (set_summary(storage, set_name) or {}).get("digest")


def write_rejections(storage: Storage, set_name: str, rejections: list[dict]) -> None:
    ordered = sorted(rejections, key=lambda r: (r["reference_id"], r["reason"], r["origin"]))
    write_table(storage, layout.reference_rejections(set_name), ordered, REJECTION_SCHEMA)


IMAGE_ROW_GROUP = 16  # references per row group: a reader joining a few images reads a few groups


def write_table(storage: Storage, key: str, rows: list[dict], schema: pa.Schema) -> None:
    storage.write_parquet(key, pa.Table.from_pylist(rows, schema=schema), row_group_size=IMAGE_ROW_GROUP)


# --- reading -----------------------------------------------------------------------------


def list_parts(storage: Storage, set_name: str) -> list[str]:
    """The set's part files in order."""
    prefix = layout.reference_set(set_name)
    return [key for key in storage.list(prefix) if PART_NAME.match(key[len(prefix) + 1 :])]


def read_part(storage: Storage, set_name: str, index: int, columns: list[str] | None = None) -> pd.DataFrame:
    """One part file as a DataFrame (`columns` to skip the image bytes, say)."""
    return _read(storage, layout.reference_part(set_name, index), columns)


def load_references(storage: Storage, set_name: str, columns: list[str] | None = None) -> pd.DataFrame:
    """The whole reference set, in id order."""
    frames = [_read(storage, key, columns) for key in list_parts(storage, set_name)]
    if not frames:
        return REFERENCE_SCHEMA.empty_table().select(columns or REFERENCE_SCHEMA.names).to_pandas()
    return pd.concat(frames, ignore_index=True)


def load_rejections(storage: Storage, set_name: str) -> pd.DataFrame:
    return _read(storage, layout.reference_rejections(set_name), None)


def _read(storage: Storage, key: str, columns: list[str] | None) -> pd.DataFrame:
    return storage.read_parquet(key, columns=columns).to_pandas()
