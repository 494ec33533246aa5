# -*- test-case-name: tests.test_replay -*-
"""The per-kernel replay log: the last N bytes of frames, by seq number.

Every frame a kernel's clients receive is numbered (seq) and appended here.
A client that reconnects, or that fell behind its own connection, asks for
everything after the last seq it has; if that is no longer in the log it
first learns exactly how many frames it missed (a gap).

No I/O: this is a bounded deque with a byte budget.

The log keeps each frame as a plain tuple, not an L{Entry}: the garbage
collector stops tracking a tuple of ints, bytes and strings at its first
pass, while every instance of a class stays tracked, and a full pass walks
every tracked object: the replay logs of a thousand kernels were the
largest population it walked (a third of the objects with 250 kernels).
L{Entry} objects are made only for what is read back.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from typing import Any

import attrs

__all__ = ["DEFAULT_REPLAY_BYTES", "Entry", "Gap", "ReplayLog"]

#: Default budget per kernel. A page reload after a burst of output should
#: find it all; a thousand idle kernels should not hold gigabytes.
DEFAULT_REPLAY_BYTES = 8 * 1024 * 1024

#: One logged frame as the log keeps it: (seq, channel, data, session).
Data = bytes  # ReplayLog.bytes (a property) hides the builtin in its body
Frame = tuple[int, int, Data, str | None]


@attrs.frozen
class Entry:
    """One logged frame.

    @ivar session: for frames meant for one client session only (an
        input_request), that session; None for frames every client gets.
    """

    seq: int
    channel: int
    data: bytes
    session: str | None = None


@attrs.frozen
class Gap:
    """Frames first..last (inclusive) are gone from the log."""

    first: int
    last: int

    @property
    def missed(self) -> int:
        return self.last - self.first + 1


class ReplayLog:
    """Frames in seq order, oldest dropped first once over budget.

    The newest frame is always kept, even when it alone is over budget, so
    a client that is one frame behind can always catch up.
    """

    def __init__(self, max_bytes: int = DEFAULT_REPLAY_BYTES, counters: Any = None) -> None:
        self.max_bytes = max_bytes
        #: Where gaps are counted (a ServerCounters), if anywhere.
        self._counters = counters
        #: (seq, channel, data, session) per frame: see the module docstring.
        self._entries: deque[Frame] = deque()
        self._bytes = 0
        self._last_seq = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def last_seq(self) -> int:
        return self._last_seq

    @property
    def first_seq(self) -> int:
        """Seq of the oldest frame kept (last_seq + 1 when empty)."""
        return self._entries[0][0] if self._entries else self._last_seq + 1

    def append(self, entry: Entry) -> None:
        self.add(entry.seq, entry.channel, entry.data, entry.session)

    def add(self, seq: int, channel: int, data: Data, session: str | None = None) -> None:
        """Log one frame (what L{append} does, without an L{Entry})."""
        if seq <= self._last_seq:
            raise ValueError(f"seq {seq} after {self._last_seq}: the log is ordered")
        self._entries.append((seq, channel, data, session))
        self._bytes += len(data)
        self._last_seq = seq
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            self._bytes -= len(self._entries.popleft()[2])

    def after(self, cursor: int) -> tuple[Gap | None, Iterator[Entry]]:
        """What a client that has seen up to C{cursor} is missing.

        @return: the gap (None if nothing was lost) and the entries with
            seq > cursor, oldest first. Consume the iterator before the
            next append (the reactor never interleaves the two).
        """
        cursor = min(cursor, self._last_seq)
        first = self.first_seq
        gap = Gap(cursor + 1, first - 1) if cursor + 1 < first else None
        if gap is not None and self._counters is not None:
            self._counters.gaps += 1
            self._counters.missed_frames += gap.missed
        # Entries are in seq order with no holes, so the start is an offset.
        start = max(0, cursor + 1 - first)
        entries = self._entries
        missing = len(entries) - start
        if missing < start:
            # A deque is walked from an end: from the right, a client a few
            # frames behind costs those frames, not the whole log (which a
            # thousand clients catching up would pay again and again).
            tail = list(itertools.islice(reversed(entries), missing))
            tail.reverse()
            return gap, itertools.starmap(Entry, tail)
        return gap, itertools.starmap(Entry, itertools.islice(entries, start, None))
