"""The retrieval pool for SID's `w`: CLIP image embeddings of a pool of images, as Parquet.

Search is exact cosine over the whole pool in batches (a matrix product of normalised
embeddings); `ImagePool.search` is the one seam an ANN index would replace.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from factory.images import ImageRejected, decode_image
from factory.storage import Storage

POOL_SCHEMA = pa.schema([("image_id", pa.string()), ("image", pa.binary()), ("embedding", pa.list_(pa.float32()))])


def pool_folder(name: str) -> str:
    return f"pools/{name}"


def build_pool(storage: Storage, name: str, images: Iterable[tuple[str, bytes]], scorer,
               batch_size: int = 64, part_size: int = 4096) -> dict[str, int]:
    """Embed `(image_id, encoded bytes)` pairs with `scorer.embed_images` and store them."""
    ids, blobs, embeddings, rejected = [], [], [], 0
    pending: list[tuple[str, bytes, object]] = []

    def flush() -> None:
        if pending:
            vectors = scorer.embed_images([image for _, _, image in pending]).cpu().numpy().astype(np.float32)
            for (image_id, data, _), vector in zip(pending, vectors):
                ids.append(image_id)
                blobs.append(data)
                embeddings.append(vector)
            pending.clear()

    for image_id, data in images:
        try:
            pending.append((image_id, data, decode_image(data)))
        except ImageRejected:
            rejected += 1
            continue
        if len(pending) >= batch_size:
            flush()
    flush()
    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
    for part, start in enumerate(range(0, len(order), part_size)):
        chosen = order[start : start + part_size]
        table = pa.Table.from_pydict(
            {"image_id": [ids[i] for i in chosen], "image": [blobs[i] for i in chosen],
             "embedding": [embeddings[i].tolist() for i in chosen]},
            schema=POOL_SCHEMA,
        )
        storage.write_parquet(f"{pool_folder(name)}/part-{part:05d}.parquet", table)
    return {"images": len(ids), "rejected": rejected}


@dataclass
class ImagePool:
    image_ids: list[str]
    images: list[bytes]
    embeddings: np.ndarray  # (N, d), L2-normalised

    @classmethod
    def load(cls, storage: Storage, name: str) -> ImagePool:
        parts = storage.list(pool_folder(name))
        if not parts:
            raise FileNotFoundError(f"no image pool at {storage.url(pool_folder(name))}")
        tables = pa.concat_tables([storage.read_parquet(key) for key in parts])
        vectors = np.asarray(tables.column("embedding").to_pylist(), dtype=np.float32)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return cls(tables.column("image_id").to_pylist(), tables.column("image").to_pylist(), vectors)

    def search(self, queries: np.ndarray, k: int = 1, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """Top-k pool rows by cosine for each query: (indices, scores), both (Q, k), best first."""
        queries = np.asarray(queries, dtype=np.float32)
        queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        k = min(k, len(self.image_ids))
        indices, scores = [], []
        for start in range(0, len(queries), batch_size):
            similarity = queries[start : start + batch_size] @ self.embeddings.T
            top = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
            indices.append(top)
            scores.append(np.take_along_axis(similarity, top, axis=1))
        return np.concatenate(indices), np.concatenate(scores)
