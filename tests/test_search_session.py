"""The Search page's state (dashboard.search_session) on a plain dict, as st.session_state holds it."""

from __future__ import annotations

import numpy as np

from dashboard.search_session import FROM_DATASET, SearchSession
from dashboard.share import encode_region

REGION = np.zeros((5, 6), dtype=np.float32)
REGION[1:3, 2:4] = 1
SIZE = (50, 60)  # (height, width) of the images the grid is drawn on


def test_a_link_is_applied_once_and_its_problems_reported_once():
    state: dict = {}
    session = SearchSession(state)
    link = session.apply_link_once({"image": "7", "region": encode_region(REGION), "k": "oops"})
    assert link.image_id == 7 and state[SearchSession.QUERY_ID] == 7
    assert ["`k`" in p for p in session.take_link_problems()] == [True] and session.take_link_problems() == []
    state[SearchSession.QUERY_ID] = 3  # the user moves on; a rerun must not restore the link's image
    session.apply_link_once({"image": "7"})
    assert state[SearchSession.QUERY_ID] == 3


def test_a_drawn_region_wins_over_a_preset_which_holds_only_for_its_image():
    state: dict = {}
    session = SearchSession(state)
    session.apply_link_once({"image": "7", "region": encode_region(REGION)})
    preset = session.region(None, 7, (5, 6), SIZE)
    assert preset.origin == "preset" and np.allclose(preset.weights, REGION)
    drawn = np.ones((5, 6), dtype=np.float32)
    assert session.region(drawn, 7, (5, 6), SIZE).origin == "drawn"
    assert session.region(None, 8, (5, 6), SIZE) is None  # another query image
    assert session.region(None, None, (5, 6), SIZE) is None  # an upload


def test_a_preset_region_follows_the_query_to_another_layers_grid():
    session = SearchSession({})
    session.apply_link_once({"image": "7", "region": encode_region(REGION)})  # rows 1-2, columns 2-3 of 5x6
    finer = session.region(None, 7, (10, 12), SIZE).weights  # the same pixels on a grid twice as fine
    assert finer.shape == (10, 12) and np.array_equal(finer > 0.5, np.kron(REGION, np.ones((2, 2))) > 0.5)
    assert session.region(None, 7, (5, 6), SIZE).weights.sum() == REGION.sum()


def test_a_clicked_layer_row_opens_that_layer_at_its_hits():
    state = {SearchSession.VIEW: "layers"}
    SearchSession(state).open_layer("blocks.2")
    assert state[SearchSession.LAYER] == "blocks.2" and state[SearchSession.VIEW] == "hits"


def test_a_link_to_a_layer_the_cache_lacks_is_reported():
    session = SearchSession({})
    session.apply_link_once({"layer": "blocks.9", "view": "layers"})
    assert session.state[SearchSession.VIEW] == "layers"
    problems = session.take_link_problems(None, ["blocks.6", "blocks.2"])
    assert problems == ["the link's layer 'blocks.9' is not in this cache (it holds blocks.6, blocks.2); showing "
                        "blocks.6"]


def test_a_clicked_hit_becomes_the_query_with_its_window_as_region():
    state = {SearchSession.QUERY_SOURCE: "Upload an image"}
    session = SearchSession(state)
    session.search_from_hit(12, 1, 2, 2, 3, (5, 6))
    assert state[SearchSession.QUERY_SOURCE] == FROM_DATASET and state[SearchSession.QUERY_ID] == 12
    region = session.region(None, 12, (5, 6), SIZE)
    assert region.origin == "preset" and region.weights.sum() == 6 and region.weights[1:3, 2:5].all()


def test_use_as_query_hands_an_image_over_and_drops_a_stale_preset():
    state: dict = {}
    session = SearchSession(state)
    session.search_from_hit(12, 0, 0, 1, 1, (5, 6))
    session.use_as_query("demo", 12)
    assert state[SearchSession.CACHE] == "demo" and session.region(None, 12, (5, 6), SIZE) is None


def test_a_query_id_outside_the_cache_falls_back_to_zero():
    state = {SearchSession.QUERY_ID: 99}
    assert SearchSession(state).query_id(40) == 0 and state[SearchSession.QUERY_ID] == 0
    state[SearchSession.QUERY_ID] = 39
    assert SearchSession(state).query_id(40) == 39
    SearchSession(state).pick_random(40)
    assert 0 <= state[SearchSession.QUERY_ID] < 40


def test_clear_region_drops_a_preset_and_gives_a_fresh_canvas():
    state: dict = {}
    session = SearchSession(state)
    session.preselect(7, REGION)
    session.clear_region()
    assert session.region(None, 7, (5, 6), SIZE) is None and session.canvas_round() == 1
    assert not session.is_starter(session.region(None, 7, (5, 6), SIZE), 7)
