"""The warm pool follows demand (cellmux.server.pooldemand), on a fake clock."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer

from cellmux.server.pooldemand import PoolDemand
from test_lifecycle_units import Harness

# -- the sans-IO rule --------------------------------------------------------------


@given(
    base=st.integers(0, 8),
    cap=st.integers(0, 64),
    creates=st.lists(st.floats(0, 100), max_size=300),
    refill=st.floats(0.001, 5.0),
)
def test_wanted_stays_between_the_base_and_the_cap(base, cap, creates, refill):
    demand = PoolDemand(base, cap, refill=refill)
    for t in sorted(creates):
        demand.took(t)
        assert base <= demand.wanted(t) <= max(base, cap)


@given(st.integers(1, 50), st.integers(1, 50))
def test_more_demand_never_wants_fewer_kernels(low, high):
    low, high = sorted((low, high))
    calm, busy = PoolDemand(2, 64, refill=0.2), PoolDemand(2, 64, refill=0.2)
    for i in range(low):
        calm.took(i * 10 / low)
    for i in range(high):
        busy.took(i * 10 / high)
    assert calm.wanted(10) <= busy.wanted(10)


def test_five_creates_a_second_keep_about_twice_a_refill_worth_extra():
    demand = PoolDemand(2, 16, refill=0.15)
    for i in range(50):
        demand.took(i * 0.2)
    assert demand.rate(9.9) == 5.0
    assert demand.wanted(9.9) == 2 + 2  # 2 * 5/s * 0.15 s, rounded


def test_a_create_now_and_then_is_no_demand_to_grow_for():
    demand = PoolDemand(1, 16, refill=5.0)  # even with very slow starts
    demand.took(0)
    demand.took(4)
    assert demand.wanted(5) == 1
    demand.took(5)
    assert demand.wanted(5) > 1


def test_the_pool_may_shrink_only_after_demand_has_gone_for_idle_after():
    demand = PoolDemand(2, 16, idle_after=60)
    assert demand.may_shrink(0)
    demand.took(5)
    assert not demand.may_shrink(64.9)
    assert demand.may_shrink(65)


def test_start_times_move_the_refill_estimate():
    demand = PoolDemand(2, 16, refill=0.1)
    for _ in range(20):
        demand.started(0.5)
    assert 0.45 < demand.refill <= 0.5
    demand.started(-1)  # a clock that went back is ignored
    assert demand.refill > 0.45


# -- the manager, with kernels that take 400 ms to start ---------------------------

#: Fork to ready on a busy 2-core machine (62 ms when idle; each start costs
#: ~100 ms of CPU, and five a second compete with the kernels' own cells).
START = 0.4


def steady_creates(h: Harness, per_second: float, seconds: float) -> list[bool]:
    """Create at a steady rate; return, per create, whether it found a ready kernel."""
    spawned_at: dict[str, float] = {}
    original = h.nursery.spawn

    def spawn(link, secret, endpoint, **kw):
        spawned_at[link] = h.clock.seconds()
        return original(link, secret, endpoint)

    h.nursery.spawn = spawn
    found: list[bool] = []
    step = 0.01
    next_create = 0.0
    while h.clock.seconds() < seconds:
        now = h.clock.seconds()
        for link, d in list(h.nursery.spawned.items()):
            if not d.called and now - spawned_at.get(link, now) >= START:
                d.callback(1000)
                h.manager.link_ready(bytes.fromhex(link), 1000)
        if now >= next_create:
            found.append(h.manager.pooled > 0)
            defer.ensureDeferred(h.manager.create())
            next_create += 1 / per_second
        h.clock.advance(step)
    return found


def test_under_five_creates_a_second_nine_in_ten_find_a_ready_kernel():
    h = Harness(pool_size=2, pool_max=16, pool_refill_delay=0.25)
    h.clock.advance(1)
    h.make_ready()
    found = steady_creates(h, 5, 20)
    assert sum(found) / len(found) >= 0.9, found


def test_a_fixed_pool_of_two_does_not_keep_up():
    # The same load without growth: this is what the demand rule is for.
    h = Harness(pool_size=2, pool_max=0, pool_refill_delay=0.25)
    h.clock.advance(1)
    h.make_ready()
    found = steady_creates(h, 5, 20)
    assert sum(found) / len(found) < 0.9, found


def test_the_pool_shrinks_back_once_demand_has_gone():
    h = Harness(pool_size=2, pool_max=16, pool_idle_shrink=60)
    h.clock.advance(1)
    h.make_ready()
    steady_creates(h, 5, 10)
    h.make_ready()
    grown = h.manager.pooled
    assert grown > 2
    h.clock.advance(30)
    assert h.manager.pooled == grown, "not while creates were recent"
    for _ in range(80):
        h.clock.advance(0.5)
    assert h.manager.pooled == 2
    assert len(h.nursery.killed) == grown - 2
