# -*- test-case-name: tests.test_protocol_framing -*-
"""Frames: the unit that travels between clients and the server.

A frame is one binary websocket message::

    offset  size      field
    0       2         channel      (uint16, big-endian)
    2       1         socket       (uint8: JupyterSocket)
    3       1         flags        (uint8, must be 0)
    4       8         seq          (uint64: per-kernel output number, 0 if none)
    12      4         nparts       (uint32)
    16      4*nparts  part lengths (uint32 each)
    ...               the parts, back to back

On the kernel link (ZeroMQ) the same fields travel as a multipart message:
one 4-byte *tag* (channel, socket, flags) followed by the parts as separate
ZeroMQ frames; the server numbers frames, so kernels send no seq.

This module does no I/O. docs/protocol.md is the normative description.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

import attrs

from .channels import Channel, JupyterSocket
from .errors import ProtocolError

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "HEADER_SIZE",
    "MAX_PARTS",
    "TAG_SIZE",
    "Frame",
    "decode_frame",
    "decode_tag",
    "encode_frame",
    "encode_tag",
    "frame_bytes",
]

_HEADER = struct.Struct(">HBBQI")
_TAG = struct.Struct(">HBB")
HEADER_SIZE = _HEADER.size  # 16
TAG_SIZE = _TAG.size  # 4

#: Largest frame accepted by default, header included. Jupyter's own
#: websocket handler caps inbound messages at 10 MiB; a kernel may send
#: bigger outputs (a plot, a data frame), so links use a larger bound.
DEFAULT_MAX_FRAME_SIZE = 64 * 1024 * 1024

#: Most parts one frame may carry: 4 Jupyter parts plus binary buffers.
#: Widgets use a handful of buffers; a thousand is far past any real use
#: and keeps the length table of a hostile frame small.
MAX_PARTS = 1024

_VALID_SOCKETS = frozenset(JupyterSocket._value2member_map_)


def _check_parts(parts: object) -> None:
    if not isinstance(parts, tuple) or not all(isinstance(p, bytes) for p in parts):
        raise ProtocolError("bad_parts", "frame parts must be a tuple of bytes")
    if len(parts) > MAX_PARTS:
        raise ProtocolError("too_many_parts", f"a frame carries at most {MAX_PARTS} parts")


def parts_tuple(parts: Iterable[bytes]) -> tuple[bytes, ...]:
    """A frame's parts as the tuple it keeps (the converter of L{Frame.parts})."""
    return tuple(parts)


@attrs.frozen
class Frame:
    """One frame: a channel number, a Jupyter socket hint, and parts.

    For data channels the parts are a Jupyter message: header,
    parent_header, metadata, content (each UTF-8 JSON) and then any binary
    buffers. For the control channel there is exactly one part, a UTF-8
    JSON object (see :mod:`cellmux.protocol.control`).
    """

    channel: int = attrs.field()
    parts: tuple[bytes, ...] = attrs.field(converter=parts_tuple)
    seq: int = attrs.field(default=0)
    socket: JupyterSocket = attrs.field(default=JupyterSocket.NONE, converter=JupyterSocket)

    @channel.validator
    def _check_channel(self, _attribute: object, value: int) -> None:
        if not 0 <= value <= 0xFFFF:
            raise ProtocolError("bad_channel", f"channel {value} is not a uint16")

    @parts.validator
    def _check_parts(self, _attribute: object, value: tuple[bytes, ...]) -> None:
        _check_parts(value)

    @seq.validator
    def _check_seq(self, _attribute: object, value: int) -> None:
        if not 0 <= value < 2**64:
            raise ProtocolError("bad_seq", f"seq {value} is not a uint64")

    @property
    def is_control(self) -> bool:
        return self.channel == Channel.CONTROL


def frame_bytes(
    channel: int, socket: int, seq: int, parts: Sequence[bytes], flags: int = 0
) -> bytes:
    """Encode a frame from its fields; the relay's hot path uses this."""
    n = len(parts)
    head = _HEADER.pack(channel, socket, flags, seq, n)
    lengths = struct.pack(f">{n}I", *map(len, parts))
    return b"".join((head, lengths, *parts))


def encode_frame(frame: Frame) -> bytes:
    """The bytes of one websocket message carrying C{frame}."""
    return frame_bytes(frame.channel, frame.socket, frame.seq, frame.parts)


def decode_frame(data: bytes, max_size: int = DEFAULT_MAX_FRAME_SIZE) -> Frame:
    """Parse one websocket message into a L{Frame}.

    @raise ProtocolError: for anything that is not exactly one valid frame.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError("bad_type", "a frame is bytes")
    size = len(data)
    if size > max_size:
        raise ProtocolError("frame_too_large", f"frame of {size} bytes exceeds {max_size}")
    if size < HEADER_SIZE:
        raise ProtocolError("frame_truncated", f"frame of {size} bytes is shorter than its header")
    channel, socket, flags, seq, nparts = _HEADER.unpack_from(data, 0)
    if flags != 0:
        raise ProtocolError("bad_flags", f"flags must be 0, not {flags}")
    if socket not in _VALID_SOCKETS:
        raise ProtocolError("bad_socket", f"unknown socket {socket}")
    if nparts > MAX_PARTS:
        raise ProtocolError("too_many_parts", f"{nparts} parts; at most {MAX_PARTS}")
    table_end = HEADER_SIZE + 4 * nparts
    if size < table_end:
        raise ProtocolError("frame_truncated", "frame ends inside its length table")
    lengths = struct.unpack_from(f">{nparts}I", data, HEADER_SIZE)
    if table_end + sum(lengths) != size:
        raise ProtocolError(
            "bad_lengths",
            f"part lengths add up to {sum(lengths)} but {size - table_end} bytes follow",
        )
    view = memoryview(data)
    parts = []
    offset = table_end
    for length in lengths:
        parts.append(bytes(view[offset : offset + length]))
        offset += length
    return Frame(channel=channel, parts=tuple(parts), seq=seq, socket=JupyterSocket(socket))


def encode_tag(channel: int, socket: int, flags: int = 0) -> bytes:
    """The first ZeroMQ frame of a kernel-link message."""
    return _TAG.pack(channel, socket, flags)


def decode_tag(tag: bytes) -> tuple[int, int]:
    """Parse a kernel-link tag into (channel, socket).

    @raise ProtocolError: if the tag is not 4 bytes with valid fields.
    """
    if len(tag) != TAG_SIZE:
        raise ProtocolError("bad_tag", f"a link tag is {TAG_SIZE} bytes, not {len(tag)}")
    channel, socket, flags = _TAG.unpack(tag)
    if flags != 0 or socket not in _VALID_SOCKETS:
        raise ProtocolError("bad_tag", f"bad link tag {tag.hex()}")
    return channel, socket
