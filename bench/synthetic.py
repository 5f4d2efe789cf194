"""Synthetic inputs shared by the benchmarks."""

import io

import numpy as np
from PIL import Image


def photo_like_jpeg(seed: int, side: int) -> bytes:
    """A smooth random picture with grain (compresses like a photo), JPEG quality 95."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).resize((side, side), Image.BICUBIC)
    pixels = np.asarray(field, dtype=np.int16) + rng.integers(-12, 13, (side, side, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()
