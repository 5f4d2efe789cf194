"""Images stored once as Parquet parts and fetched by id: parts of (image_id, image) in row groups,
and an ids table (image_id, part, row) saying where each image is. SID's pool keeps its images
this way (`factory.dataset.pool`), and so does a SID round's SD-drawn `w` set; `ImageJoin`
(`factory.framework.units`) fetches them by id, reading only the row groups that hold them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import islice

import numpy as np
import pandas as pd
import pyarrow as pa

from factory.framework.storage import Storage

PART_SCHEMA = pa.schema([("image_id", pa.string()), ("image", pa.binary())])
IDS_SCHEMA = pa.schema([("image_id", pa.string()), ("part", pa.int32()), ("row", pa.int32())])
ROW_GROUP = 64  # images per Parquet row group: the unit `fetch` reads


def fetch_images(storage: Storage, ids: pd.DataFrame, part_key: Callable[[int], str],
                 image_ids: Iterable[str]) -> dict[str, bytes]:
    """{image_id: bytes} for those of `image_ids` that `ids` (image_id, part, row) lists, reading
    only the row groups that hold them; ids it does not list are left out."""
    wanted = set(image_ids)
    located = ids[ids["image_id"].isin(wanted)]
    found: dict[str, bytes] = {}
    for part, rows in located.groupby("part"):
        found.update(read_part_rows(storage, part_key(int(part)), rows["row"].tolist()))
    return found


def read_part_rows(storage: Storage, key: str, rows: list[int]) -> dict[str, bytes]:
    """{image_id: bytes} of the given rows of one part, reading only their row groups."""
    with storage.parquet(key) as parquet:
        starts = np.cumsum([0] + [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)])
        groups = sorted({int(np.searchsorted(starts, row, side="right")) - 1 for row in rows})
        table = parquet.read_row_groups(groups, columns=["image_id", "image"], use_threads=storage.parquet_threads)
    offsets = {group: int(sum(starts[g + 1] - starts[g] for g in groups[:n])) for n, group in enumerate(groups)}
    out = {}
    for row in rows:
        group = int(np.searchsorted(starts, row, side="right")) - 1
        at = offsets[group] + row - int(starts[group])
        out[table.column("image_id")[at].as_py()] = table.column("image")[at].as_py()
    return out


def write_image_part(storage: Storage, key: str, image_ids: list[str], images: list[bytes]) -> None:
    table = pa.Table.from_pydict({"image_id": image_ids, "image": images}, schema=PART_SCHEMA)
    storage.write_parquet(key, table, row_group_size=ROW_GROUP)


def store_images(storage: Storage, part_key: Callable[[int], str], ids_key: str,
                 images: Iterable[tuple[str, bytes]], part_size: int = 4096) -> int:
    """Store `(image_id, bytes)` pairs once each (the first of a repeated id wins) as parts of
    `part_size` images and, last, the ids table `fetch_images` reads; returns how many were stored."""
    def first_of_each(pairs: Iterable[tuple[str, bytes]]):
        seen: set[str] = set()
        for image_id, data in pairs:
            if image_id not in seen:
                seen.add(image_id)
                yield image_id, data

    located = []
    part = 0
    unique = first_of_each(images)
    while chunk := list(islice(unique, part_size)):
        write_image_part(storage, part_key(part), [image_id for image_id, _ in chunk], [data for _, data in chunk])
        located += [(image_id, part, row) for row, (image_id, _) in enumerate(chunk)]
        part += 1
    frame = pd.DataFrame(located, columns=["image_id", "part", "row"])
    storage.write_parquet(ids_key, pa.Table.from_pandas(frame, schema=IDS_SCHEMA, preserve_index=False))
    return len(located)
