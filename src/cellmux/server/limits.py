# -*- test-case-name: tests.security.test_link_descriptors -*-
"""File descriptor headroom: the server refuses work before it runs out.

libzmq aborts the whole process when it cannot accept a connection for lack
of a descriptor (an assertion in its ipc listener), so running out is not an
error the server could report afterwards. At start the soft RLIMIT_NOFILE
is raised to the hard limit; from then on the server keeps headroom:

* L{RESERVE} descriptors are never handed to new work: they are for libzmq
  accepting the links of kernels already starting, the log, the database.
* Room for every kernel ``max_kernels`` still allows (two descriptors each:
  its link endpoint and its link) is kept from HTTP connections, so idle
  connections cannot keep kernels from starting (capped at a quarter of the
  limit, so that a huge ``max_kernels`` cannot shut HTTP out).
* A new HTTP connection is served while that leaves L{ANSWER_ROOM} more;
  below, it gets a ``503`` JSON answer and is closed; below L{RESERVE} it
  is closed at once.
* A kernel process is forked only while its two descriptors fit above
  L{RESERVE} (counting kernels still connecting); otherwise creating one
  answers ``503``.

Counting is cheap: on Linux 6.2+ ``stat`` of ``/proc/self/fd`` gives the
number of open descriptors; elsewhere the directory is listed, at most every
L{LIST_INTERVAL} seconds, and each check in between counts as one more
descriptor (each usually precedes an accepted connection).
"""

from __future__ import annotations

import enum
import json
import os
import resource
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import attrs
from twisted.internet import protocol

__all__ = [
    "ANSWER_ROOM",
    "RESERVE",
    "Admission",
    "DescriptorGuard",
    "GuardedFactory",
    "open_descriptors",
    "raise_open_files_limit",
]

#: Descriptors kept free for libzmq, the log and the database.
RESERVE = 64
#: Descriptors above RESERVE for connections being answered 503.
ANSWER_ROOM = 32
#: Descriptors one kernel costs the server: its link endpoint and its link.
PER_KERNEL = 2
#: Seconds a refused connection may take to send its request before its
#: 503 is written anyway (an idle one never sends anything).
ANSWER_WAIT = 1.0
#: Fallback counting: list /proc/self/fd at most this often.
LIST_INTERVAL = 0.1


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard
    if hard == resource.RLIM_INFINITY:  # never on Linux (nr_open bounds it)
        wanted = max(soft, 1 << 20)
    if wanted > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, wanted
    return soft, soft


class _Counter:
    """Open descriptors of this process, as cheaply as the kernel allows."""

    def __init__(self) -> None:
        self._listed = 0
        self._listed_at = -1.0
        self._since = 0  # checks since the last listing

    def __call__(self) -> int:
        try:
            size = os.stat("/proc/self/fd").st_size
        except OSError:
            size = 0
        if size > 0:  # Linux 6.2+: the size is the count
            return size
        now = time.monotonic()
        if now - self._listed_at >= LIST_INTERVAL:
            try:
                self._listed = len(os.listdir("/proc/self/fd")) - 1  # minus listdir's own
            except OSError:
                self._listed = 0
            self._listed_at = now
            self._since = 0
        self._since += 1
        return self._listed + self._since


open_descriptors = _Counter()


class Admission(enum.Enum):
    ACCEPT = "accept"
    #: Answer 503 and close.
    ANSWER = "answer"
    #: Close at once: not even the answer fits.
    DROP = "drop"


@attrs.define
class DescriptorGuard:
    """Decides, from the descriptors in use, whether new work may start.

    @ivar limit: the soft RLIMIT_NOFILE.
    @ivar kernels_allowed: how many more kernel processes the configuration
        permits (``max_kernels`` minus those alive).
    @ivar count: the descriptors open now.
    """

    limit: int
    kernels_allowed: Callable[[], int]
    count: Callable[[], int] = open_descriptors

    def free(self) -> int:
        return self.limit - self.count()

    def kernel_room(self) -> int:
        """Descriptors kept from HTTP connections for kernels still allowed."""
        cap = max(0, self.limit - RESERVE - ANSWER_ROOM) // 4
        return min(PER_KERNEL * max(0, self.kernels_allowed()), cap)

    def admit_connection(self) -> Admission:
        free = self.free()
        if free - self.kernel_room() >= RESERVE + ANSWER_ROOM:
            return Admission.ACCEPT
        if free >= RESERVE:
            return Admission.ANSWER
        return Admission.DROP

    def may_start_kernel(self, connecting: int) -> bool:
        """Whether one more kernel fits, with C{connecting} kernels whose
        links are not connected yet (each still needs a descriptor)."""
        return self.free() - connecting - PER_KERNEL >= RESERVE

    def too_low_for(self, max_kernels: int) -> bool:
        """Whether the limit leaves too little for max_kernels and some clients."""
        return self.limit < RESERVE + ANSWER_ROOM + PER_KERNEL * max_kernels + 64


def _unavailable_response(message: str) -> bytes:
    status = HTTPStatus.SERVICE_UNAVAILABLE
    body = json.dumps(
        {"message": message, "reason": status.phrase, "code": "out_of_descriptors"}
    ).encode()
    head = (
        f"HTTP/1.1 {status.value} {status.phrase}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Retry-After: 5\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return head + body


class _Unavailable(protocol.Protocol):
    """Answers 503 and closes, without parsing anything.

    It waits for the end of the request's headers (or L{ANSWER_WAIT}
    seconds) before answering: closing a socket with an unread request in it
    resets the connection, and the client would never see the answer.
    """

    def __init__(self, clock: Any, response: bytes) -> None:
        self._clock = clock
        self._response = response
        self._timer: Any = None
        self._tail = b""

    def connectionMade(self) -> None:
        self._timer = self._clock.callLater(ANSWER_WAIT, self._answer)

    def dataReceived(self, data: bytes) -> None:
        # Only the last 3 bytes are kept: enough to find a split b"\r\n\r\n".
        seen, self._tail = self._tail + data, (self._tail + data)[-3:]
        if b"\r\n\r\n" in seen:
            self._answer()

    def _answer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.transport is not None and self._response:
            self.transport.write(self._response)
            self._response = b""
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class GuardedFactory(protocol.Factory):
    """Builds the wrapped factory's protocols while descriptors allow.

    Protocols are built by the wrapped factory itself (a twisted.web Site
    stays their factory): nothing sits between them and their transport.

    @param refused: called with a short reason for each refused connection
        (the server's aggregated refusal log).
    """

    def __init__(
        self,
        wrapped: protocol.Factory[Any],
        guard: DescriptorGuard,
        clock: Any,
        refused: Callable[[str], None],
    ) -> None:
        self.wrapped = wrapped
        self.guard = guard
        self._clock = clock
        self._refused = refused

    def logPrefix(self) -> str:
        return self.wrapped.logPrefix()

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()

    def buildProtocol(self, addr: Any) -> protocol.Protocol | None:
        verdict = self.guard.admit_connection()
        if verdict is Admission.ACCEPT:
            return self.wrapped.buildProtocol(addr)
        free = self.guard.free()
        if verdict is Admission.DROP:
            self._refused(f"connection closed unanswered: {free} descriptors free")
            return None
        message = (
            f"the server is near its open files limit ({self.guard.limit - free} of "
            f"{self.guard.limit} in use); try again later"
        )
        self._refused(f"connection answered 503: {free} descriptors free")
        return _Unavailable(self._clock, _unavailable_response(message))
