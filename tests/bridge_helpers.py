"""Running ``cellmux bridge`` for a test, and a TCP proxy whose connections a test can cut."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from jupyter_client import BlockingKernelClient

from conftest import wait_for


class BridgeProcess:
    """``cellmux bridge NAME --connection-file PATH`` as a subprocess."""

    def __init__(self, env: dict[str, str], name: str, path: Path, *extra: str) -> None:
        self.path = path
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cellmux",
                "bridge",
                name,
                "--connection-file",
                str(path),
                *extra,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        self.stdout = ""
        self.stderr = ""

    def wait_ready(self, timeout: float = 60) -> dict:
        """The connection file, once the bridge wrote it."""
        wait_for(lambda: self.path.exists() or self.process.poll() is not None, timeout)
        if not self.path.exists():
            self.finish()
            raise AssertionError(f"the bridge ended: {self.stderr}")
        return json.loads(self.path.read_text())

    def client(self) -> BlockingKernelClient:
        """A started jupyter_client blocking client on the bridge."""
        kc = BlockingKernelClient(connection_file=str(self.path))
        kc.load_connection_file()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        return kc

    def kernel_id(self) -> str:
        line = self.stdout_line()
        return line.split("kernel ", 1)[1].split()[0]

    def stdout_line(self) -> str:
        if not self.stdout:
            self.stdout = self.process.stdout.readline()
        return self.stdout

    def finish(self, timeout: float = 30) -> int:
        """Stop it (SIGTERM) if it runs; its exit status."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            out, err = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, err = self.process.communicate()
        self.stdout += out
        self.stderr += err
        return self.process.returncode


def bridge_env(server, state_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(CELLMUX_URL=server.url, CELLMUX_TOKEN=server.token, XDG_STATE_HOME=str(state_dir))
    env.update(extra)
    return env


def jupyter_env(base: dict[str, str], home: Path) -> dict[str, str]:
    """Jupyter and IPython with every directory of theirs under C{home}."""
    return {
        **base,
        "HOME": str(home),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTER_DATA_DIR": str(home / "data"),
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "IPYTHONDIR": str(home / "ipython"),
        "JUPYTER_PLATFORM_DIRS": "1",
    }


def collect_execution(kc: BlockingKernelClient, msg_id: str, timeout: float = 120) -> tuple:
    """(stdout text, iopub messages, execute_reply) of one execution."""
    deadline = time.monotonic() + timeout
    messages = []
    idle = False
    while not idle:
        assert time.monotonic() < deadline, "the execution did not end in time"
        msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        messages.append(msg)
        idle = msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle"
    reply = kc.get_shell_msg(timeout=30)
    assert reply["parent_header"]["msg_id"] == msg_id
    stdout = "".join(
        m["content"]["text"]
        for m in messages
        if m["msg_type"] == "stream" and m["content"]["name"] == "stdout"
    )
    return stdout, messages, reply


class TcpProxy:
    """Forwards 127.0.0.1:port to a target; L{cut} resets every connection open now."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self.connections = 0
        self._cut: set[socket.socket] = set()
        self._down_until = 0.0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            if time.monotonic() < self._down_until:  # the network is still down
                downstream.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                downstream.close()
                continue
            with self._lock:
                self._open += [downstream, upstream]
                self.connections += 1
            for a, b in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        if source in self._cut:
            return  # cut() resets it
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self, down_for: float = 0.0) -> int:
        """Reset (RST, not FIN) every open connection, and refuse new ones for
        C{down_for} seconds; how many were open.

        Data on its way in either direction is lost, as when a network drops.
        """
        self._down_until = time.monotonic() + down_for
        with self._lock:
            victims, self._open = self._open, []
        self._cut.update(victims)
        for s in victims:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RD)  # wakes the pumps' recv
        for s in victims:
            s.close()
        return len(victims) // 2

    def close(self) -> None:
        self.listener.close()
        self.cut()
