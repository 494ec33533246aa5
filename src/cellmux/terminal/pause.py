# -*- test-case-name: tests.test_debugger_editor -*-
"""``cellmux pause``: stop the kernel's running cell in pdb at its current line.

Pyzo's *pause*: where Ctrl-C raises KeyboardInterrupt and ends the cell,
this keeps it, and the pdb prompt appears where the cell was run (the
``cellmux run`` or console that sent it): step, look at variables, then
``c`` to let it go on. An editor binds it to a key beside its "run" key.

Exit status: 0 when a cell was paused, 1 when the kernel ran no cell's code
(nothing happens), 3 when the server cannot be reached or refuses.
"""

from __future__ import annotations

import argparse

from cellmux.client import CellmuxError
from cellmux.protocol import Channel

from .server import (
    DEFAULT_KERNEL_NAME,
    EXIT_SERVER,
    KernelNames,
    ServerOptions,
    add_server_arguments,
    fail,
    find_kernel,
)

__all__ = ["EXIT_NOT_RUNNING", "add_arguments", "main"]

#: Exit status when no cell was running.
EXIT_NOT_RUNNING = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kernel",
        metavar="NAME",
        help="a kernel id, or a name kept between runs (default: 'default')",
    )
    add_server_arguments(parser)


def main(args: argparse.Namespace) -> int:
    options = ServerOptions.from_args(args)
    name = args.kernel or DEFAULT_KERNEL_NAME
    try:
        with options.client() as client:
            model = find_kernel(client, KernelNames(options.url), name)
            if model is None:
                return fail(f"no kernel {name!r} on {options.url}", EXIT_SERVER)
            # The pause reply's channel only: none of the cell's output.
            with client.connect(model.id, channels=[Channel.KERNEL]) as kernel:
                running = kernel.pause(timeout=30)
    except (CellmuxError, TimeoutError) as e:
        return fail(str(e), EXIT_SERVER)
    if not running:
        return fail("the kernel is not running a cell; nothing to pause", EXIT_NOT_RUNNING)
    return 0
