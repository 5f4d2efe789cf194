"""A run's files: the plan, read one unit at a time, and each stage's unit files.

A unit file holds the candidate rows (scores, texts, reasons) and no copy of an image made
elsewhere: a reference image stays in its reference set and a candidate image in the unit
file of the stage that drew it. `ImageJoin` puts the bytes back where a stage needs them.
Each unit file's footer records the stage's counters and the config settings that shaped it.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from factory.framework import layout
from factory.framework.config import ConfigError
from factory.framework.images import fetch_images, read_part_rows
from factory.framework.storage import DamagedFile, Storage

log = logging.getLogger(__name__)

UNIT_META = b"factory.unit"
# image column -> the stage whose unit files hold it ("references": the reference set;
# "w": SID's pool or the round's SD-drawn set, by `w_id`)
IMAGE_HOMES = {"input_image": "references", "target_image": "generate", "w_image": "w"}
# where a `w_id` is stored, by its prefix: `pool:<image id>` in the pool the row's `w_pool` names,
# `sd:<drawn id>` in the run's SD-drawn set; (ids key, part key) of the set's name
W_SETS = {"pool": (layout.pool_ids, layout.pool_part), "sd": (layout.run_w_ids, layout.run_w_part)}
# Images per row group in a unit file that holds images: a reader that needs a few of them
# (the dialogue stage joins about one candidate in 14) reads only their groups.
IMAGE_ROW_GROUP = 4
FOOTER_THREADS = 16  # footers read at once when a run looks for its finished units (S3 round trips)
COUNTER_CHUNK = 4096  # unit footers parsed before their counters are put into columns


# --- the plan ----------------------------------------------------------------------------
#
# A plan is partitioned: `runs/<run>/plan/part-<p>.parquet` holds partition p's jobs, one row
# group per unit (a unit never spans partitions), and `runs/<run>/plan.parquet`, written last, is
# its index: one row per unit (unit, partition, rows), with the plan's format and what drew it in
# its footer. A plan exists iff its index does.

PLAN_META = b"factory.plan"
# 1: one plan.parquet holding every job (no format recorded); 2: partitions and an index
PLAN_FORMAT = 2


class PlanFormatError(ConfigError):
    """A run's stored plan is of another format than this code writes: runs are never mixed."""


@dataclass(frozen=True)
class PlanIndex:
    """Where each unit of a plan is, and how many jobs it holds (from the plan's index)."""

    partition_of: dict[int, int]
    rows: dict[int, int]
    meta: dict[str, Any]

    def units(self) -> list[int]:
        return sorted(self.rows)


def write_plan_part(storage: Storage, run_id: str, partition: int, table: pa.Table, unit_size: int,
                    meta: dict[str, Any]) -> None:
    """One partition's jobs, in unit order, one row group per unit: units are consecutive numbers,
    each a run of `unit_size` rows (the last one shorter). `meta` (what drew it) and the first unit
    go into the footer, so a unit's rows are its row group's count (no column statistics read)."""
    units = table.column("unit").to_numpy()
    first = int(units[0]) if len(units) else 0
    if not np.array_equal(units, first + np.arange(len(units)) // unit_size):
        raise ValueError(f"plan partition {partition}: units must be consecutive runs of {unit_size} rows")
    stamped = {**meta, "format": PLAN_FORMAT, "partition": partition, "first_unit": first}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           PLAN_META: json.dumps(stamped, sort_keys=True).encode()})
    storage.write_parquet(layout.plan_part(run_id, partition), table, row_group_size=unit_size)


def plan_part_meta(storage: Storage, run_id: str, partition: int) -> dict[str, Any] | None:
    """What a stored partition's footer says it was drawn with; None when it is missing or damaged."""
    key = layout.plan_part(run_id, partition)
    if not storage.exists(key):
        return None
    try:
        return metadata_json(storage.parquet_metadata(key).get(PLAN_META), storage.url(key), None)
    except DamagedFile as err:
        log.warning("%s: the partition is drawn again", err)
        return None


