"""One emission order for everything a kernel sends.

ipykernel sends from several threads on several sockets: output and status
from its IOPub thread, replies from the main thread (or the shell channel
thread), prompts on stdin from the main thread, control replies from the
control thread, introspection replies from cellmux's own thread. The pump
reads those sockets one at a time, so without more it could forward an
``input_request`` before the ``stream`` printed just before it, even though
the kernel's barriers had handed that stream to the IOPub socket first.

So every Jupyter message a kernel socket sends is numbered at the moment it
enters its socket, under one lock: a number is taken and the message queued
in one step, so a message with a higher number was always queued after
every message with a lower one. The number travels in the signature frame
(the kernel's session is unsigned: that frame is otherwise empty, and the
pump strips it). The pump forwards in number order (see
L{cellmux.kernel.pump.Reorder}).

A number can be lost (a send that is interrupted, a message sent before
the pump subscribed); the pump tells a lost number from a late one
because, thanks to the lock, a late one is already in its socket. A send
that finds its socket full gives its number back (nothing else took one
while it held the lock): under a flood the IOPub socket is full most of
the time, and each lost number costs the pump a search of every socket.

A full socket never blocks while the lock is held (every other thread's
sends would wait for the slowest client). Its sender waits outside the
lock until a reader says it took messages out (L{EmissionOrder.made_room},
called by the pump), then tries again: an XPUB cannot be polled for room,
and sleeping for it instead (as this module once did, 0.5 to 10 ms a
time) halved a kernel's output rate under load.

The IOPub socket is also bounded in bytes (L{IOPubBacklog} aside): ZeroMQ
counts its queue in messages, and a queue long enough for a flood of
one-line messages to flow without a thread hand-off every few lines would
hold a great deal of large ones. So the sender counts the bytes it queued
and the pump the bytes it took out (C{made_room(taken)}); a send that would
take what is queued past L{cellmux.kernel.flowcontrol.IOPUB_QUEUE_BYTES}
waits as for a full socket (one message alone always goes). Counting starts
with the pump's first word of bytes taken: from then on the subscription is
live and nothing sent is dropped, so every byte counted is taken out again.
"""

from __future__ import annotations

import threading
from typing import Any

import zmq

from .flowcontrol import IOPUB_QUEUE_BYTES

__all__ = [
    "DELIMITER",
    "STAMP_SIZE",
    "EmissionOrder",
    "IOPubBacklog",
    "SendAbandoned",
    "install",
    "stamp_of",
]

DELIMITER = b"<IDS|MSG>"
#: Bytes of the number that replaces the (empty) signature.
STAMP_SIZE = 8
#: How long a sender waits for a reader's word before it tries a full
#: socket again anyway (seconds, doubling from the first to the most): a
#: safety net, the pump says when it has read.
RETRY_FIRST = 0.001
RETRY_MAX = 0.01
#: Longest a reply waits for the IOPub thread to send what was published
#: before it (as tuning's reply barrier: a wedged IOPub thread must not
#: wedge the shell for ever).
BARRIER_TIMEOUT = 10.0


class SendAbandoned(Exception):
    """A send waiting for room gave up (its C{abandon} said so): nothing
    was queued and no number was taken."""


def stamp_of(frame: Any) -> int | None:
    """The emission number in a signature frame, or None if it has none."""
    data = frame if isinstance(frame, bytes) else getattr(frame, "bytes", b"")
    if len(data) != STAMP_SIZE:
        return None
    return int.from_bytes(data, "big")


class IOPubBacklog:
    """Whether ipykernel's IOPub thread still has published work to send.

    A thread publishes on IOPub by scheduling the send on the IOPub thread,
    so a ``status: busy`` published before a reply may reach its socket
    after the reply reached another. A reply therefore first waits for the
    IOPub thread to finish what was scheduled before it: the order the
    threads published in is the order the sockets see, as Jupyter clients
    expect (busy, then the reply, then idle). Counting scheduled and
    finished events makes the common case, nothing pending, free.
    """

    def __init__(self, iopub_thread: Any) -> None:
        self._thread = iopub_thread
        self._lock = threading.Lock()
        self._scheduled = self._finished = 0
        schedule = iopub_thread.schedule

        def counted_schedule(f: Any) -> None:
            def run() -> None:
                try:
                    f()
                finally:
                    with self._lock:
                        self._finished += 1

            with self._lock:
                self._scheduled += 1
            schedule(run)

        iopub_thread.schedule = counted_schedule

    def wait(self) -> None:
        """Return once everything scheduled so far has run (or at once)."""
        with self._lock:
            pending = self._scheduled != self._finished
        thread = getattr(self._thread, "thread", None)
        if not pending or thread is None or not thread.is_alive():
            return
        if thread.ident == threading.get_ident():
            return
        done = threading.Event()
        self._thread.schedule(done.set)
        done.wait(BARRIER_TIMEOUT)


