# -*- test-case-name: tests.test_crash_recovery,tests.test_orphans -*-
"""No kernel outlives its server.

Kernels die with the nursery, and the nursery with the server, through
PR_SET_PDEATHSIG. That covers a clean stop and most crashes, but not what a
kernel started itself (a subprocess keeps running when its kernel is
killed). So each server also keeps a small state file listing its nursery
and kernel processes; the next server to start with the same state
directory ends whatever a dead server left behind, removes the files its
kernels left, and remembers those kernel ids so that clients reconnecting
to them get a clear "kernel lost" rather than "unknown kernel".

A pid alone names nothing for long: after a crash (or a reboot, with a
state directory on disk) the same number may belong to an unrelated
process, even to the next server. So a record keeps each process's
*identity*: its pid, its start time (clock ticks after boot) and the boot
it started in. Nothing is signalled unless the process now holding the pid
has that identity, and the signal goes through a pidfd opened before the
check, so the check and the kill name the same process.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import secrets
import signal
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import defer, threads
from twisted.logger import Logger

from cellmux.cleanup import remove_tree
from cellmux.kernel.uidhold import UID_LOCK_DIR, UidHold, hold_uid, lock_dir_problem

__all__ = [
    "RECORD_DELAY",
    "RECORD_DELAY_NEW_PROCESS",
    "PendingRemoval",
    "ProcessIdentity",
    "RecordKeeper",
    "ServerRecord",
    "Sweep",
    "default_state_dir",
    "end_kernel_processes",
    "end_leftovers",
    "end_leftovers_of",
    "finish_removals",
    "reap_orphans",
]

log = Logger()

#: The record format this server writes (1: pids only, before identities).
RECORD_VERSION = 2
#: What the kernels' directories are called: the link id, and its /tmp.
_LINK_ENTRY = re.compile(r"[0-9a-f]{32}(\.tmp)?")
#: A temporary record file older than this is a crashed write, not one in
#: progress (a write takes milliseconds).
STALE_TEMP_SECONDS = 60.0
#: How long one start may spend removing what dead servers' kernels left on
#: disk; what is left is retried at the next start (the record stays).
SWEEP_REMOVAL_SECONDS = 30.0
#: Seconds before a record write that failed is tried again.
RETRY_SECONDS = 5.0
#: Seconds from a change to the record's rewrite (changes meanwhile join
#: it). A create's rewrite ran 5 ms after it, in the middle of the new
#: kernel's first cell, and its thread took the GIL and a core from the
#: reply on its way to the client. A kernel bound to a pooled process, or
#: one ended, can wait: a crash meanwhile only names it "unknown" rather
#: than "lost", or leaves an entry the next start checks and skips.
RECORD_DELAY = 0.05
#: Seconds to the rewrite after a process was forked or took its own uid:
#: a crash before it would leave that process's directory and subprocesses
#: unknown to the next start.
RECORD_DELAY_NEW_PROCESS = 0.005
#: Rounds of killing a leftover uid's processes (each round may meet
#: processes forked meanwhile; RLIMIT_NPROC bounds how many).
_UID_KILL_ROUNDS = 50


def default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return os.path.join(base, "cellmux")


# -- process identities -------------------------------------------------------


def boot_id() -> str:
    """This boot's random id; a start time means nothing in another boot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@attrs.frozen
class _Stat:
    ppid: int
    session: int
    start: int
    zombie: bool


def _stat(pid: int) -> _Stat | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split
    # after its last ')'. Then field 3 is fields[0], field 22 fields[19].
    fields = raw.rsplit(b")", 1)[-1].split()
    try:
        return _Stat(
            ppid=int(fields[1]),
            session=int(fields[3]),
            start=int(fields[19]),
            zombie=fields[0] in (b"Z", b"X"),
        )
    except (IndexError, ValueError):
        return None


def _uid(pid: int) -> int | None:
    """The real uid of pid (from status: /proc/PID's owner can be faked)."""
    try:
        status = Path(f"/proc/{pid}/status").read_bytes()
    except OSError:
        return None
    match = re.search(rb"\nUid:\t(\d+)", status)
    return int(match.group(1)) if match else None


def _uid_is(pid: int, uid: int) -> bool:
    return _uid(pid) == uid


