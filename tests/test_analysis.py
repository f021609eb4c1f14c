from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dashboard import analysis
from dashboard.search import RegionQuery, search_cache

SEARCHED = pd.DataFrame({
    "id": range(10),
    "domain": ["in"] * 6 + ["out"] * 4,
    "label": ["cat", "cat", "dog", "dog", "owl", None, "cat", "dog", "dog", "owl"],
    "diagnoses": [["a", "b"], ["b"], [], ["a"], ["c"], ["a", "c"], [], ["b"], ["a", "b"], []],
})
HITS = SEARCHED.iloc[[0, 1, 6, 7]].reset_index(drop=True)


def test_composition_shares_and_lift():
    frame = analysis.composition(HITS, SEARCHED, "label").set_index("value")
    assert frame.loc["cat", "hits"] == 3 and frame.loc["cat", "hits_share"] == pytest.approx(0.75)
    assert frame.loc["cat", "searched_share"] == pytest.approx(0.3)
    assert frame.loc["cat", "lift"] == pytest.approx(2.5)
    assert "(missing)" not in frame.index and frame["hits_share"].sum() == pytest.approx(1.0)


def test_composition_counts_each_list_value_once_per_image():
    frame = analysis.composition(HITS, SEARCHED, "diagnoses").set_index("value")
    assert frame.loc["b", "hits"] == 3 and frame.loc["a", "hits"] == 1
    assert frame.loc["a", "searched"] == 4


def test_empty_hits_give_empty_frames():
    empty = HITS.iloc[:0]
    assert analysis.composition(empty, SEARCHED, "label").empty
    assert analysis.value_enrichment(empty, SEARCHED, "diagnoses").empty
    assert list(analysis.label_agreement(empty, "cat", "label").columns) == ["domain", "hits", "agreeing", "share"]


def test_score_distribution_groups_and_pools_rare_values():
    scores = pd.DataFrame({"id": range(10), "score": np.linspace(0, 1, 10)})
    frame = analysis.score_distribution(scores, SEARCHED, "label")
    assert len(frame) == 10 and set(frame["group"]) == {"cat", "dog", "owl", "(missing)"}
    pooled = analysis.score_distribution(scores, SEARCHED, "label", max_groups=2)
    assert set(pooled["group"]) == {"dog", "(other)"} or set(pooled["group"]) == {"cat", "(other)"}
    exploded = analysis.score_distribution(scores, SEARCHED, "diagnoses")
    assert (exploded["id"] == 0).sum() == 2  # in groups a and b


def test_label_agreement_per_domain():
    frame = analysis.label_agreement(HITS, "cat", "label").set_index("domain")
    assert frame.loc["in", "share"] == 1.0 and frame.loc["out", "share"] == 0.5
    assert frame.loc["all", "agreeing"] == 3
    lists = analysis.label_agreement(HITS, np.array(["a"]), "diagnoses").set_index("domain")
    assert lists.loc["all", "agreeing"] == 1


def test_value_enrichment():
    frame = analysis.value_enrichment(HITS, SEARCHED, "diagnoses").set_index("value")
    assert frame.loc["b", "hit_rate"] == pytest.approx(0.75)
    assert frame.loc["b", "prevalence"] == pytest.approx(0.4)
    assert frame.loc["b", "enrichment"] == pytest.approx(0.75 / 0.4)
    assert frame.index[0] == "b"


def test_overlap_and_dataset_mismatch():
    result = analysis.overlap([1, 2, 3], [3, 4])
    assert result["common"] == [3] and result["only_a"] == [1, 2] and result["jaccard"] == pytest.approx(0.25)
    assert analysis.dataset_mismatch(["a", "b"], ["a", "b"]) is None
    assert "2 and 3" in analysis.dataset_mismatch(["a", "b"], ["a", "b", "c"])
    assert "'x'" in analysis.dataset_mismatch(["a", "x"], ["a", "b"])


def test_value_counts_and_chartable_columns():
    counts = analysis.value_counts(SEARCHED, "label")
    assert counts.iloc[0].to_dict() == {"value": "dog", "count": 4}
    types = {"id": "BIGINT", "path": "VARCHAR", "domain": "VARCHAR", "age": "DOUBLE", "dx": "VARCHAR[]",
             "taken": "TIMESTAMP", "flag": "BOOLEAN"}
    assert analysis.chartable_columns(types) == ["domain", "dx", "flag"]
    assert analysis.chartable_columns(types, {"domain": 2, "dx": 500, "flag": 2}) == ["domain", "flag"]


def test_store_offers_only_columns_with_few_values(small_cache):
    counts = small_cache.metadata.distinct_counts
    assert counts["label"] == 3 and counts["diagnoses"] == 2 and counts["id"] == 40
    assert small_cache.metadata.chartable_columns() == ["label", "domain", "location", "diagnoses"]


def test_charts_data_from_a_real_search(small_cache):
    query = RegionQuery.from_grid_mask(small_cache.image_features(5), np.ones((5, 6)))
    result = search_cache(small_cache, query, k=8)
    searched = small_cache.metadata.rows(result.scores["id"])
    shares = analysis.composition(result.hits, searched, "domain")
    assert shares["hits"].sum() == 8 and shares["searched"].sum() <= 40
    distribution = analysis.score_distribution(result.scores, searched, "location")
    assert len(distribution) == 40 and distribution["group"].nunique() == 5
    enrichment = analysis.value_enrichment(result.hits, searched, "diagnoses")
    assert (enrichment["hits_with"] <= 8).all()
