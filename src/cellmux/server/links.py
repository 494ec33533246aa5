"""ONE ZeroMQ ROUTER for every kernel link (a txzmq adapter).

Called from Twisted/txzmq: L{LinkRouter.doRead}, L{LinkRouter.messageReceived}.
Called by the server: L{LinkRouter.expect}, L{LinkRouter.forget},
L{LinkRouter.send_to_kernel}.

Each message is checked by the link's sans-IO L{ServerLink}; what a kernel
sends before proving its secret, or on a channel it may not use, goes no
further than this module.

A kernel can reach only its own link. The ROUTER binds one ipc endpoint per
kernel process, ``LINKS_DIR/<link id>/link.sock``, in a directory that only
that kernel's uid may enter (as root the nursery gives it the kernel's gid,
mode 0710). The first message on the link (the pump's hello, sent before
any user code runs) closes that door: the socket file and its directory are
removed, so nothing is left on the file system to connect to, while the
pump's connection goes on. When the kernel ends, the endpoint is unbound.

Reading is fair: each reactor turn reads at most L{READ_BUDGET_MESSAGES}
messages or L{READ_BUDGET_BYTES} bytes from the ROUTER, then lets the
reactor serve its other descriptors, so a flooding kernel delays the others
by at most one such batch per turn. Refused messages cost a dictionary
look-up and a counter; they are logged aggregated (L{cellmux.server.refusals}).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import time
from typing import Protocol

import zmq
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from txzmq import ZmqFactory
from txzmq.router_dealer import ZmqRouterConnection

from cellmux.cleanup import remove_tree
from cellmux.protocol import (
    DEFAULT_LINK_CREDIT,
    KernelBundle,
    KernelFrame,
    LinkPong,
    LinkReady,
    ProtocolError,
    Reply,
    ServerLink,
    link_control,
)

from .limits import DescriptorGuard
from .refusals import Line, RefusalLog, warn_line

__all__ = [
    "BoundedReads",
    "KernelUnreachable",
    "LinkChecks",
    "LinkDoors",
    "LinkRouter",
    "LinkSink",
    "LinkUnavailable",
]

#: Most messages, and bytes, read from the ROUTER in one reactor turn (at
#: least one message is always read, however large).
READ_BUDGET_MESSAGES = 64
READ_BUDGET_BYTES = 1024 * 1024
#: Sources in the refusal log: messages from link ids nobody expects, one
#: kernel's link (followed by its id), kernel processes not started.
UNKNOWN_LINKS = "unknown kernel links"
LINK_SOURCE = "kernel link "
KERNEL_STARTS = "kernel starts"
SOCKET_NAME = "link.sock"
#: Longest time spent removing an endpoint's directory in the reactor.
DOOR_REMOVAL_SECONDS = 0.05
#: Longest path a unix socket may have (sun_path, with its NUL).
MAX_SOCKET_PATH = 107


class KernelUnreachable(Exception):
    """The kernel's link is gone or full; the message was not sent."""


class LinkUnavailable(Exception):
    """No link endpoint could be opened for a new kernel process.

    @ivar busy: True when the server is short of file descriptors (try again
        later); False when the endpoint could not be made at all.
    """

    def __init__(self, message: str, busy: bool) -> None:
        super().__init__(message)
        self.busy = busy


class LinkSink(Protocol):
    """Who receives what authenticated kernels say (the kernel manager)."""

    def link_ready(self, link_id: bytes, pid: int) -> None: ...

    def kernel_message(self, link_id: bytes, channel: int, socket: int, parts: list) -> None: ...

    def link_pong(self, link_id: bytes, n: int) -> None: ...

    def link_violation(self, link_id: bytes, code: str, message: str) -> None: ...