@attrs.frozen
class ProcessIdentity:
    """One process, told apart from any later process with the same pid."""

    pid: int
    #: Start time in clock ticks after boot (/proc/PID/stat field 22).
    start: int
    #: /proc/sys/kernel/random/boot_id of the boot it ran in.
    boot: str
    #: Its real uid when recorded, if known (kernels change uid after fork).
    uid: int | None = None

    @classmethod
    def of(cls, pid: int, *, parent: int | None = None) -> ProcessIdentity | None:
        """The identity of the live process pid; None if there is none.

        @param parent: if given, pid must be this process's child, so that a
            pid already reused cannot be recorded by mistake (a child's pid is
            not reused until its parent has reaped it).
        """
        st = _stat(pid) if pid > 0 else None
        if st is None or st.zombie or (parent is not None and st.ppid != parent):
            return None
        return cls(pid, st.start, boot_id(), _uid(pid))

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "start": self.start, "boot": self.boot, "uid": self.uid}

    @classmethod
    def from_json(cls, data: Any) -> ProcessIdentity:
        uid = data.get("uid")
        return cls(int(data["pid"]), int(data["start"]), str(data["boot"]), _opt_int(uid))

    def alive(self) -> bool:
        """Whether this very process still runs (not a zombie, not a reuse)."""
        st = _stat(self.pid)
        return (
            st is not None and not st.zombie and st.start == self.start and self.boot == boot_id()
        )

    def kill(self) -> bool:
        """SIGKILL this process if it still runs; never anything else.

        The pidfd is opened before the identity check: if the pid is reused
        after the check, the signal still goes to the process checked (or
        nowhere, if it has ended).
        """
        return _kill_checked(self.pid, self.alive)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _kill_checked(pid: int, check: Callable[[], bool]) -> bool:
    """SIGKILL pid if C{check()} holds after a pidfd to it is open."""
    if pid <= 1 or pid == os.getpid():
        return False
    pidfd = None
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except OSError:
        pidfd = None  # no pidfds here (old kernel): check, then kill by pid
    try:
        if not check():
            return False
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
        return True
    except (ProcessLookupError, PermissionError):
        return False
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _live_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _end_session(leader: ProcessIdentity) -> int:
    """Kill what is left of the session a kernel led; how many were killed.

    The leader is killed only if it is itself. Other members count while
    their session is the leader's pid and, when the leader is gone, they
    started after it and (if the leader's uid is known) run as its uid: the
    session number stays taken while members hold it, but that is the only
    guard against a session that a reuse of the pid started afresh.
    """
    was_alive = leader.alive()
    killed = int(leader.kill())
    if not was_alive and leader.boot != boot_id():
        return killed  # another boot: nothing of that session can be left
    sid = leader.pid

    def member(pid: int) -> bool:
        st = _stat(pid)
        if st is None or st.zombie or st.session != sid or st.start < leader.start:
            return False
        return was_alive or (leader.uid is not None and _uid(pid) == leader.uid)

    for pid in _live_pids():
        st = _stat(pid)
        if pid != sid and st is not None and st.session == sid:
            killed += _kill_checked(pid, functools.partial(member, pid))
    return killed


def _uid_lock(uid: int) -> UidHold | None:
    """Hold a kernel uid as the nursery does (cellmux.kernel.uidhold).

    None if a live nursery holds it: that uid's processes are its own.
    """
    return hold_uid(uid, None if lock_dir_problem() else UID_LOCK_DIR)


def _end_uid(uid: int) -> int:
    """Kill every process of a kernel uid no live nursery holds.

    A kernel's subprocess may have left its session (setsid); as root,
    kernels have uids of their own, which find it wherever it went.
    """
    if uid <= 0 or uid == os.geteuid() or os.geteuid() != 0:
        return 0
    lock = _uid_lock(uid)
    if lock is None:
        return 0
    killed = 0
    try:
        for _ in range(_UID_KILL_ROUNDS):
            targets = [pid for pid in _live_pids() if _uid(pid) == uid]
            targets = [pid for pid in targets if not getattr(_stat(pid), "zombie", True)]
            if not targets:
                break
            for pid in targets:
                killed += _kill_checked(pid, functools.partial(_uid_is, pid, uid))
            time.sleep(0.01)
    finally:
        lock.close()
    return killed


