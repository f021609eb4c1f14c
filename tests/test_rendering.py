"""Pictures checked pixel by pixel: what changes must be exactly the box border, the cells, the grid lines."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dashboard import rendering
from dashboard.search import SearchRequest, heat_maps, search_regions

GRAY = 128


def gray(width=60, height=None) -> Image.Image:
    return Image.new("RGB", (width, height or width), (GRAY, GRAY, GRAY))


def changed(image: Image.Image) -> np.ndarray:
    return np.any(np.asarray(image).astype(int) != GRAY, axis=2)


def block(shape, rows, cols) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[rows[0]:rows[1], cols[0]:cols[1]] = True
    return mask


def test_draw_window_changes_exactly_the_border_inside_the_box():
    original = gray()
    out = rendering.draw_window(original, (10, 20, 40, 50), color=(255, 64, 0), width=2)
    expected = block((60, 60), (20, 50), (10, 40)) & ~block((60, 60), (22, 48), (12, 38))  # x1, y1 exclusive
    np.testing.assert_array_equal(changed(out), expected)
    assert (np.asarray(out)[expected] == (255, 64, 0)).all()
    assert not changed(original).any()  # a copy: the input is untouched


def test_draw_window_default_width_grows_with_the_image():
    out = rendering.draw_window(gray(400), (100, 100, 200, 200))
    expected = block((400, 400), (100, 200), (100, 200)) & ~block((400, 400), (105, 195), (105, 195))
    np.testing.assert_array_equal(changed(out), expected)  # 400 // 80 = 5 pixels
    small = rendering.draw_window(gray(40), (0, 0, 40, 40))
    np.testing.assert_array_equal(changed(small), ~block((40, 40), (2, 38), (2, 38)))  # at least 2


def test_cell_scores_take_the_best_covering_window():
    cells = rendering.cell_scores(np.array([[0.2, 0.9]]), (1, 3), (1, 2))
    np.testing.assert_allclose(cells, [[0.2, 0.9, 0.9]])
    with pytest.raises(ValueError, match="positions"):
        rendering.cell_scores(np.zeros((2, 2)), (3, 3), (1, 1))


@pytest.mark.parametrize("top_left, rows, cols", [((0, 0), (0, 33), (0, 33)), ((1, 1), (17, 50), (17, 50)),
                                                  ((0, 1), (0, 33), (17, 50))])
def test_heatmap_colours_only_the_cells_of_the_best_window(top_left, rows, cols):
    # 50 pixels over 3 cells: cell edges at 0, 17, 33, 50 (not a whole number of pixels per cell)
    scores = np.zeros((2, 2))
    scores[top_left] = 1.0  # the 2x2-cell window whose top-left cell is `top_left`, on a 3x3 grid
    out = np.asarray(rendering.heatmap_overlay(gray(50), scores, (3, 3), (2, 2), alpha=1.0))
    hot = np.all(out == rendering.colormap(np.array(1.0)), axis=2)
    cold = np.all(out == rendering.colormap(np.array(0.0)), axis=2)
    expected = block((50, 50), rows, cols)
    np.testing.assert_array_equal(hot, expected)
    np.testing.assert_array_equal(cold, ~expected)


def test_heatmap_on_a_non_square_grid_and_image():
    scores = np.zeros((2, 3))  # 1x1 windows on a 2 (rows) x 3 (columns) grid
    scores[1, 2] = 0.8
    out = np.asarray(rendering.heatmap_overlay(gray(60, 40), scores, (2, 3), (1, 1), alpha=1.0))
    hot = np.all(out == rendering.colormap(np.array(1.0)), axis=2)
    np.testing.assert_array_equal(hot, block((40, 60), (20, 40), (40, 60)))


def test_heatmap_alpha_blends_with_the_image():
    scores = np.array([[0.0, 1.0]])
    assert not changed(rendering.heatmap_overlay(gray(20), scores, (1, 2), (1, 1), alpha=0.0)).any()
    half = np.asarray(rendering.heatmap_overlay(gray(20), scores, (1, 2), (1, 1), alpha=0.5)).astype(int)
    expected = np.rint((GRAY + rendering.colormap(np.array(1.0)).astype(float)) / 2)
    np.testing.assert_array_equal(half[5, 15], expected)


def test_heatmap_peak_is_the_hit_window_of_a_real_search(small_cache):
    """The window the search reports and the heat map's peak cells land on the same pixels (48 px, 5x6 grid)."""
    result = search_regions(SearchRequest(cache=small_cache, image_id=13, k=3, exclude_query=True,
                                          weights=np.pad(np.ones((2, 2)), ((1, 2), (2, 2)))))
    hit = result.hits.iloc[0]
    heat = heat_maps(small_cache, result, [int(hit["id"])])[0]
    out = np.asarray(rendering.heatmap_overlay(small_cache.load_image(int(hit["id"])), heat,
                                               small_cache.grid, result.query.box, alpha=1.0))
    peak = np.all(out == rendering.colormap(np.array(1.0)), axis=2)
    np.testing.assert_array_equal(peak, block(peak.shape, (hit["y0"], hit["y1"]), (hit["x0"], hit["x1"])))


def test_grid_overlay_draws_lines_exactly_at_cell_edges():
    out = rendering.grid_overlay(gray(50), (3, 3), color=(255, 255, 255, 255))
    lines = np.zeros((50, 50), dtype=bool)
    lines[:, [17, 33]] = True
    lines[[17, 33], :] = True
    np.testing.assert_array_equal(changed(out), lines)
    assert (np.asarray(out)[lines] == 255).all()
    faint = np.asarray(rendering.grid_overlay(gray(50), (3, 3))).astype(int)  # default: translucent white
    assert GRAY < faint[17, 5, 0] < 255 and faint[5, 5, 0] == GRAY


def test_region_overlay_tints_only_the_region_cells():
    weights = np.zeros((3, 3))
    weights[1, 2] = 1.0
    np.testing.assert_array_equal(changed(rendering.region_overlay(gray(), weights)),
                                  block((60, 60), (20, 40), (40, 60)))


def test_colormap_runs_dark_to_bright():
    colours = rendering.colormap(np.array([0.0, 0.5, 1.0])).astype(int).sum(axis=1)
    assert colours[0] < colours[1] < colours[2]
