# -*- test-case-name: tests.test_lifecycle_units -*-
"""A kernel's lifecycle as one transition table, and the back-off timers.

No I/O and no Twisted: the kernel manager feeds events in and sends out
the status each transition says to publish. Every state change of a kernel
goes through L{Lifecycle.handle}; an event its state does not accept
raises L{IllegalTransition} and changes nothing.

States and what moves between them::

    STARTING --Bound--> IDLE <--Said--> BUSY
    IDLE/BUSY --Silent--> UNRESPONSIVE --Answered or Said--> IDLE/BUSY
    IDLE/BUSY/UNRESPONSIVE/DEAD --RestartBegun--> RESTARTING --Bound--> IDLE
    STARTING/IDLE/BUSY/UNRESPONSIVE --Exited--> DEAD (cause)
    RESTARTING --RestartFailed--> DEAD (cause)
    any but ENDED --Ended--> ENDED (cause; the id is gone)

What clients see (the ``content`` of the status message the server
publishes; the kernel's own busy/idle messages are relayed as they are):

* ``Silent``: ``{"execution_state": "unresponsive"}``
* ``Answered``: ``{"execution_state": "idle"|"busy", "responsive": true}``
* ``Exited``: ``{"execution_state": "dead", "cause": ..., "limit": ...}``
  (``limit`` only when a sandbox limit ended it), plus ``"auto_restart":
  true`` when an automatic restart follows
* ``RestartBegun``: ``{"execution_state": "restarting"}``
* ``Bound`` after a restart: ``{"execution_state": "idle", "restarted": true}``
* ``RestartFailed`` and ``Ended``: ``{"execution_state": "dead", "cause": ...}``
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Any

import attrs

__all__ = [
    "RUNNING",
    "Answered",
    "Backoff",
    "Bound",
    "Ended",
    "Event",
    "Exited",
    "IllegalTransition",
    "KernelState",
    "Lifecycle",
    "RestartBegun",
    "RestartBudget",
    "RestartFailed",
    "Said",
    "Silent",
    "Transition",
]


class KernelState(enum.Enum):
    #: Waiting for a process to be ready.
    STARTING = "starting"
    #: Ready, not executing.
    IDLE = "idle"
    #: The kernel said it is busy.
    BUSY = "busy"
    #: The process lives but its link does not answer pings (GIL held).
    UNRESPONSIVE = "unresponsive"
    #: The old process is being replaced by a new one.
    RESTARTING = "restarting"
    #: The process ended; the cause is kept. A restart brings it back.
    DEAD = "dead"
    #: Deleted, culled or shut down with the server: the id is gone.
    ENDED = "ended"


#: States with a process that takes messages.
RUNNING = frozenset({KernelState.IDLE, KernelState.BUSY, KernelState.UNRESPONSIVE})


# -- events ------------------------------------------------------------------


@attrs.frozen
class Bound:
    """A ready process was bound to the kernel."""


@attrs.frozen
class Said:
    """The kernel's own status message: busy or idle."""

    busy: bool


@attrs.frozen
class Silent:
    """The link did not answer a ping in time (the process holds the GIL)."""


@attrs.frozen
class Answered:
    """The link answered the outstanding ping."""


@attrs.frozen
class RestartBegun:
    """The old process (if any) is being replaced."""


@attrs.frozen
class Exited:
    """The process ended on its own (or its nursery did)."""

    cause: str
    limit: str | None = None
    #: An automatic restart will follow (clients are told so).
    auto_restart: bool = False


@attrs.frozen
class RestartFailed:
    """No new process could be had for a restart."""

    cause: str


@attrs.frozen
class Ended:
    """The kernel id is removed (deleted, culled, server stopping)."""

    cause: str


Event = Bound | Said | Silent | Answered | RestartBegun | Exited | RestartFailed | Ended


class IllegalTransition(Exception):
    """An event the kernel's current state does not accept."""

    def __init__(self, state: KernelState, event: Event) -> None:
        super().__init__(f"a {state.value} kernel cannot take {event!r}")
        self.state = state
        self.event = event


@attrs.frozen
class Transition:
    """What one event did: the states before and after, and the status
    content to publish to the kernel's clients (None: publish nothing)."""

    before: KernelState
    after: KernelState
    publish: dict[str, Any] | None


# -- the table ------------------------------------------------------------------

S = KernelState
_ALIVE = (S.IDLE, S.BUSY, S.UNRESPONSIVE)

