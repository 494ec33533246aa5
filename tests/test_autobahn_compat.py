"""What cellmux relies on in Autobahn's internals (cellmux.server.autobahn_compat),
pinned against the installed Autobahn: a release that changes any of it
fails here, not in a server.

Real Autobahn protocols and twisted.web's real HTTP channel, on Twisted's
in-memory transport; the bytes they write are read back with the
``websockets`` library's parser, an independent implementation.
"""

from __future__ import annotations

import pprint

import autobahn
import autobahn.twisted.websocket
import autobahn.util
import autobahn.websocket.protocol
import pytest
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Site
from websockets.exceptions import ProtocolError
from websockets.frames import Close, Frame, Opcode
from websockets.streams import StreamReader

from cellmux.server import autobahn_compat
from cellmux.server.autobahn_compat import (
    binary_sender,
    close,
    plain_frames,
    quiet_debug_lines,
    request_target,
    take_over_producer,
)
from cellmux.server.websocket import client_protocol_options

TARGET = "/ws?token=a%2Bb;x=1&token=c"
UPGRADE = (
    f"GET {TARGET} HTTP/1.1\r\n"
    "Host: 127.0.0.1\r\n"
    "Upgrade: websocket\r\n"
    "Connection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Version: 13\r\n"
    "\r\n"
).encode()


class Recorder(WebSocketServerProtocol):
    """Keeps what onConnect saw."""

    seen_target: str | None = None

    def onConnect(self, request):
        self.seen_target = request_target(self)


def open_connection(**options) -> tuple[Recorder, StringTransport]:
    """A server protocol past its handshake, with cellmux's options."""
    factory = WebSocketServerFactory()
    factory.protocol = Recorder
    factory.setProtocolOptions(**{**client_protocol_options(1 << 20), **options})
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(UPGRADE)
    assert protocol.state == protocol.STATE_OPEN
    head, _, rest = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101") and rest == b""
    transport.clear()
    return protocol, transport


def frames(data: bytes, mask: bool = False) -> list[Frame]:
    """The frames in what a server wrote, parsed by websockets."""
    reader = StreamReader()
    reader.feed_data(data)
    parsed = []
    while reader.buffer:
        parser = Frame.parse(reader.read_exact, mask=mask)
        with pytest.raises(StopIteration) as done:
            next(parser)  # all of it is there: the parser never waits
        parsed.append(done.value.value)
    return parsed


def test_the_installed_autobahn_is_one_whose_internals_were_checked():
    # Else production runs the slow path: read the new release for what
    # autobahn_compat relies on, run this file, then widen CHECKED.
    assert autobahn_compat.INTERNALS_KNOWN, autobahn.__version__


def test_the_request_target_is_the_raw_one_the_client_sent():
    protocol, _ = open_connection()
    assert protocol.seen_target == TARGET


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65_535, 65_536, 200_000])
def test_the_fast_path_writes_what_send_message_writes(size):
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    fast, fast_wire = open_connection()
    slow, slow_wire = open_connection(autoFragmentSize=0)
    assert plain_frames(fast) and plain_frames(slow)
    binary_sender(fast)(payload)
    slow.sendMessage(payload, isBinary=True)
    assert fast_wire.value() == slow_wire.value()
    (frame,) = frames(fast_wire.value())
    assert (frame.opcode, frame.fin, frame.data) == (Opcode.BINARY, True, payload)


@pytest.mark.parametrize(
    "option",
    ["autoFragmentSize", "logFrames", "logOctets", "trackTimings", "maskServerFrames"],
)
def test_options_the_header_leaves_out_turn_the_fast_path_off(option):
    protocol, transport = open_connection()
    if option == "trackTimings":
        protocol.setTrackTimings(True)
    else:
        setattr(protocol, option, 1000 if option == "autoFragmentSize" else True)
    assert not plain_frames(protocol)
    binary_sender(protocol)(b"x" * 3000)
    masked = option == "maskServerFrames"
    assert b"".join(f.data for f in frames(transport.value(), masked)) == b"x" * 3000


