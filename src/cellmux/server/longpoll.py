# -*- test-case-name: tests.test_longpoll -*-
"""``/poll``: the client protocol over plain HTTP, for when websockets are blocked.

The same frames and channels as ``/ws`` (docs/protocol.md), carried by
ordinary requests (docs/browser.md has the details):

    POST   /poll                 body: a hello frame    -> 201 {"connection": ID}
    POST   /poll/ID              body: frames           -> 204
    GET    /poll/ID?seq=S&ctl=C  (long poll)            -> 200 frames, or 410 once closed
    DELETE /poll/ID                                     -> 204

A body of frames is each frame preceded by its length (uint32, big-endian).

Called by twisted.web: the resources' render methods.
Called by the kernel (L{PollConnection} is a ClientSink): wants,
send_frame, gap, kernel_gone, revoked.

A connection keeps no copy of the kernel's frames: they are in the
kernel's replay log, and a poll returns the log after the client's cursor
``seq`` (a slow poller loses the oldest frames and is told so with a
``gap``, exactly like a websocket that fell behind). Control frames
(welcome, replies, errors) and a waiting input_request older than the
cursor are not in the log; they wait in a short per-connection queue,
numbered, and a poll's ``ctl`` acknowledges those it has. A connection
closes as a websocket would: its last frames end with a control frame
``{"op": "close", "code", "reason"}``.
"""

from __future__ import annotations

import json
import struct
from collections import deque
from http import HTTPStatus
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

from cellmux.protocol import (
    CLOSE_PROTOCOL_ERROR,
    ProtocolError,
    control_frame,
    encode_frame,
)

from .attachment import Attachment
from .auth import Grant, OriginPolicy
from .fronts import front_tag, mint_token
from .kernels import Kernel, KernelManager
from .native import CLOSE_FORBIDDEN, CLOSE_KERNEL_GONE, NativeSession
from .pages import cors_headers, preflight
from .webjson import request_args, request_body
from .websocket import url_kernel

__all__ = ["POLL_HOLD", "POLL_IDLE_EXPIRY", "PollConnection", "PollResource"]

#: How long a poll waits for news before answering empty. Under the usual
#: 60 s proxy and load balancer timeouts, with room to spare.
POLL_HOLD = 25.0
#: A connection nobody polled for this long is gone (the tab closed).
POLL_IDLE_EXPIRY = 60.0
#: Most control frames a connection keeps unacknowledged; a client that
#: never polls is cut off rather than allowed to grow this without bound.
MAX_QUEUED_CONTROL = 1000
#: Most bytes of control frames a connection keeps unacknowledged (a
#: ``history`` reply can be megabytes); beyond it the client is cut off too.
MAX_QUEUED_CONTROL_BYTES = 64 * 1024 * 1024
_LENGTH = struct.Struct(">I")

#: Close code for a connection nobody polled in time (the others are the
#: websocket's, from native.py).
CLOSE_EXPIRED = 4408


def pack_frames(frames: list[bytes]) -> bytes:
    """Frames as one body: each preceded by its length."""
    return b"".join(_LENGTH.pack(len(f)) + f for f in frames)


def unpack_frames(body: bytes) -> list[bytes]:
    """The frames of a body made by L{pack_frames}.

    @raise ProtocolError: (C{bad_lengths}) if the lengths do not add up.
    """
    frames, offset = [], 0
    while offset < len(body):
        if offset + 4 > len(body):
            raise ProtocolError("bad_lengths", "body ends inside a frame length")
        (n,) = _LENGTH.unpack_from(body, offset)
        offset += 4
        if offset + n > len(body):
            raise ProtocolError("bad_lengths", "body ends inside a frame")
        frames.append(body[offset : offset + n])
        offset += n
    return frames


def _seq_of(data: bytes) -> int:
    return int.from_bytes(data[4:12], "big")


