"""Hosted mode with a password, against the real server: nothing of the app is served before login.

Streamlit serves images through its media endpoint (`/media/<id>.<ext>`), registered per session when a page
renders them; before login the gate stops every page before it renders anything, so no media exists for that
session and no media URL can be learned from it.
"""

from __future__ import annotations

import re
import shutil
import urllib.error
import urllib.request

import pytest

from streamlit_server import chromium, require_browser, running_app

pytestmark = pytest.mark.browser
PASSWORD = "correct horse battery staple"


@pytest.fixture
def hosted_app(small_cache, tmp_path):
    require_browser()
    caches = tmp_path / "caches"
    shutil.copytree(small_cache.path, caches / "tiny")
    secrets = tmp_path / "secrets.toml"
    secrets.write_text(f'password = "{PASSWORD}"\n')
    with running_app(caches, tmp_path / "streamlit.log", "--secrets.files", str(secrets)) as url:
        yield url


def media_urls(page) -> list[str]:
    return [src for src in page.eval_on_selector_all("img", "els => els.map(e => e.src)") if "/media/" in src]


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_nothing_is_served_before_login(hosted_app):
    from playwright.sync_api import expect

    with chromium() as browser:
        stranger = browser.new_page()
        for path in ("/dataset", "/caches", "/compare", "/?cache=tiny&image=3"):
            stranger.goto(hosted_app + path)
            expect(stranger.get_by_label("Password", exact=True)).to_be_visible(timeout=60_000)
            body = stranger.inner_text("body")
            assert "Search by region" not in body and "Dataset" not in re.sub(r"\s+", " ", body).split("Password")[-1]
            assert media_urls(stranger) == []
        stranger.get_by_label("Password", exact=True).fill("guess")
        stranger.keyboard.press("Enter")
        expect(stranger.get_by_text("Wrong password.")).to_be_visible(timeout=30_000)
        assert media_urls(stranger) == []

        member = browser.new_page()
        member.goto(hosted_app + "/dataset")
        member.get_by_label("Password", exact=True).fill(PASSWORD)
        member.keyboard.press("Enter")
        expect(member.get_by_text("40 of 40 images match the filters.")).to_be_visible(timeout=60_000)
        member.wait_for_function("() => [...document.images].some(i => i.src.includes('/media/'))",
                                 timeout=30_000)
        urls = media_urls(member)
        assert urls and status_of(urls[0]) == 200  # served to the session that rendered it

    # a made-up media id is never served, whoever asks
    assert status_of(hosted_app + "/media/" + "0" * 56 + ".jpg") == 404
