"""The kernel lifecycle with a fake clock: the transition table, restarts,
culling, liveness, start time-outs, nursery loss, back-off and credit.

The nursery and the link router are fakes here (they are the I/O the
manager drives); the end-to-end tests in tests/chaos/ use real ones.
"""

from __future__ import annotations

import itertools
import json
from http import HTTPStatus

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, task
from twisted.logger import LogLevel, globalLogPublisher

from cellmux.config import ServerConfig
from cellmux.protocol import Channel, decode_frame
from cellmux.server import kernels as kernels_module
from cellmux.server.kernels import (
    KernelError,
    KernelLost,
    KernelManager,
    KernelNotFound,
    KernelNotRunning,
    KernelStartFailed,
    KernelState,
    NurseryUnavailable,
    OutOfDescriptors,
    TooManyKernels,
    credit_window,
)
from cellmux.server.lifecycle import (
    RUNNING,
    Answered,
    Backoff,
    Bound,
    Ended,
    Exited,
    IllegalTransition,
    Lifecycle,
    RestartBegun,
    RestartFailed,
    Said,
    Silent,
)
from cellmux.server.webjson import status_for

MiB = 1024 * 1024

# -- fakes ---------------------------------------------------------------------


class FakeTransport:
    pid = 4242

    def __init__(self, nursery: FakeNursery) -> None:
        self._nursery = nursery

    def signalProcess(self, name: str) -> None:
        self._nursery.signals.append(name)


class FakeNursery:
    """Spawns nothing: the test fires C{spawned[link]} and link_ready."""

    def __init__(self) -> None:
        self.running = True
        self.spawned: dict[str, defer.Deferred] = {}
        self.killed: list[str] = []
        self.signals: list[str] = []
        self.ready: defer.Deferred = defer.Deferred()
        self.transport = FakeTransport(self)

    def spawn(self, link: str, secret: str, endpoint: str) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.spawned[link] = d
        return d

    def kill(self, link: str) -> None:
        self.killed.append(link)

    def signal(self, link: str, name: str) -> None:
        self.signals.append(name)


class FakeRouter:
    def __init__(self) -> None:
        self.controls: list[tuple[bytes, str, dict]] = []
        self.sent: list[tuple[bytes, list]] = []
        #: Who answers pings at once (None: nobody, the kernel holds the GIL).
        self.pongs_to: KernelManager | None = None

    def expect(self, link_id: bytes, secret: bytes) -> str:
        return f"ipc:///nonexistent/links/{link_id.hex()}/link.sock"

    def forget(self, link_id: bytes) -> None:
        pass

    def send_to_kernel(self, link_id: bytes, parts: list) -> None:
        self.sent.append((link_id, parts))

    def send_control(self, link_id: bytes, op: str, **fields) -> None:
        self.controls.append((link_id, op, fields))
        if op == "ping" and self.pongs_to is not None:
            self.pongs_to.link_pong(link_id, fields["n"])

    def credits(self, link_id: bytes) -> list[int]:
        return [f["bytes"] for lid, op, f in self.controls if lid == link_id and op == "credit"]


@attrs.define(eq=False)
class FakeClient:
    session: str = "s1"
    frames: list = attrs.Factory(list)
    gone: list = attrs.Factory(list)

    def wants(self, channel: int) -> bool:
        return True

    def send_frame(self, data: bytes) -> None:
        self.frames.append(decode_frame(data))

    def kernel_gone(self, reason: str) -> None:
        self.gone.append(reason)

    def statuses(self) -> list[dict]:
        return [json.loads(f.parts[3]) for f in self.frames if f.channel == Channel.STATUS]


