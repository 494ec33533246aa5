"""Fixtures that start real cellmux servers (real nursery, real kernels)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import attrs
import pytest
from hypothesis import HealthCheck, settings

from cellmux.client import Client

URL_LINE = re.compile(r"cellmux is serving at (?P<url>\S+)\?token=(?P<token>\S+)")
START_TIMEOUT = 60


@attrs.define
class RunningServer:
    """A cellmux server process started by a test."""

    process: subprocess.Popen
    url: str
    token: str
    runtime_dir: str
    log_path: str
    stdout_lines: list[str]

    def client(self, token: str | None = None) -> Client:
        return Client(self.url, token=self.token if token is None else token)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def rss(pid: int) -> int:
    """Resident memory of a process, in bytes (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def start_server(
    *args: str, command: list[str] | None = None, cwd: str | None = None
) -> RunningServer:
    """Start ``cellmux serve --port 0`` and wait for its URL line."""
    runtime_dir = tempfile.mkdtemp(prefix="cellmux-test-")
    token = secrets.token_hex(16)
    log_path = os.path.join(runtime_dir, "server.log")
    if command is None:
        command = [sys.executable, "-m", "cellmux", "serve"]
    argv = [
        *command,
        "--port",
        "0",
        "--token",
        token,
        "--runtime-dir",
        os.path.join(runtime_dir, "rt"),
        *([] if "--state-dir" in args else ["--state-dir", os.path.join(runtime_dir, "state")]),
        *args,
    ]
    log = open(log_path, "wb")  # noqa: SIM115 - the process owns it until it ends
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True, cwd=cwd)
    lines: list[str] = []
    found = threading.Event()
    result: dict[str, str] = {}

    def read_stdout() -> None:
        for line in process.stdout:
            lines.append(line)
            match = URL_LINE.search(line)
            if match and not found.is_set():
                result.update(match.groupdict())
                found.set()

    threading.Thread(target=read_stdout, daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT
    while not found.wait(0.1):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            with open(log_path, errors="replace") as f:
                raise RuntimeError(f"server did not start: {f.read()[-3000:]}")
    return RunningServer(process, result["url"], result["token"], runtime_dir, log_path, lines)


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    """Poll until predicate() is truthy; return its value or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


@pytest.fixture(scope="session")
def server() -> Iterator[RunningServer]:
    """One server shared by the tests that do not need their own."""
    running = start_server("--pool-size", "3", "--max-kernels", "120")
    yield running
    running.stop()


@pytest.fixture
def client(server: RunningServer) -> Iterator[Client]:
    with server.client() as c:
        yield c


@pytest.fixture
def kernel(client: Client):
    """A fresh kernel, attached; shut down afterwards."""
    model = client.create_kernel()
    with client.connect(model.id) as k:
        yield k
    with contextlib.suppress(Exception):
        client.delete_kernel(model.id)


# Kernel processes share these two cores with hypothesis: a slow draw is
# load, not a slow strategy, so neither the deadline nor that check apply.
settings.register_profile("cellmux", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("cellmux")


def run_async(coro):
    """asyncio.run() in a thread of its own.

    The main thread may already hold an event loop that other tests started
    (Playwright's sync API keeps one for the whole session), and asyncio.run
    refuses to nest.
    """
    outcome: dict[str, object] = {}

    def main() -> None:
        try:
            outcome["value"] = asyncio.run(coro)
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=main, name="run_async")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# -- the browser (tests/test_browser.py, test_jupyterlab.py, security/) ------
#
# One Chromium for the whole run, here so that every module shares it: a
# second sync_playwright() in the same thread refuses to start while the
# first one's loop runs.

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium, installed with apt-get when it is missing."""
    if not os.path.exists(CHROMIUM):
        subprocess.run(["apt-get", "update"], check=True, capture_output=True)
        subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
            check=True,
            capture_output=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    assert os.path.exists(CHROMIUM)
    return CHROMIUM


@pytest.fixture(scope="session")
def browser(chromium: str):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield b
        b.close()
