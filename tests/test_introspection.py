"""Introspection while a cell runs, against real servers and kernels.

complete, inspect, is_complete, history and the namespace listing are
answered while a pure-Python cell runs, for every client and transport with
nothing to opt into; inside pdb they see the frame pdb shows; while C code
holds the GIL the server answers ``unresponsive`` instead of letting the
client wait.
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from conftest import start_server
from test_jupyter_ws import JupyterClient

#: A cell that keeps the GIL busy in Python (not in a sleep) for a while.
SPIN = "import time as _t\n_end = _t.time() + {seconds}\nwhile _t.time() < _end: sum(range(500))\n"
#: A cell whose C code holds the GIL: libc's sleep through ctypes.PyDLL,
#: which, unlike CDLL, does not release it.
HOLD_GIL = "import ctypes\nctypes.PyDLL(None).sleep({seconds})\n"


@pytest.fixture(scope="module")
def busy_server():
    running = start_server("--pool-size", "1")
    yield running
    running.stop()


@pytest.fixture
def two_clients(busy_server):
    """Two connections to one fresh kernel, from two clients (event loops)."""
    with busy_server.client() as first, busy_server.client() as second:
        model = first.create_kernel()
        try:
            with first.connect(model.id) as runner, second.connect(model.id) as asker:
                yield model.id, runner, asker
        finally:
            with contextlib.suppress(Exception):
                first.delete_kernel(model.id)


def in_background(kernel, code: str, **kwargs):
    """Run C{code} on a thread; returns (thread, result holder)."""
    result: dict = {}

    def run() -> None:
        result["value"] = kernel.execute(code, timeout=120, **kwargs)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def wait_busy(kernel) -> None:
    deadline = time.monotonic() + 20
    while kernel.status != "busy":
        assert time.monotonic() < deadline, kernel.status
        time.sleep(0.02)


def test_introspection_is_answered_while_a_cell_runs(two_clients):
    _, runner, asker = two_clients
    runner.execute("needle_value = 41\ndef needle_function(a, b):\n    '''Finds needles.'''\n")
    thread, result = in_background(runner, SPIN.format(seconds=8) + "late_name = 1\n")
    try:
        wait_busy(runner)
        started = time.monotonic()
        latency = []
        for _ in range(40):
            t0 = time.monotonic()
            reply = asker.complete("needle_v", timeout=5)
            latency.append(time.monotonic() - t0)
            assert reply["status"] == "ok" and reply["matches"] == ["needle_value"]
        latency.sort()
        # Printed for docs/benchmarks.md (pytest -s); the machine is shared,
        # so the bound is loose: seconds would mean "after the cell".
        p50, worst = latency[20] * 1000, latency[-1] * 1000
        print(f"\ncomplete while busy: p50 {p50:.1f} ms, max {worst:.1f} ms")
        assert latency[-1] < 2.0
        inspected = asker.inspect("needle_function", timeout=5)
        assert inspected["found"] and "Finds needles." in inspected["data"]["text/plain"]
        assert asker.is_complete("for x in y:", timeout=5) == {
            "status": "incomplete",
            "indent": "    ",
        }
        tail = asker.request(
            "history_request",
            {"hist_access_type": "tail", "n": 5, "output": False, "raw": True},
            timeout=5,
        ).content
        assert any("needle_value = 41" in entry[2] for entry in tail["history"])
        listing = asker.namespace(timeout=5)
        by_name = {v["name"]: v for v in listing["variables"]}
        assert by_name["needle_value"] == {"name": "needle_value", "type": "int", "repr": "41"}
        assert by_name["needle_function"]["type"] == "function"
        assert "late_name" not in by_name  # the cell has not got there yet
        assert time.monotonic() - started < 7, "answered only after the cell"
        assert runner.status == "busy"  # no idle from the introspection
    finally:
        thread.join()
    assert result["value"].status == "ok"
    assert "late_name" in {v["name"] for v in asker.namespace(timeout=5)["variables"]}


def test_a_jupyter_client_completes_while_a_cell_runs(busy_server, two_clients):
    kernel_id, runner, _ = two_clients
    client = busy_server.client()
    runner.execute("needle_value = 41")
    jupyter = JupyterClient(busy_server, kernel_id, "v1")
    thread, _ = in_background(runner, SPIN.format(seconds=6))
    try:
        wait_busy(runner)
        started = time.monotonic()
        msg_id = jupyter.send("shell", "complete_request", {"code": "needle_v", "cursor_pos": 8})
        [reply] = [
            m
            for m in jupyter.until(
                lambda m: (
                    m["msg_type"] == "complete_reply" and m["parent_header"].get("msg_id") == msg_id
                ),
                timeout=5,
            )
            if m["msg_type"] == "complete_reply"
        ]
        assert reply["channel"] == "shell" and reply["content"]["matches"] == ["needle_value"]
        assert time.monotonic() - started < 3
        # Jupyter clients (JupyterLab) finish a request at its idle: it comes,
        # marked, and the server does not take it for the kernel's state.
        [idle] = [
            m
            for m in jupyter.until(
                lambda m: (
                    m["msg_type"] == "status"
                    and m["parent_header"].get("msg_id") == msg_id
                    and m["content"]["execution_state"] == "idle"
                ),
                timeout=5,
            )
            if m["msg_type"] == "status"
            and m["content"]["execution_state"] == "idle"
            and m["parent_header"].get("msg_id") == msg_id
        ]
        assert idle["content"]["cellmux_introspection"] is True
        assert client.get_kernel(kernel_id).execution_state == "busy"
    finally:
        thread.join()
        jupyter.close()
        client.close()


def test_inside_pdb_introspection_sees_the_current_frame(two_clients):
    _, runner, asker = two_clients
    at_prompt = threading.Event()
    checked = threading.Event()

    def answer(prompt: str, password: bool) -> str:
        at_prompt.set()
        checked.wait(30)
        return "c"

    code = (
        "def outer_function(argument_one):\n"
        "    frame_local_value = argument_one * 2\n"
        "    breakpoint()\n"
        "    return frame_local_value\n"
        "outer_function(21)\n"
    )
    thread, result = in_background(runner, code, on_stdin=answer)
    try:
        assert at_prompt.wait(20)
        reply = asker.complete("frame_lo", timeout=5)
        assert reply["matches"] == ["frame_local_value"]
        assert "argument_one" in asker.complete("argument_", timeout=5)["matches"]
        # globals of the frame are there too
        assert "outer_function" in asker.complete("outer_f", timeout=5)["matches"]
        inspected = asker.inspect("frame_local_value", timeout=5)
        assert inspected["found"] and "42" in inspected["data"]["text/plain"]
        listing = asker.namespace(timeout=5)
        names = {v["name"]: v for v in listing["variables"]}
        assert names["frame_local_value"]["repr"] == "42"
        assert names["argument_one"]["repr"] == "21"
        assert listing["frame"]["function"] == "outer_function"
    finally:
        checked.set()
        thread.join()
    assert result["value"].result_text == "42"
    # Out of pdb: the user namespace again.
    assert asker.complete("frame_lo", timeout=5)["matches"] == []


def test_a_kernel_whose_gil_is_held_by_c_code_is_answered_unresponsive(two_clients):
    _, runner, asker = two_clients
    replies: list[str] = []

    def listener(frame) -> None:
        if frame.channel == 5:
            import json

            replies.append(json.loads(frame.parts[1]).get("msg_id"))

    asker.add_listener(listener)
    thread, result = in_background(runner, HOLD_GIL.format(seconds=7))
    try:
        time.sleep(0.5)  # the cell is in its C call
        t0 = time.monotonic()
        first = asker.complete("needle", timeout=10)
        waited = time.monotonic() - t0
        assert first["status"] == "unresponsive" and first["ename"] == "KernelUnresponsive"
        assert waited < 3.5, waited  # the bound (unresponsive_after, 2 s), plus a tick
        deadline = time.monotonic() + 10
        while runner.status != "unresponsive":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        t0 = time.monotonic()
        second = asker.inspect("needle", timeout=10)
        assert second["status"] == "unresponsive"
        assert time.monotonic() - t0 < 0.5  # known unresponsive: at once
    finally:
        thread.join()
    assert result["value"].status == "ok"
    assert asker.complete("ctyp", timeout=5)["matches"] == ["ctypes"]
    time.sleep(0.5)
    # One reply per request: the kernel's late replies were dropped.
    assert len(replies) == len(set(replies)) == 3
