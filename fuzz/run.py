"""Run the fuzz targets (fuzz/targets.py) with atheris, each for a bounded time.

    python fuzz/run.py [--seconds N] [--keep-corpus DIR] [--artifacts DIR] [TARGET ...]

Each target runs in its own process, instrumented for coverage (cellmux's
modules only), starting from the committed seeds in fuzz/corpus/<target>.
New inputs go to a temporary corpus (or to --keep-corpus DIR/<target>), so
the repository does not change. A crashing input is written to
--artifacts (default: a new temporary directory, named in the output) and
the run exits with status 1; copy it to fuzz/crashes/<target>/ and it
becomes a regression test (tests/test_fuzz_regressions.py).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"

#: libFuzzer options for every target: inputs up to 4 KiB (room for deep
#: JSON nesting), no input may take more than 10 s or 2 GiB.
LIBFUZZER_OPTIONS = ("-max_len=4096", "-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1")


def worker(target: str, libfuzzer_args: list[str]) -> None:
    """In the child: instrument cellmux, then fuzz one target."""
    import atheris

    sys.path.insert(0, str(HERE))
    with atheris.instrument_imports(include=["cellmux", "targets"]):
        import targets

    function = targets.TARGETS[target]
    atheris.Setup([sys.argv[0], *libfuzzer_args], function)
    atheris.Fuzz()


def run(target: str, seconds: int, corpus: Path, artifacts: Path) -> int:
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    args = [
        *LIBFUZZER_OPTIONS,
        f"-max_total_time={seconds}",
        f"-artifact_prefix={artifacts}/{target}-",
        str(corpus),
        str(CORPUS / target),
    ]
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", target, "--", *args]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, errors="replace")
    took = time.monotonic() - started
    stats = [ln for ln in done.stderr.splitlines() if ln.startswith("stat::number_of_executed")]
    runs = stats[-1].split(":")[-1].strip() if stats else "?"
    print(f"{target}: {runs} inputs in {took:.0f} s, exit {done.returncode}", flush=True)
    if done.returncode != 0:
        print(done.stderr[-6000:], file=sys.stderr, flush=True)
    return done.returncode


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1], argv[3:])
        return 0
    sys.path.insert(0, str(HERE))
    from targets import TARGETS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", choices=[[], *TARGETS], default=[])
    parser.add_argument("--seconds", type=int, default=180, help="per target (default 180)")
    parser.add_argument("--keep-corpus", type=Path, help="keep new inputs in DIR/<target>")
    parser.add_argument("--artifacts", type=Path, help="where crashing inputs go")
    options = parser.parse_args(argv)
    artifacts = options.artifacts or Path(tempfile.mkdtemp(prefix="cellmux-fuzz-"))
    failed = []
    with tempfile.TemporaryDirectory(prefix="cellmux-fuzz-corpus-") as scratch:
        for target in options.targets or list(TARGETS):
            corpus = (options.keep_corpus or Path(scratch)) / target
            if run(target, options.seconds, corpus, artifacts) != 0:
                failed.append(target)
    if failed:
        print(f"crashes in {', '.join(failed)}; inputs in {artifacts}", file=sys.stderr)
        return 1
    if options.artifacts is None:
        shutil.rmtree(artifacts, ignore_errors=True)
    print("no crash")
    return 0


if __name__ == "__main__":
    sys.exit(main())
