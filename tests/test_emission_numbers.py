"""The kernel side of the emission order: numbering sends, reordering reads.

Real ZeroMQ inproc sockets and threads; no kernel (test_emission_order.py
covers kernels and transports).
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

from cellmux.kernel import ordering
from cellmux.kernel.flowcontrol import IOPUB_QUEUE, IOPUB_QUEUE_BYTES, prepare_iopub_socket
from cellmux.kernel.ordering import DELIMITER, EmissionOrder, stamp_of
from cellmux.kernel.pump import Reorder


def _message(body: bytes) -> list[bytes]:
    return [DELIMITER, b"", b"{}", b"{}", b"{}", body]


def test_sends_from_many_threads_get_unique_numbers_growing_per_socket():
    ctx = zmq.Context()
    order = EmissionOrder()
    pairs = []
    for n in range(3):
        sender, receiver = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
        sender.bind(f"inproc://numbers-{n}")
        receiver.connect(f"inproc://numbers-{n}")
        order.stamp(sender)
        pairs.append((sender, receiver))

    def send_all(sender) -> None:
        for i in range(500):
            sender.send_multipart(_message(str(i).encode()))

    threads = [threading.Thread(target=send_all, args=(s,)) for s, _ in pairs]
    for t in threads:
        t.start()
    numbers = []
    for _, receiver in pairs:
        mine = [stamp_of(receiver.recv_multipart()[1]) for _ in range(500)]
        assert mine == sorted(mine)
        numbers += mine
    for t in threads:
        t.join()
    assert len(set(numbers)) == 1500
    for s, r in pairs:
        s.close(0)
        r.close(0)
    ctx.term()


def test_a_full_socket_does_not_hold_the_lock():
    """While one socket waits for room, another thread's sends go on."""
    ctx = zmq.Context()
    order = EmissionOrder()
    full, full_reader = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    full.setsockopt(zmq.SNDHWM, 1)
    full_reader.setsockopt(zmq.RCVHWM, 1)
    full.bind("inproc://full")
    full_reader.connect("inproc://full")
    free, free_reader = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    free.bind("inproc://free")
    free_reader.connect("inproc://free")
    order.stamp(full)
    order.stamp(free)

    def flood() -> None:
        for i in range(6):
            full.send_multipart(_message(b"%d" % i))  # blocks: nobody reads yet

    blocked = threading.Thread(target=flood)
    blocked.start()
    time.sleep(0.2)
    started = time.monotonic()
    free.send_multipart(_message(b"free"))
    assert time.monotonic() - started < 0.1
    assert free_reader.recv_multipart()[-1] == b"free"
    got = [full_reader.recv_multipart() for _ in range(6)]
    blocked.join()
    assert [m[-1] for m in got] == [b"%d" % i for i in range(6)]
    numbers = [stamp_of(m[1]) for m in got]
    assert numbers == sorted(numbers)
    for s in (full, full_reader, free, free_reader):
        s.close(0)
    ctx.term()


def _iopub_pair(ctx: zmq.Context, name: str) -> tuple[zmq.Socket, zmq.Socket]:
    """The kernel's iopub socket and the pump's, as flowcontrol makes them."""
    pub, sub = ctx.socket(zmq.XPUB), ctx.socket(zmq.SUB)
    prepare_iopub_socket(pub)
    sub.setsockopt(zmq.RCVHWM, IOPUB_QUEUE)
    sub.subscribe(b"")
    pub.bind(f"inproc://{name}")
    sub.connect(f"inproc://{name}")
    pub.recv()  # the subscription: from now on nothing is dropped
    return pub, sub


@pytest.fixture
def ctx():
    """A context whose sockets are closed however the test ends."""
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def _drain(sub: zmq.Socket, sender: threading.Thread, seconds: float) -> None:
    """Read whatever a sender still sends until it is done (so that a
    failed test does not leave it stuck on a full socket)."""
    deadline = time.monotonic() + seconds
    while sender.is_alive() and time.monotonic() < deadline:
        if sub.poll(50):
            sub.recv_multipart()
    sender.join(max(0.0, deadline - time.monotonic()))


