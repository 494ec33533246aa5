# -*- test-case-name: tests.test_sessions -*-
"""One client attached to one kernel, whatever carries its frames.

The native websocket, the Jupyter websocket and long polling all move the
same things: kernel frames out, the client's messages and requests in. What
they share lives here, so that flow control, roles and the client's place in
the kernel's numbering work the same on every transport:

* The kernel sees an L{Attachment} as one of its clients (L{ClientSink}).
* The transport hands it a L{Transport}: how to deliver one frame, tell of a
  gap, and end the connection. It reports a full socket with
  L{Attachment.pauseProducing} and a drained one with
  L{Attachment.resumeProducing} (an L{IPushProducer}, so a TCP transport can
  drive it directly).

Flow: frames are delivered as they come while the client keeps up. Paused,
the attachment writes nothing and remembers only the last seq delivered;
every frame is in the kernel's replay log, so on resume it catches up from
there (after a gap notice if the log moved past it). A paused client that
sends requests (a writer) also holds back the kernel's link credit, so the
kernel waits for it instead of anything being dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from cellmux.protocol import Channel

from .auth import Grant
from .kernels import Kernel, KernelError, KernelManager

__all__ = ["Attachment", "Forbidden", "KernelGone", "Transport"]


class Forbidden(KernelError):
    """The client's role does not allow this."""

    code = "forbidden"


class KernelGone(KernelError):
    """The kernel this client was attached to was shut down."""

    code = "kernel_gone"


class Transport(Protocol):
    """What an L{Attachment} needs from the connection that carries it."""

    def deliver(self, data: bytes) -> None:
        """Write one kernel frame (cellmux frame bytes) to the client."""

    def gap(self, first: int, last: int) -> None:
        """Tell the client frames first..last are gone for good."""

    def gone(self, reason: str) -> None:
        """The kernel was shut down: end the connection."""

    def revoked(self) -> None:
        """The share the client came in with was revoked: end the connection."""


#: Which role may make which control request (the rest: anyone attached).
_ROLE_FOR_OP = {
    "interrupt": lambda role: role.may_execute,
    "restart": lambda role: role.may_manage,
    "shutdown": lambda role: role.may_manage,
}


def _seq_of(data: bytes) -> int:
    # Bytes 4..12 of a frame are its seq (see cellmux.protocol.framing).
    return int.from_bytes(data[4:12], "big")


