"""One measuring loop, three wires: cellmux frames, Jupyter's v1 websocket
protocol, and ipykernel's own ZeroMQ sockets (the floor).

The websocket drivers differ only in how a message is put on the wire and
taken off it (``_encode``/``_decode``); connecting, sending, reading and
timing are the same code, on the same library (``websockets``), so a
difference in the numbers is a difference in the servers.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import attrs
from websockets.asyncio.client import ClientConnection, connect

from cellmux.protocol import Channel, JupyterSocket, control_frame, decode_frame, encode_frame
from cellmux.protocol.framing import frame_bytes
from cellmux.terminal import quick

__all__ = [
    "CellResult",
    "CellmuxConnection",
    "FloorConnection",
    "JupyterConnection",
    "StalledRequest",
]

_CELLMUX_HEADER = struct.Struct(">HBBQI")
_JUPYTER_V1 = "v1.kernel.websocket.jupyter.org"


#: A request given no timeout fails after this long without its reply and
#: idle (L{StalledRequest}): a kernel that stopped answering must fail its
#: stage, not hang the whole run.
STALL_LIMIT = 300.0


class StalledRequest(Exception):
    """No reply and idle within L{STALL_LIMIT}."""


@attrs.define
class CellResult:
    """What one execution looked like from one client."""

    reply: float = 0.0  #: seconds from send to execute_reply (0 for observers)
    idle: float = 0.0  #: seconds from send to the idle status of the request
    messages: int = 0  #: Jupyter messages received for the request
    stream_messages: int = 0
    stream_bytes: int = 0
    stdout: list[str] = attrs.Factory(list)
    status: str = ""
    #: The reply arrived before some output of its request (allowed by the
    #: Jupyter spec, never done by stock ipykernel over zmq).
    reply_overtook: bool = False
    #: Messages of other requests seen meanwhile: with one client, output
    #: that arrived after its request's idle.
    stray: int = 0
    #: The idle (or reply) never came within the timeout: output was lost.
    timed_out: bool = False
    #: Seconds from send to the last message of the request that arrived.
    last: float = 0.0

    def lines(self) -> list[str]:
        return "".join(self.stdout).splitlines()

    def take_for(
        self,
        msg_id: str,
        decoded: tuple[bytes, bytes, bytes] | None,
        elapsed: float,
        want_reply: bool,
    ) -> bool:
        """L{take} a decoded message if it belongs to request C{msg_id}
        (others are counted as stray; None, not a kernel message, is skipped)."""
        if decoded is None:
            return False
        header, parent, content = decoded
        if json.loads(parent).get("msg_id") != msg_id:
            self.stray += 1
            return False
        return self.take(header, content, elapsed, want_reply)

    def take(self, header: bytes, content: bytes, elapsed: float, want_reply: bool) -> bool:
        """Count one message of the request, C{elapsed} seconds after it
        was sent; True once its reply (if C{want_reply}) and idle are in."""
        self.messages += 1
        self.last = elapsed
        msg_type = json.loads(header)["msg_type"]
        if self.reply and msg_type not in ("status", "execute_input"):
            self.reply_overtook = True
        if msg_type == "stream":
            body = json.loads(content)
            self.stream_messages += 1
            self.stream_bytes += len(content)
            if body["name"] == "stdout":
                self.stdout.append(body["text"])
        elif msg_type == "status":
            if json.loads(content)["execution_state"] == "idle":
                self.idle = elapsed
        elif msg_type == "execute_reply" and want_reply:
            self.reply = elapsed
            self.status = json.loads(content)["status"]
        return bool(self.idle) and (bool(self.reply) or not want_reply)


def _header(msg_type: str, session: str, msg_id: str) -> dict[str, Any]:
    return {
        "msg_id": msg_id,
        "msg_type": msg_type,
        "session": session,
        "username": "bench",
        "date": datetime.now(UTC).isoformat(),
        "version": "5.3",
    }


def _execute_parts(code: str, session: str, msg_id: str) -> list[bytes]:
    content = {
        "code": code,
        "silent": False,
        "store_history": True,
        "user_expressions": {},
        "allow_stdin": False,
        "stop_on_error": True,
    }
    return [
        json.dumps(_header("execute_request", session, msg_id)).encode(),
        b"{}",
        b"{}",
        json.dumps(content).encode(),
    ]


class _WebsocketConnection:
    """The shared loop. Subclasses say how messages look on the wire."""

    ws: ClientConnection

    def __init__(self, session: str | None = None) -> None:
        self.session = session or uuid.uuid4().hex

    async def close(self) -> None:
        await self.ws.close()

    async def execute(
        self, code: str, msg_id: str | None = None, timeout: float | None = None
    ) -> CellResult:
        """Run C{code}; return once both its reply and its idle arrived, or
        what arrived when C{timeout} seconds passed without them."""
        msg_id = msg_id or uuid.uuid4().hex
        start = time.perf_counter()
        await self.ws.send(self._encode_execute(code, msg_id))
        return await self._collect(msg_id, start, True, timeout)

    async def observe(self, msg_id: str, start: float, timeout: float | None = None) -> CellResult:
        """Read output of someone else's request C{msg_id} until its idle."""
        return await self._collect(msg_id, start, False, timeout)

    async def _collect(
        self, msg_id: str, start: float, want_reply: bool, timeout: float | None
    ) -> CellResult:
        result = CellResult()
        deadline = start + (STALL_LIMIT if timeout is None else timeout)
        while True:
            left = deadline - time.perf_counter()
            try:
                raw = await asyncio.wait_for(self.ws.recv(), left)
            except TimeoutError:
                if timeout is None:
                    raise StalledRequest(f"{msg_id}: no reply, idle in {STALL_LIMIT} s") from None
                result.timed_out = True
                return result
            elapsed = time.perf_counter() - start
            if result.take_for(msg_id, self._decode(raw), elapsed, want_reply):
                return result

    def _encode_execute(self, code: str, msg_id: str) -> bytes:
        raise NotImplementedError

    def _decode(self, raw: bytes) -> tuple[bytes, bytes, bytes] | None:
        """(header, parent_header, content) of a kernel message, else None."""
        raise NotImplementedError


