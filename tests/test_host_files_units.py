"""A kernel host's side of /files (host/files.py), driven by a Clock, with
the file system work run in line on a real directory: the window, the
limits, stalls, lost fronts, and uploads that break the rules."""

from __future__ import annotations

import os

from twisted.internet import defer
from twisted.internet.task import Clock

from cellmux.host.files import MAX_TRANSFERS, STALL_TIMEOUT, HostFiles
from cellmux.protocol import hostlink

LINK = "cd" * 16
CHUNK = hostlink.MAX_FILE_CHUNK


class Front:
    def __init__(self) -> None:
        self.sent: list = []

    def send(self, message: list) -> bool:
        frames = list(message)
        self.sent.append(hostlink.decode_from_host(frames))
        return True

    def of(self, kind: type) -> list:
        return [m for m in self.sent if isinstance(m, kind)]


def host_files(tmp_path) -> tuple[HostFiles, Front, Clock]:
    workdir = tmp_path / LINK
    workdir.mkdir()
    front, clock = Front(), Clock()
    files = HostFiles(
        clock,
        lambda peer, link: str(workdir) if peer is front and link == LINK else None,
        quota=10 * CHUNK,
        in_thread=lambda f, *a: defer.maybeDeferred(f, *a),
    )
    return files, front, clock


def test_a_download_never_runs_ahead_of_its_window(tmp_path) -> None:
    files, front, clock = host_files(tmp_path)
    data = os.urandom(10 * CHUNK + 5)
    (tmp_path / LINK / "big.bin").write_bytes(data)
    files.receive(front, hostlink.FileRequest(1, "get", LINK, "big.bin"))
    [reply] = front.of(hostlink.FileReply)
    assert (reply.status, reply.size) == (200, len(data))
    assert len(front.of(hostlink.FileChunk)) == hostlink.FILE_WINDOW
    seq = 0
    while not front.of(hostlink.FileChunk)[-1].last:
        files.receive(front, hostlink.FileAck(1, seq))
        seq += 1
        chunks = front.of(hostlink.FileChunk)
        assert len(chunks) - seq <= hostlink.FILE_WINDOW
    assert b"".join(c.data for c in front.of(hostlink.FileChunk)) == data
    assert [c.seq for c in front.of(hostlink.FileChunk)] == list(range(11))
    assert not clock.getDelayedCalls()  # ended: no stall timer left


def test_refusals_as_on_a_single_server(tmp_path) -> None:
    files, front, _clock = host_files(tmp_path)
    os.symlink("/etc", tmp_path / LINK / "etc")
    for i, name in enumerate(["../x", "/etc/passwd", "etc/passwd", "missing"]):
        files.receive(front, hostlink.FileRequest(i, "get", LINK, name))
    assert [r.status for r in front.of(hostlink.FileReply)] == [400, 400, 403, 404]
    files.receive(front, hostlink.FileRequest(9, "list", "ef" * 16))  # not its kernel
    assert front.of(hostlink.FileReply)[-1].status == 409


def test_transfers_per_front_are_limited_and_a_stall_ends_one(tmp_path) -> None:
    files, front, clock = host_files(tmp_path)
    (tmp_path / LINK / "f").write_bytes(b"x" * (8 * CHUNK))
    for i in range(MAX_TRANSFERS + 1):
        files.receive(front, hostlink.FileRequest(i, "get", LINK, "f"))
    assert front.of(hostlink.FileReply)[-1].status == 503
    clock.advance(STALL_TIMEOUT + 1)  # nobody acknowledges anything
    assert len(front.of(hostlink.FileCancel)) == MAX_TRANSFERS
    assert not clock.getDelayedCalls()
    files.receive(front, hostlink.FileRequest(99, "get", LINK, "f"))
    assert front.of(hostlink.FileReply)[-1].status == 200  # room again
    files.front_lost(front)
    assert not clock.getDelayedCalls()


def test_an_upload_is_stored_and_one_that_breaks_the_rules_is_not(tmp_path) -> None:
    files, front, _clock = host_files(tmp_path)
    data = os.urandom(CHUNK + 7)
    files.receive(front, hostlink.FileRequest(1, "put", LINK, "d/up.bin", 0, len(data)))
    files.receive(front, hostlink.FileChunk(1, 0, False, data[:CHUNK]))
    files.receive(front, hostlink.FileChunk(1, 1, True, data[CHUNK:]))
    assert [a.seq for a in front.of(hostlink.FileAck)] == [0, 1]
    reply = front.of(hostlink.FileReply)[-1]
    assert (reply.status, reply.name, reply.size) == (201, "d/up.bin", len(data))
    assert (tmp_path / LINK / "d" / "up.bin").read_bytes() == data
    # more than announced, out of order, over the host's own quota
    files.receive(front, hostlink.FileRequest(2, "put", LINK, "x", 0, 3))
    files.receive(front, hostlink.FileChunk(2, 0, True, b"four"))
    files.receive(front, hostlink.FileRequest(3, "put", LINK, "y", 0, 8))
    files.receive(front, hostlink.FileChunk(3, 1, True, b"12345678"))
    big = 10 * CHUNK
    files.receive(front, hostlink.FileRequest(4, "put", LINK, "z", 0, big))
    for seq in range(10):
        files.receive(front, hostlink.FileChunk(4, seq, seq == 9, b"z" * CHUNK))
    statuses = [r.status for r in front.of(hostlink.FileReply)[1:]]
    assert statuses == [400, 400, 413], front.of(hostlink.FileReply)
    assert sorted(os.listdir(tmp_path / LINK)) == ["d"]  # nothing else, no leftovers
