# -*- test-case-name: tests.test_hosts_files -*-
"""A kernel host's side of ``/files``: the file system work the front asks
for its kernels (L{cellmux.protocol.hostlink} ``file`` messages).

The checks are those of a single server, by the same functions
(L{cellmux.server.files}): names split and refused the same way, paths
resolved and opened without following a symlink out of the kernel's
directory, uploads stored by the same code under the same quota. All of it
runs in threads, never in the reactor.

Bounds: per front, at most L{MAX_TRANSFERS} transfers at a time (more are
answered 503); per transfer, at most L{hostlink.FILE_WINDOW} chunks of
L{hostlink.MAX_FILE_CHUNK} bytes in flight either way (an upload is spooled
to a temporary file, a download read a chunk at a time); a transfer that
hears nothing for L{STALL_TIMEOUT} seconds is abandoned.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import IO, Any, Protocol

from twisted.internet import threads
from twisted.logger import Logger

from ..protocol import hostlink
from ..server.files import _inside_parts, _store_upload, open_inside, scan, split_name
from ..server.webjson import HTTPError

__all__ = ["MAX_TRANSFERS", "STALL_TIMEOUT", "HostFiles"]

#: Transfers one front may have at once on this host.
MAX_TRANSFERS = 16
#: Seconds a transfer may wait for the front before it is abandoned.
STALL_TIMEOUT = 60.0


class FrontPeer(Protocol):
    """The link to one front (L{cellmux.host.relay.FrontLink})."""

    def send(self, message: list) -> bool: ...


class _Transfer:
    """One request in progress: its data stream either way."""

    def __init__(self, front: FrontPeer, request: hostlink.FileRequest) -> None:
        self.front = front
        self.request = request
        self.done = False
        self.stall: Any = None
        # get/list: the source read a chunk at a time; next seq, acked count.
        self.source: IO[bytes] | None = None
        self.remaining = 0
        self.sent = 0
        self.acked = 0
        self.reading = False
        # put: the spool and the chunks waiting to be written to it.
        self.spool: IO[bytes] | None = None
        self.pending: deque[hostlink.FileChunk] = deque()
        self.writing = False
        self.received = 0
        self.expected_seq = 0


class HostFiles:
    """Carries out the fronts' file requests for this host's kernels.

    @param workdir_of: the working directory of a kernel of that front by
        link id (None: no such kernel of that front).
    @param quota: the host's own per-kernel quota (a front's may be lower).
    @param in_thread: runs a blocking call, giving a Deferred.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        workdir_of: Callable[[FrontPeer, str], str | None],
        quota: int,
        in_thread: Callable[..., Any] = threads.deferToThread,
    ) -> None:
        self.reactor = reactor
        #: Runs blocking file system work (a thread; tests run it in line).
        self._in_thread = in_thread
        self._workdir_of = workdir_of
        self.quota = quota
        self._transfers: dict[tuple[int, int], _Transfer] = {}

    def _send(self, front: FrontPeer, message: Any) -> None:
        front.send(hostlink.encode(message))

    def receive(self, front: FrontPeer, message: Any) -> None:
        """A file message from C{front}."""
        if isinstance(message, hostlink.FileRequest):
            self._request(front, message)
            return
        transfer = self._transfers.get((id(front), message.id))
        if transfer is None:
            return  # ended already (a late ack, or chunks of a refused upload)
        self._touch(transfer)
        if isinstance(message, hostlink.FileCancel):
            self._end(transfer)
        elif isinstance(message, hostlink.FileAck):
            transfer.acked = max(transfer.acked, message.seq + 1)
            self._pump(transfer)
        elif isinstance(message, hostlink.FileChunk):
            self._chunk(transfer, message)

    def front_lost(self, front: FrontPeer) -> None:
        """End every transfer of a front that is gone."""
        for transfer in [t for t in self._transfers.values() if t.front is front]:
            self._end(transfer)

    def shutdown(self) -> None:
        for transfer in list(self._transfers.values()):
            self._end(transfer)

    # -- requests -------------------------------------------------------------------

    def _request(self, front: FrontPeer, request: hostlink.FileRequest) -> None:
        key = (id(front), request.id)
        if key in self._transfers:
            return self._reply(front, request.id, HTTPStatus.BAD_REQUEST, "duplicate id")
        if sum(1 for t in self._transfers.values() if t.front is front) >= MAX_TRANSFERS:
            return self._reply(
                front,
                request.id,
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"this host runs at most {MAX_TRANSFERS} file transfers per front at once",
            )
        workdir = self._workdir_of(front, request.link)
        if workdir is None:
            return self._reply(front, request.id, HTTPStatus.CONFLICT, "no such kernel here")
        transfer = _Transfer(front, request)
        self._transfers[key] = transfer
        self._touch(transfer)
        if request.op == "put":
            try:
                split_name(request.name)
            except HTTPError as e:
                self._fail(transfer, e.status, e.message)
            return  # its chunks follow
        d = self._in_thread(self._open, workdir, request)
        d.addCallbacks(self._opened, self._failed, (transfer,), None, (transfer,))
        d.addErrback(self._bug, transfer)

    @staticmethod
    def _open(workdir: str, request: hostlink.FileRequest) -> tuple[IO[bytes], int]:
        """The data of a list or get, as a file to read (blocking)."""
        if not os.path.isdir(workdir):
            raise HTTPError(HTTPStatus.CONFLICT, "the kernel has no working directory")
        if request.op == "list":
            snapshot, truncated = scan(workdir)
            files = [[name, size, mtime] for name, (size, mtime) in sorted(snapshot.items())]
            data = json.dumps({"files": files, "truncated": truncated}).encode()
            spool = tempfile.TemporaryFile()  # noqa: SIM115 (closed by _close)
            spool.write(data)
            spool.seek(0)
            return spool, len(data)
        parts = split_name(request.name)
        fd = open_inside(workdir, _inside_parts(workdir, parts))
        return os.fdopen(fd, "rb"), os.fstat(fd).st_size

    def _opened(self, opened: tuple[IO[bytes], int], transfer: _Transfer) -> None:
        source, size = opened
        if transfer.done:
            source.close()
            return
        transfer.source, transfer.remaining = source, size
        self._reply(transfer.front, transfer.request.id, HTTPStatus.OK, size=size)
        self._pump(transfer)

    def _pump(self, transfer: _Transfer) -> None:
        """Read and send the next chunk, while the window has room."""
        if transfer.done or transfer.reading or transfer.source is None:
            return
        if transfer.sent - transfer.acked >= hostlink.FILE_WINDOW:
            return
        if transfer.sent > 0 and transfer.remaining <= 0:
            return  # all sent; the last ack ends it
        transfer.reading = True
        d = self._in_thread(transfer.source.read, min(hostlink.MAX_FILE_CHUNK, transfer.remaining))
        d.addCallbacks(self._read, self._failed, (transfer,), None, (transfer,))
        d.addErrback(self._bug, transfer)

    def _read(self, data: bytes, transfer: _Transfer) -> None:
        transfer.reading = False
        if transfer.done:
            self._close(transfer)
            return
        transfer.remaining -= len(data)
        # A file that shrank ends short: the front sees fewer bytes than it
        # announced and says so to its client.
        last = transfer.remaining <= 0 or len(data) == 0
        if last:
            transfer.remaining = 0
        self._send(
            transfer.front, hostlink.FileChunk(transfer.request.id, transfer.sent, last, data)
        )
        transfer.sent += 1
        if last:
            self._end(transfer)
            return
        self._pump(transfer)

    # -- uploads --------------------------------------------------------------------

    def _chunk(self, transfer: _Transfer, chunk: hostlink.FileChunk) -> None:
        request = transfer.request
        if request.op != "put" or chunk.seq != transfer.expected_seq:
            return self._fail(transfer, HTTPStatus.BAD_REQUEST, "file data out of order")
        if len(transfer.pending) >= hostlink.FILE_WINDOW:
            return self._fail(transfer, HTTPStatus.BAD_REQUEST, "file data beyond the window")
        transfer.received += len(chunk.data)
        if transfer.received > request.size or (chunk.last and transfer.received != request.size):
            return self._fail(transfer, HTTPStatus.BAD_REQUEST, "upload size does not match")
        transfer.expected_seq += 1
        transfer.pending.append(chunk)
        self._write(transfer)

    def _write(self, transfer: _Transfer) -> None:
        if transfer.writing or transfer.done or not transfer.pending:
            return
        chunk = transfer.pending.popleft()
        transfer.writing = True
        d = self._in_thread(self._spool, transfer, chunk.data)
        d.addCallbacks(self._written, self._failed, (transfer, chunk), None, (transfer,))
        d.addErrback(self._bug, transfer)

    @staticmethod
    def _spool(transfer: _Transfer, data: bytes) -> None:
        if transfer.spool is None:
            transfer.spool = tempfile.TemporaryFile()  # noqa: SIM115 (closed by _close)
        transfer.spool.write(data)

    def _written(self, _: None, transfer: _Transfer, chunk: hostlink.FileChunk) -> None:
        transfer.writing = False
        if transfer.done:
            self._close(transfer)
            return
        self._send(transfer.front, hostlink.FileAck(transfer.request.id, chunk.seq))
        if not chunk.last:
            self._write(transfer)
            return
        workdir = self._workdir_of(transfer.front, transfer.request.link)
        if workdir is None:
            return self._fail(transfer, HTTPStatus.CONFLICT, "the kernel ended")
        request = transfer.request
        quota = min(request.quota, self.quota) if request.quota else self.quota
        transfer.writing = True  # the spool is in use until it is stored
        d = self._in_thread(self._store, workdir, request, transfer, quota)
        d.addCallbacks(self._stored, self._failed, (transfer,), None, (transfer,))
        d.addErrback(self._bug, transfer)

    @staticmethod
    def _store(
        workdir: str, request: hostlink.FileRequest, transfer: _Transfer, quota: int
    ) -> tuple[str, int, int]:
        if not os.path.isdir(workdir):
            raise HTTPError(HTTPStatus.CONFLICT, "the kernel has no working directory")
        if transfer.spool is None:  # an empty upload
            transfer.spool = tempfile.TemporaryFile()  # noqa: SIM115 (closed by _close)
        spool = transfer.spool
        return _store_upload(workdir, split_name(request.name), spool, quota)

    def _stored(self, stored: tuple[str, int, int], transfer: _Transfer) -> None:
        name, size, mtime = stored
        transfer.writing = False
        if not transfer.done:
            self._reply(
                transfer.front,
                transfer.request.id,
                HTTPStatus.CREATED,
                name=name,
                size=size,
                mtime=mtime,
            )
        self._end(transfer)

    # -- ends -----------------------------------------------------------------------

    def _reply(self, front: FrontPeer, id_: int, status: int, message: str = "", **kw) -> None:
        self._send(front, hostlink.FileReply(id_, int(status), message[:4096], **kw))

    def _failed(self, failure, transfer: _Transfer) -> None:
        transfer.reading = transfer.writing = False  # its thread is done
        error = failure.value
        if isinstance(error, HTTPError):
            return self._fail(transfer, error.status, error.message)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return self._fail(
                transfer,
                HTTPStatus.INSUFFICIENT_STORAGE,
                "no space left on the kernel host's disk; the upload was not stored",
            )
        if isinstance(error, OSError):
            return self._fail(
                transfer, HTTPStatus.INTERNAL_SERVER_ERROR, f"kernel host: {error.strerror}"
            )
        return failure

    def _bug(self, failure, transfer: _Transfer) -> None:
        transfer.reading = transfer.writing = False
        self.log.failure("file transfer {id} failed", failure, id=transfer.request.id)
        self._fail(transfer, HTTPStatus.INTERNAL_SERVER_ERROR, "the kernel host failed")

    def _fail(self, transfer: _Transfer, status: int, message: str) -> None:
        if transfer.done:
            return
        if transfer.sent:  # the reply went out already: cut the data short
            self._send(transfer.front, hostlink.FileCancel(transfer.request.id, message[:4096]))
        else:
            self._reply(transfer.front, transfer.request.id, status, message)
        self._end(transfer)

    def _touch(self, transfer: _Transfer) -> None:
        if transfer.stall is not None and transfer.stall.active():
            transfer.stall.cancel()
        transfer.stall = self.reactor.callLater(STALL_TIMEOUT, self._stalled, transfer)

    def _stalled(self, transfer: _Transfer) -> None:
        transfer.stall = None
        if not transfer.done:
            self._send(
                transfer.front, hostlink.FileCancel(transfer.request.id, "the transfer stalled")
            )
            self._end(transfer)

    def _end(self, transfer: _Transfer) -> None:
        transfer.done = True
        self._transfers.pop((id(transfer.front), transfer.request.id), None)
        if transfer.stall is not None and transfer.stall.active():
            transfer.stall.cancel()
        transfer.stall = None
        self._close(transfer)

    @staticmethod
    def _close(transfer: _Transfer) -> None:
        """Close its files once no thread uses them (else when that ends)."""
        if transfer.reading or transfer.writing:
            return
        for f in (transfer.source, transfer.spool):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
