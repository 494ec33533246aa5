# -*- test-case-name: tests.test_tuning -*-
"""Latency changes to stock ipykernel, applied inside each forked kernel.

Stock ipykernel 7 spends most of a ``1+1`` round trip waiting: six
round trips to the IOPub thread to flush streams that hold nothing, a
fixed 0.5 ms sleep before every execute_reply, and debug log records built
only to be dropped by the handler. This module removes the waits that are
safe to remove, and keeps the ordering Jupyter clients rely on:

* ``busy`` comes first and ``idle`` last for every request, and nothing a
  request printed (through ``sys.stdout``, the fd, or a subprocess) arrives
  after its ``idle``;
* output printed before a display (an ``execute_result``, ``display()``)
  still arrives before it;
* every IOPub message of an execute_request is handed to the IOPub socket
  before its execute_reply is sent (the *barrier*).

The changes, each measured in docs/benchmarks.md:

1. ``_execute_sleep = 0``, replaced by the barrier, plus the old pause only
   when stream text was flushed during the request.
2. A flush that returns at once when nothing is buffered *and* nothing is
   in flight on the redirected fd. The fd watcher thread is changed to
   ``select()`` first, then raise a "moving" flag, then read, so that a
   flush can tell "nothing there" from "read but not yet buffered": it
   checks the pipe (FIONREAD), then the flag, then the buffers, and waits
   (bounded) for data in flight before taking the usual slow path.
3. One wake-up message to the IOPub thread per batch of scheduled events
   instead of one per event (the queue stays FIFO).
4. The kernel's logger filters at its own level instead of building every
   debug record for the handler to drop.
5. One throwaway ``1+1`` runs before the kernel is handed out (see
   L{warm_up}), so a client's first cell does not pay for what IPython and
   ipykernel do only once: the display formatters are created on the first
   display, the main thread's IOPub wake-up socket on its first publish;
   it runs through ipykernel's execute_request, as a client's cell does.
6. ``flush()`` queues the text it takes for the IOPub thread instead of
   waiting for a thread round trip (see L{_patch_flush_ahead}).
7. The main shell's replies go from the main thread straight to the pump
   instead of through ipykernel's shell-channel thread (see
   L{_send_main_replies_to_pump}); needs ``sleep``'s reply barrier.
8. Those replies are queued on the IOPub thread behind the cell's output
   instead of the main thread waiting for that thread to send it (the
   reply barrier): the queue is FIFO, so the order is the same and the main
   thread is free at once; stock's pause before the reply of a cell that
   printed goes too (``fifo``, with ``replies``; see L{_RepliesByPeer}).
9. A cell is transformed once: ipykernel transforms it to decide whether to
   run it as a coroutine, then IPython's ``run_cell`` transforms the same
   string again; and ipykernel's check of ``run_cell``'s signature is made
   once, not per cell (``once``; see L{_transform_once}).
10. What the kernel publishes on IOPub is sent by the thread that publishes
    it, straight to the pump, instead of through ipykernel's IOPub thread
    (``direct``, with ``replies``, ``ahead`` and ``flush``; see
    L{publish_directly}): no thread hand-off per message, and a cell's
    output, reply and ``idle`` leave in the order the cell made them.

The patches change classes inside the forked kernel process only (never in
the nursery, which is their parent), and must be installed before
``IPKernelApp.initialize`` creates the output streams.

The kernel environment variable ``CELLMUX_KERNEL_TUNING`` picks the changes:
unset or ``all`` for all of them, ``none`` for stock ipykernel, or a comma
list of ``sleep``, ``flush``, ``wakes``, ``log``, ``warm``, ``ahead``,
``replies``, ``fifo``, ``once``, ``direct`` (the benchmarks measure each one
this way; an operator can turn one off through ``kernel_env``).
"""

from __future__ import annotations

import array
import fcntl
import functools
import os
import select
import sys
import termios
import threading
import time
from collections import defaultdict
from io import StringIO
from typing import Any

import zmq

from cellmux.protocol.link import bundle_entry

__all__ = [
    "CHANGES",
    "IN_FLIGHT_WAIT",
    "STREAM_PAUSE",
    "install",
    "publish_directly",
    "selected",
    "warm_up",
]

#: The changes this module can make, by the names CELLMUX_KERNEL_TUNING uses.
CHANGES = (
    "sleep",
    "flush",
    "wakes",
    "log",
    "warm",
    "ahead",
    "replies",
    "fifo",
    "once",
    "direct",
)
#: What ``direct`` needs: it relies on each of these (see L{publish_directly}).
DIRECT_NEEDS = frozenset({"sleep", "flush", "ahead", "replies"})

