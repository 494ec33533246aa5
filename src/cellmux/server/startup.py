# -*- test-case-name: tests.test_kernel_startup -*-
"""What a new kernel runs before its first cell: environment variables and
start-up code from the config and from the create request, and the lower
limits of a public visitor's kernel.

Kernels come forked and warm from the pool, so nothing of this can be in
their environment from the start: the server sends one silent
``execute_request`` (no execution count, no history) that sets
``os.environ``, lowers the kernel's rlimits (any process may lower its own)
and runs the start-up code in the user's namespace. A failure (an exception,
a kernel that dies, a time-out) fails the create request and the kernel is
deleted.

Allowed variables: a create request's ``env`` may set only names that
match the ``kernel_env_allow`` patterns. ``KERNEL_*`` names are what a
Jupyter Server gateway sends for its own purposes: they are not applied
(``KERNEL_WORKING_DIR`` chooses the working directory) and never refused.
"""

from __future__ import annotations

import fnmatch
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

import attrs
from twisted.internet import defer

from cellmux.protocol import Channel, JupyterSocket, ProtocolError, boundedjson, decode_frame
from cellmux.protocol.jupyter import jupyter_parts

from .webjson import HTTPError

__all__ = [
    "MAX_ENV_VALUE",
    "MAX_STARTUP",
    "StartupFailed",
    "allowed_env",
    "limits_code",
    "prepare_kernel",
    "startup_code",
]

#: Longest start-up code a create request may carry, in characters.
MAX_STARTUP = 64 * 1024
#: Longest value of one variable, and most variables, of a create request.
MAX_ENV_VALUE = 32 * 1024
MAX_ENV_NAMES = 100
#: Seconds the start-up run may take before the create request fails.
STARTUP_TIMEOUT = 30.0

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class StartupFailed(Exception):
    """The kernel's start-up run raised, died or timed out."""


def allowed_env(env: Mapping[str, str], patterns: Sequence[str]) -> dict[str, str]:
    """The variables of a create request's C{env} to set in its kernel.

    @raise HTTPError: 400 naming every variable the config does not allow.
    """
    chosen = {k: v for k, v in env.items() if not k.startswith("KERNEL_")}
    if len(chosen) > MAX_ENV_NAMES:
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"env sets over {MAX_ENV_NAMES} variables")
    bad = sorted(k for k in chosen if not _NAME.fullmatch(k))
    if bad:
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"env names are not valid: {', '.join(bad)}")
    refused = sorted(k for k in chosen if not any(fnmatch.fnmatchcase(k, p) for p in patterns))
    if refused:
        allowed = ", ".join(patterns) if patterns else "none"
        raise HTTPError(
            HTTPStatus.BAD_REQUEST,
            f"env may not set {', '.join(refused)} (the server allows: {allowed}; "
            "see kernel_env_allow)",
        )
    for name, value in chosen.items():
        if len(value) > MAX_ENV_VALUE or "\0" in value:
            raise HTTPError(
                HTTPStatus.BAD_REQUEST, f"env {name}: at most {MAX_ENV_VALUE} characters, no NUL"
            )
    return chosen


def request_startup(body: Mapping[str, Any], allowed: bool) -> str:
    """A create request's own ``startup`` code ("" for none).

    @raise HTTPError: 400 if it is not a string, too long, or not allowed.
    """
    code = body.get("startup")
    if code is None or code == "":
        return ""
    if not isinstance(code, str):
        raise HTTPError(HTTPStatus.BAD_REQUEST, "startup must be a string of Python code")
    if not allowed:
        raise HTTPError(
            HTTPStatus.BAD_REQUEST,
            "this server does not take startup code in create requests (allow_request_startup)",
        )
    if len(code) > MAX_STARTUP:
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"startup code over {MAX_STARTUP} characters")
    return code


