"""Make a kernel's output calls wait when its clients cannot keep up.

Stock ipykernel never blocks print(): text goes into an in-memory buffer
that the IOPub thread flushes to a PUB socket, which drops messages once
its queue is full. cellmux wants neither loss nor unbounded memory, so:

* the iopub socket gets XPUB_NODROP: a full queue (the pump is out of
  credit, see cellmux.protocol.link) blocks the IOPub thread instead of
  dropping. ZeroMQ counts that queue in messages, not bytes, and ipykernel
  sends all text buffered since its last flush as one message, so the
  queue is kept to IOPUB_QUEUE messages on each side, and to
  IOPUB_QUEUE_BYTES bytes in all by the emission order's count
  (cellmux.kernel.ordering): otherwise a thousand large messages would pile
  up in the kernel before anything blocks, while a flood of one-line
  messages needs a queue long enough not to wait for the pump every few
  lines;
* stdout/stderr flush synchronously after every OUTPUT_BUDGET characters,
  so print() waits for that blocked thread rather than buffering forever;
* IPython 9's per-cell copy of everything a cell prints (``_tee``, kept in
  memory for its output history) is turned off: a cell printing for an hour
  would otherwise hold all of it. The server's replay log keeps recent
  output for clients instead.
"""

from __future__ import annotations

import contextlib
import sys
import threading

import zmq

__all__ = [
    "IOPUB_QUEUE",
    "IOPUB_QUEUE_BYTES",
    "OUTPUT_BUDGET",
    "PUBLISHED_QUEUE",
    "install",
    "prepare_iopub_socket",
]

#: Characters a stream may buffer before a write waits for the flush.
OUTPUT_BUDGET = 1024 * 1024
#: Messages the iopub queue holds on each side of the inproc pipe (the pump
#: sets the same on its SUB socket). Each hand-off between the IOPub thread
#: and the pump costs both a wake-up: 4 made a flood of flushed lines pay
#: one every few lines.
IOPUB_QUEUE = 32
#: Messages the queue of what the kernel's threads publish directly
#: (cellmux.kernel.tuning, ``direct``) holds on each side: the publishing
#: thread (the cell's) and the pump take the GIL in turns, and each turn
#: costs both a wake-up; a longer queue lets each turn move more messages
#: (its bytes are bounded by IOPUB_QUEUE_BYTES all the same).
PUBLISHED_QUEUE = 256
#: Bytes the iopub queue holds in all, however many messages (one message
#: alone may be larger: it goes when the queue is empty).
IOPUB_QUEUE_BYTES = 1024 * 1024


def _sent(stream) -> None:
    """Flush, and return only once the IOPub thread has *sent* the text.

    OutStream.flush() returns when the IOPub thread has turned the buffer
    into a message and queued its send; an event scheduled after that runs
    only once the send went through, i.e. once the pump had room. Waiting in
    one-second slices keeps the wait interruptible (Ctrl-C still works).
    """
    stream.flush()
    thread = stream.pub_thread
    if thread is None or thread.thread is None or not thread.thread.is_alive():
        return
    done = threading.Event()
    thread.schedule(done.set)
    while not done.wait(1.0):
        pass


def _bound(stream) -> None:
    """Make C{stream}'s writes wait for the pump after every OUTPUT_BUDGET."""
    write = stream.write
    pending = 0

    def bounded_write(string: str) -> int | None:
        nonlocal pending
        written = write(string)
        pending += len(string)
        if pending > OUTPUT_BUDGET:
            pending = 0
            _sent(stream)
        return written

    stream.write = bounded_write


def prepare_iopub_socket(socket: zmq.Socket) -> None:
    """Bound the kernel's iopub queue; call before the socket binds.

    libzmq takes an inproc pipe's size from the options the bound side had
    when it bound: a high-water mark set afterwards is ignored, and the
    queue stays at the default 1000 messages (each up to OUTPUT_BUDGET
    characters: a gigabyte in a kernel whose client stopped reading).
    """
    socket.setsockopt(zmq.SNDHWM, IOPUB_QUEUE)
    socket.setsockopt(zmq.XPUB_NODROP, 1)


def install(app) -> None:
    """Apply the rest to an initialised kernel app (prepare_iopub_socket
    made its iopub socket wait instead of drop, and bounded its queue)."""
    shell = getattr(app, "shell", None)
    if shell is not None and hasattr(shell, "_tee"):
        shell._tee = lambda channel: contextlib.nullcontext()
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "pub_thread"):
            _bound(stream)
