"""Dataset versions: the publish lock and commit (index, card, manifest last), load, list, union, verify.

Shards are written by `factory.dataset.publisher.write_version`, the one shard writer.

A version exists iff its `manifest.json` does. The manifest is written create-only, so a
published version is never overwritten and of two concurrent publishers exactly one wins.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import factory
from factory.dataset.card import FILES as CARD_FILES
from factory.dataset.card import card_files
from factory.dataset.shards import Sample, read_shard_bytes
from factory.framework import layout
from factory.framework.config import ConfigError
from factory.framework.storage import AlreadyExists, Storage, StorageError
from filters.rules import SCORE_COLUMNS

log = logging.getLogger(__name__)

SCHEMA = "factory.manifest/1"
KINDS = ("bootstrap", "sid", "union", "rethreshold", "reviewed")
INDEX_COLUMNS = ("key", "shard", "reference_id", "subject", "domain", "instruction_id", "category", "instruction",
                 "style", "round", "alpha", *SCORE_COLUMNS)


class VersionError(RuntimeError):
    """A version is missing, exists already, or does not verify."""


class PublishRefused(VersionError, ConfigError):
    """A publish refused for what the config and the stored run say (nothing to publish, another config's
    version, units or references that changed): bad input, as a config error is (`factory.run` exits 2)."""


version_dir = layout.version_dir
manifest_key = layout.manifest


def shard_key(manifest: dict[str, Any], shard_path: str) -> str:
    """Storage key of a shard listed in a manifest (paths are version- or root-relative)."""
    return layout.shard(manifest["dataset"], manifest["version"], shard_path)


def shard_checksums(manifest: dict[str, Any]) -> dict[str, str]:
    """Storage key -> sha256 of every shard the manifest lists."""
    return {shard_key(manifest, shard["path"]): shard["sha256"] for shard in manifest["shards"]}


def checked_shard(storage: Storage, key: str, data: bytes, sha256: str | None) -> bytes:
    """`data`, read from shard `key`, if its sha256 is the one the manifest lists (`sha256`); else the
    version was changed after it was published and reading it is refused, naming the shard."""
    if sha256 is None:
        raise VersionError(f"shard {storage.url(key)} is not listed in the version's manifest; refusing to read it")
    if hashlib.sha256(data).hexdigest() != sha256:
        raise _tampered(storage, key, hashlib.sha256(data).hexdigest(), sha256)
    return data


def read_checked_shard(storage: Storage, key: str, sha256: str | None) -> Iterator[Sample]:
    """The samples of a published shard, read once and checked against its manifest's sha256 first."""
    yield from read_shard_bytes(checked_shard(storage, key, storage.read_bytes(key), sha256))


def check_shards(storage: Storage, manifest: dict[str, Any]) -> None:
    """Hash every shard of a version as it streams in; refuse the first that does not match its manifest."""
    for key, sha256 in shard_checksums(manifest).items():
        digest = hashlib.sha256()
        for chunk in storage.iter_chunks(key):
            digest.update(chunk)
        if digest.hexdigest() != sha256:
            raise _tampered(storage, key, digest.hexdigest(), sha256)


def _tampered(storage: Storage, key: str, actual: str, listed: str) -> VersionError:
    return VersionError(f"shard {storage.url(key)} does not match its manifest (sha256 {actual[:16]}..., the manifest "
                        f"says {listed[:16]}...): the published version was changed; refusing to read it "
                        "(`versions verify` lists every damaged shard)")


