# -*- test-case-name: tests.security.test_json_nesting -*-
"""JSON parsing with a nesting bound, for everything a peer sends.

``json.loads`` recurses once per nesting level: a few kilobytes of ``[``
raise ``RecursionError`` (which callers catching ``ValueError`` miss), and a
value nested a few hundred levels deep parses but later breaks whatever
walks it (``json.dumps``, ``repr``, a recursive renderer). L{loads} refuses
anything nested deeper than L{MAX_JSON_DEPTH} with L{JSONTooDeep}, a
``ValueError``, so every caller that already handles bad JSON handles this.

The check is linear in the size of the text and runs in C loops (bytes
methods, map, accumulate), not in a Python loop per byte: it counts the
brackets first and does nothing more for the usual message, which has fewer
brackets than the bound.
"""

from __future__ import annotations

import itertools
import json
import operator
from typing import Any

__all__ = ["MAX_JSON_DEPTH", "JSONTooDeep", "loads", "nesting_exceeds"]

#: Deepest nesting of arrays and objects accepted. Jupyter messages nest
#: a handful of levels; plots and widget states a few dozen at most.
MAX_JSON_DEPTH = 64

# Objects count as arrays; everything but quotes and brackets goes.
_TO_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_QUOTE_OR_BRACKET = bytes(c for c in range(256) if c not in b'"[]{}')
# Bytes looked at per step: bounds the lists that split() makes.
_CHUNK = 1 << 20


class JSONTooDeep(ValueError):
    """The JSON text nests arrays and objects deeper than allowed."""


def nesting_exceeds(data: bytes | str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether JSON text nests arrays/objects more than C{limit} deep.

    Text that is not valid JSON may be reported either way; L{loads} then
    refuses it anyway. Linear time, every step a C loop (several times
    faster than ``json.loads`` of the same text), memory bounded by
    L{_CHUNK}.
    """
    if isinstance(data, str):
        if data.count("[") + data.count("{") <= limit:
            return False
        data = data.encode("utf-8", "surrogatepass")
    elif data.count(b"[") + data.count(b"{") <= limit:
        return False
    if b"\\" in data:
        # Escaped backslashes first, so that in \\" the quote still ends
        # the string; then no quote left is an escaped one.
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    text = data.translate(_TO_BRACKETS, _NOT_QUOTE_OR_BRACKET)
    depth = 0
    in_string = False
    for start in range(0, len(text), _CHUNK):
        chunk = text[start : start + _CHUNK]
        if in_string or b'"' in chunk:
            # Brackets inside strings do not count: keep what is between
            # strings (the split alternates outside, inside, outside...).
            pieces = chunk.split(b'"')
            chunk = b"".join(pieces[1::2] if in_string else pieces[0::2])
            in_string ^= len(pieces) % 2 == 0
        if not chunk:
            continue
        # The depth peaks at the end of each run of "[": after run i (and
        # the i "]" before it) it is depth + (opens so far) - i.
        runs = chunk.split(b"]")
        peak = max(map(operator.sub, itertools.accumulate(map(len, runs)), itertools.count()))
        if depth + peak > limit:
            return True
        depth += len(chunk) - 2 * (len(runs) - 1)
        if depth < 0:
            return False  # a "]" without its "[": json.loads stops there
    return False


def loads(data: bytes | bytearray | str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """C{json.loads}, refusing text nested more than C{max_depth} levels.

    @raise JSONTooDeep: for too deep a nesting (a ValueError).
    @raise ValueError: for text that is not JSON (UnicodeDecodeError too).
    """
    if isinstance(data, bytearray):
        data = bytes(data)
    if nesting_exceeds(data, max_depth):
        raise JSONTooDeep(f"JSON nested more than {max_depth} levels deep")
    try:
        return json.loads(data)
    except RecursionError:  # not reached after the check; kept as a backstop
        raise JSONTooDeep(f"JSON nested more than {max_depth} levels deep") from None
