"""Jupyter's websocket formats: round trips, jupyter_server as the oracle, fuzzing."""

from __future__ import annotations

import contextlib
import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jupyter_server.services.kernels.connection.base import (
    deserialize_binary_message,
    deserialize_msg_from_ws_v1,
    serialize_binary_message,
    serialize_msg_to_ws_v1,
)

from cellmux.protocol import Channel, JupyterSocket
from cellmux.server.jupyter.codec import (
    V1_SUBPROTOCOL,
    JupyterCodecError,
    JupyterMessage,
    LegacyCodec,
    V1Codec,
    channel_name,
    codec_for,
    to_kernel,
)

CHANNELS = ["shell", "iopub", "stdin", "control"]
CLIENT_CHANNELS = ["shell", "stdin", "control"]

json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
json_objects = st.dictionaries(st.text(max_size=10), json_values, max_size=4)
buffers = st.lists(st.binary(max_size=64), max_size=4)


def dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


@st.composite
def messages(draw, channels=CHANNELS):
    header = {
        "msg_id": draw(st.text(max_size=12)),
        "msg_type": draw(st.text(min_size=1, max_size=20)),
    }
    header.update(draw(json_objects))
    parts = (dumps(header), *(dumps(draw(json_objects)) for _ in range(3)))
    return JupyterMessage(draw(st.sampled_from(channels)), (*parts, *draw(buffers)))


def as_objects(parts):
    return [json.loads(p) for p in parts[:4]]


# -- round trips ------------------------------------------------------------


@given(messages())
def test_v1_round_trip_keeps_every_byte(message):
    payload, binary = V1Codec().encode(message)
    assert binary
    assert V1Codec().decode(payload, True) == message


@given(messages())
def test_legacy_round_trip_keeps_json_and_buffers(message):
    payload, binary = LegacyCodec().encode(message)
    assert binary == bool(message.buffers)
    back = LegacyCodec().decode(payload, binary)
    assert back.channel == message.channel
    assert as_objects(back.parts) == as_objects(message.parts)
    assert back.buffers == message.buffers


# -- jupyter_server's own functions as the oracle ---------------------------


@given(messages())
def test_v1_bytes_equal_jupyter_servers(message):
    ours, _ = V1Codec().encode(message)
    assert ours == serialize_msg_to_ws_v1(list(message.parts), message.channel)
    channel, parts = deserialize_msg_from_ws_v1(ours)
    assert (channel, tuple(parts)) == (message.channel, message.parts)


@given(messages())
def test_jupyter_servers_v1_frames_decode(message):
    theirs = serialize_msg_to_ws_v1(list(message.parts), message.channel)
    assert V1Codec().decode(theirs, True) == message


@given(messages().filter(lambda m: m.buffers))
def test_legacy_binary_is_what_jupyter_server_reads_and_writes(message):
    ours, binary = LegacyCodec().encode(message)
    assert binary
    msg = deserialize_binary_message(ours)
    assert msg["buffers"] == list(message.buffers)
    assert msg["channel"] == message.channel
    assert [msg["header"], msg["parent_header"], msg["metadata"], msg["content"]] == as_objects(
        message.parts
    )
    # and the other way: a frame jupyter_server made decodes to the same message
    header, parent, metadata, content = as_objects(message.parts)
    theirs = serialize_binary_message(
        {
            "header": header,
            "parent_header": parent,
            "metadata": metadata,
            "content": content,
            "channel": message.channel,
            "buffers": list(message.buffers),
        }
    )
    back = LegacyCodec().decode(theirs, True)
    assert as_objects(back.parts) == as_objects(message.parts)
    assert back.buffers == message.buffers


def test_legacy_text_frame_has_jupyters_keys():
    header = {"msg_id": "m1", "msg_type": "status", "session": "s"}
    message = JupyterMessage("iopub", (dumps(header), b"{}", b"{}", b'{"execution_state":"idle"}'))
    payload, binary = LegacyCodec().encode(message)
    assert not binary
    doc = json.loads(payload)
    assert doc == {
        "header": header,
        "parent_header": {},
        "metadata": {},
        "content": {"execution_state": "idle"},
        "channel": "iopub",
        "msg_id": "m1",
        "msg_type": "status",
    }


# -- handshake and addressing ------------------------------------------------


def test_codec_is_chosen_by_the_offered_subprotocols():
    assert isinstance(codec_for([V1_SUBPROTOCOL]), V1Codec)
    assert codec_for(["other", V1_SUBPROTOCOL]).subprotocol == V1_SUBPROTOCOL
    assert isinstance(codec_for([]), LegacyCodec)
    assert codec_for(["other"]).subprotocol is None


@pytest.mark.parametrize(
    ("socket", "name"),
    [
        (JupyterSocket.NONE, "iopub"),
        (JupyterSocket.SHELL, "shell"),
        (JupyterSocket.IOPUB, "iopub"),
        (JupyterSocket.STDIN, "stdin"),
        (JupyterSocket.CONTROL, "control"),
    ],
)
def test_channel_names_for_frame_sockets(socket, name):
    assert channel_name(socket) == name


def request(channel: str, msg_type: str, content: bytes = b"{}") -> JupyterMessage:
    header = dumps({"msg_id": "m", "msg_type": msg_type, "session": "s"})
    return JupyterMessage(channel, (header, b"{}", b"{}", content))