class Harness:
    """A manager on a fake clock with a fake nursery that it can replace."""

    def __init__(self, **config) -> None:
        self.clock = task.Clock()
        self.config = ServerConfig(**{"pool_size": 0, **config})
        self.manager = KernelManager(self.clock, self.config)
        self.manager.workdir_root = "/nonexistent/kernels"
        self.removed: list[str] = []
        self.manager.remove_leftovers = self.removed.extend
        self.router = FakeRouter()
        self.router.pongs_to = self.manager
        self.nurseries = [FakeNursery()]
        self.nursery_starts = 0
        self.manager.bind(self.nurseries[0], self.router, self._start_nursery)
        self.manager.start()

    def _start_nursery(self) -> FakeNursery:
        self.nursery_starts += 1
        nursery = FakeNursery()
        self.nurseries.append(nursery)
        return nursery

    @property
    def nursery(self) -> FakeNursery:
        return self.manager.nursery

    def make_ready(self) -> None:
        """Fork and ready every process the manager waits for."""
        for link, d in list(self.nursery.spawned.items()):
            if not d.called:
                d.callback(1000)
                self.manager.link_ready(bytes.fromhex(link), 1000)

    def create(self):
        d = defer.ensureDeferred(self.manager.create())
        self.make_ready()
        return self.successResult(d)

    def restart(self, kernel):
        d = defer.ensureDeferred(self.manager.restart(kernel))
        self.make_ready()
        return self.successResult(d)

    @staticmethod
    def successResult(d: defer.Deferred):
        results: list = []
        d.addBoth(results.append)
        assert results, "the Deferred has not fired"
        if isinstance(results[0], Exception) or hasattr(results[0], "raiseException"):
            results[0].raiseException()
        return results[0]

    def exit(self, kernel, cause: str = "exit code 1", **info) -> None:
        self.manager.kernel_exited(kernel.incarnation.link, 1000, {"cause": cause, **info})

    def lose_nursery(self, reason: str = "killed by SIGKILL") -> None:
        self.nursery.running = False
        self.manager.nursery_lost(reason)


@pytest.fixture
def logged():
    """Log events the kernel manager emits at warning level or above."""
    events: list[dict] = []

    def observer(event: dict) -> None:
        if event.get("log_level", LogLevel.info) >= LogLevel.warn and "KernelManager" in str(
            event.get("log_namespace")
        ):
            events.append(event)

    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


# -- the transition table ----------------------------------------------------------

events = st.one_of(
    st.just(Bound()),
    st.builds(Said, st.booleans()),
    st.just(Silent()),
    st.just(Answered()),
    st.just(RestartBegun()),
    st.builds(Exited, st.sampled_from(["exit code 1", "nursery lost"]), st.none(), st.booleans()),
    st.builds(RestartFailed, st.just("restart failed: no")),
    st.builds(Ended, st.just("shut down")),
)


@given(st.lists(events, max_size=40))
def test_random_event_sequences_keep_the_lifecycle_consistent(sequence):
    life = Lifecycle()
    for event in sequence:
        before = attrs.evolve(life)
        if not life.accepts(event):
            with pytest.raises(IllegalTransition):
                life.handle(event)
            assert life == before, "a refused event changed nothing"
            continue
        t = life.handle(event)
        assert t.before is before.state and t.after is life.state
        # a cause exactly when there is no process and no restart under way
        assert (life.cause is not None) == (life.state in (KernelState.DEAD, KernelState.ENDED))
        assert before.state is not KernelState.ENDED, "ended is final"
        if t.publish is not None:
            published = t.publish["execution_state"]
            expected = "dead" if life.state is KernelState.ENDED else life.state.value
            assert published == expected
            if published == "dead":
                assert t.publish["cause"] == life.cause
            assert t.publish.get("auto_restart", False) == (
                isinstance(event, Exited) and event.auto_restart
            )
        # what clients see always changes when the server changes the state
        # (the kernel's own busy/idle messages are relayed, not republished)
        if t.before is not t.after and not isinstance(event, Said):
            assert t.publish is not None or (t.before is KernelState.STARTING)


def test_the_rich_states_clients_see_for_a_death_and_automatic_restart():
    life = Lifecycle()
    assert life.handle(Bound()).publish is None  # a new kernel has no clients yet
    dead = life.handle(Exited("memory limit (SIGKILL)", "memory", auto_restart=True)).publish
    assert dead == {
        "execution_state": "dead",
        "cause": "memory limit (SIGKILL)",
        "limit": "memory",
        "auto_restart": True,
    }
    assert life.handle(RestartBegun()).publish == {"execution_state": "restarting"}
    assert life.handle(Bound()).publish == {"execution_state": "idle", "restarted": True}
    assert life.cause is None and life.limit is None


