# -*- test-case-name: tests.test_jupyter_rest -*-
"""The kernel specs cellmux offers, in Jupyter's kernelspec model, and their files.

cellmux runs one kind of kernel: stock ipykernel forked from the nursery.
Its spec has no ``argv`` a client could run: the server starts kernels.
The logos are ipykernel's own, served from ``/kernelspecs/{name}/{file}``.
"""

from __future__ import annotations

import functools
import json
import mimetypes
from importlib import resources as _resources
from pathlib import Path
from typing import Any

from twisted.web import resource, server

__all__ = ["DEFAULT_SPEC", "KernelspecFiles", "kernelspec_model", "kernelspecs_model"]

#: The one spec, and so the default.
DEFAULT_SPEC = "python3"

#: Jupyter messaging version of stock ipykernel 6.29+.
_PROTOCOL_VERSION = "5.5"

_SPECS: dict[str, dict[str, Any]] = {
    DEFAULT_SPEC: {
        "argv": [],
        "display_name": "Python 3 (cellmux)",
        "language": "python",
        "interrupt_mode": "signal",
        "env": {},
        # JupyterLab offers its debugger only for specs that say so; the
        # kernels speak the debug protocol on control (docs/jupyter.md).
        "metadata": {"debugger": True},
        "kernel_protocol_version": _PROTOCOL_VERSION,
    }
}


def _resource_dir() -> Path:
    return Path(str(_resources.files("ipykernel") / "resources"))


@functools.cache
def _files(name: str) -> dict[str, Path]:
    """The spec's resource files by file name (only what ipykernel ships)."""
    if name not in _SPECS:
        return {}
    directory = _resource_dir()
    if not directory.is_dir():
        return {}
    return {p.name: p for p in directory.iterdir() if p.is_file()}


def kernelspec_model(name: str) -> dict[str, Any] | None:
    """``{"name", "spec", "resources"}`` for one spec, or None if unknown."""
    spec = _SPECS.get(name)
    if spec is None:
        return None
    found = {file.rsplit(".", 1)[0]: f"/kernelspecs/{name}/{file}" for file in _files(name)}
    return {"name": name, "spec": dict(spec), "resources": found}


def kernelspecs_model() -> dict[str, Any]:
    """The body of ``GET /api/kernelspecs``."""
    return {
        "default": DEFAULT_SPEC,
        "kernelspecs": {name: kernelspec_model(name) for name in _SPECS},
    }


def _json(request: server.Request, status: int, body: dict[str, Any]) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(body).encode()


class KernelspecFiles(resource.Resource):
    """``GET /kernelspecs/{name}/{file}``: a spec's logo, token required."""

    isLeaf = True

    def __init__(self, auth) -> None:
        super().__init__()
        self._auth = auth

    def render_GET(self, request: server.Request) -> bytes:
        grant = self._auth.web_grant(request)
        # The server token and named tokens (whose users' Jupyter clients
        # show these logos); share tokens and capabilities have no use for them.
        if grant is None or grant.kernel_id is not None:
            return _json(
                request, 403, {"message": "a valid token is required", "reason": "Forbidden"}
            )
        segments = [s.decode("utf-8", "replace") for s in request.postpath]
        if len(segments) != 2:
            return _json(
                request, 404, {"message": "use /kernelspecs/{name}/{file}", "reason": "Not Found"}
            )
        name, file = segments
        # Only names listed from the directory are served: no path reaches
        # outside it, whatever the request says.
        path = _files(name).get(file)
        if path is None:
            message = f"no file {file!r} in kernel spec {name!r}"
            return _json(request, 404, {"message": message, "reason": "Not Found"})
        kind = mimetypes.guess_type(file)[0] or "application/octet-stream"
        request.setHeader(b"content-type", kind.encode())
        return path.read_bytes()
