# -*- test-case-name: tests.security -*-
"""Kernel isolation: identities, namespaces, limits, and why a kernel ended.

Everything here runs in the nursery or, after the fork, in the kernel child
before it becomes a kernel. Nothing here touches Twisted.

When the nursery runs as root, each kernel gets:

- its own uid and gid from a configured range (no /etc/passwd entry), held
  machine-wide (L{cellmux.kernel.uidhold}), so that two servers on one
  machine never hand out the same uid, even from different network
  namespaces, and every process of that uid
  is killed before it is handed out again;
- a private network namespace with only loopback (unless network is allowed);
- private mount and IPC namespaces: its own ``/tmp`` (a directory next to its
  working directory, counted in its disk use), no SysV IPC shared with anyone;
- rlimits (CPU seconds, memory, processes, open files, file size, no core
  files) and, where the machine delegates cgroup v2 memory, ``memory.max``;
- ``PR_SET_NO_NEW_PRIVS``, so no set-uid program gives privileges back.

The nursery itself lives in a private mount namespace where ``/proc`` hides
other users' processes (``hidepid=invisible``) and where directories that
block an unprivileged uid on the way to the Python installation or the
runtime directory are replaced by a read-only view holding only what kernels
need (see L{expose_to_kernels}).

Without root, kernels run as the server's user with rlimits only (no
RLIMIT_NPROC: it would count every process of that user).

With or without root, a kernel starts on fresh keyrings and ends L{enter}
under the syscall filter of L{cellmux.kernel.seccomp}.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import random
import resource
import signal
import socket
import stat
import struct
import sys
import time
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any

import attrs

from ..cleanup import tree_usage
from ..protocol.nursery import DEFAULT_UID_RANGE
from . import seccomp, uidhold

__all__ = [
    "Identity",
    "KernelSandbox",
    "Limits",
    "MemoryCgroups",
    "SandboxConfig",
    "UidPool",
    "classify_exit",
    "detach_helper",
    "disk_usage",
    "enter",
    "expose_to_kernels",
    "fork_with_signals_reset",
    "kill_all_of",
    "kill_processes_of",
    "privileged",
    "trusted_dir",
    "uids_with_processes",
]


#: Which limit a kernel ended on, as told to clients ("cause") and to code
#: ("limit" field of the nursery's exited event).
LIMIT_CAUSES = {
    "cpu": "cpu time limit",
    "memory": "memory limit",
    "disk": "disk limit",
    "file_size": "file size limit",
}

#: RLIMIT_AS, the backstop behind the resident-memory watch, is this many
#: times the memory limit: address space is reserved generously (thread
#: stacks, arenas), so it must not trip before real memory use does.
ADDRESS_SPACE_FACTOR = 2

#: Seconds of CPU between SIGXCPU (the soft limit) and SIGKILL (the hard one).
CPU_HARD_GRACE = 2

#: What one file or directory costs at least, in disk use (an inode, a block).
MIN_ENTRY_BYTES = 4096

#: Rounds of killing (10 ms apart) before the helper gives up.
KILL_ALL_ROUNDS = 3000

#: Directories every user may write to: each kernel gets its own instead.
SHARED_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/run/lock", "/dev/shm")

_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_NOEXEC = 8
_MS_REMOUNT = 32
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_NO_NEW_PRIVS = 38
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_MB = 1024 * 1024

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    _check(
        _libc.mount(
            None if source is None else source.encode(),
            target.encode(),
            None if fstype is None else fstype.encode(),
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


def _prctl(option: int, value: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0), f"prctl {option}")


def privileged() -> bool:
    """Whether this process may give kernels their own uids and namespaces."""
    return os.geteuid() == 0


# -- configuration --------------------------------------------------------


def _not_negative(_instance: object, attribute: attrs.Attribute, value: int) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must not be negative, not {value!r}")


@attrs.frozen
class Limits:
    """Per-kernel limits; 0 means no limit. See docs/security.md."""

    cpu_seconds: int = attrs.field(default=0, validator=_not_negative)
    memory_mb: int = attrs.field(default=0, validator=_not_negative)
    processes: int = attrs.field(default=0, validator=_not_negative)
    open_files: int = attrs.field(default=0, validator=_not_negative)
    file_size_mb: int = attrs.field(default=0, validator=_not_negative)
    disk_mb: int = attrs.field(default=0, validator=_not_negative)


@attrs.frozen
class SandboxConfig:
    """The sandbox settings the server passes in the nursery's config line."""

    uid_range: tuple[int, int] = attrs.field(default=DEFAULT_UID_RANGE, converter=tuple)
    network: bool = False
    limits: Limits = attrs.Factory(Limits)
    #: A directory (the notebooks' folder) every kernel sees, read-only
    #: unless shared_root_writable (None: none).
    shared_root: str | None = None
    shared_root_writable: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SandboxConfig:
        data = dict(data)
        if "limits" in data:
            data["limits"] = Limits(**data["limits"])
        return cls(**data)


