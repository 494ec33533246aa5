"""The pump's pacing under a flood (cellmux.kernel.pump.FloodPace)."""

from __future__ import annotations

from cellmux.kernel.pump import FLOOD_MESSAGES, FLOOD_PAUSE, FLOOD_WINDOW, FloodPace


class _Time:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_a_lone_message_and_a_short_burst_are_never_held():
    t = _Time()
    pace = FloodPace(lambda: t.now, t.sleep)
    for _ in range(50):  # a message a second (a cell's reply, a status)
        pace.after_pass(1)
        t.now += 1.0
    for _ in range(FLOOD_MESSAGES - 1):  # a burst just short of a flood
        pace.after_pass(1)
        t.now += FLOOD_WINDOW / (2 * FLOOD_MESSAGES)
    pace.after_pass(0)  # passes that read nothing (the link) count for nothing
    assert t.slept == []


def test_a_flood_is_paced_after_each_pass_until_it_stops():
    t = _Time()
    pace = FloodPace(lambda: t.now, t.sleep)
    for _ in range(FLOOD_MESSAGES):
        pace.after_pass(1)
        t.now += 1e-5
    assert t.slept == [FLOOD_PAUSE]
    pace.after_pass(20)
    assert t.slept == [FLOOD_PAUSE] * 2
    t.now += 2 * FLOOD_WINDOW  # the flood ended: a new window
    pace.after_pass(1)
    assert len(t.slept) == 2
