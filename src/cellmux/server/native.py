# -*- test-case-name: tests.test_bad_input -*-
"""The server's side of the native cellmux protocol, whatever carries it.

The websocket and long polling carry the same frames. This class takes one
frame at a time from either, runs the sans-IO handshake on it, and acts:
``hello`` attaches to a kernel, data frames go to the kernel, control
requests are carried out, and anything malformed is answered with an
``error`` control frame (and, when fatal or after too many, a close).

The carrier supplies two callables: how to send a control frame to the
client, and how to close the connection with a code and a reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer

from cellmux.protocol import (
    CLOSE_PROTOCOL_ERROR,
    PROTOCOL_VERSION,
    DataMessage,
    Hello,
    ProtocolError,
    Request,
    ServerSideHandshake,
    decode_frame,
)

from .attachment import Attachment
from .kernels import KernelError, KernelManager

__all__ = [
    "CLOSE_FORBIDDEN",
    "CLOSE_KERNEL_GONE",
    "CLOSE_UNKNOWN_KERNEL",
    "MAX_PROTOCOL_ERRORS",
    "NativeSession",
]

#: Close code when the kernel was shut down (the client may create another).
CLOSE_KERNEL_GONE = 4000
#: Close code when the credentials do not allow this (another kernel; revoked).
CLOSE_FORBIDDEN = 4403
#: Close code when hello names a kernel that does not exist (or was lost).
CLOSE_UNKNOWN_KERNEL = 4404
#: After this many refused frames a client is cut off: it is not a bug any more.
MAX_PROTOCOL_ERRORS = 100


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
    ) -> None:
        self.manager = manager
        self.attachment = attachment
        self._send_control = send_control
        self._close = close
        self._replay_on_attach = replay_on_attach
        self._handshake = ServerSideHandshake()
        self._errors = 0
        self.start = 0

    def receive(self, data: bytes) -> None:
        """Handle one frame from the client."""
        try:
            frame = decode_frame(data, self.manager.config.max_frame_size)
            event = self._handshake.receive(frame)
        except ProtocolError as e:
            self.refuse(e)
            return
        if isinstance(event, DataMessage):
            self._relay(event)
        elif isinstance(event, Request):
            defer.ensureDeferred(self._request(event))
        elif isinstance(event, Hello):
            self._hello(event)

    def refuse(self, error: ProtocolError, close_code: int = CLOSE_PROTOCOL_ERROR) -> None:
        """Answer a refused frame; close when it is fatal or one too many."""
        self._errors += 1
        fatal = error.fatal or self._errors > MAX_PROTOCOL_ERRORS
        fields: dict[str, Any] = {"code": error.code, "message": error.message, "fatal": fatal}
        if error.request_id is not None:
            fields["id"] = error.request_id
        self._send_control("error", **fields)
        if fatal:
            self._close(close_code, error.message)

    def _hello(self, hello: Hello) -> None:
        attachment = self.attachment
        if not attachment.grant.covers(hello.kernel):
            message = "this token is for another kernel"
            self._send_control("error", code="forbidden", message=message, fatal=True)
            self._close(CLOSE_FORBIDDEN, message)
            return
        try:
            kernel = self.manager.get(hello.kernel)
        except KernelError as e:
            self._send_control("error", code=e.code, message=str(e), fatal=True)
            self._close(CLOSE_UNKNOWN_KERNEL, str(e))
            return
        attachment.channels = hello.channels
        self.start = kernel.seq if hello.cursor is None else min(hello.cursor, kernel.seq)
        self._send_control(
            "welcome",
            version=PROTOCOL_VERSION,
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
            self._send_control(
                "error", code=e.code, message=str(e), channel=frame.channel, fatal=False
            )

    async def _request(self, request: Request) -> None:
        try:
            reply = await self.attachment.request(request.op, request.channels)
        except KernelError as e:
            self._send_control("error", id=request.id, code=e.code, message=str(e), fatal=False)
            return
        self._send_control(reply.pop("op"), id=request.id, **reply)
