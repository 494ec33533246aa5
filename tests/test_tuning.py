"""The kernel-side latency changes keep Jupyter's ordering (real kernels)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from cellmux.kernel.tuning import CHANGES, selected

#: Runs per ordering check: the races these guard against showed up in 3 to
#: 8 runs of 10 (fd output) and 30-40% of cells (reply before output).
RUNS = 20


def test_selected_names():
    assert selected(None) == frozenset(CHANGES)
    assert selected("all") == frozenset(CHANGES)
    assert selected("none") == frozenset()
    assert selected(" flush, log ") == {"flush", "log"}


def test_selected_refuses_unknown_names():
    with pytest.raises(ValueError, match="unknown fast"):
        selected("flush,fast")


def test_tuning_is_installed_in_kernels(kernel):
    result = kernel.execute(
        "import ipykernel.iostream as m, zmq\n"
        "k = get_ipython().kernel\n"
        "main_replies = k.shell_channel_thread.manager.get_subshell_to_shell_channel_socket(None)\n"
        "direct = getattr(k.iopub_thread, 'cellmux_direct', None)\n"
        "(k._execute_sleep, m.OutStream.flush.__module__, main_replies.socket_type == zmq.PUSH,\n"
        " direct is not None and direct.socket_type == zmq.PUSH)"
    )
    assert result.result_text == "(0.0, 'cellmux.kernel.tuning', True, True)"


def test_warm_up_ran_and_left_no_trace(kernel):
    # The first cell a client runs: the display formatters exist already
    # (made by the warm-up's display), and nothing of that cell is visible.
    result = kernel.execute(
        "ip = get_ipython()\n"
        "print('formatters' in ip.display_formatter._trait_values)\n"
        "print(ip.kernel.cellmux_warm_up)\n"
        "print(repr(_), repr(__), Out, len(In), repr(_i), [k for k in dir() if k[1:].isdigit()])"
    )
    # The whole request path ran, not only IPython's run_cell.
    assert result.stdout.splitlines() == ["True", "execute_request", "'' '' {} 2 '' []"]
    assert result.execution_count == 1
    second = kernel.execute("6 * 7")
    assert (second.result_text, second.execution_count) == ("42", 2)
    assert kernel.execute("(_, Out)").result_text == "(42, {2: 42})"


def test_fd_and_subprocess_output_arrive_before_idle(kernel):
    """Output written to fd 1 by the kernel or a child process is not lost
    behind idle, though nothing was buffered in sys.stdout."""
    code = (
        "import os, subprocess\nos.write(1, b'fd\\n')\nsubprocess.run(['echo', 'sub'], check=True)"
    )
    for _ in range(RUNS):
        result = kernel.execute(code)
        assert result.ok
        assert sorted(result.stdout.splitlines()) == ["fd", "sub"]


def test_stream_text_stays_ahead_of_displays(kernel):
    code = "print('a')\ndisplay('b')\nprint('c')\n'd'"
    for _ in range(RUNS):
        result = kernel.execute(code)
        assert [(o.kind, o.content) for o in result.outputs] == [
            ("stdout", "a\n"),
            ("display", {"text/plain": "'b'"}),
            ("stdout", "c\n"),
            ("result", {"text/plain": "'d'"}),
        ]


def _message_types(frames, parent_id):
    types = []
    for frame in frames:
        if frame.channel == 0 or len(frame.parts) < 4:
            continue
        if json.loads(frame.parts[1]).get("msg_id") == parent_id:
            types.append(json.loads(frame.parts[0])["msg_type"])
    return types


def test_busy_first_idle_last_and_all_output_in_between(kernel):
    frames = []
    kernel.add_listener(frames.append)
    for code in ["1+1", "print('x')"] * (RUNS // 2):
        frames.clear()
        result = kernel.execute(code)
        types = _message_types(frames, result.msg_id)
        # The reply travels on shell, which Jupyter does not order against
        # iopub (bench/ab.py counts how often it overtakes); iopub is ordered.
        iopub = [t for t in types if t != "execute_reply"]
        output = "execute_result" if code == "1+1" else "stream"
        assert iopub == ["status", "execute_input", output, "status"], types


def test_output_before_input_reaches_the_client_first(kernel):
    frames = []
    kernel.add_listener(frames.append)
    seen_at_prompt = []

    def answer(prompt: str, password: bool) -> str:
        seen_at_prompt.append([f.channel for f in frames])
        return "ok"

    result = kernel.execute("display('shown')\nprint(input('q? '))", on_stdin=answer)
    assert result.stdout == "ok\n"
    channels = seen_at_prompt[0]
    assert 7 in channels[: channels.index(1)]  # display (7) before stdin (1)


def _stdout_messages(frames, parent_id):
    texts = []
    for frame in frames:
        if frame.channel == 0 or len(frame.parts) < 4:
            continue
        header = json.loads(frame.parts[0])
        if header["msg_type"] == "stream" and json.loads(frame.parts[1]).get("msg_id") == parent_id:
            texts.append(json.loads(frame.parts[3])["text"])
    return texts


def test_each_flush_is_one_message_in_order(kernel):
    frames = []
    kernel.add_listener(frames.append)
    result = kernel.execute("for i in range(500): print(i, flush=True)")
    assert _stdout_messages(frames, result.msg_id) == [f"{i}\n" for i in range(500)]


def test_queued_flushes_stay_in_order_with_displays_and_timed_flushes(kernel):
    # Flushes queued ahead, displays, and text the 0.2 s timer sends on its
    # own (written without a flush) must come out in the order written.
    code = (
        "import sys, time\n"
        "for i in range(600):\n"
        "    sys.stdout.write(f'{i}\\n')\n"
        "    if i % 3 == 0: sys.stdout.flush()\n"
        "    if i % 100 == 0: display(i)\n"
        "    if i % 150 == 0: time.sleep(0.25)\n"
    )
    for _ in range(3):
        result = kernel.execute(code)
        text, seen = "", []
        for output in result.outputs:
            if output.kind == "stdout":
                text += output.content
            else:
                seen.append((text.count("\n"), output.content["text/plain"]))
        assert text == "".join(f"{i}\n" for i in range(600))
        assert seen == [(i + 1, str(i)) for i in range(0, 600, 100)]


def test_interrupting_a_flushing_loop_leaves_output_working(kernel):
    threading.Timer(0.5, kernel.interrupt).start()
    result = kernel.execute("i = 0\nwhile True:\n    print(i, flush=True)\n    i += 1", timeout=30)
    assert result.error.ename == "KeyboardInterrupt"
    lines = result.stdout.splitlines()
    assert lines == [str(i) for i in range(len(lines))]
    after = kernel.execute("for j in range(100): print('after', j, flush=True)")
    assert after.stdout == "".join(f"after {j}\n" for j in range(100))


def test_reply_comes_after_output_and_before_idle(kernel):
    # The pump forwards in emission order: the whole sequence is ordered,
    # the reply included, though it leaves on another socket than iopub.
    frames = []
    kernel.add_listener(frames.append)
    for code in ["1+1", "print('x')", "display(1)\n2"] * (RUNS // 2):
        frames.clear()
        result = kernel.execute(code)
        types = _message_types(frames, result.msg_id)
        assert types[:2] == ["status", "execute_input"], types
        assert types[-2:] == ["execute_reply", "status"], types


def test_main_thread_does_not_wait_for_the_iopub_thread_to_reply(kernel):
    """``fifo``: the reply is queued behind the cell's output instead of the
    main thread waiting for the IOPub thread to send that output; a slow
    IOPub thread delays the reply, not the kernel's next request."""
    frames = []
    kernel.add_listener(frames.append)
    first = kernel.execute(
        "import asyncio, time\n"
        "_marks = {}\n"
        "get_ipython().kernel.iopub_thread.schedule(lambda: time.sleep(1.0))\n"
        "display('behind the slow event')\n"
        "_marks['end'] = time.monotonic()\n"
        "asyncio.get_event_loop().call_soon(\n"
        "    lambda: _marks.__setitem__('free', time.monotonic()))\n"
        "pass\n"
    )
    assert first.ok
    types = _message_types(frames, first.msg_id)
    assert types[-3:] == ["display_data", "execute_reply", "status"], types
    waited = float(kernel.execute("_marks['free'] - _marks['end']").result_text)
    # With the reply barrier the main thread sat out the whole second.
    assert waited < 0.5