@attrs.frozen
class Identity:
    """The uid and gid one kernel runs as."""

    uid: int
    gid: int


@attrs.frozen
class KernelSandbox:
    """Everything the child needs to lock itself in, decided by the nursery."""

    identity: Identity | None
    network: bool
    limits: Limits
    #: The kernel's own directory mounted on /tmp and the like.
    scratch: str
    #: Paths under those directories the kernel still needs (the runtime
    #: directory, when it lives in /tmp): bound back in at the same place.
    keep: tuple[str, ...] = ()
    #: The cgroup v2 directory to join, when memory is limited by cgroup.
    cgroup: str | None = None
    #: The shared root, bound read-only into the kernel's mount namespace
    #: unless shared_writable (None: none).
    shared_root: str | None = None
    shared_writable: bool = False


# -- identities -------------------------------------------------------------


class UidPool:
    """Kernel uids from a range, each held machine-wide while in use.

    A uid is held as L{cellmux.kernel.uidhold} says (an abstract unix
    socket and a file lock, both freed by the kernel when their holder
    closes them or dies), so uids cannot leak and two nurseries (even of
    different servers, in different network namespaces) never share one.
    """

    def __init__(self, first: int, last: int, lock_dir: str = uidhold.UID_LOCK_DIR) -> None:
        if not 0 < first <= last:
            raise ValueError(f"bad kernel uid range {first}-{last}")
        self._first = first
        self._size = last - first + 1
        # Start anywhere, so that nurseries started together do not all
        # contend for the first uids.
        self._next = random.randrange(self._size)
        self._held: dict[int, uidhold.UidHold] = {}
        #: Why holds are by socket alone (None: socket and file lock).
        self.lock_dir_problem = uidhold.lock_dir_problem(lock_dir)
        self._lock_dir = None if self.lock_dir_problem else lock_dir

    def claim(self) -> Identity:
        """A free uid (gid alike), held until L{release}.

        @raise OSError: if every uid of the range is in use.
        """
        for _ in range(min(self._size, 4096)):
            uid = self._first + self._next
            self._next = (self._next + 1) % self._size
            if uid in self._held:
                continue
            hold = uidhold.hold_uid(uid, self._lock_dir)
            if hold is None:
                continue
            self._held[uid] = hold
            # Leftovers of a nursery that crashed are killed by the child
            # (see enter), off the nursery's path.
            return Identity(uid, uid)
        raise OSError(errno.EAGAIN, "no free kernel uid in the configured range")

    def hold(self, uid: int) -> bool:
        """Hold this very uid, if no one (no nursery on this machine) does.

        Used to sweep: a uid that can be held has no live kernel anywhere,
        so whatever still runs as it was left behind.
        """
        if uid in self._held:
            return False
        hold = uidhold.hold_uid(uid, self._lock_dir)
        if hold is None:
            return False
        self._held[uid] = hold
        return True

    def release(self, uid: int) -> None:
        hold = self._held.pop(uid, None)
        if hold is not None:
            hold.close()


