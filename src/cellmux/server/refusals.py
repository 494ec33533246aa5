# -*- test-case-name: tests.security.test_link_refusals -*-
"""Refused traffic, logged aggregated and rate-limited.

A peer that floods the server with messages it refuses (junk on a kernel
link, connections while descriptors are short) must not turn each refusal
into a log line: 40 MB of log in 6 s is a second denial of service. Each
refusal is counted against a *source* (a link, ``"http"``); the first one
after a quiet spell is logged at once, later ones are summed into one line
per source per L{INTERVAL} seconds.

L{RefusalTally} is the sans-IO core (time is passed in); L{RefusalLog}
drives it with a Twisted clock and a logger.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs

__all__ = [
    "INTERVAL",
    "MAX_SOURCES",
    "OTHER_SOURCES",
    "Line",
    "RefusalLog",
    "RefusalTally",
    "warn_line",
]

#: Seconds between two lines about the same source.
INTERVAL = 10.0
#: Sources counted separately at once; more are summed under L{OTHER_SOURCES}
#: (sources are chosen by the server, but this bounds the table regardless).
MAX_SOURCES = 1024
OTHER_SOURCES = "other sources"


@attrs.frozen
class Line:
    """One log line's worth: C{count} refusals from C{source} since C{since}."""

    source: str
    count: int
    since: float
    #: What the last refusal was about (the newest reason wins).
    detail: str


def warn_line(log: Any, line: Line, now: float) -> float:
    """Log C{line} on C{log} (a twisted Logger) as every refusal log does:
    a source's first refusal alone, later ones counted over the seconds
    since; returns those seconds (0 for a first refusal)."""
    if line.count == 1:
        log.warn("{source}: refused ({detail})", source=line.source, detail=line.detail)
        return 0.0
    seconds = now - line.since
    log.warn(
        "{source}: refused {count} more in {seconds:.0f} s (last: {detail})",
        source=line.source,
        count=line.count,
        seconds=seconds,
        detail=line.detail,
    )
    return seconds


@attrs.define
class _Window:
    opened: float
    count: int = 0
    detail: str = ""


class RefusalTally:
    """Counts refusals per source; says which lines are due and when.

    Memory is bounded by L{MAX_SOURCES} windows of one small record each;
    a source is forgotten once a whole interval passes without a refusal.
    """

    def __init__(self, interval: float = INTERVAL, max_sources: int = MAX_SOURCES) -> None:
        self.interval = interval
        self.max_sources = max_sources
        self._windows: dict[str, _Window] = {}

    def __len__(self) -> int:
        return len(self._windows)

    def note(self, source: str, now: float, detail: str = "") -> Line | None:
        """Count one refusal; the line to log now, if its source was quiet."""
        window = self._windows.get(source)
        if window is None:
            if len(self._windows) >= self.max_sources and source != OTHER_SOURCES:
                return self.note(OTHER_SOURCES, now, f"{source}: {detail}")
            # First refusal after a quiet spell: say so at once, then count.
            self._windows[source] = _Window(now)
            return Line(source, 1, now, detail)
        window.count += 1
        window.detail = detail
        return None

    def due(self, now: float) -> list[Line]:
        """Lines for the windows that ended by C{now}; quiet sources are forgotten."""
        lines = []
        for source, window in list(self._windows.items()):
            if now - window.opened < self.interval:
                continue
            if window.count:
                lines.append(Line(source, window.count, window.opened, window.detail))
                self._windows[source] = _Window(now)
            else:
                del self._windows[source]
        return lines

    def next_due(self) -> float | None:
        """When the earliest window ends (None: nothing is counted)."""
        if not self._windows:
            return None
        return min(w.opened for w in self._windows.values()) + self.interval


class RefusalLog:
    """L{RefusalTally} on a clock: one log line per source per interval.

    @param emit: called with each L{Line} that is due (e.g. logs it).
    """

    def __init__(self, clock: Any, emit: Callable[[Line], None], interval: float = INTERVAL):
        self._clock = clock
        self._emit = emit
        self._tally = RefusalTally(interval)
        self._flush_call: Any = None
        #: Refusals since the start by kind (for /metrics); kinds are fixed
        #: by the code, so this stays small.
        self.totals: Counter[str] = Counter()

    def note(self, source: str, detail: str = "", kind: str | None = None) -> bool:
        """Count one refusal; True if a line about it was emitted right now.

        @param kind: what /metrics counts it under (default: C{source}); give
            one for sources that name a peer.
        """
        self.totals[kind or source] += 1
        line = self._tally.note(source, self._clock.seconds(), detail)
        if line is not None:
            self._emit(line)
            self._schedule()
        return line is not None

    def _schedule(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            return
        when = self._tally.next_due()
        if when is not None:
            delay = max(0.0, when - self._clock.seconds())
            self._flush_call = self._clock.callLater(delay, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        for line in self._tally.due(self._clock.seconds()):
            self._emit(line)
        self._schedule()

    def stop(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