def test_output_does_not_wait_for_the_iopub_thread(kernel):
    """``direct``: what a cell publishes is sent by its own thread, not
    handed to ipykernel's IOPub thread: with that thread asleep for 3 s,
    the cell's output, display, reply and idle all arrive, in order, at
    once (through the IOPub thread they arrived after its sleep)."""
    frames = []
    kernel.add_listener(frames.append)
    assert kernel.execute("import time\nk = get_ipython().kernel").ok
    frames.clear()
    started = time.monotonic()
    result = kernel.execute(
        "k.iopub_thread.schedule(lambda: time.sleep(3.0))\n"
        "print('printed', flush=True)\n"
        "display('shown')\n"
        "print('last')\n"
        "7"
    )
    took = time.monotonic() - started
    assert result.ok
    assert result.stdout == "printed\nlast\n"
    types = _message_types(frames, result.msg_id)
    assert types == [
        "status",
        "execute_input",
        "stream",
        "display_data",
        "stream",
        "execute_result",
        "execute_reply",
        "status",
    ], types
    assert took < 2.0, took
    assert kernel.execute("time.sleep(3)").ok  # leave the IOPub thread awake


def test_a_cell_is_transformed_once(kernel):
    # ipykernel transforms a cell, then IPython's run_cell did it again.
    setup = kernel.execute(
        "_transforms = []\n"
        "def _count(lines):\n"
        "    _transforms.append(''.join(lines))\n"
        "    return lines\n"
        "get_ipython().input_transformers_cleanup.append(_count)"
    )
    assert setup.ok
    for code in ["1+1", "x = 3", "y = x * 2\nhere = %pwd", "async def f(): return 1\nawait f()"]:
        assert kernel.execute("_transforms.clear()").ok
        result = kernel.execute(code)
        assert result.ok, result.error
        count = kernel.execute("len(_transforms)").result_text
        # the clear() cell and the counting cell are counted too
        assert count == "2", (code, count)
    assert kernel.execute("(x, y)").result_text == "(3, 6)"
    # A cell run by the user's own code is transformed, as any other.
    ran = kernel.execute("get_ipython().run_cell('z = 7')\nz")
    assert ran.result_text == "7"


