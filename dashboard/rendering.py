"""Pictures for the pages: the matched window on a hit, a similarity heat map, the feature grid, a region.

Everything is drawn in the pixels of the image as the model saw it; `dashboard.geometry` says which pixels a
feature cell covers.
"""

from __future__ import annotations

import numpy as np
import plotly.colors
from PIL import Image, ImageDraw

from dashboard.geometry import cell_edges, per_pixel

# "Inferno" (dark purple -> yellow), perceptually ordered: the same scale the charts' plotly offers.
_INFERNO = np.array([plotly.colors.hex_to_rgb(c) for c in plotly.colors.sequential.Inferno], dtype=np.float64)


def colormap(values: np.ndarray) -> np.ndarray:
    """[0, 1] values -> (..., 3) uint8 colours."""
    position = np.clip(values, 0, 1) * (len(_INFERNO) - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, len(_INFERNO) - 1)
    frac = (position - low)[..., None]
    return np.rint(_INFERNO[low] * (1 - frac) + _INFERNO[high] * frac).astype(np.uint8)


def draw_window(image: Image.Image, box: tuple[int, int, int, int], color=(255, 64, 0),
                width: int | None = None) -> Image.Image:
    """A copy with the match window outlined inside the box (x1, y1 exclusive)."""
    out = image.convert("RGB")
    width = width or max(2, min(out.size) // 80)
    x0, y0, x1, y1 = (int(v) for v in box)
    ImageDraw.Draw(out).rectangle((x0, y0, x1 - 1, y1 - 1), outline=tuple(color), width=width)
    return out


SUGGESTION_COLORS = [(0, 200, 255), (255, 200, 0), (80, 255, 120), (255, 90, 200), (200, 140, 255), (255, 255, 255)]


def suggestion_overlay(image: Image.Image, boxes: list[tuple[int, int, int, int]]) -> Image.Image:
    """A copy with each suggested box outlined in its own colour and numbered from 1 (as its button is)."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    width = max(2, min(out.size) // 100)
    for number, box in reversed(list(enumerate(boxes, start=1))):  # the best drawn last, on top
        color = SUGGESTION_COLORS[(number - 1) % len(SUGGESTION_COLORS)]
        x0, y0, x1, y1 = (int(v) for v in box)
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=color, width=width)
        draw.rectangle((x0, y0, x0 + 4 + 7 * len(str(number)), y0 + 13), fill=color)
        draw.text((x0 + 3, y0 + 1), str(number), fill=(0, 0, 0))
    return out


def cell_scores(window_scores: np.ndarray, grid: tuple[int, int], window: tuple[int, int]) -> np.ndarray:
    """(H, W) map: each cell takes the best score of the windows covering it.

    The maximum, not the mean: a cell lights up as much as the best match it is part of, so the hit's chosen
    window is uniformly at the peak colour and its area reads as one block. A mean would blur the peak into the
    neighbouring windows, which share most of their cells.
    """
    window_scores = np.asarray(window_scores, dtype=np.float64)
    h, w = window
    expected = (grid[0] - h + 1, grid[1] - w + 1)
    if window_scores.shape != expected:
        raise ValueError(f"a {h}x{w} window on a {grid[0]}x{grid[1]} grid has {expected} positions, "
                         f"got scores of shape {window_scores.shape}")
    cells = np.full(grid, -1.0)
    for y in range(window_scores.shape[0]):
        for x in range(window_scores.shape[1]):
            patch = cells[y:y + h, x:x + w]
            np.maximum(patch, window_scores[y, x], out=patch)
    return cells


def heatmap_overlay(image: Image.Image, window_scores: np.ndarray, grid: tuple[int, int],
                    window: tuple[int, int], alpha: float = 0.45) -> Image.Image:
    """The image with cells coloured by similarity, alpha-blended (see `cell_scores` for window -> cell).

    Scores are scaled to this image's own min..max, so the map shows where in the image the match is, not how
    good it is (the score caption says that). Cell edges are the feature grid's, rounded to whole pixels.
    """
    cells = cell_scores(window_scores, grid, window)
    lo, hi = cells.min(), cells.max()
    scaled = (cells - lo) / (hi - lo) if hi > lo else np.zeros_like(cells)
    base = np.asarray(image.convert("RGB"), dtype=np.float64)
    layer = per_pixel(colormap(scaled).astype(np.float64), base.shape[:2])
    return Image.fromarray(np.rint(base * (1 - alpha) + layer * alpha).astype(np.uint8))


def grid_overlay(image: Image.Image, grid: tuple[int, int], color=(255, 255, 255, 90)) -> Image.Image:
    """Thin lines on the feature-cell boundaries, to show what resolution a region is searched at."""
    base = image.convert("RGBA")
    lines = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(lines)
    for x in cell_edges(base.width, grid[1])[1:-1]:
        draw.line([(x, 0), (x, base.height - 1)], fill=tuple(color), width=1)
    for y in cell_edges(base.height, grid[0])[1:-1]:
        draw.line([(0, y), (base.width - 1, y)], fill=tuple(color), width=1)
    return Image.alpha_composite(base, lines).convert("RGB")


def region_overlay(image: Image.Image, weights: np.ndarray, color=(255, 80, 0), alpha: float = 0.55) -> Image.Image:
    """A grid-resolution region (soft weights) tinted onto the image: how a linked region looks."""
    base = np.asarray(image.convert("RGB"), dtype=np.float64)
    strength = (per_pixel(np.asarray(weights, dtype=np.float64), base.shape[:2]) * alpha)[..., None]
    tinted = base * (1 - strength) + np.array(color, dtype=np.float64) * strength
    return Image.fromarray(np.rint(tinted).astype(np.uint8))
