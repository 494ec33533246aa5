"""Several simulated machines on this one, for the multi-host tests.

A L{Topology} is a set of network namespaces joined by one bridge: the
bridge lives in a namespace of its own (the "lan"), and each simulated
machine is a namespace with loopback up and one veth pair whose other end is
a port of that bridge. Addresses are private (``10.213.0.0/24``) and exist
only inside those namespaces: no interface, address or route is added to the
namespace the tests run in, and nothing is routed anywhere else, so the
traffic stays inside the topology (and on each namespace's loopback).

Both ends of every veth are created directly in their namespaces (``ip link
add … netns``), so no interface ever appears, even briefly, in the host's
namespace, and parallel runs cannot collide on interface names.

Names: every namespace is called ``cmxn<pid>-<random>-<role>``, the pid
being the test process's. L{sweep_leftovers} (called by L{Topology.create})
deletes the namespaces of a run whose process is gone (a run that was killed
before its teardown), after killing what still runs in them; another live
run's namespaces are left alone.

Processes: L{Topology.spawn} starts a command in a machine's namespace with
``ip netns exec`` (which execs it: the pid is the command's own), in a
session and process group of its own, its output in a log file. Teardown
ends each by its pid (SIGTERM, then SIGKILL to its group), then kills by pid
whatever else still runs in a namespace (``ip netns pids``), then deletes
the namespaces; it never raises and may be called twice.

The test process as a client: L{Topology.call_in} runs a function in a new
thread that first joins a machine's network namespace (``setns`` applies to
the calling thread only). Sockets that thread opens, and those of threads it
starts (asyncio's executor, the sync client's loop thread), live in that
namespace, so the test's own client code reaches the machines by their
private addresses with no veth into the test's namespace.

Root only (namespaces, veths, ``setns``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import attrs

import apt_packages
from db_fixtures import PostgresCluster, ensure_postgres
from haproxy_fixtures import ensure_haproxy

T = TypeVar("T")

#: Every namespace this module makes starts with this.
PREFIX = "cmxn"
_NAME = re.compile(rf"^{PREFIX}(?P<pid>\d+)-[0-9a-f]+-")
#: The simulated machines' network; .1 is left free, machines get .10 upwards.
SUBNET = "10.213.0"
PREFIX_LENGTH = 24
BRIDGE = "br0"
#: A machine's interface, inside its namespace.
INTERFACE = "eth0"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def ensure_iproute2() -> None:
    """The ``ip`` command, installed with apt-get when missing."""
    apt_packages.ensure("iproute2", lambda: shutil.which("ip"))


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def namespaces() -> list[str]:
    """The names of every named network namespace (``ip netns list``)."""
    out = _ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def namespace_pids(namespace: str) -> list[int]:
    """Processes whose network namespace is C{namespace}."""
    result = _ip("netns", "pids", namespace, check=False)
    return [int(p) for p in result.stdout.split() if p.isdigit()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_pids(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def delete_namespace(namespace: str) -> None:
    """Kill what runs in C{namespace} (by pid) and delete it. Never raises."""
    with contextlib.suppress(Exception):
        for _ in range(20):
            pids = namespace_pids(namespace)
            if not pids:
                break
            _kill_pids(pids)
            time.sleep(0.05)
        _ip("netns", "delete", namespace, check=False)


def sweep_leftovers() -> list[str]:
    """Delete the namespaces of runs whose process is gone; their names."""
    swept = []
    for name in namespaces():
        match = _NAME.match(name)
        if match and not _pid_alive(int(match["pid"])):
            delete_namespace(name)
            swept.append(name)
    return swept


@attrs.frozen
class Machine:
    """One simulated machine: a namespace with one interface on the lan."""

    role: str
    namespace: str
    address: str
    #: Its veth's end in the lan namespace (a bridge port).
    port: str


@attrs.define(eq=False)
class Process:
    """A command running in a machine's namespace."""

    machine: Machine
    popen: subprocess.Popen
    log_path: str

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send C{sig} to the process (not its group: what it started stays)."""
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(sig)
        if sig == signal.SIGKILL:
            self.popen.wait(10)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL to its whole process group. Never raises."""
        with contextlib.suppress(Exception):
            if self.popen.poll() is None:
                self.popen.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(timeout)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)

    def wait_for_log(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        """Wait until the log matches C{pattern}; fail if the process ends first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log())
            if match:
                return match
            if not self.alive():
                raise RuntimeError(
                    f"{self.machine.role}: {self.popen.args[4:8]} ended "
                    f"({self.popen.returncode}):\n{self.log()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.machine.role}: {pattern!r} not in its log within {timeout} s:\n"
                    f"{self.log()[-3000:]}"
                )
            time.sleep(0.05)


@attrs.define(eq=False)
class Topology:
    """Network namespaces joined by a bridge; see the module's docstring."""

    run: str
    lan: str
    directory: str
    machines: dict[str, Machine] = attrs.Factory(dict)
    processes: list[Process] = attrs.Factory(list)
    cleanups: list[Callable[[], object]] = attrs.Factory(list)
    _next_host: int = 10

    @classmethod
    def create(cls) -> Topology:
        """A new, empty lan (after sweeping what killed runs left)."""
        if os.geteuid() != 0:
            raise RuntimeError("network namespaces need root")
        ensure_iproute2()
        sweep_leftovers()
        run = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        directory = tempfile.mkdtemp(prefix="cellmux-nn-")
        topology = cls(run=run, lan=f"{run}-lan", directory=directory)
        try:
            _ip("netns", "add", topology.lan)
            _ip("-n", topology.lan, "link", "set", "lo", "up")
            _ip("-n", topology.lan, "link", "add", BRIDGE, "type", "bridge")
            _ip("-n", topology.lan, "link", "set", BRIDGE, "up")
        except BaseException:
            topology.teardown()
            raise
        return topology

    def add_machine(self, role: str) -> Machine:
        """A new machine on the lan, its interface up with the next address."""
        if role in self.machines or not re.fullmatch(r"[a-z][a-z0-9]{0,11}", role):
            raise ValueError(f"bad or repeated role {role!r}")
        namespace = f"{self.run}-{role}"
        address = f"{SUBNET}.{self._next_host}"
        self._next_host += 1
        machine = Machine(role, namespace, address, f"v{role}")
        # Registered before it exists, so that teardown removes a half-made one.
        self.machines[role] = machine
        _ip("netns", "add", namespace)
        _ip("-n", namespace, "link", "set", "lo", "up")
        _ip(
            "link", "add", machine.port, "netns", self.lan,
            "type", "veth", "peer", "name", INTERFACE, "netns", namespace,
        )  # fmt: skip
        _ip("-n", self.lan, "link", "set", machine.port, "master", BRIDGE, "up")
        _ip("-n", namespace, "addr", "add", f"{address}/{PREFIX_LENGTH}", "dev", INTERFACE)
        _ip("-n", namespace, "link", "set", INTERFACE, "up")
        return machine

    def __getitem__(self, role: str) -> Machine:
        return self.machines[role]

    # -- links ------------------------------------------------------------------

    def cut(self, role: str) -> None:
        """Take a machine off the lan: its interface down (``ip link set … down``).

        Its processes keep running and keep their sockets; packets to and
        from it are lost, with no reset, as when a cable is pulled.
        """
        _ip("-n", self.machines[role].namespace, "link", "set", INTERFACE, "down")

    def restore(self, role: str) -> None:
        """Put a cut machine back (its address and route come back with the link)."""
        machine = self.machines[role]
        _ip("-n", machine.namespace, "link", "set", INTERFACE, "up")
        # Bringing a link down drops its prefix route; up brings it back, but
        # an address removed meanwhile would not be: make sure it is there.
        addresses = _ip("-n", machine.namespace, "-o", "addr", "show", "dev", INTERFACE).stdout
        if f" {machine.address}/" not in addresses:
            _ip(
                "-n", machine.namespace, "addr", "add",
                f"{machine.address}/{PREFIX_LENGTH}", "dev", INTERFACE,
            )  # fmt: skip

    # -- processes --------------------------------------------------------------

    def spawn(
        self,
        role: str,
        argv: list[str],
        *,
        name: str | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> Process:
        """Start C{argv} in machine C{role}'s namespace, in its own session.

        Standard output and error go to a log file in the topology's
        directory; C{env} adds to the test's environment.
        """
        machine = self.machines[role]
        log_path = os.path.join(self.directory, f"{name or role}.log")
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                ["ip", "netns", "exec", machine.namespace, *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=None if env is None else {**os.environ, **env},
                cwd=cwd,
            )
        process = Process(machine, popen, log_path)
        self.processes.append(process)
        return process

    def path(self, name: str) -> str:
        """A path in the topology's directory (removed at teardown)."""
        return os.path.join(self.directory, name)

    def call_in(self, role: str, function: Callable[[], T]) -> T:
        """Run C{function()} in a thread inside machine C{role}'s network namespace.

        Threads it starts stay in that namespace too, so an asyncio loop or a
        sync client made inside C{function} reaches the lan's addresses.
        """
        namespace_path = f"/run/netns/{self.machines[role].namespace}"
        outcome: dict[str, Any] = {}

        def main() -> None:
            try:
                fd = os.open(namespace_path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), f"setns({namespace_path})")
                finally:
                    os.close(fd)
                outcome["value"] = function()
            except BaseException as e:
                outcome["error"] = e

        thread = threading.Thread(target=main, name=f"in-{role}")
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    # -- teardown ---------------------------------------------------------------

    def teardown(self) -> None:
        """End every process, delete every namespace, remove the directory.

        Idempotent and never raises: it runs after failures too.
        """
        while self.cleanups:
            cleanup = self.cleanups.pop()
            with contextlib.suppress(Exception):
                cleanup()
        for process in reversed(self.processes):
            process.stop(timeout=10)
        self.processes.clear()
        for machine in list(self.machines.values()):
            delete_namespace(machine.namespace)
        delete_namespace(self.lan)
        self.machines.clear()
        shutil.rmtree(self.directory, ignore_errors=True)

    def alive_namespaces(self) -> list[str]:
        """This topology's namespaces that still exist."""
        return [n for n in namespaces() if n.startswith(self.run)]


@contextlib.contextmanager
def topology() -> Iterator[Topology]:
    """A L{Topology}, torn down on the way out whatever happened."""
    built = Topology.create()
    try:
        yield built
    finally:
        built.teardown()


# -- services on the machines ---------------------------------------------------


#: The line a cellmux server prints once it listens.
SERVING = r"cellmux is serving at (?P<url>\S+)\?token="


def start_cellmux(
    topology: Topology,
    role: str,
    args: list[str],
    *,
    name: str | None = None,
    command: tuple[str, ...] = ("serve",),
    env: dict[str, str] | None = None,
    ready: str | None = SERVING,
) -> Process:
    """``python -m cellmux COMMAND ARGS`` on machine C{role}, with a runtime
    and a state directory of its own in the topology's directory; waits for
    C{ready} in its log (None: does not wait)."""
    name = name or role
    runtime_dir = topology.path(f"{name}-rt")
    state_dir = topology.path(f"{name}-state")
    argv = [sys.executable, "-m", "cellmux", *command]
    if command[0] == "serve":
        argv += ["--runtime-dir", runtime_dir, "--state-dir", state_dir]
    process = topology.spawn(role, [*argv, *args], name=name, env=env)
    if ready is not None:
        process.wait_for_log(ready)
    return process


def start_haproxy(
    topology: Topology,
    role: str,
    config: str,
    *,
    env: dict[str, str] | None = None,
) -> Process:
    """HAProxy in the foreground (``-db``) on machine C{role}.

    @param config: the path of a config file, or a config's text.
    @param env: variables the config reads (``"${NAME}"``).
    """
    binary = ensure_haproxy()
    if "\n" in config:
        path = topology.path(f"{role}.cfg")
        with open(path, "w") as f:
            f.write(config)
    else:
        path = config
    full_env = {**os.environ, **(env or {})}
    check = subprocess.run([binary, "-c", "-f", path], capture_output=True, text=True, env=full_env)
    if check.returncode != 0:
        raise RuntimeError(f"haproxy refuses its config: {check.stdout}{check.stderr}")
    return topology.spawn(role, [binary, "-db", "-f", path], name=role, env=env)


@attrs.define
class NamespacedPostgres(PostgresCluster):
    """L{PostgresCluster} on a machine of a topology, listening on its address."""

    namespace: str = ""
    address: str = ""

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{self.address}:{self.port}/postgres"

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [os.path.join(self.bin_dir, argv[0]), *argv[1:]]
        command = ["runuser", "-u", "postgres", "--", *command]
        # pg_ctl's postmaster inherits the namespace; pg_ctl -w reaches it
        # over the Unix socket in the cluster's directory.
        return subprocess.run(
            ["ip", "netns", "exec", self.namespace, *command],
            check=check,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses={self.address} -k {self.directory} "
            "-c fsync=off -c max_connections=50"
        )
        result = self._run(
            "pg_ctl", "-D", self.data, "-l", os.path.join(self.directory, "log"),
            "-o", options, "-w", "-t", "60", "start",
            check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start: {result.stdout}{result.stderr}")


def start_postgres(topology: Topology, role: str) -> NamespacedPostgres:
    """A throwaway PostgreSQL on machine C{role} (port 5432 of its address),
    trust-authenticated; stopped and removed at teardown."""
    import pwd

    machine = topology[role]
    bin_dir = ensure_postgres()
    directory = tempfile.mkdtemp(prefix="pg-", dir=topology.directory)
    # The topology's directory is private to root: let postgres through.
    os.chmod(topology.directory, 0o711)
    entry = pwd.getpwnam("postgres")
    os.chown(directory, entry.pw_uid, entry.pw_gid)
    cluster = NamespacedPostgres(
        bin_dir, directory, 5432, namespace=machine.namespace, address=machine.address
    )
    topology.cleanups.append(cluster.stop)
    cluster._run("initdb", "-D", cluster.data, "-A", "trust", "-U", "postgres", "--no-sync")
    # Trust the lan too (initdb's default pg_hba.conf trusts local addresses only).
    with open(os.path.join(cluster.data, "pg_hba.conf"), "a") as f:
        f.write(f"host all all {SUBNET}.0/{PREFIX_LENGTH} trust\n")
    cluster.start()
    return cluster
