# -*- test-case-name: tests.test_bridge -*-
"""``cellmux bridge KERNEL --connection-file PATH``: a remote kernel for local Jupyter clients.

It binds the five Jupyter sockets on 127.0.0.1 with a fresh HMAC key,
writes the connection file (mode 0600), and relays both ways over one
cellmux connection, so that ``jupyter console --existing PATH``, Spyder,
molten or emacs-jupyter use a cellmux kernel as if it ran here:

* shell, control, stdin: ROUTER sockets. A request is checked against the
  key and sent to the server as a cellmux frame (its parts unchanged but
  for ``header.session``, see L{bridgewire}); the kernel's replies and
  ``input_request``\\ s go back to the identities that sent the request.
* iopub: an XPUB socket carrying every kernel message on iopub, the
  server's status messages in the words a stock kernel uses
  (``jupyter/status.py``) and its notices as stderr streams; each new
  subscriber is welcomed (``iopub_welcome``), as by ipykernel 7.
* hb: a REP socket answered here, while the kernel is not dead: the server
  watches the kernel's own liveness; the heartbeat tells local clients
  whether there is a kernel behind the bridge at all.
* ``interrupt_request`` becomes the server's ``interrupt`` (SIGINT to the
  kernel, as for every cellmux client); ``shutdown_request`` its
  ``restart`` or ``shutdown``. The bridge answers those requests itself.
* While the kernel restarts, or the server is unreachable, requests wait
  (bounded) for the new process; to a dead kernel they get an error reply.

With ``--use-connection-file`` a Jupyter client launched the bridge from a
kernel spec: ports and key are the client's, SIGINT interrupts the kernel
(Jupyter's ``interrupt_mode: signal``), and the bridge ends after answering
a ``shutdown_request``, as ipykernel does.

The connection is the native protocol (docs/protocol.md), not the Jupyter
websocket, because replay is driven by the client there: the bridge says
which seq it saw last, so a connection that drops mid-output loses nothing,
not even what was in flight when it broke. It reconnects until the kernel
is removed, then exits and removes the connection file.

asyncio and pyzmq rather than Twisted: the cellmux client library (its
handshake, replay cursor and errors) is asyncio, as are the other terminal
commands; the bridge is one more client on one loop.

Bounds: at most L{bridgewire.MAX_ORIGINS} requests remembered for routing,
L{MAX_HELD} messages (L{MAX_HELD_BYTES} bytes) waiting while the server is
unreachable or the kernel restarts (more are refused with an error reply), and ZeroMQ's send
high-water mark (1000 messages) per local socket: a local client that does
not read its iopub loses messages past it, as with a stock kernel.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from cellmux.client import (
    AsyncClient,
    AsyncKernel,
    CellmuxError,
    ConnectionClosed,
    HTTPError,
    ServerError,
)
from cellmux.protocol import (
    Channel,
    Frame,
    JupyterSocket,
    ProtocolError,
    channel_for,
    parse_control,
)
from cellmux.protocol.jupyter import jupyter_parts
from cellmux.server.jupyter.status import StatusTranslator

from .bridgewire import (
    Origin,
    Origins,
    Signer,
    WireError,
    parse_header,
    restore_parent,
    split_message,
    with_session,
)
from .server import (
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

__all__ = ["Bridge", "add_arguments", "main", "write_connection_file"]

#: Messages, and their bytes, held while the server is unreachable; they
#: go out, in order, once the bridge is connected again.
MAX_HELD = 64
MAX_HELD_BYTES = 4 * 1024 * 1024
#: Seconds between reconnection attempts: doubling from the first to the last.
RECONNECT_DELAYS = (0.1, 5.0)


def reconnect_delays(
    first: float = RECONNECT_DELAYS[0], longest: float = RECONNECT_DELAYS[1]
) -> Iterator[float]:
    """The waits before each reconnection attempt: doubling, then steady, without end."""
    delay = first
    while True:
        yield delay
        delay = min(delay * 2, longest)


#: Milliseconds the sockets may take, when the bridge ends, to send what
#: they still hold (the reply to a shutdown_request).
CLOSE_LINGER_MS = 500

#: Close codes after which there is no kernel to reconnect to.
_FINAL_CLOSE_CODES = {4000: "the kernel was shut down", 4403: "access was revoked"}

#: What the bridge receives: every Jupyter channel, not the server's file
#: notices or plugin channels, which Jupyter clients don't know.
JUPYTER_CHANNELS = (
    Channel.STDIN,
    Channel.STDOUT,
    Channel.STDERR,
    Channel.STATUS,
    Channel.INTROSPECTION,
    Channel.EXECUTE,
    Channel.DISPLAY,
    Channel.COMM,
    Channel.KERNEL,
)

_SOCKET_OF = {
    "shell": JupyterSocket.SHELL,
    "control": JupyterSocket.CONTROL,
    "stdin": JupyterSocket.STDIN,
}
_NAME_OF = {socket: name for name, socket in _SOCKET_OF.items()}


class BridgeEnded(Exception):
    """The kernel went away (or refused us): the bridge stops, with this reason."""


def write_connection_file(path: Path, info: dict[str, Any]) -> None:
    """Write C{info} to C{path} atomically, readable by this user only (it holds the key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".cellmux-bridge-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:  # mkstemp makes it 0600
            json.dump(info, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class Bridge:
    """The five local sockets and the relay between them and one kernel.

    @ivar session: the session the bridge's connection declares, and that
        every request it relays carries (see L{bridgewire}).
    """

    def __init__(
        self,
        client: AsyncClient,
        kernel_id: str,
        kernel_name: str = "python3",
        key: bytes | None = None,
    ) -> None:
        self.client = client
        self.kernel_id = kernel_id
        self.kernel_name = kernel_name
        self.session = uuid.uuid4().hex
        self.signer = Signer(secrets.token_hex(32).encode() if key is None else key)
        self.origins = Origins()
        self.statuses = StatusTranslator()
        self.context = zmq.asyncio.Context()
        self.sockets: dict[str, zmq.asyncio.Socket] = {}
        self.ports: dict[str, int] = {}
        self.kernel: AsyncKernel | None = None
        #: seq of the last frame received: where a new connection resumes
        self.cursor: int | None = None
        self._held: list[Frame] = []
        self._held_bytes = 0
        self._alive = asyncio.Event()
        #: the kernel is being replaced: what clients send waits for the new
        #: process (the server refuses data frames meanwhile), as a stock
        #: kernel's ZeroMQ sockets hold them
        self._restarting = False
        #: why the kernel is dead, while it is (and no restart is under way):
        #: requests are answered with this at once instead of waiting forever
        self.dead: str | None = None
        self._connected = asyncio.Event()
        self._last_execute: dict[str, Any] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        #: called once a shutdown_request was carried out and answered
        self.on_shutdown: Callable[[], object] | None = None

    # -- setting up ------------------------------------------------------------

    def bind(self, ip: str = "127.0.0.1", ports: dict[str, int] | None = None) -> dict[str, Any]:
        """Bind the five sockets (on C{ports}, else on free ones); return the
        connection file's contents."""
        kinds = {
            "shell": zmq.ROUTER,
            "control": zmq.ROUTER,
            "stdin": zmq.ROUTER,
            "iopub": zmq.XPUB,
            "hb": zmq.REP,
        }
        for name, kind in kinds.items():
            sock = self.context.socket(kind)
            sock.linger = 0
            if kind == zmq.XPUB:
                # every subscription, repeated ones too: each gets its welcome
                sock.setsockopt(zmq.XPUB_VERBOSE, 1)
            self.sockets[name] = sock
            port = (ports or {}).get(name)
            if port:
                sock.bind(f"tcp://{ip}:{port}")
                self.ports[name] = port
            else:
                self.ports[name] = sock.bind_to_random_port(f"tcp://{ip}")
        return {
            **{f"{name}_port": port for name, port in self.ports.items()},
            "ip": ip,
            "key": self.signer.key.decode(),
            "transport": "tcp",
            "signature_scheme": "hmac-sha256",
            "kernel_name": self.kernel_name,
        }

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for sock in self.sockets.values():
            # a moment for the last replies (a shutdown_reply) to leave
            sock.close(linger=CLOSE_LINGER_MS)
        self.context.term()

    # -- running ---------------------------------------------------------------

    async def run(self, ready: asyncio.Future[None] | None = None) -> str:
        """Relay until the kernel goes away; returns why it ended.

        @raise CellmuxError: if the first connection fails.
        """
        await self._connect()
        if ready is not None and not ready.done():
            ready.set_result(None)
        for name in ("shell", "control", "stdin"):
            self._spawn(self._serve_router(name))
        self._spawn(self._serve_heartbeat())
        self._spawn(self._serve_subscriptions())
        try:
            while True:
                assert self.kernel is not None
                closed = await self.kernel.wait_closed()
                self._connected.clear()
                why = self._final(closed)
                if why is not None:
                    return why
                await self._reconnect(closed)
        except BridgeEnded as e:
            return str(e)

    def _final(self, closed: ConnectionClosed) -> str | None:
        if closed.code in _FINAL_CLOSE_CODES:
            return _FINAL_CLOSE_CODES[closed.code]
        return None

    async def _connect(self) -> None:
        kernel = await self.client.connect(
            self.kernel_id,
            JUPYTER_CHANNELS,
            session=self.session,
            cursor=self.cursor,
            listener=self._from_kernel,
        )
        self.kernel = kernel
        if self.cursor is None:
            self.cursor = kernel.last_seq
            if kernel.status == "dead":
                reason = kernel.model.raw.get("reason") if kernel.model else None
                self.dead = str(reason or "unknown cause")
            else:
                self._alive.set()
            self._restarting = kernel.status == "restarting"
        self._connected.set()
        await self._release_held()

    async def _reconnect(self, closed: ConnectionClosed) -> None:
        print(
            f"cellmux: lost the connection to the server ({closed.reason or closed}); reconnecting",
            file=sys.stderr,
            flush=True,
        )
        for delay in reconnect_delays():
            await asyncio.sleep(delay)
            try:
                await self._connect()
            except ServerError as e:
                if e.code in ("unknown_kernel", "kernel_lost", "forbidden"):
                    raise BridgeEnded(e.message or e.code) from None
                continue
            except HTTPError as e:
                if e.status in (401, 403, 404):
                    raise BridgeEnded(str(e)) from None
                continue
            except (CellmuxError, OSError, TimeoutError):
                continue
            print("cellmux: reconnected", file=sys.stderr, flush=True)
            return

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            print(f"cellmux: bridge task failed: {task.exception()!r}", file=sys.stderr)

    # -- local clients -> kernel ---------------------------------------------

    async def _serve_router(self, name: str) -> None:
        sock = self.sockets[name]
        while True:
            frames = await sock.recv_multipart()
            try:
                await self._from_client(name, frames)
            except WireError as e:
                print(f"cellmux: dropped a message on {name}: {e}", file=sys.stderr)
            except Exception as e:  # one bad message must not stop the socket
                print(f"cellmux: could not relay a message on {name}: {e!r}", file=sys.stderr)

    async def _serve_heartbeat(self) -> None:
        sock = self.sockets["hb"]
        while True:
            ping = await sock.recv_multipart()
            # A dead kernel does not beat: clients tell their users so.
            await self._alive.wait()
            await sock.send_multipart(ping)

    async def _serve_subscriptions(self) -> None:
        """Welcome each iopub subscriber (JEP 65, as ipykernel does): once it
        has its welcome, a client knows it will see what comes next."""
        sock = self.sockets["iopub"]
        while True:
            event = await sock.recv()
            if event[:1] == b"\x01":
                topic = event[1:].decode("utf-8", "replace")
                self._publish(jupyter_parts("iopub_welcome", {"subscription": topic}, now=_now()))

    async def _from_client(self, name: str, frames: list[bytes]) -> None:
        identities, signature, parts = split_message(frames)
        if not self.signer.verify(signature, parts):
            raise WireError("bad signature (not signed with this connection file's key)")
        header = parse_header(parts[0])
        msg_type = header["msg_type"]
        session = header.get("session")
        origin = Origin(name, identities, session if isinstance(session, str) else "")
        self.origins.remember(header["msg_id"], origin)
        if msg_type == "execute_request":
            self._last_execute = header
        # On control as clients send them now, or on shell as older ones did.
        if msg_type == "interrupt_request" and name != "stdin":
            self._spawn(self._interrupt(header, origin))
            return
        if msg_type == "shutdown_request" and name != "stdin":
            self._spawn(self._shutdown(header, parts, origin))
            return
        if self.dead is not None:
            self._refuse(header, f"the kernel is dead ({self.dead}); restart it")
            return
        frame = Frame(
            channel=channel_for(msg_type),
            parts=(with_session(header, self.session), *parts[1:]),
            socket=_SOCKET_OF[name],
        )
        await self._send(frame, header)

    async def _send(self, frame: Frame, header: dict[str, Any]) -> None:
        if self._connected.is_set() and not self._held and not self._restarting:
            try:
                assert self.kernel is not None
                await self.kernel.send_frame(frame)
                return
            except ConnectionClosed:
                pass  # held below; sent once the bridge is back
        size = sum(map(len, frame.parts))
        if len(self._held) >= MAX_HELD or self._held_bytes + size > MAX_HELD_BYTES:
            self._refuse(header, "the server is unreachable and too much is waiting for it")
            return
        self._held.append(frame)
        self._held_bytes += size

    async def _release_held(self) -> None:
        while self._held and self._connected.is_set() and not self._restarting:
            assert self.kernel is not None
            frame = self._held[0]
            try:
                await self.kernel.send_frame(frame)
            except ConnectionClosed:
                return
            self._held.pop(0)
            self._held_bytes -= sum(map(len, frame.parts))

    def _refuse_held(self, why: str) -> None:
        held, self._held, self._held_bytes = self._held, [], 0
        for frame in held:
            with contextlib.suppress(WireError):
                self._refuse(parse_header(frame.parts[0]), why)

    def interrupt_soon(self) -> None:
        """Interrupt the kernel (SIGINT to a launched bridge)."""
        self._spawn(self._quiet_interrupt())

    async def _quiet_interrupt(self) -> None:
        try:
            await self._control("interrupt")
        except (CellmuxError, TimeoutError) as e:
            print(f"cellmux: cannot interrupt the kernel: {e}", file=sys.stderr)

    async def _interrupt(self, header: dict[str, Any], origin: Origin) -> None:
        try:
            await self._control("interrupt")
        except (CellmuxError, TimeoutError) as e:
            self._reply(origin, header, "interrupt_reply", _error(f"cannot interrupt: {e}"))
            return
        self._reply(origin, header, "interrupt_reply", {"status": "ok"})

    async def _shutdown(self, header: dict[str, Any], parts: tuple[bytes, ...], origin: Origin):
        try:
            content = json.loads(parts[3])
            restart = bool(content.get("restart", False)) if isinstance(content, dict) else False
        except ValueError:
            restart = False
        try:
            await self._control("restart" if restart else "shutdown")
        except (CellmuxError, TimeoutError) as e:
            self._reply(origin, header, "shutdown_reply", _error(f"cannot shut down: {e}"))
            return
        self._reply(origin, header, "shutdown_reply", {"status": "ok", "restart": restart})
        if self.on_shutdown is not None:
            self.on_shutdown()

    async def _control(self, op: str) -> None:
        await asyncio.wait_for(self._connected.wait(), 30)
        assert self.kernel is not None
        await getattr(self.kernel, op)(timeout=120)

    def _refuse(self, header: dict[str, Any], why: str) -> None:
        origin = self.origins.get(header.get("msg_id"))
        msg_type = str(header.get("msg_type", ""))
        if origin is None or not msg_type.endswith("_request"):
            print(f"cellmux: dropped a {msg_type or 'message'}: {why}", file=sys.stderr)
            return
        self._reply(origin, header, msg_type[: -len("request")] + "reply", _error(why))

    def _reply(self, origin: Origin, parent: dict[str, Any], msg_type: str, content: dict) -> None:
        """The bridge's own answer to a request, on the socket the request came in on."""
        parts = jupyter_parts(msg_type, content, now=_now(), parent=parent)
        sock = self.sockets[origin.socket]
        sock.send_multipart(self.signer.wire(origin.identities, parts), zmq.NOBLOCK)

    # -- kernel -> local clients ---------------------------------------------

    def _from_kernel(self, frame: Frame) -> None:
        """Every frame of the connection, in order (the client's listener)."""
        if frame.seq:
            self.cursor = frame.seq
        if frame.is_control:
            self._control_frame(frame)
        elif frame.socket is JupyterSocket.NONE and frame.channel == Channel.STATUS:
            self._server_status(frame.parts)
        elif frame.socket in _NAME_OF:
            parts, origin = restore_parent(frame.parts, self.session, self.origins)
            if origin is None:
                return  # an answer to another client of the kernel
            # An input_request goes to the identities of the execute_request
            # it asks for, on stdin (jupyter_client gives both sockets one).
            sock = self.sockets[_NAME_OF[frame.socket]]
            sock.send_multipart(self.signer.wire(origin.identities, parts), zmq.NOBLOCK)
        else:  # iopub, and the server's own notices on a kernel's stderr
            parts, _origin = restore_parent(frame.parts, self.session, self.origins)
            self._publish(parts)

    def _publish(self, parts: tuple[bytes, ...]) -> None:
        topic = f"kernel.{self.kernel_id}.iopub".encode()
        self.sockets["iopub"].send_multipart(self.signer.wire((topic,), parts), zmq.NOBLOCK)

    def _control_frame(self, frame: Frame) -> None:
        try:
            body = parse_control(frame)
        except ProtocolError:
            return
        if body.get("op") == "error" and body.get("id") is None:
            # A message that did not reach the kernel (no request id: the
            # bridge's own requests get their errors as replies).
            print(
                f"cellmux: the server refused a message: {body.get('code')}: {body.get('message')}",
                file=sys.stderr,
            )
        elif body.get("op") == "gap":
            self._notice(
                f"cellmux: {body.get('missed')} kernel message(s) sent while the bridge was "
                "disconnected are no longer kept and were lost\n"
            )

    def _server_status(self, parts: tuple[bytes, ...]) -> None:
        try:
            content = json.loads(parts[3])
        except (ValueError, IndexError):
            return
        if not isinstance(content, dict):
            return
        state = content.get("execution_state")
        if state == "dead":
            self._alive.clear()
        elif isinstance(state, str):
            self._alive.set()
        self._restarting = state == "restarting" or (
            state == "dead" and content.get("auto_restart") is True
        )
        self.dead = None
        if state == "dead" and not self._restarting:
            self.dead = str(content.get("cause") or "unknown cause")
            self._refuse_held(f"the kernel is dead ({self.dead}); restart it")
        elif not self._restarting and self._held:
            self._spawn(self._release_held())
        translation = self.statuses.translate(content)
        if translation.notice is not None:
            self._notice(translation.notice)
        if translation.status is not None:
            self._publish(jupyter_parts("status", translation.status, now=_now()))

    def _notice(self, text: str) -> None:
        """A line on the kernel's stderr, under the cell that was running."""
        parent = self._last_execute
        parts = jupyter_parts("stream", {"name": "stderr", "text": text}, now=_now(), parent=parent)
        self._publish(parts)


def _now() -> datetime:
    return datetime.now(UTC)


def _error(text: str) -> dict[str, Any]:
    return {"status": "error", "ename": "CellmuxError", "evalue": text, "traceback": []}


# -- the command ---------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "kernel",
        metavar="KERNEL",
        help="a kernel id, or a name kept between runs (started if it does not exist)",
    )
    add_spec_argument(parser)
    files = parser.add_mutually_exclusive_group(required=True)
    files.add_argument(
        "--connection-file",
        "-f",
        type=Path,
        metavar="PATH",
        help="write a Jupyter connection file here, with free ports and a fresh key "
        "(removed when the bridge ends)",
    )
    files.add_argument(
        "--use-connection-file",
        type=Path,
        metavar="PATH",
        help="take ports and key from this connection file, written by the Jupyter "
        "client that launched the bridge from a kernel spec; SIGINT then interrupts the kernel",
    )
    add_server_arguments(parser)
    # --url: the name Jupyter users reach for first.
    parser.add_argument("--url", dest="server", help=argparse.SUPPRESS)


def read_connection_file(path: Path) -> tuple[str, dict[str, int], bytes]:
    """(ip, ports by socket name, key) of a connection file a Jupyter client wrote.

    @raise ValueError: if it is not one this bridge can serve.
    """
    try:
        info = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise ValueError(f"{path} is not JSON: {e}") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path} is not a connection file")
    if info.get("transport", "tcp") != "tcp":
        raise ValueError(f"{path}: only the tcp transport is supported")
    scheme = info.get("signature_scheme", "hmac-sha256")
    if scheme != "hmac-sha256":
        raise ValueError(f"{path}: signature scheme {scheme!r} is not supported")
    ports = {}
    for name in ("shell", "control", "stdin", "iopub", "hb"):
        port = info.get(f"{name}_port")
        if not isinstance(port, int) or not 0 <= port < 65536:
            raise ValueError(f"{path}: no valid {name}_port")
        ports[name] = port
    ip = info.get("ip", "127.0.0.1")
    key = info.get("key", "")
    if not isinstance(ip, str) or not isinstance(key, str):
        raise ValueError(f"{path}: ip and key must be strings")
    return ip, ports, key.encode()


