# -*- test-case-name: tests.test_debugger_dap -*-
"""``cellmux debug``: a Debug Adapter Protocol port for one kernel.

VS Code, nvim-dap and other DAP clients speak DAP over TCP to a *debug
adapter*. The kernel has one (debugpy, behind ipykernel's Jupyter debug
protocol: each DAP request travels in a ``debug_request`` on the control
channel, its response comes back in a ``debug_reply``, and DAP events in
``debug_event`` messages on IOPub). This command listens on a local TCP port
and relays between the two, so a DAP client attaches to a kernel through
cellmux as if it were debugpy's own adapter. It serves one DAP client at a
time, and tells the kernel to stop debugging (``disconnect``) when a client
leaves without saying so, so that no breakpoint outlives its session.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from typing import Any

from cellmux.client import CellmuxError, Message
from cellmux.protocol import Channel

from .server import (
    DEFAULT_KERNEL_NAME,
    EXIT_SERVER,
    EXIT_USAGE,
    KernelNames,
    ServerOptions,
    add_server_arguments,
    fail,
)

__all__ = ["MAX_DAP_MESSAGE", "DapRelay", "add_arguments", "main", "read_dap", "write_dap"]

#: Largest DAP message accepted from the client (a setBreakpoints of a big
#: file, a dumpCell of a long cell); a larger one ends the connection.
MAX_DAP_MESSAGE = 16 * 1024 * 1024
#: Longest header line.
_MAX_HEADER_LINE = 1024


_BUSY = "cellmux: another DAP client is attached to this kernel\n"


class DapError(Exception):
    """The DAP client sent something that is not DAP."""


async def read_dap(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next DAP message (``Content-Length`` framed JSON), or None at end of stream.

    @raise DapError: for a malformed header or body.
    """
    length = None
    while True:
        line = await reader.readline()
        if not line:
            return None
        if len(line) > _MAX_HEADER_LINE:
            raise DapError("header line too long")
        line = line.strip()
        if not line:
            break
        name, _, value = line.decode("ascii", "replace").partition(":")
        if name.strip().lower() == "content-length":
            try:
                length = int(value)
            except ValueError:
                raise DapError(f"bad Content-Length {value.strip()!r}") from None
    if length is None or not 0 < length <= MAX_DAP_MESSAGE:
        raise DapError("missing or out-of-range Content-Length")
    body = await reader.readexactly(length)
    try:
        message = json.loads(body)
    except ValueError as e:
        raise DapError(f"body is not JSON: {e}") from None
    if not isinstance(message, dict):
        raise DapError("a DAP message is a JSON object")
    return message


def write_dap(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    body = json.dumps(message, separators=(",", ":")).encode()
    writer.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)


class DapRelay:
    """Relays one DAP client at a time to one attached kernel."""

    def __init__(self, kernel: Any) -> None:
        self._kernel = kernel
        self._writer: asyncio.StreamWriter | None = None
        self._ours: set[str] = set()
        self._busy = asyncio.Lock()
        kernel.add_listener(self._on_frame)

    def _on_frame(self, frame: Any) -> None:
        writer = self._writer
        if writer is None or frame.channel != Channel.KERNEL:
            return
        try:
            msg = Message.from_frame(frame)
        except ValueError:
            return
        if msg.msg_type == "debug_reply" and msg.parent_id in self._ours:
            self._ours.discard(msg.parent_id)
            write_dap(writer, msg.content)
        elif msg.msg_type == "debug_event":
            # Whoever's request caused it: the kernel has one debug session.
            write_dap(writer, msg.content)

    async def _send(self, request: dict[str, Any]) -> None:
        # ipykernel reads request["arguments"] for some commands unguarded.
        request.setdefault("arguments", {})
        msg_id = await self._kernel.send("debug_request", request)
        self._ours.add(msg_id)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._busy.locked():  # one DAP client: a second would fight over the session
            write_dap(
                writer,
                {
                    "type": "event",
                    "seq": 0,
                    "event": "output",
                    "body": {"category": "stderr", "output": _BUSY},
                },
            )
            writer.close()
            return
        async with self._busy:
            self._writer = writer
            said_disconnect = False
            try:
                while True:
                    try:
                        request = await read_dap(reader)
                    except (DapError, asyncio.IncompleteReadError) as e:
                        print(f"cellmux: dropped the DAP client: {e}", file=sys.stderr)
                        break
                    if request is None:
                        break
                    said_disconnect |= request.get("command") == "disconnect"
                    await self._send(request)
                    await writer.drain()
            finally:
                self._writer = None
                self._ours.clear()
                writer.close()
                if not said_disconnect:
                    with contextlib.suppress(CellmuxError, OSError):
                        await self._send({"type": "request", "seq": 0, "command": "disconnect"})


def _listen_address(spec: str) -> tuple[str, int]:
    host, _, port = spec.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--listen wants [HOST:]PORT, not {spec!r}")
    return host or "127.0.0.1", int(port)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kernel",
        metavar="NAME",
        help="a kernel id, or a name kept between runs (default: 'default')",
    )
    parser.add_argument(
        "--listen",
        metavar="[HOST:]PORT",
        default="127.0.0.1:0",
        help="where DAP clients connect (default: 127.0.0.1 and a free port, printed)",
    )
    add_server_arguments(parser)


async def _relay(options: ServerOptions, name: str, host: str, port: int) -> int:
    client = options.async_client()
    kernel_id = KernelNames(options.url).get(name) or name
    try:
        model = await client.get_kernel(kernel_id)
    except CellmuxError as e:
        return fail(f"no kernel {name!r}: {e}", EXIT_SERVER)
    async with client.connect(model.id, channels=[Channel.KERNEL]) as kernel:
        relay = DapRelay(kernel)
        server = await asyncio.start_server(relay.serve, host, port)
        bound = server.sockets[0].getsockname()
        print(
            f"cellmux: DAP for kernel {model.id} on {bound[0]}:{bound[1]}",
            file=sys.stderr,
            flush=True,
        )
        async with server:
            # Until the kernel is removed (its websocket closes) or Ctrl-C.
            while not kernel.closed:
                await asyncio.sleep(0.5)
    return 0


def main(args: argparse.Namespace) -> int:
    try:
        host, port = _listen_address(args.listen)
    except ValueError as e:
        return fail(str(e), EXIT_USAGE)
    options = ServerOptions.from_args(args)
    try:
        return asyncio.run(_relay(options, args.kernel or DEFAULT_KERNEL_NAME, host, port))
    except KeyboardInterrupt:
        return 0
    except (CellmuxError, OSError) as e:
        return fail(str(e), EXIT_SERVER)
