# -*- test-case-name: tests.test_browser -*-
"""The browser console at ``/`` and its static assets under ``/static``.

The assets are the bundle built from ``web/`` (docs/browser.md), shipped
in the ``cellmux.web`` package and read once, at start. They are public:
the page holds no secret, and the API calls it makes carry the login
cookie.

``/`` answers browsers (``Accept: text/html``) with the console page and
everyone else with the JSON description it always gave.

Kernel output never runs in this origin: the page renders HTML and
JavaScript outputs in ``sandbox="allow-scripts"`` iframes (an opaque
origin), and widget views in such iframes loaded from
``/static/widgets.html``. Their srcdoc documents inherit this page's Content-Security-
Policy, which is why ``script-src`` admits inline scripts; the page itself
never inserts kernel markup outside such a frame.
"""

from __future__ import annotations

import hashlib
import json
import os
from http import HTTPStatus
from importlib import resources as importlib_resources
from urllib.parse import urlencode

import attrs
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.web import resource, server

import cellmux

from .auth import CredentialsUnavailable, Grant, OriginPolicy, Role, query_pairs
from .creation import KernelCreator
from .kernels import Kernel
from .login import from_another_site
from .proxy import client_address
from .public import AddressLimits, LimitExceeded, idle_kernels
from .webjson import HTTPError

__all__ = [
    "CONSOLE_CSP",
    "EmbedKernels",
    "FaviconResource",
    "PageResource",
    "StaticResource",
    "cors_headers",
    "preflight",
]

#: The console page's policy: its own scripts and styles, images from
#: outputs (data: and blob: URLs), connections to this server only.
CONSOLE_CSP = (
    b"default-src 'self'; "
    b"script-src 'self' 'unsafe-inline' 'unsafe-eval' data: blob:; "
    b"style-src 'self' 'unsafe-inline'; "
    b"img-src 'self' data: blob:; "
    b"font-src 'self' data:; "
    b"connect-src 'self' ws: wss:; "
    b"frame-src 'self' data: blob:; "
    b"object-src 'none'; "
    b"base-uri 'none'; "
    b"form-action 'self'; "
    b"frame-ancestors 'self'"
)

_CONTENT_TYPES = {
    ".js": b"text/javascript; charset=utf-8",
    ".mjs": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".html": b"text/html; charset=utf-8",
    ".map": b"application/json",
    ".json": b"application/json",
    ".svg": b"image/svg+xml",
    ".png": b"image/png",
    ".woff2": b"font/woff2",
    ".woff": b"font/woff",
    ".ttf": b"font/ttf",
    ".txt": b"text/plain; charset=utf-8",
}


@attrs.frozen
class Asset:
    body: bytes
    content_type: bytes
    etag: bytes


def load_assets() -> dict[str, Asset]:
    """Every file of the built bundle, by its path under ``static/``."""
    assets: dict[str, Asset] = {}
    root = importlib_resources.files("cellmux.web") / "static"

    def walk(node, prefix: str) -> None:
        for child in node.iterdir():
            name = prefix + child.name
            if child.is_dir():
                walk(child, name + "/")
                continue
            content_type = _CONTENT_TYPES.get(os.path.splitext(name)[1])
            if content_type is None:
                continue  # not something we serve (e.g. a stray file)
            body = child.read_bytes()
            etag = b'"' + hashlib.sha256(body).hexdigest()[:32].encode() + b'"'
            assets[name] = Asset(body, content_type, etag)

    if root.is_dir():
        walk(root, "")
    return assets


def cors_headers(request: server.Request, origins: OriginPolicy, methods: bytes) -> None:
    """Allow a configured other origin to call this resource with credentials.

    Only origins that fully match ``allow_origins`` are named back, never
    ``*``, so a credentialed request from anywhere else is refused by the
    browser. The server's own origin needs no CORS.
    """
    origin = request.getHeader(b"origin")
    request.setHeader(b"vary", b"Origin")
    if not origin or not any(p.fullmatch(origin.decode("latin-1")) for p in origins.patterns):
        return
    request.setHeader(b"access-control-allow-origin", origin)
    request.setHeader(b"access-control-allow-credentials", b"true")
    request.setHeader(b"access-control-allow-methods", methods)
    request.setHeader(b"access-control-allow-headers", b"authorization, content-type")
    request.setHeader(b"access-control-expose-headers", b"cellmux-seq, cellmux-ctl, location")
    request.setHeader(b"access-control-max-age", b"600")


