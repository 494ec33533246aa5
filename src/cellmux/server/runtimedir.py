# -*- test-case-name: tests.test_orphans -*-
"""The runtime directory: made (or taken over) at start, cleared at stop.

A directory the operator configured is never removed, at stop or by a later
server's sweep: only what cellmux made in it goes (the kernels' directories,
the link endpoints, an older version's stale link socket). A temporary
directory the server made itself is removed whole when it stops.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import tempfile
import time
from collections.abc import Iterable

from twisted.logger import Logger

from cellmux.cleanup import Removal, remove_tree

__all__ = [
    "RuntimeDirInUse",
    "disk_full",
    "make_private_runtime_dir",
    "prepare_runtime_dir",
    "remove_owned",
]

log = Logger()

#: The shared link socket older versions bound in the runtime directory.
LINK_SOCKET = "link.sock"
#: Free bytes below which the runtime directory's disk counts as full: a
#: new kernel writes IPython's profile there and would die starting.
MIN_FREE_BYTES = 8 * 1024 * 1024
#: Free inodes likewise.
MIN_FREE_INODES = 64


class RuntimeDirInUse(Exception):
    """Another running server uses this runtime directory."""


def _same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _listening(path: str) -> bool:
    """Whether some process accepts connections on the unix socket path."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError as e:
        # Refused: nobody listens (a crash left the file). A time-out or a
        # full backlog still means somebody does.
        return e.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    else:
        return True
    finally:
        probe.close()


def prepare_runtime_dir(path: str, busy: Iterable[str] = ()) -> None:
    """Make a configured runtime directory ready, taking over a crashed one.

    @param busy: runtime directories of servers known to be running.
    @raise RuntimeDirInUse: if a running server uses it (binding its link
        socket again would steal that server's kernels).
    @raise OSError: if it cannot be made.
    """
    os.makedirs(path, mode=0o700, exist_ok=True)
    if any(_same_dir(path, other) for other in busy):
        raise RuntimeDirInUse(
            f"runtime directory {path} is in use by a running cellmux server; "
            "give each server its own runtime_dir"
        )
    sock = os.path.join(path, LINK_SOCKET)
    try:
        mode = os.lstat(sock).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise RuntimeDirInUse(f"{sock} exists and is not a socket; not touching it")
    if _listening(sock):
        raise RuntimeDirInUse(
            f"runtime directory {path} is in use: a process listens on {sock}; "
            "give each server its own runtime_dir"
        )
    # Left by a server that crashed: nobody listens on it any more.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock)
    log.info("removed the stale link socket {sock} a crashed server left", sock=sock)


def disk_full(path: str) -> str | None:
    """Why the disk holding path cannot take a new kernel, or None if it can.

    One statvfs call: cheap enough for the reactor thread.
    """
    try:
        st = os.statvfs(path)
    except OSError:
        return None  # not there yet (made later); starting tells what is wrong
    free = st.f_bavail * st.f_frsize
    if free < MIN_FREE_BYTES:
        return f"the disk of the runtime directory is full ({free // 1024} KiB free)"
    if st.f_files and st.f_favail < MIN_FREE_INODES:
        return f"the disk of the runtime directory has no free inodes ({st.f_favail} left)"
    return None


def make_private_runtime_dir() -> str:
    """A fresh runtime directory under the system's temporary directory."""
    return tempfile.mkdtemp(prefix="cellmux-")


def remove_owned(path: str, seconds: float = 30.0) -> Removal:
    """Remove a runtime directory the server made; never raises."""
    removal = remove_tree(path, deadline=time.monotonic() + seconds)
    if not removal:
        log.warn(
            "could not remove the runtime directory {path}: {reason}; the next start "
            "with the same state directory tries again",
            path=path,
            reason=removal.reason,
        )
    return removal
