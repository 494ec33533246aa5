"""A Jupyter client whose messages are refused, and that does not read the
answers, costs the server a bounded amount and is cut off."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time
import urllib.parse
import uuid

from conftest import rss

MiB = 1024 * 1024


def _frame(opcode: int, data: bytes) -> bytes:
    mask = os.urandom(4)
    n = len(data)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    key = (mask * (n // 4 + 1))[:n]
    masked = (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    return header + mask + masked


def _connect(url: str, kernel_id: str, token: str) -> socket.socket:
    parts = urllib.parse.urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /api/kernels/{kernel_id}/channels?session_id=spy&token={token} HTTP/1.1\r\n"
            f"Host: {parts.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def test_an_observer_flooding_refused_requests_without_reading_is_cut_off(server, client):
    model = client.create_kernel()
    try:
        share = client.share_kernel(model.id, "observer")
        sock = _connect(server.url, model.id, share["token"])
        before = rss(server.process.pid)
        pad = "x" * 4_000  # echoed whole in every error reply, before
        sent = 0
        try:
            for _ in range(30_000):
                message = {
                    "header": {
                        "msg_id": uuid.uuid4().hex,
                        "msg_type": "execute_request",
                        "session": "spy",
                        "username": "spy",
                        "version": "5.3",
                        "pad": pad,
                    },
                    "parent_header": {},
                    "metadata": {},
                    "content": {"code": "1", "silent": False},
                    "channel": "shell",
                }
                sock.sendall(_frame(0x1, json.dumps(message).encode()))
                sent += 1
        except OSError:
            pass  # the server cut us off: what this test wants
        time.sleep(1)
        grew = rss(server.process.pid) - before
        # Reading now: a few answers, then the close frame.
        sock.settimeout(10)
        received = b""
        closed = False
        while True:
            try:
                chunk = sock.recv(1 << 16)
            except OSError:
                break
            if not chunk:
                closed = True  # the server ended the connection
                break
            received += chunk
        sock.close()
        answered = received.count(b"cellmux refused")
        assert closed
        assert b"cellmux refused execute_request" in received
        # Once its connection was full, its refusals were counted, not answered.
        assert answered < sent, (answered, sent)
        assert pad.encode() not in received  # replies echo a trimmed header
        assert grew < 32 * MiB, f"server grew {grew / MiB:.1f} MiB for {sent} refused messages"
        # Everyone else goes on.
        with client.connect(model.id) as k:
            assert k.execute("6 * 7", timeout=30).result_text == "42"
    finally:
        client.delete_kernel(model.id)
