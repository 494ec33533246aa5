"""A kernel that floods its output slows only itself; its memory and the server's stay bounded."""

from __future__ import annotations

import contextlib
import time
import uuid
from datetime import UTC, datetime

from websockets.sync.client import connect

from cellmux.protocol import (
    PROTOCOL_VERSION,
    Channel,
    JupyterSocket,
    control_frame,
    encode_frame,
    frame_bytes,
)
from cellmux.protocol.jupyter import jupyter_parts
from conftest import rss, start_server


def test_flooding_kernel_with_a_stalled_client_does_not_hurt_the_others():
    server = start_server("--pool-size", "2")
    try:
        with server.client() as client, contextlib.ExitStack() as stack:
            flooder = client.create_kernel()
            neighbour = client.create_kernel()
            baseline = rss(server.process.pid)
            flooder_baseline = rss(flooder.pid)
            session = uuid.uuid4().hex
            url = server.url.replace("http://", "ws://") + f"ws?token={server.token}"
            # A client that starts a flood and then never reads again.
            stalled = stack.enter_context(connect(url, max_queue=1))
            stalled.send(
                encode_frame(
                    control_frame(
                        "hello", version=PROTOCOL_VERSION, kernel=flooder.id, session=session
                    )
                )
            )
            code = "while True: print('x' * 10000)"
            parts = jupyter_parts(
                "execute_request",
                {"code": code, "silent": False},
                now=datetime.now(UTC),
                session=session,
            )
            stalled.send(frame_bytes(Channel.EXECUTE, JupyterSocket.SHELL, 0, list(parts)))
            peak = baseline
            with client.connect(neighbour.id) as k:
                deadline = time.monotonic() + 15
                runs = 0
                while time.monotonic() < deadline:
                    assert k.execute(f"{runs} + 1", timeout=30).result_text == str(runs + 1)
                    runs += 1
                    peak = max(peak, rss(server.process.pid))
            assert runs > 20  # the neighbour kept its normal pace
            # bounded: the replay log (8 MiB) plus a credit window (4 MiB) and slack,
            # while the flooder tried to print gigabytes
            assert peak - baseline < 40 * 1024 * 1024, f"server grew {peak - baseline} bytes"
            # The flooder waits for its client, holding only its bounded
            # queues (a few 1 MiB messages): an iopub queue of 1000
            # messages once let it grow by a gigabyte.
            assert client.get_kernel(flooder.id).execution_state == "busy"
            grown = rss(flooder.pid) - flooder_baseline
            assert grown < 64 * 1024 * 1024, f"the flooding kernel grew {grown} bytes"
    finally:
        server.stop()
