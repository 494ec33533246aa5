"""Tests for cellmux.protocol.framing: websocket frames and kernel-link tags."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cellmux.protocol import (
    HEADER_SIZE,
    MAX_PARTS,
    TAG_SIZE,
    Channel,
    Frame,
    JupyterSocket,
    ProtocolError,
    decode_frame,
    decode_tag,
    encode_frame,
    encode_tag,
    frame_bytes,
)

channels = st.integers(min_value=0, max_value=0xFFFF)
sockets = st.sampled_from(JupyterSocket)
seqs = st.integers(min_value=0, max_value=2**64 - 1)
parts_lists = st.lists(st.binary(), max_size=20).map(tuple)
frames = st.builds(Frame, channel=channels, parts=parts_lists, seq=seqs, socket=sockets)


def header(
    channel: int = 6, socket: int = 1, flags: int = 0, seq: int = 0, nparts: int = 0
) -> bytes:
    """The 16-byte frame header, packed by hand from the documented layout."""
    return struct.pack(">HBBQI", channel, socket, flags, seq, nparts)


def lengths(*sizes: int) -> bytes:
    return b"".join(struct.pack(">I", n) for n in sizes)


def refused(data: object, code: str, **kwargs: object) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode_frame(data, **kwargs)  # type: ignore[arg-type]
    assert info.value.code == code
    return info.value


# --- the documented layout ---------------------------------------------------------------


def test_encode_matches_documented_layout() -> None:
    frame = Frame(channel=Channel.EXECUTE, parts=(b"ab", b"", b"xyz"), seq=7, socket=1)
    expected = (
        b"\x00\x06"  # channel
        b"\x01"  # socket: SHELL
        b"\x00"  # flags
        b"\x00\x00\x00\x00\x00\x00\x00\x07"  # seq
        b"\x00\x00\x00\x03"  # nparts
        b"\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00\x03"  # part lengths
        b"abxyz"
    )
    assert encode_frame(frame) == expected
    assert decode_frame(expected) == frame
    assert HEADER_SIZE == 16
    assert TAG_SIZE == 4


def test_empty_frame() -> None:
    data = encode_frame(Frame(channel=0, parts=()))
    assert data == header(channel=0, socket=0)
    assert decode_frame(data) == Frame(channel=0, parts=(), seq=0, socket=JupyterSocket.NONE)


def test_decode_accepts_bytearray_and_memoryview() -> None:
    frame = Frame(channel=2, parts=(b"out",), seq=1, socket=JupyterSocket.IOPUB)
    data = encode_frame(frame)
    assert decode_frame(bytearray(data)) == frame
    assert decode_frame(memoryview(data)) == frame
    assert all(type(p) is bytes for p in decode_frame(memoryview(data)).parts)


def test_decoded_socket_is_the_enum() -> None:
    frame = decode_frame(encode_frame(Frame(channel=1, parts=(), socket=3)))
    assert frame.socket is JupyterSocket.STDIN


# --- round trips -------------------------------------------------------------------------


@given(frames)
def test_round_trip(frame: Frame) -> None:
    assert decode_frame(encode_frame(frame)) == frame


@given(frames)
def test_frame_bytes_equals_encode_frame(frame: Frame) -> None:
    assert frame_bytes(frame.channel, frame.socket, frame.seq, frame.parts) == encode_frame(frame)


@given(frames)
def test_whole_and_with_trailing_data(frame: Frame) -> None:
    data = encode_frame(frame)
    assert decode_frame(data) == frame
    refused(data + b"\x00", "bad_lengths")


@given(frames)
def test_encoded_size(frame: Frame) -> None:
    expected = HEADER_SIZE + 4 * len(frame.parts) + sum(map(len, frame.parts))
    assert len(encode_frame(frame)) == expected


# --- hostile input -----------------------------------------------------------------------


@given(st.binary())
def test_arbitrary_bytes_raise_only_protocol_error(data: bytes) -> None:
    try:
        frame = decode_frame(data)
    except ProtocolError:
        return
    # Whatever is accepted is exactly the encoding of what came out.
    assert encode_frame(frame) == data


@given(frames, st.data())
def test_truncated_frames_are_refused(frame: Frame, data: st.DataObject) -> None:
    encoded = encode_frame(frame)
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1), label="cut")
    with pytest.raises(ProtocolError) as info:
        decode_frame(encoded[:cut])
    assert info.value.code in {"frame_truncated", "bad_lengths"}


@given(frames, st.binary(min_size=1))
def test_trailing_bytes_are_refused(frame: Frame, extra: bytes) -> None:
    refused(encode_frame(frame) + extra, "bad_lengths")


@given(frames, st.data())
def test_flipped_bytes_raise_only_protocol_error(frame: Frame, data: st.DataObject) -> None:
    mutated = bytearray(encode_frame(frame))
    flips = data.draw(
        st.lists(
            st.tuples(
                st.integers(min_value=0, max_value=len(mutated) - 1),
                st.integers(min_value=1, max_value=255),
            ),
            min_size=1,
            max_size=4,
        ),
        label="flips",
    )
    for index, mask in flips:
        mutated[index] ^= mask
    try:
        decoded = decode_frame(bytes(mutated))
    except ProtocolError:
        return
    assert encode_frame(decoded) == bytes(mutated)


# --- specific refusals -------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, HEADER_SIZE - 1])
def test_too_short(size: int) -> None:
    refused(header()[:size], "frame_truncated")


@pytest.mark.parametrize("flags", [1, 0x80, 0xFF])
def test_nonzero_flags(flags: int) -> None:
    refused(header(flags=flags), "bad_flags")


@pytest.mark.parametrize("socket", [5, 6, 0xFF])
def test_unknown_socket(socket: int) -> None:
    refused(header(socket=socket), "bad_socket")


def test_too_many_parts() -> None:
    # Refused from the header alone: no length table is read or allocated.
    refused(header(nparts=MAX_PARTS + 1), "too_many_parts")
    refused(header(nparts=0xFFFFFFFF), "too_many_parts")


def test_max_parts_is_allowed() -> None:
    frame = Frame(channel=7, parts=(b"",) * MAX_PARTS)
    assert decode_frame(encode_frame(frame)) == frame


def test_length_table_past_the_end() -> None:
    refused(header(nparts=3) + lengths(0, 0), "frame_truncated")
    refused(header(nparts=1) + b"\x00\x00", "frame_truncated")


def test_lengths_claim_more_than_follows() -> None:
    refused(header(nparts=1) + lengths(5) + b"abcd", "bad_lengths")


def test_lengths_claim_less_than_follows() -> None:
    refused(header(nparts=2) + lengths(1, 1) + b"abc", "bad_lengths")


def test_trailing_data_after_empty_frame() -> None:
    refused(header() + b"x", "bad_lengths")


def test_frame_over_max_size() -> None:
    data = encode_frame(Frame(channel=6, parts=(b"x" * 100,), socket=1))
    assert decode_frame(data, max_size=len(data)) == decode_frame(data)
    error = refused(data, "frame_too_large", max_size=len(data) - 1)
    assert str(len(data)) in error.message


def test_size_is_checked_before_anything_else() -> None:
    # Garbage over the limit is refused for its size, not parsed.
    refused(b"\xff" * 64, "frame_too_large", max_size=63)


@pytest.mark.parametrize("data", ["a string", None, 42, [b"\x00" * 16]])
def test_decode_non_bytes(data: object) -> None:
    refused(data, "bad_type")


def test_errors_from_decode_are_not_fatal_by_default() -> None:
    assert refused(b"", "frame_truncated").fatal is False


# --- constructing frames -----------------------------------------------------------------


@pytest.mark.parametrize(
    "parts",
    [
        ("text",),
        (b"ok", "text"),
        (bytearray(b"x"),),
        (memoryview(b"x"),),
        (None,),
        b"abc",  # bytes is an iterable of ints, not of parts
        "abc",
    ],
)
def test_frame_parts_must_be_bytes(parts: object) -> None:
    with pytest.raises(ProtocolError) as info:
        Frame(channel=1, parts=parts)  # type: ignore[arg-type]
    assert info.value.code == "bad_parts"


def test_frame_parts_list_becomes_tuple() -> None:
    frame = Frame(channel=1, parts=[b"a", b"b"])  # type: ignore[arg-type]
    assert frame.parts == (b"a", b"b")


def test_frame_too_many_parts() -> None:
    with pytest.raises(ProtocolError) as info:
        Frame(channel=1, parts=(b"",) * (MAX_PARTS + 1))
    assert info.value.code == "too_many_parts"


@pytest.mark.parametrize("channel", [-1, 0x10000])
def test_frame_channel_is_uint16(channel: int) -> None:
    with pytest.raises(ProtocolError) as info:
        Frame(channel=channel, parts=())
    assert info.value.code == "bad_channel"


@pytest.mark.parametrize("seq", [-1, 2**64])
def test_frame_seq_is_uint64(seq: int) -> None:
    with pytest.raises(ProtocolError) as info:
        Frame(channel=1, parts=(), seq=seq)
    assert info.value.code == "bad_seq"


def test_frame_socket_is_converted() -> None:
    assert Frame(channel=1, parts=(), socket=2).socket is JupyterSocket.IOPUB


def test_is_control() -> None:
    assert Frame(channel=Channel.CONTROL, parts=(b"{}",)).is_control
    assert not Frame(channel=Channel.STDOUT, parts=()).is_control


def test_frames_are_immutable() -> None:
    frame = Frame(channel=1, parts=())
    with pytest.raises(AttributeError):
        frame.channel = 2  # type: ignore[misc]


# --- kernel-link tags --------------------------------------------------------------------


@given(channels, sockets)
def test_tag_round_trip(channel: int, socket: JupyterSocket) -> None:
    tag = encode_tag(channel, socket)
    assert len(tag) == TAG_SIZE
    assert decode_tag(tag) == (channel, socket)


@given(channels, sockets, seqs, parts_lists)
def test_tag_is_the_head_of_a_frame_header(
    channel: int, socket: JupyterSocket, seq: int, parts: tuple[bytes, ...]
) -> None:
    assert frame_bytes(channel, socket, seq, parts)[:TAG_SIZE] == encode_tag(channel, socket)


def test_tag_layout() -> None:
    assert encode_tag(Channel.DISPLAY, JupyterSocket.IOPUB) == b"\x00\x07\x02\x00"
    assert decode_tag(b"\x01\x02\x04\x00") == (0x0102, 4)


@pytest.mark.parametrize(
    "tag",
    [
        b"",
        b"\x00\x02\x02",
        b"\x00\x02\x02\x00\x00",
        b"\x00\x02\x02\x01",  # nonzero flags
        b"\x00\x02\x05\x00",  # unknown socket
        b"\x00\x02\xff\x00",
    ],
)
def test_bad_tags(tag: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_tag(tag)
    assert info.value.code == "bad_tag"


def test_encode_tag_with_flags_is_refused_on_decode() -> None:
    with pytest.raises(ProtocolError):
        decode_tag(encode_tag(2, 2, flags=1))


@given(st.binary())
def test_arbitrary_tags_raise_only_protocol_error(tag: bytes) -> None:
    try:
        channel, socket = decode_tag(tag)
    except ProtocolError:
        return
    assert encode_tag(channel, socket) == tag
