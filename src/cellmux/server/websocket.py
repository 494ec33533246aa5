"""The websocket endpoint: one Autobahn connection per client.

Called from Autobahn: onConnect (admission), onMessage, onClose.
Called by the kernel (L{ClientSink}): wants, send_frame, kernel_gone.

The connection's state lives in the sans-IO L{ServerSideHandshake}; this
class only translates between it, Autobahn and the kernel manager.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import (
    ConnectionDeny,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from twisted.internet import defer

from cellmux.protocol import (
    CLOSE_PROTOCOL_ERROR,
    CLOSE_UNSUPPORTED_DATA,
    PROTOCOL_VERSION,
    DataMessage,
    Hello,
    ProtocolError,
    Request,
    ServerSideHandshake,
    control_frame,
    decode_frame,
    encode_frame,
)

from .kernels import Kernel, KernelError, KernelManager

__all__ = ["CLOSE_KERNEL_GONE", "CLOSE_UNKNOWN_KERNEL", "ClientConnection", "ClientFactory"]

#: Close code when the kernel was shut down (the client may create another).
CLOSE_KERNEL_GONE = 4000
#: Close code when hello names a kernel that does not exist.
CLOSE_UNKNOWN_KERNEL = 4404
#: After this many refused frames a client is cut off: it is not a bug any more.
MAX_PROTOCOL_ERRORS = 100


class ClientConnection(WebSocketServerProtocol):
    # No `log = Logger()` here: Autobahn's own (txaio) logger filters its
    # debug lines, which include the upgrade request's headers and so the
    # token; a twisted.logger Logger would pass them to twistd's log.

    def __init__(self) -> None:
        super().__init__()
        self._handshake = ServerSideHandshake()
        self.kernel: Kernel | None = None
        self.session = ""
        self._channels: frozenset[int] | None = None
        self._errors = 0

    @property
    def manager(self) -> KernelManager:
        return self.factory.manager

    # -- called from Autobahn ---------------------------------------------

    def onConnect(self, request) -> None:
        if not self.factory.auth.check_upgrade(request.headers, request.params):
            raise ConnectionDeny(403, "a valid token is required")
        return None

    def onOpen(self) -> None:
        # Small frames (a `1+1` reply) must not wait for Nagle.
        self.transport.setTcpNoDelay(True)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not isBinary:
            self._refuse(
                ProtocolError("text_frame", "cellmux frames are binary", fatal=True),
                CLOSE_UNSUPPORTED_DATA,
            )
            return
        try:
            frame = decode_frame(payload, self.factory.manager.config.max_frame_size)
            event = self._handshake.receive(frame)
        except ProtocolError as e:
            self._refuse(e)
            return
        if isinstance(event, DataMessage):
            self._relay(event)
        elif isinstance(event, Request):
            defer.ensureDeferred(self._request(event))
        elif isinstance(event, Hello):
            self._hello(event)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.kernel is not None:
            self.kernel.detach(self)
            self.kernel = None

    # -- ClientSink ---------------------------------------------------------

    def wants(self, channel: int) -> bool:
        return self._channels is None or channel in self._channels

    def send_frame(self, data: bytes) -> None:
        self.sendMessage(data, isBinary=True)

    def kernel_gone(self, reason: str) -> None:
        self.kernel = None
        self._close(CLOSE_KERNEL_GONE, f"kernel {reason}")

    # -- helpers ------------------------------------------------------------

    def _close(self, code: int, reason: str) -> None:
        # Autobahn's sendClose accepts only 1000 and 3000-4999; protocol
        # codes (1002, 1003) go through the lower-level close frame.
        if code == 1000 or 3000 <= code <= 4999:
            self.sendClose(code, reason[:120])
        else:
            self.sendCloseFrame(code, reason.encode()[:120], isReply=False)

    def _control(self, op: str, **fields: Any) -> None:
        self.sendMessage(encode_frame(control_frame(op, **fields)), isBinary=True)

    def _refuse(self, error: ProtocolError, close_code: int = CLOSE_PROTOCOL_ERROR) -> None:
        self._errors += 1
        fatal = error.fatal or self._errors > MAX_PROTOCOL_ERRORS
        self._control("error", code=error.code, message=error.message, fatal=fatal)
        if fatal:
            self._close(close_code, error.message)

    def _hello(self, hello: Hello) -> None:
        try:
            kernel = self.manager.get(hello.kernel)
        except KernelError as e:
            self._control("error", code=e.code, message=str(e), fatal=True)
            self._close(CLOSE_UNKNOWN_KERNEL, "unknown kernel")
            return
        self.session = hello.session
        self._channels = hello.channels
        self.kernel = kernel
        self._control("welcome", version=PROTOCOL_VERSION, kernel=kernel.model(), seq=kernel.seq)
        kernel.attach(self)

    def _relay(self, event: DataMessage) -> None:
        frame = event.frame
        if self.kernel is None:
            self._control("error", code="kernel_gone", message="the kernel was shut down")
            return
        try:
            self.kernel.send(frame.channel, frame.socket, frame.parts)
        except KernelError as e:
            self._control("error", code=e.code, message=str(e), channel=frame.channel)

    async def _request(self, request: Request) -> None:
        kernel = self.kernel
        try:
            if kernel is None:
                raise KernelError("the kernel was shut down")
            if request.op == "ping":
                self._control("pong", id=request.id)
                return
            if request.op == "subscribe":
                self._channels = request.channels
            elif request.op == "interrupt":
                self.manager.interrupt(kernel)
            elif request.op == "restart":
                await self.manager.restart(kernel)
            elif request.op == "shutdown":
                self._control("ok", id=request.id, request=request.op)
                self.manager.delete(kernel)
                return
            self._control("ok", id=request.id, request=request.op)
        except KernelError as e:
            self._control("error", id=request.id, code=e.code, message=str(e), fatal=False)


class ClientFactory(WebSocketServerFactory):
    protocol = ClientConnection

    def __init__(self, manager: KernelManager, auth, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.manager = manager
        self.auth = auth
        max_size = manager.config.max_frame_size
        self.setProtocolOptions(
            maxMessagePayloadSize=max_size,
            maxFramePayloadSize=max_size,
            autoPingInterval=30,
            # Send a close frame (e.g. 1009 for an oversized message) before
            # dropping the connection, so the client learns why.
            failByDrop=False,
            autoPingTimeout=90,
            # Frames are already compact binary; compression costs latency.
            perMessageCompressionAccept=lambda offers: None,
        )
