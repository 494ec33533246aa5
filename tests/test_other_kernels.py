"""Kernels that are not Python: bash_kernel (PyPI) served cold behind the adaptor.

Real kernelspecs, installed into a directory of the test's own and found by
the server through ``JUPYTER_PATH``; real kernels, real sockets. As root each
kernel runs in the sandbox under its own uid; the file passes as ``nobody``
too (run through tests/test_nonroot.py's wrapper), where kernels have none.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from cellmux.client import Client, KernelDied
from cellmux.server.kernelspecs import REFRESH_AFTER
from conftest import RunningServer, config_file, start_server, wait_for
from terminal_helpers import cellmux, cellmux_env, delete_named_kernels
from test_jupyter_rest import as_json, assert_error, http


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory) -> str:
    """A Jupyter data directory holding bash_kernel's kernelspec, and two
    more of the test's own (one interrupted by message, two that fail)."""
    prefix = tmp_path_factory.mktemp("kernelspecs")
    subprocess.run(
        [sys.executable, "-m", "bash_kernel.install", "--prefix", str(prefix)],
        check=True,
        capture_output=True,
    )
    kernels = prefix / "share" / "jupyter" / "kernels"
    spec = json.loads((kernels / "bash" / "kernel.json").read_text())
    by_message = kernels / "bash-message"
    shutil.copytree(kernels / "bash", by_message)
    (by_message / "kernel.json").write_text(
        json.dumps({**spec, "display_name": "Bash (message)", "interrupt_mode": "message"})
    )
    for name, argv in {
        "missing": ["/nonexistent/kernel", "{connection_file}"],
        "failing": ["sh", "-c", "echo the kernel cannot start >&2; exit 3", "{connection_file}"],
    }.items():
        (kernels / name).mkdir()
        (kernels / name / "kernel.json").write_text(
            json.dumps({"argv": argv, "display_name": name, "language": "none"})
        )
    # A kernel whose program lives next to its kernel.json, under the test's
    # /tmp: the sandbox (a private /tmp as root) must let it reach it.
    wrapped = kernels / "wrapped"
    wrapped.mkdir()
    start = wrapped / "start-kernel"
    start.write_text(f'#!/bin/sh\nexec {sys.executable} -m bash_kernel -f "$1"\n')
    start.chmod(0o755)
    (wrapped / "kernel.json").write_text(
        json.dumps(
            {
                "argv": ["{resource_dir}/start-kernel", "{connection_file}"],
                "display_name": "Bash (wrapped)",
                "language": "bash",
            }
        )
    )
    (kernels / "broken").mkdir()
    (kernels / "broken" / "kernel.json").write_text("{not json")
    return str(prefix / "share" / "jupyter")


@pytest.fixture(scope="module")
def server(jupyter_path) -> RunningServer:
    running = start_server(
        "--pool-size",
        "1",
        "--config",
        config_file("idle_ping_interval = 1\nallow_request_startup = true"),
        env={"JUPYTER_PATH": jupyter_path},
    )
    yield running
    running.stop()


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c


@pytest.fixture
def bash(client: Client):
    model = client.create_kernel("bash")
    with client.connect(model.id) as k:
        yield k
    client.delete_kernel(model.id)


def test_installed_kernelspecs_are_offered_beside_python3(server):
    status, _, raw = http(server, "GET", "/api/kernelspecs")
    assert status == 200
    specs = as_json(raw)
    assert specs["default"] == "python3"
    assert specs["kernelspecs"]["python3"]["spec"]["display_name"] == "Python 3 (cellmux)"
    bash = specs["kernelspecs"]["bash"]
    assert bash["spec"]["display_name"] == "Bash"
    assert bash["spec"]["language"] == "bash"
    assert bash["spec"]["argv"] == []  # only the server starts kernels
    assert bash["spec"]["interrupt_mode"] == "signal"
    assert specs["kernelspecs"]["bash-message"]["spec"]["interrupt_mode"] == "message"
    assert "broken" not in specs["kernelspecs"]  # unreadable: left out, and logged
    assert "kernelspec broken is not offered" in server.log()
    logo = bash["resources"]["logo-svg"]
    status, _, raw = http(server, "GET", logo)
    assert status == 200 and raw.startswith(b"<")
    assert_error(*http(server, "GET", "/kernelspecs/bash/kernel.json"), 404)


