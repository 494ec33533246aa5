"""A short soak (bench/soak.py): 80 create/delete cycles over four server
lifetimes, ended by SIGTERM, SIGKILL (a crash the next start cleans up
after), SIGTERM and SIGTERM. FDs and threads of the
server and the nursery stay flat within each lifetime, and nothing is left
after the last stop."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak.py"
#: Allowed growth from the first sample (after the warm-up) to the last,
#: both taken with only the pool's kernel alive. A leak of one per cycle
#: would add 18 in a lifetime (20 cycles, the first 2 a warm-up): more than
#: either slack. (Longer soaks: bench/soak.py; this one was 200 cycles over
#: six lifetimes, three minutes of a loaded 2-core run for no other path.)
FD_SLACK = 3
#: Twisted's reactor thread pool starts threads on demand, up to 10.
THREAD_SLACK = 10


def _load_soak():
    spec = importlib.util.spec_from_file_location("cellmux_bench_soak", SOAK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_create_delete_cycles_and_restarts_leak_nothing(tmp_path):
    result = _load_soak().soak(cycles=80, restarts=3, base=tmp_path)
    assert [run["ended_by"] for run in result["lifetimes"]] == [
        "SIGTERM",
        "SIGKILL",
        "SIGTERM",
        "SIGTERM",
    ]
    assert all(run["cycles"] == 20 for run in result["lifetimes"])
    for run in result["lifetimes"]:
        for process in ("server", "nursery"):
            first, last = run[process][0], run[process][-1]
            assert last["fds"] <= first["fds"] + FD_SLACK, (process, run)
            assert last["threads"] <= first["threads"] + THREAD_SLACK, (process, run)
    assert result["left"] == {
        "kernel_dirs": 0,
        "link_endpoints": 0,
        "server_records": 0,
        "temporary_records": 0,
        "kernel_session_processes": 0,
    }
