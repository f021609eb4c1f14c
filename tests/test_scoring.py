"""Every scoring backend against the float64 formula, and what the registry promises (dashboard.scoring)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache_builder import cache_format as fmt
from cache_builder.cache_format import encode_features
from conftest import reference_scores
from dashboard import scoring
from dashboard.geometry import QueryError
from dashboard.region_query import RegionQuery
from dashboard.scoring import score_windows, window_score_maps
from dashboard.search import rank

# The native kernel multiplies the stored bfloat16 values exactly and accumulates in float32 (soft weights carry a
# bfloat16 remainder term), so it agrees with float64 to float32 noise. The torch fallback's bfloat16 GEMM rounds
# each per-cell dot product (and, for a whole-grid box, the weighted query) to 8 significant bits; by
# Cauchy-Schwarz each rounding costs at most 2^-9 in score units, so two of them plus float32 noise stay < 2^-7.
TOLERANCE = {"native": 2.0 ** -16, "avx512-bf16": 2.0 ** -16, "avx2": 2.0 ** -16, "neon": 2.0 ** -16,
             "portable": 2.0 ** -16, "torch": 2.0 ** -7}
BACKENDS = scoring.runnable_scorers()  # every path this CPU runs: an AVX-512 machine tests the AVX2 path too
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


@pytest.mark.parametrize("backend", BACKENDS)
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
    heat = window_score_maps(tensor, sqnorms, query, [len(features) - 1], backend=backend)[0]
    np.testing.assert_allclose(heat.reshape(-1), expected[-1].reshape(-1), atol=tol, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_candidate_subset_scores_equal_full_search(small_cache, monkeypatch, backend):
    features = small_cache.image_features(3)
    query = RegionQuery.from_grid_mask(features, np.pad(np.ones((2, 2)), ((1, 2), (1, 3))))
    full = score_windows(small_cache.features(), small_cache.sqnorms, query, backend=backend)
    subset = np.array([0, 5, 6, 17, 39])
    monkeypatch.setattr(scoring.torch_path, "GATHER_CHUNK_BYTES", 1)  # torch: one image per chunk, loops over chunks
    part = score_windows(small_cache.features(), small_cache.sqnorms, query, subset, backend=backend)
    np.testing.assert_array_equal(part.ids, subset)
    np.testing.assert_allclose(part.scores, full.scores[subset], atol=1e-6)
    np.testing.assert_array_equal(part.position, full.position[subset])


@pytest.mark.parametrize("ids", [np.array([0, 40]), np.array([-1]), np.array([2**40])])
@pytest.mark.parametrize("backend", BACKENDS)
def test_candidate_ids_outside_the_cache_are_refused(small_cache, backend, ids):
    """The kernel reads raw memory at each id: an id from a stale filter or a hostile caller must not reach it."""
    query = RegionQuery.from_grid_mask(small_cache.image_features(0), np.ones((5, 6)))
    with pytest.raises(IndexError, match="0..39"):
        score_windows(small_cache.features(), small_cache.sqnorms, query, ids, backend=backend)


def test_window_score_map_peaks_at_the_reported_window(small_cache):
    features = small_cache.image_features(21)
    mask = np.zeros((5, 6))
    mask[2:4, 1:3] = 1
    query = RegionQuery.from_grid_mask(features, mask)
    heat = window_score_maps(small_cache.features(), small_cache.sqnorms, query, [21])[0]
    assert heat.shape == (4, 5)
    assert heat[2, 1] == pytest.approx(1.0, abs=SCORE_TOL) and heat.argmax() == 2 * 5 + 1
    found = score_windows(small_cache.features(), small_cache.sqnorms, query, np.array([4]))
    other = window_score_maps(small_cache.features(), small_cache.sqnorms, query, [4])[0]
    assert other.max() == pytest.approx(found.scores[0]) and other.argmax() == found.position[0]


def test_an_unknown_backend_is_a_clear_error_with_a_suggestion(monkeypatch):
    monkeypatch.setenv("VFS_SEARCH_BACKEND", "portabel")
    with pytest.raises(QueryError, match="VFS_SEARCH_BACKEND must be one of native, avx512-bf16, avx2, neon, "
                                         "portable, torch.*'portable'"):
        scoring.get_scorer()
    with pytest.raises(QueryError, match="backend must be one of"):
        scoring.get_scorer("gpu")


@pytest.mark.parametrize("name", BACKENDS)
def test_every_registered_scorer_is_found_by_its_name(name, monkeypatch):
    assert scoring.get_scorer(name).name == name
    monkeypatch.setenv("VFS_SEARCH_BACKEND", name)
    assert scoring.get_scorer().name == name


def test_maps_of_several_images_come_from_one_prepared_query(small_cache, monkeypatch):
    query = RegionQuery.from_grid_mask(small_cache.image_features(5), np.pad(np.ones((2, 2)), ((1, 2), (2, 2))))
    prepared = []
    original = scoring.prepare
    monkeypatch.setattr(scoring, "prepare", lambda *a, **k: prepared.append(1) or original(*a, **k))
    maps = window_score_maps(small_cache.features(), small_cache.sqnorms, query, [3, 5, 9])
    assert len(prepared) == 1 and maps.shape == (3, 4, 5)
    assert maps[1].max() == pytest.approx(1.0, abs=SCORE_TOL)  # image 5 is the query


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_window_mostly_on_padding_cannot_be_the_best(backend):
    """Image 1 is letterboxed (picture in columns 2..4): the window at column 0 matches the query's strong cell
    with its only picture cell, but two thirds of the region's weight would lie on padding."""
    rng = np.random.default_rng(11)
    query_map = np.zeros((3, 5, 8), dtype=np.float32)
    query_map[1, 0:2] = 0.01  # faint cells
    query_map[1, 2] = rng.random(8) + 1  # the strong one
    features = np.abs(rng.normal(size=(2, 3, 5, 8))).astype(np.float32)
    features[1, :, :2] = 0  # padding holds zeros, as the builder stores it
    features[1, 1, 2] = query_map[1, 2]
    tensor, sqnorms, _ = stored(features)
    weights = np.zeros((3, 5), dtype=np.float32)
    weights[1, 0:3] = 1
    query = RegionQuery.from_grid_mask(query_map, weights)
    content = np.array([[0, 0, 3, 5], [0, 2, 3, 5]])
    raw = score_windows(tensor, sqnorms, query, backend=backend)
    assert divmod(int(raw.position[1]), raw.windows_per_row) == (1, 0) and raw.scores[1] > 0.99  # without the rule
    kept = score_windows(tensor, sqnorms, query, backend=backend, content=content)
    row, col = divmod(int(kept.position[1]), kept.windows_per_row)
    assert (row, col) != (1, 0) and scoring.picture_share(query, content[1:])[0, row, col] >= 0.5
    maps = window_score_maps(tensor, sqnorms, query, [1], backend=backend)[0]
    assert kept.scores[1] == maps[row, col]
    assert kept.scores[0] == raw.scores[0] and kept.position[0] == raw.position[0]  # no padding, no change