def code_version() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(factory.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{factory.__version__}+{sha}" if sha else factory.__version__


REQUIRED_FIELDS = {"dataset": str, "version": str, "kind": str, "parents": list, "created": str, "config": dict,
                   "thresholds": dict, "funnel": dict, "shards": list, "samples": int}
SHARD_FIELDS = {"path": str, "samples": int, "bytes": int, "sha256": str}


def load_manifest(storage: Storage, dataset: str, version: str) -> dict[str, Any]:
    key = manifest_key(dataset, version)
    try:
        body = storage.read_bytes(key)
    except StorageError:
        raise VersionError(f"version {dataset}/{version} does not exist (no {storage.url(key)})") from None
    return parse_manifest(body, storage.url(key))


def parse_manifest(body: bytes, where: str) -> dict[str, Any]:
    """A manifest's JSON, or `VersionError` naming `where` when it is not JSON or lacks a field readers use."""
    try:
        manifest = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise VersionError(f"manifest {where} is not valid JSON: {err}") from None
    except RecursionError:
        raise VersionError(f"manifest {where} is not valid JSON: it is nested too deeply") from None
    problem = manifest_problem(manifest)
    if problem:
        raise VersionError(f"manifest {where} is malformed: {problem}")
    return manifest


def manifest_problem(manifest: Any) -> str | None:
    """What makes a parsed manifest unusable (a missing or ill-typed field), or None."""
    if not isinstance(manifest, dict):
        return "not a JSON object"
    for name, kind in REQUIRED_FIELDS.items():
        if not isinstance(manifest.get(name), kind):
            return f"field {name!r} is missing or not a {kind.__name__}"
    for number, shard in enumerate(manifest["shards"]):
        if not isinstance(shard, dict) or not all(isinstance(shard.get(f), t) for f, t in SHARD_FIELDS.items()):
            return f"shard entry {number} lacks one of {sorted(SHARD_FIELDS)}"
    return None


def version_exists(storage: Storage, dataset: str, version: str) -> bool:
    return storage.exists(manifest_key(dataset, version))


def scan_versions(storage: Storage, dataset: str) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """(the dataset's readable manifests, oldest first; {version folder: why its manifest is unreadable})."""
    manifests, bad = [], {}
    for key in storage.list(layout.dataset_dir(dataset)):
        if layout.is_manifest(key):
            try:
                manifests.append(parse_manifest(storage.read_bytes(key), storage.url(key)))
            except (VersionError, StorageError) as err:
                bad[key.split("/")[2]] = str(err)
    return sorted(manifests, key=lambda m: (m["created"], m["version"])), bad


def list_versions(storage: Storage, dataset: str) -> list[dict[str, Any]]:
    """The dataset's readable versions, oldest first; each unreadable one is logged (and left out)."""
    manifests, bad = scan_versions(storage, dataset)
    for reason in bad.values():
        log.warning("left out: %s", reason)
    return manifests


def latest_version(storage: Storage, dataset: str, kinds: Iterable[str] = KINDS) -> str | None:
    wanted = [m for m in list_versions(storage, dataset) if m["kind"] in tuple(kinds)]
    return wanted[-1]["version"] if wanted else None


def score_stats(values: Iterable[float]) -> dict[str, float]:
    array = np.asarray([np.nan if v is None else v for v in values], dtype=float)
    array = array[~np.isnan(array)]
    if array.size == 0:
        return {}
    quantiles = np.quantile(array, [0.1, 0.5, 0.9])
    return {
        "mean": round(float(array.mean()), 6),
        "min": round(float(array.min()), 6),
        "p10": round(float(quantiles[0]), 6),
        "p50": round(float(quantiles[1]), 6),
        "p90": round(float(quantiles[2]), 6),
        "max": round(float(array.max()), 6),
    }


def index_row(sample: Sample, shard_path: str) -> dict[str, Any]:
    meta = sample.meta
    scores = meta.get("scores", {})
    return {
        "key": sample.key,
        "shard": shard_path,
        "reference_id": meta.get("reference_id"),
        "subject": meta.get("subject"),
        "domain": meta.get("domain"),
        "instruction_id": meta.get("instruction_id"),
        "category": meta.get("category"),
        "instruction": meta.get("instruction"),
        "style": meta.get("style"),
        "round": meta.get("round"),
        "alpha": meta.get("generator", {}).get("alpha"),
        **{name: scores.get(name) for name in SCORE_COLUMNS},
    }


def index_schema() -> pa.Schema:
    return pa.schema(
        [
            ("key", pa.string()),
            ("shard", pa.string()),
            ("reference_id", pa.string()),
            ("subject", pa.string()),
            ("domain", pa.string()),
            ("instruction_id", pa.string()),
            ("category", pa.string()),
            ("instruction", pa.string()),
            ("style", pa.string()),
            ("round", pa.int64()),
            ("alpha", pa.float64()),
            *((name, pa.float64()) for name in SCORE_COLUMNS),
        ]
    )


def read_index(storage: Storage, dataset: str, version: str, columns: list[str] | None = None,
               filters: list | None = None) -> pa.Table:
    """A version's index, or some columns of it, or the rows `filters` keeps (`Storage.read_parquet`)."""
    return storage.read_parquet(layout.index(dataset, version), columns=columns, filters=filters)


class KeySet:
    """Sample keys, sorted in one numpy bytes array: membership by binary search. About 24 bytes a key,
    where a frozenset of str takes ~190; each training rank and pool actor holds one for its whole run."""

    def __init__(self, keys: np.ndarray):
        keys.sort()  # in place: no second copy at the peak
        self.keys = keys

    @classmethod
    def of(cls, column: pa.ChunkedArray) -> KeySet:
        """From an Arrow string column, converted a slice at a time (no Python str per key held)."""
        slices = [np.array(chunk.slice(start, KEY_SLICE_ROWS).cast(pa.binary()).to_pylist(), dtype=np.bytes_)
                  for chunk in column.chunks for start in range(0, len(chunk), KEY_SLICE_ROWS)]
        return cls(np.concatenate(slices) if slices else np.array([], dtype=np.bytes_))

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        probe = key.encode()
        at = int(np.searchsorted(self.keys, probe))  # a probe wider than the keys is cut to them here,
        return at < len(self.keys) and self.keys[at] == probe  # not here: it never matches a shorter key

    def __len__(self) -> int:
        return len(self.keys)


KEY_SLICE_ROWS = 65536


def version_keys(storage: Storage, manifest: dict[str, Any]) -> KeySet | None:
    """The keys a reader keeps from the listed shards: the index's, when the shards hold more
    (`shards_superset`, a reviewed version or a union of one); None when every shard sample counts."""
    if not manifest.get("shards_superset"):
        return None
    index = read_index(storage, manifest["dataset"], manifest["version"], columns=["key"])
    return KeySet.of(index.column("key"))


@dataclass
class VersionSpec:
    """Everything a manifest says besides the shards."""

    dataset: str
    version: str
    kind: str
    parents: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    config_sha256: str = ""
    models: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    funnel: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")


def release_stale_lock(storage: Storage, dataset: str, version: str) -> None:
    """Remove the publish lock of a version whose manifest exists (its publisher died
    between writing the manifest and releasing the lock)."""
    if version_exists(storage, dataset, version):
        storage.delete(layout.publish_lock(dataset, version))


def publish_owner(spec: VersionSpec) -> dict[str, Any]:
    """Who publishes a version: its lock holds this, and so does each shard the publisher wrote."""
    return {"config_sha256": spec.config_sha256, "kind": spec.kind}


LEASE_S = 120.0  # a publisher renews its lock every third of this; one on another host silent this long is dead


@dataclass(frozen=True)
class Holder:
    """The process holding a publish lock."""

    id: str
    host: str
    pid: int
    started: float  # the process's start time: a pid used again by another process is not it

    @classmethod
    def this_process(cls) -> Holder:
        process = psutil.Process()
        return cls(uuid.uuid4().hex, socket.gethostname(), process.pid, process.create_time())

    def alive_here(self) -> bool:
        """Whether this process, on this host, still runs."""
        try:
            process = psutil.Process(self.pid)
            return abs(process.create_time() - self.started) < 1 and process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False


class PublishLease:
    """A publisher's hold on its version's lock: the lock names the config and the holding process and
    is renewed every `LEASE_S / 3` seconds while the version is written. A second publisher of the same
    config takes the lock over only from a holder that is dead: a process no longer running on this
    host, or, on another host, a lock not renewed for `LEASE_S`. The same run resumed after a crash
    thus takes its lock back, and two live publishers never write one version."""

    def __init__(self, storage: Storage, spec: VersionSpec):
        self.storage = storage
        self.key = layout.publish_lock(spec.dataset, spec.version)
        self.owner = publish_owner(spec)
        self.holder = Holder.this_process()
        self._mutex = threading.Lock()
        self._stopped = threading.Event()

    def body(self) -> bytes:
        return json.dumps({**self.owner, "holder": dataclasses.asdict(self.holder), "renewed": time.time()},
                          sort_keys=True).encode()

    def start(self) -> None:
        LEASES[self.key] = self
        threading.Thread(target=self._renew, name="publish-lease", daemon=True).start()

    def _renew(self) -> None:
        while not self._stopped.wait(LEASE_S / 3):
            with self._mutex:
                if self._stopped.is_set():
                    return
                try:
                    holder = holder_in(lock_body(self.storage.read_bytes(self.key)))
                    if holder is None or holder.id != self.holder.id:
                        log.warning("the publish lock %s was taken over by another run", self.storage.url(self.key))
                        return
                    self.storage.write_bytes(self.key, self.body())
                except StorageError as err:  # the next renewal tries again, well inside the lease
                    log.warning("could not renew the publish lock %s: %s", self.storage.url(self.key), err)

    def stop(self) -> None:
        """Stop renewing; once this returns no renewal writes the lock again."""
        with self._mutex:
            self._stopped.set()
        LEASES.pop(self.key, None)


LEASES: dict[str, PublishLease] = {}  # this process's held publish locks, by lock key


def held_lease(spec: VersionSpec) -> PublishLease | None:
    """This process's publish lease on `spec`'s version (None: it holds none)."""
    return LEASES.get(layout.publish_lock(spec.dataset, spec.version))


def held_lease_id(spec: VersionSpec) -> str | None:
    """The holder id of this process's publish lease on `spec`'s version (None: it holds none)."""
    lease = held_lease(spec)
    return lease.holder.id if lease else None


def lock_holder_id(storage: Storage, key: str) -> str | None:
    """The id of the process holding the publish lock at `key`: None when there is no lock, "" when
    it names none."""
    try:
        body = storage.read_bytes(key)
    except StorageError:
        return None
    holder = holder_in(lock_body(body))
    return holder.id if holder else ""


def claim_version(storage: Storage, spec: VersionSpec) -> PublishLease:
    """Take the version's publish lock (`PublishLease`), or fail clearly if another run holds it."""
    lease = PublishLease(storage, spec)
    for _ in range(3):
        if version_exists(storage, spec.dataset, spec.version):
            release_stale_lock(storage, spec.dataset, spec.version)  # its publisher died before removing it
            raise _already_exists(spec, storage)
        try:
            storage.write_bytes(lease.key, lease.body(), create_only=True)
        except AlreadyExists:
            if not take_over(storage, spec, lease):
                continue
        # A publisher that finished just before we took the lock wrote its manifest before
        # releasing the lock, so one more look sees it: we must not write into its version.
        if version_exists(storage, spec.dataset, spec.version):
            storage.delete(lease.key)
            raise _already_exists(spec, storage)
        for name in CARD_FILES:  # a card without its manifest is a dead attempt's: it would name its shards
            storage.delete(layout.version_file(spec.dataset, spec.version, name))
        lease.start()
        return lease
    raise VersionError(f"could not take the publish lock {storage.url(lease.key)}: it keeps changing hands")


def take_over(storage: Storage, spec: VersionSpec, lease: PublishLease) -> bool:
    """Take the lock from a dead publisher of the same config; False when the lock went meanwhile or
    another taker won (look again). Refuses a live holder, and another config's lock."""
    name = f"{spec.dataset}/{spec.version}"
    renewed_before = None
    while True:
        try:
            held = lock_body(storage.read_bytes(lease.key))
        except StorageError:  # released between the two calls: look again
            return False
        if {key: held.get(key) for key in lease.owner} != lease.owner:
            raise VersionError(
                f"version {name} is being published by another run (lock {storage.url(lease.key)}); choose another "
                "version name, or delete the lock if that run is dead")
        holder = holder_in(held)
        if holder is None:
            break  # a lock of this config naming no process (written before locks did): none holds it
        if holder.host == socket.gethostname():
            if holder.alive_here():
                raise VersionError(f"version {name} is being published by a live run of this config "
                                   f"(pid {holder.pid} on this host); it goes on alone")
            break
        renewed = held.get("renewed")
        if renewed_before is not None and renewed != renewed_before:
            raise VersionError(f"version {name} is being published by a live run of this config on host "
                               f"{holder.host} (it renewed its lock); it goes on alone")
        silent = time.time() - float(renewed) if isinstance(renewed, (int, float)) else LEASE_S
        if silent >= LEASE_S:
            break
        log.info("the publish lock of %s is held by host %s, renewed %.0fs ago: waiting up to %.0fs to see "
                 "whether it renews it (a live run) or not (a dead one)", name, holder.host, silent, LEASE_S - silent)
        renewed_before = renewed
        time.sleep(min(LEASE_S - silent, LEASE_S / 3 + 1))
    storage.write_bytes(lease.key, lease.body())
    return lock_holder_id(storage, lease.key) == lease.holder.id


def lock_body(body: bytes) -> dict[str, Any]:
    try:
        held = json.loads(body)
    except ValueError:
        return {}
    return held if isinstance(held, dict) else {}


def holder_in(held: dict[str, Any]) -> Holder | None:
    try:
        return Holder(**held["holder"])
    except (KeyError, TypeError):
        return None


@contextlib.contextmanager
def publishing(storage: Storage, spec: VersionSpec) -> Iterator[None]:
    """Hold the version's publish lock over the block. An error inside it (a damaged input, a refused
    union) releases the lock, so no lock outlives a publisher that failed cleanly; a killed one
    leaves it for the same run to take back."""
    lease = claim_version(storage, spec)
    try:
        yield
    except BaseException:
        lease.stop()
        with contextlib.suppress(StorageError):
            if lock_holder_id(storage, lease.key) == lease.holder.id:  # not a lock another run took over
                storage.delete(lease.key)
        raise
    finally:
        lease.stop()


def _already_exists(spec: VersionSpec, storage: Storage) -> VersionError:
    """The refusal to publish an existing version, saying when it is this same publish done before (a
    command run again after it finished, or after it was killed between its manifest and its lock)."""
    try:
        existing = load_manifest(storage, spec.dataset, spec.version)
    except VersionError:
        existing = {}
    same = (existing.get("config_sha256"), existing.get("kind"), existing.get("parents")) == (
        spec.config_sha256, spec.kind, list(spec.parents))
    return VersionError(f"version {spec.dataset}/{spec.version} already exists"
                        + (", published by this same config from the same parents: nothing to do" if same else
                           "; publishing never overwrites"))


def _manifest(spec: VersionSpec, shards: list[dict[str, Any]], index: pa.Table) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "dataset": spec.dataset,
        "version": spec.version,
        "kind": spec.kind,
        "parents": list(spec.parents),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "config": spec.config,
        "config_sha256": spec.config_sha256,
        "models": spec.models,
        "thresholds": spec.thresholds,
        "funnel": spec.funnel,
        "cost": spec.cost,
        "shards": shards,
        "samples": index.num_rows,
        "score_stats": {name: score_stats(index.column(name).to_numpy(zero_copy_only=False).astype(float))
                        for name in SCORE_COLUMNS},
        "card": list(CARD_FILES),
        **spec.extra,
    }


