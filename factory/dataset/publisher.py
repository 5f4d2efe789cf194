"""The one shard writer: accepted samples -> shards, index, manifest, as a Ray job or in this process.

Three passes, none of which holds more than a few parts' image bytes:

1. **sizes**: each part (a run's work unit, a parent version's shard, or samples in memory) gives
   the key and estimated tar size of every accepted sample in it;
2. **cut** (driver, keys and sizes only): keys sorted, the first part of a repeated key wins,
   shards cut in key order under both limits (`factory.dataset.shards.cut_points`);
3. **write**: a task per run of consecutive shards reads their samples from the parts that hold
   them, each part once (a run's dialogue unit files keep their samples' images: one file a unit;
   no image moves through Ray's object store) and parks them on local disk; as soon as a shard's
   parts are read, a thread writes its tar to a local file, hashes and uploads it, and keeps its
   index rows as a chunk under
   `_written/` (`layout.publish_written`), so a publisher stopped half-way, run again, writes only
   the shards still missing.

The index (rows in key order) is streamed to a local Parquet file and uploaded; the manifest is
written last, create-only, under the publish lock (`factory.dataset.manifest`). `LocalPasses` run the
same tasks in this process (small runs, tests, `publish_samples`) and give the same shards, byte for
byte, as `RayPasses`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from factory.dataset.manifest import (
    PublishRefused,
    VersionError,
    VersionSpec,
    commit_version,
    held_lease_id,
    index_row,
    index_schema,
    load_manifest,
    publish_owner,
    publishing,
    read_checked_shard,
    refuse_committed,
    release_stale_lock,
    shard_checksums,
    version_exists,
)
from factory.dataset.reference_sets import set_digest
from factory.dataset.shards import (
    SAMPLE_SIZES,
    Sample,
    cut_points,
    estimated_bytes,
    sample_sizes_fact,
    write_shard_file,
)
from factory.framework import layout
from factory.framework.config import FactoryConfig, StorageConfig
from factory.framework.executor import (
    MapStep,
    changed_settings,
    chunk_is_finished,
    chunk_meta,
    cluster_resources,
    even_batches,
    run_map,
    write_chunk,
)
from factory.framework.images import read_part_rows
from factory.framework.models_cache import model_fingerprint
from factory.framework.stage import RunContext
from factory.framework.storage import DamagedFile, Storage, open_storage, opened
from factory.framework.units import (
    ImageJoin,
    SortedFooters,
    finished_units,
    plan_index,
    plan_units,
    unit_counters,
    unit_meta,
)
from filters.rules import RULES, SCORE_COLUMNS

log = logging.getLogger(__name__)

INDEX_ROWS_PER_GROUP = 4096  # the index's Parquet row groups, whatever the executor's batches
SPOOL_BYTES = 4 * 2**30  # the most sample bytes a shard task parks on its node's disk

MODEL_STAGES = ("generate", "filter", "dialogue")
ROW_COLUMNS = ("key", "unit", "reference_set", "reference_part", "reference_id", "subject", "domain", "instruction",
               "instruction_id", "category", "style", "round", "seed", "alpha", "w_id", "generator_info",
               *SCORE_COLUMNS, "user", "assistant", "input_bytes", "target_bytes", "reject_reason")
SAMPLE_IMAGES = ("input_image", "target_image")
SIZES = pa.schema([("key", pa.string()), ("bytes", pa.int64())])  # a sample's key and estimated tar bytes
SIZE_COLUMNS = ["key", "user", "assistant", "input_bytes", "target_bytes", "reject_reason"]  # a sample's size


class PartialRun(VersionError):
    """A run whose plan has units without output: publishing it would silently drop them."""


# --- where samples come from --------------------------------------------------------------


class SampleSource(Protocol):
    """The accepted samples of a version to be, read one part at a time."""

    sizes_in_footers: bool  # `sizes` reads a footer a part: the driver reads them, as it reads unit counters

    def parts(self) -> list[str]: ...

    def sizes(self, part: str) -> pa.Table:
        """`SIZES`: key and estimated tar bytes of each accepted sample of the part."""

    def samples(self, part: str, keys: Collection[str] | None = None) -> list[Sample]:
        """The part's accepted samples (those of `keys` only, when given), images included."""

    def where(self, part: str) -> str:
        """The part, as an operator finds it (a file's URL)."""


class StoredSource:
    """A source read from storage: opened from `storage_config` once per process (an S3 client takes
    a fifth of a second to make, and does not pickle: a Ray worker opens its own), with the footers
    of the reference parts it reads (kept per process too)."""

    storage_config: StorageConfig

    @cached_property
    def storage(self) -> Storage:
        return open_storage(self.storage_config)

    @cached_property
    def reference_footers(self) -> SortedFooters:
        return SortedFooters(self.storage, "reference_id")

    def __getstate__(self) -> dict[str, Any]:
        return {name: value for name, value in self.__dict__.items()
                if name not in ("storage", "reference_footers")}


