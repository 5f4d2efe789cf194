"""The retrieval pool for SID's `w`: CLIP image embeddings in a faiss index, image bytes in Parquet.

A pool `name` is three kinds of object (keys from `factory.framework.layout`):

    pools/<name>/part-<n>.parquet   image_id, image (encoded bytes); row groups of ROW_GROUP rows
    pools/<name>/ids.parquet        image_id, part, row: one row per index entry, in index order
    pools/<name>/index.faiss        the L2-normalised embeddings; written last (the pool exists iff it does)

`ImagePool.load` reads the index and the ids only; `fetch(ids)` reads the row groups that hold
the asked-for images and nothing else. Up to EXACT_LIMIT images the index is exact inner product
(cosine on normalised vectors); beyond that it is HNSW, which needs no training and answers in
about log(N).

The parts and the ids table are those of `factory.framework.images`, which SID's SD-drawn `w` set uses
too (stored once, fetched by id by `factory.framework.units.ImageJoin`).

Building: `build_pool` embeds an iterable of (image_id, bytes) in one process (tests, small
pools); `build_pool_from_shards` is the executor job in which an actor pool of CLIP models reads
a version's shards, writes each one's part and embeds it, keeping finished chunks of shards so a
killed build resumes. Both use the same `PoolEmbedder` callable and `finish_pool`.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property, partial
from itertools import count, islice
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa

from factory.dataset.manifest import KeySet, read_checked_shard
from factory.framework import layout
from factory.framework.executor import MapStep, Resume, run_resumable
from factory.framework.images import IDS_SCHEMA, ImageRejected, decode_image, fetch_images, write_image_part
from factory.framework.storage import Storage, open_storage

if TYPE_CHECKING:
    from factory.framework.config import ActorPool, StorageConfig

log = logging.getLogger(__name__)

EXACT_LIMIT = 200_000  # up to this many images the index is exact; beyond, HNSW
HNSW_M = 32  # graph degree: about 4 * M * 4 bytes per image on top of the vectors
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 128
INDEX_BATCH_ROWS = 8192  # rows read back, normalised and added to the index at a time (16 MiB at 512-d)


def require_faiss():
    try:
        import faiss  # imported where a pool is built or searched, with an error saying what to install
    except ImportError as error:  # pragma: no cover - a dependency of the package
        raise ImportError("the SID image pool needs faiss: pip install faiss-cpu") from error
    return faiss


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Unit rows, as float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"expected a (rows, dim) matrix of vectors, got shape {vectors.shape}")
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


# --- the index ---------------------------------------------------------------------------


def build_index(vectors: np.ndarray | Iterable[np.ndarray], exact_limit: int = EXACT_LIMIT, rows: int | None = None):
    """A faiss inner-product index over the normalised rows of `vectors`: a matrix, or (with their count
    `rows`) its blocks in order, each normalised and added as it comes, so a million of them need not
    be in memory at once. Exact (flat) up to `exact_limit` rows, else HNSW."""
    faiss = require_faiss()
    blocks = iter([vectors] if isinstance(vectors, np.ndarray) else vectors)
    first = normalise(next(blocks))
    rows = len(first) if rows is None else rows
    if rows <= exact_limit:
        index = faiss.IndexFlatIP(first.shape[1])
    else:
        index = faiss.IndexHNSWFlat(first.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    reserve(index, rows)
    index.add(first)
    for block in blocks:
        index.add(normalise(block))
    return index


def reserve(index, rows: int) -> None:
    """Size the index's vector storage for `rows` vectors once: added block by block, it would grow as a
    std::vector does, doubling, with the old and the new buffer held at each step (1.5-2x the vectors).
    A resize down keeps the capacity."""
    flat = require_faiss().downcast_index(index.storage) if hasattr(index, "storage") else index
    flat.codes.resize(rows * flat.code_size)
    flat.codes.resize(0)


def search_index(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, cosine scores), both (Q, k), best first; k is capped at the index size."""
    k = min(k, index.ntotal)
    if k < 1:
        raise ValueError("search needs k >= 1 and a non-empty index")
    queries = normalise(queries)
    if queries.shape[1] != index.d:
        raise ValueError(f"queries have dimension {queries.shape[1]}, the pool's index {index.d}")
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = max(HNSW_EF_SEARCH, 2 * k)
    scores, indices = index.search(queries, k)
    return indices.astype(np.int64), scores


