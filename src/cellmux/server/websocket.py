"""The native websocket endpoint: one Autobahn connection per client.

Called from Autobahn: onConnect (admission), onOpen, onMessage, onClose.
Called by its L{Attachment} (the L{Transport}): deliver, gap, gone, revoked.

The native protocol is L{NativeSession}'s (shared with long polling); flow
control, roles and the client's place in the kernel's numbering are
L{Attachment}'s (shared with every transport). This class only carries
frames between them and Autobahn.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import (
    ConnectionDeny,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)

from cellmux.protocol import CLOSE_UNSUPPORTED_DATA, ProtocolError, control_frame, encode_frame

from .attachment import Attachment
from .auth import OriginPolicy, query_pairs
from .autobahn_compat import (
    binary_frame_header,
    binary_sender,
    close,
    close_reason,
    quiet_debug_lines,
    request_target,
    take_over_producer,
)
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
    "close",
    "close_reason",
    "take_over_producer",
    "url_kernel",
]

quiet_debug_lines()


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


def url_kernel(target: str | bytes) -> str | None:
    """The kernel a request target names with ``?kernel=ID``, or None: the
    first one, which is the one HAProxy routes by (``url_param``)."""
    found = [value for name, value in query_pairs(target) if name == b"kernel"]
    return found[0].decode("utf-8", "replace") if found else None


class ClientConnection(WebSocketServerProtocol):
    # No `log = Logger()` here: Autobahn's own (txaio) logger filters its
    # debug lines, which include the upgrade request's headers and so the
    # token; a twisted.logger Logger would pass them to twistd's log.

    def __init__(self) -> None:
        super().__init__()
        self._send_binary = lambda data: self.sendMessage(data, isBinary=True)
        self.attachment: Attachment | None = None
        self.native: NativeSession | None = None

    @property
    def manager(self) -> KernelManager:
        return self.factory.manager

    # -- called from Autobahn ---------------------------------------------

    def onConnect(self, request) -> None:
        grant = self.factory.auth.upgrade_grant(request.headers, request_target(self))
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
            url_kernel=url_kernel(request_target(self)),
        )
        return None

    def onOpen(self) -> None:
        # Options are settled once the connection is open.
        self._send_binary = binary_sender(self)
        # Small frames (a `1+1` reply) must not wait for Nagle.
        tcp: Any = self.transport  # a TCP transport: ITCPTransport, IPushProducer
        tcp.setTcpNoDelay(True)
        take_over_producer(self, self.attachment)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        assert self.native is not None  # made in onConnect, before any message
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
        # The hot path of every relayed frame (autobahn_compat.binary_sender).
        self._send_binary(data)

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
        tcp: Any = self.transport
        if tcp is not None:
            tcp.pauseProducing()

    def _resume_reading(self) -> None:
        tcp: Any = self.transport
        if tcp is not None:
            tcp.resumeProducing()

    def _control(self, op: str, **fields: Any) -> None:
        # Through the relayed frames' sender: the welcome of a start is on
        # its critical path (sendMessage's own bookkeeping is ~30 us).
        self._send_binary(encode_frame(control_frame(op, **fields)))


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
