"""Safe image decoding and encoding shared by every stage.

Outside images are untrusted: the size is checked from the header before any pixel is
decoded (decompression bombs), EXIF orientation is applied so stored images are upright,
and every mode (L, P, RGBA, CMYK, I;16, ...) comes out as RGB.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


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
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageRejected("image_too_large", f"{width}x{height} > {max_pixels} pixels")
            if min(width, height) < min_side:
                raise ImageRejected("image_too_small", f"{width}x{height}")
            image.load()
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageRejected("image_too_large", str(err)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageRejected("corrupt_image", f"{type(err).__name__}: {err}") from None
    return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
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