def test_a_kernelspec_installed_while_the_server_runs_is_offered(server, jupyter_path):
    new = os.path.join(jupyter_path, "kernels", "late")
    shutil.copytree(os.path.join(jupyter_path, "kernels", "bash"), new)
    time.sleep(REFRESH_AFTER)  # the list read by the test before is stale by now
    try:
        status, _, raw = http(server, "GET", "/api/kernelspecs/late")
        assert status == 200
        assert as_json(raw)["spec"]["display_name"] == "Bash"
    finally:
        shutil.rmtree(new)


def test_bash_runs_code_as_a_cellmux_kernel(client, bash):
    model = client.get_kernel(bash.kernel_id)
    assert model.name == "bash"
    assert model.execution_state == "idle"
    result = bash.execute("echo hello from bash; echo $((6 * 7))", timeout=30)
    assert result.ok, result
    assert result.stdout == "hello from bash\n42\n"
    failed = bash.execute("false", timeout=30)
    assert failed.status == "error"
    if os.geteuid() == 0:  # sandboxed: a uid of its own, no network
        uid = bash.execute("id -u", timeout=30).stdout.strip()
        assert int(uid) >= 200000
        net = bash.execute("cat /proc/net/dev | grep -c :", timeout=30).stdout.strip()
        assert net == "1"  # loopback only


def test_a_kernel_whose_program_is_in_its_kernelspec_directory_starts(client):
    model = client.create_kernel("wrapped")
    try:
        with client.connect(model.id) as kernel:
            assert kernel.execute("echo wrapped", timeout=30).stdout == "wrapped\n"
    finally:
        client.delete_kernel(model.id)


def test_bash_display_data(bash):
    result = bash.execute("echo '<b>bold</b>' | displayHTML", timeout=30)
    assert result.ok, result
    assert result.displays == [{"text/html": "<b>bold</b>\n"}] or any(
        "<b>bold</b>" in d.get("text/html", "") for d in result.displays
    )


def _interrupt_while_sleeping(client: Client, kernel) -> None:
    outcome = {}
    running = threading.Event()

    def run() -> None:
        outcome["result"] = kernel.execute(
            "echo sleeping; sleep 60; echo not interrupted",
            on_output=lambda output: running.set(),
            timeout=60,
        )

    thread = threading.Thread(target=run)
    started = time.monotonic()
    thread.start()
    assert running.wait(30)  # the code runs
    # Not at the very moment bash_kernel sends that output: a SIGINT inside
    # ipykernel's send path can leave the kernel unable to send again (in
    # Jupyter as here); by now it waits for the sleep.
    time.sleep(1)
    client.interrupt_kernel(kernel.kernel_id)
    thread.join(30)
    assert not thread.is_alive()
    assert time.monotonic() - started < 30
    result = outcome["result"]
    assert result.stdout.strip() == "sleeping"  # bash echoes the ^C line as a newline
    assert result.status == "abort"
    assert kernel.execute("echo after", timeout=30).stdout == "after\n"


def test_interrupt_by_signal(client, bash):
    _interrupt_while_sleeping(client, bash)


def test_interrupt_by_message(client):
    model = client.create_kernel("bash-message")
    try:
        with client.connect(model.id) as kernel:
            _interrupt_while_sleeping(client, kernel)
    finally:
        client.delete_kernel(model.id)


def test_restart_keeps_the_id_and_starts_afresh(client, bash):
    assert bash.execute("export CELLMUX_X=5", timeout=30).ok
    before = client.get_kernel(bash.kernel_id)
    bash.restart(timeout=60)
    after = client.get_kernel(bash.kernel_id)
    assert after.pid != before.pid
    assert after.name == "bash"
    assert bash.execute("echo ${CELLMUX_X:-unset}", timeout=30).stdout == "unset\n"


