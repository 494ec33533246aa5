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

from ..protocol.hostlink import valid_name
from .auth import CredentialsUnavailable, Grant, Role, TooManyShares
from .creation import KernelCreator
from .fronts import front_tag
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
from .startup import allowed_env, request_startup
from .webjson import HTTPError, Route, error_body, find_route, read_json_body, respond

__all__ = ["ApiResource", "HTTPError"]

#: Largest request body the API reads (kernel requests are small; start-up
#: code is at most 64 KiB, and JSON escaping may double it).
MAX_BODY = 256 * 1024
#: Longest lifetime a share may be given (a year), in seconds.
MAX_SHARE_LIFETIME = 365 * 24 * 3600

Handler = Callable[..., Awaitable[tuple[int, Any]]]


class ApiResource(resource.Resource):
    """Everything under ``/api``, routed by a small table."""

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        manager: KernelManager,
        auth,
        channels: resource.IResource | None = None,
        creator: KernelCreator | None = None,
    ) -> None:
        super().__init__()
        self.manager = manager
        self.auth = auth
        self.creator = creator or KernelCreator(manager, auth)
        # The Jupyter kernel websocket (it checks the token in its handshake).
        self._channels = channels
        self.sessions = SessionTable(
            lambda kernel_id: kernel_id in manager.kernels, front_tag(manager.config.front_id)
        )
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
                status, message = self.auth.refusal(request)
                raise HTTPError(HTTPStatus(status), message)
            route, params = find_route(self._routes, request)
            handler = route.handler
            if grant.kernel_id is not None and not self._share_may(handler, params, grant):
                raise HTTPError(HTTPStatus.FORBIDDEN, "a share token may only read its own kernel")
            if grant.user is not None:
                self._check_user(grant, params)
            request.cellmux_grant = grant  # type: ignore[attr-defined]
            status, body = await handler(request, **params)
        except HTTPError as e:
            status, body = e.status, error_body(e.status, e.message)
        except KernelError as e:
            status, body = e.status, error_body(e.status, str(e))
        except SessionError as e:
            status, body = e.status, error_body(e.status, e.message)
            if e.status == HTTPStatus.NOT_IMPLEMENTED:  # JupyterLab shows it in its dialog
                body["short_message"] = e.message
        except (CredentialsUnavailable, TooManyShares) as e:
            status = (
                HTTPStatus.SERVICE_UNAVAILABLE
                if isinstance(e, CredentialsUnavailable)
                else HTTPStatus.CONFLICT
            )
            body = error_body(status, str(e))
        respond(request, status, body)

    def _check_user(self, grant: Grant, params: dict[str, str]) -> None:
        """A named token reaches only its own kernels (and their sessions)."""
        kernel_id = params.get("kernel_id")
        if kernel_id is None and "session_id" in params:
            kernel_id = self.sessions.get(params["session_id"]).kernel_id
        known = kernel_id is not None and kernel_id in self.manager.kernels
        if known and kernel_id is not None and not grant.covers(kernel_id):
            raise HTTPError(
                HTTPStatus.FORBIDDEN, f"kernel {kernel_id} is not one of {grant.user}'s"
            )

    @staticmethod
    def _grant(request: server.Request) -> Grant:
        grant: Grant = request.cellmux_grant  # type: ignore[attr-defined]
        return grant

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
        hosts = manager.host_models()
        return HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, {
            **health,
            **({"hosts": hosts} if hosts is not None else {}),
            "started": iso_timestamp(manager.started_at),
            "last_activity": iso_timestamp(last),
            "connections": sum(len(k.clients) for k in kernels),
            "kernels": len(kernels),
            "pool": {
                "ready": manager.pooled,
                "starting": manager.warming,
                "size": manager.config.pool_size,
                "failed_starts": manager.failed_starts,
                "last_error": manager.start_error,
            },
        }

    async def list_kernels(self, request: server.Request) -> tuple[int, Any]:
        grant = self._grant(request)
        return HTTPStatus.OK, [
            self.creator.describe(k) for k in self.manager.kernels.values() if grant.covers(k.id)
        ]

    async def create_kernel(self, request: server.Request) -> tuple[int, Any]:
        body = read_json_body(request, MAX_BODY)
        name = body.get("name") or DEFAULT_SPEC
        if not isinstance(name, str) or self.manager.specs.get(name) is None:
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
        host_label = body.get("host_label")
        if host_label is not None and not valid_name(host_label):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "host_label must be a host label")
        config = self.manager.config
        chosen = allowed_env(env, config.kernel_env_allow)
        startup = request_startup(body, config.allow_request_startup)
        kernel = await self.creator.create(
            self._grant(request),
            name,
            cwd=self._working_dir(env, path),
            env=chosen,
            startup=startup,
            host_label=host_label,
        )
        request.setHeader(b"location", f"/api/kernels/{kernel.id}".encode())
        return HTTPStatus.CREATED, self.creator.describe(kernel)

    async def get_kernel(self, request: server.Request, kernel_id: str) -> tuple[int, Any]:
        return HTTPStatus.OK, self.creator.describe(self.manager.get(kernel_id))

    async def delete_kernel(self, request: server.Request, kernel_id: str) -> tuple[int, Any]:
        self.auth.forget_kernel(kernel_id)
        self.manager.delete(self.manager.get(kernel_id))
        return HTTPStatus.NO_CONTENT, None

    async def interrupt_kernel(self, request: server.Request, kernel_id: str) -> tuple[int, Any]:
        self.manager.interrupt(self.manager.get(kernel_id))
        return HTTPStatus.NO_CONTENT, None

    async def create_share(self, request: server.Request, kernel_id: str) -> tuple[int, Any]:
        kernel = self.manager.get(kernel_id)
        body = read_json_body(request, MAX_BODY)
        role = body.get("role")
        if role not in (Role.COLLABORATOR.value, Role.OBSERVER.value):
            raise HTTPError(HTTPStatus.BAD_REQUEST, 'role must be "collaborator" or "observer"')
        expires_in = body.get("expires_in")
        if expires_in is not None and (
            isinstance(expires_in, bool)
            or not isinstance(expires_in, (int, float))
            or not 0 < expires_in <= MAX_SHARE_LIFETIME
        ):
            raise HTTPError(
                HTTPStatus.BAD_REQUEST,
                f"expires_in must be seconds, above 0 and at most {MAX_SHARE_LIFETIME}",
            )
        share, token = await self.auth.share(kernel.id, Role(role), expires_in=expires_in)
        # kernel= first: a proxy in front of several fronts sends the login
        # to the kernel's front, which made the share (docs/scaling.md).
        url = f"/login?kernel={kernel.id}&token={token}&next=/%3Fkernel%3D{kernel.id}"
        return HTTPStatus.CREATED, {**share.to_json(), "token": token, "url": url}

    def _kernel_or_lost(self, request: server.Request, kernel_id: str):
        """The kernel, or None for one that is gone but whose shares the
        server token may still list and revoke (they outlive a restart)."""
        try:
            return self.manager.get(kernel_id)
        except KernelError:
            if self._grant(request).sees_all and self.auth.shares(kernel_id):
                return None
            raise

    async def list_shares(self, request: server.Request, kernel_id: str) -> tuple[int, Any]:
        self._kernel_or_lost(request, kernel_id)
        return HTTPStatus.OK, [s.to_json() for s in self.auth.shares(kernel_id)]

    async def revoke_share(
        self, request: server.Request, kernel_id: str, share_id: str
    ) -> tuple[int, Any]:
        kernel = self._kernel_or_lost(request, kernel_id)
        if kernel is not None:
            kernel.revoke(share_id)  # cut off its connections at once, whatever follows
        if await self.auth.revoke(kernel_id, share_id) is None:
            raise HTTPError(HTTPStatus.NOT_FOUND, f"no share {share_id} of this kernel")
        return HTTPStatus.NO_CONTENT, None

    async def restart_kernel(self, request: server.Request, kernel_id: str) -> tuple[int, Any]:
        kernel = await self.manager.restart(self.manager.get(kernel_id))
        return HTTPStatus.OK, kernel.model()

    async def channels_not_upgraded(self, request: server.Request, kernel_id: str):
        raise HTTPError(
            HTTPStatus.BAD_REQUEST, "the kernel channels are a websocket: send Upgrade: websocket"
        )

    async def list_kernelspecs(self, request: server.Request) -> tuple[int, Any]:
        return HTTPStatus.OK, kernelspecs_model(self.manager.specs)

    async def get_kernelspec(self, request: server.Request, name: str) -> tuple[int, Any]:
        model = kernelspec_model(self.manager.specs, name)
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

    async def _session_kernel(
        self, grant: Grant, kernel_id: str | None, name: str | None, path: str
    ):
        """The kernel a session asks for: an existing one by id, or a new one
        (started in the session's folder)."""
        if kernel_id is not None:
            kernel = self.manager.get(kernel_id)
            if not grant.covers(kernel.id):
                raise HTTPError(HTTPStatus.FORBIDDEN, f"kernel {kernel.id} is not one of yours")
            return kernel
        name = name or DEFAULT_SPEC
        if self.manager.specs.get(name) is None:
            raise SessionError(HTTPStatus.NOT_IMPLEMENTED, f"no kernel spec named {name!r}")
        cwd = self._working_dir(None, notebook_folder(path))
        return await self.creator.create(grant, name, cwd=cwd)

    def _release_kernel(self, kernel_id: str) -> None:
        """Shut a session's old kernel down unless another session uses it."""
        if kernel_id in self.manager.kernels and not self.sessions.kernel_in_use(kernel_id):
            self.manager.delete(self.manager.get(kernel_id))

    async def list_sessions(self, request: server.Request) -> tuple[int, Any]:
        grant = self._grant(request)
        return HTTPStatus.OK, [
            self._session_model(s) for s in self.sessions.all() if grant.covers(s.kernel_id)
        ]

    async def create_session(self, request: server.Request) -> tuple[int, Any]:
        body = read_json_body(request, MAX_BODY)
        path, name, kind = session_fields(body)
        if not path:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "a session needs a path")
        # Jupyter answers a second POST for the same path with the first session.
        session = self.sessions.by_path(path)
        if session is not None and not self._grant(request).covers(session.kernel_id):
            raise HTTPError(HTTPStatus.CONFLICT, f"another user has a session for {path}")
        if session is None:
            kernel = await self._session_kernel(self._grant(request), *kernel_request(body), path)
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
            grant = self._grant(request)
            changes["kernel_id"] = (
                await self._session_kernel(grant, kernel_id, spec, folder_of)
            ).id
        session = self.sessions.update(session_id, **changes)
        if session.kernel_id != before.kernel_id:
            self._release_kernel(before.kernel_id)
        return HTTPStatus.OK, self._session_model(session)

    async def delete_session(self, request: server.Request, session_id: str) -> tuple[int, Any]:
        session = self.sessions.remove(session_id)
        self._release_kernel(session.kernel_id)
        return HTTPStatus.NO_CONTENT, None
