# -*- test-case-name: tests.security.test_login_csrf -*-
"""``/login``: trade a token for a browser login cookie.

``GET /login?token=T&next=/path`` (what a share link points at, with
``kernel=ID`` first for a proxy to route by; ignored here) or
``POST /login`` with ``Authorization: token T`` sets an HttpOnly,
SameSite=Strict cookie standing for the token's grant, then redirects to
``next`` (only paths on this server: no open redirect) or answers JSON.

Login CSRF: a page on another site must not log its visitor in with a
token of its choosing (the victim's console would then run on the
attacker's kernel). So:

* A request the browser marks as coming from another site
  (``Sec-Fetch-Site`` other than ``same-origin`` or ``none``; without that
  header, an ``Origin``, else a ``Referer``, that is not this server's)
  never sets the cookie. A GET (a share link clicked in a mail or chat)
  gets a page that says what the link grants and asks to confirm with a
  button; its POST comes from this origin. A POST gets 403. A browser
  navigation that says nothing of its source (no such header, ``Accept``
  naming HTML) is asked too.
* An existing login is never silently replaced by a weaker one: if the
  current cookie's grant includes the new one (an owner login and any
  share link), the current cookie is kept; if neither includes the other
  (two different shares), the browser is asked to confirm (``confirm=1``).
"""

from __future__ import annotations

import html
import json
from http import HTTPStatus
from urllib.parse import urlencode

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

from .auth import COOKIE_NAME, Grant, TokenAuth, query_pairs, query_tokens

__all__ = ["LoginResource", "from_another_site"]

#: Sec-Fetch-Site values of requests a user made on this server or typed.
_OWN_SITE = (b"same-origin", b"none")


def _safe_next(value: bytes | None) -> bytes:
    """A local path to go to after login; anything else becomes ``/``."""
    if not value or not value.startswith(b"/") or value.startswith(b"//") or b"\\" in value:
        return b"/"
    return value


def from_another_site(request: server.Request) -> bool | None:
    """Whether the browser says this request comes from a page of another
    site; None when nothing says (not a browser, or a browser that sends no
    Sec-Fetch-Site, as on plain HTTP beyond localhost, and no Origin or
    Referer)."""
    fetch_site = request.getHeader(b"sec-fetch-site")
    if fetch_site is not None:
        return fetch_site.strip().lower() not in _OWN_SITE
    source = request.getHeader(b"origin") or request.getHeader(b"referer")
    if source is None:
        return None
    host = (request.getHeader(b"host") or b"").lower()
    return source.partition(b"://")[2].partition(b"/")[0].lower() != host


def _describe(grant: Grant) -> str:
    if grant.user is not None:
        return f"the user {grant.user} (their own kernels)"
    if grant.kernel_id is None:
        return "the owner of every kernel on this server"
    return f"{grant.role.value} of kernel {grant.kernel_id}"


