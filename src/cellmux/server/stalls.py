# -*- test-case-name: tests.test_stalls -*-
"""How long the reactor thread goes between two polls (its stalls).

Everything the server does runs in the reactor's thread between two polls
of its file descriptors: while one iteration runs, every client and every
kernel waits. An iteration's *busy time* (poll returned until the next poll
starts) is therefore what a round trip pays on top of its own work when it
arrives at the wrong moment. L{ReactorStalls} times every iteration (two
clock reads) and keeps a histogram of them for ``/metrics``
(``cellmux_reactor_busy_seconds``).

Diagnosis (``CELLMUX_STALL_LOG=MS`` in the server's environment): every
iteration busier than MS milliseconds is logged with the reactor thread's
CPU time over it (wall much above CPU: the thread waited for a core or for
the GIL held by another thread), the garbage collections that ran in it and
the reactor thread's stacks sampled while it ran. The sampler is a thread
that wakes every 2 ms: for diagnosis, not for production.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
import traceback
from collections import Counter
from typing import Any

import attrs
from twisted.logger import Logger

from .counters import Latencies

__all__ = ["BUSY_BUCKETS", "IterationClock", "ReactorStalls", "Stall"]

#: Upper bounds (seconds) of the busy-time histogram: most iterations relay
#: one message (tens of µs); 10 ms and up is a stall a round trip notices.
BUSY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)

_WRAPPERS = ("twisted/python/log.py", "twisted/python/context.py")

#: Stacks kept per logged stall (the most sampled first) and frames per stack.
STACKS_PER_STALL = 4
FRAMES_PER_STACK = 12


@attrs.frozen
class Stall:
    """One iteration busier than the threshold."""

    wall: float  #: seconds from poll return to the next poll
    cpu: float  #: the reactor thread's CPU seconds over it
    #: seconds the reactor thread was runnable but waited for a core (the
    #: scheduler's run queue; /proc/thread-self/schedstat), -1 if unknown
    queued: float
    gc: tuple[tuple[int, float], ...]  #: (generation, seconds) of each collection in it
    stacks: tuple[tuple[int, str], ...]  #: (samples, stack), most sampled first


class IterationClock:
    """The busy time of reactor iterations, from the times it is told.

    No I/O, no Twisted: the caller says when a poll returned (L{woke}) and
    when the next one starts (L{sleeps}), with wall and thread-CPU times.
    Bound: one integer per histogram bucket, plus the events of the
    iteration running now (collections: a handful; stacks: one per distinct
    stack, at most one sample per 2 ms of the iteration).
    """

    def __init__(self, threshold: float | None = None) -> None:
        #: Busy times of every iteration.
        self.busy = Latencies(BUSY_BUCKETS)
        #: The longest busy time seen.
        self.longest = 0.0
        self.threshold = threshold
        self._woke: tuple[float, float, float] | None = None
        self._collections: list[tuple[int, float]] = []
        self._stacks: Counter[str] = Counter()

    @property
    def busy_since(self) -> float | None:
        """Wall time the iteration running now began, None while polling."""
        return self._woke[0] if self._woke is not None else None

    def woke(self, wall: float, cpu: float, queued: float = -1.0) -> None:
        self._woke = (wall, cpu, queued)

    def collected(self, generation: int, seconds: float) -> None:
        if self._woke is not None and self.threshold is not None:
            self._collections.append((generation, seconds))

    def sampled(self, stack: str) -> None:
        if self._woke is not None:
            self._stacks[stack] += 1

    def sleeps(self, wall: float, cpu: float, queued: float = -1.0) -> Stall | None:
        """The iteration ended: a L{Stall} if it was busier than the threshold."""
        if self._woke is None:
            return None
        wall0, cpu0, queued0 = self._woke
        self._woke = None
        busy = wall - wall0
        self.busy.observe(busy)
        self.longest = max(self.longest, busy)
        collections, self._collections = self._collections, []
        stacks, self._stacks = self._stacks, Counter()
        if self.threshold is None or busy <= self.threshold:
            return None
        return Stall(
            wall=busy,
            cpu=cpu - cpu0,
            queued=queued - queued0 if queued >= 0 and queued0 >= 0 else -1.0,
            gc=tuple(collections),
            stacks=tuple((n, s) for s, n in stacks.most_common(STACKS_PER_STALL)),
        )


def _census(kinds: int = 8) -> str:
    """What a full collection walks: the oldest generation's objects, the
    most common types first (O(objects): only after a logged full pass)."""
    objects = gc.get_objects(generation=2)
    by_type = Counter(type(o).__qualname__ for o in objects)
    top = ", ".join(f"{name} {n}" for name, n in by_type.most_common(kinds))
    return f"{len(objects)} objects in the oldest generation: {top}"


class _TimedPoller:
    """Stands in for the reactor's poller: times what runs between polls."""

    def __init__(self, poller: Any, stalls: ReactorStalls) -> None:
        self._poller = poller
        self._stalls = stalls

    def poll(self, *args: Any, **kwargs: Any) -> Any:
        self._stalls.sleeps()
        try:
            return self._poller.poll(*args, **kwargs)
        finally:
            self._stalls.woke()

    def __getattr__(self, name: str) -> Any:  # register, modify, unregister, close, fileno
        return getattr(self._poller, name)