#: Longest a flush waits for fd output that the watcher thread is still
#: moving (stock waits for none; a process writing faster than this is not
#: "in flight" any more, it is still running).
IN_FLIGHT_WAIT = 0.1
#: Pause kept before execute_reply when stream text was published during
#: the request (stock pauses this long for every request).
STREAM_PAUSE = 0.0005
#: How long the reply barrier waits for the IOPub thread (stock's flush
#: timeout is 10 s; a wedged IOPub thread must not wedge the shell).
BARRIER_TIMEOUT = 10.0
#: Events the IOPub queue may hold before flush() waits for it (a queued
#: flush holds its text until sent), and the largest flush that may queue.
FLUSH_AHEAD = 64
FLUSH_AHEAD_BYTES = 64 * 1024

_installed: set[str] = set()
#: Held by a flush from taking a stream's text until it is sent, when the
#: kernel publishes directly: a flush that found nothing to take then
#: knows that what an earlier one took is already numbered and sent
#: (an RLock: a stream hook may print).
_SENDING = threading.RLock()


def selected(value: str | None) -> frozenset[str]:
    """The changes named by a CELLMUX_KERNEL_TUNING value.

    @raise ValueError: for a name that is not in L{CHANGES}.
    """
    value = (value or "all").strip()
    if value == "all":
        return frozenset(CHANGES)
    if value == "none":
        return frozenset()
    names = frozenset(n.strip() for n in value.split(",") if n.strip())
    unknown = sorted(names - set(CHANGES))
    if unknown:
        raise ValueError(f"CELLMUX_KERNEL_TUNING: unknown {', '.join(unknown)}")
    return names


def _pipe_pending(fd: int) -> int:
    """Bytes waiting in a pipe (FIONREAD); 0 when it cannot tell."""
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(fd, termios.FIONREAD, buf, True)
    except OSError:
        return 0
    return buf[0]


def _patch_outstream() -> None:
    from ipykernel import iostream

    OutStream = iostream.OutStream
    stock_flush = OutStream.flush
    pipe_chunk = iostream.PIPE_BUFFER_SIZE

    def _watch_pipe_fd(self) -> None:
        # Same job as stock: move what is written to fd 1/2 into the stream.
        # The order (select, flag, read, write, unflag) is what lets flush
        # trust "pipe empty and flag down" to mean "nothing in flight".
        if self._fid is None:
            return
        self._cellmux_moving = False
        try:
            while self._should_watch:
                select.select([self._fid], [], [])
                self._cellmux_moving = True
                try:
                    data = os.read(self._fid, pipe_chunk)
                    if not data or not self._should_watch:
                        return
                    self.write(data.decode(errors="replace"))
                    os.write(self._original_stdstream_copy, data)
                finally:
                    self._cellmux_moving = False
        except Exception:
            self._exc = sys.exc_info()

    def _in_flight(self) -> bool:
        fid = getattr(self, "_fid", None)
        if fid is None or not self._should_watch:
            return False
        return _pipe_pending(fid) > 0 or getattr(self, "_cellmux_moving", False)

    def _buffered(self) -> bool:
        with self._buffer_lock:
            return any(buffer.tell() for buffer in self._buffers.values())

    def flush(self) -> None:
        thread = self.pub_thread.thread if self.pub_thread is not None else None
        if thread is None or not thread.is_alive() or thread.ident == threading.get_ident():
            stock_flush(self)
            return
        if _in_flight(self):
            deadline = time.monotonic() + IN_FLIGHT_WAIT
            while _in_flight(self) and time.monotonic() < deadline:
                time.sleep(0.0002)
        elif not _buffered(self):
            # Nothing to send. What was published before this call went
            # through the IOPub thread's FIFO queue, so anything published
            # after it is still ordered behind it.
            return
        stock_flush(self)

    OutStream._watch_pipe_fd = _watch_pipe_fd  # type: ignore[method-assign]  # patched on purpose
    OutStream.flush = flush  # type: ignore[method-assign]  # patched on purpose


def _patch_flush_counter() -> None:
    from ipykernel.iostream import OutStream

    stock_flush_impl = OutStream._flush

    def _flush(self) -> None:
        # Count flushes that carry text, for the pause before the reply.
        with self._buffer_lock:
            text = any(buffer.tell() for buffer in self._buffers.values())
        if text:
            self.pub_thread._cellmux_stream_flushes = (
                getattr(self.pub_thread, "_cellmux_stream_flushes", 0) + 1
            )
        stock_flush_impl(self)

    OutStream._flush = _flush  # type: ignore[method-assign]  # patched on purpose


