"""SIGKILL the server, start it again: the first restart serves, nothing
acknowledged is lost, nothing the crash left keeps running or stays on disk,
and nothing unrelated is killed.

Real servers, kernels and processes. As root (how the tests run) kernels
have their own uids, so a subprocess that left its kernel's session is
found by its uid.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest

from cellmux.cleanup import remove_tree
from cellmux.client import ServerError
from cellmux.server.orphans import ProcessIdentity

from .records_support import (
    alive,
    crash,
    discard,
    http,
    kill_all,
    serve,
    serving,
    session_members,
    wait_until,
)

#: Run in a kernel: start one subprocess in the kernel's session and one
#: that leaves it, make a tree too deep for shutil.rmtree; print the pids.
LEAVE_BEHIND = textwrap.dedent(
    """
    import json, os, subprocess
    same = subprocess.Popen(["sleep", "300"])
    escaped = subprocess.Popen(["sleep", "301"], start_new_session=True)
    fd = os.open(".", os.O_RDONLY)
    for _ in range(1500):
        os.mkdir("deep", dir_fd=fd)
        sub = os.open("deep", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = sub
    os.close(fd)
    print(json.dumps({"kernel": os.getpid(), "same": same.pid, "escaped": escaped.pid}))
    """
)


def _kernel_entries(base) -> set[str]:
    kernels = base / "rt" / "kernels"
    return set(os.listdir(kernels)) if kernels.is_dir() else set()


def test_a_restart_after_a_crash_keeps_the_runtime_dir_and_permalinks_and_ends_leftovers(tmp_path):
    (tmp_path / "rt").mkdir()
    (tmp_path / "rt" / "operator-notes.txt").write_text("mine")
    # A uid range of the test's own: every nursery ends what runs as a uid
    # of its range that no live nursery holds, so another server on the
    # machine (another pytest worker's) would end the crash's leftovers
    # before the restart could show that it does.
    uids = tmp_path / "uids.toml"
    uids.write_text("kernel_uid_range = [650000, 650999]\n")
    first = serve(tmp_path, "--pool-size", "1", "--config", str(uids))
    left: dict[str, int] = {}
    try:
        status, made = http(first, "POST", "/permalink", {"code": "print('kept')"})
        assert status == 201, made
        with first.client() as client:
            model = client.create_kernel()
            with client.connect(model.id) as kernel:
                left = json.loads(kernel.execute(LEAVE_BEHIND).stdout)
        # The kernel's and the refilled pool kernel's, each with .tmp (the
        # refill may still be on its way).
        assert wait_until(lambda: len(_kernel_entries(tmp_path)) >= 4)
        old_dirs = _kernel_entries(tmp_path)
        crash(first)
        # The crash alone ends the kernel (PR_SET_PDEATHSIG), not its subprocesses.
        assert wait_until(lambda: not alive(left["kernel"]))
        assert alive(left["same"]) and alive(left["escaped"])

        # The first restart serves.
        with serving(tmp_path, "--pool-size", "1", "--config", str(uids)) as second:
            assert wait_until(lambda: not alive(left["same"]) and not alive(left["escaped"]))
            assert session_members(left["kernel"]) == []
            status, got = http(second, "GET", f"/permalink/{made['id']}")
            assert status == 200 and got["code"] == "print('kept')"
            with second.client() as client:
                with pytest.raises(ServerError) as info:
                    client.connect(model.id)
                assert info.value.code == "kernel_lost"
                assert client.list_kernels() == []
                # And it runs kernels.
                with client.connect(client.create_kernel().id) as kernel:
                    assert kernel.execute("6 * 7").result_text == "42"
            # Removed while the server already serves.
            assert wait_until(lambda: not old_dirs & _kernel_entries(tmp_path))
            assert (tmp_path / "rt" / "operator-notes.txt").read_text() == "mine"
            servers = tmp_path / "state" / "servers"
            # The dead server's record goes once its files are gone (a
            # 1,500-level tree: seconds of rmdir on a loaded disk).
            assert wait_until(lambda: len(list(servers.iterdir())) == 1, timeout=40), (
                sorted(p.name for p in servers.iterdir()),
                second.log()[-2000:],
            )
            assert not next(servers.iterdir()).name.startswith(".tmp")
        # A clean stop keeps the configured directory and what it holds.
        assert (tmp_path / "rt" / "operator-notes.txt").read_text() == "mine"
        assert _kernel_entries(tmp_path) == set()
        assert list((tmp_path / "state" / "servers").iterdir()) == []
    finally:
        discard(first)
        kill_all(left.values())
        # A failed run must not leave the deep tree to pytest's rmtree.
        remove_tree(tmp_path / "rt")


def test_an_unrelated_process_that_took_a_recorded_kernel_pid_survives(tmp_path):
    unrelated = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        real = ProcessIdentity.of(unrelated.pid)
        me = ProcessIdentity.of(os.getpid())
        servers = tmp_path / "state" / "servers"
        servers.mkdir(parents=True)
        record = {
            "version": 2,
            # A dead server: this pid, but another start time.
            "server": {"pid": me.pid, "start": me.start - 1, "boot": me.boot, "uid": me.uid},
            "runtime_dir": str(tmp_path / "rt"),
            "owns_runtime_dir": False,
            # Its nursery and kernel had the sleeper's pid, long ago.
            "nursery": {"pid": real.pid, "start": real.start - 7, "boot": real.boot, "uid": 0},
            "processes": [
                {
                    "link": "ab" * 16,
                    "kernel": "gone-kernel",
                    "pid": real.pid,
                    "start": real.start - 5,
                    "boot": real.boot,
                    "uid": real.uid,
                }
            ],
            "kernels": ["gone-kernel"],
        }
        (servers / "1-dead.json").write_text(json.dumps(record))
        with serving(tmp_path, "--pool-size", "1") as server:
            assert alive(unrelated.pid) and unrelated.poll() is None
            assert wait_until(lambda: not (servers / "1-dead.json").exists())
            with server.client() as client:
                with pytest.raises(ServerError) as info:
                    client.connect("gone-kernel")
                assert info.value.code == "kernel_lost"
                with client.connect(client.create_kernel().id) as kernel:
                    assert kernel.execute("1 + 1").result_text == "2"
        assert unrelated.poll() is None
    finally:
        unrelated.kill()
        unrelated.wait()


def test_a_restart_that_gets_the_crashed_servers_pid_still_sweeps(tmp_path):
    """The liveness check is by identity: a record naming this very pid with
    another start time is a dead server, whatever its command line."""
    leftover = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        identity = ProcessIdentity.of(leftover.pid)
        first = serve(tmp_path, "--pool-size", "0")
        pid = first.process.pid
        crash(first)
        discard(first)
        (record,) = (tmp_path / "state" / "servers").glob("*.json")
        data = json.loads(record.read_text())
        assert data["server"]["pid"] == pid
        # Pretend the next server got that pid: its record is now "alive"
        # by pid and command line, but not by start time.
        data["server"]["pid"] = os.getpid()
        data["processes"].append({"link": "cd" * 16, "kernel": "k", **identity.to_json()})
        record.write_text(json.dumps(data))
        with serving(tmp_path, "--pool-size", "0"):
            assert wait_until(lambda: leftover.poll() is not None)
    finally:
        leftover.kill()
        leftover.wait()


def test_permalinks_in_the_old_default_place_move_to_the_state_dir(tmp_path):
    old = tmp_path / "rt" / "permalinks.sqlite3"  # where older versions kept them
    with serving(tmp_path, "--pool-size", "0", database=str(old)) as server:
        status, made = http(server, "POST", "/permalink", {"code": "print('old')"})
        assert status == 201
    with serving(tmp_path, "--pool-size", "0") as server:  # database unset
        status, got = http(server, "GET", f"/permalink/{made['id']}")
        assert status == 200 and got["code"] == "print('old')"
        assert "moved the permalink database" in server.log()
    assert (tmp_path / "state" / "permalinks.sqlite3").exists()
    assert not old.exists() and (tmp_path / "rt" / "permalinks.sqlite3.migrated").exists()
    with serving(tmp_path, "--pool-size", "0") as server:  # once only
        status, got = http(server, "GET", f"/permalink/{made['id']}")
        assert status == 200
        assert "moved the permalink database" not in server.log()
