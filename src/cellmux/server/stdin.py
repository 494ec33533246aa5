# -*- test-case-name: tests.security.test_budgets -*-
"""A kernel's stdin bookkeeping: prompts waiting for their client, and who owns a session.

An ``input_request`` is routed to the client whose request asked, by the
``session`` of its parent header (protocol.md, section 5). If no such client
is attached, the prompt waits for it to come back. A kernel chooses both
the size of a prompt and the session it names, so what waits is bounded
(L{PendingPrompts}): at most L{MAX_PENDING_PROMPTS} prompts of at most
L{MAX_PROMPT_BYTES} each per kernel. A larger request has its prompt text
cut to L{CUT_PROMPT_CHARS} (L{cut_prompt}), or is dropped if even that does
not fit. Prompts pushed out or dropped are not answered: ipykernel takes
any ``input_reply`` as the answer to the ``input()`` it waits in, so an
end-of-file meant for a made-up prompt would end the real one.

A session id is not a secret (``history`` shows them), so knowing one must
not be enough to receive its prompts: L{SessionOwners} binds each session
id, on a kernel, to the grant (credential) that first used it there (among
those that may answer prompts: observers never own a session), and only
clients of that grant receive that session's prompts.

Nothing here does I/O; timers come from the clock it is given.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from cellmux.protocol import boundedjson
from cellmux.protocol.control import MAX_SESSION_ID

__all__ = [
    "MAX_PENDING_PROMPTS",
    "MAX_PROMPT_BYTES",
    "MAX_SESSION_OWNERS",
    "PendingInput",
    "PendingPrompts",
    "SessionOwners",
    "cut_prompt",
]

#: Largest input_request (all its parts) the server relays and keeps. A
#: prompt is a line of text; a kernel asking with megabytes is refused.
MAX_PROMPT_BYTES = 64 * 1024
#: Characters of a too large prompt that are kept.
CUT_PROMPT_CHARS = 4096
#: Prompts kept per kernel while their clients are away. ipykernel asks
#: one at a time per shell; a kernel naming more sessions than this loses
#: its oldest prompt (answered with end-of-file).
MAX_PENDING_PROMPTS = 16
#: Session ids whose owner a kernel remembers (least recently used go first).
MAX_SESSION_OWNERS = 1024


@attrs.define(eq=False)
class PendingInput:
    """An input_request not answered yet; its timer runs while no client
    of its session is attached."""

    session: str
    frame: bytes
    header: bytes
    parent: bytes
    timer: IDelayedCall | None = None

    @property
    def size(self) -> int:
        # frame holds header and parent too, but they are separate objects
        return len(self.frame) + len(self.header) + len(self.parent)

    def stop_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


class PendingPrompts:
    """The prompts of one kernel that wait for an answer, bounded.

    @param clock: where timers run.
    @param timeout: seconds a prompt waits for its session's client to
        come back (read at each wait, so configuration changes apply).
    @param expired: called with a prompt nobody will answer, after it was
        removed, why, and whether to answer the kernel with end-of-file:
        yes for a prompt whose wait ran out, no for one pushed out by
        newer ones.
    """

    def __init__(
        self,
        clock: IReactorTime,
        timeout: Callable[[], float],
        expired: Callable[[PendingInput, str, bool], None],
    ) -> None:
        self._clock = clock
        self._timeout = timeout
        self._expired = expired
        self._pending: OrderedDict[str, PendingInput] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def nbytes(self) -> int:
        """Bytes held (at most MAX_PENDING_PROMPTS * MAX_PROMPT_BYTES)."""
        return sum(p.size for p in self._pending.values())

    def get(self, session: str) -> PendingInput | None:
        return self._pending.get(session)

    def hold(self, pending: PendingInput) -> None:
        """Keep a prompt until answered; push out the oldest beyond the bound."""
        old = self._pending.pop(pending.session, None)
        if old is not None:
            old.stop_timer()  # its timer would end the new prompt
        self._pending[pending.session] = pending
        while len(self._pending) > MAX_PENDING_PROMPTS:
            _, oldest = self._pending.popitem(last=False)
            oldest.stop_timer()
            why = f"dropped an input request: more than {MAX_PENDING_PROMPTS} were waiting"
            self._expired(oldest, why, False)

    def wait(self, session: str) -> None:
        """No client of C{session} is attached: start its prompt's timeout."""
        pending = self._pending.get(session)
        if pending is not None and pending.timer is None:
            timeout = self._timeout()
            pending.timer = self._clock.callLater(timeout, self._timed_out, session, timeout)

    def client_back(self, session: str) -> PendingInput | None:
        """A client of C{session} attached: stop the timeout; the prompt, if any."""
        pending = self._pending.get(session)
        if pending is not None:
            pending.stop_timer()
        return pending

    def answered(self, session: str) -> None:
        pending = self._pending.pop(session, None)
        if pending is not None:
            pending.stop_timer()

    def drop_all(self) -> None:
        """Forget every prompt (the kernel ended or was interrupted)."""
        for pending in self._pending.values():
            pending.stop_timer()
        self._pending.clear()

    def _timed_out(self, session: str, timeout: float) -> None:
        pending = self._pending.pop(session, None)
        if pending is not None:
            pending.timer = None
            why = f"no client answered this input request in {timeout:g} s"
            self._expired(pending, why, True)


class SessionOwners:
    """Which credential a session id belongs to, on one kernel.

    The first grant to claim a session id owns it for as long as the kernel
    remembers it (the L{MAX_SESSION_OWNERS} most recently used ids). An id
    longer than MAX_SESSION_ID (what hello allows) is never owned, so the
    table stays small whatever a Jupyter client puts in its headers.
    """

    def __init__(self, limit: int = MAX_SESSION_OWNERS) -> None:
        self._limit = limit
        self._owners: OrderedDict[str, Hashable] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owners)

    def claim(self, session: str, grant: Hashable) -> bool:
        """Bind C{session} to C{grant} if it is free; whether C{grant} owns it."""
        if len(session) > MAX_SESSION_ID:
            return False
        owner = self._owners.get(session, grant)
        if owner != grant:
            return False
        self._owners[session] = grant
        self._owners.move_to_end(session)
        if len(self._owners) > self._limit:
            self._owners.popitem(last=False)
        return True


def cut_prompt(parts: Sequence[bytes]) -> list[bytes] | None:
    """An input_request too large to keep, with its prompt cut to fit.

    None if it still does not fit in L{MAX_PROMPT_BYTES} (its other parts
    are too large) or its content is not an object with a string prompt.
    """
    try:
        content = boundedjson.loads(parts[3])
    except ValueError:
        return None
    if not isinstance(content, dict) or not isinstance(content.get("prompt"), str):
        return None
    prompt = content["prompt"]
    content["prompt"] = (
        prompt[:CUT_PROMPT_CHARS] + f" [cellmux: prompt cut from {len(prompt)} characters] "
    )
    cut = [*parts[:3], json.dumps(content).encode(), *parts[4:]]
    return cut if sum(map(len, cut)) <= MAX_PROMPT_BYTES else None