class CellmuxConnection(_WebsocketConnection):
    """A client speaking cellmux frames (docs/protocol.md)."""

    @classmethod
    async def open(
        cls,
        base_url: str,
        token: str,
        kernel_id: str,
        session: str | None = None,
        max_queue: int | None = None,
    ) -> CellmuxConnection:
        self = cls(session)
        # The kernel in the URL too, as cellmux's clients name it for a
        # proxy that routes by kernel (docs/scaling.md).
        url = base_url.replace("http", "ws", 1).rstrip("/") + f"/ws?kernel={kernel_id}"
        self.ws = await connect(
            url,
            additional_headers={"Authorization": f"token {token}"},
            max_size=None,
            compression=None,
            # None: never stop reading (other sessions' output piles up
            # unread on shared kernels); a number makes a stalled client.
            max_queue=max_queue,
            # jupyter_server's handshake waits for a starting kernel.
            open_timeout=120,
        )
        hello = control_frame("hello", version=1, kernel=kernel_id, session=self.session)
        await self.ws.send(encode_frame(hello))
        welcome = decode_frame(await self.ws.recv())
        op = json.loads(welcome.parts[0])["op"]
        if op != "welcome":
            raise RuntimeError(f"cellmux refused the hello: {welcome.parts[0]!r}")
        return self

    @classmethod
    async def start(
        cls, base_url: str, token: str, code: str
    ) -> tuple[CellmuxConnection, str, CellResult]:
        """A new kernel in one round trip: hello.create and the first
        execute_request sent at once (protocol version 2); returns the
        connection, the kernel id and the request's result."""
        self = cls(None)
        url = base_url.replace("http", "ws", 1).rstrip("/") + "/ws"
        start = time.perf_counter()
        self.ws = await connect(
            url, additional_headers={"Authorization": f"token {token}"}, compression=None
        )
        hello = control_frame("hello", version=2, create={}, session=self.session)
        msg_id = uuid.uuid4().hex
        await self.ws.send(encode_frame(hello))
        await self.ws.send(self._encode_execute(code, msg_id))
        welcome = json.loads(decode_frame(await self.ws.recv()).parts[0])
        if welcome["op"] != "welcome":
            raise RuntimeError(f"cellmux refused the hello: {welcome}")
        result = await self._collect(msg_id, start, True, 60)
        return self, welcome["kernel"]["id"], result

    def _encode_execute(self, code: str, msg_id: str) -> bytes:
        return _encode_cellmux_execute(code, self.session, msg_id)

    def _decode(self, raw: bytes) -> tuple[bytes, bytes, bytes] | None:
        return _decode_cellmux(raw)


