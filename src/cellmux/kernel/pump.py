"""The pump: one thread in each kernel that joins ipykernel to the server.

ipykernel binds its shell, control, stdin and iopub sockets on ``inproc``
endpoints inside the kernel process. The pump connects to each of them (and
binds one of its own, where the main shell's replies can come straight from
the main thread) and to ONE DEALER socket on the server's link endpoint,
and moves messages between the two sides:

* kernel -> server: strip the routing delimiter and signature (the inproc
  session is unsigned: nothing outside this process can reach it), tag the
  message with its channel number and the socket it came from, send. The
  small messages read in one pass over the kernel's sockets go as one
  *bundle* (see :mod:`cellmux.protocol.link`): one ZeroMQ message instead
  of one per ``print(..., flush=True)`` under a flood, for the pump and the
  server alike.
* server -> kernel: the tag says which ipykernel socket the message goes to;
  add the delimiter and an empty signature, send.

Before relaying, the pump proves its identity (see
:mod:`cellmux.protocol.link`) and waits until the kernel answers a
kernel_info_request and its iopub subscription is live, so the server's
first client never races the kernel's start.
"""

from __future__ import annotations

import heapq
import itertools
import json
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import zmq

from cellmux.protocol import (
    BUNDLE_TAG,
    HEADER_SIZE,
    Channel,
    JupyterSocket,
    KernelSideLink,
    ProtocolError,
    bundle_bytes,
    bundle_entry,
    channel_for,
    decode_tag,
    encode_tag,
    split_bundle,
)
from cellmux.protocol.jupyter import jupyter_parts
from cellmux.protocol.link import ENTRY_HEAD

from .flowcontrol import IOPUB_QUEUE, PUBLISHED_QUEUE
from .introspection import INTROSPECTION_TYPES
from .ordering import stamp_of

try:  # faster; a kernel_python need not have it (only ipykernel, attrs, pyseccomp)
    import orjson

    _loads_json: Callable[..., Any] = orjson.loads
except ImportError:
    _loads_json = json.loads


__all__ = ["INPROC_PORTS", "Pump"]

DELIMITER = b"<IDS|MSG>"

#: The "ports" the kernel app binds its inproc sockets on; "replies" is
#: the pump's own, where the main shell's replies may come straight from
#: the main thread (cellmux.kernel.tuning, change ``replies``);
#: "introspection" is the pump's own too, towards the thread that answers
#: introspection requests while a cell runs (cellmux.kernel.introspection);
#: "published" is the pump's own IOPub, where the kernel's threads send
#: what they publish themselves instead of through ipykernel's IOPub thread
#: (cellmux.kernel.tuning, change ``direct``).
INPROC_PORTS = {
    "shell": 1,
    "stdin": 2,
    "control": 3,
    "iopub": 4,
    "replies": 5,
    "introspection": 6,
    "published": 7,
}

#: Routing id of the pump's shell, control and stdin sockets.
PUMP_ROUTING_ID = b"cellmux-pump"
#: How often to repeat kernel_info_request while the kernel starts.
NUDGE_INTERVAL = 0.2
#: Messages up to this many bytes go into bundles (copied once into the
#: bundle); larger ones are sent alone, uncopied.
BUNDLE_MESSAGE_MAX = 16 * 1024
#: A bundle is sent once it holds this many bytes or messages, or at the
#: end of the pass over the kernel's sockets, whichever comes first.
BUNDLE_MAX_BYTES = 256 * 1024
BUNDLE_MAX_MESSAGES = 256

#: In place of a channel in the bundle being made: a message the kernel
#: laid out already (L{Pump._laid_out}).
_LAID_OUT = -1

#: A flood, for the pump's pacing (L{FloodPace}): this many iopub
#: messages within FLOOD_WINDOW seconds; then FLOOD_PAUSE after each pass.
FLOOD_MESSAGES = 64
FLOOD_WINDOW = 0.01
FLOOD_PAUSE = 0.0003

_TAGS: dict[tuple[int, int], bytes] = {
    (channel, socket): encode_tag(channel, socket)
    for channel in Channel
    for socket in JupyterSocket
}


def inproc_endpoint(port: int) -> str:
    return f"inproc://cellmux-kernel-{port}"


def _stream_name(content: memoryview) -> str | None:
    # ipykernel serialises stream content as {"name": ..., "text": ...} in
    # that order; peek at the start instead of decoding a large text.
    head = bytes(content[:40])
    if b'"stderr"' in head:
        return "stderr"
    if b'"stdout"' in head:
        return "stdout"
    try:
        return json.loads(bytes(content)).get("name")
    except (ValueError, AttributeError):
        return None


