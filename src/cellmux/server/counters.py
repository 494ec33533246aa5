# -*- test-case-name: tests.test_metrics -*-
"""The server's running totals, as plain integers.

The relay path adds to them with an integer increment and nothing else: no
lock (one reactor thread), no allocation, no metrics library. ``/metrics``
(server/metrics.py) reads them, with the live state, at scrape time.

No I/O and no Twisted here.
"""

from __future__ import annotations

import bisect
from collections import Counter

import attrs

__all__ = ["LATENCY_BUCKETS", "Latencies", "ServerCounters"]

#: Upper bounds (seconds) of the start-latency histograms: a kernel from the
#: warm pool takes well under a millisecond, a forked one ~0.1-2 s, a slow
#: machine's up to kernel_start_timeout.
LATENCY_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@attrs.define
class Latencies:
    """A histogram: counts per bucket (not cumulative), their sum and count.

    Bounded: one integer per bucket, whatever the number of observations.
    """

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = attrs.field(init=False)
    total: float = 0.0
    count: int = 0

    def __attrs_post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, observations at or below it), ``+Inf`` last."""
        running, buckets = 0, []
        for bound, n in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            running += n
            buckets.append((bound, running))
        return buckets


@attrs.define
class ServerCounters:
    """Totals since the server started. Every key set is fixed by the code
    (sources, limit kinds), so each table is bounded."""

    #: Kernel messages received over the links, and their bytes.
    frames_from_kernels: int = 0
    bytes_from_kernels: int = 0
    #: Client messages sent to kernels over the links, and their bytes.
    frames_to_kernels: int = 0
    bytes_to_kernels: int = 0
    #: Gap notices sent (a client asked for frames the replay log had
    #: dropped), and the frames they reported missing.
    gaps: int = 0
    missed_frames: int = 0
    #: Kernel processes that became ready / failed to, and fork-to-ready time.
    process_starts: int = 0
    process_start_failures: int = 0
    process_start_seconds: Latencies = attrs.Factory(Latencies)
    #: Kernels handed to clients, by source ("pool", "forked", "cold": another
    #: kernelspec), and the time each create took inside the server.
    kernels_created: Counter[str] = attrs.Factory(Counter)
    create_seconds: dict[str, Latencies] = attrs.Factory(dict)
    #: Limits that refused or ended something, by kind: the sandbox's
    #: ("cpu", "memory", "disk", "file_size") and the server's
    #: ("max_kernels", "open_files").
    limits_hit: Counter[str] = attrs.Factory(Counter)

    def created(self, source: str, seconds: float) -> None:
        self.kernels_created[source] += 1
        latencies = self.create_seconds.get(source)
        if latencies is None:
            latencies = self.create_seconds[source] = Latencies()
        latencies.observe(seconds)
