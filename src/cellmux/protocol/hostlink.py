# -*- test-case-name: tests.test_protocol_hostlink -*-
"""The control wire between a kernel host and a front server, with no I/O.

A ``cellmux host`` holds one ZeroMQ DEALER per front (CURVE over TCP);
the front has one ROUTER for all hosts. Every message on that link is a
multipart message whose first frame says what it is:

* ``[link id, *frames]`` (a 16-byte link id): one kernel's link traffic,
  relayed unread in both directions (the front checks it with the same
  L{cellmux.protocol.link.ServerLink} as a local kernel's);
* ``[b"", kind, body]``: control, ``body`` a JSON object.

Control kinds, host -> front::

    hello  {"name", "labels": [..], "max_kernels", "epoch", "version"}
           sent every second until the front answers ``welcome``
    beat   {"running", "max_kernels", "mem_available"}   every second
    event  a nursery event line (cellmux.protocol.nursery: spawned,
           exited, error) about one of this front's kernels

front -> host::

    welcome  {"keep": [link hex, ..]}  the kernels the front still knows
             on this host; the host kills its others for this front
    beat     {}                        every second, to live hosts
    who      {}                        "I do not know you": say hello again
    command  a nursery command line (spawn, signal, kill)

Sizes are bounded: a control body is at most L{MAX_CONTROL} bytes (a
nursery line at most its own MAX_LINE), a host name at most
L{MAX_NAME} characters, at most L{MAX_LABELS} labels of L{MAX_NAME}.
"""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

import attrs
from attrs import AttrsInstance

from . import nursery as wire
from .errors import ProtocolError

__all__ = [
    "HOSTLINK_VERSION",
    "LINK_ID_SIZE",
    "MAX_CONTROL",
    "MAX_LABELS",
    "MAX_NAME",
    "Beat",
    "FrontBeat",
    "Hello",
    "NurseryCommand",
    "NurseryEvent",
    "Welcome",
    "Who",
    "decode_from_front",
    "decode_from_host",
    "encode",
    "valid_name",
]

HOSTLINK_VERSION = 1
#: Bytes of a kernel link id: what tells link traffic from control.
LINK_ID_SIZE = 16
#: Longest JSON body of a control message other than a nursery line.
MAX_CONTROL = 64 * 1024
MAX_NAME = 64
MAX_LABELS = 32
#: Most links a welcome may name (a host's kernels for one front).
MAX_KEEP = 100_000
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


def valid_name(value: object) -> bool:
    """A host name or label: letters, digits, ``.``, ``_``, ``-``; 1-64."""
    return isinstance(value, str) and _NAME.match(value) is not None