@pytest.mark.parametrize(
    ("channel", "msg_type", "cellmux_channel", "socket"),
    [
        ("shell", "execute_request", Channel.EXECUTE, JupyterSocket.SHELL),
        ("shell", "comm_msg", Channel.COMM, JupyterSocket.SHELL),
        ("shell", "kernel_info_request", Channel.KERNEL, JupyterSocket.SHELL),
        ("shell", "complete_request", Channel.INTROSPECTION, JupyterSocket.SHELL),
        ("control", "interrupt_request", Channel.KERNEL, JupyterSocket.CONTROL),
        ("stdin", "input_reply", Channel.STDIN, JupyterSocket.STDIN),
    ],
)
def test_client_messages_are_addressed(channel, msg_type, cellmux_channel, socket):
    bound = to_kernel(request(channel, msg_type))
    assert (bound.channel, bound.socket) == (cellmux_channel, socket)
    assert bound.header["msg_type"] == msg_type


@pytest.mark.parametrize(
    ("channel", "msg_type", "code"),
    [
        ("iopub", "execute_request", "channel_not_sendable"),
        ("shell", "stream", "not_sendable"),
        ("shell", "status", "not_sendable"),
        ("shell", "input_reply", "not_sendable"),
        ("stdin", "execute_request", "not_sendable"),
    ],
)
def test_messages_clients_may_not_send(channel, msg_type, code):
    with pytest.raises(JupyterCodecError) as info:
        to_kernel(request(channel, msg_type))
    assert info.value.code == code


def test_refusal_carries_the_header_for_an_error_reply():
    with pytest.raises(JupyterCodecError) as info:
        to_kernel(request("shell", "execute_request", content=b"[1]"))
    assert info.value.header["msg_type"] == "execute_request"
    with pytest.raises(JupyterCodecError) as info:
        to_kernel(JupyterMessage("shell", (b"nope", b"{}", b"{}", b"{}")))
    assert info.value.header is None


# -- bad input: JupyterCodecError and nothing else ---------------------------


@given(st.binary(max_size=200), st.booleans())
def test_decoders_raise_only_codec_errors(payload, binary):
    for codec in (V1Codec(), LegacyCodec()):
        try:
            message = codec.decode(payload, binary)
        except JupyterCodecError:
            continue
        with contextlib.suppress(JupyterCodecError):
            to_kernel(message)


@given(messages(), st.data())
def test_truncated_or_padded_v1_frames_are_refused(message, data):
    payload, _ = V1Codec().encode(message)
    cut = data.draw(st.integers(0, len(payload) - 1))
    with pytest.raises(JupyterCodecError):
        V1Codec().decode(payload[:cut], True)
    with pytest.raises(JupyterCodecError):
        V1Codec().decode(payload + b"x", True)


@given(messages().filter(lambda m: m.buffers), st.data())
def test_broken_legacy_binary_frames_are_refused(message, data):
    payload, _ = LegacyCodec().encode(message)
    n = struct.unpack_from(">I", payload)[0]
    cut = data.draw(st.integers(0, 4 * (n + 1) - 1))
    with pytest.raises(JupyterCodecError):
        LegacyCodec().decode(payload[:cut], True)


@pytest.mark.parametrize(
    ("payload", "binary", "code"),
    [
        (b"not json", False, "bad_json"),
        (b"[]", False, "bad_json"),
        (b'{"header": {}, "channel": 3}', False, "bad_channel"),
        (b'{"header": {}, "channel": ""}', False, "bad_channel"),
        (b'{"channel": "hb"}', False, "bad_channel"),
        (b'{"channel": "shell", "header": []}', False, "bad_message"),
        (b'{"channel": "shell", "buffers": ["eA=="]}', False, "bad_buffers"),
        (b"\xff\xfe", False, "bad_json"),
        (struct.pack(">II", 1, 4), True, "bad_offsets"),
        (struct.pack(">I", 0), True, "bad_offsets"),
        (struct.pack(">III", 2, 12, 11) + b"{}", True, "bad_offsets"),
    ],
)
def test_legacy_bad_frames(payload, binary, code):
    with pytest.raises(JupyterCodecError) as info:
        LegacyCodec().decode(payload, binary)
    assert info.value.code == code


@pytest.mark.parametrize("doc", [{}, {"channel": None}])
def test_legacy_message_without_channel_is_for_shell(doc):
    # jupyter_server's GatewayKernelClient sends no channel; Jupyter assumes shell.
    header = {"msg_id": "m1", "msg_type": "kernel_info_request", "session": "s"}
    payload = json.dumps({"header": header, "parent_header": {}, "content": {}, **doc})
    message = LegacyCodec().decode(payload.encode(), False)
    assert message.channel == "shell"
    bound = to_kernel(message)
    assert bound.socket is JupyterSocket.SHELL


def test_v1_refuses_text_frames_and_unknown_channels():
    with pytest.raises(JupyterCodecError) as info:
        V1Codec().decode(b"{}", False)
    assert info.value.code == "text_frame"
    payload, _ = V1Codec().encode(request("shell", "execute_request"))
    evil = payload.replace(b"shell", b"hbhbh", 1)
    with pytest.raises(JupyterCodecError) as info:
        V1Codec().decode(evil, True)
    assert info.value.code == "bad_channel"


def test_codec_module_does_no_io():
    import subprocess
    import sys

    code = (
        "import sys, cellmux.server.jupyter.codec, cellmux.server.jupyter.status\n"
        "bad = [m for m in ('twisted', 'autobahn', 'zmq', 'socket', 'txzmq') if m in sys.modules]\n"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
