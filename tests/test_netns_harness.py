"""The multi-machine harness itself (tests/netns.py): machines reach each
other only inside the topology, a cut link cuts, teardown and the sweep of a
killed run's leftovers leave nothing behind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

import netns
from conftest import wait_for

ECHO = (
    "import socket, sys\n"
    "s = socket.create_server((sys.argv[1], 7007))\n"
    "print('listening', flush=True)\n"
    "while True:\n"
    "    c, _ = s.accept()\n"
    "    c.sendall(c.recv(100))\n"
    "    c.close()\n"
)


def _echo(address: str, timeout: float = 2.0) -> bytes:
    with socket.create_connection((address, 7007), timeout=timeout) as s:
        s.sendall(b"ping")
        return s.recv(100)


def test_machines_reach_each_other_only_inside_the_topology() -> None:
    with netns.topology() as topo:
        topo.add_machine("server")
        topo.add_machine("client")
        server = topo.spawn("server", [sys.executable, "-c", ECHO, topo["server"].address])
        server.wait_for_log("listening")
        address = topo["server"].address
        assert topo.call_in("client", lambda: _echo(address)) == b"ping"
        # The test's own namespace has no address of the lan, and no interface
        # of the topology appeared in it.
        mine = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
        assert netns.SUBNET not in mine
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        assert "vserver" not in links and "vclient" not in links

        topo.cut("server")
        with pytest.raises(OSError):
            topo.call_in("client", lambda: _echo(address, timeout=1.0))
        assert server.alive()
        topo.restore("server")
        assert topo.call_in("client", lambda: _echo(address)) == b"ping"

        pid = server.pid
        names = topo.alive_namespaces()
        assert len(names) == 3  # lan, server, client
    assert topo.alive_namespaces() == []
    assert not os.path.exists(topo.directory)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_teardown_after_a_failure_and_twice() -> None:
    topo = netns.Topology.create()
    try:
        topo.add_machine("a")
        with pytest.raises(ValueError):
            topo.add_machine("a")
        sleeper = topo.spawn("a", ["sleep", "600"])
    finally:
        topo.teardown()
    topo.teardown()
    assert topo.alive_namespaces() == []
    assert sleeper.popen.poll() is not None


def test_a_killed_runs_namespaces_are_swept_and_what_ran_in_them_killed() -> None:
    # A namespace named as a run whose process is gone (this child's pid,
    # once it has ended), with a process still inside it.
    ended = subprocess.Popen(["true"])
    ended.wait()
    name = f"{netns.PREFIX}{ended.pid}-abcdef-left"
    live = f"{netns.PREFIX}{os.getpid()}-abcdef-live"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "netns", "add", live], check=True)
    inside = subprocess.Popen(["ip", "netns", "exec", name, "sleep", "600"], start_new_session=True)
    try:
        # ip netns exec joins the namespace, then execs sleep: wait for it.
        wait_for(lambda: netns.namespace_pids(name) == [inside.pid])
        swept = netns.sweep_leftovers()
        assert name in swept
        assert live not in swept  # this run's own namespaces stay
        assert name not in netns.namespaces()
        assert inside.wait(10) == -9
    finally:
        netns.delete_namespace(name)
        netns.delete_namespace(live)
        if inside.poll() is None:
            inside.kill()
            inside.wait()
