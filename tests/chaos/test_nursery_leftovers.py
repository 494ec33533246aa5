"""What a kernel leaves behind is gone after a crash and a restart.

A kernel's child that calls setsid() and forks again leaves the kernel's
session and process group: killing the kernel's group does not reach it,
and PR_SET_PDEATHSIG is not inherited. Its uid still marks it, so a
nursery (as root) that starts or stops kills every process of a uid of its
range that no live nursery holds.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from cellmux.cleanup import remove_tree
from cellmux.kernel.sandbox import uids_with_processes
from cellmux.protocol import nursery as wire
from conftest import config_file, start_server, wait_for

from .nursery_driver import NurseryDriver, alive

#: A uid range of this module's own. Every nursery sweeps its range when it
#: starts and stops: with the default one, another server on the machine
#: (another pytest worker's) would end the leftovers these tests leave before
#: the server meant to end them (as it should: no live nursery holds them).
UID_RANGE = (640000, 640999)


@pytest.fixture(scope="module")
def uids() -> str:
    """A config file giving a server this module's uid range."""
    return config_file(f"kernel_uid_range = [{UID_RANGE[0]}, {UID_RANGE[1]}]")


def _nursery(runtime_dir: str) -> NurseryDriver:
    return NurseryDriver(runtime_dir, sandbox={"uid_range": list(UID_RANGE)})


ESCAPE = """
import json, os, time
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.write(w, str(os.getpid()).encode())
        os.close(w)
        time.sleep(100000)
    os._exit(0)
os.wait()
print(json.dumps([int(os.read(r, 32)), os.getcwd()]))
"""


def _uid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    raise AssertionError("no Uid")


def _escape(server) -> tuple[int, str, int]:
    """A kernel starts a process that leaves its session; (its pid, the
    kernel's directory, the kernel's pid)."""
    with server.client() as client:
        model = client.create_kernel()
        with client.connect(model.id) as k:
            result = k.execute(ESCAPE, timeout=30)
            assert result.error is None, result.error
            pid, workdir = json.loads(result.stdout.strip().splitlines()[-1])
        kernel_pid = client.get_kernel(model.id).pid
    assert alive(pid) and UID_RANGE[0] <= _uid(pid) <= UID_RANGE[1]
    return pid, workdir, kernel_pid


@pytest.fixture
def servers():
    started = []
    yield started
    for server in started:
        server.stop()
        remove_tree(server.runtime_dir)


@pytest.fixture
def escaped():
    pids: list[int] = []
    yield pids
    for pid in pids:  # the test failed: leave nothing running
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_after_a_server_crash_the_next_server_kills_what_kernels_left(servers, escaped, uids):
    first = start_server("--pool-size", "0", "--config", uids)
    servers.append(first)
    pid, _workdir, kernel_pid = _escape(first)
    escaped.append(pid)
    first.process.send_signal(signal.SIGKILL)
    first.process.wait()
    wait_for(lambda: not alive(kernel_pid), timeout=10)  # it dies with its nursery
    time.sleep(0.5)
    assert alive(pid)  # the leftover: out of the kernel's session, not its child
    servers.append(
        start_server("--pool-size", "0", "--config", uids)
    )  # its own state dir: no record helps
    wait_for(lambda: not alive(pid), timeout=15)


def test_after_a_nursery_crash_the_server_kills_what_kernels_left(servers, escaped, uids):
    first = start_server("--pool-size", "0", "--config", uids)
    servers.append(first)
    runtime = os.path.join(first.runtime_dir, "rt")
    pid, workdir, kernel_pid = _escape(first)
    escaped.append(pid)
    os.kill(first.nursery_pid(), signal.SIGKILL)
    wait_for(lambda: not alive(kernel_pid), timeout=10)
    # The server itself ends what the lost nursery's kernels left (by uid,
    # out of their sessions) and clears their directories.
    wait_for(lambda: not alive(pid), timeout=15)
    wait_for(lambda: not os.path.exists(workdir), timeout=15)
    assert first.stop() == 0  # a clean stop, with the nursery lost
    # The same runtime directory serves again.
    again = start_server("--pool-size", "0", "--config", uids, "--runtime-dir", runtime)
    servers.append(again)
    with again.client() as client, client.connect(client.create_kernel().id) as kernel:
        assert kernel.execute("6 * 7").result_text == "42"


def test_the_sweeps_never_touch_kernels_of_a_live_nursery(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = _nursery(str(tmp_path / "a"))
    try:
        link = first.spawn()
        kernel = first.expect(wire.Spawned, link=link).pid
        wait_for(lambda: UID_RANGE[0] <= _uid(kernel) <= UID_RANGE[1], timeout=10)
        second = _nursery(str(tmp_path / "b"))  # sweeps when it starts...
        assert second.stop() == 0  # ... and when it stops
        assert alive(kernel)
        assert first.events.empty()  # no exited event
    finally:
        first.stop()


def _free_uid() -> int:
    """A uid of the range no nursery holds now (and none had processes)."""
    for uid in range(UID_RANGE[1], UID_RANGE[0], -1):
        lock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            lock.bind(f"\0cellmux-uid-{uid}")
        except OSError:
            continue
        finally:
            lock.close()
        if not uids_with_processes(uid, uid):
            return uid
    raise AssertionError("no free uid")


def test_a_stopping_nursery_kills_what_runs_as_a_free_uid(tmp_path, escaped):
    nursery = _nursery(str(tmp_path))
    try:
        uid = _free_uid()
        # A leftover that appears after this nursery started (its start sweep
        # cannot have seen it): as a crashed nursery's kernel would leave.
        leftover = subprocess.Popen(["sleep", "1000"], user=uid, group=uid, start_new_session=True)
        escaped.append(leftover.pid)
        time.sleep(0.2)
        assert alive(leftover.pid)
    finally:
        assert nursery.stop() == 0
    leftover.wait(10)
    assert leftover.returncode == -signal.SIGKILL
