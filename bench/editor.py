"""What an editor feels: ``cellmux run --lines`` of a one-liner, end to end.

    python bench/editor.py [--runs 20]

Runs ``cellmux run FILE --lines 1`` against a warm named kernel as a fresh
process each time (as an editor's key binding does), beside ``python3 -c
pass`` (the floor: starting any Python at all) and ``python -X importtime``'s
view of what the command imports. Prints medians and quartiles in ms.
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from servers import start_cellmux  # noqa: E402


def _timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{argv} failed: {done.stderr}")
    return elapsed * 1000


def _summary(name: str, samples: list[float]) -> str:
    q = statistics.quantiles(samples, n=4)
    median = statistics.median(samples)
    spread = f"quartiles {q[0]:.1f}-{q[2]:.1f}, n={len(samples)}"
    return f"{name:<40} median {median:6.1f} ms  ({spread})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    server = start_cellmux("--pool-size", "1")
    with tempfile.TemporaryDirectory(prefix="cellmux-editor-bench-") as home:
        source = os.path.join(home, "edited.py")
        with open(source, "w") as f:
            f.write("x = 1 + 1\n")
        env = dict(
            os.environ, CELLMUX_URL=server.url, CELLMUX_TOKEN=server.token, XDG_STATE_HOME=home
        )
        run = [sys.executable, "-m", "cellmux", "run", source, "--lines", "1", "--kernel", "bench"]
        try:
            _timed(run, env)  # starts and names the kernel
            floor = [_timed([sys.executable, "-c", "pass"], env) for _ in range(args.runs)]
            runs = [_timed(run, env) for _ in range(args.runs)]
            imports = [
                _timed([sys.executable, "-c", "import cellmux.cli, cellmux.terminal.run"], env)
                for _ in range(args.runs)
            ]
        finally:
            server.stop()
            shutil.rmtree(server.workdir, ignore_errors=True)
    print(_summary("python -c pass", floor))
    print(_summary("python -c 'import cellmux.terminal.run'", imports))
    print(_summary("cellmux run --lines 1 (warm kernel)", runs))


if __name__ == "__main__":
    main()