@dataclass
class RunSamples(StoredSource):
    """A run's accepted candidates: the dialogue unit files' accepted rows with the images they keep
    (a unit written before dialogue kept them: joined by reference from the candidates and references)."""

    storage_config: StorageConfig
    run_id: str
    dataset: str
    version: str
    units: list[int] | None = None  # the units to publish; default: every whole dialogue unit
    sizes_in_footers = True

    def parts(self) -> list[str]:
        if self.units is not None:
            return [str(unit) for unit in sorted(self.units)]
        return [str(unit) for unit in sorted(finished_units(self.storage, self.run_id, "dialogue"))]

    def accepted(self, part: str) -> pa.Table:
        """The unit's accepted rows (`ROW_COLUMNS`, and their images where the unit file keeps them),
        with `position`: each one's place in the unit's files."""
        table = self.storage.read_present_columns(layout.unit_file(self.run_id, "dialogue", int(part)),
                                                  [*ROW_COLUMNS, *SAMPLE_IMAGES])
        table = table.append_column("position", pa.array(np.arange(table.num_rows, dtype=np.int64)))
        return table.filter(pc.is_null(table["reject_reason"]))

    def where(self, part: str) -> str:
        return self.storage.url(layout.unit_file(self.run_id, "dialogue", int(part)))

    def sizes(self, part: str) -> pa.Table:
        """From the unit's footer (its `sample_sizes` fact); a unit written before dialogue kept
        that fact: from its rows' size columns."""
        meta = unit_meta(self.storage, self.run_id, "dialogue", int(part))
        fact = meta.get("facts", {}).get(SAMPLE_SIZES)
        if fact is None:
            rows = self.storage.read_parquet(layout.unit_file(self.run_id, "dialogue", int(part)), columns=SIZE_COLUMNS)
            fact = sample_sizes_fact(rows.to_pandas())[SAMPLE_SIZES]
        else:
            self.check_sizes_fact(part, fact, meta.get("counters", {}).get("live_out", 0))
        return sizes_table(fact["key"], fact["payload_bytes"])

    def check_sizes_fact(self, part: str, fact: dict[str, Any], accepted: float) -> None:
        """A footer's sizes must list each of the unit's accepted samples once: one left out
        would never be published, and nothing else would notice."""
        keys, payload = fact.get("key", []), fact.get("payload_bytes", [])
        if len(keys) == len(payload) == accepted and len(set(keys)) == len(keys):
            return
        raise DamagedFile(f"{self.where(part)}: its footer's {SAMPLE_SIZES} lists {len(keys)} keys "
                          f"({len(set(keys))} distinct) and {len(payload)} sizes for {int(accepted)} accepted samples; "
                          "run dialogue again for this unit (delete the file) or restore it")

    def samples(self, part: str, keys: Collection[str] | None = None) -> list[Sample]:
        table = self.accepted(part)
        if keys is not None:
            table = table.filter(pc.is_in(table["key"], pa.array(list(keys), pa.string())))
        if table.num_rows == 0:
            return []
        rows = table.to_pylist()
        if set(SAMPLE_IMAGES) <= set(table.column_names):  # a unit file that keeps its samples' images
            return [sample_from_row(row, self.dataset, self.version) for row in rows]
        targets = read_part_rows(self.storage, layout.unit_file(self.run_id, "generate", int(part)),
                                 [row["position"] for row in rows], ("key", "target_image"))
        references, inputs = ImageJoin(self.storage, self.run_id, footers=self.reference_footers), {}
        for reference_part in sorted({row["reference_part"] for row in rows}):
            wanted = {row["reference_id"] for row in rows if row["reference_part"] == reference_part}
            inputs[reference_part] = references.reference_images(reference_part, wanted)
        return [sample_from_row({**row, "input_image": inputs[row["reference_part"]].get(row["reference_id"]),
                                 "target_image": targets.get(row["key"])}, self.dataset, self.version)
                for row in rows]


@dataclass
class VersionSamples(StoredSource):
    """A parent version's samples that a `keep` predicate selects (rethreshold), relabelled."""

    storage_config: StorageConfig
    manifest: dict[str, Any]
    keep: frozenset[str]
    version: str
    sizes_in_footers = False

    def parts(self) -> list[str]:
        return [layout.shard(self.manifest["dataset"], self.manifest["version"], shard["path"])
                for shard in self.manifest["shards"]]

    def sizes(self, part: str) -> pa.Table:
        return sample_sizes(self.samples(part))

    def where(self, part: str) -> str:
        return self.storage.url(part)

    def samples(self, part: str, keys: Collection[str] | None = None) -> list[Sample]:
        sha256 = shard_checksums(self.manifest).get(part)
        wanted = self.keep if keys is None else self.keep.intersection(keys)
        return [replace(sample, meta={**sample.meta, "version": self.version})
                for sample in read_checked_shard(self.storage, part, sha256) if sample.key in wanted]


