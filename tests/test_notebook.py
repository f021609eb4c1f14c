"""The notebook API (dashboard/notebook.py): the README's example runs as written, and its answers are the
search's."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cache_builder.build import BuildOptions, build_cache
from cache_builder.sources import SourceOptions, parse_source
from dashboard import catalog
from dashboard import notebook as vfs
from dashboard.geometry import QueryError, box_mask, mask_to_grid
from dashboard.metadata import FilterError
from dashboard.search import SearchRequest, search_regions

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("caches") / "demo"
    build_cache([parse_source("demo", SourceOptions(demo_size=60))], out,
                BuildOptions(model="efficientnet_lite0", layers=catalog.DEMO_LAYERS, batch_size=32, workers=0,
                             index=False))
    return out


def readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.search(r"<!-- notebook-example -->\n```python\n(.*?)```", text, re.S).group(1)


def test_the_readmes_example_runs(demo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "caches").symlink_to(demo.parent)
    scope: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), scope)  # noqa: S102 - our own documentation
    hits, sheet = scope["hits"], scope["sheet"]
    assert isinstance(hits, pd.DataFrame) and 0 < len(hits) <= 10
    assert (hits["domain"] == "out").all() and hits["location"].is_unique and 42 not in set(hits["id"])
    assert isinstance(sheet, Image.Image) and sheet.width == 5 * 160 and (tmp_path / "hits.png").is_file()
    assert len(scope["upload"]) == 5 and len(scope["by_box"]) == 10
    early = scope["early_hits"]  # the same box at the early layer: scored there, so other scores
    assert len(early) == 10 and list(early["score"]) != list(scope["by_box"]["score"])


def test_a_box_search_is_the_search_requests_answer(demo):
    cache = vfs.open_cache(demo)
    hits = vfs.search(cache, image_id=3, region=(30, 40, 150, 170), k=8)
    weights = mask_to_grid(box_mask(cache.image_size, (30, 40, 150, 170)), cache.grid)
    expected = search_regions(SearchRequest(cache=cache, weights=weights, image_id=3, k=8)).hits
    pd.testing.assert_frame_equal(hits, expected)
    grid_mask = vfs.search(cache, image_id=3, region=weights, k=8)
    pd.testing.assert_frame_equal(grid_mask, expected)


def test_bad_arguments_raise_the_pages_errors(demo):
    cache = vfs.open_cache(demo)
    with pytest.raises(QueryError, match="the mask is 5x5"):
        vfs.search(cache, image_id=1, region=np.ones((5, 5)))
    with pytest.raises(FilterError, match="no column 'colour'"):
        vfs.search(cache, image_id=1, region=(0, 0, 50, 50), where={"colour": "red"})
    with pytest.raises(QueryError, match="not both"):
        vfs.suggest(cache)
    with pytest.raises(QueryError):
        vfs.search(cache, image_id=1, region=(0, 0, 0, 0))  # an empty box: nothing to search
