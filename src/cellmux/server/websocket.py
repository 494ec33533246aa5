"""The websocket endpoint: one Autobahn connection per client.

Called from Autobahn: onConnect (admission), onOpen, onMessage, onClose.
Called from Twisted (IPushProducer, registered on the TCP transport):
pauseProducing, resumeProducing, stopProducing.
Called by the kernel (L{ClientSink}): wants, send_frame, gap, kernel_gone.

The connection's protocol state lives in the sans-IO L{ServerSideHandshake};
this class translates between it, Autobahn and the kernel manager.

Flow: frames are written as they come while the transport keeps up. When
Twisted pauses us (the socket's buffer is full) we stop writing and note
only how far the client got; every frame is in the kernel's replay log, so
on resume we catch up from there (with a gap notice if the log moved past
us). A slow observer thus costs the others nothing; a slow *writer* (a
client that sends requests) also holds back the kernel's link credit, so
the kernel itself slows down instead of filling the log past it.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import (
    ConnectionDeny,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from cellmux.protocol import (
    CLOSE_PROTOCOL_ERROR,
    CLOSE_UNSUPPORTED_DATA,
    PROTOCOL_VERSION,
    Channel,
    DataMessage,
    Hello,
    ProtocolError,
    Request,
    ServerSideHandshake,
    control_frame,
    decode_frame,
    encode_frame,
)

from .auth import Grant, OriginPolicy, Role
from .kernels import Kernel, KernelError, KernelManager

__all__ = ["CLOSE_KERNEL_GONE", "CLOSE_UNKNOWN_KERNEL", "ClientConnection", "ClientFactory"]

#: Close code when the kernel was shut down (the client may create another).
CLOSE_KERNEL_GONE = 4000
#: Close code when hello names a kernel that does not exist (or was lost).
CLOSE_UNKNOWN_KERNEL = 4404
#: Close code when the credentials do not allow this (another kernel; revoked).
CLOSE_FORBIDDEN = 4403
#: After this many refused frames a client is cut off: it is not a bug any more.
MAX_PROTOCOL_ERRORS = 100

#: Which role may make which control request (the rest: anyone attached).
_ROLE_FOR_OP = {
    "interrupt": lambda role: role.may_execute,
    "restart": lambda role: role.may_manage,
    "shutdown": lambda role: role.may_manage,
}


class Forbidden(KernelError):
    """The connection's role does not allow this request."""

    code = "forbidden"


def _seq_of(data: bytes) -> int:
    # Bytes 4..12 of a frame are its seq (see cellmux.protocol.framing).
    return int.from_bytes(data[4:12], "big")


