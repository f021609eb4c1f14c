"""Cells and pixels (dashboard.geometry): masks to grid weights, boxes, windows to pixels."""

from __future__ import annotations

import numpy as np
import pytest

from dashboard import geometry
from dashboard.geometry import QueryError, box_mask, display_mask_to_grid, mask_to_grid


def test_mask_to_grid_gives_area_fractions():
    mask = np.zeros((8, 8), dtype=bool)
    mask[0:4, 0:2] = True  # left half of the top-left 4x4 cell
    weights = mask_to_grid(mask, (2, 2))
    np.testing.assert_allclose(weights, [[0.5, 0], [0, 0]])
    canvas = np.zeros((8, 8, 4), dtype=np.uint8)
    canvas[4:, 4:, 3] = 255
    np.testing.assert_allclose(mask_to_grid(canvas, (2, 2)), [[0, 0], [0, 1]])


def test_box_mask_clips_to_image():
    mask = box_mask(10, (8, 8, 20, 20))
    assert mask.sum() == 4 and mask[9, 9]


@pytest.mark.parametrize("box", [(20, 20, 30, 30), (-9, -9, -1, -1)])
def test_box_outside_the_image_is_refused(box):
    with pytest.raises(QueryError, match="outside"):
        box_mask(10, box)


def test_empty_box_is_refused():
    with pytest.raises(QueryError, match="empty"):
        box_mask(10, (5, 5, 5, 9))


def test_wrong_size_mask_is_refused():
    with pytest.raises(QueryError, match="48x48"):
        display_mask_to_grid(np.ones((30, 40), dtype=bool), (48, 48), (5, 6))


def test_a_rectangular_box_on_a_rectangular_image():
    mask = box_mask((20, 30), (25, 0, 40, 5))
    assert mask.shape == (20, 30) and mask.sum() == 5 * 5 and mask[0, 29]


def test_window_pixels_match_the_cell_edges():
    edges_x, edges_y = geometry.cell_edges(48, 6), geometry.cell_edges(48, 5)
    x0, y0, x1, y1 = geometry.window_pixels(np.array([1, 3]), np.array([2, 0]), 2, 3, (5, 6), (48, 48))
    assert list(x0) == [edges_x[2], edges_x[0]] and list(x1) == [edges_x[5], edges_x[3]]
    assert list(y0) == [edges_y[1], edges_y[3]] and list(y1) == [edges_y[3], edges_y[5]]


def test_a_window_becomes_a_region_and_a_region_covers_its_pixels():
    region = geometry.window_region((5, 6), 1, 2, 2, 3)
    assert region.sum() == 6 and region[1:3, 2:5].all()
    pixels = geometry.per_pixel(region, (48, 48))
    assert pixels.shape == (48, 48) and mask_to_grid(pixels, (5, 6)).tolist() == region.tolist()


def test_the_canvas_shows_a_square_at_448_and_a_wide_frame_whole_within_the_page():
    assert geometry.display_size((224, 224)) == (448, 448)
    assert geometry.display_size((384, 224)) == (760, 443)  # 16:9 kept, capped at MAX_DISPLAY_WIDTH
    assert geometry.display_size((224, 384)) == (448, 768)  # portrait: the short side sets the scale
    assert geometry.display_size((1000, 800)) == (1000, 800)  # never shrunk below its own size
