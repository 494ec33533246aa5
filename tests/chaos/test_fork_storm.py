"""A kernel start that always fails makes the pool back off, not fork in a loop."""

from __future__ import annotations

import time

from .helpers import cpu_seconds, http, running_server

WATCH = 10.0


def test_a_persistent_start_failure_backs_off_with_one_log_line(tmp_path):
    # Five descriptors are too few for a kernel's ZeroMQ sockets: every
    # forked kernel dies while starting (before the fix: ~70 forks a second).
    config = tmp_path / "cellmux.toml"
    config.write_text("limit_open_files = 5\n")
    with running_server("--pool-size", "2", "--config", str(config)) as server:
        cpu_before = cpu_seconds(server.process.pid)
        time.sleep(WATCH)
        cpu = cpu_seconds(server.process.pid) - cpu_before
        status, body = http(server, "GET", "/api/status")
        # Starting kernels is not the nursery's fault: the server is up.
        assert status == 200 and body["state"] == "ok", body
        failed = body["pool"]["failed_starts"]
        # two at first, then one probe after 0.5, 1, 2 and 4 s: 6 in 10 s
        assert 3 <= failed <= 8, body
        assert "ended while starting" in body["pool"]["last_error"]
        assert cpu < 0.3 * WATCH, f"the server used {cpu:.2f} s of CPU in {WATCH:g} s"
        # A create with the pool empty fails with a clear reason.
        status, body = http(server, "POST", "/api/kernels")
        assert status == 500 and "ended while starting" in body["message"], body
        log = server.log()
        assert log.count("warming a pool kernel failed") == 1, log[-3000:]
        assert server.alive()
