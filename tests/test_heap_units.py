"""The server's start-up objects leave the garbage collector's passes
(server/heap.py), after their garbage is collected."""

from __future__ import annotations

import gc
import time
import weakref

from cellmux.server import heap


class _Node:
    pass


def _full_pass_seconds() -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        gc.collect()
        best = min(best, time.perf_counter() - t0)
    return best


def test_settle_collects_start_up_garbage_then_takes_the_rest_out_of_full_passes():
    # garbage of start-up: a reference cycle nobody holds
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    # what start-up keeps: many objects a full pass would walk every time
    kept = [{"n": [i]} for i in range(100_000)]
    before = _full_pass_seconds()
    try:
        frozen = heap.settle()
        assert gone() is None, "a cycle left by start-up must not be frozen for ever"
        assert frozen >= 2 * len(kept)
        after = _full_pass_seconds()
        assert after < before / 3, (before, after)
    finally:
        gc.unfreeze()  # the test process is not the server
        del kept


def test_a_replay_log_adds_nothing_to_full_passes():
    # The largest population a full pass walked with many kernels: their
    # replay logs' frames. Kept as plain tuples, the collector stops
    # tracking them at its first pass over them.
    from cellmux.server.replay import Entry, ReplayLog

    log = ReplayLog(1 << 20)
    for seq in range(1, 2001):
        log.add(seq, 2, b"frame %d" % seq, "s1" if seq % 7 == 0 else None)
    log.append(Entry(2001, 3, b"last"))
    gc.collect()
    assert not any(gc.is_tracked(frame) for frame in log._entries)
    # what is read back is still Entry objects, in order
    gap, entries = log.after(1995)
    assert gap is None
    assert [(e.seq, e.channel, e.session) for e in entries] == [
        (1996, 2, None),
        (1997, 2, None),
        (1998, 2, None),
        (1999, 2, None),
        (2000, 2, None),
        (2001, 3, None),
    ]
    assert next(e.session for e in log.after(1994)[1]) == "s1"
