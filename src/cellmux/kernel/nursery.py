"""The nursery: a process that imports ipykernel once and forks kernels.

The server starts it with ``python -I -m cellmux.kernel.nursery`` in ``/``
(never by forking the reactor process): isolated, so that nothing from the
server's working directory or environment is imported by root's nursery or
reaches kernels. It talks to the server over its stdin and stdout, one
JSON object per line: L{cellmux.protocol.nursery} is the protocol.

The first line on stdin is the configuration (see L{NurseryConfig}).
The nursery has no threads, so forking it is safe; it reaps children on
SIGCHLD through a wake-up pipe, and when its stdin closes (the server is
gone) it kills every kernel and exits.

Nothing a command, a reap or a cleanup does may end the nursery (all
kernels would die with it): each unit of work is guarded, and a failure
becomes an "error" event and a log line.

Isolation (uids, namespaces, limits) is L{cellmux.kernel.sandbox}'s job;
the nursery claims a uid per kernel, prepares its directories, checks their
disk use every L{DISK_CHECK_INTERVAL} seconds, and when the kernel ends,
kills every process of the uid and removes its directories in a helper
process (L{cellmux.kernel.reclaim}), and only then frees the uid. As root, it
also sweeps the uid range when it starts and when it stops: processes of
uids no live nursery holds were left behind by a crash, and are killed.
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

from ..protocol import nursery as protocol
from ..protocol.errors import ProtocolError
from . import memory, sandbox
from .reclaim import reclaim

__all__ = ["Nursery", "NurseryConfig", "describe_status", "main"]

DEFAULT_KILL_GRACE = protocol.DEFAULT_KILL_GRACE
DISK_CHECK_INTERVAL = protocol.DISK_CHECK_INTERVAL

#: Seconds a stopping nursery waits for its cleanup before it exits anyway
#: (beyond the kill grace); what is left, the server removes with its
#: runtime directory.
STOP_CLEANUP_TIME = protocol.STOP_CLEANUP_TIME

#: Seconds a helper may spend removing one kernel's files; what is left
#: then is moved out of the way (see L{cellmux.kernel.reclaim}).
RECLAIM_TIME = 600.0

#: Name of the directory under the kernels' root where trees that could
#: not be removed are moved (see L{cellmux.kernel.reclaim}).
QUARANTINE = ".quarantine"

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
    #: Directories kernels of other kernelspecs must reach (their programs).
    kernel_paths: tuple[str, ...] = ()
    #: Offer Python kernels' pages to KSM (``kernel_page_merging``; see
    #: L{memory.offer_pages_for_merging}).
    merge_pages: bool = False

    @classmethod
    def from_json(cls, line: bytes) -> NurseryConfig:
        data = json.loads(line)
        data["preload"] = tuple(data.get("preload", ()))
        data["kernel_paths"] = tuple(
            p for p in data.get("kernel_paths", ()) if _reachable_for_kernels(p)
        )
        data["sandbox"] = sandbox.SandboxConfig.from_dict(data.get("sandbox", {}))
        return cls(**data)

    @property
    def socket_dir(self) -> str:
        """The directory of the ipc link socket, which kernels must reach."""
        path = self.endpoint.removeprefix("ipc://")
        return os.path.dirname(path) if path != self.endpoint else self.workdir_root


def _reachable_for_kernels(path: str) -> bool:
    """Whether a kernelspec's directory may be made reachable in kernels'
    sandboxes: absolute, changed only by root or the server's user, and
    neither a shared writable directory (/tmp) nor above one (it would bring
    the host's /tmp back into a kernel's private one)."""
    if not os.path.isabs(path) or not sandbox.trusted_dir(path):
        return False
    top = path.rstrip(os.sep) + os.sep
    return not any(
        shared == path or shared.startswith(top) for shared in sandbox.SHARED_WRITABLE_DIRS
    )


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
        # helper pid -> what to do with its exit code once it is reaped
        self._releasing: dict[int, Callable[[int], None]] = {}
        self._quarantine = os.path.join(config.workdir_root, QUARANTINE)
        self._stopping = False
        self._stop_by: float | None = None
        self._swept_at_stop = False
        self._events_lost = False
        limits = config.sandbox.limits
        self._uids: sandbox.UidPool | None = None
        self._cgroups: sandbox.MemoryCgroups | None = None
        if sandbox.privileged():
            self._uids = sandbox.UidPool(*config.sandbox.uid_range)
            problem = self._uids.lock_dir_problem
            if problem:
                self._warn(
                    f"kernel uids are held by abstract sockets only ({problem}):"
                    " a server in another network namespace may use the same uids"
                )
            if limits.memory_mb:
                self._cgroups = sandbox.MemoryCgroups.detect()
        self._next_disk_check = time.monotonic() + DISK_CHECK_INTERVAL

    def emit(self, event: protocol.Event) -> None:
        """Send an event; never raises (a server gone means: stop)."""
        if self._events_lost:
            return
        try:
            self._events.write(protocol.encode(event))
            self._events.flush()
        except (OSError, ValueError, ProtocolError) as e:
            self._events_lost = True
            sandbox.warn(f"cannot send events to the server ({e!r}); stopping")
            self.stop()

    def _warn(self, message: str) -> None:
        sandbox.warn(message)

    def _guarded(
        self, what: str, work: Callable[..., Any], *args: Any, link: str | None = None
    ) -> None:
        """Run one unit of work; a failure is reported, never raised."""
        try:
            work(*args)
        except Exception as e:
            message = f"{what} failed: {type(e).__name__}: {e}"
            self._warn(message)
            self.emit(protocol.Error(message, link))

    # -- commands -----------------------------------------------------------

    def spawn(
        self,
        link: str,
        secret: str,
        endpoint: str | None = None,
        cwd: str | None = None,
        kernel: dict[str, Any] | None = None,
    ) -> None:
        from .adaptor import Launch, run_adaptor
        from .child import KernelOrder, run_kernel

        if link in self._children:
            self.emit(protocol.Error(f"link {link} already exists", link))
            return
        if self._stopping:
            self.emit(protocol.Error("the nursery is stopping", link))
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
            self.emit(protocol.Error(f"cannot prepare a kernel: {e}", link))
            return
        order = KernelOrder(
            link_id=bytes.fromhex(link),
            secret=bytes.fromhex(secret),
            endpoint=endpoint or self.config.endpoint,
            workdir=workdir,
            cwd=self._working_dir(cwd),
            env={**self._scratch_env(scratch), **self.config.kernel_env},
            sandbox=sandbox.KernelSandbox(
                identity=identity,
                network=settings.network,
                limits=settings.limits,
                scratch=scratch,
                keep=(
                    self.config.socket_dir,
                    self.config.workdir_root,
                    *sandbox.interpreter_paths(),
                    *self._shared_paths(),
                    *self.config.kernel_paths,
                ),
                cgroup=cgroup,
                shared_root=settings.shared_root,
                shared_writable=settings.shared_root_writable,
            ),
            merge_pages=self.config.merge_pages,
        )

        launch = Launch.from_dict(kernel) if kernel is not None else None

        def become_kernel() -> None:
            # main() pointed sys.stdout at stderr; a kernel's stdout is fd 1,
            # or ipykernel captures fd 2 twice and fd 1 output is lost.
            sys.stdout = sys.__stdout__
            if launch is None:
                run_kernel(order)
            else:  # another kernelspec: started cold behind the adaptor
                run_adaptor(order, launch)

        try:
            pid = sandbox.fork_with_signals_reset(become_kernel)
        except OSError as e:
            self._release(workdir, scratch, identity, cgroup)
            self.emit(protocol.Error(f"cannot fork a kernel: {e}", link))
            return
        child = _Child(link, pid, workdir, scratch, identity, cgroup)
        self._children[link] = child
        self._by_pid[pid] = child
        self.emit(protocol.Spawned(link, pid))

    def _shared_paths(self) -> tuple[str, ...]:
        root = self.config.sandbox.shared_root
        return (root,) if root else ()

    @staticmethod
    def _scratch_env(scratch: str) -> dict[str, str]:
        """TMPDIR for a kernel with no private /tmp (the nursery is not root).

        As root, the scratch directory is mounted on the kernel's /tmp. Without
        root, /tmp is shared, and what a kernel leaves there (ipykernel's
        debugger writes cell files to it) would outlive it: TMPDIR points
        into the scratch directory instead, which goes with the kernel.
        """
        return {} if sandbox.privileged() else {"TMPDIR": scratch}

    def _working_dir(self, cwd: str | None) -> str | None:
        """The server resolved cwd inside the shared root; never trust a
        path outside it (a kernel would start in its own directory)."""
        root = self.config.sandbox.shared_root
        if not cwd or not root:
            return None
        real = os.path.realpath(cwd)
        inside = real == root or real.startswith(root.rstrip(os.sep) + os.sep)
        return real if inside else None

    def signal(self, link: str, name: str) -> None:
        child = self._children.get(link)
        if child is None:
            self.emit(protocol.Error(f"no kernel with link {link}", link))
            return
        try:
            sig = signal.Signals[name]
        except KeyError:
            self.emit(protocol.Error(f"unknown signal {name}", link))
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
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            if sig not in (signal.SIGTERM, signal.SIGKILL):
                return  # an interrupt must not end a kernel still starting
            # Not yet the leader of its own group (being forked): the
            # process itself, whose signals are blocked until it is ready
            # to take them the default way.
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, sig)

    def handle(self, line: bytes) -> None:
        """Carry out one command line; never raises."""
        try:
            command = protocol.decode_command(line)
        except ProtocolError as e:
            self.emit(protocol.Error(f"bad command: {e.message}"))
            return
        link = getattr(command, "link", None)
        if isinstance(command, protocol.Spawn):
            work = lambda: self.spawn(  # noqa: E731
                command.link, command.secret, command.endpoint, command.cwd, command.kernel
            )
        elif isinstance(command, protocol.Signal):
            work = lambda: self.signal(command.link, command.signal)  # noqa: E731
        elif isinstance(command, protocol.Kill):
            work = lambda: self.kill(command.link)  # noqa: E731
        else:
            work = self.stop
        self._guarded(f"command {type(command).__name__.lower()}", work, link=link)

    # -- children ---------------------------------------------------------

    def reap(self) -> None:
        """Reap every child that ended; never raises."""
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except OSError as e:  # EINTR and the like: try on the next turn
                self._warn(f"wait4 failed: {e}")
                return
            if pid == 0:
                return
            self._guarded("cleanup of an ended process", self._ended, pid, status, usage)

    def _ended(self, pid: int, status: int, usage: Any) -> None:
        done = self._releasing.pop(pid, None)
        if done is not None:
            done(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 3)
            return
        child = self._by_pid.pop(pid, None)
        if child is None:
            return  # an orphan of some kernel (we are their subreaper)
        del self._children[child.link]
        # The group may still hold the kernel's own children.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        try:
            info = sandbox.classify_exit(
                describe_status(status),
                self.config.sandbox.limits,
                cpu_used=usage.ru_utime + usage.ru_stime,
                flagged=child.limit,
                oom_kills=sandbox.MemoryCgroups.oom_kills(child.cgroup) if child.cgroup else 0,
            )
        except Exception as e:  # the exit is told even if its cause is not known
            info = {"cause": f"unknown ({e!r})"}
        self.emit(protocol.Exited(child.link, pid, info))
        self._release(child.workdir, child.scratch, child.identity, child.cgroup)

    def _release(
        self,
        workdir: str,
        scratch: str,
        identity: sandbox.Identity | None,
        cgroup: str | None,
    ) -> None:
        """Free what a kernel held: its processes, files, cgroup and uid.

        A helper process kills every process of the kernel's uid (see
        L{sandbox.kill_processes_of}), then removes its directories
        (L{reclaim}): however long either takes, the nursery's loop goes on
        (it reaps the killed processes, as their subreaper). Once the helper
        has ended, the cgroup goes, and the uid is freed if both processes
        and files are gone, so that no uid is handed out again while a
        process or a file of it is left.
        """
        uid = None if identity is None else identity.uid
        nursery = os.getpid()

        def helper() -> None:
            sandbox.detach_helper(nursery)
            killed = uid is None or sandbox.kill_processes_of(uid)
            gone = reclaim(
                [workdir, scratch],
                self._quarantine,
                sandbox.warn,
                deadline=time.monotonic() + RECLAIM_TIME,
            )
            os._exit((0 if killed else 1) | (0 if gone else 2))

        def done(code: int) -> None:
            if cgroup is not None:
                sandbox.MemoryCgroups.remove(cgroup)
            if uid is None or self._uids is None:
                return
            if code == 0:
                self._uids.release(uid)
            else:  # never hand out a uid that may still run or own something
                what = "processes" if code & 1 else "files"
                self._warn(f"{what} of uid {uid} are left; uid kept out of use")

        self._releasing[sandbox.fork_with_signals_reset(helper)] = done

    def sweep(self) -> None:
        """Kill what runs as a uid of the range that no live nursery holds.

        Such processes were left by a kernel of a nursery that died (a
        child that left its kernel's session outlives it). The uids are
        held until the helper has killed them all, so none is handed out
        before. Without root there are no kernel uids and nothing to do.
        """
        uids = self._uids
        if uids is None:
            return
        first, last = self.config.sandbox.uid_range
        found = sorted(sandbox.uids_with_processes(first, last))
        swept = [uid for uid in found if uids.hold(uid)]
        if not swept:
            return
        self._warn(f"killing processes left behind by uids {swept}")

        def killed(code: int) -> None:
            if code != 0:
                self._warn(f"processes of uids {swept} survived; uids kept out of use")
                return
            for uid in swept:
                uids.release(uid)

        self._releasing[sandbox.kill_all_of(swept, wait=False)] = killed

    def clear_leftovers(self) -> None:
        """Remove every kernel directory a previous nursery left (in a helper)."""
        with os.scandir(self.config.workdir_root) as entries:
            stale = [e.path for e in entries if e.name != QUARANTINE]
        if os.path.isdir(self._quarantine):
            stale.append(self._quarantine)
        if not stale:
            return
        nursery = os.getpid()

        def helper() -> None:
            sandbox.detach_helper(nursery)
            deadline = time.monotonic() + RECLAIM_TIME
            # No quarantine of its own: what cannot go stays for the server.
            os._exit(0 if reclaim(stale, self._quarantine, sandbox.warn, deadline) else 2)

        self._releasing[sandbox.fork_with_signals_reset(helper)] = lambda code: None

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
            watched = [c.pid for c in self._children.values() if c.cgroup is None]
            memory = sandbox.session_memory(watched) if limits.memory_mb else {}
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
        if not self._stopping:
            self._stopping = True
            self._stop_by = time.monotonic() + self.config.kill_grace + STOP_CLEANUP_TIME
        for link in list(self._children):
            self.kill(link)

    def _finished(self) -> bool:
        """Whether a stopping nursery may exit now."""
        if not self._stopping or self._children:
            return False
        if not self._releasing and not self._swept_at_stop:
            # Every kernel is gone: one last sweep for what they left.
            self._swept_at_stop = True
            self._guarded("the sweep at stop", self.sweep)
        if not self._releasing:
            return True
        if self._stop_by is not None and time.monotonic() > self._stop_by:
            self._warn("stopping with cleanup unfinished (the server removes what is left)")
            self._end_helpers()
            return True
        return False

    def _end_helpers(self) -> None:
        """Kill and reap the helpers still at work, so that none races the
        server's removal of the runtime directory after we exit."""
        for pid in list(self._releasing):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in list(self._releasing):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self._releasing.clear()

    # -- loop -------------------------------------------------------------

    def _timeout(self) -> float | None:
        """Seconds the loop may sleep before something is due."""
        deadlines = [self._escalate()]
        if self._children:
            deadlines.append(self._check_disk())
        if self._stopping:
            deadlines.append(self._stop_by)
        due = [d for d in deadlines if d is not None]
        return None if not due else max(0.0, min(due) - time.monotonic())

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
        lines = protocol.LineBuffer()
        self._guarded("the sweep at start", self.sweep)
        self._guarded("removal of old kernel directories", self.clear_leftovers)
        self.emit(protocol.Ready(os.getpid()))
        while not self._finished():
            timeout: float | None = 0.0
            with contextlib.suppress(Exception):  # a clock or /proc hiccup: poll
                timeout = self._timeout()
            for key, _ in sel.select(timeout):
                if key.data == "wake":
                    with contextlib.suppress(OSError):
                        os.read(wake_r, 4096)
                    continue
                try:
                    chunk = os.read(commands_fd, 65536)
                except OSError as e:
                    self._warn(f"cannot read commands: {e}")
                    chunk = b""
                if not chunk:  # the server is gone: take every kernel with us
                    sel.unregister(commands_fd)
                    self.stop()
                    continue
                for line in lines.feed(chunk):
                    self.handle(line)
                if lines.dropped:
                    self._warn(f"dropped {lines.dropped} overlong command line(s)")
                    lines.dropped = 0
            self.reap()


def _preload(modules: tuple[str, ...], config: NurseryConfig | None = None) -> None:
    import ipykernel.ipkernel
    import ipykernel.kernelapp  # noqa: F401
    import IPython.core.interactiveshell  # noqa: F401
    import zmq  # noqa: F401

    from . import (  # noqa: F401
        adaptor,
        child,
        debugging,
        flowcontrol,
        interrupts,
        introspection,
        memory,
        ordering,
        pump,
        sourcemap,
        tuning,
    )

    # What every kernel imports while it initialises: imported here, their
    # code and constants stay in pages shared by all kernels.
    for name in KERNEL_INIT_MODULES:
        with contextlib.suppress(ImportError):  # debugpy is optional
            importlib.import_module(name)
    for name in modules:
        importlib.import_module(name)
    # Compiled once here; each kernel only copies the bytes in (sandbox.enter).
    sandbox.seccomp.program()
    # What IPython makes once per process, made here once for all kernels.
    try:
        memory.warm_ipython(config.workdir_root if config is not None else None)
    except Exception as e:  # a saving, not a need: kernels make it themselves
        print(f"cellmux nursery: IPython warm-up skipped: {e!r}", file=sys.stderr)
    # Move everything imported so far out of the GC's reach, so forked
    # kernels do not touch (and copy) those pages when they collect.
    gc.collect()
    memory.record_module_files()
    if config is not None:
        # The copies go to fresh pages, not to holes between shared objects.
        memory.fill_allocator_holes()
        memory.fill_malloc_holes()
        _gather_kernel_code(config)
    # Last: what a kernel allocates must not land in holes the warm-up left
    # on shared pages (copying each page it lands on).
    memory.fill_allocator_holes()
    memory.fill_malloc_holes()
    gc.freeze()


def _gather_kernel_code(config: NurseryConfig) -> None:
    """Put the code objects every kernel runs on pages of their own.

    A child rehearses a kernel's start (L{child.rehearse_start}) under a
    profiler; the code it ran is copied together (L{memory.gather_code}).
    """
    from .child import rehearse_start

    scratch = os.path.join(config.workdir_root, "rehearsal")
    try:
        os.makedirs(scratch, mode=0o700)
        env = dict(config.kernel_env)
        memory.gather_code(memory.code_run_by(lambda: rehearse_start(scratch, env)))
    except Exception as e:  # a saving, not a need
        sandbox.warn(f"gathering kernels' code skipped: {e!r}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _python_paths() -> list[str]:
    """What kernels read when they import: the interpreter and its paths.

    Never the current directory nor a directory others may write to (see
    L{sandbox.trusted_dir}): these become reachable by every kernel.
    """
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths.add(os.path.dirname(os.path.realpath(sys.executable)))
    paths.update(p for p in sys.path if os.path.isabs(p) and sandbox.trusted_dir(p))
    return sorted(paths)


def _read_line(fd: int) -> bytes:
    """One line from fd, unbuffered: later reads go straight to os.read."""
    line = bytearray()
    while not line.endswith(b"\n"):
        byte = os.read(fd, 1)
        if not byte:
            raise SystemExit("nursery: no configuration on stdin")
        line += byte
        if len(line) > protocol.MAX_LINE:
            raise SystemExit("nursery: configuration line too long")
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
        needed = [config.socket_dir, config.workdir_root, *_python_paths(), *config.kernel_paths]
        if config.sandbox.shared_root:
            needed.append(config.sandbox.shared_root)
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
    if config.merge_pages and not memory.page_merging_running():
        sandbox.warn(
            "kernel_page_merging is on but the kernel's KSM daemon is not running"
            f" ({memory.KSM_RUN} is not 1): no page will be merged"
        )
    _preload(config.preload, config)
    Nursery(config, commands, events).run()


if __name__ == "__main__":
    main()
