from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import reference_scores
from dashboard import search
from cache_builder.cache_format import encode_features
from dashboard.metadata import MetadataFilter
from dashboard.search import QueryError, RegionQuery, box_mask, mask_to_grid, rank, score_windows, search_cache

# The native kernel multiplies the stored bfloat16 values exactly and accumulates in float32 (soft weights carry a
# bfloat16 remainder term), so it agrees with float64 to float32 noise. The torch fallback's bfloat16 GEMM rounds
# each per-cell dot product (and, for a whole-grid box, the weighted query) to 8 significant bits; by
# Cauchy-Schwarz each rounding costs at most 2^-9 in score units, so two of them plus float32 noise stay < 2^-7.
TOLERANCE = {"native": 2.0 ** -16, "portable": 2.0 ** -16, "torch": 2.0 ** -7}
SCORE_TOL = max(TOLERANCE.values())


def stored(features: np.ndarray) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """What the cache holds for `features`: bf16 tensor, sqnorms, and the rounded values as float64."""
    bits, sqnorms = encode_features(features)
    tensor = torch.from_numpy(bits).view(torch.bfloat16)
    return tensor, sqnorms, tensor.double().numpy()


@st.composite
def search_case(draw):
    n = draw(st.integers(1, 9))
    grid_h, grid_w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    # few channels, and counts around the kernel's 32- and 64-value steps (masked tails)
    channels = draw(st.one_of(st.integers(1, 24), st.sampled_from([31, 32, 33, 63, 64, 65, 112, 130])))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, grid_h, grid_w, channels)).astype(np.float32)
    if draw(st.booleans()):
        features = np.maximum(features, 0)  # post-ReLU maps have exact zeros
    kind = draw(st.sampled_from(["cell", "full", "box", "soft"]))
    mask = np.zeros((grid_h, grid_w), dtype=np.float32)
    if kind == "cell":
        mask[rng.integers(grid_h), rng.integers(grid_w)] = 1
    elif kind == "full":
        mask[:] = 1
    else:
        y0, x0 = rng.integers(grid_h), rng.integers(grid_w)
        y1, x1 = rng.integers(y0, grid_h) + 1, rng.integers(x0, grid_w) + 1
        mask[y0:y1, x0:x1] = rng.uniform(0.05, 1, size=(y1 - y0, x1 - x0)) if kind == "soft" else 1
    query_image = rng.normal(size=(grid_h, grid_w, channels)).astype(np.float32)
    return features, query_image, mask


@pytest.mark.parametrize("backend", search.BACKENDS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=search_case())
def test_engine_matches_float64_reference(backend, case):
    features, query_image, mask = case
    tol = TOLERANCE[backend]
    tensor, sqnorms, exact = stored(features)
    try:
        query = RegionQuery.from_grid_mask(query_image, mask)
    except QueryError:
        return  # all-zero masked query: no direction to compare against
    expected = reference_scores(exact, query.features.astype(np.float64), query.weights.astype(np.float64))
    found = score_windows(tensor, sqnorms, query, backend=backend)
    best = expected.reshape(len(features), -1).max(axis=1)
    np.testing.assert_allclose(found.scores, best, atol=tol, rtol=0)
    # the reported window scores (within precision) as well as the best one
    chosen = expected.reshape(len(features), -1)[np.arange(len(features)), found.position]
    np.testing.assert_allclose(chosen, best, atol=2 * tol, rtol=0)
    # top-k agrees wherever scores are not tied within precision
    k = min(3, len(features))
    top = rank(found.scores, found.ids, k)
    kth_best = np.sort(best)[::-1][k - 1]
    assert np.all(best[top] >= kth_best - 2 * tol)
    # every window's score, as the heat map shows it
    heat = search.window_score_map(tensor, sqnorms, query, len(features) - 1, backend=backend)
    np.testing.assert_allclose(heat.reshape(-1), expected[-1].reshape(-1), atol=tol, rtol=0)


def test_own_region_scores_one_at_its_own_place(small_cache):
    image_id = 13
    features = small_cache.image_features(image_id)
    mask = np.zeros(features.shape[:2], dtype=np.float32)
    mask[1:3, 2:5] = 1
    result = search_cache(small_cache, RegionQuery.from_grid_mask(features, mask), k=5)
    top = result.hits.iloc[0]
    assert top["id"] == image_id
    assert top["score"] == pytest.approx(1.0, abs=SCORE_TOL)
    assert (top["row"], top["col"], top["height"], top["width"]) == (1, 2, 2, 3)


@pytest.mark.parametrize("backend", search.BACKENDS)
def test_candidate_subset_scores_equal_full_search(small_cache, monkeypatch, backend):
    features = small_cache.image_features(3)
    query = RegionQuery.from_grid_mask(features, np.pad(np.ones((2, 2)), ((1, 2), (1, 3))))
    full = score_windows(small_cache.features(), small_cache.sqnorms, query, backend=backend)
    subset = np.array([0, 5, 6, 17, 39])
    monkeypatch.setattr(search, "GATHER_CHUNK_BYTES", 1)  # torch: one image per chunk, exercises the chunk loop
    part = score_windows(small_cache.features(), small_cache.sqnorms, query, subset, backend=backend)
    np.testing.assert_array_equal(part.ids, subset)
    np.testing.assert_allclose(part.scores, full.scores[subset], atol=1e-6)
    np.testing.assert_array_equal(part.position, full.position[subset])


