"""The sweep at start ends only what a dead server left, and keeps the rest.

Real processes (sleepers stand in for kernels and their subprocesses), real
/proc, real files; records are written as a crashed server would have left
them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cellmux.server.orphans import (
    ProcessIdentity,
    ServerRecord,
    boot_id,
    finish_removals,
    reap_orphans,
)
from cellmux.server.runtimedir import RuntimeDirInUse, prepare_runtime_dir, remove_owned
from cellmux.server.store import adopt_old_default_database

LINK = "0123456789abcdef0123456789abcdef"


def _sleeper(*, session: bool = False) -> subprocess.Popen:
    return subprocess.Popen(["sleep", "300"], start_new_session=session)


def _running(proc: subprocess.Popen) -> bool:
    return proc.poll() is None


def _stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _dead_server() -> dict:
    """This process's pid with another start time: a crashed server whose pid
    the current one (this test) happened to get."""
    me = ProcessIdentity.of(os.getpid())
    return {"pid": me.pid, "start": me.start - 1, "boot": me.boot, "uid": me.uid}


def _record(state: Path, runtime: Path | None, processes, *, owns=False, server=None, kernels=()):
    servers = state / "servers"
    servers.mkdir(parents=True, exist_ok=True)
    path = servers / f"{len(list(servers.iterdir()))}-dead.json"
    path.write_text(
        json.dumps(
            {
                "version": 2,
                "server": server or _dead_server(),
                "runtime_dir": str(runtime) if runtime else None,
                "owns_runtime_dir": owns,
                "nursery": None,
                "processes": [
                    {"link": link, "kernel": kernel, **identity.to_json()}
                    for link, kernel, identity in processes
                ],
                "kernels": list(kernels),
            }
        )
    )
    return path


def test_identity_tells_a_process_from_a_later_one_with_its_pid():
    proc = _sleeper()
    try:
        identity = ProcessIdentity.of(proc.pid)
        assert identity is not None and identity.alive()
        assert identity.boot == boot_id() and identity.uid == os.getuid()
        impostor = ProcessIdentity(proc.pid, identity.start + 1, identity.boot)
        assert not impostor.alive()
        assert not impostor.kill()
        assert _running(proc)
        other_boot = ProcessIdentity(proc.pid, identity.start, "another-boot")
        assert not other_boot.kill() and _running(proc)
        # Recorded only while it is the given parent's child.
        assert ProcessIdentity.of(proc.pid, parent=os.getpid()) is not None
        assert ProcessIdentity.of(proc.pid, parent=1) is None
        assert identity.kill()
        proc.wait(5)
    finally:
        _stop(proc)


def test_the_sweep_spares_an_unrelated_process_that_took_a_recorded_pid(tmp_path):
    unrelated = _sleeper(session=True)
    try:
        real = ProcessIdentity.of(unrelated.pid)
        stale = ProcessIdentity(unrelated.pid, real.start - 100, real.boot, real.uid)
        record = _record(tmp_path / "state", None, [(LINK, "k1", stale)])
        sweep = reap_orphans(str(tmp_path / "state"))
        assert _running(unrelated)
        assert sweep.lost == {"k1"} and sweep.killed == 0
        assert not record.exists()
    finally:
        _stop(unrelated)


def test_the_sweep_ends_a_recorded_kernel_and_what_is_left_of_its_session(tmp_path):
    # A "kernel" leading its own session, with a child in the same session.
    kernel = subprocess.Popen(
        ["sh", "-c", "sleep 300 >/dev/null & echo $!; wait"],
        start_new_session=True,
        stdout=subprocess.PIPE,
    )
    child = int(kernel.stdout.readline())
    unrelated = _sleeper(session=True)
    try:
        identity = ProcessIdentity.of(kernel.pid)
        _record(tmp_path / "state", None, [(LINK, "k1", identity)])
        sweep = reap_orphans(str(tmp_path / "state"))
        kernel.wait(5)
        deadline = time.monotonic() + 5
        while ProcessIdentity.of(child) is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ProcessIdentity.of(child) is None
        assert sweep.killed == 2 and sweep.lost == {"k1"}
        assert _running(unrelated)
    finally:
        _stop(kernel, unrelated)
        kernel.stdout.close()


def test_a_subprocess_outliving_its_kernel_is_ended_by_session_and_uid(tmp_path):
    # The kernel died (as with PR_SET_PDEATHSIG); its subprocess lives on in
    # the kernel's session, which keeps the kernel's pid number taken.
    kernel = subprocess.Popen(
        ["sh", "-c", "sleep 300 >/dev/null & echo $!; read _"],
        start_new_session=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    identity = ProcessIdentity.of(kernel.pid)
    child = int(kernel.stdout.readline())
    kernel.communicate(b"\n", timeout=5)  # the kernel ends; its child does not
    try:
        assert ProcessIdentity.of(child) is not None
        _record(tmp_path / "state", None, [(LINK, "k1", identity)])
        sweep = reap_orphans(str(tmp_path / "state"))
        assert sweep.killed == 1
        deadline = time.monotonic() + 5
        while ProcessIdentity.of(child) is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ProcessIdentity.of(child) is None
    finally:
        if ProcessIdentity.of(child) is not None:
            os.kill(child, signal.SIGKILL)


def test_a_live_servers_record_and_processes_are_left_alone(tmp_path):
    server = _sleeper()
    kernel = _sleeper(session=True)
    try:
        runtime = tmp_path / "rt"
        (runtime / "kernels" / LINK).mkdir(parents=True)
        record = _record(
            tmp_path / "state",
            runtime,
            [(LINK, "k1", ProcessIdentity.of(kernel.pid))],
            server=ProcessIdentity.of(server.pid).to_json(),
        )
        sweep = reap_orphans(str(tmp_path / "state"))
        assert sweep.lost == set() and sweep.busy_runtime_dirs == {str(runtime)}
        assert _running(kernel) and record.exists()
        assert (runtime / "kernels" / LINK).is_dir()
        with pytest.raises(RuntimeDirInUse):
            prepare_runtime_dir(str(runtime), sweep.busy_runtime_dirs)
    finally:
        _stop(server, kernel)


def _stale_socket(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()


def test_a_configured_runtime_dir_keeps_everything_cellmux_did_not_make(tmp_path):
    runtime = tmp_path / "rt"
    kernels = runtime / "kernels"
    for name in (LINK, LINK + ".tmp", "f" * 32):  # the last: a pool kernel not recorded
        (kernels / name / "sub").mkdir(parents=True)
        (kernels / name / "sub" / "file").write_text("x")
    (kernels / "not-a-kernel").mkdir()
    (runtime / "links" / LINK).mkdir(parents=True)  # a kernel's link endpoint
    (runtime / "permalinks.sqlite3").write_text("the user's")
    (runtime / "notes.txt").write_text("the user's")
    _stale_socket(runtime / "link.sock")
    _record(tmp_path / "state", runtime, [], kernels=["k1"])
    sweep = reap_orphans(str(tmp_path / "state"))
    assert sweep.lost == {"k1"} and sweep.unfinished == 0
    assert sorted(p.name for p in runtime.iterdir()) == [
        "kernels",
        "links",
        "notes.txt",
        "permalinks.sqlite3",
    ]
    assert list((runtime / "links").iterdir()) == []
    assert [p.name for p in kernels.iterdir()] == ["not-a-kernel"]
    assert not list((tmp_path / "state" / "servers").iterdir())


def test_a_runtime_dir_the_dead_server_made_goes_whole(tmp_path):
    runtime = tmp_path / "cellmux-x"
    (runtime / "kernels" / LINK).mkdir(parents=True)
    _stale_socket(runtime / "link.sock")
    _record(tmp_path / "state", runtime, [], owns=True)
    reap_orphans(str(tmp_path / "state"))
    assert not runtime.exists()


def test_a_recorded_own_runtime_dir_goes_whole_only_if_it_looks_like_one(tmp_path):
    # A record is only a file: a wrong one must not remove somebody's tree.
    precious = tmp_path / "data"
    (precious / "kernels" / LINK).mkdir(parents=True)
    (precious / "thesis.tex").write_text("years of work")
    _record(tmp_path / "state", precious, [], owns=True)
    reap_orphans(str(tmp_path / "state"))
    assert (precious / "thesis.tex").exists()
    assert list((precious / "kernels").iterdir()) == []


def _deep_tree(top: Path, depth: int) -> None:
    top.mkdir(parents=True)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
    finally:
        os.close(fd)


def test_a_kernel_tree_too_deep_for_rmtree_is_swept(tmp_path):
    # shutil.rmtree raised RecursionError here, and the server did not start.
    runtime = tmp_path / "rt"
    _deep_tree(runtime / "kernels" / LINK, 1500)
    _deep_tree(runtime / "kernels" / (LINK + ".tmp"), 1500)
    _record(tmp_path / "state", runtime, [])
    sweep = reap_orphans(str(tmp_path / "state"))
    assert sweep.unfinished == 0
    assert list((runtime / "kernels").iterdir()) == []
    # And at stop, for a runtime dir the server made.
    _deep_tree(tmp_path / "owned" / "kernels" / LINK, 1500)
    assert remove_owned(str(tmp_path / "owned"))
    assert not (tmp_path / "owned").exists()


def test_removal_out_of_time_keeps_the_record_for_the_next_start(tmp_path):
    runtime = tmp_path / "rt"
    (runtime / "kernels" / LINK).mkdir(parents=True)
    for i in range(2000):
        (runtime / "kernels" / LINK / str(i)).write_text("")
    record = _record(tmp_path / "state", runtime, [], kernels=["k1"])
    sweep = reap_orphans(str(tmp_path / "state"), removal_seconds=-1)
    assert sweep.unfinished == 1 and record.exists() and sweep.lost == {"k1"}
    sweep = reap_orphans(str(tmp_path / "state"))
    assert sweep.unfinished == 0 and not record.exists()
    assert list((runtime / "kernels").iterdir()) == []


def test_stale_temporary_records_are_removed_fresh_ones_kept(tmp_path):
    servers = tmp_path / "state" / "servers"
    servers.mkdir(parents=True)
    old = servers / ".tmp-crashed"
    old.write_text("{")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    fresh = servers / ".tmp-writing-now"
    fresh.write_text("{")
    reap_orphans(str(tmp_path / "state"))
    assert not old.exists() and fresh.exists()


def test_a_record_names_each_kernel_process_with_its_identity(tmp_path):
    record = ServerRecord(str(tmp_path / "state"), str(tmp_path / "rt"))
    kernel = _sleeper()  # our child: as a kernel is the nursery's
    try:
        record.nursery_pid = os.getpid()  # not our child: not recorded
        assert record.nursery is None
        record.nursery = ProcessIdentity.of(os.getpid())
        record.write({"k1": kernel.pid}, {LINK: kernel.pid, "e" * 32: 999999999})
        data = json.loads(record.path.read_text())
        assert data["server"]["pid"] == os.getpid()
        assert data["kernels"] == ["k1"]
        (entry,) = data["processes"]
        assert entry["link"] == LINK and entry["kernel"] == "k1"
        assert ProcessIdentity.from_json(entry) == ProcessIdentity.of(kernel.pid)
        assert [p.name for p in record.path.parent.iterdir()] == [record.path.name]
    finally:
        _stop(kernel)


def test_a_stale_link_socket_is_removed_a_live_one_refused(tmp_path):
    runtime = tmp_path / "rt"
    runtime.mkdir()
    _stale_socket(runtime / "link.sock")
    prepare_runtime_dir(str(runtime))
    assert not (runtime / "link.sock").exists()
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        live.bind(str(runtime / "link.sock"))
        live.listen()
        with pytest.raises(RuntimeDirInUse, match="listens"):
            prepare_runtime_dir(str(runtime))
        assert (runtime / "link.sock").exists()
    finally:
        live.close()
    os.unlink(runtime / "link.sock")
    (runtime / "link.sock").write_text("")
    with pytest.raises(RuntimeDirInUse, match="not a socket"):
        prepare_runtime_dir(str(runtime))


def test_the_old_default_database_is_moved_to_the_state_dir(tmp_path):
    old = tmp_path / "rt" / "permalinks.sqlite3"
    old.parent.mkdir()
    # A server that crashed leaves its last commits in the -wal file.
    crashed = (
        "import os, sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
        "c.execute('PRAGMA journal_mode=WAL'); "
        "c.execute('CREATE TABLE permalinks (id TEXT, code TEXT)'); "
        "c.execute(\"INSERT INTO permalinks VALUES ('a', 'print(1)')\"); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", crashed, str(old)], check=True)
    assert Path(str(old) + "-wal").stat().st_size > 0
    new = tmp_path / "state" / "permalinks.sqlite3"
    new.parent.mkdir()
    assert adopt_old_default_database(str(old), str(new)) == str(new)
    rows = sqlite3.connect(new).execute("SELECT * FROM permalinks").fetchall()
    assert rows == [("a", "print(1)")]
    assert os.stat(new).st_mode & 0o777 == 0o600
    assert not old.exists() and Path(str(old) + ".migrated").exists()
    # Done once: a later start leaves both alone.
    assert adopt_old_default_database(str(old), str(new)) == str(new)


def test_as_root_what_escaped_a_kernels_session_is_found_by_its_uid(tmp_path):
    # Needs root (to run processes as another uid). A uid outside the
    # default kernel range, so no other server's nursery here holds it.
    uid = 390000 + os.getpid() % 9000
    kernel = subprocess.Popen(["sh", "-c", "read _"], user=uid, group=uid, stdin=subprocess.PIPE)
    identity = ProcessIdentity.of(kernel.pid)
    kernel.communicate(b"\n", timeout=5)  # the kernel ends
    escaped = subprocess.Popen(["sleep", "300"], user=uid, group=uid, start_new_session=True)
    try:
        assert identity is not None and identity.uid == uid
        state = tmp_path / "state"
        # Outside the configured range: never touched.
        _record(state, None, [(LINK, "k1", identity)])
        reap_orphans(str(state), uid_range=(uid + 1, uid + 10))
        assert _running(escaped)
        # Held by a live nursery: its processes are its own.
        lock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        lock.bind(f"\0cellmux-uid-{uid}")
        try:
            _record(state, None, [(LINK, "k1", identity)])
            reap_orphans(str(state), uid_range=(uid, uid))
            assert _running(escaped)
        finally:
            lock.close()
        _record(state, None, [(LINK, "k1", identity)])
        sweep = reap_orphans(str(state), uid_range=(uid, uid))
        assert sweep.killed == 1
        escaped.wait(5)
    finally:
        _stop(escaped)


def test_files_can_be_left_for_later_the_record_goes_when_they_are_gone(tmp_path):
    # The server ends processes before it serves, and removes files while
    # it serves: the record stays until they are gone.
    runtime = tmp_path / "rt"
    (runtime / "kernels" / LINK / "sub").mkdir(parents=True)
    _stale_socket(runtime / "link.sock")
    record = _record(tmp_path / "state", runtime, [], kernels=["k1"])
    sweep = reap_orphans(str(tmp_path / "state"), remove_files=False)
    assert sweep.lost == {"k1"} and record.exists()
    assert not (runtime / "link.sock").exists()  # a new server may bind now
    (pending,) = sweep.pending
    assert pending.paths == (str(runtime / "kernels" / LINK),)
    assert (runtime / "kernels" / LINK).exists()
    assert finish_removals(sweep.pending) == 0
    assert not record.exists() and list((runtime / "kernels").iterdir()) == []
