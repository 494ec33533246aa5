# -*- test-case-name: tests.test_protocol_nursery -*-
"""The nursery's pipe protocol, with no I/O.

The server talks to its nursery over the nursery's stdin and stdout, one
JSON object per line. The first stdin line is the nursery's configuration
(see C{cellmux.kernel.nursery.NurseryConfig}); every later line is a
command, and every stdout line an event.

Commands (server -> nursery)::

    {"cmd": "spawn", "link": hex, "secret": hex, "endpoint": "ipc://…"}
                                          the endpoint is that kernel's own;
                                          optional "cwd", and "kernel": {"name",
                                          "argv", "env", "interrupt_mode",
                                          "resource_dir"} to start a kernelspec
                                          through the adaptor (absent: a forked
                                          Python kernel)
    {"cmd": "signal", "link": hex, "signal": "SIGINT"}
    {"cmd": "kill", "link": hex}          SIGTERM the group, SIGKILL after a grace
    {"cmd": "shutdown"}                   kill every kernel and exit

Events (nursery -> server)::

    {"event": "ready", "pid": n}          preloading done
    {"event": "spawned", "link": hex, "pid": n}
    {"event": "exited", "link": hex, "pid": n, "cause": "exit code 3" | "SIGSEGV", ...}
        with "exit_code": n or "signal": n, and "limit": "cpu" | "memory" |
        "disk" | "file_size" when a limit ended it (the cause then names
        it: "cpu time limit (SIGXCPU)")
    {"event": "error", "message": str, "link": hex}
        a command it could not carry out ("link" when about one kernel),
        or a unit of its own work that failed (the nursery keeps serving)

Both sides parse with the functions here and share the constants below,
so that neither keeps its own copy.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

import attrs

from .errors import ProtocolError

__all__ = [
    "DEFAULT_KILL_GRACE",
    "DEFAULT_UID_RANGE",
    "DISK_CHECK_INTERVAL",
    "MAX_LINE",
    "NURSERY_MODULE",
    "STOP_CLEANUP_TIME",
    "Error",
    "Exited",
    "Kill",
    "LineBuffer",
    "Ready",
    "Shutdown",
    "Signal",
    "Spawn",
    "Spawned",
    "decode_command",
    "decode_event",
    "encode",
]

#: The module the server runs as the nursery (``python -I -m``); also how
#: a nursery process is recognised by its command line.
NURSERY_MODULE = "cellmux.kernel.nursery"

#: Seconds between SIGTERM and SIGKILL when a kernel is shut down.
DEFAULT_KILL_GRACE = 1.0

#: The default range kernel uids and gids are taken from: far above the
#: ids a distribution hands out, and within what user namespaces map.
DEFAULT_UID_RANGE = (200000, 299999)

#: Seconds between two measurements of each kernel's disk use.
DISK_CHECK_INTERVAL = 1.0

#: Seconds beyond the kill grace a nursery told to shut down may spend on
#: cleanup before it exits anyway; the server waits a little longer.
STOP_CLEANUP_TIME = 3.0

#: The longest line either side accepts, in bytes (a config line with a
#: big kernel environment fits; anything longer is a bug or an attack).
MAX_LINE = 1024 * 1024


def _hex(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ProtocolError("nursery_bad_field", f"{attribute.name} must be a hex string")
    try:
        bytes.fromhex(value)
    except ValueError:
        raise ProtocolError("nursery_bad_field", f"{attribute.name} is not hex") from None


def _text(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str):
        raise ProtocolError("nursery_bad_field", f"{attribute.name} must be a string")


def _pid(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if type(value) is not int or value <= 0:
        raise ProtocolError("nursery_bad_field", f"{attribute.name} must be a positive integer")


# -- commands ---------------------------------------------------------------


def _optional_text(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        _text(instance, attribute, value)


def _optional_launch(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise ProtocolError("nursery_bad_field", f"{attribute.name} must be an object with a name")
    argv = value.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise ProtocolError("nursery_bad_field", f"{attribute.name}.argv must list strings")
    env = value.get("env", {})
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise ProtocolError("nursery_bad_field", f"{attribute.name}.env must map strings")
    if value.get("interrupt_mode", "signal") not in ("signal", "message"):
        raise ProtocolError("nursery_bad_field", f"{attribute.name}.interrupt_mode is unknown")


@attrs.frozen
class Spawn:
    """Fork a kernel that joins the link as C{link}, proving C{secret}."""

    link: str = attrs.field(validator=_hex)
    secret: str = attrs.field(validator=_hex, repr=False)
    #: The kernel's own link endpoint (C{ipc://…}); None: the configured one.
    endpoint: str | None = attrs.field(default=None, validator=_optional_text)
    #: The directory it starts in, inside the shared root (None: its own).
    cwd: str | None = attrs.field(default=None, validator=_optional_text)
    #: A kernelspec to start cold through the adaptor (None: fork ipykernel).
    kernel: dict[str, Any] | None = attrs.field(default=None, validator=_optional_launch)


@attrs.frozen
class Signal:
    """Send a signal (by name, e.g. C{"SIGINT"}) to a kernel's process group."""

    link: str = attrs.field(validator=_hex)
    signal: str = attrs.field(validator=_text)


@attrs.frozen
class Kill:
    """End a kernel: SIGTERM, then SIGKILL after the kill grace."""

    link: str = attrs.field(validator=_hex)


@attrs.frozen
class Shutdown:
    """End every kernel, clean up, and exit."""


