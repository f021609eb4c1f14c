"""Single sign-on (`[auth]`, Streamlit's OIDC login): is the app's client id and secret accepted by its provider?

Streamlit (1.67) swallows a refused token exchange: the user is sent back to *Log in* and only the server log
says why. So the gate asks the provider first, the standard way (RFC 6749, 5.2): a token request with the app's
credentials and a code that cannot exist is answered `invalid_grant` when the credentials are right and
`invalid_client` when they are not, without logging anyone in.
"""

from __future__ import annotations

import base64
import json
import secrets
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Mapping

TIMEOUT_S = 5.0


def client_problem(auth: Mapping[str, Any]) -> str | None:
    """Why the provider will refuse this app's logins, in one line; None when it accepts the credentials (or
    when the section configures several providers, each checked at its own login)."""
    needed = ("client_id", "client_secret", "server_metadata_url")
    if not all(isinstance(auth.get(key), str) and auth.get(key) for key in needed):
        return None  # named providers ([auth.google] ...) or an incomplete section: Streamlit reports those
    try:
        with urllib.request.urlopen(auth["server_metadata_url"], timeout=TIMEOUT_S) as response:
            metadata = json.loads(response.read())
        endpoint = metadata["token_endpoint"]
    except (OSError, ValueError, KeyError) as exc:
        return f"the identity provider's metadata ({auth['server_metadata_url']}) is unreachable or unusable: {exc}"
    methods = metadata.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
    form = {"grant_type": "authorization_code", "code": secrets.token_urlsafe(24),
            "redirect_uri": str(auth.get("redirect_uri", ""))}
    headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
    if "client_secret_basic" in methods:
        pair = f"{urllib.parse.quote(auth['client_id'])}:{urllib.parse.quote(auth['client_secret'])}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    else:
        form |= {"client_id": auth["client_id"], "client_secret": auth["client_secret"]}
    request = urllib.request.Request(endpoint, urllib.parse.urlencode(form).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S):
            return None  # a token for a made-up code: a strange provider, but not a refusal of this app
    except urllib.error.HTTPError as error:
        try:
            code = json.loads(error.read() or b"{}").get("error")
        except ValueError:
            code = None
        if error.code == 401 or code == "invalid_client":
            return (f"the identity provider refused this app's client id or secret ({code or error.code}): check "
                    "`client_id` and `client_secret` in the `[auth]` section of .streamlit/secrets.toml")
        return None  # invalid_grant and the like: the credentials were accepted
    except OSError as exc:
        return f"the identity provider's token endpoint ({endpoint}) is unreachable: {exc}"