class LinkDoors:
    """One ipc endpoint per kernel process, each behind its own "door".

    The door is a directory only that kernel's uid may enter (as root the
    nursery gives it the kernel's gid, mode 0710); the first message on the
    link removes it, so nothing is left on the file system to connect to.
    Shared by the server's L{LinkRouter} and a kernel host's relay
    (L{cellmux.host.relay}), which bind on their own ROUTER sockets.

    @param socket: the ROUTER socket the endpoints are bound on.
    @param links_dir: where the per-kernel endpoints are made (mode 0700, or
        0711 as root); a crashed predecessor's leftovers are removed.
    @param guard: when given, a kernel endpoint is opened only while the
        process has file descriptors to spare.
    """

    log = Logger()

    def __init__(
        self,
        socket: zmq.Socket,
        links_dir: str,
        refusals: RefusalLog,
        guard: DescriptorGuard | None = None,
    ) -> None:
        longest = len(os.path.join(links_dir, "0" * 32, SOCKET_NAME).encode())
        if longest > MAX_SOCKET_PATH:
            raise ValueError(
                f"the runtime directory's path is too long for kernel link sockets "
                f"({longest} > {MAX_SOCKET_PATH} bytes): choose a shorter runtime_dir"
            )
        self._socket = socket
        self._links_dir = links_dir
        self.refusals = refusals
        self._guard = guard
        #: link id -> its endpoint, bound until the link is forgotten
        self._endpoints: dict[bytes, str] = {}
        #: link id -> its endpoint's directory, while it can be connected to
        self._doors: dict[bytes, str] = {}
        os.makedirs(links_dir, mode=0o700, exist_ok=True)
        for stale in os.listdir(links_dir):  # a crashed server's, in a kept runtime_dir
            remove_tree(os.path.join(links_dir, stale), deadline=time.monotonic() + 1.0)

    def __len__(self) -> int:
        """Kernel processes with an endpoint (starting or running)."""
        return len(self._endpoints)

    def open(self, link_id: bytes) -> str:
        """Bind a new endpoint for one kernel process; its address.

        @raise LinkUnavailable: if short of file descriptors or the endpoint
            cannot be made.
        """
        if self._guard is not None and not self._guard.may_start_kernel(len(self._doors)):
            free = self._guard.free()
            self.refusals.note(KERNEL_STARTS, f"{free} descriptors free")
            raise LinkUnavailable(
                f"the server is near its open files limit ({self._guard.limit - free} of "
                f"{self._guard.limit} in use); try again later",
                busy=True,
            )
        door = os.path.join(self._links_dir, link_id.hex())
        endpoint = "ipc://" + os.path.join(door, SOCKET_NAME)
        try:
            os.mkdir(door, 0o700)
            self._socket.bind(endpoint)
        except (OSError, zmq.ZMQError) as e:
            shutil.rmtree(door, ignore_errors=True)
            busy = getattr(e, "errno", None) in (errno.EMFILE, errno.ENFILE)
            raise LinkUnavailable(f"cannot open a kernel link: {e}", busy=busy) from None
        self._endpoints[link_id] = endpoint
        self._doors[link_id] = door
        return endpoint

    def first_message(self, link_id: bytes) -> None:
        """A message came from C{link_id}: close its door if still open."""
        if self._doors:
            self.close_door(link_id)

    def close(self, link_id: bytes) -> None:
        """Close the link's door and unbind its endpoint (ends its connection)."""
        self.close_door(link_id)
        endpoint = self._endpoints.pop(link_id, None)
        if endpoint is not None and not self._socket.closed:
            try:
                self._socket.unbind(endpoint)
            except zmq.ZMQError as e:
                self.log.warn("kernel link {link}: unbind: {error}", link=link_id.hex(), error=e)

    def close_door(self, link_id: bytes) -> None:
        """Remove the endpoint's socket file: nobody can connect any more.

        Must not raise: it runs for every first message of a link.
        """
        door = self._doors.pop(link_id, None)
        if door is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(door, SOCKET_NAME))  # what matters: nothing to connect to
        # Without root a kernel could have filled the directory: bounded
        # removal; a leftover goes with the runtime directory.
        removed = remove_tree(door, deadline=time.monotonic() + DOOR_REMOVAL_SECONDS)
        if not removed:
            self.log.warn("link endpoint {door} left: {why}", door=door, why=removed.reason)

    def shutdown(self) -> None:
        for link_id in list(self._endpoints):
            self.close_door(link_id)
        self._endpoints.clear()


