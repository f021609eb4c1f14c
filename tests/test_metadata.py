from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dashboard.metadata import FilterError, MetadataFilter


def test_equality_filter(small_cache):
    ids = small_cache.metadata.filter_ids(MetadataFilter(equals={"label": ["cat", "owl"]}))
    assert list(ids) == [i for i in range(40) if i % 3 in (0, 2)]


def test_range_and_list_filters(small_cache):
    store = small_cache.metadata
    ids = store.filter_ids(MetadataFilter(ranges={"age": (30, 35)}))
    assert list(ids) == list(range(10, 16))
    ids = store.filter_ids(MetadataFilter(contains_any={"diagnoses": ["a"]}))
    assert list(ids) == list(range(0, 40, 4))
    both = store.filter_ids(MetadataFilter(contains_any={"diagnoses": ["a", "b"]}, equals={"domain": ["out"]}))
    assert list(both) == [i for i in range(25, 40) if i % 4 in (0, 1)]


@pytest.mark.parametrize("value", ["'; DROP TABLE images; --", "%", "cat' OR '1'='1", "\"label\""])
def test_hostile_values_match_literally_and_change_nothing(small_cache, value):
    store = small_cache.metadata
    assert len(store.filter_ids(MetadataFilter(equals={"label": [value]}))) == 0
    assert len(store.filter_ids(MetadataFilter(contains_any={"diagnoses": [value]}))) == 0
    assert store.count() == 40


def test_unknown_or_hostile_column_is_refused(small_cache):
    with pytest.raises(FilterError, match="no metadata column"):
        small_cache.metadata.filter_ids(MetadataFilter(equals={'label" = label OR "1': ["x"]}))


def test_value_of_the_wrong_type_is_a_clear_error_that_names_the_column(small_cache):
    with pytest.raises(FilterError, match="the filter value 'old' does not fit column 'age', which holds DOUBLE values"):
        small_cache.metadata.filter_ids(MetadataFilter(ranges={"age": ("old", None)}))
    with pytest.raises(FilterError, match="'abc' does not fit column 'age'"):
        small_cache.metadata.filter_ids(MetadataFilter(equals={"label": ["cat"], "age": [30, "abc"]}))


def test_link_filter_values_the_data_no_longer_holds_are_named(small_cache):
    store = small_cache.metadata
    assert store.absent_filter_values(MetadataFilter(equals={"label": ["cat"]}, contains_any={"diagnoses": ["a"]},
                                                     ranges={"age": (30, 35)})) == []
    notes = store.absent_filter_values(MetadataFilter(
        equals={"label": ["cat", "zebra"], "age": ["abc"], "gone": ["x"]}, contains_any={"diagnoses": ["zz"]}))
    assert any("'gone'" in n and "no column" in n for n in notes)
    assert any("'zebra' of 'label' no longer occurs" in n for n in notes)
    assert any("'zz' of 'diagnoses' no longer occurs" in n for n in notes)
    assert any("'abc' does not fit column 'age'" in n for n in notes)
    assert not any("'cat'" in n for n in notes) and len(notes) == 4


def test_rows_come_back_in_the_order_asked(small_cache):
    rows = small_cache.metadata.rows([7, 2, 30], ["id", "label"])
    assert list(rows["id"]) == [7, 2, 30] and list(rows["label"]) == ["dog", "owl", "cat"]
    assert small_cache.metadata.rows([], ["id"]).empty


def test_empty_value_list_matches_nothing(small_cache):
    assert small_cache.metadata.filter_ids(MetadataFilter(equals={"label": []})).size == 0
    assert np.array_equal(small_cache.metadata.filter_ids(MetadataFilter()), np.arange(40))


@pytest.mark.parametrize("ids", [[7, 2, 30], list(range(39, -1, -1)), [0, 0, 5, 39], list(range(40))])
def test_many_ids_are_read_in_one_pass_with_the_same_rows_as_the_join(small_cache, monkeypatch, ids):
    store = small_cache.metadata
    monkeypatch.setattr("dashboard.metadata.DENSE_READ_SHARE", 2.0)  # never dense: the join
    joined = store.rows(ids)
    monkeypatch.setattr("dashboard.metadata.DENSE_READ_SHARE", 0.0)  # always dense
    dense = store.rows(np.asarray(ids))
    pd.testing.assert_frame_equal(dense, joined)
    assert list(dense["id"]) == list(ids)
    assert list(store.rows([0, 40])["id"]) == [0]  # an id outside the table is left out, as by the join


def test_the_first_labelled_image_skips_empty_frames(tmp_path):
    from cache_builder.synthetic import write_array_cache
    from dashboard.metadata import MetadataStore

    labels = pd.DataFrame({"species": [None, "empty", "Empty", "", "zebra", "lion"], "tags": [["a"]] * 6})
    write_array_cache(tmp_path, np.ones((6, 2, 2, 4), np.float32), metadata=labels)
    store = MetadataStore(tmp_path / "metadata.duckdb")
    try:
        assert store.first_labelled_id("species") == 4
        assert store.first_labelled_id(None) is None and store.first_labelled_id("nope") is None
        assert store.first_labelled_id("tags") is None  # a list column names no single class
    finally:
        store.close()