def _real_uids() -> dict[int, int]:
    """pid -> real uid of every live (not zombie) process.

    Read from /proc/PID/status: the owner of /proc/PID cannot be trusted,
    since a process that makes itself non-dumpable shows as root's there.
    """
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                status = f.read()
        except OSError:
            continue  # gone meanwhile
        if b"\nState:\tZ" in status:
            continue
        start = status.find(b"\nUid:\t")
        if start < 0:
            continue
        with contextlib.suppress(ValueError, IndexError):
            found[int(name)] = int(status[start + 6 :].split(b"\t", 1)[0])
    return found


def _processes_of(*uids: int) -> list[int]:
    """Live (not zombie) processes whose real uid is one of uids."""
    wanted = set(uids)
    return [pid for pid, uid in _real_uids().items() if uid in wanted]


def uids_with_processes(first: int, last: int) -> set[int]:
    """The uids from first to last that some live process runs as."""
    return {uid for uid in _real_uids().values() if first <= uid <= last}


def kill_processes_of(*uids: int) -> bool:
    """Kill the uids' processes, round after round, until none is left.

    Whether none is left (False after L{KILL_ALL_ROUNDS} rounds). Blocks:
    run it in a helper (L{kill_all_of}) or a freshly forked child.
    """
    for _ in range(KILL_ALL_ROUNDS):
        pids = _processes_of(*uids)
        if not pids:
            return True
        for target in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, signal.SIGKILL)
        time.sleep(0.01)
    return False


#: Signals a forked kernel must not handle the nursery's way: every one the
#: nursery or Python's start-up gave a handler, plus these (SIGINT is
#: ignored by the nursery, SIGPIPE by Python).
_RESET_IN_CHILD = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE)

#: Computed once: each spawn blocks them all, and the child looks at each.
_ALL_SIGNALS = frozenset(signal.valid_signals())
_CATCHABLE = tuple(sorted(_ALL_SIGNALS - {signal.SIGKILL, signal.SIGSTOP}))