def test_unresponsive_returns_to_where_it_was():
    life = Lifecycle()
    life.handle(Bound())
    life.handle(Said(busy=True))
    assert life.handle(Silent()).publish == {"execution_state": "unresponsive"}
    assert life.handle(Answered()).publish == {"execution_state": "busy", "responsive": True}
    assert life.state is KernelState.BUSY


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (KernelState.ENDED, RestartBegun()),
        (KernelState.ENDED, Ended("again")),
        (KernelState.RESTARTING, RestartBegun()),
        (KernelState.DEAD, Exited("twice")),
        (KernelState.DEAD, Said(busy=True)),
        (KernelState.STARTING, Silent()),
        (KernelState.IDLE, RestartFailed("no")),
    ],
)
def test_illegal_transitions_raise_a_clear_error(state, event):
    life = Lifecycle(state=state, cause="x" if state not in RUNNING else None)
    with pytest.raises(IllegalTransition, match=f"a {state.value} kernel cannot take"):
        life.handle(event)
    assert life.state is state


def test_backoff_doubles_to_its_cap_and_resets_after_a_stable_run():
    backoff = Backoff(first=0.5, cap=30.0, stable_after=30.0)
    assert [backoff.failed() for _ in range(9)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert backoff.failed(ran_for=31.0) == 0.5
    assert backoff.failed(ran_for=1.0) == 1.0
    backoff.succeeded()
    assert backoff.failed() == 0.5
    for _ in range(5000):  # no overflow, however long it fails
        backoff.failed()
    assert backoff.failed() == 30.0


# -- errors and their HTTP status -----------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (KernelNotFound("x"), HTTPStatus.NOT_FOUND),
        (KernelLost("x"), HTTPStatus.NOT_FOUND),
        (KernelNotRunning("x"), HTTPStatus.CONFLICT),
        (TooManyKernels("x"), HTTPStatus.SERVICE_UNAVAILABLE),
        (OutOfDescriptors("x"), HTTPStatus.SERVICE_UNAVAILABLE),
        (NurseryUnavailable("x"), HTTPStatus.SERVICE_UNAVAILABLE),
        (KernelStartFailed("x"), HTTPStatus.INTERNAL_SERVER_ERROR),
    ],
)
def test_each_kernel_error_carries_its_status(error, status):
    assert status_for(error) == (status, "x")


def test_every_kernel_error_has_a_status_and_a_code():
    for cls in [getattr(kernels_module, name) for name in kernels_module.__all__]:
        if isinstance(cls, type) and issubclass(cls, KernelError):
            assert isinstance(cls.status, HTTPStatus) and cls.code


# -- restart, death, automatic restart ----------------------------------------------------


def test_restart_publishes_restarting_then_idle_and_kills_the_old_process():
    h = Harness()
    kernel = h.create()
    client = FakeClient()
    kernel.attach(client)
    old = kernel.incarnation.link
    h.restart(kernel)
    assert client.statuses() == [
        {"execution_state": "restarting"},
        {"execution_state": "idle", "restarted": True},
    ]
    assert old in h.nursery.killed
    assert kernel.state is KernelState.IDLE and kernel.incarnation.link != old


def test_a_restart_that_cannot_get_a_process_leaves_the_kernel_dead_with_the_reason():
    h = Harness(kernel_start_timeout=5.0)
    kernel = h.create()
    client = FakeClient()
    kernel.attach(client)
    d = defer.ensureDeferred(h.manager.restart(kernel))
    h.clock.advance(5.001)  # the new process never becomes ready
    with pytest.raises(KernelStartFailed):
        h.successResult(d)
    assert kernel.state is KernelState.DEAD
    assert client.statuses()[-1] == {
        "execution_state": "dead",
        "cause": "restart failed: the kernel did not start in time",
    }
    h.restart(kernel)  # a dead kernel can be restarted
    assert kernel.state is KernelState.IDLE


def test_death_then_automatic_restart_within_the_budget():
    h = Harness(auto_restart=True)
    kernel = h.create()
    client = FakeClient()
    kernel.attach(client)
    for _ in range(3):
        h.exit(kernel)
        h.make_ready()
        assert kernel.state is KernelState.IDLE
    assert client.statuses()[:3] == [
        {"execution_state": "dead", "cause": "exit code 1", "auto_restart": True},
        {"execution_state": "restarting"},
        {"execution_state": "idle", "restarted": True},
    ]
    # the fourth death within a minute is a crash loop: no restart
    h.exit(kernel, "exit code 2")
    assert kernel.state is KernelState.DEAD
    assert client.statuses()[-1] == {"execution_state": "dead", "cause": "exit code 2"}
    h.clock.advance(61)
    h.restart(kernel)  # by hand it still works
    assert kernel.state is KernelState.IDLE


