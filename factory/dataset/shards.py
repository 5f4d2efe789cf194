"""WebDataset shards: five members per sample, where they are cut, read back as a stream.

Written only by `factory.dataset.publisher.write_version`; keys come from `factory.framework.layout`.

A shard's bytes depend only on its samples (fixed mtime and owner, members in a fixed
order), so the same accepted samples always give the same sha256.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import pandas as pd

from factory.framework.storage import Storage

MEMBERS = ("input.jpg", "target.jpg", "user.txt", "assistant.txt", "json")
TAR_MTIME = 0.0
TAR_MODE, TAR_OWNER = 0o444, "bigdata"  # what webdataset's TarWriter writes: shards written by it stay identical


@dataclass(frozen=True)
class Sample:
    """One quadruplet (x, x~, y, y~) with its metadata."""

    key: str
    input_image: bytes
    target_image: bytes
    user: str
    assistant: str
    meta: dict[str, Any]

    def payload_bytes(self) -> int:
        """What the shard cut counts for this sample (before `estimated_bytes`' overhead)."""
        return len(self.input_image) + len(self.target_image) + len(self.user) + len(self.assistant)

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


def write_shard_file(samples: Iterable[Sample], stream: BinaryIO) -> None:
    """One shard's tar, written to an open binary file: its samples in the order given, each
    sample's members by name, as webdataset's TarWriter writes them (the standard library's
    tarfile here: importing webdataset imports torch, 1.1 s and 262 MiB in every shard task)."""
    with tarfile.open(fileobj=stream, mode="w|") as tar:
        for sample in samples:
            members = sample.members()
            key = members.pop("__key__")
            for name in sorted(members):
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size, info.mtime, info.mode = len(members[name]), TAR_MTIME, TAR_MODE
                info.uname = info.gname = TAR_OWNER
                tar.addfile(info, io.BytesIO(members[name]))


def encode_shard(samples: list[Sample]) -> bytes:
    buffer = io.BytesIO()
    write_shard_file(samples, buffer)
    return buffer.getvalue()


SAMPLE_SIZES = "sample_sizes"  # the unit fact listing a unit's samples and their payload bytes
MEMBER_OVERHEAD = 4096  # tar headers and the metadata member, per sample


def stored_payload_bytes(rows: pd.DataFrame) -> np.ndarray:
    """`Sample.payload_bytes` of samples' stored rows, images unread: their `input_bytes` and
    `target_bytes`, and their texts' characters."""
    texts = rows["user"].str.len() + rows["assistant"].str.len()
    return (rows["input_bytes"] + rows["target_bytes"] + texts).to_numpy(dtype=np.int64)


def sample_sizes_fact(rows: pd.DataFrame) -> dict[str, Any]:
    """The unit fact (`Stage.unit_facts`) of a stage whose accepted rows are whole samples: their
    keys and payload bytes, so publish cuts shards from footers, reading no rows."""
    accepted = rows[rows["reject_reason"].isna()]
    payload = stored_payload_bytes(accepted) if len(accepted) else []
    return {SAMPLE_SIZES: {"key": accepted["key"].tolist(), "payload_bytes": list(map(int, payload))}}


def estimated_bytes(payload: Any) -> Any:
    """A sample's estimated size in a shard from its payload bytes (ints or an int array)."""
    return payload + MEMBER_OVERHEAD


def cut_points(sizes: Any, max_bytes: int, max_samples: int) -> list[int]:
    """Where shards start, for samples in key order with estimated sizes `sizes`: a shard
    closes before the sample that would take it past `max_samples` or `max_bytes` (a sample
    larger than `max_bytes` gets a shard of its own). This rule is part of the contract."""
    starts: list[int] = []
    count = size = 0
    for position, estimate in enumerate(int(value) for value in sizes):
        if count and (count >= max_samples or size + estimate > max_bytes):
            count = size = 0
        if count == 0:
            starts.append(position)
        count += 1
        size += estimate
    return starts


def read_shard_bytes(data: bytes) -> Iterator[Sample]:
    """Stream samples out of one shard's bytes; members are grouped by key in order."""
    grouped: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            if member.issparse() or member.size > len(data):  # a GNU sparse member reads back as its full size
                raise ValueError(f"member {member.name} says it holds {member.size} bytes in a {len(data)}-byte shard")
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
