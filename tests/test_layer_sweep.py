"""The layer sweep (dashboard/layer_sweep.py): one region remade at every layer of a cache, searched, tabled."""

from __future__ import annotations

import numpy as np
import pytest

from cache_builder.synthetic import write_array_cache
from dashboard import layer_sweep
from dashboard.feature_cache import FeatureCache
from dashboard.query_encoder import EncodedImage
from dashboard.search import SearchRequest, search_regions

REGION = np.zeros((5, 6), dtype=np.float32)
REGION[1:3, 2:4] = 1
FINER = np.kron(REGION, np.ones((2, 2), dtype=np.float32))  # the same pixels on a grid twice as fine


@pytest.fixture(scope="module")
def two_layers(tmp_path_factory):
    rng = np.random.default_rng(5)
    out = tmp_path_factory.mktemp("two_layers")
    write_array_cache(out, rng.random((30, 5, 6, 16), np.float32), input_size=48, layer="late",
                      more_layers={"early": rng.random((30, 10, 12, 8), np.float32)})
    late, early = FeatureCache.open(out), FeatureCache.open(out, "early")
    yield late, early
    late.metadata.close()
    early.metadata.close()


def test_the_region_is_resampled_to_each_layers_grid_and_the_rest_of_the_request_kept(two_layers):
    late, early = two_layers
    request = SearchRequest(cache=late, weights=REGION, image_id=4, k=5, exclude_query=True, mode="exact")
    same, finer = layer_sweep.sweep_requests(request, [late, early])
    assert same.cache is late and np.array_equal(same.weights, REGION)
    assert finer.cache is early and np.array_equal(finer.weights, FINER)
    assert (finer.image_id, finer.k, finer.exclude_query, finer.mode) == (4, 5, True, "exact")


def test_each_row_answers_as_a_search_made_at_that_layer_and_the_table_holds_them_all(two_layers):
    late, early = two_layers
    request = SearchRequest(cache=late, weights=REGION, image_id=4, k=5, exclude_query=True)
    answers = [layer_sweep.LayerAnswer(r, search_regions(r))
               for r in layer_sweep.sweep_requests(request, [late, early])]
    assert [a.grid for a in answers] == [(5, 6, 16), (10, 12, 8)]
    table = layer_sweep.sweep_table(answers)
    assert table.columns[0] == "layer" and list(table["layer"]) == ["late"] * 5 + ["early"] * 5
    direct = search_regions(SearchRequest(cache=early, weights=FINER, image_id=4, k=5, exclude_query=True)).hits
    assert list(table.loc[table["layer"] == "early", "id"]) == list(direct["id"])
    assert list(table.loc[table["layer"] == "early", "score"]) == list(direct["score"])
    assert layer_sweep.sweep_table([]).columns.tolist() == ["layer"]


def test_an_uploaded_query_is_searched_with_its_encoding_at_each_layer(two_layers):
    late, early = two_layers
    encodings = {cache.layer: EncodedImage(None, cache.image_features(7), (0, 0, *cache.grid))
                 for cache in (late, early)}
    request = SearchRequest(cache=late, weights=REGION, features=encodings["late"].features)
    _, finer = layer_sweep.sweep_requests(request, [late, early], encodings)
    assert np.array_equal(finer.features, early.image_features(7)) and finer.content == (0, 0, 10, 12)
    assert search_regions(finer).hits["id"].iloc[0] == 7  # its own image, found at the early layer
    with pytest.raises(KeyError, match="no encoding at layer early"):
        layer_sweep.sweep_requests(request, [late, early], {"late": encodings["late"]})


def test_the_label_verdict_needs_a_label(two_layers):
    late, _ = two_layers
    hits = search_regions(SearchRequest(cache=late, weights=REGION, image_id=4, k=3)).hits.assign(
        label=["cat", "dog", "cat"])
    assert layer_sweep.label_share(hits, "label", "cat") == "2 of 3 hits (67%) share the query's label 'cat'"
    assert layer_sweep.label_share(hits, None, "cat") is None
    assert layer_sweep.label_share(hits, "species", "cat") is None
