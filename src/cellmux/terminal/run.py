# -*- test-case-name: tests.test_terminal_run -*-
"""``cellmux run FILE``: run a file, some of its lines or one of its cells.

The code goes to the kernel with its file name and first line number
(``execute_request`` metadata, docs/protocol.md), so tracebacks,
``inspect.getsource`` and pdb name the real file and line. Output is written
as it arrives; ``input()``, ``getpass`` and pdb read from this terminal.

Exit status: 0 when the code ran, 1 when it raised, 2 for bad arguments (a
missing file, lines out of range), 3 when the server cannot be reached or
refuses, 130 after Ctrl-C (which interrupts the kernel).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import NamedTuple

from .quick import ABORTED_MESSAGE, ABORTED_PAUSE, ABORTED_TRIES
from .render import PROMPT_GRACE, Renderer
from .server import (
    DEFAULT_KERNEL_NAME,
    EXIT_SERVER,
    EXIT_USAGE,
    KernelNames,
    ServerOptions,
    WrongSpec,
    add_server_arguments,
    add_spec_argument,
    fail,
    open_kernel,
)

__all__ = [
    "CELL_MARKER",
    "Selection",
    "SelectionError",
    "add_arguments",
    "main",
    "parse_breakpoint",
    "select",
]

#: A line starting a cell, as VS Code, Spyder and PyCharm write it.
CELL_MARKER = re.compile(r"^\s*#\s*%%")
#: Exit status when the code raised.
EXIT_RAISED = 1
#: Exit status after Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130


class SelectionError(ValueError):
    """The lines or cell asked for are not in the file."""


class Selection(NamedTuple):
    """The code to run and the file line it starts at (1-based)."""

    code: str
    first_line: int


def _parse_range(spec: str, count: int) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d*)\s*)?", spec)
    if match is None:
        raise SelectionError(f"--lines wants A-B, A- or A (1-based line numbers), not {spec!r}")
    first = int(match.group(1))
    last = first if match.group(2) is None else int(match.group(2) or count)
    if first < 1 or last < first:
        raise SelectionError(f"--lines {spec}: lines are numbered from 1, with A <= B")
    if last > count:
        raise SelectionError(f"--lines {spec}: the file has {count} lines")
    return first, last


def _cells(lines: list[str]) -> list[tuple[int, int]]:
    """(first, last) line numbers of each cell's body, markers excluded.

    Text before the first marker is a cell only if it holds some code.
    """
    starts = [i + 1 for i, line in enumerate(lines) if CELL_MARKER.match(line)]
    cells = []
    if not starts or any(line.strip() for line in lines[: starts[0] - 1]):
        cells.append((1, (starts[0] - 1) if starts else len(lines)))
    for n, marker in enumerate(starts):
        end = starts[n + 1] - 1 if n + 1 < len(starts) else len(lines)
        cells.append((marker + 1, end))
    return cells


def select(
    text: str, *, lines: str | None = None, cell: int | None = None, at: int | None = None
) -> Selection:
    """The part of a file's C{text} to run: C{lines} ("A-B"), the C{cell}-th cell
    (from 1), the cell containing line C{at}, or everything.

    @raise SelectionError: if the file has no such lines or cell.
    """
    all_lines = text.splitlines(keepends=True)
    if lines is not None:
        first, last = _parse_range(lines, len(all_lines))
    elif cell is not None or at is not None:
        cells = _cells(all_lines)
        if cell is not None:
            if not 1 <= cell <= len(cells):
                raise SelectionError(f"--cell {cell}: the file has {len(cells)} cells")
            first, last = cells[cell - 1]
        else:
            assert at is not None
            if not 1 <= at <= max(len(all_lines), 1):
                raise SelectionError(f"--at {at}: the file has {len(all_lines)} lines")
            # A marker line belongs to the cell it opens.
            first, last = next(((a, b) for a, b in cells if a - 1 <= at <= b), cells[-1])
    else:
        first, last = 1, len(all_lines)
    return Selection("".join(all_lines[first - 1 : last]), first)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="the Python file")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--lines", metavar="A-B", help="run lines A to B (1-based, inclusive)")
    which.add_argument("--cell", type=int, metavar="N", help="run the N-th '# %%%%' cell")
    which.add_argument("--at", type=int, metavar="LINE", help="run the cell containing LINE")
    parser.add_argument(
        "--kernel",
        metavar="NAME",
        help="a kernel id, or a name kept between runs (default: 'default')",
    )
    parser.add_argument(
        "--break",
        dest="breakpoints",
        action="append",
        default=[],
        metavar="[FILE:]LINE",
        help="stop in pdb at this line (of FILE, default the file run); may be repeated",
    )
    add_spec_argument(parser)
    add_server_arguments(parser)


def parse_breakpoint(spec: str, default_file: str) -> dict[str, object]:
    """C{{"filename": absolute path, "line": N}} for a C{--break} value.

    @raise SelectionError: if it is not C{LINE} or C{FILE:LINE}.
    """
    filename, _, line = spec.rpartition(":")
    if not line.strip().isdigit() or int(line) < 1:
        raise SelectionError(f"--break wants FILE:LINE or LINE (from 1), not {spec!r}")
    # The kernel knows code sent from a file by its absolute path (the
    # source map): the same name here, so the lines match.
    return {"filename": os.path.abspath(filename or default_file), "line": int(line)}


def _ask_now(prompt: str, password: bool) -> str:
    """Answer the kernel's input() or pdb prompt from this terminal."""
    if password:
        import getpass

        return getpass.getpass(prompt)
    return input(prompt)


