# -*- test-case-name: tests.test_bad_input -*-
"""The server's side of the native cellmux protocol, whatever carries it.

The websocket and long polling carry the same frames. This class takes one
frame at a time from either, runs the sans-IO handshake on it, and acts:
``hello`` attaches to a kernel (or, with ``create``, starts one and
attaches to it), data frames go to the kernel, control requests are carried
out, and anything malformed is answered with an ``error`` control frame
(and, when fatal or after too many, a close).

A client need not wait for ``welcome``: frames that arrive while a kernel
it asked for is being made wait here, at most L{MAX_EARLY_FRAMES} of them
and L{MAX_HELD_BYTES}, and are handled in order once it is attached.

The carrier supplies two callables: how to send a control frame to the
client, and how to close the connection with a code and a reason; a carrier
that can stop reading from its client (the websocket) also supplies
C{pause_reading} and C{resume_reading}.

Replies obey the client's flow control like kernel frames do. While the
client's connection is full (its L{Attachment} is paused), replies and
refusals wait unsent, at most L{MAX_HELD_REPLIES} of them and
L{MAX_HELD_BYTES} of the requests they answer; beyond that the server stops
reading from the client until it reads again. Requests are still carried
out at once (an interrupt does not wait for the client to catch up), except
``history``, whose reply is megabytes: it is built only when it can be
sent. So a client that keeps asking and never reads costs one reply in its
socket buffer and this bound, not a reply per request.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import defer

from cellmux.protocol import (
    CLOSE_PROTOCOL_ERROR,
    DataMessage,
    Hello,
    ProtocolError,
    Request,
    ServerSideHandshake,
    decode_frame,
)

from .attachment import Attachment, Forbidden
from .auth import Grant
from .kernels import Kernel, KernelError, KernelManager
from .kernelspecs import DEFAULT_SPEC

__all__ = [
    "CLOSE_CREATE_FAILED",
    "CLOSE_FORBIDDEN",
    "CLOSE_KERNEL_GONE",
    "CLOSE_UNKNOWN_KERNEL",
    "MAX_EARLY_FRAMES",
    "MAX_HELD_BYTES",
    "MAX_HELD_REPLIES",
    "MAX_PROTOCOL_ERRORS",
    "NativeSession",
]

#: Close code when the kernel was shut down (the client may create another).
CLOSE_KERNEL_GONE = 4000
#: Close code when the credentials do not allow this (another kernel; revoked).
CLOSE_FORBIDDEN = 4403
#: Close code when hello names a kernel that does not exist (or was lost),
#: or a kernel spec that does not exist.
CLOSE_UNKNOWN_KERNEL = 4404
#: Close code when the kernel hello.create asked for could not be made (too
#: many kernels, no nursery): the error's code says which.
CLOSE_CREATE_FAILED = 4503
#: After this many refused frames a client is cut off: it is not a bug any more.
MAX_PROTOCOL_ERRORS = 100
#: Replies (and requests waiting to be answered) held for a client whose
#: connection is full, before the server stops reading from it.
MAX_HELD_REPLIES = 64
#: Bytes of held requests (their frames) before the server stops reading.
MAX_HELD_BYTES = 1024 * 1024
#: Frames a client may send after a ``hello.create`` before its kernel is
#: ready (they wait, with at most MAX_HELD_BYTES of them); more is an error.
MAX_EARLY_FRAMES = 64


class NativeSession:
    """One native-protocol client: frames in, actions and control frames out.

    @param replay_on_attach: whether ``hello.cursor`` makes the kernel send
        the missed frames on attach (a push carrier such as the websocket),
        or the carrier reads the log after L{start} itself (long polling).
    @ivar start: the seq the client starts after (set by ``hello``).
    """

    def __init__(
        self,
        manager: KernelManager,
        attachment: Attachment,
        send_control: Callable[..., None],
        close: Callable[[int, str], None],
        *,
        replay_on_attach: bool = True,
        pause_reading: Callable[[], None] | None = None,
        resume_reading: Callable[[], None] | None = None,
        create: Callable[[Grant, str], Awaitable[Kernel]] | None = None,
        url_kernel: str | None = None,
    ) -> None:
        self.manager = manager
        # The kernel the carrier's URL named (``?kernel=ID``), which a proxy
        # routed by: the hello must name the same one (docs/scaling.md).
        self._url_kernel = url_kernel
        # How hello.create makes a kernel for this client's grant (a named
        # token's quota, start-up code: creation.KernelCreator).
        self._create = create
        self.attachment = attachment
        self._send_control = send_control
        self._close = close
        self._replay_on_attach = replay_on_attach
        self._pause_reading = pause_reading
        self._resume_reading = resume_reading
        self._handshake = ServerSideHandshake()
        self._errors = 0
        self.start = 0
        # What waits for the client to read again: (bytes it holds, action).
        self._held: deque[tuple[int, Callable[[], object]]] = deque()
        self._held_bytes = 0
        self._reading_paused = False
        self._flushing = False
        #: Frames that came while the kernel ``hello`` asked for was made.
        self._early: deque[bytes] | None = None
        self._early_bytes = 0
        self._closed = False
        attachment.resumed = self._flush

    def connection_lost(self) -> None:
        """The carrier's connection ended (a kernel still being made for it
        is shut down when it is ready: nobody learnt its id)."""
        self._closed = True
        self._early = None

    def receive(self, data: bytes) -> None:
        """Handle one frame from the client (none once the session is closed:
        frames still in flight after a fatal error get no answer each)."""
        if self._closed:
            return
        if self._early is not None:
            self._wait_for_kernel(data)
            return
        try:
            frame = decode_frame(data, self.manager.config.max_frame_size)
            event = self._handshake.receive(frame)
        except ProtocolError as e:
            self.refuse(e)
            return
        if isinstance(event, DataMessage):
            self._relay(event)
        elif isinstance(event, Request):
            size = len(data)  # what its reply echoes (the id) is at most this
            if event.op == "history":
                # Built only when it can be sent: it is megabytes.
                self._when_reading(lambda: defer.ensureDeferred(self._request(event, size)), size)
            else:
                # Carried out at once (an interrupt must not wait for the
                # client to catch up); only the reply waits.
                defer.ensureDeferred(self._request(event, size))
        elif isinstance(event, Hello):
            self._hello(event)

    # -- replies wait while the client does not read --------------------------

    def _reply(self, op: str, size: int = 0, **fields: Any) -> None:
        """Send a control frame now, or once the client reads again (C{size}:
        the bytes of the request it echoes)."""
        self._when_reading(lambda: self._send_control(op, **fields), size)

    def _when_reading(self, action: Callable[[], object], size: int) -> None:
        if (self._flushing or not self._held) and not self.attachment.paused:
            action()  # (while flushing: a held request answering at once)
            return
        self._held.append((size, action))
        self._held_bytes += size
        over = len(self._held) > MAX_HELD_REPLIES or self._held_bytes > MAX_HELD_BYTES
        if over and not self._reading_paused and self._pause_reading is not None:
            self._reading_paused = True
            self._pause_reading()

    def _flush(self) -> None:
        """The client reads again: answer what waited, until it is full again."""
        self._flushing = True
        try:
            while self._held and not self.attachment.paused:
                size, action = self._held.popleft()
                self._held_bytes -= size
                action()
        finally:
            self._flushing = False
        if self._reading_paused and not self._held:
            self._reading_paused = False
            if self._resume_reading is not None:
                self._resume_reading()

    def refuse(self, error: ProtocolError, close_code: int = CLOSE_PROTOCOL_ERROR) -> None:
        """Answer a refused frame; close when it is fatal or one too many."""
        self._errors += 1
        fatal = error.fatal or self._errors > MAX_PROTOCOL_ERRORS
        fields: dict[str, Any] = {"code": error.code, "message": error.message, "fatal": fatal}
        if error.request_id is not None:
            fields["id"] = error.request_id
        if fatal:
            self._send_control("error", **fields)
        else:
            self._reply("error", **fields)
        if fatal:
            self._closed = True  # a kernel still being made for it is not wanted
            self._close(close_code, error.message)

    def _fatal(self, code: str, message: str, close_code: int) -> None:
        """Tell the client why, close, and hear nothing more from it."""
        self._send_control("error", code=code, message=message, fatal=True)
        self._closed = True
        self._close(close_code, message)

    def _wait_for_kernel(self, data: bytes) -> None:
        early = self._early
        assert early is not None
        if len(early) >= MAX_EARLY_FRAMES or self._early_bytes + len(data) > MAX_HELD_BYTES:
            self._early = None
            message = f"at most {MAX_EARLY_FRAMES} frames ({MAX_HELD_BYTES} bytes) before welcome"
            self.refuse(ProtocolError("too_early", message, fatal=True))
            return
        early.append(data)
        self._early_bytes += len(data)

    def _hello(self, hello: Hello) -> None:
        if self._url_kernel is not None and hello.kernel != self._url_kernel:
            named = "a new kernel" if hello.create is not None else f"kernel {hello.kernel}"
            message = (
                f"the URL names kernel {self._url_kernel} but the hello asks for {named}; "
                "a proxy routes by the URL, so they must agree"
            )
            self.refuse(ProtocolError("kernel_mismatch", message, fatal=True))
            return
        if hello.create is not None:
            self._early = deque()
            defer.ensureDeferred(self._create_and_attach(hello))
            return
        self._attach(hello, None)

    async def _create_and_attach(self, hello: Hello) -> None:
        grant = self.attachment.grant
        name = (hello.create.name if hello.create else None) or DEFAULT_SPEC
        label = hello.create.host_label if hello.create else None
        try:
            if grant.kernel_id is not None or not grant.role.may_manage:
                raise Forbidden("this token may not create kernels")
            if self.manager.specs.get(name) is None:
                raise _UnknownSpec(f"no kernel spec named {name!r}")
            if self._create is not None:
                where = {"host_label": label} if label is not None else {}
                kernel = await self._create(grant, name, **where)
            else:
                kernel = await self.manager.create(name, host_label=label)
        except KernelError as e:
            self._early = None
            close_code = {
                "forbidden": CLOSE_FORBIDDEN,
                "unknown_kernel_spec": CLOSE_UNKNOWN_KERNEL,
            }.get(e.code, CLOSE_CREATE_FAILED)
            if not self._closed:
                self._fatal(e.code, str(e), close_code)
            return
        if self._closed:
            self.manager.delete(kernel, "its client left before it was ready")
            return
        early, self._early = self._early or deque(), None
        self._attach(hello, kernel)
        for data in early:  # what the client sent after hello, in order
            if self._closed:
                break
            self.receive(data)

    def _attach(self, hello: Hello, kernel: Kernel | None) -> None:
        attachment = self.attachment
        if kernel is not None:
            self._welcome(hello, kernel)
            return
        if not attachment.grant.covers(hello.kernel):
            self._fatal("forbidden", "this token is for another kernel", CLOSE_FORBIDDEN)
            return
        try:
            kernel = self.manager.get(hello.kernel)
        except KernelError as e:
            self._fatal(e.code, str(e), CLOSE_UNKNOWN_KERNEL)
            return
        self._welcome(hello, kernel)

    def _welcome(self, hello: Hello, kernel: Kernel) -> None:
        attachment = self.attachment
        attachment.channels = hello.channels
        self.start = kernel.seq if hello.cursor is None else min(hello.cursor, kernel.seq)
        self._send_control(
            "welcome",
            version=hello.version,
            kernel=kernel.model(),
            seq=kernel.seq if self._replay_on_attach else self.start,
            role=attachment.grant.role.value,
        )
        cursor = hello.cursor if self._replay_on_attach else None
        attachment.attach(kernel, hello.session, cursor=cursor)

    def _relay(self, event: DataMessage) -> None:
        frame = event.frame
        try:
            self.attachment.send(frame.channel, frame.socket, frame.parts)
        except KernelError as e:
            self._reply("error", code=e.code, message=str(e), channel=frame.channel, fatal=False)

    async def _request(self, request: Request, size: int) -> None:
        try:
            reply = await self.attachment.request(request.op, request.channels)
        except KernelError as e:
            self._reply("error", size, id=request.id, code=e.code, message=str(e), fatal=False)
            return
        self._reply(reply.pop("op"), size, id=request.id, **reply)


class _UnknownSpec(KernelError):
    code = "unknown_kernel_spec"