#: (state, event type) -> the handler's name. Anything else is illegal.
_TABLE: dict[tuple[KernelState, type], str] = {
    **{(S.STARTING, Bound): "_bound", (S.RESTARTING, Bound): "_bound"},
    **{(s, Said): "_said" for s in _ALIVE},
    **{(s, Silent): "_silent" for s in (S.IDLE, S.BUSY)},
    **{(s, Answered): "_answered" for s in _ALIVE},
    **{(s, RestartBegun): "_restart_begun" for s in (*_ALIVE, S.DEAD)},
    **{(s, Exited): "_exited" for s in (S.STARTING, *_ALIVE)},
    (S.RESTARTING, RestartFailed): "_restart_failed",
    **{(s, Ended): "_ended" for s in S if s is not S.ENDED},
}


@attrs.define
class Lifecycle:
    """One kernel's state, its cause of death, and the transition table."""

    state: KernelState = KernelState.STARTING
    #: Why it is dead or ended (None while it has a process).
    cause: str | None = None
    #: The sandbox limit that ended it, if one did.
    limit: str | None = None
    #: Where an unresponsive kernel goes back to when it answers.
    resume: KernelState = KernelState.BUSY

    def accepts(self, event: Event) -> bool:
        return (self.state, type(event)) in _TABLE

    def handle(self, event: Event) -> Transition:
        """Apply C{event}; @raise IllegalTransition: if the state refuses it."""
        name = _TABLE.get((self.state, type(event)))
        if name is None:
            raise IllegalTransition(self.state, event)
        before = self.state
        publish = getattr(self, name)(event)
        return Transition(before, self.state, publish)

    def _bound(self, event: Bound) -> dict[str, Any] | None:
        restarted = self.state is S.RESTARTING
        self.state, self.cause, self.limit = S.IDLE, None, None
        # A new kernel has no clients yet; a restarted one has them waiting.
        return {"execution_state": "idle", "restarted": True} if restarted else None

    def _said(self, event: Said) -> None:
        # A status message came through the pump: the process answers again.
        self.state = S.BUSY if event.busy else S.IDLE

    def _silent(self, event: Silent) -> dict[str, Any]:
        self.resume = self.state
        self.state = S.UNRESPONSIVE
        return {"execution_state": "unresponsive"}

    def _answered(self, event: Answered) -> dict[str, Any] | None:
        if self.state is not S.UNRESPONSIVE:
            return None
        self.state = self.resume
        return {"execution_state": self.state.value, "responsive": True}

    def _restart_begun(self, event: RestartBegun) -> dict[str, Any]:
        self.state, self.cause, self.limit = S.RESTARTING, None, None
        return {"execution_state": "restarting"}

    def _exited(self, event: Exited) -> dict[str, Any]:
        self.state, self.cause, self.limit = S.DEAD, event.cause, event.limit
        content: dict[str, Any] = {"execution_state": "dead", "cause": event.cause}
        if event.limit:
            content["limit"] = event.limit
        if event.auto_restart:
            content["auto_restart"] = True
        return content

    def _restart_failed(self, event: RestartFailed) -> dict[str, Any]:
        self.state, self.cause, self.limit = S.DEAD, event.cause, None
        return {"execution_state": "dead", "cause": event.cause}

    def _ended(self, event: Ended) -> dict[str, Any]:
        self.state, self.cause, self.limit = S.ENDED, event.cause, None
        return {"execution_state": "dead", "cause": event.cause}


# -- crash loops and retries ------------------------------------------------------


@attrs.define
class RestartBudget:
    """At most C{limit} automatic restarts within any C{window} seconds."""

    limit: int = 3
    window: float = 60.0
    _times: deque[float] = attrs.field(factory=deque)

    def take(self, now: float) -> bool:
        """Spend one restart at C{now} if the budget allows it."""
        while self._times and now - self._times[0] > self.window:
            self._times.popleft()
        if len(self._times) >= self.limit:
            return False
        self._times.append(now)
        return True


@attrs.define
class Backoff:
    """Exponential back-off: C{first}, doubling, at most C{cap} seconds.

    A run that lasted C{stable_after} seconds or more before it failed
    counts as a success: the next failure waits C{first} again.
    """

    first: float = 0.5
    cap: float = 30.0
    stable_after: float = 30.0
    #: Failures in a row so far.
    failures: int = 0

    def failed(self, ran_for: float = 0.0) -> float:
        """Count a failure after C{ran_for} seconds; the delay to wait."""
        if ran_for >= self.stable_after:
            self.failures = 0
        delay = min(self.cap, self.first * 2 ** min(self.failures, 32))
        self.failures += 1
        return delay

    def succeeded(self) -> None:
        self.failures = 0
