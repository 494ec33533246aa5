# -*- test-case-name: tests.test_introspection_units -*-
"""Introspection requests a kernel has not answered yet, and the
``unresponsive`` answer the server gives in the kernel's place.

A kernel answers introspection (channel 5) from a thread of its own, even
while a cell runs (cellmux.kernel.introspection). It cannot while C code
holds the GIL: nothing in its Python, the pump included, runs then. Only
the server can tell the client so. It remembers each introspection request
it forwards (by ``msg_id``) and, if no reply has come within the bound
(the server's ``unresponsive_after``, 2 s by default), or at once if the
kernel is known to be unresponsive, answers it itself with::

    {"status": "unresponsive", "ename": "KernelUnresponsive", "evalue": …,
     "traceback": [], "execution_state": "unresponsive"}

The kernel's own reply, if it comes later, is dropped: a client gets one
reply per request. Bounds: MAX_PENDING requests per kernel are tracked
(beyond that the oldest is answered at once), and the ids of the last
MAX_ANSWERED requests answered this way are kept to drop late replies.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from cellmux.protocol import boundedjson

__all__ = [
    "MAX_ANSWERED",
    "MAX_PENDING",
    "UnansweredIntrospection",
    "unresponsive_content",
]

#: Requests tracked per kernel at once.
MAX_PENDING = 256
#: Server-answered request ids remembered, to drop the kernel's late replies.
MAX_ANSWERED = 256


def unresponsive_content(waited: float | None) -> dict[str, Any]:
    """The content of the reply the server sends in the kernel's place."""
    if waited is None:
        why = "the kernel is unresponsive: C code holds the GIL, so nothing in it can answer"
    else:
        why = f"the kernel did not answer within {waited:g} s: C code may hold the GIL"
    return {
        "status": "unresponsive",
        "ename": "KernelUnresponsive",
        "evalue": why,
        "traceback": [],
        "execution_state": "unresponsive",
    }


def _header(data: bytes) -> dict[str, Any] | None:
    try:
        header = boundedjson.loads(data)
    except ValueError:
        return None
    if not isinstance(header, dict) or not isinstance(header.get("msg_id"), str):
        return None
    msg_type = header.get("msg_type")
    if not isinstance(msg_type, str) or not msg_type.endswith("_request"):
        return None
    return header


class UnansweredIntrospection:
    """One kernel's introspection requests that wait for their reply.

    @param clock: an L{IReactorTime} (a C{task.Clock} in tests).
    @param timeout: returns the bound in seconds (read at each request, so
        a config change applies to the next one).
    @param answer: C{answer(request_header, content)} sends the server's
        reply in the kernel's place.
    """

    def __init__(
        self,
        clock: Any,
        timeout: Callable[[], float],
        answer: Callable[[dict[str, Any], dict[str, Any]], None],
    ) -> None:
        self._clock = clock
        self._timeout = timeout
        self._answer = answer
        self._pending: OrderedDict[str, tuple[dict[str, Any], Any]] = OrderedDict()
        self._answered: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pending)

    def sent(self, header_part: bytes) -> None:
        """A client's introspection request went to the kernel."""
        header = _header(header_part)
        if header is None:
            return  # ipykernel answers nothing it cannot parse either
        msg_id = header["msg_id"]
        self._forget(msg_id)
        while len(self._pending) >= MAX_PENDING:
            oldest = next(iter(self._pending))
            self._expire(oldest, None)
        waited = self._timeout()
        timer = self._clock.callLater(waited, self._expire, msg_id, waited)
        self._pending[msg_id] = (header, timer)

    def refuse(self, header_part: bytes) -> bool:
        """Answer a request at once for a kernel known to be unresponsive.

        @return: whether it was answered (False: not a request we can answer).
        """
        header = _header(header_part)
        if header is None:
            return False
        self._remember_answered(header["msg_id"])
        self._answer(header, unresponsive_content(None))
        return True

    def replied(self, parent_part: bytes) -> bool:
        """The kernel replied; whether to relay the reply (not if the server
        already answered that request)."""
        try:
            parent = boundedjson.loads(parent_part)
        except ValueError:
            return True
        msg_id = parent.get("msg_id") if isinstance(parent, dict) else None
        if not isinstance(msg_id, str):
            return True
        if msg_id in self._answered:
            del self._answered[msg_id]
            return False
        self._forget(msg_id)
        return True

    def unresponsive(self) -> None:
        """The kernel stopped answering pings: answer everything waiting."""
        for msg_id in list(self._pending):
            self._expire(msg_id, None)

    def clear(self) -> None:
        """The process is gone: nothing will reply, and nothing is owed."""
        for _, timer in self._pending.values():
            if timer.active():
                timer.cancel()
        self._pending.clear()
        self._answered.clear()

    def _forget(self, msg_id: str) -> None:
        entry = self._pending.pop(msg_id, None)
        if entry is not None and entry[1].active():
            entry[1].cancel()

    def _expire(self, msg_id: str, waited: float | None) -> None:
        entry = self._pending.pop(msg_id, None)
        if entry is None:
            return
        header, timer = entry
        if timer.active():
            timer.cancel()
        self._remember_answered(msg_id)
        self._answer(header, unresponsive_content(waited))

    def _remember_answered(self, msg_id: str) -> None:
        self._answered[msg_id] = None
        self._answered.move_to_end(msg_id)
        while len(self._answered) > MAX_ANSWERED:
            self._answered.popitem(last=False)
