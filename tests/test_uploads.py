from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dashboard.uploads import UploadError, read_upload


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"%PDF-1.4 not an image at all", "not an image"),
    (encode(Image.new("RGB", (64, 64), "red"), "JPEG")[:200], "damaged or truncated"),
])
def test_unusable_bytes_get_a_clear_message(data, message):
    with pytest.raises(UploadError, match=message):
        read_upload(data)


def test_too_many_bytes():
    with pytest.raises(UploadError, match="limit"):
        noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        read_upload(encode(Image.fromarray(noise)), max_bytes=1000)


def test_too_many_pixels_is_refused_before_decoding():
    with pytest.raises(UploadError, match="pixel limit"):
        read_upload(encode(Image.new("L", (300, 300))), max_pixels=10_000)


@pytest.mark.parametrize("image", [
    Image.new("CMYK", (20, 10), (0, 255, 0, 0)),
    Image.new("P", (20, 10), 3),
    Image.new("RGBA", (20, 10), (255, 0, 0, 0)),
    Image.new("LA", (20, 10), (10, 255)),
])
def test_any_mode_becomes_rgb(image):
    fmt = "JPEG" if image.mode == "CMYK" else "PNG"
    result = read_upload(encode(image, fmt))
    assert result.mode == "RGB" and result.size == (20, 10)


def test_transparent_pixels_become_white():
    assert read_upload(encode(Image.new("RGBA", (4, 4), (255, 0, 0, 0)))).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    values = np.full((8, 8), 65535 // 2, dtype=np.uint16)
    result = read_upload(encode(Image.fromarray(values)))
    assert result.getpixel((0, 0)) == (127, 127, 127)


def test_exif_rotation_is_applied():
    image = Image.new("RGB", (40, 20), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    result = read_upload(encode(image, "JPEG", exif=exif))
    assert result.size == (20, 40)


def test_unsupported_format_is_refused():
    with pytest.raises(UploadError, match="ICO"):
        read_upload(encode(Image.new("RGB", (16, 16)), "ICO"))


def test_reading_an_upload_leaves_the_process_wide_warning_filters_alone(monkeypatch):
    """Sessions are threads of one process: swapping warning filters in one would leak into the others."""
    import warnings

    def refuse(*args, **kwargs):
        raise AssertionError("warnings.catch_warnings is not thread-safe")

    monkeypatch.setattr(warnings, "catch_warnings", refuse)
    before = list(warnings.filters)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    assert read_upload(buffer.getvalue()).size == (8, 8)
    assert warnings.filters == before