def preflight(request: server.Request) -> bytes:
    request.setResponseCode(204)
    return b""


def _send(request: server.Request, asset: Asset) -> bytes:
    request.setHeader(b"content-type", asset.content_type)
    request.setHeader(b"x-content-type-options", b"nosniff")
    # The bundle's names do not change between versions: revalidate (cheap, 304).
    request.setHeader(b"cache-control", b"no-cache")
    request.setHeader(b"etag", asset.etag)
    if request.getHeader(b"if-none-match") == asset.etag:
        request.setResponseCode(304)
        return b""
    if request.method == b"HEAD":
        return b""
    return asset.body


class StaticResource(resource.Resource):
    """``/static/<path>``: the built bundle, public, readable from any origin."""

    isLeaf = True

    def __init__(self, assets: dict[str, Asset]) -> None:
        super().__init__()
        self._assets = assets

    def render(self, request: server.Request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD")
            return b""
        name = b"/".join(request.postpath or ()).decode("utf-8", "replace")
        asset = self._assets.get(name)
        if asset is None:
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"message": "not found", "reason": "Not Found"}).encode()
        # Public files: embedding pages load the script, its CSS and fonts.
        request.setHeader(b"access-control-allow-origin", b"*")
        return _send(request, asset)


class FaviconResource(resource.Resource):
    """``/favicon.ico``: the bundle's SVG icon, for clients that ask the
    conventional path instead of following the page's ``<link rel=icon>``."""

    isLeaf = True

    def __init__(self, assets: dict[str, Asset]) -> None:
        super().__init__()
        self._icon = assets.get("favicon.svg")

    def render(self, request: server.Request) -> bytes:
        if self._icon is None or request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(404 if self._icon is None else 405)
            return b""
        return _send(request, self._icon)


def wants_html(request: server.Request) -> bool:
    accept = (request.getHeader(b"accept") or b"").lower()
    return b"text/html" in accept


class PageResource(resource.Resource):
    """``/``: the console for browsers, the server's description for others."""

    isLeaf = True

    def __init__(self, assets: dict[str, Asset]) -> None:
        super().__init__()
        self._page = assets.get("console.html")

    def render(self, request: server.Request) -> bytes:
        if self._page is None or not wants_html(request):
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"name": "cellmux", "version": cellmux.__version__}).encode()
        if from_another_site(request) and any(n == b"token" for n, _ in query_pairs(request.uri)):
            # Another site sent this browser to the console with a token of
            # its choosing (login CSRF): /login asks the user first.
            return self._ask_at_login(request)
        request.setHeader(b"content-security-policy", CONSOLE_CSP)
        request.setHeader(b"x-frame-options", b"SAMEORIGIN")
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"vary", b"Accept")
        return _send(request, self._page)

    @staticmethod
    def _ask_at_login(request: server.Request) -> bytes:
        pairs = query_pairs(request.uri)
        rest = urlencode([(n, v) for n, v in pairs if n != b"token"])
        target = request.path + (b"?" + rest.encode() if rest else b"")
        query = urlencode([(n, v) for n, v in pairs if n == b"token"] + [(b"next", target)])
        request.setResponseCode(303)
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"location", b"/login?" + query.encode())
        return b""


