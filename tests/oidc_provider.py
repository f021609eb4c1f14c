"""A small OpenID Connect provider on 127.0.0.1 for the single sign-on test: discovery, an authorization page with
a *Sign in* button, the token endpoint (client secret checked, RS256 id_token signed with authlib), JWKS and
userinfo. One user, one client; it stops with the `with` block."""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import warnings

from cryptography.hazmat.primitives.asymmetric import rsa

with warnings.catch_warnings():  # authlib 1.x announces joserfc; its jose module works until 2.0
    warnings.simplefilter("ignore")
    from authlib.jose import JsonWebKey, jwt

USER = {"sub": "u-1", "email": "ana@example.org", "name": "Ana Analyst", "email_verified": True}


@contextlib.contextmanager
def running_provider(client_id: str, client_secret: str):
    """Yields the provider's base URL."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key = JsonWebKey.import_key(private, {"kty": "RSA", "kid": "k1", "use": "sig", "alg": "RS256"})
    public = key.as_dict(is_private=False)
    codes: dict[str, dict] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def _json(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            url = urllib.parse.urlparse(self.path)
            query = dict(urllib.parse.parse_qsl(url.query))
            if url.path == "/.well-known/openid-configuration":
                self._json(200, {
                    "issuer": base, "authorization_endpoint": f"{base}/authorize",
                    "token_endpoint": f"{base}/token", "jwks_uri": f"{base}/jwks",
                    "userinfo_endpoint": f"{base}/userinfo", "response_types_supported": ["code"],
                    "subject_types_supported": ["public"], "id_token_signing_alg_values_supported": ["RS256"],
                    "scopes_supported": ["openid", "email", "profile"],
                    "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"]})
            elif url.path == "/jwks":
                self._json(200, {"keys": [public]})
            elif url.path == "/userinfo":
                self._json(200, USER)
            elif url.path == "/authorize":
                fields = "".join(f'<input type="hidden" name="{k}" value="{v}">' for k, v in query.items())
                page = (f'<html><body><h1>Test identity provider</h1><form method="post" action="/authorize">'
                        f'{fields}<button type="submit">Sign in</button></form></body></html>').encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)
            else:
                self._json(404, {"error": "not_found"})

        def do_POST(self) -> None:  # noqa: N802
            form = dict(urllib.parse.parse_qsl(self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()))
            if self.path == "/authorize":
                code = secrets.token_urlsafe(16)
                codes[code] = {"nonce": form.get("nonce"), "client_id": form.get("client_id")}
                target = f"{form['redirect_uri']}?{urllib.parse.urlencode({'code': code, 'state': form['state']})}"
                self.send_response(302)
                self.send_header("Location", target)
                self.end_headers()
            elif self.path == "/token":
                given_id, given_secret = form.get("client_id"), form.get("client_secret")
                header = self.headers.get("Authorization", "")
                if header.startswith("Basic "):
                    given_id, _, given_secret = base64.b64decode(header[6:]).decode().partition(":")
                    given_id, given_secret = urllib.parse.unquote(given_id), urllib.parse.unquote(given_secret)
                if given_id != client_id or given_secret != client_secret:
                    self._json(401, {"error": "invalid_client"})
                    return
                grant = codes.pop(form.get("code", ""), None)
                if grant is None:
                    self._json(400, {"error": "invalid_grant"})
                    return
                now = int(time.time())
                claims = {**USER, "iss": base, "aud": client_id, "iat": now, "exp": now + 600}
                if grant["nonce"]:
                    claims["nonce"] = grant["nonce"]
                token = jwt.encode({"alg": "RS256", "kid": "k1"}, claims, key).decode()
                self._json(200, {"access_token": secrets.token_urlsafe(16), "token_type": "Bearer",
                                 "expires_in": 600, "id_token": token, "scope": "openid email profile"})
            else:
                self._json(404, {"error": "not_found"})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield base
    finally:
        server.shutdown()
        server.server_close()