def metadata_json(raw: bytes | None, url: str, default: Any) -> Any:
    """A Parquet footer's JSON metadata value (`default` when absent); not JSON is a `DamagedFile`."""
    if not raw:
        return default
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise DamagedFile(f"damaged Parquet file {url}: its footer metadata is not JSON") from None


def part_unit_rows(storage: Storage, key: str) -> dict[int, int]:
    """Rows per unit of one partition file, from its footer: row group g is unit `first_unit + g`."""
    footer = storage.parquet_footer(key)
    first = metadata_json((footer.metadata or {}).get(PLAN_META), storage.url(key), {})["first_unit"]
    return {first + number: footer.row_group(number).num_rows
            for number in range(footer.num_row_groups) if footer.row_group(number).num_rows}


def plan_part_rows(storage: Storage, run_id: str, partition: int) -> int:
    return storage.parquet_footer(layout.plan_part(run_id, partition)).num_rows


def write_plan_index(storage: Storage, run_id: str, partitions: list[int], meta: dict[str, Any]) -> PlanIndex:
    """The plan's index from its partitions' footers, written last: from now on the plan exists."""
    units, where, rows = [], [], []
    for partition in partitions:
        for unit, count in sorted(part_unit_rows(storage, layout.plan_part(run_id, partition)).items()):
            units.append(unit), where.append(partition), rows.append(count)
    table = pa.table({"unit": pa.array(units, pa.int64()), "partition": pa.array(where, pa.int64()),
                      "rows": pa.array(rows, pa.int64())})
    stamped = {**meta, "format": PLAN_FORMAT, "partitions": len(partitions), "jobs": int(sum(rows))}
    table = table.replace_schema_metadata({PLAN_META: json.dumps(stamped, sort_keys=True).encode()})
    storage.write_parquet(layout.plan(run_id), table)
    return PlanIndex(dict(zip(units, where)), dict(zip(units, rows)), stamped)


def write_plan(storage: Storage, run_id: str, table: pa.Table, unit_size: int,
               meta: dict[str, Any] | None = None) -> None:
    """A plan of one partition (small plans, tests): `table` in unit order, units of `unit_size`."""
    write_plan_part(storage, run_id, 0, table, unit_size, meta or {})
    write_plan_index(storage, run_id, [0], meta or {})


def plan_exists(storage: Storage, run_id: str) -> bool:
    return storage.exists(layout.plan(run_id))


def check_plan_format(url: str, metadata: dict[bytes, bytes] | None) -> dict[str, Any]:
    """The plan's recorded metadata; a plan of another format (or none: format 1) is refused."""
    meta = metadata_json((metadata or {}).get(PLAN_META), url, {"format": 1})
    if meta.get("format") != PLAN_FORMAT:
        raise PlanFormatError(
            f"{url} is a plan of format {meta.get('format')}; this factory reads and writes plan format "
            f"{PLAN_FORMAT} (partitioned) and never mixes formats in one run: start a new run (--set run_id=NEW)")
    return meta


def plan_index(storage: Storage, run_id: str) -> PlanIndex:
    key = layout.plan(run_id)
    meta = check_plan_format(storage.url(key), storage.parquet_metadata(key))
    table = storage.read_parquet(key)
    units = table.column("unit").to_pylist()
    return PlanIndex(dict(zip(units, table.column("partition").to_pylist())),
                     dict(zip(units, table.column("rows").to_pylist())), meta)


def plan_units(storage: Storage, run_id: str) -> list[int]:
    return plan_index(storage, run_id).units()


def read_plan_unit(storage: Storage, run_id: str, unit: int, index: PlanIndex | None = None) -> pd.DataFrame:
    """One unit's jobs: one row group of its partition (`index`: the plan's, when already read)."""
    index = index or plan_index(storage, run_id)
    if unit not in index.partition_of:
        raise KeyError(f"unit {unit} is not in the plan of run {run_id!r}")
    key = layout.plan_part(run_id, index.partition_of[unit])
    return storage.read_parquet(key, filters=[("unit", "=", unit)]).to_pandas()


