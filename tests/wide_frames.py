"""16:9 camera-trap-like frames with a distinctive object at the far left edge, written by code (no files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

EDGE_FRAMES = [0, 2, 4, 6, 8, 10]  # frames with the object at the far left edge; the odd ones have none
SQUARE = 12  # a square frame with the object at its left edge: letterboxed in fit mode


def checkerboard(size: int = 56, square: int = 8) -> np.ndarray:
    cells = (np.indices((size, size)) // square).sum(axis=0) % 2
    return np.where(cells[..., None] == 1, [230, 20, 20], [250, 250, 250]).astype(np.uint8)


def frame(index: int, width: int = 320, height: int = 180) -> Image.Image:
    """A smooth random background (a camera's scene) and, for edge frames, the object at x 2..58."""
    rng = np.random.default_rng(index)
    # muted scenes (a grey level and a slight tint per corner): never the object's saturated red
    corners = rng.integers(60, 170, size=(2, 2, 1)) + rng.integers(-20, 20, size=(2, 2, 3)).astype(np.float64)
    ys, xs = np.linspace(0, 1, height)[:, None, None], np.linspace(0, 1, width)[None, :, None]
    background = (corners[0, 0] * (1 - ys) * (1 - xs) + corners[0, 1] * (1 - ys) * xs
                  + corners[1, 0] * ys * (1 - xs) + corners[1, 1] * ys * xs)
    pixels = np.clip(background + rng.normal(0, 6, size=(height, width, 3)), 0, 255).astype(np.uint8)
    if index in EDGE_FRAMES or index == SQUARE:
        top = height // 3
        pixels[top:top + 56, 2:58] = checkerboard()
    return Image.fromarray(pixels)


def write_frames(folder: Path) -> Path:
    """Twelve 320x180 frames (the even ones with the object at the far left edge) and one square frame."""
    for index in range(12):
        frame(index).save(folder / f"{index:02d}.png")
    frame(SQUARE, 180, 180).save(folder / f"{SQUARE:02d}.png")
    return folder