def fork_with_signals_reset(in_child: Callable[[], object]) -> int:
    """Fork with every signal blocked; the child resets handlers, then unblocks.

    A signal sent to a kernel while it is being forked (a kill right after a
    spawn) must not run the nursery's handlers in the child: still root and
    holding a copy of the kernel table, it would stop every kernel. Blocked,
    it stays pending; CPython drops its own record of signals caught before
    the fork; once the handlers are the defaults, the signal acts on the
    child alone. The child runs C{in_child} and exits (70 if it returns or
    raises: it must never go back into the caller's loop); the parent gets
    the child's pid.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _ALL_SIGNALS)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        raise
    if pid == 0:
        try:
            signal.set_wakeup_fd(-1)
            for sig in _CATCHABLE:
                if sig in _RESET_IN_CHILD or callable(signal.getsignal(sig)):
                    signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            in_child()
        finally:
            os._exit(70)  # never back into the nursery's loop
    signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return pid


def detach_helper(parent: int) -> None:
    """In a helper forked from the nursery (pid C{parent}): keep stderr (the
    log), nothing else, and die with the nursery.

    Its copies of the server's pipes would keep them open after the nursery
    ended (the server would not learn it had), and its copies of uid locks
    would keep uids held that the nursery released. A helper that outlived
    its nursery would race the next cleanup of the same files (the next
    nursery's, or the server's); what it left is swept by the next nursery.
    """
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(2)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))


def kill_all_of(uid: int | Iterable[int], wait: bool = True) -> int:
    """SIGKILL every process running as uid (or as any of several uids),
    wherever it went (setsid too).

    A helper process looks for them in /proc and kills them, round after
    round, until none is left: RLIMIT_NPROC bounds how many a fork bomb can
    add between two rounds, and a killed process forks no more. Returns the
    helper's pid; with C{wait=False} the caller must reap it (the nursery
    does not block on it: it must go on reaping the killed processes, which
    come to it as their subreaper). The helper exits 0 once none is left.
    """
    uids = (uid,) if isinstance(uid, int) else tuple(uid)
    parent = os.getpid()

    def helper() -> None:
        code = 2
        with contextlib.suppress(BaseException):
            detach_helper(parent)
            code = 0 if kill_processes_of(*uids) else 1
        os._exit(code)

    pid = fork_with_signals_reset(helper)
    if wait:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    return pid


# -- the nursery's own namespace -------------------------------------------


def _blocks_others(path: str) -> bool:
    try:
        return not os.stat(path).st_mode & stat.S_IXOTH
    except OSError:
        return False


def _first_blocked(path: str) -> tuple[str, str] | None:
    """The first directory on the way to path that others cannot enter,
    and the entry below it leading to path."""
    parts = os.path.realpath(path).strip("/").split("/")
    current = "/"
    for part in parts:
        if _blocks_others(current):
            return current, part
        current = os.path.join(current, part)
    return None


def expose_to_kernels(paths: list[str]) -> list[str]:
    """Give the nursery (and so its kernels) a private mount namespace in
    which unprivileged uids can reach paths, and see no one else's processes.

    For each directory that blocks others on the way to one of paths (such
    as a mode 0700 ``/root`` holding the Python installation), a tmpfs is
    mounted over it that holds only the entries leading to paths, each bound
    to the original. Nothing else of that directory becomes visible, and no
    file mode is changed. Returns warnings about paths that stay unreadable.
    """
    _check(_libc.unshare(_CLONE_NEWNS), "unshare mount namespace")
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "hidepid=invisible")
    paths = sorted({os.path.realpath(p) for p in paths if os.path.exists(p)})
    for _ in range(32):  # each round unblocks one directory; nesting is shallow
        blocked: dict[str, set[str]] = {}
        for path in paths:
            found = _first_blocked(path)
            if found is not None:
                blocked.setdefault(found[0], set()).add(found[1])
        if not blocked:
            break
        top = min(blocked, key=len)
        _overlay(top, sorted(blocked[top]))
    return [
        f"{p} is out of reach of kernels"
        for p in paths
        if not os.stat(p).st_mode & stat.S_IXOTH or _first_blocked(p) is not None
    ]


def _overlay(directory: str, entries: list[str]) -> None:
    handles = {e: os.open(os.path.join(directory, e), os.O_PATH) for e in entries}
    try:
        _mount("tmpfs", directory, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=64k")
        for entry, fd in handles.items():
            target = os.path.join(directory, entry)
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                os.mkdir(target)
            else:
                os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
            _mount(f"/proc/self/fd/{fd}", target, None, _MS_BIND | _MS_REC)
        _mount(None, directory, None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    finally:
        for fd in handles.values():
            os.close(fd)


def become_subreaper() -> None:
    """Orphans of kernels (a fork bomb's) come back to the nursery to be reaped."""
    with contextlib.suppress(OSError):
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)


# -- cgroup v2 memory ----------------------------------------------------


class MemoryCgroups:
    """Per-kernel cgroup v2 directories with ``memory.max``, where delegated.

    Usable only when the nursery's cgroup hands the memory controller to its
    children (``memory`` in its ``cgroup.subtree_control``); otherwise
    L{detect} returns None and memory is limited by RLIMIT_AS.
    """

    def __init__(self, base: str) -> None:
        self.base = base

    @classmethod
    def detect(cls) -> MemoryCgroups | None:
        try:
            with open("/proc/self/cgroup") as f:
                line = next((ln for ln in f if ln.startswith("0::")), None)
            mount = None
            with open("/proc/self/mountinfo") as f:
                for ln in f:
                    fields = ln.split(" - ")
                    if len(fields) == 2 and fields[1].split()[0] == "cgroup2":
                        mount = fields[0].split()[4]
                        break
            if line is None or mount is None:
                return None
            base = os.path.join(mount, line[3:].strip().lstrip("/"))
            with open(os.path.join(base, "cgroup.subtree_control")) as f:
                if "memory" not in f.read().split():
                    return None
            return cls(base) if os.access(base, os.W_OK) else None
        except OSError:
            return None

    def create(self, name: str, memory_mb: int) -> str:
        path = os.path.join(self.base, f"cellmux-{name}")
        os.mkdir(path)
        with open(os.path.join(path, "memory.max"), "w") as f:
            f.write(str(memory_mb * _MB))
        with contextlib.suppress(OSError), open(os.path.join(path, "memory.swap.max"), "w") as f:
            f.write("0")
        return path

    @staticmethod
    def oom_kills(path: str) -> int:
        try:
            with open(os.path.join(path, "memory.events")) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            pass
        return 0

    @staticmethod
    def remove(path: str) -> None:
        with contextlib.suppress(OSError):
            os.rmdir(path)


