"""Image bytes of every kind the filter must survive, shared by the filter tests."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def noise_image(seed: int, size: tuple[int, int] = (96, 80), mode: str = "RGB") -> Image.Image:
    """A random image (width, height) in `mode`; different seeds give different images."""
    rng = np.random.default_rng(seed)
    width, height = size
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65535, (height, width), dtype=np.uint16))
    channels = {"L": 1, "RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    if channels == 1:
        return Image.fromarray(pixels[..., 0], mode="L")
    return Image.fromarray(pixels, mode=mode)


def image_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def jpeg(seed: int, size: tuple[int, int] = (96, 80)) -> bytes:
    return image_bytes(noise_image(seed, size), "JPEG")


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims `width` x `height` pixels (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    ihdr = b"IHDR" + header
    idat = b"IDAT" + zlib.compress(b"\x00" * 64)
    chunks = b""
    for body in (ihdr, idat, b"IEND"):
        chunks += struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
    return b"\x89PNG\r\n\x1a\n" + chunks


def good_images() -> dict[str, bytes]:
    """Decodable images in the modes the factory must accept, by name."""
    return {
        "rgb_jpeg": jpeg(1),
        "grayscale": image_bytes(noise_image(2, mode="L")),
        "rgba": image_bytes(noise_image(3, mode="RGBA")),
        "cmyk": image_bytes(noise_image(4, mode="CMYK"), "JPEG"),
        "16bit": image_bytes(noise_image(5, mode="I;16")),
    }


def bad_images() -> dict[str, tuple[bytes | None, str]]:
    """Undecodable images by name, with the reject reason each must get."""
    valid = jpeg(6)
    return {
        "corrupt": (b"\xff\xd8\xff\xe0 not really a jpeg" + bytes(range(256)), "corrupt_image"),
        "truncated": (valid[: len(valid) // 3], "corrupt_image"),
        "empty": (b"", "empty_image"),
        "missing": (None, "empty_image"),
        "bomb": (png_claiming(50_000, 50_000), "image_too_large"),
    }