def _patch_iopub_wakes() -> None:
    from ipykernel.iostream import IOPubThread

    def schedule(self, f) -> None:
        if not self.thread.is_alive():
            f()
            return
        self._events.append(f)
        # One wake per batch: _handle_event lowers the flag before it counts
        # the queue, so an event appended after the count finds it lowered
        # and sends its own wake.
        if not getattr(self, "_cellmux_wake_pending", False):
            self._cellmux_wake_pending = True
            self._event_pipe.send(b"")

    def _handle_event(self, msg) -> None:
        self._cellmux_wake_pending = False
        for _ in range(len(self._events)):
            self._events.popleft()()

    IOPubThread.schedule = schedule  # type: ignore[method-assign]  # patched on purpose
    IOPubThread._handle_event = _handle_event  # type: ignore[method-assign]  # patched on purpose
    _patch_stream_events()


def _patch_stream_events() -> None:
    """Fewer IOPub events per ``print(..., flush=True)``: stock schedules
    three (arm a timer, flush, signal) and arms a fresh 0.2 s timer for
    every line; here a flush is one event and one timer stays armed."""
    from ipykernel.iostream import OutStream

    stock_flush = OutStream.flush

    def _schedule_flush(self) -> None:
        if self._flush_pending:
            return
        self._flush_pending = True
        # An armed timer fires within flush_interval of an earlier write,
        # so text written since is sent no later than stock would send it.
        if getattr(self, "_cellmux_timer_armed", False):
            return
        self._cellmux_timer_armed = True

        def fire() -> None:
            self._cellmux_timer_armed = False
            self._flush()

        def arm() -> None:
            self._io_loop.call_later(self.flush_interval, fire)

        self.pub_thread.schedule(arm)

    def flush(self) -> None:
        thread = self.pub_thread.thread if self.pub_thread is not None else None
        if thread is None or not thread.is_alive() or thread.ident == threading.get_ident():
            stock_flush(self)
            return
        done = threading.Event()

        def flush_then_signal() -> None:
            try:
                self._flush()
            finally:
                done.set()

        self.pub_thread.schedule(flush_then_signal)
        if not done.wait(self.flush_timeout):
            print("IOStream.flush timed out", file=sys.__stderr__)

    OutStream._schedule_flush = _schedule_flush  # type: ignore[method-assign]  # patched on purpose
    OutStream.flush = flush  # type: ignore[method-assign]  # patched on purpose


def _patch_flush_ahead() -> None:
    """flush() hands its text to the IOPub thread and returns.

    Stock flush() waits until the IOPub thread has turned the buffer into a
    message: a thread round trip per ``print(..., flush=True)``. Here the
    caller takes the buffered text itself (so each flush is still exactly
    one message, with what was written before it) and queues its sending;
    the IOPub thread sends queued flushes in batches, straight to its
    socket. What Jupyter clients rely on keeps holding: the queue is FIFO
    (the 0.2 s timer's flush sends through it too), and the reply and
    input_request barriers wait for it. At most
    FLUSH_AHEAD events (flushes of up to FLUSH_AHEAD_BYTES each) wait in
    the IOPub queue; a larger flush waits as stock does.
    """
    from ipykernel.iostream import OutStream

    from .interrupts import shield

    stock_flush = OutStream.flush

    def _send(self, buffers: dict) -> None:
        # In the IOPub thread: its socket is ours to use directly.
        thread = self.pub_thread
        target = thread.socket if thread.thread.ident == threading.get_ident() else thread
        for frozen_parent, buffer in buffers.items():
            text, parent = buffer.getvalue(), dict(frozen_parent)
            buffer.close()
            if not text:
                continue
            self.session.pid = os.getpid()
            msg = self.session.msg("stream", {"name": self.name, "text": text}, parent=parent)
            for hook in self._hooks:
                msg = hook(msg)
                if msg is None:
                    return
            self.session.send(target, msg, ident=self.topic)

    def flush(self) -> None:
        thread = self.pub_thread.thread if self.pub_thread is not None else None
        if thread is None or not thread.is_alive() or thread.ident == threading.get_ident():
            stock_flush(self)
            return
        if getattr(self.pub_thread, "cellmux_direct", None) is not None:
            _flush_directly(self)
            return
        # Bound what waits in the IOPub queue by its length (a counter of
        # our own could leak a count to a KeyboardInterrupt). A client that
        # reads nothing keeps us here: the kernel slows to its pace.
        while len(self.pub_thread._events) >= FLUSH_AHEAD:
            _iopub_barrier(self.pub_thread)
        # Taken out of the buffer means queued: Ctrl-C waits for both.
        with shield:
            with self._buffer_lock:
                buffers, self._buffers = self._buffers, defaultdict(StringIO)
            size = sum(buffer.tell() for buffer in buffers.values())
            if size:
                # Counted like stock flushes with text (the pause before the
                # reply), here, so that the main thread sees it at once.
                thread = self.pub_thread
                thread._cellmux_stream_flushes = getattr(thread, "_cellmux_stream_flushes", 0) + 1
            self.pub_thread.schedule(functools.partial(_send, self, buffers))
        if size > FLUSH_AHEAD_BYTES:
            _iopub_barrier(self.pub_thread)

    OutStream.flush = flush  # type: ignore[method-assign]  # patched on purpose