def read_plan(storage: Storage, run_id: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The plan one partition at a time, in partition order."""
    index = plan_index(storage, run_id)
    for partition in sorted(set(index.partition_of.values())):
        yield storage.read_parquet(layout.plan_part(run_id, partition), columns=columns)


def plan_unit_rows(storage: Storage, run_id: str) -> dict[int, int]:
    """Rows per unit, from the plan's index alone."""
    return plan_index(storage, run_id).rows


# --- stage unit files ----------------------------------------------------------------------


def finished_units(storage: Storage, run_id: str, stage: str) -> set[int]:
    """The units whose `stage` file is whole (see `whole_unit_meta`); a damaged one is named in a
    warning and left out, so the run redoes it. Reads footers only, several at a time."""
    return set(unit_counters(storage, run_id, stage).index)


def unit_counters(storage: Storage, run_id: str, stage: str, known: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per unit whose `stage` file is whole (indexed by unit, in no set order): its
    `finished_at` and every counter its footer holds (0 where it has none), from one read of each
    footer, several at a time. `known`: rows an earlier call returned, not read again (a whole unit
    file is never rewritten while its run goes on) but kept only while their file is still listed.
    Each footer becomes its counter row in the thread that read it, and the rows are put into
    columns `COUNTER_CHUNK` at a time: a unit costs its process a few dozen bytes here, where its
    footer is ~50 KB (its JSON, the settings that shaped it, ~16 KB in Python)."""
    known = no_unit_counters() if known is None else known
    files = {number: key for key in storage.list(layout.stage_dir(run_id, stage))
             if (number := layout.unit_number(key)) is not None}
    kept = known[known.index.isin(list(files))]
    new = [number for number in files if number not in kept.index]
    if not new:
        return kept
    expected = plan_unit_rows(storage, run_id)

    def read_row(number: int) -> dict[str, Any] | None:
        meta = whole_unit_meta(storage, files[number], expected.get(number))
        return None if meta is None else counter_row(number, meta)

    frames = [kept]
    with ThreadPoolExecutor(min(FOOTER_THREADS, len(new))) as pool:
        for start in range(0, len(new), COUNTER_CHUNK):
            rows = [row for row in pool.map(read_row, new[start : start + COUNTER_CHUNK]) if row is not None]
            frames.append(pd.DataFrame.from_records(rows, index="unit") if rows else no_unit_counters())
    counters = pd.concat(frames)
    counted = [column for column in counters.columns if column != "finished_at"]
    counters[counted] = counters[counted].fillna(0)
    return counters


def counter_row(unit: int, meta: dict[str, Any]) -> dict[str, Any]:
    """The unit's counters, when it finished, and a digest of the settings that shaped it (`shaped_by`:
    units made with other settings, by two drivers of one run id, have other digests)."""
    return {"unit": unit, "finished_at": meta.get("finished_at", float("nan")),
            "shaped_by": settings_digest(meta.get("shaped_by")), **meta.get("counters", {})}


def settings_digest(settings: dict[str, Any] | None) -> int:
    """52 bits of the settings' sha256: a number a float64 counter column holds exactly."""
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return int(hashlib.sha256(canonical.encode()).hexdigest()[:13], 16)


def no_unit_counters() -> pd.DataFrame:
    return pd.DataFrame({"finished_at": pd.Series(dtype="float64")}, index=pd.Index([], dtype="int64", name="unit"))


def unit_is_whole(storage: Storage, key: str, planned_rows: int | None) -> bool:
    return whole_unit_meta(storage, key, planned_rows) is not None


def whole_unit_meta(storage: Storage, key: str, planned_rows: int | None) -> dict[str, Any] | None:
    """What the unit file at `key` says about itself if the file is finished: there, its footer and
    the metadata in it read back, and it holds the plan's rows for its unit; else None, and a torn,
    corrupt or short file is named in a warning."""
    try:
        footer = storage.parquet_footer(key)
        if footer.num_rows != planned_rows:
            log.warning("unit file %s holds %d rows where the plan has %s: the unit is redone",
                        storage.url(key), footer.num_rows, planned_rows)
            return None
        return metadata_json((footer.metadata or {}).get(UNIT_META), storage.url(key), {})
    except DamagedFile as err:
        log.warning("%s: the unit is redone", err)
        return None


def write_unit(storage: Storage, run_id: str, stage: str, unit: int, rows: pd.DataFrame, meta: dict[str, Any]) -> None:
    table = pa.Table.from_pandas(rows.reset_index(drop=True), preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           UNIT_META: json.dumps(meta, sort_keys=True, default=str).encode()})
    storage.write_parquet(layout.unit_file(run_id, stage, unit), table, row_group_size=rows_per_group(table))


