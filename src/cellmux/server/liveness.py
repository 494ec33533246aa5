# -*- test-case-name: tests.test_liveness_units -*-
"""Which kernel processes and kernels a tick must look at, in time order.

The kernel manager ticks twice a second. Looking at every process and every
kernel on each tick made the server's idle cost grow with the number of
idle kernels (a thousand of them: two thousand visits a second to send ten
pings a second). These schedules hand a tick only what is due:

* L{DueQueue}: items by the time they next need a look (a heap). An entry
  may be stale (the item changed since): whoever pops it checks the item
  again and pushes it back if it is not due yet, so a stale entry costs one
  look, never a missed deadline, as long as nothing moves a deadline
  earlier without pushing a new entry.
* L{WatchSet}: items looked at on every tick (busy kernels, pings waiting
  for their answer) until they say they can leave.

No I/O and no Twisted: times are plain floats from the caller's clock.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from typing import Generic, TypeVar

__all__ = ["DueQueue", "WatchSet"]

T = TypeVar("T")


class DueQueue(Generic[T]):
    """Items ordered by when they are due; popped once that time has come.

    Bound: one entry per L{push}; the caller pushes an item again only after
    it popped it or after the item's deadline moved (see the module
    docstring), so entries per item stay few.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, T]] = []
        self._order = itertools.count()  # ties: first pushed, first out

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, due: float, item: T) -> None:
        heapq.heappush(self._heap, (due, next(self._order), item))

    def pop_due(self, now: float) -> Iterator[tuple[float, T]]:
        """(due, item) for every entry due at C{now}, earliest first; each
        is removed as it is yielded (push again to look later)."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            due, _, item = heapq.heappop(heap)
            yield due, item

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None


class WatchSet(Generic[T]):
    """Items looked at on every tick, in the order they came, each once."""

    def __init__(self) -> None:
        self._items: dict[T, None] = {}  # insertion-ordered, unlike a set

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item: object) -> bool:
        return item in self._items

    def add(self, item: T) -> None:
        self._items[item] = None

    def discard(self, item: T) -> None:
        self._items.pop(item, None)

    def snapshot(self) -> list[T]:
        """The items now (a copy: the caller may add and discard meanwhile)."""
        return list(self._items)
