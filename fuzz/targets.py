"""Fuzz targets: every parser that reads bytes from a kernel or a client.

Each target takes one input (bytes) and fails (raises something other than
the parser's documented error) only on a bug. The same functions are run
by atheris (fuzz/run.py, ``tox -e fuzz``) and replayed on the committed
corpus and crash inputs by tests/test_fuzz_regressions.py, which needs no
atheris. See docs/security.md, "Fuzzing".

Targets that need several messages (a link handshake, a client session)
cut their input into messages with L{split_messages}, a small length-prefixed
format that mutations keep mostly intact.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import zlib
from collections.abc import Callable
from http import HTTPStatus

from cellmux.protocol import ProtocolError, boundedjson
from cellmux.protocol.control import ServerSideHandshake, parse_control
from cellmux.protocol.framing import decode_frame, decode_tag, encode_frame
from cellmux.protocol.link import KernelSideLink, LinkState, ServerLink, link_mac
from cellmux.server.jupyter.codec import (
    JupyterCodecError,
    JupyterMessage,
    LegacyCodec,
    V1Codec,
    to_kernel,
)
from cellmux.server.kernels import _parent_session
from cellmux.server.longpoll import pack_frames, unpack_frames
from cellmux.server.permalinks import decode_inline
from cellmux.server.webjson import HTTPError, read_json_body

__all__ = ["LINK_ID", "LINK_NONCE", "LINK_SECRET", "TARGETS", "split_messages"]

#: The link the link target plays against (fixed, so seeds can hold a valid proof).
LINK_ID = b"L" * 16
LINK_SECRET = b"S" * 32
LINK_NONCE = b"N" * 16
#: Messages and parts a target takes from one input: enough for any state.
MAX_MESSAGES = 16
MAX_MESSAGE_PARTS = 8


#: An input starting with this repeats a chunk (see L{expand}).
REPEAT = b"\xffR"


def expand(data: bytes) -> bytes:
    """Inputs that start with L{REPEAT}, a count byte, a length byte and a
    chunk of that length stand for the chunk repeated 16 x count times, then
    the rest. Coverage does not reward nesting deeper or runs longer than
    seen before, so without this, mutations seldom reach a thousand ``[``
    (RecursionError) or similar depth and size limits."""
    if not data.startswith(REPEAT) or len(data) < 4:
        return data
    count, length = data[2], data[3]
    chunk = data[4 : 4 + length]
    return chunk * (16 * count) + data[4 + length :]


def split_messages(data: bytes) -> list[list[bytes]]:
    """Messages from an input: each is a part count byte (mod 8), then each
    part as a 2-byte big-endian length and that many bytes. A short input
    ends in a short last part."""
    messages: list[list[bytes]] = []
    at = 0
    while at < len(data) and len(messages) < MAX_MESSAGES:
        count = data[at] % MAX_MESSAGE_PARTS
        at += 1
        parts = []
        for _ in range(count):
            length = int.from_bytes(data[at : at + 2], "big")
            parts.append(data[at + 2 : at + 2 + length])
            at += 2 + length
        messages.append(parts)
    return messages


def join_messages(messages: list[list[bytes]]) -> bytes:
    """The input L{split_messages} cuts into messages (for seeds)."""
    out = bytearray()
    for parts in messages:
        out.append(len(parts))
        for part in parts:
            out += len(part).to_bytes(2, "big") + part
    return bytes(out)


def framing(data: bytes) -> None:
    """Client websocket frames: decode_frame, and the link tag."""
    data = expand(data)
    try:
        frame = decode_frame(data)
    except ProtocolError:
        pass
    else:
        assert encode_frame(frame) == bytes(data), "decode/encode is not a round trip"
    with contextlib.suppress(ProtocolError):
        decode_tag(data[:4])


def link(data: bytes) -> None:
    """The server side of a kernel link (handshake, then data) and the
    kernel side's control messages."""
    data = expand(data)
    server = ServerLink(LINK_ID, LINK_SECRET, LINK_NONCE)
    kernel = KernelSideLink(LINK_ID, LINK_SECRET, pid=1234)
    for parts in split_messages(data):
        was_ready = server.ready
        try:
            server.receive(parts)
        except ProtocolError:
            # a handshake error refuses the link for good; a ready link
            # only drops the frame
            assert was_ready or server._state is LinkState.REFUSED
        with contextlib.suppress(ProtocolError):
            kernel.receive(parts)


def control(data: bytes) -> None:
    """A client connection: frames fed to the server's handshake state machine."""
    data = expand(data)
    session = ServerSideHandshake()
    for parts in split_messages(data):
        for part in parts:
            try:
                frame = decode_frame(part)
            except ProtocolError:
                continue
            with contextlib.suppress(ProtocolError):
                parse_control(frame)
            with contextlib.suppress(ProtocolError):
                session.receive(frame)


def longpoll_body(data: bytes) -> None:
    """A long-polling client's POSTed body: length-prefixed frames."""
    data = expand(data)
    try:
        frames = unpack_frames(data)
    except ProtocolError:
        return
    assert pack_frames(frames) == data, "unpack/pack is not a round trip"
    for frame in frames:
        with contextlib.suppress(ProtocolError):
            decode_frame(frame)


def jupyter_decode(data: bytes) -> None:
    """Client messages in both Jupyter websocket formats, then to_kernel."""
    data = expand(data)
    if not data:
        return
    selector, payload = data[0], data[1:]
    codec = V1Codec() if selector & 1 else LegacyCodec()
    try:
        message = codec.decode(payload, is_binary=bool(selector & 2))
    except JupyterCodecError:
        return
    with contextlib.suppress(JupyterCodecError):
        to_kernel(message)
    # What was decoded can be sent back in the same format.
    with contextlib.suppress(JupyterCodecError):
        codec.encode(message)


_CHANNELS = ("shell", "iopub", "stdin", "control")


def jupyter_encode(data: bytes) -> None:
    """Kernel messages (arbitrary parts) encoded for Jupyter clients."""
    data = expand(data)
    for parts in split_messages(data):
        if not parts:
            continue
        message = JupyterMessage(_CHANNELS[len(parts[0]) % 4], parts)
        for codec in (LegacyCodec(), V1Codec()):
            try:
                payload, binary = codec.encode(message)
            except JupyterCodecError:
                continue
            decoded = codec.decode(payload, binary)
            assert decoded.channel == message.channel
            if isinstance(codec, V1Codec):
                assert decoded.parts == message.parts, "v1 is not a round trip"


_PERMALINK_STATUSES = {
    HTTPStatus.BAD_REQUEST,
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    HTTPStatus.REQUEST_URI_TOO_LONG,
}


def permalink(data: bytes) -> None:
    """Inline permalink blobs: as sent, and as the inflated JSON document
    (deflated and encoded here, so mutations reach the JSON checks)."""
    data = expand(data)
    blobs = [
        data.decode("latin-1"),
        base64.urlsafe_b64encode(zlib.compress(data)).rstrip(b"=").decode(),
    ]
    for blob in blobs:
        try:
            code, language, options = decode_inline(blob)
        except HTTPError as e:
            assert e.status in _PERMALINK_STATUSES, e.status
        else:
            assert isinstance(code, str) and isinstance(language, str)
            assert isinstance(options, str)


class _Body:
    """What read_json_body reads of a request: its content."""

    def __init__(self, data: bytes) -> None:
        self.content = io.BytesIO(data)


def rest_body(data: bytes) -> None:
    """REST request bodies (kernels, sessions, permalinks, ...): one JSON object."""
    data = expand(data)
    try:
        body = read_json_body(_Body(data), limit=64 * 1024)
    except HTTPError as e:
        assert e.status in _PERMALINK_STATUSES, e.status
    else:
        assert isinstance(body, dict)


class _Pairs(list):
    """A JSON object as all its members, duplicate keys included."""


def _all_members(data: bytes | str) -> object:
    """Parse keeping every member of every object: with a duplicate key,
    json.loads keeps only the last value, which can nest less deeply than
    the text does (the text is what the bound is about)."""
    return json.loads(data, object_pairs_hook=_Pairs)


def _depth(value: object) -> int:
    """How deep arrays and objects nest in a parsed value (iteratively)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, _Pairs):
            children = [member for _, member in item]
        elif isinstance(item, dict):
            children = list(item.values())
        else:
            children = item
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in children)
    return deepest


def bounded_json(data: bytes) -> None:
    """The nesting-bounded JSON parser every peer's JSON goes through: it
    accepts exactly the JSON that nests no deeper than its bound (checked
    with a small bound, where mutations reach the edge, and the default)."""
    data = expand(data)
    for limit in (4, boundedjson.MAX_JSON_DEPTH):
        try:
            value = boundedjson.loads(data, limit)
        except boundedjson.JSONTooDeep:
            try:
                value = _all_members(data)
            except (ValueError, RecursionError):
                continue  # not JSON (or too deep for Python): refusing it is right
            assert _depth(value) > limit, "refused JSON within the bound"
        except ValueError:
            continue
        else:
            assert _depth(_all_members(data)) <= limit, "accepted JSON beyond the bound"


def input_request_parent(data: bytes) -> None:
    """The parent header of a kernel's input_request, read to route stdin."""
    data = expand(data)
    session = _parent_session(data)
    assert session is None or isinstance(session, str)


#: Target name -> function, in the order run.py runs them.
TARGETS: dict[str, Callable[[bytes], None]] = {
    "framing": framing,
    "link": link,
    "control": control,
    "longpoll_body": longpoll_body,
    "jupyter_decode": jupyter_decode,
    "jupyter_encode": jupyter_encode,
    "permalink": permalink,
    "rest_body": rest_body,
    "bounded_json": bounded_json,
    "input_request_parent": input_request_parent,
}


def valid_proof() -> bytes:
    """The proof message of the fixed link (for the link seed)."""
    return link_mac(LINK_SECRET, LINK_ID, LINK_NONCE).encode()
