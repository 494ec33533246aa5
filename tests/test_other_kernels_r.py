"""The R kernel (Debian's r-cran-irkernel) served by cellmux behind the adaptor.

Root only: apt-get installs R and IRkernel, whose kernelspec lands in
/usr/share/jupyter/kernels/ir, where the server finds it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator

import pytest

import apt_packages
from cellmux.client import Client, Kernel, KernelDied
from conftest import start_server

IR_SPEC = "/usr/share/jupyter/kernels/ir/kernel.json"


def shown(result) -> list[str]:
    """What R printed as values (IRkernel sends them as display_data)."""
    return [d["text/plain"] for d in result.displays if "text/plain" in d]


@pytest.fixture(scope="module")
def irkernel() -> str:
    """Debian's IRkernel, installed with apt-get when it is missing."""
    apt_packages.ensure("r-cran-irkernel", lambda: IR_SPEC if os.path.exists(IR_SPEC) else None)
    return "ir"


@pytest.fixture(scope="module")
def server(irkernel):
    running = start_server("--pool-size", "0")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


@contextlib.contextmanager
def _r_kernel(client: Client, irkernel: str) -> Iterator[Kernel]:
    model = client.create_kernel(irkernel)
    try:
        with client.connect(model.id) as k:
            yield k
    finally:
        client.delete_kernel(model.id)


@pytest.fixture(scope="module")
def r(client: Client, irkernel: str) -> Iterator[Kernel]:
    """One R kernel for the tests that leave it as they found it: R starts
    cold (no nursery), several seconds each."""
    with _r_kernel(client, irkernel) as k:
        yield k


@pytest.fixture
def fresh_r(client: Client, irkernel: str) -> Iterator[Kernel]:
    """An R kernel of its own, for a test that restarts or kills it."""
    with _r_kernel(client, irkernel) as k:
        yield k


def test_r_is_offered_and_runs_code(client, r):
    model = client.get_kernel(r.kernel_id)
    assert model.name == "ir"
    result = r.execute('cat("hello from R\\n"); 6 * 7', timeout=60)
    assert result.ok, result
    assert result.stdout == "hello from R\n"
    assert shown(result) == ["[1] 42"]
    failed = r.execute('stop("no good")', timeout=60)
    assert failed.status == "error"
    assert "no good" in failed.error.evalue
    uid = shown(r.execute('as.integer(system("id -u", intern = TRUE))', timeout=60))[0]
    assert int(uid.split()[-1]) >= 200000  # a uid of its own


def test_r_display(r):
    result = r.execute('IRdisplay::display_html("<b>bold</b>")', timeout=60)
    assert result.ok, result
    assert any(d.get("text/html") == "<b>bold</b>" for d in result.displays), result.displays


def test_r_stdin(r):
    prompts = []

    def answer(prompt: str, password: bool) -> str:
        prompts.append(prompt)
        return "Ada"

    result = r.execute('name <- readline("name? "); cat("hi", name)', on_stdin=answer, timeout=60)
    assert result.ok, result
    assert prompts == ["name? "]
    assert result.stdout.endswith("hi Ada")


def test_a_busy_r_kernel_stays_busy(client, r):
    # IRkernel answers its heartbeat from its main loop, not while R runs.
    states = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            states.append(client.get_kernel(r.kernel_id).execution_state)
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert r.execute("Sys.sleep(6)", timeout=60).ok
    finally:
        done.set()
        watcher.join()
    assert "busy" in states and "unresponsive" not in states, states


def test_r_interrupt(client, r):
    outcome = {}
    running = threading.Event()

    def run() -> None:
        outcome["result"] = r.execute(
            'cat("sleeping\\n"); Sys.sleep(60); cat("not interrupted")',
            on_output=lambda output: running.set(),
            timeout=90,
        )

    thread = threading.Thread(target=run)
    started = time.monotonic()
    thread.start()
    # Once the code runs: IRkernel, like R itself, ends on a SIGINT that
    # lands outside the evaluation of the cell.
    assert running.wait(30)
    client.interrupt_kernel(r.kernel_id)
    thread.join(45)
    assert not thread.is_alive()
    assert time.monotonic() - started < 45
    assert "not interrupted" not in outcome["result"].stdout
    assert shown(r.execute("1 + 1", timeout=60)) == ["[1] 2"]


def test_r_restart_and_death(client, fresh_r):
    r = fresh_r
    assert r.execute("x <- 5", timeout=60).ok
    r.restart(timeout=90)
    assert shown(r.execute('exists("x")', timeout=60)) == ["[1] FALSE"]
    # (IRkernel turns quit() into a request to shut down, answered "ok".)
    with pytest.raises(KernelDied, match="SIGSEGV"):
        r.execute("tools::pskill(Sys.getpid(), 11L); Sys.sleep(5)", timeout=60)
    model = client.get_kernel(r.kernel_id)
    assert model.execution_state == "dead"
    assert model.raw["reason"] == "SIGSEGV"
