"""With a small replay log, a writer that stops reading for a while loses nothing."""

from __future__ import annotations

import json
import socket
import time
import urllib.parse
import uuid
from datetime import UTC, datetime

from websockets.sync.client import connect

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

from .helpers import running_server

LINES = 2_000_000
PAUSE = 10.0


def test_a_paused_writer_with_a_2_mib_replay_log_loses_no_output(tmp_path):
    config = tmp_path / "cellmux.toml"
    config.write_text(f"replay_bytes = {2 * 1024 * 1024}\n")
    with running_server("--pool-size", "1", "--config", str(config)) as server:
        with server.client() as client:
            kernel = client.create_kernel()
        session = uuid.uuid4().hex
        url = server.url.replace("http://", "ws://") + f"ws?token={server.token}"
        # max_queue=1 and a small receive buffer: while the test does not
        # read, the connection fills up soon (not after megabytes of kernel
        # buffers), and the server holds the kernel's credit.
        address = urllib.parse.urlsplit(server.url)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.connect((address.hostname, address.port))
        with connect(url, sock=sock, max_queue=1, max_size=None) as ws:
            hello = control_frame(
                "hello", version=PROTOCOL_VERSION, kernel=kernel.id, session=session
            )
            ws.send(encode_frame(hello))
            code = f"for i in range({LINES}): print(i)\nprint('DONE')"
            parts = jupyter_parts(
                "execute_request",
                {"code": code, "silent": False},
                now=datetime.now(UTC),
                session=session,
            )
            ws.send(frame_bytes(Channel.EXECUTE, JupyterSocket.SHELL, 0, list(parts)))
            time.sleep(PAUSE)  # the writer stops reading
            text: list[str] = []
            gaps: list[dict] = []
            deadline = time.monotonic() + 180
            while not (text and text[-1].endswith("DONE\n")):
                assert time.monotonic() < deadline, "the output did not all arrive"
                frame = decode_frame(ws.recv(timeout=60), max_size=64 * 1024 * 1024)
                if frame.channel == Channel.CONTROL:
                    body = parse_control(frame)
                    if body["op"] == "gap":
                        gaps.append(body)
                elif frame.channel == Channel.STDOUT:
                    text.append(json.loads(frame.parts[3])["text"])
        assert gaps == []
        lines = "".join(text).splitlines()
        assert lines[:-1] == [str(i) for i in range(LINES)]
        assert server.alive()