def test_delete_while_restarting_ends_the_kernel_once():
    h = Harness()
    kernel = h.create()
    client = FakeClient()
    kernel.attach(client)
    d = defer.ensureDeferred(h.manager.restart(kernel))
    h.manager.delete(kernel)
    h.manager.delete(kernel)  # twice is harmless
    h.make_ready()
    with pytest.raises(KernelNotFound):
        h.successResult(d)
    assert client.gone == ["shut down"]
    assert kernel.state is KernelState.ENDED
    assert kernel.model()["execution_state"] == "dead"


# -- liveness -------------------------------------------------------------------------


def test_a_kernel_that_misses_pongs_is_unresponsive_until_it_answers():
    h = Harness(unresponsive_after=2.0)
    h.router.pongs_to = None
    kernel = h.create()
    client = FakeClient()
    kernel.attach(client)
    link = kernel.incarnation.link_id
    h.clock.advance(0.5)  # first tick: a ping goes out
    pings = [f["n"] for lid, op, f in h.router.controls if op == "ping" and lid == link]
    assert pings == [1]
    h.clock.advance(2.0)
    assert kernel.state is KernelState.IDLE, "not yet: 2.0 s is the limit"
    h.clock.advance(0.5)
    assert kernel.state is KernelState.UNRESPONSIVE
    h.clock.advance(5.0)  # still silent: said once, not every tick
    assert client.statuses() == [{"execution_state": "unresponsive"}]
    h.manager.link_pong(link, 1)
    assert kernel.state is KernelState.IDLE
    assert client.statuses()[-1] == {"execution_state": "idle", "responsive": True}


def test_idle_kernels_are_pinged_seldom_and_busy_ones_every_tick():
    h = Harness(idle_ping_interval=10.0)
    kernel = h.create()
    link = kernel.incarnation.link_id

    def pings() -> int:
        return sum(1 for lid, op, _ in h.router.controls if op == "ping" and lid == link)

    h.clock.advance(0.5)
    assert pings() == 1, "a new kernel is pinged once at once"
    for _ in range(19):
        h.clock.advance(0.5)
    assert pings() == 1, "idle: no ping for 10 s"
    h.clock.advance(0.5)
    assert pings() == 2
    kernel.handle(Said(busy=True))
    for _ in range(4):
        h.clock.advance(0.5)
    assert pings() == 6, "busy: a ping every tick"
    kernel.handle(Said(busy=False))
    for _ in range(4):
        h.clock.advance(0.5)
    assert pings() == 6, "idle again: back to the slow cadence"


def test_a_cell_whose_busy_never_left_the_kernel_is_still_watched_every_tick():
    # C code took the GIL before ipykernel's IOPub thread sent "busy": the
    # server only knows that it sent a cell.
    h = Harness(idle_ping_interval=10.0, unresponsive_after=2.0)
    kernel = h.create()
    h.clock.advance(0.5)  # the first ping, answered
    h.router.pongs_to = None
    h.manager.send_to_process(kernel.incarnation, Channel.EXECUTE, 1, [b"{}"] * 4)
    for _ in range(6):
        h.clock.advance(0.5)
    assert kernel.state is KernelState.UNRESPONSIVE
    # its idle ends the watch: back to the slow cadence
    h.router.pongs_to = h.manager
    h.manager.link_pong(kernel.incarnation.link_id, kernel.incarnation.pings_sent)
    kernel._note_status(b'{"execution_state":"idle"}')
    sent = len(h.router.controls)
    for _ in range(4):
        h.clock.advance(0.5)
    assert len(h.router.controls) == sent


def test_an_idle_kernel_that_stops_answering_is_unresponsive_within_the_idle_interval():
    h = Harness(idle_ping_interval=10.0, unresponsive_after=2.0)
    kernel = h.create()
    h.clock.advance(0.5)  # answered at once
    h.router.pongs_to = None  # from now on a thread of its own holds the GIL
    for _ in range(20):
        h.clock.advance(0.5)
    assert kernel.state is KernelState.IDLE, "the next ping is only just out"
    for _ in range(5):
        h.clock.advance(0.5)
    assert kernel.state is KernelState.UNRESPONSIVE


