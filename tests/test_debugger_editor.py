"""Debugging from editors on real kernels through a real server:
``cellmux run --break FILE:LINE``, pause (Pyzo's) and ``cellmux pause``."""

from __future__ import annotations

import re
import threading

import pytest

from cellmux.kernel.debugging import BreakpointError, breakpoints_from_metadata
from cellmux.terminal.run import SelectionError, parse_breakpoint
from terminal_helpers import Terminal, cellmux, cellmux_env, delete_named_kernels

TIMEOUT = 60


@pytest.fixture
def env(server, tmp_path):
    yield cellmux_env(server, tmp_path / "state")
    delete_named_kernels(server, tmp_path / "state")


# -- the metadata and the option (no kernel) --------------------------------


def test_breakpoint_metadata_is_checked():
    assert breakpoints_from_metadata(None) == []
    assert breakpoints_from_metadata({"cellmux": {"filename": "f.py"}}) == []
    found = breakpoints_from_metadata(
        {"cellmux": {"breakpoints": [{"filename": "/a/f.py", "line": 3}]}}
    )
    assert found == [("/a/f.py", 3)]
    for bad in ([{"filename": "", "line": 3}], [{"filename": "f", "line": 0}], "f.py:3"):
        with pytest.raises(BreakpointError):
            breakpoints_from_metadata({"cellmux": {"breakpoints": bad}})
    with pytest.raises(BreakpointError):
        breakpoints_from_metadata({"cellmux": {"breakpoints": [{"filename": "f", "line": True}]}})


def test_break_option_names_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_breakpoint("12", "a.py") == {"filename": str(tmp_path / "a.py"), "line": 12}
    assert parse_breakpoint("lib/b.py:3", "a.py") == {
        "filename": str(tmp_path / "lib" / "b.py"),
        "line": 3,
    }
    for bad in ("x", "a.py:", "a.py:0", "a.py:-1"):
        with pytest.raises(SelectionError):
            parse_breakpoint(bad, "a.py")


# -- breakpoints by file and line --------------------------------------------

PROGRAM = """\
def scale(values, factor):
    size = len(values)
    scaled = [v * factor for v in values]
    return scaled

data = [1, 2, 3]
result = scale(data, 10)
print("result", result)
"""


def test_run_break_stops_at_the_file_line_in_pdb(env, tmp_path):
    path = tmp_path / "program.py"
    path.write_text(PROGRAM)
    terminal = Terminal(env, "run", str(path), "--break", "4", "--kernel", "breaks")
    try:
        # inside scale(), at its return: the file's own line and name
        terminal.expect(re.escape(f"> {path}(4)scale()"))
        terminal.expect("db>")
        terminal.send("p scaled\r")
        terminal.expect(re.escape("[10, 20, 30]"))
        terminal.expect("db>")
        terminal.send("c\r")
        terminal.expect(re.escape("result [10, 20, 30]"))
        assert terminal.wait() == 0
    finally:
        terminal.close()
    # A breakpoint in a function an earlier run defined, named by file:line,
    # set from a run of another file.
    caller = tmp_path / "caller.py"
    caller.write_text("print('again', scale([5], 2))\n")
    terminal = Terminal(env, "run", str(caller), "--break", f"{path}:2", "--kernel", "breaks")
    try:
        terminal.expect(re.escape(f"> {path}(2)scale()"))
        terminal.expect("db>")
        terminal.send("p values, factor\r")
        terminal.expect(re.escape("([5], 2)"))
        terminal.expect("db>")
        terminal.send("c\r")
        terminal.expect(re.escape("again [10]"))
        assert terminal.wait() == 0
    finally:
        terminal.close()
    # (line 3's list comprehension would stop twice: it is a frame of its own,
    # as with pdb's "break 3")
    # Without --break the same code runs straight through: nothing was left set.
    done = cellmux(env, "run", str(caller), "--kernel", "breaks", timeout=TIMEOUT)
    assert (done.returncode, done.stdout) == (0, "again [10]\n")


def test_a_breakpoint_line_that_never_runs_costs_nothing(kernel):
    result = kernel.execute(
        "x = 1\ny = 2\n",
        metadata={
            "cellmux": {
                "filename": "/nowhere/f.py",
                "first_line": 1,
                "breakpoints": [{"filename": "/nowhere/f.py", "line": 40}],
            }
        },
        timeout=TIMEOUT,
    )
    assert result.ok
    bad = kernel.execute(
        "x = 1",
        metadata={"cellmux": {"breakpoints": [{"filename": "f.py", "line": "x"}]}},
        timeout=TIMEOUT,
    )
    assert bad.status == "error" and bad.error.ename == "BreakpointError"
    assert kernel.execute("x", timeout=TIMEOUT).result_text == "1"


# -- pause ---------------------------------------------------------------------

SPIN = """\
import time
count = 0
while True:
    count += 1
    time.sleep(0.01)
"""


def test_pause_stops_a_running_cell_in_pdb_and_it_goes_on(kernel):
    prompts: list[str] = []
    answers = iter(["p count > 0", "c"])

    def answer(prompt: str, password: bool) -> str:
        prompts.append(prompt)
        return next(answers, "c")

    code = SPIN.replace("while True:", "while count < 300:") + "print('done', count)\n"
    code = code.replace("count = 0\n", "count = 0\nprint('spinning', flush=True)\n")
    spinning = threading.Event()
    result: dict = {}

    def execute() -> None:
        result["r"] = kernel.execute(
            code, on_stdin=answer, on_output=lambda o: spinning.set(), timeout=TIMEOUT
        )

    thread = threading.Thread(target=execute)
    # not running: the pause does nothing and says so
    assert kernel.pause(timeout=TIMEOUT) is False
    thread.start()
    assert spinning.wait(TIMEOUT)
    assert kernel.pause(timeout=TIMEOUT) is True
    thread.join(TIMEOUT)
    execution = result["r"]
    assert execution.ok, execution.error
    assert prompts and "db>" in prompts[0]
    # pdb answered at the loop, and the cell went on to its end
    assert "True" in execution.stdout
    assert execution.stdout.endswith("done 300\n")
    # Ctrl-C still interrupts as before
    assert kernel.execute("1 + 1", timeout=TIMEOUT).result_text == "2"


def test_cellmux_pause_gives_the_prompt_to_cellmux_run(env, tmp_path):
    path = tmp_path / "spin.py"
    path.write_text(SPIN.replace("count = 0\n", "count = 0\nprint('spinning', flush=True)\n"))
    terminal = Terminal(env, "run", str(path), "--kernel", "paused")
    try:
        terminal.expect("spinning")
        paused = cellmux(env, "pause", "--kernel", "paused", timeout=TIMEOUT)
        assert paused.returncode == 0, paused.stderr
        terminal.expect(re.escape(f"{path}(") + r"[456]\)<module>\(\)")
        terminal.expect("db>")
        terminal.send("p count > 0\r")
        terminal.expect("True")
        terminal.expect("db>")
        terminal.send("q\r")  # quit ends the cell with BdbQuit
        assert terminal.wait() == 1
    finally:
        terminal.close()
    idle = cellmux(env, "pause", "--kernel", "paused", timeout=TIMEOUT)
    assert idle.returncode == 1
    assert "not running a cell" in idle.stderr
