"""``cellmux run``'s quick path (cellmux.terminal.quick): a named, warm kernel
is run without the asyncio client, against a real server and kernel, with
the same output and exit statuses as the full client."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cellmux.client import DEFAULT_URL
from cellmux.protocol import Frame, JupyterSocket, decode_frame, encode_frame
from cellmux.terminal import quick
from cellmux.terminal import server as terminal_server
from terminal_helpers import (
    SPIN,
    Terminal,
    cellmux,
    cellmux_env,
    delete_named_kernels,
    interrupt_a_spinning_run,
    wait_until_idle,
)

TIMEOUT = 60
#: What the quick path must not import (each costs tens of ms at start).
HEAVY = (
    "asyncio",
    "websockets",
    "attr",
    "twisted",
    "logging",
    "_hashlib",
    "cellmux.client",
    "cellmux.protocol",
)


@pytest.fixture
def env(server, tmp_path):
    yield cellmux_env(server, tmp_path / "state")
    delete_named_kernels(server, tmp_path / "state")


def _imported(env, *args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``cellmux ARGS`` under -X importtime; its result and the modules it imported."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "cellmux", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    modules = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)", done.stderr, re.M))
    done.stderr = "".join(
        line for line in done.stderr.splitlines(True) if not line.startswith("import time:")
    )
    return done, modules


def _heavy(modules: set[str]) -> set[str]:
    return {m for m in modules if m.split(".")[0] in HEAVY or m.startswith(HEAVY)}


def test_the_default_url_is_the_clients():
    assert terminal_server.DEFAULT_URL == DEFAULT_URL


@given(
    channel=st.integers(0, 65535),
    socket=st.sampled_from(list(JupyterSocket)),
    parts=st.lists(st.binary(max_size=300), max_size=8),
)
def test_the_quick_paths_frames_are_the_protocols(channel, socket, parts):
    """quick.frame/unframe (no cellmux.protocol import) agree with framing.py."""
    data = quick.frame(channel, int(socket), parts)
    assert data == encode_frame(Frame(channel, tuple(parts), socket=socket))
    assert quick.unframe(data) == (channel, parts)
    assert decode_frame(data).parts == tuple(parts)


@given(st.binary(max_size=70_000))
def test_websocket_masking_round_trips(payload):
    """What _send_frame masks, the receiving side's unmasking gives back."""
    sent: list[bytes] = []
    ws = quick.WebSocket.__new__(quick.WebSocket)
    ws.sock = type("Sink", (), {"sendall": lambda self, data: sent.append(data)})()
    ws._send_frame(0x2, payload)
    echo = quick.WebSocket.__new__(quick.WebSocket)
    echo.buffer = bytearray(sent[0])
    echo.sock = None  # everything is in the buffer already
    assert echo.receive() == payload


def test_a_named_kernel_runs_without_the_asyncio_client(env, tmp_path):
    path = tmp_path / "lines.py"
    path.write_text("x = 40\nprint('x is', x)\nx + 2\n")
    # the first run names the kernel: the full client creates it
    first, modules = _imported(env, "run", str(path), "--lines", "1", "--kernel", "quick")
    assert first.returncode == 0, first.stderr
    assert "asyncio" in modules
    # the next ones find it in the state file and take the quick path
    done, modules = _imported(env, "run", str(path), "--lines", "2-3", "--kernel", "quick")
    assert (done.returncode, done.stdout, done.stderr) == (0, "x is 40\nOut[2]: 42\n", "")
    assert not _heavy(modules), sorted(_heavy(modules))
    # a kernel id works as well as a name
    names = (tmp_path / "state" / "cellmux" / "kernels.json").read_text()
    kernel_id = re.search(r'"quick": "([0-9a-f-]+)"', names).group(1)
    done, modules = _imported(env, "run", str(path), "--lines", "2", "--kernel", kernel_id)
    assert (done.returncode, done.stdout) == (0, "x is 40\n")
    assert not _heavy(modules)