class SampleList:
    """Samples in memory (tests, tools). Part n holds the n-th repeat of each key, so the
    first sample of a repeated key wins by the passes' own rule (the first part wins)."""

    sizes_in_footers = False

    def __init__(self, samples: list[Sample]):
        self.groups: list[list[Sample]] = []
        seen: Counter[str] = Counter()
        for sample in samples:
            if seen[sample.key] == len(self.groups):
                self.groups.append([])
            self.groups[seen[sample.key]].append(sample)
            seen[sample.key] += 1

    def parts(self) -> list[str]:
        return [str(number) for number in range(len(self.groups))]

    def sizes(self, part: str) -> pa.Table:
        return sample_sizes(self.samples(part))

    def where(self, part: str) -> str:
        return f"samples in memory, part {part}"

    def samples(self, part: str, keys: Collection[str] | None = None) -> list[Sample]:
        group = self.groups[int(part)]
        return group if keys is None else [sample for sample in group if sample.key in keys]


def sample_sizes(samples: list[Sample]) -> pa.Table:
    """`SIZES` of samples whose bytes are in hand."""
    return sizes_table([sample.key for sample in samples], [sample.payload_bytes() for sample in samples])


def sizes_table(keys: list[str], payload_bytes: list[int]) -> pa.Table:
    """`SIZES` from samples' keys and payload bytes (in Arrow: a part costs microseconds, where
    a pandas frame cost milliseconds)."""
    payload = np.asarray(payload_bytes, dtype=np.int64)
    return pa.table([pa.array(keys, pa.string()), pa.array(estimated_bytes(payload), pa.int64())], schema=SIZES)


def sample_from_row(row: dict[str, Any], dataset: str, version: str) -> Sample:
    info = json.loads(row["generator_info"]) if row.get("generator_info") else {}
    alpha = row.get("alpha")
    meta = {
        "key": row["key"],
        "dataset": dataset,
        "version": version,
        "reference_id": row["reference_id"],
        "reference_set": row.get("reference_set"),
        "subject": row["subject"],
        "domain": row["domain"],
        "instruction": row["instruction"],
        "instruction_id": row["instruction_id"],
        "category": row.get("category"),
        "style": row.get("style"),
        "round": int(row["round"]),
        "generator": {
            **{k: info.get(k) for k in ("name", "kind", "checkpoint", "steps")},
            **{k: info[k] for k in ("model", "scale") if k in info},  # the generators that report them
            "seed": int(row["seed"]),
            "alpha": None if alpha is None or pd.isna(alpha) else float(alpha),
            "w": row.get("w_id") if isinstance(row.get("w_id"), str) else None,  # never NaN: the member is JSON
        },
        "scores": {name: float(row[name]) for name in SCORE_COLUMNS},
    }
    return Sample(row["key"], row["input_image"], row["target_image"], row["user"], row["assistant"], meta)


# --- the Ray job --------------------------------------------------------------------------


def part_sizes(batch: pd.DataFrame, source: SampleSource) -> pd.DataFrame:
    """`SIZES` and `part` of the accepted samples of the batch's parts."""
    parts = [str(part) for part in batch["part"]]
    tables = [source.sizes(part) for part in parts]
    of_part = np.repeat(np.asarray(parts, dtype=object), [table.num_rows for table in tables])
    sizes = pa.concat_tables(tables) if tables else SIZES.empty_table()
    return sizes.append_column("part", pa.array(of_part, pa.string())).to_pandas()


@dataclass(frozen=True)
class ShardTarget:
    """Where a version's shards go, and what its publish lock says made them."""

    dataset: str
    version: str
    made_with: dict[str, Any]
    holder_id: str | None = None  # the publish lease's holder: a shard is written only while it holds the lock

    @classmethod
    def of(cls, spec: VersionSpec) -> ShardTarget:
        return cls(spec.dataset, spec.version, publish_owner(spec), held_lease_id(spec))


