from __future__ import annotations

import numpy as np
from PIL import Image

from dashboard import rendering


def gray(size=60) -> Image.Image:
    return Image.new("RGB", (size, size), (128, 128, 128))


def test_draw_window_outlines_only_the_box_border():
    out = np.asarray(rendering.draw_window(gray(), (10, 20, 40, 50), width=2)).astype(int)
    changed = np.any(out != 128, axis=2)
    assert changed[20, 10] and changed[49, 39] and changed[21, 11]
    assert not changed[19, 10] and not changed[50, 39] and not changed[30, 25]  # outside and inside untouched


def test_heatmap_colours_cell_blocks_on_the_feature_grid():
    scores = np.zeros((2, 2))
    scores[0, 0] = 1.0  # the window with top-left cell (0, 0), 2x2 cells, on a 3x3 grid
    out = np.asarray(rendering.heatmap_overlay(gray(), scores, (3, 3), (2, 2), alpha=1.0)).astype(int)
    hot, cold = out[5, 5], out[55, 55]
    assert (hot != cold).any()
    assert (out[0:40, 0:40] == hot).all()  # cells (0..1, 0..1) = pixels 0..39
    assert (out[45:60, 45:60] == cold).all()


def test_cell_scores_take_the_best_covering_window():
    cells = rendering.cell_scores(np.array([[0.2, 0.9]]), (1, 3), (1, 2))
    np.testing.assert_allclose(cells, [[0.2, 0.9, 0.9]])


def test_grid_overlay_draws_lines_at_cell_edges():
    out = np.asarray(rendering.grid_overlay(gray(), (3, 3), color=(255, 255, 255, 255))).astype(int)
    assert (out[:, 20] == 255).all() and (out[40, :] == 255).all()
    assert (out[10, 10] == 128).all()


def test_region_overlay_tints_only_the_region_cells():
    weights = np.zeros((3, 3))
    weights[1, 2] = 1.0
    out = np.asarray(rendering.region_overlay(gray(), weights)).astype(int)
    assert (out[30, 50] != 128).any() and (out[5, 5] == 128).all()


def test_colormap_runs_dark_to_bright():
    colours = rendering.colormap(np.array([0.0, 0.5, 1.0])).astype(int).sum(axis=1)
    assert colours[0] < colours[1] < colours[2]
