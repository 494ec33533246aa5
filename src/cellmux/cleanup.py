# -*- test-case-name: tests.test_cleanup -*-
"""Removing directory trees that a kernel made, safely.

A kernel controls what is in its directories: a tree thousands of levels
deep, paths longer than PATH_MAX, directories without permissions, symlinks
pointing out of the tree, a million files. ``shutil.rmtree`` recurses once
per level (a deep tree raises RecursionError, which is no OSError) and
cannot be stopped half-way. L{remove_tree} instead:

- walks iteratively, holding one directory descriptor at a time (the depth
  costs no descriptors and no stack), working relative to it, so no path
  grows with the depth;
- never follows a symlink and never leaves the file system it started on;
- checks, each time it climbs back up, that the parent is still the
  directory it came from (by device and inode), so a tree moved while it
  works cannot lead it elsewhere;
- stops at a deadline and says so, so that a caller with a main loop can
  come back later instead of stalling; what it removed stays removed;
- never raises: every failure is a C{False} result and a reason.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import Callable

import attrs

__all__ = ["Removal", "remove_tree", "tree_usage"]

#: How many entries are handled between two looks at the clock.
_CLOCK_EVERY = 256

#: Fresh walks after a directory vanished under one (another remover).
_RETRIES = 100

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@attrs.frozen
class Removal:
    """The outcome of one L{remove_tree} call."""

    #: The tree is gone (or was never there).
    done: bool
    #: Why not, when not done: "deadline", or the error met.
    reason: str = ""

    def __bool__(self) -> bool:
        return self.done


@attrs.define
class _Level:
    """One directory on the way down: its name in its parent and identity."""

    name: str
    identity: tuple[int, int]
    #: Subdirectory names still to enter (None until the directory is read).
    pending: list[str] | None = None


class _OutOfTime(Exception):
    pass


class _Moved(Exception):
    pass


def remove_tree(
    path: str | os.PathLike[str],
    *,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Removal:
    """Remove C{path} and everything under it, without following links.

    @param deadline: a time on C{clock} after which to stop, leaving the
        rest for a later call.
    @return: a L{Removal}, true when nothing of C{path} is left.
    """
    try:
        for _ in range(_RETRIES):
            try:
                _remove(os.fspath(path), deadline, clock)
                break
            except FileNotFoundError:
                # Someone else removes the same tree (a directory vanished
                # under the walk): start again from the top.
                continue
        else:
            return Removal(False, "the tree kept changing while it was being removed")
    except _OutOfTime:
        return Removal(False, "deadline")
    except _Moved:
        return Removal(False, "the tree was moved while it was being removed")
    except Exception as e:  # anything at all: cleanup never raises
        return Removal(False, f"{type(e).__name__}: {e}")
    return Removal(True)


def _remove(path: str, deadline: float | None, clock: Callable[[], float]) -> None:
    try:
        top = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(top.st_mode):
        os.unlink(path)
        return
    parent_path, name = os.path.split(os.path.abspath(path))
    parent = os.open(parent_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    current = -1
    try:
        entered = _enter(parent, name, top.st_dev)
        if entered is None:
            return
        current = entered
        levels = [_Level(name, _identity(current))]
        ticks = 0
        while True:
            level = levels[-1]
            if level.pending is None:
                level.pending = []
                with os.scandir(current) as entries:
                    for entry in entries:
                        ticks += 1
                        late = ticks % _CLOCK_EVERY == 0
                        if late and deadline is not None and clock() > deadline:
                            raise _OutOfTime
                        if entry.is_dir(follow_symlinks=False):
                            level.pending.append(entry.name)
                        else:
                            with contextlib.suppress(FileNotFoundError):
                                os.unlink(entry.name, dir_fd=current)
            if level.pending:
                ticks += 1
                if deadline is not None and clock() > deadline:
                    raise _OutOfTime
                sub = level.pending.pop()
                child = _enter(current, sub, top.st_dev)
                if child is not None:
                    os.close(current)
                    current = child
                    levels.append(_Level(sub, _identity(child)))
                continue
            # This directory is empty now: climb up and remove it. Each
            # rmdir is a journal write (milliseconds on a busy disk), so a
            # deep chain's climb watches the deadline too.
            ticks += 1
            if deadline is not None and clock() > deadline:
                raise _OutOfTime
            levels.pop()
            if not levels:
                os.close(current)
                current = -1
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(name, dir_fd=parent)
                return
            up = os.open("..", _DIR_FLAGS, dir_fd=current)
            os.close(current)
            current = up
            if _identity(current) != levels[-1].identity:
                raise _Moved
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(level.name, dir_fd=current)
    finally:
        if current is not None and current >= 0:
            os.close(current)
        os.close(parent)


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _enter(parent: int, name: str, device: int) -> int | None:
    """Open a subdirectory to work in it; None if it vanished.

    A directory its maker left without permissions is given them first
    (for a server that is not root); one on another file system (a mount)
    is refused rather than emptied.
    """
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        return None
    except PermissionError:
        handle = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY, dir_fd=parent)
        try:
            # chmod through the O_PATH handle: it names exactly this
            # directory, even if the name is replaced meanwhile.
            os.chmod(f"/proc/self/fd/{handle}", 0o700)
        finally:
            os.close(handle)
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
    st = os.fstat(fd)
    if st.st_dev != device:
        os.close(fd)
        raise OSError(f"{name!r} is on another file system; not removing it")
    if st.st_mode & 0o700 != 0o700:
        # Without write permission its entries cannot be unlinked.
        with contextlib.suppress(PermissionError):
            os.fchmod(fd, 0o700)
    return fd


def tree_usage(
    path: str | os.PathLike[str],
    *,
    min_entry: int = 0,
    stop_above: int | None = None,
) -> int:
    """Bytes the files under C{path} take on disk, however deep they lie.

    Walks like L{remove_tree} (one descriptor at a time, relative to it,
    never following a link), so a chain of directories longer than
    PATH_MAX cannot hide what lies at its bottom. Each entry counts at least
    C{min_entry} bytes; the walk stops once the total passes C{stop_above}.
    What cannot be read is not counted. Never raises.
    """
    try:
        return _usage(os.fspath(path), min_entry, stop_above)
    except Exception:
        return 0


def _usage(path: str, min_entry: int, stop_above: int | None) -> int:
    try:
        top = os.lstat(path)
    except OSError:
        return 0
    if not stat.S_ISDIR(top.st_mode):
        return max(top.st_blocks * 512, min_entry)
    total = 0
    try:
        current = os.open(path, _DIR_FLAGS)
    except OSError:
        return 0
    try:
        levels = [_Level("", _identity(current))]
        while levels:
            level = levels[-1]
            if level.pending is None:
                level.pending = []
                with contextlib.suppress(OSError), os.scandir(current) as entries:
                    for entry in entries:
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except OSError:
                            continue
                        total += max(st.st_blocks * 512, min_entry)
                        if stop_above is not None and total > stop_above:
                            return total
                        if stat.S_ISDIR(st.st_mode) and st.st_dev == top.st_dev:
                            level.pending.append(entry.name)
            if level.pending:
                sub = level.pending.pop()
                try:
                    child = os.open(sub, _DIR_FLAGS, dir_fd=current)
                except OSError:
                    continue
                os.close(current)
                current = child
                levels.append(_Level(sub, _identity(child)))
                continue
            levels.pop()
            if not levels:
                break
            up = os.open("..", _DIR_FLAGS, dir_fd=current)
            os.close(current)
            current = up
            if _identity(current) != levels[-1].identity:
                break  # the tree moved under the walk: count no further
    finally:
        os.close(current)
    return total
