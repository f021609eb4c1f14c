"""Hosted mode with a password, against the real server: nothing of the app is served before login.

What the HTTP side of Streamlit (1.67) does, and so what is provable here:
- Pages render over the websocket, per session; the gate stops every page of a session that has not logged in
  before it renders anything, so a stranger's session gets no title, no table and no image.
- Images reach the browser through `/media/<id>.<ext>`: one in-memory store per process, and the endpoint serves
  a stored file to any client that names it, without looking at sessions or cookies. The id is a hash of the
  image's bytes, so it cannot be enumerated or guessed without the image itself, and a stranger's session never
  receives one. A URL copied out of a member's page is a bearer link, though: files stay stored while a
  session references them, and a closed tab's session expires from Streamlit's reconnect cache without being
  shut down (streamlit/streamlit#12506), so they can stay until the server restarts. Deployments that must not
  have such links put the whole server, /media included, behind their authenticating proxy.
- Nothing else on disk is served: not the caches folder, not the app's sources, not the secrets file.
"""

from __future__ import annotations

import re
import shutil
import urllib.error
import urllib.request

import pytest

from streamlit_server import ROOT, chromium, require_browser, running_app

pytestmark = pytest.mark.browser
PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def hosted_app(small_cache, tmp_path_factory):
    require_browser()
    tmp_path = tmp_path_factory.mktemp("hosted")
    caches = tmp_path / "caches"
    shutil.copytree(small_cache.path, caches / "tiny")
    secrets = tmp_path / "secrets.toml"
    secrets.write_text(f'password = "{PASSWORD}"\n')
    with running_app(caches, tmp_path / "streamlit.log", "--secrets.files", str(secrets)) as url:
        yield url, caches / "tiny", secrets


def media_urls(page) -> list[str]:
    return [src for src in page.eval_on_selector_all("img", "els => els.map(e => e.src)") if "/media/" in src]


def fetch(url: str) -> tuple[int, bytes]:
    """Status and body of a plain GET: no browser, no session, no cookie."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, b""


def status_of(url: str) -> int:
    return fetch(url)[0]


def test_nothing_is_served_before_login(hosted_app):
    from playwright.sync_api import expect

    url, _, _ = hosted_app
    with chromium() as browser:
        stranger = browser.new_page()
        for path in ("/dataset", "/caches", "/compare", "/?cache=tiny&image=3"):
            stranger.goto(url + path)
            expect(stranger.get_by_label("Password", exact=True)).to_be_visible(timeout=60_000)
            body = stranger.inner_text("body")
            assert "Search by region" not in body and "Dataset" not in re.sub(r"\s+", " ", body).split("Password")[-1]
            assert media_urls(stranger) == []
        stranger.get_by_label("Password", exact=True).fill("guess")
        stranger.keyboard.press("Enter")
        expect(stranger.get_by_text("Wrong password.")).to_be_visible(timeout=30_000)
        assert media_urls(stranger) == []

        member = browser.new_page()
        member.goto(url + "/dataset")
        member.get_by_label("Password", exact=True).fill(PASSWORD)
        member.keyboard.press("Enter")
        expect(member.get_by_text("40 of 40 images match the filters.")).to_be_visible(timeout=60_000)
        member.wait_for_function("() => [...document.images].some(i => i.src.includes('/media/'))",
                                 timeout=30_000)
        urls = media_urls(member)
        # the member's page has its images; the endpoint hands them to whoever has the URL (see the docstring)
        assert urls and status_of(urls[0]) == 200

    # a made-up media id is never served, whoever asks
    assert status_of(url + "/media/" + "0" * 56 + ".jpg") == 404


def test_no_file_of_the_cache_or_the_app_is_served_over_http(hosted_app):
    """Plain requests for the files behind the app, at every path a static route could map them to."""
    url, cache, secrets = hosted_app
    image = cache / "images" / "000" / "0000003.jpg"
    files = {image: image.read_bytes(), cache / "features.npy": (cache / "features.npy").read_bytes()[:64],
             secrets: PASSWORD.encode(), ROOT / "app.py": (ROOT / "app.py").read_bytes()[:200]}
    for path, secret_part in files.items():
        for root in (cache.parent.parent, cache.parent, cache, ROOT, secrets.parent):
            if not path.is_relative_to(root):
                continue
            relative = path.relative_to(root).as_posix()
            for prefix in ("", "app/static/", "static/", "media/", "component/"):
                status, body = fetch(f"{url}/{prefix}{relative}")
                assert secret_part not in body, f"/{prefix}{relative} served {path} (status {status})"
