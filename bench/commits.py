"""Compare commits (or source trees) A/B, alternating, on load-insensitive figures.

    python bench/commits.py main~5 main [/path/to/tree ...] [--rounds 4] [--lines 20000]

Each commit is extracted with ``git archive`` into a temporary directory made
writable by its owner only: the server passes a source tree to its nursery
only if no one else can write to it (``nursery_command``), and a tree root
extracts group-writable would silently run the *installed* cellmux in the
kernels instead (a bisect once blamed the wrong commit for that reason). So
each run also checks, in the kernel, that cellmux is imported from the tree
under test, and fails otherwise.

For each round and each tree: a server with that tree on PYTHONPATH, one
kernel, its USS once idle, then a cell printing ``--lines`` flushed lines:
messages/s, and the CPU seconds of the server and of each kernel thread
(/proc/PID/task). On a shared machine wall times swing with the load; the
CPU per message and the USS do not. Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from drivers import CellmuxConnection  # noqa: E402
from servers import start_cellmux  # noqa: E402

REPO = os.path.dirname(HERE)


def _close_to_others(top: str) -> None:
    for root, dirs, files in os.walk(top):
        for name in [*dirs, *files]:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, os.lstat(path).st_mode & 0o7755)
    os.chmod(top, 0o755)


def extract(commit: str, into: str) -> str:
    """The source tree of C{commit}, closed to others; its src directory."""
    tree = os.path.join(into, commit.replace("/", "_"))
    os.makedirs(tree)
    archive = subprocess.run(
        ["git", "-C", REPO, "archive", commit], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "--no-same-permissions", "-C", tree], input=archive, check=True)
    _close_to_others(tree)
    return os.path.join(tree, "src")


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """tid -> (name, CPU seconds) of every thread of pid."""
    tick = os.sysconf("SC_CLK_TCK")
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        found[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return found


async def run_once(src: str, lines: int) -> dict[str, Any]:
    os.environ["PYTHONPATH"] = src
    server = start_cellmux("--pool-size", "1")
    try:
        server.wait_pool(1)
        model = server.create_kernel()
        pid = server.request("GET", f"/api/kernels/{model['id']}")[1]["pid"]
        conn = await CellmuxConnection.open(server.url, server.token, model["id"])
        where = await conn.execute("import cellmux; print(cellmux.__file__)")
        imported = "".join(where.stdout).strip()
        if not imported.startswith(src + os.sep):
            raise RuntimeError(f"the kernel imported {imported}, not the tree under test {src}")
        await asyncio.sleep(3)
        uss = psutil.Process(pid).memory_full_info().uss
        server_process = psutil.Process(server.process.pid)
        server_before = sum(server_process.cpu_times()[:2])
        before = thread_cpu(pid)
        start = time.perf_counter()
        result = await conn.execute(f"for i in range({lines}): print(i, flush=True)", timeout=300)
        wall = time.perf_counter() - start
        after = thread_cpu(pid)
        server_cpu = sum(server_process.cpu_times()[:2]) - server_before
        await conn.close()
        threads = {
            f"{name}#{tid - pid}": round(cpu - before.get(tid, (name, 0.0))[1], 3)
            for tid, (name, cpu) in after.items()
        }
        kernel_cpu = sum(threads.values())
        return {
            "uss_mb": round(uss / 2**20, 2),
            "messages": result.stream_messages,
            "messages_per_s": round(result.stream_messages / wall),
            "cpu_us_per_message": round(1e6 * (kernel_cpu + server_cpu) / max(1, lines), 1),
            "kernel_cpu_s": round(kernel_cpu, 3),
            "server_cpu_s": round(server_cpu, 3),
            "threads_cpu_s": {k: v for k, v in threads.items() if v > 0.01},
        }
    finally:
        server.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", help="commits, or directories holding src/")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--lines", type=int, default=20000)
    args = parser.parse_args()
    scratch = tempfile.mkdtemp(prefix="cellmux-commits-")
    try:
        os.chmod(scratch, 0o755)
        sources = {
            tree: os.path.join(os.path.abspath(tree), "src")
            if os.path.isdir(tree)
            else extract(tree, scratch)
            for tree in args.trees
        }
        for round_ in range(args.rounds):
            for tree, src in sources.items():
                for attempt in range(3):  # a kernel lost to something else: again
                    try:
                        figures = await run_once(src, args.lines)
                        break
                    except (RuntimeError, OSError, psutil.Error) as e:
                        if "not the tree under test" in str(e) or attempt == 2:
                            raise
                print(json.dumps({"tree": tree, "round": round_, **figures}), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
