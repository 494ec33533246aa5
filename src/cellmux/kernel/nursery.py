"""The nursery: a process that imports ipykernel once and forks kernels.

The server starts it with ``python -m cellmux.kernel.nursery`` (never by
forking the reactor process) and talks to it over its stdin and stdout, one
JSON object per line.

Commands (server -> nursery)::

    {"cmd": "spawn", "link": hex, "secret": hex}
    {"cmd": "signal", "link": hex, "signal": "SIGINT"}
    {"cmd": "kill", "link": hex}          SIGTERM the group, SIGKILL after a grace
    {"cmd": "shutdown"}                   kill every kernel and exit

Events (nursery -> server)::

    {"event": "ready", "pid": n}          preloading done
    {"event": "spawned", "link": hex, "pid": n}
    {"event": "exited", "link": hex, "pid": n, "cause": "exit code 3" | "SIGSEGV", …}
    {"event": "error", "message": str}    a command it could not carry out

The first line on stdin is the configuration (see L{NurseryConfig}).
The nursery has no threads, so forking it is safe; it reaps children on
SIGCHLD through a wake-up pipe, and when its stdin closes (the server is
gone) it kills every kernel and exits.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import selectors
import shutil
import signal
import sys
import time
from typing import Any

import attrs

__all__ = ["Nursery", "NurseryConfig", "describe_status", "main"]

#: Seconds between SIGTERM and SIGKILL when a kernel is shut down.
DEFAULT_KILL_GRACE = 1.0


@attrs.frozen
class NurseryConfig:
    """What the server tells the nursery on its first stdin line."""

    endpoint: str
    workdir_root: str
    preload: tuple[str, ...] = ()
    kernel_env: dict[str, str] = attrs.Factory(dict)
    kill_grace: float = DEFAULT_KILL_GRACE

    @classmethod
    def from_json(cls, line: bytes) -> NurseryConfig:
        data = json.loads(line)
        data["preload"] = tuple(data.get("preload", ()))
        return cls(**data)


def describe_status(status: int) -> dict[str, Any]:
    """How a child ended, from its waitpid status, for humans and clients."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return {"cause": name, "signal": sig}
    code = os.WEXITSTATUS(status)
    return {"cause": f"exit code {code}", "exit_code": code}


@attrs.define
class _Child:
    link: str
    pid: int
    workdir: str
    kill_at: float | None = None