def test_while_autobahn_has_frames_queued_the_fast_path_waits_behind_them():
    protocol, transport = open_connection()
    send = binary_sender(protocol)
    # A sync send writes at once and keeps later ones queued for a later turn.
    protocol.sendMessage(b"first", isBinary=True, sync=True)
    protocol.sendMessage(b"second", isBinary=True, sync=True)
    assert protocol.send_queue
    send(b"third")
    assert [f.data for f in frames(transport.value())] == [b"first"]  # not ahead of "second"
    while protocol.send_queue:
        protocol._send()
    assert [f.data for f in frames(transport.value())] == [b"first", b"second", b"third"]


@pytest.mark.parametrize("code", [1000, 1002, 1003, 1008, 1009, 1011, 4001])
def test_close_sends_any_code_and_a_reason_cut_to_valid_utf8(code):
    protocol, transport = open_connection()
    close(protocol, code, "é" * 100)
    assert protocol.state == protocol.STATE_CLOSING
    (frame,) = frames(transport.value())
    assert frame.opcode == Opcode.CLOSE
    try:
        parsed = Close.parse(frame.data)
    except ProtocolError:  # websockets refuses some codes a server may still send
        parsed = Close(int.from_bytes(frame.data[:2], "big"), frame.data[2:].decode())
    assert parsed.code == code and parsed.reason == "é" * 60


def test_the_web_resource_leaves_the_http_channel_as_producer_and_we_take_over():
    factory = WebSocketServerFactory()
    factory.protocol = Recorder
    root = Resource()
    root.putChild(b"ws", WebSocketResource(factory))
    channel = Site(root).buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport()
    transport.protocol = channel  # as a TCP transport has it
    channel.makeConnection(transport)
    channel.dataReceived(UPGRADE)
    protocol = transport.protocol
    assert isinstance(protocol, Recorder) and protocol.seen_target == TARGET
    assert isinstance(transport.producer, HTTPChannel)  # what take_over_producer repairs
    producer = object()
    take_over_producer(protocol, producer)
    assert transport.producer is producer and transport.streaming


def test_a_new_connection_pretty_prints_nothing_unless_logged(monkeypatch):
    # Autobahn builds a pretty-printed dump of its options for a debug line
    # on every connection; cellmux makes that text only if the line is shown.
    assert quiet_debug_lines()
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


def test_debug_lines_highlight_nothing_unless_logged(monkeypatch):
    # Autobahn highlights names and values (hltype, hlval) for debug lines
    # on every connection, read and close; cellmux makes that text only if
    # a line is shown, and it is the same text.
    assert quiet_debug_lines()
    made = []
    real_qn, real_hl = autobahn.util._qn, autobahn.util.hl
    monkeypatch.setattr(autobahn.util, "_qn", lambda obj: made.append(obj) or real_qn(obj))
    monkeypatch.setattr(
        autobahn.util, "hl", lambda text, **kw: made.append(text) or real_hl(text, **kw)
    )
    protocol, transport = open_connection()
    mask = b"abcd"
    masked = bytes(a ^ b for a, b in zip(b"ping", mask, strict=True))
    masked_ping = bytes([0x89, 0x84]) + mask + masked
    protocol.dataReceived(masked_ping)
    protocol.sendMessage(b"x", isBinary=True)
    protocol.connectionLost(Failure(ConnectionDone()))
    assert made == []
    assert [f.opcode for f in frames(transport.value())] == [Opcode.PONG, Opcode.BINARY]
    for module in (autobahn.websocket.protocol, autobahn.twisted.websocket):
        method = protocol.dataReceived
        event = {"log_format": "{f} {v}", "f": module.hltype(method), "v": module.hlval(7)}
        assert formatEvent(event) == f"{autobahn.util.hltype(method)} {autobahn.util.hlval(7)}"


def test_timings_are_still_text():
    # Timings.__str__ is the one pformat that is not a debug line's argument.
    assert quiet_debug_lines()
    timings = autobahn.websocket.protocol.Timings()
    timings.track("onOpen")
    assert isinstance(str(timings), str) and str(timings).startswith("{'onOpen': ")