# -- start time-outs ----------------------------------------------------------------


def test_a_pool_kernel_that_does_not_start_in_time_is_killed_and_retried_later(logged):
    h = Harness(pool_size=1, kernel_start_timeout=3.0)
    h.clock.advance(0)
    (link,) = h.nursery.spawned
    h.nursery.spawned[link].callback(1000)  # forked, never ready
    h.clock.advance(3.001)
    assert h.nursery.killed == [link]
    assert h.manager.pooled == 0
    assert len(h.nursery.spawned) == 1, "no new fork before the back-off"
    h.clock.advance(0.5)
    assert len(h.nursery.spawned) == 2
    h.make_ready()
    assert h.manager.pooled == 1
    assert [e["log_format"] for e in logged].count(
        "kernel {link} did not start in time; killing it"
    ) == 1


def test_create_with_an_empty_pool_fails_after_the_start_timeout():
    h = Harness(kernel_start_timeout=2.0)
    d = defer.ensureDeferred(h.manager.create())
    h.clock.advance(2.001)
    with pytest.raises(KernelStartFailed, match="did not start in time"):
        h.successResult(d)
    assert h.manager.kernels == {}


# -- fork storm ------------------------------------------------------------------------


def test_persistent_start_failures_back_off_and_log_one_line(logged):
    h = Harness(pool_size=2)
    forks: list[float] = []

    def fail_every_start() -> None:
        for link, d in list(h.nursery.spawned.items()):
            if not d.called:
                forks.append(h.clock.seconds())
                d.callback(1000)
                # the child dies before its link is ready (exit status 70)
                h.manager.kernel_exited(link, 1000, {"cause": "exit code 70"})

    for _ in range(1200):  # 60 s in 50 ms steps
        h.clock.advance(0.05)
        fail_every_start()
    # two at first (the pool size), then one probe per back-off step:
    # after 0.5, 1, 2, 4, 8, 16 and 30 s
    gaps = [b - a for a, b in itertools.pairwise(forks)]
    assert gaps == pytest.approx([0, 0.5, 1, 2, 4, 8, 16], abs=0.06)
    assert h.manager.failed_starts == 8
    errors = [e for e in logged if e["log_level"] >= LogLevel.error]
    assert len(errors) == 1, [e["log_format"] for e in errors]
    # once starts work again, the pool fills and the recovery is said once
    h.clock.advance(31)
    h.make_ready()
    h.clock.advance(1)
    h.make_ready()
    assert h.manager.pooled == 2


# -- culling and what idle means ----------------------------------------------------------


def test_idle_kernels_are_culled_but_output_nobody_watches_is_not_activity():
    h = Harness(idle_timeout=10.0)
    quiet = h.create()
    printer = h.create()
    watched = h.create()
    client = FakeClient()
    watched.attach(client)
    link = printer.incarnation.link_id
    parts = [b"{}", b"{}", b"{}", b'{"name": "stdout", "text": "x"}']
    for _ in range(21):  # output every half second, with no client attached
        h.manager.kernel_message(link, Channel.STDOUT, 0, parts)
        h.clock.advance(0.5)
    assert quiet.id not in h.manager.kernels
    assert printer.id not in h.manager.kernels
    assert watched.id in h.manager.kernels
    assert quiet.cause == "idle timeout (10 s)"


def test_the_idle_clock_starts_when_the_last_client_leaves():
    h = Harness(idle_timeout=10.0)
    kernel = h.create()
    client = FakeClient()
    kernel.attach(client)
    h.clock.advance(100)
    kernel.detach(client)
    h.clock.advance(9.5)
    assert kernel.id in h.manager.kernels
    h.clock.advance(1.0)
    assert kernel.id not in h.manager.kernels