def test_a_flood_through_a_full_iopub_socket_loses_no_number(ctx):
    """Under a flood the iopub queue is full most of the time: a send that
    finds it full gives its number back. (Each failed attempt used to take
    a number for good, 25 % more numbers than messages, and every gap cost
    the pump a search of all the kernel's sockets.)"""
    order = EmissionOrder()
    pub, sub = _iopub_pair(ctx, "flood")
    order.stamp(pub)
    count = 3000

    def flood() -> None:
        for i in range(count):
            pub.send_multipart(_message(b"%d" % i))

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    numbers: list[int | None] = []
    try:
        time.sleep(0.1)  # the queue fills first
        while len(numbers) < count:
            numbers.append(stamp_of(sub.recv_multipart()[1]))
            order.made_room()
    finally:
        _drain(sub, sender, 30)
    assert not sender.is_alive()
    assert numbers == list(range(1, count + 1))


def test_a_sender_waiting_for_room_goes_on_when_the_reader_made_some(ctx, monkeypatch):
    """The pump's word wakes a sender at once: it does not sleep out a
    pause (which halved a kernel's output rate when the pauses were all
    there was)."""
    monkeypatch.setattr(ordering, "RETRY_FIRST", 20.0)
    monkeypatch.setattr(ordering, "RETRY_MAX", 20.0)
    order = EmissionOrder()
    pub, sub = _iopub_pair(ctx, "wake")
    order.stamp(pub)
    sent = threading.Event()

    def flood() -> None:
        for i in range(2 * IOPUB_QUEUE):  # fills both sides of the pipe
            pub.send_multipart(_message(b"%d" % i))
        pub.send_multipart(_message(b"one more"))  # waits for room
        sent.set()

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    got = []
    try:
        time.sleep(0.3)  # the sender waits now (it would for 20 s)
        assert not sent.is_set()
        got = [sub.recv_multipart() for _ in range(2 * IOPUB_QUEUE)]
        order.made_room()
        assert sent.wait(5), "the sender slept on although the reader made room"
        got.append(sub.recv_multipart())
    finally:
        _drain(sub, sender, 45)
    assert got[-1][-1] == b"one more"
    assert [stamp_of(m[1]) for m in got] == list(range(1, 2 * IOPUB_QUEUE + 2))


def _taken(frames: list[bytes]) -> int:
    return sum(map(len, frames))


