"""The measurements behind a next first stage agree with the formulas they stand for: the product-quantised recall
emulation of `benchmarks/first_stage.py` and the fast-scan prototype kernel of `benchmarks/fast_scan.c`."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from cache_builder.cache_format import encode_features
from cache_builder.index import fit_basis
from dashboard import two_tier
from dashboard.region_query import RegionQuery
from dashboard.scoring import score_windows
from dashboard.scoring.kernel import missing_cpu_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import fast_scan  # noqa: E402
import first_stage  # noqa: E402


def test_product_quantised_first_stage_with_exact_tables_scores_lossless_codes_exactly():
    """Cells drawn from 3 vectors: every subspace has at most 3 distinct values, which its 16 centroids hold
    exactly, so the lookups' scores must be the exact search's."""
    rng = np.random.default_rng(0)
    grid, channels = (4, 5), 16
    palette = rng.normal(size=(3, channels)).astype(np.float32)
    values = palette[rng.integers(0, 3, size=(60, *grid))]
    values[:15] = 0  # all-zero images score 0 (and make zero a common value, so every subspace's centroids hold it)
    bits, sqnorms = encode_features(values)
    values = torch.from_numpy(bits).view(torch.bfloat16).float().numpy()  # what the cache stores
    features = torch.from_numpy(bits).view(torch.bfloat16)
    _, _, score = first_stage.product_quantised(values, sqnorms, grid, 4, fit_basis(values.reshape(-1, channels),
                                                                                   channels)[0], table_bits=None)
    soft = np.zeros(grid, np.float32)
    soft[1:3, 2:4] = [[1.0, 0.5], [0.25, 1.0]]
    for mask in [*two_tier.mask_shapes(grid).values(), soft]:
        query = RegionQuery.from_grid_mask(values[20], mask)
        exact = score_windows(features, sqnorms, query)
        found = score(query)
        np.testing.assert_allclose(found.scores, exact.scores[np.argsort(exact.ids)], atol=2e-5)


def test_eight_bit_tables_keep_the_product_quantised_scores_close():
    rng = np.random.default_rng(1)
    grid, channels = (3, 3), 16
    values = np.maximum(rng.normal(size=(50, *grid, channels)), 0).astype(np.float32)
    bits, sqnorms = encode_features(values)
    values = torch.from_numpy(bits).view(torch.bfloat16).float().numpy()
    rotation = fit_basis(values.reshape(-1, channels), channels)[0]
    query = RegionQuery.from_grid_mask(values[0], two_tier.mask_shapes(grid)["3x3"])
    exact_tables = first_stage.product_quantised(values, sqnorms, grid, 8, rotation, table_bits=None)[2](query)
    rounded = first_stage.product_quantised(values, sqnorms, grid, 8, rotation, table_bits=8)[2](query)
    difference = np.abs(rounded.scores - exact_tables.scores)
    assert 0 < difference.max() < 0.01  # rounded, and by little


@pytest.fixture(scope="module")
def prototype():
    if missing_cpu_flags("avx2"):
        pytest.skip("the fast-scan prototype is AVX2 code")
    with ThreadPoolExecutor(2) as pool:
        yield fast_scan.build(), pool


@pytest.mark.parametrize("grid, subquantisers, per_sum", [((7, 7), 2, 1), ((7, 7), 64, 1), ((3, 5), 32, 1),
                                                         ((4, 4), 256, 1), ((7, 7), 64, 4), ((3, 5), 34, 2),
                                                         ((4, 4), 256, 4)])
def test_fast_scan_prototype_matches_the_float64_formula(prototype, grid, subquantisers, per_sum):
    library, pool = prototype
    rng = np.random.default_rng(subquantisers)
    cells = grid[0] * grid[1]
    codes = rng.integers(0, 256, size=(4, cells, subquantisers // 2, fast_scan.BLOCK), dtype=np.uint8)
    norms = rng.uniform(0, 2, size=(4, cells, fast_scan.BLOCK)).astype(np.float32)
    norms[1, :, 9] = 0  # an all-zero image: score 0, first window
    soft = np.zeros(grid, np.float32)
    soft[0:2, 1:3] = [[0.5, 1.0], [1.0, 0.25]]
    for mask in [*two_tier.mask_shapes(grid).values(), soft]:
        query = fast_scan.random_query(mask, subquantisers, rng, per_sum)
        for threads in (1, 2):
            got, got_windows = fast_scan.score(library, query, codes, norms, pool, threads)
            want, want_windows = fast_scan.reference(query, codes, norms)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(got_windows, want_windows)


def test_fast_scan_prototype_sums_the_largest_tables_without_overflow(prototype):
    """256 lookups of 255 a query cell: the most its 16-bit sums hold, and with 4 lookups a sum, tables of 63; more
    sub-quantisers, or 4 lookups a sum over an odd number of pairs, are refused."""
    library, pool = prototype
    grid = (2, 2)
    mask = np.ones(grid, np.float32)
    codes = np.full((1, 4, 128, fast_scan.BLOCK), 0xFF, np.uint8)
    norms = np.ones((1, 4, fast_scan.BLOCK), np.float32)
    query = fast_scan.FastScanQuery(mask, np.full((4, 256, 16), 255, np.uint8), scale=1.0, bias=0.0, norm=1.0)
    got, _ = fast_scan.score(library, query, codes, norms, pool, 1)
    np.testing.assert_allclose(got, 4 * 256 * 255 / 2.0)  # sqrt of 4 cells' unit norms
    four_a_sum = fast_scan.FastScanQuery(mask, np.full((4, 256, 16), 63, np.uint8), 1.0, 0.0, 1.0, per_sum=4)
    got, _ = fast_scan.score(library, four_a_sum, codes, norms, pool, 1)
    np.testing.assert_allclose(got, 4 * 256 * 63 / 2.0)  # four lookups of 63 a byte: 252, no carry
    too_many = fast_scan.FastScanQuery(mask, np.zeros((4, 258, 16), np.uint8), scale=1.0, bias=0.0, norm=1.0)
    with pytest.raises(RuntimeError, match="refused"):
        fast_scan.score(library, too_many, np.zeros((1, 4, 129, fast_scan.BLOCK), np.uint8), norms, pool, 1)
    odd_pairs = fast_scan.FastScanQuery(mask, np.zeros((4, 34, 16), np.uint8), 1.0, 0.0, 1.0, per_sum=4)
    with pytest.raises(RuntimeError, match="refused"):  # four lookups a sum take two whole pairs
        fast_scan.score(library, odd_pairs, np.zeros((1, 4, 17, fast_scan.BLOCK), np.uint8), norms, pool, 1)
