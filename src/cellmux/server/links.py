"""ONE ZeroMQ ROUTER for every kernel link (a txzmq adapter).

Called from Twisted/txzmq: L{LinkRouter.messageReceived}.
Called by the server: L{LinkRouter.expect}, L{LinkRouter.forget},
L{LinkRouter.send_to_kernel}.

Each message is checked by the link's sans-IO L{ServerLink}; what a kernel
sends before proving its secret, or on a channel it may not use, goes no
further than this module.
"""

from __future__ import annotations

import secrets
from typing import Protocol

import zmq
from twisted.logger import Logger
from txzmq import ZmqEndpoint, ZmqEndpointType, ZmqFactory
from txzmq.router_dealer import ZmqRouterConnection

from cellmux.protocol import (
    DEFAULT_LINK_CREDIT,
    KernelFrame,
    LinkPong,
    LinkReady,
    ProtocolError,
    Reply,
    ServerLink,
    link_control,
)

__all__ = ["KernelUnreachable", "LinkRouter", "LinkSink"]

#: ZeroMQ heartbeat towards kernels: liveness checked without the GIL.
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 5000


class KernelUnreachable(Exception):
    """The kernel's link is gone or full; the message was not sent."""


class LinkSink(Protocol):
    """Who receives what authenticated kernels say (the kernel manager)."""

    def link_ready(self, link_id: bytes, pid: int) -> None: ...

    def kernel_message(self, link_id: bytes, channel: int, socket: int, parts: list) -> None: ...

    def link_pong(self, link_id: bytes, n: int) -> None: ...

    def link_violation(self, link_id: bytes, code: str, message: str) -> None: ...


class LinkRouter(ZmqRouterConnection):
    """The server's single ROUTER socket, bound on the link endpoint."""

    log = Logger()
    #: Messages queued per peer before sends fail (EAGAIN) instead of
    #: growing without bound; txzmq's default of 0 means unlimited.
    highWaterMark = 10000

    def __init__(
        self,
        factory: ZmqFactory,
        endpoint: str,
        sink: LinkSink,
        max_size: int,
        credit: int = DEFAULT_LINK_CREDIT,
    ) -> None:
        self._sink = sink
        self._links: dict[bytes, ServerLink] = {}
        self._max_size = max_size
        # The credit each kernel starts with; the sink grants the rest.
        self._credit = credit
        super().__init__(factory)
        sock = self.socket
        # Options first: libzmq applies them to connections made after the
        # bind, so setting them later would do nothing.
        # A send to a link that is not connected must fail, not vanish.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # No single ZeroMQ frame may exceed what one cellmux frame may hold.
        sock.setsockopt(zmq.MAXMSGSIZE, max_size)
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        self.addEndpoints([ZmqEndpoint(ZmqEndpointType.bind, endpoint)])

    def expect(self, link_id: bytes, secret: bytes) -> None:
        """Admit a link id whose kernel holds C{secret}."""
        self._links[link_id] = ServerLink(
            link_id, secret, secrets.token_bytes(16), max_size=self._max_size, credit=self._credit
        )

    def forget(self, link_id: bytes) -> None:
        """Refuse anything more from this link id."""
        self._links.pop(link_id, None)

    def send_to_kernel(self, link_id: bytes, parts: list) -> None:
        """Send ``[tag, *jupyter parts]`` to one kernel.

        @raise KernelUnreachable: if the link is not connected or is full.
        """
        link = self._links.get(link_id)
        if link is None or not link.ready:
            raise KernelUnreachable("kernel link is not ready")
        try:
            self.socket.send_multipart([link_id, *parts], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as e:
            raise KernelUnreachable(f"kernel link: {e.strerror}") from None
        finally:
            self._reschedule_read()

    def send_control(self, link_id: bytes, op: str, **fields: object) -> None:
        """A link control message (ping, credit) to one kernel; lost if gone."""
        try:
            self.socket.send_multipart([link_id, *link_control(op, **fields)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the kernel is gone or full; its exit is reported elsewhere
        finally:
            self._reschedule_read()

    def _reschedule_read(self) -> None:
        # ZeroMQ's FD is edge-triggered: after a send, incoming messages may
        # be pending without the FD becoming readable again.
        if self.read_scheduled is None:
            self.read_scheduled = self.factory.reactor.callLater(0, self.doRead)

    def messageReceived(self, message: list[bytes]) -> None:
        link_id = message[0]
        link = self._links.get(link_id)
        if link is None:
            self.log.warn("dropping a message from unknown link {link}", link=link_id.hex()[:64])
            return
        parts = message[1:]
        try:
            event = link.receive(parts)
        except ProtocolError as e:
            self.log.warn(
                "kernel link {link}: {code}: {message}",
                link=link_id.hex(),
                code=e.code,
                message=e.message,
            )
            if link.ready:
                self._sink.link_violation(link_id, e.code, e.message)
            return
        if isinstance(event, KernelFrame):
            self._sink.kernel_message(link_id, event.channel, event.socket, parts[1:])
        elif isinstance(event, LinkPong):
            self._sink.link_pong(link_id, event.n)
        elif isinstance(event, Reply):
            try:
                self.socket.send_multipart([link_id, *event.parts], zmq.NOBLOCK)
            except zmq.ZMQError as e:
                self.log.warn("kernel link {link}: {error}", link=link_id.hex(), error=e.strerror)
        elif isinstance(event, LinkReady):
            self._sink.link_ready(link_id, event.pid)
