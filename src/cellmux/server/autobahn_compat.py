# -*- test-case-name: tests.test_autobahn_compat -*-
"""Every use of Autobahn's internals, in one place, behind a version guard.

cellmux relies on a few things Autobahn does, but does not promise (they
are not in its interfaces):

* needs: a close frame with any code (L{close}: C{sendClose} refuses the
  1xxx codes other than 1000), and the raw request target of an upgrade
  (L{request_target}: the query is read by cellmux's own parser, never by
  Autobahn's);
* speed-ups: relayed frames written straight to the transport while
  nothing is queued (L{binary_sender}), and the text of Autobahn's debug
  lines made only if a line is shown (L{quiet_debug_lines});
* a repair: twisted.web's channel stays the transport's producer after
  C{WebSocketResource} takes the transport over (L{take_over_producer}).

Nothing else in cellmux touches them. tests/test_autobahn_compat.py pins
each behaviour against the installed Autobahn, so a release that changes
one fails that test rather than a server. On a release outside L{CHECKED}
the speed-ups are off (every frame goes through C{sendMessage}, which is
slower but correct) and the server says so once in its log; a release
without the needs is refused at import with an error naming it.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from typing import Any

import autobahn
import autobahn.twisted.websocket
import autobahn.websocket.protocol
from autobahn.twisted.websocket import WebSocketServerProtocol
from twisted.logger import Logger

__all__ = [
    "AUTOBAHN_VERSION",
    "CHECKED",
    "INTERNALS_KNOWN",
    "AutobahnIncompatible",
    "binary_frame_header",
    "binary_sender",
    "close",
    "close_reason",
    "plain_frames",
    "quiet_debug_lines",
    "request_target",
    "take_over_producer",
]

_log = Logger()

#: The oldest and newest Autobahn releases (year, month) whose internals
#: were read for what this module relies on. Widen it only after reading
#: a new release and running tests/test_autobahn_compat.py against it.
CHECKED = ((24, 4), (26, 11))


class AutobahnIncompatible(ImportError):
    """The installed Autobahn lacks something cellmux cannot work without."""


def _release(version: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else None


#: Autobahn's modules and the names in them that build debug-line text
#: (a pretty-printed dump, highlighted names and values).
_DEBUG_TEXT = (
    (autobahn.websocket.protocol, ("pformat", "hltype", "hlval")),
    (autobahn.twisted.websocket, ("hltype", "hlval")),
)


#: The installed release as (year, month), or None if unreadable.
AUTOBAHN_VERSION = _release(getattr(autobahn, "__version__", ""))

if not callable(getattr(WebSocketServerProtocol, "sendCloseFrame", None)):
    raise AutobahnIncompatible(
        f"cellmux cannot use Autobahn {getattr(autobahn, '__version__', '?')}: its "
        "websocket protocol has no sendCloseFrame (needed to close with codes such as "
        "1003 and 1009); install a release cellmux supports (setup.cfg)"
    )

#: Whether the installed release is one whose internals were read (CHECKED).
INTERNALS_KNOWN = (
    AUTOBAHN_VERSION is not None
    and CHECKED[0] <= AUTOBAHN_VERSION <= CHECKED[1]
    and callable(getattr(autobahn.websocket.protocol, "pformat", None))
    and hasattr(WebSocketServerProtocol, "STATE_OPEN")
)
if not INTERNALS_KNOWN:
    _log.warn(
        "Autobahn {version} is not one cellmux has checked ({first}-{last}): websocket "
        "frames take Autobahn's slower path",
        version=getattr(autobahn, "__version__", "?"),
        first="{}.{}".format(*CHECKED[0]),
        last="{}.{}".format(*CHECKED[1]),
    )


# -- speed-ups -------------------------------------------------------------------


class _TextWhenLogged:
    """A debug line's argument, made into text only if the line is shown."""

    __slots__ = ("args", "kwargs", "make")

    def __init__(self, make: Callable[..., str], args: tuple, kwargs: dict) -> None:
        self.make = make
        self.args = args
        self.kwargs = kwargs

    def __str__(self) -> str:
        return self.make(*self.args, **self.kwargs)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def _when_logged(make: Callable[..., str]) -> Callable[..., _TextWhenLogged]:
    def lazy(*args: Any, **kwargs: Any) -> _TextWhenLogged:
        return _TextWhenLogged(make, args, kwargs)

    lazy.__wrapped__ = make  # type: ignore[attr-defined]
    return lazy


