"""What an editor feels: ``cellmux run --lines`` of a one-liner, end to end.

    python bench/editor.py [--runs 20]

Runs ``cellmux run FILE --lines 1`` against a warm named kernel as a fresh
process each time (as an editor's key binding does), beside ``python -c
pass`` (the floor: starting any Python at all), the command's imports
alone, and the same run with the quick path off (``CELLMUX_RUN_QUICK=0``:
the asyncio client). bench/run.py runs the same measurement as its
``editor`` stage, on the suite's cellmux server. Times are wall clock, in
seconds in the JSON, printed in ms.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from servers import Server, start_cellmux  # noqa: E402


def _timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{argv} failed: {done.stderr}")
    return elapsed


def _summary(samples: list[float]) -> dict[str, float]:
    q = statistics.quantiles(samples, n=10)
    return {"p50": statistics.median(samples), "p10": q[0], "p90": q[-1], "n": len(samples)}


def measure(server: Server, runs: int) -> dict[str, Any]:
    """The four timings, interleaved run by run so that load changes hit all alike."""
    with tempfile.TemporaryDirectory(prefix="cellmux-editor-bench-") as home:
        source = os.path.join(home, "edited.py")
        with open(source, "w") as f:
            f.write("x = 1 + 1\n")
        env = dict(
            os.environ, CELLMUX_URL=server.url, CELLMUX_TOKEN=server.token, XDG_STATE_HOME=home
        )
        full = dict(env, CELLMUX_RUN_QUICK="0")
        run = [sys.executable, "-m", "cellmux", "run", source, "--lines", "1", "--kernel", "bench"]
        commands = {
            "python -c pass": ([sys.executable, "-c", "pass"], env),
            "imports of cellmux run": (
                [sys.executable, "-c", "import cellmux.cli, cellmux.terminal.run"],
                env,
            ),
            "cellmux run --lines 1": (run, env),
            "cellmux run --lines 1, full client": (run, full),
        }
        _timed(run, env)  # starts and names the kernel
        samples: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(runs):
            for name, (argv, environ) in commands.items():
                samples[name].append(_timed(argv, environ))
    return {name: _summary(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    server = start_cellmux("--pool-size", "1")
    try:
        results = measure(server, args.runs)
    finally:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)
    print(f"load average {os.getloadavg()[0]:.1f}")
    for name, s in results.items():
        print(
            f"{name:<36} p50 {s['p50'] * 1000:6.1f} ms  "
            f"(p10 {s['p10'] * 1000:.1f}, p90 {s['p90'] * 1000:.1f}, n={s['n']})"
        )


if __name__ == "__main__":
    main()
