"""The nursery: a process that imports ipykernel once and forks kernels.

The server starts it with ``python -m cellmux.kernel.nursery`` (never by
forking the reactor process) and talks to it over its stdin and stdout, one
JSON object per line.

Commands (server -> nursery)::

    {"cmd": "spawn", "link": hex, "secret": hex, "endpoint": "ipc://…"}
                                          the endpoint is that kernel's own
    {"cmd": "signal", "link": hex, "signal": "SIGINT"}
    {"cmd": "kill", "link": hex}          SIGTERM the group, SIGKILL after a grace
    {"cmd": "shutdown"}                   kill every kernel and exit

Events (nursery -> server)::

    {"event": "ready", "pid": n}          preloading done
    {"event": "spawned", "link": hex, "pid": n}
    {"event": "exited", "link": hex, "pid": n, "cause": "exit code 3" | "SIGSEGV", …}
        with "limit": "cpu" | "memory" | "disk" | "file_size" when a limit
        ended it (the cause then names it: "cpu time limit (SIGXCPU)")
    {"event": "error", "message": str}    a command it could not carry out

The first line on stdin is the configuration (see L{NurseryConfig}).
The nursery has no threads, so forking it is safe; it reaps children on
SIGCHLD through a wake-up pipe, and when its stdin closes (the server is
gone) it kills every kernel and exits.

Isolation (uids, namespaces, limits) is L{cellmux.kernel.sandbox}'s job;
the nursery claims a uid per kernel, prepares its directories, checks their
disk use every L{DISK_CHECK_INTERVAL} seconds, and kills every process of
the uid when the kernel ends.
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
from collections.abc import Callable
from typing import Any

import attrs

from . import sandbox

__all__ = ["Nursery", "NurseryConfig", "describe_status", "main"]

#: Seconds between SIGTERM and SIGKILL when a kernel is shut down.
DEFAULT_KILL_GRACE = 1.0

#: Seconds between two measurements of each kernel's disk use.
DISK_CHECK_INTERVAL = 1.0

#: Modules a kernel imports during IPKernelApp.initialize beyond what
#: _preload imports anyway (found by diffing sys.modules; debugpy alone is
#: ~130 modules). None of them starts a thread on import.
KERNEL_INIT_MODULES = (
    "ipykernel.debugger",
    "IPython.core.completerlib",
    "IPython.core.debugger",
    "IPython.core.logger",
    "IPython.core.oinspect",
    "IPython.extensions.storemagic",
    "tornado.gen",
    "tornado.locks",
    "tornado.queues",
    "tornado.platform.asyncio",
    "sqlite3",
    "faulthandler",
    "runpy",
)


@attrs.frozen
class NurseryConfig:
    """What the server tells the nursery on its first stdin line."""

    endpoint: str
    workdir_root: str
    preload: tuple[str, ...] = ()
    kernel_env: dict[str, str] = attrs.Factory(dict)
    kill_grace: float = DEFAULT_KILL_GRACE
    sandbox: sandbox.SandboxConfig = attrs.Factory(sandbox.SandboxConfig)

    @classmethod
    def from_json(cls, line: bytes) -> NurseryConfig:
        data = json.loads(line)
        data["preload"] = tuple(data.get("preload", ()))
        data["sandbox"] = sandbox.SandboxConfig.from_dict(data.get("sandbox", {}))
        return cls(**data)

    @property
    def socket_dir(self) -> str:
        """The directory of the ipc link socket, which kernels must reach."""
        path = self.endpoint.removeprefix("ipc://")
        return os.path.dirname(path) if path != self.endpoint else self.workdir_root


def _share_link_endpoint(endpoint: str, identity: sandbox.Identity) -> None:
    """Let one kernel uid, and no other, connect to its link endpoint.

    The server made the endpoint's directory (mode 0700) and bound the
    socket in it; the kernel's gid may now pass through the directory (not
    list it) and connect to the socket, nobody else may.
    """
    path = endpoint.removeprefix("ipc://")
    door = os.path.dirname(path)
    os.chown(door, -1, identity.gid, follow_symlinks=False)
    os.chmod(door, 0o710)
    os.chown(path, -1, identity.gid, follow_symlinks=False)
    os.chmod(path, 0o660)


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
    scratch: str
    identity: sandbox.Identity | None = None
    cgroup: str | None = None
    kill_at: float | None = None
    #: A limit the nursery itself enforced on this kernel ("disk").
    limit: str | None = None


class Nursery:
    """The nursery's loop: commands in, forks and reaps, events out."""

    def __init__(self, config: NurseryConfig, commands, events) -> None:
        self.config = config
        self._commands = commands  # binary file: the server's pipe
        self._events = events  # binary file
        self._children: dict[str, _Child] = {}
        self._by_pid: dict[int, _Child] = {}
        # helper pid -> the cleanup to run once it has killed a uid's processes
        self._releasing: dict[int, Callable[[bool], None]] = {}
        self._stopping = False
        limits = config.sandbox.limits
        self._uids: sandbox.UidPool | None = None
        self._cgroups: sandbox.MemoryCgroups | None = None
        if sandbox.privileged():
            self._uids = sandbox.UidPool(*config.sandbox.uid_range)
            if limits.memory_mb:
                self._cgroups = sandbox.MemoryCgroups.detect()
        self._next_disk_check = time.monotonic() + DISK_CHECK_INTERVAL

    def emit(self, event: str, **fields: Any) -> None:
        self._events.write(json.dumps({"event": event, **fields}).encode() + b"\n")
        self._events.flush()

    # -- commands -----------------------------------------------------------

    def spawn(self, link: str, secret: str, endpoint: str | None = None) -> None:
        from .child import KernelOrder, run_kernel

        if link in self._children:
            self.emit("error", message=f"link {link} already exists", link=link)
            return
        settings = self.config.sandbox
        workdir = os.path.join(self.config.workdir_root, link)
        scratch = workdir + ".tmp"  # the kernel's /tmp
        identity = cgroup = None
        try:
            identity = self._uids.claim() if self._uids is not None else None
            for path in (workdir, scratch):
                os.makedirs(path, mode=0o700)
                if identity is not None:
                    os.chown(path, identity.uid, identity.gid)
            if self._cgroups is not None:
                cgroup = self._cgroups.create(link, settings.limits.memory_mb)
            if endpoint is not None and identity is not None:
                _share_link_endpoint(endpoint, identity)
        except OSError as e:
            self._release(workdir, scratch, identity, cgroup)
            self.emit("error", message=f"cannot prepare a kernel: {e}", link=link)
            return
        order = KernelOrder(
            link_id=bytes.fromhex(link),
            secret=bytes.fromhex(secret),
            endpoint=endpoint or self.config.endpoint,
            workdir=workdir,
            env=dict(self.config.kernel_env),
            sandbox=sandbox.KernelSandbox(
                identity=identity,
                network=settings.network,
                limits=settings.limits,
                scratch=scratch,
                keep=(
                    self.config.socket_dir,
                    self.config.workdir_root,
                    *sandbox.interpreter_paths(),
                ),
                cgroup=cgroup,
            ),
        )
        pid = os.fork()
        if pid == 0:  # the child never returns from run_kernel
            # main() pointed sys.stdout at stderr; a kernel's stdout is fd 1,
            # or ipykernel captures fd 2 twice and fd 1 output is lost.
            sys.stdout = sys.__stdout__
            run_kernel(order)
        child = _Child(link, pid, workdir, scratch, identity, cgroup)
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
                self.spawn(cmd["link"], cmd["secret"], cmd.get("endpoint"))
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
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            cleanup = self._releasing.pop(pid, None)
            if cleanup is not None:
                cleanup(os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0)
                continue
            child = self._by_pid.pop(pid, None)
            if child is None:
                continue  # an orphan of some kernel (we are their subreaper)
            del self._children[child.link]
            # The group may still hold the kernel's own children.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            info = sandbox.classify_exit(
                describe_status(status),
                self.config.sandbox.limits,
                cpu_used=usage.ru_utime + usage.ru_stime,
                flagged=child.limit,
                oom_kills=sandbox.MemoryCgroups.oom_kills(child.cgroup) if child.cgroup else 0,
            )
            self.emit("exited", link=child.link, pid=pid, **info)
            self._release(child.workdir, child.scratch, child.identity, child.cgroup)

    def _release(
        self,
        workdir: str,
        scratch: str,
        identity: sandbox.Identity | None,
        cgroup: str | None,
    ) -> None:
        """Free what a kernel held: its processes, files, cgroup and uid.

        With a uid, the processes are killed by a helper (see
        L{sandbox.kill_all_of}); the rest waits until it is reaped, so that
        no uid is handed out again while a process of it runs.
        """

        def cleanup(all_killed: bool) -> None:
            shutil.rmtree(workdir, ignore_errors=True)
            shutil.rmtree(scratch, ignore_errors=True)
            if cgroup is not None:
                sandbox.MemoryCgroups.remove(cgroup)
            if identity is None or self._uids is None:
                return
            if all_killed:
                self._uids.release(identity.uid)
            else:  # never hand out a uid that may still run something
                sandbox.warn(f"processes of uid {identity.uid} survived; uid kept out of use")

        if identity is None:
            cleanup(True)
        else:
            self._releasing[sandbox.kill_all_of(identity.uid, wait=False)] = cleanup

    def _check_disk(self) -> float | None:
        """Kill kernels over their disk or memory limit; when to check next, if ever.

        Memory is watched here only for kernels without a memory cgroup
        (which enforces it itself): the resident memory of the kernel's
        session, against limit_memory_mb.
        """
        limits = self.config.sandbox.limits
        if not limits.disk_mb and not limits.memory_mb:
            return None
        now = time.monotonic()
        if now >= self._next_disk_check:
            self._next_disk_check = now + DISK_CHECK_INTERVAL
            memory = sandbox.session_memory() if limits.memory_mb else {}
            for child in list(self._children.values()):
                if child.limit is not None:
                    continue
                disk = limits.disk_mb * 1024 * 1024
                ram = limits.memory_mb * 1024 * 1024
                if disk and sandbox.disk_usage([child.workdir, child.scratch], disk) > disk:
                    child.limit = "disk"
                elif ram and child.cgroup is None and memory.get(child.pid, 0) > ram:
                    child.limit = "memory"
                else:
                    continue
                self.kill(child.link)
        return self._next_disk_check

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
        while not (self._stopping and not self._children and not self._releasing):
            deadline = self._escalate()
            disk_check = self._check_disk() if self._children else None
            if disk_check is not None:
                deadline = disk_check if deadline is None else min(deadline, disk_check)
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

    from . import child, flowcontrol, interrupts, memory, sourcemap, tuning  # noqa: F401

    # What every kernel imports while it initialises: imported here, their
    # code and constants stay in pages shared by all kernels.
    for name in KERNEL_INIT_MODULES:
        with contextlib.suppress(ImportError):  # debugpy is optional
            importlib.import_module(name)
    for name in modules:
        importlib.import_module(name)
    # What IPython makes once per process, made here once for all kernels.
    try:
        memory.warm_ipython()
    except Exception as e:  # a saving, not a need: kernels make it themselves
        print(f"cellmux nursery: IPython warm-up skipped: {e!r}", file=sys.stderr)
    # Move everything imported so far out of the GC's reach, so forked
    # kernels do not touch (and copy) those pages when they collect.
    gc.collect()
    memory.record_module_files()
    gc.freeze()


def _python_paths() -> list[str]:
    """What kernels read when they import: the interpreter and its paths."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths.add(os.path.dirname(os.path.realpath(sys.executable)))
    paths.update(p for p in sys.path if p and os.path.isabs(p))
    return sorted(paths)


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
    if sandbox.privileged():
        # Kernels (other uids) must reach the link socket and their own
        # directories, but list nothing and enter no other kernel's directory.
        os.chmod(config.workdir_root, 0o711)
        sandbox.become_subreaper()
        needed = [config.socket_dir, config.workdir_root, *_python_paths()]
        try:
            warnings = sandbox.expose_to_kernels(needed)
        except OSError as e:
            # Fail closed: a root server that cannot isolate kernels must not
            # run them as root's half-sandboxed children.
            raise SystemExit(
                f"cellmux nursery: cannot isolate kernels ({e}); running as root needs "
                "CAP_SYS_ADMIN for namespaces (docs/security.md), or run as another user"
            ) from None
        for warning in warnings:
            sandbox.warn(warning)
    _preload(config.preload)
    Nursery(config, commands, events).run()


if __name__ == "__main__":
    main()
