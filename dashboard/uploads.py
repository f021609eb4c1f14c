"""Turn untrusted bytes into an upright RGB image, or a clear message; uploads never touch the disk."""

from __future__ import annotations

import io

from PIL import Image, ImageOps, UnidentifiedImageError

from cache_builder.images import to_rgb

MAX_UPLOAD_BYTES = 20 * 2**20
MAX_PIXELS = 50_000_000  # well above any photo, well below a decompression bomb
ALLOWED_FORMATS = {"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO"}


class UploadError(ValueError):
    """An upload that cannot be used as a query image; the message is shown to the user as is."""


def read_upload(data: bytes, name: str = "upload", max_bytes: int = MAX_UPLOAD_BYTES,
                max_pixels: int = MAX_PIXELS) -> Image.Image:
    if not data:
        raise UploadError(f"{name} is empty (0 bytes)")
    if len(data) > max_bytes:
        raise UploadError(f"{name} is {len(data) / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.0f} MB")
    # The pixel limit is checked from the header, before decoding; no warnings filter is touched (that state is
    # process-wide, and every session runs in a thread of one process). Pillow's own bomb check still raises
    # above twice its limit.
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in ALLOWED_FORMATS:
                raise UploadError(f"{name} is a {image.format} file; upload a JPEG, PNG or WebP image")
            width, height = image.size
            if width * height > max_pixels:
                raise UploadError(f"{name} is {width}x{height} pixels, over the {max_pixels:,}-pixel limit")
            image.load()
            upright = ImageOps.exif_transpose(image)
    except UploadError:
        raise
    except Image.DecompressionBombError:
        raise UploadError(f"{name} is too large to decode safely (decompression bomb protection)") from None
    except UnidentifiedImageError:
        raise UploadError(f"{name} is not an image Pillow can read; upload a JPEG, PNG or WebP image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise UploadError(f"{name} is damaged or truncated ({exc})") from None
    return to_rgb(upright)