def commit_version(storage: Storage, spec: VersionSpec, shards: list[dict[str, Any]],
                   index: pa.Table | str | Path) -> dict[str, Any]:
    """Write the index (a table, or a local Parquet file), the dataset card, then the manifest, then
    drop the lock."""
    table = index if isinstance(index, pa.Table) else pq.read_table(index, columns=list(SCORE_COLUMNS))
    manifest = _manifest(spec, shards, table)
    body = manifest_bytes(manifest)  # before any write: a manifest that cannot be JSON writes nothing
    lease = held_lease(spec)
    refuse_committed(storage, spec.dataset, spec.version, held_lease_id(spec))
    key = layout.index(spec.dataset, spec.version)
    if isinstance(index, pa.Table):
        storage.write_parquet(key, index)
    else:
        storage.upload_file(index, key)
    for stale in unlisted_shards(storage, manifest):  # under the lock, the version not committed: a dead attempt's
        storage.delete(stale)
    for name, data in card_files(manifest).items():
        storage.write_bytes(layout.version_file(spec.dataset, spec.version, name), data)
    key = manifest_key(spec.dataset, spec.version)
    try:
        storage.write_bytes(key, body, create_only=True)
    except AlreadyExists:
        # A retried PUT whose first answer was lost meets our own manifest: that is success.
        if storage.read_bytes(key) != body:
            raise VersionError(f"version {spec.dataset}/{spec.version} was published by another run first") from None
    if lease is not None:
        lease.stop()
    storage.delete(layout.publish_lock(spec.dataset, spec.version))
    return manifest