class PollConnection:
    """One long-polling client; output waits in the kernel's log for polls.

    What every transport shares (roles, requests, relaying to the kernel)
    is its L{Attachment}'s; this class is the L{Transport}: a delivered
    frame only wakes a waiting poll, which then reads the log by cursor.
    Never paused, it never holds back the kernel's link credit.
    """

    log = Logger()

    def __init__(
        self,
        cid: str,
        manager: KernelManager,
        grant: Grant,
        expire,
        create=None,
        url_kernel: str | None = None,
    ) -> None:
        self.id = cid
        self.manager = manager
        self.attachment = Attachment(manager, grant, self)
        self.native = NativeSession(
            manager,
            self.attachment,
            self._control,
            self.close,
            replay_on_attach=False,
            create=create,
            url_kernel=url_kernel,
        )
        self._control_seq = 0
        self._queued: deque[tuple[int, bytes]] = deque()
        self._queued_bytes = 0
        self._closed: tuple[int, str] | None = None
        self._waiter: tuple[defer.Deferred, Any] | None = None
        self._expire = expire
        self._expiry = None
        self.touch()

    # -- lifetime -------------------------------------------------------------

    def touch(self) -> None:
        """The client showed signs of life: postpone expiry."""
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = self.manager.clock.callLater(POLL_IDLE_EXPIRY, self._expired)

    def _expired(self) -> None:
        self.close(CLOSE_EXPIRED, "not polled for too long")
        self._expire(self)

    @property
    def kernel(self) -> Kernel | None:
        return self.attachment.kernel

    def close(self, code: int, reason: str) -> None:
        self.attachment.detach()
        if self._closed is None:
            self._closed = (code, reason[:120])
        self._wake()

    def forget(self) -> None:
        """Drop everything (the connection is removed)."""
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self.native.connection_lost()
        self.attachment.detach()
        if self._waiter is not None:
            d, call = self._waiter
            self._waiter = None
            call.cancel()
            d.callback(None)

    # -- called by the Attachment (Transport) -----------------------------

    def deliver(self, data: bytes) -> None:
        if _seq_of(data) <= self.native.start:
            # Not in the log after the client's cursor (a waiting prompt
            # sent on attach): it goes with the control frames.
            self._queue(data)
        else:
            self._wake()

    def gap(self, first: int, last: int) -> None:
        self._control("gap", first=first, last=last, missed=last - first + 1)

    def gone(self, reason: str) -> None:
        self.close(CLOSE_KERNEL_GONE, f"kernel {reason}")

    def revoked(self) -> None:
        self.close(CLOSE_FORBIDDEN, "access revoked")

    # -- frames from the client -------------------------------------------------

    def receive(self, body: bytes) -> None:
        """Handle a POSTed body of frames (errors go out as control frames)."""
        try:
            frames = unpack_frames(body)
        except ProtocolError as e:
            self.native.refuse(e)
            return
        for data in frames:
            if self._closed is not None:
                return
            self.native.receive(data)

    # -- frames to the client ---------------------------------------------------

    def _control(self, op: str, **fields: Any) -> None:
        self._queue(encode_frame(control_frame(op, **fields)))

    def _queue(self, data: bytes) -> None:
        self._control_seq += 1
        self._queued.append((self._control_seq, data))
        self._queued_bytes += len(data)
        if self._closed is None and (
            len(self._queued) > MAX_QUEUED_CONTROL or self._queued_bytes > MAX_QUEUED_CONTROL_BYTES
        ):
            self._queued.clear()
            self._queued_bytes = 0
            self.close(CLOSE_PROTOCOL_ERROR, "too many unacknowledged control frames")
        self._wake()

    def collect(self, seq: int | None, ctl: int) -> tuple[list[bytes], int, int] | None:
        """What a poll at (seq, ctl) gets: frames and the next cursors.

        None if there is nothing yet (the poll waits). Acknowledges the
        control frames up to C{ctl}.
        """
        while self._queued and self._queued[0][0] <= ctl:
            self._queued_bytes -= len(self._queued.popleft()[1])
        frames = [data for n, data in self._queued if n > ctl]
        next_ctl = max(ctl, self._control_seq) if frames else ctl
        cursor = self.native.start if seq is None else seq
        next_seq = cursor
        kernel = self.kernel
        if kernel is not None:
            gap, entries = kernel.replay.after(cursor)
            if gap is not None:
                gap_frame = control_frame("gap", first=gap.first, last=gap.last, missed=gap.missed)
                frames.append(encode_frame(gap_frame))
            for entry in entries:
                next_seq = entry.seq
                if (
                    entry.session is None or entry.session == self.attachment.session
                ) and self.attachment.wants(entry.channel):
                    frames.append(entry.data)
            next_seq = max(next_seq, min(cursor, kernel.replay.last_seq))
        if self._closed is not None:
            code, reason = self._closed
            frames.append(encode_frame(control_frame("close", code=code, reason=reason)))
        if not frames and next_seq == cursor:
            return None
        return frames, next_seq, next_ctl

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def wait(self, seq: int | None, ctl: int) -> defer.Deferred:
        """A poll: fires with (frames, seq, ctl), at once or when news comes."""
        self.touch()
        if self._waiter is not None:  # a newer poll replaces an older one
            d, call = self._waiter
            self._waiter = None
            call.cancel()
            d.callback(None)
        found = self.collect(seq, ctl)
        if found is not None:
            return defer.succeed(found)
        d = defer.Deferred()
        call = self.manager.clock.callLater(POLL_HOLD, self._hold_over, d, seq, ctl)
        self._waiter = (d, call)
        d.addCallback(self._settle, seq, ctl)
        return d

    def _settle(self, result, seq: int | None, ctl: int):
        """A waiting poll's answer: news, or nothing with unchanged cursors."""
        if result is not None:
            found = self.collect(seq, ctl)
            if found is not None:
                return found
        return [], self.native.start if seq is None else seq, ctl

    def _hold_over(self, d: defer.Deferred, seq, ctl) -> None:
        if self._waiter is not None and self._waiter[0] is d:
            self._waiter = None
        d.callback(None)

    def _wake(self) -> None:
        if self._waiter is None:
            return
        d, call = self._waiter
        self._waiter = None
        call.cancel()
        # Collect in a later turn: a burst of frames goes out in one answer.
        self.manager.clock.callLater(0, d.callback, True)

    def abandon(self, d: defer.Deferred) -> None:
        """The client went away while its poll waited."""
        if self._waiter is not None and self._waiter[0] is d:
            _, call = self._waiter
            self._waiter = None
            call.cancel()