class LinkChecks:
    """The per-link checks (L{ServerLink}) and what passes them, for any
    transport: the local ROUTER, or a kernel host's relay.

    @param reply: sends a link's handshake replies and controls,
        C{reply(link_id, parts)}; never blocks, drops when it cannot send.
    """

    def __init__(
        self,
        sink: LinkSink,
        refusals: RefusalLog,
        max_size: int,
        credit: int = DEFAULT_LINK_CREDIT,
    ) -> None:
        self._sink = sink
        self.refusals = refusals
        self._links: dict[bytes, ServerLink] = {}
        self._max_size = max_size
        # The credit each kernel starts with; the sink grants the rest.
        self._credit = credit

    def __contains__(self, link_id: bytes) -> bool:
        return link_id in self._links

    def admit(self, link_id: bytes, secret: bytes) -> None:
        self._links[link_id] = ServerLink(
            link_id, secret, secrets.token_bytes(16), max_size=self._max_size, credit=self._credit
        )

    def drop(self, link_id: bytes) -> None:
        self._links.pop(link_id, None)

    def ready(self, link_id: bytes) -> bool:
        link = self._links.get(link_id)
        return link is not None and link.ready

    def granted(self, link_id: bytes, op: str, fields: dict) -> None:
        """A control went to the kernel: a credit grant then binds the link."""
        link = self._links.get(link_id)
        granted = fields.get("bytes")
        if op == "credit" and link is not None and isinstance(granted, int):
            link.granted(granted)  # the link then holds the kernel to it

    def receive(self, link_id: bytes, parts: list, reply) -> bool:
        """Check one message from C{link_id} and pass on what it means;
        False if no such link is expected (the caller notes that)."""
        link = self._links.get(link_id)
        if link is None:
            return False
        try:
            event = link.receive(parts)
        except ProtocolError as e:
            source = LINK_SOURCE + link_id.hex()
            refused = self.refusals.note(source, f"{e.code}: {e.message}", kind=LINK_SOURCE.strip())
            if refused and link.ready:
                self._sink.link_violation(link_id, e.code, e.message)
            return True
        sink = self._sink
        if isinstance(event, KernelFrame):
            sink.kernel_message(link_id, event.channel, event.socket, parts[1:])
        elif isinstance(event, KernelBundle):
            for channel, socket, message in event.messages:
                sink.kernel_message(link_id, channel, socket, message)
        elif isinstance(event, LinkPong):
            sink.link_pong(link_id, event.n)
        elif isinstance(event, Reply):
            reply(link_id, event.parts)
        elif isinstance(event, LinkReady):
            sink.link_ready(link_id, event.pid)
        return True

    def refusal_line(self, line: Line, seconds: float) -> None:
        """Tell a running kernel's clients about its refused messages."""
        if not line.source.startswith(LINK_SOURCE):
            return
        link_id = bytes.fromhex(line.source.removeprefix(LINK_SOURCE))
        link = self._links.get(link_id)
        if link is not None and link.ready:
            code, _, message = line.detail.partition(": ")
            self._sink.link_violation(
                link_id, code, f"{line.count} more like it in {seconds:.0f} s, the last: {message}"
            )


class BoundedReads:
    """txzmq reading in bounded batches, for a ROUTER or DEALER connection.

    txzmq's own doRead reads until the socket is empty, which a peer that
    floods never lets happen: the reactor would serve nobody else. Each
    reactor turn reads at most L{READ_BUDGET_MESSAGES} messages or
    L{READ_BUDGET_BYTES} bytes; L{messageReceived} must not raise.
    """

    factory: ZmqFactory | None
    socket: zmq.Socket
    read_scheduled: IDelayedCall | None
    log = Logger()

    def messageReceived(self, message: list[bytes]) -> None:
        raise NotImplementedError

    def _reschedule_read(self) -> None:
        # ZeroMQ's FD is edge-triggered: after a send, incoming messages may
        # be pending without the FD becoming readable again.
        if self.read_scheduled is None and self.factory is not None:
            self.read_scheduled = self.factory.reactor.callLater(0, self.doRead)

    def doRead(self) -> None:
        """Read a bounded batch of messages, then give the reactor back."""
        if self.read_scheduled is not None:
            if self.read_scheduled.active():
                self.read_scheduled.cancel()
            self.read_scheduled = None
        messages, size = READ_BUDGET_MESSAGES, READ_BUDGET_BYTES
        while self.factory is not None:
            sock = self.socket
            if not int(sock.get(zmq.EVENTS)) & zmq.POLLIN:
                return
            if messages <= 0 or size <= 0:
                # More is waiting, but the FD will not say so again: come
                # back after the reactor's next poll.
                self._reschedule_read()
                return
            try:
                message = self._receive(sock)
            except zmq.Again:
                continue
            messages -= 1
            size -= sum(map(len, message))
            try:
                self.messageReceived(message)
            except Exception:
                self.log.failure("{kind} message handling failed", kind=type(self).__name__)

    def _receive(self, sock: zmq.Socket) -> list:
        return sock.recv_multipart(zmq.NOBLOCK)


