# -*- test-case-name: tests.test_hosts_files -*-
"""``/files`` of kernels on kernel hosts: requests relayed over the host's
control link (L{cellmux.protocol.hostlink} ``file`` messages); the host does
the file system work with the same checks as this server
(L{cellmux.host.files}).

Bounds: per host, at most L{MAX_REQUESTS} file requests at a time (more are
answered 503); per transfer, at most L{hostlink.FILE_WINDOW} chunks of
L{hostlink.MAX_FILE_CHUNK} bytes in flight: a download's chunks are
acknowledged only while its client keeps reading (the request's producer is
not paused), an upload is read from twisted.web's body file a chunk at a
time. A listing's answer is at most L{MAX_LISTING} bytes. A request whose
host says nothing for L{REPLY_TIMEOUT} seconds while it is awaited fails
with 504; a lost host fails all of its requests at once (a download under
way is cut short: its client sees fewer bytes than Content-Length).
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Callable
from http import HTTPStatus
from typing import IO, Any, Protocol

import attrs
from twisted.internet import defer, threads
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from ..protocol import hostlink
from .webjson import HTTPError

__all__ = ["MAX_LISTING", "MAX_REQUESTS", "REPLY_TIMEOUT", "RemoteFiles"]

#: File requests in progress on one host, at most.
MAX_REQUESTS = 8
#: Seconds a request may wait for its host's next message.
REPLY_TIMEOUT = 30.0
#: Bytes of a listing's answer (10 000 names of up to 4 KiB, and more).
MAX_LISTING = 48 * 1024 * 1024


def _fail_once(d: defer.Deferred[Any], error: TransferLost) -> None:
    if not d.called:
        d.errback(error)


class HostSender(Protocol):
    """What sends to a host (L{cellmux.server.hosts.HostRouter})."""

    def send_file_message(self, name: str, message: Any) -> None: ...


class TransferLost(Exception):
    """The host, or the transfer, is gone."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_GATEWAY) -> None:
        super().__init__(message)
        self.status = status


@implementer(IPushProducer)
class _Transfer:
    """One request to a host, and the data it sends back or takes."""

    def __init__(self, owner: RemoteFiles, host: str, id_: int) -> None:
        self.owner = owner
        self.host = host
        self.id = id_
        self.reply: defer.Deferred[hostlink.FileReply] = defer.Deferred()
        self.on_chunk: Callable[[hostlink.FileChunk], None] | None = None
        #: Told why, if the transfer fails after its reply.
        self.on_lost: Callable[[TransferLost], None] | None = None
        self.timer: Any = None
        self.done = False
        # download: chunks used but not yet acknowledged (client paused)
        self.paused = False
        self.unacked: list[int] = []
        # upload: acknowledged so far, and who waits for room in the window
        self.acked = 0
        self.room: defer.Deferred[None] | None = None

    # IPushProducer, for a download's request
    def pauseProducing(self) -> None:
        self.paused = True
        self.owner._stop_timer(self)  # a slow client is not a silent host

    def resumeProducing(self) -> None:
        self.paused = False
        unacked, self.unacked = self.unacked, []
        for seq in unacked:
            self.owner._send(self, hostlink.FileAck(self.id, seq))
        if not self.done:
            self.owner._start_timer(self)

    def stopProducing(self) -> None:
        self.owner.cancel(self, "the client went away")