class EmbedKernels(resource.Resource):
    """``POST /embed/kernels``: a kernel for embedded cells, with CORS.

    The REST API answers only its own origin; pages on an origin that
    ``allow_origins`` admits create their cells' kernels here: with the
    server token or a named token (as ``POST /api/kernels`` takes them), or,
    in public mode, with no credentials at all. An anonymous visitor gets a
    kernel with the public limits and a capability for it alone (``token``
    in the answer; never the server token), within per-address limits.
    """

    isLeaf = True
    _log = Logger()

    def __init__(self, manager, auth, creator: KernelCreator | None = None) -> None:
        super().__init__()
        self._manager = manager
        self._auth = auth
        self._creator = creator or KernelCreator(manager, auth)
        config = manager.config
        self._origins = OriginPolicy.from_strings(config.allow_origins)
        self.limits = AddressLimits(
            config.public_kernels_per_address, config.public_requests_per_minute, manager.clock
        )
        # Visitors' kernels, ended sooner when idle with no client attached.
        self._visitors: set[str] = set()
        self._reaper = task.LoopingCall(self._end_idle_visitors)
        self._reaper.clock = manager.clock

    def _end_idle_visitors(self) -> None:
        kernels = self._manager.kernels
        self._visitors &= set(kernels)
        timeout = self._manager.config.public_idle_timeout
        visitors = [kernels[k] for k in self._visitors]
        for kernel in idle_kernels(visitors, self._manager.clock.seconds(), timeout):
            self._visitors.discard(kernel.id)
            self._manager.delete(kernel, f"idle timeout (public, {timeout:g} s)")
        if not self._visitors and self._reaper.running:
            self._reaper.stop()

    def _json(self, request: server.Request, status: int, body: dict) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body).encode()

    def _error(self, request: server.Request, status: int, message: str) -> bytes:
        return self._json(
            request, status, {"message": message, "reason": HTTPStatus(status).phrase}
        )

    def render(self, request: server.Request) -> bytes | int:
        cors_headers(request, self._origins, methods=b"POST")
        if request.method == b"OPTIONS":
            return preflight(request)
        if request.postpath not in ([b"kernels"], [b"kernels", b""]):
            return self._error(request, 404, "not found")
        if request.method != b"POST":
            request.setHeader(b"allow", b"POST")
            return self._error(request, 405, "use POST")
        origin = request.getHeader(b"origin")
        host = request.getHeader(b"host")
        if not self._origins.allows(
            origin.decode("latin-1") if origin else None,
            host.decode("latin-1") if host else None,
            request.isSecure(),
        ):
            return self._error(request, 403, "this origin may not connect")
        grant = self._auth.web_grant(request)
        public = self._manager.config.public
        if grant is None or not grant.role.may_manage or grant.kernel_id is not None:
            if not public:
                status, message = self._auth.refusal(request)
                return self._error(request, status, message)
            grant = None  # an anonymous visitor (whatever share it may hold)
        d = defer.ensureDeferred(self._create(request, grant))

        def failed(failure) -> bytes:
            error = failure.value
            if isinstance(error, LimitExceeded):
                if error.retry_after is not None:
                    request.setHeader(b"retry-after", str(int(error.retry_after + 0.999)).encode())
                return self._error(request, 429, str(error))
            if isinstance(error, HTTPError):
                return self._error(request, error.status, error.message)
            if isinstance(error, CredentialsUnavailable):
                return self._error(request, 503, str(error))
            status = getattr(error, "status", None)
            if status is None:
                self._log.failure("creating an embedded kernel failed", failure)
                return self._error(request, 500, "internal error; see server log")
            return self._error(request, status, str(error))

        def write(body: bytes) -> None:
            if not request.finished and not request._disconnected:
                request.write(body)
                request.finish()

        d.addErrback(failed)
        d.addCallback(write)
        return server.NOT_DONE_YET

    async def _create(self, request: server.Request, grant) -> bytes:
        if grant is not None:
            made = await self._creator.create(grant)
            request.setHeader(b"location", f"/api/kernels/{made.id}".encode())
            return self._json(request, 201, self._creator.describe(made))
        # Behind a trusted proxy, the address it forwarded (operations.md).
        address = client_address(request) or "unknown"
        self.limits.request(address)
        place = self.limits.reserve_kernel(address, lambda k: k in self._manager.kernels)
        kernel: Kernel | None = None
        try:
            kernel = await self._creator.create(Grant(Role.COLLABORATOR), public_limits=True)
            capability, token = await self._auth.share(
                kernel.id, Role.COLLABORATOR, kind="capability"
            )
        except BaseException:
            if kernel is not None and kernel.id in self._manager.kernels:
                self._auth.forget_kernel(kernel.id)
                self._manager.delete(kernel, "its capability could not be made")
            self.limits.settle_kernel(address, place, None)
            raise
        self.limits.settle_kernel(address, place, kernel.id)
        self._visitors.add(kernel.id)
        if not self._reaper.running:
            self._reaper.start(1.0, now=False)
        self._log.info("public kernel {id} for {address}", id=kernel.id, address=address)
        request.setHeader(b"location", f"/api/kernels/{kernel.id}".encode())
        return self._json(
            request, 201, {**kernel.model(), "token": token, "capability": capability.id}
        )
