"""A kernel printing flat out to no one costs the server nothing and is culled."""

from __future__ import annotations

import time

from conftest import wait_for

from .helpers import cpu_seconds, running_server

FLOOD = """
import threading
import time

def flood():
    time.sleep(1.0)  # after the client has left
    while True:
        print('x' * 1000)

threading.Thread(target=flood, daemon=True).start()
"""


def test_output_nobody_watches_is_held_and_is_not_activity(tmp_path):
    config = tmp_path / "cellmux.toml"
    config.write_text("idle_timeout = 8.0\nreplay_bytes = 1048576\n")
    with running_server("--pool-size", "1", "--config", str(config)) as server:
        with server.client() as client:
            model = client.create_kernel()
            with client.connect(model.id) as k:
                assert k.execute(FLOOD).error is None
            # No client now: once the replay log is full the kernel waits.
            time.sleep(2.0)
            before = cpu_seconds(server.process.pid)
            time.sleep(4.0)
            used = cpu_seconds(server.process.pid) - before
            assert used < 0.15, f"the server spent {used:.2f} s of CPU on output nobody reads"
            # The kernel is idle (its cell ended) and its output is not
            # activity: it is culled like any idle kernel.
            wait_for(lambda: model.id not in [m.id for m in client.list_kernels()], 30)
        assert "idle timeout (8 s)" in server.log()