def _flush_directly(stream: Any) -> None:
    """Take C{stream}'s text and send it, in this thread (change ``direct``).

    Taking and sending are one step for Ctrl-C (L{shield}) and for other
    flushes (L{_SENDING}). A send that waits for room (a client that reads
    nothing) gives up on a Ctrl-C held meanwhile: the text goes back to the
    front of the buffer, and the shield raises the interrupt at its end.
    """
    from .interrupts import shield
    from .ordering import SendAbandoned

    with shield, _SENDING:
        with stream._buffer_lock:
            buffers, stream._buffers = stream._buffers, defaultdict(StringIO)
        items = [(parent, buffer.getvalue()) for parent, buffer in buffers.items()]
        for buffer in buffers.values():
            buffer.close()
        if any(text for _, text in items):
            thread = stream.pub_thread
            thread._cellmux_stream_flushes = getattr(thread, "_cellmux_stream_flushes", 0) + 1
        for at, (frozen_parent, text) in enumerate(items):
            if not text:
                continue
            try:
                _send_stream(stream, text, dict(frozen_parent))
            except SendAbandoned:
                _put_back(stream, items[at:])
                return


def _send_stream(stream: Any, text: str, parent: dict) -> None:
    """One stream message, through the stream's hooks, as stock's _flush."""
    frames = getattr(stream.pub_thread, "cellmux_stream_frames", None)
    if frames is not None and not stream._hooks:
        stream.pub_thread.send_multipart(*frames.laid_out(stream.name, text, parent))
        return
    stream.session.pid = _pid()
    msg = stream.session.msg("stream", {"name": stream.name, "text": text}, parent=parent)
    for hook in stream._hooks:
        msg = hook(msg)
        if msg is None:
            return
    stream.session.send(stream.pub_thread, msg, ident=stream.topic)


class StreamFrames:
    """The wire frames of a stream message, byte for byte what
    C{Session.send} makes of it, at less cost.

    A flood of flushed lines is one stream message per line, and
    C{Session.send}'s general path (a message dict, the parent header
    copied, the metadata copied, four packs, a dozen traitlets reads) was
    most of the kernel's work per line. Here the session's constant parts
    are read once, the packed parent and metadata are kept for the parent
    in use, and only the header and content are packed per message, with
    the session's own packer. Usable only for an unsigned session that
    adapts no version (L{usable}): the kernel's, whose link is
    authenticated on its own (cellmux.kernel.child).
    """

    #: Largest message laid out for a bundle (the pump sends larger ones
    #: alone, uncopied: cellmux.kernel.pump.BUNDLE_MESSAGE_MAX).
    LAID_OUT_MAX = 16 * 1024

    def __init__(self, session: Any) -> None:
        from jupyter_client.session import DELIM, utcnow
        from jupyter_client.session import protocol_version as version

        from cellmux.protocol import Channel, JupyterSocket

        self._channels = (int(Channel.STDOUT), int(Channel.STDERR))
        self._iopub = int(JupyterSocket.IOPUB)

        self._session = session
        self._pack = session.pack
        self._id = session.session
        self._username = session.username
        self._version = version
        self._now = utcnow
        self._delimiter = DELIM
        self._copy_threshold = session.copy_threshold
        self._metadata = self._pack(dict(session.metadata))
        self._parent: dict | None = None
        self._packed_parent = b""

    @staticmethod
    def usable(session: Any) -> bool:
        return session.auth is None and not session.adapt_version

    def __call__(
        self, name: str, text: str, parent: dict, topic: bytes | None
    ) -> tuple[list[bytes], int, bool]:
        """(frames, flags, copy) for C{send_multipart}, numbered as stock."""
        session = self._session
        number = session.message_count
        session.message_count = number + 1
        header = {
            "msg_id": f"{self._id}_{_pid()}_{number}",
            "msg_type": "stream",
            "username": self._username,
            "session": self._id,
            "date": self._now(),
            "version": self._version,
        }
        if parent != self._parent:
            # stock sends extract_header(parent): the header within, or itself
            inner = parent.get("header", parent) if parent else {}
            self._packed_parent = self._pack(dict(inner) if inner else {})
            self._parent = parent
        content = self._pack({"name": name, "text": text})
        frames = [] if topic is None else [topic]
        frames += [
            self._delimiter,
            b"",
            self._pack(header),
            self._packed_parent,
            self._metadata,
            content,
        ]
        return frames, 0, len(content) < self._copy_threshold

    def laid_out(self, name: str, text: str, parent: dict) -> tuple[list[Any], int, bool]:
        """The same message, for the pump's C{published} socket: a small
        one as three frames, the delimiter, the signature and the message
        laid out as in a link bundle (C{bundle_entry}: the pump puts it
        into its bundle as it is, and neither side moves four frames and a
        topic one by one); a large one as C{__call__}'s frames."""
        frames, flags, copy = self(name, text, parent, None)
        size = sum(map(len, frames[2:]))
        if size > self.LAID_OUT_MAX:
            return frames, flags, copy
        channel = self._channels[name == "stderr"]
        return [self._delimiter, b"", bundle_entry(channel, self._iopub, frames[2:])], 0, True


