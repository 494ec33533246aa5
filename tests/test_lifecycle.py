"""Interrupt, restart and death of real kernel processes."""

from __future__ import annotations

import os
import threading
import time

import pytest

from cellmux.client import KernelDied
from conftest import wait_for


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _interrupt_after(kernel, delay: float) -> list[float]:
    sent = []

    def fire() -> None:
        sent.append(time.monotonic())
        kernel.interrupt()

    threading.Timer(delay, fire).start()
    return sent


@pytest.mark.parametrize("loop", ["while True: pass", "import time; time.sleep(100)"])
def test_interrupt_gives_keyboardinterrupt_within_a_second(kernel, loop):
    kernel.execute("kept = 'still here'")
    sent = _interrupt_after(kernel, 0.5)
    result = kernel.execute(loop, timeout=30)
    elapsed = time.monotonic() - sent[0]
    assert result.error.ename == "KeyboardInterrupt"
    assert elapsed < 1.0, f"interrupt took {elapsed:.3f} s"
    assert kernel.execute("kept").result_text == "'still here'"


def test_interrupt_over_rest(client, kernel):
    threading.Timer(0.5, client.interrupt_kernel, [kernel.kernel_id]).start()
    result = kernel.execute("while True: pass", timeout=30)
    assert result.error.ename == "KeyboardInterrupt"


def test_restart_gives_new_process_same_id_same_websocket(client, kernel):
    kernel.execute("x = 1")
    old_pid = client.get_kernel(kernel.kernel_id).pid
    statuses = []
    kernel.on_status = statuses.append
    kernel.restart()
    model = client.get_kernel(kernel.kernel_id)
    assert model.id == kernel.kernel_id
    assert model.pid != old_pid
    assert "restarting" in statuses
    # the same websocket keeps working, and the namespace is fresh
    result = kernel.execute("'x' in dir()")
    assert result.result_text == "False"
    assert not kernel.closed
    # the old process is ended in the background; it goes within moments
    wait_for(lambda: not _alive(old_pid), timeout=10)


@pytest.mark.parametrize(
    ("code", "cause"),
    [
        ("import os; os._exit(3)", "exit code 3"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "SIGSEGV"),
    ],
)
def test_death_is_reported_with_its_cause(client, kernel, code, cause):
    other = client.create_kernel()
    dead_at = []
    kernel.on_status = lambda s: dead_at.append(time.monotonic()) if s == "dead" else None
    sent = time.monotonic()
    with pytest.raises(KernelDied) as info:
        kernel.execute(code, timeout=10)
    assert info.value.cause == cause
    assert kernel.dead_cause == cause
    assert dead_at and dead_at[0] - sent < 1.0
    model = client.get_kernel(kernel.kernel_id)
    assert model.execution_state == "dead"
    # the server keeps serving other kernels
    with client.connect(other.id) as k:
        assert k.execute("6 * 7").result_text == "42"
    client.delete_kernel(other.id)


def test_dead_kernel_can_be_restarted(kernel):
    with pytest.raises(KernelDied):
        kernel.execute("import os; os._exit(1)", timeout=10)
    kernel.restart()
    assert kernel.execute("1 + 1").result_text == "2"


def test_shutdown_ends_the_process(client):
    model = client.create_kernel()
    pid = client.get_kernel(model.id).pid
    client.delete_kernel(model.id)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("kernel process still alive after DELETE")
    assert model.id not in [k.id for k in client.list_kernels()]
