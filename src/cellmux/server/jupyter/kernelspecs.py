# -*- test-case-name: tests.test_jupyter_rest -*-
"""The kernel specs cellmux offers, in Jupyter's kernelspec model, and their files.

The specs are L{cellmux.server.kernelspecs}'s: ``python3`` (stock ipykernel
forked from the nursery) and every kernelspec installed where the server
runs. No spec has an ``argv`` a client could run: the server starts kernels.
The logos are each spec's own, served from ``/kernelspecs/{name}/{file}``.
"""

from __future__ import annotations

import json
import mimetypes
import os
from pathlib import Path
from typing import Any

from twisted.web import resource, server

from ..kernelspecs import DEFAULT_SPEC, KernelSpec, KernelSpecs

__all__ = ["DEFAULT_SPEC", "KernelspecFiles", "kernelspec_model", "kernelspecs_model"]

#: Largest file served from a kernelspec's directory (logos are small).
MAX_FILE = 1024 * 1024


def _files(spec: KernelSpec) -> dict[str, Path]:
    """The spec's resource files by name: the regular files directly in its
    directory, kernel.json aside."""
    directory = spec.resource_dir
    if not directory or not os.path.isdir(directory):
        return {}
    found = {}
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name != "kernel.json" and entry.is_file(follow_symlinks=False):
                found[entry.name] = Path(entry.path)
    return found


def kernelspec_model(specs: KernelSpecs, name: str) -> dict[str, Any] | None:
    """``{"name", "spec", "resources"}`` for one spec, or None if unknown."""
    spec = specs.get(name)
    if spec is None:
        return None
    return _model(spec)


def _model(spec: KernelSpec) -> dict[str, Any]:
    found = {
        file.rsplit(".", 1)[0]: f"/kernelspecs/{spec.name}/{file}"
        for file in sorted(_files(spec))
        if file.startswith("logo-")
    }
    return {"name": spec.name, "spec": spec.model(), "resources": found}


def kernelspecs_model(specs: KernelSpecs) -> dict[str, Any]:
    """The body of ``GET /api/kernelspecs``."""
    return {
        "default": DEFAULT_SPEC,
        "kernelspecs": {name: _model(spec) for name, spec in specs.all().items()},
    }


def _json(request: server.Request, status: int, body: dict[str, Any]) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(body).encode()


class KernelspecFiles(resource.Resource):
    """``GET /kernelspecs/{name}/{file}``: a spec's logo, token required."""

    isLeaf = True

    def __init__(self, auth, specs: KernelSpecs) -> None:
        super().__init__()
        self._auth = auth
        self._specs = specs

    def render_GET(self, request: server.Request) -> bytes:
        grant = self._auth.web_grant(request)
        # The server token and named tokens (whose users' Jupyter clients
        # show these logos); share tokens and capabilities have no use for them.
        if grant is None or grant.kernel_id is not None:
            return _json(
                request, 403, {"message": "a valid token is required", "reason": "Forbidden"}
            )
        segments = [s.decode("utf-8", "replace") for s in request.postpath or ()]
        if len(segments) != 2:
            return _json(
                request, 404, {"message": "use /kernelspecs/{name}/{file}", "reason": "Not Found"}
            )
        name, file = segments
        # Only names listed from the directory are served: no path reaches
        # outside it, whatever the request says.
        spec = self._specs.get(name)
        path = _files(spec).get(file) if spec is not None else None
        if path is None or path.stat().st_size > MAX_FILE:
            message = f"no file {file!r} in kernel spec {name!r}"
            return _json(request, 404, {"message": message, "reason": "Not Found"})
        kind = mimetypes.guess_type(file)[0] or "application/octet-stream"
        request.setHeader(b"content-type", kind.encode())
        return path.read_bytes()