def shard_plan(won: pa.Table, firsts: list[int]) -> pd.DataFrame:
    """One row per shard: its number, its samples' keys (in key order) with the part each comes
    from, and its estimated bytes."""
    keys = won.column("key").to_numpy(zero_copy_only=False)
    parts = won.column("part").to_numpy(zero_copy_only=False)
    sizes = won.column("bytes").to_numpy()
    ends = [*firsts[1:], len(keys)]
    return pd.DataFrame({"shard": range(len(firsts)),
                         "keys": [keys[start:end].tolist() for start, end in zip(firsts, ends)],
                         "parts": [parts[start:end].tolist() for start, end in zip(firsts, ends)],
                         "bytes": [int(sizes[start:end].sum()) for start, end in zip(firsts, ends)]})


@dataclass(frozen=True)
class PlannedShard:
    number: int
    keys: list[str]
    parts: list[str]

    def chunk(self, target: ShardTarget) -> tuple[str, dict[str, Any]]:
        """Its chunk under `_written/` and the footer that says the chunk is this shard's."""
        folder = layout.publish_written(target.dataset, target.version)
        return layout.chunk_file(folder, self.number), chunk_meta(target.made_with, {"keys": self.keys,
                                                                                     "parts": self.parts})


def write_planned_shards(batch: pd.DataFrame, source: SampleSource, target: ShardTarget,
                         where: Storage | StorageConfig) -> pd.DataFrame:
    """The planned shards of `batch` written (or their finished chunks read back): their index rows.
    Each part is read once for all of them, its samples parked on local disk; a shard is written
    (in a thread, while the next one's parts are read) as soon as every part it needs is read.
    `where` is the storage, or on a Ray worker its config (a storage client does not pickle)."""
    storage = opened(where)
    shards = [PlannedShard(int(row["shard"]), list(row["keys"]), list(row["parts"]))
              for row in batch.to_dict("records")]
    written = {shard.number: finished_shard(storage, target, shard) for shard in shards}
    todo = [shard for shard in shards if written[shard.number] is None]
    if todo:
        with SampleSpool(source, todo) as spool, ThreadPoolExecutor(1) as writer:
            writes = []
            for shard in todo:
                spool.gather(shard)
                writes.append(writer.submit(write_and_mark, storage, target, shard, spool.samples(shard.keys)))
            for shard, write in zip(todo, writes):
                written[shard.number] = write.result()
    return pd.concat([written[shard.number] for shard in shards], ignore_index=True)


def finished_shard(storage: Storage, target: ShardTarget, shard: PlannedShard) -> pd.DataFrame | None:
    """The index rows of a shard an earlier publisher wrote, from its chunk; None if not written."""
    chunk, meta = shard.chunk(target)
    if storage.exists(chunk) and chunk_is_finished(storage, chunk, meta):
        return storage.read_parquet(chunk).to_pandas()
    return None


def write_and_mark(storage: Storage, target: ShardTarget, shard: PlannedShard,
                   samples: Iterable[Sample]) -> pd.DataFrame:
    index = write_shard(storage, target, shard.number, samples)
    chunk, meta = shard.chunk(target)
    write_chunk(storage, chunk, pa.Table.from_pandas(index, preserve_index=False), meta)
    return index


class SampleSpool:
    """The samples a task's shards take from `source`, parked in a local temporary file (in the
    order read) and taken back one at a time by key. A part is read once, for all the shards:
    the task holds one part's samples while reading and one sample while writing."""

    def __init__(self, source: SampleSource, shards: list[PlannedShard]) -> None:
        self.source = source
        self.wanted: dict[str, set[str]] = {}
        for shard in shards:
            for key, part in zip(shard.keys, shard.parts):
                self.wanted.setdefault(part, set()).add(key)
        self.read: set[str] = set()
        self.file = tempfile.TemporaryFile()
        self.places: dict[str, tuple[int, int, int, int]] = {}  # key -> offset, texts, input, target bytes
        self.lock = threading.Lock()

    def __enter__(self) -> SampleSpool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()

    def gather(self, shard: PlannedShard, threads: int = 8) -> None:
        """Read the parts `shard` needs that are not read yet (parts read concurrently: I/O), each
        part's samples parked by the thread that read them (none wait in memory for the others)."""
        parts = [part for part in dict.fromkeys(shard.parts) if part not in self.read]
        if parts:
            with ThreadPoolExecutor(min(threads, len(parts))) as pool:
                list(pool.map(lambda part: self.add(self.source.samples(part, self.wanted[part])), parts))
            self.read.update(parts)
            with self.lock:
                self.file.flush()
        missing = [(key, part) for key, part in zip(shard.keys, shard.parts) if key not in self.places]
        if missing:
            key, part = missing[0]
            raise VersionError(f"{len(missing)} samples whose sizes were read are not among their parts' samples "
                               f"(first: {key}, of {self.source.where(part)}): the part changed while publishing, "
                               "or its sizes disagree with its rows; publish again, and if this repeats, write that "
                               "part again")

    def add(self, samples: list[Sample]) -> None:
        """Each sample as its texts and metadata in JSON, then its two images' bytes (nothing read
        back from a file is unpickled)."""
        with self.lock:
            for sample in samples:
                texts = json.dumps([sample.user, sample.assistant, sample.meta]).encode()
                self.places[sample.key] = (self.file.tell(), len(texts), len(sample.input_image),
                                           len(sample.target_image))
                self.file.write(texts)
                self.file.write(sample.input_image)
                self.file.write(sample.target_image)

    def samples(self, keys: list[str]) -> Iterator[Sample]:
        for key in keys:
            offset, texts, input_bytes, target_bytes = self.places[key]
            data = os.pread(self.file.fileno(), texts + input_bytes + target_bytes, offset)
            user, assistant, meta = json.loads(data[:texts])
            yield Sample(key, data[texts:texts + input_bytes], data[texts + input_bytes:], user, assistant, meta)