def _threshold_from_env() -> float | None:
    value = os.environ.get("CELLMUX_STALL_LOG", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value)) / 1000
    except ValueError:
        return None


class ReactorStalls:
    """Times the reactor's iterations (see the module docstring).

    Works with the reactors that poll through a C{_poller} (epoll, poll: the
    Linux default); with any other L{install} does nothing and says so.
    """

    log = Logger()

    def __init__(self, reactor: Any, threshold: float | None = None) -> None:
        self.reactor = reactor
        self.clock = IterationClock(threshold)
        self.installed = False
        self._sampler: threading.Thread | None = None
        self._stopping = threading.Event()
        self._main = threading.get_ident()
        self._gc_started = 0.0
        #: /proc/thread-self/schedstat of the reactor thread (diagnosis only).
        self._schedstat: int | None = None

    @classmethod
    def from_environment(cls, reactor: Any) -> ReactorStalls:
        return cls(reactor, _threshold_from_env())

    def install(self) -> bool:
        poller = getattr(self.reactor, "_poller", None)
        if poller is None or not hasattr(poller, "poll"):
            self.log.info("reactor busy times are not measured with this reactor")
            return False
        self.reactor._poller = _TimedPoller(poller, self)
        self.installed = True
        if self.clock.threshold is not None:
            self._main = threading.get_ident()
            try:
                self._schedstat = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
            except OSError:  # no schedstats: stalls are logged without it
                self._schedstat = os.open(os.devnull, os.O_RDONLY)
            gc.callbacks.append(self._gc)
            self._sampler = threading.Thread(
                target=self._sample, name="cellmux-stall-sampler", daemon=True
            )
            self._sampler.start()
            self.log.info("logging reactor stalls over {ms:g} ms", ms=self.clock.threshold * 1000)
        return True

    def uninstall(self) -> None:
        if not self.installed:
            return
        poller = self.reactor._poller
        if isinstance(poller, _TimedPoller):
            self.reactor._poller = poller._poller
        self.installed = False
        if self._sampler is not None:
            self._stopping.set()
            gc.callbacks.remove(self._gc)
            self._sampler.join(1)
            self._sampler = None
        if self._schedstat is not None:
            os.close(self._schedstat)
            self._schedstat = None

    def woke(self) -> None:
        if self._schedstat is None:  # only the busy time: one clock read
            self.clock.woke(time.perf_counter(), 0.0)
        else:
            self.clock.woke(time.perf_counter(), time.thread_time(), self._queued())

    def sleeps(self) -> None:
        if self._schedstat is None:
            self.clock.sleeps(time.perf_counter(), 0.0)
            return
        stall = self.clock.sleeps(time.perf_counter(), time.thread_time(), self._queued())
        if stall is not None:
            self._report(stall)

    def _queued(self) -> float:
        """Seconds the reactor thread has waited on a run queue so far."""
        try:
            fields = os.pread(self._schedstat, 128, 0).split()  # type: ignore[arg-type]
            return int(fields[1]) / 1e9
        except (OSError, IndexError, ValueError):
            return -1.0

    def _report(self, stall: Stall) -> None:
        collections = ", ".join(f"gen {g} {s * 1000:.1f} ms" for g, s in stall.gc) or "none"
        if any(g == 2 for g, _ in stall.gc):
            collections += f" ({_census()})"
        stacks = "\n".join(f"  [{n} samples]\n{s}" for n, s in stall.stacks) or "  (none sampled)"
        self.log.warn(
            "reactor stall: busy {wall:.1f} ms, reactor thread CPU {cpu:.1f} ms, "
            "waiting for a core {queued:.1f} ms; collections: {collections}\n{stacks}",
            wall=stall.wall * 1000,
            cpu=stall.cpu * 1000,
            queued=stall.queued * 1000,
            collections=collections,
            stacks=stacks,
        )

    def _gc(self, phase: str, info: dict[str, int]) -> None:
        if threading.get_ident() != self._main:
            return
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.clock.collected(info["generation"], time.perf_counter() - self._gc_started)

    def _sample(self) -> None:
        threshold = self.clock.threshold or 0.0
        while not self._stopping.wait(0.002):
            since = self.clock.busy_since
            if since is None or time.perf_counter() - since < threshold / 2:
                continue
            frame = sys._current_frames().get(self._main)
            if frame is None:
                continue
            # The innermost frames, less Twisted's logging-context wrappers.
            frames = [
                f for f in traceback.extract_stack(frame) if not f.filename.endswith(_WRAPPERS)
            ][-FRAMES_PER_STACK:]
            self.clock.sampled("".join(traceback.format_list(frames)).rstrip("\n"))
