"""``cellmux attach --watch`` and ``cellmux kernels`` against a real server; the renderer."""

from __future__ import annotations

import io
import queue
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime

import pytest

from cellmux.client import ExecutionError, KernelModel, Output
from cellmux.terminal.render import Renderer
from cellmux.terminal.table import format_duration, format_table
from terminal_helpers import cellmux, cellmux_env


def _lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line)


class Watcher:
    """``cellmux attach KERNEL --watch`` as a subprocess, its lines read as they come."""

    def __init__(self, env: dict[str, str], kernel_id: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cellmux", "attach", kernel_id, "--watch"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out: queue.Queue[str] = queue.Queue()
        self.err: queue.Queue[str] = queue.Queue()
        threading.Thread(target=_lines, args=(self.process.stdout, self.out), daemon=True).start()
        threading.Thread(target=_lines, args=(self.process.stderr, self.err), daemon=True).start()
        self.seen: list[str] = []

    def wait_for(self, text: str, source: str = "out", timeout: float = 30) -> None:
        lines = self.out if source == "out" else self.err
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                continue
            self.seen.append(line)
            if text in line:
                return
        raise AssertionError(f"{text!r} not seen; got {self.seen!r}")

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture
def env(server, tmp_path):
    return cellmux_env(server, tmp_path / "state")


def test_watch_shows_another_clients_execution_live(env, client, kernel):
    watcher = Watcher(env, kernel.kernel_id)
    try:
        watcher.wait_for("watching kernel", "err")
        # Attached: the server counts it (the watcher's welcome came first).
        assert client.get_kernel(kernel.kernel_id).connections == 2
        seen_while_running = []

        def on_output(output: Output) -> None:
            if output.content == "step 1\n":
                # The other client's code is still running: wait for the
                # watcher to show its first line before letting it go on.
                watcher.wait_for("step 1")
                seen_while_running.append(True)

        code = "import time\nprint('step 1', flush=True)\ntime.sleep(1)\nprint('step 2')\n6 * 7"
        result = kernel.execute(code, on_output=on_output)
        assert result.ok and seen_while_running == [True]
        watcher.wait_for("step 2")
        watcher.wait_for("Out[")
        assert "Out[" in watcher.seen[-1] and "42" in watcher.seen[-1]
        text = "".join(watcher.seen)
        assert "[busy]" in text
        assert "print('step 1', flush=True)" in text  # the code, from execute_input
        kernel.execute("1/0")
        watcher.wait_for("ZeroDivisionError", "err")  # tracebacks go to stderr
    finally:
        watcher.stop()


def test_watch_ends_when_the_kernel_goes_and_refuses_unknown_kernels(env, client):
    model = client.create_kernel()
    watcher = Watcher(env, model.id)
    try:
        watcher.wait_for("watching kernel", "err")
        client.delete_kernel(model.id)
        watcher.wait_for("[dead: shut down]")
        assert watcher.process.wait(30) == 0
    finally:
        watcher.stop()
    unknown = cellmux(env, "attach", "no-such-kernel", "--watch")
    assert unknown.returncode == 3
    assert "no kernel 'no-such-kernel'" in unknown.stderr


def test_kernels_table_lists_state_and_clients(env, client, kernel, tmp_path):
    done = cellmux(env, "kernels")
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split() == ["ID", "NAME", "STATE", "AGE", "ACTIVE", "CLIENTS", "PID"]
    row = next(r.split() for r in rows if r.startswith(kernel.kernel_id))
    assert row[2] == "idle"
    assert row[5] == "1"  # the kernel fixture's connection
    assert row[6] == str(client.get_kernel(kernel.kernel_id).pid)
    as_json = cellmux(env, "kernels", "--json")
    assert kernel.kernel_id in as_json.stdout


def test_format_table_with_names_and_ages():
    now = datetime(2026, 1, 2, 12, 0, 0, tzinfo=UTC)
    kernels = [
        KernelModel.from_json(
            {
                "id": "k1",
                "execution_state": "busy",
                "connections": 2,
                "pid": 7,
                "last_activity": "2026-01-02T11:59:50.000000Z",
                "started": "2026-01-01T09:00:00.000000Z",
            }
        ),
        KernelModel.from_json(
            {"id": "k2", "execution_state": "dead", "reason": "SIGKILL", "connections": 0}
        ),
    ]
    text = format_table(kernels, now, {"proj": "k1", "other": "k1"})
    assert text.splitlines() == [
        "ID  NAME        STATE           AGE   ACTIVE  CLIENTS  PID",
        "k2  -           dead (SIGKILL)  -     -       0        -",
        "k1  other,proj  busy            1d3h  10s     2        7",
    ]
    assert [format_duration(s) for s in (5, 300, 3900, 90000)] == ["5s", "5m", "1h05m", "1d1h"]


def test_renderer_texts_and_saved_images(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    renderer = Renderer(out, err, color=False, save_dir=tmp_path / "saved")
    renderer.output(Output("stdout", "partial"))
    renderer.output(Output("result", {"text/plain": "2"}, {"execution_count": 3}))
    renderer.output(Output("display", {"image/png": "iVBORw0K", "text/plain": "<Figure>"}))
    renderer.output(Output("display", {"text/html": "<b>x</b>"}))
    renderer.output(Output("error", ExecutionError("E", "v", ["\x1b[31mE\x1b[0m: v"])))
    saved = sorted((tmp_path / "saved").iterdir())
    assert len(saved) == 1 and saved[0].read_bytes() == b"\x89PNG\r\n"
    assert out.getvalue() == (
        "partial\nOut[3]: 2\n<Figure>\n"
        f"[image/png saved to {saved[0]}]\n"
        "[output of type text/html, not shown in a terminal]\n"
    )
    assert err.getvalue() == "E: v\n"
