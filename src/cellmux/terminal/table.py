# -*- test-case-name: tests.test_terminal_watch -*-
"""``cellmux kernels``: the server's kernels as a table.

Columns: id, the names this user gave it (``--kernel NAME``), state, age,
time since its last activity, attached clients, pid. The age needs the
kernel model's ``started`` field; a server that does not send it gets ``-``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

from cellmux.client import CellmuxError, KernelModel

from .server import EXIT_SERVER, KernelNames, ServerOptions, add_server_arguments, fail

__all__ = ["add_arguments", "format_duration", "format_table", "main"]

HEADERS = ("ID", "NAME", "STATE", "AGE", "ACTIVE", "CLIENTS", "PID")


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def format_duration(seconds: float) -> str:
    """A short human duration: 42s, 5m, 3h12m, 2d4h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def _since(value: object, now: datetime) -> str:
    when = _parse_time(value)
    return "-" if when is None else format_duration((now - when).total_seconds())


def format_table(
    kernels: Iterable[KernelModel], now: datetime, names: Mapping[str, str] = {}
) -> str:
    """The table's text; C{names} maps user-given names to kernel ids."""
    by_id: dict[str, list[str]] = {}
    for name, kernel_id in sorted(names.items()):
        by_id.setdefault(kernel_id, []).append(name)
    rows = [HEADERS]
    for k in sorted(kernels, key=lambda k: (k.raw.get("started") or "", k.id)):
        state = k.execution_state or "?"
        if state == "dead" and k.raw.get("reason"):
            state += f" ({k.raw['reason']})"
        rows.append(
            (
                k.id,
                ",".join(by_id.get(k.id, [])) or "-",
                state,
                _since(k.raw.get("started"), now),
                _since(k.last_activity, now),
                str(k.connections),
                "-" if k.pid is None else str(k.pid),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADERS))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the kernel models as JSON")
    add_server_arguments(parser)


def main(args: argparse.Namespace) -> int:
    options = ServerOptions.from_args(args)
    try:
        kernels = options.client().list_kernels()
    except CellmuxError as e:
        return fail(str(e), EXIT_SERVER)
    if args.json:
        print(json.dumps([k.raw for k in kernels], indent=1))
    else:
        names = KernelNames(options.url).names()
        print(format_table(kernels, datetime.now(UTC), names))
    sys.stdout.flush()
    return 0
