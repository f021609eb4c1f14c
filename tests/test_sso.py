"""The single sign-on check (dashboard/sso.py) against the test provider: right credentials pass, wrong ones and
an unreachable provider are named, named-provider sections are left to Streamlit."""

from __future__ import annotations

from oidc_provider import running_provider
from streamlit_server import free_port

from dashboard.sso import client_problem


def test_the_provider_is_asked_whether_it_accepts_the_apps_credentials():
    with running_provider("app", "s3cret") as provider:
        auth = {"client_id": "app", "client_secret": "s3cret", "redirect_uri": "http://127.0.0.1:1/oauth2callback",
                "server_metadata_url": f"{provider}/.well-known/openid-configuration"}
        assert client_problem(auth) is None
        assert "refused this app's client id or secret (invalid_client)" in client_problem(
            {**auth, "client_secret": "wrong"})
        assert "invalid_client" in client_problem({**auth, "client_id": "someone-else"})
    gone = {**auth, "server_metadata_url": f"http://127.0.0.1:{free_port()}/.well-known/openid-configuration"}
    assert "unreachable" in client_problem(gone)
    assert client_problem({"google": {"client_id": "x"}, "redirect_uri": "r", "cookie_secret": "c"}) is None
