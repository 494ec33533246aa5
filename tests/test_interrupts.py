"""Ctrl-C that lands outside the cell's code still ends in a reply (real kernels).

The SIGINTs here come from the kernel itself, at an exact point of its
request handling, so the windows a remote Ctrl-C hits only by chance on a
loaded machine are hit every time.
"""

from __future__ import annotations

import re
import signal

import pytest

from cellmux.kernel.interrupts import InterruptGate

#: Registers a hook that sends the kernel a SIGINT once, at C{point}.
SIGINT_ONCE = """
import os, signal
_cellmux_fired = []
def _sigint_once(*args):
    if not _cellmux_fired:
        _cellmux_fired.append(1)
        os.kill(os.getpid(), signal.SIGINT)
    return args[0] if args else None
"""


def test_sigint_before_the_code_runs_interrupts_the_cell(kernel):
    # Input transformers run in ipykernel's do_execute, before run_code:
    # stock ipykernel sends no execute_reply at all for this cell.
    assert kernel.execute(
        SIGINT_ONCE + "get_ipython().input_transformers_post.append(_sigint_once)"
    ).ok
    result = kernel.execute("ran = True", timeout=30)
    assert result.status == "error"
    assert result.error.ename == "KeyboardInterrupt"
    assert "interrupted before this cell ran" in "".join(result.error.traceback)
    assert kernel.execute("'ran' in dir()").result_text == "False"
    assert kernel.execute("1+1").result_text == "2"


def test_sigint_after_the_code_ran_is_dropped_with_its_request(kernel):
    # post_execute callbacks run after the last run_code of the cell.
    assert kernel.execute(
        SIGINT_ONCE + "get_ipython().events.register('post_execute', _sigint_once)"
    ).ok
    result = kernel.execute("ran = True", timeout=30)
    assert result.ok, result.error
    assert result.outputs == []  # no "Error in callback" traceback either
    assert kernel.execute("_cellmux_fired").result_text == "[1]"
    # The held interrupt did not wait for the next cell.
    assert kernel.execute("import time; time.sleep(0.2); ran").result_text == "True"


def test_sigint_inside_the_code_still_raises_at_once(kernel):
    result = kernel.execute(
        "import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(5)\nafter = True",
        timeout=30,
    )
    assert result.error.ename == "KeyboardInterrupt"
    assert kernel.execute("'after' in dir()").result_text == "False"


def test_gate_raises_inside_code_and_holds_outside():
    gate = InterruptGate()
    gate.on_sigint(signal.SIGINT, None)
    assert gate.take_held() is True
    assert gate.take_held() is False
    gate.depth = 1
    with pytest.raises(KeyboardInterrupt):
        gate.on_sigint(signal.SIGINT, None)
    assert gate.take_held() is False


def test_interrupting_a_top_level_await_cell_ends_it_with_a_reply(kernel):
    # ipykernel runs these cells as a task and cancels it on SIGINT.
    result = kernel.execute(
        "import asyncio, os, signal\n"
        "asyncio.get_running_loop().call_later(0.2, os.kill, os.getpid(), signal.SIGINT)\n"
        "await asyncio.sleep(5)\n"
        "after = True",
        timeout=30,
    )
    assert result.status == "error"
    assert kernel.execute("'after' in dir()").result_text == "False"
    assert kernel.execute("1+1").result_text == "2"


def test_shield_moves_an_interrupt_to_the_end_of_its_block(monkeypatch):
    from cellmux.kernel import interrupts

    gate = InterruptGate()
    monkeypatch.setattr(interrupts, "_gate", gate)
    gate.depth = 1  # inside the cell's code
    reached = []
    with pytest.raises(KeyboardInterrupt), interrupts.shield:
        gate.on_sigint(signal.SIGINT, None)
        reached.append("end of block")
    assert reached == ["end of block"]
    assert gate.take_held() is False
    # Outside the cell's code the interrupt stays held for the next run_code.
    gate.depth = 0
    with interrupts.shield:
        gate.on_sigint(signal.SIGINT, None)
    assert gate.take_held() is True


def test_keyboard_interrupt_traceback_ends_at_the_users_line(kernel, client):
    # The gate raises KeyboardInterrupt from its signal handler; the user's
    # traceback must not show that cellmux frame (nor the shield's).
    result = kernel.execute(
        "import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(5)",
        timeout=30,
    )
    assert result.error.ename == "KeyboardInterrupt"
    # Without colours: IPython 8 colours each token of the line.
    traceback = re.sub(r"\x1b\[[0-9;]*m", "", "".join(result.error.traceback))
    assert "interrupts.py" not in traceback
    assert "on_sigint" not in traceback
    assert "time.sleep(5)" in traceback or "os.kill" in traceback
