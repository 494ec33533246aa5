"""Drive a real nursery process directly over its pipes, as the server does."""

from __future__ import annotations

import json
import os
import queue
import secrets
import subprocess
import sys
import threading
import time

from cellmux.protocol import nursery as wire
from cellmux.server.nursery import nursery_command


class NurseryDriver:
    """A nursery started in / with a config line; its events in a queue.

    No server binds the link endpoint: kernels wait to connect, forever.
    """

    def __init__(self, runtime_dir: str, **config: object) -> None:
        self.runtime_dir = runtime_dir
        line = {
            "endpoint": f"ipc://{runtime_dir}/link.sock",
            "workdir_root": os.path.join(runtime_dir, "kernels"),
            "kernel_env": {
                "PYTHONUNBUFFERED": "1",
                "HOME": ".",
                "PYDEVD_DISABLE_FILE_VALIDATION": "1",
            },
            **config,
        }
        self.process = subprocess.Popen(
            nursery_command(os.environ.get("PYTHONPATH", "")),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd="/",
        )
        self.events: queue.Queue[wire.Event] = queue.Queue()
        self.seen: list[wire.Event] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.send_line(json.dumps(line).encode() + b"\n")
        self.pid = self.expect(wire.Ready, timeout=60).pid

    def _read(self) -> None:
        for line in self.process.stdout:
            self.events.put(wire.decode_event(line))

    def send_line(self, line: bytes) -> None:
        self.process.stdin.write(line)
        self.process.stdin.flush()

    def send(self, command: wire.Command) -> None:
        self.send_line(wire.encode(command))

    def next_event(self, timeout: float = 30) -> wire.Event:
        event = self.events.get(timeout=timeout)
        self.seen.append(event)
        return event

    def expect(self, kind: type, timeout: float = 30, **fields: object):
        """Wait for the next event of that kind (and fields); keep the others."""
        deadline = time.monotonic() + timeout
        while True:
            event = self.next_event(max(0.01, deadline - time.monotonic()))
            if isinstance(event, kind) and all(getattr(event, k) == v for k, v in fields.items()):
                return event

    def spawn(self) -> str:
        link = secrets.token_hex(8)
        self.send(wire.Spawn(link, secrets.token_hex(16)))
        return link

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            try:
                self.send(wire.Shutdown())
                self.process.stdin.close()
            except OSError:
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        while not self.events.empty():
            self.seen.append(self.events.get())
        return self.process.returncode


def alive(pid: int) -> bool:
    """Whether pid runs (a zombie does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def python() -> str:
    return sys.executable