class RemoteFiles:
    """The front's file requests to its kernel hosts."""

    log = Logger()

    def __init__(self, sender: HostSender, clock: Any, timeout: float = REPLY_TIMEOUT) -> None:
        self._sender = sender
        self.clock = clock
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._transfers: dict[int, _Transfer] = {}

    # -- the three operations ---------------------------------------------------------

    async def listing(self, host: str, link: str) -> tuple[dict[str, tuple[int, int]], bool]:
        """The files of kernel C{link} on C{host}: a L{files.scan} snapshot."""
        transfer = self._start(host, hostlink.FileRequest(0, "list", link))
        data = bytearray()
        finished: defer.Deferred[None] = defer.Deferred()

        def chunk(message: hostlink.FileChunk) -> None:
            data.extend(message.data)
            if len(data) > MAX_LISTING:
                self.cancel(transfer, "listing too long")
                return
            self._send(transfer, hostlink.FileAck(transfer.id, message.seq))
            if message.last:
                self._end(transfer)
                finished.callback(None)

        transfer.on_chunk = chunk
        transfer.on_lost = functools.partial(_fail_once, finished)
        try:
            await self._answer(transfer)
            try:
                await finished
            except TransferLost as e:
                raise HTTPError(HTTPStatus(e.status), str(e)) from None
        finally:
            self._end(transfer)
        try:
            listing = json.loads(bytes(data))
            files = {name: (size, mtime) for name, size, mtime in listing["files"]}
            return files, bool(listing["truncated"])
        except (ValueError, KeyError, TypeError):
            raise HTTPError(
                HTTPStatus.BAD_GATEWAY, f"kernel host {host} sent a bad listing"
            ) from None

    async def upload(
        self, host: str, link: str, name: str, content: IO[bytes], quota: int
    ) -> hostlink.FileReply:
        """Store C{content} (a file, read a chunk at a time) as C{name}."""
        size = await threads.deferToThread(_size, content)
        transfer = self._start(host, hostlink.FileRequest(0, "put", link, name, quota, size))
        try:
            sending = defer.ensureDeferred(self._send_body(transfer, content, size))
            sending.addErrback(lambda _: None)  # the reply says what went wrong
            return await self._answer(transfer, HTTPStatus.CREATED)
        finally:
            self._end(transfer)

    async def _send_body(self, transfer: _Transfer, content: IO[bytes], size: int) -> None:
        seq = 0
        sent = 0
        while not transfer.done:
            while seq - transfer.acked >= hostlink.FILE_WINDOW:
                transfer.room = defer.Deferred()
                await transfer.room
                if transfer.done:
                    return
            data = await threads.deferToThread(
                content.read, min(hostlink.MAX_FILE_CHUNK, size - sent)
            )
            if transfer.done:
                return
            sent += len(data)
            last = sent >= size or not data
            self._send(transfer, hostlink.FileChunk(transfer.id, seq, last, data))
            seq += 1
            if last:
                return

    async def download(
        self, host: str, link: str, name: str, start: Callable[[int], Any]
    ) -> tuple[_Transfer, defer.Deferred[None]] | None:
        """Ask for C{name}; once the host answers, C{start(size)} is called
        (which sets the headers and returns the request to write to, or
        None to take no data). Fires with the transfer and a Deferred that
        fires when all of it was written (or fails if it was cut short)."""
        transfer = self._start(host, hostlink.FileRequest(0, "get", link, name))
        try:
            reply = await self._answer(transfer)
        except BaseException:
            self._end(transfer)
            raise
        request = start(reply.size)
        if request is None:
            self.cancel(transfer, "HEAD")
            return None
        written = {"bytes": 0}
        complete: defer.Deferred[None] = defer.Deferred()

        def chunk(message: hostlink.FileChunk) -> None:
            written["bytes"] += len(message.data)
            if written["bytes"] > reply.size:
                self.cancel(transfer, "the file grew while it was sent")
                return
            request.write(message.data)
            if transfer.paused:
                transfer.unacked.append(message.seq)
            else:
                self._send(transfer, hostlink.FileAck(transfer.id, message.seq))
            if message.last:
                self._end(transfer)
                if written["bytes"] == reply.size:
                    complete.callback(None)
                else:
                    complete.errback(TransferLost("the file shrank while it was sent"))

        transfer.on_chunk = chunk
        transfer.on_lost = functools.partial(_fail_once, complete)
        request.registerProducer(transfer, True)
        return transfer, complete

    # -- the transfers ----------------------------------------------------------------

    def _start(self, host: str, request: hostlink.FileRequest) -> _Transfer:
        busy = sum(1 for t in self._transfers.values() if t.host == host)
        if busy >= MAX_REQUESTS:
            raise HTTPError(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"kernel host {host} has {MAX_REQUESTS} file requests under way; try again",
            )
        transfer = _Transfer(self, host, next(self._ids))
        self._transfers[transfer.id] = transfer
        try:
            self._sender.send_file_message(host, _with_id(request, transfer.id))
        except Exception as e:
            self._end(transfer)
            raise HTTPError(HTTPStatus.BAD_GATEWAY, f"kernel host {host}: {e}") from None
        self._start_timer(transfer)
        return transfer

    async def _answer(self, transfer: _Transfer, ok: int = HTTPStatus.OK) -> hostlink.FileReply:
        try:
            reply = await transfer.reply
        except TransferLost as e:
            raise HTTPError(HTTPStatus(e.status), str(e)) from None
        if reply.status != ok:
            status = reply.status if 400 <= reply.status < 600 else HTTPStatus.BAD_GATEWAY
            raise HTTPError(HTTPStatus(status), reply.message or "kernel host refused")
        return reply

    def _send(self, transfer: _Transfer, message: Any) -> None:
        if transfer.done:
            return
        try:
            self._sender.send_file_message(transfer.host, message)
        except Exception as e:
            self._fail(transfer, f"kernel host {transfer.host}: {e}")

    def receive(self, host: str, message: Any) -> None:
        """A file message from live host C{host}."""
        transfer = self._transfers.get(message.id)
        if transfer is None or transfer.host != host:
            return  # ended already, or not its transfer
        if not transfer.paused:
            self._start_timer(transfer)
        if isinstance(message, hostlink.FileReply):
            if not transfer.reply.called:
                transfer.reply.callback(message)
        elif isinstance(message, hostlink.FileChunk):
            if transfer.on_chunk is not None:
                transfer.on_chunk(message)
        elif isinstance(message, hostlink.FileAck):
            transfer.acked = max(transfer.acked, message.seq + 1)
            room, transfer.room = transfer.room, None
            if room is not None:
                room.callback(None)
        elif isinstance(message, hostlink.FileCancel):
            self._fail(transfer, f"kernel host {host} ended the transfer: {message.reason}")

    def host_lost(self, host: str, cause: str) -> None:
        """Fail every request to a host that is gone."""
        for transfer in [t for t in self._transfers.values() if t.host == host]:
            self._fail(transfer, f"kernel host {host} lost ({cause})")

    def cancel(
        self, transfer: _Transfer, reason: str, status: int = HTTPStatus.BAD_GATEWAY
    ) -> None:
        """Abandon a transfer (and tell the host)."""
        if transfer.done:
            return
        self._send(transfer, hostlink.FileCancel(transfer.id, reason[: hostlink.MAX_FILE_TEXT]))
        self._fail(transfer, reason, status)

    def _fail(self, transfer: _Transfer, reason: str, status: int = HTTPStatus.BAD_GATEWAY) -> None:
        if transfer.done:
            return
        self._end(transfer)
        error = TransferLost(reason, status)
        if not transfer.reply.called:
            transfer.reply.errback(error)
        elif transfer.on_lost is not None:
            transfer.on_lost(error)

    def _end(self, transfer: _Transfer) -> None:
        transfer.done = True
        self._transfers.pop(transfer.id, None)
        self._stop_timer(transfer)
        room, transfer.room = transfer.room, None
        if room is not None:  # an upload's sender waiting for acks: it stops
            room.callback(None)

    def _start_timer(self, transfer: _Transfer) -> None:
        self._stop_timer(transfer)
        transfer.timer = self.clock.callLater(self.timeout, self._timed_out, transfer)

    def _stop_timer(self, transfer: _Transfer) -> None:
        if transfer.timer is not None and transfer.timer.active():
            transfer.timer.cancel()
        transfer.timer = None

    def _timed_out(self, transfer: _Transfer) -> None:
        transfer.timer = None
        self.cancel(
            transfer,
            f"kernel host {transfer.host} did not answer in {self.timeout:g} s",
            HTTPStatus.GATEWAY_TIMEOUT,
        )


def _size(content: IO[bytes]) -> int:
    content.seek(0, 2)
    size = content.tell()
    content.seek(0)
    return size


def _with_id(request: hostlink.FileRequest, id_: int) -> hostlink.FileRequest:
    return attrs.evolve(request, id=id_)
