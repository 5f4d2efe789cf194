"""Models from anywhere: a local path, a hub id, or an `s3://` prefix, made loadable from local disk.

`local_model(ref, storage, key)` is what every loader calls before its library's
`from_pretrained` (or open_clip's loading): a local path or a hub id comes back unchanged; an
`s3://` prefix (a folder of files) or object (one file, e.g. an open_clip state dict) is fetched
once per node into the model cache and its local path returned.

- The cache folder is `$FACTORY_MODEL_CACHE` (default `~/.cache/cafe-factory/models`); an entry is
  named after the URL and a digest of its objects' ETags, so a changed model is a new entry.
- An entry is downloaded into `.<entry>.partial-<pid>-<n>` and renamed into place when every
  object is there with its listed size: a half-finished download is never used, and the next
  download on the node removes every leftover one whose entry no process is downloading.
- Actors on one node share one download: the download holds an exclusive `fcntl.flock` on
  `.<entry>.lock`, and whoever waited on it finds the finished entry.
- S3 settings (endpoint, region, retries) are the run's `storage` section; credentials come from
  the usual AWS settings and never appear in an error.

`model_ref` is how a model reference goes into ids, keys and sample metadata (never the cache
path, never an absolute path under the working folder); `model_fingerprint` is how the manifest
names a model (an S3 one by URL and ETag digest).
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from factory.framework.config import StorageConfig
from factory.framework.layout import portable_ref, safe_id
from factory.framework.storage import S3Storage, StorageError

if TYPE_CHECKING:
    from factory.framework.config import StorageConfig

CACHE_ENV = "FACTORY_MODEL_CACHE"
_partial_names = itertools.count()


class ModelUnavailable(RuntimeError):
    """A configured model cannot be found or read; the message names the config key."""


@dataclass(frozen=True)
class S3Model:
    """What an `s3://` model is: its objects (name relative to the model, ETag, size)."""

    url: str
    objects: tuple[tuple[str, str, int], ...]
    single_file: bool  # the URL names one object, not a folder

    @property
    def digest(self) -> str:
        text = "\n".join(f"{name}\t{etag}\t{size}" for name, etag, size in self.objects)
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def entry(self) -> str:
        return f"{safe_id(self.url.rstrip('/'))}-{self.digest[:16]}"


def is_s3(ref: str | None) -> bool:
    return bool(ref) and str(ref).startswith("s3://")


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cafe-factory" / "models").expanduser()


def model_ref(ref: str | None) -> str | None:
    """A model reference as ids, keys and sample metadata carry it: an S3 URL or hub id as is,
    a local path under the working folder relative to it (`factory.framework.layout.portable_ref`)."""
    return portable_ref(ref)


def loader_paths(storage: StorageConfig | None):
    """`local_model` bound to a run's storage settings: `(reference, config key) -> loadable path`."""
    return lambda ref, key: local_model(ref, storage, key)


def _storage(url: str, storage: StorageConfig | None) -> S3Storage:
    settings = storage.model_dump() if storage is not None else {}
    return S3Storage(url, StorageConfig(**{**settings, "root": url}))


def describe_s3(ref: str, storage: StorageConfig | None = None, key: str = "model") -> S3Model:
    """List an S3 model's objects; a missing, empty or unlistable prefix is `ModelUnavailable`."""
    url = ref.rstrip("/")
    try:
        objects = [(name, etag, size) for name, etag, size in _storage(url, storage).list_objects("")
                   if not name.endswith("/")]
        single = False
        if not objects and url.count("/") > 2:  # not a folder: perhaps one object
            parent, _, name = url.rpartition("/")
            objects = [(name, etag, size) for found, etag, size in _storage(parent, storage).list_objects("")
                       if found == name]
            single = bool(objects)
    except StorageError as err:
        raise ModelUnavailable(f"{key}={ref!r}: cannot list the model: {err}") from None
    if not objects:
        raise ModelUnavailable(f"{key}={ref!r}: no objects under this S3 prefix")
    return S3Model(url, tuple(objects), single)


def local_model(ref: str | None, storage: StorageConfig | None = None, key: str = "model") -> str | None:
    """A path a library can load `ref` from: `ref` itself unless it is on S3, else the node's cached copy."""
    if not is_s3(ref):
        return ref
    model = describe_s3(ref, storage, key)
    root = cache_root()
    final = root / model.entry
    if not final.exists():
        root.mkdir(parents=True, exist_ok=True)
        with open(root / f".{model.entry}.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one download per node; the others wait here
            try:
                if not final.exists():
                    _download(model, storage, root, key)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    return str(final / model.objects[0][0]) if model.single_file else str(final)


def _download(model: S3Model, storage: StorageConfig | None, root: Path, key: str) -> None:
    for stale in root.glob(f".{model.entry}.partial-*"):  # a killed download's leftovers (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    remove_abandoned_downloads(root)
    partial = root / f".{model.entry}.partial-{os.getpid()}-{next(_partial_names)}"
    partial.mkdir()
    try:
        if model.single_file:
            parent, _, _ = model.url.rpartition("/")
            source = _storage(parent, storage)
        else:
            source = _storage(model.url, storage)
        for name, _, size in model.objects:
            target = partial / name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                source.download_file(name, target)
            except StorageError as err:
                raise ModelUnavailable(f"{key}={model.url!r}: cannot read {name}: {err}") from None
            if target.stat().st_size != size:
                raise ModelUnavailable(f"{key}={model.url!r}: {name} came back with {target.stat().st_size} "
                                       f"bytes, listed as {size}")
        partial.rename(root / model.entry)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def remove_abandoned_downloads(root: Path) -> None:
    """Remove the half downloads of other entries that no process is downloading (their downloader
    was killed): a nightly model is a new entry each night, so its leftover is never downloaded again."""
    for partial in root.glob(".*.partial-*"):
        entry = partial.name[1:].rpartition(".partial-")[0]
        with open(root / f".{entry}.lock", "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # being downloaded now
            try:
                shutil.rmtree(partial, ignore_errors=True)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def model_fingerprint(source: str | None, storage: StorageConfig | None = None) -> dict[str, Any]:
    """Name a model for the manifest: an S3 one by URL and a digest of its ETags, a local one by a
    checksum of its files, a hub id by its name."""
    if not source:
        return {"source": None}
    if is_s3(source):
        try:
            return {"source": source, "etag_sha256": describe_s3(source, storage).digest}
        except ModelUnavailable:
            return {"source": source, "etag_sha256": None}
    path = Path(source)
    if not path.exists():
        return {"source": source, "revision": "hub"}
    digest = hashlib.sha256()
    files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
    for file in files:
        digest.update(f"{file.relative_to(path.parent)}:{file.stat().st_size}".encode())
        if file.stat().st_size <= 64 * 2**20:
            digest.update(file.read_bytes())
    return {"source": model_ref(source), "sha256": digest.hexdigest()}
