"""How the server starts its nursery: isolated, in /, importing only from
the interpreter's own directories and those only root or its user can change."""

from __future__ import annotations

import os
import sys

import pytest

import cellmux
from cellmux.kernel import sandbox
from cellmux.protocol.nursery import NURSERY_MODULE
from cellmux.server.nursery import UntrustedSourceTree, nursery_command


def test_an_installed_cellmux_needs_no_path():
    assert nursery_command("") == [sys.executable, "-I", "-m", NURSERY_MODULE]


def test_trusted_pythonpath_directories_are_passed_explicitly(tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir(mode=0o755)
    argv = nursery_command(f"{lib}{os.pathsep}.{os.pathsep}")
    assert argv[:3] == [sys.executable, "-I", "-c"]
    assert argv[4:] == [str(lib)]  # "." (the server's cwd) and "" are dropped


def test_directories_others_can_write_to_are_left_out(tmp_path):
    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    os.chmod(open_to_all, 0o777)
    below_open = open_to_all / "lib"
    below_open.mkdir(mode=0o755)
    for path in (open_to_all, below_open):
        assert not sandbox.trusted_dir(str(path))
        assert nursery_command(str(path)) == [sys.executable, "-I", "-m", NURSERY_MODULE]


def test_a_directory_of_another_user_is_left_out(tmp_path):
    someone_elses = tmp_path / "theirs"
    someone_elses.mkdir()
    os.chown(someone_elses, 54321, 54321)  # only root can give it away
    assert not sandbox.trusted_dir(str(someone_elses))
    assert nursery_command(str(someone_elses)) == [sys.executable, "-I", "-m", NURSERY_MODULE]


def test_trusted_dirs():
    assert sandbox.trusted_dir(sys.prefix)
    assert not sandbox.trusted_dir("/tmp")  # sticky, but anyone may add to it
    assert not sandbox.trusted_dir("relative")
    assert not sandbox.trusted_dir("")


def test_kernels_are_shown_no_import_directory_of_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", ["", ".", str(tmp_path / "missing"), *sys.path])
    assert all(not p.startswith(str(tmp_path)) for p in sandbox.interpreter_paths())
    assert "" not in sandbox.interpreter_paths()


def test_a_server_run_from_a_tree_others_can_write_to_does_not_start(tmp_path, monkeypatch):
    # Left out of the nursery's path, the tree would be replaced there by
    # whatever cellmux the interpreter has installed: another version,
    # silently. The server says so and does not start.
    open_to_all = tmp_path / "open"
    (open_to_all / "cellmux").mkdir(parents=True)
    os.chmod(open_to_all, 0o777)
    monkeypatch.setattr(cellmux, "__file__", str(open_to_all / "cellmux" / "__init__.py"))
    with pytest.raises(UntrustedSourceTree, match="chmod -R go-w"):
        nursery_command("")
    # Another interpreter (kernel_python) never takes the server's tree.
    assert nursery_command("", python="/usr/bin/python3") == [
        "/usr/bin/python3",
        "-I",
        "-m",
        NURSERY_MODULE,
    ]