def _encode_cellmux_execute(code: str, session: str, msg_id: str) -> bytes:
    """An execute_request as a cellmux frame on the shell socket."""
    parts = _execute_parts(code, session, msg_id)
    return frame_bytes(Channel.EXECUTE, JupyterSocket.SHELL, 0, parts)


def _decode_cellmux(raw: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(header, parent_header, content) of a cellmux frame holding a kernel
    message, else None."""
    channel, _socket, _flags, _seq, nparts = _CELLMUX_HEADER.unpack_from(raw, 0)
    if channel == Channel.CONTROL or nparts < 4:
        return None
    lengths = struct.unpack_from(">4I", raw, 16)
    o = 16 + 4 * nparts
    header = raw[o : o + lengths[0]]
    o += lengths[0]
    parent = raw[o : o + lengths[1]]
    o += lengths[1] + lengths[2]
    return header, parent, raw[o : o + lengths[3]]


class JupyterConnection(_WebsocketConnection):
    """A client of jupyter_server's kernel websocket, v1 binary protocol
    (the one JupyterLab picks)."""

    @classmethod
    async def open(
        cls,
        base_url: str,
        token: str,
        kernel_id: str,
        session: str | None = None,
        max_queue: int | None = None,
    ) -> JupyterConnection:
        self = cls(session)
        url = (
            base_url.replace("http", "ws", 1).rstrip("/")
            + f"/api/kernels/{kernel_id}/channels?session_id={self.session}"
        )
        self.ws = await connect(
            url,
            additional_headers={"Authorization": f"token {token}"},
            subprotocols=[_JUPYTER_V1],
            max_size=None,
            compression=None,
            # None: never stop reading (other sessions' output piles up
            # unread on shared kernels); a number makes a stalled client.
            max_queue=max_queue,
            # jupyter_server's handshake waits for a starting kernel.
            open_timeout=120,
        )
        return self

    def _encode_execute(self, code: str, msg_id: str) -> bytes:
        parts = _execute_parts(code, self.session, msg_id)
        channel = b"shell"
        offsets = [8 * (1 + 1 + len(parts) + 1)]
        offsets.append(offsets[-1] + len(channel))
        for part in parts:
            offsets.append(offsets[-1] + len(part))
        table = b"".join(o.to_bytes(8, "little") for o in offsets)
        return len(offsets).to_bytes(8, "little") + table + channel + b"".join(parts)

    def _decode(self, raw: bytes) -> tuple[bytes, bytes, bytes] | None:
        n = int.from_bytes(raw[:8], "little")
        offsets = [int.from_bytes(raw[8 * (i + 1) : 8 * (i + 2)], "little") for i in range(n)]
        if n < 6:
            return None
        # offsets: channel, header, parent, metadata, content, [buffers], end
        return (
            raw[offsets[1] : offsets[2]],
            raw[offsets[2] : offsets[3]],
            raw[offsets[4] : offsets[5]],
        )


class FloorConnection:
    """Stock ipykernel driven directly over its ZeroMQ sockets: no server.

    The same collection logic as the websocket drivers, on a shell DEALER
    and an iopub SUB, signed with the kernel's key.
    """

    def __init__(self, connection_info: dict[str, Any]) -> None:
        import zmq
        import zmq.asyncio
        from jupyter_client.session import Session

        self._zmq = zmq
        key = connection_info["key"]
        key = key.encode() if isinstance(key, str) else key
        self.session_obj = Session(key=key, username="bench")
        self.session = self.session_obj.session
        ctx = zmq.asyncio.Context.instance()
        ip = connection_info["ip"]
        self.shell = ctx.socket(zmq.DEALER)
        self.shell.connect(f"tcp://{ip}:{connection_info['shell_port']}")
        self.iopub = ctx.socket(zmq.SUB)
        self.iopub.subscribe(b"")
        self.iopub.connect(f"tcp://{ip}:{connection_info['iopub_port']}")
        self._queue: asyncio.Queue = asyncio.Queue()
        self._readers: list[asyncio.Task] = []

    async def start(self) -> None:
        for sock in (self.shell, self.iopub):
            self._readers.append(asyncio.ensure_future(self._read(sock)))
        # iopub subscriptions are asynchronous: wait until output arrives.
        for _ in range(100):
            try:
                await asyncio.wait_for(self.execute("0"), 0.5)
                return
            except TimeoutError:
                continue
        raise RuntimeError("the floor kernel never answered")

    async def _read(self, sock) -> None:
        while True:
            msg = await sock.recv_multipart()
            self._queue.put_nowait(msg)

    async def close(self) -> None:
        for task in self._readers:
            task.cancel()
        self.shell.close(0)
        self.iopub.close(0)

    def _split(self, msg: list[bytes]) -> tuple[bytes, bytes, bytes]:
        i = msg.index(b"<IDS|MSG>")
        return msg[i + 2], msg[i + 3], msg[i + 5]

    async def execute(
        self, code: str, msg_id: str | None = None, timeout: float | None = None
    ) -> CellResult:
        msg_id = msg_id or uuid.uuid4().hex
        msg = self.session_obj.msg(
            "execute_request",
            {"code": code, "silent": False, "store_history": True, "allow_stdin": False},
        )
        msg["header"]["msg_id"] = msg_id
        msg["msg_id"] = msg_id
        start = time.perf_counter()
        self.session_obj.send(self.shell, msg)
        result = CellResult()
        deadline = start + (STALL_LIMIT if timeout is None else timeout)
        while True:
            left = deadline - time.perf_counter()
            try:
                msg = await asyncio.wait_for(self._queue.get(), left)
            except TimeoutError:
                if timeout is None:
                    raise StalledRequest(f"{msg_id}: no reply, idle in {STALL_LIMIT} s") from None
                result.timed_out = True
                return result
            elapsed = time.perf_counter() - start
            if result.take_for(msg_id, self._split(msg), elapsed, True):
                return result


def lean_start(base_url: str, token: str, code: str) -> tuple[str, CellResult]:
    """The one-round-trip start with the least a client can do: the blocking
    standard-library websocket of ``cellmux run``'s quick path
    (cellmux.terminal.quick) in the calling thread, no event loop. The same
    frames as L{CellmuxConnection.start}: what it measures beside that is
    the client's own share. Returns the kernel id and the request's result."""
    session = uuid.uuid4().hex
    msg_id = uuid.uuid4().hex
    start = time.perf_counter()
    ws = quick.WebSocket(base_url, token)
    try:
        hello = control_frame("hello", version=2, create={}, session=session)
        ws.send(encode_frame(hello))
        ws.send(_encode_cellmux_execute(code, session, msg_id))
        welcome = json.loads(decode_frame(ws.receive()).parts[0])
        if welcome["op"] != "welcome":
            raise RuntimeError(f"cellmux refused the hello: {welcome}")
        result = CellResult()
        while True:
            decoded = _decode_cellmux(ws.receive())
            if result.take_for(msg_id, decoded, time.perf_counter() - start, True):
                return welcome["kernel"]["id"], result
    finally:
        ws.close()
