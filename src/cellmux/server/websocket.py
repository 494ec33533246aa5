"""The native websocket endpoint: one Autobahn connection per client.

Called from Autobahn: onConnect (admission), onOpen, onMessage, onClose.
Called by its L{Attachment} (the L{Transport}): deliver, gap, gone, revoked.

The native protocol is L{NativeSession}'s (shared with long polling); flow
control, roles and the client's place in the kernel's numbering are
L{Attachment}'s (shared with every transport). This class only carries
frames between them and Autobahn.
"""

from __future__ import annotations

import pprint
import struct
from typing import Any

import autobahn.websocket.protocol
from autobahn.twisted.websocket import (
    ConnectionDeny,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)

from cellmux.protocol import CLOSE_UNSUPPORTED_DATA, ProtocolError, control_frame, encode_frame

from .attachment import Attachment
from .auth import OriginPolicy
from .kernels import KernelManager
from .native import CLOSE_FORBIDDEN, CLOSE_KERNEL_GONE, CLOSE_UNKNOWN_KERNEL, NativeSession
from .proxy import upgrade_secure

__all__ = [
    "CLOSE_FORBIDDEN",
    "CLOSE_KERNEL_GONE",
    "CLOSE_UNKNOWN_KERNEL",
    "ClientConnection",
    "ClientFactory",
    "binary_frame_header",
    "client_protocol_options",
    "close_reason",
]


def close_reason(reason: str) -> bytes:
    """A close reason that is valid UTF-8 within a close frame's 123 bytes."""
    return reason.encode()[:120].decode(errors="ignore").encode()


def binary_frame_header(length: int) -> bytes:
    """The header of an unmasked, final, binary websocket frame (RFC 6455 5.2)."""
    if length <= 125:
        return bytes((0x82, length))
    if length <= 0xFFFF:
        return struct.pack("!BBH", 0x82, 126, length)
    return struct.pack("!BBQ", 0x82, 127, length)


class _PrettyWhenLogged:
    """An object that is pretty-printed only if a log line shows it."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __str__(self) -> str:
        return pprint.pformat(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def _pretty_print_options_only_when_logged() -> None:
    # On every new connection Autobahn pretty-prints its 29 options for a
    # debug log line, whether or not debug lines are kept: 0.2 ms (more on a
    # cold cache) before the connection can do anything. The text is the
    # same when the line is written.
    if callable(getattr(autobahn.websocket.protocol, "pformat", None)):
        autobahn.websocket.protocol.pformat = _PrettyWhenLogged


_pretty_print_options_only_when_logged()


def client_protocol_options(max_frame_size: int) -> dict[str, Any]:
    """Autobahn options for every client websocket (native and Jupyter)."""
    return {
        "maxMessagePayloadSize": max_frame_size,
        "maxFramePayloadSize": max_frame_size,
        # Keepalive as jupyter_server does it: ping every 30 s, give up after 90.
        "autoPingInterval": 30,
        "autoPingTimeout": 90,
        # Send a close frame (e.g. 1009 for an oversized message) before
        # dropping the connection, so the client learns why.
        "failByDrop": False,
        # No HTML status page (with Autobahn's version) on a plain GET.
        "webStatus": False,
        # Frames are compact already, and compressing big outputs would
        # block the reactor (Jupyter's is off too).
        "perMessageCompressionAccept": lambda offers: None,
    }


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
        self._plain_frames = False
        self.attachment: Attachment | None = None
        self.native: NativeSession | None = None

    @property
    def manager(self) -> KernelManager:
        return self.factory.manager

    # -- called from Autobahn ---------------------------------------------

    def onConnect(self, request) -> None:
        grant = self.factory.auth.upgrade_grant(request.headers, self.http_request_uri)
        if grant is None:
            raise ConnectionDeny(403, "a valid token is required")
        headers = request.headers
        secure = upgrade_secure(headers, self.transport)
        if not self.factory.origins.allows(headers.get("origin"), headers.get("host"), secure):
            raise ConnectionDeny(403, "this origin may not connect")
        self.attachment = Attachment(self.manager, grant, self)
        self.native = NativeSession(
            self.manager,
            self.attachment,
            self._control,
            lambda code, why: close(self, code, why),
            pause_reading=self._pause_reading,
            resume_reading=self._resume_reading,
            create=self.factory.create,
        )
        return None

    def onOpen(self) -> None:
        # What the fast path in deliver() leaves out must be off for good.
        self._plain_frames = (
            self._perMessageCompress is None
            and not self.maskServerFrames
            and not self.logFrames
            and not self.trackedTimings
            and not self.autoFragmentSize
        )
        # Small frames (a `1+1` reply) must not wait for Nagle.
        self.transport.setTcpNoDelay(True)
        take_over_producer(self, self.attachment)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not isBinary:
            error = ProtocolError("text_frame", "cellmux frames are binary", fatal=True)
            self.native.refuse(error, CLOSE_UNSUPPORTED_DATA)
            return
        self.native.receive(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.native is not None:
            self.native.connection_lost()
        if self.attachment is not None:
            self.attachment.detach()

    # -- called by the Attachment (Transport) ------------------------------

    def deliver(self, data: bytes) -> None:
        # The hot path of every relayed frame. Autobahn's sendMessage spends
        # most of its time on statistics, option checks and a debug line's
        # arguments; for the frames cellmux sends (binary, unfragmented,
        # uncompressed, unmasked: a server's) the header is 2-10 bytes.
        if self.state == self.STATE_OPEN and not self.send_queue and self._plain_frames:
            self.transport.writeSequence((binary_frame_header(len(data)), data))
        else:
            self.sendMessage(data, isBinary=True)

    def gap(self, first: int, last: int) -> None:
        self._control("gap", first=first, last=last, missed=last - first + 1)

    def gone(self, reason: str) -> None:
        close(self, CLOSE_KERNEL_GONE, f"kernel {reason}")

    def revoked(self) -> None:
        close(self, CLOSE_FORBIDDEN, "access revoked")

    # -- helpers ------------------------------------------------------------

    def _pause_reading(self) -> None:
        # Too many requests wait for a client that does not read: read no
        # more of them until it does (TCP then slows the client down).
        if self.transport is not None:
            self.transport.pauseProducing()

    def _resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resumeProducing()

    def _control(self, op: str, **fields: Any) -> None:
        self.sendMessage(encode_frame(control_frame(op, **fields)), isBinary=True)


class ClientFactory(WebSocketServerFactory):
    protocol = ClientConnection

    def __init__(self, manager: KernelManager, auth, create=None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.manager = manager
        self.auth = auth
        #: How hello.create makes kernels (None: the manager, as is).
        self.create = create
        self.origins = OriginPolicy.from_strings(manager.config.allow_origins)
        self.setProtocolOptions(**client_protocol_options(manager.config.max_frame_size))
