# -*- test-case-name: tests.test_jupyter_workdirs -*-
"""Where a Jupyter client's kernel starts: its notebook's folder, inside
the configured ``shared_root``, never outside it.

A Jupyter Server with ``--gateway-url`` sends the notebook's folder as the
absolute path ``KERNEL_WORKING_DIR`` in the kernel's ``env``; JupyterLab
talking to cellmux directly sends the notebook's API path (relative, ``/``
separated) with the session. Both are resolved against ``shared_root`` as a
Jupyter Server resolves them against its ``root_dir``: a folder that does
not exist (yet) walks up to the nearest one that does, but never above the
root. Symlinks are resolved first, so none leads out of the root.
"""

from __future__ import annotations

import os
import posixpath

__all__ = ["WorkingDirError", "notebook_folder", "resolve_working_dir"]

#: The env variable a Jupyter Server's gateway client sends.
WORKING_DIR_VARIABLE = "KERNEL_WORKING_DIR"


class WorkingDirError(ValueError):
    """The requested working directory is outside the shared root."""


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def resolve_working_dir(
    root: str | None, env: dict[str, str] | None = None, api_path: str | None = None
) -> str | None:
    """The directory a new kernel starts in (None: its own private one).

    @param root: the configured shared root (None: working directories are
        not honoured, every kernel starts in its private directory).
    @param env: the create request's ``env``; ``KERNEL_WORKING_DIR`` (an
        absolute path, or one relative to the root) wins.
    @param api_path: a folder's API path relative to the root (a session's
        notebook path is turned into its folder by the caller).
    @raise WorkingDirError: for a path outside the root.
    """
    if not root:
        return None
    os_path = (env or {}).get(WORKING_DIR_VARIABLE)
    requested = os_path or api_path
    if not requested:
        return None
    real_root = os.path.realpath(root)
    if os_path and os.path.isabs(os_path):
        candidate = os.path.realpath(os_path)
    else:  # an API path: '/'-separated, relative to the root even with a leading '/'
        relative = posixpath.normpath("/" + requested.replace(os.sep, "/")).lstrip("/")
        candidate = os.path.realpath(os.path.join(real_root, relative))
    if not _inside(candidate, real_root):
        raise WorkingDirError(
            f"working directory {requested!r} is outside the shared root {root!r} "
            "(the server's shared_root setting)"
        )
    while not os.path.isdir(candidate) and candidate != real_root:
        candidate = os.path.dirname(candidate)
    if not os.path.isdir(candidate):
        raise WorkingDirError(f"the shared root {root!r} is not a directory")
    return candidate


def notebook_folder(session_path: str) -> str:
    """The folder (API path) of a session's notebook or console path."""
    return posixpath.dirname(session_path.replace(os.sep, "/"))