def rows_per_group(table: pa.Table) -> int | None:
    """Rows per row group such that a group holds about IMAGE_ROW_GROUP images (all of a
    candidate file's rows hold one; a dialogue file keeps its accepted rows' only, so its rows
    stay in one or two groups); None, one group, for a file with no image."""
    held = max((table.num_rows - table[column].null_count for column in IMAGE_HOMES if column in table.column_names),
               default=0)
    return max(IMAGE_ROW_GROUP, IMAGE_ROW_GROUP * table.num_rows // held) if held else None


def read_unit(storage: Storage, run_id: str, stage: str, unit: int, columns: list[str] | None = None) -> pd.DataFrame:
    return storage.read_parquet(layout.unit_file(run_id, stage, unit), columns=columns).to_pandas()


def unit_meta(storage: Storage, run_id: str, stage: str, unit: int) -> dict[str, Any]:
    """What a unit file says about itself: stage, counters, the settings that shaped it."""
    key = layout.unit_file(run_id, stage, unit)
    return metadata_json(storage.parquet_metadata(key).get(UNIT_META), storage.url(key), {})


def without_images(rows: pd.DataFrame, keep: tuple[str, ...] = ()) -> pd.DataFrame:
    """The rows minus every image column a stage did not draw itself."""
    drop = [column for column in IMAGE_HOMES if column in rows and column not in keep]
    return rows.drop(columns=drop)


# --- joining images back ---------------------------------------------------------------------


class ImageJoin:
    """Fetches image bytes by reference for the rows of one unit, reading only the row groups
    that hold them (reference parts are sorted by id; unit files keep the plan's row order),
    and keeping a few reference parts' fetched images in memory. `w` images are fetched by
    `w_id`, only those the unit names; what is kept is where ids are (a few id tables)."""

    def __init__(self, storage: Storage, run_id: str | None, cached_parts: int = 2,
                 footers: SortedFooters | None = None):
        self.storage, self.run_id = storage, run_id
        self.cached_parts = cached_parts
        self.footers = footers or SortedFooters(storage, "reference_id")  # reference parts' footers
        self._parts: OrderedDict[str, dict[str, bytes]] = OrderedDict()
        self._w_ids: OrderedDict[str, pd.DataFrame | None] = OrderedDict()

    def add(self, rows: pd.DataFrame, columns: tuple[str, ...], positions: list[int] | None = None) -> pd.DataFrame:
        """`rows` with `columns` joined. `positions`: the rows' places in their unit files (all
        stages keep the plan's order), so only their row groups are read; else keys are matched."""
        for column in columns:
            if column == "input_image":
                rows[column] = self.references(rows)
            elif column == "target_image":
                rows[column] = self.candidates(rows, IMAGE_HOMES[column], column, positions)
            elif column == "w_image":
                rows[column] = self.w_images(rows)
            elif column not in rows:
                raise KeyError(f"no stored home for image column {column!r}")
        return rows

    def references(self, rows: pd.DataFrame) -> list[bytes | None]:
        found: dict[tuple[str, str], bytes] = {}
        for part, group in rows.groupby("reference_part", sort=False):
            images = self.reference_images(part, set(group["reference_id"]))
            found.update(((part, reference_id), images.get(reference_id)) for reference_id in group["reference_id"])
        return [found.get(pair) for pair in zip(rows["reference_part"], rows["reference_id"])]

    def reference_images(self, part: str, wanted: set[str]) -> dict[str, bytes]:
        """{reference_id: bytes} of a reference part's `wanted` ids (those it holds), the last parts' kept."""
        cached = self._parts.get(part, {})
        missing = sorted(wanted - cached.keys())
        if missing:
            footer = self.footers.get(part)  # parts are sorted by id: few row groups hold them
            with self.storage.parquet(part, footer.metadata) as parquet:
                table = parquet.read_row_groups(footer.groups_holding(missing), columns=["reference_id", "image"],
                                                use_threads=self.storage.parquet_threads)
            table = table.filter(pc.is_in(table["reference_id"], pa.array(missing, pa.string())))
            fetched = zip(table.column("reference_id").to_pylist(), table.column("image").to_pylist())
            cached = {**cached, **dict(fetched)}
        remember(self._parts, part, cached, self.cached_parts)
        return cached

    def candidates(self, rows: pd.DataFrame, stage: str, column: str,
                   positions: list[int] | None) -> list[bytes | None]:
        found: dict[str, bytes | None] = {}
        places = rows.assign(_position=positions if positions is not None else -1)
        for unit, group in places.groupby(places["unit"].astype(int)):
            key = layout.unit_file(self.run_id, stage, int(unit))
            if positions is not None:
                found.update(read_part_rows(self.storage, key, group["_position"].tolist(), ("key", column)))
                continue
            table = self.storage.read_parquet(key, columns=["key", column])
            found.update(zip(table.column("key").to_pylist(), table.column(column).to_pylist()))
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
            remember(self._w_ids, ids_key, stored, self.cached_parts)
            return stored
        self._w_ids.move_to_end(ids_key)
        return self._w_ids[ids_key]


def remember(cache: OrderedDict, key: Any, value: Any, size: int) -> None:
    """`value` kept as the newest of at most `size` entries of `cache` (the oldest go)."""
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > size:
        cache.popitem(last=False)


@dataclass(frozen=True)
class SortedFooter:
    """A Parquet file's footer, and each row group's (min, max) of the column the file is sorted by
    (None where a group has no statistics), taken from it once."""

    metadata: pq.FileMetaData
    bounds: tuple[tuple[Any, Any] | None, ...]

    @classmethod
    def of(cls, metadata: pq.FileMetaData, column: str) -> SortedFooter:
        bounds = []
        for number in range(metadata.num_row_groups):
            group = metadata.row_group(number)
            at = next(n for n in range(group.num_columns) if group.column(n).path_in_schema == column)
            stats = group.column(at).statistics
            bounds.append((stats.min, stats.max) if stats is not None and stats.has_min_max else None)
        return cls(metadata, tuple(bounds))

    def groups_holding(self, values: list[Any]) -> list[int]:
        """The row groups whose bounds can hold one of the sorted `values` (every group without bounds)."""
        groups = []
        for number, bound in enumerate(self.bounds):
            first = bisect.bisect_left(values, bound[0]) if bound is not None else 0
            if bound is None or (first < len(values) and values[first] <= bound[1]):
                groups.append(number)
        return groups


class SortedFooters:
    """The footers of Parquet files sorted by `column` (`SortedFooter`), each read once and the last
    `kept` kept: a file looked up again costs no footer read. Safe to share between threads."""

    def __init__(self, storage: Storage, column: str, kept: int = 64):
        self.storage, self.column, self.kept = storage, column, kept
        self._footers: OrderedDict[str, SortedFooter] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> SortedFooter:
        with self._lock:
            footer = self._footers.get(key)
            if footer is not None:
                self._footers.move_to_end(key)
                return footer
        footer = SortedFooter.of(self.storage.parquet_footer(key), self.column)
        with self._lock:
            remember(self._footers, key, footer, self.kept)
        return footer