@implementer(IPushProducer)
class ClientConnection(WebSocketServerProtocol):
    # No `log = Logger()` here: Autobahn's own (txaio) logger filters its
    # debug lines, which include the upgrade request's headers and so the
    # token; a twisted.logger Logger would pass them to twistd's log.

    def __init__(self) -> None:
        super().__init__()
        self._handshake = ServerSideHandshake()
        self.grant = Grant(Role.OBSERVER, kernel_id="")  # set by onConnect
        self.kernel: Kernel | None = None
        self.session = ""
        self._channels: frozenset[int] | None = None
        self._errors = 0
        #: seq of the last kernel frame written to this client
        self._cursor = 0
        #: the transport asked us to stop; frames wait in the replay log
        self._paused = False
        self._behind = False

    @property
    def manager(self) -> KernelManager:
        return self.factory.manager

    # -- called from Autobahn ---------------------------------------------

    def onConnect(self, request) -> None:
        grant = self.factory.auth.upgrade_grant(request.headers, request.params)
        if grant is None:
            raise ConnectionDeny(403, "a valid token is required")
        if not self.factory.origins.allows(
            request.headers.get("origin"), request.headers.get("host")
        ):
            raise ConnectionDeny(403, "this origin may not connect")
        self.grant = grant
        return None

    def onOpen(self) -> None:
        # Small frames (a `1+1` reply) must not wait for Nagle.
        self.transport.setTcpNoDelay(True)
        # twisted.web's HTTP channel registered itself as the transport's
        # producer and Autobahn took the transport over without undoing it:
        # replace it, so that a full socket buffer pauses *us*.
        if getattr(self.transport, "producer", None) is not None:
            self.transport.unregisterProducer()
        self.transport.registerProducer(self, True)

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
        if self.kernel is not None:
            self.kernel.detach(self)
            self.kernel = None

    # -- called from Twisted: IPushProducer ----------------------------------

    def pauseProducing(self) -> None:
        self._paused = True
        if self.kernel is not None:
            self.kernel.congested(self)

    def resumeProducing(self) -> None:
        self._paused = False
        if self._behind:
            self._catch_up()
        if not self._paused and self.kernel is not None:
            self.kernel.uncongested(self)

    def stopProducing(self) -> None:
        self._paused = True

    # -- ClientSink ---------------------------------------------------------

    def wants(self, channel: int) -> bool:
        if channel == Channel.STDIN and not self.grant.role.may_execute:
            return False  # observers never see prompts, whatever their session
        return self._channels is None or channel in self._channels

    def send_frame(self, data: bytes) -> None:
        if self._paused or self._behind:
            self._behind = True  # it is in the replay log; we catch up later
            return
        self._cursor = _seq_of(data) or self._cursor
        self.sendMessage(data, isBinary=True)

    def gap(self, first: int, last: int) -> None:
        """Tell the client frames first..last are gone for good."""
        self._control("gap", first=first, last=last, missed=last - first + 1)
        self._cursor = max(self._cursor, last)

    def kernel_gone(self, reason: str) -> None:
        self.kernel = None
        self._close(CLOSE_KERNEL_GONE, f"kernel {reason}")

    def revoked(self) -> None:
        """The share this connection came in with was revoked."""
        if self.kernel is not None:
            self.kernel.detach(self)
            self.kernel = None
        self._close(CLOSE_FORBIDDEN, "access revoked")

    # -- helpers ------------------------------------------------------------

    def _catch_up(self) -> None:
        """Write what the client missed while paused, until paused again."""
        kernel = self.kernel
        if kernel is None:
            self._behind = False
            return
        gap, entries = kernel.replay.after(self._cursor)
        if gap is not None:
            self.gap(gap.first, gap.last)
        for entry in entries:
            if self._paused:
                return  # still behind; resumeProducing brings us back
            self._cursor = entry.seq
            if (entry.session is None or entry.session == self.session) and self.wants(
                entry.channel
            ):
                self.sendMessage(entry.data, isBinary=True)
        self._behind = self._paused

    def _close(self, code: int, reason: str) -> None:
        # Keep the reason valid UTF-8 within the 123-byte limit of a close frame.
        reason_bytes = reason.encode()[:120].decode(errors="ignore").encode()
        # Autobahn's sendClose accepts only 1000 and 3000-4999; protocol
        # codes (1002, 1003) go through the lower-level close frame.
        if code == 1000 or 3000 <= code <= 4999:
            self.sendClose(code, reason_bytes.decode())
        else:
            self.sendCloseFrame(code, reason_bytes, isReply=False)

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
            self._close(close_code, error.message)

    def _hello(self, hello: Hello) -> None:
        if not self.grant.covers(hello.kernel):
            message = "this token is for another kernel"
            self._control("error", code="forbidden", message=message, fatal=True)
            self._close(CLOSE_FORBIDDEN, message)
            return
        try:
            kernel = self.manager.get(hello.kernel)
        except KernelError as e:
            self._control("error", code=e.code, message=str(e), fatal=True)
            self._close(CLOSE_UNKNOWN_KERNEL, str(e))
            return
        self.session = hello.session
        self._channels = hello.channels
        self.kernel = kernel
        self._cursor = kernel.seq if hello.cursor is None else min(hello.cursor, kernel.seq)
        self._control(
            "welcome",
            version=PROTOCOL_VERSION,
            kernel=kernel.model(),
            seq=kernel.seq,
            role=self.grant.role.value,
        )
        kernel.attach(self, cursor=hello.cursor)

    def _relay(self, event: DataMessage) -> None:
        frame = event.frame
        kernel = self.kernel
        if kernel is None:
            self._control(
                "error", code="kernel_gone", message="the kernel was shut down", fatal=False
            )
            return
        if not self.grant.role.may_execute:
            self._control(
                "error",
                code="forbidden",
                message="observers cannot send to the kernel",
                channel=frame.channel,
                fatal=False,
            )
            return
        try:
            kernel.send(frame.channel, frame.socket, frame.parts)
        except KernelError as e:
            self._control("error", code=e.code, message=str(e), channel=frame.channel, fatal=False)
            return
        # A client that sends requests drives the kernel: if it cannot keep
        # up with the output, the kernel waits for it (link credit).
        kernel.writers.add(self)
        if frame.channel == Channel.EXECUTE:
            kernel.remember_input(self.session, frame.parts[0], frame.parts[3])
        elif frame.channel == Channel.STDIN:
            kernel.input_answered(self.session)

    async def _request(self, request: Request) -> None:
        kernel = self.kernel
        try:
            if kernel is None:
                raise KernelError("the kernel was shut down")
            if request.op == "ping":
                self._control("pong", id=request.id)
                return
            if request.op == "history":
                inputs = [
                    {"code": h.code, "session": h.session, "time": h.time} for h in kernel.history
                ]
                self._control("history", id=request.id, inputs=inputs)
                return
            needed = _ROLE_FOR_OP.get(request.op)
            if needed is not None and not needed(self.grant.role):
                raise Forbidden(f"a {self.grant.role.value} may not {request.op}")
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