def test_busy_kernels_are_not_culled_for_idleness_but_for_their_lifetime():
    h = Harness(idle_timeout=5.0, max_lifetime=60.0)
    kernel = h.create()
    client = FakeClient()
    kernel.attach(client)
    h.manager.kernel_message(
        kernel.incarnation.link_id,
        Channel.STATUS,
        0,
        [b"{}", b"{}", b"{}", b'{"execution_state": "busy"}'],
    )
    kernel.detach(client)
    h.clock.advance(30)
    assert kernel.id in h.manager.kernels and kernel.state is KernelState.BUSY
    h.clock.advance(31)
    assert kernel.id not in h.manager.kernels
    assert kernel.cause == "lifetime limit (60 s)"


# -- credit ----------------------------------------------------------------------------


def test_credit_is_bounded_by_half_the_replay_log():
    assert credit_window(2 * MiB) == 1 * MiB
    assert credit_window(64 * MiB) == 4 * MiB
    h = Harness(replay_bytes=2 * MiB)
    kernel = h.create()
    client = FakeClient()
    kernel.attach(client)
    link = kernel.incarnation.link_id
    chunk = [b"{}", b"{}", b"{}", b"x" * (100 * 1024)]
    for _ in range(30):
        h.manager.kernel_message(link, Channel.STDOUT, 0, chunk)
    grants = h.router.credits(link)
    assert grants and max(grants) <= 1 * MiB
    assert kernel.incarnation.credit <= 1 * MiB


def test_with_no_client_a_kernel_gets_no_credit_past_what_the_replay_log_holds():
    h = Harness(replay_bytes=2 * MiB)
    kernel = h.create()
    link = kernel.incarnation.link_id
    chunk = [b"{}", b"{}", b"{}", b"x" * (64 * 1024)]
    sent = 0
    while kernel.incarnation.credit > 0:
        h.manager.kernel_message(link, Channel.STDOUT, 0, chunk)
        sent += sum(map(len, chunk))
    # everything it sent is still in the log for the client that comes back
    assert sent <= 2 * MiB + 64 * 1024
    assert kernel.replay.first_seq == 1
    granted = len(h.router.credits(link))
    client = FakeClient()
    kernel.attach(client, cursor=0)
    assert len(h.router.credits(link)) == granted + 1, "attaching resumes the kernel"
    assert len(client.frames) == kernel.seq


def test_a_congested_writer_holds_credit_until_it_catches_up():
    h = Harness(replay_bytes=2 * MiB)
    kernel = h.create()
    writer = FakeClient()
    kernel.attach(writer)
    kernel.writers.add(writer)
    kernel.congested(writer)
    link = kernel.incarnation.link_id
    chunk = [b"{}", b"{}", b"{}", b"x" * (64 * 1024)]
    while kernel.incarnation.credit > 0:
        h.manager.kernel_message(link, Channel.STDOUT, 0, chunk)
    assert h.router.credits(link) == []
    kernel.uncongested(writer)
    assert len(h.router.credits(link)) == 1


# -- nursery loss ---------------------------------------------------------------------


def test_nursery_loss_kills_kernels_reports_degraded_and_restarts_the_nursery(logged):
    h = Harness(pool_size=1)
    h.clock.advance(0)
    h.make_ready()
    kernel = h.create()
    client = FakeClient()
    kernel.attach(client)
    h.clock.advance(1)
    h.make_ready()
    workdir = kernel.workdir
    pooled_workdir = h.manager._pool[0].workdir
    h.lose_nursery()
    assert client.statuses()[-1] == {"execution_state": "dead", "cause": "nursery lost"}
    # what the nursery would have removed on reaping, the manager removes
    assert sorted(h.removed) == sorted(
        [workdir, workdir + ".tmp", pooled_workdir, pooled_workdir + ".tmp"]
    )
    assert h.manager.health() == {
        "state": "degraded",
        "reason": "the nursery was lost (killed by SIGKILL); a new one is starting",
    }
    assert h.manager.pooled == 0
    with pytest.raises(NurseryUnavailable):
        h.successResult(defer.ensureDeferred(h.manager.create()))
    with pytest.raises(NurseryUnavailable):
        h.successResult(defer.ensureDeferred(h.manager.restart(kernel)))
    assert kernel.state is KernelState.DEAD
    # new nurseries after 0.5, 1, 2, 4 s while they keep dying before ready
    for delay in (0.5, 1.0, 2.0):
        h.clock.advance(delay - 0.01)
        before = h.nursery_starts
        h.clock.advance(0.01)
        assert h.nursery_starts == before + 1
        h.lose_nursery("exit code 1")
    h.clock.advance(3.99)
    assert h.nursery_starts == 3
    h.clock.advance(0.01)
    assert h.nursery_starts == 4
    h.nursery.ready.callback(777)
    assert h.manager.health() == {"state": "ok"}
    h.clock.advance(0.01)
    h.make_ready()
    assert h.manager.pooled == 1, "the pool refills from the new nursery"
    h.restart(kernel)
    assert kernel.state is KernelState.IDLE
    lost = [e for e in logged if "the nursery was lost" in e["log_format"]]
    assert len(lost) == 4  # one line per loss, none per retry tick


