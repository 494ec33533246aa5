"""remove_tree: whatever a kernel leaves behind goes, and nothing else does."""

from __future__ import annotations

import os
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cellmux.cleanup import remove_tree


def deep_tree(root: str, depth: int, name: str = "d" * 200) -> None:
    """A chain of C{depth} directories; its full path is far beyond PATH_MAX."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(depth):
            os.mkdir(name, dir_fd=fd)
            if i % 100 == 0:
                with open(os.open("f", os.O_WRONLY | os.O_CREAT, dir_fd=fd), "w") as f:
                    f.write("x")
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)


def test_a_tree_deeper_than_the_recursion_limit_goes(tmp_path):
    victim = tmp_path / "kernel"
    victim.mkdir()
    depth = sys.getrecursionlimit() + 500
    deep_tree(str(victim), depth)
    result = remove_tree(victim)
    assert result.done, result.reason
    assert not victim.exists()
    assert os.listdir(tmp_path) == []


def test_links_are_removed_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    victim = tmp_path / "kernel"
    (victim / "sub").mkdir(parents=True)
    (victim / "sub" / "to-dir").symlink_to(outside)
    (victim / "to-file").symlink_to(outside / "precious")
    (victim / "sub" / "fifo").parent.mkdir(exist_ok=True)
    os.mkfifo(victim / "sub" / "fifo")
    assert remove_tree(victim)
    assert not victim.exists()
    assert (outside / "precious").read_text() == "keep me"


def test_a_symlink_given_as_the_tree_is_unlinked_only(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    link = tmp_path / "link"
    link.symlink_to(outside)
    assert remove_tree(link)
    assert not link.exists() and not link.is_symlink()
    assert (outside / "precious").read_text() == "keep me"


def test_directories_without_permissions_go(tmp_path):
    victim = tmp_path / "kernel"
    locked = victim / "a" / "locked"
    locked.mkdir(parents=True)
    (locked / "file").write_text("x")
    (locked / "inner").mkdir()
    os.chmod(locked / "inner", 0)
    os.chmod(locked, 0o500)
    os.chmod(victim / "a", 0)
    assert remove_tree(victim)
    assert not victim.exists()


def test_missing_tree_is_done(tmp_path):
    assert remove_tree(tmp_path / "nothing")


def test_a_deadline_stops_it_and_a_later_call_finishes(tmp_path):
    victim = tmp_path / "kernel"
    for i in range(40):
        sub = victim / f"dir{i}"
        sub.mkdir(parents=True)
        for j in range(20):
            (sub / f"f{j}").write_text("x")
    ticks = iter(range(10**9))
    # A clock that advances one unit per look: the deadline hits early.
    first = remove_tree(victim, deadline=3, clock=lambda: next(ticks))
    assert not first.done
    assert first.reason == "deadline"
    assert victim.exists()
    assert remove_tree(victim)
    assert not victim.exists()


def test_it_never_raises(tmp_path):
    # A path whose parent cannot be opened: a failure, reported, not raised.
    result = remove_tree("\0bad")
    assert not result.done
    assert result.reason


@given(
    st.recursive(
        st.dictionaries(st.sampled_from("abc"), st.just("file"), max_size=3),
        lambda children: st.dictionaries(st.sampled_from("xyz"), children, max_size=3),
        max_leaves=20,
    )
)
def test_any_small_tree_goes_entirely(tree):
    import tempfile

    with tempfile.TemporaryDirectory() as base:
        victim = os.path.join(base, "kernel")
        os.mkdir(victim)

        def build(path: str, node: object) -> None:
            if node == "file":
                with open(path, "w") as f:
                    f.write("x")
                return
            if path != victim:
                os.mkdir(path)
            for key, child in node.items():
                build(os.path.join(path, key), child)

        build(victim, tree if isinstance(tree, dict) else {"f": tree})
        assert remove_tree(victim)
        assert os.listdir(base) == []


@pytest.mark.parametrize("depth", [1, 2, 50])
def test_shallow_chains(tmp_path, depth):
    victim = tmp_path / "kernel"
    victim.mkdir()
    deep_tree(str(victim), depth, name="n")
    assert remove_tree(victim)
    assert not victim.exists()


def test_two_removers_of_one_tree_both_succeed(tmp_path):
    import threading

    victim = tmp_path / "kernel"
    victim.mkdir()
    deep_tree(str(victim), 400, name="n")
    for i in range(50):
        (victim / f"wide{i}").mkdir()
        (victim / f"wide{i}" / "f").write_text("x")
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(remove_tree(victim))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.done for r in results), [r.reason for r in results]
    assert not victim.exists()


def _bottom_file(root: str, depth: int, size: int) -> None:
    """A chain of C{depth} one-letter directories with a file at the bottom."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        out = os.open("bottom", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd)
        os.write(out, os.urandom(size))
        os.close(out)
    finally:
        os.close(fd)


def test_usage_reaches_below_path_max(tmp_path):
    from cellmux.cleanup import tree_usage
    from cellmux.kernel.sandbox import disk_usage

    _bottom_file(str(tmp_path), 2500, 1 << 20)  # a 5,000-character path
    assert tree_usage(tmp_path) >= 1 << 20
    assert disk_usage([str(tmp_path)]) >= 1 << 20
    assert disk_usage([str(tmp_path)], stop_above=4096) > 4096
    assert remove_tree(tmp_path / "d")


def test_usage_of_nothing_is_zero(tmp_path):
    from cellmux.cleanup import tree_usage

    assert tree_usage(tmp_path / "none") == 0
    assert tree_usage(tmp_path) == 0


def test_the_file_scan_survives_a_deep_tree(tmp_path):
    from cellmux.server.files import MAX_SCAN_DEPTH, _usage, scan

    (tmp_path / "top.txt").write_text("hi")
    _bottom_file(str(tmp_path), 2500, 10)
    found, cut = scan(str(tmp_path))
    assert not cut
    assert found.keys() == {"top.txt"}  # the bottom file is deeper than announced
    assert MAX_SCAN_DEPTH < 2500
    assert _usage(str(tmp_path)) >= 2
    assert remove_tree(tmp_path / "d")