def end_kernel_processes(
    kernels: Iterable[ProcessIdentity], uid_range: tuple[int, int] | None = None
) -> int:
    """Kill kernel processes and what they left; how many were killed.

    Each kernel only if it is itself, what is left of its session, and (as
    root) every process of its uid that no live nursery holds, if that uid
    is in C{uid_range} (the kernel uids configured: never anybody else's).
    Blocking.
    """
    killed = 0
    uids = set()
    for identity in kernels:
        killed += _end_session(identity)
        if identity.uid is None or identity.boot != boot_id():
            continue  # after a reboot, the uid means nothing
        if uid_range is not None and uid_range[0] <= identity.uid <= uid_range[1]:
            uids.add(identity.uid)
    for uid in sorted(uids):
        killed += _end_uid(uid)
    return killed


# -- this server's record -------------------------------------------------------


class ServerRecord:
    """This server's entry in the state directory, rewritten on changes.

    It says who the server is (its identity), which runtime directory it
    uses and whether it made that directory, and which processes it has:
    the nursery and every kernel process, pooled ones included, each with
    its identity and the kernel id it serves, if any.
    """

    def __init__(self, state_dir: str, runtime_dir: str, *, owns_runtime_dir: bool = False):
        # Private: it also holds the default permalink database.
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self._dir = Path(state_dir) / "servers"
        self._dir.mkdir(exist_ok=True, mode=0o700)
        self.path = self._dir / f"{os.getpid()}-{secrets.token_hex(4)}.json"
        self._runtime_dir = runtime_dir
        self._owns_runtime_dir = owns_runtime_dir
        self._server = ProcessIdentity.of(os.getpid())
        try:
            self._cmdline = Path("/proc/self/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            self._cmdline = ""
        self.nursery: ProcessIdentity | None = None
        #: link id -> identity, kept while the link is recorded so that each
        #: process is read once, while it is certainly the nursery's child.
        self._identities: dict[str, ProcessIdentity] = {}
        #: The writer thread changes _identities; the reactor thread reads it.
        self._lock = threading.Lock()
        # What the last write wrote, kept so that the next one looks only at
        # what changed: the record is rewritten on every change, from the
        # writer thread, and any Python work per process there holds the GIL
        # while the reactor relays a new kernel's first reply (at 1,000
        # kernels a rewrite that looked at every entry stalled the reactor
        # for ~2 ms). Used by the writer thread only.
        #: link id -> (identity, kernel id) of its entry, and the entry as JSON.
        self._keys: dict[str, tuple[ProcessIdentity, str | None]] = {}
        self._texts: dict[str, str] = {}
        #: The processes (link id -> pid) and kernels (pid -> kernel id) written.
        self._written: dict[str, int] = {}
        self._written_kernels: dict[int, str] = {}
        self._link_of_pid: dict[int, str] = {}
        #: Links read again at every write: not read yet (or gone from
        #: /proc), or, as root, not yet switched to their own uid.
        self._unsettled: set[str] = set()

    @property
    def nursery_pid(self) -> int:
        return self.nursery.pid if self.nursery is not None else 0

    @nursery_pid.setter
    def nursery_pid(self, pid: int) -> None:
        self.nursery = ProcessIdentity.of(pid, parent=os.getpid())

    def _identity(self, link: str, pid: int) -> ProcessIdentity | None:
        with self._lock:
            known = self._identities.get(link)
        if known is not None and known.pid == pid:
            if os.geteuid() == 0 and known.uid in (None, 0):
                # It may not have changed to its own uid yet when first read.
                uid = _uid(pid)
                if uid is not None and uid != known.uid and known.alive():
                    known = attrs.evolve(known, uid=uid)
                    with self._lock:
                        self._identities[link] = known
            return known
        parent = self.nursery.pid if self.nursery is not None else None
        found = ProcessIdentity.of(pid, parent=parent)
        if found is not None:
            with self._lock:
                self._identities[link] = found
        return found

    def kernel_identities(self) -> dict[str, ProcessIdentity]:
        """Link id -> identity of the kernel processes last recorded.

        Read in the reactor thread when the nursery is lost: it has not
        cleaned up after its kernels, so the server does (L{end_leftovers}).
        """
        with self._lock:
            return dict(self._identities)

    def write(self, kernels: dict[str, int], processes: dict[str, int] | None = None) -> None:
        """Write the record (in a thread: it reads /proc and writes a file).

        @param kernels: kernel id -> pid of its process.
        @param processes: link id -> pid of every kernel process, pooled
            ones included, and the kernel id it serves (if any) by pid.
        """
        by_pid = {pid: kernel_id for kernel_id, pid in kernels.items()}
        if processes is None:  # callers that know only bound kernels
            processes = {f"pid-{pid}": pid for pid in kernels.values()}
        self._refresh(processes, by_pid)
        data = {
            "version": RECORD_VERSION,
            "server": self._server.to_json() if self._server else None,
            # For version 1 readers (an older cellmux sharing the state dir).
            "pid": os.getpid(),
            "cmdline": self._cmdline,
            "runtime_dir": self._runtime_dir,
            "owns_runtime_dir": self._owns_runtime_dir,
            "nursery": self.nursery.to_json() if self.nursery else None,
            # Kernel ids whose processes were not (yet) read: still lost on a crash.
            "kernels": sorted(kernels),
        }
        # json.dumps, not json.dump: only the one-shot form uses the C encoder.
        text = json.dumps(data)[:-1] + ', "processes": [' + ", ".join(self._texts.values()) + "]}"
        fd, tmp = tempfile.mkstemp(dir=self._dir, prefix=f".tmp-{self.path.stem}-")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, self.path)
        except BaseException:
            # A full disk must not leave a temporary file behind each time.
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _refresh(self, processes: dict[str, int], by_pid: dict[int, str]) -> None:
        """Re-encode the entries of what changed since the last write.

        The differences are set operations on dict views (C code): with a
        thousand unchanged processes they cost microseconds of GIL, where a
        Python loop over all of them cost milliseconds.
        """
        written = self._written
        gone = written.items() - processes.items()
        new = processes.items() - written.items()
        for link, pid in gone:  # ended, or (a link's new pid) replaced below
            self._keys.pop(link, None)
            self._texts.pop(link, None)
            self._unsettled.discard(link)
            if self._link_of_pid.get(pid) == link:
                del self._link_of_pid[pid]
        if gone:
            with self._lock:
                for link in self._identities.keys() - processes.keys():
                    del self._identities[link]
        redo = self._unsettled | {link for link, _ in new}
        for link, pid in new:
            self._link_of_pid[pid] = link
        for pid, _ in by_pid.items() ^ self._written_kernels.items():
            bound = self._link_of_pid.get(pid)
            if bound is not None:  # a kernel bound to, or gone from, a process
                redo.add(bound)
        for link in redo:
            self._encode(link, processes[link], by_pid)
        self._written = dict(processes)
        self._written_kernels = by_pid

    def _encode(self, link: str, pid: int, by_pid: dict[int, str]) -> None:
        identity = self._identity(link, pid)
        if identity is None:  # ended meanwhile, or not ours to name
            self._keys.pop(link, None)
            self._texts.pop(link, None)
            self._unsettled.add(link)
            return
        if os.geteuid() == 0 and identity.uid in (None, 0):
            self._unsettled.add(link)  # _identity reads its uid again
        else:
            self._unsettled.discard(link)
        key = (identity, by_pid.get(pid))
        if self._keys.get(link) != key:
            self._keys[link] = key
            self._texts[link] = json.dumps({"link": link, "kernel": key[1], **identity.to_json()})

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class RecordKeeper:
    """Keeps a L{ServerRecord} current without making the reactor wait.

    Writing the record (a temporary file and a rename) took 0.3 to 1.4 ms on
    a quiet disk, and the reactor has clients waiting: so the write runs in
    the reactor's thread pool. Changes are coalesced: one write, C{delay}
    seconds after the first change of a burst (after the response that
    caused it). Writes never overlap: a change during a write is written
    after it, so the file always ends with the latest state.

    @param kernels: the current kernel id -> pid map, read in the reactor
        thread just before each write.
    @param processes: the current link id -> pid map of every kernel
        process (pooled ones included), read likewise; None: kernels only.
    @param new_processes: a count that grows whenever a process was forked
        or changed its uid; a change that moved it is written after
        C{new_process_delay} instead of C{delay} (None: always C{delay}).
    """

    log = Logger()

    def __init__(
        self,
        reactor,
        record: ServerRecord,
        kernels: Callable[[], dict[str, int]],
        delay: float,
        processes: Callable[[], dict[str, int]] | None = None,
        new_processes: Callable[[], int] | None = None,
        new_process_delay: float = RECORD_DELAY_NEW_PROCESS,
    ) -> None:
        self._reactor = reactor
        self._new_processes = new_processes
        self._new_process_delay = new_process_delay
        self._seen_new = new_processes() if new_processes is not None else 0
        self._record = record
        self._kernels = kernels
        self._processes = processes
        self._delay = delay
        self._call = None
        self._writing: defer.Deferred | None = None
        self._again = False
        self._closed = False
        self._retry = None

    def changed(self) -> None:
        """The kernels changed: write the record soon."""
        if self._closed:
            return
        delay = self._delay
        if self._new_processes is not None:
            count = self._new_processes()
            if count != self._seen_new:
                self._seen_new = count
                delay = min(delay, self._new_process_delay)
        if self._writing is not None:
            self._again = True  # written as soon as the write ends
        elif self._call is None or not self._call.active():
            self._call = self._reactor.callLater(delay, self._write)
        elif self._call.getTime() > self._reactor.seconds() + delay:
            self._call.reset(delay)  # a new process joins a later write: sooner

    def _write(self) -> None:
        self._again = False
        kernels = self._kernels()
        processes = self._processes() if self._processes is not None else None
        d = threads.deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), self._record.write, kernels, processes
        )
        d.addErrback(self._failed)
        d.addBoth(self._written)
        self._writing = d

    def _failed(self, failure) -> None:
        if failure.check(OSError):
            self.log.warn("cannot write the server record: {error}", error=failure.value)
        else:
            self.log.failure("writing the server record failed", failure)
        # Try again later even if nothing changes (a disk that was full).
        if not self._closed and (self._retry is None or not self._retry.active()):
            self._retry = self._reactor.callLater(RETRY_SECONDS, self.changed)

    def _written(self, _: object) -> None:
        self._writing = None
        if self._again and not self._closed:
            self._write()

    async def close(self, *, remove: bool = True) -> None:
        """Let a write in progress finish, then remove the record.

        @param remove: False keeps it, for the next start's sweep to finish
            what this server could not (its runtime directory).
        """
        self._closed = True
        for call in (self._call, self._retry):
            if call is not None and call.active():
                call.cancel()
        if self._writing is not None:
            await self._writing
        if remove:
            self._record.remove()


