"""Two-tier search (dashboard/two_tier.py through dashboard/search.py): exact hits from a first stage + rerank,
the choice of mode, and every way an index can be unusable."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_builder import cache_format as fmt
from cache_builder.index import build_index
from cache_builder.synthetic import write_array_cache
from dashboard import scoring, two_tier
from dashboard.feature_cache import FeatureCache
from dashboard.geometry import QueryError
from dashboard.metadata import MetadataFilter
from dashboard.search import SearchRequest, search_regions

N, GRID = 400, (5, 6, 96)


def synthetic(seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    spectrum = np.arange(1, GRID[2] + 1, dtype=np.float32) ** -0.5
    return rng.standard_normal((N, *GRID), dtype=np.float32) * spectrum


@pytest.fixture(scope="module")
def indexed(tmp_path_factory) -> FeatureCache:
    path = tmp_path_factory.mktemp("indexed")
    metadata = pd.DataFrame({"group": [f"g{i % 37}" for i in range(N)], "half": ["a" if i < N // 2 else "b"
                                                                                  for i in range(N)]})
    write_array_cache(path, synthetic(), metadata=metadata)
    build_index(path, dims=32)
    return FeatureCache.open(path)


@pytest.fixture
def tiny_ram(monkeypatch):
    """As if the machine had 1 MiB of RAM: `auto` must treat every cache as larger than RAM."""
    monkeypatch.setattr(two_tier, "ram_bytes", lambda: 2**20)


def box(top: int, left: int, h: int, w: int) -> np.ndarray:
    weights = np.zeros(GRID[:2], np.float32)
    weights[top:top + h, left:left + w] = 1
    return weights


def search(cache, **kwargs):
    kwargs.setdefault("image_id", 7)
    kwargs.setdefault("weights", box(1, 1, 2, 3))
    return search_regions(SearchRequest(cache=cache, **kwargs))


@settings(max_examples=15, deadline=None)
@given(top=st.integers(0, 4), left=st.integers(0, 5), h=st.integers(1, 5), w=st.integers(1, 6),
       image_id=st.integers(0, N - 1), depth=st.integers(10, 120))
def test_two_tier_hits_carry_their_exact_scores_and_windows(indexed, top, left, h, w, image_id, depth):
    weights = box(top, left, min(h, GRID[0] - top), min(w, GRID[1] - left))
    result = search(indexed, image_id=image_id, weights=weights, mode="approx", rerank=depth, k=10)
    assert result.mode.mode == "approx" and result.reranked == depth and result.approximate_scores
    exact = scoring.score_windows(indexed.features(), indexed.sqnorms, result.query, result.hits["id"].to_numpy())
    np.testing.assert_allclose(result.hits["score"], exact.scores.round(6), atol=1e-6)
    out_w = exact.windows_per_row
    assert list(result.hits["row"] * out_w + result.hits["col"]) == list(exact.position)
    assert result.hits["score"].is_monotonic_decreasing
    assert len(result.scores) == N  # the first stage scored every image; those scores are the approximate ones


def test_a_rerank_covering_every_candidate_gives_the_exact_answer(indexed):
    for weights in two_tier.mask_shapes(GRID[:2]).values():
        exact = search(indexed, weights=weights, mode="exact", k=25)
        approx = search(indexed, weights=weights, mode="approx", rerank=N, k=25)
        assert approx.mode.mode == "exact"  # reranking everything is an exact scan: it runs as one
        pd.testing.assert_frame_equal(approx.hits, exact.hits)
    estimate = two_tier.estimate_recall(indexed, depth_share=1.0, sample=N, queries=4)
    assert set(estimate.recall.values()) == {1.0}


def test_the_first_stage_finds_most_of_the_exact_top_10(indexed):
    estimate = two_tier.estimate_recall(indexed, depth_share=0.1, sample=N, queries=6)
    assert min(estimate.recall.values()) >= 0.6, estimate  # 32 of 96 dims, 10% reranked; exact would be 1.0
    assert "recall@10" in estimate.summary()


def test_best_per_group_and_filters_hold_in_two_tier_mode(indexed):
    flt = MetadataFilter(equals={"half": ["b"]})
    approx = search(indexed, mode="approx", rerank=60, k=8, per_group="group", flt=flt, exclude_query=True)
    exact = search(indexed, mode="exact", k=8, per_group="group", flt=flt, exclude_query=True)
    assert approx.mode.mode == "approx" and (approx.hits["half"] == "b").all()
    assert approx.hits["group"].is_unique and len(approx.hits) == 8
    assert len(set(approx.hits["id"]) & set(exact.hits["id"])) >= 6
    assert len(approx.scores) == N // 2


def test_a_filter_that_leaves_few_images_runs_exact(indexed):
    flt = MetadataFilter(equals={"group": ["g1", "g2"]})
    result = search(indexed, mode="approx", rerank=30, flt=flt)
    assert result.mode.mode == "exact" and "scored exactly" in result.mode.reason
    assert not result.approximate_scores


def test_auto_is_exact_while_the_cache_fits_in_ram_and_two_tier_beyond(indexed, tiny_ram, monkeypatch):
    assert search(indexed, mode="auto", rerank=40).mode.mode == "approx"
    monkeypatch.setattr(two_tier, "ram_bytes", lambda: 2**40)
    choice = search(indexed, mode="auto", rerank=40).mode
    assert choice.mode == "exact" and "fits in RAM" in choice.reason


@pytest.fixture
def bare_copy(tmp_path) -> FeatureCache:
    write_array_cache(tmp_path, synthetic())
    return FeatureCache.open(tmp_path)


def test_without_an_index_auto_warns_and_runs_exact_and_approx_says_why(bare_copy, tiny_ram):
    result = search(bare_copy, mode="auto", rerank=40)
    assert result.mode.mode == "exact" and "index is missing" in result.mode.warning
    with pytest.raises(QueryError, match="needs the cache's first-stage index.*python -m cache_builder index"):
        search(bare_copy, mode="approx", rerank=40)


def test_a_stale_or_damaged_index_falls_back_in_auto_and_fails_clearly_in_approx(bare_copy, tiny_ram):
    path = bare_copy.path
    build_index(path, dims=32)
    assert search(FeatureCache.open(path), mode="auto", rerank=40).mode.mode == "approx"

    stored = np.load(path / fmt.FEATURES_FILE, mmap_mode="r+")
    stored[3] = stored[4]  # features rewritten after the index was built
    stored.flush()
    del stored
    stale = FeatureCache.open(path)
    assert "index is stale" in search(stale, mode="auto", rerank=40).mode.warning
    with pytest.raises(QueryError, match="features changed since the index was built"):
        search(stale, mode="approx", rerank=40)

    build_index(path, dims=32)
    (path / fmt.INDEX_DIR / fmt.INDEX_BASIS_FILE).write_bytes(b"garbage")
    damaged = FeatureCache.open(path)
    assert "index is damaged" in search(damaged, mode="auto", rerank=40).mode.warning
    with pytest.raises(QueryError, match="basis.npy is unreadable"):
        search(damaged, mode="approx", rerank=40)


def test_an_index_added_while_the_cache_is_open_is_found(bare_copy, tiny_ram):
    assert search(bare_copy, mode="auto", rerank=40).mode.mode == "exact"
    build_index(bare_copy.path, dims=32)
    assert search(bare_copy, mode="auto", rerank=40).mode.mode == "approx"


def test_rerank_depth_rule():
    assert two_tier.rerank_depth(1_000_000, 10) == 5_000
    assert two_tier.rerank_depth(5_000, 10) == 1_000
    assert two_tier.rerank_depth(5_000, 2_000) == 2_000
    assert two_tier.rerank_depth(5_000, 10, depth=50) == 50
    with pytest.raises(QueryError, match="at least 1"):
        two_tier.rerank_depth(5_000, 10, depth=0)


def test_index_status_says_what_auto_runs(bare_copy, tiny_ram, monkeypatch):
    assert "add one with `python -m cache_builder index" in two_tier.index_status(bare_copy)
    build_index(bare_copy.path, dims=32)
    assert "32 dimensions per cell in 4 bits" in two_tier.index_status(bare_copy)
    assert "`auto` searches run two-tier" in two_tier.index_status(bare_copy)
    monkeypatch.setattr(two_tier, "ram_bytes", lambda: 2**40)
    assert "run exact (the cache fits in RAM)" in two_tier.index_status(bare_copy)


def test_cli_modes(indexed, bare_copy, capsys):
    from dashboard.cli import main

    args = ["search", "--image-id", "3", "--box", "0,0,100,100", "-k", "3"]
    assert main([args[0], str(bare_copy.path), *args[1:], "--mode", "approx"]) == 2
    assert "needs the cache's first-stage index" in capsys.readouterr().err
    assert main([args[0], str(indexed.path), *args[1:], "--mode", "approx", "--rerank", "50"]) == 0
    captured = capsys.readouterr()
    assert "note: approximate: two-tier" in captured.err and len(captured.out.splitlines()) == 4


def test_the_page_measures_recall_at_the_share_the_search_reranked(indexed):
    result = search(indexed, mode="approx", rerank=40, exclude_query=True)
    assert result.reranked == 40 and result.reranked_share == round(40 / (N - 1), 3)
    estimate = two_tier.estimate_recall(indexed, depth_share=result.reranked_share, sample=N, queries=2)
    assert estimate.sample == N