@implementer(IPushProducer)
class Attachment:
    """The server's side of one client on one kernel.

    @ivar session: the session id input_request frames are routed by.
    @ivar channels: the channels the client receives (None: all).
    """

    def __init__(
        self,
        manager: KernelManager,
        grant: Grant,
        transport: Transport,
        channels: frozenset[int] | None = None,
    ) -> None:
        self.manager = manager
        self.grant = grant
        self.channels = channels
        self.kernel: Kernel | None = None
        self.session = ""
        #: Whether this client's grant owns its session on the kernel (the
        #: first grant that may answer prompts to use a session id owns it):
        #: only then does it get that session's stdin prompts.
        self.owns_session = False
        self._transport = transport
        #: seq of the last kernel frame delivered (or passed over)
        self.cursor = 0
        #: the transport asked us to stop; frames wait in the replay log
        self._paused = False
        #: called when the client reads again, after it caught up (the
        #: native session answers the requests that waited)
        self.resumed: Callable[[], None] | None = None
        self._behind = False

    # -- attaching --------------------------------------------------------

    def attach(self, kernel: Kernel, session: str, cursor: int | None = None) -> None:
        """Join C{kernel}; with a cursor, first receive what came after it."""
        self.kernel = kernel
        self.session = session
        self.owns_session = self.claim_session(session)
        self.cursor = kernel.seq if cursor is None else min(cursor, kernel.seq)
        kernel.attach(self, cursor=cursor)

    def claim_session(self, session: str) -> bool:
        """Whether this client's grant owns C{session} on its kernel: it
        does if no other grant used it first. An observer, which may not
        answer prompts, never owns (or takes) a session."""
        kernel = self.kernel
        return (
            kernel is not None
            and self.grant.role.may_execute
            and kernel.session_owners.claim(session, self.grant)
        )

    def adopt_session(self, session: str) -> bool:
        """Route this client's prompts by C{session} from now on, if its grant
        owns (or may claim) that session; whether it did."""
        if not self.claim_session(session):
            return False
        before, self.session = self.session, session
        self.owns_session = True
        if self.kernel is not None and before != session:
            self.kernel.session_moved(self, before)
        return True

    def detach(self) -> None:
        if self.kernel is not None:
            self.kernel.detach(self)
            self.kernel = None

    # -- called by the kernel (ClientSink) --------------------------------

    def wants(self, channel: int) -> bool:
        if channel == Channel.STDIN and not (self.grant.role.may_execute and self.owns_session):
            # observers never see prompts, nor does anyone whose grant
            # does not own the session it declared
            return False
        return self.channels is None or channel in self.channels

    def send_frame(self, data: bytes) -> None:
        if self._paused or self._behind:
            self._behind = True  # it is in the replay log; we catch up later
            return
        self.cursor = _seq_of(data) or self.cursor
        self._transport.deliver(data)

    def gap(self, first: int, last: int) -> None:
        self._transport.gap(first, last)
        self.cursor = max(self.cursor, last)

    def kernel_gone(self, reason: str) -> None:
        self.kernel = None
        self._transport.gone(reason)

    def revoked(self) -> None:
        self.detach()
        self._transport.revoked()

    # -- flow: IPushProducer, driven by the transport ---------------------

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
        if not self._paused and self.resumed is not None:
            self.resumed()

    def stopProducing(self) -> None:
        self._paused = True

    @property
    def paused(self) -> bool:
        """Whether the client's connection is full (it is not reading)."""
        return self._paused

    def _catch_up(self) -> None:
        """Deliver what the client missed while paused, until paused again."""
        kernel = self.kernel
        if kernel is None:
            self._behind = False
            return
        gap, entries = kernel.replay.after(self.cursor)
        if gap is not None:
            self.gap(gap.first, gap.last)
        for entry in entries:
            if self._paused:
                return  # still behind; resumeProducing brings us back
            self.cursor = entry.seq
            if (entry.session is None or entry.session == self.session) and self.wants(
                entry.channel
            ):
                self._transport.deliver(entry.data)
        self._behind = self._paused

    # -- from the client ----------------------------------------------------

    def send(self, channel: int, socket: int, parts: tuple[bytes, ...] | list[bytes]) -> None:
        """Relay a client's Jupyter message to the kernel.

        @raise Forbidden: for an observer.
        @raise KernelError: if the kernel is gone or cannot take it.
        """
        if not self.grant.role.may_execute:
            raise Forbidden("observers cannot send to the kernel")
        kernel = self.kernel
        if kernel is None:
            raise KernelGone("the kernel was shut down")
        kernel.send(channel, socket, parts)
        # A client that sends requests drives the kernel: if it cannot keep
        # up with the output, the kernel waits for it (link credit).
        kernel.writers.add(self)
        if channel == Channel.EXECUTE:
            kernel.remember_input(self.session, parts[0], parts[3])
        elif channel == Channel.STDIN:
            kernel.input_answered(self.session)

    async def request(self, op: str, channels: frozenset[int] | None = None) -> dict[str, Any]:
        """Carry out a control request; return the reply's fields.

        @raise KernelError: if it cannot be done (L{Forbidden} for the role).
        """
        kernel = self.kernel
        if kernel is None:
            raise KernelGone("the kernel was shut down")
        if op == "ping":
            return {"op": "pong"}
        if op == "history":
            return {"op": "history", "inputs": [h.to_json() for h in kernel.history]}
        allowed = _ROLE_FOR_OP.get(op)
        if allowed is not None and not allowed(self.grant.role):
            raise Forbidden(f"a {self.grant.role.value} may not {op}")
        if op == "subscribe":
            self.channels = channels
        elif op == "interrupt":
            self.manager.interrupt(kernel)
        elif op == "restart":
            await self.manager.restart(kernel)
        elif op == "shutdown":
            # Answer first: deleting the kernel ends this connection.
            self.manager.clock.callLater(0, self.manager.delete, kernel)
        return {"op": "ok", "request": op}
