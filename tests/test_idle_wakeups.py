"""An idle kernel, and the server with it, sleep: nothing wakes either of
them between the server's idle pings (a thousand idle kernels must cost
the machine next to nothing). Real server, real kernels; the wake-ups are
the threads' context switches from /proc."""

from __future__ import annotations

import glob
import time

from conftest import config_file, start_server


def _switches(pid: int) -> int:
    """Times the threads of pid went to sleep so far (voluntary context
    switches: each is a wait that something later woke)."""
    total = 0
    for status in glob.glob(f"/proc/{pid}/task/*/status"):
        try:
            with open(status) as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        total += int(line.split()[1])
        except OSError:
            pass  # a thread that just ended
    return total


def test_idle_kernels_and_the_server_wake_nobody_between_pings():
    # No idle pings in the window: what is left is what the link itself costs.
    server = start_server(
        *("--pool-size", "0", "--max-kernels", "10"),
        *("--config", config_file("idle_ping_interval = 600.0")),
    )
    try:
        with server.client() as client:
            models = [client.create_kernel() for _ in range(5)]
            for model in models:
                with client.connect(model.id) as kernel:
                    assert kernel.execute("1+1").status == "ok"
            pids = [client.get_kernel(m.id).pid for m in models]
            time.sleep(2)  # start-up work settles; the first ping is answered
            server_before = _switches(server.process.pid)
            kernels_before = [_switches(pid) for pid in pids]
            time.sleep(5)
            server_woke = _switches(server.process.pid) - server_before
            kernels_woke = [_switches(pid) - b for pid, b in zip(pids, kernels_before, strict=True)]
            for model in models:
                client.delete_kernel(model.id)
    finally:
        server.stop()
    # Was: a ZeroMQ heartbeat a second on every link, answered by the
    # server's I/O thread (2 wake-ups a second in each kernel, and 1 more
    # in the server for each kernel: 10 each and 43 in all, measured).
    print(f"wake-ups in 5 s: kernels {kernels_woke}, server {server_woke}")
    assert max(kernels_woke) <= 3, kernels_woke
    # The server's own timers (the tick twice a second, its threads) are
    # there with no kernel at all; 5 kernels must add next to nothing.
    assert server_woke <= 30, server_woke
