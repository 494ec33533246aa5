"""NativeSession's ``hello.create`` on a fake clock and nursery: the orderings
a real server cannot be made to show on demand (the kernel is ready only
when the test says so)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from cellmux.protocol import Channel, JupyterSocket, control_frame, encode_frame
from cellmux.protocol.framing import Frame
from cellmux.protocol.jupyter import jupyter_parts
from cellmux.server.attachment import Attachment
from cellmux.server.auth import Grant, Role
from cellmux.server.native import MAX_EARLY_FRAMES, NativeSession
from test_lifecycle_units import Harness


class Carrier:
    """What a websocket would be: control frames sent, closes, frames delivered."""

    def __init__(self) -> None:
        self.controls: list[dict] = []
        self.closed: list[tuple[int, str]] = []
        self.delivered: list[bytes] = []

    def send_control(self, op: str, **fields) -> None:
        self.controls.append({"op": op, **fields})

    def close(self, code: int, reason: str) -> None:
        self.closed.append((code, reason))

    # Transport
    def deliver(self, data: bytes) -> None:
        self.delivered.append(data)

    def gap(self, first: int, last: int) -> None:
        pass

    def gone(self, reason: str) -> None:
        pass

    def revoked(self) -> None:
        pass


def session_on(h: Harness, role: Role = Role.OWNER) -> tuple[NativeSession, Carrier]:
    carrier = Carrier()
    attachment = Attachment(h.manager, Grant(role), carrier)
    native = NativeSession(h.manager, attachment, carrier.send_control, carrier.close)
    return native, carrier


def create_hello() -> bytes:
    return encode_frame(control_frame("hello", version=2, session="s1", create={}))


def execute(code: str) -> bytes:
    parts = jupyter_parts(
        "execute_request", {"code": code}, now=datetime.now(UTC), session="s1", msg_id=code
    )
    return encode_frame(Frame(channel=Channel.EXECUTE, parts=parts, socket=JupyterSocket.SHELL))


def test_frames_sent_before_the_kernel_is_ready_reach_it_after_welcome_in_order():
    h = Harness()
    native, carrier = session_on(h)
    native.receive(create_hello())
    for code in ("a = 1", "b = 2", "a + b"):
        native.receive(execute(code))
    assert carrier.controls == [] and h.router.sent == [], "nothing before the kernel"
    h.make_ready()
    assert [c["op"] for c in carrier.controls] == ["welcome"]
    (kernel,) = h.manager.kernels.values()
    assert carrier.controls[0]["kernel"]["id"] == kernel.id
    sent = [json.loads(parts[1])["msg_id"] for _, parts in h.router.sent]
    assert sent == ["a = 1", "b = 2", "a + b"]


def test_a_kernel_whose_client_left_before_it_was_ready_is_shut_down():
    h = Harness()
    native, carrier = session_on(h)
    native.receive(create_hello())
    native.connection_lost()
    h.make_ready()
    assert h.manager.kernels == {}, "nobody learnt its id: it must not be left running"
    assert carrier.controls == []


def test_more_frames_before_welcome_than_the_bound_is_a_fatal_error():
    h = Harness()
    native, carrier = session_on(h)
    native.receive(create_hello())
    for i in range(MAX_EARLY_FRAMES + 1):
        native.receive(execute(str(i)))
    assert carrier.controls[-1]["code"] == "too_early" and carrier.controls[-1]["fatal"]
    assert len(carrier.closed) == 1
    h.make_ready()
    assert h.manager.kernels == {}, "the refused client's kernel is not kept"
    assert h.router.sent == []


def test_after_a_fatal_error_every_further_frame_is_dropped_silently():
    # The carrier's close takes a moment; a client that keeps sending until
    # then must not get an error back for each frame (nor reach any kernel).
    h = Harness()
    native, carrier = session_on(h)
    native.receive(create_hello())
    for i in range(MAX_EARLY_FRAMES + 1):
        native.receive(execute(str(i)))
    assert [c["code"] for c in carrier.controls] == ["too_early"]
    for i in range(5):
        native.receive(execute(f"after {i}"))
    native.receive(b"not a frame at all")
    native.receive(encode_frame(control_frame("ping", id="r")))
    h.make_ready()
    assert [c["code"] for c in carrier.controls] == ["too_early"], carrier.controls
    assert len(carrier.closed) == 1
    assert h.router.sent == []


def test_after_an_unknown_kernel_further_frames_get_no_answer():
    h = Harness()
    native, carrier = session_on(h)
    native.receive(encode_frame(control_frame("hello", version=2, session="s1", kernel="nope")))
    native.receive(execute("1"))
    native.receive(encode_frame(control_frame("ping", id="r")))
    assert [c["op"] for c in carrier.controls] == ["error"], carrier.controls
    assert carrier.controls[0]["fatal"] and len(carrier.closed) == 1


def test_an_observer_may_not_create():
    h = Harness()
    native, carrier = session_on(h, Role.OBSERVER)
    native.receive(create_hello())
    h.make_ready()
    assert carrier.controls[0]["code"] == "forbidden"
    assert carrier.closed[0][0] == 4403
    assert h.manager.kernels == {}


def test_a_failed_create_tells_the_client_why():
    h = Harness(max_kernels=1)
    h.create()
    native, carrier = session_on(h)
    native.receive(create_hello())
    error = carrier.controls[-1]
    assert error["op"] == "error" and error["fatal"] is True
    assert "at most 1" in error["message"], error
    assert carrier.closed[0][0] == 4503
    assert len(h.manager.kernels) == 1
