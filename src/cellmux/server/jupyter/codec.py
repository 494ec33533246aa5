# -*- test-case-name: tests.test_jupyter_codec -*-
"""Jupyter's kernel websocket formats, and their mapping to cellmux frames. No I/O.

Jupyter clients speak one of two formats on ``/api/kernels/{id}/channels``
(see docs/jupyter.md):

* **legacy** (no subprotocol): a text frame holding the JSON message
  ``{header, parent_header, metadata, content, channel, msg_id, msg_type}``;
  a message with binary buffers is a binary frame instead: big-endian
  uint32 ``n``, then ``n`` uint32 offsets from the frame start, then the
  JSON message (part 0) and the buffers (parts 1..n-1).
* **v1** (``v1.kernel.websocket.jupyter.org``): always a binary frame:
  little-endian uint64 ``n``, then ``n`` uint64 offsets; the slices between
  them are the channel name, header, parent_header, metadata, content and
  the buffers; the last offset is the frame's length.

A codec is picked once per connection (L{codec_for}). Both directions go
through L{JupyterMessage}: a Jupyter channel name and the message parts as
bytes (four UTF-8 JSON objects, then buffers), the shape cellmux frames
already carry, so v1 relays parts without touching them.

Every decoder raises L{JupyterCodecError} and nothing else; any other
exception escaping this module is a bug (tests/test_jupyter_codec.py fuzzes
for it).
"""

from __future__ import annotations

import itertools
import json
import struct
from collections.abc import Sequence
from typing import Any, Protocol

import attrs

from cellmux.protocol import (
    CLIENT_SENDABLE,
    MAX_PARTS,
    Channel,
    JupyterSocket,
    boundedjson,
    channel_for,
)
from cellmux.protocol.framing import parts_tuple

__all__ = [
    "V1_SUBPROTOCOL",
    "Codec",
    "JupyterCodecError",
    "JupyterMessage",
    "KernelBound",
    "LegacyCodec",
    "V1Codec",
    "channel_name",
    "codec_for",
    "parse_json_object",
    "to_kernel",
]

#: The subprotocol that selects the v1 format.
V1_SUBPROTOCOL = "v1.kernel.websocket.jupyter.org"

#: Jupyter channel names by the ipykernel socket a frame came from.
#: Server-made messages (socket NONE: restarting, dead) are iopub status.
_NAME_BY_SOCKET = {
    JupyterSocket.NONE: "iopub",
    JupyterSocket.SHELL: "shell",
    JupyterSocket.IOPUB: "iopub",
    JupyterSocket.STDIN: "stdin",
    JupyterSocket.CONTROL: "control",
}

#: The sockets a client may send to, by Jupyter channel name (iopub and hb
#: are receive-only; hb is not exposed at all, as in jupyter_server).
_SOCKET_BY_NAME = {
    "shell": JupyterSocket.SHELL,
    "control": JupyterSocket.CONTROL,
    "stdin": JupyterSocket.STDIN,
}

_CHANNEL_NAMES = frozenset(_NAME_BY_SOCKET.values())

_BE_U32 = struct.Struct(">I")
_LE_U64 = struct.Struct("<Q")