#: This process's id, kept up to date across forks: stock asks the system
#: for it on every write and every message (a system call each).
_process_id = [os.getpid()]


def _pid() -> int:
    return _process_id[0]


def _forked() -> None:
    global _SENDING
    _process_id[0] = os.getpid()
    # Held by another thread at the fork, it would stay held in the child
    # for ever (its holder was not copied): the child's prints would hang.
    _SENDING = threading.RLock()


os.register_at_fork(after_in_child=_forked)


def _patch_master_checks() -> None:
    """OutStream's and IOPubThread's "am I the kernel or a fork of it"
    check, made from the cached process id (see L{_pid})."""
    from ipykernel.iostream import IOPubThread, OutStream

    def _is_master_process(self) -> bool:
        return _pid() == self._master_pid

    OutStream._is_master_process = _is_master_process  # type: ignore[method-assign]  # patched on purpose
    IOPubThread._is_master_process = _is_master_process  # type: ignore[method-assign]  # patched on purpose


def _put_back(stream: Any, items: list[tuple[Any, str]]) -> None:
    """Text taken but not sent goes back before what was written since."""
    with stream._buffer_lock:
        for parent, text in items:
            if not text:
                continue
            since = stream._buffers.pop(parent, None)
            buffer = StringIO()
            buffer.write(text)
            if since is not None:
                buffer.write(since.getvalue())
                since.close()
            stream._buffers[parent] = buffer


def _patch_sending_lock() -> None:
    """Stock's _flush (the 0.2 s timer's, in the IOPub thread) takes and
    sends under L{_SENDING} too."""
    from ipykernel.iostream import OutStream

    stock_flush_impl = OutStream._flush

    def _flush(self) -> None:
        with _SENDING:
            stock_flush_impl(self)

    OutStream._flush = _flush  # type: ignore[method-assign]  # patched on purpose


def publish_directly(app: Any, order: Any) -> bool:
    """Send what the kernel publishes from the thread that publishes it.

    ipykernel hands every IOPub message to its IOPub thread, which
    serialises and sends it: a thread hand-off (and the wake-ups and GIL
    switches that go with it) per message. Here the publishing thread
    sends it itself, on a socket of the pump's (``published``), shared by
    all threads under the emission order's lock (which numbers each
    message as it enters the socket, cellmux.kernel.ordering). The order
    Jupyter clients rely on is then the order the kernel's threads
    published in: ``busy`` before the cell's output, the output (flushed
    by the cell's end, fd output in flight included: change ``flush``)
    before the reply, the reply (sent from the main thread, ``replies``)
    before ``idle``. A forked child of the kernel publishes as stock does
    (through the IOPub thread's pipe from subprocesses); a full socket makes
    the publisher wait for the pump, as the IOPub thread waited before.

    Call once the emission order is installed, before the pump relays.
    Returns whether it was done (the kernel asked for it in L{install}).
    """
    kernel = getattr(app, "kernel", None)
    thread = getattr(app, "iopub_thread", None)
    if not getattr(kernel, "cellmux_direct_iopub", False) or thread is None:
        return False
    from .flowcontrol import PUBLISHED_QUEUE
    from .interrupts import held_in_shield
    from .pump import INPROC_PORTS, inproc_endpoint

    socket = app.context.socket(zmq.PUSH)
    socket.linger = 1000
    socket.setsockopt(zmq.SNDHWM, PUBLISHED_QUEUE)
    socket.connect(inproc_endpoint(INPROC_PORTS["published"]))
    order.stamp(socket, bounded=True, abandon=held_in_shield)
    stock_send = thread.send_multipart
    send = socket.send_multipart
    master = _pid()

    def send_multipart(msg: Any, *args: Any, **kwargs: Any) -> Any:
        if _pid() != master:
            return stock_send(msg, *args, **kwargs)  # a fork: no socket of ours
        return send(msg, *args, **kwargs)

    thread.send_multipart = send_multipart
    thread.cellmux_direct = socket
    session = getattr(app, "session", None)
    if session is not None and StreamFrames.usable(session):
        thread.cellmux_stream_frames = StreamFrames(session)
    return True


