# -*- test-case-name: tests.test_nursery_reclaim -*-
"""Removing what an ended kernel left on disk.

A kernel controls what is in its directories: a tree thousands of levels
deep or a million files take minutes to remove on a busy disk (each rmdir
is a journal write). So the nursery never removes them in its own loop: a
helper process it forks does (see L{cellmux.kernel.nursery}), and the
nursery frees the kernel's uid when the helper says everything is gone.

A path that cannot be removed (an error other than running out of time) is
tried again L{RETRY_AFTER} seconds later; after L{MAX_ATTEMPTS}, or when
the deadline passes, it is moved out of the way instead: renamed to a
random name in the quarantine directory and closed to its maker (owned by
the remover, mode 0), so that a later kernel given the same uid cannot
reach it. The quarantine is emptied by the next nursery, or with the
server's runtime directory.

Nothing here raises: a failure is a warning and a C{False} result.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Callable, Iterable

from ..cleanup import remove_tree

__all__ = ["MAX_ATTEMPTS", "RETRY_AFTER", "move_aside", "reclaim"]

#: Seconds between two attempts at a path that failed for another reason
#: than the deadline.
RETRY_AFTER = 0.2

#: Attempts at a failing path before it is moved out of the way.
MAX_ATTEMPTS = 3

#: Attempts that failed because entries vanished under the walk (another
#: remover at work on the same tree) that do not count as failures.
MAX_VANISHED = 50


def reclaim(
    paths: Iterable[str],
    quarantine: str,
    warn: Callable[[str], None],
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], object] = time.sleep,
) -> bool:
    """Remove paths, or move them out of the way; whether that worked for all.

    @param deadline: a time on C{clock} after which what is left of a path
        is moved out of the way rather than removed.
    """
    ok = True
    for path in paths:
        failures = vanished = 0
        while True:
            removal = remove_tree(path, deadline=deadline, clock=clock)
            if removal or removal.reason == "deadline":
                break
            if removal.reason.startswith("FileNotFoundError") and vanished < MAX_VANISHED:
                vanished += 1  # someone else removes it too (the server): go on
            else:
                failures += 1
                if failures == MAX_ATTEMPTS:
                    break
            sleep(RETRY_AFTER)
        if removal or not os.path.lexists(path):
            continue
        warn(f"cannot remove {path} ({removal.reason}); moving it out of the way")
        if not move_aside(path, quarantine, warn):
            ok = False
    return ok


def move_aside(path: str, quarantine: str, warn: Callable[[str], None]) -> bool:
    """Rename path into the quarantine, closed to its maker; whether done."""
    target = os.path.join(quarantine, f".leftover-{secrets.token_hex(8)}")
    try:
        os.makedirs(quarantine, mode=0o700, exist_ok=True)
        os.rename(path, target)
    except FileNotFoundError:
        return True  # gone meanwhile
    except OSError as e:
        warn(f"cannot move {path} out of the way either: {e}")
        return False
    # Its maker's uid may be handed out again: close the tree to it.
    with contextlib.suppress(OSError):
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchown(fd, os.geteuid(), os.getegid())
            os.fchmod(fd, 0)
        finally:
            os.close(fd)
    return True
