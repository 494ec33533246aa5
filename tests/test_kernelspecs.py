"""Kernelspec discovery, the adaptor's sans-IO parts, spawn orders for other kernels (fast)."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jupyter_client.session import Session
from twisted.internet import defer, task

from cellmux.kernel.adaptor import Heartbeat, Launch, StderrTail, kernel_argv, kernel_env, sign
from cellmux.protocol import nursery as wire
from cellmux.protocol.errors import ProtocolError
from cellmux.server.kernels import KernelNotFound, KernelState
from cellmux.server.kernelspecs import (
    DEFAULT_SPEC,
    REFRESH_AFTER,
    KernelSpec,
    KernelSpecs,
    discover,
)
from test_lifecycle_units import FakeNursery, Harness

BASH = KernelSpec(
    name="bash", display_name="Bash", language="bash", argv=["bash-kernel", "{connection_file}"]
)


# -- discovery ------------------------------------------------------------------


def _install(root, name: str, spec) -> None:
    directory = root / "kernels" / name
    directory.mkdir(parents=True)
    text = spec if isinstance(spec, str) else json.dumps(spec)
    (directory / "kernel.json").write_text(text)
    (directory / "logo-64x64.png").write_bytes(b"\x89PNG")


def test_discover_finds_installed_specs_and_leaves_out_broken_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    _install(tmp_path, "echo", {"argv": ["echo", "{connection_file}"], "display_name": "Echo"})
    _install(
        tmp_path,
        "quiet",
        {"argv": ["q"], "display_name": "Q", "interrupt_mode": "message", "env": {"A": "b"}},
    )
    _install(tmp_path, "python3", {"argv": ["python3", "-m", "x"], "display_name": "Other"})
    _install(tmp_path, "no-argv", {"argv": [], "display_name": "None"})
    _install(tmp_path, "bad-mode", {"argv": ["x"], "interrupt_mode": "telepathy"})
    _install(tmp_path, "garbage", "{")
    warnings: list[tuple[str, str]] = []
    found = discover(lambda name, why: warnings.append((name, why)))
    assert found["echo"].argv == ("echo", "{connection_file}")
    assert found["echo"].resource_dir == str(tmp_path / "kernels" / "echo")
    assert found["quiet"].interrupt_mode == "message"
    assert found["quiet"].launch()["env"] == {"A": "b"}
    assert DEFAULT_SPEC not in found  # ours, forked, shadows any python3 on disk
    assert {"no-argv", "bad-mode", "garbage"}.isdisjoint(found)
    assert {name for name, _ in warnings} >= {"no-argv", "bad-mode", "garbage"}


def test_specs_are_read_again_on_demand_but_not_more_than_once_a_second():
    clock = task.Clock()
    reads: list[float] = []
    on_disk: dict[str, KernelSpec] = {}

    def find(warn):
        reads.append(clock.seconds())
        return dict(on_disk)

    specs = KernelSpecs(clock, find)
    assert specs.get(DEFAULT_SPEC).forked  # the fast path needs no read
    assert reads == []
    assert specs.get("bash") is None
    on_disk["bash"] = BASH
    assert specs.get("bash") is None  # within REFRESH_AFTER of the last read
    assert list(specs.all()) == [DEFAULT_SPEC]
    clock.advance(REFRESH_AFTER)
    assert specs.get("bash") is BASH
    assert list(specs.all()) == [DEFAULT_SPEC, "bash"]
    assert len(reads) == 2
    assert specs.get("bash") is BASH  # known: no read
    assert len(reads) == 2


def test_the_model_gives_clients_no_argv_and_python3_its_protocol_version():
    assert BASH.model()["argv"] == []
    assert "kernel_protocol_version" not in BASH.model()
    assert BASH.launch()["argv"] == ["bash-kernel", "{connection_file}"]
    python = KernelSpecs(task.Clock(), lambda warn: {}).get(DEFAULT_SPEC)
    assert python.launch() is None
    assert python.model()["kernel_protocol_version"] == "5.5"


# -- the spawn order ------------------------------------------------------------


def test_a_spawn_carries_the_kernelspec_and_rejects_bad_ones():
    launch = BASH.launch()
    line = wire.encode(wire.Spawn("ab", "cd", "ipc:///x", None, launch))
    assert wire.decode_command(line).kernel == launch
    assert "kernel" not in json.loads(wire.encode(wire.Spawn("ab", "cd", "ipc:///x")))
    for bad in (
        {"name": "x", "argv": []},
        {"name": "x", "argv": [1]},
        {"argv": ["x"]},
        {"name": "x", "argv": ["x"], "env": {"A": 1}},
        {"name": "x", "argv": ["x"], "interrupt_mode": "telepathy"},
        "bash",
    ):
        data = {"cmd": "spawn", "link": "ab", "secret": "cd", "kernel": bad}
        with pytest.raises(ProtocolError):
            wire.decode_command(json.dumps(data).encode())


class SpecNursery(FakeNursery):
    def __init__(self) -> None:
        super().__init__()
        self.kernels: dict[str, dict | None] = {}

    def spawn(self, link, secret, endpoint, kernel=None) -> defer.Deferred:
        self.kernels[link] = kernel
        return super().spawn(link, secret, endpoint)


def test_other_kernels_start_cold_with_their_spec_and_restart_with_it():
    h = Harness(pool_size=1)
    h.make_ready()
    assert h.manager.pooled == 1
    nursery = SpecNursery()
    h.manager.bind(nursery, h.router, h._start_nursery)
    h.manager.specs = KernelSpecs(h.clock, lambda warn: {"bash": BASH})
    d = defer.ensureDeferred(h.manager.create("bash"))
    h.make_ready()
    kernel = h.successResult(d)
    assert kernel.name == "bash" and kernel.state is KernelState.IDLE
    assert h.manager.pooled == 1  # the pool is for python3 only
    assert nursery.kernels[kernel.incarnation.link] == BASH.launch()
    d = defer.ensureDeferred(h.manager.restart(kernel))
    h.make_ready()
    h.successResult(d)
    assert nursery.kernels[kernel.incarnation.link] == BASH.launch()
    h.create()  # python3, from the pool; its replacement is forked
    h.clock.advance(1)
    assert list(nursery.kernels.values())[-1] is None


def test_an_unknown_spec_is_not_found_and_an_uninstalled_one_fails_its_restart():
    h = Harness()
    on_disk = {"bash": BASH}
    h.manager.specs = KernelSpecs(h.clock, lambda warn: dict(on_disk))
    nursery = SpecNursery()
    h.manager.bind(nursery, h.router, h._start_nursery)
    d = defer.ensureDeferred(h.manager.create("cobol"))
    with pytest.raises(KernelNotFound, match="no kernel spec named 'cobol'"):
        h.successResult(d)
    d = defer.ensureDeferred(h.manager.create("bash"))
    h.make_ready()
    kernel = h.successResult(d)
    on_disk.clear()
    h.clock.advance(REFRESH_AFTER)
    h.manager.specs.refresh()
    d = defer.ensureDeferred(h.manager.restart(kernel))
    with pytest.raises(KernelNotFound):
        h.successResult(d)
    assert kernel.state is KernelState.DEAD
    assert kernel.cause == "restart failed: no kernel spec named 'bash'"


# -- the adaptor's parts ------------------------------------------------------------


def test_argv_and_environment_as_jupyter_client_fills_them():
    launch = Launch(
        name="k",
        argv=["run", "-f", "{connection_file}", "--res={resource_dir}"],
        env={"PATH": "/opt/k/bin:${PATH}", "LEFT": "${NOPE}"},
        resource_dir="/specs/k",
    )
    assert kernel_argv(launch, "/w/c.json") == ["run", "-f", "/w/c.json", "--res=/specs/k"]
    env = kernel_env({"PATH": "/usr/bin", "HOME": "."}, launch)
    assert env == {"PATH": "/opt/k/bin:/usr/bin", "HOME": ".", "LEFT": "${NOPE}"}
    assert Launch.from_dict(launch.to_dict()) == launch


def test_signatures_are_those_jupyter_client_checks():
    session = Session(key=b"secret-key")
    msg = session.msg("execute_request", {"code": "1"})
    keys = ("header", "parent_header", "metadata", "content")
    parts = [json.dumps(msg[k], default=str).encode() for k in keys]
    assert sign(b"secret-key", [*parts, b"a buffer"]) == session.sign(parts)


def test_stderr_tail_keeps_the_last_bytes():
    tail = StderrTail(limit=8)
    for chunk in (b"0123", b"456789", b"ab\n"):
        tail.feed(chunk)
    assert bytes(tail.data) == b"56789ab\n"
    assert tail.text() == "56789ab"


def test_heartbeat_holds_pongs_while_the_kernel_is_silent():
    beat = Heartbeat(stale=1.5, interval=0.5)
    beat.started(100.0)
    assert beat.due(100.0) and not beat.due(100.2) and beat.due(100.5)
    assert beat.link_ping(1, 101.0) == 1  # echoed recently enough: answer now
    assert beat.link_ping(2, 101.6) is None  # silent for 1.6 s: held
    assert beat.link_ping(3, 102.0) is None  # only the newest is held
    assert beat.echoed(102.5) == 3
    assert beat.echoed(103.0) is None
    assert beat.link_ping(4, 103.1) == 4


def test_heartbeat_silence_counts_only_while_the_kernel_is_idle():
    # IRkernel answers its heartbeat from its main loop: not while it runs code.
    beat = Heartbeat(stale=1.5, interval=0.5)
    beat.started(100.0)
    assert beat.status(busy=True, now=100.1) is None
    assert beat.link_ping(1, 110.0) == 1  # busy for 10 s, silent: no fault
    assert beat.status(busy=False, now=110.2) is None  # idle: the count starts afresh
    assert beat.link_ping(2, 111.0) == 2
    assert beat.link_ping(3, 112.0) is None  # idle and silent for 1.8 s: held
    assert beat.status(busy=True, now=112.1) == 3  # busy again: answered


@given(st.lists(st.tuples(st.sampled_from(["ping", "echo"]), st.floats(0, 3)), max_size=50))
def test_heartbeat_answers_every_ping_once_the_kernel_echoes(events):
    beat = Heartbeat()
    now = 0.0
    beat.started(now)
    answered: list[int] = []
    asked = 0
    for kind, wait in events:
        now += wait
        if kind == "ping":
            asked += 1
            n = beat.link_ping(asked, now)
            if n is not None:
                answered.append(n)
        else:
            n = beat.echoed(now)
            if n is not None:
                answered.append(n)
    assert answered == sorted(set(answered))  # never twice, never out of order
    if asked:
        n = beat.echoed(now)
        assert asked in [*answered, n]  # the latest ping is answered by the next echo


def test_the_connection_file_is_private(tmp_path):
    from cellmux.kernel.adaptor import _write_connection_file

    path = tmp_path / "c.json"
    _write_connection_file(
        str(path), dict.fromkeys(("shell", "iopub", "stdin", "control", "hb"), 1), "k", "bash"
    )
    assert os.stat(path).st_mode & 0o777 == 0o600
    info = json.loads(path.read_text())
    assert info["ip"] == "127.0.0.1" and info["signature_scheme"] == "hmac-sha256"


def test_what_a_kernel_must_reach_its_program_prefix_and_its_directory(tmp_path):
    from cellmux.kernel.nursery import _reachable_for_kernels
    from cellmux.server.kernelspecs import reached_paths

    program = tmp_path / "venv" / "bin" / "python"
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    spec = KernelSpec(
        name="k", display_name="K", language="k", argv=[str(program)], resource_dir=str(tmp_path)
    )
    assert reached_paths(spec) == {str(tmp_path / "venv"), str(tmp_path)}
    by_name = KernelSpec(name="k", display_name="K", language="k", argv=["python"])
    assert reached_paths(by_name, search_path=str(program.parent)) == {str(tmp_path / "venv")}
    assert _reachable_for_kernels(str(tmp_path))
    for never in ("/tmp", "/", "relative/path"):  # the host's /tmp must stay out
        assert not _reachable_for_kernels(never)
