"""The Streamlit app through AppTest: pages load, first start builds the demo, broken caches are explained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from streamlit.testing.v1 import AppTest

from cache_builder.sources import demo
from dashboard import catalog
from dashboard.settings import CACHES_DIR_ENV

ROOT = Path(__file__).resolve().parents[1]


def app(caches: Path, monkeypatch) -> AppTest:
    monkeypatch.setenv(CACHES_DIR_ENV, str(caches))
    monkeypatch.chdir(ROOT)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.switch_page("pages/caches.py")
    return at


def test_caches_page_lists_a_cache(small_cache, tmp_path, monkeypatch):
    shutil.copytree(small_cache.path, tmp_path / "tiny")
    at = app(tmp_path, monkeypatch).run()
    assert not at.exception
    assert "tiny" in [h.value for h in at.subheader]
    assert "40" in [m.value for m in at.metric]
    assert any("search engine: native kernel (" in c.value for c in at.caption)  # the kernel built here
    assert any("no usable first-stage index (missing): searches are exact" in c.value for c in at.caption)


def test_caches_page_shows_a_caches_first_stage_index(small_cache, tmp_path, monkeypatch):
    from cache_builder.index import build_index

    shutil.copytree(small_cache.path, tmp_path / "tiny")
    build_index(tmp_path / "tiny", dims=32)
    at = app(tmp_path, monkeypatch).run()
    assert not at.exception
    assert any("first-stage index: 32 dimensions per cell" in c.value and "run exact (the cache fits in RAM)"
               in c.value for c in at.caption)


def test_broken_cache_is_explained_and_others_still_shown(small_cache, tmp_path, monkeypatch):
    shutil.copytree(small_cache.path, tmp_path / "good")
    shutil.copytree(small_cache.path, tmp_path / "old")
    manifest = json.loads((tmp_path / "old" / "manifest.json").read_text())
    manifest["format_version"] = 0
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(manifest))
    at = app(tmp_path, monkeypatch).run()
    assert not at.exception
    assert any("format version 0" in e.value for e in at.error)
    assert "good" in [h.value for h in at.subheader]


def test_first_start_builds_the_demo_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "DEFAULT_DEMO_SIZE", 16)
    monkeypatch.setenv(CACHES_DIR_ENV, str(tmp_path))
    monkeypatch.chdir(ROOT)
    first = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300).run()  # the entry script builds
    assert not first.exception
    at = app(tmp_path, monkeypatch).run()
    assert (tmp_path / catalog.DEMO_CACHE_NAME / "manifest.json").is_file()
    at.run()
    assert "demo" in [h.value for h in at.subheader]
    assert "16" in [m.value for m in at.metric]
    assert catalog.find_caches(tmp_path)[0].manifest.layer_names == list(catalog.DEMO_LAYERS)
    assert ", ".join(catalog.DEMO_LAYERS) in [m.value for m in at.metric]  # an early layer and the last


def test_the_shipped_config_watches_no_files():
    """A recursive watch of the project folder (a multi-GB .venv, caches/) flooded the log on first start."""
    import tomllib

    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["fileWatcherType"] == "none"
    assert config["server"]["maxUploadSize"] == 20


def test_caches_page_says_where_each_shard_of_a_sharded_cache_is_served(small_cache, tmp_path, monkeypatch):
    from cache_builder.sharding import split_cache

    split_cache(small_cache.path, tmp_path / "split", shard_size=15)
    at = app(tmp_path, monkeypatch).run()
    assert not at.exception
    assert any("one per shard (3)" in c.value for c in at.caption)
    assert at.expander[0].label == "Shards (3) and where they are served"
    placement = at.expander[0].text[0].value
    assert "shard 2 " in placement and "ids 30..39" in placement and "this process" in placement


def test_caches_page_lists_a_cache_without_display_images(small_cache, tmp_path, monkeypatch):
    shutil.copytree(small_cache.path, tmp_path / "bare")
    shutil.rmtree(tmp_path / "bare" / "images")  # e.g. a synthetic benchmark cache
    at = app(tmp_path, monkeypatch).run()
    assert not at.exception
    assert "bare" in [h.value for h in at.subheader]


def test_single_sign_on_can_run_in_the_pinned_environment():
    """An `[auth]` section makes the gate show Streamlit's *Log in*, which needs Authlib (>= 1.3.2) installed:
    requirements.txt pins it, or every login of a hosted deployment would fail."""
    from streamlit.auth_util import is_authlib_installed

    assert is_authlib_installed()