class JupyterCodecError(Exception):
    """A Jupyter-format message that cannot be relayed.

    @ivar code: short machine-readable reason (``"bad_json"``, …).
    @ivar header: the message's header if it could be read, so the
        caller can answer the request with an error reply; None if the
        frame was too broken for that.
    """

    def __init__(self, code: str, message: str, header: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.header = header

    def __repr__(self) -> str:
        return f"JupyterCodecError({self.code!r}, {self.message!r})"


@attrs.frozen
class JupyterMessage:
    """A Jupyter message on a named channel.

    @ivar channel: ``shell``, ``iopub``, ``stdin`` or ``control``.
    @ivar parts: header, parent_header, metadata, content (UTF-8 JSON),
        then the binary buffers.
    """

    channel: str
    parts: tuple[bytes, ...] = attrs.field(converter=parts_tuple)

    @property
    def buffers(self) -> tuple[bytes, ...]:
        return self.parts[4:]


@attrs.frozen
class KernelBound:
    """A client message checked and addressed for L{Kernel.send}.

    @ivar header: the decoded header (the adapter needs msg_type and session).
    """

    channel: int
    socket: JupyterSocket
    parts: tuple[bytes, ...]
    header: dict[str, Any]


def channel_name(socket: int) -> str:
    """The Jupyter channel of a cellmux frame's socket field."""
    return _NAME_BY_SOCKET[JupyterSocket(socket)]


def parse_json_object(data: bytes, what: str) -> dict[str, Any]:
    """Decode one JSON part that must be an object.

    @raise JupyterCodecError: if it is not UTF-8 JSON holding an object.
    """
    try:
        value = boundedjson.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise JupyterCodecError("bad_json", f"{what} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise JupyterCodecError("bad_json", f"{what} must be a JSON object")
    return value


def _dumps(value: Any) -> bytes:
    # ASCII escapes: a lone surrogate (legal in JSON text) stays encodable.
    return json.dumps(value, separators=(",", ":")).encode()


def _check_parts(parts: Sequence[bytes]) -> None:
    if len(parts) < 4:
        raise JupyterCodecError("bad_message", "a Jupyter message has at least 4 parts")
    if len(parts) > MAX_PARTS:
        raise JupyterCodecError("too_many_parts", f"a message carries at most {MAX_PARTS} parts")


class Codec(Protocol):
    """One of the two formats. Both methods are pure."""

    #: What the server answers in the handshake (None: no subprotocol).
    subprotocol: str | None

    def encode(self, message: JupyterMessage) -> tuple[bytes, bool]:
        """The websocket payload for C{message} and whether it is binary."""
        ...

    def decode(self, payload: bytes, is_binary: bool) -> JupyterMessage:
        """One client message. @raise JupyterCodecError: if malformed."""
        ...


class LegacyCodec:
    """The JSON format: text frames, or binary frames when there are buffers.

    This format needs the message re-encoded as one JSON document; v1 is the
    fast path.
    """

    subprotocol: str | None = None

    def encode(self, message: JupyterMessage) -> tuple[bytes, bool]:
        parts = message.parts
        _check_parts(parts)
        header = parse_json_object(parts[0], "header")
        doc = {
            "header": header,
            "parent_header": parse_json_object(parts[1], "parent_header"),
            "metadata": parse_json_object(parts[2], "metadata"),
            "content": parse_json_object(parts[3], "content"),
            "channel": message.channel,
            "msg_id": header.get("msg_id"),
            "msg_type": header.get("msg_type"),
        }
        body = _dumps(doc)
        buffers = parts[4:]
        if not buffers:
            return body, False
        chunks = (body, *buffers)
        n = len(chunks)
        offsets = []
        offset = 4 * (n + 1)
        for chunk in chunks:
            offsets.append(offset)
            offset += len(chunk)
        table = struct.pack(f">{n + 1}I", n, *offsets)
        return b"".join((table, *chunks)), True

    def decode(self, payload: bytes, is_binary: bool) -> JupyterMessage:
        if is_binary:
            text, buffers = self._split_binary(payload)
        else:
            text, buffers = payload, ()
        doc = parse_json_object(text, "the message")
        # jupyter_server's own gateway client sends no channel; a Jupyter
        # Server takes that as shell, and so does cellmux.
        channel = doc.get("channel")
        if channel is None:
            channel = "shell"
        if not isinstance(channel, str) or channel not in _CHANNEL_NAMES:
            raise JupyterCodecError(
                "bad_channel", f"channel must be one of {sorted(_CHANNEL_NAMES)}, not {channel!r}"
            )
        if not is_binary and doc.get("buffers"):
            raise JupyterCodecError(
                "bad_buffers", "a text frame cannot carry buffers; send a binary frame"
            )
        header = doc.get("header", {})
        known = header if isinstance(header, dict) else None
        parts = []
        for key in ("header", "parent_header", "metadata", "content"):
            value = doc.get(key, {})
            if not isinstance(value, dict):
                raise JupyterCodecError("bad_message", f"{key} must be a JSON object", known)
            parts.append(_dumps(value))
        return JupyterMessage(channel, (*parts, *buffers))

    @staticmethod
    def _split_binary(payload: bytes) -> tuple[bytes, tuple[bytes, ...]]:
        size = len(payload)
        if size < 4:
            raise JupyterCodecError("frame_truncated", "binary frame shorter than its count")
        (n,) = _BE_U32.unpack_from(payload, 0)
        if not 1 <= n <= MAX_PARTS:
            raise JupyterCodecError("bad_offsets", f"binary frame declares {n} parts")
        table_end = 4 * (n + 1)
        if size < table_end:
            raise JupyterCodecError("frame_truncated", "binary frame ends inside its offsets")
        offsets = [*struct.unpack_from(f">{n}I", payload, 4), size]
        if offsets[0] != table_end:
            raise JupyterCodecError("bad_offsets", "the first part must follow the offsets")
        if any(a > b for a, b in itertools.pairwise(offsets)):
            raise JupyterCodecError("bad_offsets", "offsets must not decrease or pass the end")
        view = memoryview(payload)
        chunks = [bytes(view[a:b]) for a, b in itertools.pairwise(offsets)]
        return chunks[0], tuple(chunks[1:])


class V1Codec:
    """``v1.kernel.websocket.jupyter.org``: offsets and raw parts, no JSON re-encoding."""

    subprotocol: str | None = V1_SUBPROTOCOL

    def encode(self, message: JupyterMessage) -> tuple[bytes, bool]:
        _check_parts(message.parts)
        chunks = (message.channel.encode(), *message.parts)
        n = len(chunks) + 1
        offsets = []
        offset = 8 * (n + 1)
        for chunk in chunks:
            offsets.append(offset)
            offset += len(chunk)
        offsets.append(offset)
        table = struct.pack(f"<{n + 1}Q", n, *offsets)
        return b"".join((table, *chunks)), True

    def decode(self, payload: bytes, is_binary: bool) -> JupyterMessage:
        if not is_binary:
            raise JupyterCodecError("text_frame", "the v1 format uses binary frames only")
        size = len(payload)
        if size < 8:
            raise JupyterCodecError("frame_truncated", "frame shorter than its offset count")
        (n,) = _LE_U64.unpack_from(payload, 0)
        # channel + 4 JSON parts need 6 offsets; each buffer adds one.
        if not 6 <= n <= MAX_PARTS + 2:
            raise JupyterCodecError("bad_offsets", f"frame declares {n} offsets")
        table_end = 8 * (n + 1)
        if size < table_end:
            raise JupyterCodecError("frame_truncated", "frame ends inside its offsets")
        offsets = struct.unpack_from(f"<{n}Q", payload, 8)
        if offsets[0] != table_end:
            raise JupyterCodecError("bad_offsets", "the channel must follow the offsets")
        if offsets[-1] != size:
            raise JupyterCodecError(
                "bad_offsets", f"last offset is {offsets[-1]} but the frame has {size} bytes"
            )
        if any(a > b for a, b in itertools.pairwise(offsets)):
            raise JupyterCodecError("bad_offsets", "offsets must not decrease")
        view = memoryview(payload)
        chunks = [bytes(view[a:b]) for a, b in itertools.pairwise(offsets)]
        try:
            channel = chunks[0].decode()
        except UnicodeDecodeError:
            raise JupyterCodecError("bad_channel", "channel name is not UTF-8") from None
        if channel not in _CHANNEL_NAMES:
            raise JupyterCodecError(
                "bad_channel", f"channel must be one of {sorted(_CHANNEL_NAMES)}, not {channel!r}"
            )
        return JupyterMessage(channel, chunks[1:])


def codec_for(offered: Sequence[str]) -> Codec:
    """The codec for a handshake that offered these subprotocols."""
    return V1Codec() if V1_SUBPROTOCOL in offered else LegacyCodec()


def to_kernel(message: JupyterMessage) -> KernelBound:
    """Check a client message and address it to a kernel socket and channel.

    Clients may send requests on shell and control, and input_reply on
    stdin, as in Jupyter; nothing on iopub.

    @raise JupyterCodecError: for a message a client may not send; its
        C{header} is set when the header was readable.
    """
    _check_parts(message.parts)
    header = parse_json_object(message.parts[0], "header")
    socket = _SOCKET_BY_NAME.get(message.channel)
    if socket is None:
        raise JupyterCodecError(
            "channel_not_sendable", f"clients cannot send on {message.channel}", header
        )
    msg_type = header.get("msg_type")
    if not isinstance(msg_type, str) or not msg_type:
        raise JupyterCodecError("bad_header", "header needs a string msg_type")
    if not isinstance(header.get("msg_id"), str):
        raise JupyterCodecError("bad_header", "header needs a string msg_id")
    for index, what in ((1, "parent_header"), (2, "metadata"), (3, "content")):
        try:
            parse_json_object(message.parts[index], what)
        except JupyterCodecError as e:
            raise JupyterCodecError(e.code, e.message, header) from None
    channel = channel_for(msg_type)
    if socket is JupyterSocket.STDIN:
        allowed = channel == Channel.STDIN
    else:
        allowed = channel in CLIENT_SENDABLE and channel != Channel.STDIN
    if not allowed:
        raise JupyterCodecError(
            "not_sendable", f"clients cannot send {msg_type} on {message.channel}", header
        )
    return KernelBound(channel, socket, message.parts, header)