def _view(part) -> memoryview:
    return memoryview(part) if isinstance(part, bytes) else part.buffer


def _msg_type(header: bytes) -> str:
    try:
        msg_type = json.loads(header).get("msg_type", "")
    except (ValueError, AttributeError):
        return ""
    return msg_type if isinstance(msg_type, str) else ""


class FloodPace:
    """Lets a flood of output pile up a little between the pump's passes.

    The cell's thread and the pump share the GIL: woken for every message
    of a flood, the pump takes the GIL from the cell once or twice a
    message, and each hand-off costs both threads a wake-up. Once more than
    FLOOD_MESSAGES iopub messages came within FLOOD_WINDOW seconds, the pump
    sleeps FLOOD_PAUSE after each pass (the GIL released), and then takes
    what piled up in one pass and one bundle. A lone message, and the first
    of a burst, are never held: the pause comes after a pass, and only in a
    flood; what waits meanwhile is bounded by the queue to the pump.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._window_start = -FLOOD_WINDOW
        self._count = 0

    def after_pass(self, read: int) -> None:
        """Called after each pass with the iopub messages it read."""
        if not read:
            return
        now = self._clock()
        if now - self._window_start > FLOOD_WINDOW:
            self._window_start, self._count = now, read
            return
        self._count += read
        if self._count >= FLOOD_MESSAGES:
            self._sleep(FLOOD_PAUSE)


class Reorder:
    """Puts the messages of several sockets back in the kernel's emission order.

    Each message carries its emission number (L{cellmux.kernel.ordering}),
    taken under one lock together with queueing it: when a message numbered
    N arrives, every message numbered below N is already queued in some
    socket, or will never come. So when numbers are missing before the
    lowest held message, the pump reads the other sockets on, one message
    at a time, each until it is empty or yields a number past the missing
    one (a socket's numbers only grow): whatever has not turned up by then
    is lost for good and skipped.

    Holds only what it read while looking for a missing number, and what
    waits for credit: a few messages.
    """

    def __init__(self) -> None:
        self._held: list[tuple[int, int, int, list]] = []
        self._arrival = itertools.count()
        #: The number expected next (None until the first numbered message).
        self.next: int | None = None

    def __bool__(self) -> bool:
        return bool(self._held)

    def hold(self, msg: list, socket: int) -> int | None:
        """Keep a message read from a kernel socket; return its number."""
        delimiter = next((i for i, f in enumerate(msg[:64]) if f.bytes == DELIMITER), None)
        if delimiter is None or delimiter + 1 >= len(msg):
            return None  # not a Jupyter message: dropped
        number = stamp_of(msg[delimiter + 1])
        # Unnumbered (no ordering installed): in arrival order, first.
        key = -1 if number is None else number
        heapq.heappush(self._held, (key, next(self._arrival), socket, msg))
        return number

    def missing(self) -> bool:
        """Whether numbers are missing before the lowest held message."""
        if not self._held or self.next is None:
            return False
        return self._held[0][0] > self.next

    def skip(self) -> None:
        """The missing numbers are lost: go on from the lowest held one."""
        self.next = self._held[0][0]

    def pop(self) -> tuple[int, list]:
        number, _, socket, msg = heapq.heappop(self._held)
        if number >= 0:
            self.next = max(number + 1, self.next or 0)
        return socket, msg


def classify(header: bytes, content: memoryview) -> int:
    """The channel of a kernel message, from its header (and stream name)."""
    try:
        msg_type = _loads_json(header).get("msg_type", "")
    except (ValueError, AttributeError):
        return Channel.KERNEL
    stream = _stream_name(content) if msg_type == "stream" else None
    return channel_for(msg_type, stream)


class Pump(threading.Thread):
    """The kernel's single I/O thread towards the server.

    @param context: the kernel app's ZeroMQ context (inproc needs it).
    @param endpoint: the server's link endpoint, e.g. ``ipc:///run/x.sock``.
    """

    def __init__(
        self,
        context: zmq.Context,
        endpoint: str,
        link_id: bytes,
        secret: bytes,
        pid: int,
        made_room: Callable[[int], None] = lambda taken: None,
    ) -> None:
        """@param made_room: called after the pump took messages out of the
        kernel's sockets, with the bytes (all frames) taken out of the iopub
        one, to wake senders waiting for a full one
        (L{cellmux.kernel.ordering.EmissionOrder.made_room})."""
        super().__init__(name="cellmux-pump", daemon=True)
        self._made_room = made_room
        self._context = context
        self._endpoint = endpoint
        self._link = KernelSideLink(link_id, secret, pid)
        self._link_id = link_id
        self._session = "cellmux-pump-" + uuid.uuid4().hex[:8]
        self._order = Reorder()
        #: Small messages waiting to go as one bundle, (channel, socket,
        #: parts) each, and their bytes: at most BUNDLE_MAX_* of them.
        #: (A message laid out by the kernel is (_LAID_OUT, 0, its entry).)
        self._bundle: list[tuple[int, int, Any]] = []
        self._bundle_size = 0

    def _socket(self, kind: int, endpoint: str) -> zmq.Socket:
        s = self._context.socket(kind)
        s.linger = 1000
        # ipykernel sends input_request to the stdin peer whose routing id
        # equals the shell request's sender: use one id on all sockets.
        s.routing_id = PUMP_ROUTING_ID
        s.connect(endpoint)
        return s

    def run(self) -> None:
        ctx = self._context
        link = ctx.socket(zmq.DEALER)
        link.routing_id = self._link_id
        link.linger = 2000
        # No ZMTP heartbeat: the link is a local socket (a dead server
        # closes it, and the nursery then ends the kernel), and a ping a
        # second woke both processes' I/O threads for every idle kernel.
        link.connect(self._endpoint)
        shell = self._socket(zmq.DEALER, inproc_endpoint(INPROC_PORTS["shell"]))
        control = self._socket(zmq.DEALER, inproc_endpoint(INPROC_PORTS["control"]))
        stdin = self._socket(zmq.DEALER, inproc_endpoint(INPROC_PORTS["stdin"]))
        iopub = ctx.socket(zmq.SUB)
        iopub.linger = 0
        # Bounded in messages (see flowcontrol): a pump out of credit must
        # make the kernel wait, not let gigabytes queue up in between.
        iopub.setsockopt(zmq.RCVHWM, IOPUB_QUEUE)
        iopub.subscribe(b"")
        iopub.connect(inproc_endpoint(INPROC_PORTS["iopub"]))
        published = ctx.socket(zmq.PULL)
        published.linger = 0
        published.setsockopt(zmq.RCVHWM, PUBLISHED_QUEUE)
        published.bind(inproc_endpoint(INPROC_PORTS["published"]))
        replies = ctx.socket(zmq.PULL)
        replies.linger = 0
        replies.bind(inproc_endpoint(INPROC_PORTS["replies"]))
        introspection = ctx.socket(zmq.PAIR)
        introspection.linger = 0
        introspection.bind(inproc_endpoint(INPROC_PORTS["introspection"]))

        self._authenticate(link)
        self._published = published
        self._wait_for_kernel(shell, replies, iopub, published)
        link.send_multipart(self._link.ready())
        self._relay(link, shell, control, stdin, iopub, published, replies, introspection)

    def _authenticate(self, link: zmq.Socket) -> None:
        link.send_multipart(self._link.hello())
        while not self._link.accepted:
            answer = self._link.receive(link.recv_multipart())
            if answer is not None:
                link.send_multipart(answer)

    def _wait_for_kernel(
        self, shell: zmq.Socket, replies: zmq.Socket, iopub: zmq.Socket, published: zmq.Socket
    ) -> None:
        """Nudge with kernel_info until both a reply and iopub arrive.

        A SUB socket misses what is published before its subscription
        reaches the publisher, so a reply alone proves nothing about iopub:
        keep asking until some iopub message (the status of a nudge) shows
        the subscription is live. (What the kernel publishes directly, on
        C{published}, is never lost that way; it counts as iopub too.)
        """
        poller = zmq.Poller()
        for sock in (shell, replies, iopub, published):
            poller.register(sock, zmq.POLLIN)
        replied = live = False
        next_nudge = 0.0
        while not (replied and live):
            if time.monotonic() >= next_nudge:
                parts = jupyter_parts(
                    "kernel_info_request", {}, now=datetime.now(UTC), session=self._session
                )
                shell.send_multipart([DELIMITER, b"", *parts])
                next_nudge = time.monotonic() + NUDGE_INTERVAL
            for sock, _ in poller.poll(int(NUDGE_INTERVAL * 1000)):
                while sock.poll(0):
                    msg = sock.recv_multipart(copy=False)
                    # What the kernel sent before the relay starts numbers
                    # nothing the clients will see.
                    self._order.hold(msg, 0)
                    while self._order:
                        self._order.pop()
                    if sock is iopub or sock is published:
                        live = True
                        self._made_room(sum(map(len, msg)))
                    else:
                        replied = True

    def _relay(self, link, shell, control, stdin, iopub, published, replies, introspection) -> None:
        to_kernel = {
            JupyterSocket.SHELL: shell,
            JupyterSocket.CONTROL: control,
            JupyterSocket.STDIN: stdin,
        }
        from_kernel = {
            shell: JupyterSocket.SHELL,
            control: JupyterSocket.CONTROL,
            stdin: JupyterSocket.STDIN,
            iopub: JupyterSocket.IOPUB,
            published: JupyterSocket.IOPUB,
            replies: JupyterSocket.SHELL,
            introspection: JupyterSocket.SHELL,
        }
        self._introspection = introspection
        self._from_kernel = from_kernel
        self._iopub = iopub
        everything = zmq.Poller()
        # The order of registration does not matter: what is read is
        # forwarded in the kernel's emission order (Reorder).
        for sock in (link, iopub, published, shell, replies, control, stdin, introspection):
            everything.register(sock, zmq.POLLIN)
        link_only = zmq.Poller()
        link_only.register(link, zmq.POLLIN)
        noblock = zmq.NOBLOCK
        flood = FloodPace()
        while True:
            # Out of credit: stop reading the kernel's sockets. Its iopub
            # queue fills, its IOPub thread blocks (XPUB_NODROP), and its
            # print() calls wait: the kernel slows to its clients' pace.
            poller = everything if self._link.credit > 0 else link_only
            read = 0
            for sock, _ in poller.poll():
                # Drain what is there (edge-triggered readiness must not
                # leave messages behind), but only while credit lasts.
                # (Until EAGAIN: sock.poll(0) builds a poller, and EVENTS an
                # enum, for every message.)
                taken = 0
                while sock is link or self._link.credit > 0:
                    try:
                        msg = sock.recv_multipart(noblock, copy=False)
                    except zmq.Again:
                        break
                    if sock is link:
                        self._from_server(msg, link, to_kernel)
                    else:
                        if sock is iopub or sock is published:
                            taken += sum(map(len, msg))
                            read += 1
                        self._order.hold(msg, from_kernel[sock])
                    self._release(link)
                if sock is not link:
                    self._made_room(taken)
            # What this pass read goes now, before the pump sleeps again.
            self._send_bundle(link)
            flood.after_pass(read)

    def _release(self, link: zmq.Socket) -> None:
        """Forward held messages in emission order, while credit lasts."""
        order = self._order
        while order and self._link.credit > 0:
            if order.missing():
                self._look_for_missing()
                if order.missing():
                    order.skip()
                continue
            socket, msg = order.pop()
            self._to_server(msg, socket, link)

    def _look_for_missing(self) -> None:
        """Read the kernel's sockets on until the missing number turns up
        or cannot be in any of them any more (see L{Reorder})."""
        order = self._order
        candidates = list(self._from_kernel)
        while candidates and order.missing():
            for sock in list(candidates):
                if not sock.poll(0):
                    candidates.remove(sock)
                    continue
                msg = sock.recv_multipart(copy=False)
                number = order.hold(msg, self._from_kernel[sock])
                counted = sock is self._iopub or sock is self._published
                self._made_room(sum(map(len, msg)) if counted else 0)
                if number is not None and order.next is not None and number > order.next:
                    candidates.remove(sock)

    def _from_server(self, msg: list, link: zmq.Socket, to_kernel: dict) -> None:
        parts = [bytes(m.buffer) if i < 5 else m for i, m in enumerate(msg)]
        try:
            channel, socket = decode_tag(parts[0])
            if channel == Channel.CONTROL:
                answer = self._link.receive(parts)  # ping -> pong, credit
                if answer is not None:
                    link.send_multipart(answer)
                return
        except ProtocolError:
            return  # the server never sends these; ignore rather than die
        target = to_kernel.get(socket)
        if (
            channel == Channel.INTROSPECTION
            and socket == JupyterSocket.SHELL
            and len(parts) >= 5
            and _msg_type(parts[1]) in INTROSPECTION_TYPES
        ):
            # Answered at once by the introspection thread, even while a
            # cell runs (cellmux.kernel.introspection).
            try:
                self._introspection.send_multipart(parts[1:], flags=zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                pass  # no introspection thread: the shell answers, as stock
        if target is not None and len(parts) >= 5:
            target.send_multipart([DELIMITER, b"", *parts[1:]], copy=False)

    def _to_server(self, msg: list, socket: int, link: zmq.Socket) -> None:
        delimiter = next((i for i, f in enumerate(msg) if f.bytes == DELIMITER), None)
        if delimiter is None:
            return  # not a Jupyter message
        body = msg[delimiter + 2 :]  # skip delimiter and signature
        if len(body) == 1 and socket == JupyterSocket.IOPUB:
            self._laid_out(body[0], link)
            return
        if len(body) < 4:
            return
        size = sum(map(len, body))
        if HEADER_SIZE + 4 * len(body) + size > self._link.max_size:
            body = self._too_large(body, size)
            socket = JupyterSocket.IOPUB
        channel = classify(body[0] if isinstance(body[0], bytes) else body[0].bytes, _view(body[3]))
        size = sum(map(len, body))
        self._link.credit -= size
        if size > BUNDLE_MESSAGE_MAX:
            self._send_bundle(link)  # what was read before it goes first
            link.send_multipart([_TAGS[(channel, socket)], *body], copy=False)
            return
        self._bundle.append((channel, socket, body))
        self._bundle_size += size
        if self._bundle_size >= BUNDLE_MAX_BYTES or len(self._bundle) >= BUNDLE_MAX_MESSAGES:
            self._send_bundle(link)

    def _laid_out(self, entry: Any, link: zmq.Socket) -> None:
        """A message the kernel laid out as in a bundle (its stream
        messages, cellmux.kernel.tuning.StreamFrames): into the bundle as
        it is, or, when it cannot go so, taken apart and sent as any other."""
        data = entry.buffer if hasattr(entry, "buffer") else memoryview(entry)
        if len(data) < HEADER_SIZE:
            return
        _, _, flags, seq, nparts = ENTRY_HEAD.unpack_from(data)
        size = len(data) - HEADER_SIZE - 4 * nparts
        if flags or seq or nparts != 4 or size < 0 or len(data) > BUNDLE_MESSAGE_MAX + 64:
            for _, socket, parts in split_bundle(bytes(data)):
                frames = [zmq.Frame(part) for part in (DELIMITER, b"", *parts)]
                self._to_server(frames, socket, link)
            return
        self._link.credit -= size
        self._bundle.append((_LAID_OUT, 0, data))
        self._bundle_size += size
        if self._bundle_size >= BUNDLE_MAX_BYTES or len(self._bundle) >= BUNDLE_MAX_MESSAGES:
            self._send_bundle(link)

    def _send_bundle(self, link: zmq.Socket) -> None:
        """Send the small messages waiting: one alone as itself, several as
        one bundle (the same messages in the same order to the server)."""
        bundle = self._bundle
        if not bundle:
            return
        self._bundle, self._bundle_size = [], 0
        if len(bundle) == 1 and bundle[0][0] != _LAID_OUT:
            channel, socket, body = bundle[0]
            link.send_multipart([_TAGS[(channel, socket)], *body], copy=False)
            return
        if all(channel != _LAID_OUT for channel, _, _ in bundle):
            link.send_multipart([BUNDLE_TAG, bundle_bytes(bundle)], copy=False)
            return
        pieces: list[Any] = [
            body if channel == _LAID_OUT else bundle_entry(channel, socket, body)
            for channel, socket, body in bundle
        ]
        link.send_multipart([BUNDLE_TAG, b"".join(pieces)], copy=False)

    def _too_large(self, body: list, size: int) -> list[bytes]:
        """A stderr note, for the same cell, in place of a message too big to send.

        The server would drop it (and libzmq would cut the link over it):
        better that the user learns why their output did not arrive.
        """
        try:
            msg_type = json.loads(body[0].bytes).get("msg_type", "message")
            parent = json.loads(body[1].bytes)
        except (ValueError, AttributeError):
            msg_type, parent = "message", {}
        text = (
            f"cellmux: a {msg_type} of {size} bytes was not sent: the server takes at most "
            f"{self._link.max_size} bytes per message\n"
        )
        return list(
            jupyter_parts(
                "stream",
                {"name": "stderr", "text": text},
                now=datetime.now(UTC),
                session=self._session,
                parent=parent if isinstance(parent, dict) else {},
            )
        )
