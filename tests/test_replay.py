"""The replay log: bounded, ordered, exact about what it lost."""

from __future__ import annotations

import time

from hypothesis import given
from hypothesis import strategies as st

from cellmux.server.replay import Entry, Gap, ReplayLog


def fill(log: ReplayLog, sizes: list[int]) -> None:
    for i, size in enumerate(sizes, start=1):
        log.append(Entry(i, 2, b"x" * size))


def test_everything_after_the_cursor_in_order():
    log = ReplayLog(1000)
    fill(log, [10] * 5)
    gap, entries = log.after(2)
    assert gap is None
    assert [e.seq for e in entries] == [3, 4, 5]
    assert list(log.after(5)[1]) == []


def test_oldest_frames_go_first_and_the_gap_says_which():
    log = ReplayLog(25)
    fill(log, [10] * 5)
    assert log.first_seq == 4 and log.bytes == 20
    gap, entries = log.after(1)
    assert gap == Gap(2, 3) and gap.missed == 2
    assert [e.seq for e in entries] == [4, 5]


def test_the_newest_frame_is_kept_even_when_over_budget():
    log = ReplayLog(5)
    fill(log, [10, 10])
    assert [e.seq for e in log.after(0)[1]] == [2]


def test_a_cursor_from_the_future_gets_nothing():
    log = ReplayLog(100)
    fill(log, [1, 1])
    gap, entries = log.after(99)
    assert gap is None and list(entries) == []


@given(
    sizes=st.lists(st.integers(0, 50), min_size=1, max_size=60),
    budget=st.integers(1, 400),
    cursor=st.integers(0, 70),
)
def test_gap_plus_entries_account_for_every_frame_after_the_cursor(sizes, budget, cursor):
    log = ReplayLog(budget)
    fill(log, sizes)
    assert log.bytes <= max(budget, sizes[-1])
    gap, entries = log.after(cursor)
    seqs = [e.seq for e in entries]
    missed = list(range(gap.first, gap.last + 1)) if gap else []
    assert missed + seqs == list(range(cursor + 1, len(sizes) + 1))


def _catch_up_seconds(log: ReplayLog, behind: int) -> float:
    """Best of five: 200 catch-ups of a client C{behind} frames behind."""
    best = float("inf")
    for _ in range(5):
        began = time.perf_counter()
        for _ in range(200):
            list(log.after(log.last_seq - behind)[1])
        best = min(best, time.perf_counter() - began)
    return best


def test_a_client_a_few_frames_behind_costs_those_frames_not_the_log():
    """Catching up costs what is missing, not the log's length: a deque
    walked from its left paid the whole log (up to replay_bytes of
    one-line frames, tens of thousands) on every resume of every client,
    which a thousand observers of a printing kernel do all the time."""
    short, long = ReplayLog(10**9), ReplayLog(10**9)
    fill(short, [1] * 1_000)
    fill(long, [1] * 200_000)
    assert _catch_up_seconds(long, 3) < 10 * _catch_up_seconds(short, 3)
