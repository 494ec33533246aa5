"""Start the systems under test as real processes: cellmux, jupyter_server
(as shipped, and with its iopub rate limits off) and a stock ipykernel."""

from __future__ import annotations

import contextlib
import glob
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from typing import Any

import attrs

__all__ = ["FloorKernel", "Server", "start_cellmux", "start_jupyter"]

_URL_LINE = re.compile(r"cellmux is serving at (?P<url>\S+)\?token=")


@attrs.define
class Server:
    """A server process and how to reach it."""

    kind: str  #: "cellmux" or "jupyter"
    process: subprocess.Popen
    url: str
    token: str
    workdir: str

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, Any]:
        """One blocking HTTP call, the same code for both servers."""
        parsed = urllib.parse.urlsplit(self.url)
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=120)
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {"Authorization": f"token {self.token}"}
            if data is not None:
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
            return response.status, (json.loads(raw) if raw else None)
        finally:
            conn.close()

    def create_kernel(self, name: str = "python3") -> dict[str, Any]:
        status, model = self.request("POST", "/api/kernels", {"name": name})
        if status != 201:
            raise RuntimeError(f"{self.kind}: create kernel answered {status}: {model}")
        return model

    def delete_kernel(self, kernel_id: str) -> None:
        self.request("DELETE", f"/api/kernels/{kernel_id}")

    def pool_ready(self) -> int:
        return self.request("GET", "/api/status")[1]["pool"]["ready"]

    def pool_settled(self, ready: int) -> bool:
        """At least C{ready} kernels pooled, and none still starting: a
        start measured then shares the machine with no refilling."""
        pool = self.request("GET", "/api/status")[1]["pool"]
        return pool["ready"] >= ready and not pool.get("starting")

    def wait_pool(self, ready: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.pool_settled(ready):
            if time.monotonic() > deadline:
                raise RuntimeError("the warm pool did not refill")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # A stopped server's directory holds nothing anyone needs (a failed
        # start keeps its log: start_cellmux raises before it returns one).
        shutil.rmtree(self.workdir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cellmux(*args: str, own_session: bool = False) -> Server:
    """A cellmux server; with C{own_session}, leading a session of its own
    as under systemd (its server_nice then applies: server/priority.py)."""
    workdir = tempfile.mkdtemp(prefix="cellmux-bench-")
    token = secrets.token_hex(16)
    argv = [sys.executable, "-m", "cellmux", "serve", "--port", "0", "--token", token]
    argv += ["--runtime-dir", os.path.join(workdir, "rt"), *args]
    log = open(os.path.join(workdir, "server.log"), "wb")  # noqa: SIM115 - owned by the process
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=own_session
    )
    found: dict[str, str] = {}
    event = threading.Event()

    def read() -> None:
        for line in process.stdout:
            match = _URL_LINE.search(line)
            if match and not event.is_set():
                found["url"] = match["url"]
                event.set()

    threading.Thread(target=read, daemon=True).start()
    if not event.wait(60):
        process.kill()
        raise RuntimeError(f"cellmux did not start; see {workdir}/server.log")
    return Server("cellmux", process, found["url"].rstrip("/"), token, workdir)


def start_jupyter(rate_limits: bool = True) -> Server:
    """jupyter_server with its defaults (or with limit_rate off)."""
    workdir = tempfile.mkdtemp(prefix="jupyter-bench-")
    token = secrets.token_hex(16)
    port = _free_port()
    argv = [
        sys.executable,
        "-m",
        "jupyter_server",
        f"--port={port}",
        "--ip=127.0.0.1",
        "--no-browser",
        "--allow-root",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={workdir}",
    ]
    if not rate_limits:
        argv.append("--ZMQChannelsWebsocketConnection.limit_rate=False")
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=os.path.join(workdir, "runtime"))
    log = open(os.path.join(workdir, "server.log"), "wb")  # noqa: SIM115 - owned by the process
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = Server("jupyter", process, f"http://127.0.0.1:{port}", token, workdir)
    deadline = time.monotonic() + 60
    while True:
        try:
            if server.request("GET", "/api")[0] == 200:
                return server
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"jupyter_server did not start; see {workdir}/server.log")
        time.sleep(0.1)


@attrs.define
class FloorKernel:
    """A stock ipykernel on TCP, started the way Jupyter starts it."""

    manager: Any
    info: dict[str, Any]

    @classmethod
    def start(cls) -> FloorKernel:
        from jupyter_client.manager import KernelManager

        manager = KernelManager(kernel_name="python3")
        manager.start_kernel()
        return cls(manager, manager.get_connection_info(session=False))

    @property
    def pid(self) -> int:
        return self.manager.provisioner.pid

    def stop(self) -> None:
        self.manager.shutdown_kernel(now=True)


def wakeups(pids: list[int]) -> int:
    """Times the threads of the processes went to sleep so far (voluntary
    context switches of every thread: /proc/PID/status has the first's)."""
    total = 0
    for pid in pids:
        for status in glob.glob(f"/proc/{pid}/task/*/status"):
            with contextlib.suppress(OSError), open(status) as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        total += int(line.split()[1])
    return total