def test_a_forked_child_still_prints_through_the_kernel(kernel):
    """``direct``: a fork of the kernel has no socket to the pump of its
    own; what it prints goes the stock way (the IOPub thread's pipe), and
    the lock direct flushes take is not inherited held. A thread spins
    printing meanwhile, so that the lock is often held at a fork (without
    the fix a child hung in about two forks of three); five forks, each
    child given 5 s, one that hangs killed and named."""
    code = (
        "import os, signal, sys, threading, time\n"
        "stop = threading.Event()\n"
        "def spin():\n"
        "    while not stop.is_set():\n"
        "        print('.', end='', file=sys.stderr, flush=True)\n"
        "t = threading.Thread(target=spin); t.start()\n"
        "time.sleep(0.2)\n"
        "ends = []\n"
        "for n in range(5):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        sys.stdout.write(f'from child {n}\\n'); sys.stdout.flush()\n"
        "        os._exit(0)\n"
        "    deadline = time.monotonic() + 5\n"
        "    while not os.waitpid(pid, os.WNOHANG)[0] and time.monotonic() < deadline:\n"
        "        time.sleep(0.01)\n"
        "    if time.monotonic() >= deadline:\n"
        "        os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0); ends.append(f'child {n} hung')\n"
        "stop.set(); t.join()\n"
        "time.sleep(0.5)\n"
        "print('parent', ends)"
    )
    result = kernel.execute(code, timeout=60)
    assert result.ok, result.error
    # A child's text comes the stock way (a pipe to the IOPub thread), the
    # parent's the direct way: every line, in whatever order they meet.
    expected = [f"from child {n}" for n in range(5)] + ["parent []"]
    assert sorted(result.stdout.splitlines()) == sorted(expected), result.stdout