async def _run(options: ServerOptions, model_id: str, name: str, args: argparse.Namespace) -> int:
    client = AsyncClient(options.url, options.token)
    launched = args.use_connection_file is not None
    path: Path = (args.use_connection_file or args.connection_file).expanduser().absolute()
    if launched:
        ip, ports, key = read_connection_file(path)
        bridge = Bridge(client, model_id, name, key=key)
    else:
        ip, ports, bridge = "127.0.0.1", None, Bridge(client, model_id, name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, stop.set)
    # Launched by a Jupyter client whose kernel spec says interrupt_mode
    # "signal", SIGINT means "interrupt the kernel", as for ipykernel.
    loop.add_signal_handler(signal.SIGINT, bridge.interrupt_soon if launched else stop.set)
    if launched:
        # Its client waits for the process to end after a shutdown_request,
        # with restart too (it then starts the bridge again): as ipykernel does.
        bridge.on_shutdown = stop.set
    written = False
    try:
        try:
            info = bridge.bind(ip, ports)
        except zmq.ZMQError as e:
            raise OSError(e.errno, f"cannot bind the Jupyter sockets on {ip}: {e}") from None
        ready: asyncio.Future[None] = loop.create_future()
        relay = asyncio.ensure_future(bridge.run(ready))
        stopping = asyncio.ensure_future(stop.wait())
        first: list[asyncio.Future[Any]] = [ready, relay]
        await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
        if relay.done():
            relay.result()  # the first connection failed: raise why
        if not launched:  # a launched bridge's output lands in its client's terminal
            write_connection_file(path, info)
            written = True
            print(
                f"cellmux: kernel {model_id} is bridged; "
                f"connect with: jupyter console --existing {path}",
                flush=True,
            )
        await asyncio.wait([relay, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if relay.done():
            why = relay.result()
            shut_down = why == _FINAL_CLOSE_CODES[4000]
            if not (launched and shut_down):  # a launched bridge's client asked for it
                print(f"cellmux: the bridge ended: {why}", file=sys.stderr)
            return 0 if shut_down else EXIT_SERVER
        relay.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await relay
        if bridge.kernel is not None:
            await bridge.kernel.close()
        return 0
    finally:
        bridge.close()
        if written:
            with contextlib.suppress(OSError):
                path.unlink()


def main(args: argparse.Namespace) -> int:
    options = ServerOptions.from_args(args)
    path: Path = args.connection_file or args.use_connection_file
    if path.expanduser().is_dir():
        return fail(f"{path} is a directory, not a connection file", EXIT_USAGE)
    if args.use_connection_file is not None:
        try:
            read_connection_file(path.expanduser())
        except ValueError as e:
            return fail(str(e), EXIT_USAGE)
    try:
        model = open_kernel(options.client(), KernelNames(options.url), args.kernel, args.spec)
        return asyncio.run(_run(options, model.id, model.name or "python3", args))
    except WrongSpec as e:
        return fail(str(e), EXIT_USAGE)
    except CellmuxError as e:
        return fail(str(e), EXIT_SERVER)
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        return fail(f"{e.strerror or e}{where}", EXIT_USAGE)
