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
    beat   {"running", "max_kernels", "mem_available", "seq"}   every
           second once welcomed, and at once on a welcome: the front
           places kernels on a host only after its beat for the hello
           it welcomed
    event  a nursery event line (cellmux.protocol.nursery: spawned,
           exited, error) about one of this front's kernels

front -> host::

    welcome  {"keep": [link hex, ..]}  the kernels the front still knows
             on this host; the host kills its others for this front
    beat     {}                        every second, to live hosts
    who      {}                        "I do not know you": say hello again
    command  a nursery command line (spawn, signal, kill)

File transfers (``/files`` of a kernel on the host; docs/scaling.md)::

    file         front -> host  {"id", "op": list|get|put, "link", "name",
                                 "quota", "size"}   one request
    file_reply   host -> front  {"id", "status", "message", "name", "size",
                                 "mtime"}   its answer (HTTP status); a
                 200 for list or get is followed by the data
    file_data    both ways, 4 frames: [b"", b"file_data", {"id", "seq",
                 "last"}, bytes]   at most L{MAX_FILE_CHUNK} bytes a chunk
    file_ack     both ways  {"id", "seq"}   chunk C{seq} was used: at most
                 L{FILE_WINDOW} chunks of a transfer are ever unacknowledged
    file_cancel  both ways  {"id", "reason"}   the transfer is abandoned

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
    "FILE_WINDOW",
    "HOSTLINK_VERSION",
    "LINK_ID_SIZE",
    "MAX_CONTROL",
    "MAX_FILE_CHUNK",
    "MAX_LABELS",
    "MAX_NAME",
    "Beat",
    "FileAck",
    "FileCancel",
    "FileChunk",
    "FileReply",
    "FileRequest",
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

#: 2: a kernel's link traffic may hold bundles (protocol.md, section 12),
#: which a front of version 1 refuses message by message. A front admits
#: hosts of its version or older, so fronts are upgraded first.
HOSTLINK_VERSION = 2
#: Bytes of a kernel link id: what tells link traffic from control.
LINK_ID_SIZE = 16
#: Longest JSON body of a control message other than a nursery line.
MAX_CONTROL = 64 * 1024
MAX_NAME = 64
MAX_LABELS = 32
#: Most links a welcome may name (a host's kernels for one front).
MAX_KEEP = 100_000
#: Bytes of file data in one ``file_data`` message.
MAX_FILE_CHUNK = 256 * 1024
#: Chunks of one transfer sent and not yet acknowledged, at most.
FILE_WINDOW = 4
#: The operations a ``file`` request may ask for.
FILE_OPS = ("list", "get", "put")
#: Longest file name (in characters) or message in a file message.
MAX_FILE_TEXT = 4096
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


def _text(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or len(value) > MAX_FILE_TEXT:
        raise ProtocolError("bad_host_message", f"{attribute.name} must be a short string")


def _op(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value not in FILE_OPS:
        raise ProtocolError("bad_host_message", f"op must be one of {', '.join(FILE_OPS)}")


def _link(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or re.fullmatch(r"[0-9a-f]{32}", value) is None:
        raise ProtocolError("bad_host_message", f"{attribute.name} must be a link id")


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


@attrs.frozen
class FileRequest:
    """The front asks for a kernel's files: a listing, a file, or to store one
    (whose C{size} bytes follow as L{FileChunk}s)."""

    id: int = attrs.field(validator=_count)
    op: str = attrs.field(validator=_op)
    link: str = attrs.field(validator=_link)
    name: str = attrs.field(default="", validator=_text)
    #: Most bytes the kernel's directory may hold (put; 0: the host's own).
    quota: int = attrs.field(default=0, validator=_count)
    size: int = attrs.field(default=0, validator=_count)
    kind = b"file"


def _status(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 100 <= value <= 599:
        raise ProtocolError("bad_host_message", "status must be an HTTP status")


@attrs.frozen
class FileReply:
    """The host's answer to a L{FileRequest}: an HTTP status; for a 200 to
    list or get, C{size} bytes follow as L{FileChunk}s."""

    id: int = attrs.field(validator=_count)
    status: int = attrs.field(validator=_status)
    message: str = attrs.field(default="", validator=_text)
    name: str = attrs.field(default="", validator=_text)
    size: int = attrs.field(default=0, validator=_count)
    mtime: int = attrs.field(default=0, validator=_count)
    kind = b"file_reply"


def _chunk(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, bytes) or len(value) > MAX_FILE_CHUNK:
        raise ProtocolError("bad_host_message", f"file data over {MAX_FILE_CHUNK} bytes")


def _bool(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, bool):
        raise ProtocolError("bad_host_message", f"{attribute.name} must be true or false")


@attrs.frozen
class FileChunk:
    """Chunk C{seq} (from 0) of a transfer's data; C{last} ends it."""

    id: int = attrs.field(validator=_count)
    seq: int = attrs.field(validator=_count)
    last: bool = attrs.field(validator=_bool)
    data: bytes = attrs.field(validator=_chunk)
    kind = b"file_data"


@attrs.frozen
class FileAck:
    """Chunk C{seq} of a transfer was used: the sender may send one more."""

    id: int = attrs.field(validator=_count)
    seq: int = attrs.field(validator=_count)
    kind = b"file_ack"


@attrs.frozen
class FileCancel:
    """The transfer is abandoned (its client left, it timed out, it failed)."""

    id: int = attrs.field(validator=_count)
    reason: str = attrs.field(default="", validator=_text)
    kind = b"file_cancel"


FileMessage = FileChunk | FileAck | FileCancel
HostMessage = Hello | Beat | NurseryEvent | FileReply | FileMessage
FrontMessage = Welcome | FrontBeat | Who | NurseryCommand | FileRequest | FileMessage


def encode(message: HostMessage | FrontMessage) -> list[bytes]:
    """The frames of a control message."""
    if isinstance(message, FileChunk):
        header = json.dumps({"id": message.id, "seq": message.seq, "last": message.last})
        return [b"", message.kind, header.encode(), message.data]
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


def _file_message(kind: bytes, frames: list[bytes]) -> FileMessage | None:
    """A message of a transfer's data, either way (None: another kind)."""
    if kind == b"file_data":
        if len(frames) != 4:
            raise ProtocolError("bad_host_message", "file data is [empty, kind, header, data]")
        fields = _body(frames[:3], MAX_CONTROL)
        if set(fields) != {"id", "seq", "last"}:
            raise ProtocolError("bad_host_message", "bad file data header")
        return FileChunk(fields["id"], fields["seq"], fields["last"], frames[3])
    if kind == b"file_ack":
        return _build(FileAck, _body(frames, MAX_CONTROL))
    if kind == b"file_cancel":
        return _build(FileCancel, _body(frames, MAX_CONTROL))
    return None


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
    if kind == b"file_reply":
        return _build(FileReply, _body(frames, MAX_CONTROL))
    message = _file_message(kind, frames)
    if message is not None:
        return message
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
    if kind == b"file":
        return _build(FileRequest, _body(frames, MAX_CONTROL))
    message = _file_message(kind, frames)
    if message is not None:
        return message
    raise ProtocolError("bad_host_message", f"unknown control kind {kind[:32]!r}")