def write_shard(storage: Storage, target: ShardTarget, number: int, samples: Iterable[Sample]) -> pd.DataFrame:
    """Encode one shard's samples (in key order) to a local file, upload it; return its index rows."""
    relative = layout.shard_relative(target.version, number)
    rows: list[dict[str, Any]] = []

    def indexed() -> Iterator[Sample]:
        for sample in samples:
            rows.append(index_row(sample, relative))
            yield sample

    with tempfile.NamedTemporaryFile(suffix=".tar") as local:
        write_shard_file(indexed(), local)
        local.flush()
        size, sha256 = local.tell(), file_sha256(local.name)
        refuse_committed(storage, target.dataset, target.version, target.holder_id)
        storage.upload_file(local.name, layout.shard(target.dataset, target.version, relative))
    return pd.DataFrame(rows).assign(shard_number=number, shard_samples=len(rows), shard_bytes=size,
                                     shard_sha256=sha256)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def first_of_each_key(keys: pa.Table) -> pa.Table:
    """The rows in key order, with the first part of each key kept."""
    ordered = keys.sort_by([("key", "ascending"), ("rank", "ascending")])
    names = ordered.column("key").to_numpy(zero_copy_only=False)
    repeat = np.zeros(len(names), dtype=bool)
    repeat[1:] = names[1:] == names[:-1]
    return ordered.filter(pa.array(~repeat))


def write_version(storage: Storage, spec: VersionSpec, source: SampleSource, max_bytes: int, max_samples: int,
                  passes: RayPasses | LocalPasses) -> dict[str, Any]:
    """Shards, index and manifest of `spec` from `source`, under the publish lock: on Ray workers
    (`RayPasses`), or in this process (`LocalPasses`: one part or one shard in memory, the rest
    spilled to disk)."""
    with publishing(storage, spec):
        return publish_passes(storage, spec, source, max_bytes, max_samples, passes)


def publish_samples(storage: Storage, spec: VersionSpec, samples: list[Sample], shard_max_bytes: int = 256 * 2**20,
                    shard_max_samples: int = 10_000) -> dict[str, Any]:
    """A version from samples in memory (tests, tools), by `write_version`'s passes in this process:
    shards in key order, the first sample of a repeated key kept."""
    return write_version(storage, spec, SampleList(samples), shard_max_bytes, shard_max_samples, LocalPasses())


def passes_for(config: FactoryConfig) -> RayPasses | LocalPasses:
    """The passes `publish.executor` names."""
    if config.publish.executor == "ray":
        return RayPasses(config.storage, config.publish.task_memory)
    return LocalPasses()


def publish_passes(storage: Storage, spec: VersionSpec, source: SampleSource, max_bytes: int, max_samples: int,
                   run: RayPasses | LocalPasses) -> dict[str, Any]:
    """The size pass, the shard pass, the index and the manifest (the caller holds the lock)."""
    started = time.perf_counter()
    parts = source.parts()
    won = first_of_each_key(accepted_keys(run.sizes(source, parts), parts))
    if won.num_rows == 0:
        raise PublishRefused(f"version {spec.dataset}/{spec.version} would hold no sample: every candidate was "
                           f"rejected{rejection_summary(spec.funnel)}; nothing was published")
    plan = shard_plan(won, cut_points(won.column("bytes").to_numpy(), max_bytes, max_samples))
    if "written" in spec.funnel:
        spec.funnel["written"] = won.num_rows
    log.info("publishing %d samples from %d parts into %d shards (sizes read in %.1f s)", won.num_rows,
             len(set(won.column("part").to_pylist())), len(plan), time.perf_counter() - started)
    with tempfile.TemporaryDirectory() as scratch:
        index_path = Path(scratch) / "index.parquet"
        shards: dict[int, dict[str, Any]] = {}
        with pq.ParquetWriter(index_path, index_schema()) as index_writer:
            for batch in even_batches(run.shards(source, plan, storage, ShardTarget.of(spec)), INDEX_ROWS_PER_GROUP):
                for row in batch.drop_duplicates("shard_number").to_dict("records"):
                    shards[int(row["shard_number"])] = {
                        "path": row["shard"], "samples": int(row["shard_samples"]),
                        "bytes": int(row["shard_bytes"]), "sha256": row["shard_sha256"]}
                index_writer.write_table(pa.Table.from_pandas(batch[list(index_schema().names)],
                                                              schema=index_schema(), preserve_index=False))
        entries = [shards[number] for number in sorted(shards)]
        log.info("%d shards written in %.1f s since the start", len(entries), time.perf_counter() - started)
        delete_written(storage, spec)
        return commit_version(storage, spec, entries, index_path)