class EmissionOrder:
    """Numbers the messages of the sockets it is given, in sending order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = 1
        # Set by readers when they took messages out; cleared by a sender
        # that found its socket full, before it tries once more.
        self._room = threading.Event()
        #: Bytes sent on the IOPub socket and not yet taken out by the
        #: pump, counted once the pump first said what it took (None before).
        self._queued: int | None = None

    def made_room(self, taken: int = 0) -> None:
        """Tell senders waiting for a full socket that a reader took some
        messages out (cheap when no one waits: the flag is already set).

        @param taken: bytes the reader took out of the IOPub socket (all
            its frames); the first such word starts the byte count.
        """
        if taken:
            with self._lock:
                self._queued = max(0, (self._queued or 0) - taken)
        if not self._room.is_set():
            self._room.set()

    @property
    def queued(self) -> int:
        """Bytes counted as waiting in the IOPub socket (0 before counting)."""
        return self._queued or 0

    def stamp(
        self,
        socket: Any,
        after: IOPubBacklog | None = None,
        bounded: bool = False,
        abandon: Any = None,
    ) -> None:
        """Make C{socket}'s C{send_multipart} number each Jupyter message.

        Messages without the routing delimiter (none a kernel socket sends
        to the pump) keep their frames and take no number. The socket is
        used only under the order's lock, so several threads may send on
        it (the direct IOPub socket is shared so).

        @param after: wait for this backlog to be sent before each message
            (for the sockets of replies and prompts, not for IOPub itself).
        @param bounded: count its bytes against IOPUB_QUEUE_BYTES (for the
            IOPub sockets, the ones the pump reports C{taken} bytes of).
        @param abandon: called while a send waits for room; if it returns
            true the send raises L{SendAbandoned} (for a Ctrl-C held by a
            shielded flush, which must not wait for a stalled client).
        """
        send = socket.send_multipart
        lock = self._lock
        room = self._room

        def send_multipart(msg_parts: Any, flags: int = 0, *args: Any, **kwargs: Any) -> Any:
            parts = list(msg_parts)
            at = next((i for i, p in enumerate(parts[:64]) if _is_delimiter(p)), None)
            if at is None or at + 1 >= len(parts):
                return send(parts, flags, *args, **kwargs)
            if after is not None:
                after.wait()
            size = sum(map(_nbytes, parts)) if bounded else 0
            cleared = retry = False
            pause = RETRY_FIRST
            while True:
                # Never block while holding the lock: a full socket (the
                # pump out of credit) would stop every other thread's sends,
                # control replies and introspection answers included.
                with lock:
                    if retry:
                        # libzmq looks at the reader's "room again" command
                        # at most once a millisecond in a non-blocking send;
                        # asking for the socket's events processes it now.
                        socket.getsockopt(zmq.EVENTS)
                    retry = True
                    number = self._next
                    parts[at + 1] = number.to_bytes(STAMP_SIZE, "big")
                    queued = self._queued
                    full = bool(size and queued and queued + size > IOPUB_QUEUE_BYTES)
                    try:
                        if full:
                            raise zmq.Again()
                        sent = send(parts, flags | zmq.NOBLOCK, *args, **kwargs)
                        if size and queued is not None:
                            self._queued = queued + size
                        return sent
                    except zmq.Again:
                        # Nothing was queued and no one else took a number
                        # meanwhile: this one is still next, not lost.
                        full = True
                        if flags & zmq.NOBLOCK:
                            raise
                    finally:
                        if not full:
                            self._next = number + 1
                if not cleared:
                    # A read between the failure and the clear would go
                    # unnoticed by the wait: try once more after it.
                    room.clear()
                    cleared = True
                    continue
                if abandon is not None and abandon():
                    raise SendAbandoned()
                room.wait(pause)
                pause = min(pause * 2, RETRY_MAX)
                cleared = False

        socket.send_multipart = send_multipart


def _nbytes(part: Any) -> int:
    """Bytes ZeroMQ sends for one frame (what the reader's len() gives)."""
    return len(part) if type(part) is bytes else memoryview(part).nbytes


def _is_delimiter(part: Any) -> bool:
    try:
        return len(part) == len(DELIMITER) and bytes(part) == DELIMITER
    except TypeError:
        return False


def install(app: Any) -> tuple[EmissionOrder, IOPubBacklog | None]:
    """Number what the kernel app's sockets send to the pump; call after
    C{app.initialize()}, before the pump starts relaying. Returns the order
    and the IOPub backlog replies wait for, for sockets made later (None
    when the kernel publishes directly: there is none to wait for)."""
    order = EmissionOrder()
    thread = getattr(app, "iopub_thread", None)
    backlog = IOPubBacklog(thread) if thread is not None else None
    if thread is not None:
        order.stamp(thread.socket, bounded=True)
    # IOPub straight from the publishing threads (cellmux.kernel.tuning):
    # then nothing a reply must follow waits in the IOPub thread's queue.
    from .tuning import publish_directly

    if publish_directly(app, order):
        backlog = None
    replies = [
        app.shell_socket,
        app.stdin_socket,
        app.control_socket,
        # the main shell's replies, straight to the pump (cellmux.kernel.tuning)
        getattr(app.kernel, "cellmux_replies_socket", None),
    ]
    for socket in replies:
        if socket is not None:
            order.stamp(socket, after=backlog)
    return order, backlog
