"""The kernel manager's tick looks only at what is due (server/liveness.py):
pings and culling decided as a look at every kernel on every tick would
decide them, with a thousand idle kernels costing a tick next to nothing.
A fake nursery on a Clock; hypothesis compares random runs against that
look-at-everything rule."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cellmux.protocol import Channel
from cellmux.server.kernels import TICK, KernelState
from cellmux.server.lifecycle import Said
from cellmux.server.liveness import DueQueue, WatchSet
from test_lifecycle_units import FakeClient, Harness

# -- the two structures --------------------------------------------------------


@given(
    st.lists(st.tuples(st.integers(0, 20), st.integers(0, 1000)), max_size=40),
    st.integers(0, 25),
)
def test_a_due_queue_yields_exactly_what_is_due_earliest_first(entries, now):
    queue: DueQueue[int] = DueQueue()
    for due, item in entries:
        queue.push(due, item)
    popped = list(queue.pop_due(now))
    # earliest first; equal times in the order pushed
    expected = sorted(((d, i) for d, i in entries if d <= now), key=lambda e: e[0])
    assert popped == expected
    assert len(queue) == len(entries) - len(popped)
    rest = queue.next_due()
    assert rest is None or rest > now


def test_a_watch_set_keeps_order_and_each_item_once():
    watch: WatchSet[str] = WatchSet()
    for item in ["b", "a", "b", "c"]:
        watch.add(item)
    watch.discard("a")
    watch.discard("zz")
    assert watch.snapshot() == ["b", "c"]
    assert "b" in watch and "a" not in watch and len(watch) == 2


# -- a thousand idle kernels ---------------------------------------------------------


def _count_looks(h: Harness) -> list[int]:
    """How often the tick asks a process for its ping interval (one look)."""
    looks = [0]
    real = h.manager._ping_interval

    def counted(inc):
        looks[0] += 1
        return real(inc)

    h.manager._ping_interval = counted
    return looks


def test_a_tick_with_a_thousand_idle_kernels_looks_only_at_the_due_ones():
    h = Harness(idle_ping_interval=10.0, idle_timeout=3600.0, max_kernels=1000)
    kernels = [h.create() for _ in range(1000)]
    h.clock.advance(TICK)  # every new process is pinged once, at once
    pings = [op for _, op, _ in h.router.controls if op == "ping"]
    assert len(pings) == 1000
    looks = _count_looks(h)
    culls = [0]
    real_schedule = h.manager._schedule_cull

    def counted_schedule(kernel, now):
        culls[0] += 1
        real_schedule(kernel, now)

    h.manager._schedule_cull = counted_schedule
    h.clock.advance(TICK)  # the answered ones leave the watch: one look each
    assert looks[0] == 1000
    looks[0] = 0
    for _ in range(17):  # 8.5 s: nothing is due
        h.clock.advance(TICK)
    assert looks[0] == 0, "was 1000 looks a tick (17,000 here)"
    assert culls[0] == 0, "no kernel may be culled for an hour: none looked at"
    for _ in range(3):  # their ping is due 10 s after the last: all again
        h.clock.advance(TICK)
    pings = [op for _, op, _ in h.router.controls if op == "ping"]
    assert len(pings) == 2000
    # one that goes busy is looked at (and pinged) on every tick, alone
    looks[0] = 0
    kernels[7].handle(Said(busy=True))
    for _ in range(4):
        h.clock.advance(TICK)
    assert looks[0] <= 4 + 1000  # the 1000 answered pings leave on the first of these
    before = len(h.router.controls)
    looks[0] = 0
    for _ in range(4):
        h.clock.advance(TICK)
    assert looks[0] == 4
    assert len(h.router.controls) == before + 4


# -- the same decisions as looking at everything ---------------------------------------

ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(
            ["tick"] * 8 + ["busy", "idle", "execute", "attach", "detach", "mute", "answer"]
        ),
        st.integers(0, 3),
    ),
    max_size=150,
)


def _expected_pings(h: Harness, now: float) -> set[bytes]:
    """What the tick used to ping: every ready process whose ping was due."""
    manager = h.manager
    due = set()
    for inc in manager._incarnations.values():
        if not inc.ready.called or inc.ping is not None:
            continue
        if inc.last_ping is None or now - inc.last_ping >= manager._ping_interval(inc):
            due.add(inc.link_id)
    return due


def _expected_silent(h: Harness, now: float) -> set[str]:
    config = h.config
    return {
        k.id
        for k in h.manager.kernels.values()
        if k.incarnation is not None
        and k.incarnation.ping is not None
        and now - k.incarnation.ping[1] > config.unresponsive_after
        and k.state in (KernelState.IDLE, KernelState.BUSY)
    }


def _expected_culls(h: Harness, now: float, silent: set[str]) -> set[str]:
    """What the tick used to cull: the rule, applied to every kernel (after
    the same tick's pings: a kernel that fell silent in it is not idle)."""
    config = h.config
    return {
        k.id
        for k in h.manager.kernels.values()
        if (config.max_lifetime and now - k.created > config.max_lifetime)
        or (
            not k.clients
            and k.id not in silent
            and k.state in (KernelState.IDLE, KernelState.DEAD)
            and now - k.last_activity > config.idle_timeout
        )
    }


@settings(max_examples=150, deadline=None)
@given(ACTIONS, st.sampled_from([0.0, 7.0]))
def test_pings_silences_and_culls_are_what_looking_at_everything_gives(actions, lifetime):
    h = Harness(
        idle_ping_interval=2.0, unresponsive_after=1.0, idle_timeout=3.0, max_lifetime=lifetime
    )
    kernels = [h.create() for _ in range(4)]
    clients = [FakeClient(session=f"s{i}") for i in range(4)]
    kernels[0].attach(clients[0])
    kernels[1].attach(clients[1])
    for action, i in actions:
        kernel = kernels[i]
        alive = kernel.id in h.manager.kernels and kernel.incarnation is not None
        if action == "tick":
            now = h.clock.seconds() + TICK
            pings, silent = _expected_pings(h, now), _expected_silent(h, now)
            culls = _expected_culls(h, now, silent)
            sent = len(h.router.controls)
            before = set(h.manager.kernels)
            h.clock.advance(TICK)
            pinged = {lid for lid, op, _ in h.router.controls[sent:] if op == "ping"}
            assert pinged == pings
            for k in kernels:
                if k.id in silent and k.id not in culls:
                    assert k.state is KernelState.UNRESPONSIVE
            assert before - set(h.manager.kernels) == culls
        elif not alive or kernel.state not in (KernelState.IDLE, KernelState.BUSY):
            continue
        elif action in ("busy", "idle"):
            state = b'"busy"' if action == "busy" else b'"idle"'
            h.manager.kernel_message(
                kernel.incarnation.link_id,
                Channel.STATUS,
                0,
                [b"{}", b"{}", b"{}", b'{"execution_state": ' + state + b"}"],
            )
        elif action == "execute":
            h.manager.send_to_process(kernel.incarnation, Channel.EXECUTE, 1, [b"{}"] * 4)
        elif action == "attach":
            kernel.attach(clients[i])
        elif action == "detach":
            kernel.detach(clients[i])
        elif action == "mute":
            h.router.pongs_to = None  # pings go unanswered from now on
        elif action == "answer":
            h.router.pongs_to = h.manager
            inc = kernel.incarnation
            if inc.ping is not None:
                h.manager.link_pong(inc.link_id, inc.ping[0])


def _status(h: Harness, kernel, state: bytes) -> None:
    h.manager.kernel_message(
        kernel.incarnation.link_id,
        Channel.STATUS,
        0,
        [b"{}", b"{}", b"{}", b'{"execution_state": ' + state + b"}"],
    )


def test_a_client_leaving_just_after_a_cull_check_starts_the_full_idle_timeout():
    h = Harness(idle_timeout=10.0)
    kernel = h.create()
    client = FakeClient()
    kernel.attach(client)
    h.clock.advance(10.25)  # looked at on the tick at 10: attached
    kernel.detach(client)
    h.clock.advance(9.75)  # 20.0: 9.75 s idle
    assert kernel.id in h.manager.kernels
    h.clock.advance(0.5)  # 20.5: over 10 s
    assert kernel.id not in h.manager.kernels


def test_a_kernel_busy_with_nobody_attached_is_culled_on_the_tick_after_it_went_idle():
    # Its idle clock ran while it was busy (output to nobody is not activity).
    h = Harness(idle_timeout=10.0)
    kernel = h.create()
    h.clock.advance(0.1)
    _status(h, kernel, b'"busy"')
    h.clock.advance(50)
    assert kernel.id in h.manager.kernels
    _status(h, kernel, b'"idle"')
    h.clock.advance(0.5)
    assert kernel.id not in h.manager.kernels
