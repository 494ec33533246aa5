"""Shared plumbing of the JSON endpoints (``/api`` and the others): routing,
the token check, errors as ``{"message", "reason"}`` bodies, reading JSON
request bodies, and the site-wide request body limit.

Every error a handler raises becomes a JSON answer with its status; the
request that caused it is the only thing it affects.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import IO, Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

from cellmux.protocol import boundedjson

from .kernels import KernelError
from .store import PermalinkNotFound, StoreError, StoreFull, StoreUnavailable

__all__ = [
    "NOT_DONE",
    "BoundedRequest",
    "HTTPError",
    "JSONEndpoint",
    "Route",
    "bounded_request_factory",
    "error_body",
    "find_route",
    "read_json_body",
    "request_args",
    "request_body",
    "respond",
]

#: What a handler returns when it answers the request itself (a download).
NOT_DONE = object()

Handler = Callable[..., Awaitable[Any]]


class HTTPError(Exception):
    """Answer the request with C{status} and a JSON error body."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_body(status: int, message: str) -> dict[str, str]:
    return {"message": message, "reason": HTTPStatus(status).phrase}


def status_for(error: Exception) -> tuple[int, str]:
    """The HTTP status and message for an error a handler raised."""
    if isinstance(error, HTTPError):
        return error.status, error.message
    if isinstance(error, KernelError):
        return error.status, str(error)  # each kernel error carries its status
    if isinstance(error, PermalinkNotFound):
        return HTTPStatus.NOT_FOUND, str(error)
    if isinstance(error, StoreFull):
        return HTTPStatus.SERVICE_UNAVAILABLE, f"{error}; try again later"
    if isinstance(error, StoreUnavailable):
        return HTTPStatus.SERVICE_UNAVAILABLE, f"the permalink database is unavailable: {error}"
    raise error


class Route:
    """One method and path pattern, its handler, and who may call it.

    @param public: anyone, with no credentials.
    @param users: named tokens too (on their own kernels, when the path
        names one as C{kernel_id}); otherwise only the server token.
    """

    def __init__(
        self,
        method: bytes,
        pattern: str,
        handler: Handler,
        *,
        public: bool = False,
        users: bool = True,
    ):
        self.method = method
        self.pattern = re.compile(pattern)
        self.handler = handler
        self.public = public
        self.users = users


def find_route(routes: list[Route], request: server.Request) -> tuple[Route, dict[str, str]]:
    """The route for a request's method and full path, and its path parameters.

    @raise HTTPError: 405 for a known path with another method, else 404.
    """
    path = request.path.decode("utf-8", "replace")
    allowed = []
    for route in routes:
        match = route.pattern.fullmatch(path)
        if match is None:
            continue
        if route.method == request.method:
            return route, match.groupdict()
        allowed.append(route.method.decode())
    if allowed:
        raise HTTPError(HTTPStatus.METHOD_NOT_ALLOWED, f"use {', '.join(allowed)}")
    raise HTTPError(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}")


def respond(request: server.Request, status: int, body: Any) -> None:
    """Finish a request with C{status} and C{body} as JSON (None: no body)."""
    if request.finished or request._disconnected:
        return
    request.setResponseCode(int(status))
    if body is None:
        request.finish()
        return
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    request.write(json.dumps(body).encode())
    request.finish()


def request_body(request: server.Request) -> IO[bytes]:
    """The body of a request that has reached a resource.

    twisted.web sets it before any resource runs; its class attribute, the
    type checker's only source, says None.
    """
    content: IO[bytes] | None = request.content
    if content is None:
        raise RuntimeError("a request without its body reached a resource")
    return content


def request_args(request: server.Request) -> dict[bytes, list[bytes]]:
    """The decoded query parameters of a request (set with its body)."""
    args: dict[bytes, list[bytes]] | None = request.args
    return args if args is not None else {}


