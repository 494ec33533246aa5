"""The native websocket endpoint: one Autobahn connection per client.

Called from Autobahn: onConnect (admission), onOpen, onMessage, onClose.
Called by its L{Attachment} (the L{Transport}): deliver, gap, gone, revoked.

The connection's protocol state lives in the sans-IO L{ServerSideHandshake};
what every transport shares (flow control, roles, requests, the client's
place in the kernel's numbering) lives in L{Attachment}. This class only
translates between them and Autobahn.
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

from .attachment import Attachment
from .auth import OriginPolicy
from .kernels import KernelError, KernelManager

__all__ = [
    "CLOSE_FORBIDDEN",
    "CLOSE_KERNEL_GONE",
    "CLOSE_UNKNOWN_KERNEL",
    "ClientConnection",
    "ClientFactory",
    "close_reason",
]

#: Close code when the kernel was shut down (the client may create another).
CLOSE_KERNEL_GONE = 4000
#: Close code when the credentials do not allow this (another kernel; revoked).
CLOSE_FORBIDDEN = 4403
#: Close code when hello names a kernel that does not exist (or was lost).
CLOSE_UNKNOWN_KERNEL = 4404
#: After this many refused frames a client is cut off: it is not a bug any more.
MAX_PROTOCOL_ERRORS = 100


def close_reason(reason: str) -> bytes:
    """A close reason that is valid UTF-8 within a close frame's 123 bytes."""
    return reason.encode()[:120].decode(errors="ignore").encode()


def close(protocol: WebSocketServerProtocol, code: int, reason: str) -> None:
    """Close with any code: Autobahn's sendClose takes only 1000 and 3000-4999."""
    if code == 1000 or 3000 <= code <= 4999:
        protocol.sendClose(code, close_reason(reason).decode())
    else:
        protocol.sendCloseFrame(code, close_reason(reason), isReply=False)


def take_over_producer(protocol: WebSocketServerProtocol, producer: object) -> None:
    """Make C{producer} the one a full socket buffer pauses.

    twisted.web's HTTP channel registered itself as the transport's producer
    and Autobahn took the transport over without undoing it.
    """
    transport = protocol.transport
    if getattr(transport, "producer", None) is not None:
        transport.unregisterProducer()
    transport.registerProducer(producer, True)


class ClientConnection(WebSocketServerProtocol):
    # No `log = Logger()` here: Autobahn's own (txaio) logger filters its
    # debug lines, which include the upgrade request's headers and so the
    # token; a twisted.logger Logger would pass them to twistd's log.

    def __init__(self) -> None:
        super().__init__()
        self._handshake = ServerSideHandshake()
        self.attachment: Attachment | None = None
        self._errors = 0

    @property
    def manager(self) -> KernelManager:
        return self.factory.manager

    # -- called from Autobahn ---------------------------------------------

    def onConnect(self, request) -> None:
        grant = self.factory.auth.upgrade_grant(request.headers, request.params)
        if grant is None:
            raise ConnectionDeny(403, "a valid token is required")
        headers = request.headers
        if not self.factory.origins.allows(headers.get("origin"), headers.get("host")):
            raise ConnectionDeny(403, "this origin may not connect")
        self.attachment = Attachment(self.manager, grant, self)
        return None

    def onOpen(self) -> None:
        # Small frames (a `1+1` reply) must not wait for Nagle.
        self.transport.setTcpNoDelay(True)
        take_over_producer(self, self.attachment)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not isBinary:
            self._refuse(
                ProtocolError("text_frame", "cellmux frames are binary", fatal=True),
                CLOSE_UNSUPPORTED_DATA,
            )
            return
        try:
            frame = decode_frame(payload, self.manager.config.max_frame_size)
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
        if self.attachment is not None:
            self.attachment.detach()

    # -- called by the Attachment (Transport) ------------------------------

    def deliver(self, data: bytes) -> None:
        self.sendMessage(data, isBinary=True)

    def gap(self, first: int, last: int) -> None:
        self._control("gap", first=first, last=last, missed=last - first + 1)

    def gone(self, reason: str) -> None:
        close(self, CLOSE_KERNEL_GONE, f"kernel {reason}")

    def revoked(self) -> None:
        close(self, CLOSE_FORBIDDEN, "access revoked")

    # -- helpers ------------------------------------------------------------

    def _control(self, op: str, **fields: Any) -> None:
        self.sendMessage(encode_frame(control_frame(op, **fields)), isBinary=True)

    def _refuse(self, error: ProtocolError, close_code: int = CLOSE_PROTOCOL_ERROR) -> None:
        self._errors += 1
        fatal = error.fatal or self._errors > MAX_PROTOCOL_ERRORS
        fields: dict[str, Any] = {"code": error.code, "message": error.message, "fatal": fatal}
        if error.request_id is not None:
            fields["id"] = error.request_id
        self._control("error", **fields)
        if fatal:
            close(self, close_code, error.message)

    def _hello(self, hello: Hello) -> None:
        attachment = self.attachment
        if not attachment.grant.covers(hello.kernel):
            message = "this token is for another kernel"
            self._control("error", code="forbidden", message=message, fatal=True)
            close(self, CLOSE_FORBIDDEN, message)
            return
        try:
            kernel = self.manager.get(hello.kernel)
        except KernelError as e:
            self._control("error", code=e.code, message=str(e), fatal=True)
            close(self, CLOSE_UNKNOWN_KERNEL, str(e))
            return
        attachment.channels = hello.channels
        self._control(
            "welcome",
            version=PROTOCOL_VERSION,
            kernel=kernel.model(),
            seq=kernel.seq,
            role=attachment.grant.role.value,
        )
        attachment.attach(kernel, hello.session, cursor=hello.cursor)

    def _relay(self, event: DataMessage) -> None:
        frame = event.frame
        try:
            self.attachment.send(frame.channel, frame.socket, frame.parts)
        except KernelError as e:
            self._control("error", code=e.code, message=str(e), channel=frame.channel, fatal=False)

    async def _request(self, request: Request) -> None:
        try:
            reply = await self.attachment.request(request.op, request.channels)
        except KernelError as e:
            self._control("error", id=request.id, code=e.code, message=str(e), fatal=False)
            return
        self._control(reply.pop("op"), id=request.id, **reply)


class ClientFactory(WebSocketServerFactory):
    protocol = ClientConnection

    def __init__(self, manager: KernelManager, auth, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.manager = manager
        self.auth = auth
        self.origins = OriginPolicy.from_strings(manager.config.allow_origins)
        max_size = manager.config.max_frame_size
        self.setProtocolOptions(
            maxMessagePayloadSize=max_size,
            maxFramePayloadSize=max_size,
            autoPingInterval=30,
            autoPingTimeout=90,
            # Send a close frame (e.g. 1009 for an oversized message) before
            # dropping the connection, so the client learns why.
            failByDrop=False,
            # No HTML status page (with Autobahn's version) on a plain GET.
            webStatus=False,
            # Frames are already compact binary; compression costs latency.
            perMessageCompressionAccept=lambda offers: None,
        )
