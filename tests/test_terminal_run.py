"""``cellmux run``: selections of real files run on real kernels through a real server."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from cellmux.kernel.sourcemap import SourceFiles, SourceRef, SourceRefError, shifted
from cellmux.terminal.run import SelectionError, select
from terminal_helpers import (
    SPIN,
    Terminal,
    cellmux,
    cellmux_env,
    delete_named_kernels,
    interrupt_a_spinning_run,
    wait_until_idle,
)

ANSI = re.compile(r"\x1b\[[0-9;]*m")

# Line 12 raises; lines 10-14 are the selection of the first test.
RAISING = """\
import os

# ten lines of preamble that the selection leaves out
a = 1
b = 2
c = 3
d = 4
e = 5

def half(n):
    return n / 2
value = half(None)
print("not reached")
# end
"""


@pytest.fixture
def env(server, tmp_path):
    yield cellmux_env(server, tmp_path / "state")
    delete_named_kernels(server, tmp_path / "state")


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


# -- choosing the lines (no server) ----------------------------------------

CELLS = "import os\n# %%\nx = 1\n\n#%% second\ny = 2\n"


def test_select_lines_keeps_the_first_line_number():
    assert select("a\nb\nc\nd\n", lines="2-3") == select("a\nb\nc\nd\n", lines=" 2 - 3 ")
    chosen = select("a\nb\nc\nd\n", lines="2-3")
    assert (chosen.code, chosen.first_line) == ("b\nc\n", 2)
    assert select("a\nb\nc\n", lines="2").code == "b\n"
    assert select("a\nb\nc\n", lines="2-").code == "b\nc\n"
    assert select("a\nb\n").code == "a\nb\n"


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ("0-2", "numbered from 1"),
        ("3-2", "A <= B"),
        ("2-9", "has 3 lines"),
        ("x", "wants A-B"),
        ("1-2-3", "wants A-B"),
    ],
)
def test_select_bad_lines_says_why(lines, message):
    with pytest.raises(SelectionError, match=message):
        select("a\nb\nc\n", lines=lines)


def test_select_cells_by_number_and_by_line():
    assert select(CELLS, cell=1).code == "import os\n"  # the code before the first marker
    assert (select(CELLS, cell=2).code, select(CELLS, cell=2).first_line) == ("x = 1\n\n", 3)
    assert (select(CELLS, cell=3).code, select(CELLS, cell=3).first_line) == ("y = 2\n", 6)
    assert select(CELLS, at=5).code == "y = 2\n"  # a marker line opens its cell
    assert select(CELLS, at=4).code == "x = 1\n\n"
    assert select("# %%\nx\n", cell=1).code == "x\n"  # no code before the marker: no cell
    with pytest.raises(SelectionError, match="has 3 cells"):
        select(CELLS, cell=4)
    with pytest.raises(SelectionError, match="has 6 lines"):
        select(CELLS, at=7)


# -- the kernel side's values (no server) -----------------------------------


def test_source_ref_from_metadata():
    assert SourceRef.from_metadata({}) is None
    assert SourceRef.from_metadata(None) is None
    ref = SourceRef.from_metadata({"cellmux": {"filename": "/p/f.py", "first_line": 10}})
    assert ref == SourceRef("/p/f.py", 10)
    assert shifted("x\n", ref) == "\n" * 9 + "x\n"
    for bad in (
        "f.py",
        {"filename": "", "first_line": 1},
        {"filename": "f.py", "first_line": 0},
        {"filename": "f.py", "first_line": True},
        {"filename": "f.py", "first_line": "3"},
        {"filename": "a\0b", "first_line": 1},
        {"first_line": 2},
    ):
        with pytest.raises(SourceRefError):
            SourceRef.from_metadata({"cellmux": bad})


def test_source_files_merge_selections_of_one_file():
    files = SourceFiles()
    files.record(SourceRef("f.py", 3), "c\nd\n")
    lines = files.record(SourceRef("f.py", 1), "a\n")
    assert lines == ["a\n", "\n", "c\n", "d\n"]
    assert files.record(SourceRef("f.py", 4), "D\nE") == ["a\n", "\n", "c\n", "D\n", "E\n"]


# -- against a real server ---------------------------------------------------


def test_traceback_names_the_file_and_line_12(env, tmp_path):
    path = write(tmp_path, "raising.py", RAISING)
    done = cellmux(env, "run", str(path), "--lines", "10-14", "--kernel", "tb")
    assert done.returncode == 1, done.stderr
    assert "not reached" not in done.stdout
    assert not ANSI.search(done.stderr)  # not a terminal: no colours
    assert f"File {path}:12" in done.stderr
    assert "---> 12 value = half(None)" in done.stderr
    assert f"File {path}:11, in half" in done.stderr
    assert "TypeError" in done.stderr


def test_named_kernel_keeps_its_namespace_between_runs(env, tmp_path, client):
    path = write(tmp_path, "steps.py", "x = 41\nprint(x + 1)\n")
    first = cellmux(env, "run", str(path), "--lines", "1", "--kernel", "proj")
    assert first.returncode == 0, first.stderr
    assert "started kernel" in first.stderr
    second = cellmux(env, "run", str(path), "--lines", "2", "--kernel", "proj")
    assert (second.returncode, second.stdout, second.stderr) == (0, "42\n", "")
    names = json.loads((tmp_path / "state/cellmux/kernels.json").read_text())
    kernel_id = names[env["CELLMUX_URL"].rstrip("/")]["proj"]
    # The id works as well as the name.
    third = cellmux(env, "run", str(path), "--lines", "2", "--kernel", kernel_id)
    assert third.stdout == "42\n"
    # A name whose kernel was removed gets a new kernel.
    client.delete_kernel(kernel_id)
    fourth = cellmux(env, "run", str(path), "--lines", "2", "--kernel", "proj")
    assert fourth.returncode == 1 and "NameError" in fourth.stderr
    assert "started kernel" in fourth.stderr


def test_getsource_and_code_objects_see_the_file(env, tmp_path):
    text = "import inspect\n\n\ndef f(n):\n    return n + 1\n\n\nprint(inspect.getsource(f))\n"
    text += "print(f.__code__.co_filename, f.__code__.co_firstlineno)\n"
    path = write(tmp_path, "src.py", text)
    assert cellmux(env, "run", str(path), "--lines", "1-5", "--kernel", "src").returncode == 0
    # Another selection of the same file, run later, still finds f's source.
    done = cellmux(env, "run", str(path), "--lines", "8-9", "--kernel", "src")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"def f(n):\n    return n + 1\n\n{path} 4\n"


def test_cell_and_syntax_error_line(env, tmp_path):
    path = write(tmp_path, "cells.py", "x = 1\n# %%\ny = (\n# %%\nprint('cell 3')\n")
    done = cellmux(env, "run", str(path), "--cell", "3", "--kernel", "cells")
    assert (done.returncode, done.stdout) == (0, "cell 3\n")
    broken = cellmux(env, "run", str(path), "--at", "3", "--kernel", "cells")
    assert broken.returncode == 1
    assert f"File {path}:3" in broken.stderr and "SyntaxError" in broken.stderr


def test_output_streams_while_the_code_runs_and_input_is_answered(env, tmp_path):
    path = write(tmp_path, "ask.py", "print('first', flush=True)\nprint('got', input('name? '))\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "cellmux", "run", str(path), "--kernel", "ask"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The code is still waiting for its input: this line came live.
        assert process.stdout.readline() == "first\n"
        out, err = process.communicate("Ada\n", timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert out == "name? got Ada\n"


def test_bad_input_fails_clearly(env, tmp_path, server):
    path = write(tmp_path, "small.py", "x = 1\n")
    missing = cellmux(env, "run", str(tmp_path / "nope.py"))
    assert missing.returncode == 2 and "No such file" in missing.stderr
    out_of_range = cellmux(env, "run", str(path), "--lines", "5-6")
    assert out_of_range.returncode == 2 and "the file has 1 lines" in out_of_range.stderr
    both = cellmux(env, "run", str(path), "--lines", "1", "--cell", "1")
    assert both.returncode == 2 and "not allowed with" in both.stderr
    wrong_token = cellmux({**env, "CELLMUX_TOKEN": "wrong"}, "run", str(path))
    assert wrong_token.returncode == 3 and "403" in wrong_token.stderr
    nobody = cellmux(env, "run", str(path), "--server", "http://127.0.0.1:9")
    assert nobody.returncode == 3 and "cannot reach" in nobody.stderr


def test_malformed_metadata_fails_only_its_request(kernel):
    bad = kernel.execute("x = 1", metadata={"cellmux": {"filename": "f.py", "first_line": 0}})
    assert bad.status == "error"
    assert bad.error.ename == "SourceRefError"
    assert "first_line must be an integer" in bad.error.evalue
    assert kernel.execute("x = 2\nx").result_text == "2"


def test_breakpoint_stops_at_the_file_line_and_pdb_works_in_a_terminal(env, tmp_path):
    text = "".join(f"# line {n}\n" for n in range(1, 10))
    text += "x = 1\nbreakpoint()\nx = x + 41\ny = 2\nprint('end', x, y)\n"
    path = write(tmp_path, "debugged.py", text)
    terminal = Terminal(env, "run", str(path), "--lines", "10-14", "--kernel", "pdb")
    try:
        terminal.expect(re.escape(f"> {path}(12)<module>()"))
        terminal.expect("---> 12 x = x \\+ 41")
        terminal.expect("db>")
        terminal.send("n\r")
        terminal.expect(re.escape(f"> {path}(13)<module>()"))
        terminal.expect("db>")
        terminal.send("p x\r")
        terminal.expect("\n42\n")
        terminal.expect("db>")
        terminal.send("c\r")
        terminal.expect("end 42 2")
        assert terminal.wait() == 0
    finally:
        terminal.close()


def test_ctrl_c_interrupts_the_kernel(env, tmp_path, server):
    interrupt_a_spinning_run(env, write(tmp_path, "spin.py", SPIN), "spin")
    # The kernel stopped spinning: it goes idle, and the next run is served at once.
    wait_until_idle(server, tmp_path / "state", "spin")
    after = write(tmp_path, "after.py", "print('free')\n")
    done = cellmux(env, "run", str(after), "--kernel", "spin", timeout=30)
    assert (done.returncode, done.stdout) == (0, "free\n")


@pytest.mark.parametrize("path", ["quick", "full"])
def test_a_run_right_after_an_interrupt_runs(env, tmp_path, server, path):
    # An interrupted cell ends in an error, and ipykernel then aborts the
    # requests that reach it before it has finished with that error. A run
    # started at once (an editor's next key press) was such a request: it
    # exited 1 and printed nothing. Its code never ran, so the command sends
    # it again.
    spin = write(tmp_path, "spin.py", SPIN)
    after = write(tmp_path, "after.py", "print('free')\n")
    quick = {"quick": "1", "full": "0"}[path]
    ask = write(tmp_path, "ask.py", "input('name? ')\n")
    for attempt in range(3):
        interrupt_a_spinning_run(env, spin, "again")
        done = cellmux({**env, "CELLMUX_RUN_QUICK": quick}, "run", str(after), "--kernel", "again")
        assert (done.returncode, done.stdout, done.stderr) == (0, "free\n", ""), attempt
        # Input that ends interrupts the kernel too.
        assert cellmux(env, "run", str(ask), "--kernel", "again").returncode == 1
        done = cellmux({**env, "CELLMUX_RUN_QUICK": quick}, "run", str(after), "--kernel", "again")
        assert (done.returncode, done.stdout, done.stderr) == (0, "free\n", ""), attempt


@pytest.mark.parametrize("sigint", ["ignored", "blocked"])
def test_ctrl_c_interrupts_the_kernel_when_sigint_came_ignored_or_blocked(
    env, tmp_path, server, sigint
):
    # As a script's background job (or a CI runner's) starts it, or with
    # the signal masked by whoever forked it: Python then raises no
    # KeyboardInterrupt, and Ctrl-C in the terminal did nothing (the kernel
    # spun on; the Ctrl-C tests hung so in one CI run). The full client
    # first (a new name), then the quick path (a known one).
    path = write(tmp_path, "spin.py", SPIN)
    for _path in ("full", "quick"):
        interrupt_a_spinning_run(env, path, f"spin-{sigint}", sigint=sigint)
        wait_until_idle(server, tmp_path / "state", f"spin-{sigint}")
    after = write(tmp_path, "after.py", "print('free')\n")
    done = cellmux(env, "run", str(after), "--kernel", f"spin-{sigint}", timeout=30)
    assert (done.returncode, done.stdout) == (0, "free\n")


def test_input_at_end_of_file_says_one_thing_and_no_log_line(env, tmp_path):
    # stdin is /dev/null: input() meets end of file. The user sees the
    # command's own message, not the client library's log.
    path = write(tmp_path, "ask.py", "input('name? ')\n")
    result = cellmux(env, "run", str(path), "--kernel", "eof")
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if "started kernel" not in line]
    assert lines == ["cellmux: input ended while the code waited for it; interrupted the kernel"]
    # -v shows the log for a bug report.
    # (A kernel of its own: right after an interrupted request the kernel
    # aborts the next one, which then never asks for input.)
    verbose = cellmux(env, "run", "-v", str(path), "--kernel", "eof-verbose")
    assert verbose.returncode == 1
    assert "stdin handler failed" in verbose.stderr