def read_index(storage: Storage, key: str):
    """The stored index, through a local file: its bytes are not held beside the index it becomes."""
    with tempfile.NamedTemporaryFile(suffix=".faiss") as local:
        for chunk in storage.iter_chunks(key):
            local.write(chunk)
        local.flush()
        return require_faiss().read_index(local.name)


# --- the pool as stored ------------------------------------------------------------------


@dataclass
class ImagePool:
    """A loaded pool: the index and the ids; image bytes stay in storage until fetched."""

    storage: Storage
    name: str
    ids: pd.DataFrame  # image_id, part, row; position i is index entry i
    index: Any  # faiss.Index

    @classmethod
    def load(cls, storage: Storage, name: str) -> ImagePool:
        if not storage.exists(layout.pool_index(name)):
            raise FileNotFoundError(f"no image pool at {storage.url(layout.pool_dir(name))} (no index file)")
        index = read_index(storage, layout.pool_index(name))
        ids = storage.read_parquet(layout.pool_ids(name)).to_pandas()
        if len(ids) != index.ntotal:
            raise RuntimeError(f"pool {name}: {len(ids)} ids but {index.ntotal} vectors in the index")
        return cls(storage, name, ids, index)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def image_ids(self) -> list[str]:
        return self.ids["image_id"].tolist()

    def vectors(self) -> np.ndarray:
        """The stored (normalised) embeddings, in index order."""
        return self.index.reconstruct_n(0, self.index.ntotal)

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Top-k pool rows by cosine for each query: (indices, scores), both (Q, k), best first."""
        return search_index(self.index, queries, k)

    def search_ids(self, queries: np.ndarray, k: int = 1) -> tuple[list[list[str]], np.ndarray]:
        indices, scores = self.search(queries, k)
        return [list(self._id_array[row]) for row in indices], scores

    @cached_property
    def _id_array(self) -> np.ndarray:  # converted once: a million ids are 80 MB and 0.2 s a call
        return self.ids["image_id"].to_numpy()

    def fetch(self, image_ids: Iterable[str]) -> list[bytes]:
        """Image bytes for `image_ids` (repeats allowed), reading only the row groups that hold them."""
        wanted = list(image_ids)
        where = self.ids.set_index("image_id")
        missing = sorted(set(wanted) - set(where.index))
        if missing:
            raise KeyError(f"pool {self.name} has no image {missing[0]!r} ({len(missing)} unknown ids)")
        found = fetch_images(self.storage, self.ids, partial(layout.pool_part, self.name), wanted)
        return [found[image_id] for image_id in wanted]


def write_part(storage: Storage, name: str, part: int, image_ids: list[str], images: list[bytes]) -> None:
    write_image_part(storage, layout.pool_part(name, part), image_ids, images)


def finish_pool(storage: Storage, name: str, embedded: Iterable[pd.DataFrame],
                exact_limit: int = EXACT_LIMIT) -> dict[str, int]:
    """Write the ids and, last, the index from frames of embedded rows (image_id, part, row, embedding
    or None) in part order, taken one at a time: the embeddings go to a local file as they come and
    the index is built from it a block at a time, so the driver holds the ids and the index, not the
    embeddings too. A repeated image id keeps its first row."""
    with tempfile.TemporaryFile() as spill:
        placed, rejected, width = spilled(embedded, spill)
        if placed.empty:
            raise RuntimeError(f"pool {name}: no image could be embedded ({rejected} rejected)")
        first = ~placed["image_id"].duplicated().to_numpy()
        kept = placed[first].reset_index(drop=True)
        index = build_index(kept_blocks(spill, width, first), exact_limit, rows=len(kept))
    ids = pa.Table.from_pandas(kept[["image_id", "part", "row"]], schema=IDS_SCHEMA, preserve_index=False)
    storage.write_parquet(layout.pool_ids(name), ids)
    with tempfile.NamedTemporaryFile(suffix=".faiss") as local:  # a million vectors: not another copy in memory
        require_faiss().write_index(index, local.name)
        storage.upload_file(local.name, layout.pool_index(name))
    return {"images": len(kept), "rejected": rejected, "duplicates": int((~first).sum())}


def spilled(embedded: Iterable[pd.DataFrame], spill: BinaryIO) -> tuple[pd.DataFrame, int, int]:
    """Each embedded row's vector appended to `spill` (float32 rows), in the order given; returns the
    rows that have one (image_id, part, row), how many had none, and the vectors' width."""
    placed, rejected, width, last_part = [], 0, 0, -1
    for frame in embedded:
        good = frame[frame["embedding"].notna()]
        rejected += len(frame) - len(good)
        if good.empty:
            continue
        if good["part"].min() < last_part:  # the ids keep the first row of an image: the parts' order must hold
            raise ValueError(f"embedded rows came out of part order (part {good['part'].min()} after {last_part})")
        last_part = int(good["part"].max())
        vectors = stacked(good["embedding"])
        spill.write(vectors.tobytes())
        placed.append(pd.DataFrame({  # copies: a view of `good` would keep its block, embeddings and all
            "image_id": np.array(good["image_id"], dtype=object), "part": np.array(good["part"], dtype=np.int64),
            "row": np.array(good["row"], dtype=np.int64)}))
        width = vectors.shape[1]
    spill.flush()
    rows = pd.concat(placed, ignore_index=True) if placed else pd.DataFrame(columns=["image_id", "part", "row"])
    return rows, rejected, width


