"""Paced kernels among N idle ones, with the server's reactor stalls.

    python bench/stalls.py --steps 0,250,500 --seconds 60 [--active 20]
        [--stall-ms 10] [--server-nice -10 --rounds 3] [--kernel-nice 10]

One server, leading its own session as under systemd, with
``CELLMUX_STALL_LOG`` (it logs every reactor iteration busier than
``--stall-ms`` with its CPU time, its run-queue wait and what ran). One
lone kernel, plus ``--active`` others, each run ``1+1`` once a second, out
of step. At each step the idle kernels are first brought up to the step's
count (each runs one cell, then nobody is attached); after ``--settle``
seconds the paced ones run for ``--seconds``. Then, with ``--server-nice``
or ``--kernel-nice``, windows alternate (A/B, ``--rounds`` times) between
nice 0 and the given value for the server's autogroup (what server_nice
sets) or for every kernel's.

Per window, one JSON line: the lone kernel's and the active ones' round
trips (p50/p90/p99/max), the server's CPU and wake-ups a second, the
reactor's busy-time histogram (``/metrics``) and every stall logged in the
window as (wall, CPU, run-queue wait) in ms. ``--log DIR`` keeps the
server's log (stall stacks). At most ``max(steps) + active + 5`` kernels
are alive at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import sys
import time
import urllib.request
from typing import Any

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from drivers import CellmuxConnection  # noqa: E402
from servers import Server, start_cellmux, wakeups  # noqa: E402

_STALL = re.compile(
    r"reactor stall: busy (?P<wall>[\d.]+) ms, reactor thread CPU (?P<cpu>[\d.]+) ms, "
    r"waiting for a core (?P<queued>-?[\d.]+) ms"
)
_BUSY = re.compile(r'^cellmux_reactor_busy_seconds_bucket\{le="(?P<le>[^"]+)"\} (?P<n>\S+)$')


def _cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def _busy_histogram(server: Server) -> dict[str, float]:
    request = urllib.request.Request(
        server.url + "/metrics", headers={"Authorization": f"token {server.token}"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        text = response.read().decode()
    return {m["le"]: float(m["n"]) for line in text.splitlines() if (m := _BUSY.match(line))}


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _paced(conn: CellmuxConnection, seconds: float) -> list[float]:
    out: list[float] = []
    start = time.perf_counter()
    n = 0
    while time.perf_counter() < start + seconds:
        r = await conn.execute("1+1", timeout=60)
        if r.timed_out:
            raise RuntimeError("a cell timed out")
        out.append(max(r.reply, r.idle))
        n += 1
        await asyncio.sleep(max(0.0, start + n - time.perf_counter()))
    return out


async def _add_idle(server: Server, n: int, ids: list[str]) -> None:
    for _ in range(n):
        model = server.create_kernel()
        conn = await CellmuxConnection.open(server.url, server.token, model["id"])
        await conn.execute("0", timeout=60)
        await conn.close()
        ids.append(model["id"])


def _set_kernels_autogroup_nice(server: Server, nice: int) -> int:
    """Write C{nice} to every kernel's autogroup (each kernel leads its own
    session, so its own autogroup); how many were set."""
    done = 0
    for model in server.request("GET", "/api/kernels")[1]:
        pid = server.request("GET", f"/api/kernels/{model['id']}")[1].get("pid")
        if pid:
            with contextlib.suppress(OSError), open(f"/proc/{pid}/autogroup", "w") as f:
                f.write(str(nice))
                done += 1
    return done


async def _window(
    server: Server, conns: list[CellmuxConnection], seconds: float, label: str, log_path: str
) -> dict[str, Any]:
    """conns[0] is the lone kernel's; the rest are the active ones."""
    pid = server.process.pid
    busy0 = _busy_histogram(server)
    log0 = os.path.getsize(log_path)
    cpu0, wake0, t0 = _cpu(pid), wakeups([pid]), time.perf_counter()

    async def paced(conn: CellmuxConnection, phase: float) -> list[float]:
        await asyncio.sleep(phase)
        return await _paced(conn, seconds)

    results = await asyncio.gather(*(paced(c, i / len(conns)) for i, c in enumerate(conns)))
    cpu1, wake1, t1 = _cpu(pid), wakeups([pid]), time.perf_counter()
    busy1 = _busy_histogram(server)
    with open(log_path, errors="replace") as f:
        f.seek(log0)
        stalls = [
            (float(m["wall"]), float(m["cpu"]), float(m["queued"]))
            for m in _STALL.finditer(f.read())
        ]

    def figures(values: list[float]) -> dict[str, float]:
        ms = [v * 1000 for v in values]
        return {
            "cells": len(ms),
            "p50": round(statistics.median(ms), 2),
            "p90": round(_quantile(ms, 0.9), 2),
            "p99": round(_quantile(ms, 0.99), 2),
            "max": round(max(ms), 2),
        }

    out: dict[str, Any] = {"label": label, "lone": figures(results[0])}
    if len(results) > 1:
        out["active"] = figures([v for r in results[1:] for v in r])
    out |= {
        "server_cpu_pct": round(100 * (cpu1 - cpu0) / (t1 - t0), 2),
        "server_wakeups_per_s": round((wake1 - wake0) / (t1 - t0), 1),
        "busy_iterations": {le: busy1[le] - busy0.get(le, 0) for le in busy1},
        "stalls": stalls,
    }
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default="0,250,500")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--stall-ms", type=float, default=10)
    parser.add_argument("--settle", type=float, default=10)
    parser.add_argument("--active", type=int, default=0, help="paced kernels beside the lone one")
    parser.add_argument(
        "--kernel-nice",
        type=int,
        default=None,
        help="at the last step, alternate the kernels' autogroup nice 0 / this (--rounds)",
    )
    parser.add_argument(
        "--server-nice",
        type=int,
        default=None,
        help="at the last step, alternate the server's autogroup nice 0 / this (--rounds); "
        "the server leads its own session, so the autogroup is its own (server_nice)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--log", help="copy the server's log here")
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    os.environ["CELLMUX_STALL_LOG"] = str(args.stall_ms)
    server = start_cellmux(
        "--pool-size", "4", "--max-kernels", str(max(steps) + args.active + 20), own_session=True
    )
    log_path = os.path.join(server.workdir, "server.log")
    ids: list[str] = []
    conns: list[CellmuxConnection] = []
    try:
        for _ in range(1 + args.active):
            model = server.create_kernel()
            conn = await CellmuxConnection.open(server.url, server.token, model["id"])
            await conn.execute("0", timeout=60)
            conns.append(conn)
        for step in steps:
            await _add_idle(server, step - len(ids), ids)
            await asyncio.sleep(args.settle)
            out = await _window(server, conns, args.seconds, "", log_path)
            print(json.dumps({"idle": len(ids), "active": args.active, **out}), flush=True)
        if args.server_nice is not None:
            for _ in range(args.rounds):
                for nice in (0, args.server_nice):
                    with open(f"/proc/{server.process.pid}/autogroup", "w") as f:
                        f.write(str(nice))
                    await asyncio.sleep(2)
                    label = f"server nice {nice}"
                    out = await _window(server, conns, args.seconds, label, log_path)
                    print(json.dumps({"idle": len(ids), "active": args.active, **out}), flush=True)
            with open(f"/proc/{server.process.pid}/autogroup", "w") as f:
                f.write("0")
        if args.kernel_nice is not None:
            for _ in range(args.rounds):
                for nice in (0, args.kernel_nice):
                    _set_kernels_autogroup_nice(server, nice)
                    await asyncio.sleep(2)
                    out = await _window(
                        server, conns, args.seconds, f"kernels nice {nice}", log_path
                    )
                    print(json.dumps({"idle": len(ids), "active": args.active, **out}), flush=True)
        for conn in conns:
            await conn.close()
    finally:
        if args.log:
            os.makedirs(args.log, exist_ok=True)
            shutil.copy(log_path, os.path.join(args.log, "server.log"))
        server.stop()


if __name__ == "__main__":
    asyncio.run(main())
