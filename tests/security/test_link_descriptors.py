"""Out of file descriptors: the server refuses new work clearly and lives.

A server started with a small RLIMIT_NOFILE (256 soft, 512 hard, through
``prlimit``) is sent hundreds of idle TCP connections on loopback. It raises
its soft limit to the hard one at start, answers the connections beyond its
headroom with a 503 JSON body (or closes them), still starts a kernel asked
for over a connection it had accepted, and serves normally again once the
idle connections close. Before, libzmq aborted the server on the next
kernel link it accepted.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import resource
import selectors
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from conftest import start_server, wait_for

IDLE_CONNECTIONS = 700


def _limits(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no open files line")


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _read_answer(conn: socket.socket) -> bytes:
    """What the server sent before closing (b"" if nothing or a reset)."""
    data = b""
    with contextlib.suppress(OSError):
        while chunk := conn.recv(65536):
            data += chunk
    return data


def test_idle_connections_near_the_limit_get_503_and_kernels_still_start():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < IDLE_CONNECTIONS + 200:  # the test's own side of the connections
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, IDLE_CONNECTIONS + 200), hard))
    server = start_server(
        "--pool-size",
        "0",
        "--max-kernels",
        "4",
        command=["prlimit", "--nofile=256:512", sys.executable, "-m", "cellmux", "serve"],
    )
    try:
        _flood_then_create(server)
        _recovers(server)
    finally:
        assert server.stop() == 0
        shutil.rmtree(server.runtime_dir, ignore_errors=True)


def _flood_then_create(server) -> None:
    idle: list[socket.socket] = []
    kept = None
    try:
        pid = server.process.pid
        assert _limits(pid) == (512, 512)
        assert "open files limit raised from 256 to 512" in server.log()
        host, port = urlsplit(server.url).hostname, urlsplit(server.url).port
        auth = {"Authorization": f"token {server.token}"}
        # A client that connected before the flood keeps its connection.
        kept = http.client.HTTPConnection(host, port, timeout=30)
        kept.request("GET", "/api/kernels", headers=auth)
        assert kept.getresponse().read() == b"[]"

        for _ in range(IDLE_CONNECTIONS):
            idle.append(socket.create_connection((host, port), timeout=10))
        time.sleep(2.0)  # the server accepts, answers or drops each one
        assert server.alive()
        used = _open_fds(pid)
        assert used < 512 - 60, used  # the reserve was kept

        # A new request is told why, in JSON.
        request = urllib.request.Request(
            server.url + "api/kernels", data=b"{}", headers=auth, method="POST"
        )
        try:
            urllib.request.urlopen(request, timeout=30)
            raise AssertionError("a kernel was created past the limit")
        except urllib.error.HTTPError as e:
            assert e.code == 503
            body = json.loads(e.read())
            assert body["code"] == "out_of_descriptors"
            assert "open files limit" in body["message"]
        # Some idle connections were answered the same way rather than dropped.
        answered = 0
        with selectors.DefaultSelector() as readable:
            for conn in idle:
                readable.register(conn, selectors.EVENT_READ)
            for key, _ in readable.select(timeout=1.0):
                key.fileobj.settimeout(1.0)
                if b" 503 " in _read_answer(key.fileobj)[:20]:
                    answered += 1
        assert answered > 0

        # Kernels still start: the room for them was kept from HTTP.
        kept.request("POST", "/api/kernels", body=b"{}", headers=auth)
        response = kept.getresponse()
        model = json.loads(response.read())
        assert response.status == 201, model
        assert model["execution_state"] == "idle"
        assert server.alive()
    finally:
        for conn in idle:
            conn.close()
        if kept is not None:
            kept.close()


def _recovers(server) -> None:
    """Once the connections are gone, everything works again."""

    def serves() -> bool:
        try:
            with server.client() as c:
                c.list_kernels()
            return True
        except Exception:
            return False

    wait_for(serves, timeout=30, interval=0.2)
    with server.client() as client:
        model = client.create_kernel()
        with client.connect(model.id) as kernel:
            assert kernel.execute("1 + 1", timeout=60).result_text == "2"
    log = server.log()
    # Refusals were logged in sums, not one line per connection.
    assert "HTTP connections: refused" in log
    assert log.count("HTTP connections: refused") < 10
    assert "Could not accept new connection" not in log
