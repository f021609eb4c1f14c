from __future__ import annotations

import numpy as np
import pytest

from dashboard.metadata import MetadataFilter
from dashboard.share import DEFAULT_K, SearchState, decode_region, encode_region, from_params, to_params


def test_state_round_trips_through_the_url():
    region = np.zeros((7, 7), dtype=np.float32)
    region[2:4, 1:5] = 1
    region[4, 4] = 0.5
    state = SearchState(cache="demo", image_id=42, region=region, k=7,
                        flt=MetadataFilter(equals={"domain": ["out"]}, ranges={"age": (3, 9)},
                                           contains_any={"diagnoses": ["Mass"]}),
                        per_group="location", exclude_query=False, mode="approx", layer="blocks.2", view="layers")
    params = to_params(state)
    assert all(isinstance(v, str) for v in params.values())
    back, problems = from_params(params)
    assert not problems
    assert (back.cache, back.image_id, back.k, back.per_group, back.exclude_query, back.mode, back.layer,
            back.view) == ("demo", 42, 7, "location", False, "approx", "blocks.2", "layers")
    assert back.flt == state.flt
    np.testing.assert_allclose(back.region, region, atol=1 / 255)


def test_defaults_make_a_short_link():
    assert to_params(SearchState(cache="demo")) == {"cache": "demo"}
    state, problems = from_params({})
    assert state.k == DEFAULT_K and state.exclude_query and not problems


@pytest.mark.parametrize("params, name", [
    ({"image": "abc"}, "image"),
    ({"image": "-4"}, "image"),
    ({"region": "7x7:zz"}, "region"),
    ({"region": "7x7:00ff"}, "region"),
    ({"filters": "{not json"}, "filters"),
    ({"filters": "[1, 2]"}, "filters"),
    ({"k": "lots"}, "k"),
    ({"mode": "fastest"}, "mode"),
    ({"view": "everything"}, "view"),
])
def test_damaged_parameters_are_dropped_and_reported(params, name):
    state, problems = from_params({"cache": "demo", **params})
    assert state.cache == "demo"
    assert len(problems) == 1 and f"`{name}`" in problems[0]


def test_k_is_clamped():
    assert from_params({"k": "100000"})[0].k == 500
    assert from_params({"k": "0"})[0].k == 1


def test_region_codec():
    weights = np.array([[0, 1], [0.25, 0.5]], dtype=np.float32)
    assert encode_region(weights) == "2x2:00ff4080"
    np.testing.assert_allclose(decode_region("2x2:00ff4080"), weights, atol=1 / 255)