def quiet_debug_lines() -> bool:
    """Make the text of Autobahn's debug lines lazy; whether it is.

    Autobahn formats the arguments of its debug lines before the logger
    drops them: on every new connection a pretty-printed dump of its 29
    options (0.2 ms), and on every connection, read and close, highlighted
    qualified names and values (``hltype``, ``hlval``: about 20 a
    connection, 3 a read). Now each becomes text only if its line is
    written, and the text is the same.
    """
    if not INTERNALS_KNOWN:
        return False
    for module, names in _DEBUG_TEXT:
        for name in names:
            made = getattr(module, name, None)
            if callable(made) and getattr(made, "__wrapped__", None) is None:
                setattr(module, name, _when_logged(made))
    # The one use of pformat that is not a log argument: text at once.
    timings = autobahn.websocket.protocol.Timings
    if getattr(timings.__str__, "__wrapped__", None) is None:
        lazy_text = timings.__str__

        def timings_text(self: Any) -> str:
            return str(lazy_text(self))

        timings_text.__wrapped__ = lazy_text  # type: ignore[attr-defined]
        timings.__str__ = timings_text  # type: ignore[method-assign]
    return all(
        getattr(getattr(module, name), "__wrapped__", None) is not None
        for module, names in _DEBUG_TEXT
        for name in names
    )


def binary_frame_header(length: int) -> bytes:
    """The header of an unmasked, final, binary websocket frame (RFC 6455 5.2)."""
    if length <= 125:
        return bytes((0x82, length))
    if length <= 0xFFFF:
        return struct.pack("!BBH", 0x82, 126, length)
    return struct.pack("!BBQ", 0x82, 127, length)


def plain_frames(protocol: WebSocketServerProtocol) -> bool:
    """Whether an open connection's binary messages are just a header and
    the payload: no compression, masking, fragmentation, or the logging and
    timing that C{sendMessage} would do for them."""
    return INTERNALS_KNOWN and not (
        getattr(protocol, "_perMessageCompress", True) is not None
        or getattr(protocol, "maskServerFrames", True)
        or getattr(protocol, "logFrames", True)
        or getattr(protocol, "logOctets", True)
        or getattr(protocol, "trackedTimings", True)
        or getattr(protocol, "autoFragmentSize", True)
    )


def binary_sender(protocol: WebSocketServerProtocol) -> Callable[[bytes], None]:
    """The function that sends one binary message on an open connection.

    C{sendMessage} spends most of its time on statistics, option checks and
    a debug line's arguments; for a connection with L{plain_frames} the
    message is written with its 2-10 byte header straight to the transport
    while Autobahn has nothing queued (else through C{sendMessage}, which
    keeps the order).
    """
    send_message = protocol.sendMessage
    if not plain_frames(protocol):
        return lambda data: send_message(data, isBinary=True)
    open_state = protocol.STATE_OPEN

    def send(data: bytes) -> None:
        if protocol.state == open_state and not protocol.send_queue:
            protocol.transport.writeSequence((binary_frame_header(len(data)), data))  # type: ignore[union-attr]
        else:
            send_message(data, isBinary=True)

    return send


# -- needs -------------------------------------------------------------------------


def close_reason(reason: str) -> bytes:
    """A close reason that is valid UTF-8 within a close frame's 123 bytes."""
    return reason.encode()[:120].decode(errors="ignore").encode()


def close(protocol: WebSocketServerProtocol, code: int, reason: str) -> None:
    """Close with any code: Autobahn's sendClose takes only 1000 and 3000-4999."""
    if code == 1000 or 3000 <= code <= 4999:
        protocol.sendClose(code, close_reason(reason).decode())
    else:
        protocol.sendCloseFrame(code, close_reason(reason), isReply=False)


def request_target(protocol: WebSocketServerProtocol) -> str:
    """The upgrade request's target as the client sent it (path and query),
    once the handshake has been read (in onConnect)."""
    target = getattr(protocol, "http_request_uri", None)
    if not isinstance(target, str):
        raise AutobahnIncompatible(
            f"Autobahn {getattr(autobahn, '__version__', '?')} no longer keeps the "
            "request target (http_request_uri); cellmux cannot read the token of a "
            "websocket upgrade"
        )
    return target


# -- a repair -----------------------------------------------------------------------


def take_over_producer(protocol: WebSocketServerProtocol, producer: Any) -> None:
    """Make C{producer} the one a full socket buffer pauses.

    twisted.web's HTTP channel registered itself as the transport's producer
    and Autobahn's C{WebSocketResource} took the transport over without
    undoing it.
    """
    transport: Any = protocol.transport
    if getattr(transport, "producer", None) is not None:
        transport.unregisterProducer()
    transport.registerProducer(producer, True)
