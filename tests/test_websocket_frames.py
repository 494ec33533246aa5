"""The server writes relayed frames' websocket headers itself (the fast path)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode

from cellmux.server.autobahn_compat import binary_frame_header

#: Where RFC 6455 changes the length encoding: 7 bits, 16 bits, 64 bits.
BOUNDARIES = [0, 1, 125, 126, 127, 0xFFFF, 0x10000, 0x10001]


@given(st.one_of(st.sampled_from(BOUNDARIES), st.integers(0, 0x30000)))
def test_header_matches_an_independent_implementation(length):
    payload = b"\xa5" * length
    expected = Frame(Opcode.BINARY, payload).serialize(mask=False, extensions=[])
    assert binary_frame_header(length) + payload == expected


def test_relayed_frames_of_every_length_class_arrive_whole(kernel):
    # Stream text of these sizes makes frames on both sides of each boundary.
    for size in [1, 60, 100, 200, 65_400, 65_600, 300_000]:
        result = kernel.execute(f"print('y' * {size}, end='')")
        assert result.stdout == "y" * size