def end_leftovers_of(
    record: ServerRecord, runtime_dir: str, uid_range: tuple[int, int] | None
) -> defer.Deferred:
    """L{end_leftovers} in a thread for the kernels C{record} last named,
    which died with their nursery; logs what it did and never fails."""
    kernels = record.kernel_identities()  # before the record forgets them
    kernels_dir = os.path.join(runtime_dir, "kernels")
    d = threads.deferToThread(end_leftovers, kernels, kernels_dir, uid_range)
    d.addCallback(
        lambda killed: log.warn(
            "the nursery died: ended {killed} process(es) its kernels left, removed "
            "their directories",
            killed=killed,
        )
    )
    d.addErrback(lambda f: log.failure("cleaning up after the nursery failed", f))
    return d


def end_leftovers(
    kernels: dict[str, ProcessIdentity],
    kernels_dir: str,
    uid_range: tuple[int, int] | None = None,
) -> int:
    """Clean up after the kernels of a nursery that died (blocking).

    Their processes died with it, but not what they started; their
    directories stay, since the nursery removes them when it reaps a kernel.
    """
    killed = end_kernel_processes(kernels.values(), uid_range)
    deadline = time.monotonic() + SWEEP_REMOVAL_SECONDS
    for link in kernels:
        for name in (link, link + ".tmp"):
            removal = remove_tree(os.path.join(kernels_dir, name), deadline=deadline)
            if not removal:
                log.warn(
                    "could not remove {path}: {reason}",
                    path=os.path.join(kernels_dir, name),
                    reason=removal.reason,
                )
    return killed


