"""The JSON REST API: kernels, in the shapes Jupyter clients expect.

Every response is JSON; every error is ``{"message", "reason"}`` with its
HTTP status, as jupyter_server sends them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

import cellmux

from .kernels import (
    KernelError,
    KernelManager,
    KernelNotFound,
    KernelNotRunning,
    KernelStartFailed,
    TooManyKernels,
    iso_timestamp,
)

__all__ = ["ApiResource", "HTTPError"]

#: Largest request body the API reads (kernel requests are tiny).
MAX_BODY = 64 * 1024

_STATUS_FOR = {
    KernelNotFound: HTTPStatus.NOT_FOUND,
    KernelNotRunning: HTTPStatus.CONFLICT,
    TooManyKernels: HTTPStatus.SERVICE_UNAVAILABLE,
    KernelStartFailed: HTTPStatus.INTERNAL_SERVER_ERROR,
}


class HTTPError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


Handler = Callable[..., Awaitable[tuple[int, Any]]]


class ApiResource(resource.Resource):
    """Everything under ``/api``, routed by a small table."""

    isLeaf = True
    log = Logger()

    def __init__(self, manager: KernelManager, auth) -> None:
        super().__init__()
        self.manager = manager
        self.auth = auth
        kid = r"(?P<kernel_id>[^/]+)"
        self._routes: list[tuple[bytes, re.Pattern[str], Handler]] = [
            (b"GET", re.compile(r"/api/?"), self.version),
            (b"GET", re.compile(r"/api/status/?"), self.status),
            (b"GET", re.compile(r"/api/kernels/?"), self.list_kernels),
            (b"POST", re.compile(r"/api/kernels/?"), self.create_kernel),
            (b"GET", re.compile(rf"/api/kernels/{kid}/?"), self.get_kernel),
            (b"DELETE", re.compile(rf"/api/kernels/{kid}/?"), self.delete_kernel),
            (b"POST", re.compile(rf"/api/kernels/{kid}/interrupt/?"), self.interrupt_kernel),
            (b"POST", re.compile(rf"/api/kernels/{kid}/restart/?"), self.restart_kernel),
        ]

    # -- plumbing -------------------------------------------------------------

    def render(self, request: server.Request) -> int:
        d = defer.ensureDeferred(self._dispatch(request))
        d.addErrback(self._crashed, request)
        return server.NOT_DONE_YET

    async def _dispatch(self, request: server.Request) -> None:
        try:
            if not self.auth.check_web_request(request):
                raise HTTPError(HTTPStatus.FORBIDDEN, "a valid token is required")
            handler, params = self._route(request)
            status, body = await handler(request, **params)
        except HTTPError as e:
            status, body = e.status, self._error_body(e.status, e.message)
        except KernelError as e:
            code = _STATUS_FOR.get(type(e), HTTPStatus.BAD_REQUEST)
            status, body = code, self._error_body(code, str(e))
        self._respond(request, status, body)

    @staticmethod
    def _error_body(status: HTTPStatus, message: str) -> dict[str, str]:
        return {"message": message, "reason": HTTPStatus(status).phrase}

    def _route(self, request: server.Request) -> tuple[Handler, dict[str, str]]:
        path = request.path.decode("utf-8", "replace")
        allowed = []
        for method, pattern, handler in self._routes:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            if method == request.method:
                return handler, match.groupdict()
            allowed.append(method.decode())
        if allowed:
            raise HTTPError(HTTPStatus.METHOD_NOT_ALLOWED, f"use {', '.join(allowed)}")
        raise HTTPError(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}")

    def _respond(self, request: server.Request, status: int, body: Any) -> None:
        if request.finished or request._disconnected:
            return
        request.setResponseCode(int(status))
        if body is None:
            request.finish()
            return
        request.setHeader(b"content-type", b"application/json")
        request.write(json.dumps(body).encode())
        request.finish()

    def _crashed(self, failure, request: server.Request) -> None:
        self.log.failure("API request {path} failed", failure, path=request.path)
        status = HTTPStatus.INTERNAL_SERVER_ERROR
        self._respond(request, status, self._error_body(status, "internal error; see server log"))

    @staticmethod
    def _json_body(request: server.Request) -> dict[str, Any]:
        raw = request.content.read(MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body too large")
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except ValueError:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "request body is not JSON") from None
        if not isinstance(body, dict):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "request body must be a JSON object")
        return body

    # -- endpoints --------------------------------------------------------------

    async def version(self, request: server.Request) -> tuple[int, Any]:
        return HTTPStatus.OK, {"version": cellmux.__version__}

    async def status(self, request: server.Request) -> tuple[int, Any]:
        """Jupyter's status model, plus the warm pool's fill level."""
        manager = self.manager
        kernels = list(manager.kernels.values())
        last = max((k.last_activity for k in kernels), default=manager.started_at)
        return HTTPStatus.OK, {
            "started": iso_timestamp(manager.started_at),
            "last_activity": iso_timestamp(last),
            "connections": sum(len(k.clients) for k in kernels),
            "kernels": len(kernels),
            "pool": {"ready": manager.pooled, "size": manager.config.pool_size},
        }

    async def list_kernels(self, request: server.Request) -> tuple[int, Any]:
        return HTTPStatus.OK, [k.model() for k in self.manager.kernels.values()]

    async def create_kernel(self, request: server.Request) -> tuple[int, Any]:
        body = self._json_body(request)
        name = body.get("name") or "python3"
        if name != "python3":
            raise HTTPError(HTTPStatus.NOT_FOUND, f"no kernel spec named {name!r}")
        kernel = await self.manager.create(name)
        request.setHeader(b"location", f"/api/kernels/{kernel.id}".encode())
        return HTTPStatus.CREATED, kernel.model()

    async def get_kernel(self, request: server.Request, kernel_id: str) -> tuple[int, Any]:
        return HTTPStatus.OK, self.manager.get(kernel_id).model()

    async def delete_kernel(self, request: server.Request, kernel_id: str) -> tuple[int, Any]:
        self.manager.delete(self.manager.get(kernel_id))
        return HTTPStatus.NO_CONTENT, None

    async def interrupt_kernel(self, request: server.Request, kernel_id: str) -> tuple[int, Any]:
        self.manager.interrupt(self.manager.get(kernel_id))
        return HTTPStatus.NO_CONTENT, None

    async def restart_kernel(self, request: server.Request, kernel_id: str) -> tuple[int, Any]:
        kernel = await self.manager.restart(self.manager.get(kernel_id))
        return HTTPStatus.OK, kernel.model()
