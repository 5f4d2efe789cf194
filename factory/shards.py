"""WebDataset shards: five members per sample, cut by size or count, read back as a stream.

A shard's bytes depend only on its samples (fixed mtime and owner, members in a fixed
order), so the same accepted samples always give the same sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import webdataset as wds

from factory.storage import Storage

MEMBERS = ("input.jpg", "target.jpg", "user.txt", "assistant.txt", "json")
TAR_MTIME = 0.0


@dataclass(frozen=True)
class Sample:
    """One quadruplet (x, x~, y, y~) with its metadata."""

    key: str
    input_image: bytes
    target_image: bytes
    user: str
    assistant: str
    meta: dict[str, Any]

    def members(self) -> dict[str, Any]:
        if not self.key or "." in self.key or "/" in self.key:
            raise ValueError(f"sample key must be non-empty with no dots or slashes: {self.key!r}")
        return {
            "__key__": self.key,
            "input.jpg": self.input_image,
            "target.jpg": self.target_image,
            "user.txt": self.user.encode("utf-8"),
            "assistant.txt": self.assistant.encode("utf-8"),
            "json": json.dumps(self.meta, sort_keys=True, ensure_ascii=False).encode("utf-8"),
        }


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the version folder
    samples: int
    bytes: int
    sha256: str
    keys: tuple[str, ...]


def encode_shard(samples: list[Sample]) -> bytes:
    buffer = io.BytesIO()
    with wds.TarWriter(buffer, encoder=False, mtime=TAR_MTIME) as writer:
        for sample in samples:
            writer.write(sample.members())
    return buffer.getvalue()


def _member_bytes(sample: Sample) -> int:
    return len(sample.input_image) + len(sample.target_image) + len(sample.user) + len(sample.assistant) + 4096


def cut_shards(samples: Iterable[Sample], max_bytes: int, max_samples: int) -> Iterator[list[Sample]]:
    """Group samples (already in key order) into shards under both limits."""
    current: list[Sample] = []
    size = 0
    for sample in samples:
        estimate = _member_bytes(sample)
        if current and (len(current) >= max_samples or size + estimate > max_bytes):
            yield current
            current, size = [], 0
        current.append(sample)
        size += estimate
    if current:
        yield current


def write_shards(
    storage: Storage,
    version_dir: str,
    version: str,
    samples: Iterable[Sample],
    max_bytes: int,
    max_samples: int,
) -> list[ShardInfo]:
    """Write shards `shards/<version>-000000.tar`, ... under `version_dir`; return their info."""
    infos = []
    for number, group in enumerate(cut_shards(samples, max_bytes, max_samples)):
        data = encode_shard(group)
        relative = f"shards/{version}-{number:06d}.tar"
        storage.write_bytes(f"{version_dir}/{relative}", data)
        infos.append(
            ShardInfo(relative, len(group), len(data), hashlib.sha256(data).hexdigest(), tuple(s.key for s in group))
        )
    return infos


def read_shard_bytes(data: bytes) -> Iterator[Sample]:
    """Stream samples out of one shard's bytes; members are grouped by key in order."""
    grouped: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, suffix = member.name.partition(".")
            if key not in grouped:
                grouped[key] = {}
                order.append(key)
            grouped[key][suffix] = tar.extractfile(member).read()
    for key in order:
        parts = grouped[key]
        missing = [name for name in MEMBERS if name not in parts]
        if missing:
            raise ValueError(f"sample {key} is missing members {missing}")
        yield Sample(
            key=key,
            input_image=parts["input.jpg"],
            target_image=parts["target.jpg"],
            user=parts["user.txt"].decode("utf-8"),
            assistant=parts["assistant.txt"].decode("utf-8"),
            meta=json.loads(parts["json"]),
        )


def read_shard(storage: Storage, key: str) -> Iterator[Sample]:
    yield from read_shard_bytes(storage.read_bytes(key))