class Nursery:
    """The nursery's loop: commands in, forks and reaps, events out."""

    def __init__(self, config: NurseryConfig, commands, events) -> None:
        self.config = config
        self._commands = commands  # binary file: the server's pipe
        self._events = events  # binary file
        self._children: dict[str, _Child] = {}
        self._by_pid: dict[int, _Child] = {}
        self._stopping = False

    def emit(self, event: str, **fields: Any) -> None:
        self._events.write(json.dumps({"event": event, **fields}).encode() + b"\n")
        self._events.flush()

    # -- commands -----------------------------------------------------------

    def spawn(self, link: str, secret: str) -> None:
        from .child import KernelOrder, run_kernel

        if link in self._children:
            self.emit("error", message=f"link {link} already exists", link=link)
            return
        workdir = os.path.join(self.config.workdir_root, link)
        os.makedirs(workdir, mode=0o700)
        order = KernelOrder(
            link_id=bytes.fromhex(link),
            secret=bytes.fromhex(secret),
            endpoint=self.config.endpoint,
            workdir=workdir,
            env=dict(self.config.kernel_env),
        )
        pid = os.fork()
        if pid == 0:  # the child never returns from run_kernel
            run_kernel(order)
        child = _Child(link, pid, workdir)
        self._children[link] = child
        self._by_pid[pid] = child
        self.emit("spawned", link=link, pid=pid)

    def signal(self, link: str, name: str) -> None:
        child = self._children.get(link)
        if child is None:
            self.emit("error", message=f"no kernel with link {link}", link=link)
            return
        try:
            sig = signal.Signals[name]
        except KeyError:
            self.emit("error", message=f"unknown signal {name}", link=link)
            return
        self._signal_group(child, sig)

    def kill(self, link: str) -> None:
        child = self._children.get(link)
        if child is None:
            return  # already gone: its exit event is on the way or sent
        self._signal_group(child, signal.SIGTERM)
        if child.kill_at is None:
            child.kill_at = time.monotonic() + self.config.kill_grace

    def _signal_group(self, child: _Child, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, sig)

    def handle(self, line: bytes) -> None:
        try:
            cmd = json.loads(line)
            name = cmd["cmd"]
            if name == "spawn":
                self.spawn(cmd["link"], cmd["secret"])
            elif name == "signal":
                self.signal(cmd["link"], cmd["signal"])
            elif name == "kill":
                self.kill(cmd["link"])
            elif name == "shutdown":
                self.stop()
            else:
                self.emit("error", message=f"unknown command {name!r}")
        except (ValueError, KeyError, TypeError, OSError) as e:
            self.emit("error", message=f"bad command: {e!r}")

    # -- children ---------------------------------------------------------

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self._by_pid.pop(pid, None)
            if child is None:
                continue
            del self._children[child.link]
            # The group may still hold the kernel's own children.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            shutil.rmtree(child.workdir, ignore_errors=True)
            self.emit("exited", link=child.link, pid=pid, **describe_status(status))

    def _escalate(self) -> float | None:
        """SIGKILL groups whose grace ran out; the next deadline, if any."""
        now = time.monotonic()
        deadline = None
        for child in self._children.values():
            if child.kill_at is None:
                continue
            if child.kill_at <= now:
                self._signal_group(child, signal.SIGKILL)
                child.kill_at = now + 1.0  # repeat until reaped
            deadline = child.kill_at if deadline is None else min(deadline, child.kill_at)
        return deadline

    def stop(self) -> None:
        self._stopping = True
        for link in list(self._children):
            self.kill(link)

    # -- loop -------------------------------------------------------------

    def run(self) -> None:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sel = selectors.DefaultSelector()
        commands_fd = self._commands.fileno()
        sel.register(commands_fd, selectors.EVENT_READ, "commands")
        sel.register(wake_r, selectors.EVENT_READ, "wake")
        buffer = b""
        self.emit("ready", pid=os.getpid())
        while not (self._stopping and not self._children):
            deadline = self._escalate()
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            for key, _ in sel.select(timeout):
                if key.data == "wake":
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake_r, 4096)
                    continue
                chunk = os.read(commands_fd, 65536)
                if not chunk:  # the server is gone: take every kernel with us
                    sel.unregister(commands_fd)
                    self.stop()
                    continue
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        self.handle(line)
            self.reap()


def _preload(modules: tuple[str, ...]) -> None:
    import ipykernel.ipkernel
    import ipykernel.kernelapp  # noqa: F401
    import IPython.core.interactiveshell  # noqa: F401
    import zmq  # noqa: F401

    from . import child  # noqa: F401

    for name in modules:
        importlib.import_module(name)
    # Move everything imported so far out of the GC's reach, so forked
    # kernels do not touch (and copy) those pages when they collect.
    gc.collect()
    gc.freeze()


def _read_line(fd: int) -> bytes:
    """One line from fd, unbuffered: later reads go straight to os.read."""
    line = bytearray()
    while not line.endswith(b"\n"):
        byte = os.read(fd, 1)
        if not byte:
            raise SystemExit("nursery: no configuration on stdin")
        line += byte
    return bytes(line)


def main() -> None:
    commands = sys.stdin.buffer
    events = sys.stdout.buffer
    # Kernels must never write into the event pipe by accident.
    sys.stdout = sys.stderr
    from .child import _die_with_parent

    _die_with_parent()
    config = NurseryConfig.from_json(_read_line(commands.fileno()))
    os.makedirs(config.workdir_root, mode=0o700, exist_ok=True)
    _preload(config.preload)
    Nursery(config, commands, events).run()


if __name__ == "__main__":
    main()
