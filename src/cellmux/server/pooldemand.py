# -*- test-case-name: tests.test_pool_demand -*-
"""How many ready kernels to keep: the warm pool follows demand.

A create finds a ready kernel if the pool did not run dry while its
replacements were starting. With creates arriving at C{rate} per second and
a kernel taking C{refill} seconds from fork to ready, about C{rate * refill}
are taken during one refill; the pool keeps twice that on top of the
configured C{base} (rounded), up to C{cap}, once at least L{MIN_TAKES}
creates came in the window. When nobody has created a kernel for
C{idle_after} seconds it gives the extra back, one kernel per check.

No I/O and no clock of its own: the kernel manager passes C{now}.
"""

from __future__ import annotations

import math
from collections import deque

import attrs

__all__ = ["MAX_TAKES", "MIN_TAKES", "PoolDemand"]

#: Weight of the newest start time in the running estimate of refill time.
_SMOOTHING = 0.3
#: Most creates remembered (at 1,000 creates a second, the whole window).
MAX_TAKES = 10_000
#: Fewer creates than this in the window are not a demand to grow for (a
#: user opening a notebook now and then, a test creating one kernel).
MIN_TAKES = 3


@attrs.define
class PoolDemand:
    #: Ready kernels kept even with no demand (``pool_size``).
    base: int
    #: Most ready kernels kept however high the demand (``pool_max``).
    cap: int
    #: Seconds of creates the rate is measured over.
    window: float = 10.0
    #: Seconds without a create before the pool shrinks back to C{base}.
    idle_after: float = 60.0
    #: Running estimate of seconds from fork to ready.
    refill: float = 0.1
    _takes: deque[float] = attrs.field(factory=lambda: deque(maxlen=MAX_TAKES))
    _last_take: float | None = None

    def took(self, now: float) -> None:
        """A create took (or waited for) a kernel at C{now}."""
        self._takes.append(now)
        self._last_take = now
        self._forget(now)

    def started(self, seconds: float) -> None:
        """A pool kernel took C{seconds} from fork to ready."""
        if seconds >= 0:
            self.refill += _SMOOTHING * (seconds - self.refill)

    def rate(self, now: float) -> float:
        """Creates per second over the last C{window} seconds."""
        self._forget(now)
        return len(self._takes) / self.window

    def wanted(self, now: float) -> int:
        """Ready kernels to keep now."""
        cap = max(self.base, self.cap)
        rate = self.rate(now)
        if len(self._takes) < MIN_TAKES:
            return self.base
        extra = math.floor(2 * rate * self.refill + 0.5)
        return min(cap, self.base + extra)

    def may_shrink(self, now: float) -> bool:
        """Whether extra ready kernels may be ended (demand has gone)."""
        return self._last_take is None or now - self._last_take >= self.idle_after

    def _forget(self, now: float) -> None:
        takes = self._takes
        while takes and takes[0] <= now - self.window:
            takes.popleft()
