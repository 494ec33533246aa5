"""The reactor's busy time between polls (server/stalls.py): the histogram
every server keeps, and the stall log CELLMUX_STALL_LOG turns on, on a real
epoll reactor, and on a real server's /metrics."""

from __future__ import annotations

import time

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import epollreactor
from twisted.logger import globalLogPublisher

from cellmux.server.stalls import BUSY_BUCKETS, IterationClock, ReactorStalls
from conftest import start_server, wait_for
from test_metrics import fetch

# -- the clock, sans I/O ---------------------------------------------------------


@given(st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 1000)), max_size=30))
def test_every_iteration_is_counted_once_and_only_those_over_the_threshold_stall(spans):
    # whole milliseconds as binary fractions of a second: exact arithmetic
    clock = IterationClock(threshold=50 / 1024)
    now, stalls = 0, []
    for idle, busy in spans:
        now += idle
        clock.woke(now / 1024, now / 2048, now / 4096)
        now += busy
        stall = clock.sleeps(now / 1024, now / 2048, now / 4096)
        if stall is not None:
            stalls.append(stall)
    assert clock.busy.count == sum(clock.busy.counts) == len(spans)
    assert [s.wall for s in stalls] == [busy / 1024 for _, busy in spans if busy > 50]
    assert [s.cpu for s in stalls] == [busy / 2048 for _, busy in spans if busy > 50]
    assert clock.longest == max((busy / 1024 for _, busy in spans), default=0.0)


def test_without_a_threshold_only_the_histogram_is_kept():
    clock = IterationClock()
    clock.woke(0.0, 0.0)
    clock.collected(2, 0.03)  # not kept: nothing would report it
    clock.sampled("stack")
    assert clock.sleeps(0.2, 0.0) is None
    assert clock.busy.counts[BUSY_BUCKETS.index(0.25)] == 1
    clock.woke(1.0, 0.0)
    assert clock.sleeps(1.001, 0.0) is None


def test_a_stall_says_what_ran_in_it():
    clock = IterationClock(threshold=0.01)
    clock.woke(10.0, 1.0, 0.5)
    clock.collected(2, 0.012)
    for stack in ["a", "b", "a", "a", "c", "d", "e"]:
        clock.sampled(stack)
    stall = clock.sleeps(10.030, 1.010, 0.518)
    assert stall is not None
    assert round(stall.wall, 6) == 0.03 and round(stall.cpu, 6) == 0.01
    assert round(stall.queued, 6) == 0.018
    assert stall.gc == ((2, 0.012),)
    assert stall.stacks[0] == (3, "a") and len(stall.stacks) == 4
    # the next iteration starts clean
    clock.woke(11.0, 2.0, 1.0)
    stall = clock.sleeps(11.02, 2.0, 1.0)
    assert stall is not None and stall.gc == () and stall.stacks == ()


# -- on a real reactor -------------------------------------------------------------


def test_a_busy_callback_on_a_real_epoll_reactor_is_logged_with_its_stack():
    reactor = epollreactor.EPollReactor()
    stalls = ReactorStalls(reactor, threshold=0.02)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert stalls.install()

        def hog_the_reactor() -> None:
            # long enough for the 2 ms sampler to get the GIL on a loaded machine
            end = time.perf_counter() + 0.3
            while time.perf_counter() < end:
                pass

        reactor.callLater(0.01, hog_the_reactor)
        reactor.callLater(0.5, reactor.stop)
        reactor.run(installSignalHandlers=False)
    finally:
        stalls.uninstall()
        globalLogPublisher.removeObserver(events.append)
    assert not isinstance(reactor._poller, type(stalls)) and stalls.installed is False
    logged = [e for e in events if "reactor stall:" in e.get("log_format", "")]
    # a loaded machine may stall other iterations too: the hog's is the one
    # whose sampled stacks name it
    hogs = [e for e in logged if "hog_the_reactor" in e["stacks"]]
    assert len(hogs) == 1, logged
    event = hogs[0]
    assert 300 <= event["wall"] < 5000
    # it ran (a hog), or waited for a core on a loaded machine: never slept
    assert event["cpu"] > 1 and event["queued"] >= 0
    assert stalls.clock.longest >= 0.3
    assert stalls.clock.busy.count >= 2


def test_a_server_reports_its_busy_times_in_metrics_and_logs_stalls_when_asked():
    server = start_server("--pool-size", "1", env={"CELLMUX_STALL_LOG": "0"})
    try:
        status, _, body = fetch(server, "/metrics", server.token)
        assert status == 200
        samples = {}
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                samples[sample.name, sample.labels.get("le")] = sample.value
        buckets = [le for name, le in samples if name == "cellmux_reactor_busy_seconds_bucket"]
        assert buckets == [*map(repr, BUSY_BUCKETS), "+Inf"]
        assert samples["cellmux_reactor_busy_seconds_count", None] > 0
        # threshold 0: every iteration is logged, with the reactor thread's
        # CPU and run-queue wait
        wait_for(lambda: "waiting for a core" in server.log(), 30)
    finally:
        server.stop()
