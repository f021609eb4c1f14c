"""Pixel-format normalisation shared by the builder (dataset files) and the app (uploads)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB version of any PIL image: high bit depths are scaled down, transparency is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":  # 16/32-bit integer or float grayscale
        a = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a / 257  # 0..65535 -> 0..255
        elif image.mode == "F" and a.max(initial=0) <= 1:
            a = a * 255  # float image in 0..1
        gray = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")