# -- the sweep at start --------------------------------------------------------------


@attrs.frozen
class Sweep:
    """What L{reap_orphans} found and did."""

    #: Kernel ids of dead servers: their clients are told "kernel lost".
    lost: frozenset[str] = frozenset()
    #: Runtime directories of servers that are still running.
    busy_runtime_dirs: frozenset[str] = frozenset()
    #: Processes killed.
    killed: int = 0
    #: Records kept because something could not be removed in time.
    unfinished: int = 0
    #: What is still to be removed (when the caller removes it later).
    pending: tuple[PendingRemoval, ...] = ()


@attrs.frozen
class _DeadServer:
    path: Path
    runtime_dir: str | None
    owns_runtime_dir: bool
    nursery: ProcessIdentity | None
    processes: tuple[tuple[str, ProcessIdentity], ...]
    kernel_ids: frozenset[str]
    label: str


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _server_alive(data: dict[str, Any], me: ProcessIdentity | None) -> bool:
    """Whether the server that wrote a record still runs.

    By identity: a restarted server that got the dead one's pid is not it.
    A record without an identity (version 1) counts as alive only if its pid
    runs with the command line it recorded and is not this process.
    """
    server = data.get("server")
    if isinstance(server, dict):
        identity = ProcessIdentity.from_json(server)
        if me is not None and (identity.pid, identity.start) == (me.pid, me.start):
            return True  # this very process (a record it wrote earlier)
        return identity.alive()
    pid = int(data.get("pid", 0))
    mark = str(data.get("cmdline", "")).encode()
    if pid <= 0 or pid == os.getpid() or not mark:
        return False
    try:
        return mark in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _dead_server(path: Path, data: dict[str, Any]) -> _DeadServer:
    runtime_dir = data.get("runtime_dir")
    runtime_dir = runtime_dir if isinstance(runtime_dir, str) and runtime_dir else None
    nursery = data.get("nursery")
    processes = []
    kernel_ids = {str(k) for k in data.get("kernels") or ()}
    if isinstance(data.get("kernels"), dict):  # version 1: id -> bare pid
        kernel_ids = set(data["kernels"])
    for entry in data.get("processes") or ():
        processes.append((str(entry["link"]), ProcessIdentity.from_json(entry)))
        if entry.get("kernel"):
            kernel_ids.add(str(entry["kernel"]))
    server = data.get("server") or {}
    return _DeadServer(
        path=path,
        runtime_dir=runtime_dir,
        owns_runtime_dir=bool(data.get("owns_runtime_dir")),
        nursery=ProcessIdentity.from_json(nursery) if isinstance(nursery, dict) else None,
        processes=tuple(processes),
        kernel_ids=frozenset(kernel_ids),
        label=str(server.get("pid") or data.get("pid") or "?"),
    )