@pytest.mark.parametrize("ids", [np.array([0, 40]), np.array([-1]), np.array([2**40])])
@pytest.mark.parametrize("backend", search.BACKENDS)
def test_candidate_ids_outside_the_cache_are_refused(small_cache, backend, ids):
    """The kernel reads raw memory at each id: an id from a stale filter or a hostile caller must not reach it."""
    query = RegionQuery.from_grid_mask(small_cache.image_features(0), np.ones((5, 6)))
    with pytest.raises(IndexError, match="0..39"):
        score_windows(small_cache.features(), small_cache.sqnorms, query, ids, backend=backend)


def test_an_unknown_backend_is_a_clear_error(small_cache, monkeypatch):
    monkeypatch.setenv("VFS_SEARCH_BACKEND", "gpu")
    query = RegionQuery.from_grid_mask(small_cache.image_features(0), np.ones((5, 6)))
    with pytest.raises(QueryError, match="VFS_SEARCH_BACKEND must be one of native, portable, torch"):
        search_cache(small_cache, query)


def test_rank_breaks_ties_by_id_and_keeps_one_per_group():
    scores = np.array([0.5, 0.9, 0.9, 0.1, 0.9], dtype=np.float32)
    ids = np.array([10, 4, 2, 7, 3])
    assert list(ids[rank(scores, ids, 3)]) == [2, 3, 4]
    groups = np.array([0, 1, 1, 2, 1])
    assert list(ids[rank(scores, ids, 5, groups)]) == [2, 10, 7]


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


def test_empty_mask_is_refused(small_cache):
    features = small_cache.image_features(0)
    with pytest.raises(QueryError, match="empty"):
        RegionQuery.from_mask(features, np.zeros((48, 48), dtype=bool))


def test_wrong_size_mask_is_refused(small_cache):
    features = small_cache.image_features(0)
    with pytest.raises(QueryError, match="48x48"):
        search.query_from_mask(features, np.ones((30, 40), dtype=bool), display_size=48)


@pytest.mark.parametrize("k", [0, -3])
def test_k_must_be_positive(small_cache, k):
    query = RegionQuery.from_grid_mask(small_cache.image_features(0), np.ones((5, 6)))
    with pytest.raises(QueryError, match="k must be"):
        search_cache(small_cache, query, k=k)


def test_k_larger_than_candidates_returns_all_of_them(small_cache):
    query = RegionQuery.from_grid_mask(small_cache.image_features(0), np.ones((5, 6)))
    result = search_cache(small_cache, query, k=1000, flt=MetadataFilter(equals={"domain": ["out"]}))
    assert len(result.hits) == 15 and result.searched_count == 15
    assert set(result.hits["domain"]) == {"out"}
    assert list(result.hits["rank"]) == list(range(1, 16))


def test_empty_candidate_set_gives_no_hits(small_cache):
    query = RegionQuery.from_grid_mask(small_cache.image_features(0), np.ones((5, 6)))
    result = search_cache(small_cache, query, k=5, flt=MetadataFilter(equals={"label": ["no such label"]}))
    assert result.hits.empty and result.searched_count == 0
    assert list(result.hits.columns[:12]) == search.HIT_COLUMNS


def test_exclude_query_and_best_per_group(small_cache):
    features = small_cache.image_features(8)
    query = RegionQuery.from_grid_mask(features, np.ones((5, 6)))
    result = search_cache(small_cache, query, k=10, exclude_id=8, per_group="location")
    assert 8 not in set(result.hits["id"])
    assert len(result.hits) == 5 and result.hits["location"].is_unique
    assert result.hits["score"].is_monotonic_decreasing
    assert result.searched_count == small_cache.size - 1


def test_hits_carry_display_windows_and_metadata(small_cache):
    features = small_cache.image_features(2)
    mask = np.zeros((48, 48), dtype=bool)
    mask[8:24, 16:32] = True  # on a 5x6 grid of a 48-px image (cells of 9.6 x 8 px)
    query = search.query_from_mask(features, mask, display_size=48)
    hits = search_cache(small_cache, query, k=3).hits
    first = hits.iloc[0]
    cell_h, cell_w = 48 / 5, 48 / 6
    assert first["y0"] == round(first["row"] * cell_h)
    assert first["x1"] == round((first["col"] + first["width"]) * cell_w)
    assert {"label", "domain", "location", "age", "diagnoses", "path"} <= set(hits.columns)


def test_query_grid_must_match_cache(small_cache):
    query = RegionQuery.from_grid_mask(np.ones((4, 4, 16), dtype=np.float32), np.ones((4, 4)))
    with pytest.raises(QueryError, match="grid"):
        search_cache(small_cache, query)


def test_window_score_map_peaks_at_the_reported_window(small_cache):
    features = small_cache.image_features(21)
    mask = np.zeros((5, 6))
    mask[2:4, 1:3] = 1
    query = RegionQuery.from_grid_mask(features, mask)
    heat = search.window_score_map(small_cache.features(), small_cache.sqnorms, query, 21)
    assert heat.shape == (4, 5)
    assert heat[2, 1] == pytest.approx(1.0, abs=SCORE_TOL) and heat.argmax() == 2 * 5 + 1
    found = score_windows(small_cache.features(), small_cache.sqnorms, query, np.array([4]))
    other = search.window_score_map(small_cache.features(), small_cache.sqnorms, query, 4)
    assert other.max() == pytest.approx(found.scores[0]) and other.argmax() == found.position[0]