def _ask(prompt: str, password: bool) -> str:
    time.sleep(PROMPT_GRACE)  # see PROMPT_GRACE
    return _ask_now(prompt, password)


#: cellmux.cli leaves the log's set-up to main(): the quick path needs none.
DEFERS_LOGGING = True

#: A kernel id as the server makes them (a UUID).
_KERNEL_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _run_quickly(
    args: argparse.Namespace,
    options: ServerOptions,
    code: str,
    metadata: dict,
    renderer: Renderer,
) -> int | None:
    """The exit status, if the quick path (cellmux.terminal.quick) ran the code.

    None when it could not start (a kernel this machine has not named yet, a
    dead one, https, ``-v``, ``CELLMUX_RUN_QUICK=0``): the full client runs it.
    """
    if getattr(args, "verbose", False) or os.environ.get("CELLMUX_RUN_QUICK") == "0":
        return None
    name = args.kernel or DEFAULT_KERNEL_NAME
    kernel_id = KernelNames(options.url).get(name)
    if kernel_id is None and _KERNEL_ID.fullmatch(name):
        kernel_id = name
    if kernel_id is None:
        return None
    from .quick import Unavailable, run_code

    try:
        return run_code(
            options.url,
            options.token,
            kernel_id,
            code,
            metadata,
            renderer,
            _ask_now,
            spec=getattr(args, "spec", None),
        )
    except Unavailable:
        return None


def take_ctrl_c() -> None:
    """Make Ctrl-C raise KeyboardInterrupt here even if SIGINT came ignored
    or blocked.

    A command started by a shell without job control in the background (a
    script's ``cmd &``, a CI runner) inherits SIGINT ignored, and Python then
    installs no handler; a process can also inherit it blocked (the signal
    mask survives fork and exec). Either way Ctrl-C in this command's
    terminal did nothing, and the kernel kept running (the test suite hung so
    in one CI run). When standard input is a terminal whose foreground
    process group is ours, Ctrl-C typed there is meant for us: take it back.
    Called before any thread starts (threads inherit the mask).
    """
    import signal

    try:
        if not (os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()):
            return
    except OSError:
        return  # no terminal after all: leave SIGINT as it came
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, ()):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def main(args: argparse.Namespace) -> int:
    take_ctrl_c()
    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
        selection = select(text, lines=args.lines, cell=args.cell, at=args.at)
        breakpoints = [parse_breakpoint(b, args.file) for b in args.breakpoints]
    except (OSError, UnicodeDecodeError, SelectionError) as e:
        return fail(str(e), EXIT_USAGE)
    if not selection.code.strip():
        return 0
    options = ServerOptions.from_args(args)
    renderer = Renderer(sys.stdout, sys.stderr)
    metadata: dict[str, dict[str, object]] = {
        "cellmux": {"filename": os.path.abspath(args.file), "first_line": selection.first_line}
    }
    if breakpoints:
        metadata["cellmux"]["breakpoints"] = breakpoints
    status = _run_quickly(args, options, selection.code, metadata, renderer)
    if status is not None:
        return status
    from cellmux.cli import client_logging
    from cellmux.client import CellmuxError

    client_logging(getattr(args, "verbose", False))

    try:
        with options.client() as client:
            model = open_kernel(client, KernelNames(options.url), args.kernel, args.spec)
            with client.connect(model.id) as kernel:
                try:
                    for tried in range(1, ABORTED_TRIES + 1):
                        result = kernel.execute(
                            selection.code,
                            on_output=renderer.output,
                            on_stdin=_ask,
                            metadata=metadata,
                        )
                        if result.status != "aborted":
                            break
                        time.sleep(ABORTED_PAUSE * tried)
                    else:
                        return fail(ABORTED_MESSAGE.format(tries=ABORTED_TRIES), EXIT_RAISED)
                except KeyboardInterrupt:
                    client.interrupt_kernel(model.id)
                    renderer.line("cellmux: interrupted the kernel", sys.stderr)
                    # A thread may still be blocked reading the terminal for
                    # input(); a normal exit would wait for it forever.
                    sys.stdout.flush()
                    os._exit(EXIT_INTERRUPTED)
    except EOFError:
        return fail("input ended while the code waited for it; interrupted the kernel", 1)
    except WrongSpec as e:
        return fail(str(e), EXIT_USAGE)
    except (CellmuxError, TimeoutError) as e:
        return fail(str(e), EXIT_SERVER)
    return 0 if result.ok else EXIT_RAISED
