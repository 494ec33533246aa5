"""The bench's table (bench/report.py) shows every figure the thousand stage
measures: the lone kernel back to back and among the idle thousand, and the
server's cost with them idle, beside the active kernels' round trips."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_report", pathlib.Path(__file__).parent.parent / "bench" / "report.py"
)
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)


def _summary(p50: float, p90: float, p99: float, n: int = 20) -> dict:
    return {"n": n, "p50": p50, "p90": p90, "p99": p99, "mean": p50}


THOUSAND = {
    "kernels": 1000,
    "active": 100,
    "lone_rtt": _summary(0.004, 0.0046, 0.0052),
    "lone_rtt_back_to_back": _summary(0.0024, 0.003, 0.0052, n=1898),
    "lone_rtt_among": _summary(0.00526, 0.0134, 0.0518),
    "idle": {
        "kernels": 1000,
        "seconds": 20.0,
        "server_pct": 0.70,
        "per_kernel_pct": 0.010,
        "server_wakeups_per_s": 27.8,
        "kernel_wakeups_per_s": 0.37,
    },
    "active_rtt": _summary(0.00448, 0.0147, 0.0651, n=2000),
    "memory_per_kernel_mb": 15.5,
    "start": _summary(0.0111, 0.042, 0.048, n=10),
}


def _rows() -> dict[str, dict]:
    return {r["metric"]: r for r in report.rows({"results": {"thousand": THOUSAND}})}


def test_the_thousand_stage_shows_the_lone_kernel_and_the_idle_cost():
    rows = _rows()
    b2b = rows["rtt p50 of a lone kernel, back to back (before the others start)"]
    assert (
        b2b["cellmux"] == pytest.approx(2.4)
        and "paced at a cell a second: p50 4.00 ms" in b2b["note"]
    )
    among = rows["rtt p50 of a lone kernel among 1000 idle ones, a cell a second"]
    assert among["cellmux"] == pytest.approx(5.26)
    assert "p99 51.8 ms (20 cells)" in among["note"] and "alone: p50 4.00 ms" in among["note"]
    idle = rows["server CPU with 1000 idle kernels"]
    assert idle["cellmux"] == pytest.approx(0.70) and "28 server wake-ups a second" in idle["note"]
    assert "0.37 wake-ups a second" in idle["note"]


def test_an_older_document_without_those_keys_still_makes_its_table():
    old = {k: v for k, v in THOUSAND.items() if k not in ("lone_rtt_among", "idle")}
    old.pop("lone_rtt_back_to_back")
    rows = report.rows({"results": {"thousand": old}})
    assert [r["metric"] for r in rows] == [
        "rtt p50 of 100 active among 1000 live kernels, a cell a second each"
    ]
