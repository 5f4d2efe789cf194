"""A run's files: the plan, read one unit at a time, and each stage's unit files.

A unit file holds the candidate rows (scores, texts, reasons) and no copy of an image made
elsewhere: a reference image stays in its reference set and a candidate image in the unit
file of the stage that drew it. `ImageJoin` puts the bytes back where a stage needs them.
Each unit file's footer records the stage's counters and the config settings that shaped it.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from functools import partial
from typing import Any

import pandas as pd
import pyarrow as pa

from factory import layout
from factory.pool import fetch_images
from factory.storage import Storage

log = logging.getLogger(__name__)

UNIT_META = b"factory.unit"
# image column -> the stage whose unit files hold it ("references": the reference set;
# "w": SID's pool or the round's SD-drawn set, by `w_id`)
IMAGE_HOMES = {"input_image": "references", "target_image": "generate", "w_image": "w"}
# where a `w_id` is stored, by its prefix: `pool:<image id>` in the pool the row's `w_pool` names,
# `sd:<drawn id>` in the run's SD-drawn set; (ids key, part key) of the set's name
W_SETS = {"pool": (layout.pool_ids, layout.pool_part), "sd": (layout.run_w_ids, layout.run_w_part)}
SIZE_COLUMNS = {"input_image": "input_bytes", "target_image": "target_bytes"}


# --- the plan ----------------------------------------------------------------------------


def write_plan(storage: Storage, run_id: str, table: pa.Table, unit_size: int) -> None:
    """One row group per unit (units are consecutive runs of `unit_size` rows)."""
    storage.write_parquet(layout.plan(run_id), table, row_group_size=unit_size)


def plan_exists(storage: Storage, run_id: str) -> bool:
    return storage.exists(layout.plan(run_id))


def plan_units(storage: Storage, run_id: str) -> list[int]:
    units = storage.read_parquet(layout.plan(run_id), columns=["unit"]).column("unit")
    return sorted(set(units.to_pylist()))


def read_plan_unit(storage: Storage, run_id: str, unit: int) -> pd.DataFrame:
    return storage.read_parquet_rows(layout.plan(run_id), "unit", unit).to_pandas()


# --- stage unit files ----------------------------------------------------------------------


def finished_units(storage: Storage, run_id: str, stage: str) -> set[int]:
    numbers = (layout.unit_number(key) for key in storage.list(layout.stage_dir(run_id, stage)))
    return {number for number in numbers if number is not None}


def missing_units(storage: Storage, run_id: str, stage: str) -> list[int]:
    return sorted(set(plan_units(storage, run_id)) - finished_units(storage, run_id, stage))


def write_unit(storage: Storage, run_id: str, stage: str, unit: int, rows: pd.DataFrame, meta: dict[str, Any]) -> None:
    table = pa.Table.from_pandas(rows.reset_index(drop=True), preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           UNIT_META: json.dumps(meta, sort_keys=True, default=str).encode()})
    storage.write_parquet(layout.unit_file(run_id, stage, unit), table)


def read_unit(storage: Storage, run_id: str, stage: str, unit: int, columns: list[str] | None = None) -> pd.DataFrame:
    return storage.read_parquet(layout.unit_file(run_id, stage, unit), columns=columns).to_pandas()


def unit_meta(storage: Storage, run_id: str, stage: str, unit: int) -> dict[str, Any]:
    """What a unit file says about itself: stage, counters, the settings that shaped it."""
    raw = storage.parquet_metadata(layout.unit_file(run_id, stage, unit)).get(UNIT_META)
    return json.loads(raw) if raw else {}


def without_images(rows: pd.DataFrame, keep: tuple[str, ...] = ()) -> pd.DataFrame:
    """The rows minus every image column a stage did not draw itself."""
    drop = [column for column in IMAGE_HOMES if column in rows and column not in keep]
    return rows.drop(columns=drop)


# --- joining images back ---------------------------------------------------------------------


class ImageJoin:
    """Fetches image bytes by reference for the rows of one unit, keeping a few reference
    parts in memory (rows of a unit share references: the plan groups them). `w` images are
    fetched by `w_id`, only those the unit names; what is kept is where ids are (a few id
    tables), not their bytes."""

    def __init__(self, storage: Storage, run_id: str, cached_parts: int = 2):
        self.storage, self.run_id = storage, run_id
        self.cached_parts = cached_parts
        self._parts: OrderedDict[str, dict[str, bytes]] = OrderedDict()
        self._w_ids: OrderedDict[str, pd.DataFrame | None] = OrderedDict()

    def add(self, rows: pd.DataFrame, columns: tuple[str, ...]) -> pd.DataFrame:
        for column in columns:
            if column == "input_image":
                rows[column] = [self.reference(part, reference_id)
                                for part, reference_id in zip(rows["reference_part"], rows["reference_id"])]
            elif column == "target_image":
                rows[column] = self.candidates(rows, IMAGE_HOMES[column], column)
            elif column == "w_image":
                rows[column] = self.w_images(rows)
            elif column not in rows:
                raise KeyError(f"no stored home for image column {column!r}")
        return rows

    def reference(self, part: str, reference_id: str) -> bytes | None:
        if part not in self._parts:
            table = self.storage.read_parquet(part, columns=["reference_id", "image"])
            self._parts[part] = dict(zip(table.column("reference_id").to_pylist(), table.column("image").to_pylist()))
            while len(self._parts) > self.cached_parts:
                self._parts.popitem(last=False)
        self._parts.move_to_end(part)
        return self._parts[part].get(reference_id)

    def candidates(self, rows: pd.DataFrame, stage: str, column: str) -> list[bytes | None]:
        found: dict[str, bytes | None] = {}
        for unit in sorted(set(rows["unit"].astype(int))):
            drawn = read_unit(self.storage, self.run_id, stage, unit, columns=["key", column])
            found.update(zip(drawn["key"], drawn[column]))
        return [found.get(key) for key in rows["key"]]

    def w_images(self, rows: pd.DataFrame) -> list[bytes | None]:
        """Each row's `w` by its `w_id` (see W_SETS), reading only the ids the rows name. None where
        the row has no `w_id` (bootstrap rows: nothing is read) or the id is not stored (generate
        rejects such a row)."""
        if "w_id" not in rows:
            return [None] * len(rows)
        pools = rows["w_pool"] if "w_pool" in rows else [None] * len(rows)
        homes = [self.w_home(w_id, pool) for w_id, pool in zip(rows["w_id"], pools)]
        wanted: dict[tuple[str, str], set[str]] = {}
        for home in homes:
            if home is not None:
                wanted.setdefault(home[:2], set()).add(home[2])
        found: dict[tuple[str, str, str], bytes] = {}
        for (kind, name), image_ids in wanted.items():
            ids_key, part_key = W_SETS[kind]
            stored = self.w_id_table(ids_key(name))
            if stored is None:
                continue
            for image_id, data in fetch_images(self.storage, stored, partial(part_key, name), image_ids).items():
                found[(kind, name, image_id)] = data
        return [found.get(home) if home is not None else None for home in homes]

    def w_home(self, w_id: Any, pool: Any) -> tuple[str, str, str] | None:
        """(kind, pool name or run id, image id) of a `w_id`; None for no id or one of no known home."""
        if not isinstance(w_id, str):
            return None
        if w_id.startswith("pool:") and isinstance(pool, str) and pool:
            return "pool", pool, w_id[len("pool:"):]
        if w_id.startswith("sd:"):
            return "sd", self.run_id, w_id[len("sd:"):]
        return None

    def w_id_table(self, ids_key: str) -> pd.DataFrame | None:
        """Where each image of a stored set is (image_id, part, row); None when there is no such set."""
        if ids_key not in self._w_ids:
            stored = self.storage.read_parquet(ids_key).to_pandas() if self.storage.exists(ids_key) else None
            if stored is None:
                log.warning("no stored w images at %s: rows naming them are rejected", self.storage.url(ids_key))
            self._w_ids[ids_key] = stored
            while len(self._w_ids) > self.cached_parts:
                self._w_ids.popitem(last=False)
        self._w_ids.move_to_end(ids_key)
        return self._w_ids[ids_key]
