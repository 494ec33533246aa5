"""The bench's regression gate (bench/gate.py): worse beyond noise, alone and against the peer."""

from __future__ import annotations

import importlib.util
import pathlib

from hypothesis import assume, given
from hypothesis import strategies as st

_spec = importlib.util.spec_from_file_location(
    "bench_gate", pathlib.Path(__file__).parent.parent / "bench" / "gate.py"
)
gate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gate)


def results(rtt: float, floor: float, msgs: float = 6000.0, floor_msgs: float = 3000.0) -> dict:
    return {
        "rtt": {"cellmux": {"reply": {"p50": rtt}}, "floor": {"reply": {"p50": floor}}},
        "messages": {
            "cellmux": {"messages_per_s": msgs},
            "floor": {"messages_per_s": floor_msgs},
        },
    }


def test_a_slower_cellmux_beside_an_unchanged_peer_is_a_regression():
    found = gate.regressions(results(0.004, 0.005), results(0.006, 0.005))
    assert [r.name for r in found] == ["rtt.cellmux.reply.p50"]
    assert abs(found[0].worse_by - 0.5) < 1e-9


def test_a_slower_machine_that_slows_the_peer_as_much_is_not():
    assert gate.regressions(results(0.004, 0.005), results(0.006, 0.0075)) == []


def test_throughput_regresses_when_it_falls():
    found = gate.regressions(results(0.004, 0.005), results(0.004, 0.005, msgs=4000.0))
    assert [r.name for r in found] == ["messages.cellmux.messages_per_s"]


def test_noise_within_the_tolerance_and_missing_stages_pass():
    assert gate.regressions(results(0.004, 0.005), results(0.0049, 0.005)) == []
    assert gate.regressions({}, results(1.0, 0.005)) == []
    assert gate.regressions(results(0.004, 0.005), {"rtt": {}}) == []


@given(
    st.floats(0.001, 1.0),
    st.floats(0.001, 1.0),
    st.floats(0.5, 3.0),
)
def test_only_a_figure_worse_beyond_the_tolerance_is_reported(before, peer, factor):
    assume(abs(factor - 1.25) > 1e-6)  # float rounding at the edge itself
    found = gate.regressions(results(before, peer), results(before * factor, peer), tolerance=0.25)
    assert bool(found) == (factor > 1.25)
