# -*- test-case-name: tests.security.test_budgets -*-
"""The inputs clients sent to one kernel, kept for re-running; bounded.

Every ``execute_request`` a client sends is remembered (its code, session
and time) so that clients can list and re-run them (the ``history`` control
request). Clients choose the size of their code, so the history is bounded
in entries (L{HISTORY_LENGTH}), per entry (L{HISTORY_ENTRY_CHARS}: longer
code is kept cut, marked with its full length) and in total
(L{HISTORY_CHARS}: the oldest entries go first).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import attrs

__all__ = ["HISTORY_CHARS", "HISTORY_ENTRY_CHARS", "HISTORY_LENGTH", "HistoryEntry", "InputHistory"]

#: Inputs remembered per kernel.
HISTORY_LENGTH = 1000
#: Characters of one input kept; longer code is cut (a cell is rarely over
#: a few kilobytes; permalinks stop at the same size).
HISTORY_ENTRY_CHARS = 256 * 1024
#: Characters kept per kernel, all entries together (code, session, time).
HISTORY_CHARS = 4 * 1024 * 1024


@attrs.frozen
class HistoryEntry:
    """One execute request a client sent, kept for re-running.

    @ivar length: the code's full length in characters when C{code} was cut
        to L{HISTORY_ENTRY_CHARS}, else None.
    """

    code: str
    session: str
    time: str
    length: int | None = None

    @property
    def size(self) -> int:
        return len(self.code) + len(self.session) + len(self.time)

    def to_json(self) -> dict[str, object]:
        fields: dict[str, object] = {"code": self.code, "session": self.session, "time": self.time}
        if self.length is not None:
            fields["truncated"] = True
            fields["length"] = self.length
        return fields


class InputHistory:
    """A kernel's input history, oldest first, within its bounds."""

    def __init__(
        self,
        length: int = HISTORY_LENGTH,
        entry_chars: int = HISTORY_ENTRY_CHARS,
        total_chars: int = HISTORY_CHARS,
    ) -> None:
        self._entries: deque[HistoryEntry] = deque()
        self._length = length
        self._entry_chars = entry_chars
        self._total_chars = total_chars
        #: Characters held by all entries (at most C{total_chars}).
        self.chars = 0

    def __iter__(self) -> Iterator[HistoryEntry]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, code: str, session: str, time: str) -> HistoryEntry:
        """Remember one input; drop the oldest ones beyond the bounds."""
        length = None
        if len(code) > self._entry_chars:
            code, length = code[: self._entry_chars], len(code)
        # A session id is the client's choice too: never let it outgrow code.
        entry = HistoryEntry(code, session[: self._entry_chars], time, length)
        self._entries.append(entry)
        self.chars += entry.size
        while self._entries and (
            len(self._entries) > self._length or self.chars > self._total_chars
        ):
            self.chars -= self._entries.popleft().size
        return entry
