"""``/poll``: the client protocol over plain HTTP, against a real server and kernels.

The browser side of long polling is tested in test_browser.py (the whole
console scenario, forced and by fallback); these tests speak the HTTP
transport directly, byte for byte.
"""

from __future__ import annotations

import contextlib
import json
import struct
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime

import pytest

from cellmux.protocol import Channel, JupyterSocket, control_frame, decode_frame, encode_frame
from cellmux.protocol.framing import frame_bytes
from cellmux.protocol.jupyter import jupyter_parts
from cellmux.server.longpoll import pack_frames, unpack_frames
from conftest import start_server


def _pack(*frames: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(f)) + f for f in frames)


def _request(server, method, path, body=None, token=None, headers=None):
    req = urllib.request.Request(
        server.url.rstrip("/") + path, data=body, method=method, headers=headers or {}
    )
    if token is not False:
        req.add_header("Authorization", f"token {token or server.token}")
    try:
        with urllib.request.urlopen(req, timeout=40) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


class Poller:
    """A long-polling client, as small as the protocol allows."""

    def __init__(self, server, kernel_id: str, session: str | None = None, **hello) -> None:
        self.server = server
        self.session = session or uuid.uuid4().hex
        body = {"op": "hello", "version": 1, "kernel": kernel_id, "session": self.session}
        body.update(hello)
        status, _, data = _request(
            server, "POST", "/poll", _pack(encode_frame(control_frame(**body)))
        )
        assert status == 201, data
        self.id = json.loads(data)["connection"]
        self.seq: int | None = None
        self.ctl = 0

    def poll(self):
        """One long poll; returns the decoded frames and moves the cursors."""
        query = f"?ctl={self.ctl}" + ("" if self.seq is None else f"&seq={self.seq}")
        status, headers, data = _request(self.server, "GET", f"/poll/{self.id}{query}")
        assert status == 200, (status, data)
        self.seq = int(headers["cellmux-seq"])
        self.ctl = int(headers["cellmux-ctl"])
        return [decode_frame(f) for f in unpack_frames(data)]

    def post(self, *frames: bytes) -> int:
        status, _, _ = _request(self.server, "POST", f"/poll/{self.id}", _pack(*frames))
        return status

    def until(self, predicate, limit: int = 8):
        """Poll until a frame satisfies predicate; return all frames seen."""
        seen = []
        for _ in range(limit):
            frames = self.poll()
            seen.extend(frames)
            if any(predicate(f) for f in frames):
                return seen
        raise AssertionError(f"not seen in {limit} polls: {seen}")

    def request(self, channel, socket, msg_type, content, parent=None) -> str:
        msg_id = uuid.uuid4().hex
        parts = jupyter_parts(
            msg_type,
            content,
            now=datetime.now(UTC),
            session=self.session,
            parent=parent,
            msg_id=msg_id,
        )
        assert self.post(frame_bytes(channel, socket, 0, list(parts))) == 204
        return msg_id

    def execute(self, code: str) -> str:
        content = {"code": code, "silent": False, "allow_stdin": True, "stop_on_error": True}
        return self.request(Channel.EXECUTE, JupyterSocket.SHELL, "execute_request", content)


def control(frame) -> dict | None:
    return json.loads(frame.parts[0]) if frame.channel == 0 else None


def jmsg(frame) -> tuple[str, dict, dict]:
    return (
        json.loads(frame.parts[0])["msg_type"],
        json.loads(frame.parts[1]),
        json.loads(frame.parts[3]),
    )


def replied(msg_id):
    return lambda f: (
        f.channel == Channel.EXECUTE
        and jmsg(f)[0] == "execute_reply"
        and (jmsg(f)[1].get("msg_id") == msg_id)
    )


@pytest.fixture
def kernel_id(client):
    model = client.create_kernel()
    yield model.id
    with contextlib.suppress(Exception):
        client.delete_kernel(model.id)


def test_pack_and_unpack_round_trip_and_refuse_truncation():
    frames = [b"", b"a", bytes(range(256)) * 3]
    assert unpack_frames(pack_frames(frames)) == frames
    body = pack_frames(frames)
    for cut in range(1, len(body)):
        try:
            got = unpack_frames(body[:cut])
        except Exception as e:
            assert getattr(e, "code", None) == "bad_lengths"
        else:  # only cuts at a frame boundary parse, to a prefix
            assert got == frames[: len(got)]


