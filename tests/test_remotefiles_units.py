"""The front's file requests to kernel hosts (server/remotefiles.py), driven
by a Clock and a recording sender: timeouts, lost hosts, the window, limits."""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.internet.task import Clock

from cellmux.protocol import hostlink
from cellmux.server.remotefiles import MAX_REQUESTS, REPLY_TIMEOUT, RemoteFiles
from cellmux.server.webjson import HTTPError

LINK = "ab" * 16


class Sender:
    def __init__(self) -> None:
        self.sent: list[tuple[str, object]] = []
        self.gone = False

    def send_file_message(self, name: str, message: object) -> None:
        if self.gone:
            raise RuntimeError("not connected")
        self.sent.append((name, message))

    def of(self, kind: type) -> list:
        return [m for _, m in self.sent if isinstance(m, kind)]


class Request:
    """What a download writes to (twisted.web's Request, as far as used)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.producer = None

    def write(self, data: bytes) -> None:
        self.data.extend(data)

    def registerProducer(self, producer, streaming: bool) -> None:
        self.producer = producer


def files() -> tuple[RemoteFiles, Sender, Clock]:
    sender, clock = Sender(), Clock()
    return RemoteFiles(sender, clock), sender, clock


def error_of(d: defer.Deferred) -> HTTPError:
    failures: list = []
    d.addErrback(failures.append)
    assert failures, "it did not fail"
    return failures[0].value


def test_a_listing_comes_in_chunks_and_each_is_acknowledged() -> None:
    remote, sender, _clock = files()
    d = defer.ensureDeferred(remote.listing("a", LINK))
    [request] = sender.of(hostlink.FileRequest)
    assert (request.op, request.link) == ("list", LINK)
    data = json.dumps({"files": [["x.txt", 3, 7]], "truncated": False}).encode()
    remote.receive("a", hostlink.FileReply(request.id, 200, size=len(data)))
    remote.receive("b", hostlink.FileChunk(request.id, 0, True, b"{}"))  # not b's
    remote.receive("a", hostlink.FileChunk(request.id, 0, False, data[:5]))
    remote.receive("a", hostlink.FileChunk(request.id, 1, True, data[5:]))
    assert d.result == ({"x.txt": (3, 7)}, False)
    assert [a.seq for a in sender.of(hostlink.FileAck)] == [0, 1]


def test_an_error_reply_is_the_answer() -> None:
    remote, sender, _clock = files()
    d = defer.ensureDeferred(remote.listing("a", LINK))
    [request] = sender.of(hostlink.FileRequest)
    remote.receive("a", hostlink.FileReply(request.id, 403, "leads outside"))
    error = error_of(d)
    assert (error.status, error.message) == (403, "leads outside")


def test_a_silent_host_times_out_and_is_told() -> None:
    remote, sender, clock = files()
    d = defer.ensureDeferred(remote.listing("a", LINK))
    clock.advance(REPLY_TIMEOUT - 1)
    assert not d.called
    clock.advance(2)
    error = error_of(d)
    assert error.status == 504 and "did not answer" in error.message
    assert len(sender.of(hostlink.FileCancel)) == 1
    assert not clock.getDelayedCalls()


def test_a_lost_host_fails_its_requests_at_once() -> None:
    remote, _sender, clock = files()
    on_a = defer.ensureDeferred(remote.listing("a", LINK))
    on_b = defer.ensureDeferred(remote.listing("b", LINK))
    remote.host_lost("a", "host lost")
    error = error_of(on_a)
    assert error.status == 502 and "kernel host a lost (host lost)" in error.message
    assert not on_b.called
    remote.host_lost("b", "host lost")
    error_of(on_b)
    assert not clock.getDelayedCalls()


def test_requests_per_host_are_limited() -> None:
    remote, _sender, _clock = files()
    pending = [defer.ensureDeferred(remote.listing("a", LINK)) for _ in range(MAX_REQUESTS)]
    error = error_of(defer.ensureDeferred(remote.listing("a", LINK)))
    assert error.status == 503
    on_b = defer.ensureDeferred(remote.listing("b", LINK))
    assert not on_b.called  # another host: fine
    remote.host_lost("a", "x")
    for d in pending:
        error_of(d)
    again = defer.ensureDeferred(remote.listing("a", LINK))
    assert not again.called  # room again
    remote.host_lost("a", "x")
    remote.host_lost("b", "x")
    error_of(again)
    error_of(on_b)


def test_a_download_acknowledges_only_what_its_client_takes() -> None:
    remote, sender, clock = files()
    out = Request()
    sizes: list[int] = []

    def start(size: int) -> Request:
        sizes.append(size)
        return out

    d = defer.ensureDeferred(remote.download("a", LINK, "f.bin", start))
    [request] = sender.of(hostlink.FileRequest)
    assert (request.op, request.name) == ("get", "f.bin")
    remote.receive("a", hostlink.FileReply(request.id, 200, size=6))
    _transfer, complete = d.result
    assert sizes == [6] and out.producer is not None
    remote.receive("a", hostlink.FileChunk(request.id, 0, False, b"ab"))
    out.producer.pauseProducing()  # the client stopped reading
    remote.receive("a", hostlink.FileChunk(request.id, 1, False, b"cd"))
    assert [a.seq for a in sender.of(hostlink.FileAck)] == [0]
    clock.advance(REPLY_TIMEOUT * 3)  # a slow client is not a silent host
    assert not complete.called
    out.producer.resumeProducing()
    assert [a.seq for a in sender.of(hostlink.FileAck)] == [0, 1]
    remote.receive("a", hostlink.FileChunk(request.id, 2, True, b"ef"))
    assert out.data == b"abcdef" and complete.called and complete.result is None
    assert not clock.getDelayedCalls()


def test_a_download_cut_short_fails() -> None:
    remote, sender, _clock = files()
    out = Request()
    d = defer.ensureDeferred(remote.download("a", LINK, "f.bin", lambda size: out))
    [request] = sender.of(hostlink.FileRequest)
    remote.receive("a", hostlink.FileReply(request.id, 200, size=6))
    _transfer, complete = d.result
    remote.receive("a", hostlink.FileChunk(request.id, 0, False, b"ab"))
    remote.host_lost("a", "host lost")
    failures: list = []
    complete.addErrback(failures.append)
    assert "kernel host a lost" in str(failures[0].value)
    # the client went away: the host is told to stop
    d = defer.ensureDeferred(remote.download("a", LINK, "g.bin", lambda size: out))
    [_, request] = sender.of(hostlink.FileRequest)
    remote.receive("a", hostlink.FileReply(request.id, 200, size=6))
    out.producer.stopProducing()
    assert sender.of(hostlink.FileCancel)[-1].id == request.id
    assert "the client went away" in str(error_of(d.result[1]))


def test_a_host_that_cannot_be_sent_to_is_a_bad_gateway() -> None:
    remote, sender, _clock = files()
    sender.gone = True
    error = error_of(defer.ensureDeferred(remote.listing("a", LINK)))
    assert error.status == 502 and "not connected" in error.message