class PollResource(resource.Resource):
    """``/poll`` and ``/poll/ID``."""

    log = Logger()
    isLeaf = True

    def __init__(self, manager: KernelManager, auth, create=None) -> None:
        super().__init__()
        self.manager = manager
        self.auth = auth
        #: How hello.create makes kernels (None: the manager, as is).
        self.create = create
        self.origins = OriginPolicy.from_strings(manager.config.allow_origins)
        self.connections: dict[str, PollConnection] = {}

    # -- plumbing ------------------------------------------------------------

    def _error(self, request: server.Request, status: int, message: str) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        body = {"message": message, "reason": HTTPStatus(status).phrase}
        return json.dumps(body).encode()

    def _origin_ok(self, request: server.Request) -> bool:
        origin = request.getHeader(b"origin")
        host = request.getHeader(b"host")
        return self.origins.allows(
            origin.decode("latin-1") if origin else None,
            host.decode("latin-1") if host else None,
            request.isSecure(),
        )

    def _connection(self, request: server.Request, cid: str) -> PollConnection | bytes:
        conn = self.connections.get(cid)
        if conn is None:
            return self._error(request, HTTPStatus.NOT_FOUND, "no such poll connection")
        if self.auth.web_grant(request) != conn.attachment.grant:
            return self._error(request, HTTPStatus.FORBIDDEN, "a valid token is required")
        return conn

    def _forget(self, conn: PollConnection) -> None:
        if self.connections.get(conn.id) is conn:
            del self.connections[conn.id]
        conn.forget()

    def render(self, request: server.Request) -> bytes | int:
        cors_headers(request, self.origins, methods=b"GET, POST, DELETE")
        if request.method == b"OPTIONS":
            return preflight(request)
        if not self._origin_ok(request):
            return self._error(request, HTTPStatus.FORBIDDEN, "this origin may not connect")
        path = [p for p in request.postpath or () if p]
        method = request.method
        if not path:
            if method != b"POST":
                return self._error(request, HTTPStatus.METHOD_NOT_ALLOWED, "use POST")
            return self._open(request)
        if len(path) != 1:
            return self._error(request, HTTPStatus.NOT_FOUND, "not found")
        cid = path[0].decode("latin-1")
        if method == b"GET":
            return self._poll(request, cid)
        if method == b"POST":
            return self._post(request, cid)
        if method == b"DELETE":
            conn = self._connection(request, cid)
            if isinstance(conn, bytes):
                return conn
            self._forget(conn)
            request.setResponseCode(HTTPStatus.NO_CONTENT)
            return b""
        return self._error(request, HTTPStatus.METHOD_NOT_ALLOWED, "use GET, POST, DELETE")

    # -- the requests ----------------------------------------------------------

    def _open(self, request: server.Request) -> bytes:
        grant = self.auth.web_grant(request)
        if grant is None:
            return self._error(request, HTTPStatus.FORBIDDEN, "a valid token is required")
        cid = mint_token(front_tag(self.manager.config.front_id))
        conn = PollConnection(
            cid,
            self.manager,
            grant,
            self._forget,
            create=self.create,
            url_kernel=url_kernel(request.uri),
        )
        self.connections[cid] = conn
        conn.receive(request_body(request).read())
        request.setResponseCode(HTTPStatus.CREATED)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"connection": cid}).encode()

    def _post(self, request: server.Request, cid: str) -> bytes:
        conn = self._connection(request, cid)
        if isinstance(conn, bytes):
            return conn
        if conn.closed:
            return self._error(request, HTTPStatus.GONE, "this connection is closed")
        conn.touch()
        conn.receive(request_body(request).read())
        request.setResponseCode(HTTPStatus.NO_CONTENT)
        return b""

    def _poll(self, request: server.Request, cid: str) -> bytes | int:
        conn = self._connection(request, cid)
        if isinstance(conn, bytes):
            return conn
        try:
            seq_arg = request_args(request).get(b"seq", [None])[0]
            seq = None if seq_arg is None else int(seq_arg)
            ctl = int(request_args(request).get(b"ctl", [b"0"])[0])
            if (seq is not None and seq < 0) or ctl < 0:
                raise ValueError
        except ValueError:
            return self._error(request, HTTPStatus.BAD_REQUEST, "seq and ctl are integers >= 0")
        d = conn.wait(seq, ctl)

        def answer(result) -> None:
            if finished.called:
                return
            frames, next_seq, next_ctl = result
            request.setHeader(b"content-type", b"application/octet-stream")
            request.setHeader(b"cache-control", b"no-store")
            request.setHeader(b"cellmux-seq", str(next_seq).encode())
            request.setHeader(b"cellmux-ctl", str(next_ctl).encode())
            request.write(pack_frames(frames))
            request.finish()

        def failed(failure) -> None:
            self.log.failure("a poll failed", failure)
            if not finished.called:
                request.setResponseCode(HTTPStatus.INTERNAL_SERVER_ERROR)
                request.finish()

        finished = request.notifyFinish()
        finished.addErrback(lambda _: conn.abandon(d))
        d.addCallback(answer).addErrback(failed)
        return server.NOT_DONE_YET
