"""The nursery or a kernel killed, or the nursery stopped, under a running server.

SIGKILL: its kernels die with it (PR_SET_PDEATHSIG); the server ends what
they started and removes their directories, since the nursery no longer
can. SIGSTOP past kernel_start_timeout: creates fail with a clear error,
running kernels go on, and SIGCONT brings creates back without leaving the
process of the create that timed out behind.
"""

from __future__ import annotations

import json
import os
import signal
import textwrap

from .records_support import (
    alive,
    http,
    kill_all,
    serving,
    session_members,
    wait_until,
)

LEAVE_BEHIND = textwrap.dedent(
    """
    import json, os, subprocess
    same = subprocess.Popen(["sleep", "300"])
    escaped = subprocess.Popen(["sleep", "301"], start_new_session=True)
    print(json.dumps({"kernel": os.getpid(), "same": same.pid, "escaped": escaped.pid}))
    """
)


def _entries(base) -> set[str]:
    return set(os.listdir(base / "rt" / "kernels"))


def test_a_killed_nursery_leaves_no_process_or_directory_behind(tmp_path):
    left: dict[str, int] = {}
    with serving(tmp_path, "--pool-size", "1") as server:
        try:
            with server.client() as client:
                model = client.create_kernel()
                with client.connect(model.id) as kernel:
                    left = json.loads(kernel.execute(LEAVE_BEHIND).stdout)
                assert wait_until(lambda: len(_entries(tmp_path)) == 4)  # + the pool kernel's
                old = _entries(tmp_path)
                os.kill(server.nursery_pid(), signal.SIGKILL)
                assert wait_until(lambda: not any(alive(pid) for pid in left.values()))
                assert session_members(left["kernel"]) == []
                # The lost nursery's are removed. (The next nursery may
                # already have made its pool kernel's: not a leftover.)
                assert wait_until(lambda: not old & _entries(tmp_path), timeout=30), (
                    old & _entries(tmp_path),
                    server.log()[-2000:],
                )
                status, body = http(server, "GET", f"/api/kernels/{model.id}")
                assert status == 200 and body["execution_state"] == "dead", body
                # Logged once the cleanup's thread is back, maybe just after.
                assert wait_until(lambda: "the nursery died: ended" in server.log())
        finally:
            kill_all(left.values())


def test_a_stopped_nursery_fails_creates_clearly_and_recovers(tmp_path):
    config = tmp_path / "cellmux.toml"
    config.write_text("kernel_start_timeout = 2.0\n")
    with serving(tmp_path, "--pool-size", "0", "--config", str(config)) as server:
        nursery = server.nursery_pid()
        assert nursery, "the server has no nursery"
        try:
            with server.client() as client:
                running = client.create_kernel()
                with client.connect(running.id) as kernel:
                    kernel.execute("x = 1")
                    os.kill(nursery, signal.SIGSTOP)
                    status, body = http(server, "POST", "/api/kernels", {})
                    assert status >= 500 and "did not start in time" in body["message"], body
                    # What runs does not need the nursery.
                    assert kernel.execute("x + 1").result_text == "2"
                    os.kill(nursery, signal.SIGCONT)
                    status, body = http(server, "POST", "/api/kernels", {})
                    assert status == 201, body
                    assert kernel.execute("x + 2").result_text == "3"
                # Only the two live kernels have directories: the one that
                # timed out was killed when the nursery woke up.
                assert wait_until(lambda: len(_entries(tmp_path)) == 4)
                models = {k.id: k.pid for k in client.list_kernels()}
                assert set(models) == {running.id, body["id"]}
        finally:
            os.kill(nursery, signal.SIGCONT)


def test_a_killed_kernel_takes_what_it_started_and_its_directories(tmp_path):
    left: dict[str, int] = {}
    with serving(tmp_path, "--pool-size", "0") as server:
        try:
            with server.client() as client:
                other = client.create_kernel()
                model = client.create_kernel()
                with client.connect(model.id) as kernel:
                    left = json.loads(kernel.execute(LEAVE_BEHIND).stdout)
                before = _entries(tmp_path)
                assert len(before) == 4
                os.kill(left["kernel"], signal.SIGKILL)
                # The session's member goes with the group; the escaped one
                # by its uid (as root; without root it would outlive it).
                assert wait_until(lambda: not alive(left["same"]))
                if os.geteuid() == 0:
                    assert wait_until(lambda: not alive(left["escaped"]))
                assert wait_until(lambda: len(_entries(tmp_path)) == 2)
                status, body = http(server, "GET", f"/api/kernels/{model.id}")
                assert status == 200 and body["execution_state"] == "dead", body
                with client.connect(other.id) as survivor:
                    assert survivor.execute("2 * 21").result_text == "42"
        finally:
            kill_all(left.values())