def _iopub_barrier(iopub_thread: Any) -> None:
    """Return once the IOPub thread has run everything scheduled so far."""
    thread = getattr(iopub_thread, "thread", None)
    if thread is None or not thread.is_alive() or thread.ident == threading.get_ident():
        return
    done = threading.Event()
    iopub_thread.schedule(done.set)
    done.wait(BARRIER_TIMEOUT)


def _tune_kernel(app: Any, changes: frozenset[str]) -> None:
    """What needs the kernel object: the reply barrier and the logger."""
    kernel = app.kernel
    iopub_thread = app.iopub_thread
    if changes & {"flush", "wakes"}:
        # Both let the IOPub thread publish in bursts faster than the pump
        # may read; a PUB socket drops silently at its high-water mark, so
        # make it block instead (cellmux.kernel.flowcontrol does the same).
        iopub_thread.socket.setsockopt(zmq.XPUB_NODROP, 1)
    if "log" in changes:
        # traitlets leaves the logger at DEBUG and filters in the handler.
        app.log.setLevel(app.log_level)
    if "flush" in changes:
        # input_request goes out on the stdin socket, past the IOPub queue:
        # what the cell published before asking must be out first (a stock
        # flush waited for the queue even when it had no text to send).
        # Flush first: with ``ahead`` a flush only queues the text, so the
        # barrier must come after it, not before stock's own flushes.
        stock_input_request = kernel._input_request

        @functools.wraps(stock_input_request)
        def _input_request(*args: Any, **kwargs: Any) -> Any:
            for stream in (sys.stdout, sys.stderr):
                if stream is not None:
                    stream.flush()
            _iopub_barrier(iopub_thread)
            return stock_input_request(*args, **kwargs)

        kernel._input_request = _input_request
    once = _transform_once(kernel) if "once" in changes else None
    if "sleep" not in changes:
        return
    queued = False
    direct = "direct" in changes and changes >= DIRECT_NEEDS
    if "replies" in changes:
        # Without ``flush``, a flush does not wait for fd output in flight:
        # the barrier and pause stay (queued replies or not). Published
        # directly, output is sent by the flush itself: the reply is sent
        # after it by the main thread, not queued behind it.
        fifo = "fifo" in changes and "flush" in changes and not direct
        queued = _send_main_replies_to_pump(kernel, app.context, queued=fifo)
        if direct and getattr(kernel, "cellmux_replies_socket", None) is not None:
            # switched on by cellmux.kernel.ordering.install (publish_directly)
            kernel.cellmux_direct_iopub = True
            queued = True
    stock_do_execute = kernel.do_execute

    @functools.wraps(stock_do_execute)
    async def do_execute(*args: Any, **kwargs: Any) -> Any:
        before = getattr(iopub_thread, "_cellmux_stream_flushes", 0)
        try:
            reply = await stock_do_execute(*args, **kwargs)
        finally:
            if once is not None:
                once.forget()
        # Stock flushes again after this returns; those calls are then cheap.
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        if queued:
            # The reply will be queued behind all of the cell's output (the
            # flushes above took what was buffered or in flight on the fd),
            # or (``direct``) that output is sent already, and numbered
            # after it (cellmux.kernel.ordering): neither the barrier nor
            # stock's pause for late stream text is needed.
            return reply
        _iopub_barrier(iopub_thread)
        if getattr(iopub_thread, "_cellmux_stream_flushes", 0) != before:
            time.sleep(STREAM_PAUSE)
        return reply

    kernel.do_execute = do_execute


class _TransformOnce:
    """The main shell's ``transform_cell``, run once per execute_request.

    ipykernel's do_execute transforms the cell (to pass the result to
    ``should_run_async``), and when the cell is not a coroutine it calls
    ``shell.run_cell(code)``, whose ``_run_cell`` transforms the very same
    string again. The first result is kept, for that exact string object,
    until the request ends (L{forget}); any other string, a cell run by the
    user's own code included, is transformed as usual. A transform that
    raised is not kept: the second call raises again, as stock.
    """

    def __init__(self, transform: Any) -> None:
        self._transform = transform
        self._raw: str | None = None
        self._transformed: str | None = None

    def __call__(self, raw_cell: str) -> str:
        if raw_cell is self._raw and self._transformed is not None:
            transformed = self._transformed
            self.forget()  # two calls per request: the second is the last
            return transformed
        transformed = self._transform(raw_cell)
        self._raw, self._transformed = raw_cell, transformed
        return transformed

    def forget(self) -> None:
        self._raw = self._transformed = None


