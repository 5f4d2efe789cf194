"""The data: which samples each rank reads in one epoch, in which order, in batches of real and padding samples."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from factory.dataset.manifest import KeySet, checked_shard, shard_key
from factory.dataset.shards import Sample, read_shard_bytes
from factory.framework.images import ImageRejected, decode_image
from factory.framework.storage import Storage


@dataclass
class Batch:
    samples: list[Sample]
    weights: list[float]  # 1 for a real sample, 0 for padding

    @property
    def keys(self) -> list[str]:
        return [s.key for s, w in zip(self.samples, self.weights) if w > 0]


@dataclass
class EpochPlan:
    """Which samples each rank reads in one epoch, in which order."""

    shard_keys: list[str]  # storage keys, in the manifest's order
    shard_sha256: list[str]  # what the manifest lists: every shard is checked as it is read
    shard_sizes: list[int]
    world: int
    seed: int
    epoch: int
    shard_mode: bool
    counts: list[int]  # samples per rank
    rank_shards: list[list[int]]  # shard mode: shard indices per rank, in read order
    keep: KeySet | None = None  # the version's keys when its shards hold more (`shards_superset`)

    @classmethod
    def build(cls, manifest: dict[str, Any], world: int, epoch: int, seed: int,
              keep: KeySet | None = None) -> EpochPlan:
        """`keep`: the version's keys (`factory.dataset.manifest.version_keys`) when its shards hold
        other samples too."""
        keys = [shard_key(manifest, shard["path"]) for shard in manifest["shards"]]
        sizes = [int(shard.get("version_samples", shard["samples"]) if keep is not None else shard["samples"])
                 for shard in manifest["shards"]]
        total = sum(sizes)
        shard_mode = len(keys) >= world
        order = np.random.default_rng([seed, epoch]).permutation(len(keys)).tolist()
        rank_shards = [order[rank::world] for rank in range(world)] if shard_mode else []
        if shard_mode:
            counts = [sum(sizes[i] for i in shards) for shards in rank_shards]
        else:
            counts = [len(range(rank, total, world)) for rank in range(world)]
        sha256 = [shard["sha256"] for shard in manifest["shards"]]
        return cls(keys, sha256, sizes, world, seed, epoch, shard_mode, counts, rank_shards, keep)

    def steps(self, per_worker: int) -> int:
        return math.ceil(max(self.counts) / per_worker)

    def global_count(self, index: int, per_worker: int) -> int:
        """Real samples over all ranks in batch `index`."""
        return sum(min(per_worker, max(0, count - index * per_worker)) for count in self.counts)

    def samples(self, storage: Storage, rank: int, skip: int = 0) -> Iterator[Sample]:
        """This rank's samples in order, from the `skip`-th on. In shard mode the shards wholly before it
        are not read, so a run resumed late in an epoch does not read the epoch's data again first."""
        if self.shard_mode:
            yield from self._shard_samples(storage, rank, skip)
        else:
            yield from itertools.islice(self._dealt_samples(storage, rank), skip, None)

    def _shard_samples(self, storage: Storage, rank: int, skip: int) -> Iterator[Sample]:
        shards = self.rank_shards[rank]
        while shards and skip >= self.shard_sizes[shards[0]]:
            skip -= self.shard_sizes[shards[0]]
            shards = shards[1:]
        for shard_index, data in zip(shards, self.shard_bytes(storage, shards)):
            samples = list(self._read(data))
            if len(samples) != self.shard_sizes[shard_index]:
                raise ValueError(f"shard {self.shard_keys[shard_index]} holds {len(samples)} samples of the version, "
                                 f"its manifest says {self.shard_sizes[shard_index]}")
            order = np.random.default_rng([self.seed, self.epoch, shard_index]).permutation(len(samples))
            yield from (samples[i] for i in order[skip:])
            skip = 0

    def _dealt_samples(self, storage: Storage, rank: int) -> Iterator[Sample]:
        total = sum(self.shard_sizes)
        permutation = np.random.default_rng([self.seed, self.epoch]).permutation(total)
        mine = {int(global_index): slot for slot, global_index in enumerate(permutation[rank :: self.world])}
        kept: dict[int, Sample] = {}
        position = 0
        for data in self.shard_bytes(storage, range(len(self.shard_keys))):
            for sample in self._read(data):
                if position in mine:
                    kept[mine[position]] = sample
                position += 1
        yield from (kept[slot] for slot in sorted(kept))

    def shard_bytes(self, storage: Storage, indices: Iterable[int]) -> Iterator[bytes]:
        """The shards' bytes in order, each refused unless it matches the manifest's sha256."""
        indices = list(indices)
        for index, data in zip(indices, prefetched(storage, [self.shard_keys[i] for i in indices])):
            yield checked_shard(storage, self.shard_keys[index], data, self.shard_sha256[index])

    def _read(self, data: bytes) -> Iterator[Sample]:
        return (s for s in read_shard_bytes(data) if self.keep is None or s.key in self.keep)

    def batches(self, storage: Storage, rank: int, per_worker: int, steps: int, start: int = 0) -> Iterator[Batch]:
        """Batches `start` to `steps - 1` of exactly `steps`; once this rank's share runs out, one
        zero-weight sample each (its last real one)."""
        wanted = start * per_worker
        skip = max(0, min(wanted, self.counts[rank] - 1))  # resumed past this rank's share: read its last sample
        stream = self.samples(storage, rank, skip)
        last = next(stream, None) if skip < wanted else None
        for _ in range(start, steps):
            samples = [s for _, s in zip(range(per_worker), stream)]
            if samples:
                last = samples[-1]
                yield Batch(samples, [1.0] * len(samples))
            else:
                yield Batch([last], [0.0])


def prefetched(storage: Storage, keys: list[str]) -> Iterator[bytes]:
    """Shard bytes in order, reading the next shard while the current one is used."""
    if not keys:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(storage.read_bytes, keys[0])
        for following in [*keys[1:], None]:
            data = pending.result()
            if following is not None:
                pending = pool.submit(storage.read_bytes, following)
            yield data


def sample_images(samples: list[Sample], member: str) -> list:
    """Each sample's `member` image ("input_image" or "target_image"), decoded; one that does not
    decode stops the training naming the sample (every retry would stop there again)."""
    images = []
    for sample in samples:
        try:
            images.append(decode_image(getattr(sample, member)))
        except ImageRejected as err:
            raise ValueError(f"sample {sample.key} of the version: its {member} does not decode ({err})") from None
    return images
