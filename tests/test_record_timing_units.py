"""When the server record is rewritten (RecordKeeper), Clock-driven: a
change that forked a process (or gave it its own uid) is written within
RECORD_DELAY_NEW_PROCESS, since a crash before it would leave that process
unknown to the next start; a kernel bound to a pooled process, or ended,
waits RECORD_DELAY, past a new kernel's first cell, whose reply the
write's thread used to hold up. The thread pool runs the write at once;
its result comes back in a later turn, as a real thread's does."""

from __future__ import annotations

from typing import Any

from twisted.internet import task
from twisted.python.failure import Failure

from cellmux.server.orphans import RECORD_DELAY, RECORD_DELAY_NEW_PROCESS, RecordKeeper


class _InlinePool:
    def callInThreadWithCallback(self, on_result, f, *args: Any, **kwargs: Any) -> None:
        try:
            result = f(*args, **kwargs)
        except Exception:
            on_result(False, Failure())
        else:
            on_result(True, result)


class _Reactor(task.Clock):
    def getThreadPool(self) -> _InlinePool:
        return _InlinePool()

    def callFromThread(self, f, *args: Any, **kwargs: Any) -> None:
        self.callLater(0, f, *args, **kwargs)  # as a real thread's result: a later turn


class _Record:
    def __init__(self) -> None:
        self.writes: list[dict[str, int]] = []

    def write(self, kernels: dict[str, int], processes: dict[str, int] | None = None) -> None:
        self.writes.append(dict(processes or {}))


def _keeper():
    reactor, record = _Reactor(), _Record()
    state = {"forked": 0, "processes": {"a": 1}}
    keeper = RecordKeeper(
        reactor,
        record,
        dict,
        RECORD_DELAY,
        lambda: dict(state["processes"]),
        new_processes=lambda: state["forked"],
    )
    return reactor, record, state, keeper


def test_a_kernel_bound_or_ended_is_written_after_the_long_delay():
    assert RECORD_DELAY > 0.02 > RECORD_DELAY_NEW_PROCESS
    reactor, record, _state, keeper = _keeper()
    keeper.changed()
    reactor.advance(RECORD_DELAY_NEW_PROCESS)
    assert record.writes == [], "was: 5 ms after a create, in its first cell"
    reactor.advance(RECORD_DELAY - RECORD_DELAY_NEW_PROCESS)
    assert record.writes == [{"a": 1}]


def test_a_forked_process_is_written_after_the_short_delay():
    reactor, record, state, keeper = _keeper()
    state["forked"] += 1
    state["processes"]["b"] = 2
    keeper.changed()
    reactor.advance(RECORD_DELAY_NEW_PROCESS)
    assert record.writes == [{"a": 1, "b": 2}]


def test_a_fork_brings_a_pending_write_forward_and_joins_it():
    reactor, record, state, keeper = _keeper()
    keeper.changed()  # a kernel bound: the long delay
    reactor.advance(0.01)
    state["forked"] += 1
    state["processes"]["b"] = 2
    keeper.changed()
    reactor.advance(RECORD_DELAY_NEW_PROCESS)
    assert record.writes == [{"a": 1, "b": 2}]
    reactor.advance(1)
    assert len(record.writes) == 1  # one write for both changes
    keeper.changed()  # nothing forked since: the long delay again
    reactor.advance(RECORD_DELAY_NEW_PROCESS)
    assert len(record.writes) == 1
    reactor.advance(RECORD_DELAY)
    assert len(record.writes) == 2