def _name(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not valid_name(value):
        raise ProtocolError("bad_host_message", f"{attribute.name} must be a host name")


def _labels(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if (
        not isinstance(value, tuple)
        or len(value) > MAX_LABELS
        or not all(valid_name(v) for v in value)
    ):
        raise ProtocolError("bad_host_message", f"at most {MAX_LABELS} labels, each a name")


def _count(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise ProtocolError("bad_host_message", f"{attribute.name} must be a whole number")


def _links(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if (
        not isinstance(value, tuple)
        or len(value) > MAX_KEEP
        or not all(
            isinstance(v, str) and re.fullmatch(r"[0-9a-f]{32}", v) is not None for v in value
        )
    ):
        raise ProtocolError("bad_host_message", "keep must be a list of link ids")


def _tuple(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value


@attrs.frozen
class Hello:
    """A host introduces itself (again, after a restart or a lost link)."""

    name: str = attrs.field(validator=_name)
    labels: tuple[str, ...] = attrs.field(converter=_tuple, validator=_labels)
    max_kernels: int = attrs.field(validator=_count)
    #: Chosen at random when the host process starts: a new epoch is a new
    #: process, whose predecessor's kernels are gone.
    epoch: int = attrs.field(validator=_count)
    version: int = attrs.field(default=HOSTLINK_VERSION, validator=_count)
    #: Counts this host process's hellos to this front (from 1). Answers
    #: echo it, so that one queued while the link was down and delivered
    #: late is told from a current one (see L{Welcome}, L{Who}).
    seq: int = attrs.field(default=0, validator=_count)
    kind = b"hello"


@attrs.frozen
class Beat:
    """A host's heartbeat, with its free capacity."""

    running: int = attrs.field(validator=_count)
    max_kernels: int = attrs.field(validator=_count)
    #: Bytes of memory available on the host (MemAvailable), 0 if unknown.
    mem_available: int = attrs.field(default=0, validator=_count)
    #: The seq of the hello the front welcomed (the session it beats for).
    seq: int = attrs.field(default=0, validator=_count)
    kind = b"beat"


@attrs.frozen
class Welcome:
    """The front admits the host; kernels not in C{keep} are to be killed."""

    keep: tuple[str, ...] = attrs.field(converter=_tuple, validator=_links)
    #: The seq of the hello it answers: a host ignores a welcome to an
    #: older hello.
    seq: int = attrs.field(default=0, validator=_count)
    kind = b"welcome"


@attrs.frozen
class FrontBeat:
    """The front's heartbeat to a live host."""

    kind = b"beat"


@attrs.frozen
class Who:
    """The front does not know this connection: the host says hello again."""

    #: The seq of the beat it answers: a host ignores a who about a session
    #: older than its current one.
    seq: int = attrs.field(default=0, validator=_count)
    kind = b"who"


@attrs.frozen
class NurseryCommand:
    """A nursery command (spawn, signal, kill) for the host's nursery."""

    command: wire.Command
    kind = b"command"


@attrs.frozen
class NurseryEvent:
    """A nursery event (spawned, exited, error) from the host's nursery."""

    event: wire.Event
    kind = b"event"


HostMessage = Hello | Beat | NurseryEvent
FrontMessage = Welcome | FrontBeat | Who | NurseryCommand


def encode(message: HostMessage | FrontMessage) -> list[bytes]:
    """The frames of a control message."""
    if isinstance(message, NurseryCommand):
        body = wire.encode(message.command).rstrip(b"\n")
    elif isinstance(message, NurseryEvent):
        body = wire.encode(message.event).rstrip(b"\n")
    else:
        fields = attrs.asdict(message, recurse=False)
        text = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()})
        body = text.encode()
    return [b"", message.kind, body]


def _body(frames: list[bytes], limit: int) -> dict[str, Any]:
    if len(frames) != 3 or frames[0] != b"":
        raise ProtocolError("bad_host_message", "a control message is [empty, kind, body]")
    body = frames[2]
    if len(body) > limit:
        raise ProtocolError("bad_host_message", f"control body over {limit} bytes")
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("bad_host_message", "control body is not JSON") from None
    if not isinstance(value, dict):
        raise ProtocolError("bad_host_message", "control body is not an object")
    return value


_Message = TypeVar("_Message", bound=AttrsInstance)


def _build(cls: type[_Message], fields: dict[str, Any]) -> _Message:
    names = {a.name for a in attrs.fields(cls)}
    if not set(fields) <= names:
        raise ProtocolError("bad_host_message", f"unknown fields in {cls.__name__.lower()}")
    try:
        return cls(**fields)
    except TypeError:
        raise ProtocolError(
            "bad_host_message", f"missing fields in {cls.__name__.lower()}"
        ) from None


def decode_from_host(frames: list[bytes]) -> HostMessage:
    """Parse a host's control message (C{frames[0] == b""}).

    @raise ProtocolError: if it is not one.
    """
    kind = frames[1] if len(frames) > 1 else b""
    if kind == b"event":
        body = frames[2] if len(frames) == 3 else b""
        if len(frames) != 3 or frames[0] != b"" or len(body) > wire.MAX_LINE:
            raise ProtocolError("bad_host_message", "bad event message")
        return NurseryEvent(wire.decode_event(body))
    if kind == b"hello":
        return _build(Hello, _body(frames, MAX_CONTROL))
    if kind == b"beat":
        return _build(Beat, _body(frames, MAX_CONTROL))
    raise ProtocolError("bad_host_message", f"unknown control kind {kind[:32]!r}")


def decode_from_front(frames: list[bytes]) -> FrontMessage:
    """Parse a front's control message (C{frames[0] == b""}).

    @raise ProtocolError: if it is not one.
    """
    kind = frames[1] if len(frames) > 1 else b""
    if kind == b"command":
        body = frames[2] if len(frames) == 3 else b""
        if len(frames) != 3 or frames[0] != b"" or len(body) > wire.MAX_LINE:
            raise ProtocolError("bad_host_message", "bad command message")
        command = wire.decode_command(body)
        if not isinstance(command, wire.Spawn | wire.Signal | wire.Kill):
            raise ProtocolError("bad_host_message", "a front may only spawn, signal and kill")
        return NurseryCommand(command)
    if kind == b"welcome":
        return _build(Welcome, _body(frames, wire.MAX_LINE))
    if kind == b"beat":
        _build(FrontBeat, _body(frames, MAX_CONTROL))
        return FrontBeat()
    if kind == b"who":
        return _build(Who, _body(frames, MAX_CONTROL))
    raise ProtocolError("bad_host_message", f"unknown control kind {kind[:32]!r}")
