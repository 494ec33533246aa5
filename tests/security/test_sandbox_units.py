"""The sandbox's pure parts and its uid bookkeeping, without kernels."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from cellmux.config import ConfigError, ServerConfig
from cellmux.kernel import sandbox
from cellmux.kernel.nursery import describe_status

LIMITS = sandbox.Limits(cpu_seconds=10, memory_mb=100, disk_mb=5)


def _signalled(sig: int) -> dict:
    return {"cause": signal.Signals(sig).name, "signal": sig}


@pytest.mark.parametrize(
    ("described", "cpu_used", "flagged", "oom_kills", "limit", "cause"),
    [
        (_signalled(signal.SIGXCPU), 10.0, None, 0, "cpu", "cpu time limit (SIGXCPU)"),
        (_signalled(signal.SIGKILL), 15.2, None, 0, "cpu", "cpu time limit (SIGKILL)"),
        (_signalled(signal.SIGTERM), 0.1, "disk", 0, "disk", "disk limit (SIGTERM)"),
        (_signalled(signal.SIGKILL), 0.1, None, 1, "memory", "memory limit (SIGKILL)"),
        (_signalled(signal.SIGXFSZ), 0.1, None, 0, "file_size", "file size limit (SIGXFSZ)"),
        # not a limit: a SIGKILL from elsewhere, a plain exit, a crash
        (_signalled(signal.SIGKILL), 3.0, None, 0, None, "SIGKILL"),
        ({"cause": "exit code 3", "exit_code": 3}, 0.1, None, 0, None, "exit code 3"),
        (_signalled(signal.SIGSEGV), 0.1, None, 0, None, "SIGSEGV"),
    ],
)
def test_classify_exit_names_the_limit(described, cpu_used, flagged, oom_kills, limit, cause):
    info = sandbox.classify_exit(described, LIMITS, cpu_used, flagged, oom_kills)
    assert info.get("limit") == limit
    assert info["cause"] == cause
    assert info.get("signal") == described.get("signal")


def test_no_cpu_limit_means_sigxcpu_is_just_a_signal():
    info = sandbox.classify_exit(_signalled(signal.SIGXCPU), sandbox.Limits(), 99.0)
    assert "limit" not in info and info["cause"] == "SIGXCPU"


def test_classify_exit_from_a_real_waitpid_status():
    pid = os.fork()
    if pid == 0:
        os.kill(os.getpid(), signal.SIGXCPU)
        os._exit(0)
    _, status, usage = os.wait4(pid, 0)
    info = sandbox.classify_exit(describe_status(status), LIMITS, usage.ru_utime)
    assert info["cause"] == "cpu time limit (SIGXCPU)"


def test_limits_and_uid_range_are_validated():
    with pytest.raises(ValueError, match="cpu_seconds"):
        sandbox.Limits(cpu_seconds=-1)
    with pytest.raises(ConfigError, match="limit_disk_mb"):
        ServerConfig(limit_disk_mb=-5)
    for bad in [(0, 10), (10, 5), (1,), ("a", "b")]:
        with pytest.raises(ConfigError, match="kernel_uid_range"):
            ServerConfig(kernel_uid_range=bad)
    settings = ServerConfig(limit_cpu_seconds=7).sandbox_settings()
    assert sandbox.SandboxConfig.from_dict(settings).limits.cpu_seconds == 7


def test_a_uid_is_held_by_one_pool_at_a_time():
    first, second = sandbox.UidPool(299990, 299991), sandbox.UidPool(299990, 299991)
    a = first.claim()
    b = second.claim()  # another nursery (another server) gets the other uid
    assert {a.uid, b.uid} == {299990, 299991}
    with pytest.raises(OSError, match="no free kernel uid"):
        second.claim()
    first.release(a.uid)
    assert second.claim().uid == a.uid
    second.release(a.uid)
    second.release(b.uid)


def test_kill_all_of_reaches_processes_that_left_the_group():
    uid = 299980
    pid = os.fork()
    if pid == 0:  # a process of that uid with a child in its own session
        os.setresuid(uid, uid, uid)
        if os.fork() == 0:
            os.setsid()
            time.sleep(60)
        time.sleep(60)
        os._exit(0)
    deadline = time.monotonic() + 5
    while len(sandbox._processes_of(uid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(sandbox._processes_of(uid)) == 2
    sandbox.kill_all_of(uid)
    os.waitpid(pid, 0)
    assert sandbox._processes_of(uid) == []


def test_disk_usage_counts_nested_files_and_not_symlink_targets(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_bytes(os.urandom(256 * 1024))
    (tmp_path / "link").symlink_to("/usr")
    used = sandbox.disk_usage([str(tmp_path)])
    assert 256 * 1024 <= used < 1024 * 1024


def test_disk_usage_charges_empty_files_and_stops_early(tmp_path):
    for i in range(100):
        (tmp_path / f"empty{i}").touch()
    assert sandbox.disk_usage([str(tmp_path)]) == 100 * sandbox.MIN_ENTRY_BYTES
    assert sandbox.disk_usage([str(tmp_path)], stop_above=0) == sandbox.MIN_ENTRY_BYTES


def test_interpreter_paths_never_bind_a_shared_tmp_back(monkeypatch, tmp_path):
    # `python -m` started in /tmp puts /tmp on sys.path; a venv below it
    # must still be bound back on its own, and /tmp (or /) never.
    venv = tmp_path / "venv" / "lib" / "site-packages"
    venv.mkdir(parents=True)
    monkeypatch.setattr(sys, "path", ["/tmp", "/", str(venv), *sys.path])
    paths = sandbox.interpreter_paths()
    assert str(venv) in paths
    assert not {"/", "/tmp", "/var/tmp", "/dev/shm"} & set(paths)


def test_session_memory_does_not_count_shared_pages_once_per_child():
    """Forked children share their parent's pages: PSS splits them."""
    import subprocess
    import sys

    code = (
        "import os, sys, time\n"
        "os.setsid()\n"
        "ballast = bytearray(os.urandom(64 << 20))\n"
        "for _ in range(8):\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(30); os._exit(0)\n"
        "print('ready', flush=True); time.sleep(30)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        used = sandbox.session_memory([proc.pid])[proc.pid]
        # RSS would say 9 x 64 MiB; the pages exist once.
        assert 64 << 20 <= used < 200 << 20, used >> 20
        assert sandbox.session_memory([]) == {}
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
