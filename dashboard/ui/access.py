"""Hosted mode: who may see anything. Every page calls `access_gate_ui` first (Streamlit serves files of pages/
directly, bypassing app.py)."""

from __future__ import annotations

import hmac
import json

import streamlit as st

from dashboard import sso

AUTHENTICATED = "authenticated"
PASSWORD_INPUT = "password-input"


def secret(name: str):
    """A value of .streamlit/secrets.toml, None when absent (or when there is no readable secrets file)."""
    try:
        return st.secrets.get(name)
    except Exception:  # noqa: BLE001 - no or malformed secrets file: behave as if the secret were absent
        return None


def hosted() -> bool:
    """A team deployment (access control configured): the app only reads its caches folder, never writes it."""
    return bool(secret("password")) or secret("auth") is not None


def access_gate_ui() -> None:
    """Nothing below this call runs (no page, image or download) before the user is let in.

    A `password` secret asks for that password; an `[auth]` section in secrets uses Streamlit's OIDC login.
    With neither, the app is open (a laptop).
    """
    password = secret("password")
    if password:
        if st.session_state.get(AUTHENTICATED):
            return
        st.title("Visual Feature Search")
        typed = st.text_input("Password", type="password", key=PASSWORD_INPUT)
        if typed and hmac.compare_digest(str(typed).encode(), str(password).encode()):
            st.session_state[AUTHENTICATED] = True
            st.session_state.pop(PASSWORD_INPUT, None)
            st.rerun()
        if typed:
            st.error("Wrong password.")
        st.stop()
    if secret("auth") is not None and not st.user.is_logged_in:
        st.title("Visual Feature Search")
        problem = _sso_problem(json.dumps(dict(secret("auth")), sort_keys=True, default=str))
        if problem:
            st.error(f"Single sign-on cannot work: {problem}.")
            st.stop()
        st.button("Log in", on_click=st.login)
        st.stop()


@st.cache_data(ttl=60, show_spinner=False)
def _sso_problem(auth_json: str) -> str | None:
    """`sso.client_problem`, asked of the provider at most once a minute per configuration."""
    return sso.client_problem(json.loads(auth_json))
