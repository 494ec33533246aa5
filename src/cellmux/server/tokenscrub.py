"""Keep the server's token out of what other processes of its user can read.

Without root, kernels run as the server's user, and Linux lets a process
read ``/proc/<pid>/environ``, ``cmdline`` and ``mem`` of any process of the
same user. ``/proc/<pid>/environ`` and ``cmdline`` show the *initial*
blocks at the top of the process's stack, which ``os.environ`` edits do not
touch, so the token is overwritten there, in place; and the server makes
itself non-dumpable, which closes ``environ``, ``mem``, ``maps`` and ptrace
to every process without CAP_SYS_PTRACE (its memory still holds the token).
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["TOKEN_VARIABLE", "scrub_token"]

#: The environment variable the token may come from (operations.md).
TOKEN_VARIABLE = "CELLMUX_TOKEN"

_PR_SET_DUMPABLE = 4
#: Fields of /proc/self/stat (counted from 1) bounding argv and environ.
_ARG_START, _ARG_END, _ENV_START, _ENV_END = 48, 49, 50, 51

_libc = ctypes.CDLL(None, use_errno=True)


def scrub_token(token: str) -> None:
    """Remove the token from this process's environment and command line,
    and make the process unreadable to its own user's other processes.

    Also scrubs C{$CELLMUX_TOKEN} when it holds another value than token.
    """
    secrets = {token.encode()}
    from_environment = os.environ.pop(TOKEN_VARIABLE, None)
    if from_environment:
        secrets.add(from_environment.encode())
    for secret in secrets:
        if secret:
            _overwrite_initial_blocks(secret)
    # Non-dumpable: /proc/<pid>/{environ,mem,maps,...} become root's, and
    # ptrace needs CAP_SYS_PTRACE. Only worth it where kernels share our uid;
    # as root, kernels have their own uids and see no /proc entry of ours.
    if os.geteuid() != 0:
        _libc.prctl(_PR_SET_DUMPABLE, ctypes.c_ulong(0), 0, 0, 0)


def _initial_blocks() -> list[tuple[int, int]]:
    with open("/proc/self/stat", "rb") as f:
        # The command name (field 2) may hold spaces: split after its ")".
        fields = f.read().rsplit(b")", 1)[1].split()
    # fields[0] is field 3 of the line.
    value = [int(fields[n - 3]) for n in (_ARG_START, _ARG_END, _ENV_START, _ENV_END)]
    return [(value[0], value[1]), (value[2], value[3])]


def _overwrite_initial_blocks(secret: bytes) -> None:
    """Replace every occurrence of secret in the argv and environ blocks
    with asterisks of the same length (the blocks keep their layout)."""
    for start, end in _initial_blocks():
        if not start or end <= start:
            continue
        block = ctypes.string_at(start, end - start)
        position = block.find(secret)
        while position != -1:
            ctypes.memset(start + position, ord("*"), len(secret))
            position = block.find(secret, position + len(secret))
