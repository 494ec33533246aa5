"""The server writes relayed frames' websocket headers itself (the fast path)."""

from __future__ import annotations

import pprint

import autobahn.websocket.protocol
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent
from websockets.frames import Frame, Opcode

from cellmux.server.websocket import binary_frame_header

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


def test_a_new_connection_pretty_prints_nothing_unless_logged(monkeypatch):
    # Autobahn builds a pretty-printed dump of its options for a debug line
    # on every connection; cellmux makes that text only if the line is shown.
    printed = []
    real = pprint.PrettyPrinter.pformat
    monkeypatch.setattr(
        pprint.PrettyPrinter, "pformat", lambda self, obj: printed.append(obj) or real(self, obj)
    )
    factory = WebSocketServerFactory()
    factory.protocol = WebSocketServerProtocol
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport())
    assert printed == []
    options = [("maxFramePayloadSize", 0, "WebSocketServerFactory")]
    event = {"log_format": "\n{attrs}", "attrs": autobahn.websocket.protocol.pformat(options)}
    assert formatEvent(event) == "\n" + real(pprint.PrettyPrinter(), options)