def test_execute_over_long_polling(server, kernel_id):
    poller = Poller(server, kernel_id)
    welcome = control(poller.poll()[0])
    assert welcome["op"] == "welcome" and welcome["role"] == "owner"
    assert welcome["kernel"]["id"] == kernel_id
    msg_id = poller.execute("print('hi'); 6 * 7")
    frames = poller.until(replied(msg_id))
    seqs = [f.seq for f in frames if f.channel != 0]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    out = [jmsg(f)[2] for f in frames if f.channel == Channel.STDOUT]
    assert out[0]["text"] == "hi\n"
    results = [jmsg(f)[2] for f in frames if f.channel == Channel.DISPLAY]
    assert results[0]["data"]["text/plain"] == "42"
    assert poller.seq == max(seqs)


def test_a_poll_repeated_with_the_same_cursor_gets_the_same_frames(server, kernel_id):
    """A lost response costs nothing: the frames stay in the replay log."""
    poller = Poller(server, kernel_id)
    poller.poll()
    start = poller.seq
    msg_id = poller.execute("1 + 1")
    poller.until(replied(msg_id))
    poller.seq, poller.ctl = start, poller.ctl
    again = poller.until(replied(msg_id))
    assert any(replied(msg_id)(f) for f in again)


def test_resume_with_a_cursor_in_hello(server, kernel_id):
    first = Poller(server, kernel_id)
    first.poll()
    cursor = first.seq
    msg_id = first.execute("print('missed')")
    first.until(replied(msg_id))
    assert _request(server, "DELETE", f"/poll/{first.id}")[0] == 204
    # A new connection from the old cursor gets what happened since.
    second = Poller(server, kernel_id, session=first.session, cursor=cursor)
    frames = second.until(replied(msg_id))
    texts = [jmsg(f)[2].get("text") for f in frames if f.channel == Channel.STDOUT]
    assert "missed\n" in texts


def test_stdin_over_long_polling(server, kernel_id):
    poller = Poller(server, kernel_id)
    poller.poll()
    msg_id = poller.execute("print('got', input('name? '))")
    frames = poller.until(lambda f: f.channel == Channel.STDIN)
    request = next(f for f in frames if f.channel == Channel.STDIN)
    msg_type, _, content = jmsg(request)
    assert msg_type == "input_request" and content["prompt"] == "name? "
    poller.request(
        Channel.STDIN,
        JupyterSocket.STDIN,
        "input_reply",
        {"status": "ok", "value": "Ada"},
        parent=json.loads(request.parts[0]),
    )
    frames = poller.until(replied(msg_id))
    assert any(f.channel == Channel.STDOUT and jmsg(f)[2]["text"] == "got Ada\n" for f in frames)


def test_control_requests_and_refused_frames(server, kernel_id):
    poller = Poller(server, kernel_id)
    poller.poll()
    assert poller.post(encode_frame(control_frame("ping", id=7))) == 204
    frames = poller.until(lambda f: (control(f) or {}).get("op") == "pong")
    assert any(control(f) == {"op": "pong", "id": 7} for f in frames)
    # A frame clients may not send is refused, and the connection lives on.
    assert poller.post(frame_bytes(Channel.STDOUT, 1, 0, [b"{}"] * 4)) == 204
    frames = poller.until(lambda f: (control(f) or {}).get("op") == "error")
    error = next(control(f) for f in frames if control(f))
    assert error["code"] == "channel_not_sendable" and error["fatal"] is False
    # A body whose lengths do not add up: refused the same way.
    status, _, _ = _request(server, "POST", f"/poll/{poller.id}", b"\x00\x00\x00\x09abc")
    assert status == 204
    poller.until(lambda f: (control(f) or {}).get("code") == "bad_lengths")
    # A frame too short to be one.
    assert poller.post(b"abc") == 204
    poller.until(lambda f: (control(f) or {}).get("code") == "frame_truncated")
    msg_id = poller.execute("2 + 2")
    poller.until(replied(msg_id))


