"""The native kernel: how a query is laid out for it, its inputs checks, its threads, and how it is built."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch

from cache_builder.cache_format import encode_features
from dashboard import scoring
from dashboard.region_query import RegionQuery
from dashboard.scoring import kernel as search_kernel
from dashboard.scoring import score_windows
from dashboard.scoring.kernel import KernelQuery, KernelUnavailable, load_kernel
from dashboard.search import SearchRequest, search_regions


def kernel_query(weights: np.ndarray, channels: int = 4, grid: tuple[int, int] = (5, 6)) -> KernelQuery:
    rng = np.random.default_rng(0)
    features = np.abs(rng.normal(size=(*grid, channels))).astype(np.float32) + 0.1
    query = RegionQuery.from_grid_mask(features, weights.astype(np.float32))
    return KernelQuery.build(query.features, query.weights, query.grid, query.norm)


def test_each_mask_row_is_one_run_of_contiguous_cells():
    weights = np.zeros((5, 6))
    weights[1:4, 2:5] = 1
    prepared = kernel_query(weights)
    assert list(prepared.term_offsets) == [0, 6, 12]  # rows of the box, relative to the window's corner
    assert list(prepared.term_lengths) == [3 * 4] * 3
    assert list(prepared.term_starts) == [0, 12, 24]
    assert (prepared.out_h, prepared.out_w) == (3, 4)
    assert len(prepared.cell_offsets) == 9


def test_a_whole_width_box_is_a_single_run_and_holes_stay_inside_runs():
    weights = np.zeros((5, 6))
    weights[1:3, :] = 1
    assert list(kernel_query(weights).term_lengths) == [2 * 6 * 4]
    holes = np.zeros((5, 6))
    holes[0, [0, 3]] = 1  # one row, two cells apart: one run of 4 cells, the middle ones weighted 0
    prepared = kernel_query(holes)
    assert list(prepared.term_lengths) == [4 * 4] and len(prepared.cell_offsets) == 2
    assert not prepared.term_bits[4:12].any()


def test_soft_weights_add_a_remainder_run_only_where_bfloat16_is_inexact():
    binary = kernel_query(np.pad(np.ones((2, 2)), ((0, 3), (0, 4))))
    assert len(binary.term_offsets) == 2
    soft = kernel_query(np.pad(np.full((2, 2), 0.3), ((0, 3), (0, 4))))
    assert len(soft.term_offsets) == 4 and list(soft.term_offsets) == [0, 6, 0, 6]
    high = torch.from_numpy(soft.term_bits[:16].view(np.int16)).view(torch.bfloat16).double()
    low = torch.from_numpy(soft.term_bits[16:].view(np.int16)).view(torch.bfloat16).double()
    exact = soft.cell_vectors.reshape(-1).astype(np.float64)
    assert np.abs((high + low).numpy() - exact).max() <= np.abs(exact).max() * 2.0 ** -16
    assert np.abs(high.numpy() - exact).max() > np.abs(exact).max() * 2.0 ** -12  # the remainder mattered


@pytest.fixture(scope="module")
def wide_cache():
    """1,100 images 4x5x40: enough for the kernel to split the work over threads."""
    rng = np.random.default_rng(4)
    bits, sqnorms = encode_features(np.maximum(rng.normal(size=(1100, 4, 5, 40)), 0).astype(np.float32))
    return torch.from_numpy(bits).view(torch.bfloat16), sqnorms


RUNNABLE = [v for v in search_kernel.VARIANTS if not search_kernel.missing_cpu_flags(v)]


@pytest.mark.parametrize("variant", RUNNABLE)
def test_threads_split_the_work_without_changing_a_bit(wide_cache, variant):
    features, sqnorms = wide_cache
    query = RegionQuery.from_grid_mask(features[7].float().numpy(), np.pad(np.ones((2, 3)), ((1, 1), (1, 1))))
    prepared = KernelQuery.build(query.features, query.weights, query.grid, query.norm)
    kernel = load_kernel(variant)
    one = kernel.score(prepared, features, sqnorms, None, threads=1)
    ids = np.sort(np.random.default_rng(1).choice(len(features), 900, replace=False))
    for threads in (2, 3):
        scores, windows, _ = kernel.score(prepared, features, sqnorms, None, threads=threads)
        np.testing.assert_array_equal(scores, one[0])
        np.testing.assert_array_equal(windows, one[1])
        part_scores, part_windows, _ = kernel.score(prepared, features, sqnorms, ids, threads=threads)
        np.testing.assert_array_equal(part_scores, one[0][ids])
        np.testing.assert_array_equal(part_windows, one[1][ids])
    assert one[0][7] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("variant", RUNNABLE)
def test_every_window_score_is_reported_and_the_best_is_the_first_maximum(wide_cache, variant):
    features, sqnorms = wide_cache
    zeros = torch.zeros_like(features[:2])  # all-zero images: every window scores 0, the first one is best
    features = torch.cat([features[:3], zeros])
    sqnorms = np.concatenate([sqnorms[:3], np.zeros_like(sqnorms[:2])])
    query = RegionQuery.from_grid_mask(features[1].float().numpy(), np.pad(np.ones((1, 2)), ((2, 1), (1, 2))))
    prepared = KernelQuery.build(query.features, query.weights, query.grid, query.norm)
    scores, windows, every = load_kernel(variant).score(prepared, features, sqnorms, None, with_all=True)
    assert every.shape == (5, 4 * 4)
    np.testing.assert_array_equal(scores, every.max(axis=1))
    np.testing.assert_array_equal(windows, every.argmax(axis=1))
    assert list(scores[3:]) == [0.0, 0.0] and list(windows[3:]) == [0, 0]


@pytest.mark.parametrize("change", ["dtype", "shape", "layout", "sqnorms"])
def test_inputs_the_kernel_cannot_read_safely_are_refused(wide_cache, change):
    features, sqnorms = wide_cache
    query = RegionQuery.from_grid_mask(features[0].float().numpy(), np.ones((4, 5)))
    prepared = KernelQuery.build(query.features, query.weights, query.grid, query.norm)
    if change == "dtype":
        features = features.float()
    elif change == "shape":
        features = features[:, :, :4]
    elif change == "layout":
        features = features.transpose(1, 2)
    else:
        sqnorms = sqnorms[:, :, :4]
    with pytest.raises(ValueError, match="contiguous"):
        load_kernel().score(prepared, features, sqnorms, None)


# ---------------------------------------------------------------------------------------------- building


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """No kernel loaded in this process yet, and an empty kernel folder."""
    monkeypatch.setattr(search_kernel, "_LOADED", {})
    monkeypatch.setenv("VFS_KERNEL_DIR", str(tmp_path / "kernels"))
    return tmp_path / "kernels"


def test_the_kernel_is_built_once_and_then_loaded_from_its_folder(fresh_build, monkeypatch):
    kernel = load_kernel(search_kernel.best_variant())
    assert kernel.path.parent == fresh_build and kernel.path.is_file()
    assert kernel.isa in ("avx512-bf16", "avx2+fma", "portable float32")
    monkeypatch.setattr(search_kernel, "_LOADED", {})
    compiled = []
    real_run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda command, **kw: (compiled.append(command), real_run(command, **kw))[1])
    assert load_kernel(search_kernel.best_variant()).path == kernel.path
    assert all("-shared" not in command for command in compiled)  # only `cc --version`, no second build


def test_without_a_compiler_searches_fall_back_to_torch(fresh_build, monkeypatch, small_cache, caplog):
    request = SearchRequest(cache=small_cache, image_id=5, weights=np.pad(np.ones((2, 2)), ((1, 2), (2, 2))), k=5)
    native = search_regions(request)
    assert native.backend == "native"
    monkeypatch.setattr(search_kernel, "_LOADED", {})  # a new process on a machine without a compiler
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(fresh_build / "empty"))
    with pytest.raises(KernelUnavailable, match="no C compiler"):
        load_kernel()
    assert scoring.engine_status().startswith("torch fallback (no C compiler")
    scoring._warn_fallback_once.cache_clear()
    with caplog.at_level("WARNING"):
        assert scoring.get_scorer().name == "torch"
        fallback = search_regions(request)
    assert "slower torch path" in caplog.text and fallback.backend == "torch"
    with pytest.raises(scoring.QueryError, match="'native' cannot run here: no C compiler"):
        scoring.get_scorer("native")  # asked for by name, it must run: no silent fallback
    assert list(fallback.hits["id"]) == list(native.hits["id"])
    np.testing.assert_allclose(fallback.hits["score"], native.hits["score"], atol=2.0 ** -7)


def test_a_compiler_that_fails_is_reported_not_raised_mid_search(fresh_build, monkeypatch, small_cache):
    monkeypatch.setenv("CC", "false")  # exits 1 for every command, like a broken toolchain
    with pytest.raises(KernelUnavailable, match="did not compile"):
        load_kernel()
    query = RegionQuery.from_grid_mask(small_cache.image_features(1), np.ones((5, 6)))
    found = score_windows(small_cache.features(), small_cache.sqnorms, query)
    assert found.scores[1] == pytest.approx(1.0, abs=2.0 ** -7)
    assert not list(fresh_build.glob("*.so"))


@pytest.mark.parametrize("variant", RUNNABLE)
def test_the_streaming_read_reads_every_byte(variant):
    data = np.random.default_rng(2).integers(0, 2**63, size=100_003, dtype=np.int64).view(np.uint8)
    expected = 0
    whole = data[: len(data) // 32 * 32].view(np.uint64).reshape(-1, 4)
    for lane in np.bitwise_xor.reduce(whole, axis=0):
        expected ^= int(lane)
    tail = int(np.bitwise_xor.reduce(data[len(data) // 32 * 32:].astype(np.uint64)))
    kernel = load_kernel(variant)
    assert kernel.read_bytes(data, threads=1) == expected ^ tail
    changed = data.copy()
    changed[12345] ^= 1
    assert kernel.read_bytes(changed, threads=1) != kernel.read_bytes(data, threads=1)