def rejection_summary(funnel: dict[str, Any]) -> str:
    """` (most: reason n, ...)`: a funnel's largest rejections, or nothing when it counts none."""
    counts = sorted((funnel.get("rejections") or {}).items(), key=lambda item: -item[1])[:3]
    return f" (most: {', '.join(f'{reason} {count}' for reason, count in counts)})" if counts else ""


def delete_written(storage: Storage, spec: VersionSpec) -> None:
    """The shard pass's chunks, once every shard is written and before the manifest is (a publisher
    stopped between the two writes its shards again: the version's folder never keeps them)."""
    for key in storage.list(layout.publish_written(spec.dataset, spec.version)):
        storage.delete(key)


class RayPasses:
    """The passes as executor jobs on Ray: the size pass, up to 64 parts per task (sizes read from
    footers are read in this process, as its unit counters are: 0.3 ms a unit here, against the ~5 s
    a Ray job takes to start); the shard pass, `shards_per_task` shards a task. Workers open storage
    from `storage_config`; each task reserves `task_memory` bytes."""

    def __init__(self, storage_config: StorageConfig, task_memory: int = 0):
        self.storage_config = storage_config
        self.options = {"memory": task_memory} if task_memory else {}

    def sizes(self, source: SampleSource, parts: list[str]) -> Iterator[pd.DataFrame]:
        if source.sizes_in_footers:
            return LocalPasses().sizes(source, parts)
        if not parts:
            return iter(())
        blocks = blocks_for(parts, int(cluster_resources().get("CPU", 1)))
        return run_map(pd.DataFrame({"part": parts}), [MapStep(part_sizes, (source,), None, options=self.options)],
                       blocks=blocks)

    def shards(self, source: SampleSource, plan: pd.DataFrame, storage: Storage,
               target: ShardTarget) -> Iterator[pd.DataFrame]:
        """`storage` is this process's; the tasks open theirs from `storage_config`."""
        per_task = shards_per_task(plan, int(cluster_resources().get("CPU", 1)))
        step = MapStep(write_planned_shards, (source, target, self.storage_config), per_task, options=self.options)
        return run_map(plan, [step], ordered=True)