def _same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _remove_stale_temps(servers: Path) -> None:
    now = time.time()
    for temp in servers.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if now - temp.lstat().st_mtime > STALE_TEMP_SECONDS:
                temp.unlink()


def _only_ours(root: str) -> bool:
    """Whether a directory looks like one a server made and nothing else used.

    A record is only a file: before removing a whole tree on its word, check
    that the tree is a cellmux runtime directory and holds nothing but what
    cellmux puts there (the default database never lived in one it made).
    """
    if not os.path.basename(os.path.normpath(root)).startswith("cellmux-"):
        return False
    try:
        names = os.listdir(root)
    except OSError:
        return False
    return all(n in ("kernels", "links", "link.sock") for n in names)


def _leftover_paths(dead: _DeadServer, busy: Iterable[str]) -> list[str]:
    """What a dead server made in its runtime directory, to be removed.

    A runtime directory the server made itself (a temporary one) goes
    whole. A configured one is never removed: only the kernels'
    directories in its ``kernels/`` go, listed now, before a new nursery
    adds its own, and their link endpoints in ``links/``. The shared link
    socket older versions had is removed at once (nothing listens on it).
    """
    root = dead.runtime_dir
    if root is None or not os.path.isdir(root):
        return []
    if any(_same_dir(root, other) for other in busy):
        # A live server took the directory over: only the recorded kernels'
        # directories are certainly the dead server's.
        return [
            os.path.join(root, sub, name)
            for link, _ in dead.processes
            for sub, name in (("kernels", link), ("kernels", link + ".tmp"), ("links", link))
        ]
    if dead.owns_runtime_dir and _only_ours(root):
        return [root]
    # Configured (or not recognisably ours): only what cellmux made in it.
    sock = os.path.join(root, "link.sock")
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.lstat(sock).st_mode):
            os.unlink(sock)
    found = []
    for sub in ("kernels", "links"):  # working directories; link endpoints
        try:
            names = os.listdir(os.path.join(root, sub))
        except OSError:
            continue
        found += [os.path.join(root, sub, n) for n in names if _LINK_ENTRY.fullmatch(n)]
    return found


