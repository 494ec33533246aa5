"""The JSON REST API: kernels and kernel specs, in the shapes Jupyter clients expect.

Every response is JSON; every error is ``{"message", "reason"}`` with its
HTTP status, as jupyter_server sends them. The Jupyter kernel websocket,
``/api/kernels/{id}/channels``, lives under this prefix too and is handed to
its own resource (see L{cellmux.server.jupyter}).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

import cellmux

from .auth import Grant, Role
from .jupyter.channels import channels_path_kernel
from .jupyter.kernelspecs import DEFAULT_SPEC, kernelspec_model, kernelspecs_model
from .jupyter.sessions import (
    Session,
    SessionError,
    SessionTable,
    kernel_request,
    session_fields,
)
from .jupyter.workdirs import WorkingDirError, notebook_folder, resolve_working_dir
from .kernels import (
    KernelError,
    KernelManager,
    iso_timestamp,
)
from .webjson import HTTPError, Route, error_body, find_route, read_json_body, respond

__all__ = ["ApiResource", "HTTPError"]

#: Largest request body the API reads (kernel requests are tiny).
MAX_BODY = 64 * 1024

Handler = Callable[..., Awaitable[tuple[int, Any]]]


class ApiResource(resource.Resource):
    """Everything under ``/api``, routed by a small table."""

    isLeaf = True
    log = Logger()

    def __init__(
        self, manager: KernelManager, auth, channels: resource.IResource | None = None
    ) -> None:
        super().__init__()
        self.manager = manager
        self.auth = auth
        # The Jupyter kernel websocket (it checks the token in its handshake).
        self._channels = channels
        self.sessions = SessionTable(lambda kernel_id: kernel_id in manager.kernels)
        kid = r"(?P<kernel_id>[^/]+)"
        sid = r"(?P<session_id>[^/]+)"
        self._routes: list[Route] = [
            Route(b"GET", r"/api/?", self.version),
            Route(b"GET", r"/api/status/?", self.status),
            Route(b"GET", r"/api/kernels/?", self.list_kernels),
            Route(b"POST", r"/api/kernels/?", self.create_kernel),
            Route(b"GET", rf"/api/kernels/{kid}/?", self.get_kernel),
            Route(b"DELETE", rf"/api/kernels/{kid}/?", self.delete_kernel),
            Route(b"POST", rf"/api/kernels/{kid}/interrupt/?", self.interrupt_kernel),
            Route(b"POST", rf"/api/kernels/{kid}/restart/?", self.restart_kernel),
            Route(b"POST", rf"/api/kernels/{kid}/shares/?", self.create_share),
            Route(b"GET", rf"/api/kernels/{kid}/shares/?", self.list_shares),
            Route(
                b"DELETE", rf"/api/kernels/{kid}/shares/(?P<share_id>[^/]+)/?", self.revoke_share
            ),
            Route(b"GET", r"/api/kernelspecs/?", self.list_kernelspecs),
            Route(b"GET", r"/api/kernelspecs/(?P<name>[^/]+)/?", self.get_kernelspec),
            Route(b"GET", rf"/api/kernels/{kid}/channels/?", self.channels_not_upgraded),
            Route(b"GET", r"/api/sessions/?", self.list_sessions),
            Route(b"POST", r"/api/sessions/?", self.create_session),
            Route(b"GET", rf"/api/sessions/{sid}/?", self.get_session),
            Route(b"PATCH", rf"/api/sessions/{sid}/?", self.update_session),
            Route(b"DELETE", rf"/api/sessions/{sid}/?", self.delete_session),
        ]

    # -- plumbing -------------------------------------------------------------

    def render(self, request: server.Request) -> int | bytes:
        upgrade = (request.getHeader(b"upgrade") or b"").lower()
        if self._channels is not None and upgrade == b"websocket":
            path = request.path.decode("utf-8", "replace")
            if channels_path_kernel(path) is not None:
                return self._channels.render(request)
        d = defer.ensureDeferred(self._dispatch(request))
        d.addErrback(self._crashed, request)
        return server.NOT_DONE_YET

    async def _dispatch(self, request: server.Request) -> None:
        try:
            grant = self.auth.web_grant(request)
            if grant is None:
                raise HTTPError(HTTPStatus.FORBIDDEN, "a valid token is required")
            route, params = find_route(self._routes, request)
            handler = route.handler
            if grant.kernel_id is not None and not self._share_may(handler, params, grant):
                raise HTTPError(HTTPStatus.FORBIDDEN, "a share token may only read its own kernel")
            status, body = await handler(request, **params)
        except HTTPError as e:
            status, body = e.status, error_body(e.status, e.message)
        except KernelError as e:
            status, body = e.status, error_body(e.status, str(e))
        except SessionError as e:
            status, body = e.status, error_body(e.status, e.message)
            if e.status == HTTPStatus.NOT_IMPLEMENTED:  # JupyterLab shows it in its dialog
                body["short_message"] = e.message
        respond(request, status, body)

    def _share_may(self, handler: Handler, params: dict[str, str], grant: Grant) -> bool:
        """What a share token (one kernel, not the owner of all) may call."""
        if handler == self.version:
            return True
        return handler == self.get_kernel and params.get("kernel_id") == grant.kernel_id

    def _crashed(self, failure, request: server.Request) -> None:
        self.log.failure("API request {path} failed", failure, path=request.path)
        status = HTTPStatus.INTERNAL_SERVER_ERROR
        respond(request, status, error_body(status, "internal error; see server log"))

    # -- endpoints --------------------------------------------------------------

    async def version(self, request: server.Request) -> tuple[int, Any]:
        return HTTPStatus.OK, {"version": cellmux.__version__}

    async def status(self, request: server.Request) -> tuple[int, Any]:
        """Jupyter's status model, plus the warm pool's fill level and the
        server's health: 503 with ``state: degraded`` and a ``reason`` while
        it cannot start kernels (no nursery runs), so that a load balancer's
        health check takes it out of rotation; else 200, ``state: ok``."""
        manager = self.manager
        kernels = list(manager.kernels.values())
        last = max((k.last_activity for k in kernels), default=manager.started_at)
        health = manager.health()
        ok = health["state"] == "ok"
        return HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, {
            **health,
            "started": iso_timestamp(manager.started_at),
            "last_activity": iso_timestamp(last),
            "connections": sum(len(k.clients) for k in kernels),
            "kernels": len(kernels),
            "pool": {
                "ready": manager.pooled,
                "size": manager.config.pool_size,
                "failed_starts": manager.failed_starts,
                "last_error": manager.start_error,
            },
        }

    async def list_kernels(self, request: server.Request) -> tuple[int, Any]:
        return HTTPStatus.OK, [k.model() for k in self.manager.kernels.values()]

    async def create_kernel(self, request: server.Request) -> tuple[int, Any]:
        body = read_json_body(request, MAX_BODY)
        name = body.get("name") or DEFAULT_SPEC
        if not isinstance(name, str) or kernelspec_model(name) is None:
            raise HTTPError(HTTPStatus.NOT_FOUND, f"no kernel spec named {name!r}")
        # A Jupyter Server with --gateway-url sends KERNEL_* variables; of
        # them only KERNEL_WORKING_DIR is applied (see docs/jupyter.md).
        env = body.get("env") or {}
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "env must map names to strings")
        if body.get("kernel_id") is not None:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "cellmux chooses kernel ids; omit kernel_id")
        path = body.get("path")
        if path is not None and not isinstance(path, str):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "path must be a string")
        kernel = await self.manager.create(name, cwd=self._working_dir(env, path))
        request.setHeader(b"location", f"/api/kernels/{kernel.id}".encode())
        return HTTPStatus.CREATED, kernel.model()

    async def get_kernel(self, request: server.Request, kernel_id: str) -> tuple[int, Any]:
        return HTTPStatus.OK, self.manager.get(kernel_id).model()

    async def delete_kernel(self, request: server.Request, kernel_id: str) -> tuple[int, Any]:
        self.auth.forget_kernel(kernel_id)
        self.manager.delete(self.manager.get(kernel_id))
        return HTTPStatus.NO_CONTENT, None

    async def interrupt_kernel(self, request: server.Request, kernel_id: str) -> tuple[int, Any]:
        self.manager.interrupt(self.manager.get(kernel_id))
        return HTTPStatus.NO_CONTENT, None

    async def create_share(self, request: server.Request, kernel_id: str) -> tuple[int, Any]:
        kernel = self.manager.get(kernel_id)
        role = read_json_body(request, MAX_BODY).get("role")
        if role not in (Role.COLLABORATOR.value, Role.OBSERVER.value):
            raise HTTPError(HTTPStatus.BAD_REQUEST, 'role must be "collaborator" or "observer"')
        share, token = self.auth.share(kernel.id, Role(role))
        url = f"/login?token={token}&next=/%3Fkernel%3D{kernel.id}"
        return HTTPStatus.CREATED, {**share.to_json(), "token": token, "url": url}

    async def list_shares(self, request: server.Request, kernel_id: str) -> tuple[int, Any]:
        kernel = self.manager.get(kernel_id)
        return HTTPStatus.OK, [s.to_json() for s in self.auth.shares(kernel.id)]

    async def revoke_share(
        self, request: server.Request, kernel_id: str, share_id: str
    ) -> tuple[int, Any]:
        kernel = self.manager.get(kernel_id)
        if self.auth.revoke(kernel.id, share_id) is None:
            raise HTTPError(HTTPStatus.NOT_FOUND, f"no share {share_id} of this kernel")
        kernel.revoke(share_id)
        return HTTPStatus.NO_CONTENT, None

    async def restart_kernel(self, request: server.Request, kernel_id: str) -> tuple[int, Any]:
        kernel = await self.manager.restart(self.manager.get(kernel_id))
        return HTTPStatus.OK, kernel.model()

    async def channels_not_upgraded(self, request: server.Request, kernel_id: str):
        raise HTTPError(
            HTTPStatus.BAD_REQUEST, "the kernel channels are a websocket: send Upgrade: websocket"
        )

    async def list_kernelspecs(self, request: server.Request) -> tuple[int, Any]:
        return HTTPStatus.OK, kernelspecs_model()

    async def get_kernelspec(self, request: server.Request, name: str) -> tuple[int, Any]:
        model = kernelspec_model(name)
        if model is None:
            raise HTTPError(HTTPStatus.NOT_FOUND, f"no kernel spec named {name!r}")
        return HTTPStatus.OK, model

    # -- sessions (for clients that talk to cellmux directly) -----------------

    def _session_model(self, session: Session) -> dict[str, Any]:
        return session.model(self.manager.get(session.kernel_id).model())

    def _working_dir(self, env: dict[str, str] | None, path: str | None) -> str | None:
        try:
            return resolve_working_dir(self.manager.config.shared_root, env, path)
        except WorkingDirError as e:
            raise HTTPError(HTTPStatus.BAD_REQUEST, str(e)) from None

    async def _session_kernel(self, kernel_id: str | None, name: str | None, path: str):
        """The kernel a session asks for: an existing one by id, or a new one
        (started in the session's folder)."""
        if kernel_id is not None:
            return self.manager.get(kernel_id)
        name = name or DEFAULT_SPEC
        if kernelspec_model(name) is None:
            raise SessionError(HTTPStatus.NOT_IMPLEMENTED, f"no kernel spec named {name!r}")
        return await self.manager.create(name, cwd=self._working_dir(None, notebook_folder(path)))

    def _release_kernel(self, kernel_id: str) -> None:
        """Shut a session's old kernel down unless another session uses it."""
        if kernel_id in self.manager.kernels and not self.sessions.kernel_in_use(kernel_id):
            self.manager.delete(self.manager.get(kernel_id))

    async def list_sessions(self, request: server.Request) -> tuple[int, Any]:
        return HTTPStatus.OK, [self._session_model(s) for s in self.sessions.all()]

    async def create_session(self, request: server.Request) -> tuple[int, Any]:
        body = read_json_body(request, MAX_BODY)
        path, name, kind = session_fields(body)
        if not path:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "a session needs a path")
        # Jupyter answers a second POST for the same path with the first session.
        session = self.sessions.by_path(path)
        if session is None:
            kernel = await self._session_kernel(*kernel_request(body), path)
            session = self.sessions.add(path, name or "", kind or "", kernel.id)
        request.setHeader(b"location", f"/api/sessions/{session.id}".encode())
        return HTTPStatus.CREATED, self._session_model(session)

    async def get_session(self, request: server.Request, session_id: str) -> tuple[int, Any]:
        return HTTPStatus.OK, self._session_model(self.sessions.get(session_id))

    async def update_session(self, request: server.Request, session_id: str) -> tuple[int, Any]:
        body = read_json_body(request, MAX_BODY)
        before = self.sessions.get(session_id)
        path, name, kind = session_fields(body)
        changes = {k: v for k, v in (("path", path), ("name", name), ("type", kind)) if v}
        kernel_id, spec = kernel_request(body)
        if (kernel_id is not None and kernel_id != before.kernel_id) or (
            kernel_id is None and spec is not None
        ):
            folder_of = path or before.path
            changes["kernel_id"] = (await self._session_kernel(kernel_id, spec, folder_of)).id
        session = self.sessions.update(session_id, **changes)
        if session.kernel_id != before.kernel_id:
            self._release_kernel(before.kernel_id)
        return HTTPStatus.OK, self._session_model(session)

    async def delete_session(self, request: server.Request, session_id: str) -> tuple[int, Any]:
        session = self.sessions.remove(session_id)
        self._release_kernel(session.kernel_id)
        return HTTPStatus.NO_CONTENT, None
