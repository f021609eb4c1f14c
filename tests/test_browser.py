"""End to end in a real browser: start the app on a small real cache, draw a stroke, read the hits and the CSV.

Needs Debian's Chromium at /usr/bin/chromium (`apt-get install chromium`). Without it the test skips with that
message, except when VFS_REQUIRE_BROWSER=1 (as in CI), where a missing browser is a failure.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from dashboard import catalog
from streamlit_server import ROOT, chromium, require_browser, running_app
from wide_frames import EDGE_FRAMES, write_frames

ARTIFACTS = ROOT / "test-artifacts"

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def demo_caches(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("caches")
    subprocess.run([sys.executable, "-m", "cache_builder", "build", "--source", "demo", "--demo-size", "60",
                    *(arg for layer in catalog.DEMO_LAYERS for arg in ("--layer", layer)),
                    "--out", str(root / "demo"), "--quiet"], cwd=ROOT, check=True, capture_output=True)
    return root


@pytest.fixture
def app_url(demo_caches, tmp_path):
    require_browser()
    log = tmp_path / "streamlit.log"
    with running_app(demo_caches, log) as url:
        yield url
    # stopped: DuckDB's bindings found no connection still open (they printed ~40 "leaked" lines before)
    assert "nanobind: leaked" not in log.read_text()


def test_draw_a_stroke_search_and_download(app_url, tmp_path):
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(exist_ok=True)
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1500, "height": 1100}, accept_downloads=True)
        page.goto(app_url)
        canvas = page.locator("canvas.upper-canvas").first
        expect(canvas).to_be_visible(timeout=60_000)
        # the first view already answers: an image with an animal, its best suggested region searched
        expect(page.get_by_text("To start with, the best suggested region")).to_be_visible(timeout=60_000)
        expect(page.get_by_role("button", name="Search from here")).to_have_count(20, timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "first-screen.png"), full_page=True)

        box = canvas.bounding_box()
        x0, y0 = box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5
        page.mouse.move(x0, y0)
        page.mouse.down()
        for step in range(1, 11):
            page.mouse.move(x0 + step * box["width"] * 0.04, y0 + step * 3)
        page.mouse.up()

        expect(page.get_by_text("To start with, the best suggested region")).to_have_count(0, timeout=60_000)
        expect(page.get_by_text("Top 20")).to_be_visible(timeout=60_000)  # the drawn region's search
        expect(page.get_by_role("button", name="Search from here")).to_have_count(20, timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "search.png"), full_page=True)

        with page.expect_download(timeout=30_000) as download_info:
            page.get_by_role("button", name="Download CSV").click()
        csv = Path(download_info.value.path()).read_bytes()

        # Clear region, always on the page (the canvas's own toolbar shows only under the pointer): no region
        page.get_by_role("button", name="Clear region").click()
        expect(page.get_by_text("Highlight a region of the query image to search.")).to_be_visible(timeout=60_000)
        expect(page.get_by_role("button", name="Search from here")).to_have_count(0, timeout=30_000)

        # a suggested region replaces the drawing: one click, and its region is what is searched
        page.get_by_role("button", name="1", exact=True).click()
        expect(page.get_by_text("Region from the link, a clicked hit or a suggestion")).to_be_visible(timeout=60_000)
        expect(page.get_by_role("button", name="Search from here")).to_have_count(20, timeout=30_000)
        assert "region=" in page.url
        page.screenshot(path=str(ARTIFACTS / "suggested.png"), full_page=True)

        # the Layers view: the same region at both of the demo's layers, one row each; a row opens its layer
        page.get_by_text("Every layer", exact=True).click()
        opens = page.get_by_role("button", name="Open this layer")
        expect(opens).to_have_count(2, timeout=60_000)
        expect(page.get_by_text("28x28 cells, 40 channels")).to_be_visible(timeout=30_000)
        assert "view=layers" in page.url
        opens.nth(1).scroll_into_view_if_needed()
        page.wait_for_timeout(500)  # the rows' charts draw
        page.screenshot(path=str(ARTIFACTS / "layers.png"))
        opens.nth(1).click()
        expect(page.get_by_text("Top hits at blocks.2")).to_be_visible(timeout=60_000)
        expect(page.get_by_role("button", name="Search from here")).to_have_count(20, timeout=60_000)
        assert "layer=blocks.2" in page.url and "view=layers" not in page.url
    table = pd.read_csv(io.BytesIO(csv))
    assert len(table) == 20
    assert list(table.columns[:12]) == ["rank", "id", "path", "score", "row", "col", "height", "width",
                                        "x0", "y0", "x1", "y1"]
    assert {"species", "location", "domain"} <= set(table.columns)
    assert table["score"].between(-1, 1).all() and table["score"].is_monotonic_decreasing


@pytest.fixture(scope="module")
def wide_caches(tmp_path_factory) -> Path:
    """A whole-frame cache of 16:9 frames whose object sits at the far left edge."""
    root = tmp_path_factory.mktemp("wide-caches")
    frames = write_frames(tmp_path_factory.mktemp("wide-frames"))
    subprocess.run([sys.executable, "-m", "cache_builder", "build", "--source", f"folder:{frames}", "--frame", "fit",
                    "--out", str(root / "wide"), "--quiet"], cwd=ROOT, check=True, capture_output=True)
    return root


def test_a_wide_frame_is_shown_whole_and_a_region_at_its_edge_finds_its_kind(wide_caches, tmp_path):
    """The query frame 00.png (object at the far left edge) is drawn on whole, at 16:9; a stroke over the object
    finds the other frames that have it there. The screenshot is test-artifacts/wide-frame.png."""
    from playwright.sync_api import expect

    require_browser()
    ARTIFACTS.mkdir(exist_ok=True)
    with running_app(wide_caches, tmp_path / "streamlit.log") as url, chromium() as browser:
        page = browser.new_page(viewport={"width": 1500, "height": 1100}, accept_downloads=True)
        page.goto(url + "/?k=5")
        canvas = page.locator("canvas.upper-canvas").first
        expect(canvas).to_be_visible(timeout=60_000)
        box = canvas.bounding_box()
        assert box["width"] / box["height"] == pytest.approx(384 / 224, rel=0.02)  # the whole frame, not a square
        clipped = canvas.evaluate("""c => { const r = c.getBoundingClientRect(); let e = c.parentElement;
            while (e) { const p = e.getBoundingClientRect(); const s = getComputedStyle(e);
                if (s.overflow !== 'visible' && (r.right > p.right + 1 || r.bottom > p.bottom + 1)) return true;
                e = e.parentElement; } return false; }""")
        assert not clipped, "the canvas is wider than the column that holds it"
        x, y = box["x"] + box["width"] * 0.04, box["y"] + box["height"] * 0.38  # on the object, at the edge
        page.mouse.move(x, y)
        page.mouse.down()
        for step in range(1, 8):
            page.mouse.move(x + step * 2, y + step * box["height"] * 0.03)
        page.mouse.up()
        expect(page.get_by_text("Top 5")).to_be_visible(timeout=60_000)
        expect(page.get_by_role("button", name="Search from here")).to_have_count(5, timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "wide-frame.png"), full_page=True)
        page.get_by_role("button", name="Search from here").first.scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / "wide-frame-hits.png"))
        with page.expect_download(timeout=30_000) as download_info:
            page.get_by_role("button", name="Download CSV").click()
        table = pd.read_csv(io.BytesIO(Path(download_info.value.path()).read_bytes()))
    assert len(table) == 5 and (table["col"] <= 1).all()
    found = {int(Path(p).stem) for p in table["path"]}
    assert len(found & set(EDGE_FRAMES)) >= 4, table[["path", "score", "col"]]