def test_bad_requests_get_clear_errors(server, kernel_id):
    status, _, body = _request(server, "POST", "/poll", b"", token=False)
    assert status == 403 and json.loads(body)["message"] == "a valid token is required"
    status, _, body = _request(server, "GET", "/poll/nope")
    assert status == 404
    poller = Poller(server, kernel_id)
    status, _, body = _request(server, "GET", f"/poll/{poller.id}?seq=-1")
    assert status == 400 and "integers" in json.loads(body)["message"]
    status, _, body = _request(server, "GET", f"/poll/{poller.id}?seq=x")
    assert status == 400
    # Another credential cannot use someone's connection.
    status, _, _ = _request(server, "GET", f"/poll/{poller.id}", token="wrong")
    assert status == 403
    status, _, _ = _request(server, "PUT", f"/poll/{poller.id}", b"")
    assert status == 405
    # A page on an origin that is not allowed cannot open one.
    status, _, body = _request(
        server, "POST", "/poll", b"", headers={"Origin": "http://evil.example"}
    )
    assert status == 403 and "origin" in json.loads(body)["message"]
    # ...and its browser gets no CORS grant to read anything.
    status, headers, _ = _request(
        server, "OPTIONS", "/poll", token=False, headers={"Origin": "http://evil.example"}
    )
    assert status == 204 and headers["access-control-allow-origin"] is None
    status, _, _ = _request(
        server, "POST", "/embed/kernels", b"", headers={"Origin": "http://evil.example"}
    )
    assert status == 403
    assert server.alive()


def test_unknown_kernel_and_bad_hello_close_the_connection(server):
    poller = Poller(server, "no-such-kernel")
    frames = poller.poll()
    assert control(frames[0])["code"] == "unknown_kernel"
    assert control(frames[-1]) == {
        "op": "close",
        "code": 4404,
        "reason": "no kernel no-such-kernel",
    }
    assert poller.post(b"") == 410
    # A first frame that is not hello.
    _, _, data = _request(server, "POST", "/poll", _pack(frame_bytes(6, 1, 0, [b"{}"] * 4)))
    cid = json.loads(data)["connection"]
    _, _, data = _request(server, "GET", f"/poll/{cid}")
    frames = [decode_frame(f) for f in unpack_frames(data)]
    assert control(frames[0])["code"] == "expected_hello"
    assert control(frames[-1])["op"] == "close"


def test_kernel_shut_down_closes_with_4000(server, client):
    model = client.create_kernel()
    poller = Poller(server, model.id)
    poller.poll()
    client.delete_kernel(model.id)
    frames = poller.until(lambda f: (control(f) or {}).get("op") == "close")
    assert control(frames[-1])["code"] == 4000


def test_interrupt_over_long_polling(server, kernel_id):
    poller = Poller(server, kernel_id)
    poller.poll()
    msg_id = poller.execute("import time\nwhile True: time.sleep(0.05)")
    poller.until(lambda f: f.channel == Channel.STATUS and b"busy" in f.parts[3])
    assert poller.post(encode_frame(control_frame("interrupt", id=1))) == 204
    frames = poller.until(replied(msg_id))
    errors = [jmsg(f)[2] for f in frames if f.channel == Channel.DISPLAY]
    assert any(e.get("ename") == "KeyboardInterrupt" for e in errors)


def test_a_slow_poller_is_told_what_it_lost():
    running = start_server("--pool-size", "1", "--config", _small_replay_config())
    try:
        with running.client() as c:
            model = c.create_kernel()
            poller = Poller(running, model.id)
            poller.poll()
            start = poller.seq
            with c.connect(model.id) as k:
                k.execute("for i in range(400): print('x' * 100, flush=True)")
            poller.seq = start
            frames = poller.poll()
            gap = control(frames[0])
            assert gap["op"] == "gap" and gap["first"] == start + 1 and gap["missed"] > 0
            data = [f for f in frames if f.channel != 0]
            assert data[0].seq == gap["last"] + 1
    finally:
        running.stop()


def _small_replay_config() -> str:
    from conftest import config_file

    return config_file("replay_bytes = 4096")


def test_a_client_that_never_polls_cannot_grow_its_queue(server, kernel_id):
    poller = Poller(server, kernel_id)
    pings = [encode_frame(control_frame("ping", id=i)) for i in range(1001)]
    assert poller.post(*pings) == 204
    frames = poller.poll()
    assert control(frames[-1]) == {
        "op": "close",
        "code": 1002,
        "reason": "too many unacknowledged control frames",
    }
    assert poller.post(pings[0]) == 410
