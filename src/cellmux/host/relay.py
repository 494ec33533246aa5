"""A kernel host's two kinds of socket, relaying kernel frames unread.

* L{KernelRelay}: one ROUTER with one ipc endpoint per kernel process, each
  behind its door (L{cellmux.server.links.LinkDoors}, as on a single
  server): kernels keep no network, only this process reaches the fronts.
* L{FrontLink}: one DEALER per front server, a CURVE client pinned to the
  front's public key, with ZeroMQ heartbeats. Messages are
  ``[link id, *frames]`` for kernels and ``[b"", kind, body]`` for control
  (L{cellmux.protocol.hostlink}).

Sends never block: a full queue (HWM) drops that message and counts it
(the front's link credit keeps a kernel's output within bounds anyway).
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import zmq
from twisted.logger import Logger
from txzmq import ZmqFactory
from txzmq.router_dealer import ZmqDealerConnection, ZmqRouterConnection

from ..protocol import ProtocolError, hostlink
from ..server.links import BoundedReads, LinkDoors
from ..server.refusals import Line, RefusalLog, warn_line

__all__ = ["FrontLink", "KernelRelay", "RelayOwner"]

#: Messages queued per peer (kernel, or front) before sends fail.
RELAY_HWM = 50_000
#: ZeroMQ heartbeat on each front link (libzmq's I/O thread).
HEARTBEAT_IVL_MS = 1000
UNKNOWN_LINKS = "unknown kernel links"


class RelayOwner(Protocol):
    """Who knows which kernel belongs to which front (the host service)."""

    def front_of(self, link_id: bytes) -> FrontLink | None: ...

    def front_control(self, front: FrontLink, message: hostlink.FrontMessage) -> None: ...


class KernelRelay(BoundedReads, ZmqRouterConnection):
    """The host's ROUTER for its kernels' links."""

    log = Logger()
    highWaterMark = RELAY_HWM

    def __init__(self, factory: ZmqFactory, links_dir: str, owner: RelayOwner, max_size: int):
        self._owner = owner
        self.refusals = RefusalLog(factory.reactor, self._refusal_line)
        super().__init__(factory)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_size)
        self.doors = LinkDoors(self.socket, links_dir, self.refusals)
        #: Messages dropped because a kernel's queue was full or it was gone.
        self.dropped = 0

    def send(self, message: list[bytes]) -> None:
        """``[link id, *frames]`` to that kernel; dropped if it cannot go now."""
        try:
            self.socket.send_multipart(message, zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:
            self.dropped += 1
        finally:
            self._reschedule_read()

    def messageReceived(self, message: list[bytes]) -> None:
        link_id = message[0]
        front = self._owner.front_of(link_id)
        if front is None:
            self.refusals.note(UNKNOWN_LINKS, link_id[:16].hex())
            return
        self.doors.first_message(link_id)  # closes its door, as on a server
        front.send(message)

    def _refusal_line(self, line: Line) -> None:
        warn_line(self.log, line, self.factory.reactor.seconds() if self.factory else line.since)

    def shutdown(self) -> None:
        self.refusals.stop()
        self.doors.shutdown()
        super().shutdown()


class FrontLink(BoundedReads, ZmqDealerConnection):
    """This host's link to one front server (CURVE client)."""

    log = Logger()
    highWaterMark = RELAY_HWM

    def __init__(
        self,
        factory: ZmqFactory,
        endpoint: str,
        front_key: bytes,
        public_key: bytes,
        secret_key: bytes,
        relay: KernelRelay,
        owner: RelayOwner,
        timeout: float,
        max_size: int,
    ) -> None:
        self.address = endpoint
        self._relay = relay
        self._owner = owner
        self.refusals = RefusalLog(factory.reactor, self._refusal_line)
        #: Whether the front answered our hello (until it is lost).
        self.welcomed = False
        #: The seq of our last hello, and of the one the front welcomed.
        self.hello_seq = 0
        self.session = 0
        self.last_heard = factory.reactor.seconds()
        #: When the current connection attempt began (see L{reconnect}).
        self.connected_at = factory.reactor.seconds()
        #: Messages dropped because the front's queue was full or it was away.
        self.dropped = 0
        super().__init__(factory)
        sock = self.socket
        sock.curve_serverkey = front_key  # pinned: nothing else is talked to
        sock.curve_publickey = public_key
        sock.curve_secretkey = secret_key
        # Queue nothing for a front that is not connected: stale kernel
        # frames must not arrive after a new hello.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(timeout * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TTL, int(timeout * 1000))
        sock.setsockopt(zmq.RECONNECT_IVL, 500)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        # A kernel's frame and its link id, or a file chunk (/files).
        sock.setsockopt(zmq.MAXMSGSIZE, max(max_size, hostlink.MAX_FILE_CHUNK) + 64)
        sock.connect(endpoint)

    def reconnect(self) -> None:
        """Connect afresh. libzmq does not retry a connection whose CURVE
        handshake was refused (a key not yet authorised, a front restarted
        with another key): only a new connect does."""
        with contextlib.suppress(zmq.ZMQError):
            self.socket.disconnect(self.address)
        self.socket.connect(self.address)
        self.connected_at = self.factory.reactor.seconds() if self.factory else 0.0

    def send(self, message: list) -> bool:
        try:
            self.socket.send_multipart(message, zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:
            self.dropped += 1
            return False
        finally:
            self._reschedule_read()
        return True

    def send_control(self, message: hostlink.HostMessage) -> bool:
        return self.send(hostlink.encode(message))

    def messageReceived(self, message: list[bytes]) -> None:
        self.last_heard = self.factory.reactor.seconds() if self.factory else 0.0
        if message[0] == b"":
            try:
                control = hostlink.decode_from_front(message)
            except ProtocolError as e:
                self.refusals.note("front " + self.address, f"{e.code}: {e.message}")
                return
            self._owner.front_control(self, control)
            return
        if self._owner.front_of(message[0]) is not self:
            self.refusals.note("front " + self.address, "a link it did not start")
            return
        self._relay.send(message)

    def _refusal_line(self, line: Line) -> None:
        warn_line(self.log, line, self.factory.reactor.seconds() if self.factory else line.since)

    def shutdown(self) -> None:
        self.refusals.stop()
        super().shutdown()
