"""The server's autogroup runs at server_nice (server/priority.py) when the
server leads its session, and only then; kernels keep sessions (autogroups)
of their own at nice 0."""

from __future__ import annotations

import os
import sys

import pytest

from cellmux.config import ConfigError, ServerConfig
from cellmux.server.priority import raise_priority
from conftest import config_file, start_server, wait_for
from http_helpers import request, token


def _autogroup_nice(pid: int | str) -> int | None:
    """The nice value of C{pid}'s autogroup, or None when it is in none: a
    process whose session predates autogroups (no setsid since boot, as in
    some containers) stays in the root group, and the file is empty."""
    with open(f"/proc/{pid}/autogroup") as f:
        line = f.read()
    return int(line.split("nice")[1]) if "nice" in line else None


# -- the decision ---------------------------------------------------------------


def test_it_is_set_only_for_a_session_leader(tmp_path):
    autogroup = tmp_path / "autogroup"
    autogroup.write_text("")
    shared = raise_priority(-10, str(autogroup), leads_session=False)
    assert not shared.applied and "setsid" in shared.reason
    assert autogroup.read_text() == ""
    assert not raise_priority(0, str(autogroup), leads_session=True).applied
    assert autogroup.read_text() == ""
    done = raise_priority(-10, str(autogroup), leads_session=True)
    assert done.applied and autogroup.read_text() == "-10"


def test_without_autogroups_nothing_changes_and_it_says_why(tmp_path):
    outcome = raise_priority(-5, str(tmp_path / "none" / "autogroup"), leads_session=True)
    assert not outcome.applied and outcome.reason == "no autogroup scheduling on this system"


def test_server_nice_is_a_nice_value():
    assert ServerConfig(server_nice=19).server_nice == 19
    for bad in (-21, 20, 1.5, True):
        with pytest.raises(ConfigError, match="server_nice"):
            ServerConfig(server_nice=bad)


# -- a real server --------------------------------------------------------------------


def test_a_server_leading_its_session_runs_first_and_its_kernels_do_not():
    server = start_server(
        *("--pool-size", "1", "--config", config_file("[cellmux]\nserver_nice = -10")),
        command=["setsid", sys.executable, "-m", "cellmux", "serve"],
    )
    try:
        if not os.path.exists("/proc/self/autogroup"):  # a kernel without autogroups
            wait_for(lambda: "no autogroup scheduling" in server.log(), 30)
            return
        assert os.getsid(server.process.pid) == server.process.pid
        wait_for(lambda: "the server's autogroup runs at nice -10" in server.log(), 30)
        assert _autogroup_nice(server.process.pid) == -10
        status, _, model = request(
            server.url, "POST", "/api/kernels", token(server.token), {"name": "python3"}
        )
        assert status == 201
        status, _, model = request(
            server.url, "GET", f"/api/kernels/{model['id']}", token(server.token)
        )
        assert _autogroup_nice(model["pid"]) == 0
    finally:
        server.stop()


def test_a_server_started_from_a_shell_leaves_the_shells_session_alone():
    before = _autogroup_nice("self") if os.path.exists("/proc/self/autogroup") else None
    server = start_server(
        "--pool-size", "0", "--config", config_file("[cellmux]\nserver_nice = -10")
    )
    try:
        wait_for(lambda: "does not lead its session" in server.log(), 30)
        if before is not None:
            assert _autogroup_nice("self") == before == _autogroup_nice(server.process.pid)
    finally:
        server.stop()