# -- in the child ---------------------------------------------------------


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack_from("16sH", fcntl.ioctl(s, _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | _IFF_UP))


def trusted_dir(path: str) -> bool:
    """Whether only root and this process's user can change what path holds.

    Each directory from path up to / must belong to one of them and be
    writable by no one else, unless it is sticky (like /tmp), where no one
    else can rename or remove what they own.
    """
    if not os.path.isabs(path):
        return False  # relative to whatever the cwd is: never
    owners = {0, os.geteuid()}
    current = os.path.realpath(path)
    below: os.stat_result | None = None
    while True:
        try:
            st = os.stat(current)
        except OSError:
            return False
        if st.st_uid not in owners:
            return False
        open_to_others = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if open_to_others and (below is None or not st.st_mode & stat.S_ISVTX):
            return False
        if current == "/":
            return True
        below = st
        current = os.path.dirname(current)


def interpreter_paths() -> tuple[str, ...]:
    """The directories this Python needs: its prefixes and import path.

    A kernel gets a private /tmp; when Python or its packages live under it
    (a virtual environment made in /tmp, as tox does), these are bound back
    so the kernel can still import what it has not imported yet. Only
    absolute import paths in directories no one else can write count: never
    the current directory (the nursery runs with ``-I``, so none is on its
    path, but a preloaded module might add one).
    """
    found = {
        os.path.abspath(p)
        for p in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix)
        if p and os.path.isdir(p)
    }
    found.update(p for p in sys.path if os.path.isabs(p) and os.path.isdir(p) and trusted_dir(p))
    # Never a shared writable directory itself, nor one above it: ``python
    # -m`` started in /tmp puts /tmp on sys.path, and the paths below it (a
    # venv in /tmp) would then count as "inside" it and not be bound back.
    found = {
        p
        for p in found
        if not any(
            shared == p or shared.startswith(p.rstrip(os.sep) + os.sep)
            for shared in SHARED_WRITABLE_DIRS
        )
    }
    # A directory inside another one on the list comes with it.
    return tuple(
        sorted(p for p in found if not any(p != q and p.startswith(q + os.sep) for q in found))
    )


def _private_tmp(scratch: str, keep: tuple[str, ...]) -> None:
    handles = {p: os.open(p, os.O_PATH) for p in keep if os.path.exists(p)}
    try:
        for target in SHARED_WRITABLE_DIRS:
            if not os.path.isdir(target) or os.path.islink(target):
                continue
            _mount(scratch, target, None, _MS_BIND)
            for path, fd in handles.items():
                if os.path.commonpath([path, target]) == target:
                    os.makedirs(path, mode=0o711, exist_ok=True)
                    _mount(f"/proc/self/fd/{fd}", path, None, _MS_BIND | _MS_REC)
    finally:
        for fd in handles.values():
            os.close(fd)


def _read_only(path: str) -> None:
    """Bind path onto itself, read-only, in this mount namespace only: the
    kernel reads the shared notebooks and writes none of them."""
    _mount(path, path, None, _MS_BIND | _MS_REC)
    _mount(None, path, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)


def _set_limit(which: int, soft: int, hard: int | None = None) -> None:
    hard = soft if hard is None else hard
    _, current_hard = resource.getrlimit(which)
    if current_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, current_hard), min(hard, current_hard)
    resource.setrlimit(which, (soft, hard))