class LoginResource(resource.Resource):
    isLeaf = True
    log = Logger()

    def __init__(self, auth: TokenAuth) -> None:
        super().__init__()
        self._auth = auth

    def render_GET(self, request: server.Request) -> int:
        return self._answer(request, page=True)

    def render_POST(self, request: server.Request) -> int:
        return self._answer(request, page=False)

    def _answer(self, request: server.Request, page: bool) -> int:
        d = defer.ensureDeferred(self._login(request, page))

        def write(body: bytes) -> None:
            if not request.finished and not request._disconnected:
                request.write(body)
                request.finish()

        def crashed(failure) -> None:
            self.log.failure("login failed", failure)
            write(self._refuse(request, HTTPStatus.INTERNAL_SERVER_ERROR, "internal error"))

        d.addCallbacks(write, crashed)
        return server.NOT_DONE_YET

    async def _login(self, request: server.Request, page: bool) -> bytes:
        # The token must not linger in the address bar, history or Referer.
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"cache-control", b"no-store")
        grant = self._auth.grant(request.getHeader(b"authorization"), query_tokens(request.uri))
        if grant is None:
            status, message = self._auth.refusal(request)
            return self._refuse(request, HTTPStatus(status), message)
        params = dict(query_pairs(request.uri))
        cookie = request.getCookie(COOKIE_NAME.encode())
        current = self._auth.login_grant(cookie)
        foreign = from_another_site(request)
        if foreign is None and page:
            # A browser's navigation that says nothing of where it came
            # from (it asks for HTML) may come from another site: ask.
            foreign = b"text/html" in (request.getHeader(b"accept") or b"")
        if foreign:
            if page:
                return self._confirm_page(request, grant, current, params)
            message = "a login from another site is refused; log in from this server's pages"
            return self._refuse(request, HTTPStatus.FORBIDDEN, message)
        if current is not None and current.includes(grant):
            return self._done(request, params, kept=True)  # keep the stronger login
        if current is not None and not grant.includes(current) and params.get(b"confirm") != b"1":
            if page:
                return self._confirm_page(request, grant, current, params)
            message = (
                f"this browser is logged in as {_describe(current)}; "
                "add confirm=1 to replace that login"
            )
            return self._refuse(request, HTTPStatus.CONFLICT, message)
        value, lasting = await self._auth.login(grant)
        self._auth.logout(cookie)
        lifetime = self._auth.login_lifetime
        request.addCookie(
            COOKIE_NAME.encode(),
            value.encode(),
            path=b"/",
            # A lasting login outlives the browser session too.
            max_age=str(int(lifetime)).encode() if lifetime and lasting else None,
            httpOnly=True,
            secure=request.isSecure(),
            sameSite="strict",
        )
        return self._done(request, params, kept=False, lasting=lasting)

    def _done(
        self,
        request: server.Request,
        params: dict[bytes, bytes],
        kept: bool,
        lasting: bool | None = None,
    ) -> bytes:
        if request.method == b"GET" or b"next" in params:
            request.setResponseCode(HTTPStatus.SEE_OTHER if request.method == b"POST" else 302)
            request.setHeader(b"location", _safe_next(params.get(b"next")))
            return b""
        request.setHeader(b"content-type", b"application/json")
        answer: dict[str, bool] = {"logged_in": True, "kept_existing_login": kept}
        if lasting is not None:
            answer["lasting"] = lasting
        return json.dumps(answer).encode()

    def _refuse(self, request: server.Request, status: HTTPStatus, message: str) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"message": message, "reason": status.phrase}).encode()

    def _confirm_page(
        self,
        request: server.Request,
        grant: Grant,
        current: Grant | None,
        params: dict[bytes, bytes],
    ) -> bytes:
        """Ask before logging in: the button POSTs from this origin."""
        query = {b"confirm": b"1", b"next": _safe_next(params.get(b"next"))}
        if b"kernel" in params:  # a share link's: the proxy routes the POST by it
            query = {b"kernel": params[b"kernel"], **query}
        token = query_tokens(request.uri)
        if token:
            query[b"token"] = token[0]
        action = "/login?" + urlencode(query)
        replaces = (
            f"<p>This browser is now logged in as {html.escape(_describe(current))}; "
            "that login will end.</p>"
            if current is not None and not grant.includes(current)
            else ""
        )
        body = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>cellmux: log in?</title></head>
<body>
<h1>Log in to this cellmux server?</h1>
<p>A link asks to log this browser in as {html.escape(_describe(grant))}.
Only go on if you opened this link yourself and trust whoever sent it:
everything you type will run on that kernel.</p>
{replaces}
<form method="post" action="{html.escape(action)}"><button type="submit">Log in</button></form>
</body></html>
"""
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        # Nobody may frame this page and click the button for the user.
        request.setHeader(b"x-frame-options", b"DENY")
        request.setHeader(
            b"content-security-policy",
            b"default-src 'none'; form-action 'self'; frame-ancestors 'none'",
        )
        return body.encode()
