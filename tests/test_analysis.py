"""Chart data, checked number by number on a hand-built table and for invariants on a real search."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dashboard import analysis
from dashboard.metadata import MetadataFilter
from dashboard.search import SearchRequest, search_regions

# Ten searched images. Lists come as Python lists or numpy arrays (as DuckDB returns them), with an empty list,
# a NULL list and a repeated value; labels and domains have NULLs.
SEARCHED = pd.DataFrame({
    "id": range(10),
    "domain": ["in"] * 6 + ["out"] * 4,
    "label": ["cat", "cat", "dog", "dog", "owl", None, "cat", "dog", "dog", "owl"],
    "diagnoses": [["a", "b"], ["b"], [], ["a", "a"], ["c"], ["a", "c"], None, np.array(["b"]),
                  np.array(["a", "b"]), []],
})
# hits: labels cat, cat, NULL, cat, dog; domains in, in, in, out, out
HITS = SEARCHED.iloc[[0, 1, 5, 6, 7]].reset_index(drop=True)
SCORES = pd.DataFrame({"id": range(10), "score": np.arange(10) / 10})


def test_composition_lists_every_value_with_shares_and_lift():
    frame = analysis.composition(HITS, SEARCHED, "label")
    assert list(frame["value"]) == ["cat", "(missing)", "dog", "owl"]  # hits desc, then value
    assert list(frame["hits"]) == [3, 1, 1, 0] and list(frame["searched"]) == [3, 1, 4, 2]
    np.testing.assert_allclose(frame["hits_share"], [0.6, 0.2, 0.2, 0.0])
    np.testing.assert_allclose(frame["searched_share"], [0.3, 0.1, 0.4, 0.2])
    np.testing.assert_allclose(frame["lift"], [2.0, 2.0, 0.5, 0.0])
    assert frame["hits_share"].sum() == pytest.approx(1) and frame["searched_share"].sum() == pytest.approx(1)


def test_composition_counts_each_list_value_once_per_image():
    frame = analysis.composition(HITS, SEARCHED, "diagnoses").set_index("value")
    assert frame["hits"].to_dict() == {"b": 3, "a": 2, "(missing)": 1, "c": 1}
    assert frame["searched"].to_dict() == {"b": 4, "a": 4, "(missing)": 1, "c": 2}  # ["a", "a"] counts once
    assert frame.loc["b", "hits_share"] == pytest.approx(0.6) and frame.loc["b", "lift"] == pytest.approx(1.5)
    assert list(frame.index) == ["b", "a", "(missing)", "c"]


def test_score_distribution_labels_every_score_with_its_group():
    frame = analysis.score_distribution(SCORES, SEARCHED, "label")
    assert list(frame.columns) == ["id", "score", "group"] and list(frame["id"]) == list(range(10))
    assert list(frame["group"]) == ["cat", "cat", "dog", "dog", "owl", "(missing)", "cat", "dog", "dog", "owl"]
    np.testing.assert_allclose(frame["score"], SCORES["score"])


def test_score_distribution_pools_rare_groups_into_other():
    frame = analysis.score_distribution(SCORES, SEARCHED, "label", max_groups=3)
    # dog (4) and cat (3) stay; owl (2) and (missing) (1) are pooled
    assert list(frame["group"]) == ["cat", "cat", "dog", "dog", "(other)", "(other)", "cat", "dog", "dog", "(other)"]
    assert set(analysis.score_distribution(SCORES, SEARCHED, "label", max_groups=4)["group"]) == {
        "cat", "dog", "owl", "(missing)"}  # exactly max_groups groups: nothing pooled


def test_score_distribution_explodes_list_columns():
    frame = analysis.score_distribution(SCORES, SEARCHED, "diagnoses")
    groups = frame.groupby("id")["group"].apply(sorted).to_dict()
    assert groups[0] == ["a", "b"] and groups[3] == ["a"] and groups[2] == ["(none)"] and groups[6] == ["(missing)"]
    assert len(frame) == 13
    assert frame.loc[frame["id"] == 0, "score"].tolist() == [0.0, 0.0]


def test_score_distribution_breaks_frequency_ties_by_name():
    searched = pd.DataFrame({"id": range(5), "site": ["zeta", "zeta", "alpha", "alpha", "mu"]})
    frame = analysis.score_distribution(SCORES.iloc[:5], searched, "site", max_groups=2)
    assert list(frame["group"]) == ["(other)", "(other)", "alpha", "alpha", "(other)"]


def test_score_distribution_of_an_id_without_metadata_is_missing():
    frame = analysis.score_distribution(pd.DataFrame({"id": [0, 42], "score": [0.5, 0.7]}), SEARCHED, "label")
    assert list(frame["group"]) == ["cat", "(missing)"]


def test_label_agreement_per_domain():
    frame = analysis.label_agreement(HITS, "cat", "label").set_index("domain")
    assert list(frame.index) == ["in", "out", "all"]
    assert frame["hits"].to_dict() == {"in": 3, "out": 2, "all": 5}
    assert frame["agreeing"].to_dict() == {"in": 2, "out": 1, "all": 3}  # a NULL label does not agree
    np.testing.assert_allclose(frame["share"], [2 / 3, 0.5, 0.6])


@pytest.mark.parametrize("query", [["a", "c"], np.array(["c", "a"])])
def test_label_agreement_with_list_labels_needs_one_shared_value(query):
    frame = analysis.label_agreement(HITS, query, "diagnoses").set_index("domain")
    # [a, b] and [a, c] share a value; [b], NULL and [b] do not
    assert frame["agreeing"].to_dict() == {"in": 2, "out": 0, "all": 2}


def test_label_agreement_without_domains_or_label():
    assert analysis.label_agreement(HITS, "cat", "label", None)["domain"].tolist() == ["all"]
    assert analysis.label_agreement(HITS, "cat", "label", "site")["domain"].tolist() == ["all"]
    assert analysis.label_agreement(HITS, None, "label").set_index("domain").loc["all", "agreeing"] == 0
    no_domain = HITS.assign(domain=[None, "in", "in", None, "out"])
    frame = analysis.label_agreement(no_domain, "cat", "label").set_index("domain")
    assert frame.loc["(missing)", "hits"] == 2 and frame.loc["(missing)", "agreeing"] == 2


def test_value_enrichment_of_a_list_column():
    frame = analysis.value_enrichment(HITS, SEARCHED, "diagnoses")
    assert list(frame.columns) == ["value", "hit_rate", "prevalence", "hits_with", "searched_with", "enrichment"]
    assert list(frame["value"]) == ["(missing)", "b", "a", "c"]  # enrichment desc, ties by value
    frame = frame.set_index("value")
    assert frame["hits_with"].to_dict() == {"(missing)": 1, "b": 3, "a": 2, "c": 1}
    assert frame["searched_with"].to_dict() == {"(missing)": 1, "b": 4, "a": 4, "c": 2}
    np.testing.assert_allclose(frame.loc[["b", "a"], "hit_rate"], [0.6, 0.4])
    np.testing.assert_allclose(frame.loc[["b", "a"], "prevalence"], [0.4, 0.4])
    np.testing.assert_allclose(frame["enrichment"], [2.0, 1.5, 1.0, 1.0])


def test_value_enrichment_of_a_scalar_column_includes_absent_values():
    frame = analysis.value_enrichment(HITS, SEARCHED, "label").set_index("value")
    assert frame.loc["owl", "hits_with"] == 0 and frame.loc["owl", "enrichment"] == 0
    assert frame.loc["dog", "enrichment"] == pytest.approx(0.5)
    assert frame["hit_rate"].sum() == pytest.approx(1) and frame["prevalence"].sum() == pytest.approx(1)


def test_empty_inputs_give_empty_frames_with_the_columns():
    empty = HITS.iloc[:0]
    cases = {
        ("value", "hits", "hits_share", "searched", "searched_share", "lift"):
            analysis.composition(empty, SEARCHED, "label"),
        ("value", "hit_rate", "prevalence", "hits_with", "searched_with", "enrichment"):
            analysis.value_enrichment(empty, SEARCHED, "diagnoses"),
        ("domain", "hits", "agreeing", "share"): analysis.label_agreement(empty, "cat", "label"),
        ("id", "score", "group"): analysis.score_distribution(SCORES.iloc[:0], SEARCHED, "label"),
    }
    for columns, frame in cases.items():
        assert frame.empty and tuple(frame.columns) == columns


def test_overlap():
    result = analysis.overlap([1, 2, 3], np.array([3, 4, 4]))
    assert result == {"common": [3], "only_a": [1, 2], "only_b": [4], "jaccard": pytest.approx(0.25)}
    assert analysis.overlap([5, 6], [6, 5])["jaccard"] == 1.0
    assert analysis.overlap([], [])["jaccard"] == 1.0
    assert analysis.overlap([1], [])["jaccard"] == 0.0


def test_framing_mismatch():
    assert analysis.framing_mismatch("crop", (224, 224), "crop", (224, 224)) is None
    problem = analysis.framing_mismatch("crop", (224, 224), "fit", (224, 384))
    assert "crop 224x224 and fit 384x224" in problem


def test_dataset_mismatch():
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
    """What the search page does: hits plus the metadata of every searched image, here a filtered subset."""
    store = small_cache.metadata
    result = search_regions(SearchRequest(cache=small_cache, image_id=5, k=8, weights=np.pad(
        np.ones((2, 3)), ((1, 2), (2, 1))), flt=MetadataFilter(equals={"domain": ["in"]})))
    searched = result.searched
    assert list(searched["id"]) == list(store.filter_ids(MetadataFilter(equals={"domain": ["in"]})))
    assert len(result.hits) == 8 and len(searched) == result.searched_count == 25

    shares = analysis.composition(result.hits, searched, "location")
    assert shares["hits"].sum() == 8 and shares["searched"].sum() == 25
    assert shares["hits_share"].sum() == pytest.approx(1) and shares["searched_share"].sum() == pytest.approx(1)
    in_hits = result.hits["location"].value_counts().reindex(shares["value"], fill_value=0)
    assert shares["hits"].tolist() == in_hits.tolist()  # values no hit has are listed with 0
    assert set(shares["value"]) == {f"loc{i}" for i in range(5)}

    distribution = analysis.score_distribution(result.scores, searched, "location")
    assert sorted(distribution["id"]) == sorted(result.scores["id"]) and distribution["group"].nunique() == 5
    merged = distribution.merge(result.scores, on="id", suffixes=("", "_searched"))
    np.testing.assert_allclose(merged["score"], merged["score_searched"])
    # diagnoses: [a, b] for id % 4 == 0, [b] for id % 4 == 1, else [] -> one row per value, or one "(none)"
    by_diagnosis = analysis.score_distribution(result.scores, searched, "diagnoses")
    assert len(by_diagnosis) == 25 + int((searched["id"] % 4 == 0).sum())

    enrichment = analysis.value_enrichment(result.hits, searched, "diagnoses").set_index("value")
    hit_ids = result.hits["id"]
    expected_hits = {"a": int((hit_ids % 4 == 0).sum()), "b": int((hit_ids % 4 <= 1).sum())}
    assert enrichment["hits_with"].to_dict() == expected_hits
    assert enrichment["searched_with"].to_dict() == {"a": 7, "b": 13}  # ids 0..24
    np.testing.assert_allclose(enrichment["enrichment"], enrichment["hit_rate"] / enrichment["prevalence"])

    agreement = analysis.label_agreement(result.hits, "owl", "label").set_index("domain")
    assert list(agreement.index) == ["in", "all"] and agreement.loc["all", "hits"] == 8
    assert agreement.loc["all", "agreeing"] == int((result.hits["label"] == "owl").sum())


def test_group_by_skips_one_value_columns_and_prefers_domain_then_the_label():
    distinct = {"domain": 2, "label": 12, "source": 1, "location": 5}
    assert analysis.group_columns(["label", "domain", "source", "location"], distinct) == ["label", "domain",
                                                                                         "location"]
    assert analysis.default_group_column(["label", "domain", "location"], "label") == "domain"
    assert analysis.default_group_column(["location", "label"], "label") == "label"  # no domain column
    assert analysis.default_group_column(["location"], "label") == "location"  # the label has too many values
    assert analysis.default_group_column([], "label") is None


def test_label_summary_says_how_many_hits_share_the_querys_label():
    hits = pd.DataFrame({"label": ["cat", "dog", "cat", None], "tags": [["a"], ["b"], [], ["a", "c"]]})
    assert analysis.label_summary(hits, "cat", "label") == "2 of 4 hits (50%) share the query's label 'cat'"
    assert analysis.label_summary(hits, ["a", "x"], "tags").startswith("2 of 4 hits (50%)")
    assert analysis.label_summary(hits, None, "label") is None  # no label to compare
    assert analysis.label_summary(hits.iloc[:0], "cat", "label") is None


def test_label_view_picks_bars_per_domain_a_line_or_the_hits_label_counts():
    hits = pd.DataFrame({"label": ["cat", "dog", "cat", "cat"], "domain": ["in", "out", "in", None]})
    assert analysis.label_view(hits, "cat", "label", label_chartable=True).by_domain  # 2+ domains
    many = analysis.label_view(hits, "cat", "label", label_chartable=False)
    assert not many.by_domain and many.counts and not many.one_domain
    single = analysis.label_view(hits.assign(domain="in"), "cat", "label", label_chartable=True)
    assert not single.by_domain and single.one_domain and not single.counts and single.summary.startswith("3 of 4")
    unlabelled = analysis.label_view(hits.drop(columns="domain"), None, "label", label_chartable=False)
    assert unlabelled.summary is None and not unlabelled.counts and not unlabelled.by_domain
