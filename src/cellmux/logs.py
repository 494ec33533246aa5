# -*- test-case-name: tests.test_json_logs -*-
"""The server's log as JSON lines, for log shippers (``log_format = "json"``).

One JSON object per line: ``time`` (ISO 8601, UTC), ``level``
(``debug``/``info``/``warn``/``error``/``critical``), ``namespace`` (the
logging module or class), ``message`` (the line the text log would show),
``traceback`` for failures, and the event's own fields that its message
names (e.g. ``id`` of a kernel), when they are plain JSON values. Fields
a message does not name are left out: they never reach the text log
either, and some events carry objects (requests) that must not be dumped.

``cellmux serve --log-format json`` uses it; under twistd, pass
``--logger cellmux.logs.json_observer`` (twistd builds its observer itself).
"""

from __future__ import annotations

import json
import string
import sys
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import ILogObserver, LogLevel, formatEvent
from zope.interface import implementer

__all__ = ["JSONLinesObserver", "json_observer"]

_PLAIN = (str, int, float, bool, type(None))
#: Names the JSON object itself uses; an event field of the same name
#: is left out rather than overwrite them.
_RESERVED = frozenset({"time", "level", "namespace", "message", "traceback"})


def _named_fields(log_format: str | None) -> set[str]:
    """The top-level field names a twisted.logger format string refers to."""
    if not log_format:
        return set()
    names = set()
    try:
        for _, field, _, _ in string.Formatter().parse(log_format):
            if field:
                names.add(field.split(".", 1)[0].split("[", 1)[0].rstrip("!()"))
    except ValueError:
        pass  # a malformed format: formatEvent says so in the message
    return names


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes each event to C{stream} as one line of JSON."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def record(self, event: dict[str, Any]) -> dict[str, Any]:
        """The JSON object for one event."""
        level = event.get("log_level", LogLevel.info)
        when = datetime.fromtimestamp(event.get("log_time") or 0, UTC)
        record: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": getattr(level, "name", str(level)),
            "namespace": event.get("log_namespace") or "-",
            "message": formatEvent(event),
        }
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
            if not record["message"]:
                record["message"] = failure.getErrorMessage()
        for name in _named_fields(event.get("log_format")):
            value = event.get(name)
            if name not in _RESERVED and not name.startswith("log_") and isinstance(value, _PLAIN):
                record[name] = value
        return record

    def __call__(self, event: dict[str, Any]) -> None:
        try:
            line = json.dumps(self.record(event), ensure_ascii=False, default=str)
        except Exception as e:  # a log line must never break the server
            line = json.dumps({"level": "error", "message": f"unloggable event: {e!r}"})
        self._stream.write(line + "\n")
        self._stream.flush()


def json_observer(stream: IO[str] | None = None) -> JSONLinesObserver:
    """A JSON-lines observer on C{stream} (default: standard output).

    Also twistd's ``--logger`` factory: twistd calls it with no argument,
    and may have redirected C{sys.stdout} into the log itself, so the
    process's real standard output is used.
    """
    return JSONLinesObserver(stream if stream is not None else sys.__stdout__ or sys.stdout)