def test_a_new_nursery_that_does_not_start_in_time_is_killed_and_retried():
    h = Harness(kernel_start_timeout=5.0)
    h.lose_nursery()
    h.clock.advance(0.5)
    stuck = h.nursery
    assert stuck is h.nurseries[1]
    h.clock.advance(5.0)
    assert stuck.signals == ["KILL"]
    h.lose_nursery("killed")  # what its processEnded reports
    h.clock.advance(1.0)
    assert h.nursery is h.nurseries[2]


def test_automatic_restarts_resume_once_a_nursery_is_back():
    h = Harness(auto_restart=True)
    kernel = h.create()
    client = FakeClient()
    kernel.attach(client)
    h.lose_nursery()
    assert client.statuses() == [
        {"execution_state": "dead", "cause": "nursery lost", "auto_restart": True}
    ]
    h.clock.advance(0.5)
    h.nursery.ready.callback(1)
    h.make_ready()
    assert kernel.state is KernelState.IDLE
    assert client.statuses()[-2:] == [
        {"execution_state": "restarting"},
        {"execution_state": "idle", "restarted": True},
    ]


def test_a_nursery_that_ran_stably_is_replaced_quickly_again():
    h = Harness()
    for _ in range(4):
        h.lose_nursery()
        h.clock.advance(30)
        if not h.nursery.ready.called:
            h.nursery.ready.callback(1)
    h.clock.advance(31)  # the last one ran for more than 30 s
    before = h.nursery_starts
    h.lose_nursery()
    h.clock.advance(0.5)
    assert h.nursery_starts == before + 1


# -- the kernel's host interface ----------------------------------------------------


@attrs.define
class FakeHost:
    """Everything a Kernel may ask of whoever runs it, and nothing more."""

    clock: task.Clock = attrs.Factory(task.Clock)
    config: ServerConfig = attrs.Factory(ServerConfig)
    sent: list = attrs.Factory(list)
    credit_checks: int = 0
    idle: list = attrs.Factory(list)
    watched: list = attrs.Factory(list)

    def send_to_process(self, inc, channel: int, socket: int, parts: list) -> None:
        self.sent.append((inc.link, channel, socket, parts))

    def grant_credit(self, kernel) -> None:
        self.credit_checks += 1

    def went_idle(self, kernel) -> None:
        self.idle.append(kernel.id)

    def watch(self, inc) -> None:
        self.watched.append(inc.link)


def test_a_kernel_needs_only_its_narrow_host():
    host = FakeHost()
    kernel = kernels_module.Kernel(host, "k1", "python3")
    inc = kernels_module.Incarnation(b"\x01" * 16, b"\x02" * 32)
    kernel.bind(inc)
    client = FakeClient()
    kernel.attach(client)
    assert host.credit_checks == 1, "attaching may resume a held kernel"
    kernel.send(Channel.EXECUTE, 1, [b"{}", b"{}", b"{}", b"{}"])
    assert host.sent == [(inc.link, Channel.EXECUTE, 1, [b"{}", b"{}", b"{}", b"{}"])]
    for state in (b'"busy"', b'"idle"'):
        kernel.relay(
            Channel.STATUS, 2, [b"{}", b"{}", b"{}", b'{"execution_state": ' + state + b"}"]
        )
    assert host.idle == ["k1"]
    assert host.watched == [inc.link], "busy: its link is watched on every tick"
    kernel.unbind()
    kernel.handle(Exited("SIGKILL"))
    with pytest.raises(KernelNotRunning, match="kernel is dead"):
        kernel.send(Channel.EXECUTE, 1, [b"{}", b"{}", b"{}", b"{}"])
