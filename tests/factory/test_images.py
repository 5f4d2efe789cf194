"""Untrusted image bytes the references, filter and report decode (factory/framework/images.py);
the common cases (empty, truncated, bombs, every mode, EXIF rotation) are in tests/stages/test_references.py."""

from __future__ import annotations

import io
import struct

import pytest
from PIL import Image

from factory.framework.images import ImageRejected, decode_image


def jpeg_with_orientation_and_a_lying_exif_entry() -> bytes:
    """A JPEG rotated by EXIF (Orientation 6) whose XResolution entry says ASCII but holds a rational."""
    exif = Image.Exif()
    exif[0x0112], exif[0x011A] = 6, 72.0
    raw = exif.tobytes()
    little = raw[6:8] == b"II"
    tag = b"\x1a\x01\x05\x00" if little else b"\x01\x1a\x00\x05"  # XResolution, RATIONAL
    assert tag in raw
    raw = raw.replace(tag, tag[:2] + (b"\x02\x00" if little else b"\x00\x02"))  # declared ASCII
    buffer = io.BytesIO()
    Image.new("RGB", (16, 8), "red").save(buffer, "JPEG", exif=raw)
    return buffer.getvalue()


def tiff_with_premultiplied_alpha() -> bytes:
    """A grey + alpha TIFF whose alpha is 'associated' (premultiplied): PIL opens it as mode La."""
    image = Image.new("LA", (8, 8), (120, 200))
    image.putpixel((0, 0), (10, 0))
    buffer = io.BytesIO()
    image.save(buffer, "TIFF")
    data = bytearray(buffer.getvalue())
    entry = struct.pack("<HHI", 338, 3, 1)  # ExtraSamples, SHORT, one value
    at = data.index(entry)
    data[at + 8:at + 10] = struct.pack("<H", 1)  # 2 (unassociated alpha) -> 1 (associated)
    return bytes(data)


def test_an_exif_that_lies_about_its_entries_is_a_corrupt_image_not_an_escaped_error():
    with pytest.raises(ImageRejected) as rejected:
        decode_image(jpeg_with_orientation_and_a_lying_exif_entry())
    assert rejected.value.reason == "corrupt_image" and "TypeError" in str(rejected.value)


def test_a_premultiplied_alpha_tiff_is_kept_as_rgb_on_white():
    data = tiff_with_premultiplied_alpha()
    assert Image.open(io.BytesIO(data)).mode == "La"
    image = decode_image(data)
    assert image.mode == "RGB" and image.size == (8, 8)
    assert image.getpixel((0, 0)) == (255, 255, 255)  # fully transparent: the white background
    assert image.getpixel((1, 1))[0] < 255  # grey, over white


def test_only_the_formats_references_take_are_decoded_so_eps_never_reaches_ghostscript():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nnewpath 0 0 moveto 16 16 lineto stroke\nshowpage\n"
    with pytest.raises(ImageRejected, match="corrupt_image: UnidentifiedImageError"):
        decode_image(eps)
    for format_name in ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, format_name)
        assert decode_image(buffer.getvalue()).size == (8, 8), format_name
