"""A real Jupyter Server with --gateway-url runs its kernels on cellmux.

The tests start ``jupyter_server`` pointing at a real cellmux server (with
the gateway token) and drive the Jupyter Server's own REST and websocket
API, the way JupyterLab in a browser would.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import attrs
import pytest

from conftest import RunningServer, start_server
from ports import free_port
from test_jupyter_ws import LOOP, JupyterClient

START_TIMEOUT = 90


@attrs.define
class JupyterServer:
    process: subprocess.Popen
    url: str
    token: str
    log_path: str

    def request(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"token {self.token}", "Content-Type": "application/json"}
        req = urllib.request.Request(self.url.rstrip("/") + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=90) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            raw = e.read()
            return e.code, json.loads(raw) if raw else None

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


@pytest.fixture(scope="module")
def cellmux() -> Iterator[RunningServer]:
    running = start_server("--pool-size", "2")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def jupyter(cellmux: RunningServer) -> Iterator[JupyterServer]:
    home = tempfile.mkdtemp(prefix="cellmux-jupyter-")
    token = secrets.token_hex(16)
    port = free_port()
    env = dict(os.environ)
    for name in ("CONFIG", "DATA", "RUNTIME"):
        env[f"JUPYTER_{name}_DIR"] = os.path.join(home, name.lower())
    log_path = os.path.join(home, "jupyter.log")
    argv = [
        sys.executable,
        "-m",
        "jupyter_server",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        "--ServerApp.open_browser=False",
        "--ServerApp.allow_root=True",  # CI runs as root
        f"--ServerApp.root_dir={home}",
        f"--IdentityProvider.token={token}",
        f"--GatewayClient.url={cellmux.url.rstrip('/')}",
        f"--GatewayClient.auth_token={cellmux.token}",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = JupyterServer(process, f"http://127.0.0.1:{port}/", token, log_path)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"jupyter_server did not start: {server.log()[-3000:]}")
        with contextlib.suppress(OSError):
            if server.request("GET", "/api/status")[0] == 200:
                break
        time.sleep(0.2)
    yield server
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    shutil.rmtree(home, ignore_errors=True)


def test_kernelspecs_come_from_cellmux(jupyter):
    status, specs = jupyter.request("GET", "/api/kernelspecs")
    assert status == 200
    assert specs["default"] == "python3"
    assert specs["kernelspecs"]["python3"]["spec"]["display_name"] == "Python 3 (cellmux)"
    # the logo, fetched by the Jupyter Server from cellmux
    logo = specs["kernelspecs"]["python3"]["resources"]["logo-64x64"]
    req = urllib.request.Request(
        jupyter.url.rstrip("/") + logo, headers={"Authorization": f"token {jupyter.token}"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.read().startswith(b"\x89PNG")


def test_a_kernel_lives_its_whole_life_through_the_gateway(jupyter, cellmux):
    # start
    status, model = jupyter.request("POST", "/api/kernels", {"name": "python3"})
    assert status == 201, model
    kernel_id = model["id"]
    with cellmux.client() as native:
        assert kernel_id in [k.id for k in native.list_kernels()]
        pid = native.get_kernel(kernel_id).pid

    session = JupyterClient(jupyter, kernel_id, "legacy", session_id=uuid.uuid4().hex)
    try:
        # execute and read the output
        stdout, seen = session.execute("x = 20\nprint('through the gateway', x + 22)")
        assert stdout == "through the gateway 42\n"
        assert any(m["msg_type"] == "execute_reply" for m in seen)

        # answer input()
        stdout, _ = session.execute("print('got', input('name? '))", on_input=lambda p: "Ada")
        assert stdout == "got Ada\n"

        # interrupt a loop through the Jupyter Server's REST API
        msg_id = session.send("shell", "execute_request", LOOP)
        session.until(lambda m: m["msg_type"] == "execute_input")
        time.sleep(0.5)
        assert jupyter.request("POST", f"/api/kernels/{kernel_id}/interrupt", {})[0] == 204
        reply = session.until(
            lambda m: m["msg_type"] == "execute_reply" and m["parent_header"]["msg_id"] == msg_id
        )[-1]
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        stdout, _ = session.execute("print(x)")
        assert stdout == "20\n"

        # restart: same id, new process, fresh namespace, same websocket
        status, restarted = jupyter.request("POST", f"/api/kernels/{kernel_id}/restart", {})
        assert status == 200, restarted
        assert restarted["id"] == kernel_id
        with cellmux.client() as native:
            assert native.get_kernel(kernel_id).pid != pid
        stdout, _ = session.execute("print('x' in dir())")
        assert stdout == "False\n"
    finally:
        session.close()

    # the Jupyter Server reports the kernel as cellmux does
    status, listed = jupyter.request("GET", f"/api/kernels/{kernel_id}")
    assert status == 200
    assert listed["id"] == kernel_id

    # shut down
    assert jupyter.request("DELETE", f"/api/kernels/{kernel_id}")[0] == 204
    with cellmux.client() as native:
        assert kernel_id not in [k.id for k in native.list_kernels()]
    assert jupyter.request("GET", f"/api/kernels/{kernel_id}")[0] == 404


def test_cellmux_errors_reach_the_jupyter_server(jupyter):
    """Our status code comes back; our message is in the Jupyter Server's log.

    (jupyter_server puts its uninterpolated template in the body's message,
    so the log is where a gateway's own words end up.)
    """
    status, body = jupyter.request("POST", "/api/kernels", {"name": "julia-9"})
    assert status == 404
    assert body["message"].startswith("Error from Gateway")
    assert "no kernel spec named 'julia-9'" in jupyter.log()