def test_the_iopub_queue_is_bounded_in_bytes_too(ctx, monkeypatch):
    """Large messages wait for the pump once IOPUB_QUEUE_BYTES are queued,
    long before the queue's message count is reached; the pump's word of
    the bytes it took lets the sender go on at once. Counting starts with
    the pump's first word (what was sent before the subscription was live
    may have been dropped: it would be counted for ever)."""
    monkeypatch.setattr(ordering, "RETRY_FIRST", 20.0)
    monkeypatch.setattr(ordering, "RETRY_MAX", 20.0)
    order = EmissionOrder()
    pub, sub = _iopub_pair(ctx, "bytes")
    order.stamp(pub, bounded=True)
    big = b"x" * (IOPUB_QUEUE_BYTES // 4)  # three and their frames fit, not four
    pub.send_multipart(_message(big))
    pub.send_multipart(_message(big))
    assert order.queued == 0  # not counting yet
    order.made_room(_taken(sub.recv_multipart()))
    order.made_room(_taken(sub.recv_multipart()))
    assert order.queued == 0
    sent: list[int] = []

    def flood() -> None:
        for i in range(4):
            pub.send_multipart(_message(big))
            sent.append(i)

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    got = []
    try:
        time.sleep(0.3)
        assert IOPUB_QUEUE > 4  # the count has room: the bytes hold it back
        assert sent == [0, 1, 2]
        assert 3 * len(big) < order.queued <= IOPUB_QUEUE_BYTES
        got.append(sub.recv_multipart())
        order.made_room(_taken(got[-1]))
        deadline = time.monotonic() + 5
        while len(sent) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sent == [0, 1, 2, 3], "the sender slept on although the reader made room"
        got += [sub.recv_multipart() for _ in range(3)]
        for frames in got[1:]:
            order.made_room(_taken(frames))
        assert order.queued == 0
    finally:
        _drain(sub, sender, 45)
    assert [stamp_of(m[1]) for m in got] == [3, 4, 5, 6]


def test_one_message_larger_than_the_byte_bound_goes_alone(ctx):
    """A message over IOPUB_QUEUE_BYTES is not stuck: it goes once nothing
    else is queued."""
    order = EmissionOrder()
    pub, sub = _iopub_pair(ctx, "huge")
    order.stamp(pub, bounded=True)
    pub.send_multipart(_message(b"start"))
    order.made_room(_taken(sub.recv_multipart()))
    huge = b"y" * (2 * IOPUB_QUEUE_BYTES)
    pub.send_multipart(_message(huge), flags=zmq.NOBLOCK)
    with pytest.raises(zmq.Again):  # a second one waits for the first
        pub.send_multipart(_message(b"small"), flags=zmq.NOBLOCK)
    frames = sub.recv_multipart()
    assert frames[-1] == huge
    order.made_room(_taken(frames))
    pub.send_multipart(_message(b"small"), flags=zmq.NOBLOCK)
    assert sub.recv_multipart()[-1] == b"small"


@given(
    st.lists(st.integers(1, 3), min_size=1, max_size=60),
    st.sets(st.integers(0, 59)),
)
def test_reorder_forwards_in_number_order_and_skips_lost_numbers(sockets, lost):
    """Numbers dealt to sockets in emission order, some lost on the way, read
    socket by socket: what comes out is ascending, with nothing dropped."""
    queues: dict[int, list[int]] = {1: [], 2: [], 3: []}
    for number, socket in enumerate(sockets):
        if number not in lost:
            queues[socket].append(number)
    reorder = Reorder()
    reorder.next = 0
    out: list[int] = []
    for socket, numbers in queues.items():  # one socket drained after another
        for number in numbers:
            reorder.hold([zmq.Frame(DELIMITER), zmq.Frame(number.to_bytes(8, "big"))], socket)
    while reorder:
        if reorder.missing():
            reorder.skip()  # every socket is empty: the numbers are lost
        _, msg = reorder.pop()
        out.append(stamp_of(msg[1]))
    expected = [n for n in range(len(sockets)) if n not in lost]
    assert out == expected


def test_a_send_waiting_for_room_gives_up_when_told_and_keeps_its_number(ctx):
    """``abandon`` (a Ctrl-C held by a shielded flush, cellmux.kernel.tuning
    ``direct``): the send raises, nothing was queued, and the number it
    would have taken is the next message's."""
    order = EmissionOrder()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    for s in (push, pull):
        s.setsockopt(zmq.SNDHWM, 1)
        s.setsockopt(zmq.RCVHWM, 1)
    pull.bind("inproc://abandon")
    push.connect("inproc://abandon")
    give_up = threading.Event()
    order.stamp(push, bounded=True, abandon=give_up.is_set)
    sent: list[int] = []

    def fill() -> None:
        # until the pipe is full (its size is libzmq's business) and told
        with contextlib.suppress(ordering.SendAbandoned):
            while True:
                push.send_multipart(_message(b"fill"))
                sent.append(1)

    filler = threading.Thread(target=fill, daemon=True)
    filler.start()
    count = -1
    while len(sent) != count:  # stuck waiting for room
        count = len(sent)
        time.sleep(0.3)
    give_up.set()
    filler.join(5)
    assert not filler.is_alive(), "the waiting send did not give up"
    got = [pull.recv_multipart() for _ in range(count)]
    order.made_room()
    give_up.clear()
    push.send_multipart(_message(b"after"))
    got.append(pull.recv_multipart())
    assert [stamp_of(m[1]) for m in got] == list(range(1, count + 2))
    assert got[-1][-1] == b"after"
