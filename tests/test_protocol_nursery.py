"""The nursery's pipe protocol: every message survives a round trip, and
nothing malformed gets through as anything but a ProtocolError."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cellmux.protocol import ProtocolError
from cellmux.protocol import nursery as wire

links = st.binary(min_size=1, max_size=16).map(bytes.hex)
pids = st.integers(min_value=1, max_value=2**22)
texts = st.text(max_size=200)
exit_infos = st.one_of(
    st.builds(lambda c: {"cause": f"exit code {c}", "exit_code": c}, st.integers(0, 255)),
    st.builds(
        lambda n, lim: {"cause": "SIGKILL", "signal": n, **({"limit": lim} if lim else {})},
        st.integers(1, 64),
        st.sampled_from([None, "cpu", "memory", "disk", "file_size"]),
    ),
)

commands = st.one_of(
    st.builds(wire.Spawn, links, links, st.none() | st.just("ipc:///run/cellmux/k1/link.sock")),
    st.builds(wire.Signal, links, st.sampled_from(["SIGINT", "SIGTERM", "SIGUSR1"])),
    st.builds(wire.Kill, links),
    st.just(wire.Shutdown()),
)
events = st.one_of(
    st.builds(wire.Ready, pids),
    st.builds(wire.Spawned, links, pids),
    st.builds(wire.Exited, links, pids, exit_infos),
    st.builds(wire.Error, texts, st.none() | links),
)


@given(commands)
def test_commands_round_trip(command):
    line = wire.encode(command)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert wire.decode_command(line) == command


@given(events)
def test_events_round_trip(event):
    line = wire.encode(event)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert wire.decode_event(line) == event


@given(st.lists(st.one_of(commands, events), max_size=20), st.data())
def test_lines_survive_any_split(messages, data):
    stream = b"".join(wire.encode(m) for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    buffer = wire.LineBuffer()
    lines = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        lines += buffer.feed(stream[start:end])
    assert lines == [wire.encode(m).rstrip(b"\n") for m in messages]
    assert buffer.dropped == 0


@given(st.integers(1, 5), st.integers(1, 50))
def test_an_overlong_line_is_dropped_and_the_next_one_kept(pieces, extra):
    buffer = wire.LineBuffer(limit=100)
    garbage = b"x" * (100 + extra)
    step = len(garbage) // pieces + 1
    lines = []
    for i in range(0, len(garbage), step):
        lines += buffer.feed(garbage[i : i + step])
    lines += buffer.feed(b"\n" + wire.encode(wire.Kill("ab")))
    assert lines == [b'{"cmd":"kill","link":"ab"}']
    assert buffer.dropped == 1


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_raise_protocol_error(line):
    for decode in (wire.decode_command, wire.decode_event):
        with contextlib.suppress(ProtocolError):
            decode(line)


any_field = st.sampled_from(["cmd", "event", "link", "pid", "secret", "message", "x"])
any_value = st.one_of(st.none(), st.booleans(), st.integers(), texts, st.lists(st.integers()))


@given(st.dictionaries(any_field, any_value))
def test_any_object_parses_or_raises_protocol_error(fields):
    line = json.dumps(fields).encode()
    for decode in (wire.decode_command, wire.decode_event):
        with contextlib.suppress(ProtocolError):
            decode(line)


@pytest.mark.parametrize(
    "line",
    [
        b'{"cmd": "spawn", "link": "zz", "secret": "00"}',
        b'{"cmd": "spawn", "link": "00"}',
        b'{"cmd": "kill", "link": 5}',
        b'{"cmd": "kill", "link": "00", "extra": 1}',
        b'{"cmd": "reboot"}',
        b"[1, 2]",
        b"not json",
    ],
)
def test_bad_commands_are_refused(line):
    with pytest.raises(ProtocolError):
        wire.decode_command(line)


@pytest.mark.parametrize(
    "line",
    [
        b'{"event": "ready", "pid": 0}',
        b'{"event": "ready", "pid": true}',
        b'{"event": "exited", "link": "00", "pid": 3}',
        b'{"event": "spawned", "link": "00"}',
        b'{"event": "error"}',
    ],
)
def test_bad_events_are_refused(line):
    with pytest.raises(ProtocolError):
        wire.decode_event(line)


def test_the_wire_format_is_the_documented_one():
    assert wire.encode(wire.Spawn("0a", "ff")) == b'{"cmd":"spawn","link":"0a","secret":"ff"}\n'
    assert wire.encode(wire.Shutdown()) == b'{"cmd":"shutdown"}\n'
    exited = wire.Exited("0a", 7, {"cause": "exit code 3", "exit_code": 3})
    assert json.loads(wire.encode(exited)) == {
        "event": "exited",
        "link": "0a",
        "pid": 7,
        "cause": "exit code 3",
        "exit_code": 3,
    }
    assert wire.encode(wire.Error("no")) == b'{"event":"error","message":"no"}\n'


def test_both_sides_share_the_constants():
    from cellmux.config import ServerConfig
    from cellmux.kernel import nursery, sandbox

    assert ServerConfig().kill_grace == wire.DEFAULT_KILL_GRACE == nursery.DEFAULT_KILL_GRACE
    assert tuple(ServerConfig().kernel_uid_range) == wire.DEFAULT_UID_RANGE
    assert sandbox.SandboxConfig().uid_range == wire.DEFAULT_UID_RANGE
