"""When the server dies, its kernels die with it; the next server says so."""

from __future__ import annotations

import os
import shutil
import signal

import pytest

from cellmux.client import ServerError
from conftest import start_server, wait_for


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_sigkill_leaves_no_kernel_and_the_next_server_reports_it_lost(tmp_path):
    state_dir = str(tmp_path / "state")
    first = start_server("--pool-size", "2", "--state-dir", state_dir)
    with first.client() as client:
        kept = client.create_kernel()
        with client.connect(kept.id) as k:
            k.execute("import subprocess; child = subprocess.Popen(['sleep', '300'])")
            child = int(k.execute("child.pid").result_text)
        pids = [m.pid for m in client.list_kernels()] + [child]
    assert all(_alive(pid) for pid in pids)
    first.process.send_signal(signal.SIGKILL)
    first.process.wait()

    second = start_server("--pool-size", "1", "--state-dir", state_dir)
    try:
        wait_for(lambda: not any(_alive(pid) for pid in pids), timeout=10)
        with second.client() as client:
            with pytest.raises(ServerError) as info:
                client.connect(kept.id)
            assert info.value.code == "kernel_lost"
            assert client.list_kernels() == []
    finally:
        second.stop()
        for server in (first, second):  # their logs and runtime dirs under /tmp
            shutil.rmtree(server.runtime_dir, ignore_errors=True)