def kept_blocks(spill: BinaryIO, width: int, keep: np.ndarray) -> Iterator[np.ndarray]:
    """The spilled vectors whose `keep` is set, read back in order a block of rows at a time."""
    spill.seek(0)
    for start in range(0, len(keep), INDEX_BATCH_ROWS):
        count = min(INDEX_BATCH_ROWS, len(keep) - start)
        block = np.fromfile(spill, dtype=np.float32, count=count * width).reshape(count, width)
        wanted = keep[start:start + count]
        if wanted.all():
            yield block
        elif wanted.any():
            yield block[wanted]


def stacked(embeddings: pd.Series) -> np.ndarray:
    """One float32 matrix from the embeddings (float32 bytes, as `PoolEmbedder` gives them; lists of
    floats in chunks embedded before), filled row by row."""
    first = embeddings.iloc[0]
    width = len(first) // 4 if isinstance(first, bytes) else len(first)
    matrix = np.empty((len(embeddings), width), dtype=np.float32)
    for row, value in enumerate(embeddings):
        matrix[row] = np.frombuffer(value, dtype=np.float32) if isinstance(value, bytes) else value
    return matrix


# --- embedding -----------------------------------------------------------------------------


class PoolEmbedder:
    """map_batches callable: decode `image`, add its CLIP `embedding` (None when undecodable), drop the bytes.

    `make_scorer` builds the CLIP scorer once per actor (it must pickle: a module function or a
    `functools.partial` of one); a test passes `lambda: scorer` and calls the object on a DataFrame.
    """

    def __init__(self, make_scorer: Callable[[], Any], batch_size: int = 64):
        self.scorer = make_scorer()
        self.batch_size = batch_size

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        decoded = []
        for data in batch["image"]:
            try:
                decoded.append(decode_image(data))
            except ImageRejected:
                decoded.append(None)
        good = [n for n, image in enumerate(decoded) if image is not None]
        embeddings: list[bytes | None] = [None] * len(batch)  # float32 bytes: ~2 KB a 512-d row, not ~16 KB of floats
        for start in range(0, len(good), self.batch_size):
            chosen = good[start : start + self.batch_size]
            vectors = self.scorer.embed_images([decoded[n] for n in chosen]).float().cpu().numpy()
            for n, vector in zip(chosen, vectors):
                embeddings[n] = vector.astype(np.float32).tobytes()
        out = batch.drop(columns=["image"]).reset_index(drop=True)
        out["embedding"] = embeddings
        return out


# --- building in one process ---------------------------------------------------------------


def build_pool(storage: Storage, name: str, images: Iterable[tuple[str, bytes]], scorer,
               batch_size: int = 64, part_size: int = 4096, exact_limit: int = EXACT_LIMIT) -> dict[str, int]:
    """Embed `(image_id, encoded bytes)` pairs with `scorer` in this process and store the pool."""
    embedder = PoolEmbedder(lambda: scorer, batch_size)
    return finish_pool(storage, name, embedded_parts(storage, name, images, embedder, part_size), exact_limit)