def test_picture_share_counts_the_regions_weight_on_the_picture():
    weights = np.array([[1.0, 0.5], [0.0, 1.0]], dtype=np.float32)
    query = RegionQuery.from_grid_mask(np.ones((3, 4, 2), dtype=np.float32), np.pad(weights, ((0, 1), (0, 2))))
    share = scoring.picture_share(query, np.array([[0, 1, 3, 4]]))  # column 0 is padding
    total = 1 + 0.25 + 1
    assert share.shape == (1, 2, 3)
    assert share[0, 0, 0] == pytest.approx((0.25 + 1) / total) and share[0, 0, 1] == pytest.approx(1)


@pytest.mark.parametrize("flags, expected", [
    ({"avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "avx2", "fma"}, "avx512-bf16"),
    ({"avx512f", "avx512bw", "avx512_bf16", "avx2", "fma"}, "avx2"),  # BF16 without VNNI (no such CPU known)
    ({"avx2", "fma", "avx512f"}, "avx2"),  # AVX-512 without BF16: the AVX2 path
    ({"sse4_2"}, "portable"),
    ({"fp", "asimd"}, "neon"),  # 64-bit ARM's Features line
])
def test_native_picks_the_best_path_the_cpus_flags_allow(flags, expected, monkeypatch):
    from dashboard.scoring import kernel

    monkeypatch.setattr(kernel, "cpu_flags", lambda: frozenset(flags))
    assert kernel.best_variant() == expected


def test_the_benchmarks_name_the_flags_that_choose_a_path(monkeypatch):
    from dashboard.scoring import kernel

    monkeypatch.setattr(kernel, "cpu_flags", lambda: frozenset({"fma", "sse4_2", "avx2", "amx_tile", "avx512f"}))
    assert kernel.path_flags() == "avx2 avx512f fma"  # sorted; flags no path reads are left out


def test_a_path_the_cpu_lacks_is_refused_by_name_and_skipped_by_native(monkeypatch):
    from dashboard.scoring import kernel

    monkeypatch.setattr(kernel, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    with pytest.raises(QueryError, match="lacks avx512f, avx512bw, avx512_bf16"):
        scoring.get_scorer("avx512-bf16")
    assert scoring.get_scorer("native").kernel().isa == "avx2+fma"
    monkeypatch.setattr(kernel, "cpu_flags", lambda: frozenset())
    assert scoring.get_scorer("native").kernel().isa == "portable float32"


# ---------------------------------------------------------------------------------------------- first stage

def code_index(rng, n: int, grid: tuple[int, int], channels: int, dims: int) -> fmt.FirstStageIndex:
    """A first-stage index of random 4-bit codes over an orthonormal basis (what `build_index` writes)."""
    basis = np.linalg.qr(rng.normal(size=(channels, dims)))[0].astype(np.float32) if dims <= channels else \
        np.pad(np.linalg.qr(rng.normal(size=(channels, channels)))[0], ((0, 0), (0, dims - channels))).astype(
            np.float32)
    levels = rng.integers(0, 16, size=(n, *grid, dims), dtype=np.uint8)
    return fmt.FirstStageIndex(dims=dims, basis=basis, steps=rng.uniform(0.05, 0.5, dims).astype(np.float32),
                               means=rng.normal(size=dims).astype(np.float32), codes=fmt.pack_codes(levels),
                               energy=1.0, built_s=0.0, info={})


def first_stage_reference(index: fmt.FirstStageIndex, sqnorms: np.ndarray, query: RegionQuery) -> np.ndarray:
    """(N, windows) in float64: the formula with numerators on the codes' values and the exact squared norms."""
    values = index.values(np.asarray(index.codes)).astype(np.float64)
    projected = query.features.astype(np.float64) @ index.basis.astype(np.float64)
    weights = query.weights.astype(np.float64) ** 2
    h, w = weights.shape
    n, grid_h, grid_w, _ = values.shape
    out = np.zeros((n, grid_h - h + 1, grid_w - w + 1))
    for y in range(grid_h - h + 1):
        for x in range(grid_w - w + 1):
            numerator = np.einsum("nhwd,hwd->n", values[:, y:y + h, x:x + w], weights[..., None] * projected)
            denominator = np.sqrt((sqnorms[:, y:y + h, x:x + w] * weights).sum(axis=(1, 2))) * query.norm
            out[:, y, x] = np.clip(np.where(denominator > 0, numerator / np.maximum(denominator, 1e-30), 0), -1, 1)
    return out.reshape(n, -1)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), n=st.integers(1, 9), grid=st.tuples(st.integers(1, 6), st.integers(1, 6)),
       dims=st.sampled_from([32, 64, 96, 160]), soft=st.booleans(), data=st.data())
def test_first_stage_scores_are_the_formula_on_the_codes_values(seed, n, grid, dims, soft, data):
    """Every native path gives the same first-stage scores (exact integer dot products), within the int8 rounding
    of the query of the formula on what the codes stand for; the torch fallback within bfloat16 of it. (The
    harness in test_kernel_paths checks each path's integers exactly.)"""
    rng = np.random.default_rng(seed)
    channels = data.draw(st.sampled_from([dims // 2, dims, dims + 7]))
    index = code_index(rng, n, grid, channels, dims)
    sqnorms = rng.uniform(0.5, 30.0, size=(n, *grid)).astype(np.float32)
    h, w = data.draw(st.integers(1, grid[0])), data.draw(st.integers(1, grid[1]))
    mask = np.zeros(grid, np.float32)
    mask[:h, :w] = rng.uniform(0.1, 1.0, size=(h, w)) if soft else 1.0
    query = RegionQuery.from_grid_mask(rng.normal(size=(*grid, channels)).astype(np.float32), mask)
    expected = first_stage_reference(index, sqnorms, query)
    ids = np.sort(rng.choice(n, data.draw(st.integers(1, n)), replace=False))
    native = [b for b in BACKENDS if b != "torch"]
    results = {b: scoring.score_codes(index, sqnorms, query, ids, backend=b) for b in BACKENDS}
    # the int8 query is off by at most half its step per value, each value times a level of at most 7.5
    values = query.weights[..., None].astype(np.float64) ** 2 * (query.features @ index.basis) * index.steps
    step = np.abs(values).max() / 127
    smallest = np.sqrt(sqnorms.min() * (query.weights.astype(np.float64) ** 2).sum()) * query.norm
    bound = 0.5 * step * 7.5 * values.size / smallest + 1e-5
    for backend, found in results.items():
        best = expected[ids].max(axis=1)
        np.testing.assert_allclose(found.scores, best, atol=bound + (0.02 if backend == "torch" else 0))
        assert np.array_equal(found.ids, ids)
    for backend in native[1:]:
        assert np.array_equal(results[backend].scores, results[native[0]].scores), backend
        assert np.array_equal(results[backend].position, results[native[0]].position), backend


@pytest.mark.parametrize("grid,dims", [((7, 7), 128), ((14, 14), 64), ((3, 3), 320), ((1, 5), 96)])
def test_a_single_cell_scores_the_same_on_every_native_path(grid, dims):
    """A single-cell mask has a pass of its own on AVX2 (its windows are the cells in order); its scores and best
    windows are those of the generic paths bit for bit, with soft weights, zero norms and every window's score.
    (How close they are to the formula: test_kernel_paths.)"""
    rng = np.random.default_rng(dims)
    n = 40
    native = [b for b in BACKENDS if b != "torch"]
    for soft in (False, True):
        index = code_index(rng, n, grid, dims, dims)
        sqnorms = rng.uniform(0, 30, size=(n, *grid)).astype(np.float32)
        sqnorms[sqnorms < 4] = 0  # all-zero windows score 0
        mask = np.zeros(grid, np.float32)
        mask[grid[0] // 2, grid[1] - 1] = 0.3 if soft else 1.0
        query = RegionQuery.from_grid_mask(rng.normal(size=(*grid, dims)).astype(np.float32), mask)
        found = {b: scoring.score_codes(index, sqnorms, query, backend=b) for b in native}
        kernels = {b: scoring.get_scorer(b).kernel() for b in native}
        maps = {b: k.score_codes(scoring.code_query(index, query, k.code_chunk_bytes), np.asarray(index.codes),
                                 sqnorms, None, with_all=True)[2] for b, k in kernels.items()}
        for backend in native[1:]:
            assert np.array_equal(found[backend].scores, found[native[0]].scores), backend
            assert np.array_equal(found[backend].position, found[native[0]].position), backend
            assert np.array_equal(maps[backend], maps[native[0]]), backend
        assert np.array_equal(maps[native[0]].reshape(n, *grid)[sqnorms == 0], np.zeros(int((sqnorms == 0).sum())))
        assert np.array_equal(maps[native[0]].max(axis=1), found[native[0]].scores)


@pytest.mark.parametrize("grid", [(1, 7), (5, 6), (14, 14)])  # 7, 30 and 196 windows for one cell
def test_the_first_of_tied_best_windows_is_reported_on_every_path(grid):
    """Where windows tie for the best score, every path reports the first (the native kernels search for it 16
    windows at a time on AVX-512), in the exact scan and in the first stage alike."""
    rng = np.random.default_rng(8)
    n, channels = 6, 32
    cell = np.abs(rng.normal(size=channels)).astype(np.float32)
    features = np.tile(cell, (n, *grid, 1)) * rng.uniform(0.2, 0.6, size=(n, *grid, 1)).astype(np.float32)
    features[:, :, :, 0] *= np.linspace(1, 1.5, grid[0] * grid[1]).reshape(grid)  # the others score lower
    best = cell.copy()
    best[0] *= 2.0
    best_cells = [(i * 7) % (grid[0] * grid[1]) for i in range(n)]  # image i: two tied best cells, first here
    for i, first in enumerate(best_cells):
        features[i].reshape(-1, channels)[[first, -1]] = best
    bits, sqnorms = encode_features(features)
    mask = np.zeros(grid, np.float32)
    mask[0, 0] = 1
    query_features = np.broadcast_to(features[0].reshape(-1, channels)[best_cells[0]], (*grid, channels))
    query = RegionQuery.from_grid_mask(np.ascontiguousarray(query_features), mask)
    index = code_index(rng, n, grid, channels, 32)
    levels = np.tile(rng.integers(4, 12, size=32, dtype=np.uint8), (n, *grid, 1))
    aligned = np.where(query.features[0, 0] @ index.basis > 0, 15, 0).astype(np.uint8)  # the best code there is
    for i, first in enumerate(best_cells):
        levels[i].reshape(-1, 32)[[first, -1]] = aligned
    index = dataclasses.replace(index, codes=fmt.pack_codes(levels), means=np.zeros(32, np.float32))
    code_sqnorms = np.full((n, *grid), 1e6, np.float32)  # large: no score clipped at 1
    for backend in BACKENDS:
        exact = score_windows(torch.from_numpy(bits).view(torch.bfloat16), sqnorms, query, backend=backend)
        first = scoring.score_codes(index, code_sqnorms, query, backend=backend)
        assert exact.position.tolist() == best_cells, backend
        if backend != "torch":
            assert first.position.tolist() == best_cells, backend


def test_first_stage_scores_follow_the_codes():
    """Changing one image's codes changes only that image's first-stage score (the kernel reads each row)."""
    rng = np.random.default_rng(4)
    index = code_index(rng, 12, (5, 6), 16, 32)
    sqnorms = rng.uniform(1, 5, size=(12, 5, 6)).astype(np.float32)
    mask = np.zeros((5, 6), np.float32)
    mask[1:3, 2:4] = 1
    query = RegionQuery.from_grid_mask(rng.normal(size=(5, 6, 16)).astype(np.float32), mask)
    before = scoring.score_codes(index, sqnorms, query).scores
    codes = np.array(index.codes)
    codes[5] ^= 0x33
    after = scoring.score_codes(dataclasses.replace(index, codes=codes), sqnorms, query).scores
    assert after[5] != before[5] and np.array_equal(np.delete(after, 5), np.delete(before, 5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_stage_scores_in_parts_equal_one_call_per_part(backend, monkeypatch):
    """Parts queued on the pool at once (the cores go on to the next part while the caller reads one) give each
    part exactly what scoring it alone gives, in the order asked, whatever the parts' sizes (empty included)."""
    monkeypatch.setattr("dashboard.scoring.kernel.MIN_IMAGES_PER_THREAD", 1)  # several slices even for tiny parts
    rng = np.random.default_rng(11)
    n, grid = 60, (4, 5)
    index = code_index(rng, n, grid, 40, 32)
    sqnorms = rng.uniform(0.5, 4.0, size=(n, *grid)).astype(np.float32)
    mask = np.zeros(grid, np.float32)
    mask[1:3, 1:4] = 1
    query = RegionQuery.from_grid_mask(rng.normal(size=(*grid, 40)).astype(np.float32), mask)
    parts = [rng.permutation(n)[:size] for size in (17, 0, 1, 42)]
    found = list(scoring.score_codes_in_parts(index, sqnorms, query, parts, backend))
    assert len(found) == len(parts)
    for ids, part in zip(parts, found):
        alone = scoring.score_codes(index, sqnorms, query, ids, backend=backend)
        assert np.array_equal(part.ids, ids)
        assert np.array_equal(part.scores, alone.scores) and np.array_equal(part.position, alone.position)


def test_first_stage_parts_refuse_ids_outside_the_index():
    rng = np.random.default_rng(12)
    index = code_index(rng, 8, (3, 3), 32, 32)
    sqnorms = np.ones((8, 3, 3), np.float32)
    query = RegionQuery.from_grid_mask(rng.normal(size=(3, 3, 32)).astype(np.float32), np.ones((3, 3), np.float32))
    with pytest.raises(IndexError):
        list(scoring.score_codes_in_parts(index, sqnorms, query, [np.arange(4), np.array([3, 8])]))


@pytest.mark.parametrize("n, count, kind", [(300_000, 1500, "normal"), (300_000, 1500, "ties"),
                                            (300_000, 1500, "sorted"), (300_000, 1500, "hidden"),
                                            (300_000, 15_000, "normal"), (300_000, 15_000, "sampled"),
                                            (250, 10, "normal"), (50, 50, "normal"),
                                            (50, 80, "normal"), (400_000, 0, "normal")])
def test_best_positions_are_the_highest_scores(n, count, kind):
    """The positions of the `count` highest scores, each once, whatever the spread: many ties, scores in order,
    the best ones where a strided sample never looks, or only where it looks (then its threshold lets too few
    through, and all the scores are partitioned)."""
    rng = np.random.default_rng(n + count)
    scores = rng.standard_normal(n).astype(np.float32)
    if kind == "ties":
        scores = np.round(scores, 1)
    elif kind == "sorted":
        scores = np.sort(scores)
    elif kind == "hidden":  # the best ones all off the sample's stride
        scores[:] = 0.0
        hidden = np.setdiff1d(np.arange(n), np.arange(0, n, n // 20_000))[:count * 2]
        scores[hidden] = 1.0 + rng.random(len(hidden)).astype(np.float32)
    elif kind == "sampled":  # the sample holds the best ones, fewer than asked for: too few pass its threshold
        scores *= 0.1
        scores[::n // 20_000] = 1.0 + rng.random(len(scores[::n // 20_000])).astype(np.float32)
    picked = scoring.best_positions(scores, count)
    assert len(picked) == min(count, n) == len(np.unique(picked))
    expected = np.sort(scores)[::-1][:count]
    assert np.array_equal(np.sort(scores[picked])[::-1], expected)
