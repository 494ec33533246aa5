# -*- test-case-name: tests.test_interrupts -*-
"""Ctrl-C interrupts the cell's code, never the kernel's own bookkeeping.

Stock ipykernel raises KeyboardInterrupt wherever SIGINT lands while it
handles a shell request. One that lands after ``execute_input`` went out
but before the cell's code starts (transforming the cell, compiling it) or
after it ended (building and sending the reply) is swallowed by
``dispatch_shell`` ("KeyboardInterrupt caught in kernel"): no
``execute_reply`` is ever sent, and the client waits for it forever. On a
loaded machine that window is milliseconds wide, and a user who presses
Ctrl-C right after Enter lands in it.

Here SIGINT raises only while IPython runs code of the cell (inside
``run_code``, where IPython turns it into a traceback and an error reply).
One that arrives anywhere else is *held*: the request's next ``run_code``
raises it before running anything, and one still held when the request
ends is dropped (the code it was meant for had already finished).
"""

from __future__ import annotations

import signal
import sys
import threading
from types import TracebackType
from typing import Any

__all__ = ["InterruptGate", "held_in_shield", "in_cell_code", "install", "shield"]

#: What a held interrupt runs instead of the cell's next statement: the
#: traceback then names the interrupt, not an internal frame.
_RAISE_HELD = compile("raise KeyboardInterrupt", "<interrupted before this cell ran>", "exec")


class InterruptGate:
    """Decides, for each SIGINT, between raising now and holding it."""

    def __init__(self) -> None:
        #: How many ``run_code`` calls are on the stack (magics nest them).
        self.depth = 0
        #: How many L{shield} blocks are being run.
        self.shielded = 0
        self.held = False

    def on_sigint(self, signum: int, frame: object) -> None:
        if self.depth and not self.shielded:
            raise KeyboardInterrupt
        self.held = True

    def take_held(self) -> bool:
        held, self.held = self.held, False
        return held


class _Shield:
    """``with shield:`` moves a Ctrl-C that lands in the block to its end.

    For the kernel's own few-line critical sections that run inside the
    cell's code (taking text out of a stream's buffer and queueing it): an
    interrupt between the two would lose the text.
    """

    def __enter__(self) -> None:
        if _gate is not None:
            _gate.shielded += 1

    def __exit__(self, *exc_info: object) -> None:
        gate = _gate
        if gate is not None:
            gate.shielded -= 1
            if not gate.shielded and gate.depth and gate.take_held():
                raise KeyboardInterrupt


shield = _Shield()
_gate: InterruptGate | None = None


def in_cell_code() -> bool:
    """Whether the main thread runs a cell's code now, outside the kernel's own
    shielded sections (cellmux.kernel.debugging pauses only there)."""
    gate = _gate
    return gate is not None and gate.depth > 0 and not gate.shielded


def held_in_shield() -> bool:
    """Whether a Ctrl-C meant for the cell's code is held by a L{shield}
    block of the main thread (one waiting for a slow client gives up)."""
    gate = _gate
    return (
        gate is not None
        and gate.held
        and gate.shielded > 0
        and gate.depth > 0
        and threading.current_thread() is threading.main_thread()
    )


#: Where a KeyboardInterrupt is raised here: the user's traceback ends at
#: their own line, not in this module.
_RAISING_CODE = (InterruptGate.on_sigint.__code__, _Shield.__exit__.__code__)


def _drop_own_frames(tb: TracebackType | None) -> None:
    """Cut C{tb} (in place) before the first frame of L{_RAISING_CODE}."""
    previous = None
    while tb is not None:
        if tb.tb_frame.f_code in _RAISING_CODE:
            if previous is not None:
                previous.tb_next = None
            return
        previous, tb = tb, tb.tb_next


def install(kernel: Any) -> InterruptGate:
    """Gate C{kernel}'s (an IPythonKernel's) SIGINT handling; return the gate."""
    global _gate
    gate = _gate = InterruptGate()
    shell = kernel.shell
    stock_run_code = shell.run_code

    async def run_code(code_obj: Any, result: Any = None, *, async_: bool = False) -> bool:
        gate.depth += 1
        try:
            if gate.take_held():
                code_obj, async_ = _RAISE_HELD, False
            return await stock_run_code(code_obj, result, async_=async_)
        finally:
            gate.depth -= 1

    def pre_handler_hook() -> None:
        # Stock installs signal.default_int_handler here, for every request.
        gate.held = False
        kernel.saved_sigint_handler = signal.signal(signal.SIGINT, gate.on_sigint)

    def post_handler_hook() -> None:
        gate.held = False
        signal.signal(signal.SIGINT, kernel.saved_sigint_handler)

    stock_showtraceback = shell.showtraceback

    def showtraceback(exc_tuple: Any = None, *args: Any, **kwargs: Any) -> Any:
        error = exc_tuple[1] if exc_tuple else sys.exc_info()[1]
        if isinstance(error, KeyboardInterrupt):
            _drop_own_frames(error.__traceback__)
        return stock_showtraceback(exc_tuple, *args, **kwargs)

    shell.run_code = run_code
    shell.showtraceback = showtraceback
    kernel.pre_handler_hook = pre_handler_hook
    kernel.post_handler_hook = post_handler_hook
    return gate
