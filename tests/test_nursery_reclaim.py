"""Removing an ended kernel's files: deep and wide trees go, a tree that
cannot go is moved out of its maker's reach, and deadlines hold."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest
from twisted.internet.task import Clock

from cellmux.cleanup import remove_tree
from cellmux.kernel.reclaim import MAX_ATTEMPTS, reclaim
from test_cleanup import deep_tree


@pytest.fixture(autouse=True)
def no_deep_leftovers(tmp_path):
    """pytest removes old temporary directories with shutil.rmtree, which a
    deep tree breaks (for every later run): whatever happens, remove them."""
    yield
    for name in os.listdir(tmp_path):
        remove_tree(tmp_path / name)


def ticking(clock: Clock, step: float = 0.001):
    """A clock function that moves time on by step at every look."""

    def now() -> float:
        clock.advance(step)
        return clock.seconds()

    return now


def test_a_deep_and_a_wide_tree_go(tmp_path):
    deep, wide = tmp_path / "deep", tmp_path / "wide"
    deep.mkdir()
    deep_tree(str(deep), 1500)
    wide.mkdir()
    for i in range(3000):
        (wide / f"f{i}").touch()
    warnings: list[str] = []
    assert reclaim([str(deep), str(wide)], str(tmp_path / "q"), warnings.append)
    assert not warnings and os.listdir(tmp_path) == []


def test_the_climb_out_of_a_deep_tree_keeps_the_deadline(tmp_path):
    # Going down 300 levels takes 300 looks at the clock; coming back up
    # (one rmdir per level, milliseconds each on a busy disk) must look too.
    deep_tree(str(tmp_path), 300, name="d")
    clock = Clock()
    removal = remove_tree(tmp_path / "d", deadline=0.35, clock=ticking(clock))
    assert removal.reason == "deadline"
    assert clock.seconds() < 0.36
    assert (tmp_path / "d").exists()
    assert remove_tree(tmp_path / "d")  # and the rest goes later


@pytest.fixture
def mounted(tmp_path):
    """A tree with a mount point in it, which remove_tree refuses to empty.

    Needs root (it mounts a tmpfs); tests run as root.
    """
    tree = tmp_path / "kernel"
    (tree / "mnt").mkdir(parents=True)
    (tree / "file").write_text("x")
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(tree / "mnt")], check=True)
    yield tree
    # Wherever the tree went, unmount it so that tmp_path can go.
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in points:
        if point.startswith(str(tmp_path)):
            subprocess.run(["umount", "-l", point], check=False)


def test_a_tree_that_cannot_be_removed_is_moved_out_of_reach(tmp_path, mounted):
    quarantine = tmp_path / "q"
    warnings: list[str] = []
    sleeps: list[float] = []
    assert reclaim([str(mounted)], str(quarantine), warnings.append, sleep=sleeps.append)
    assert len(sleeps) == MAX_ATTEMPTS - 1  # tried again, with pauses
    assert not mounted.exists()
    [moved] = os.listdir(quarantine)
    st = os.lstat(quarantine / moved)
    assert moved.startswith(".leftover-") and stat.S_IMODE(st.st_mode) == 0
    assert st.st_uid == os.geteuid()
    assert "moving it out of the way" in warnings[0]


def test_a_tree_that_can_neither_be_removed_nor_moved_says_so(tmp_path, mounted):
    (tmp_path / "q").write_text("a file where the quarantine should be")
    warnings: list[str] = []
    assert not reclaim([str(mounted)], str(tmp_path / "q"), warnings.append, sleep=lambda _: 0)
    assert mounted.exists()
    assert "cannot move" in warnings[-1]


def test_what_is_left_at_the_deadline_is_moved_out_of_the_way(tmp_path):
    tree = tmp_path / "kernel"
    deep_tree(str(tmp_path), 50, name="kernel")
    clock = Clock()
    clock.advance(10)
    warnings: list[str] = []
    assert reclaim([str(tree)], str(tmp_path / "q"), warnings.append, 5.0, clock.seconds)
    assert not tree.exists() and len(os.listdir(tmp_path / "q")) == 1
    assert "deadline" in warnings[0]


def test_a_tree_someone_else_removes_meanwhile_is_no_failure(tmp_path, monkeypatch):
    # The server removes a lost nursery's kernel directories while the next
    # nursery does too: walks that find entries vanished are retried, beyond
    # MAX_ATTEMPTS, and not taken for a tree that cannot be removed.
    from cellmux.cleanup import Removal
    from cellmux.kernel import reclaim as module

    tree = tmp_path / "kernel"
    deep_tree(str(tmp_path), 20, name="kernel")
    races = []

    def racing(path, **kwargs):
        if len(races) < MAX_ATTEMPTS + 2:
            races.append(path)
            return Removal(False, "FileNotFoundError: [Errno 2] No such file or directory: 'd'")
        return remove_tree(path, **kwargs)

    monkeypatch.setattr(module, "remove_tree", racing)
    warnings: list[str] = []
    assert reclaim([str(tree)], str(tmp_path / "q"), warnings.append, sleep=lambda _: None)
    assert not tree.exists() and not warnings and not (tmp_path / "q").exists()
