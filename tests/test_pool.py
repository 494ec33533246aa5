"""The warm pool: kernels come ready, the pool refills in the background."""

from __future__ import annotations

import re
import time

from conftest import start_server, wait_for

POOL_LINE = re.compile(r"kernel (\S+) started \(from the pool\) in ([0-9.]+) ms")


def test_pool_hands_out_ready_kernels_fast_and_refills():
    server = start_server("--pool-size", "2")
    try:
        with server.client() as client:
            status = lambda: client.get_status()["pool"]  # noqa: E731
            wait_for(lambda: status()["ready"] == 2, timeout=60)
            models = [client.create_kernel() for _ in range(2)]
            # Each came from the pool; the server logs how long that took.
            taken = {m.group(1): float(m.group(2)) for m in POOL_LINE.finditer(server.log())}
            assert set(taken) == {m.id for m in models}
            assert all(ms < 10 for ms in taken.values()), taken
            # ...and the pool fills up again by itself.
            wait_for(lambda: status()["ready"] == 2, timeout=60)
            with client.connect(models[0].id) as k:
                assert k.execute("1 + 1").result_text == "2"
    finally:
        server.stop()


def test_empty_pool_forks_on_demand():
    server = start_server("--pool-size", "0")
    try:
        with server.client() as client:
            model = client.create_kernel()
            assert "forked on demand" in server.log()
            with client.connect(model.id) as k:
                assert k.execute("'ok'").result_text == "'ok'"
    finally:
        server.stop()


def test_refill_waits_for_the_new_kernels_first_cells_unless_the_pool_ran_dry(tmp_path):
    config = tmp_path / "cellmux.toml"
    config.write_text("pool_refill_delay = 30\n")
    server = start_server("--pool-size", "2", "--config", str(config))
    try:
        with server.client() as client:
            ready = lambda: client.get_status()["pool"]["ready"]  # noqa: E731
            wait_for(lambda: ready() == 2, timeout=60)
            client.create_kernel()
            for _ in range(10):  # one kernel left: the replacement waits 30 s
                assert ready() == 1
                time.sleep(0.2)
            client.create_kernel()
            # Empty: both replacements are forked at once, not in 30 s.
            wait_for(lambda: ready() == 2, timeout=25)
    finally:
        server.stop()
