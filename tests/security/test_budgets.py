"""Every byte the server keeps for a kernel or a client has a bound (docs/security.md, Budgets).

Real servers, real kernels, real sockets; the server's resident memory is
measured before and after each attack.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import threading
import time
import urllib.parse
import urllib.request
from datetime import UTC, datetime

import pytest

from cellmux.protocol import (
    PROTOCOL_VERSION,
    Channel,
    JupyterSocket,
    control_frame,
    decode_frame,
    encode_frame,
    frame_bytes,
    parse_control,
)
from cellmux.protocol.jupyter import jupyter_parts
from cellmux.server.history import HISTORY_CHARS, HISTORY_ENTRY_CHARS
from cellmux.server.oneshot import MAX_OUTPUT
from cellmux.server.stdin import MAX_PENDING_PROMPTS
from conftest import rss, start_server, wait_for

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def budget_server():
    running = start_server("--pool-size", "1")
    yield running
    running.stop()
    shutil.rmtree(running.runtime_dir, ignore_errors=True)


def settled_rss(pid: int) -> int:
    """RSS once the server stopped changing (freed buffers are returned)."""
    time.sleep(0.5)
    return rss(pid)


# A hostile kernel writes input_requests of its own making on its stdin
# socket, for sessions nobody declared: 15 of 20 MiB, then 100 of 60 kB.
HOSTILE_PROMPTS = """
k = get_ipython().kernel
ident = k._parent_ident["shell"]
def ask(session, size):
    content = b'{"prompt": "' + b'x' * size + b'", "password": false}'
    parent = {"session": session, "msg_id": session, "msg_type": "execute_request"}
    k.session.send(k.stdin_socket, "input_request", content=content, parent=parent, ident=ident)
for i in range(15):
    ask(f"huge-{i}", 20 << 20)
for i in range(100):
    ask(f"many-{i}", 60_000)
print("asked")
"""


def test_a_kernel_cannot_make_the_server_keep_its_prompts(budget_server):
    server = budget_server
    pid = server.process.pid
    notes: list[str] = []

    def listen(frame) -> None:
        if frame.channel == Channel.STDERR:
            notes.append(json.loads(frame.parts[3])["text"])

    with server.client() as client:
        model = client.create_kernel()
        with client.connect(model.id) as k:
            k.add_listener(listen)
            k.execute("1", timeout=30)
            before = settled_rss(pid)
            result = k.execute(HOSTILE_PROMPTS, timeout=120)
            assert result.stdout == "asked\n"

            def counted(text: str) -> int:
                return sum(text in n for n in list(notes))

            # The kernel's prompts wait for link credit behind its reply.
            wait_for(lambda: counted("cut the prompt") == 15, timeout=120)
            # 115 made-up sessions, the newest 16 kept
            pushed_out = f"more than {MAX_PENDING_PROMPTS} were waiting"
            wait_for(lambda: counted(pushed_out) == 115 - MAX_PENDING_PROMPTS, timeout=60)
            k.ping()
            after = settled_rss(pid)
            assert counted(pushed_out) == 115 - MAX_PENDING_PROMPTS
            # input() still works, its stale end-of-file answers purged
            answer = k.execute("input('name? ')", on_stdin=lambda p, pw: "Ada", timeout=30)
            assert answer.result_text == "'Ada'"
        client.delete_kernel(model.id)
    grew = after - before
    print(f"server RSS grew {grew / MiB:.1f} MiB after 306 MiB of prompts")
    # Held: 16 prompts of at most 64 KiB; the rest is transient buffers.
    assert grew < 64 * MiB, f"server grew {grew / MiB:.1f} MiB"


class RawWebSocket:
    """A websocket client on a plain socket: it reads only when told to.

    (The websockets library reads in a background thread whatever the
    test does, so it cannot play a client that stopped reading.)
    """

    def __init__(self, url: str, token: str, receive_buffer: int = 64 * 1024) -> None:
        parts = urllib.parse.urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET /ws?token={token} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        self._buffer = b""
        while b"\r\n\r\n" not in self._buffer:
            self._buffer += self.sock.recv(4096)
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head

    def send(self, data: bytes) -> None:
        mask = os.urandom(4)
        n = len(data)
        if n < 126:
            header = struct.pack("!BB", 0x82, 0x80 | n)
        elif n < 65536:
            header = struct.pack("!BBH", 0x82, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x82, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        self.sock.sendall(header + mask + masked)

    def _read(self, n: int) -> bytes:
        while len(self._buffer) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("closed")
            self._buffer += chunk
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def recv(self) -> bytes:
        first, second = self._read(2)
        n = second & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self._read(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._read(8))
        payload = self._read(n)
        if first & 0x0F == 0x8:
            raise ConnectionError(f"closed by the server: {payload[2:]!r}")
        return payload

    def close(self) -> None:
        self.sock.close()


def _fill_history(k, cells: int, chars: int) -> None:
    for i in range(cells):
        k.execute(f"{i}  # " + "x" * chars, timeout=60)


def test_input_history_is_bounded_per_entry_and_in_total(budget_server):
    server = budget_server
    pid = server.process.pid
    with server.client() as client:
        model = client.create_kernel()
        with client.connect(model.id) as k:
            k.execute("1", timeout=30)
            before = settled_rss(pid)
            # 12 cells of 8 MiB: 96 MiB of code sent
            _fill_history(k, 12, 8 * MiB)
            after = settled_rss(pid)
            history = k.history()
        client.delete_kernel(model.id)
    cut = [h for h in history if h.get("truncated")]
    assert len(cut) == 12 and all(len(h["code"]) == HISTORY_ENTRY_CHARS for h in cut)
    assert cut[0]["length"] == len("0  # ") + 8 * MiB
    assert sum(len(h["code"]) for h in history) <= HISTORY_CHARS
    grew = after - before
    print(f"server RSS grew {grew / MiB:.1f} MiB after 96 MiB of cells")
    assert grew < 64 * MiB, f"server grew {grew / MiB:.1f} MiB"


def test_a_client_asking_for_history_without_reading_costs_one_reply(budget_server):
    server = budget_server
    pid = server.process.pid
    with server.client() as client:
        model = client.create_kernel()
        with client.connect(model.id) as k:
            # a history of about 4 MiB: each reply is that big
            _fill_history(k, 17, HISTORY_ENTRY_CHARS - 10)
        share = client.share_kernel(model.id, "observer")
        spy = RawWebSocket(server.url, share["token"])
        try:
            hello = control_frame("hello", version=PROTOCOL_VERSION, kernel=model.id, session="spy")
            spy.send(encode_frame(hello))
            assert parse_control(decode_frame(spy.recv()))["op"] == "welcome"
            before = settled_rss(pid)
            for i in range(100):
                spy.send(encode_frame(control_frame("history", id=i)))
            time.sleep(2)
            after = settled_rss(pid)
            # others are still served at once
            with client.connect(model.id) as k:
                assert k.execute("6 * 7", timeout=30).result_text == "42"
            # and once the client reads, every reply comes, in order
            ids = []
            while len(ids) < 100:
                frame = decode_frame(spy.recv())
                if frame.channel == Channel.CONTROL:
                    body = parse_control(frame)
                    if body["op"] == "history":
                        assert len(body["inputs"]) >= 15
                        ids.append(body["id"])
            assert ids == list(range(100))
        finally:
            spy.close()
        client.delete_kernel(model.id)
    grew = after - before
    print(f"server RSS grew {grew / MiB:.1f} MiB for 100 unread history requests")
    assert grew < 48 * MiB, f"server grew {grew / MiB:.1f} MiB"


# 100 displays of 1 MiB, a 1 MiB result, then an exception whose value and
# traceback are megabytes.
FLOOD_SERVICE = """
from IPython.display import HTML, display
for i in range(100):
    display(HTML(str(i) + 'x' * (1 << 20)))