def _transform_once(kernel: Any) -> _TransformOnce | None:
    """Transform each cell once, and check run_cell's signature once."""
    shell = getattr(kernel, "shell", None)
    if shell is None:
        return None
    once = _TransformOnce(shell.transform_cell)
    # An instance attribute, as cellmux.kernel.sourcemap and debugging
    # wrap it (they are installed later and call this one).
    shell.transform_cell = once
    from ipykernel import ipkernel

    stock_accepts = ipkernel._accepts_parameters
    known: dict[tuple[Any, tuple[str, ...]], Any] = {}

    @functools.wraps(stock_accepts)
    def accepts_parameters(meth: Any, param_names: list[str]) -> Any:
        # inspect.signature on every cell, for a method that never changes
        # while it is the same function (a wrapper set later is a new key).
        key = (getattr(meth, "__func__", meth), tuple(param_names))
        if key not in known:
            known[key] = stock_accepts(meth, param_names)
        return dict(known[key])

    ipkernel._accepts_parameters = accepts_parameters
    return once


def _send_main_replies_to_pump(kernel: Any, context: zmq.Context, queued: bool = False) -> bool:
    """Send the main shell's replies straight to the pump.

    ipykernel 7 hands each reply of the main shell to its shell-channel
    thread, which sends it on the shell socket: one more thread to wake per
    request. The pump reads replies on an inproc socket of its own as well,
    so the main thread can send them there. Subshells keep the stock path.
    The pump drains iopub before replies, and the reply barrier (``sleep``)
    has handed the request's output to the IOPub socket before the reply is
    sent, so a reply still comes after its output.

    @param queued: send those replies from the IOPub thread, queued behind
        what the request published (``fifo``), so that the main thread need
        not wait for that thread before it replies.
    @return: whether replies are queued so.
    """
    from .pump import INPROC_PORTS, PUMP_ROUTING_ID, inproc_endpoint

    thread = getattr(kernel, "shell_channel_thread", None)
    if thread is None or not getattr(kernel, "_supports_kernel_subshells", False):
        return False  # ipykernel 6: replies go out on the shell socket directly
    manager = thread.manager  # made on first use, in this (the main) thread
    replies = context.socket(zmq.PUSH)
    replies.linger = 1000
    replies.connect(inproc_endpoint(INPROC_PORTS["replies"]))
    # numbered like the kernel's own sockets (cellmux.kernel.ordering)
    kernel.cellmux_replies_socket = replies
    stock = manager.get_subshell_to_shell_channel_socket
    iopub_thread = kernel.iopub_thread if queued else None
    to_pump = _RepliesByPeer(replies, lambda: stock(None), PUMP_ROUTING_ID, iopub_thread)

    @functools.wraps(stock)
    def reply_socket(subshell_id: str | None) -> Any:
        return to_pump if subshell_id is None else stock(subshell_id)

    manager.get_subshell_to_shell_channel_socket = reply_socket
    return queued


class _RepliesByPeer:
    """The main shell's reply socket: the pump's replies, or stock for other peers.

    Only the pump's requests may be answered on its own socket. The kernel
    has one more shell peer inside the process: the debugger's
    ``debug_shell_socket``, which sends an ``execute_request`` (starting
    debugpy) and blocks the control thread until its reply comes back on
    that socket. Sent to the pump, that reply went to the server instead and
    the ``debug_request`` never got its ``debug_reply``.

    Given the IOPub thread, the pump's replies are sent from there, queued
    behind everything published before them (the queue is FIFO): the order
    the reply barrier kept, without the main thread waiting for it. Only
    that thread then uses the socket (zmq sockets are not thread-safe).
    """

    def __init__(
        self, replies: zmq.Socket, stock: Any, pump_id: bytes, iopub_thread: Any = None
    ) -> None:
        self._replies = replies
        self._stock = stock
        self._pump_id = pump_id
        self._iopub_thread = iopub_thread

    def __getattr__(self, name: str) -> Any:
        # Everything else (socket_type, closed, …) is the pump's socket's.
        return getattr(self._replies, name)

    def send_multipart(self, parts: Any, *args: Any, **kwargs: Any) -> Any:
        first = parts[0] if parts else b""
        ident = first if isinstance(first, bytes) else getattr(first, "bytes", b"")
        if ident == self._pump_id:
            if self._iopub_thread is None:
                return self._replies.send_multipart(parts, *args, **kwargs)
            # Looked up per call: cellmux.kernel.ordering counts what is
            # scheduled (its own barrier for the other sockets' replies).
            send = functools.partial(self._replies.send_multipart, list(parts), *args, **kwargs)
            self._iopub_thread.schedule(send)
            return None
        return self._stock().send_multipart(parts, *args, **kwargs)