def limits_code(limits: Mapping[str, int]) -> str:
    """Code that lowers the kernel process's own rlimits (never raises them).

    @param limits: C{cpu_seconds}, C{memory_mb}, C{file_size_mb},
        C{open_files}, and C{processes} (only where each kernel has its own
        uid: RLIMIT_NPROC counts every process of the uid).

    Address space is limited to twice C{memory_mb}, as the sandbox's
    backstop is: it counts reserved memory (thread stacks) too.
    """
    mib = 1024 * 1024
    wanted = {
        "RLIMIT_CPU": limits["cpu_seconds"],
        "RLIMIT_AS": 2 * limits["memory_mb"] * mib,
        "RLIMIT_FSIZE": limits["file_size_mb"] * mib,
        "RLIMIT_NOFILE": limits["open_files"],
    }
    if limits.get("processes"):
        wanted["RLIMIT_NPROC"] = limits["processes"]
    return (
        "def __cellmux_limits(wanted):\n"
        "    import resource\n"
        "    for name, value in wanted.items():\n"
        "        which = getattr(resource, name)\n"
        "        soft, hard = resource.getrlimit(which)\n"
        "        # CPU: SIGXCPU first, SIGKILL 2 s later, as the sandbox does\n"
        "        top = value + 2 if name == 'RLIMIT_CPU' else value\n"
        "        if hard != resource.RLIM_INFINITY:\n"
        "            value, top = min(value, hard), min(top, hard)\n"
        "        resource.setrlimit(which, (value, top))\n"
        f"__cellmux_limits({json.dumps(wanted)})\n"
        "del __cellmux_limits\n"
    )


def startup_code(
    env: Mapping[str, str], config_code: str, request_code: str, limits: str = ""
) -> str:
    """The one silent run a new kernel gets ("" when there is nothing to do).

    Order: the limits (so the start-up code runs under them), the variables,
    the config's code, then the request's.
    """
    pieces = []
    if limits:
        pieces.append(limits)
    if env:
        update = json.dumps(dict(env))
        pieces.append(f"__import__('os').environ.update({update})\n")
    if config_code:
        pieces.append(config_code)
    if request_code:
        pieces.append(request_code)
    # Each piece on its own: a SyntaxError names the piece that has it.
    return "\n".join(
        f"exec(compile({json.dumps(piece)}, {json.dumps(name)}, 'exec'), globals())"
        for name, piece in zip(_names(limits, env, config_code, request_code), pieces, strict=True)
    )


def _names(limits: str, env: Mapping[str, str], config_code: str, request_code: str) -> list[str]:
    names = []
    if limits:
        names.append("<cellmux limits>")
    if env:
        names.append("<cellmux env>")
    if config_code:
        names.append("<kernel_startup>")
    if request_code:
        names.append("<startup>")
    return names


@attrs.define(eq=False)
class _StartupRun:
    """An in-process client that waits for one silent execution's reply."""

    msg_id: str
    max_frame: int
    session: str = attrs.field(factory=lambda: f"cellmux-startup-{uuid.uuid4().hex}")
    done: defer.Deferred = attrs.field(factory=defer.Deferred)

    def wants(self, channel: int) -> bool:
        return channel in (Channel.EXECUTE, Channel.STATUS)

    def send_frame(self, data: bytes) -> None:
        if self.done.called:
            return
        try:
            frame = decode_frame(data, self.max_frame)
            if len(frame.parts) < 4:
                return
            header, parent = (boundedjson.loads(p) for p in frame.parts[:2])
            if not isinstance(header, dict) or not isinstance(parent, dict):
                return
            if header.get("msg_type") != "execute_reply" or parent.get("msg_id") != self.msg_id:
                return
            content = boundedjson.loads(frame.parts[3])
        except (ProtocolError, ValueError):
            return
        if not isinstance(content, dict):
            return
        if content.get("status") == "ok":
            self.done.callback(None)
        else:
            ename, evalue = content.get("ename", "Error"), content.get("evalue", "")
            self.done.errback(StartupFailed(f"{ename}: {evalue}"))

    def kernel_gone(self, reason: str) -> None:
        if not self.done.called:
            self.done.errback(StartupFailed(f"the kernel ended ({reason})"))


async def prepare_kernel(kernel: Any, code: str, reactor: Any, max_frame: int) -> None:
    """Run C{code} silently on a new kernel and wait for its reply.

    @raise StartupFailed: it raised, the kernel died, or it took longer
        than L{STARTUP_TIMEOUT}.
    """
    run = _StartupRun(uuid.uuid4().hex, max_frame)
    kernel.attach(run)
    try:
        content = {
            "code": code,
            "silent": True,
            "store_history": False,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": False,
        }
        now = datetime.fromtimestamp(reactor.seconds(), UTC)
        parts = jupyter_parts(
            "execute_request", content, now=now, session=run.session, msg_id=run.msg_id
        )
        kernel.send(Channel.EXECUTE, JupyterSocket.SHELL, parts)
        run.done.addTimeout(STARTUP_TIMEOUT, reactor)
        try:
            await run.done
        except defer.TimeoutError:
            raise StartupFailed(f"it took over {STARTUP_TIMEOUT:g} s") from None
    finally:
        kernel.detach(run)
