"""SIGKILL the nursery of a running server: clients are told, the server
says it is degraded, a new nursery starts, and kernels work again."""

from __future__ import annotations

import json
import os
import signal

from cellmux.protocol import Channel
from conftest import wait_for

from .helpers import http, running_server


def _status_contents(frames: list) -> list[dict]:
    return [json.loads(f.parts[3]) for f in frames if f.channel == Channel.STATUS]


def test_a_killed_nursery_is_replaced_and_the_server_says_so_meanwhile(tmp_path):
    with running_server("--pool-size", "1") as server, server.client() as client:
        first = server.nursery_pid()
        assert first is not None
        model = client.create_kernel()
        with client.connect(model.id) as k:
            assert k.execute("1 + 1").result_text == "2"
            workdir = k.execute("import os; os.getcwd()").result_text.strip("'")
            assert os.path.isdir(workdir) and workdir.startswith(server.runtime_dir)
            os.kill(first, signal.SIGKILL)
            wait_for(lambda: k.dead_cause is not None, 10)
            assert k.dead_cause == "nursery lost"
            # Until a new nursery is ready: degraded, and creates answer 503
            # with a reason (not 500). The back-off leaves at least 0.5 s.
            status, body = http(server, "GET", "/api/status")
            assert status == 503, body
            assert body["state"] == "degraded" and "nursery was lost" in body["reason"]
            status, body = http(server, "POST", "/api/kernels")
            assert status == 503 and "nursery" in body["message"], body
            # Then a new nursery, and the server is healthy again.
            wait_for(lambda: http(server, "GET", "/api/status")[0] == 200, 30)
            assert http(server, "GET", "/api/status")[1]["state"] == "ok"
            # what the lost kernel left on disk is removed
            wait_for(lambda: not os.path.exists(workdir), 10)
            assert not os.path.exists(workdir + ".tmp")
            second = server.nursery_pid()
            assert second is not None and second != first
            # The old id is kept, dead with its cause, and can be restarted.
            old = client.get_kernel(model.id)
            assert old.execution_state == "dead"
            status, body = http(server, "GET", f"/api/kernels/{model.id}")
            assert (status, body["reason"]) == (200, "nursery lost")
            k.restart(timeout=60)
            assert k.execute("2 + 2").result_text == "4"
        fresh = client.create_kernel()
        with client.connect(fresh.id) as k2:
            assert k2.execute("3 + 3").result_text == "6"
        log = server.log()
        assert log.count("the nursery was lost") == 1
        assert "a new nursery is running" in log
        assert server.alive()


def test_automatic_restarts_resume_once_a_new_nursery_runs(tmp_path):
    config = tmp_path / "cellmux.toml"
    config.write_text("auto_restart = true\n")
    with (
        running_server("--pool-size", "1", "--config", str(config)) as server,
        server.client() as client,
    ):
        model = client.create_kernel()
        frames: list = []
        with client.connect(model.id) as k:
            k.add_listener(frames.append)
            assert k.execute("x = 41").error is None
            os.kill(server.nursery_pid(), signal.SIGKILL)
            wait_for(lambda: {"execution_state": "restarting"} in _status_contents(frames), 30)
            wait_for(lambda: client.get_kernel(model.id).execution_state == "idle", 60)
            states = _status_contents(frames)
            dead = next(s for s in states if s["execution_state"] == "dead")
            assert dead == {
                "execution_state": "dead",
                "cause": "nursery lost",
                "auto_restart": True,
            }
            after = states[states.index(dead) + 1 :]
            assert {"execution_state": "restarting"} in after
            assert {"execution_state": "idle", "restarted": True} in after
            # a fresh process: the old variables are gone, the kernel works
            result = k.execute("'x' in globals()")
            assert result.result_text == "False"
