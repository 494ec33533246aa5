# -*- test-case-name: tests.test_protocol_control -*-
"""Control messages and the client handshake, with no I/O.

A control frame (channel 0) carries one part: a UTF-8 JSON object whose
``op`` names the message. The client opens with ``hello``; the server
answers ``welcome`` (or ``error`` and closes). The client may send Jupyter
messages on the data channels and requests on control right after its
``hello``, without waiting for ``welcome``. In version 2 a ``hello`` may
ask for a new kernel (``create``) instead of naming one, so that a client
goes from nothing to its first result in one round trip.

State table of the server's side of one client connection::

    AWAITING_HELLO --hello--> ATTACHED --(anything valid)--> ATTACHED
    any state --fatal ProtocolError--> CLOSED
"""

from __future__ import annotations

import enum
import json
from typing import Any

import attrs

from . import boundedjson
from .channels import CLIENT_SENDABLE, Channel, JupyterSocket, is_known_channel
from .errors import ProtocolError
from .framing import Frame
from .hostlink import valid_name

__all__ = [
    "PROTOCOL_VERSION",
    "REQUEST_OPS",
    "SUPPORTED_VERSIONS",
    "ClientState",
    "CreateOrder",
    "DataMessage",
    "Hello",
    "Request",
    "ServerSideHandshake",
    "control_frame",
    "error_payload",
    "parse_control",
]

#: Newest version spoken in ``hello``/``welcome``; bumped on every change
#: to the handshake. 2: ``hello.create``.
PROTOCOL_VERSION = 2
#: Versions a client may ask for; ``welcome`` answers in the client's.
SUPPORTED_VERSIONS = frozenset({1, 2})
#: Longest kernel spec name a ``create`` may give.
MAX_SPEC_NAME = 200

#: Requests a client may send on the control channel once attached.
REQUEST_OPS = frozenset({"interrupt", "restart", "shutdown", "subscribe", "ping", "history"})

#: Longest session id a client may declare; ids are opaque strings.
MAX_SESSION_ID = 200


def control_frame(op: str, **fields: Any) -> Frame:
    """A control frame carrying ``{"op": op, **fields}``."""
    body = json.dumps({"op": op, **fields}, separators=(",", ":")).encode()
    return Frame(channel=Channel.CONTROL, parts=(body,))


