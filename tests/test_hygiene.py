"""The run's own rules (conftest.py): a test that leaves something behind
fails the run, and the root marker says what needs root."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SUITE_TMP_PREFIX

HERE = Path(__file__).resolve().parent

LEAKY = """
import os, tempfile

def test_leaves_a_file():
    with open(os.path.join(tempfile.gettempdir(), "forgotten"), "w") as f:
        f.write("x")

def test_cleans_up(tmp_path):
    (tmp_path / "fine").write_text("tmp_path is the run's to remove")
"""

CLEAN = """
import os, tempfile

def test_cleans_up(tmp_path):
    (tmp_path / "fine").write_text("x")
    fd, path = tempfile.mkstemp()
    os.close(fd)
    os.unlink(path)
"""

NEEDS_ROOT = """
import pytest

@pytest.mark.root
def test_needs_root():
    pass
"""


def run_pytest(directory: Path, source: str, *args: str) -> subprocess.CompletedProcess:
    shutil.copy(HERE / "conftest.py", directory / "conftest.py")
    (directory / "test_sample.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, "."],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


#: One process, and tox's way: two pytest-xdist workers (whose main process
#: reports what a worker found left behind).
WORKERS = pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one", "workers"])


@WORKERS
def test_a_run_that_leaves_a_file_in_its_temp_dir_fails(tmp_path, workers):
    result = run_pytest(tmp_path, LEAKY, *workers)
    assert "2 passed" in result.stdout
    assert result.returncode == 1, result.stdout
    assert "left in the temporary directory" in result.stdout
    assert "forgotten" in result.stdout


@WORKERS
def test_a_clean_run_passes_and_removes_its_temp_dir(tmp_path, workers):
    before = set(os.listdir(os.environ["TMPDIR"]))
    result = run_pytest(tmp_path, CLEAN, *workers)
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(os.listdir(os.environ["TMPDIR"])) == before


@pytest.mark.root
def test_root_marked_tests_run_as_root_and_can_be_deselected(tmp_path):
    assert run_pytest(tmp_path, NEEDS_ROOT).returncode == 0
    deselected = run_pytest(tmp_path, NEEDS_ROOT, "-m", "not root")
    assert "1 deselected" in deselected.stdout


def test_the_run_works_in_a_private_temp_dir():
    private = os.environ["TMPDIR"]
    assert os.path.basename(private).startswith(SUITE_TMP_PREFIX)
    assert os.path.dirname(private) != private