class LinkRouter(BoundedReads, ZmqRouterConnection):
    """The server's single ROUTER socket, with one endpoint per kernel process.

    @param links_dir: where the per-kernel endpoints are made (the server's
        own directory: mode 0700, or 0711 as root).
    @param guard: when given, a kernel endpoint is opened only while the
        server has file descriptors to spare.
    """

    log = Logger()
    #: txzmq's pending read call, if one is scheduled.
    read_scheduled: IDelayedCall | None
    #: Messages queued per peer before sends fail (EAGAIN) instead of
    #: growing without bound; txzmq's default of 0 means unlimited.
    highWaterMark = 10000

    def __init__(
        self,
        factory: ZmqFactory,
        links_dir: str,
        sink: LinkSink,
        max_size: int,
        credit: int = DEFAULT_LINK_CREDIT,
        guard: DescriptorGuard | None = None,
    ) -> None:
        self.refusals = RefusalLog(factory.reactor, self._refusal_line)
        self._checks = LinkChecks(sink, self.refusals, max_size, credit)
        super().__init__(factory)
        sock = self.socket
        # Options first: libzmq applies them to connections made after the
        # bind, so setting them later would do nothing.
        # A send to a link that is not connected must fail, not vanish.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # No single ZeroMQ frame may exceed what one cellmux frame may hold.
        sock.setsockopt(zmq.MAXMSGSIZE, max_size)
        # No ZMTP heartbeat (the pumps set none either): libzmq 4.3.5
        # aborts the process when a heartbeat times out on a connection
        # whose input is paused by a full queue, which a flooding peer
        # that then disconnects causes at will. A
        # kernel's death is known from the nursery, a hung one from pings.
        try:
            self._doors = LinkDoors(sock, links_dir, self.refusals, guard)
        except Exception:
            self.shutdown()
            raise

    @property
    def refusals(self) -> RefusalLog:
        """Where refused traffic is counted and logged (tests replace it)."""
        return self._refusals

    @refusals.setter
    def refusals(self, log: RefusalLog) -> None:
        self._refusals = log
        for part in (getattr(self, "_doors", None), getattr(self, "_checks", None)):
            if part is not None:
                part.refusals = log

    @property
    def link_count(self) -> int:
        """Kernel processes with an endpoint (starting or running)."""
        return len(self._doors)

    def expect(self, link_id: bytes, secret: bytes) -> str:
        """Admit a link id whose kernel holds C{secret}; its endpoint.

        The endpoint is for that kernel alone: give it only to its process.

        @raise LinkUnavailable: if the server is short of file descriptors
            or the endpoint cannot be made.
        """
        endpoint = self._doors.open(link_id)
        self._checks.admit(link_id, secret)
        return endpoint

    def forget(self, link_id: bytes) -> None:
        """Refuse anything more from this link id; close its endpoint."""
        self._checks.drop(link_id)
        if self.socket is not None:
            self._doors.close(link_id)

    def send_to_kernel(self, link_id: bytes, parts: list) -> None:
        """Send ``[tag, *jupyter parts]`` to one kernel.

        @raise KernelUnreachable: if the link is not connected or is full.
        """
        if not self._checks.ready(link_id):
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
            return  # the kernel is gone or full; its exit is reported elsewhere
        finally:
            self._reschedule_read()
        self._checks.granted(link_id, op, fields)

    def _reply(self, link_id: bytes, parts: list) -> None:
        try:
            self.socket.send_multipart([link_id, *parts], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            self.log.warn("kernel link {link}: {error}", link=link_id.hex(), error=e.strerror)

    def messageReceived(self, message: list[bytes]) -> None:
        link_id = message[0]
        if link_id not in self._checks:
            self.refusals.note(UNKNOWN_LINKS, link_id[:16].hex())
            return
        self._doors.first_message(link_id)  # the link's first message closes its door
        self._checks.receive(link_id, message[1:], self._reply)

    def _refusal_line(self, line: Line) -> None:
        """Log one aggregated line; tell a running kernel's clients too."""
        now = self.factory.reactor.seconds() if self.factory else line.since
        seconds = warn_line(self.log, line, now)
        if line.count > 1:
            self._checks.refusal_line(line, seconds)

    def shutdown(self) -> None:
        self.refusals.stop()
        doors = getattr(self, "_doors", None)
        if doors is not None:
            doors.shutdown()
        super().shutdown()
