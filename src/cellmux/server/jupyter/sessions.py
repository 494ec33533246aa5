# -*- test-case-name: tests.test_jupyter_rest -*-
"""Jupyter's sessions: which notebook or console path uses which kernel. No I/O.

A Jupyter Server with ``--gateway-url`` keeps its sessions itself; a client
that talks to cellmux directly (JupyterLab's services, nbclient-style tools)
needs ``/api/sessions`` to pair a path with a kernel. cellmux keeps them in
memory: they live as long as their kernel, and a kernel that is gone takes
its sessions with it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import attrs

from ..fronts import mint_kernel_id

__all__ = ["Session", "SessionError", "SessionTable"]


class SessionError(Exception):
    """A session request that cannot be carried out.

    @ivar status: the HTTP status Jupyter answers it with.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@attrs.frozen
class Session:
    id: str
    path: str
    name: str
    type: str
    kernel_id: str

    def model(self, kernel_model: dict[str, Any]) -> dict[str, Any]:
        model = {
            "id": self.id,
            "path": self.path,
            "name": self.name,
            "type": self.type,
            "kernel": kernel_model,
        }
        if self.type == "notebook":  # what pre-2 notebook clients read
            model["notebook"] = {"path": self.path, "name": self.name}
        return model


def _text(body: dict[str, Any], key: str, default: str | None = None) -> str | None:
    value = body.get(key, default)
    if value is not None and not isinstance(value, str):
        raise SessionError(400, f"{key} must be a string")
    return value


def session_fields(body: dict[str, Any]) -> tuple[str | None, str | None, str | None]:
    """path, name and type from a POST or PATCH body (path also from ``notebook``)."""
    notebook = body.get("notebook")
    path = _text(body, "path")
    if path is None and isinstance(notebook, dict):
        path = _text(notebook, "path")
    return path, _text(body, "name"), _text(body, "type")


def kernel_request(body: dict[str, Any]) -> tuple[str | None, str | None]:
    """(kernel id, spec name) asked for in a body's ``kernel`` object."""
    kernel = body.get("kernel")
    if kernel is None:
        return None, None
    if not isinstance(kernel, dict):
        raise SessionError(400, "kernel must be an object with an id or a name")
    return _text(kernel, "id"), _text(kernel, "name")


class SessionTable:
    """Sessions by id.

    @param alive: tells whether a kernel id still exists; sessions of
        kernels that are gone are dropped whenever the table is read.
    """

    def __init__(self, alive: Callable[[str], bool], tag: str | None = None) -> None:
        self._alive = alive
        # This front's tag (server/fronts.py): session ids carry it too.
        self._tag = tag
        self._sessions: dict[str, Session] = {}

    def _prune(self) -> None:
        for sid in [s.id for s in self._sessions.values() if not self._alive(s.kernel_id)]:
            del self._sessions[sid]

    def all(self) -> Iterable[Session]:
        self._prune()
        return list(self._sessions.values())

    def get(self, session_id: str) -> Session:
        self._prune()
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionError(404, f"no session {session_id}")
        return session

    def by_path(self, path: str) -> Session | None:
        self._prune()
        return next((s for s in self._sessions.values() if s.path == path), None)

    def add(self, path: str, name: str, type: str, kernel_id: str) -> Session:
        session = Session(mint_kernel_id(self._tag), path, name, type, kernel_id)
        self._sessions[session.id] = session
        return session

    def update(self, session_id: str, **changes: str) -> Session:
        session = attrs.evolve(self.get(session_id), **changes)
        self._sessions[session_id] = session
        return session

    def remove(self, session_id: str) -> Session:
        session = self.get(session_id)
        del self._sessions[session_id]
        return session

    def kernel_in_use(self, kernel_id: str) -> bool:
        return any(s.kernel_id == kernel_id for s in self.all())
