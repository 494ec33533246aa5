"""The kernel hosts' control wire: every message survives a round trip,
nothing malformed gets through as anything but a ProtocolError, and the
size bounds hold."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cellmux.protocol import ProtocolError, hostlink
from cellmux.protocol import nursery as wire
from cellmux.protocol.control import CreateOrder

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True)
counts = st.integers(min_value=0, max_value=2**40)
links = st.binary(min_size=16, max_size=16).map(bytes.hex)
pids = st.integers(min_value=1, max_value=2**22)

host_messages = st.one_of(
    st.builds(
        hostlink.Hello,
        names,
        st.lists(names, max_size=hostlink.MAX_LABELS).map(tuple),
        counts,
        counts,
    ),
    st.builds(hostlink.Beat, counts, counts, counts),
    st.builds(hostlink.NurseryEvent, st.builds(wire.Spawned, links, pids)),
    st.builds(
        hostlink.NurseryEvent,
        st.builds(wire.Exited, links, pids, st.just({"cause": "host lost"})),
    ),
    st.builds(hostlink.NurseryEvent, st.builds(wire.Error, st.text(max_size=50), links)),
)
front_messages = st.one_of(
    st.builds(hostlink.Welcome, st.lists(links, max_size=20).map(tuple)),
    st.just(hostlink.FrontBeat()),
    st.just(hostlink.Who()),
    st.builds(hostlink.NurseryCommand, st.builds(wire.Spawn, links, links)),
    st.builds(hostlink.NurseryCommand, st.builds(wire.Signal, links, st.just("SIGINT"))),
    st.builds(hostlink.NurseryCommand, st.builds(wire.Kill, links)),
)


@given(host_messages)
def test_host_messages_round_trip(message) -> None:
    frames = hostlink.encode(message)
    assert frames[0] == b""  # never mistaken for a kernel's link traffic
    assert hostlink.decode_from_host(frames) == message


@given(front_messages)
def test_front_messages_round_trip(message) -> None:
    frames = hostlink.encode(message)
    assert frames[0] == b""
    assert hostlink.decode_from_front(frames) == message


@given(st.lists(st.binary(max_size=200), max_size=5))
def test_garbage_is_a_protocol_error(frames) -> None:
    for decode in (hostlink.decode_from_host, hostlink.decode_from_front):
        with contextlib.suppress(ProtocolError):
            decode(frames)


@given(
    st.sampled_from([b"hello", b"beat", b"welcome", b"who"]),
    st.dictionaries(
        st.sampled_from(["name", "labels", "max_kernels", "epoch", "running", "keep", "x"]),
        st.one_of(st.none(), st.integers(), st.text(max_size=70), st.lists(st.text(max_size=5))),
    ),
)
def test_bad_fields_are_protocol_errors(kind, body) -> None:
    frames = [b"", kind, json.dumps(body).encode()]
    for decode in (hostlink.decode_from_host, hostlink.decode_from_front):
        with contextlib.suppress(ProtocolError):
            decode(frames)


def test_a_front_may_not_shut_a_host_down() -> None:
    frames = [b"", b"command", wire.encode(wire.Shutdown()).rstrip(b"\n")]
    with pytest.raises(ProtocolError):
        hostlink.decode_from_front(frames)


def test_bounds() -> None:
    huge = json.dumps({"running": 1, "max_kernels": 2, "mem_available": 3, "pad": "x" * 70000})
    with pytest.raises(ProtocolError):
        hostlink.decode_from_host([b"", b"beat", huge.encode()])
    with pytest.raises(ProtocolError):
        hostlink.Hello("a", tuple(f"l{i}" for i in range(hostlink.MAX_LABELS + 1)), 1, 1)
    with pytest.raises(ProtocolError):
        hostlink.Hello("x" * (hostlink.MAX_NAME + 1), (), 1, 1)
    with pytest.raises(ProtocolError):
        hostlink.Hello("../etc", (), 1, 1)
    with pytest.raises(ProtocolError):
        hostlink.Beat(-1, 1)
    with pytest.raises(ProtocolError):
        hostlink.Beat(True, 1)  # a bool is not a count


def test_a_native_create_may_ask_for_a_host_label() -> None:
    assert CreateOrder.from_body({"host_label": "gpu"}) == CreateOrder(None, "gpu")
    assert CreateOrder.from_body({"name": "python3"}).host_label is None
    for bad in ("", "a b", "x" * 65, 7):
        with pytest.raises(ProtocolError):
            CreateOrder.from_body({"host_label": bad})


# -- file transfers (/files of a kernel on a host) ---------------------------------

file_texts = st.text(max_size=hostlink.MAX_FILE_TEXT)
file_messages = st.one_of(
    st.builds(
        hostlink.FileChunk,
        counts,
        counts,
        st.booleans(),
        st.binary(max_size=300) | st.just(b"x" * hostlink.MAX_FILE_CHUNK),
    ),
    st.builds(hostlink.FileAck, counts, counts),
    st.builds(hostlink.FileCancel, counts, file_texts),
)
file_requests = st.builds(
    hostlink.FileRequest,
    counts,
    st.sampled_from(hostlink.FILE_OPS),
    links,
    file_texts,
    counts,
    counts,
)
file_replies = st.builds(
    hostlink.FileReply,
    counts,
    st.integers(min_value=100, max_value=599),
    file_texts,
    file_texts,
    counts,
    counts,
)


@given(file_messages | file_replies)
def test_file_messages_from_a_host_round_trip(message) -> None:
    frames = hostlink.encode(message)
    assert frames[0] == b""
    assert hostlink.decode_from_host(frames) == message


@given(file_messages | file_requests)
def test_file_messages_from_a_front_round_trip(message) -> None:
    frames = hostlink.encode(message)
    assert frames[0] == b""
    assert hostlink.decode_from_front(frames) == message


@given(
    st.sampled_from([b"file", b"file_reply", b"file_data", b"file_ack", b"file_cancel"]),
    st.dictionaries(
        st.sampled_from(["id", "op", "link", "name", "status", "seq", "last", "size", "x"]),
        st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=70)),
    ),
    st.lists(st.binary(max_size=50), max_size=2),
)
def test_bad_file_messages_are_protocol_errors(kind, body, extra) -> None:
    frames = [b"", kind, json.dumps(body).encode(), *extra]
    for decode in (hostlink.decode_from_host, hostlink.decode_from_front):
        with contextlib.suppress(ProtocolError):
            decode(frames)


def test_file_bounds() -> None:
    with pytest.raises(ProtocolError):  # one chunk at most MAX_FILE_CHUNK
        hostlink.decode_from_host(
            [b"", b"file_data", b'{"id": 1, "seq": 0, "last": true}', b"x" * (256 * 1024 + 1)]
        )
    with pytest.raises(ProtocolError):
        hostlink.decode_from_front([b"", b"file_data", b'{"id": 1, "seq": 0, "last": 1}', b""])
    with pytest.raises(ProtocolError):  # only list, get, put
        hostlink.FileRequest(1, "delete", "0" * 32)
    with pytest.raises(ProtocolError):
        hostlink.FileRequest(1, "get", "../" * 11)
    with pytest.raises(ProtocolError):
        hostlink.FileRequest(1, "get", "0" * 32, "x" * (hostlink.MAX_FILE_TEXT + 1))
    with pytest.raises(ProtocolError):
        hostlink.FileReply(1, 700)
    with pytest.raises(ProtocolError):  # a host may not ask the front for files
        hostlink.decode_from_host(hostlink.encode(hostlink.FileRequest(1, "get", "0" * 32)))
    with pytest.raises(ProtocolError):
        hostlink.decode_from_front(hostlink.encode(hostlink.FileReply(1, 200)))
