# -*- test-case-name: tests.test_debugger_editor -*-
"""Debugging for editors: breakpoints by file and line, and *pause*.

Both use pdb over the stdin channel, as ``breakpoint()`` does, so any client
that answers ``input_request`` (``cellmux run``, the console, the browser)
can debug without speaking the Jupyter debug protocol (debugpy, which this
kernel also speaks, on control: docs/protocol.md).

* **Breakpoints.** An ``execute_request`` whose ``cellmux`` metadata holds
  ``"breakpoints": [{"filename": F, "line": N}, …]`` runs its code under a
  pdb that stops at those lines. The names are the ones the source map gives
  code sent as lines of a file (cellmux.kernel.sourcemap), so ``--break
  FILE:LINE`` of ``cellmux run`` means that line of that file, in this
  selection or in a function an earlier selection defined.
* **Pause.** A ``cellmux_pause_request`` on the control socket stops the
  running cell in pdb at the line it is running, instead of raising
  KeyboardInterrupt (Pyzo's pause). The control thread cannot trace the main
  thread, so it sends the main thread ``SIGUSR2``; the handler, which Python
  runs in the main thread between two bytecodes, starts pdb on the frame it
  interrupted. Outside a cell's code (cellmux.kernel.interrupts) a pause does
  nothing: there is nothing of the user's to stop in.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

from . import interrupts

__all__ = [
    "MAX_BREAKPOINTS",
    "PAUSE_REPLY",
    "PAUSE_REQUEST",
    "PAUSE_SIGNAL",
    "BreakpointError",
    "breakpoints_from_metadata",
    "install",
]

#: The control message that pauses, and its reply.
PAUSE_REQUEST = "cellmux_pause_request"
PAUSE_REPLY = "cellmux_pause_reply"
#: Sent by the kernel to its own main thread (nothing else in the kernel uses it).
PAUSE_SIGNAL = signal.SIGUSR2
#: Most breakpoints one request may set (each costs a check per traced call).
MAX_BREAKPOINTS = 256
_METADATA_KEY = "cellmux"


class BreakpointError(ValueError):
    """The request's ``breakpoints`` metadata is malformed."""


def breakpoints_from_metadata(metadata: Any) -> list[tuple[str, int]]:
    """The (filename, line) pairs an execute_request's metadata asks for.

    @raise BreakpointError: if ``cellmux.breakpoints`` is there but malformed.
    """
    if not isinstance(metadata, dict):
        return []
    value = metadata.get(_METADATA_KEY)
    if not isinstance(value, dict) or "breakpoints" not in value:
        return []
    points = value["breakpoints"]
    if not isinstance(points, list) or len(points) > MAX_BREAKPOINTS:
        raise BreakpointError(
            f"cellmux metadata: breakpoints must be a list of at most {MAX_BREAKPOINTS}"
        )
    found = []
    for point in points:
        filename = point.get("filename") if isinstance(point, dict) else None
        line = point.get("line") if isinstance(point, dict) else None
        if (
            not isinstance(filename, str)
            or not filename
            or len(filename) > 4096
            or not isinstance(line, int)
            or isinstance(line, bool)
            or line < 1
        ):
            raise BreakpointError(
                'cellmux metadata: each breakpoint is {"filename": non-empty string, '
                '"line": integer from 1}'
            )
        found.append((filename, line))
    return found


class _Breakpoints:
    """Run the cell's code under a pdb that stops only at the request's lines."""

    def __init__(self, kernel: Any) -> None:
        self._kernel = kernel
        self._shell = kernel.shell

    def requested(self) -> list[tuple[str, int]]:
        parent = self._kernel.get_parent("shell") or {}
        if parent.get("header", {}).get("msg_type") != "execute_request":
            return []
        return breakpoints_from_metadata(parent.get("metadata"))

    def debugger(self, points: list[tuple[str, int]]) -> Any:
        debugger = self._shell.debugger_cls()
        debugger.reset()
        for filename, line in points:
            # Bdb.set_break insists on seeing the line in linecache; a
            # function defined by an earlier selection may live in a file
            # whose lines this kernel was not sent (yet): set it anyway.
            filename = debugger.canonic(filename)
            debugger.breaks.setdefault(filename, [])
            if line not in debugger.breaks[filename]:
                debugger.breaks[filename].append(line)
            _new_breakpoint(filename, line)
        return debugger