def refuse_committed(storage: Storage, dataset: str, version: str, holder_id: str | None = None) -> None:
    """Before a publisher writes into its version: the version must not have been committed meanwhile,
    and (given its holder id) its lock must still be its own: a publisher silent past its lease (a
    stalled node) may have lost it to a run of the same config, and then stops."""
    if version_exists(storage, dataset, version):
        raise VersionError(f"version {dataset}/{version} was published by another run while this one wrote it; "
                           "nothing of it was overwritten")
    if holder_id is not None and lock_holder_id(storage, layout.publish_lock(dataset, version)) != holder_id:
        raise VersionError(f"the publish lock of {dataset}/{version} was taken over by another run of this config "
                           f"(this one was silent past its {LEASE_S:.0f}s lease); this one stops")


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The manifest as strict JSON: a NaN or an infinity anywhere is a ValueError, never written."""
    try:
        return json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False).encode("utf-8")
    except ValueError as err:
        raise VersionError(f"manifest of {manifest['dataset']}/{manifest['version']} holds a NaN or an "
                           f"infinity ({err}); nothing was written") from None


def union_versions(storage: Storage, spec: VersionSpec) -> dict[str, Any]:
    """A version whose shards are its parents' shards, listed by root-relative path; nothing is copied."""
    if len(spec.parents) < 1:
        raise VersionError("a union needs at least one parent version")
    if len(set(spec.parents)) < len(spec.parents):
        raise VersionError(f"union parents {spec.parents} name a version twice; a union must not repeat a sample")
    manifests = [load_manifest(storage, spec.dataset, parent) for parent in spec.parents]
    for manifest in manifests:
        check_shards(storage, manifest)  # a union copies nothing: a tampered parent would carry into it
    shards = union_shards(manifests)
    with tempfile.TemporaryDirectory(prefix="union-") as scratch:
        index = Path(scratch) / "index.parquet"
        keys = write_union_index(storage, spec.dataset, dict(zip(spec.parents, manifests)), index)
        duplicates = len(keys) - pc.count_distinct(keys).as_py()
        if duplicates:
            raise VersionError(f"parents {spec.parents} share {duplicates} sample keys; "
                               "a union must not repeat a sample")
        spec.funnel = spec.funnel or {"written": len(keys),
                                      "from_parents": {parent: manifest["samples"]
                                                       for parent, manifest in zip(spec.parents, manifests)}}
        spec.thresholds = spec.thresholds or loosest_thresholds(manifests)
        if any(manifest.get("shards_superset") for manifest in manifests):
            spec.extra["shards_superset"] = True  # a reviewed parent's shards hold samples its index left out
        with publishing(storage, spec):  # after every check on the parents: a refused union leaves no lock
            return commit_version(storage, spec, shards, index)


