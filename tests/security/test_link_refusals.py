"""Refused traffic is counted, not logged line by line; reading is budgeted.

Fast tests: the sans-IO tally under hypothesis, its clock-driven wrapper
under twisted's Clock, the descriptor guard's thresholds, and the ROUTER's
per-turn read budget against a real ZeroMQ DEALER.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import tempfile
import time

import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import task
from txzmq import ZmqFactory

from cellmux.protocol import (
    Channel,
    JupyterSocket,
    KernelFrame,
    KernelSideLink,
    LinkReady,
    ProtocolError,
    ServerLink,
    encode_tag,
    link_control,
)
from cellmux.server import links
from cellmux.server.limits import (
    ANSWER_ROOM,
    PER_KERNEL,
    RESERVE,
    Admission,
    DescriptorGuard,
    open_descriptors,
    raise_open_files_limit,
)
from cellmux.server.refusals import MAX_SOURCES, OTHER_SOURCES, RefusalLog, RefusalTally

# -- the tally (sans-IO) ------------------------------------------------------

events = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c"]), st.floats(min_value=0, max_value=5)),
    max_size=200,
)


@given(events)
def test_every_refusal_is_counted_once_and_lines_are_rate_limited(steps):
    tally = RefusalTally(interval=10.0)
    now = 0.0
    counted = {"a": 0, "b": 0, "c": 0}
    emitted: dict[str, list[tuple[float, int]]] = {"a": [], "b": [], "c": []}
    for source, gap in steps:
        now += gap
        for line in tally.due(now):
            emitted[line.source].append((now, line.count))
        line = tally.note(source, now, "why")
        counted[source] += 1
        if line is not None:
            emitted[source].append((now, line.count))
    # Flush everything: each refusal appears in exactly one line's count.
    for later in (now + 10.0, now + 30.0, now + 60.0):
        for line in tally.due(later):
            emitted[line.source].append((later, line.count))
    for source in counted:
        assert sum(count for _, count in emitted[source]) == counted[source]
        times = [t for t, _ in emitted[source]]
        # At most one line per source per interval.
        for earlier, later in itertools.pairwise(times):
            assert later - earlier >= 10.0
    assert len(tally) == 0  # quiet sources are forgotten


def test_the_table_of_sources_is_bounded():
    tally = RefusalTally(interval=10.0, max_sources=4)
    for i in range(100):
        tally.note(f"source {i}", 0.0)
    assert len(tally) <= 5  # four sources and "other sources"
    lines = tally.due(10.0)
    assert sum(line.count for line in lines) == 100 - 5  # the first of each was logged at once
    assert OTHER_SOURCES in {line.source for line in lines}
    assert MAX_SOURCES >= 1024


def test_refusal_log_on_a_clock_logs_the_first_then_one_line_per_interval():
    clock = task.Clock()
    lines = []
    log = RefusalLog(clock, lines.append, interval=10.0)
    assert log.note("junk", "first") is True
    for _ in range(100_000):
        log.note("junk", "again")
    assert [(line.count, line.detail) for line in lines] == [(1, "first")]
    clock.advance(10.0)
    assert [(line.count, line.detail) for line in lines[1:]] == [(100_000, "again")]
    clock.advance(10.0)  # a quiet interval: nothing more, the source is forgotten
    assert len(lines) == 2
    assert not clock.getDelayedCalls()
    assert log.note("junk", "later") is True
    log.stop()
    assert not clock.getDelayedCalls()


# -- descriptor headroom --------------------------------------------------------


def test_guard_accepts_answers_then_drops_as_descriptors_run_out():
    in_use = [0]
    allowed = [10]
    guard = DescriptorGuard(1000, lambda: allowed[0], count=lambda: in_use[0])
    room = PER_KERNEL * 10
    in_use[0] = 1000 - RESERVE - ANSWER_ROOM - room
    assert guard.admit_connection() is Admission.ACCEPT
    in_use[0] += 1
    assert guard.admit_connection() is Admission.ANSWER
    # Kernels may still use the room kept from HTTP connections.
    assert guard.may_start_kernel(connecting=0)
    in_use[0] = 1000 - RESERVE
    assert guard.admit_connection() is Admission.ANSWER
    assert not guard.may_start_kernel(connecting=0)
    in_use[0] += 1
    assert guard.admit_connection() is Admission.DROP
    # Once every allowed kernel exists, nothing is kept for kernels.
    allowed[0] = 0
    in_use[0] = 1000 - RESERVE - ANSWER_ROOM
    assert guard.admit_connection() is Admission.ACCEPT


def test_guard_counts_kernels_still_connecting():
    guard = DescriptorGuard(1000, lambda: 0, count=lambda: 1000 - RESERVE - 10)
    assert guard.may_start_kernel(connecting=8)
    assert not guard.may_start_kernel(connecting=9)


def test_kernel_room_never_shuts_http_out():
    guard = DescriptorGuard(512, lambda: 100_000, count=lambda: 0)
    assert guard.kernel_room() == (512 - RESERVE - ANSWER_ROOM) // 4
    assert guard.admit_connection() is Admission.ACCEPT
    assert guard.too_low_for(100_000)
    assert not DescriptorGuard(65536, lambda: 0).too_low_for(200)


def test_open_descriptors_counts_this_process():
    before = open_descriptors()
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(50)]
    try:
        assert open_descriptors() - before == 50
    finally:
        for fd in fds:
            os.close(fd)
    assert abs(open_descriptors() - len(os.listdir("/proc/self/fd"))) <= 1


def test_raise_open_files_limit_is_a_no_op_at_the_hard_limit():
    before, after = raise_open_files_limit()
    assert after >= before
    assert raise_open_files_limit() == (after, after)


# -- the read budget, against a real ROUTER and DEALER ---------------------------


class _Sink:
    def __init__(self):
        self.violations = []

    def link_ready(self, link_id, pid):
        pass

    def kernel_message(self, link_id, channel, socket, parts):
        pass

    def link_pong(self, link_id, n):
        pass

    def link_violation(self, link_id, code, message):
        self.violations.append((link_id, code, message))


@pytest.fixture
def links_dir():
    # pytest's tmp_path is too long for a unix socket's path.
    path = tempfile.mkdtemp(prefix="cellmux-w6-")
    yield os.path.join(path, "links")
    shutil.rmtree(path)


class _Reactor(task.Clock):
    """What txzmq asks of a reactor, on a Clock: nothing runs unless told."""

    def addReader(self, reader):
        pass

    def removeReader(self, reader):
        pass


def test_router_counts_refusals_and_the_first_link_message_closes_its_endpoint(links_dir):
    reactor = _Reactor()
    factory = ZmqFactory()
    factory.reactor = reactor
    lines = []
    router = links.LinkRouter(factory, links_dir, _Sink(), 1 << 20)
    router.refusals = RefusalLog(reactor, lines.append)
    link_id = secrets.token_bytes(16)
    endpoint = router.expect(link_id, b"secret")
    assert os.path.exists(endpoint.removeprefix("ipc://"))
    dealer = factory.context.socket(zmq.DEALER)
    try:
        dealer.routing_id = secrets.token_bytes(16)  # made up: nobody expects it
        dealer.linger = 0
        dealer.connect(endpoint)
        total = 10 * links.READ_BUDGET_MESSAGES
        for _ in range(total):
            dealer.send_multipart([b"junk", b"x" * 10])
        turns = 0
        deadline = time.monotonic() + 10
        while turns < 10 or router.read_scheduled is not None:
            assert time.monotonic() < deadline
            router.doRead()
            turns += 1
            time.sleep(0.01)
        # The first refusal was logged at once, the rest is one line later.
        assert [line.count for line in lines] == [1]
        reactor.advance(10.0)
        assert [line.count for line in lines] == [1, total - 1]
        assert lines[1].source == links.UNKNOWN_LINKS
        # The unknown peer's message did not close the kernel's endpoint.
        assert os.path.exists(endpoint.removeprefix("ipc://"))
        # The expected link's first message closes it.
        kernel = factory.context.socket(zmq.DEALER)
        kernel.routing_id = link_id
        kernel.linger = 0
        kernel.connect(endpoint)
        kernel.send_multipart(link_control("hello", version=1, pid=os.getpid()))
        deadline = time.monotonic() + 10
        while os.path.exists(os.path.dirname(endpoint.removeprefix("ipc://"))):
            assert time.monotonic() < deadline
            router.doRead()
            time.sleep(0.01)
        assert kernel.poll(5000)  # the challenge: the link itself goes on
        kernel.close()
        router.forget(link_id)
    finally:
        dealer.close()
        router.shutdown()
        factory.context.term()


def test_router_budget_leaves_messages_for_the_next_turn(links_dir):
    reactor = _Reactor()
    factory = ZmqFactory()
    factory.reactor = reactor
    router = links.LinkRouter(factory, links_dir, _Sink(), 1 << 20)
    counted = []
    router.refusals = RefusalLog(reactor, lambda line: None)
    router.refusals.note = lambda source, detail="": counted.append(source) or False
    endpoint = router.expect(secrets.token_bytes(16), b"secret")
    dealer = factory.context.socket(zmq.DEALER)
    try:
        dealer.routing_id = b"intruder"
        dealer.linger = 0
        dealer.connect(endpoint)
        for _ in range(3 * links.READ_BUDGET_MESSAGES):
            dealer.send(b"junk")
        deadline = time.monotonic() + 10
        while not router.socket.get(zmq.EVENTS) & zmq.POLLIN:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)  # let the I/O thread queue all of them
        router.doRead()
        assert len(counted) == links.READ_BUDGET_MESSAGES
        assert router.read_scheduled is not None  # and it comes back for the rest
        assert router.read_scheduled.getTime() == reactor.seconds()
    finally:
        dealer.close()
        router.shutdown()
        factory.context.term()


def test_no_kernel_endpoint_is_opened_when_descriptors_are_short(links_dir):
    reactor = _Reactor()
    factory = ZmqFactory()
    factory.reactor = reactor
    in_use = [0]
    guard = DescriptorGuard(1000, lambda: 10, count=lambda: in_use[0])
    router = links.LinkRouter(factory, links_dir, _Sink(), 1 << 20, guard=guard)
    lines = []
    router.refusals = RefusalLog(reactor, lines.append)
    try:
        in_use[0] = 1000 - RESERVE - PER_KERNEL
        router.expect(secrets.token_bytes(16), b"secret")
        # The first kernel is still connecting: it holds one more descriptor.
        with pytest.raises(links.LinkUnavailable) as refused:
            router.expect(secrets.token_bytes(16), b"secret")
        assert refused.value.busy
        assert "open files limit" in str(refused.value)
        assert [line.source for line in lines] == [links.KERNEL_STARTS]
        assert router.link_count == 1
        assert len(os.listdir(links_dir)) == 1  # nothing was made for the refused one
    finally:
        router.shutdown()
        factory.context.term()


def test_a_runtime_directory_too_long_for_socket_paths_is_refused_at_start():
    factory = ZmqFactory()
    factory.reactor = _Reactor()
    try:
        with pytest.raises(ValueError, match="shorter runtime_dir"):
            links.LinkRouter(factory, "/tmp/" + "x" * 80 + "/links", _Sink(), 1 << 20)
        assert not os.path.exists("/tmp/" + "x" * 80)
    finally:
        factory.context.term()


# -- link credit, held on the server side (sans-IO) ------------------------------


def _ready_link(credit: int, max_size: int) -> tuple[ServerLink, KernelSideLink]:
    server = ServerLink(b"link", b"secret", b"n" * 16, credit=credit, max_size=max_size)
    kernel = KernelSideLink(b"link", b"secret", 42)
    answer = kernel.hello()
    while not kernel.accepted:
        reply = server.receive(answer)
        answer = kernel.receive(reply.parts)
    assert isinstance(server.receive(kernel.ready()), LinkReady)
    return server, kernel


def _data(size: int) -> list[bytes]:
    return [encode_tag(Channel.STDOUT, JupyterSocket.IOPUB), b"h" * size, b"", b"{}", b"{}"]


@given(
    st.lists(
        st.one_of(st.integers(1, 5000).map(lambda n: ("send", n)), st.just(("grant", 0))),
        max_size=300,
    )
)
def test_a_kernel_that_honours_its_credit_is_never_refused(steps):
    server, kernel = _ready_link(credit=10_000, max_size=6_000)
    for what, size in steps:
        if what == "grant":  # the server tops the credit up, as the manager does
            grant = 10_000 - server.credit_left if server.credit_left < 10_000 else 0
            server.granted(grant)
            kernel.receive(link_control("credit", bytes=grant))
        elif kernel.credit > 0:  # the pump reads a message only while it has credit
            parts = _data(size)
            assert isinstance(server.receive(parts), KernelFrame)
            kernel.credit -= sum(map(len, parts[1:]))


@given(st.lists(st.integers(1, 5000), max_size=300), st.lists(st.integers(0, 20_000), max_size=5))
def test_a_kernel_that_ignores_its_credit_gets_no_more_than_it_was_granted(sizes, grants):
    server, _kernel = _ready_link(credit=10_000, max_size=6_000)
    relayed = granted = 0
    for i, size in enumerate(sizes):
        if i % 60 == 0 and grants:
            grant = grants.pop()
            server.granted(grant)
            granted += grant
        parts = _data(size)
        try:
            server.receive(parts)
        except ProtocolError as e:
            assert e.code == "over_credit"
            assert server.ready  # only that message is dropped
        else:
            relayed += sum(map(len, parts[1:]))
    # At most one message beyond what it was given, ever.
    assert relayed <= 10_000 + granted + 6_000


def test_create_answers_503_when_no_kernel_endpoint_can_be_opened():
    from twisted.internet import defer

    from cellmux.server.kernels import OutOfDescriptors
    from cellmux.server.webjson import status_for
    from test_lifecycle_units import Harness

    h = Harness()

    def refuse(link_id: bytes, secret: bytes) -> str:
        raise links.LinkUnavailable("the server is near its open files limit", busy=True)

    h.router.expect = refuse
    d = defer.ensureDeferred(h.manager.create())
    with pytest.raises(OutOfDescriptors, match="open files limit") as refused:
        h.successResult(d)
    assert status_for(refused.value) == (503, "the server is near its open files limit")
    assert refused.value.code == "out_of_descriptors"
    assert h.manager.kernels == {} and not h.nursery.spawned  # nothing forked, nothing kept