def error_payload(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """The fields of an ``error`` control message."""
    return {"code": code, "message": message, **extra}


def parse_control(frame: Frame) -> dict[str, Any]:
    """The JSON object of a control frame.

    @raise ProtocolError: unless the frame has one part holding a JSON
        object with a string ``op``.
    """
    if len(frame.parts) != 1:
        raise ProtocolError("bad_control", "a control frame has exactly one part")
    try:
        body = boundedjson.loads(frame.parts[0])
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ProtocolError("bad_control", f"control part is not JSON: {e}") from None
    if not isinstance(body, dict) or not isinstance(body.get("op"), str):
        raise ProtocolError("bad_control", "control part must be an object with a string op")
    return body


def _channel_list(value: object) -> frozenset[int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(c, int) and not isinstance(c, bool) for c in value
    ):
        raise ProtocolError("bad_channels", "channels must be a list of integers")
    unknown = [c for c in value if not is_known_channel(c)]
    if unknown:
        raise ProtocolError("bad_channels", f"unknown channels {unknown}")
    return frozenset(value)


@attrs.frozen
class CreateOrder:
    """What a version-2 ``hello`` asks for instead of naming a kernel.

    @ivar name: the kernel spec (None: the server's default).
    """

    name: str | None = None
    #: Run it on a kernel host with this label (docs/scaling.md).
    host_label: str | None = None

    @classmethod
    def from_body(cls, value: object) -> CreateOrder:
        if not isinstance(value, dict):
            raise ProtocolError("bad_hello", "create must be an object", fatal=True)
        name = value.get("name")
        if name is not None and (not isinstance(name, str) or not 0 < len(name) <= MAX_SPEC_NAME):
            raise ProtocolError(
                "bad_hello", f"create.name must be a string of 1-{MAX_SPEC_NAME} chars", fatal=True
            )
        label = value.get("host_label")
        if label is not None and not valid_name(label):
            raise ProtocolError("bad_hello", "create.host_label must be a host label", fatal=True)
        return cls(name, label)


@attrs.frozen
class Hello:
    """The client's opening message.

    @ivar kernel: id of the kernel to attach to ("" with C{create}).
    @ivar session: the client's session id; the kernel's input_request
        messages carry it in their parent header, which routes stdin.
    @ivar channels: channels to receive, or None for all.
    @ivar cursor: the last seq the client has seen, to resume after it
        (None for a fresh attach).
    @ivar create: make a new kernel and attach to it (version 2).
    """

    version: int
    kernel: str
    session: str
    channels: frozenset[int] | None = None
    cursor: int | None = None
    create: CreateOrder | None = None

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Hello:
        version = body.get("version")
        if type(version) is not int or version not in SUPPORTED_VERSIONS:
            raise ProtocolError(
                "unsupported_version",
                f"server speaks versions 1-{PROTOCOL_VERSION}, client asked for {version!r}",
                fatal=True,
            )
        kernel, session = body.get("kernel"), body.get("session")
        create = None
        if version >= 2 and body.get("create") is not None:
            if kernel is not None:
                raise ProtocolError("bad_hello", "hello has either kernel or create", fatal=True)
            create, kernel = CreateOrder.from_body(body["create"]), ""
        elif not isinstance(kernel, str) or not kernel:
            raise ProtocolError("bad_hello", "hello needs a kernel id", fatal=True)
        if not isinstance(session, str) or not 0 < len(session) <= MAX_SESSION_ID:
            raise ProtocolError(
                "bad_hello", f"hello needs a session id of 1-{MAX_SESSION_ID} chars", fatal=True
            )
        cursor = body.get("cursor")
        if cursor is not None and (
            not isinstance(cursor, int) or isinstance(cursor, bool) or cursor < 0
        ):
            raise ProtocolError("bad_hello", "cursor must be a non-negative integer", fatal=True)
        try:
            channels = _channel_list(body.get("channels"))
        except ProtocolError as e:
            raise ProtocolError(e.code, e.message, fatal=True) from None
        if create is not None and cursor is not None:
            raise ProtocolError("bad_hello", "a new kernel has nothing to resume", fatal=True)
        return cls(version, kernel, session, channels, cursor, create)


@attrs.frozen
class Request:
    """A control request from an attached client (interrupt, restart, …).

    @ivar id: the client's correlation id, echoed in the reply (or None).
    """

    op: str
    id: Any = None
    channels: frozenset[int] | None = None


@attrs.frozen
class DataMessage:
    """A Jupyter message from a client, to be relayed to its kernel."""

    frame: Frame


class ClientState(enum.Enum):
    #: Connected; nothing but ``hello`` is acceptable.
    AWAITING_HELLO = "awaiting_hello"
    #: Attached to a kernel; data and requests flow.
    ATTACHED = "attached"
    #: A fatal error happened; no more input is accepted.
    CLOSED = "closed"


class ServerSideHandshake:
    """The server's view of one client connection, fed decoded frames.

    L{receive} returns one event (L{Hello}, L{Request} or L{DataMessage})
    or raises L{ProtocolError}. A fatal error moves to CLOSED, after which
    every input is refused.
    """

    def __init__(self) -> None:
        self._state = ClientState.AWAITING_HELLO

    @property
    def attached(self) -> bool:
        return self._state is ClientState.ATTACHED

    def receive(self, frame: Frame) -> Hello | Request | DataMessage:
        try:
            return self._receive(frame)
        except ProtocolError as e:
            if e.fatal:
                self._state = ClientState.CLOSED
            raise

    def _receive(self, frame: Frame) -> Hello | Request | DataMessage:
        state = self._state
        if state is ClientState.CLOSED:
            raise ProtocolError("closed", "connection is closed", fatal=True)
        if state is ClientState.AWAITING_HELLO:
            if not frame.is_control:
                raise ProtocolError(
                    "expected_hello", f"got channel {frame.channel} before hello", fatal=True
                )
            try:
                body = parse_control(frame)
            except ProtocolError as e:
                raise ProtocolError(e.code, e.message, fatal=True) from None
            if body["op"] != "hello":
                raise ProtocolError(
                    "expected_hello", f"got op {body['op']!r} before hello", fatal=True
                )
            hello = Hello.from_body(body)
            self._state = ClientState.ATTACHED
            return hello
        # ATTACHED
        if frame.is_control:
            body = parse_control(frame)
            op, request_id = body["op"], body.get("id")
            if op not in REQUEST_OPS:
                raise ProtocolError(
                    "unknown_op", f"unknown control op {op!r}", request_id=request_id
                )
            try:
                channels = _channel_list(body.get("channels")) if op == "subscribe" else None
            except ProtocolError as e:
                raise ProtocolError(e.code, e.message, request_id=request_id) from None
            return Request(op=op, id=request_id, channels=channels)
        if frame.channel not in CLIENT_SENDABLE:
            raise ProtocolError(
                "channel_not_sendable", f"clients cannot send on channel {frame.channel}"
            )
        if len(frame.parts) < 4:
            raise ProtocolError("bad_message", "a Jupyter message has at least 4 parts")
        expected = JupyterSocket.STDIN if frame.channel == Channel.STDIN else None
        if expected is not None and frame.socket != expected:
            raise ProtocolError("bad_socket", "stdin channel messages go to the stdin socket")
        if expected is None and frame.socket not in (JupyterSocket.SHELL, JupyterSocket.CONTROL):
            raise ProtocolError("bad_socket", "requests go to the shell or control socket")
        return DataMessage(frame)
