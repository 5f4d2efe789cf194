"""Images as the factory keeps them: decoded safely, encoded as JPEG, stored once and fetched by id.

Outside images are untrusted: the size is checked from the header before any pixel is
decoded (decompression bombs), EXIF orientation is applied so stored images are upright,
and every mode (L, P, RGBA, CMYK, I;16, ...) comes out as RGB.

Images stored once as Parquet parts (SID's pool, `factory.dataset.pool`, and a SID round's SD-drawn
`w` set) are parts of (image_id, image) in row groups, with an ids table (image_id, part, row)
saying where each image is; `ImageJoin` (`factory.framework.units`) fetches them by id, reading
only the row groups that hold them.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Callable, Iterable
from itertools import islice

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

from factory.framework.storage import Storage

# the formats of the files references take (PIL's JPEG opener also gives a camera's MPO); never a
# plugin that runs another program on the bytes (EPS hands them to Ghostscript)
DECODED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
PREMULTIPLIED = {"La": "LA", "RGBa": "RGBA"}  # alpha-premultiplied modes (TIFF's associated alpha)


class ImageRejected(ValueError):
    """An image that cannot be used; `reason` is a short, countable tag."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode_image(data: bytes | None, max_pixels: int = 40_000_000, min_side: int = 1) -> Image.Image:
    """Decode untrusted bytes into an upright RGB image, or raise ImageRejected."""
    if not data:
        raise ImageRejected("empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=DECODED_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageRejected("image_too_large", f"{width}x{height} > {max_pixels} pixels")
            if min(width, height) < min_side:
                raise ImageRejected("image_too_small", f"{width}x{height}")
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageRejected("image_too_large", str(err)) from None
    # struct.error and TypeError: EXIF whose entries lie about their types, met by exif_transpose
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError, struct.error) as err:
        raise ImageRejected("corrupt_image", f"{type(err).__name__}: {err}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in PREMULTIPLIED:  # PIL converts these only to their straight-alpha twins
        image = image.convert(PREMULTIPLIED[image.mode])
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() or 1.0
        image = Image.fromarray((array / peak * 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def encode_jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    to_rgb(image).save(buffer, format="JPEG", quality=quality, optimize=False)
    return buffer.getvalue()


def fit_within(image: Image.Image, longest_side: int) -> Image.Image:
    """Downscale so the longest side is at most `longest_side` (never upscale)."""
    if max(image.size) <= longest_side:
        return image
    scale = longest_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


# --- images stored once as Parquet parts, fetched by id -------------------------------------

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


def read_part_rows(storage: Storage, key: str, rows: list[int], columns: tuple[str, str] = ("image_id", "image")
                   ) -> dict[str, bytes]:
    """{id: bytes} of the given rows of one Parquet file (`columns`: its id and image columns),
    reading only their row groups."""
    with storage.parquet(key) as parquet:
        sizes = [parquet.metadata.row_group(number).num_rows for number in range(parquet.num_row_groups)]
        starts = np.cumsum([0, *sizes])
        group_of = np.searchsorted(starts, rows, side="right") - 1
        groups = sorted({int(group) for group in group_of})
        table = parquet.read_row_groups(groups, columns=list(columns), use_threads=storage.parquet_threads)
    read_from = dict(zip(groups, np.cumsum([0, *(sizes[group] for group in groups)])))
    picked = table.take([int(read_from[group] + row - starts[group]) for row, group in zip(rows, group_of)])
    return dict(zip(picked.column(columns[0]).to_pylist(), picked.column(columns[1]).to_pylist()))


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