@attrs.frozen
class PendingRemoval:
    """Files a dead server left, and its record, removed once they are gone."""

    record: Path
    label: str
    paths: tuple[str, ...]


def finish_removals(
    pending: Iterable[PendingRemoval], seconds: float = SWEEP_REMOVAL_SECONDS
) -> int:
    """Remove what dead servers' kernels left on disk (blocking, in a thread).

    A kernel's tree can take long to remove (thousands of directories cost
    seconds on a slow disk), so the server starts serving meanwhile. A
    record goes once everything it names is gone; what is not done within
    C{seconds} stays recorded for the next start. Never raises.

    @return: how many records were kept for the next start.
    """
    deadline = time.monotonic() + seconds
    unfinished = 0
    for removal in pending:
        failed = []
        for path in removal.paths:
            outcome = remove_tree(path, deadline=deadline)
            if not outcome:
                failed.append(f"{path}: {outcome.reason}")
        if failed:
            unfinished += 1
            log.warn(
                "could not remove everything server {pid} left; trying again at the next "
                "start: {failed}",
                pid=removal.label,
                failed="; ".join(failed[:5]),
            )
        else:
            with contextlib.suppress(OSError):
                removal.record.unlink(missing_ok=True)
    return unfinished


def reap_orphans(
    state_dir: str,
    *,
    uid_range: tuple[int, int] | None = None,
    removal_seconds: float = SWEEP_REMOVAL_SECONDS,
    remove_files: bool = True,
) -> Sweep:
    """End what dead servers left behind (blocking: run it in a thread).

    For each record in C{state_dir} whose server no longer runs: kill its
    nursery and kernel processes, what is left of their sessions and (as
    root) of their uids in C{uid_range}, each only after checking its
    identity; then remove the files its kernels left and the record. Never
    raises for what it finds on disk or in /proc.

    @param remove_files: False leaves the removal to the caller
        (L{finish_removals} with L{Sweep.pending}), so that it need not wait.
    """
    servers = Path(state_dir) / "servers"
    if not servers.is_dir():
        return Sweep()
    _remove_stale_temps(servers)
    me = ProcessIdentity.of(os.getpid())
    dead: list[_DeadServer] = []
    busy: set[str] = set()
    for path in sorted(servers.glob("*.json")):
        data = _read_record(path)
        if data is None:
            log.warn("ignoring unreadable server record {path}", path=str(path))
            continue
        try:
            if _server_alive(data, me):
                if isinstance(data.get("runtime_dir"), str):
                    busy.add(data["runtime_dir"])
                continue
            dead.append(_dead_server(path, data))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            log.warn("ignoring unreadable server record {path}: {e}", path=str(path), e=e)
    lost: set[str] = set()
    killed = 0
    pending = []
    for server in dead:
        before = killed
        if server.nursery is not None:
            killed += server.nursery.kill()
        killed += end_kernel_processes(
            (identity for _link, identity in server.processes), uid_range
        )
        pending.append(
            PendingRemoval(server.path, server.label, tuple(_leftover_paths(server, busy)))
        )
        lost.update(server.kernel_ids)
        log.warn(
            "server {pid} had stopped without cleaning up: ended {killed} process(es), "
            "{n} kernel(s) lost",
            pid=server.label,
            killed=killed - before,
            n=len(server.kernel_ids),
        )
    if not remove_files:
        return Sweep(frozenset(lost), frozenset(busy), killed, 0, tuple(pending))
    unfinished = finish_removals(pending, removal_seconds)
    return Sweep(frozenset(lost), frozenset(busy), killed, unfinished)
