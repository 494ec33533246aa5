"""Kernel uids are held machine-wide, across network namespaces.

A nursery kills every process of a kernel uid it can hold. Held only by an
abstract unix socket (which belongs to a network namespace), a uid in use
by a server in another namespace looked free, and that server's kernels
were killed. These tests hold a uid here and try to take it from a forked
child in a network namespace of its own.
"""

from __future__ import annotations

import ctypes
import os
import stat

from cellmux.kernel import uidhold
from cellmux.kernel.sandbox import UidPool

CLONE_NEWNET = 0x40000000
#: Far above the configured default range: no live server uses it.
UID = 3_999_917


def _in_new_network_namespace(attempt) -> bool:
    """Run C{attempt()} (true: it got the uid) in a child with its own
    network namespace; what it returned."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 2
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_NEWNET) == 0:
                code = 0 if attempt() else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, 1), f"the child could not make a network namespace ({code})"
    return code == 0


def test_a_uid_held_here_cannot_be_held_from_another_network_namespace(tmp_path):
    held = uidhold.hold_uid(UID, str(tmp_path))
    assert held is not None
    try:
        assert not _in_new_network_namespace(lambda: uidhold.hold_uid(UID, str(tmp_path)))
        # As the nursery takes it, to hand out and to sweep.
        assert not _in_new_network_namespace(
            lambda: UidPool(UID, UID, lock_dir=str(tmp_path)).hold(UID)
        )
    finally:
        held.close()
    # Freed: anyone, from anywhere, may take it now.
    assert _in_new_network_namespace(lambda: uidhold.hold_uid(UID, str(tmp_path)))


def test_a_pool_holds_what_it_hands_out_until_released(tmp_path):
    pool = UidPool(UID, UID + 1, lock_dir=str(tmp_path))
    assert pool.lock_dir_problem is None
    first, second = pool.claim(), pool.claim()
    assert {first.uid, second.uid} == {UID, UID + 1}
    other = UidPool(UID, UID + 1, lock_dir=str(tmp_path))
    assert not other.hold(UID) and not other.hold(UID + 1)
    pool.release(first.uid)
    assert other.hold(first.uid)
    other.release(first.uid)
    pool.release(second.uid)


def test_a_dead_holders_uid_is_free(tmp_path):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: holds the uid, says so, waits to be killed
        held = uidhold.hold_uid(UID, str(tmp_path))
        os.write(write, b"1" if held else b"0")
        os.pause()
        os._exit(0)
    os.close(write)
    try:
        assert os.read(read, 1) == b"1"
        assert uidhold.hold_uid(UID, str(tmp_path)) is None
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(read)
    again = uidhold.hold_uid(UID, str(tmp_path))
    assert again is not None
    again.close()


def test_a_lock_directory_others_can_write_is_not_used(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    problem = uidhold.lock_dir_problem(str(shared))
    assert problem is not None and "writable" in problem
    pool = UidPool(UID, UID, lock_dir=str(shared))
    assert pool.lock_dir_problem == problem
    identity = pool.claim()  # still works, by the socket alone
    assert identity.uid == UID and os.listdir(shared) == []
    pool.release(UID)


def test_the_lock_directory_is_made_private(tmp_path):
    directory = tmp_path / "uids"
    assert uidhold.lock_dir_problem(str(directory)) is None
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    held = uidhold.hold_uid(UID, str(directory))
    assert held is not None
    assert stat.S_IMODE(os.stat(directory / str(UID)).st_mode) == 0o600
    held.close()