Command = Spawn | Signal | Kill | Shutdown

_COMMANDS: dict[str, type[Command]] = {
    "spawn": Spawn,
    "signal": Signal,
    "kill": Kill,
    "shutdown": Shutdown,
}


# -- events -----------------------------------------------------------------


@attrs.frozen
class Ready:
    """Preloading is done; commands are served from now on."""

    pid: int = attrs.field(validator=_pid)


@attrs.frozen
class Spawned:
    """A kernel was forked (it is not ready until it joins the link)."""

    link: str = attrs.field(validator=_hex)
    pid: int = attrs.field(validator=_pid)


def _exit_info(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, dict) or not isinstance(value.get("cause"), str):
        raise ProtocolError("nursery_bad_field", "an exited event needs a cause")
    if any(k in value for k in ("event", "link", "pid")):
        raise ProtocolError("nursery_bad_field", "exit details must not shadow event fields")


@attrs.frozen
class Exited:
    """A kernel ended; C{info} says how (C{cause}, C{signal} or C{exit_code}, C{limit})."""

    link: str = attrs.field(validator=_hex)
    pid: int = attrs.field(validator=_pid)
    info: dict[str, Any] = attrs.field(validator=_exit_info)


def _optional_hex(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        _hex(instance, attribute, value)


@attrs.frozen
class Error:
    """A command the nursery could not carry out, or work of its own that failed."""

    message: str = attrs.field(validator=_text)
    #: The kernel it is about, if any (a spawn that failed names its link).
    link: str | None = attrs.field(default=None, validator=_optional_hex)


Event = Ready | Spawned | Exited | Error

_EVENTS: dict[str, type[Event]] = {
    "ready": Ready,
    "spawned": Spawned,
    "exited": Exited,
    "error": Error,
}


# -- lines ------------------------------------------------------------------


def encode(message: Command | Event) -> bytes:
    """One protocol line, newline included."""
    if isinstance(message, Exited):
        data: dict[str, Any] = {"event": "exited", "link": message.link, "pid": message.pid}
        data.update(message.info)
    else:
        kinds = {v: k for k, v in {**_COMMANDS, **_EVENTS}.items()}
        key = "cmd" if type(message) in _COMMANDS.values() else "event"
        data = {key: kinds[type(message)]}
        data.update(
            (a.name, getattr(message, a.name))
            for a in attrs.fields(type(message))
            if getattr(message, a.name) is not None
        )
    line = json.dumps(data, separators=(",", ":")).encode() + b"\n"
    if len(line) > MAX_LINE:
        raise ProtocolError("nursery_line_too_long", f"a {len(line)}-byte line is too long")
    return line


def _object(line: bytes) -> dict[str, Any]:
    if len(line) > MAX_LINE:
        raise ProtocolError("nursery_line_too_long", f"a {len(line)}-byte line is too long")
    try:
        data = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError("nursery_bad_json", f"not JSON: {e}") from None
    if not isinstance(data, dict):
        raise ProtocolError("nursery_bad_json", "a line must hold a JSON object")
    return data


_Message = TypeVar("_Message", bound="Command | Event")


def _build(cls: type[_Message], fields: dict[str, Any]) -> _Message:
    names = {a.name for a in attrs.fields(cls)}
    unknown = set(fields) - names
    if unknown:
        raise ProtocolError("nursery_bad_field", f"unknown fields {sorted(unknown)}")
    try:
        return cls(**fields)
    except TypeError as e:  # a required field missing
        raise ProtocolError("nursery_bad_field", str(e)) from None


def decode_command(line: bytes) -> Command:
    """Parse a command line. @raise ProtocolError: if it is not one."""
    data = _object(line)
    name = data.pop("cmd", None)
    cls = _COMMANDS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ProtocolError("nursery_unknown_command", "unknown or missing command")
    return _build(cls, data)


def decode_event(line: bytes) -> Event:
    """Parse an event line. @raise ProtocolError: if it is not one."""
    data = _object(line)
    kind = data.pop("event", None)
    cls = _EVENTS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError("nursery_unknown_event", "unknown or missing event")
    if cls is Exited:
        info = {k: v for k, v in data.items() if k not in ("link", "pid")}
        return _build(Exited, {"link": data.get("link"), "pid": data.get("pid"), "info": info})
    return _build(cls, data)


@attrs.define
class LineBuffer:
    """Bytes from a pipe in, whole lines out; never holds more than C{limit}.

    A line longer than the limit is dropped (up to its newline) and counted
    in C{dropped}, so a peer gone mad costs a bounded amount of memory.
    """

    limit: int = MAX_LINE
    dropped: int = 0
    _partial: bytearray = attrs.field(factory=bytearray, init=False)
    _skipping: bool = attrs.field(default=False, init=False)

    def feed(self, data: bytes) -> list[bytes]:
        """The complete, non-blank lines C{data} ends (without newlines)."""
        lines: list[bytes] = []
        *complete, rest = data.split(b"\n")
        for piece in complete:
            if self._skipping:
                self._skipping = False
            elif len(self._partial) + len(piece) > self.limit:
                self.dropped += 1
            else:
                self._partial += piece
                line = bytes(self._partial)
                if line.strip():
                    lines.append(line)
            self._partial.clear()
        if not self._skipping:
            if len(self._partial) + len(rest) > self.limit:
                self.dropped += 1
                self._partial.clear()
                self._skipping = True
            else:
                self._partial += rest
        return lines