def test_the_quick_path_reports_as_the_full_client_does(env, tmp_path):
    """Same stdout, stderr and exit status with and without the quick path."""
    raising = tmp_path / "raising.py"
    raising.write_text("import sys\nprint('out')\nprint('err', file=sys.stderr)\n1 / 0\n")
    image = tmp_path / "image.py"
    image.write_text(
        "from IPython.display import display, Image\n"
        "display({'text/plain': 'a plot'}, raw=True)\n"
        "display({'application/x-thing': 1}, raw=True)\n"
    )
    assert cellmux(env, "run", str(image), "--lines", "1", "--kernel", "same").returncode == 0
    slow = dict(env, CELLMUX_RUN_QUICK="0")
    for path in (raising, image):
        quick = cellmux(env, "run", str(path), "--kernel", "same", timeout=TIMEOUT)
        full = cellmux(slow, "run", str(path), "--kernel", "same", timeout=TIMEOUT)
        strip = re.compile(r"\[\d+\]")  # execution counts differ between the two runs

        def norm(text: str) -> str:
            return strip.sub("[n]", text)  # noqa: B023 - used at once

        assert (quick.returncode, norm(quick.stdout), norm(quick.stderr)) == (
            full.returncode,
            norm(full.stdout),
            norm(full.stderr),
        ), path
    assert quick.returncode == 0
    assert "[output of type application/x-thing, not shown in a terminal]" in quick.stdout
    raised = cellmux(env, "run", str(raising), "--kernel", "same", timeout=TIMEOUT)
    assert raised.returncode == 1
    assert "ZeroDivisionError" in raised.stderr and raised.stdout == "out\n"


def test_input_pdb_and_ctrl_c_on_the_quick_path(env, tmp_path, server):
    warm = tmp_path / "warm.py"
    warm.write_text("pass\n")
    assert cellmux(env, "run", str(warm), "--kernel", "term").returncode == 0
    path = tmp_path / "asks.py"
    path.write_text(
        "name = input('name? ')\nbreakpoint()\ngreeting = 'hello ' + name\nprint(greeting)\n"
    )
    terminal = Terminal(env, "run", str(path), "--kernel", "term")
    try:
        terminal.expect("name\\? ")
        terminal.send("Ada\r")
        terminal.expect(re.escape(f"> {path}(3)<module>()"))
        terminal.expect("db>")
        terminal.send("p name\r")
        terminal.expect("'Ada'")
        terminal.expect("db>")
        terminal.send("c\r")
        terminal.expect("hello Ada")
        assert terminal.wait() == 0
    finally:
        terminal.close()
    spin = tmp_path / "spin.py"
    spin.write_text(SPIN)
    interrupt_a_spinning_run(env, spin, "term")
    wait_until_idle(server, tmp_path / "state", "term")
    after = cellmux(env, "run", str(warm), "--kernel", "term", timeout=TIMEOUT)
    assert after.returncode == 0
    # input at end of file: one line, exit 1, the kernel interrupted
    ask = tmp_path / "ask.py"
    ask.write_text("input('name? ')\n")
    eof = cellmux(env, "run", str(ask), "--kernel", "term", timeout=TIMEOUT)
    assert eof.returncode == 1
    assert eof.stderr.splitlines() == [
        "cellmux: input ended while the code waited for it; interrupted the kernel"
    ]


def test_a_kernel_that_dies_or_is_gone(env, tmp_path, server):
    warm = tmp_path / "warm.py"
    warm.write_text("pass\n")
    assert cellmux(env, "run", str(warm), "--kernel", "mortal").returncode == 0
    dying = tmp_path / "dying.py"
    dying.write_text("import os\nos._exit(3)\n")
    died = cellmux(env, "run", str(dying), "--kernel", "mortal", timeout=TIMEOUT)
    assert died.returncode == 3
    assert "kernel died" in died.stderr
    # dead: the quick path steps aside and the full client restarts it
    again = cellmux(env, "run", str(warm), "--kernel", "mortal", timeout=TIMEOUT)
    assert again.returncode == 0, again.stderr
    # removed: a new kernel under the same name
    names = (tmp_path / "state" / "cellmux" / "kernels.json").read_text()
    kernel_id = re.search(r'"mortal": "([0-9a-f-]+)"', names).group(1)
    with server.client() as client:
        client.delete_kernel(kernel_id)
    fresh = cellmux(env, "run", str(warm), "--kernel", "mortal", timeout=TIMEOUT)
    assert fresh.returncode == 0
    assert "started kernel" in fresh.stderr


def test_a_wrong_token_is_reported_by_the_full_client(env, tmp_path):
    warm = tmp_path / "warm.py"
    warm.write_text("pass\n")
    assert cellmux(env, "run", str(warm), "--kernel", "tok").returncode == 0
    wrong = dict(env, CELLMUX_TOKEN="not-the-token")
    done = cellmux(wrong, "run", str(warm), "--kernel", "tok", timeout=TIMEOUT)
    assert done.returncode == 3
    assert "403" in done.stderr or "401" in done.stderr
