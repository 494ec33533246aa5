"""``jupyter console`` on a cellmux kernel through ``cellmux bridge``, in a real pty.

Two ways in: ``--existing`` on the connection file the bridge wrote, and a
kernel spec whose command is the bridge (``--use-connection-file``), which
is how Ctrl-C reaches the kernel: jupyter console interrupts only kernels
it started itself.
"""

from __future__ import annotations

import json
import sys
import time

import pytest

from bridge_helpers import BridgeProcess, bridge_env, jupyter_env
from conftest import wait_for
from terminal_helpers import Terminal, delete_named_kernels

PROMPT = r"In \[(\d+)\]:"


def prompt(number: int) -> str:
    return rf"In \[{number}\]:"


def run(console: Terminal, line: str) -> None:
    console.send(line + "\r")


@pytest.fixture
def existing(server, tmp_path):
    """jupyter console --existing on a bridge, at its first prompt."""
    state = tmp_path / "state"
    env = bridge_env(server, state)
    bridge = BridgeProcess(env, "jc", tmp_path / "kernel.json")
    console = None
    try:
        bridge.wait_ready()
        console = Terminal(
            {**jupyter_env(env, tmp_path / "home"), "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1"},
            "--existing",
            str(bridge.path),
            module="jupyter_console",
        )
        console.expect(PROMPT)
        yield console
    finally:
        if console is not None:
            console.close()
        bridge.finish()
        delete_named_kernels(server, state)


def test_code_input_and_tab_through_existing(existing):
    console = existing
    run(console, "print('hello' + ' ' * 3 + 'bridge')")
    console.expect(r"hello   bridge\n")
    console.expect(PROMPT)
    # input(): the prompt is built so that the echo of the code does not contain it
    run(console, "name = input('who' + '? ')")
    console.expect(r"who\? ")
    run(console, "Ada")
    console.expect(PROMPT)
    run(console, "print(name * 2)")
    console.expect("AdaAda")
    console.expect(PROMPT)
    # Tab: complete_request; several matches show a menu
    run(console, "import os")
    console.expect(PROMPT)
    console.send("os.pa\t")
    console.expect("pathsep")
    console.send("\x03")  # Ctrl-C at the prompt drops the input
    console.settle()
    console.send("os.path.isab")
    console.settle()
    console.send("\t")  # one match: inserted
    console.settle()
    run(console, "('/x')")
    console.expect(r"Out\[\d+\]: True")


def test_ctrl_c_while_running_is_jupyter_consoles_own_refusal(existing):
    """With --existing, jupyter console does not interrupt a kernel it did
    not start (it has no kernel manager): it says so and the code runs on.
    The kernel-spec test below is the way to get Ctrl-C."""
    console = existing
    run(console, "import time; time.sleep(6); print('slept' + '!')")
    console.settle(quiet=0.5)
    console.send("\x03")
    console.expect("Cannot interrupt kernels we didn't start")
    console.expect("slept!")
    console.expect(PROMPT)


def test_kernel_spec_launch_ctrl_c_interrupts_and_exit_shuts_down(server, tmp_path):
    state = tmp_path / "state"
    env = bridge_env(server, state)
    home = tmp_path / "home"
    spec_dir = tmp_path / "jupyter" / "kernels" / "cellmux-test"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [
            sys.executable,
            "-m",
            "cellmux",
            "bridge",
            "spec",
            "--use-connection-file",
            "{connection_file}",
        ],
        "display_name": "Python 3 (cellmux)",
        "language": "python",
        "interrupt_mode": "signal",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    console_env = {
        **jupyter_env(env, home),
        "JUPYTER_PATH": str(tmp_path / "jupyter"),
        "TERM": "xterm",
        "PROMPT_TOOLKIT_NO_CPR": "1",
    }
    console = Terminal(console_env, "--kernel", "cellmux-test", module="jupyter_console")
    try:
        # Each prompt by its number: prompt_toolkit redraws the current one,
        # and a redraw is not the next prompt (under load, the next line was
        # typed while the cell before it still ran).
        console.expect(prompt(1))
        run(console, "x = 'kept'")
        console.expect(prompt(2))
        # Ctrl-C while code runs: SIGINT to the bridge, which interrupts the kernel
        run(console, "import time; time.sleep(60)")
        console.settle(quiet=0.5)
        started = time.monotonic()
        console.send("\x03")
        console.expect("KeyboardInterrupt")
        console.expect(prompt(3))
        assert time.monotonic() - started < 20
        # Ctrl-C at an input() prompt interrupts the kernel too
        run(console, "input('again' + '? ')")
        console.expect(r"again\? ")
        console.send("\x03")
        console.expect("KeyboardInterrupt")
        console.expect(prompt(4))
        run(console, "print(x * 2)")
        console.expect("keptkept")
        console.expect(prompt(5))
        with server.client() as client:
            assert len(client.list_kernels()) >= 1
            names = json.loads((state / "cellmux" / "kernels.json").read_text())
            kernel_id = names[server.url.rstrip("/")]["spec"]
            assert client.get_kernel(kernel_id).execution_state == "idle"
            run(console, "exit")
            assert console.wait() == 0
            # jupyter console shuts its kernel down on exit: the bridge removes it
            wait_for(lambda: kernel_id not in {k.id for k in client.list_kernels()}, 30)
    finally:
        console.close()
        delete_named_kernels(server, state)
