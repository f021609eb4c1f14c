"""Every page through AppTest: it loads, a region searches, filters change the searched set, bad input is explained.

AppTest cannot draw on the canvas component; a region is injected through `REGION_OVERRIDE_KEY`, the one
seam the page offers for that (the browser test draws for real).
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from dashboard.proposals import suggest_regions
from dashboard.settings import CACHES_DIR_ENV
from dashboard.query_encoder import EncodedImage
from dashboard.search_session import SearchSession
from dashboard.share import encode_region
from dashboard.ui import resources
from dashboard.ui.widgets import REGION_OVERRIDE_KEY
from dashboard.uploads import read_upload

ROOT = Path(__file__).resolve().parents[1]
REGION = np.zeros((5, 6), dtype=np.float32)
REGION[1:3, 2:4] = 1


@pytest.fixture
def caches(small_cache, tmp_path, monkeypatch) -> Path:
    shutil.copytree(small_cache.path, tmp_path / "tiny")
    monkeypatch.setenv(CACHES_DIR_ENV, str(tmp_path))
    monkeypatch.chdir(ROOT)
    return tmp_path


def page(path: str | None, **params: str) -> AppTest:
    """The app; with `path`, AppTest runs that page's script directly (the entry script's gate is skipped)."""
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    if path:
        at.switch_page(path)
    for key, value in params.items():
        at.query_params[key] = value
    return at


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def searched_upload(path: str, source_key: str, uploader_key: str, **params: str) -> AppTest:
    """The page with the test region, its query switched to an upload of a small green PNG."""
    at = page(path, **params)
    at.session_state[REGION_OVERRIDE_KEY] = REGION
    at.run()
    buffer = io.BytesIO()
    Image.new("RGB", (64, 40), "green").save(buffer, format="PNG")
    at.radio(key=source_key).set_value("Upload an image").run()
    at.file_uploader(key=uploader_key).upload("photo.png", buffer.getvalue(), "image/png").run()
    return at


def test_the_first_view_already_answers_with_a_suggested_region(caches, small_cache):
    at = page("pages/search.py").run()
    assert not at.exception
    assert "To start with, the best suggested region" in texts(at.info)
    assert "Searched 39 of 40 images" in texts(at.caption)  # hits and charts on the first view
    assert at.session_state["query_id"] == 0  # the first image whose label names something
    assert "Clear region" in texts(at.markdown)  # the hint names the button that is always there
    at.button(key="suggestion-2").click().run()
    assert "To start with" not in texts(at.info)  # the user's own choice now


def test_a_link_to_an_image_without_a_region_asks_for_one(caches):
    at = page("pages/search.py", image="5").run()
    assert not at.exception
    assert at.session_state["query_id"] == 5  # the link wins over the first view's default
    assert "Highlight a region" in texts(at.info) and "To start with" not in texts(at.info)


def test_the_cache_picker_shows_names_and_the_chosen_caches_details_below(caches, small_cache):
    shutil.copytree(small_cache.path, caches / "a-cache-with-a-rather-long-name-for-the-sidebar")
    at = page("pages/dataset.py", cache="tiny").run()
    assert not at.exception
    picker = at.selectbox(key="dataset-cache")
    assert picker.value == "tiny" and sorted(picker.options) == ["a-cache-with-a-rather-long-name-for-the-sidebar",
                                                                 "tiny"]
    assert "synthetic synthetic (5x6x16) · 40 images" in texts(at.sidebar.caption)


def test_search_with_a_region_shows_hits_table_and_charts(caches):
    at = page("pages/search.py")
    at.session_state[REGION_OVERRIDE_KEY] = REGION
    at.run()
    assert not at.exception, at.exception
    assert "Searched 39 of 40 images" in texts(at.caption)  # the query image itself is excluded
    table = at.dataframe[0].value
    assert len(table) == 20 and list(table.columns[:4]) == ["rank", "id", "path", "score"]
    assert 0 not in set(table["id"]) and table["score"].is_monotonic_decreasing
    assert {"label", "domain", "location", "diagnoses"} <= set(table.columns)
    assert len(at.get("plotly_chart")) >= 3
    assert [b.label for b in at.get("download_button")] == ["Download CSV", "Download Parquet"]


def test_a_filter_restricts_the_searched_set(caches):
    at = page("pages/search.py")
    at.session_state[REGION_OVERRIDE_KEY] = REGION
    at.run()
    at.multiselect(key="search-filter-columns").set_value(["domain"]).run()
    at.multiselect(key="search-filter-domain").set_value(["out"]).run()
    assert not at.exception
    assert "Searched 15 of 40 images" in texts(at.caption)
    assert set(at.dataframe[0].value["domain"]) == {"out"}


def test_filters_that_match_nothing_say_so(caches):
    at = page("pages/search.py", filters='{"equals":{"domain":["out"]},"ranges":{"age":[20,21]}}')
    at.session_state[REGION_OVERRIDE_KEY] = REGION
    at.run()
    assert not at.exception
    assert "No image matches the filters" in texts(at.warning)


def test_a_shared_link_restores_the_search(caches):
    at = page("pages/search.py", cache="tiny", image="7", region=encode_region(REGION), k="5", per="location")
    at.run()
    assert not at.exception
    table = at.dataframe[0].value
    assert len(table) == 5 and table["location"].is_unique
    assert at.query_params["image"] == ["7"] or at.query_params["image"] == "7"


def test_a_link_whose_filter_values_are_gone_warns_and_keeps_the_rest(caches):
    at = page("pages/search.py", cache="tiny", image="3", region=encode_region(REGION),
              filters='{"equals":{"domain":["out","mars"],"planet":["x"]}}')
    at.run()
    assert not at.exception, at.exception
    warnings = texts(at.warning)
    assert "'mars' of 'domain' no longer occurs in this cache" in warnings
    assert "'planet', which this cache has no column for" in warnings
    assert at.multiselect(key="search-filter-domain").value == ["out"]  # what still exists is applied
    assert "Searched 15 of 40 images" in texts(at.caption)
    at.run()  # reported once, not at every rerun
    assert "mars" not in texts(at.warning)


def test_a_damaged_link_is_reported_not_fatal(caches):
    at = page("pages/search.py", image="seven", region="broken").run()
    assert not at.exception
    assert "`image`" in texts(at.warning) and "`region`" in texts(at.warning)


def test_an_upload_that_is_not_an_image_gets_a_message(caches):
    at = page("pages/search.py").run()
    at.radio(key="query-source").set_value("Upload an image").run()
    at.file_uploader(key="upload").upload("notes.png", b"this is not a png", "image/png").run()
    assert not at.exception
    assert "not an image" in texts(at.error)


def test_an_uploaded_image_is_searched(caches, monkeypatch):
    # the tiny synthetic cache has no model; give the upload path a stand-in encoder of the right shape
    features = np.random.default_rng(3).random((5, 6, 16)).astype(np.float32)
    encoded = EncodedImage(Image.new("RGB", (48, 48)), features, (0, 0, 5, 6))
    monkeypatch.setattr(resources, "encode_upload", lambda *a: encoded)
    at = searched_upload("pages/search.py", "query-source", "upload")
    assert not at.exception
    assert "Searched 40 of 40 images" in texts(at.caption)


def test_dataset_page_filters_and_counts(caches):
    at = page("pages/dataset.py").run()
    assert not at.exception
    assert "40 of 40 images" in texts(at.caption)
    at.multiselect(key="dataset-filter-columns").set_value(["label"]).run()
    at.multiselect(key="dataset-filter-label").set_value(["cat"]).run()
    assert "14 of 40 images" in texts(at.caption)
    assert len(at.get("plotly_chart")) >= 3


def test_the_dataset_page_keeps_its_state_in_the_address(caches, small_cache):
    shutil.copytree(small_cache.path, caches / "other")
    at = page("pages/dataset.py", cache="other", filters='{"equals":{"label":["cat","lion"]}}', page="1")
    at.run()
    assert not at.exception, at.exception
    assert at.selectbox(key="dataset-cache").value == "other"
    assert "14 of 40 images" in texts(at.caption)  # the link's filter, applied
    assert "'lion' of 'label' no longer occurs" in texts(at.warning)
    assert at.query_params["cache"] in ("other", ["other"])
    at.multiselect(key="dataset-filter-label").set_value(["dog"]).run()
    filters = at.query_params["filters"]
    assert '"dog"' in (filters[-1] if isinstance(filters, list) else filters)  # edits go to the address


def test_the_compare_page_opens_a_shared_comparison(caches, small_cache):
    shutil.copytree(small_cache.path, caches / "tiny-copy")
    at = page("pages/compare.py", a="tiny", b="tiny-copy", image="4", k="6", region=encode_region(REGION))
    at.run()
    assert not at.exception, at.exception
    assert at.selectbox(key="compare-b").value == "tiny-copy" and at.number_input(key="compare-id").value == 4
    assert "6 of 6" in texts(at.metric)  # searched at once with the link's region
    params = {key: (v[-1] if isinstance(v, list) else v) for key, v in at.query_params.items()}
    assert params["a"] == "tiny" and params["b"] == "tiny-copy" and params["image"] == "4" and params["k"] == "6"
    assert params["region"] == encode_region(REGION)


def test_compare_searches_an_upload_encoded_by_each_cache(caches, small_cache, monkeypatch):
    shutil.copytree(small_cache.path, caches / "tiny-copy")
    features = np.random.default_rng(3).random((5, 6, 16)).astype(np.float32)
    seen = []

    def encode(cache_path, data, name, max_bytes, layer=None):  # the real upload checks, a stand-in model
        read_upload(data, name=name, max_bytes=max_bytes)
        seen.append(Path(cache_path).name)
        return EncodedImage(Image.new("RGB", (48, 48)), features, (0, 0, 5, 6))

    monkeypatch.setattr(resources, "encode_upload", encode)
    at = searched_upload("pages/compare.py", "compare-source", "compare-upload", a="tiny", b="tiny-copy")
    assert not at.exception, at.exception
    assert {"tiny", "tiny-copy"} <= set(seen)  # encoded by each cache's own model
    assert "10 of 10" in texts(at.metric)  # identical caches: identical hits, the query image not excluded
    at.file_uploader(key="compare-upload").upload("notes.png", b"not a picture", "image/png").run()
    assert not at.exception and "not an image" in texts(at.error)


def test_compare_page_needs_a_region_then_compares(caches, small_cache):
    shutil.copytree(small_cache.path, caches / "tiny-copy")
    at = page("pages/compare.py")
    at.run()
    assert "Highlight a region" in texts(at.info)
    at.session_state[REGION_OVERRIDE_KEY] = REGION
    at.selectbox(key="compare-b").set_value("tiny-copy").run()
    assert not at.exception
    assert "10 of 10" in texts(at.metric)  # the same features in both caches: identical top-k


def test_password_gate_shows_nothing_before_login(caches):
    at = page(None)  # through the entry script, as a browser reaches every page
    at.secrets["password"] = "s3cret"
    at.run()
    assert not at.exception
    assert [t.key for t in at.text_input] == ["password-input"]
    assert not at.dataframe and not at.get("plotly_chart") and not at.image and not at.radio


def gated_app():
    import streamlit as st

    from dashboard.ui import access

    access.access_gate_ui()
    st.write("page content")


def test_password_gate_lets_in_only_the_right_password():
    at = AppTest.from_function(gated_app)
    at.secrets["password"] = "s3cret"
    at.run()
    assert "page content" not in texts(at.markdown)
    at.text_input(key="password-input").set_value("wrong").run()
    assert "Wrong password" in texts(at.error) and "page content" not in texts(at.markdown)
    at.text_input(key="password-input").set_value("s3cret").run()
    assert not at.exception and "page content" in texts(at.markdown)


def test_without_secrets_the_app_is_open():
    at = AppTest.from_function(gated_app).run()
    assert "page content" in texts(at.markdown)


def test_search_from_a_hit_makes_it_the_query(caches):
    at = page("pages/search.py")
    at.session_state[REGION_OVERRIDE_KEY] = REGION
    at.run()
    first_hit = at.dataframe[0].value.iloc[0]
    at.session_state[REGION_OVERRIDE_KEY] = None  # the hit's window becomes the region, not the override
    at.button(key=f"requery-{int(first_hit['id'])}").click().run()
    assert not at.exception
    assert at.number_input(key="query_id").value == int(first_hit["id"])
    table = at.dataframe[0].value
    assert int(first_hit["id"]) not in set(table["id"])  # it is now the (excluded) query, searched with its window


def test_hosted_app_never_writes_its_caches_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHES_DIR_ENV, str(tmp_path))
    monkeypatch.chdir(ROOT)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.secrets["password"] = "s3cret"
    at.session_state["authenticated"] = True
    at.run()
    assert not at.exception
    assert "No usable cache" in texts(at.error)
    assert list(tmp_path.iterdir()) == []  # no demo build in hosted mode


def test_the_label_chart_follows_the_manifests_label_column(caches):
    """A source names its class column in the manifest; the page uses it, whatever the column is called."""
    import json

    manifest_path = caches / "tiny" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["sources"][0]["label_column"] = "location"
    manifest_path.write_text(json.dumps(manifest))
    at = page("pages/search.py")
    at.session_state[REGION_OVERRIDE_KEY] = REGION
    at.run()
    assert not at.exception
    specs = [chart.proto.spec for chart in at.get("plotly_chart")]
    assert any("Hits with the query's location" in spec for spec in specs)
    assert not any("query's label" in spec for spec in specs)


@pytest.fixture
def indexed_caches(tmp_path, monkeypatch) -> Path:
    """2,500 images: enough that a two-tier search (rerank 1,000) reads less than an exact scan."""
    from cache_builder.index import build_index
    from cache_builder.synthetic import write_array_cache

    rng = np.random.default_rng(5)
    images = rng.integers(0, 255, size=(2500, 48, 48, 3), dtype=np.uint8)
    domains = pd.DataFrame({"domain": ["in" if i % 3 else "out" for i in range(2500)]})
    write_array_cache(tmp_path / "big", rng.standard_normal((2500, 5, 6, 64), dtype=np.float32), input_size=48,
                      images=images, metadata=domains)
    shutil.copytree(tmp_path / "big", tmp_path / "bare")
    build_index(tmp_path / "big")
    monkeypatch.setenv(CACHES_DIR_ENV, str(tmp_path))
    monkeypatch.chdir(ROOT)
    return tmp_path


def test_a_two_tier_search_says_so_with_its_recall_and_labels_its_chart(indexed_caches):
    at = page("pages/search.py", cache="big", image="3", region=encode_region(REGION), mode="approx")
    at.run()
    assert not at.exception, at.exception
    caption = texts(at.caption)
    assert "approximate: two-tier: a 32-dimension first stage over 2,499 images, its best 1,000 reranked" in caption
    assert "recall@10 1 cell" in caption and at.radio(key="search-mode").value == "approx"
    specs = [chart.proto.spec for chart in at.get("plotly_chart")]
    assert any("Approximate (first-stage) scores of all 2,499 searched images" in spec for spec in specs)
    assert at.query_params["mode"] in ("approx", ["approx"])
    at.radio(key="search-mode").set_value("exact").run()
    assert "exact: exact search requested" in texts(at.caption)
    assert not any("Approximate" in chart.proto.spec for chart in at.get("plotly_chart"))


def test_approx_on_a_cache_without_an_index_explains_and_the_page_keeps_working(indexed_caches):
    at = page("pages/search.py", cache="bare", image="3", region=encode_region(REGION), mode="approx")
    at.run()
    assert not at.exception, at.exception
    assert "python -m cache_builder index" in texts(at.warning)
    at.radio(key="search-mode").set_value("auto").run()
    assert "Searched 2,499 of 2,500 images" in texts(at.caption)


@pytest.fixture
def photo_caches(tmp_path, monkeypatch) -> Path:
    """Like an `imagenet:` cache of real photos: 65 classes (too many to chart as groups), one source folder
    with a long path, no domain."""
    from cache_builder.synthetic import write_array_cache

    rng = np.random.default_rng(8)
    n = 130
    metadata = pd.DataFrame({"label": [f"class-{i % 65:02d}" for i in range(n)],
                             "source": ["/home/someone/datasets/imagenet/val/one-folder-of-photos"] * n,
                             "split": ["val" if i % 2 else "train" for i in range(n)]})
    write_array_cache(tmp_path / "photos", rng.standard_normal((n, 5, 6, 16), dtype=np.float32), input_size=48,
                      images=rng.integers(0, 255, size=(n, 48, 48, 3), dtype=np.uint8), metadata=metadata,
                      label_column="label")
    monkeypatch.setenv(CACHES_DIR_ENV, str(tmp_path))
    monkeypatch.chdir(ROOT)
    return tmp_path


def test_charts_adapt_to_a_cache_without_a_domain_and_with_many_classes(photo_caches):
    at = page("pages/search.py", cache="photos", image="3", region=encode_region(REGION))
    at.run()
    assert not at.exception, at.exception
    group_by = at.selectbox(key="chart-column")
    assert group_by.value == "split" and "source" not in group_by.options  # one source: nothing to compare
    specs = [chart.proto.spec for chart in at.get("plotly_chart")]
    assert any("The top hits' labels" in spec for spec in specs)  # 65 classes: which labels the hits carry
    assert not any("Hits with the query's label" in spec for spec in specs)  # no one-bar "all" chart
    assert "share the query's label 'class-03'" in texts(at.caption)
    assert "(missing)" not in "".join(specs)


def test_a_clicked_suggested_region_is_searched_and_goes_into_the_link(caches, small_cache):
    at = page("pages/search.py").run()
    assert not at.exception
    expected = suggest_regions(small_cache.image_features(0), small_cache.image_size)
    assert expected, "the tiny cache's image 0 has something that stands out"
    at.button(key="suggestion-1").click().run()
    assert not at.exception
    assert "Highlight a region" not in texts(at.info)  # a region now: searched
    assert "Searched 39 of 40 images" in texts(at.caption)
    weights = expected[0].weights(small_cache.image_size, small_cache.grid)
    assert at.query_params["region"] == encode_region(weights)


# ------------------------------------------------------------------------------------ a cache of two layers
@pytest.fixture
def layered(caches, small_cache) -> Path:
    """The tiny cache's images and metadata with two layers: `late` (its own 5x6x16 features, stored first) and
    `early` (10x12x8, each late cell's first 8 channels spread over 2x2 cells, plus noise)."""
    late = small_cache.features().float().numpy()
    early = np.repeat(np.repeat(late[..., :8], 2, axis=1), 2, axis=2)
    early = np.maximum(early + np.random.default_rng(1).normal(0, 0.3, early.shape), 0).astype(np.float32)
    images = np.stack([np.asarray(small_cache.load_image(i)) for i in range(small_cache.size)])
    metadata = small_cache.metadata.rows(None).drop(columns=["id", "path"])
    from cache_builder.synthetic import write_array_cache

    write_array_cache(caches / "layered", late, metadata=metadata, input_size=48, images=images, layer="late",
                      label_column="label", more_layers={"early": early})
    return caches / "layered"


def test_the_layers_view_searches_the_region_at_every_layer_and_a_row_opens_its_layer(layered):
    at = page("pages/search.py", cache="layered")
    at.session_state[REGION_OVERRIDE_KEY] = REGION
    at.run()
    assert not at.exception, at.exception
    assert at.selectbox(key=SearchSession.LAYER).value == "late"
    assert "Searched 39 of 40 images" in texts(at.caption)
    at.radio(key=SearchSession.VIEW).set_value("layers").run()
    assert not at.exception, at.exception
    assert at.query_params["view"] == "layers" and at.query_params["layer"] == "late"
    rows = [b for b in at.button if b.key and b.key.startswith("layer-row-")]
    assert [b.key for b in rows] == ["layer-row-late", "layer-row-early"]  # one row per layer, stored order
    assert "10x12 cells, 8 channels" in texts(at.markdown) and "5x6 cells, 16 channels" in texts(at.markdown)
    assert texts(at.caption).count("share the query's label") == 2
    assert len(at.get("plotly_chart")) == 2  # each layer's composition
    assert [b.label for b in at.get("download_button")] == ["Download every layer's hits (CSV)"]
    at.button(key="layer-row-early").click().run()
    assert not at.exception, at.exception
    assert at.selectbox(key=SearchSession.LAYER).value == "early" and at.radio(key=SearchSession.VIEW).value == "hits"
    assert at.query_params["layer"] == "early" and "view" not in at.query_params
    assert "Searched 39 of 40 images" in texts(at.caption)  # the same region, resampled to the early grid
    assert at.query_params["region"].startswith("10x12:")


def test_a_link_names_the_layer_and_an_unknown_layer_warns(layered):
    at = page("pages/search.py", cache="layered", layer="early", image="3", region=encode_region(REGION))
    at.run()
    assert not at.exception, at.exception
    assert at.selectbox(key=SearchSession.LAYER).value == "early"
    assert "Searched 39 of 40 images" in texts(at.caption)  # the link's 5x6 region, on the early grid
    at = page("pages/search.py", cache="layered", layer="blocks.9").run()
    assert not at.exception
    assert "the link's layer 'blocks.9' is not in this cache" in texts(at.warning)
    assert at.selectbox(key=SearchSession.LAYER).value == "late"


def test_compare_puts_a_multi_layer_caches_other_layer_beside_it(layered):
    at = page("pages/compare.py", a="layered")
    at.session_state[REGION_OVERRIDE_KEY] = REGION
    at.run()
    assert not at.exception, at.exception
    assert at.selectbox(key="compare-b").value == "layered"
    assert at.selectbox(key="compare-a-layer").value == "late" and at.selectbox(key="compare-b-layer").value == "early"
    headers = texts(at.subheader)
    assert "A · layered: synthetic late" in headers and "B · layered: synthetic early" in headers
    assert at.query_params["layer_b"] == "early"
    shared = [m.value for m in at.metric][0]
    assert shared.endswith("of 10") and shared != "10 of 10"  # two layers: related, not identical, answers


def test_clear_region_stops_the_search_until_a_new_region(caches):
    at = page("pages/search.py").run()
    assert "Searched 39 of 40 images" in texts(at.caption)  # the first view's preselected region
    at.button(key="clear-region").click().run()
    assert not at.exception
    assert "Highlight a region" in texts(at.info) and "region" not in at.query_params
    at.button(key="suggestion-1").click().run()
    assert "Searched 39 of 40 images" in texts(at.caption)


def test_an_upload_in_the_layers_view_is_encoded_at_every_layer(layered, monkeypatch):
    from dashboard.feature_cache import FeatureCache

    seen = []

    def encode(cache_path, data, name, max_bytes, layer=None):  # the real upload checks, a stand-in model
        read_upload(data, name=name, max_bytes=max_bytes)
        seen.append(layer)
        cache = FeatureCache.open(cache_path, layer)
        features = cache.image_features(9)  # as if the upload were image 9: each layer's own features
        cache.metadata.close()
        return EncodedImage(Image.new("RGB", (48, 48)), features, (0, 0, *features.shape[:2]))

    monkeypatch.setattr(resources, "encode_upload", encode)
    at = searched_upload("pages/search.py", "query-source", "upload", cache="layered", view="layers")
    assert not at.exception, at.exception
    assert {"late", "early"} <= set(seen)  # encoded by the model at each layer
    assert [b.key for b in at.button if b.key and b.key.startswith("layer-row-")] == ["layer-row-late",
                                                                                     "layer-row-early"]
    captions = [c.value for c in at.caption]
    assert captions.count("1.000") == 2  # each layer finds image 9 itself: its own features at that layer
    assert not any("share the query's label" in c for c in captions)  # an upload has no label to compare


def test_the_dataset_page_of_a_multi_layer_cache_asks_for_no_layer(layered):
    at = page("pages/dataset.py", cache="layered").run()
    assert not at.exception
    assert "Cache" in [s.label for s in at.selectbox] and "Layer" not in [s.label for s in at.selectbox]
    assert "synthetic 2 layers · 40 images" in texts(at.caption)
