"""Hosted mode with single sign-on (`[auth]`, Streamlit's OIDC login) against a real OpenID Connect provider on
127.0.0.1 (tests/oidc_provider.py), in Chromium: nothing before login, a login through the provider, and a wrong
client secret refused."""

from __future__ import annotations

import shutil

import pytest

from oidc_provider import running_provider
from streamlit_server import chromium, free_port, require_browser, running_app

pytestmark = pytest.mark.browser
CLIENT_ID, SECRET = "visual-feature-search", "the-right-secret"


def secrets_file(path, app_port: int, provider: str, client_secret: str):
    path.write_text(f"""
[auth]
redirect_uri = "http://127.0.0.1:{app_port}/oauth2callback"
cookie_secret = "a-long-random-cookie-secret-for-the-test"
client_id = "{CLIENT_ID}"
client_secret = "{client_secret}"
server_metadata_url = "{provider}/.well-known/openid-configuration"
""")
    return path


@pytest.mark.parametrize("client_secret", [SECRET, "a-wrong-secret"])
def test_single_sign_on_through_a_real_provider(small_cache, tmp_path, client_secret):
    from playwright.sync_api import expect

    require_browser()
    caches = tmp_path / "caches"
    shutil.copytree(small_cache.path, caches / "tiny")
    port = free_port()
    with running_provider(CLIENT_ID, SECRET) as provider:
        secrets = secrets_file(tmp_path / "secrets.toml", port, provider, client_secret)
        log = tmp_path / "streamlit.log"
        with running_app(caches, log, "--secrets.files", str(secrets), port=port,
                         env={"AUTHLIB_INSECURE_TRANSPORT": "1"}) as url, chromium() as browser:
            page = browser.new_page()
            page.goto(url)
            if client_secret != SECRET:  # said before anyone tries to log in, and nothing else is shown
                expect(page.get_by_text("the identity provider refused this app's client id or secret "
                                        "(invalid_client)")).to_be_visible(timeout=60_000)
                assert page.get_by_role("button", name="Log in").count() == 0
                assert page.get_by_text("Search by region").count() == 0
                return
            login = page.get_by_role("button", name="Log in")
            expect(login).to_be_visible(timeout=60_000)
            assert page.get_by_text("Search by region").count() == 0  # nothing of the app before login
            assert not [s for s in page.eval_on_selector_all("img", "els => els.map(e => e.src)") if "/media/" in s]
            login.click()
            page.get_by_role("button", name="Sign in").click(timeout=30_000)  # the provider's page
            expect(page.get_by_text("Search by region")).to_be_visible(timeout=60_000)  # logged in: the app
            expect(page.locator("img[src*='/media/']").first).to_be_visible(timeout=60_000)