def union_shards(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The parents' shards by root-relative path, each listed once: two reviewed children of one
    version list the same shards (each for its own kept samples), and a shard listed twice would be
    read twice by every reader."""
    shards: dict[str, dict[str, Any]] = {}
    for manifest in manifests:
        for shard in manifest["shards"]:
            entry = {**shard, "path": shard_key(manifest, shard["path"])}
            if entry["path"] in shards:
                listed = shards[entry["path"]]
                listed["version_samples"] = (listed.get("version_samples", listed["samples"])
                                             + entry.get("version_samples", entry["samples"]))
            else:
                shards[entry["path"]] = entry
    return list(shards.values())


def write_union_index(storage: Storage, dataset: str, manifests: dict[str, dict[str, Any]],
                      path: Path) -> pa.ChunkedArray:
    """The parents' index rows, a row group at a time, into the local Parquet file at `path`, each
    shard path made root-relative; returns the keys (a union of millions of samples holds its keys
    in memory, not its rows)."""
    keys = []
    with pq.ParquetWriter(path, index_schema()) as writer:
        for parent, manifest in manifests.items():
            with storage.parquet(layout.index(dataset, parent)) as parquet:
                for group in range(parquet.num_row_groups):
                    rows = parquet.read_row_group(group).cast(index_schema())
                    listed = pc.unique(rows.column("shard"))
                    rooted = pa.array([shard_key(manifest, shard) for shard in listed.to_pylist()], pa.string())
                    paths = pc.take(rooted, pc.index_in(rows.column("shard"), listed))
                    writer.write_table(rows.set_column(rows.schema.get_field_index("shard"), "shard", paths))
                    keys.extend(rows.column("key").chunks)
    return pa.chunked_array(keys, pa.string())


def loosest_thresholds(manifests: list[dict[str, Any]]) -> dict[str, float]:
    """Per rule every parent has, the loosest parent's threshold: what every sample of their union
    passed (so a rethreshold of the union knows what is stricter)."""
    rules = set.intersection(*(set(manifest["thresholds"]) for manifest in manifests))
    return {rule: min(manifest["thresholds"][rule] for manifest in manifests) for rule in sorted(rules)}


def verify_version(storage: Storage, dataset: str, version: str) -> list[str]:
    """Re-read every shard; return the problems found (empty when the version is sound)."""
    manifest = load_manifest(storage, dataset, version)
    problems: list[str] = []
    seen: dict[str, str] = {}
    for shard in manifest["shards"]:
        key = shard_key(manifest, shard["path"])
        problems.extend(_verify_shard(storage, key, shard, seen))
    try:
        index = read_index(storage, dataset, version, columns=["key"]).to_pylist()
    except Exception as err:  # a missing or unreadable index is a finding, not a crash
        return problems + [f"index.parquet unreadable: {type(err).__name__}: {err}"]
    for row in index:
        if row["key"] not in seen:
            problems.append(f"index row {row['key']} is in no shard")
    if len(index) != manifest["samples"]:
        problems.append(f"index has {len(index)} rows, manifest says {manifest['samples']} samples")
    extra = set(seen) - {row["key"] for row in index}
    if extra and not manifest.get("shards_superset"):
        problems.append(f"{len(extra)} shard samples have no index row (e.g. {sorted(extra)[0]})")
    problems.extend(f"shard file {key.rsplit('/', 1)[-1]} in the version's folder is not in its manifest"
                    for key in unlisted_shards(storage, manifest))
    return problems


def unlisted_shards(storage: Storage, manifest: dict[str, Any]) -> list[str]:
    """Shard files in the version's own shard folder its manifest does not list (left by a publisher
    that died writing another attempt at the version)."""
    folder = layout.shard(manifest["dataset"], manifest["version"], layout.shard_relative(manifest["version"], 0))
    listed = {shard_key(manifest, shard["path"]) for shard in manifest["shards"]}
    return [key for key in storage.list(folder.rsplit("/", 1)[0]) if key.endswith(".tar") and key not in listed]


def _verify_shard(storage: Storage, key: str, shard: dict[str, Any], seen: dict[str, str]) -> list[str]:
    try:
        data = storage.read_bytes(key)
    except StorageError:
        return [f"shard {shard['path']}: missing"]
    problems = []
    if len(data) != shard["bytes"]:
        problems.append(f"shard {shard['path']}: {len(data)} bytes, manifest says {shard['bytes']}")
    if hashlib.sha256(data).hexdigest() != shard["sha256"]:
        problems.append(f"shard {shard['path']}: sha256 mismatch")
    try:
        keys = [sample.key for sample in read_shard_bytes(data)]
    except Exception as err:
        return problems + [f"shard {shard['path']}: unreadable ({type(err).__name__}: {err})"]
    if len(keys) != shard["samples"]:
        problems.append(f"shard {shard['path']}: {len(keys)} samples, manifest says {shard['samples']}")
    for sample_key in keys:
        if sample_key in seen:
            problems.append(f"shard {shard['path']}: key {sample_key} repeats (also in {seen[sample_key]})")
        seen[sample_key] = shard["path"]
    return problems