def test_death_is_reported_with_the_kernels_own_cause(client, bash):
    # bash's parent is bash_kernel, the kernel process itself.
    with pytest.raises(KernelDied, match="SIGSEGV"):
        bash.execute("kill -SEGV $PPID; sleep 5", timeout=30)
    model = wait_for(
        lambda: (m := client.get_kernel(bash.kernel_id)).execution_state == "dead" and m, 30
    )
    assert model.raw["reason"] == "SIGSEGV"


def test_a_kernel_whose_heartbeat_stops_is_unresponsive_until_it_answers(client, bash):
    # A job of the kernel's own stops the idle kernel process (its heartbeat
    # thread too) for 8 s, then lets it go on. Idle kernels are pinged every
    # idle_ping_interval (1 s for this server).
    code = "(sleep 0.5; kill -STOP $PPID; sleep 8; kill -CONT $PPID) >/dev/null 2>&1 &"
    assert bash.execute(code, timeout=30).ok
    states = []

    def state() -> str:
        states.append(client.get_kernel(bash.kernel_id).execution_state)
        return states[-1]

    wait_for(lambda: state() == "unresponsive", 8, 0.2)
    wait_for(lambda: state() == "idle", 15, 0.2)
    assert "back\n" in bash.execute("echo back", timeout=30).stdout  # and a job notice


@pytest.mark.parametrize(
    ("name", "logged"),
    [
        ("missing", "cannot start kernel 'missing' (/nonexistent/kernel)"),
        ("failing", "ended while starting (exit code 3):\nthe kernel cannot start"),
    ],
)
def test_a_kernel_that_cannot_start_says_why(server, name, logged):
    body = assert_error(*http(server, "POST", "/api/kernels", {"name": name}), 500)
    assert "the kernel ended while starting: exit code" in body["message"]
    assert logged in server.log()


def test_start_up_code_is_refused_for_a_kernel_that_is_not_python(server):
    # It is Python (env, kernel_startup, public limits): it cannot apply.
    body = assert_error(
        *http(server, "POST", "/api/kernels", {"name": "bash", "startup": "x = 1"}), 400
    )
    assert "kernel spec 'bash' cannot run start-up code" in body["message"]
    with server.client() as client:
        assert [k for k in client.list_kernels() if k.name == "bash"] == []


def test_an_unknown_spec_is_404(server):
    body = assert_error(*http(server, "POST", "/api/kernels", {"name": "cobol"}), 404)
    assert "no kernel spec named 'cobol'" in body["message"]


def test_cellmux_run_starts_a_kernel_of_the_spec_its_name_or_spec_names(server, tmp_path):
    state = tmp_path / "state"
    env = cellmux_env(server, state)
    script = tmp_path / "hello.sh"
    script.write_text("echo from a $(basename $0) kernel\n")
    try:
        first = cellmux(env, "run", str(script), "--kernel", "bash")
        assert first.returncode == 0, first.stderr
        assert first.stdout == "from a bash kernel\n"
        assert "started kernel" in first.stderr and "(bash) as 'bash'" in first.stderr
        named = cellmux(env, "run", str(script), "--kernel", "shell", "--spec", "bash")
        assert named.returncode == 0, named.stderr
        assert named.stdout == "from a bash kernel\n"
        again = cellmux(env, "run", str(script), "--kernel", "shell", "--spec", "bash")
        assert again.returncode == 0 and "started" not in again.stderr
        wrong = cellmux(env, "run", str(script), "--kernel", "shell", "--spec", "python3")
        assert wrong.returncode == 2
        assert wrong.stderr.strip() == (
            "cellmux: kernel 'shell' runs bash, not python3; name another --kernel for a new one"
        )
        unknown = cellmux(env, "run", str(script), "--kernel", "other", "--spec", "cobol")
        assert unknown.returncode == 3
        assert "no kernel spec named 'cobol'" in unknown.stderr
    finally:
        delete_named_kernels(server, state)