def _set_limits(limits: Limits, own_uid: bool) -> None:
    _set_limit(resource.RLIMIT_CORE, 0)
    if limits.cpu_seconds:
        _set_limit(resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + CPU_HARD_GRACE)
    if limits.memory_mb:
        # A backstop only: without a memory cgroup the nursery watches the
        # kernel's resident memory and ends it at memory_mb (see
        # session_memory), so that it is ended and says why rather than
        # failing allocations at an address-space limit far below its use.
        _set_limit(resource.RLIMIT_AS, limits.memory_mb * _MB * ADDRESS_SPACE_FACTOR)
    if limits.processes and own_uid:  # per uid: only meaningful with one uid per kernel
        _set_limit(resource.RLIMIT_NPROC, limits.processes)
    if limits.open_files:
        _set_limit(resource.RLIMIT_NOFILE, limits.open_files)
    if limits.file_size_mb:
        _set_limit(resource.RLIMIT_FSIZE, limits.file_size_mb * _MB)


#: Device nodes a kernel has no use for, where the host makes them reachable
#: (``/dev/fuse`` is often mode 0666): a kernel's mount namespace shows
#: ``/dev/null`` in their place. mount(2) is denied anyway, so no FUSE file
#: system could be mounted; this also keeps out KVM, TUN and userfaultfd.
HIDDEN_DEVICES = ("/dev/fuse", "/dev/kvm", "/dev/net/tun", "/dev/vhost-net", "/dev/userfaultfd")


def _hide_devices() -> None:
    for device in HIDDEN_DEVICES:
        with contextlib.suppress(FileNotFoundError):  # not on this host
            _mount("/dev/null", device, None, _MS_BIND)


_KEYCTL_JOIN_SESSION_KEYRING = 1
_KEYCTL_CLEAR = 7
_KEY_SPEC_USER_KEYRING = -4
_KEY_SPEC_USER_SESSION_KEYRING = -5


def _keyctl(number: int, *args: int) -> int:
    result = _libc.syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in args))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"keyctl {args[0]}: {os.strerror(err)}")
    return result


def fresh_keyrings(own_uid: bool) -> None:
    """Start the calling process on empty keyrings.

    A new anonymous session keyring (not the nursery's) and, when the kernel
    has a uid of its own, that uid's user and user-session keyrings emptied:
    those belong to the uid, not to a process, and would hand whatever an
    earlier holder of the uid put there to the next kernel that gets it
    (without root, the uid is the server user's and its keys are left
    alone). Kernels cannot add keys themselves (the syscall filter denies
    keyctl); this clears what anything else left. Machines without keyrings
    (ENOSYS) are fine as they are.
    """
    keyctl = seccomp.syscall_number("keyctl")
    if keyctl is None:
        return
    try:
        _keyctl(keyctl, _KEYCTL_JOIN_SESSION_KEYRING, 0)
        if own_uid:
            _keyctl(keyctl, _KEYCTL_CLEAR, _KEY_SPEC_USER_KEYRING)
            _keyctl(keyctl, _KEYCTL_CLEAR, _KEY_SPEC_USER_SESSION_KEYRING)
    except OSError as e:
        if e.errno != errno.ENOSYS:
            raise