def embedded_parts(storage: Storage, name: str, images: Iterable[tuple[str, bytes]], embedder: PoolEmbedder,
                   part_size: int) -> Iterator[pd.DataFrame]:
    """Each `part_size` images written as a pool part, then embedded, one part at a time."""
    iterator = iter(images)
    for part in count():
        chunk = list(islice(iterator, part_size))
        if not chunk:
            if part == 0:
                raise ValueError(f"pool {name}: no images given")
            return
        image_ids, blobs = [image_id for image_id, _ in chunk], [data for _, data in chunk]
        write_part(storage, name, part, image_ids, blobs)
        yield embedder(pd.DataFrame({"image_id": image_ids, "part": part, "row": range(len(chunk)), "image": blobs}))


# --- building on Ray Data --------------------------------------------------------------------


class ShardEmbedder:
    """Executor step, one shard per call: write the shard's target images as pool part `part`
    and embed them; returns the shard's row with its images' ids, rows and embeddings (None where
    an image does not decode). Each shard is checked against the sha256 its manifest lists.
    `keep`: the sample keys to take (`manifest.version_keys`), None for every sample of a shard."""

    def __init__(self, storage_config: StorageConfig, name: str, make_scorer: Callable[[], Any], batch_size: int,
                 keep: KeySet | None = None):
        self.storage = open_storage(storage_config)
        self.name = name
        self.embedder = PoolEmbedder(make_scorer, batch_size)
        self.keep = keep

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        embedded = [self.embed_shard(shard, sha256, int(part))
                    for shard, sha256, part in zip(batch["shard"], batch["sha256"], batch["part"])]
        return batch.assign(image_id=[list(frame["image_id"]) for frame in embedded],
                            row=[list(frame["row"]) for frame in embedded],
                            embedding=[list(frame["embedding"]) for frame in embedded])

    def embed_shard(self, shard: str, sha256: str, part: int) -> pd.DataFrame:
        samples = [(sample.key, sample.target_image) for sample in read_checked_shard(self.storage, shard, sha256)
                   if self.keep is None or sample.key in self.keep]
        image_ids, images = [key for key, _ in samples], [data for _, data in samples]
        write_part(self.storage, self.name, part, image_ids, images)
        return self.embedder(pd.DataFrame({"image_id": image_ids, "row": range(len(samples)), "image": images}))


def build_pool_from_shards(storage: Storage, storage_config: StorageConfig, name: str, shard_keys: dict[str, str],
                           make_scorer: Callable[[], Any], actors: ActorPool, made_with: dict[str, Any],
                           batch_size: int = 64, exact_limit: int = EXACT_LIMIT,
                           keep: KeySet | None = None) -> dict[str, int]:
    """The executor job: each shard -> its part and CLIP embeddings (an actor pool; a shard's
    images in one actor's memory at a time) -> ids and index, written by the driver from the small
    (id, part, row, embedding) rows. Finished chunks of shards are kept (`pools/<name>/embedded/`),
    so a build run again after a kill embeds only the shards still missing (`made_with`: the
    scorer's settings; a chunk embedded with others is refused).
    `shard_keys`: storage key -> the sha256 the version's manifest lists (`manifest.shard_checksums`);
    `keep`: the samples of them to take (a reviewed version's shards also hold those people dropped)."""
    if not shard_keys:
        raise ValueError(f"pool {name}: no shards to build it from")
    shards = pd.DataFrame({"shard": list(shard_keys), "sha256": list(shard_keys.values()),
                           "part": range(len(shard_keys))})
    step = MapStep.on_pool(ShardEmbedder, (storage_config, name, make_scorer, batch_size, keep), actors)
    resume = Resume(storage, layout.pool_embedded(name), made_with, inputs=("shard", "sha256", "part"), chunk_rows=1)
    embedded = (chunk.explode(["image_id", "row", "embedding"], ignore_index=True).dropna(subset=["image_id"])
                for chunk in run_resumable(shards, [step], resume))
    summary = finish_pool(storage, name, embedded, exact_limit)
    log.info("pool %s: %s from %d shards", name, summary, len(shard_keys))
    return summary
