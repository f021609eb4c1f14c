"""End to end in a real browser: start the app on a small real cache, draw a stroke, read the hits and the CSV.

Needs Debian's Chromium at /usr/bin/chromium (`apt-get install chromium`). Without it the test skips with that
message, except when VFS_REQUIRE_BROWSER=1 (as in CI), where a missing browser is a failure.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.browser


def require_browser() -> None:
    if CHROMIUM.exists():
        return
    message = "Chromium not found at /usr/bin/chromium: `sudo apt-get install chromium` to run the browser test"
    if os.environ.get("VFS_REQUIRE_BROWSER") == "1":
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def demo_caches(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("caches")
    subprocess.run([sys.executable, "-m", "cache_builder", "build", "--source", "demo", "--demo-size", "60",
                    "--out", str(root / "demo"), "--quiet"], cwd=ROOT, check=True, capture_output=True)
    return root


@pytest.fixture
def app_url(demo_caches, tmp_path):
    require_browser()
    port = free_port()
    log = (tmp_path / "streamlit.log").open("w")
    env = {**os.environ, "VFS_CACHES_DIR": str(demo_caches)}
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port",
         str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"streamlit did not start:\n{(tmp_path / 'streamlit.log').read_text()}")
            time.sleep(0.3)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        print((tmp_path / "streamlit.log").read_text()[-3000:])  # shown by pytest only when the test failed


def test_draw_a_stroke_search_and_download(app_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1100}, accept_downloads=True)
            page.goto(app_url)
            canvas = page.locator("canvas.upper-canvas").first
            expect(canvas).to_be_visible(timeout=60_000)
            box = canvas.bounding_box()
            x0, y0 = box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5
            page.mouse.move(x0, y0)
            page.mouse.down()
            for step in range(1, 11):
                page.mouse.move(x0 + step * box["width"] * 0.04, y0 + step * 3)
            page.mouse.up()

            expect(page.get_by_text("Top 20")).to_be_visible(timeout=60_000)
            expect(page.get_by_role("button", name="Search from here")).to_have_count(20, timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "search.png"), full_page=True)

            with page.expect_download(timeout=30_000) as download_info:
                page.get_by_role("button", name="Download CSV").click()
            csv = Path(download_info.value.path()).read_bytes()
        finally:
            browser.close()
    table = pd.read_csv(io.BytesIO(csv))
    assert len(table) == 20
    assert list(table.columns[:12]) == ["rank", "id", "path", "score", "row", "col", "height", "width",
                                        "x0", "y0", "x1", "y1"]
    assert {"species", "location", "domain"} <= set(table.columns)
    assert table["score"].between(-1, 1).all() and table["score"].is_monotonic_decreasing