def enter(plan: KernelSandbox) -> None:
    """Lock the calling (freshly forked, single-threaded) child in.

    @raise OSError: if a layer cannot be set up; the child must not go on.
    """
    parent = os.getppid()
    if plan.identity is not None:
        # A nursery that crashed may have left processes of this uid behind:
        # kill them before they can touch what is prepared for this kernel.
        kill_processes_of(plan.identity.uid)
    if privileged():
        flags = _CLONE_NEWNS | _CLONE_NEWIPC | (0 if plan.network else _CLONE_NEWNET)
        _check(_libc.unshare(flags), "unshare")
        _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
        if not plan.network:
            _loopback_up()
        _private_tmp(plan.scratch, plan.keep)
        _hide_devices()
        if plan.shared_root is not None and not plan.shared_writable:
            _read_only(plan.shared_root)
        if plan.cgroup is not None:
            with open(os.path.join(plan.cgroup, "cgroup.procs"), "w") as f:
                f.write("0")
    # Memory by rlimit only when no cgroup does it.
    limits = plan.limits if plan.cgroup is None else attrs.evolve(plan.limits, memory_mb=0)
    _set_limits(limits, own_uid=plan.identity is not None)
    if plan.identity is not None:
        os.setgroups([])
        os.setresgid(plan.identity.gid, plan.identity.gid, plan.identity.gid)
        os.setresuid(plan.identity.uid, plan.identity.uid, plan.identity.uid)
        # Changing uid cleared the parent-death signal; set it again, and
        # make sure the nursery did not die in between.
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)
    fresh_keyrings(own_uid=plan.identity is not None)
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    # Last: the steps above need calls the filter denies.
    seccomp.install(seccomp.program())


# -- after the end --------------------------------------------------------


def disk_usage(paths: list[str], stop_above: int | None = None) -> int:
    """Bytes used by the files under paths (symlinks not followed).

    Each entry counts at least L{MIN_ENTRY_BYTES}, so that a kernel making
    millions of empty files reaches its disk limit (and the time this walk
    takes stays bounded by the limit). The walk stops once the total
    exceeds stop_above, and reaches the bottom of chains longer than
    PATH_MAX (see L{cellmux.cleanup.tree_usage}).
    """
    total = 0
    for path in paths:
        left = None if stop_above is None else stop_above - total
        total += tree_usage(path, min_entry=MIN_ENTRY_BYTES, stop_above=left)
        if stop_above is not None and total > stop_above:
            break
    return total


def session_memory(sessions: Collection[int]) -> dict[int, int]:
    """Proportional memory (PSS) of the given sessions' processes, by session.

    A kernel leads its own session, so its entry is the kernel with every
    process it started (that did not start a session of its own). PSS, not
    RSS: a kernel's forked children share its pages copy-on-write, and RSS
    would count those once per child (64 children of a 50 MB kernel are not
    3 GB). Where smaps_rollup cannot be read, RSS stands in.
    """
    page = os.sysconf("SC_PAGE_SIZE")
    totals: dict[int, int] = {}
    if not sessions:
        return totals
    for proc_stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = proc_stat.read_text().rsplit(")", 1)[1].split()
            session, rss = int(fields[3]), int(fields[21])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile, or not readable
        if session not in sessions:
            continue
        totals[session] = totals.get(session, 0) + (_pss(proc_stat.parent) or rss * page)
    return totals


def _pss(proc: Path) -> int | None:
    try:
        with open(proc / "smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def classify_exit(
    described: dict[str, Any],
    limits: Limits,
    cpu_used: float,
    flagged: str | None = None,
    oom_kills: int = 0,
) -> dict[str, Any]:
    """Name the limit that ended a kernel, if one did.

    @param described: how it ended (C{cause}, C{signal} or C{exit_code}).
    @param cpu_used: user plus system CPU seconds of the process.
    @param flagged: a limit the nursery enforced itself (C{"disk"}).
    @param oom_kills: the kernel's cgroup's ``oom_kill`` count.
    @return: described, with C{limit} added and C{cause} naming it.
    """
    sig = described.get("signal")
    limit = flagged
    if limit is None and oom_kills:
        limit = "memory"
    over_cpu = sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_used >= limits.cpu_seconds)
    if limit is None and limits.cpu_seconds and over_cpu:
        limit = "cpu"
    if limit is None and sig == signal.SIGXFSZ:
        limit = "file_size"
    if limit is None:
        return described
    return {**described, "limit": limit, "cause": f"{LIMIT_CAUSES[limit]} ({described['cause']})"}


def warn(message: str) -> None:
    """A line on the nursery's stderr (the server's log)."""
    sys.stderr.write(f"cellmux nursery: {message}\n")
    sys.stderr.flush()
