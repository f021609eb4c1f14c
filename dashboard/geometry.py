"""Feature cells and display pixels: the one place that converts between them.

An image as the model saw it is S_y x S_x pixels and its feature map H x W cells; cell (r, c) covers the pixels
[round(c * S_x / W), round((c + 1) * S_x / W)) x [round(r * S_y / H), round((r + 1) * S_y / H)). A region is
drawn in pixels and searched as (H, W) soft weights: the fraction of each cell it covers.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image


DISPLAY_SIZE = 448  # the drawing canvas's short side: twice the model's usual 224 so a brush can be precise
MAX_DISPLAY_WIDTH = 760  # a wide frame is shown whole, at its aspect ratio, within a laptop's page width


class QueryError(ValueError):
    """A region or search option that cannot be searched; the message says what to change."""


def cell_to_pixel(index, size: int, cells: int):
    """Pixel coordinate of cell boundary `index` (scalar or array) on a `size`-pixel side of `cells` cells."""
    return np.round(np.asarray(index) * (size / cells)).astype(int)


def cell_edges(size: int, cells: int) -> np.ndarray:
    """The `cells + 1` pixel boundaries of the cells along one side."""
    return cell_to_pixel(np.arange(cells + 1), size, cells)


def window_pixels(row, col, height: int, width: int, grid: tuple[int, int], image_size: tuple[int, int]):
    """(x0, y0, x1, y1) pixel boxes (x1, y1 exclusive) of windows at cell (row, col), `height` x `width` cells."""
    (grid_h, grid_w), (size_y, size_x) = grid, image_size
    x0, y0 = cell_to_pixel(col, size_x, grid_w), cell_to_pixel(row, size_y, grid_h)
    x1 = cell_to_pixel(np.asarray(col) + width, size_x, grid_w)
    y1 = cell_to_pixel(np.asarray(row) + height, size_y, grid_h)
    return x0, y0, x1, y1


def display_size(size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of the canvas for an image of (width, height) `size`: the whole picture at its aspect
    ratio, its short side DISPLAY_SIZE (or its own, if larger), its width at most MAX_DISPLAY_WIDTH."""
    width, height = size
    scale = max(DISPLAY_SIZE, min(width, height)) / min(width, height)
    scale = min(scale, max(MAX_DISPLAY_WIDTH, width) / width)
    return round(width * scale), round(height * scale)


def window_region(grid: tuple[int, int], row: int, col: int, height: int, width: int) -> np.ndarray:
    """(H, W) weights covering one window: a hit's matched window as a new query region."""
    region = np.zeros(grid, dtype=np.float32)
    region[int(row):int(row) + int(height), int(col):int(col) + int(width)] = 1
    return region


def per_pixel(cells: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An (H, W, ...) per-cell array spread over the (S_y, S_x) pixels its cells cover."""
    rows = np.repeat(np.arange(cells.shape[0]), np.diff(cell_edges(size[0], cells.shape[0])))
    cols = np.repeat(np.arange(cells.shape[1]), np.diff(cell_edges(size[1], cells.shape[1])))
    return cells[rows][:, cols]


def mask_to_grid(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """A pixel region -> (H, W) soft weights: the fraction of each feature cell the region covers.

    Accepts a boolean/float mask or an RGBA canvas image whose painted pixels have alpha > 0. A mask already at
    grid resolution is returned as float weights.
    """
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[2] == 4:
        mask = mask[..., 3] > 0
    if mask.ndim != 2:
        raise QueryError(f"a mask must be 2-D (or an RGBA canvas image), got shape {mask.shape}")
    weights = np.clip(np.nan_to_num(mask.astype(np.float32)), 0.0, 1.0)
    if weights.shape == tuple(grid):
        return weights
    resized = Image.fromarray(weights, mode="F").resize((grid[1], grid[0]), resample=Image.Resampling.BOX)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def resample_region(weights: np.ndarray, image_size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """Grid weights of one layer -> the same pixels' weights on another layer's `grid` (a layer sweep, or Compare's
    second cache): each weight is spread over the pixels its cell covers and averaged over the new cells."""
    weights = np.asarray(weights, dtype=np.float32)
    if weights.shape == tuple(grid):
        return weights
    return mask_to_grid(per_pixel(weights, image_size), grid)


def display_mask_to_grid(mask: np.ndarray, display_size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """A mask drawn on the displayed image (or given on the grid) -> grid weights; any other size is refused."""
    shape = tuple(np.asarray(mask).shape[:2])
    if shape not in (tuple(display_size), tuple(grid)):
        raise QueryError(
            f"the mask is {shape[1]}x{shape[0]} but the image is shown at {display_size[1]}x{display_size[0]} "
            f"(feature grid {grid[1]}x{grid[0]})"
        )
    return mask_to_grid(mask, grid)


def box_mask(size: int | tuple[int, int], box: Sequence[float]) -> np.ndarray:
    """Boolean mask of the pixel box [x0, x1) x [y0, y1) on a `size` ((height, width) or square) image."""
    height, width = (size, size) if np.isscalar(size) else size
    if len(box) != 4:
        raise QueryError("a box is X0,Y0,X1,Y1 in display pixels")
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 <= x0 or y1 <= y0:
        raise QueryError(f"box {x0:g},{y0:g},{x1:g},{y1:g} is empty: need X1 > X0 and Y1 > Y0")
    xs, ys = np.arange(width) + 0.5, np.arange(height) + 0.5
    inside_x, inside_y = (xs >= x0) & (xs < x1), (ys >= y0) & (ys < y1)
    if not inside_x.any() or not inside_y.any():
        raise QueryError(f"box {x0:g},{y0:g},{x1:g},{y1:g} lies outside the {width}x{height} image")
    return inside_y[:, None] & inside_x[None, :]