def shards_per_task(plan: pd.DataFrame, cpus: int, spool_bytes: int = SPOOL_BYTES) -> int:
    """Consecutive shards a task writes: as few tasks as keep every CPU busy (keys are hashes,
    so a part feeds most shards, and a task reads each part once whatever its shards), with no
    more than `spool_bytes` of samples parked on a task's local disk."""
    spread = -(-len(plan) // max(cpus, 1))
    return max(1, min(spread, spool_bytes // max(int(plan["bytes"].max()), 1)))


def blocks_for(parts: list[str], cpus: int, per_cpu: int = 4, most_parts_per_block: int = 64) -> int:
    """Enough blocks to keep every CPU busy a few times over, few enough that per-task
    overhead stays small, and never more than `most_parts_per_block` parts (units) per task."""
    wanted = max(per_cpu * cpus, -(-len(parts) // most_parts_per_block))
    return max(1, min(len(parts), wanted))


class LocalPasses:
    """The same passes in this process, for small runs and tests: one shard at a time."""

    def sizes(self, source: SampleSource, parts: list[str], threads: int = 16,
              parts_per_call: int = 64) -> Iterator[pd.DataFrame]:
        per_call = max(1, min(parts_per_call, -(-len(parts) // threads)))
        calls = [parts[start : start + per_call] for start in range(0, len(parts), per_call)]
        with ThreadPoolExecutor(threads) as pool:  # reads are I/O: small files, or S3 round trips
            yield from pool.map(lambda some: part_sizes(pd.DataFrame({"part": some}), source), calls)

    def shards(self, source: SampleSource, plan: pd.DataFrame, storage: Storage,
               target: ShardTarget) -> Iterator[pd.DataFrame]:
        return run_map(plan, [MapStep(write_planned_shards, (source, target, storage))], on_ray=False)


def accepted_keys(batches: Iterator[pd.DataFrame], parts: list[str]) -> pa.Table:
    """key, bytes, part and rank (the part's position: the first part of a repeated key wins)."""
    schema = pa.schema([("key", pa.string()), ("bytes", pa.int64()), ("part", pa.string()), ("rank", pa.int64())])
    rank = {part: number for number, part in enumerate(parts)}
    tables = []
    for batch in batches:
        if len(batch):
            batch = batch.assign(rank=batch["part"].map(rank).astype("int64"), bytes=batch["bytes"].astype("int64"))
            tables.append(pa.Table.from_pandas(batch[schema.names], schema=schema, preserve_index=False))
    return pa.concat_tables(tables) if tables else schema.empty_table()


# --- a run's version ----------------------------------------------------------------------


def publish_run(ctx: RunContext, kind: str = "bootstrap", parents: list[str] | None = None,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Publish the accepted candidates of `ctx`'s run as version `ctx.version`.

    Idempotent for the same config. Refuses a run whose plan has units without dialogue
    output unless `publish.allow_partial`, and a run whose units were made with settings
    other than this config's.
    """
    config, storage = ctx.config, ctx.storage
    if version_exists(storage, config.dataset, ctx.version):
        manifest = load_manifest(storage, config.dataset, ctx.version)
        if manifest["config_sha256"] != config.sha256():
            raise PublishRefused(f"version {config.dataset}/{ctx.version} already exists from another config; "
                               "publishing never overwrites (set publish.version to a new name)")
        release_stale_lock(storage, config.dataset, ctx.version)
        log.info("version %s/%s is already published", config.dataset, ctx.version)
        return manifest
    whole = {stage: unit_counters(storage, config.run_id, stage) for stage in MODEL_STAGES}
    done = sorted(set.intersection(*(set(counters.index) for counters in whole.values())))
    check_reference_parts(storage, config.references.set)
    check_references_unchanged(ctx)
    if not done:
        raise PublishRefused(
            f"nothing to publish: no dialogue output under {storage.url(layout.run_dir(config.run_id))}")
    partial = partial_units(ctx, set(done))
    counters = {stage: whole[stage].loc[done] for stage in MODEL_STAGES}
    check_units_made_with(ctx, counters)
    first = unit_meta(storage, config.run_id, "dialogue", done[0])
    source = RunSamples(config.storage, config.run_id, config.dataset, ctx.version, done)
    spec = VersionSpec(
        dataset=config.dataset, version=ctx.version, kind=kind, parents=parents or [], config=config.snapshot(),
        config_sha256=config.sha256(), models=models_used(config), thresholds=dict(config.filter.thresholds),
        funnel=funnel(counters), cost=cost(counters, config),
        extra={"run_id": config.run_id, "dialogue_prompt": first.get("describe", {}).get("dialogue_prompt", {}),
               **({"partial": partial} if partial else {}), **(extra or {})},
    )
    manifest = write_version(storage, spec, source, config.publish.shard_max_bytes, config.publish.shard_max_samples,
                             passes_for(config))
    manifest["funnel"]["written"] = manifest["samples"]
    return manifest


def partial_units(ctx: RunContext, done: set[int]) -> dict[str, Any] | None:
    missing = sorted(set(plan_units(ctx.storage, ctx.config.run_id)) - done)
    if not missing:
        return None
    first = ", ".join(str(unit) for unit in missing[:10])
    if not ctx.config.publish.allow_partial:
        raise PartialRun(f"run {ctx.config.run_id!r} has {len(missing)} planned units without a whole unit file of "
                         f"each stage (missing or damaged; first: {first}); finish them (--stage all) or publish "
                         "anyway with --allow-partial")
    log.warning("publishing a partial run: %d units missing (first: %s)", len(missing), first)
    return {"missing_units": len(missing), "first_missing": missing[:10]}


def check_reference_parts(storage: Storage, set_name: str) -> None:
    """Every part of the reference set reads back (footers only): a damaged one is refused, naming it,
    before the lock is taken or any worker reads it."""
    for key in storage.list(layout.reference_set(set_name)):
        if key.rsplit("/", 1)[-1].startswith("part-") and key.endswith(".parquet"):
            storage.parquet_footer(key)


def check_references_unchanged(ctx: RunContext) -> None:
    """A run's units joined the references its plan was drawn from: refuse the run when the set was
    rebuilt since (or is being rebuilt), whose rows may have joined other references or none."""
    set_name, run_id = ctx.config.references.set, ctx.config.run_id
    planned = plan_index(ctx.storage, run_id).meta.get("reference_digest")
    if planned and set_digest(ctx.storage, set_name) != planned:
        raise PublishRefused(f"reference set {set_name!r} was rebuilt (or is being rebuilt) since run {run_id!r} was "
                           "planned: its units may have joined other references; plan a new run (--set run_id=NEW) "
                           "once the set is complete")


def check_units_made_with(ctx: RunContext, counters: dict[str, pd.DataFrame]) -> None:
    """A manifest states this config's thresholds and models: refuse units made otherwise. Every unit
    counts (two drivers of one run id with other configs each finish some): one footer is read for each
    set of settings the units' digests (`shaped_by`) tell apart."""
    for stage in MODEL_STAGES:
        for _, units in counters[stage].groupby("shaped_by", dropna=False).groups.items():
            units = sorted(int(unit) for unit in units)
            meta = unit_meta(ctx.storage, ctx.config.run_id, stage, units[0])
            changes = changed_settings(ctx.config, meta.get("shaped_by"))
            if changes:
                shown = ", ".join(str(unit) for unit in units[:10]) + (" ..." if len(units) > 10 else "")
                raise PublishRefused(f"run {ctx.config.run_id!r}: {len(units)} {stage} unit(s) ({shown}) were made "
                                   "with other settings than this config:\n  " + "\n  ".join(changes)
                                   + "\npublish with the config the run was made with, or start a new run")


def funnel(counters: dict[str, pd.DataFrame]) -> dict[str, Any]:
    """Counts at each gate, and every rejection as `stage:reason`, summed from the units' counters
    (`unit_counters`: one row per unit of each stage)."""
    rejections: dict[str, int] = {}
    for stage in MODEL_STAGES:
        for name in counters[stage].columns:
            if name.startswith("rejected:"):
                reason = f"{stage}:{name[len('rejected:'):]}"
                rejections[reason] = rejections.get(reason, 0) + int(counter_total(counters[stage], name))
    return {
        "planned": int(counter_total(counters["dialogue"], "rows")),
        "generated": int(counter_total(counters["generate"], "live_out")),
        **{rule.funnel: int(counter_total(counters["filter"], rule.funnel)) for rule in RULES.values()},
        "dialogue_accepted": int(counter_total(counters["dialogue"], "live_out")),
        "written": 0,
        "rejections": dict(sorted(rejections.items())),
    }


def counter_total(counters: pd.DataFrame, name: str) -> float:
    """One counter summed over the units (0 when none has it)."""
    return float(counters[name].sum()) if name in counters else 0.0


def cost(counters: dict[str, pd.DataFrame], config: FactoryConfig) -> dict[str, Any]:
    """Actor-seconds and GPU-seconds per model stage, from the units' counters."""
    per_stage = {}
    for stage in MODEL_STAGES:
        seconds = counter_total(counters[stage], "seconds")
        gpus = getattr(config, stage).num_gpus
        per_stage[stage] = {"actor_seconds": round(seconds, 3), "gpu_seconds": round(seconds * gpus, 3)}
    generate = counters["generate"]
    per_stage["generate"]["generator_gpu_seconds"] = round(counter_total(generate, "gpu_seconds"), 3)
    accepted = int(counter_total(counters["dialogue"], "live_out"))  # the funnel's dialogue_accepted
    per_stage["generate"].update(generator_work(generate, accepted=accepted))
    return per_stage


def generator_work(counters: pd.DataFrame, accepted: int) -> dict[str, Any]:
    """UNet evaluations of every candidate drawn (sampling, and test-time fine-tuning apart),
    and their sum per accepted sample: the generator's cost in units no machine changes."""
    sampling, finetune = counter_total(counters, "unet_evals"), counter_total(counters, "finetune_unet_evals")
    per_sample = round((sampling + finetune) / accepted, 3) if accepted else None
    return {"unet_evals": round(sampling, 3), "finetune_unet_evals": round(finetune, 3),
            "unet_evals_per_accepted_sample": per_sample}


def models_used(config: FactoryConfig) -> dict[str, Any]:
    storage = config.storage
    models = {
        "clip": {**model_fingerprint(config.filter.clip_model, storage),
                 "pretrained": model_fingerprint(config.filter.clip_pretrained, storage)},
        "dino": model_fingerprint(config.filter.dino_model, storage),
        "dialogue": {"engine": config.dialogue.engine, **model_fingerprint(config.dialogue.model, storage)},
    }
    for name, spec in config.generate.generators.items():
        models[f"generator:{name}"] = {"kind": spec.kind, **model_fingerprint(spec.model, storage),
                                       "checkpoint": model_fingerprint(spec.checkpoint, storage)}
    return models
