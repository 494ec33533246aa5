# -*- test-case-name: tests.test_terminal_watch -*-
"""``cellmux attach KERNEL``: a console on a kernel, or ``--watch``: a read-only monitor.

The monitor shows what every client of the kernel runs (``In [n]`` with the
code), the outputs as they come and the kernel's state changes. It sends
nothing but the handshake, never answers ``input()`` (the server gives a
prompt only to the client that ran the code) and stops when the kernel goes
away or on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from cellmux.client import CellmuxError, ExecutionResult, Message
from cellmux.protocol import Channel, Frame

from . import console
from .render import Renderer
from .server import EXIT_SERVER, KernelNames, ServerOptions, add_server_arguments, fail, find_kernel

__all__ = ["Monitor", "add_arguments", "main"]

#: What the monitor subscribes to: no stdin, introspection or comm traffic.
WATCHED_CHANNELS = (
    Channel.STDOUT,
    Channel.STDERR,
    Channel.STATUS,
    Channel.EXECUTE,
    Channel.DISPLAY,
)


class Monitor:
    """Turns a kernel's frames into lines on a L{Renderer}."""

    def __init__(self, renderer: Renderer) -> None:
        self.renderer = renderer
        self.state: str | None = None

    def frame(self, frame: Frame) -> None:
        if frame.is_control:
            return
        try:
            msg = Message.from_frame(frame)
        except ValueError:
            return
        self.message(msg)

    def message(self, msg: Message) -> None:
        kind, content = msg.msg_type, msg.content
        if kind == "status":
            state = content.get("execution_state")
            if isinstance(state, str) and state != self.state:
                self.state = state
                cause = content.get("cause")
                self.renderer.line(f"[{state}{': ' + str(cause) if cause else ''}]")
        elif kind == "execute_input":
            code = str(content.get("code", ""))
            who = str(msg.parent_header.get("username") or "?")
            self.renderer.line(f"In [{content.get('execution_count', '?')}] ({who}):")
            self.renderer.line(code.rstrip("\n"))
        else:
            # Output messages: fold them through a scratch result, as a client would.
            output = ExecutionResult(msg.parent_id or "").add_message(msg)
            if output is not None:
                self.renderer.output(output)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kernel", metavar="KERNEL", help="a kernel id or name")
    parser.add_argument(
        "--watch", action="store_true", help="only show its output and status (read-only)"
    )
    console.add_console_options(parser)
    add_server_arguments(parser)


async def _watch(options: ServerOptions, kernel_id: str, renderer: Renderer) -> None:
    client = options.async_client()
    monitor = Monitor(renderer)
    async with client.connect(kernel_id, WATCHED_CHANNELS) as kernel:
        renderer.line(f"watching kernel {kernel_id} (Ctrl-C stops)", sys.stderr)
        kernel.add_listener(monitor.frame)
        while not kernel.closed:
            await asyncio.sleep(0.2)
    renderer.line("[the kernel is gone]", sys.stderr)


def main(args: argparse.Namespace) -> int:
    options = ServerOptions.from_args(args)
    try:
        model = find_kernel(options.client(), KernelNames(options.url), args.kernel)
    except CellmuxError as e:
        return fail(str(e), EXIT_SERVER)
    if model is None:
        return fail(f"no kernel {args.kernel!r} on {options.url}")
    if not args.watch:
        return console.run_console(options, model.id, args.save_dir)
    try:
        asyncio.run(_watch(options, model.id, Renderer(sys.stdout, sys.stderr)))
    except KeyboardInterrupt:
        return 0
    except CellmuxError as e:
        return fail(str(e), EXIT_SERVER)
    return 0
