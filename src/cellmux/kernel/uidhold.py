# -*- test-case-name: tests.security.test_uid_hold -*-
"""Holding a kernel uid machine-wide, whatever network namespace one is in.

A nursery running as root gives each kernel a uid of its own and, when the
kernel ends, kills every process of that uid. That is only safe if no other
nursery on the machine is using the uid at the same time, so each nursery
*holds* the uids it uses, and sweeps only uids it could hold itself.

A hold is two locks, both freed by the kernel when their holder closes
them or dies (so a crash never leaks a uid):

- the abstract unix socket ``cellmux-uid-N``, bound. Abstract sockets
  belong to a network namespace, so on their own they cannot see a
  nursery in another namespace (a second server in a container or under
  ``ip netns exec``) — which would then sweep, and kill, this one's
  kernels;
- an exclusive ``flock`` on ``UID_LOCK_DIR/N``: file locks belong to the
  file, which every namespace sharing the file system sees.

The directory is made root-only (0700). If it cannot be used (a read-only
``/run``, or a directory someone else owns), holds fall back to the socket
alone, and the returned reason says why.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat

__all__ = ["UID_LOCK_DIR", "UidHold", "hold_uid", "lock_dir_problem"]

#: Where the file half of each hold lives: machine-wide, root-only, on a
#: tmpfs (so nothing of it outlives a reboot, when uids mean nothing).
UID_LOCK_DIR = "/run/cellmux-uids"


class UidHold:
    """One held uid; L{close} frees it."""

    def __init__(self, uid: int, sock: socket.socket, fd: int | None) -> None:
        self.uid = uid
        self._sock: socket.socket | None = sock
        self._fd = fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # frees the flock
            self._fd = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def lock_dir_problem(directory: str = UID_LOCK_DIR) -> str | None:
    """Make the lock directory if needed; why it cannot be used, or None."""
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        return f"cannot make {directory}: {e.strerror}"
    try:
        st = os.lstat(directory)
    except OSError as e:
        return f"cannot read {directory}: {e.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{directory} is not a directory"
    # Anyone else who could write there could take every uid's lock.
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        return f"{directory} is not owned and writable by this user alone"
    return None


def _lock_file(uid: int, directory: str) -> int | None:
    """An fd holding the uid's file lock; None if someone else holds it.

    @raise OSError: if the lock file cannot be opened at all.
    """
    fd = os.open(
        os.path.join(directory, str(uid)),
        os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
        0o600,
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd


def hold_uid(uid: int, directory: str | None = UID_LOCK_DIR) -> UidHold | None:
    """Hold C{uid}, or None if a nursery (in any namespace) holds it.

    C{directory} None: the socket alone (the lock directory is unusable;
    see L{lock_dir_problem}).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(f"\0cellmux-uid-{uid}")
    except OSError:
        sock.close()
        return None
    fd = None
    if directory is not None:
        try:
            fd = _lock_file(uid, directory)
        except OSError:
            sock.close()
            return None  # cannot tell whether someone holds it: assume so
        if fd is None:
            sock.close()
            return None
    return UidHold(uid, sock, fd)
