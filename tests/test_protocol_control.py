"""Tests for cellmux.protocol.control: control messages and the client handshake."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cellmux.protocol import (
    CLIENT_SENDABLE,
    PROTOCOL_VERSION,
    Channel,
    DataMessage,
    Frame,
    Hello,
    JupyterSocket,
    ProtocolError,
    Request,
    ServerSideHandshake,
    control_frame,
    error_payload,
    parse_control,
)
from cellmux.protocol.control import MAX_SESSION_ID, REQUEST_OPS, CreateOrder

#: A Jupyter message: header, parent_header, metadata, content.
JUPYTER_PARTS = (
    b'{"msg_id":"m1","msg_type":"execute_request"}',
    b"{}",
    b"{}",
    b'{"code":"1+1"}',
)


def hello(**fields: Any) -> Frame:
    body = {"version": PROTOCOL_VERSION, "kernel": "k1", "session": "s1"}
    body.update(fields)
    return control_frame("hello", **body)


def raw_control(body: bytes) -> Frame:
    return Frame(channel=Channel.CONTROL, parts=(body,))


def data(channel: int, socket: JupyterSocket = JupyterSocket.SHELL, parts=JUPYTER_PARTS) -> Frame:
    return Frame(channel=channel, parts=parts, socket=socket)


def attached() -> ServerSideHandshake:
    handshake = ServerSideHandshake()
    handshake.receive(hello())
    assert handshake.attached
    return handshake


def refuse(handshake: ServerSideHandshake, frame: Frame, code: str, *, fatal: bool) -> None:
    with pytest.raises(ProtocolError) as info:
        handshake.receive(frame)
    assert info.value.code == code
    assert info.value.fatal is fatal


def assert_closed(handshake: ServerSideHandshake) -> None:
    """Every later input, even a perfect one, is refused."""
    assert not handshake.attached
    for frame in [hello(), control_frame("ping"), data(Channel.EXECUTE)]:
        refuse(handshake, frame, "closed", fatal=True)


# --- the helpers -------------------------------------------------------------------------


def test_control_frame() -> None:
    frame = control_frame("ping", id=3)
    assert frame.channel == Channel.CONTROL
    assert frame.socket is JupyterSocket.NONE
    assert frame.parts == (b'{"op":"ping","id":3}',)


def test_parse_control_round_trip() -> None:
    assert parse_control(control_frame("subscribe", channels=[2, 3])) == {
        "op": "subscribe",
        "channels": [2, 3],
    }


@pytest.mark.parametrize(
    "parts",
    [
        (),
        (b'{"op":"ping"}', b""),
        (b"",),
        (b"not json",),
        (b"\xff\xfe\xfd",),
        (b"[1, 2]",),
        (b'"ping"',),
        (b"{}",),
        (b'{"op": 1}',),
        (b'{"op": null}',),
        (b"[" * 100_000,),
    ],
)
def test_parse_control_refuses(parts: tuple[bytes, ...]) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_control(Frame(channel=0, parts=parts))
    assert info.value.code == "bad_control"


def test_error_payload() -> None:
    assert error_payload("bad_message", "nope", seq=4) == {
        "code": "bad_message",
        "message": "nope",
        "seq": 4,
    }


# --- hello -------------------------------------------------------------------------------


def test_hello_is_accepted() -> None:
    handshake = ServerSideHandshake()
    assert not handshake.attached
    event = handshake.receive(hello())
    assert event == Hello(version=PROTOCOL_VERSION, kernel="k1", session="s1")
    assert event.channels is None
    assert event.cursor is None
    assert handshake.attached


def test_hello_with_channels_and_cursor() -> None:
    event = ServerSideHandshake().receive(hello(channels=[2, 3, 2, 16], cursor=41))
    assert event == Hello(
        version=PROTOCOL_VERSION,
        kernel="k1",
        session="s1",
        channels=frozenset({Channel.STDOUT, Channel.STDERR, 16}),
        cursor=41,
    )


def test_hello_ignores_unknown_fields() -> None:
    event = ServerSideHandshake().receive(hello(client="cellmux-js/0.1"))
    assert isinstance(event, Hello)


def test_hello_session_length_limit() -> None:
    assert ServerSideHandshake().receive(hello(session="s" * MAX_SESSION_ID))
    refuse(
        ServerSideHandshake(), hello(session="s" * (MAX_SESSION_ID + 1)), "bad_hello", fatal=True
    )


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(data(Channel.EXECUTE), id="data-frame"),
        pytest.param(data(Channel.STDIN, JupyterSocket.STDIN), id="stdin-frame"),
        pytest.param(control_frame("ping"), id="ping"),
        pytest.param(control_frame("subscribe", channels=[2]), id="subscribe"),
        pytest.param(control_frame("welcome", version=PROTOCOL_VERSION), id="welcome"),
    ],
)
def test_anything_before_hello_is_fatal(frame: Frame) -> None:
    handshake = ServerSideHandshake()
    refuse(handshake, frame, "expected_hello", fatal=True)
    assert_closed(handshake)


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(raw_control(b"hello"), id="non-json"),
        pytest.param(raw_control(b"\x80hello"), id="non-utf8"),
        pytest.param(raw_control(b'["hello"]'), id="json-array"),
        pytest.param(raw_control(b'{"version": 1, "kernel": "k1"}'), id="missing-op"),
        pytest.param(raw_control(b'{"op": 7}'), id="op-not-a-string"),
        pytest.param(Frame(channel=0, parts=(hello().parts[0], b"")), id="two-parts"),
        pytest.param(Frame(channel=0, parts=()), id="no-parts"),
    ],
)
def test_malformed_control_before_hello_is_fatal(frame: Frame) -> None:
    handshake = ServerSideHandshake()
    refuse(handshake, frame, "bad_control", fatal=True)
    assert_closed(handshake)


@pytest.mark.parametrize("version", [0, -1, PROTOCOL_VERSION + 1, "1", None, [1], 1.0])
def test_wrong_version(version: object) -> None:
    handshake = ServerSideHandshake()
    refuse(handshake, hello(version=version), "unsupported_version", fatal=True)
    assert_closed(handshake)


def test_missing_version() -> None:
    handshake = ServerSideHandshake()
    refuse(
        handshake,
        control_frame("hello", kernel="k1", session="s1"),
        "unsupported_version",
        fatal=True,
    )
    assert_closed(handshake)


@pytest.mark.parametrize(
    "fields",
    [
        {"kernel": None},
        {"kernel": ""},
        {"kernel": 12},
        {"session": None},
        {"session": ""},
        {"session": ["s1"]},
        {"cursor": -1},
        {"cursor": True},
        {"cursor": "12"},
        {"cursor": 1.5},
    ],
)
def test_bad_hello(fields: dict[str, Any]) -> None:
    handshake = ServerSideHandshake()
    refuse(handshake, hello(**fields), "bad_hello", fatal=True)
    assert_closed(handshake)


def test_version_1_is_still_spoken() -> None:
    event = ServerSideHandshake().receive(hello(version=1))
    assert event == Hello(version=1, kernel="k1", session="s1")


@pytest.mark.parametrize("name", [None, "python3", "x" * 200])
def test_a_version_2_hello_may_ask_for_a_new_kernel(name: str | None) -> None:
    create = {} if name is None else {"name": name}
    handshake = ServerSideHandshake()
    event = handshake.receive(control_frame("hello", version=2, session="s1", create=create))
    assert event == Hello(version=2, kernel="", session="s1", create=CreateOrder(name))
    # what a client sends before welcome is accepted as after it
    assert isinstance(handshake.receive(data(Channel.EXECUTE)), DataMessage)


@pytest.mark.parametrize(
    "fields",
    [
        {"kernel": "k1", "create": {}},  # one or the other
        {"create": {}, "cursor": 3},  # nothing to resume in a new kernel
        {"create": []},
        {"create": "python3"},
        {"create": {"name": ""}},
        {"create": {"name": 3}},
        {"create": {"name": "x" * 201}},
        {"version": 1, "create": {}},  # version 1 has no create: it needs a kernel
    ],
)
def test_bad_create(fields: dict[str, Any]) -> None:
    body = {"version": 2, "session": "s1", **fields}
    handshake = ServerSideHandshake()
    refuse(handshake, control_frame("hello", **body), "bad_hello", fatal=True)
    assert_closed(handshake)


@pytest.mark.parametrize("channels", [2, "2", [2, "3"], [True], [11], [65536], [-1]])
def test_bad_hello_channels(channels: object) -> None:
    handshake = ServerSideHandshake()
    refuse(handshake, hello(channels=channels), "bad_channels", fatal=True)
    assert_closed(handshake)


# --- requests once attached ---------------------------------------------------------------


@pytest.mark.parametrize("op", sorted(REQUEST_OPS))
def test_requests(op: str) -> None:
    assert attached().receive(control_frame(op)) == Request(op=op)


@pytest.mark.parametrize("request_id", [7, "abc", None, {"n": 1}])
def test_request_id_is_echoed(request_id: object) -> None:
    event = attached().receive(control_frame("interrupt", id=request_id))
    assert event == Request(op="interrupt", id=request_id)


def test_subscribe_with_channels() -> None:
    event = attached().receive(control_frame("subscribe", channels=[4, 7, 100]))
    assert event == Request(op="subscribe", channels=frozenset({4, 7, 100}))


def test_subscribe_without_channels_means_all() -> None:
    assert attached().receive(control_frame("subscribe")) == Request(op="subscribe")


def test_channels_only_matter_to_subscribe() -> None:
    event = attached().receive(control_frame("ping", channels=["ignored"]))
    assert event == Request(op="ping")


@pytest.mark.parametrize("channels", [[12], "all", [1.0]])
def test_subscribe_bad_channels_is_not_fatal(channels: object) -> None:
    handshake = attached()
    refuse(handshake, control_frame("subscribe", channels=channels), "bad_channels", fatal=False)
    assert handshake.attached
    assert handshake.receive(control_frame("ping")) == Request(op="ping")


@pytest.mark.parametrize("op", ["hello", "welcome", "attach", "PING", ""])
def test_unknown_op_is_not_fatal(op: str) -> None:
    handshake = attached()
    refuse(handshake, control_frame(op), "unknown_op", fatal=False)
    assert handshake.attached
    assert handshake.receive(control_frame("ping", id=1)) == Request(op="ping", id=1)


@pytest.mark.parametrize("body", [b"ping", b"[]", b'{"id": 1}'])
def test_malformed_control_after_hello_is_not_fatal(body: bytes) -> None:
    handshake = attached()
    refuse(handshake, raw_control(body), "bad_control", fatal=False)
    assert handshake.receive(control_frame("ping")) == Request(op="ping")


# --- data frames once attached ------------------------------------------------------------


@pytest.mark.parametrize(
    "channel, socket",
    [
        (Channel.STDIN, JupyterSocket.STDIN),
        (Channel.INTROSPECTION, JupyterSocket.SHELL),
        (Channel.EXECUTE, JupyterSocket.SHELL),
        (Channel.COMM, JupyterSocket.SHELL),
        (Channel.KERNEL, JupyterSocket.SHELL),
        (Channel.KERNEL, JupyterSocket.CONTROL),
        (Channel.EXECUTE, JupyterSocket.CONTROL),
    ],
)
def test_data_message(channel: Channel, socket: JupyterSocket) -> None:
    frame = data(channel, socket)
    event = attached().receive(frame)
    assert event == DataMessage(frame)
    assert event.frame is frame


def test_data_message_with_buffers() -> None:
    frame = data(Channel.COMM, parts=(*JUPYTER_PARTS, b"\x00\x01", b""))
    assert attached().receive(frame) == DataMessage(frame)


def test_client_sendable_table() -> None:
    sendable = {Channel.STDIN, Channel.INTROSPECTION, Channel.EXECUTE, Channel.COMM, Channel.KERNEL}
    assert sendable == CLIENT_SENDABLE


@pytest.mark.parametrize(
    "channel",
    [Channel.STDOUT, Channel.STDERR, Channel.STATUS, Channel.DISPLAY, Channel.FILES, 11, 15],
)
def test_channel_not_sendable(channel: int) -> None:
    handshake = attached()
    refuse(handshake, data(channel, JupyterSocket.IOPUB), "channel_not_sendable", fatal=False)
    refuse(handshake, data(channel, JupyterSocket.SHELL), "channel_not_sendable", fatal=False)
    assert handshake.receive(data(Channel.EXECUTE)) == DataMessage(data(Channel.EXECUTE))


@pytest.mark.parametrize("nparts", [0, 1, 3])
def test_fewer_than_four_parts(nparts: int) -> None:
    handshake = attached()
    refuse(
        handshake, data(Channel.EXECUTE, parts=JUPYTER_PARTS[:nparts]), "bad_message", fatal=False
    )
    assert handshake.attached


@pytest.mark.parametrize(
    "channel, socket",
    [
        (Channel.STDIN, JupyterSocket.SHELL),
        (Channel.STDIN, JupyterSocket.NONE),
        (Channel.STDIN, JupyterSocket.CONTROL),
        (Channel.EXECUTE, JupyterSocket.STDIN),
        (Channel.EXECUTE, JupyterSocket.IOPUB),
        (Channel.COMM, JupyterSocket.NONE),
        (Channel.KERNEL, JupyterSocket.IOPUB),
    ],
)
def test_wrong_socket(channel: Channel, socket: JupyterSocket) -> None:
    handshake = attached()
    refuse(handshake, data(channel, socket), "bad_socket", fatal=False)
    assert handshake.attached


# --- hypothesis ---------------------------------------------------------------------------

short_text = st.text(max_size=10)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | short_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(short_text, inner, max_size=3),
    max_leaves=4,
)

control_bodies = st.fixed_dictionaries(
    {},
    optional={
        "op": st.sampled_from([*sorted(REQUEST_OPS), "hello", "welcome", "bogus"]),
        "version": st.sampled_from([PROTOCOL_VERSION, 2]) | json_values,
        "kernel": short_text | json_values,
        "session": short_text | json_values,
        "cursor": st.integers() | json_values,
        "channels": st.lists(st.integers(-2, 70_000), max_size=4) | json_values,
        "id": json_values,
    },
).map(lambda body: json.dumps(body).encode())

arbitrary_frames = st.builds(
    Frame,
    channel=st.sampled_from(Channel) | st.integers(0, 0xFFFF),
    parts=st.lists(st.binary(max_size=20), max_size=6).map(tuple),
    socket=st.sampled_from(JupyterSocket),
)
control_frames = st.builds(
    Frame,
    channel=st.just(Channel.CONTROL),
    parts=st.lists(control_bodies, min_size=1, max_size=2).map(tuple),
)
client_frames = arbitrary_frames | control_frames


@given(st.lists(client_frames, max_size=4))
def test_frames_after_hello_raise_only_non_fatal_protocol_errors(frames: list[Frame]) -> None:
    handshake = attached()
    for frame in frames:
        try:
            event = handshake.receive(frame)
        except ProtocolError as e:
            assert not e.fatal
        else:
            assert isinstance(event, (Request, DataMessage))
        assert handshake.attached


@given(client_frames)
def test_first_frame_is_hello_or_fatal(frame: Frame) -> None:
    handshake = ServerSideHandshake()
    try:
        event = handshake.receive(frame)
    except ProtocolError as e:
        assert e.fatal
        assert_closed(handshake)
    else:
        assert isinstance(event, Hello)
        assert handshake.attached
