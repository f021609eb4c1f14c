"""The search flow (dashboard.search): one request in, ranked hits with windows and metadata out."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dashboard import geometry, search
from dashboard.geometry import QueryError
from dashboard.metadata import MetadataFilter, MetadataStore
from dashboard.search import SearchRequest, rank, search_regions

SCORE_TOL = 2.0 ** -7
FULL = np.ones((5, 6), dtype=np.float32)


def request(cache, **kwargs) -> SearchRequest:
    kwargs.setdefault("weights", FULL)
    if "features" not in kwargs:
        kwargs.setdefault("image_id", 0)
    return SearchRequest(cache=cache, **kwargs)


def test_own_region_scores_one_at_its_own_place(small_cache):
    mask = np.zeros((5, 6), dtype=np.float32)
    mask[1:3, 2:5] = 1
    result = search_regions(request(small_cache, image_id=13, weights=mask, k=5))
    top = result.hits.iloc[0]
    assert top["id"] == 13
    assert top["score"] == pytest.approx(1.0, abs=SCORE_TOL)
    assert (top["row"], top["col"], top["height"], top["width"]) == (1, 2, 2, 3)


def test_features_from_elsewhere_search_like_the_cached_image(small_cache):
    by_id = search_regions(request(small_cache, image_id=13, k=5)).hits
    by_features = search_regions(request(small_cache, features=small_cache.image_features(13), k=5)).hits
    pd.testing.assert_frame_equal(by_id, by_features)


def test_empty_mask_is_refused(small_cache):
    with pytest.raises(QueryError, match="empty"):
        search_regions(request(small_cache, weights=np.zeros((5, 6))))


@pytest.mark.parametrize("k", [0, -3])
def test_k_must_be_positive(small_cache, k):
    with pytest.raises(QueryError, match="k must be"):
        request(small_cache, k=k)


@pytest.mark.parametrize("kwargs, message", [
    ({"image_id": 1, "features": np.ones((5, 6, 16), dtype=np.float32)}, "not both"),
    ({"image_id": None}, "needs a query image"),
    ({"features": np.ones((5, 6, 16), dtype=np.float32), "exclude_query": True}, "only a cached query image"),
    ({"mode": "fuzzy"}, "mode must be one of auto, exact, approx"),
    ({"rerank": 0}, "rerank depth must be at least 1"),
    ({"per_group": "no_such_column"}, "no metadata column"),
])
def test_a_request_that_cannot_be_answered_says_why(small_cache, kwargs, message):
    with pytest.raises(QueryError, match=message):
        request(small_cache, **kwargs)


def test_a_query_id_outside_the_cache_is_refused(small_cache):
    from cache_builder.cache_format import CacheError

    with pytest.raises(CacheError, match="not in this cache"):
        request(small_cache, image_id=40)


def test_equal_requests_share_a_fingerprint_and_any_change_alters_it(small_cache):
    base = request(small_cache, image_id=3, k=7, flt=MetadataFilter(equals={"domain": ["in"]}))
    assert base.fingerprint() == request(small_cache, image_id=3, k=7,
                                         flt=MetadataFilter(equals={"domain": ["in"]})).fingerprint()
    soft = FULL.copy()
    soft[0, 0] = 0.5
    changed = [request(small_cache, image_id=4, k=7), request(small_cache, image_id=3, k=8),
               request(small_cache, image_id=3, k=7, weights=soft), request(small_cache, image_id=3, k=7,
                                                                            per_group="location"),
               request(small_cache, image_id=3, k=7, exclude_query=True),
               request(small_cache, features=small_cache.image_features(3), k=7)]
    assert len({base.fingerprint(), *(r.fingerprint() for r in changed)}) == len(changed) + 1


def test_the_searched_rows_metadata_is_read_once(small_cache, monkeypatch):
    calls = []
    original = MetadataStore.rows
    monkeypatch.setattr(MetadataStore, "rows", lambda self, *a, **k: calls.append(a) or original(self, *a, **k))
    result = search_regions(request(small_cache, image_id=8, k=10, per_group="location", exclude_query=True,
                                    flt=MetadataFilter(equals={"domain": ["in"]})))
    assert len(calls) == 1
    assert list(result.searched["id"]) == list(result.scores["id"])
    assert set(result.searched["domain"]) == {"in"} and 8 not in set(result.searched["id"])


def test_k_larger_than_candidates_returns_all_of_them(small_cache):
    result = search_regions(request(small_cache, k=1000, flt=MetadataFilter(equals={"domain": ["out"]})))
    assert len(result.hits) == 15 and result.searched_count == 15
    assert set(result.hits["domain"]) == {"out"}
    assert list(result.hits["rank"]) == list(range(1, 16))


def test_empty_candidate_set_gives_no_hits(small_cache):
    result = search_regions(request(small_cache, k=5, flt=MetadataFilter(equals={"label": ["no such label"]})))
    assert result.hits.empty and result.searched_count == 0
    assert list(result.hits.columns[:12]) == search.HIT_COLUMNS


def test_exclude_query_and_best_per_group(small_cache):
    result = search_regions(request(small_cache, image_id=8, k=10, exclude_query=True, per_group="location"))
    assert 8 not in set(result.hits["id"])
    assert len(result.hits) == 5 and result.hits["location"].is_unique
    assert result.hits["score"].is_monotonic_decreasing
    assert result.searched_count == small_cache.size - 1


def test_hits_carry_display_windows_and_metadata(small_cache):
    mask = np.zeros((48, 48), dtype=bool)
    mask[8:24, 16:32] = True  # on a 5x6 grid of a 48-px image (cells of 9.6 x 8 px)
    weights = geometry.display_mask_to_grid(mask, small_cache.image_size, small_cache.grid)
    hits = search_regions(request(small_cache, image_id=2, weights=weights, k=3)).hits
    first = hits.iloc[0]
    cell_h, cell_w = 48 / 5, 48 / 6
    assert first["y0"] == round(first["row"] * cell_h)
    assert first["x1"] == round((first["col"] + first["width"]) * cell_w)
    assert {"label", "domain", "location", "age", "diagnoses", "path"} <= set(hits.columns)


def test_query_grid_must_match_cache(small_cache):
    with pytest.raises(QueryError, match="grid"):
        search_regions(request(small_cache, features=np.ones((4, 4, 16), dtype=np.float32),
                               weights=np.ones((4, 4))))


def test_rank_breaks_ties_by_id_and_keeps_one_per_group():
    scores = np.array([0.5, 0.9, 0.9, 0.1, 0.9], dtype=np.float32)
    ids = np.array([10, 4, 2, 7, 3])
    assert list(ids[rank(scores, ids, 3)]) == [2, 3, 4]
    groups = np.array([0, 1, 1, 2, 1])
    assert list(ids[rank(scores, ids, 5, groups)]) == [2, 10, 7]


def test_metadata_columns_named_like_window_columns_keep_their_values(tmp_path):
    """Real manifests often hold each photo's width and height: they must not clash with the window's."""
    from cache_builder.synthetic import write_array_cache
    from dashboard.feature_cache import FeatureCache

    rng = np.random.default_rng(2)
    photos = pd.DataFrame({"width": [640 + i for i in range(12)], "height": [480] * 12, "x0": ["a"] * 12})
    write_array_cache(tmp_path, np.maximum(rng.normal(size=(12, 3, 3, 8)), 0), metadata=photos)
    cache = FeatureCache.open(tmp_path)
    weights = np.zeros((3, 3), np.float32)
    weights[0, 0] = 1
    hits = search_regions(SearchRequest(cache=cache, weights=weights, image_id=0, k=5)).hits
    assert hits.columns.is_unique
    assert list(hits.columns[:12]) == search.HIT_COLUMNS and (hits["height"] == 1).all()  # the window, in cells
    assert list(hits["metadata.width"]) == [640 + i for i in hits["id"]] and (hits["metadata.x0"] == "a").all()