def read_json_body(request: server.Request, limit: int) -> dict[str, Any]:
    """A request body that must be a JSON object (empty: C{{}})."""
    raw = request_body(request).read(limit + 1)
    if len(raw) > limit:
        raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body over {limit} bytes")
    if not raw.strip():
        return {}
    try:
        body = boundedjson.loads(raw)
    except ValueError:
        raise HTTPError(HTTPStatus.BAD_REQUEST, "request body is not JSON") from None
    if not isinstance(body, dict):
        raise HTTPError(HTTPStatus.BAD_REQUEST, "request body must be a JSON object")
    return body


class JSONEndpoint(resource.Resource):
    """A leaf resource that routes on the full path with a table of L{Route}s."""

    isLeaf = True
    log = Logger()

    def __init__(self, auth, routes: list[Route]) -> None:
        super().__init__()
        self.auth = auth
        self.routes = routes

    def render(self, request: server.Request) -> int:
        d = defer.ensureDeferred(self._dispatch(request))
        d.addErrback(self._crashed, request)
        return server.NOT_DONE_YET

    async def _dispatch(self, request: server.Request) -> None:
        try:
            route, params = self._route(request)
            if not route.public:
                self._check_grant(request, route, params)
            result = await route.handler(request, **params)
        except (HTTPError, KernelError, StoreError) as e:
            status, message = status_for(e)
            if isinstance(e, StoreUnavailable):
                self.log.warn(
                    "{method} {path}: {error}", method=request.method, path=request.path, error=e
                )
            self.respond(request, status, error_body(status, message))
            return
        if result is NOT_DONE:
            return
        status, body = result
        self.respond(request, status, body)

    def _check_grant(self, request: server.Request, route: Route, params: dict[str, str]) -> None:
        """The server token may call every route; a named token the routes
        open to users, on its own kernels. @raise HTTPError: otherwise."""
        grant = self.auth.web_grant(request)
        if grant is None:
            status, message = self.auth.refusal(request)
            raise HTTPError(HTTPStatus(status), message)
        if grant.sees_all:
            return
        if grant.user is None or not route.users:
            raise HTTPError(HTTPStatus.FORBIDDEN, "a valid token is required")
        kernel_id = params.get("kernel_id")
        if kernel_id is not None and not grant.covers(kernel_id):
            raise HTTPError(
                HTTPStatus.FORBIDDEN, f"kernel {kernel_id} is not one of {grant.user}'s"
            )

    def _route(self, request: server.Request) -> tuple[Route, dict[str, str]]:
        return find_route(self.routes, request)

    respond = staticmethod(respond)

    def _crashed(self, failure, request: server.Request) -> None:
        self.log.failure("request {path} failed", failure, path=request.path)
        status = HTTPStatus.INTERNAL_SERVER_ERROR
        respond(request, status, error_body(status, "internal error; see server log"))

    json_body = staticmethod(read_json_body)


class BoundedRequest(server.Request):
    """A request whose body may not exceed C{max_body} bytes.

    twisted.web keeps bodies under 100 kB in memory and bigger ones in an
    anonymous temporary file, and reads all of it before any resource runs.
    A body over the limit is dropped as it arrives (neither memory nor disk
    grows) and the request is answered 413 without reaching a resource.
    """

    max_body = 100 * 1024 * 1024
    body_too_large = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body:
            self.body_too_large = True
            self.content = io.BytesIO()  # type: ignore[assignment]  # Twisted declares None
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        self._received += len(data)
        if self._received > self.max_body:
            self.body_too_large = True
            request_body(self).close()
            self.content = io.BytesIO()  # type: ignore[assignment]  # Twisted declares None
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        if not self.body_too_large:
            super().process()
            return
        self.site = self.channel.site  # type: ignore[attr-defined]  # set by Site.buildProtocol
        status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
        self.setResponseCode(status)
        self.setHeader(b"content-type", b"application/json")
        self.setHeader(b"connection", b"close")
        message = f"request body over the server's limit of {self.max_body} bytes"
        self.write(json.dumps(error_body(status, message)).encode())
        self.finish()


def bounded_request_factory(max_body: int) -> type[BoundedRequest]:
    """A L{BoundedRequest} class with this limit, for C{Site.requestFactory}."""
    return type("BoundedRequest", (BoundedRequest,), {"max_body": max_body})