def _new_breakpoint(filename: str, line: int) -> None:
    import bdb

    if (filename, line) not in bdb.Breakpoint.bplist:
        bdb.Breakpoint(filename, line)


def _clear_breakpoints(debugger: Any) -> None:
    import bdb

    for filename, lines in list(debugger.breaks.items()):
        for line in lines:
            for point in list(bdb.Breakpoint.bplist.get((filename, line), [])):
                point.deleteMe()
    debugger.breaks.clear()


def _install_breakpoints(kernel: Any) -> None:
    shell = kernel.shell
    breakpoints = _Breakpoints(kernel)
    stock_run_code = shell.run_code
    stock_transform = shell.transform_cell

    def transform_cell(raw_cell: str) -> str:
        # Malformed metadata fails the request here, as the source map's
        # errors do: IPython reports a transform failure as the cell's error.
        breakpoints.requested()
        return stock_transform(raw_cell)

    async def run_code(code_obj: Any, result: Any = None, *, async_: bool = False) -> bool:
        try:
            points = breakpoints.requested()
        except BreakpointError:
            points = []
        if not points or sys.gettrace() is not None:
            return await stock_run_code(code_obj, result, async_=async_)
        debugger = breakpoints.debugger(points)
        # Continue (not step) from this frame: pdb stops only at a breakpoint.
        debugger.botframe = sys._getframe()
        debugger._set_stopinfo(debugger.botframe, None, -1)
        sys.settrace(debugger.trace_dispatch)
        try:
            return await stock_run_code(code_obj, result, async_=async_)
        finally:
            sys.settrace(None)
            _clear_breakpoints(debugger)

    shell.transform_cell = transform_cell
    shell.run_code = run_code


def _install_pause(kernel: Any) -> None:
    shell = kernel.shell
    main = threading.main_thread()

    def on_pause(signum: int, frame: FrameType | None) -> None:
        if frame is None or not interrupts.in_cell_code() or sys.gettrace() is not None:
            return  # nothing of the user's runs, or a debugger already traces it
        shell.debugger_cls().set_trace(frame)

    def pause_request(stream: Any, ident: Any, parent: dict[str, Any]) -> None:
        running = interrupts.in_cell_code()
        if running and main.ident is not None:
            signal.pthread_kill(main.ident, PAUSE_SIGNAL)
        content = {"status": "ok", "running": running}
        kernel.session.send(stream, PAUSE_REPLY, content, parent, ident)

    signal.signal(PAUSE_SIGNAL, on_pause)
    kernel.control_handlers[PAUSE_REQUEST] = pause_request


def _sent_files_exist_for_debugpy(kernel: Any) -> None:
    """Let debugpy set breakpoints in files the kernel only received as code.

    debugpy refuses a breakpoint in a file it cannot find on disk. Code sent
    as lines of a file (cellmux.kernel.sourcemap) runs under the client's
    path, which the kernel's machine may not have; its lines are in
    ``linecache`` (with no mtime: never reloaded from disk), and that is
    where debugpy reads them. So such a name counts as existing, once debugpy
    is loaded (on the first ``initialize``).
    """
    debugger = getattr(kernel, "debugger", None)
    if debugger is None:
        return
    stock_start = debugger.start

    def start() -> bool:
        started = stock_start()
        utils = sys.modules.get("pydevd_file_utils")
        if utils is not None and not getattr(utils.exists, "cellmux_sent_files", False):
            import linecache

            stock_exists = utils.exists

            def exists(filename: str) -> bool:
                entry = linecache.cache.get(filename)
                # A sent cell's entry has no mtime (a lazy entry is a 1-tuple).
                sent = entry is not None and len(entry) == 4 and entry[1] is None
                return stock_exists(filename) or sent

            exists.cellmux_sent_files = True  # type: ignore[attr-defined]
            utils.exists = exists  # type: ignore[attr-defined]
        return started

    debugger.start = start


def install(kernel: Any) -> None:
    """Give C{kernel} (an IPythonKernel) breakpoints by file and line, and pause.

    Call in the main thread, after cellmux.kernel.interrupts is installed.
    """
    _install_breakpoints(kernel)
    _install_pause(kernel)
    _sent_files_exist_for_debugpy(kernel)
