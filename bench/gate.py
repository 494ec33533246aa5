"""The regression gate: is this run worse than the committed results?

A bench run on a shared machine is noisy, and a slower machine makes every
figure worse at once. So a cellmux figure counts as a regression only when
it is worse than the baseline by more than the tolerance both on its own
and relative to the peer measured in the same run (the same figure for
jupyter_server or a stock ipykernel): a machine-wide slowdown moves both,
a regression in cellmux moves only the first.

No I/O here; bench/run.py reads the files and decides what to do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

__all__ = ["GATED", "Gated", "Regression", "regressions"]


@attrs.frozen
class Gated:
    """One figure the gate watches."""

    #: Path of keys to the cellmux figure in results["results"].
    path: tuple[str, ...]
    #: Path to the same figure for the peer, if one is measured.
    peer: tuple[str, ...] | None
    #: True when a larger value is better (throughput), else smaller is.
    higher_is_better: bool = False


GATED: tuple[Gated, ...] = (
    Gated(("start", "cellmux (warm pool)", "p50"), ("start", "jupyter", "p50")),
    Gated(("rtt", "cellmux", "reply", "p50"), ("rtt", "floor", "reply", "p50")),
    Gated(("stream", "cellmux", "seconds"), ("stream", "floor", "seconds")),
    Gated(
        ("messages", "cellmux", "messages_per_s"),
        ("messages", "floor", "messages_per_s"),
        higher_is_better=True,
    ),
    Gated(("memory", "cellmux", "uss_mb"), ("memory", "jupyter", "uss_mb")),
    Gated(("idle", "cellmux", "per_kernel_pct"), ("idle", "jupyter", "per_kernel_pct")),
)


@attrs.frozen
class Regression:
    name: str
    baseline: float
    now: float
    #: How much worse, as a fraction (0.4: 40 % worse).
    worse_by: float

    def __str__(self) -> str:
        return f"{self.name}: {self.baseline:.4g} -> {self.now:.4g} ({self.worse_by:+.0%})"


def _get(results: Mapping[str, Any], path: tuple[str, ...]) -> float | None:
    node: Any = results
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    if isinstance(node, bool) or not isinstance(node, int | float):
        return None
    return float(node)


def _worse_by(before: float, now: float, higher_is_better: bool) -> float:
    """How much worse C{now} is than C{before}, as a fraction (<= 0: not worse)."""
    if before <= 0 or now <= 0:
        return 0.0
    return before / now - 1 if higher_is_better else now / before - 1


def regressions(
    baseline: Mapping[str, Any],
    current: Mapping[str, Any],
    tolerance: float = 0.25,
    gated: tuple[Gated, ...] = GATED,
) -> list[Regression]:
    """The gated figures in C{current} worse than in C{baseline} beyond C{tolerance}.

    Both are the C{"results"} part of a bench JSON. A figure missing from
    either side (a stage not run) is not judged.
    """
    found = []
    for g in gated:
        before, now = _get(baseline, g.path), _get(current, g.path)
        if before is None or now is None:
            continue
        alone = _worse_by(before, now, g.higher_is_better)
        if alone <= tolerance:
            continue
        if g.peer is not None:
            peer_before, peer_now = _get(baseline, g.peer), _get(current, g.peer)
            if peer_before and peer_now:
                relative = _worse_by(before / peer_before, now / peer_now, g.higher_is_better)
                if relative <= tolerance:
                    continue  # the peer got as much worse: the machine, not cellmux
        found.append(Regression(".".join(g.path), before, now, alone))
    return found