def install(app: Any, changes: frozenset[str] | None = None) -> None:
    """Tune C{app} (an IPKernelApp); call before C{app.initialize()}.

    @param changes: which of L{CHANGES}; default: from CELLMUX_KERNEL_TUNING.
    @raise ValueError: if CELLMUX_KERNEL_TUNING names an unknown change.
    """
    if changes is None:
        changes = selected(os.environ.get("CELLMUX_KERNEL_TUNING"))
    # wakes first: the flush fast path wraps whichever slow flush is there.
    if "wakes" in changes and "wakes" not in _installed:
        _patch_iopub_wakes()
        _installed.add("wakes")
    if "ahead" in changes and "ahead" not in _installed:
        _patch_flush_ahead()
        _installed.add("ahead")
    if "flush" in changes and "flush" not in _installed:
        _patch_outstream()
        _installed.add("flush")
    if "direct" in changes and changes >= DIRECT_NEEDS and "direct" not in _installed:
        _patch_sending_lock()
        _patch_master_checks()
        _installed.add("direct")
    if "sleep" in changes:
        if "sleep" not in _installed:
            _patch_flush_counter()
            _installed.add("sleep")
        app.config.IPythonKernel._execute_sleep = 0.0
    stock_init_kernel = app.init_kernel

    def init_kernel() -> None:
        stock_init_kernel()
        _tune_kernel(app, changes)

    app.init_kernel = init_kernel


def warm_up(app: Any, changes: frozenset[str] | None = None) -> None:
    """Run one cell nobody sees, leaving the user's namespace as it was.

    Call after C{app.initialize()} and before anything subscribes to IOPub:
    with no subscriber, the cell's messages go nowhere. The cell is not
    stored in the history and does not count (C{store_history=False}); the
    display hook's traces (C{_}, C{_N}, C{Out}) are taken back. It runs as
    an execute_request through the kernel (its reply discarded), so that
    the whole request path is warm, not only IPython's (the kernel's
    C{cellmux_warm_up} says which ran: ``execute_request`` or ``run_cell``).
    """
    if changes is None:
        changes = selected(os.environ.get("CELLMUX_KERNEL_TUNING"))
    shell = getattr(app, "shell", None)
    if "warm" not in changes or shell is None:
        return
    user_ns, hidden = dict(shell.user_ns), dict(shell.user_ns_hidden)
    outputs = dict(shell.user_ns.get("_oh", {}))
    kernel = getattr(app, "kernel", None)
    if kernel is None or not _warm_request(kernel):
        shell.run_cell("1+1", store_history=False, silent=False)
        if kernel is not None:
            kernel.cellmux_warm_up = "run_cell"
    else:
        kernel.cellmux_warm_up = "execute_request"
    shell.user_ns.clear()
    shell.user_ns.update(user_ns)
    shell.user_ns_hidden.clear()
    shell.user_ns_hidden.update(hidden)
    if "_oh" in user_ns:
        user_ns["_oh"].clear()
        user_ns["_oh"].update(outputs)
    hook = shell.displayhook
    hook._ = hook.__ = hook.___ = ""


class _Discarded:
    """Where the warm-up's reply goes: nowhere."""

    def send_multipart(self, *args: Any, **kwargs: Any) -> None:
        return None


def _warm_request(kernel: Any) -> bool:
    """Run one ``1+1`` through the kernel's execute_request, as a client's
    would run, so that its first-time costs (ipykernel's request path, the
    reply's serialisation, the pages the fork shares with the nursery
    touched by that path) are not the client's. The coroutine is driven by
    hand: for a cell like this one nothing in it waits on the event loop,
    which is not running yet. Returns False if it could not run so."""
    parent = kernel.session.msg(
        "execute_request",
        {
            "code": "1+1",
            "silent": False,
            "store_history": False,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": False,
        },
    )
    coro = kernel.execute_request(_Discarded(), [b"cellmux-warm-up"], parent)
    try:
        coro.send(None)
    except StopIteration:
        return True
    except Exception:
        return False
    coro.close()  # it waited for something: leave it to the loop's first cell
    return False