print('printed')
_ = 'r' * (1 << 20)
raise ValueError('v' * (4 << 20))
"""


def test_service_keeps_a_bounded_amount_of_output_of_every_kind(budget_server):
    server = budget_server
    pid = server.process.pid
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss(pid))
            time.sleep(0.02)

    before = settled_rss(pid)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        request = urllib.request.Request(
            server.url + "service",
            data=json.dumps({"code": FLOOD_SERVICE, "timeout": 120}).encode(),
            headers={"Authorization": f"token {server.token}"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=180) as response:
            body = json.loads(response.read())
    finally:
        stop.set()
        sampler.join()
    assert body["status"] == "error" and body["output_truncated"] is True
    assert body["error"]["ename"] == "ValueError"
    assert len(body["error"]["evalue"]) <= 4 << 20
    kept = sum(len(json.dumps(d)) for d in body["displays"])
    assert 0 < len(body["displays"]) < 20 and kept <= MAX_OUTPUT
    assert "cellmux: output truncated" in body["stderr"]
    grew = peak[0] - before
    print(f"server RSS peaked {grew / MiB:.1f} MiB above its start for ~105 MiB of output")
    assert grew < 160 * MiB, f"server grew {grew / MiB:.1f} MiB"


def test_a_long_poll_client_that_never_polls_is_cut_off_not_queued_for(budget_server):
    from test_longpoll import Poller

    server = budget_server
    pid = server.process.pid
    with server.client() as client:
        model = client.create_kernel()
        with client.connect(model.id) as k:
            _fill_history(k, 17, HISTORY_ENTRY_CHARS - 10)  # replies of about 4 MiB
        poller = Poller(server, model.id)
        before = settled_rss(pid)
        # up to 40 history replies (160 MiB) asked for, none collected
        statuses = [poller.post(encode_frame(control_frame("history", id=i))) for i in range(40)]
        after = settled_rss(pid)
        client.delete_kernel(model.id)
    # cut off after 64 MiB of replies (16 or 17 of them); later posts: 410 Gone
    accepted = statuses.count(204)
    assert 10 < accepted < 20 and set(statuses[accepted:]) == {410}
    grew = after - before
    print(f"server RSS grew {grew / MiB:.1f} MiB for {accepted} uncollected history replies")
    assert grew < 96 * MiB, f"server grew {grew / MiB:.1f} MiB"


def test_a_request_from_a_client_that_is_not_reading_is_still_carried_out_at_once(
    budget_server,
):
    """Only replies wait for the client: a restart (or interrupt) does not."""
    server = budget_server
    with server.client() as client:
        model = client.create_kernel()
        states: list[str] = []
        with client.connect(model.id) as watcher:
            watcher.on_status = states.append
            writer = RawWebSocket(server.url, server.token)
            try:
                hello = control_frame(
                    "hello", version=PROTOCOL_VERSION, kernel=model.id, session="writer"
                )
                writer.send(encode_frame(hello))
                assert parse_control(decode_frame(writer.recv()))["op"] == "welcome"
                flood = jupyter_parts(
                    "execute_request",
                    {"code": "while True: print('x' * 1000)", "silent": False},
                    now=datetime.now(UTC),
                    session="writer",
                )
                writer.send(frame_bytes(Channel.EXECUTE, JupyterSocket.SHELL, 0, list(flood)))
                time.sleep(3)  # its socket is full long before this
                writer.send(encode_frame(control_frame("restart", id="now")))
                wait_for(lambda: "restarting" in states, timeout=20)
            finally:
                writer.close()
        client.delete_kernel(model.id)
