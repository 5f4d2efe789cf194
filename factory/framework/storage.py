"""One small storage interface over a local folder and an `s3://bucket/prefix` root.

Paths are relative, `/`-separated keys under the root (`datasets/demo/v1/manifest.json`).
Every write is atomic: a reader sees the whole object or nothing (local: temp file and
rename; S3: a single PUT or a completed multipart upload).
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from factory.framework.config import StorageConfig


class StorageError(RuntimeError):
    """A storage operation failed; the message never carries credentials."""


class AlreadyExists(StorageError):
    """A create-only write found the object already there."""


class DamagedFile(StorageError):
    """An object is there but does not read back as what it should be (a torn or corrupt Parquet file)."""


def clean_key(key: str) -> str:
    """Normalise a relative key and refuse anything that would leave the root."""
    if "\x00" in key:
        raise StorageError(f"storage key contains NUL: {key!r}")
    norm = posixpath.normpath(key.replace("\\", "/")).lstrip("/")
    if norm in ("", ".") or norm == ".." or norm.startswith("../"):
        raise StorageError(f"storage key escapes the root: {key!r}")
    return norm


def current_umask() -> int:
    """The process umask, read without changing it (os.umask sets it, racing other threads' writes)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


class Storage:
    """Interface shared by the local and S3 backends."""

    root: str

    def read_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def write_bytes(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        raise NotImplementedError

    def upload_file(self, local_path: str | Path, key: str) -> None:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def list(self, prefix: str) -> list[str]:
        """Keys under `prefix` (a folder), sorted, relative to the storage root."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def url(self, key: str) -> str:
        """A location other libraries can open (a local path or an s3:// URL)."""
        raise NotImplementedError

    def size(self, key: str) -> int:
        raise NotImplementedError

    def check(self) -> None:
        """Fail early, with a clear message, when the root cannot be used."""
        raise NotImplementedError

    # --- helpers built on the primitives ---------------------------------------------

    def open(self, key: str) -> BinaryIO:
        """A seekable reader: libraries that read parts of a file (Parquet footers, one
        column, one row group) fetch only those bytes."""
        return io.BytesIO(self.read_bytes(key))

    # Arrow reads a Python file object (the S3 reader) by calling back into Python from its own
    # threads. When such a read fails on a damaged file, Arrow's background reads can outlive it
    # and the interpreter's exit aborts the process ("terminate called without an active
    # exception", exit 134, in about 1 run of 8 measured). So a Python source is read in the
    # calling thread with no read-ahead; a backend that gives Arrow a native file (local) is not.
    parquet_threads = False

    def parquet_source(self, key: str) -> Any:
        """A file Arrow reads `key` from: here a Python file object (see `parquet_threads`)."""
        return self.open(key)

    def read_parquet(self, key: str, columns: list[str] | None = None, filters: list | None = None) -> pa.Table:
        """The table, or some columns, or the rows `filters` keeps (pyarrow's DNF filters): only
        the row groups whose statistics can hold them are read (a plan written one row group per
        unit reads one unit)."""
        if filters is not None:
            with self.parquet_source(key) as source, damaged_as_error(self.url(key)):
                return pq.read_table(source, columns=columns, filters=filters, use_threads=self.parquet_threads,
                                     pre_buffer=self.parquet_threads)
        with self.parquet(key) as parquet:  # ~1 ms a file less than read_table
            missing = sorted(set(columns or ()) - set(parquet.schema_arrow.names))
            if missing:  # ParquetFile.read leaves them out; read_table refused, as this does
                raise pa.ArrowInvalid(f"no column {', '.join(missing)}")
            return parquet.read(columns=columns, use_threads=self.parquet_threads)

    def read_present_columns(self, key: str, columns: list[str], filters: list | None = None) -> pa.Table:
        """`read_parquet` of those `columns` the file has (a unit file written before its stage kept
        a column lacks it), opening the file once where no filter is given."""
        with self.parquet(key) as parquet:
            present = [name for name in columns if name in parquet.schema_arrow.names]
            if filters is None:
                return parquet.read(columns=present, use_threads=self.parquet_threads)
        return self.read_parquet(key, columns=present, filters=filters)

    def parquet_metadata(self, key: str) -> dict[bytes, bytes]:
        """A Parquet file's key-value metadata, read from its footer alone."""
        with self.parquet(key) as parquet:
            return dict(parquet.schema_arrow.metadata or {})

    def parquet_footer(self, key: str) -> pq.FileMetaData:
        """A Parquet file's footer (rows, row groups and their statistics), read alone."""
        with self.parquet(key) as parquet:
            return parquet.metadata

    @contextlib.contextmanager
    def parquet(self, key: str, metadata: pq.FileMetaData | None = None) -> Iterator[pq.ParquetFile]:
        """The open Parquet file at `key` (read it with `use_threads=self.parquet_threads`; its footer
        not read again when `metadata` is given): a torn or corrupt one, found at its footer or
        later inside the block, is a DamagedFile naming the key."""
        with self.parquet_source(key) as source, damaged_as_error(self.url(key)):
            yield pq.ParquetFile(source, metadata=metadata, pre_buffer=self.parquet_threads)

    def write_parquet(self, key: str, table: pa.Table, **kwargs) -> None:
        buffer = io.BytesIO()
        pq.write_table(table, buffer, **kwargs)
        self.write_bytes(key, buffer.getvalue())

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        data = self.read_bytes(key)
        for start in range(0, len(data), chunk_size):
            yield data[start : start + chunk_size]


@contextlib.contextmanager
def damaged_as_error(where: str) -> Iterator[None]:
    """Turn pyarrow's errors about a file's bytes (which name it `<Buffer>`) into a DamagedFile naming `where`."""
    try:
        yield
    except (pa.ArrowException, OSError) as err:
        detail = str(err).replace("'<Buffer>'", "the file").replace("<Buffer>", "the file").splitlines()[0]
        raise DamagedFile(f"damaged Parquet file {where}: {detail}") from None


class LocalStorage(Storage):
    def __init__(self, root: str | Path):
        self.base = Path(root).expanduser().resolve()
        self.root = str(self.base)
        if self.base.exists() and not self.base.is_dir():  # every read would say "not found", every list "nothing"
            raise StorageError(f"storage root {self.root} is a file, not a folder")

    def _path(self, key: str) -> Path:
        return self.base / clean_key(key)

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"not found: {self.url(key)}") from None
        except OSError as err:  # unreadable (permissions, a folder where a file belongs), as S3's 403 is a StorageError
            raise StorageError(f"cannot read {self.url(key)}: {err.strerror or type(err).__name__}") from None

    def write_bytes(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        self._write(key, lambda handle: handle.write(data), create_only)

    def _write(self, key: str, fill: Callable[[BinaryIO], Any], create_only: bool = False) -> None:
        """A temp file beside the target, filled, synced, then renamed (linked, `create_only`) into place."""
        target = self._path(key)
        fd, tmp = self._temp_file_beside(target)
        try:
            os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600: others read as the umask allows
            with os.fdopen(fd, "wb") as handle:
                fill(handle)
                handle.flush()
                os.fsync(handle.fileno())
            self._commit(tmp, target, create_only)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @staticmethod
    def _temp_file_beside(target: Path) -> tuple[int, str]:
        for _ in range(3):  # a delete can prune the empty folder between mkdir and mkstemp
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                return tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            except FileNotFoundError:
                continue
        raise StorageError(f"{target.parent} keeps disappearing while written to")

    def open(self, key: str) -> BinaryIO:
        try:
            return self._path(key).open("rb")
        except FileNotFoundError:
            raise StorageError(f"not found: {self.url(key)}") from None

    parquet_threads = True  # an Arrow-native file: Arrow's threads never call into Python

    def parquet_source(self, key: str) -> pa.OSFile:
        try:
            return pa.OSFile(str(self._path(key)))
        except FileNotFoundError:
            raise StorageError(f"not found: {self.url(key)}") from None

    def upload_file(self, local_path: str | Path, key: str) -> None:
        """Copied a block at a time: a shard or an index file is never held whole in memory."""
        with open(local_path, "rb") as source:
            self._write(key, lambda handle: shutil.copyfileobj(source, handle, 1 << 20))

    @staticmethod
    def _commit(tmp: str, target: Path, create_only: bool) -> None:
        if not create_only:
            os.replace(tmp, target)
            return
        try:
            os.link(tmp, target)  # link() refuses an existing name: an atomic create-only
        except FileExistsError:
            raise AlreadyExists(f"already exists: {target}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        folder = self._path(prefix) if prefix.strip("/") else self.base
        if not folder.is_dir():
            return []
        keys = []
        # os.walk passes over a folder deleted while it walks (another process's delete), as an S3 listing would
        for directory, _, names in os.walk(folder):
            for name in names:
                path = Path(directory, name)
                if not name.startswith(".") and path.is_file():
                    keys.append(path.relative_to(self.base).as_posix())
        return sorted(keys)

    def delete(self, key: str) -> None:
        """The file, then each folder above it left empty (as an S3 prefix ends with its last key)."""
        path = self._path(key)
        path.unlink(missing_ok=True)
        for folder in path.parents:
            if folder == self.base or self.base not in folder.parents:
                return
            try:
                folder.rmdir()
            except OSError:  # not empty (or written to meanwhile): it stays
                return

    def url(self, key: str) -> str:
        return str(self.base / clean_key(key))

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def check(self) -> None:
        try:
            self.base.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.base, prefix=".write-check-"):
                pass  # a read-only root (a read-only mount) fails here, not at a stage's first write
        except OSError as err:
            reason = err.strerror or type(err).__name__
            raise StorageError(f"storage root {self.root} is not usable: {reason}") from None


@dataclass
class S3Location:
    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> S3Location:
        rest = url[len("s3://") :]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise StorageError(f"no bucket in storage root {url!r}")
        return cls(bucket, prefix.strip("/"))


class S3Storage(Storage):
    """S3 (or any S3-compatible server) through boto3, with botocore retries."""

    def __init__(self, root: str, config: StorageConfig | None = None):
        try:
            import boto3  # boto3: only for s3:// (the GPU check runs without it)
            from boto3.s3.transfer import TransferConfig  # boto3: only for s3:// (the GPU check runs without it)
            from botocore.config import Config  # boto3: only for s3:// (the GPU check runs without it)
        except ImportError as err:  # pragma: no cover - boto3 is a core dependency
            raise StorageError("install boto3 to use an s3:// storage root") from err
        from factory.framework.config import StorageConfig

        config = config or StorageConfig(root=root)
        self.root = root.rstrip("/")
        self.location = S3Location.parse(self.root)
        client_config = Config(
            retries={"max_attempts": config.max_attempts, "mode": "standard"},
            connect_timeout=config.connect_timeout_s,
            read_timeout=config.read_timeout_s,
            region_name=config.region,
        )
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=config.endpoint_url, config=client_config
        )
        self.transfer = TransferConfig(
            multipart_threshold=config.multipart_threshold_mb * 2**20,
            multipart_chunksize=config.multipart_chunk_mb * 2**20,
        )

    def _key(self, key: str) -> str:
        key = clean_key(key)
        return f"{self.location.prefix}/{key}" if self.location.prefix else key

    def _call(self, what: str, key: str, fn, **kwargs):
        from botocore.exceptions import (  # boto3: only for s3:// (the GPU check runs without it)
            BotoCoreError,
            ClientError,
        )

        try:
            return fn(Bucket=self.location.bucket, **kwargs)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "?")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise StorageError(f"not found: {self.url(key)}") from None
            if code == "NoSuchBucket":
                raise StorageError(f"bucket does not exist: s3://{self.location.bucket}") from None
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise AlreadyExists(f"already exists: {self.url(key)}") from None
            raise StorageError(f"S3 {what} failed for {self.url(key)}: {code}") from None
        except BotoCoreError as err:
            # only the error's type: botocore's text repeats the endpoint URL, with any credentials in it
            raise StorageError(f"S3 {what} failed for {self.url(key)}: {type(err).__name__}") from None

    def read_bytes(self, key: str) -> bytes:
        response = self._call("get", key, self.client.get_object, Key=self._key(key))
        return response["Body"].read()

    def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of an object, in one ranged GET."""
        if end <= start:
            return b""
        response = self._call("get", key, self.client.get_object, Key=self._key(key), Range=f"bytes={start}-{end - 1}")
        return response["Body"].read()

    def open(self, key: str) -> BinaryIO:
        return io.BufferedReader(S3RangeReader(self, key, self.size(key)), buffer_size=1 << 20)

    def write_bytes(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        extra = {"IfNoneMatch": "*"} if create_only else {}
        if len(data) < self.transfer.multipart_threshold or create_only:
            self._call("put", key, self.client.put_object, Key=self._key(key), Body=data, **extra)
            return
        self._upload(key, io.BytesIO(data))

    def upload_file(self, local_path: str | Path, key: str) -> None:
        """One PUT streamed from the file below the multipart threshold (as `write_bytes`), else multipart."""
        with open(local_path, "rb") as handle:
            if os.fstat(handle.fileno()).st_size < self.transfer.multipart_threshold:
                self._call("put", key, self.client.put_object, Key=self._key(key), Body=handle)
                return
            self._upload(key, handle)

    def _upload(self, key: str, handle) -> None:
        from boto3.exceptions import S3UploadFailedError  # boto3: only for s3:// (the GPU check runs without it)
        from botocore.exceptions import (  # boto3: only for s3:// (the GPU check runs without it)
            BotoCoreError,
            ClientError,
        )

        try:
            self.client.upload_fileobj(handle, self.location.bucket, self._key(key), Config=self.transfer)
        except (ClientError, BotoCoreError, S3UploadFailedError) as err:
            raise StorageError(f"S3 upload failed for {self.url(key)}: {type(err).__name__}") from None

    def exists(self, key: str) -> bool:
        try:
            self._call("head", key, self.client.head_object, Key=self._key(key))
        except AlreadyExists:  # pragma: no cover - head never raises it
            return True
        except StorageError as err:
            if str(err).startswith("not found"):
                return False
            raise
        return True

    def list(self, prefix: str) -> list[str]:
        return [key for key, _, _ in self.list_objects(prefix)]

    def list_objects(self, prefix: str) -> list[tuple[str, str, int]]:
        """(key, ETag, size) of every object under the folder `prefix`, sorted by key."""
        from botocore.exceptions import (  # boto3: only for s3:// (the GPU check runs without it)
            BotoCoreError,
            ClientError,
        )

        folder = clean_key(prefix) if prefix.strip("/") else ""
        if folder:
            full = self._key(folder) + "/"
        else:
            full = f"{self.location.prefix}/" if self.location.prefix else ""
        strip = len(self.location.prefix) + 1 if self.location.prefix else 0
        found: list[tuple[str, str, int]] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.location.bucket, Prefix=full
            ):
                found.extend((item["Key"][strip:], item.get("ETag", "").strip('"'), item.get("Size", 0))
                             for item in page.get("Contents", []))
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "?")
            if code == "NoSuchBucket":
                raise StorageError(f"bucket does not exist: s3://{self.location.bucket}") from None
            raise StorageError(f"S3 list failed for s3://{self.location.bucket}/{full}: {code}") from None
        except BotoCoreError as err:
            raise StorageError(f"S3 list failed for s3://{self.location.bucket}/{full}: {type(err).__name__}") from None
        return sorted(found)

    def download_file(self, key: str, local_path: str | Path) -> None:
        """One object to a local file (multipart, in parallel, for large objects)."""
        from boto3.exceptions import S3TransferFailedError  # boto3: only for s3:// (the GPU check runs without it)
        from botocore.exceptions import (  # boto3: only for s3:// (the GPU check runs without it)
            BotoCoreError,
            ClientError,
        )

        try:
            self.client.download_file(self.location.bucket, self._key(key), str(local_path), Config=self.transfer)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "?")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise StorageError(f"not found: {self.url(key)}") from None
            raise StorageError(f"S3 get failed for {self.url(key)}: {code}") from None
        except (BotoCoreError, S3TransferFailedError) as err:
            raise StorageError(f"S3 get failed for {self.url(key)}: {type(err).__name__}") from None

    def delete(self, key: str) -> None:
        self._call("delete", key, self.client.delete_object, Key=self._key(key))

    def url(self, key: str) -> str:
        return f"s3://{self.location.bucket}/{self._key(key)}"

    def size(self, key: str) -> int:
        return self._call("head", key, self.client.head_object, Key=self._key(key))["ContentLength"]

    def check(self) -> None:
        from botocore.exceptions import (  # boto3: only for s3:// (the GPU check runs without it)
            BotoCoreError,
            ClientError,
        )

        try:
            self.client.head_bucket(Bucket=self.location.bucket)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "?")
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise StorageError(f"bucket does not exist: s3://{self.location.bucket}") from None
            raise StorageError(f"cannot use bucket s3://{self.location.bucket}: {code}") from None
        except BotoCoreError as err:
            raise StorageError(f"cannot reach s3://{self.location.bucket}: {type(err).__name__}") from None


class S3RangeReader(io.RawIOBase):
    """A seekable, read-only view of one S3 object: each read is a ranged GET."""

    def __init__(self, storage: S3Storage, key: str, size: int):
        self.storage, self.key, self.length, self.position = storage, key, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.length}[whence]
        self.position = max(0, base + offset)
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer) -> int:
        end = min(self.position + len(buffer), self.length)
        data = self.storage.read_range(self.key, self.position, end)
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


def opened(where: Storage | StorageConfig) -> Storage:
    """`where` itself, or the storage its config opens: a Ray task is given the config (a storage
    client does not pickle), work done in this process the storage."""
    return where if isinstance(where, Storage) else open_storage(where)


def open_storage(config: StorageConfig) -> Storage:
    if config.root.startswith("s3://"):
        return S3Storage(config.root, config)
    if "://" in config.root:
        raise StorageError(f"unsupported storage root {config.root!r}: use a local path or s3://bucket/prefix")
    return LocalStorage(config.root)

