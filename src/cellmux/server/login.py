"""``/login``: trade a token for a browser login cookie.

``GET /login?token=T&next=/path`` (what a share link points at) or
``POST /login`` with ``Authorization: token T`` sets an HttpOnly,
SameSite=Strict cookie standing for the token's grant, then redirects to
``next`` (only paths on this server: no open redirect) or answers JSON.
"""

from __future__ import annotations

import json
from http import HTTPStatus

from twisted.web import resource, server

from .auth import COOKIE_NAME, TokenAuth

__all__ = ["LoginResource"]


def _safe_next(value: bytes | None) -> bytes:
    """A local path to go to after login; anything else becomes ``/``."""
    if not value or not value.startswith(b"/") or value.startswith(b"//") or b"\\" in value:
        return b"/"
    return value


class LoginResource(resource.Resource):
    isLeaf = True

    def __init__(self, auth: TokenAuth) -> None:
        super().__init__()
        self._auth = auth

    def _login(self, request: server.Request) -> bytes | None:
        grant = self._auth.grant(
            request.getHeader(b"authorization"), request.args.get(b"token", ())
        )
        if grant is None:
            request.setResponseCode(HTTPStatus.FORBIDDEN)
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(
                {"message": "a valid token is required", "reason": "Forbidden"}
            ).encode()
        cookie = self._auth.login(grant)
        request.addCookie(
            COOKIE_NAME.encode(),
            cookie.encode(),
            path=b"/",
            httpOnly=True,
            secure=request.isSecure(),
            sameSite="strict",
        )
        # The token must not linger in the address bar, history or Referer.
        request.setHeader(b"referrer-policy", b"no-referrer")
        return None

    def render_GET(self, request: server.Request) -> bytes:
        refused = self._login(request)
        if refused is not None:
            return refused
        request.redirect(_safe_next(request.args.get(b"next", [None])[0]))
        return b""

    def render_POST(self, request: server.Request) -> bytes:
        refused = self._login(request)
        if refused is not None:
            return refused
        request.setHeader(b"content-type", b"application/json")
        return b'{"logged_in": true}'
