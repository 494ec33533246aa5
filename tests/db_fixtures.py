"""Real databases and a real reactor for the store tests.

* L{PostgresCluster}: a throwaway PostgreSQL server in a temporary
  directory on a free port. Installed with apt-get when ``initdb`` and
  ``pg_ctl`` are missing (CI starts from a clean Debian machine, as root;
  PostgreSQL refuses to run as root, so the cluster runs as ``postgres``).
* L{reactor_thread}: Twisted's reactor running in a background thread, so
  that synchronous tests can call the stores through their Deferreds.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import inspect
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import time

import attrs

import apt_packages
from ports import free_port


def _pg_bin_dir() -> str | None:
    for name in ("initdb", "pg_ctl"):
        found = shutil.which(name)
        if found is None:
            break
    else:
        return os.path.dirname(os.path.realpath(shutil.which("pg_ctl")))
    # Debian keeps them off PATH, under /usr/lib/postgresql/<version>/bin.
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)
    return os.path.dirname(candidates[0]) if candidates else None


def ensure_postgres() -> str:
    """The directory of initdb and pg_ctl, installing PostgreSQL if needed."""
    return apt_packages.ensure("postgresql", _pg_bin_dir)


@attrs.define
class PostgresCluster:
    """A PostgreSQL server of its own, trust-authenticated on 127.0.0.1."""

    bin_dir: str
    directory: str
    port: int

    @property
    def data(self) -> str:
        return os.path.join(self.directory, "data")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [os.path.join(self.bin_dir, argv[0]), *argv[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, check=check, capture_output=True, text=True, timeout=120)

    @classmethod
    def create(cls) -> PostgresCluster:
        bin_dir = ensure_postgres()
        directory = tempfile.mkdtemp(prefix="cellmux-pg-")
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(directory, entry.pw_uid, entry.pw_gid)
        cluster = cls(bin_dir, directory, free_port())
        cluster._run("initdb", "-D", cluster.data, "-A", "trust", "-U", "postgres", "--no-sync")
        cluster.start()
        return cluster

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.directory} "
            "-c fsync=off -c max_connections=50"
        )
        result = self._run(
            "pg_ctl",
            "-D",
            self.data,
            "-l",
            os.path.join(self.directory, "log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start: {result.stdout}{result.stderr}")

    def stop(self) -> None:
        """Stop the server (fast shutdown: connections are cut)."""
        self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop", check=False)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


class ReactorThread:
    """The global reactor, run once in a daemon thread for the whole session."""

    _instance: ReactorThread | None = None

    def __init__(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self._thread = threading.Thread(
            target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not reactor.running:
            if time.monotonic() > deadline:
                raise RuntimeError("the reactor did not start")
            time.sleep(0.01)
        atexit.register(self.stop)

    def call(self, f, *args, **kwargs):
        """Run C{f} in the reactor thread; wait for its (Deferred) result."""
        from twisted.internet import defer
        from twisted.internet.threads import blockingCallFromThread

        def in_reactor():
            result = f(*args, **kwargs)
            return defer.ensureDeferred(result) if inspect.iscoroutine(result) else result

        return blockingCallFromThread(self.reactor, in_reactor)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.reactor.callFromThread(self.reactor.stop)
        self._thread.join(10)


def reactor_thread() -> ReactorThread:
    if ReactorThread._instance is None:
        ReactorThread._instance = ReactorThread()
    return ReactorThread._instance


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as f:
                # the parent pid is the 2nd field after the ")" closing the name
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found


def postgres_processes(cluster: PostgresCluster) -> list[int]:
    """The postmaster and its children (backends and helpers)."""
    with open(os.path.join(cluster.data, "postmaster.pid")) as f:
        postmaster = int(f.readline())
    return [postmaster, *_children(postmaster)]


def create_concurrently(store, n: int):
    """Start C{n} permalink creations at once; a Deferred of all of them."""
    from twisted.internet import defer

    from cellmux.server.store import create_permalink

    return defer.gatherResults(
        [
            defer.ensureDeferred(
                create_permalink(
                    store, code=f"n = {i}", language="python", options_json="{}", now=1.0
                )
            )
            for i in range(n)
        ],
        consumeErrors=True,
    )
